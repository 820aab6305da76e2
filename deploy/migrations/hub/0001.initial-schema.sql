-- The initial schema: the ledger, reference and clearing tables as deploy/sql/schema.sql and
-- clearing.sql created them before migrations had a history (IF NOT EXISTS: a database made by
-- those files takes this migration as a no-op and gets its history row).

-- Database schema.
-- Money is integer fen (bigint) everywhere; ratios are numeric(5,4).

-- Reference data ---------------------------------------------------------------

CREATE TABLE IF NOT EXISTS region (
    admdvs        char(6) PRIMARY KEY,
    name          text    NOT NULL,
    prov_admdvs   char(6) NOT NULL,   -- XX0000
    pool_admdvs   char(6) NOT NULL    -- pooling region (统筹区)
);

CREATE TABLE IF NOT EXISTS hospital (
    fixmedins_code text    PRIMARY KEY,
    fixmedins_name text    NOT NULL,
    admdvs         char(6) NOT NULL,
    hosp_lv        smallint NOT NULL CHECK (hosp_lv BETWEEN 1 AND 3)
);

CREATE TABLE IF NOT EXISTS person (
    psn_no         text    PRIMARY KEY,
    insuplc_admdvs char(6) NOT NULL,
    insutype       text    NOT NULL CHECK (insutype IN ('310', '390')),
    psn_type       text    NOT NULL,
    assistance     text    CHECK (assistance IN ('1', '2')),
    acct_balc_fen  bigint  NOT NULL CHECK (acct_balc_fen >= 0),
    chronic        text[]  NOT NULL DEFAULT '{}',   -- chronic-disease eligibility (HTN, DM, ...)
    certno         text,                            -- personal identifier: stored, never logged
    psn_name       text
);
CREATE INDEX IF NOT EXISTS person_certno ON person (certno);

CREATE TABLE IF NOT EXISTS filing (
    filing_id      text    PRIMARY KEY,   -- deterministic: reloading the same row is a no-op
    psn_no         text    NOT NULL,
    filing_type    text    NOT NULL CHECK (filing_type IN ('LONG_TERM', 'REFERRAL', 'EMERGENCY', 'TEMPORARY')),
    begndate       date    NOT NULL,
    enddate        date    NOT NULL,
    target_admdvs  char(6),              -- a province XX0000, or NULL for anywhere
    source         text    NOT NULL DEFAULT 'refdata',  -- refdata | promise | online
    revoked        boolean NOT NULL DEFAULT false,
    CHECK (enddate >= begndate)
);
CREATE INDEX IF NOT EXISTS filing_psn ON filing (psn_no);

CREATE TABLE IF NOT EXISTS catalog_item (
    admdvs         char(6) NOT NULL,      -- treating province XX0000
    med_list_codg  text    NOT NULL,
    name           text    NOT NULL,
    chrgitm_lv     text    NOT NULL CHECK (chrgitm_lv IN ('01', '02', '03')),
    selfpay_prop   numeric(5, 4) NOT NULL CHECK (selfpay_prop BETWEEN 0 AND 1),
    pric_uplmt_fen bigint,                -- optional unit price ceiling
    PRIMARY KEY (admdvs, med_list_codg)
);

-- Ledger -------------------------------------------------------------------------

