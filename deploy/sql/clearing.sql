-- Clearing and reconciliation (services/clearing). Applied after schema.sql; idempotent.
-- Money is integer fen. A month is 'YYYY-MM': the calendar month of setl_time (Asia/Shanghai wall time).
--
-- Month assignment (the rule both the streaming writer and the batch recomputation use):
--   a ledger row whose setl_time falls in month N is cleared in the first month M >= N that was open
--   when the clearing service recorded the row. Closing M takes a row lock on clearing_month(M) FOR
--   UPDATE; every writer holds FOR SHARE on the months it assigns to, so a row is either recorded
--   before the close (and is in the frozen statement) or after it (and goes to a later open month).
--   Given the close records, the batch recomputation decides the same month from the ledger alone for
--   rows of open months, and from membership (clearing_entry) only for rows of closed months.

CREATE TABLE IF NOT EXISTS clearing_month (
    clr_month     char(7) PRIMARY KEY CHECK (clr_month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    state         text    NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed')),
    closed_at     timestamptz,
    stmt_version  integer,
    CHECK ((state = 'closed') = (closed_at IS NOT NULL AND stmt_version IS NOT NULL))
);

-- One row per non-local ledger row (settlement or reversal) the clearing service has recorded: the
-- dedupe key of the stream (setl_id), the month it was assigned to, and its amounts.
CREATE TABLE IF NOT EXISTS clearing_entry (
    setl_id          text    PRIMARY KEY,
    kind             text    NOT NULL CHECK (kind IN ('settle', 'reverse')),
    setl_month       char(7) NOT NULL,                 -- calendar month of setl_time
    clr_month        char(7) NOT NULL REFERENCES clearing_month (clr_month),
    fixmedins_code   text    NOT NULL,
    mdtrt_id         text    NOT NULL,
    insutype         text    NOT NULL,
    med_type         text    NOT NULL,
    scope            text    NOT NULL CHECK (scope IN ('intra_province', 'cross_province')),
    insured_admdvs   char(6) NOT NULL,
    treating_admdvs  char(6) NOT NULL,
    insured_pool     char(6) NOT NULL,
    treating_pool    char(6) NOT NULL,
    insured_prov     char(6) NOT NULL,
    treating_prov    char(6) NOT NULL,
    setl_time        timestamp NOT NULL,
    medfee_sumamt    bigint  NOT NULL,
    hifp_pay         bigint  NOT NULL,
    hifmi_pay        bigint  NOT NULL,
    hifob_pay        bigint  NOT NULL,
    maf_pay          bigint  NOT NULL,
    fund_pay_sumamt  bigint  NOT NULL,
    source           text    NOT NULL CHECK (source IN ('stream', 'sweep')),
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (clr_month >= setl_month),
    CHECK (fund_pay_sumamt = hifp_pay + hifmi_pay + hifob_pay + maf_pay)
);
CREATE INDEX IF NOT EXISTS clearing_entry_month_hospital
    ON clearing_entry (clr_month, fixmedins_code, setl_time, setl_id);

-- Running positions, updated in the same transaction as the entries they sum.
CREATE TABLE IF NOT EXISTS clearing_position (
    clr_month        char(7) NOT NULL REFERENCES clearing_month (clr_month),
    insured_pool     char(6) NOT NULL,
    treating_pool    char(6) NOT NULL,
    kind             text    NOT NULL CHECK (kind IN ('settle', 'reverse')),
    adjustment       boolean NOT NULL,                 -- a row of an earlier, closed month
    insured_prov     char(6) NOT NULL,
    treating_prov    char(6) NOT NULL,
    scope            text    NOT NULL,
    cnt              bigint  NOT NULL,
    medfee_sumamt    bigint  NOT NULL,
    hifp_pay         bigint  NOT NULL,
    hifmi_pay        bigint  NOT NULL,
    hifob_pay        bigint  NOT NULL,
    maf_pay          bigint  NOT NULL,
    fund_pay_sumamt  bigint  NOT NULL,
    PRIMARY KEY (clr_month, insured_pool, treating_pool, kind, adjustment),
    CHECK (fund_pay_sumamt = hifp_pay + hifmi_pay + hifob_pay + maf_pay)
);

-- Defence in depth behind the row-lock protocol: nothing is written into a closed month.
CREATE OR REPLACE FUNCTION clearing_refuse_closed_month() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT state FROM clearing_month WHERE clr_month = NEW.clr_month) = 'closed' THEN
        RAISE EXCEPTION 'clearing month % is closed', NEW.clr_month USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER clearing_entry_open_month BEFORE INSERT OR UPDATE ON clearing_entry
    FOR EACH ROW EXECUTE FUNCTION clearing_refuse_closed_month();
CREATE OR REPLACE TRIGGER clearing_position_open_month BEFORE INSERT OR UPDATE ON clearing_position
    FOR EACH ROW EXECUTE FUNCTION clearing_refuse_closed_month();

-- The frozen statement of a closed month: every position, the province roll-up and net positions.
CREATE TABLE IF NOT EXISTS clearing_statement (
    clr_month        char(7) NOT NULL REFERENCES clearing_month (clr_month),
    version          integer NOT NULL CHECK (version >= 1),
    closed_at        timestamptz NOT NULL,
    entry_cnt        bigint  NOT NULL,
    fund_pay_sumamt  bigint  NOT NULL,
    body             jsonb   NOT NULL,
    digest           text    NOT NULL,                 -- sha256 of the canonical body
    PRIMARY KEY (clr_month, version)
);
CREATE OR REPLACE FUNCTION clearing_statement_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'clearing statements are frozen' USING ERRCODE = 'check_violation';
END $$;
CREATE OR REPLACE TRIGGER clearing_statement_no_update BEFORE UPDATE OR DELETE ON clearing_statement
    FOR EACH ROW EXECUTE FUNCTION clearing_statement_frozen();

