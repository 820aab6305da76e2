"""Crafted settlement events with visit facts, for the monitoring stream's tests (unit and integration).

Persons are `mon<...>` (psn_no prefix of the stream's tests); insured in 南京 (320100), treated in 苏州
(320500) or 赤峰 (150400); fixed dates.
"""

from __future__ import annotations

from decimal import Decimal

from schemas.internal import SettlementEvent
from schemas.monitoring import ItemFact, VisitFacts

INSURED = "320100"
TREATING = {"H32050000001": ("320500", "320000"), "H32050000002": ("320500", "320000"),
            "H15040000001": ("150400", "150000")}


def settle(setl_id: str, psn_no: str, *, hospital: str = "H32050000001", visit_type: str = "inpatient",
           begin: str = "2026-03-01 09:00:00", end: str = "2026-03-05 10:00:00", medfee: int = 100_000,
           main_dise: str = "J18.901", hosp_lv: int = 3, mdtrt_id: str | None = None, mid_setl: bool = False,
           items: list[ItemFact] | None = None, gend: str = "1") -> SettlementEvent:
    """A settle row of a visit (setl_time = its end, or its begin for a visit without an end)."""
    treating, prov = TREATING[hospital]
    return SettlementEvent(
        setl_id=setl_id, kind="settle", orig_setl_id=None, msgid=f"m-{setl_id}", mdtrt_id=mdtrt_id or f"v-{setl_id}",
        psn_no=psn_no, fixmedins_code=hospital, insutype="310", med_type="21" if visit_type == "inpatient" else "11",
        scope="cross_province" if prov != "320000" else "intra_province", filing_type=None,
        insured_admdvs=INSURED, treating_admdvs=treating, setl_time=end or begin, medfee_sumamt=medfee,
        hifp_pay=medfee // 2, hifmi_pay=0, hifob_pay=0, maf_pay=0, fund_pay_sumamt=medfee // 2, acct_pay=0,
        psn_cash_pay=medfee - medfee // 2, mid_setl=mid_setl,
        visit=VisitFacts(visit_type=visit_type, gend=gend, begntime=begin, endtime=end,  # type: ignore[arg-type]
                         main_dise=main_dise, hosp_lv=hosp_lv, treating_prov=prov, items=items or []),
    )


def reverse(orig: SettlementEvent, setl_id: str, at: str = "2026-03-20 12:00:00") -> SettlementEvent:
    """The reversal of `orig` (no facts: reversals carry none)."""
    return SettlementEvent(
        setl_id=setl_id, kind="reverse", orig_setl_id=orig.setl_id, msgid=f"m-{setl_id}", mdtrt_id=orig.mdtrt_id,
        psn_no=orig.psn_no, fixmedins_code=orig.fixmedins_code, insutype=orig.insutype, med_type=orig.med_type,
        scope=orig.scope, filing_type=None, insured_admdvs=orig.insured_admdvs, treating_admdvs=orig.treating_admdvs,
        setl_time=at, medfee_sumamt=-orig.medfee_sumamt, hifp_pay=-orig.hifp_pay, hifmi_pay=0, hifob_pay=0,
        maf_pay=0, fund_pay_sumamt=-orig.fund_pay_sumamt, acct_pay=0, psn_cash_pay=-orig.psn_cash_pay,
        mid_setl=orig.mid_setl,
    )


def drug(code: str, day: str, cnt: int, sumamt: int, supply_days: int = 1) -> ItemFact:
    return ItemFact(med_list_codg=code, day=day, cnt=Decimal(cnt), sumamt=sumamt, supply_days=Decimal(supply_days))


def cost_stays(psn_prefix: str, n: int, *, medfee: int = 100_000, first_day: int = 1,
               main_dise: str = "K35.800") -> list[SettlementEvent]:
    """n complete stays of n persons in one cost group (K35|3|320000), discharged in March 2026, ~1 a day."""
    out = []
    for i in range(n):
        day = first_day + i % 28
        out.append(settle(f"{psn_prefix}-c{i:03d}", f"{psn_prefix}{i:03d}", main_dise=main_dise,
                          begin=f"2026-03-{day:02d} 08:00:00", end=f"2026-03-{day:02d} 18:00:00", medfee=medfee))
    return out
