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
-- Not partitioned: msgid must stay unique across all time (a partitioned table's unique keys must
-- contain the partition key, and no column of a msgid determines a month). It is pruned instead by
-- `python -m deploy.ops retention` (bounded DELETEs along processed_request_at): a response older than
-- the clock window (XS_TIME_PAST_DAYS) can never be asked for again, its request would be refused.
CREATE TABLE processed_request (
    msgid          text    PRIMARY KEY,
    infno          text    NOT NULL,
    fixmedins_code text    NOT NULL,
    infcode        smallint NOT NULL,
    response       bytea   NOT NULL,      -- the response envelope's `output`/error as sent
    processed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_request_at ON processed_request (processed_at);

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

-- The ledger's global unique keys (see settlement): one narrow row per ledger row, never pruned.
CREATE TABLE settlement_key (
    setl_id      text PRIMARY KEY,
    msgid        text NOT NULL UNIQUE,
    orig_setl_id text UNIQUE REFERENCES settlement_key (setl_id)  -- one reversal per settlement
);

-- Settlements and reversals. A reversal is its own row with negated amounts.
-- Partitioned by calendar month of setl_time (settlement_YYYY_MM, created ahead by
-- ensure_ledger_partitions; settlement_default catches a month without its partition, so an insert never
-- fails for want of one): the readers' queries are by hospital and day or by month, and prune to the
-- months they ask for; rows are never deleted (the ledger and clearing need them all).
-- A partitioned table's unique keys must contain setl_time, so the global ones — one row per setl_id,
-- one per msgid, one reversal per settlement — are kept by settlement_key below (filled by a trigger
-- in the same statement); the reversal's reference to its settlement points there too.
CREATE TABLE settlement (
    setl_id          text    NOT NULL,
    msgid            text    NOT NULL,
    kind             text    NOT NULL CHECK (kind IN ('settle', 'reverse')),
    orig_setl_id     text    REFERENCES settlement_key (setl_id),  -- set on reversals: one per settlement
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
    CHECK (psn_cash_pay = psn_part_amt - acct_pay),
    PRIMARY KEY (setl_id, setl_time)
) PARTITION BY RANGE (setl_time);
CREATE INDEX settlement_hospital_day ON settlement (fixmedins_code, setl_time);
CREATE INDEX settlement_psn ON settlement (psn_no);
CREATE INDEX settlement_msgid ON settlement (msgid);
CREATE INDEX settlement_visit ON settlement (mdtrt_id);
CREATE INDEX settlement_orig ON settlement (orig_setl_id) WHERE orig_setl_id IS NOT NULL;

CREATE FUNCTION settlement_key_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A second row for a setl_id or msgid, or a second reversal, is a unique violation here.
    INSERT INTO settlement_key (setl_id, msgid, orig_setl_id) VALUES (NEW.setl_id, NEW.msgid, NEW.orig_setl_id);
    RETURN NULL;
END
$$;
CREATE TRIGGER settlement_key_add AFTER INSERT ON settlement FOR EACH ROW EXECUTE FUNCTION settlement_key_add();

CREATE TABLE settlement_default PARTITION OF settlement DEFAULT;

-- Monthly partitions settlement_YYYY_MM for every month from first to last (dates of any day in them);
-- idempotent. A month whose rows already sit in settlement_default keeps them there (still correct,
-- just not pruned): its partition is not created. Returns the partitions created.
CREATE FUNCTION ensure_ledger_partitions(first date, last date) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', first);
    created text[] := '{}';
    name text;
BEGIN
    WHILE m <= last LOOP
        name := 'settlement_' || to_char(m, 'YYYY_MM');
        IF to_regclass(name) IS NULL AND NOT EXISTS (
            SELECT 1 FROM settlement_default WHERE setl_time >= m AND setl_time < m + interval '1 month'
        ) THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF settlement FOR VALUES FROM (%L) TO (%L)',
                           name, m::timestamp, (m + interval '1 month')::timestamp);
            created := created || name;
        END IF;
        m := m + interval '1 month';
    END LOOP;
    RETURN created;
END
$$;

-- The clock window's months (XS_TIME_PAST_DAYS, 400 by default) and three ahead.
DO $$ BEGIN PERFORM ensure_ledger_partitions((now() - interval '400 days')::date, (now() + interval '3 months')::date); END $$;

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
