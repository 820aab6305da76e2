-- depends: 0007.roles
-- Clearing at national shape (README "Clearing at national shape"): 3261 in batches of at most 100 rows,
-- 3260-3262 for the treating region's agency (A + pooling admdvs + 00000), statement versions.

-- A month is confirmed by several 3261 batches: a batch is one clearing_confirmation row (otransid = its
-- msgid; fixmedins_code = who sent it: a hospital, a pharmacy or an agency); its rows are
-- clearing_confirmed_row. A row is confirmed (or disputed) by one live batch at a time: rolling a batch
-- back (3262) deletes its rows, so they may be confirmed again.
DROP INDEX IF EXISTS clearing_confirmation_live;
ALTER TABLE clearing_confirmation
    ADD COLUMN batch_rows  bigint NOT NULL DEFAULT 0,   -- rows the 3261 listed
    ADD COLUMN dup_cnt     bigint NOT NULL DEFAULT 0,   -- of which an earlier live batch held already
    ADD COLUMN sender_pool char(6);                      -- the sender's pooling region (an agency rolls back its own)
CREATE INDEX clearing_confirmation_month ON clearing_confirmation (clr_month, fixmedins_code);

CREATE TABLE clearing_confirmed_row (
    setl_id          text    PRIMARY KEY REFERENCES clearing_entry (setl_id),
    clr_month        char(7) NOT NULL REFERENCES clearing_month (clr_month),
    fixmedins_code   text    NOT NULL,                 -- the row's institution
    treating_pool    char(6) NOT NULL,                 -- the row's treating pooling region (the agency's scope)
    otransid         text    NOT NULL REFERENCES clearing_confirmation (otransid),
    cnfm_flag        char(1) NOT NULL CHECK (cnfm_flag IN ('0', '1')),   -- 0: disputed
    medfee_sumamt    bigint  NOT NULL,                 -- as the sender gave them (fen)
    fund_pay_sumamt  bigint  NOT NULL,
    confirmed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX clearing_confirmed_row_batch ON clearing_confirmed_row (otransid);
CREATE INDEX clearing_confirmed_row_hospital ON clearing_confirmed_row (clr_month, fixmedins_code);
CREATE INDEX clearing_confirmed_row_pool ON clearing_confirmed_row (clr_month, treating_pool);

-- 3260 for an agency: a month's rows of every institution of its pooling region, in page order.
CREATE INDEX clearing_entry_month_pool ON clearing_entry (clr_month, treating_pool, setl_time, setl_id);

-- Operator adjustments of a closed month (clearing.cli adjust): a correction of one pooling-region pair's
-- amounts with its reason; each re-issues the month's statement as a new version (older versions kept,
-- frozen by clearing_statement_frozen). `ref` is the idempotency key of the command.
CREATE TABLE clearing_adjustment (
    adj_ref          text    PRIMARY KEY CHECK (adj_ref ~ '^[0-9A-Za-z_.-]{1,40}$'),
    clr_month        char(7) NOT NULL REFERENCES clearing_month (clr_month),
    insured_pool     char(6) NOT NULL,
    treating_pool    char(6) NOT NULL CHECK (treating_pool <> insured_pool),
    insured_prov     char(6) NOT NULL,
    treating_prov    char(6) NOT NULL,
    scope            text    NOT NULL CHECK (scope IN ('intra_province', 'cross_province')),
    medfee_sumamt    bigint  NOT NULL,
    hifp_pay         bigint  NOT NULL,
    hifmi_pay        bigint  NOT NULL,
    hifob_pay        bigint  NOT NULL,
    maf_pay          bigint  NOT NULL,
    fund_pay_sumamt  bigint  NOT NULL,
    reason           text    NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    stmt_version     integer NOT NULL CHECK (stmt_version >= 2),   -- the version it issued
    created_by       text    NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (fund_pay_sumamt = hifp_pay + hifmi_pay + hifob_pay + maf_pay),
    UNIQUE (clr_month, stmt_version)
);
CREATE OR REPLACE TRIGGER clearing_adjustment_frozen BEFORE UPDATE OR DELETE ON clearing_adjustment
    FOR EACH ROW EXECUTE FUNCTION clearing_statement_frozen();

-- Who issued a statement version and why (version 1: the close).
ALTER TABLE clearing_statement
    ADD COLUMN issued_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN issued_by  text        NOT NULL DEFAULT '',
    ADD COLUMN reason     text        NOT NULL DEFAULT '';

-- Grants: the clearing service keeps the confirmations; adjustments are the operators' (the owner's)
-- and read by the service, the monitor and the dashboard.
GRANT SELECT, INSERT, UPDATE, DELETE ON clearing_confirmed_row TO xs_clearing;
GRANT SELECT ON clearing_adjustment TO xs_clearing;
GRANT SELECT ON clearing_confirmed_row, clearing_adjustment TO xs_monitor, xs_dashboard;
