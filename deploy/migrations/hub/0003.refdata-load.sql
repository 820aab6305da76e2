-- depends: 0002.federation
-- Reference-data loads (services/refdata/load.py). One row per load of a directory, identified by
-- the sha256 of its four files; one step row per unit of work committed (the staging, the hub's
-- tables, each chunk of persons, filings and the person index per shard). A load killed midway and
-- started again on the same files finds its unfinished row and skips the steps already recorded.
-- The staging tables themselves are UNLOGGED tables the loader creates (refdata_stage_*).
CREATE TABLE refdata_load (
    load_id     bigserial PRIMARY KEY,
    digest      text        NOT NULL,
    state       text        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'abandoned')),
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    counts      jsonb       NOT NULL DEFAULT '{}'   -- <table> rows in the files, <table>_changed
);
CREATE INDEX refdata_load_running ON refdata_load (digest) WHERE state = 'running';

CREATE TABLE refdata_load_step (
    load_id  bigint      NOT NULL REFERENCES refdata_load (load_id) ON DELETE CASCADE,
    step     text        NOT NULL,   -- staged | hub | person:<shard>:<chunk> | filing:... | person_index:<chunk>
    counts   jsonb       NOT NULL DEFAULT '{}',
    done_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (load_id, step)
);
