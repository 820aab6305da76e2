-- depends: 0009.monitoring
-- Deductions (拒付, issue 13): a confirmed judgement's suspect amount is taken off what its insured pooling
-- region owes its treating pooling region in a clearing month (README "Review and deductions").
-- One row per deducted judgement — the deduction's entry, as clearing_entry is a ledger row's. The
-- dashboard inserts it in the transaction that confirms the judgement (services/dashboard/review.py);
-- the running positions and the month's statement read it (kind 'deduction'); `verify` recomputes it from
-- the `judgement` rows alone (status 'confirmed', deduct_month).
CREATE TABLE clearing_deduction (
    jr_id            text    PRIMARY KEY REFERENCES judgement (jr_id),
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
    fund_pay_sumamt  bigint  NOT NULL CHECK (fund_pay_sumamt <= 0),   -- a deduction only ever lowers a debt
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (fund_pay_sumamt = hifp_pay + hifmi_pay + hifob_pay + maf_pay)
);
CREATE INDEX clearing_deduction_month ON clearing_deduction (clr_month);

-- A deduction joins or leaves only an open month, under the month's lock: a close holds the month FOR
-- UPDATE, so a deduction waits for it and then sees the month closed (and is refused). SECURITY DEFINER:
-- the writers (dashboard, clearing) need no write grant on clearing_month for this.
CREATE FUNCTION clearing_deduction_open_month() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    month char(7) := CASE WHEN TG_OP = 'DELETE' THEN OLD.clr_month ELSE NEW.clr_month END;
    month_state text;
BEGIN
    INSERT INTO clearing_month (clr_month) VALUES (month) ON CONFLICT DO NOTHING;
    SELECT state INTO month_state FROM clearing_month WHERE clr_month = month FOR KEY SHARE;
    IF month_state = 'closed' THEN
        RAISE EXCEPTION 'clearing month % is closed', month USING ERRCODE = 'check_violation';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;
CREATE TRIGGER clearing_deduction_open_month BEFORE INSERT OR UPDATE OR DELETE ON clearing_deduction
    FOR EACH ROW EXECUTE FUNCTION clearing_deduction_open_month();

-- A confirmed judgement that loses its deduction month (the stream withdrew it while the month was open:
-- status 'withdrawn', deduct_month NULL) takes its deduction back, whoever made the change.
CREATE FUNCTION judgement_deduction_follows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF OLD.deduct_month IS NOT NULL
       AND (NEW.status <> 'confirmed' OR NEW.deduct_month IS DISTINCT FROM OLD.deduct_month) THEN
        DELETE FROM clearing_deduction WHERE jr_id = OLD.jr_id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER judgement_deduction_follows AFTER UPDATE OF status, deduct_month ON judgement
    FOR EACH ROW EXECUTE FUNCTION judgement_deduction_follows();

REVOKE ALL ON FUNCTION clearing_deduction_open_month(), judgement_deduction_follows() FROM PUBLIC;

-- The dashboard records a deduction when its user confirms; everyone who reads clearing reads them.
GRANT SELECT, INSERT ON clearing_deduction TO xs_dashboard;
GRANT SELECT ON clearing_deduction TO xs_clearing, xs_monitor;
