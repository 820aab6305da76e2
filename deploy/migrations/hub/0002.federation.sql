-- Federation by insured province (services/common/shards.py): persons, filings and all settlement
-- state moved to the shard databases (deploy/migrations/shard/). The hub keeps regions, hospitals,
-- catalogs and clearing, and gains the person index and the ordered log of reference-data changes.
-- (Before this migration no deployment held real data: the moved tables are dropped, not copied.)

DROP TABLE IF EXISTS fee_item, accumulator, account, processed_request;
DROP TABLE IF EXISTS settlement, visit, filing, person CASCADE;
DROP INDEX IF EXISTS settlement_nonlocal_time;

-- Certificate number -> person, for 1101 by certificate without knowing the shard. Designed for the
-- country (1.33 billion rows): a 16-byte keyed digest (HMAC-SHA-256 with the deployment's key, never
-- the number itself) as the key, hash-partitioned so each partition's index stays a manageable size.
CREATE TABLE person_index (
    certno_digest  bytea   NOT NULL CHECK (length(certno_digest) = 16),
    psn_no         text    NOT NULL,
    insuplc_admdvs char(6) NOT NULL,
    PRIMARY KEY (certno_digest)
) PARTITION BY HASH (certno_digest);
DO $$
BEGIN
    FOR i IN 0..15 LOOP
        EXECUTE format('CREATE TABLE person_index_p%s PARTITION OF person_index'
                       ' FOR VALUES WITH (MODULUS 16, REMAINDER %s)', lpad(i::text, 2, '0'), i);
    END LOOP;
END $$;

-- Every change of a hospital or catalog item, in commit order: writers take
-- pg_advisory_xact_lock(refdata_lock_id()) before inserting, so versions become visible in the
-- order they are numbered and a reader that has seen version v never misses a change below v.
CREATE TABLE refdata_change (
    version     bigserial PRIMARY KEY,
    entity      text    NOT NULL CHECK (entity IN ('hospital', 'catalog_item', 'region')),
    key         text    NOT NULL,          -- fixmedins_code | admdvs || ':' || med_list_codg | admdvs
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION refdata_lock_id() RETURNS bigint LANGUAGE sql IMMUTABLE AS $$ SELECT 7170510001::bigint $$;
