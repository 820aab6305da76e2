-- Smart monitoring (issue 13): the catalog's monitoring fields and the judgements of the rules.

-- Catalog fields the rules read; the defaults keep every existing catalog valid and unflagged.
ALTER TABLE catalog_item
    ADD COLUMN once_per_day boolean       NOT NULL DEFAULT false,      -- billable at most once a day per visit
    ADD COLUMN gender_only  char(1)       CHECK (gender_only IN ('1', '2')),  -- 1 male / 2 female only
    ADD COLUMN supply_days  numeric(7, 2) NOT NULL DEFAULT 1 CHECK (supply_days > 0);  -- days per unit

-- One row per judgement id (derived from rule, version and anchor evidence: a replay upserts the same row).
-- The stream decides open/withdrawn; the insured region's staff decide confirmed/dismissed.
CREATE TABLE judgement (
    jr_id            text        PRIMARY KEY,
    rule_id          text        NOT NULL,
    rule_version     integer     NOT NULL,
    severity         text        NOT NULL CHECK (severity IN ('low', 'medium', 'high')),
    psn_no           text        NOT NULL,
    insured_admdvs   char(6)     NOT NULL,
    insured_prov     char(6)     NOT NULL,
    treating_admdvs  char(6)     NOT NULL,
    treating_prov    char(6)     NOT NULL,
    fixmedins_code   text        NOT NULL,
    mdtrt_ids        text[]      NOT NULL,
    setl_ids         text[]      NOT NULL,
    items            text[]      NOT NULL,
    window_begin     date        NOT NULL,
    window_end       date        NOT NULL,
    suspect_amt      bigint      NOT NULL CHECK (suspect_amt >= 0),
    detail           text        NOT NULL,
    status           text        NOT NULL DEFAULT 'open'
                                 CHECK (status IN ('open', 'withdrawn', 'confirmed', 'dismissed')),
    detected_at      timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    reviewed_by      text,
    reviewed_at      timestamptz,
    review_reason    text        CHECK (length(review_reason) BETWEEN 1 AND 500),
    deduct_month     text        CHECK (deduct_month ~ '^[0-9]{6}$'),  -- where a confirmed amount is deducted
    CHECK (window_end >= window_begin),
    CHECK ((status IN ('confirmed', 'dismissed')) = (reviewed_by IS NOT NULL))
);
CREATE INDEX judgement_review ON judgement (insured_prov, status, detected_at DESC);
CREATE INDEX judgement_rule ON judgement (rule_id, status);

-- The clearing service writes the stream's judgements; the dashboard reviews them; the monitor reads.
GRANT SELECT, INSERT, UPDATE ON judgement TO xs_clearing;
GRANT SELECT, UPDATE ON judgement TO xs_dashboard;
GRANT SELECT ON judgement TO xs_monitor;
