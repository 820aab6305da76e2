-- depends: 0001.shard-schema
-- Month-to-date figures without rescanning the month: the ledger's daily sums per insured and treating
-- province, scope and med_type, kept incrementally in the engine's transaction (ledger_daily_add, called
-- by services/settle/ledger.py::write_batch with the setl_ids it inserted). The monitor, the dashboard
-- and the clearing rates read these rows (a month is ~31 days × keys), never the month's ledger rows.

CREATE TABLE ledger_daily (
    day              date    NOT NULL,   -- of setl_time (Asia/Shanghai wall time)
    insured_prov     char(6) NOT NULL,   -- XX0000
    treating_prov    char(6) NOT NULL,
    scope            text    NOT NULL,
    med_type         text    NOT NULL,
    settled          bigint  NOT NULL DEFAULT 0,   -- rows of kind settle of that day
    reversed         bigint  NOT NULL DEFAULT 0,   -- rows of kind reverse of that day
    -- Settlements of that day not reversed (so far): +1 by a settlement, −1 on the settlement's own day
    -- and keys by its reversal. With one open settlement per visit this is the direct-settlement
    -- person-times of clearing.store.rates (a visit settled again after a reversal counts once).
    direct           bigint  NOT NULL DEFAULT 0,
    medfee_sumamt    bigint  NOT NULL DEFAULT 0,   -- net (reversal rows are negative)
    fund_pay_sumamt  bigint  NOT NULL DEFAULT 0,
    hifp_pay         bigint  NOT NULL DEFAULT 0,
    hifmi_pay        bigint  NOT NULL DEFAULT 0,
    hifob_pay        bigint  NOT NULL DEFAULT 0,
    maf_pay          bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (day, insured_prov, treating_prov, scope, med_type)
);

-- Adds the given new ledger rows (call once per row, in the transaction that inserted them). The
-- upsert goes in key order, so two engine transactions of one shard never deadlock on these rows.
CREATE FUNCTION ledger_daily_add(new_setl_ids text[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO ledger_daily AS d (day, insured_prov, treating_prov, scope, med_type, settled, reversed,
                                   direct, medfee_sumamt, fund_pay_sumamt, hifp_pay, hifmi_pay, hifob_pay, maf_pay)
    SELECT day, insured_prov, treating_prov, scope, med_type, sum(settled), sum(reversed), sum(direct),
           sum(medfee_sumamt), sum(fund_pay_sumamt), sum(hifp_pay), sum(hifmi_pay), sum(hifob_pay), sum(maf_pay)
    FROM (
        SELECT s.setl_time::date AS day, left(s.insured_admdvs, 2) || '0000' AS insured_prov,
               left(s.treating_admdvs, 2) || '0000' AS treating_prov, s.scope, s.med_type,
               (s.kind = 'settle')::int AS settled, (s.kind = 'reverse')::int AS reversed,
               (s.kind = 'settle')::int AS direct, s.medfee_sumamt, s.fund_pay_sumamt, s.hifp_pay, s.hifmi_pay,
               s.hifob_pay, s.maf_pay
        FROM settlement s WHERE s.setl_id = ANY(new_setl_ids)
        UNION ALL
        -- a reversal takes its settlement out of the direct count, on that settlement's day and keys
        SELECT o.setl_time::date, left(o.insured_admdvs, 2) || '0000', left(o.treating_admdvs, 2) || '0000',
               o.scope, o.med_type, 0, 0, -1, 0, 0, 0, 0, 0, 0
        FROM settlement r JOIN settlement o ON o.setl_id = r.orig_setl_id
        WHERE r.setl_id = ANY(new_setl_ids) AND r.kind = 'reverse'
    ) AS x
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, insured_prov, treating_prov, scope, med_type) DO UPDATE SET
        settled = d.settled + EXCLUDED.settled, reversed = d.reversed + EXCLUDED.reversed,
        direct = d.direct + EXCLUDED.direct, medfee_sumamt = d.medfee_sumamt + EXCLUDED.medfee_sumamt,
        fund_pay_sumamt = d.fund_pay_sumamt + EXCLUDED.fund_pay_sumamt, hifp_pay = d.hifp_pay + EXCLUDED.hifp_pay,
        hifmi_pay = d.hifmi_pay + EXCLUDED.hifmi_pay, hifob_pay = d.hifob_pay + EXCLUDED.hifob_pay,
        maf_pay = d.maf_pay + EXCLUDED.maf_pay
$$;
