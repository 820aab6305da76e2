-- Mid-stay settlement (mid_setl_flag = 1, 中途结算) and policy versions (README "Mid-stay settlement",
-- "Policy versions").
--
-- settlement.policy_version: the insured region's policy version a row used ("150400@2027-01-01"; a
-- reversal copies its original's). Rows written before this migration used the only version there was.
-- settlement.mid_setl: the row is a mid-stay part (the stay stayed open); the discharge settlement of a
-- stay, and every outpatient and pharmacy settlement, is not. settlement.stay_part: the row's number among
-- the stay's settlements not reversed when it was written (1, 2, ...): the latest part is the highest.
-- fee_item.setl_id: the settlement (part) that settled the item; NULL = not yet settled.

ALTER TABLE settlement ADD COLUMN policy_version text NOT NULL DEFAULT '';
ALTER TABLE settlement ADD COLUMN mid_setl boolean NOT NULL DEFAULT false;
ALTER TABLE settlement ADD COLUMN stay_part smallint NOT NULL DEFAULT 1 CHECK (stay_part >= 1);
ALTER TABLE fee_item ADD COLUMN setl_id text;

-- The items of visits settled before this migration belong to their open (not reversed) settlement.
UPDATE fee_item f SET setl_id = s.setl_id
FROM settlement s
WHERE s.mdtrt_id = f.mdtrt_id AND s.kind = 'settle' AND NOT f.cancelled
  AND NOT EXISTS (SELECT 1 FROM settlement r WHERE r.orig_setl_id = s.setl_id);

-- A stay is one directly settled person-time (REFERENCE §6), however many parts it is settled in: only
-- a row that is not a mid-stay part (the discharge settlement) counts in `direct`, and only a reversal of
-- such a row takes it out again. Money still adds up for every row. Same signature as 0002, so the
-- engine's call and the grants are unchanged.
CREATE OR REPLACE FUNCTION ledger_daily_add(new_setl_ids text[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO ledger_daily AS d (day, insured_prov, treating_prov, scope, med_type, settled, reversed,
                                   direct, medfee_sumamt, fund_pay_sumamt, hifp_pay, hifmi_pay, hifob_pay, maf_pay)
    SELECT day, insured_prov, treating_prov, scope, med_type, sum(settled), sum(reversed), sum(direct),
           sum(medfee_sumamt), sum(fund_pay_sumamt), sum(hifp_pay), sum(hifmi_pay), sum(hifob_pay), sum(maf_pay)
    FROM (
        SELECT s.setl_time::date AS day, left(s.insured_admdvs, 2) || '0000' AS insured_prov,
               left(s.treating_admdvs, 2) || '0000' AS treating_prov, s.scope, s.med_type,
               (s.kind = 'settle')::int AS settled, (s.kind = 'reverse')::int AS reversed,
               (s.kind = 'settle' AND NOT s.mid_setl)::int AS direct, s.medfee_sumamt, s.fund_pay_sumamt,
               s.hifp_pay, s.hifmi_pay, s.hifob_pay, s.maf_pay
        FROM settlement s WHERE s.setl_id = ANY(new_setl_ids)
        UNION ALL
        -- a reversal takes its settlement out of the direct count, on that settlement's day and keys
        SELECT o.setl_time::date, left(o.insured_admdvs, 2) || '0000', left(o.treating_admdvs, 2) || '0000',
               o.scope, o.med_type, 0, 0, -1, 0, 0, 0, 0, 0, 0
        FROM settlement r JOIN settlement o ON o.setl_id = r.orig_setl_id
        WHERE r.setl_id = ANY(new_setl_ids) AND r.kind = 'reverse' AND NOT o.mid_setl
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
