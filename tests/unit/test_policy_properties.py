"""Property tests for the fund split: random persons, random sequences of settlements, every region."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.policy.logic import (
    AccumulatorDelta,
    Accumulators,
    FeeItem,
    FundSplit,
    SettlementInput,
    apply_delta,
    compute_split,
    critical_illness_amount,
    delta_from_json,
    delta_to_json,
    revert_delta,
)
from services.policy.policies import FILING_TYPES, Policy, PolicyBook

BOOK = PolicyBook.load()
POLICIES: list[Policy] = [BOOK.default, *(BOOK.for_region(r, r) for r in BOOK.regions)]
DISEASES = ("HTN", "DM", "CANCER_TX", "ESRD_DIALYSIS", "TRANSPLANT_AR")
AMOUNT_FIELDS = tuple(f.name for f in fields(FundSplit) if f.name not in ("pool_prop_selfpay", "delta"))

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Person:
    policy: Policy
    insutype: str
    psn_type: str
    assistance: str | None
    balance_fen: int


@dataclass(frozen=True)
class Visit:
    med_type: str
    hosp_lv: int
    filing_type: str | None
    chronic_disease: str | None
    use_account: bool
    items: tuple[FeeItem, ...]


def ratios(places: int = 4) -> st.SearchStrategy[Decimal]:
    scale = 10**places
    return st.integers(0, scale).map(lambda n: Decimal(n).scaleb(-places))


fee_fen = st.one_of(
    st.integers(0, 1_000),  # a few fen: rounding edge cases
    st.integers(0, 500_000),  # up to 5000 yuan
    st.integers(0, 200_000_000),  # up to 2 million yuan: caps are reached
)

fee_items = st.builds(
    FeeItem,
    fee_fen=fee_fen,
    cnt=st.one_of(st.integers(0, 50).map(Decimal), st.decimals(0, 100, places=3, allow_nan=False)),
    chrgitm_lv=st.sampled_from(("01", "02", "03")),
    selfpay_prop=ratios(),
    pric_uplmt_fen=st.one_of(st.none(), st.integers(0, 5_000_000)),
)


@st.composite
def visits(draw: st.DrawFn) -> Visit:
    med_type = draw(st.sampled_from(("11", "14", "21", "41")))
    return Visit(
        med_type=med_type,
        hosp_lv=draw(st.integers(1, 3)),
        filing_type=draw(st.one_of(st.none(), st.sampled_from(FILING_TYPES))),
        chronic_disease=draw(st.sampled_from(DISEASES)) if med_type == "14" else None,
        use_account=draw(st.booleans()),
        items=tuple(draw(st.lists(fee_items, max_size=6))),
    )


@st.composite
def persons(draw: st.DrawFn) -> Person:
    insutype = draw(st.sampled_from(("310", "390")))
    psn_type = draw(
        st.sampled_from(("1101", "1201", "12", "11"))
        if insutype == "310"
        else st.sampled_from(("1501", "1601", "1701"))
    )
    return Person(
        policy=draw(st.sampled_from(POLICIES)),
        insutype=insutype,
        psn_type=psn_type,
        assistance=draw(st.sampled_from((None, "1", "2"))),
        balance_fen=draw(st.integers(0, 5_000_000)),
    )


def _near(draw: st.DrawFn, cap: int) -> int:
    """0, somewhere below the cap, just below it, or at it: caps get reached inside a settlement."""
    return draw(st.sampled_from((0, cap // 2, max(0, cap - 1), cap, max(0, cap - 12_345))))


@st.composite
def start_accumulators(draw: st.DrawFn, person: Person) -> Accumulators:
    """Year-to-date amounts a person could have: every capped counter at or below its cap."""
    if draw(st.booleans()):
        return Accumulators()
    p, t = person.policy, person.insutype
    chronic = {d: _near(draw, p.chronic_annual_cap_fen[d]) for d in draw(st.sets(st.sampled_from(DISEASES)))}
    return Accumulators(
        basic_paid=_near(draw, p.basic_annual_cap_fen[t]),  # independent of chronic_paid: any pair may bind
        chronic_paid=chronic,
        outpatient_dedc_used=_near(draw, p.outpatient_deductible_fen[t]),
        outpatient_paid=_near(draw, p.outpatient_annual_cap_fen[t]),
        critical_base=draw(st.integers(0, 30_000_000)),
        critical_paid=_near(draw, p.critical_annual_cap_fen),
        supplementary_paid=_near(draw, p.supplementary_annual_cap_fen),
        assistance_paid=_near(draw, p.assistance_annual_cap_fen),
    )


def settlement_input(person: Person, visit: Visit, balance_fen: int) -> SettlementInput:
    return SettlementInput(
        med_type=visit.med_type,
        insutype=person.insutype,
        psn_type=person.psn_type,
        hosp_lv=visit.hosp_lv,
        assistance=person.assistance,
        filing_type=visit.filing_type,
        chronic_disease=visit.chronic_disease,
        use_account=visit.use_account,
        account_balance_fen=balance_fen,
        items=visit.items,
    )


def within_caps(policy: Policy, insutype: str, acc: Accumulators) -> list[str]:
    """Names of the annual caps ``acc`` exceeds (empty when all hold)."""
    checks = [
        ("basic", acc.basic_paid, policy.basic_annual_cap_fen[insutype]),
        ("outpatient", acc.outpatient_paid, policy.outpatient_annual_cap_fen[insutype]),
        ("outpatient deductible", acc.outpatient_dedc_used, policy.outpatient_deductible_fen[insutype]),
        ("critical", acc.critical_paid, policy.critical_annual_cap_fen),
        ("supplementary", acc.supplementary_paid, policy.supplementary_annual_cap_fen),
        ("assistance", acc.assistance_paid, policy.assistance_annual_cap_fen),
    ]
    checks += [(f"chronic {d}", v, policy.chronic_annual_cap_fen[d]) for d, v in acc.chronic_paid.items()]
    return [name for name, value, cap in checks if value > cap]


def add_all(acc: Accumulators, deltas: list[AccumulatorDelta]) -> Accumulators:
    for delta in deltas:
        acc = apply_delta(acc, delta)
    return acc


@st.composite
def years(draw: st.DrawFn) -> tuple[Person, Accumulators, list[Visit]]:
    person = draw(persons())
    return person, draw(start_accumulators(person)), draw(st.lists(visits(), min_size=1, max_size=8))


def run_year(person: Person, start: Accumulators, year: list[Visit]) -> tuple[list[FundSplit], Accumulators, int]:
    acc, balance = start, person.balance_fen
    splits: list[FundSplit] = []
    for visit in year:
        split = compute_split(person.policy, settlement_input(person, visit, balance), acc)
        splits.append(split)
        acc = apply_delta(acc, split.delta)
        balance = split.balc
    return splits, acc, balance


@PROPERTY_SETTINGS
@given(years())
def test_every_split_balances_and_stays_within_caps(data: tuple[Person, Accumulators, list[Visit]]) -> None:
    person, start, year = data
    assert within_caps(person.policy, person.insutype, start) == []
    acc, balance = start, person.balance_fen
    for visit in year:
        split = compute_split(person.policy, settlement_input(person, visit, balance), acc)
        assert split.fund_pay_sumamt + split.psn_part_amt == split.medfee_sumamt
        assert split.fund_pay_sumamt == split.hifp_pay + split.hifmi_pay + split.hifob_pay + split.maf_pay
        assert split.acct_pay + split.psn_cash_pay == split.psn_part_amt
        assert split.medfee_sumamt == sum(item.fee_fen for item in visit.items)
        for name in AMOUNT_FIELDS:
            value = getattr(split, name)
            assert isinstance(value, int) and value >= 0, name
        assert split.fund_pay_sumamt <= split.inscp_scp_amt
        assert Decimal(0) <= split.pool_prop_selfpay <= Decimal(1)
        assert split.pool_prop_selfpay.as_tuple().exponent == -4
        if visit.med_type == "41":
            assert split.fund_pay_sumamt == 0
        if person.insutype != "310" or not visit.use_account:
            assert split.acct_pay == 0
        assert split.balc == balance - split.acct_pay >= 0
        acc = apply_delta(acc, split.delta)
        balance = split.balc
        assert within_caps(person.policy, person.insutype, acc) == []


@PROPERTY_SETTINGS
@given(years(), st.data())
def test_reverting_any_subset_restores_the_rest(
    data: tuple[Person, Accumulators, list[Visit]], choose: st.DataObject
) -> None:
    person, start, year = data
    splits, final, _ = run_year(person, start, year)
    deltas = [s.delta for s in splits]
    assert add_all(start, deltas) == final
    # order of application does not matter: deltas are additive
    assert add_all(start, list(reversed(deltas))) == final

    reverted_idx = choose.draw(st.sets(st.integers(0, len(deltas) - 1)), label="reverted")
    order = choose.draw(st.permutations(sorted(reverted_idx)), label="order")
    acc = final
    for i in order:
        acc = revert_delta(acc, deltas[i])
    kept = [d for i, d in enumerate(deltas) if i not in reverted_idx]
    assert acc == add_all(start, kept)
    # reverting everything gives back the starting point
    for i in (i for i in range(len(deltas)) if i not in reverted_idx):
        acc = revert_delta(acc, deltas[i])
    assert acc == start


@PROPERTY_SETTINGS
@given(years())
def test_deltas_survive_the_ledger_json(data: tuple[Person, Accumulators, list[Visit]]) -> None:
    person, start, year = data
    splits, _, balance = run_year(person, start, year)
    assert balance == person.balance_fen - sum(s.acct_pay for s in splits)
    for split in splits:
        stored = delta_to_json(split.delta)
        assert all(type(v) is int for k, v in stored.items() if k != "chronic_paid")
        assert all(type(v) is int for v in stored["chronic_paid"].values())
        decoded = json.loads(json.dumps(stored), parse_float=_no_float)
        assert delta_from_json(decoded) == split.delta
        assert split.delta.account_spent == split.acct_pay


@PROPERTY_SETTINGS
@given(persons(), visits(), st.sampled_from(FILING_TYPES))
def test_non_local_care_never_gets_a_higher_pool_ratio(person: Person, visit: Visit, filing: str) -> None:
    acc = Accumulators()
    local = compute_split(person.policy, settlement_input(person, _with_filing(visit, None), person.balance_fen), acc)
    away = compute_split(person.policy, settlement_input(person, _with_filing(visit, filing), person.balance_fen), acc)
    assert away.pool_prop_selfpay <= local.pool_prop_selfpay
    assert away.hifp_pay <= local.hifp_pay
    assert (away.medfee_sumamt, away.inscp_scp_amt, away.act_pay_dedc) == (
        local.medfee_sumamt,
        local.inscp_scp_amt,
        local.act_pay_dedc,
    )


def _no_float(text: str) -> Decimal:
    raise AssertionError(f"a float in the ledger JSON: {text}")


def _with_filing(visit: Visit, filing: str | None) -> Visit:
    return Visit(visit.med_type, visit.hosp_lv, filing, visit.chronic_disease, visit.use_account, visit.items)


@PROPERTY_SETTINGS
@given(
    st.sampled_from(POLICIES),
    st.integers(0, 30_000_000),
    st.lists(st.integers(0, 10_000_000), min_size=1, max_size=6),
)
def test_critical_illness_split_over_settlements_is_close_to_one_settlement(
    policy: Policy, before: int, parts: list[int]
) -> None:
    """Each settlement pays only its new part; rounding per band costs at most half a fen per band and part."""
    paid = 0
    cumulative = before
    for s in parts:
        amount = critical_illness_amount(policy, cumulative, s)
        assert 0 <= amount <= s
        paid += amount
        cumulative += s
    whole = critical_illness_amount(policy, before, sum(parts))
    assert abs(paid - whole) <= len(parts) * len(policy.critical_bands)
