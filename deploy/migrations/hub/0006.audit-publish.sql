-- depends: 0004.trust
-- The audit trail on Kafka (README "Security" / "Audit trail"): audit rows are published to fsi.audit
-- in audit_id order by services.common.audit.publish, which keeps its watermark here.

-- audit_id in commit order: every insert takes one transaction-scoped advisory lock before it draws
-- its id, so a transaction that drew a lower id has committed (or rolled back) before a higher id can
-- be drawn. A publisher that has seen audit_id n never misses a row below n (rolled-back ids leave
-- gaps, never late rows). Writers should record their audit row last in their transaction: the lock
-- is held until it ends.
CREATE FUNCTION audit_lock_id() RETURNS bigint LANGUAGE sql IMMUTABLE AS $$ SELECT 7170510003::bigint $$;
CREATE FUNCTION audit_log_commit_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(audit_lock_id());
    NEW.audit_id := nextval(pg_get_serial_sequence('audit_log', 'audit_id'));
    RETURN NEW;
END $$;
-- The id is drawn by the trigger, after the lock (a column default would be drawn before it).
ALTER TABLE audit_log ALTER COLUMN audit_id DROP DEFAULT;
CREATE TRIGGER audit_log_commit_order BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_commit_order();

-- Per topic (a test run's prefix names its own), the highest audit_id published and acknowledged.
-- A publisher crashing after the broker's ack and before this update sends those rows again, under
-- the same key (audit_id): readers drop the duplicates.
CREATE TABLE audit_publish (
    topic         text        PRIMARY KEY,
    published_id  bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