-- Advance deposits (预付金) of insured provinces at the clearing hub.
CREATE TABLE IF NOT EXISTS clearing_deposit (
    insured_prov      char(6) PRIMARY KEY,
    balance_fen       bigint  NOT NULL DEFAULT 0,
    warning_line_fen  bigint  CHECK (warning_line_fen >= 0),   -- NULL: one month's average cleared amount
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS clearing_deposit_txn (
    txn_id            text    PRIMARY KEY,                    -- idempotency key
    insured_prov      char(6) NOT NULL,
    kind              text    NOT NULL CHECK (kind IN ('topup', 'drawdown')),
    amount_fen        bigint  NOT NULL,                       -- signed
    clr_month         char(7),                                -- drawdowns: the month cleared
    balance_after_fen bigint  NOT NULL,
    memo              text    NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'drawdown') = (clr_month IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS clearing_deposit_txn_prov ON clearing_deposit_txn (insured_prov, created_at);

-- Events to publish after the transaction that decided them commits (deposit movements, alerts).
CREATE TABLE IF NOT EXISTS clearing_outbox (
    event_id      text    PRIMARY KEY,
    topic         text    NOT NULL,
    key           bytea,
    value         bytea   NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX IF NOT EXISTS clearing_outbox_pending ON clearing_outbox (created_at) WHERE published_at IS NULL;

-- 32xx requests: the stored answer per msgid (a resend gets the same bytes).
CREATE TABLE IF NOT EXISTS clearing_request (
    msgid           text    PRIMARY KEY,
    infno           text    NOT NULL,
    fixmedins_code  text    NOT NULL,
    infcode         smallint NOT NULL,
    response        bytea   NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now()
);

-- 3203 / 3204: hospital clearing applications.
CREATE TABLE IF NOT EXISTS clearing_application (
    clr_appy_evt_id text    PRIMARY KEY,
    msgid           text    NOT NULL UNIQUE,
    fixmedins_code  text    NOT NULL,
    clr_type        text    NOT NULL,
    setlym          char(6) NOT NULL,
    begndate        date    NOT NULL,
    enddate         date    NOT NULL,
    psntime         bigint  NOT NULL,
    medfee_sumamt   bigint  NOT NULL,
    med_sumfee      bigint  NOT NULL,
    fund_appy_sum   bigint  NOT NULL,
    cash_payamt     bigint  NOT NULL,
    acct_pay        bigint  NOT NULL,
    state           text    NOT NULL CHECK (state IN ('applied', 'withdrawn')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    withdrawn_at    timestamptz
);
-- One live application per hospital, clearing type and period.
CREATE UNIQUE INDEX IF NOT EXISTS clearing_application_live
    ON clearing_application (fixmedins_code, clr_type, begndate, enddate) WHERE state = 'applied';

-- 3261 / 3262: a hospital's confirmation of a closed month's non-local clearing details.
CREATE TABLE IF NOT EXISTS clearing_confirmation (
    otransid        text    PRIMARY KEY,              -- msgid of the 3261
    fixmedins_code  text    NOT NULL,
    clr_month       char(7) NOT NULL REFERENCES clearing_month (clr_month),
    totalrow        bigint  NOT NULL,
    cnfm_cnt        bigint  NOT NULL,
    dspt_cnt        bigint  NOT NULL,
    disputed        text[]  NOT NULL DEFAULT '{}',    -- setl_ids with cnfm_flag 0
    state           text    NOT NULL CHECK (state IN ('confirmed', 'rolled_back')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    rolled_back_at  timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS clearing_confirmation_live
    ON clearing_confirmation (fixmedins_code, clr_month) WHERE state = 'confirmed';

-- Manual claims (手工零星报销): stored for the direct-settlement rate; no money moves through clearing.
CREATE TABLE IF NOT EXISTS manual_claim (
    claim_id         text    PRIMARY KEY,
    psn_no           text    NOT NULL,                -- personal identifier: stored, never logged
    insured_admdvs   char(6) NOT NULL,
    treating_admdvs  char(6) NOT NULL,
    insured_prov     char(6) NOT NULL,
    treating_prov    char(6) NOT NULL,
    scope            text    NOT NULL CHECK (scope IN ('intra_province', 'cross_province')),
    fixmedins_code   text    NOT NULL DEFAULT '',
    med_type         text    NOT NULL,
    visit_type       text    NOT NULL,
    begntime         timestamp NOT NULL,
    endtime          timestamp NOT NULL,
    medfee_sumamt    bigint  NOT NULL CHECK (medfee_sumamt >= 0),
    fund_pay_sumamt  bigint  NOT NULL CHECK (fund_pay_sumamt >= 0),
    reason           text    NOT NULL,
    reason_dscr      text    NOT NULL DEFAULT '',
    claim_time       timestamp NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS manual_claim_endtime ON manual_claim (endtime);

-- The ledger's non-local rows by time: the month sweep and the batch recomputation range over it.
CREATE INDEX IF NOT EXISTS settlement_nonlocal_time ON settlement (setl_time) WHERE scope <> 'local';
