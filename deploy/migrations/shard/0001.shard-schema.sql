-- A shard's schema: everything an insured region owns (services/common/shards.py). Each shard is its
-- own database; the hub (deploy/migrations/hub/) holds regions, hospitals, catalogs, the person index
-- and clearing. Money is integer fen (bigint) everywhere; ratios are numeric(5,4).

-- Persons and their filings ----------------------------------------------------------

CREATE TABLE person (
    psn_no         text    PRIMARY KEY,
    insuplc_admdvs char(6) NOT NULL,
    insutype       text    NOT NULL CHECK (insutype IN ('310', '390')),
    psn_type       text    NOT NULL,
    assistance     text    CHECK (assistance IN ('1', '2')),
    acct_balc_fen  bigint  NOT NULL CHECK (acct_balc_fen >= 0),
    -- Chronic-disease eligibility (HTN, DM, ...). Precedence: what was registered online (2503 grant,
    -- 2504 withdrawal) wins over the reference-data file, until the next online change of that
    -- disease. chronic = (chronic_file minus the online withdrawals) plus the online grants; both
    -- writers (the loader and the router) recompute it with person_chronic().
    chronic        text[]  NOT NULL DEFAULT '{}',
    chronic_file   text[]  NOT NULL DEFAULT '{}',   -- as the last file load said
    chronic_online jsonb   NOT NULL DEFAULT '{}',   -- disease -> true (2503) | false (2504)
    certno         text,                            -- personal identifier: stored, never logged
    psn_name       text
);

CREATE FUNCTION person_chronic(file text[], online jsonb) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(d ORDER BY d), '{}') FROM (
        SELECT d FROM unnest(file) AS d WHERE NOT (online ? d)
        UNION
        SELECT key FROM jsonb_each(online) WHERE value = 'true'::jsonb
    ) AS effective(d)
$$;

CREATE TABLE filing (
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
CREATE INDEX filing_psn ON filing (psn_no);

-- Ledger -------------------------------------------------------------------------

-- One row per accepted request that changed or could change state: the idempotency record.
-- A repeated msgid returns `response` and changes nothing.
CREATE TABLE processed_request (
    msgid          text    PRIMARY KEY,
    infno          text    NOT NULL,
    fixmedins_code text    NOT NULL,
    infcode        smallint NOT NULL,
    response       bytea   NOT NULL,      -- the response envelope's `output`/error as sent
    processed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE visit (
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
    created_msgid   text    NOT NULL UNIQUE,
    chronic_disease text                          -- outpatient med_type 14
);
CREATE INDEX visit_psn ON visit (psn_no);

CREATE TABLE fee_item (
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
CREATE TABLE settlement (
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
CREATE INDEX settlement_hospital_day ON settlement (fixmedins_code, setl_time);
CREATE INDEX settlement_psn ON settlement (psn_no);

-- Year-to-date accumulators per person and calendar year (Asia/Shanghai).
CREATE TABLE accumulator (
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
CREATE TABLE account (
    psn_no    text   PRIMARY KEY,
    balc_fen  bigint NOT NULL CHECK (balc_fen >= 0)
);


-- The ledger's non-local rows by time: the month sweep and the batch recomputation range over it.
CREATE INDEX settlement_nonlocal_time ON settlement (setl_time) WHERE scope <> 'local';