-- One row per accepted request that changed or could change state: the idempotency record.
-- A repeated msgid returns `response` and changes nothing.
CREATE TABLE IF NOT EXISTS processed_request (
    msgid          text    PRIMARY KEY,
    infno          text    NOT NULL,
    fixmedins_code text    NOT NULL,
    infcode        smallint NOT NULL,
    response       bytea   NOT NULL,      -- the response envelope's `output`/error as sent
    processed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS visit (
    mdtrt_id        text    PRIMARY KEY,
    psn_no          text    NOT NULL,
    fixmedins_code  text    NOT NULL,
    med_type        text    NOT NULL,
    insutype        text    NOT NULL,
    scope           text    NOT NULL CHECK (scope IN ('local', 'intra_province', 'cross_province')),
    insured_admdvs  char(6) NOT NULL,
    treating_admdvs char(6) NOT NULL,
    ipt_otp_no      text    NOT NULL,
    begntime        timestamp NOT NULL,
    endtime         timestamp,
    dise_codg       text,
    state           text    NOT NULL,     -- registered | admitted | discharged | settled | cancelled
    created_msgid   text    NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS visit_psn ON visit (psn_no);
ALTER TABLE visit ADD COLUMN IF NOT EXISTS chronic_disease text;   -- outpatient med_type 14

CREATE TABLE IF NOT EXISTS fee_item (
    mdtrt_id        text    NOT NULL REFERENCES visit (mdtrt_id),
    feedetl_sn      text    NOT NULL,
    med_list_codg   text    NOT NULL,
    medins_list_codg text   NOT NULL,
    chrgitm_lv      text    NOT NULL,
    selfpay_prop    numeric(5, 4) NOT NULL,
    pric_uplmt_fen  bigint,
    fee_fen         bigint  NOT NULL CHECK (fee_fen >= 0),
    cnt             numeric(16, 4) NOT NULL,
    pric_fen        bigint  NOT NULL,
    fee_ocur_time   timestamp NOT NULL,
    upload_msgid    text    NOT NULL,
    cancelled       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (mdtrt_id, feedetl_sn)
);

-- Settlements and reversals. A reversal is its own row with negated amounts.
CREATE TABLE IF NOT EXISTS settlement (
    setl_id          text    PRIMARY KEY,
    msgid            text    NOT NULL UNIQUE,
    kind             text    NOT NULL CHECK (kind IN ('settle', 'reverse')),
    orig_setl_id     text    UNIQUE REFERENCES settlement (setl_id),  -- set on reversals: one per settlement
    mdtrt_id         text    NOT NULL REFERENCES visit (mdtrt_id),
    psn_no           text    NOT NULL,
    fixmedins_code   text    NOT NULL,
    insutype         text    NOT NULL,
    med_type         text    NOT NULL,
    scope            text    NOT NULL,
    filing_type      text,
    insured_admdvs   char(6) NOT NULL,
    insured_pool     char(6) NOT NULL,
    treating_admdvs  char(6) NOT NULL,
    treating_pool    char(6) NOT NULL,
    clr_optins       char(6) NOT NULL,
    setl_time        timestamp NOT NULL,   -- Asia/Shanghai wall time of the request
    acc_year         smallint NOT NULL,    -- accumulator year this settlement counts in
    medfee_sumamt    bigint NOT NULL,
    fulamt_ownpay_amt bigint NOT NULL,
    overlmt_selfpay  bigint NOT NULL,
    preselfpay_amt   bigint NOT NULL,
    inscp_scp_amt    bigint NOT NULL,
    act_pay_dedc     bigint NOT NULL,
    hifp_pay         bigint NOT NULL,
    pool_prop_selfpay numeric(5, 4) NOT NULL,
    hifmi_pay        bigint NOT NULL,
    hifob_pay        bigint NOT NULL,
    maf_pay          bigint NOT NULL,
    fund_pay_sumamt  bigint NOT NULL,
    psn_part_amt     bigint NOT NULL,
    acct_pay         bigint NOT NULL,
    psn_cash_pay     bigint NOT NULL,
    balc             bigint NOT NULL,
    accum_delta      jsonb  NOT NULL,      -- exactly what this row added to the accumulators
    CHECK (fund_pay_sumamt = hifp_pay + hifmi_pay + hifob_pay + maf_pay),
    CHECK (psn_part_amt = medfee_sumamt - fund_pay_sumamt),
    CHECK (psn_cash_pay = psn_part_amt - acct_pay)
);
CREATE INDEX IF NOT EXISTS settlement_hospital_day ON settlement (fixmedins_code, setl_time);
CREATE INDEX IF NOT EXISTS settlement_psn ON settlement (psn_no);

-- Year-to-date accumulators per person and calendar year (Asia/Shanghai).
CREATE TABLE IF NOT EXISTS accumulator (
    psn_no             text     NOT NULL,
    acc_year           smallint NOT NULL,
    basic_paid         bigint   NOT NULL DEFAULT 0,
    chronic_paid       jsonb    NOT NULL DEFAULT '{}',
    outpatient_dedc_used bigint NOT NULL DEFAULT 0,
    outpatient_paid    bigint   NOT NULL DEFAULT 0,
    critical_base      bigint   NOT NULL DEFAULT 0,
    critical_paid      bigint   NOT NULL DEFAULT 0,
    supplementary_paid bigint   NOT NULL DEFAULT 0,
    assistance_paid    bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (psn_no, acc_year)
);

-- Personal account balance (not per year). Created from person.acct_balc_fen on first use.
CREATE TABLE IF NOT EXISTS account (
    psn_no    text   PRIMARY KEY,
    balc_fen  bigint NOT NULL CHECK (balc_fen >= 0)
);

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
