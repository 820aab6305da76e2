"""Hand-computed cases for the insured-region fund split (REFERENCE §4) and the policy file loader.

Amounts are written in fen; ``Y("123.45")`` converts yuan where that reads better.  Comments give the
arithmetic so a reader can check each expected value by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from services.policy.logic import (
    AccumulatorDelta,
    Accumulators,
    FeeItem,
    FundSplit,
    PolicyError,
    PolicyInvariantError,
    SettlementInput,
    accumulators_from_json,
    accumulators_to_json,
    apply_delta,
    check_split,
    compute_split,
    critical_illness_amount,
    delta_from_json,
    delta_to_json,
    mul_ratio,
    revert_delta,
)
from services.policy.policies import DEFAULT_POLICY_PATH, Policy, PolicyBook, PolicyConfigError, deep_merge

D = Decimal


def Y(yuan: str) -> int:
    fen = Decimal(yuan) * 100
    assert fen == fen.to_integral_value()
    return int(fen)


def a(fee_fen: int, *, cnt: str = "1", ceiling: int | None = None) -> FeeItem:
    """A class-01 (甲) item."""
    return FeeItem(fee_fen, D(cnt), "01", D(0), ceiling)


def b(fee_fen: int, prop: str, *, cnt: str = "1", ceiling: int | None = None) -> FeeItem:
    """A class-02 (乙) item with its self-pay-first share."""
    return FeeItem(fee_fen, D(cnt), "02", D(prop), ceiling)


def c(fee_fen: int, *, cnt: str = "1", ceiling: int | None = None) -> FeeItem:
    """A class-03 (丙) item."""
    return FeeItem(fee_fen, D(cnt), "03", D(1), ceiling)


def inp(
    items: Sequence[FeeItem],
    *,
    med_type: str = "21",
    insutype: str = "390",
    psn_type: str = "1501",
    hosp_lv: int = 3,
    assistance: str | None = None,
    filing_type: str | None = None,
    chronic_disease: str | None = None,
    use_account: bool = False,
    balance: int = 0,
) -> SettlementInput:
    return SettlementInput(
        med_type=med_type,
        insutype=insutype,
        psn_type=psn_type,
        hosp_lv=hosp_lv,
        assistance=assistance,
        filing_type=filing_type,
        chronic_disease=chronic_disease,
        use_account=use_account,
        account_balance_fen=balance,
        items=list(items),
    )


@pytest.fixture(scope="module")
def book() -> PolicyBook:
    return PolicyBook.load()


@pytest.fixture(scope="module")
def default(book: PolicyBook) -> Policy:
    return book.default


def region(book: PolicyBook, admdvs: str) -> Policy:
    return book.for_region(admdvs, admdvs[:4] + "00")


def consistent(split: FundSplit) -> None:
    assert split.fund_pay_sumamt == split.hifp_pay + split.hifmi_pay + split.hifob_pay + split.maf_pay
    assert split.psn_part_amt == split.medfee_sumamt - split.fund_pay_sumamt
    assert split.psn_cash_pay == split.psn_part_amt - split.acct_pay


# --- the worked example of REFERENCE §4 ----------------------------------------------------------


def test_reference_worked_example_miyi(book: PolicyBook) -> None:
    policy = book.for_region("510421", "510400")
    assert policy.name == "米易县"
    split = compute_split(
        policy,
        inp(
            [a(Y("30000.00")), b(Y("20000.00"), "0.10"), c(Y("2500.00"))],
            insutype="390",
            psn_type="1501",
            hosp_lv=3,
            assistance="1",
            filing_type="TEMPORARY",
        ),
        Accumulators(),
    )
    assert split.medfee_sumamt == Y("52500.00")
    assert split.fulamt_ownpay_amt == Y("2500.00")
    assert split.overlmt_selfpay == 0
    assert split.preselfpay_amt == Y("2000.00")
    assert split.inscp_scp_amt == Y("48000.00")
    assert split.act_pay_dedc == Y("800.00")
    assert split.pool_prop_selfpay == D("0.4500")
    assert str(split.pool_prop_selfpay) == "0.4500"
    assert split.hifp_pay == Y("21240.00")
    assert split.hifmi_pay == Y("7056.00")  # S = 26760.00; (26760 - 15000) × 0.60
    assert split.hifob_pay == 0
    assert split.maf_pay == Y("13792.80")  # (26760 - 7056) × 0.70
    assert split.fund_pay_sumamt == Y("42088.80")
    assert split.psn_part_amt == Y("10411.20")
    assert split.acct_pay == 0
    assert split.psn_cash_pay == Y("10411.20")
    assert split.balc == 0
    assert split.delta == AccumulatorDelta(
        basic_paid=Y("21240.00"),
        critical_base=Y("26760.00"),
        critical_paid=Y("7056.00"),
        assistance_paid=Y("13792.80"),
    )


# --- policy loading, deep merge, region lookup ---------------------------------------------------


def test_default_policy_values(default: Policy) -> None:
    assert default.region == "DEFAULT"
    assert default.inpatient_deductible_fen == {"310": (40000, 70000, 100000), "390": (20000, 50000, 80000)}
    assert default.inpatient_ratio["390"] == (D("0.85"), D("0.75"), D("0.60"))
    assert default.retiree_bonus == D("0.05")
    assert default.ratio_ceiling == D("0.95")
    assert default.basic_annual_cap_fen == {"310": Y("300000"), "390": Y("200000")}
    assert default.outpatient_deductible_fen == {"310": Y("1000"), "390": 0}
    assert default.outpatient_annual_cap_fen == {"310": Y("3000"), "390": Y("500")}
    assert default.chronic_annual_cap_fen == {
        "HTN": Y("3000"),
        "DM": Y("4000"),
        "CANCER_TX": Y("100000"),
        "ESRD_DIALYSIS": Y("80000"),
        "TRANSPLANT_AR": Y("60000"),
    }
    assert default.critical_deductible_fen == Y("15000")
    assert default.critical_bands == ((0, D("0.60")), (Y("50000"), D("0.65")), (Y("100000"), D("0.70")))
    assert default.critical_annual_cap_fen == Y("400000")
    assert default.supplementary_annual_cap_fen == Y("400000")
    assert default.assistance_ratio == {"1": D("0.70"), "2": D("0.90")}
    assert default.assistance_annual_cap_fen == Y("50000")
    assert default.ratio_cut == {
        "LONG_TERM": D(0),
        "REFERRAL": D(0),
        "EMERGENCY": D(0),
        "TEMPORARY": D("0.10"),
    }
    # a policy is shared by every settlement of its region: its tables are read-only
    with pytest.raises(TypeError):
        default.chronic_annual_cap_fen["HTN"] = 0  # type: ignore[index]
    # every ratio is a Decimal: no float anywhere
    for ratios in default.inpatient_ratio.values():
        assert all(type(r) is Decimal for r in ratios)


def test_chifeng_overrides_employee_only(book: PolicyBook, default: Policy) -> None:
    p = region(book, "150400")
    assert p.name == "赤峰市"
    assert p.inpatient_deductible_fen["310"] == (30000, 60000, 90000)
    assert p.inpatient_deductible_fen["390"] == default.inpatient_deductible_fen["390"]
    assert p.inpatient_ratio["310"] == (D("0.92"), D("0.90"), D("0.85"))
    assert p.inpatient_ratio["390"] == default.inpatient_ratio["390"]
    assert p.basic_annual_cap_fen == {"310": Y("250000"), "390": Y("200000")}
    assert p.critical_bands == default.critical_bands


def test_kaizhou_overrides_and_municipality_pooling(book: PolicyBook, default: Policy) -> None:
    p = book.for_region("500154", "500000")
    assert p.name == "开州区"
    assert p.inpatient_deductible_fen["390"] == (10000, 40000, 90000)
    assert p.inpatient_deductible_fen["310"] == default.inpatient_deductible_fen["310"]
    assert p.inpatient_ratio["390"] == (D("0.88"), D("0.78"), D("0.58"))
    assert p.critical_deductible_fen == Y("12000")
    assert p.critical_annual_cap_fen == default.critical_annual_cap_fen
    # another Chongqing district pools at 500000, which has no table: DEFAULT
    assert book.for_region("500101", "500000") is default


def test_miyi_overrides(book: PolicyBook, default: Policy) -> None:
    p = book.for_region("510421", "510400")
    assert p.inpatient_ratio["390"] == (D("0.85"), D("0.72"), D("0.55"))
    assert p.basic_annual_cap_fen == {"310": Y("300000"), "390": Y("150000")}
    assert p.assistance_annual_cap_fen == Y("30000")
    assert p.assistance_ratio == default.assistance_ratio
    # the table is keyed by the county: the rest of 攀枝花 (pooling region 510400) uses DEFAULT
    assert book.for_region("510402", "510400") is default


def test_putian_overrides_incl_ratio_cut(book: PolicyBook, default: Policy) -> None:
    p = region(book, "350300")
    assert p.inpatient_deductible_fen["310"] == (50000, 80000, 120000)
    assert p.outpatient_annual_cap_fen == {"310": Y("4000"), "390": Y("500")}
    assert p.ratio_cut["TEMPORARY"] == D("0.08")
    assert p.ratio_cut["EMERGENCY"] == D(0)
    assert p.outpatient_deductible_fen == default.outpatient_deductible_fen


def test_taiyuan_overrides(book: PolicyBook, default: Policy) -> None:
    p = region(book, "140100")
    assert p.inpatient_ratio["310"] == (D("0.92"), D("0.90"), D("0.87"))
    assert p.basic_annual_cap_fen["310"] == Y("350000")
    assert p.critical_bands == ((0, D("0.60")), (Y("40000"), D("0.65")), (Y("80000"), D("0.70")))
    assert p.critical_deductible_fen == default.critical_deductible_fen


def test_region_lookup_order(book: PolicyBook, default: Policy) -> None:
    # exact table wins over the pooling region's table
    assert book.for_region("140100", "150400").name == "太原市"
    # a county of 赤峰 without its own table falls back to the pooling region (prefecture) table
    assert book.for_region("150402", "150400").name == "赤峰市"
    assert book.for_region("999999", "999900") is default
    assert book.regions == ("140100", "150400", "350300", "500154", "510421")


def test_load_default_path_is_beside_module() -> None:
    assert DEFAULT_POLICY_PATH.name == "policies.toml"
    assert DEFAULT_POLICY_PATH.parent.name == "policy"
    assert PolicyBook.load(DEFAULT_POLICY_PATH).default.name == "default"


def test_deep_merge_merges_tables_and_replaces_arrays() -> None:
    base = {"x": {"a": 1, "b": {"c": 2, "d": 3}}, "arr": [1, 2, 3], "s": "base"}
    merged = deep_merge(base, {"x": {"b": {"d": 4}}, "arr": [9], "s": "over"})
    assert merged == {"x": {"a": 1, "b": {"c": 2, "d": 4}}, "arr": [9], "s": "over"}
    assert base["x"] == {"a": 1, "b": {"c": 2, "d": 3}}  # the base is not mutated


def test_inline_table_override_merges_keys(tmp_path: Path) -> None:
    path = _write_policy(tmp_path, '["110000"]\nname = "x"\nchronic.annual_cap = { HTN = 5000 }\n')
    p = PolicyBook.load(path).for_region("110000", "110000")
    assert p.chronic_annual_cap_fen["HTN"] == Y("5000")
    assert p.chronic_annual_cap_fen["DM"] == Y("4000")  # from DEFAULT


# --- bad configuration ---------------------------------------------------------------------------


def _write_policy(tmp_path: Path, extra: str, *, default_text: str | None = None) -> Path:
    text = default_text if default_text is not None else DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
    path = tmp_path / "policies.toml"
    path.write_text(text + "\n" + extra, encoding="utf-8")
    return path


def _default_only() -> str:
    text = DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
    return text.split('\n["', 1)[0]


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ("inpatient.ratio.390 = [0.85, 1.2, 0.6]", "inpatient.ratio.390[1]", "0..1"),
        ("inpatient.ratio.310 = [0.9, 0.8]", "inpatient.ratio.310", "3 values"),
        ("inpatient.deductible.390 = [100, 200, 300, 400]", "inpatient.deductible.390", "3 values"),
        ("inpatient.deductible.310 = [100, -1, 300]", "inpatient.deductible.310[1]", ">= 0"),
        ("basic_annual_cap.310 = -5", "basic_annual_cap.310", ">= 0"),
        ("critical.annual_cap = -1", "critical.annual_cap", ">= 0"),
        ("critical.bands = [[0, 0.6], [40000, 0.65], [30000, 0.7]]", "critical.bands[2]", "ascending"),
        ("critical.bands = [[0, 0.6], [0, 0.65]]", "critical.bands[1]", "ascending"),
        ("critical.bands = [[100, 0.6]]", "critical.bands[0]", "start at 0"),
        ("critical.bands = []", "critical.bands", "non-empty"),
        ("critical.bands = [[0, 1.5]]", "critical.bands[0][1]", "0..1"),
        ("supplementary.ratio = -0.1", "supplementary.ratio", "0..1"),
        ('assistance.ratio = { "1" = 1.01 }', "assistance.ratio.1", "0..1"),
        ("cross_region.ratio_cut = { TEMPORARY = 2 }", "cross_region.ratio_cut.TEMPORARY", "0..1"),
        ("cross_region.ratio_cut = { HOLIDAY = 0.1 }", "cross_region.ratio_cut.HOLIDAY", "unknown filing"),
        ("outpatient.ratio.310 = 0.12345", "outpatient.ratio.310", "4 decimal places"),
        ("outpatient.deductible.310 = 0.001", "outpatient.deductible.310", "whole number of fen"),
        ("outpatient.deductible.310 = true", "outpatient.deductible.310", "number"),
        ('outpatient.deductible.310 = "1000"', "outpatient.deductible.310", "number"),
        ("inpatient.ratoi.310 = [0.9, 0.8, 0.7]", "inpatient.ratoi", "unknown key"),
        ("outpatient = 5", "outpatient", "must be a table"),
        ("chronic.annual_cap = 5", "chronic.annual_cap", "must be a table"),
        ("chronic.annual_cap = { HTN = -3 }", "chronic.annual_cap.HTN", ">= 0"),
        ('name = ""', "name", "non-empty"),
    ],
)
def test_bad_region_value_names_region_and_key(tmp_path: Path, extra: str, key: str, problem: str) -> None:
    path = _write_policy(tmp_path, f'["150400"]\n{extra}\n', default_text=_default_only())
    with pytest.raises(PolicyConfigError) as err:
        PolicyBook.load(path)
    assert err.value.region == "150400"
    assert err.value.key == key
    assert problem in err.value.problem
    assert "[150400]" in str(err.value) and key in str(err.value)


def test_bad_default_value_names_default(tmp_path: Path) -> None:
    text = _default_only().replace("inpatient.ratio_ceiling = 0.95", "inpatient.ratio_ceiling = 1.95")
    path = _write_policy(tmp_path, "", default_text=text)
    with pytest.raises(PolicyConfigError) as err:
        PolicyBook.load(path)
    assert (err.value.region, err.value.key) == ("DEFAULT", "inpatient.ratio_ceiling")


def test_missing_key_in_default(tmp_path: Path) -> None:
    text = _default_only().replace("supplementary.annual_cap = 400000\n", "")
    path = _write_policy(tmp_path, "", default_text=text)
    with pytest.raises(PolicyConfigError) as err:
        PolicyBook.load(path)
    assert (err.value.region, err.value.key, err.value.problem) == ("DEFAULT", "supplementary.annual_cap", "missing")


def test_missing_filing_type_in_default(tmp_path: Path) -> None:
    text = _default_only().replace("EMERGENCY = 0.0, ", "")
    path = _write_policy(tmp_path, "", default_text=text)
    with pytest.raises(PolicyConfigError) as err:
        PolicyBook.load(path)
    assert err.value.key == "cross_region.ratio_cut.EMERGENCY"


def test_bad_table_names_and_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match=r"\[1504\].*6-digit"):
        PolicyBook.load(_write_policy(tmp_path, '["1504"]\nname = "x"\n'))
    with pytest.raises(PolicyConfigError, match="missing \\[DEFAULT\\]"):
        PolicyBook.load(_write_policy(tmp_path, "", default_text='["150400"]\nname = "x"\n'))
    with pytest.raises(PolicyConfigError, match="not valid TOML"):
        PolicyBook.load(_write_policy(tmp_path, "this is = = not toml"))
    with pytest.raises(PolicyConfigError, match="cannot read"):
        PolicyBook.load(tmp_path / "absent.toml")


# --- catalog step --------------------------------------------------------------------------------


def test_price_ceiling_overlmt_selfpay(default: Policy) -> None:
    items = [
        a(5000, cnt="2", ceiling=2000),  # 5000 - 2 × 2000 = 1000 over
        b(10000, "0.10", cnt="3", ceiling=3000),  # 1000 over; preselfpay on 9000 → 900
        a(3000, cnt="2", ceiling=2000),  # under the ceiling: 0
        c(9000, cnt="1", ceiling=1000),  # class 03 is wholly fulamt_ownpay, no overlmt on top
        a(200, cnt="0.5", ceiling=333),  # 0.5 × 333 = 166.5 → 167; 200 - 167 = 33
    ]
    split = compute_split(default, inp(items, med_type="41"), Accumulators())
    assert split.medfee_sumamt == 27200
    assert split.fulamt_ownpay_amt == 9000
    assert split.overlmt_selfpay == 1000 + 1000 + 33
    assert split.preselfpay_amt == 900
    assert split.inscp_scp_amt == 27200 - 9000 - 2033 - 900


def test_price_ceiling_feeds_inpatient_split(default: Policy) -> None:
    # employee, 三级, local: inscp = 1,000,000 - 100,000 over = 900,000; dedc 100,000; 800,000 × 0.85
    split = compute_split(
        default,
        inp([a(Y("10000"), cnt="10", ceiling=Y("900"))], insutype="310", psn_type="1101"),
        Accumulators(),
    )
    assert split.overlmt_selfpay == Y("1000")
    assert split.inscp_scp_amt == Y("9000")
    assert split.act_pay_dedc == Y("1000")
    assert split.hifp_pay == Y("6800")
    assert split.psn_part_amt == Y("3200")


def test_half_up_rounding_at_half_fen(default: Policy) -> None:
    assert mul_ratio(5, D("0.5")) == 3  # banker's rounding would give 2
    assert mul_ratio(1, D("0.5")) == 1
    assert mul_ratio(30001, D("0.5")) == 15001
    assert mul_ratio(0, D("0.9")) == 0
    assert mul_ratio(7, D("0.0714")) == 0  # 0.4998
    # preselfpay: 5 fen at 10% = 0.5 fen → 1 fen
    split = compute_split(default, inp([b(5, "0.10")], med_type="41"), Accumulators())
    assert split.preselfpay_amt == 1
    assert split.inscp_scp_amt == 4
    # resident general outpatient: no deductible, ratio 0.50, 300.01 yuan → 150.005 → 150.01
    split = compute_split(default, inp([a(30001)], med_type="11"), Accumulators())
    assert split.hifp_pay == 15001
    assert split.psn_part_amt == 15000


# --- inpatient (21) ------------------------------------------------------------------------------


def test_inpatient_employee_chifeng_with_account(book: PolicyBook) -> None:
    p = region(book, "150400")
    # 二级, in service: dedc 600, (10000 - 600) × 0.90 = 8460
    split = compute_split(
        p,
        inp([a(Y("10000"))], insutype="310", psn_type="1101", hosp_lv=2, use_account=True, balance=Y("500")),
        Accumulators(),
    )
    assert split.act_pay_dedc == Y("600")
    assert split.pool_prop_selfpay == D("0.9000")
    assert split.hifp_pay == Y("8460")
    assert split.hifob_pay == 0 and split.hifmi_pay == 0 and split.maf_pay == 0
    assert split.psn_part_amt == Y("1540")
    assert split.acct_pay == Y("500")
    assert split.psn_cash_pay == Y("1040")
    assert split.balc == 0
    assert split.delta == AccumulatorDelta(basic_paid=Y("8460"), account_spent=Y("500"))


def test_inpatient_deductible_larger_than_in_scope(default: Policy) -> None:
    split = compute_split(default, inp([a(Y("100")), c(Y("50"))], hosp_lv=3), Accumulators())
    assert split.act_pay_dedc == Y("100")
    assert split.hifp_pay == 0
    assert split.fund_pay_sumamt == 0
    assert split.delta.critical_base == Y("100")  # S = inscp - hifp


def test_inpatient_kaizhou_resident_critical_deductible(book: PolicyBook) -> None:
    p = book.for_region("500154", "500000")
    # 三级: dedc 900; (50000 - 900) × 0.58 = 28478; S = 21522; (21522 - 12000) × 0.60 = 5713.20
    split = compute_split(p, inp([a(Y("50000"))]), Accumulators())
    assert split.act_pay_dedc == Y("900")
    assert split.hifp_pay == Y("28478")
    assert split.hifmi_pay == Y("5713.20")
    assert split.fund_pay_sumamt == Y("34191.20")
    assert split.psn_part_amt == Y("15808.80")
    # the same stay under DEFAULT (another 重庆 district): dedc 800; 49200 × 0.60 = 29520; S 20480 → 3288
    split = compute_split(book.for_region("500101", "500000"), inp([a(Y("50000"))]), Accumulators())
    assert split.hifp_pay == Y("29520")
    assert split.hifmi_pay == Y("3288")


def test_inpatient_kaizhou_level_one_and_two(book: PolicyBook) -> None:
    p = book.for_region("500154", "500000")
    split = compute_split(p, inp([a(Y("2000"))], hosp_lv=1), Accumulators())
    assert (split.act_pay_dedc, split.hifp_pay) == (Y("100"), Y("1672"))  # 1900 × 0.88
    split = compute_split(p, inp([a(Y("2000"))], hosp_lv=2), Accumulators())
    assert (split.act_pay_dedc, split.hifp_pay) == (Y("400"), Y("1248"))  # 1600 × 0.78


def test_inpatient_taiyuan_employee(book: PolicyBook) -> None:
    p = region(book, "140100")
    # 三级 in service: dedc 1000; 99000 × 0.87 = 86130
    split = compute_split(p, inp([a(Y("100000"))], insutype="310", psn_type="1101"), Accumulators())
    assert split.hifp_pay == Y("86130")
    assert split.pool_prop_selfpay == D("0.8700")


def test_basic_cap_reached_mid_settlement_employee_supplementary(default: Policy) -> None:
    acc = Accumulators(basic_paid=Y("295000"))  # cap 300000: 5000 left
    # 三级: dedc 1000; raw 9000 × 0.85 = 7650; hifp 5000; over_cap 2650; hifob 2650 × 0.90 = 2385
    split = compute_split(default, inp([a(Y("10000"))], insutype="310", psn_type="1101"), acc)
    assert split.hifp_pay == Y("5000")
    assert split.hifob_pay == Y("2385")
    assert split.hifmi_pay == 0
    assert split.fund_pay_sumamt == Y("7385")
    assert split.psn_part_amt == Y("2615")
    assert split.delta == AccumulatorDelta(basic_paid=Y("5000"), supplementary_paid=Y("2385"))
    assert apply_delta(acc, split.delta).basic_paid == Y("300000")
    # the next settlement finds the basic cap used up: everything above the deductible goes to hifob
    acc2 = apply_delta(acc, split.delta)
    split2 = compute_split(default, inp([a(Y("10000"))], insutype="310", psn_type="1101"), acc2)
    assert split2.hifp_pay == 0
    assert split2.hifob_pay == Y("6885")  # 7650 × 0.90


def test_basic_cap_employee_with_assistance(default: Policy) -> None:
    acc = Accumulators(basic_paid=Y("295000"))
    # as above, S = 10000 - 5000 = 5000; maf = (5000 - 2385) × 0.90 = 2353.50
    split = compute_split(default, inp([a(Y("10000"))], insutype="310", psn_type="1101", assistance="2"), acc)
    assert split.maf_pay == Y("2353.50")
    assert split.fund_pay_sumamt == Y("9738.50")
    assert split.psn_part_amt == Y("261.50")


def test_supplementary_cap(default: Policy) -> None:
    acc = Accumulators(basic_paid=Y("300000"), supplementary_paid=Y("399000"))
    split = compute_split(default, inp([a(Y("10000"))], insutype="310", psn_type="1101"), acc)
    assert split.hifp_pay == 0
    assert split.hifob_pay == Y("1000")  # 6885 wanted, 1000 left


def test_basic_cap_resident_no_supplementary(book: PolicyBook) -> None:
    p = book.for_region("510421", "510400")  # 390 basic cap 150000
    acc = Accumulators(basic_paid=Y("140000"))
    # dedc 800; raw 49200 × 0.55 = 27060; hifp 10000 left; S = 40000; (40000 - 15000) × 0.6 = 15000
    # maf (category 2) = (40000 - 15000) × 0.90 = 22500 (assistance cap 30000)
    split = compute_split(p, inp([a(Y("50000"))], assistance="2"), acc)
    assert split.hifp_pay == Y("10000")
    assert split.hifob_pay == 0
    assert split.hifmi_pay == Y("15000")
    assert split.maf_pay == Y("22500")
    assert split.fund_pay_sumamt == Y("47500")
    assert split.psn_part_amt == Y("2500")
    # with 20000 of assistance already paid this year only 10000 is left under 米易's cap
    split = compute_split(p, inp([a(Y("50000"))], assistance="2"), dataclasses.replace(acc, assistance_paid=Y("20000")))
    assert split.maf_pay == Y("10000")


def test_cap_lowered_below_accumulated_pays_nothing(default: Policy) -> None:
    acc = Accumulators(basic_paid=Y("350000"))  # more than the current cap of 300000
    split = compute_split(default, inp([a(Y("10000"))], insutype="310", psn_type="1101"), acc)
    assert split.hifp_pay == 0
    assert split.hifob_pay == Y("6885")


def test_retiree_bonus_and_ceiling(book: PolicyBook, default: Policy) -> None:
    items = [a(Y("10000"))]
    # DEFAULT 一级: 0.90 + 0.05 = 0.95 (exactly the ceiling): 9600 × 0.95 = 9120
    split = compute_split(default, inp(items, insutype="310", psn_type="1201", hosp_lv=1), Accumulators())
    assert split.pool_prop_selfpay == D("0.9500")
    assert split.hifp_pay == Y("9120")
    # DEFAULT 二级: 0.88 + 0.05 = 0.93
    split = compute_split(default, inp(items, insutype="310", psn_type="12", hosp_lv=2), Accumulators())
    assert split.pool_prop_selfpay == D("0.9300")
    # 太原 一级: 0.92 + 0.05 = 0.97 → capped at 0.95; in service 0.92
    ty = region(book, "140100")
    split = compute_split(ty, inp(items, insutype="310", psn_type="1202", hosp_lv=1), Accumulators())
    assert split.pool_prop_selfpay == D("0.9500")
    split = compute_split(ty, inp(items, insutype="310", psn_type="1101", hosp_lv=1), Accumulators())
    assert split.pool_prop_selfpay == D("0.9200")
    assert split.hifp_pay == Y("8832")
    # the cut applies after the ceiling: 0.95 - 0.10 = 0.85 → 9600 × 0.85 = 8160
    split = compute_split(
        ty, inp(items, insutype="310", psn_type="1202", hosp_lv=1, filing_type="TEMPORARY"), Accumulators()
    )
    assert split.pool_prop_selfpay == D("0.8500")
    assert split.hifp_pay == Y("8160")


def test_retiree_bonus_only_for_inpatient(default: Policy) -> None:
    split = compute_split(default, inp([a(Y("2000"))], med_type="11", insutype="310", psn_type="1201"), Accumulators())
    assert split.pool_prop_selfpay == D("0.6000")
    split = compute_split(
        default,
        inp([a(Y("1000"))], med_type="14", insutype="310", psn_type="1201", chronic_disease="DM"),
        Accumulators(),
    )
    assert split.pool_prop_selfpay == D("0.8000")


def test_ratio_below_ceiling_without_bonus_is_not_lowered(tmp_path: Path) -> None:
    path = _write_policy(tmp_path, '["110000"]\nname = "x"\ninpatient.ratio_ceiling = 0.80\n')
    p = PolicyBook.load(path).for_region("110000", "110000")
    # 一级 0.90 already above the 0.80 ceiling: the bonus is not added, the ratio is not cut to 0.80
    split = compute_split(p, inp([a(Y("10000"))], insutype="310", psn_type="1201", hosp_lv=1), Accumulators())
    assert split.pool_prop_selfpay == D("0.9000")
    # 三级 0.85 + 0.05 = 0.90 → capped at max(0.85, 0.80) = 0.85
    split = compute_split(p, inp([a(Y("10000"))], insutype="310", psn_type="1201", hosp_lv=3), Accumulators())
    assert split.pool_prop_selfpay == D("0.8500")


@pytest.mark.parametrize(
    ("admdvs", "filing", "ratio", "hifp"),
    [
        ("999999", None, "0.8500", Y("8330")),  # DEFAULT resident 一级: dedc 200, 9800 × 0.85
        ("999999", "LONG_TERM", "0.8500", Y("8330")),
        ("999999", "REFERRAL", "0.8500", Y("8330")),
        ("999999", "EMERGENCY", "0.8500", Y("8330")),
        ("999999", "TEMPORARY", "0.7500", Y("7350")),
        ("350300", "TEMPORARY", "0.7700", Y("7546")),  # 莆田 cuts 0.08
        ("350300", "REFERRAL", "0.8500", Y("8330")),
    ],
)
def test_ratio_cut_per_filing_type(book: PolicyBook, admdvs: str, filing: str | None, ratio: str, hifp: int) -> None:
    split = compute_split(region(book, admdvs), inp([a(Y("10000"))], hosp_lv=1, filing_type=filing), Accumulators())
    assert split.pool_prop_selfpay == D(ratio)
    assert split.hifp_pay == hifp


def test_putian_employee_temporary_inpatient(book: PolicyBook) -> None:
    p = region(book, "350300")
    # 三级: dedc 1200; 0.85 - 0.08 = 0.77; 18800 × 0.77 = 14476
    split = compute_split(
        p, inp([a(Y("20000"))], insutype="310", psn_type="1101", filing_type="TEMPORARY"), Accumulators()
    )
    assert split.act_pay_dedc == Y("1200")
    assert split.pool_prop_selfpay == D("0.7700")
    assert split.hifp_pay == Y("14476")


def test_ratio_never_below_zero(tmp_path: Path) -> None:
    path = _write_policy(
        tmp_path,
        '["110000"]\nname = "x"\ncross_region.ratio_cut = { TEMPORARY = 0.9 }\n',
    )
    p = PolicyBook.load(path).for_region("110000", "110000")
    # 三级 resident 0.60 - 0.90 → 0
    split = compute_split(p, inp([a(Y("10000"))], filing_type="TEMPORARY"), Accumulators())
    assert split.pool_prop_selfpay == D("0.0000")
    assert split.hifp_pay == 0
    assert split.inscp_scp_amt == Y("10000")
    split = compute_split(p, inp([a(Y("1000"))], med_type="11", filing_type="TEMPORARY"), Accumulators())
    assert split.hifp_pay == 0  # 0.50 - 0.90 → 0


# --- critical illness ----------------------------------------------------------------------------


def test_critical_bands_across_two_settlements(default: Policy) -> None:
    # resident, DEFAULT, 三级, local: dedc 800, ratio 0.60
    first = compute_split(default, inp([a(Y("100000"))]), Accumulators())
    assert first.hifp_pay == Y("59520")  # 99200 × 0.60
    assert first.delta.critical_base == Y("40480")
    assert first.hifmi_pay == Y("15288")  # (40480 - 15000) × 0.60, all in band 0
    acc = apply_delta(Accumulators(), first.delta)
    second = compute_split(default, inp([a(Y("200000"))]), acc)
    assert second.hifp_pay == Y("119520")  # 199200 × 0.60, basic cap left 140480
    assert second.delta.critical_base == Y("80480")
    # above the deductible the cumulative S moves 25480 → 105960:
    # band 0 (0..50000): 24520 × 0.60 = 14712; band 1 (50000..100000): 50000 × 0.65 = 32500;
    # band 2 (100000..): 5960 × 0.70 = 4172
    assert second.hifmi_pay == Y("14712") + Y("32500") + Y("4172")
    # the two settlements together pay exactly what one would on the whole cumulative amount
    assert first.hifmi_pay + second.hifmi_pay == critical_illness_amount(default, 0, Y("40480") + Y("80480"))
    after = apply_delta(acc, second.delta)
    assert after.critical_base == Y("120960")
    assert after.basic_paid == Y("179040")


def test_critical_taiyuan_bands(book: PolicyBook) -> None:
    p = region(book, "140100")
    # above the deductible 0 → 100000: 40000 × 0.6 + 40000 × 0.65 + 20000 × 0.70 = 24000 + 26000 + 14000
    assert critical_illness_amount(p, 0, Y("115000")) == Y("64000")
    assert critical_illness_amount(p, Y("15000") + Y("39000"), Y("2000")) == Y("600") + Y("650")


def test_critical_below_deductible_and_rounding_per_band(default: Policy) -> None:
    assert critical_illness_amount(default, 0, Y("15000")) == 0
    assert critical_illness_amount(default, Y("14000"), Y("1000")) == 0
    assert critical_illness_amount(default, Y("14000"), Y("1000") + 1) == 1  # 0.6 fen → 1
    # 1 fen in band 0 (0.6 → 1) and 1 fen in band 1 (0.65 → 1): rounded per band = 2, not round(1.25)
    assert critical_illness_amount(default, Y("15000") + Y("50000") - 1, 2) == 2


def test_critical_cap(default: Policy) -> None:
    acc = Accumulators(critical_base=Y("500000"), critical_paid=Y("399990"))
    split = compute_split(default, inp([a(Y("10000"))]), acc)
    assert split.hifmi_pay == Y("10")
    assert split.delta.critical_paid == Y("10")


def test_critical_only_for_residents(default: Policy) -> None:
    split = compute_split(default, inp([a(Y("100000"))], insutype="310", psn_type="1101"), Accumulators())
    assert split.hifmi_pay == 0
    assert split.delta.critical_base == 0


# --- assistance ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("category", "maf"), [("1", Y("644")), ("2", Y("828"))])
def test_assistance_categories(default: Policy, category: str, maf: int) -> None:
    # resident 一级: dedc 200; 4800 × 0.85 = 4080; S = 920 (below the critical deductible)
    split = compute_split(default, inp([a(Y("5000"))], hosp_lv=1, assistance=category), Accumulators())
    assert split.hifp_pay == Y("4080")
    assert split.hifmi_pay == 0
    assert split.maf_pay == maf  # 920 × 0.70 / × 0.90
    consistent(split)


def test_assistance_cap_default(default: Policy) -> None:
    acc = Accumulators(assistance_paid=Y("49900"))
    split = compute_split(default, inp([a(Y("5000"))], hosp_lv=1, assistance="2"), acc)
    assert split.maf_pay == Y("100")
    assert split.delta.assistance_paid == Y("100")


def test_assistance_unknown_category(default: Policy) -> None:
    with pytest.raises(PolicyError) as err:
        compute_split(default, inp([a(100)], assistance="3"), Accumulators())
    assert err.value.code == "ASSISTANCE_CATEGORY_UNKNOWN"


# --- personal account ----------------------------------------------------------------------------


def test_account_insufficient_balance(default: Policy) -> None:
    split = compute_split(
        default,
        inp([a(Y("10000"))], insutype="310", psn_type="1101", use_account=True, balance=Y("12.34")),
        Accumulators(),
    )
    assert split.psn_part_amt == Y("2350")  # 1000 + 9000 × 0.15
    assert split.acct_pay == Y("12.34")
    assert split.psn_cash_pay == Y("2337.66")
    assert split.balc == 0


def test_account_covers_everything(default: Policy) -> None:
    split = compute_split(
        default,
        inp([a(Y("10000"))], insutype="310", psn_type="1101", use_account=True, balance=Y("5000")),
        Accumulators(),
    )
    assert split.acct_pay == Y("2350")
    assert split.psn_cash_pay == 0
    assert split.balc == Y("2650")


def test_account_not_used_without_flag_or_for_residents(default: Policy) -> None:
    split = compute_split(
        default, inp([a(Y("1000"))], insutype="310", psn_type="1101", balance=Y("800")), Accumulators()
    )
    assert (split.acct_pay, split.balc) == (0, Y("800"))
    split = compute_split(
        default, inp([a(Y("1000"))], insutype="390", use_account=True, balance=Y("800")), Accumulators()
    )
    assert (split.acct_pay, split.balc) == (0, Y("800"))
    assert split.psn_cash_pay == split.psn_part_amt


# --- chronic (14) --------------------------------------------------------------------------------


def test_chronic_per_disease_cap(default: Policy) -> None:
    acc = Accumulators(basic_paid=Y("2500"), chronic_paid={"HTN": Y("2500")})
    # employee: 1000 × 0.80 = 800 wanted; HTN cap 3000 has 500 left; over_cap 300 → hifob 270
    split = compute_split(
        default, inp([a(Y("1000"))], med_type="14", insutype="310", psn_type="1101", chronic_disease="HTN"), acc
    )
    assert split.act_pay_dedc == 0
    assert split.pool_prop_selfpay == D("0.8000")
    assert split.hifp_pay == Y("500")
    assert split.hifob_pay == Y("270")
    assert split.fund_pay_sumamt == Y("770")
    assert split.delta == AccumulatorDelta(
        basic_paid=Y("500"), chronic_paid={"HTN": Y("500")}, supplementary_paid=Y("270")
    )
    after = apply_delta(acc, split.delta)
    assert after.chronic_paid == {"HTN": Y("3000")}
    assert after.basic_paid == Y("3000")
    # another disease is not affected by the HTN cap
    split = compute_split(
        default, inp([a(Y("1000"))], med_type="14", insutype="310", psn_type="1101", chronic_disease="DM"), after
    )
    assert split.hifp_pay == Y("800")
    assert split.delta.chronic_paid == {"DM": Y("800")}


def test_chronic_limited_by_basic_cap(default: Policy) -> None:
    acc = Accumulators(basic_paid=Y("299900"))
    split = compute_split(
        default, inp([a(Y("1000"))], med_type="14", insutype="310", psn_type="1101", chronic_disease="DM"), acc
    )
    assert split.hifp_pay == Y("100")
    assert split.hifob_pay == Y("630")  # 700 × 0.90


def test_chronic_resident_temporary_with_critical_and_assistance(default: Policy) -> None:
    # 0.65 - 0.10 = 0.55; 1000 × 0.55 = 550; S = 450 added to the critical base (already at 14800)
    acc = Accumulators(critical_base=Y("14800"))
    split = compute_split(
        default,
        inp([a(Y("1000"))], med_type="14", chronic_disease="CANCER_TX", filing_type="TEMPORARY", assistance="1"),
        acc,
    )
    assert split.pool_prop_selfpay == D("0.5500")
    assert split.hifp_pay == Y("550")
    assert split.delta.critical_base == Y("450")
    assert split.hifmi_pay == Y("150")  # 250 above the deductible × 0.60
    assert split.maf_pay == Y("210")  # (450 - 150) × 0.70
    assert split.delta.chronic_paid == {"CANCER_TX": Y("550")}
    assert split.delta.basic_paid == Y("550")


def test_chronic_disease_errors(default: Policy) -> None:
    with pytest.raises(PolicyError) as err:
        compute_split(default, inp([a(100)], med_type="14", chronic_disease="ASTHMA"), Accumulators())
    assert err.value.code == "CHRONIC_DISEASE_NOT_COVERED"
    with pytest.raises(PolicyError) as err:
        compute_split(default, inp([a(100)], med_type="14"), Accumulators())
    assert err.value.code == "CHRONIC_DISEASE_REQUIRED"


# --- general outpatient (11) ---------------------------------------------------------------------


def test_outpatient_deductible_spans_settlements(default: Policy) -> None:

    def emp(items: Sequence[FeeItem], assistance: str | None = None) -> SettlementInput:
        return inp(items, med_type="11", insutype="310", psn_type="1101", assistance=assistance)

    first = compute_split(default, emp([a(Y("600"))]), Accumulators())
    assert (first.act_pay_dedc, first.hifp_pay) == (Y("600"), 0)
    assert first.delta == AccumulatorDelta(outpatient_dedc_used=Y("600"))
    acc = apply_delta(Accumulators(), first.delta)
    second = compute_split(default, emp([a(Y("1000"))]), acc)
    assert second.act_pay_dedc == Y("400")  # 1000 - 600 left
    assert second.hifp_pay == Y("360")  # 600 × 0.60
    acc = apply_delta(acc, second.delta)
    assert (acc.outpatient_dedc_used, acc.outpatient_paid, acc.basic_paid) == (Y("1000"), Y("360"), 0)
    third = compute_split(default, emp([a(Y("6000"))], assistance="1"), acc)
    assert third.act_pay_dedc == 0
    assert third.hifp_pay == Y("2640")  # 3600 wanted, cap 3000 - 360 left
    assert third.hifob_pay == third.maf_pay == third.hifmi_pay == 0  # no second tier for outpatient
    assert third.psn_part_amt == Y("3360")
    acc = apply_delta(acc, third.delta)
    assert acc.outpatient_paid == Y("3000")
    fourth = compute_split(default, emp([a(Y("100"))]), acc)
    assert fourth.hifp_pay == 0


def test_outpatient_putian_cap_and_class_b(book: PolicyBook) -> None:
    p = region(book, "350300")
    acc = Accumulators(outpatient_dedc_used=Y("1000"), outpatient_paid=Y("3000"))  # DEFAULT's cap would be spent
    split = compute_split(
        p, inp([a(Y("1000")), b(Y("1000"), "0.20")], med_type="11", insutype="310", psn_type="1101"), acc
    )
    assert split.preselfpay_amt == Y("200")
    assert split.inscp_scp_amt == Y("1800")
    assert split.hifp_pay == Y("1000")  # 1080 wanted, 4000 - 3000 left


def test_outpatient_resident_temporary(default: Policy) -> None:
    split = compute_split(default, inp([a(Y("300"))], med_type="11", filing_type="TEMPORARY"), Accumulators())
    assert split.act_pay_dedc == 0
    assert split.pool_prop_selfpay == D("0.4000")
    assert split.hifp_pay == Y("120")
    assert split.delta == AccumulatorDelta(outpatient_paid=Y("120"))


# --- pharmacy (41) -------------------------------------------------------------------------------


def test_pharmacy_no_fund_only_account_and_cash(default: Policy) -> None:
    items = [a(Y("50")), b(Y("30"), "0.20"), c(Y("20"))]
    split = compute_split(
        default,
        inp(items, med_type="41", insutype="310", psn_type="1101", assistance="2", use_account=True, balance=Y("60")),
        Accumulators(),
    )
    assert split.medfee_sumamt == Y("100")
    assert split.fulamt_ownpay_amt == Y("20")
    assert split.preselfpay_amt == Y("6")
    assert split.inscp_scp_amt == Y("74")
    assert split.act_pay_dedc == 0
    assert split.pool_prop_selfpay == D("0.0000")
    assert split.fund_pay_sumamt == 0
    assert split.psn_part_amt == Y("100")
    assert split.acct_pay == Y("60")
    assert split.psn_cash_pay == Y("40")
    assert split.balc == 0
    assert split.delta == AccumulatorDelta(account_spent=Y("60"))


def test_pharmacy_resident_all_cash(default: Policy) -> None:
    split = compute_split(default, inp([a(Y("88.88"))], med_type="41", hosp_lv=0), Accumulators())
    assert split.psn_cash_pay == Y("88.88")
    assert split.delta == AccumulatorDelta()


def test_empty_settlement(default: Policy) -> None:
    split = compute_split(default, inp([]), Accumulators())
    assert split.medfee_sumamt == split.fund_pay_sumamt == split.psn_part_amt == 0


# --- input errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"med_type": "12"}, "MED_TYPE_UNSUPPORTED"),
        ({"insutype": "320"}, "INSUTYPE_UNSUPPORTED"),
        ({"hosp_lv": 4}, "HOSP_LV_INVALID"),
        ({"hosp_lv": 0}, "HOSP_LV_INVALID"),
        ({"filing_type": "HOLIDAY"}, "FILING_TYPE_UNKNOWN"),
        ({"balance": -1}, "ACCOUNT_BALANCE_INVALID"),
    ],
)
def test_input_errors(default: Policy, kwargs: dict[str, object], code: str) -> None:
    with pytest.raises(PolicyError) as err:
        compute_split(default, inp([a(100)], **kwargs), Accumulators())  # type: ignore[arg-type]
    assert err.value.code == code
    assert code in str(err.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FeeItem(-1, D(1), "01", D(0), None),
        lambda: FeeItem(100, 1.0, "01", D(0), None),  # type: ignore[arg-type]
        lambda: FeeItem(100, D(-1), "01", D(0), None),
        lambda: FeeItem(100, D("NaN"), "01", D(0), None),
        lambda: FeeItem(100, D(1), "04", D(0), None),
        lambda: FeeItem(100, D(1), "02", D("1.1"), None),
        lambda: FeeItem(100, D(1), "02", 0.1, None),  # type: ignore[arg-type]
        lambda: FeeItem(100, D(1), "01", D(0), -5),
        lambda: FeeItem(True, D(1), "01", D(0), None),
        lambda: FeeItem(1.5, D(1), "01", D(0), None),  # type: ignore[arg-type]
    ],
)
def test_fee_item_validation(make: object) -> None:
    with pytest.raises(PolicyError) as err:
        make()  # type: ignore[operator]
    assert err.value.code == "FEE_ITEM_INVALID"


def test_accumulator_validation() -> None:
    with pytest.raises(PolicyError) as err:
        Accumulators(basic_paid=-1)
    assert err.value.code == "ACCUMULATOR_INVALID"
    with pytest.raises(PolicyError):
        Accumulators(chronic_paid={"HTN": -1})
    with pytest.raises(PolicyError):
        Accumulators(critical_paid=1.0)  # type: ignore[arg-type]
    with pytest.raises(PolicyError) as err:
        AccumulatorDelta(account_spent=-1)
    assert err.value.code == "DELTA_INVALID"
    # zero entries are dropped, and the mapping is a private copy
    source = {"HTN": 0, "DM": 5}
    acc = Accumulators(chronic_paid=source)
    source["DM"] = 99
    assert acc.chronic_paid == {"DM": 5}
    assert Accumulators(chronic_paid={"HTN": 0}) == Accumulators()


# --- invariants ----------------------------------------------------------------------------------


def test_check_split_rejects_tampered_splits(default: Policy) -> None:
    settlement = inp([a(Y("10000"))], insutype="310", psn_type="1101", use_account=True, balance=Y("100"))
    acc = Accumulators(basic_paid=Y("295000"))
    split = compute_split(default, settlement, acc)
    check_split(default, settlement, acc, split)
    tampered = [
        dataclasses.replace(split, fund_pay_sumamt=split.fund_pay_sumamt + 1),
        dataclasses.replace(split, psn_part_amt=split.psn_part_amt + 1),
        dataclasses.replace(split, psn_cash_pay=split.psn_cash_pay - 1),
        dataclasses.replace(split, balc=split.balc + 1),
        dataclasses.replace(split, inscp_scp_amt=split.inscp_scp_amt + 1),
        dataclasses.replace(split, acct_pay=-1, psn_cash_pay=split.psn_part_amt + 1),
        dataclasses.replace(
            split,
            hifp_pay=split.hifp_pay + 1,
            fund_pay_sumamt=split.fund_pay_sumamt + 1,
            psn_part_amt=split.psn_part_amt - 1,
            psn_cash_pay=split.psn_cash_pay - 1,
            delta=dataclasses.replace(split.delta, basic_paid=split.delta.basic_paid + 1),
        ),  # one fen over the basic cap
        dataclasses.replace(split, delta=dataclasses.replace(split.delta, account_spent=0)),
    ]
    for bad in tampered:
        with pytest.raises(PolicyInvariantError) as err:
            check_split(default, settlement, acc, bad)
        assert err.value.code == "INVARIANT_VIOLATED"


# --- accumulators: apply, revert, JSON -------------------------------------------------------------


def test_apply_and_revert_are_inverse() -> None:
    acc = Accumulators(basic_paid=10, chronic_paid={"HTN": 5}, critical_base=7)
    delta = AccumulatorDelta(
        basic_paid=3,
        chronic_paid={"HTN": 2, "DM": 4},
        outpatient_dedc_used=1,
        outpatient_paid=2,
        critical_base=3,
        critical_paid=4,
        supplementary_paid=5,
        assistance_paid=6,
        account_spent=99,
    )
    after = apply_delta(acc, delta)
    assert after == Accumulators(
        basic_paid=13,
        chronic_paid={"HTN": 7, "DM": 4},
        outpatient_dedc_used=1,
        outpatient_paid=2,
        critical_base=10,
        critical_paid=4,
        supplementary_paid=5,
        assistance_paid=6,
    )
    assert revert_delta(after, delta) == acc
    assert revert_delta(after, delta).chronic_paid == {"HTN": 5}  # DM back to 0 is dropped


def test_revert_of_unapplied_delta_underflows() -> None:
    with pytest.raises(PolicyError) as err:
        revert_delta(Accumulators(basic_paid=1), AccumulatorDelta(basic_paid=2))
    assert err.value.code == "ACCUMULATOR_UNDERFLOW"
    with pytest.raises(PolicyError, match=r"chronic_paid\[DM\]"):
        revert_delta(Accumulators(), AccumulatorDelta(chronic_paid={"DM": 1}))


def test_delta_json_round_trip() -> None:
    delta = AccumulatorDelta(basic_paid=1, chronic_paid={"HTN": 2}, critical_base=3, account_spent=4)
    data = delta_to_json(delta)
    assert data == {
        "basic_paid": 1,
        "chronic_paid": {"HTN": 2},
        "outpatient_dedc_used": 0,
        "outpatient_paid": 0,
        "critical_base": 3,
        "critical_paid": 0,
        "supplementary_paid": 0,
        "assistance_paid": 0,
        "account_spent": 4,
    }
    assert delta_from_json(data) == delta
    assert delta_from_json({"basic_paid": 5}) == AccumulatorDelta(basic_paid=5)  # older rows: missing = 0


@pytest.mark.parametrize(
    "data",
    [
        {"basic_paid": 1, "surprise": 2},
        {"basic_paid": 1.5},
        {"basic_paid": "1"},
        {"basic_paid": True},
        {"chronic_paid": {"HTN": 1.0}},
        {"chronic_paid": [1]},
        [("basic_paid", 1)],
    ],
)
def test_delta_from_json_rejects_bad_data(data: object) -> None:
    with pytest.raises(PolicyError) as err:
        delta_from_json(data)  # type: ignore[arg-type]
    assert err.value.code == "DELTA_INVALID"


def test_accumulators_json_round_trip() -> None:
    acc = Accumulators(basic_paid=1, chronic_paid={"DM": 3, "HTN": 2}, assistance_paid=9)
    data = accumulators_to_json(acc)
    assert "account_spent" not in data
    assert accumulators_from_json(data) == acc
    with pytest.raises(PolicyError):
        accumulators_from_json({"account_spent": 1})
