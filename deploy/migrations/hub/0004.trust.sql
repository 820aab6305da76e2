-- depends: 0003.refdata-load
-- Trust (README "Security"): institution keys, sign-in sessions, the msgid registry and the audit trail.

-- Keys the broker issues to each institution (services/refdata/keys.py). The secret is sealed with
-- AES-256-GCM under the deployment's key-encryption key (never stored in the clear). Several keys of
-- one institution are live during a rotation: the old one until expires_at, or until revoked.
-- Every change writes a refdata_change row ('institution_key', fixmedins_code): routers pick it up
-- without a restart.
CREATE TABLE institution_key (
    key_id          text        PRIMARY KEY,
    fixmedins_code  text        NOT NULL,
    secret_sealed   bytea       NOT NULL,
    issued_at       timestamptz NOT NULL DEFAULT now(),
    issued_by       text        NOT NULL,
    expires_at      timestamptz,
    revoked_at      timestamptz,
    revoked_by      text
);
CREATE INDEX institution_key_code ON institution_key (fixmedins_code);

ALTER TABLE refdata_change DROP CONSTRAINT refdata_change_entity_check;
ALTER TABLE refdata_change ADD CONSTRAINT refdata_change_entity_check
    CHECK (entity IN ('hospital', 'catalog_item', 'region', 'institution_key'));

-- 9001 opens a session of an institution's operator; 9002 ends it. Every other request names a live one.
CREATE TABLE sign_session (
    sign_no         text        PRIMARY KEY,
    fixmedins_code  text        NOT NULL,
    opter           text        NOT NULL,
    signed_in_at    timestamptz NOT NULL DEFAULT now(),
    signed_out_at   timestamptz
);
CREATE INDEX sign_session_live ON sign_session (fixmedins_code) WHERE signed_out_at IS NULL;

-- Every msgid the router accepted, with a digest of what it stood for: a msgid seen again with
-- other content is MSGID_CONFLICT (concurrent duplicates included: the primary key decides).
-- Pruned by `deploy.ops retention` after the clock window.
CREATE TABLE msgid_seen (
    msgid    text        PRIMARY KEY,
    digest   bytea       NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX msgid_seen_at ON msgid_seen (seen_at);

-- The operators' audit trail: who did what, when, before and after. Append-only: no role is granted
-- UPDATE or DELETE, and this trigger refuses them (and TRUNCATE) even for the owner.
CREATE TABLE audit_log (
    audit_id  bigserial   PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text        NOT NULL CHECK (actor <> ''),
    action    text        NOT NULL,
    target    text        NOT NULL DEFAULT '',
    before    jsonb,
    after     jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
