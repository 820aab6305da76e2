-- Per-service roles (README "Security" › PostgreSQL): what each service may do in a hub database,
-- derived from its code. The roles belong to the cluster (deploy/db.py creates them, with their
-- passwords, before migrating); grants belong to the database, so every hub database gets its own here.
-- The owner `xsettle` (migrations, loaders, operator CLIs) keeps what owning the tables gives it.
-- A table added later needs its grants in a later migration (or it is the owner's alone).

-- Only the owner and the services connect; nobody else creates anything or makes temporary tables.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO xs_router, xs_clearing, xs_monitor, xs_dashboard',
                   current_database());
END
$$;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO xs_router, xs_clearing, xs_monitor, xs_dashboard;

-- Router: the reference data it keeps in memory, the person index for 1101, institution keys to check
-- signatures; it writes sign-in sessions (9001/9002) and the msgid registry. Nothing of clearing.
GRANT SELECT ON region, hospital, catalog_item, refdata_change, person_index, institution_key TO xs_router;
GRANT SELECT, INSERT, UPDATE ON sign_session TO xs_router;
GRANT SELECT, INSERT ON msgid_seen TO xs_router;

-- Clearing: its own tables (a statement, once written, is frozen by its trigger) and manual claims.
GRANT SELECT, INSERT, UPDATE, DELETE ON clearing_month, clearing_entry, clearing_position, clearing_deposit,
    clearing_deposit_txn, clearing_outbox, clearing_request, clearing_application, clearing_confirmation,
    manual_claim TO xs_clearing;
GRANT SELECT, INSERT ON clearing_statement TO xs_clearing;
GRANT SELECT ON region, hospital TO xs_clearing;

-- Monitor and dashboard read only: reference data and clearing; no person index, keys, sessions or audit.
GRANT SELECT ON region, hospital, catalog_item, refdata_change, refdata_load, refdata_load_step,
    clearing_month, clearing_entry, clearing_position, clearing_statement, clearing_deposit,
    clearing_deposit_txn, clearing_outbox, clearing_request, clearing_application, clearing_confirmation,
    manual_claim TO xs_monitor, xs_dashboard;

-- Dashboard sign-in (0005): the dashboard reads its users and creates the first operator `admin`.
GRANT SELECT, INSERT ON dashboard_user TO xs_dashboard;

-- The audit trail is append-only: UPDATE, DELETE and TRUNCATE for nobody (the owner meets the trigger of
-- 0004). The dashboard records its operators' actions (INSERT … RETURNING audit_id needs SELECT; ids come
-- from the sequence, 0006); the clearing service publishes the rows to fsi.audit above its watermark (0006).
-- The operator CLIs write audit rows as the owner.
GRANT SELECT, INSERT ON audit_log TO xs_dashboard;
GRANT USAGE ON SEQUENCE audit_log_audit_id_seq TO xs_dashboard;
GRANT SELECT ON audit_log TO xs_clearing;
GRANT SELECT, INSERT, UPDATE ON audit_publish TO xs_clearing;
