"""The fund split of one settlement under the insured region's policy (REFERENCE §4) — pure arithmetic.

Inputs are typed values, the output is a :class:`FundSplit` whose ``delta`` is exactly what the
settlement adds to the person's year-to-date :class:`Accumulators`; no I/O, no clock, no asyncio.

All money is integer fen.  Every multiplication by a ratio is rounded half-up to the fen at the step
where it happens (:func:`mul_ratio`); no float is ever involved.  Invariants (fund = sum of funds,
personal part = total − fund, nothing negative, no annual cap exceeded) are checked with explicit
raises before a split is returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

from schemas.codes import (
    FILING_TYPES,
    INSUTYPE_EMPLOYEE,
    INSUTYPE_RESIDENT,
    INSUTYPES,
    MED_TYPE_CHRONIC_OUTPATIENT,
    MED_TYPE_GENERAL_OUTPATIENT,
    MED_TYPE_INPATIENT,
    MED_TYPE_PHARMACY,
    MED_TYPES,
)
from services.policy.policies import HOSP_LEVELS, Policy

# The visits whose fund split goes on to critical illness / supplementary insurance.
SECOND_TIER_MED_TYPES: tuple[str, ...] = (MED_TYPE_INPATIENT, MED_TYPE_CHRONIC_OUTPATIENT)

RETIREE_PSN_TYPE_PREFIX = "12"

CHRGITM_LV_A = "01"  # 甲类
CHRGITM_LV_B = "02"  # 乙类
CHRGITM_LV_C = "03"  # 丙类, fully self-paid
CHRGITM_LVS: tuple[str, ...] = (CHRGITM_LV_A, CHRGITM_LV_B, CHRGITM_LV_C)

POOL_PROP_PLACES = 4
_POOL_PROP_QUANTUM = Decimal(1).scaleb(-POOL_PROP_PLACES)
_ONE = Decimal(1)
_ZERO = Decimal(0)
_DECIMAL_PRECISION = 60  # far above any fen amount × ratio; keeps products exact before rounding


class PolicyError(Exception):
    """A settlement the policy cannot compute; ``code`` is stable and meant for error responses."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class PolicyInvariantError(PolicyError):
    """A computed split broke an invariant — a bug or corrupt input, never a business refusal."""

    def __init__(self, message: str) -> None:
        super().__init__("INVARIANT_VIOLATED", message)


def mul_ratio(amount_fen: int, ratio: Decimal) -> int:
    """``amount_fen × ratio`` rounded half-up to the fen (amounts here are never negative)."""
    with localcontext() as ctx:
        ctx.prec = _DECIMAL_PRECISION
        return int((Decimal(amount_fen) * ratio).quantize(_ONE, rounding=ROUND_HALF_UP))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- value types --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeeItem:
    """One uploaded fee line after catalog matching (treating region's catalog)."""

    fee_fen: int
    cnt: Decimal
    chrgitm_lv: str  # "01" 甲 | "02" 乙 | "03" 丙
    selfpay_prop: Decimal  # self-pay-first share, used for class 02
    pric_uplmt_fen: int | None = None  # unit price ceiling, None when the catalog entry has none

    def __post_init__(self) -> None:
        if not _is_int(self.fee_fen) or self.fee_fen < 0:
            raise PolicyError("FEE_ITEM_INVALID", f"fee_fen must be an int >= 0, got {self.fee_fen!r}")
        if not isinstance(self.cnt, Decimal) or not self.cnt.is_finite() or self.cnt < 0:
            raise PolicyError("FEE_ITEM_INVALID", f"cnt must be a finite Decimal >= 0, got {self.cnt!r}")
        if self.chrgitm_lv not in CHRGITM_LVS:
            raise PolicyError("FEE_ITEM_INVALID", f"chrgitm_lv must be one of {CHRGITM_LVS}, got {self.chrgitm_lv!r}")
        if (
            not isinstance(self.selfpay_prop, Decimal)
            or not self.selfpay_prop.is_finite()
            or not _ZERO <= self.selfpay_prop <= _ONE
        ):
            raise PolicyError("FEE_ITEM_INVALID", f"selfpay_prop must be a Decimal in 0..1, got {self.selfpay_prop!r}")
        if self.pric_uplmt_fen is not None and (not _is_int(self.pric_uplmt_fen) or self.pric_uplmt_fen < 0):
            raise PolicyError(
                "FEE_ITEM_INVALID", f"pric_uplmt_fen must be None or an int >= 0, got {self.pric_uplmt_fen!r}"
            )


def _clean_chronic(owner: str, value: Mapping[str, int], code: str) -> dict[str, int]:
    """Copy a per-disease mapping, validating it; zero entries are dropped so equal totals compare equal."""
    if not isinstance(value, Mapping):
        raise PolicyError(code, f"{owner}.chronic_paid must be a mapping, got {value!r}")
    cleaned: dict[str, int] = {}
    for disease, fen in value.items():
        if not isinstance(disease, str) or not disease:
            raise PolicyError(code, f"{owner}.chronic_paid key must be a disease code: {disease!r}")
        if not _is_int(fen) or fen < 0:
            raise PolicyError(code, f"{owner}.chronic_paid[{disease}] must be an int >= 0: {fen!r}")
        if fen:
            cleaned[disease] = fen
    return cleaned


def _validate_counters(obj: Any, code: str) -> None:
    for f in fields(obj):
        if f.name == "chronic_paid":
            continue
        value = getattr(obj, f.name)
        if not _is_int(value) or value < 0:
            raise PolicyError(code, f"{type(obj).__name__}.{f.name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class Accumulators:
    """One person's year-to-date amounts for one calendar year (Asia/Shanghai); all fen."""

    basic_paid: int = 0  # 统筹基金 paid: inpatient + chronic outpatient (shared basic_annual_cap)
    chronic_paid: Mapping[str, int] = field(default_factory=dict)  # basic pool paid per chronic disease
    outpatient_dedc_used: int = 0  # general-outpatient deductible consumed
    outpatient_paid: int = 0  # general-outpatient pool paid
    critical_base: int = 0  # Σ S (in-scope self-pay after the pool), residents
    critical_paid: int = 0  # 大病保险 paid
    supplementary_paid: int = 0  # 大额医疗补助 paid
    assistance_paid: int = 0  # 医疗救助 paid

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "chronic_paid", _clean_chronic("Accumulators", self.chronic_paid, "ACCUMULATOR_INVALID")
        )
        _validate_counters(self, "ACCUMULATOR_INVALID")


@dataclass(frozen=True)
class AccumulatorDelta:
    """What one settlement adds to the accumulators (a reversal subtracts exactly this)."""

    basic_paid: int = 0
    chronic_paid: Mapping[str, int] = field(default_factory=dict)
    outpatient_dedc_used: int = 0
    outpatient_paid: int = 0
    critical_base: int = 0
    critical_paid: int = 0
    supplementary_paid: int = 0
    assistance_paid: int = 0
    account_spent: int = 0  # personal-account money used (the balance itself lives with the person)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chronic_paid", _clean_chronic("AccumulatorDelta", self.chronic_paid, "DELTA_INVALID"))
        _validate_counters(self, "DELTA_INVALID")


_COUNTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Accumulators) if f.name != "chronic_paid")
_DELTA_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AccumulatorDelta))


@dataclass(frozen=True)
class SettlementInput:
    med_type: str  # one of schemas.codes.MED_TYPES
    insutype: str  # one of schemas.codes.INSUTYPES
    psn_type: str
    hosp_lv: int  # 1..3; only read for inpatient (21)
    assistance: str | None  # assistance category ("1" 低保, "2" 特困) or None
    filing_type: str | None  # None = local care (no cut); else one of schemas.codes.FILING_TYPES
    chronic_disease: str | None  # required for med_type 14
    use_account: bool
    account_balance_fen: int
    items: Sequence[FeeItem]
    # Inpatient deductible already taken by earlier mid-stay parts of this stay (applies once per stay).
    inpatient_deductible_taken_fen: int = 0


@dataclass(frozen=True)
class FundSplit:
    medfee_sumamt: int
    fulamt_ownpay_amt: int
    overlmt_selfpay: int
    preselfpay_amt: int
    inscp_scp_amt: int
    act_pay_dedc: int
    hifp_pay: int
    pool_prop_selfpay: Decimal  # the basic pool's ratio actually applied, 4 places
    hifmi_pay: int
    hifob_pay: int
    maf_pay: int
    fund_pay_sumamt: int
    psn_part_amt: int
    acct_pay: int
    psn_cash_pay: int
    balc: int
    delta: AccumulatorDelta


# --- computation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogSplit:
    medfee: int
    fulamt_ownpay: int
    overlmt_selfpay: int
    preselfpay: int

    @property
    def inscp(self) -> int:
        return self.medfee - self.fulamt_ownpay - self.overlmt_selfpay - self.preselfpay


def catalog_split(items: Sequence[FeeItem]) -> CatalogSplit:
    """Step 1: split the total into fully self-paid, over-ceiling, self-pay-first and in-scope parts.

    Class-03 items are wholly ``fulamt_ownpay``; the price ceiling only carves ``overlmt_selfpay``
    out of class 01/02 items (a class-03 item is already fully self-paid, counting it twice would
    take it out of the total twice).
    """
    medfee = fulamt = overlmt = pre = 0
    for item in items:
        if not isinstance(item, FeeItem):
            raise PolicyError("FEE_ITEM_INVALID", f"items must be FeeItem, got {type(item).__name__}")
        medfee += item.fee_fen
        if item.chrgitm_lv == CHRGITM_LV_C:
            fulamt += item.fee_fen
            continue
        over = 0
        if item.pric_uplmt_fen is not None:
            over = max(0, item.fee_fen - mul_ratio(item.pric_uplmt_fen, item.cnt))
        overlmt += over
        if item.chrgitm_lv == CHRGITM_LV_B:
            pre += mul_ratio(item.fee_fen - over, item.selfpay_prop)
    return CatalogSplit(medfee, fulamt, overlmt, pre)


def _left(cap: int, used: int) -> int:
    """What is left under an annual cap (0 when already reached, e.g. after a cap was lowered)."""
    return max(0, cap - used)


def _cut(policy: Policy, filing_type: str | None) -> Decimal:
    if filing_type is None:
        return _ZERO
    if filing_type not in FILING_TYPES:
        raise PolicyError(
            "FILING_TYPE_UNKNOWN", f"filing_type must be None or one of {FILING_TYPES}, got {filing_type!r}"
        )
    return policy.ratio_cut[filing_type]


def _inpatient_ratio(policy: Policy, inp: SettlementInput) -> Decimal:
    ratio = policy.inpatient_ratio[inp.insutype][inp.hosp_lv - 1]
    if inp.psn_type.startswith(RETIREE_PSN_TYPE_PREFIX):
        # the bonus is capped at the ceiling, but never lowers a base ratio that is already above it
        ratio = min(ratio + policy.retiree_bonus, max(ratio, policy.ratio_ceiling))
    return ratio


def critical_illness_amount(policy: Policy, before_fen: int, s_fen: int) -> int:
    """大病保险 for a cumulative in-scope self-pay moving from ``before`` to ``before + s`` (before the cap).

    Band lower bounds are measured above the deductible; only the new part inside each band is paid,
    rounded per band.
    """
    ded = policy.critical_deductible_fen
    lo_new = max(0, before_fen - ded)
    hi_new = max(0, before_fen + s_fen - ded)
    total = 0
    bands = policy.critical_bands
    for i, (lower, ratio) in enumerate(bands):
        upper = bands[i + 1][0] if i + 1 < len(bands) else None
        start = max(lo_new, lower)
        end = hi_new if upper is None else min(hi_new, upper)
        if end > start:
            total += mul_ratio(end - start, ratio)
    return total


def _validate_input(policy: Policy, inp: SettlementInput, acc: Accumulators) -> None:
    if not isinstance(acc, Accumulators):
        raise PolicyError("ACCUMULATOR_INVALID", f"acc must be Accumulators, got {type(acc).__name__}")
    if inp.med_type not in MED_TYPES:
        raise PolicyError("MED_TYPE_UNSUPPORTED", f"med_type must be one of {MED_TYPES}, got {inp.med_type!r}")
    if inp.insutype not in INSUTYPES:
        raise PolicyError("INSUTYPE_UNSUPPORTED", f"insutype must be one of {INSUTYPES}, got {inp.insutype!r}")
    if not isinstance(inp.psn_type, str):
        raise PolicyError("PSN_TYPE_INVALID", f"psn_type must be a string, got {inp.psn_type!r}")
    if inp.med_type == MED_TYPE_INPATIENT and (not _is_int(inp.hosp_lv) or not 1 <= inp.hosp_lv <= HOSP_LEVELS):
        raise PolicyError("HOSP_LV_INVALID", f"hosp_lv must be 1..{HOSP_LEVELS}, got {inp.hosp_lv!r}")
    if inp.med_type == MED_TYPE_CHRONIC_OUTPATIENT:
        if not inp.chronic_disease:
            raise PolicyError("CHRONIC_DISEASE_REQUIRED", "med_type 14 needs a chronic_disease")
        if inp.chronic_disease not in policy.chronic_annual_cap_fen:
            raise PolicyError(
                "CHRONIC_DISEASE_NOT_COVERED",
                f"chronic disease {inp.chronic_disease!r} is not covered by {policy.name} ({policy.region})",
            )
    if inp.assistance is not None and inp.assistance not in policy.assistance_ratio:
        raise PolicyError(
            "ASSISTANCE_CATEGORY_UNKNOWN",
            f"assistance category {inp.assistance!r} not in {sorted(policy.assistance_ratio)}",
        )
    if not _is_int(inp.inpatient_deductible_taken_fen) or inp.inpatient_deductible_taken_fen < 0:
        raise PolicyError("DEDUCTIBLE_TAKEN_INVALID",
                          f"inpatient_deductible_taken_fen must be an int >= 0: {inp.inpatient_deductible_taken_fen!r}")
    if not _is_int(inp.account_balance_fen) or inp.account_balance_fen < 0:
        raise PolicyError(
            "ACCOUNT_BALANCE_INVALID", f"account_balance_fen must be an int >= 0: {inp.account_balance_fen!r}"
        )


def compute_split(policy: Policy, inp: SettlementInput, acc: Accumulators) -> FundSplit:
    """REFERENCE §4 for med_type 21, 14, 11 and 41.  Raises :class:`PolicyError` on unusable input."""
    _validate_input(policy, inp, acc)
    cat = catalog_split(inp.items)
    inscp = cat.inscp
    cut = _cut(policy, inp.filing_type)
    ins = inp.insutype

    # step 2: basic pool
    dedc = 0
    ratio = _ZERO
    hifp = 0
    over_cap = 0
    chronic_delta: dict[str, int] = {}
    basic_delta = outpatient_dedc_delta = outpatient_paid_delta = 0
    if inp.med_type == MED_TYPE_INPATIENT:
        # once per stay: a later mid-stay part pays what the earlier parts left of it (normally nothing)
        dedc = min(inscp, _left(policy.inpatient_deductible_fen[ins][inp.hosp_lv - 1],
                                inp.inpatient_deductible_taken_fen))
        ratio = max(_ZERO, _inpatient_ratio(policy, inp) - cut)
        raw = mul_ratio(inscp - dedc, ratio)
        hifp = min(raw, _left(policy.basic_annual_cap_fen[ins], acc.basic_paid))
        over_cap = raw - hifp
        basic_delta = hifp
    elif inp.med_type == MED_TYPE_CHRONIC_OUTPATIENT:
        disease = inp.chronic_disease
        if disease is None:  # already refused by _validate_input; narrows the type
            raise PolicyError("CHRONIC_DISEASE_REQUIRED", "med_type 14 needs a chronic_disease")
        ratio = max(_ZERO, policy.chronic_ratio[ins] - cut)
        raw = mul_ratio(inscp, ratio)
        disease_left = _left(policy.chronic_annual_cap_fen[disease], acc.chronic_paid.get(disease, 0))
        hifp = min(raw, disease_left, _left(policy.basic_annual_cap_fen[ins], acc.basic_paid))
        over_cap = raw - hifp
        basic_delta = hifp
        chronic_delta = {disease: hifp}
    elif inp.med_type == MED_TYPE_GENERAL_OUTPATIENT:
        dedc = min(inscp, _left(policy.outpatient_deductible_fen[ins], acc.outpatient_dedc_used))
        ratio = max(_ZERO, policy.outpatient_ratio[ins] - cut)
        raw = mul_ratio(inscp - dedc, ratio)
        hifp = min(raw, _left(policy.outpatient_annual_cap_fen[ins], acc.outpatient_paid))
        over_cap = raw - hifp
        outpatient_dedc_delta = dedc
        outpatient_paid_delta = hifp
    # MED_TYPE_PHARMACY: no fund pays; ratio 0

    # steps 3 and 4: second tier and medical assistance (inpatient and chronic only)
    hifmi = hifob = maf = critical_base_delta = 0
    if inp.med_type in SECOND_TIER_MED_TYPES:
        s = inscp - hifp
        if ins == INSUTYPE_RESIDENT:
            critical = critical_illness_amount(policy, acc.critical_base, s)
            hifmi = min(critical, _left(policy.critical_annual_cap_fen, acc.critical_paid))
            critical_base_delta = s
        else:
            supplementary = mul_ratio(over_cap, policy.supplementary_ratio)
            hifob = min(supplementary, _left(policy.supplementary_annual_cap_fen, acc.supplementary_paid))
        if inp.assistance is not None:
            assist = mul_ratio(s - hifmi - hifob, policy.assistance_ratio[inp.assistance])
            maf = min(assist, _left(policy.assistance_annual_cap_fen, acc.assistance_paid))

    # step 5: totals and the personal account
    fund = hifp + hifmi + hifob + maf
    psn_part = cat.medfee - fund
    balance = inp.account_balance_fen
    acct = min(balance, psn_part) if ins == INSUTYPE_EMPLOYEE and inp.use_account else 0
    cash = psn_part - acct

    delta = AccumulatorDelta(
        basic_paid=basic_delta,
        chronic_paid=chronic_delta,
        outpatient_dedc_used=outpatient_dedc_delta,
        outpatient_paid=outpatient_paid_delta,
        critical_base=critical_base_delta,
        critical_paid=hifmi,
        supplementary_paid=hifob,
        assistance_paid=maf,
        account_spent=acct,
    )
    split = FundSplit(
        medfee_sumamt=cat.medfee,
        fulamt_ownpay_amt=cat.fulamt_ownpay,
        overlmt_selfpay=cat.overlmt_selfpay,
        preselfpay_amt=cat.preselfpay,
        inscp_scp_amt=inscp,
        act_pay_dedc=dedc,
        hifp_pay=hifp,
        pool_prop_selfpay=ratio.quantize(_POOL_PROP_QUANTUM, rounding=ROUND_HALF_UP),
        hifmi_pay=hifmi,
        hifob_pay=hifob,
        maf_pay=maf,
        fund_pay_sumamt=fund,
        psn_part_amt=psn_part,
        acct_pay=acct,
        psn_cash_pay=cash,
        balc=balance - acct,
        delta=delta,
    )
    check_split(policy, inp, acc, split)
    return split


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PolicyInvariantError(message)


_SPLIT_AMOUNT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(FundSplit) if f.name not in ("pool_prop_selfpay", "delta")
)


def check_split(policy: Policy, inp: SettlementInput, acc: Accumulators, split: FundSplit) -> None:
    """Raise :class:`PolicyInvariantError` unless ``split`` is internally consistent and within every cap."""
    for name in _SPLIT_AMOUNT_FIELDS:
        value = getattr(split, name)
        _require(_is_int(value) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
    _require(
        split.fund_pay_sumamt == split.hifp_pay + split.hifmi_pay + split.hifob_pay + split.maf_pay,
        "fund_pay_sumamt != hifp + hifmi + hifob + maf",
    )
    _require(split.psn_part_amt == split.medfee_sumamt - split.fund_pay_sumamt, "psn_part_amt != medfee - fund")
    _require(split.psn_cash_pay == split.psn_part_amt - split.acct_pay, "psn_cash_pay != psn_part - acct_pay")
    _require(split.balc == inp.account_balance_fen - split.acct_pay, "balc != balance - acct_pay")
    _require(
        split.inscp_scp_amt
        == split.medfee_sumamt - split.fulamt_ownpay_amt - split.overlmt_selfpay - split.preselfpay_amt,
        "inscp_scp_amt != medfee - fulamt_ownpay - overlmt_selfpay - preselfpay",
    )
    _require(split.act_pay_dedc <= split.inscp_scp_amt, "deductible above the in-scope amount")
    _require(split.hifp_pay <= split.inscp_scp_amt - split.act_pay_dedc, "basic pool above in-scope minus deductible")
    _require(split.fund_pay_sumamt <= split.inscp_scp_amt, "funds pay more than the in-scope amount")
    _require(split.delta.account_spent == split.acct_pay, "delta.account_spent != acct_pay")
    if inp.med_type == MED_TYPE_PHARMACY:
        _require(split.fund_pay_sumamt == 0, "a pharmacy purchase has no fund payment")
    if inp.med_type not in SECOND_TIER_MED_TYPES:
        _require(split.hifmi_pay == split.hifob_pay == split.maf_pay == 0, "second tier outside 21/14")

    ins = inp.insutype
    after = apply_delta(acc, split.delta)
    caps: list[tuple[str, int, int, int]] = [
        ("basic", policy.basic_annual_cap_fen[ins], acc.basic_paid, after.basic_paid),
        ("outpatient", policy.outpatient_annual_cap_fen[ins], acc.outpatient_paid, after.outpatient_paid),
        (
            "outpatient deductible",
            policy.outpatient_deductible_fen[ins],
            acc.outpatient_dedc_used,
            after.outpatient_dedc_used,
        ),
        ("critical", policy.critical_annual_cap_fen, acc.critical_paid, after.critical_paid),
        ("supplementary", policy.supplementary_annual_cap_fen, acc.supplementary_paid, after.supplementary_paid),
        ("assistance", policy.assistance_annual_cap_fen, acc.assistance_paid, after.assistance_paid),
    ]
    for disease, cap in policy.chronic_annual_cap_fen.items():
        caps.append((f"chronic {disease}", cap, acc.chronic_paid.get(disease, 0), after.chronic_paid.get(disease, 0)))
    for name, cap, before, now in caps:
        # a settlement may add nothing once a cap is reached (even if a lowered cap is already exceeded)
        _require(now <= max(cap, before), f"{name} annual cap {cap} exceeded: {before} -> {now}")


# --- accumulators -------------------------------------------------------------------------------


def apply_delta(acc: Accumulators, delta: AccumulatorDelta) -> Accumulators:
    """The accumulators after a settlement (``account_spent`` is not an accumulator and is ignored)."""
    chronic = dict(acc.chronic_paid)
    for disease, fen in delta.chronic_paid.items():
        chronic[disease] = chronic.get(disease, 0) + fen
    counters = {name: getattr(acc, name) + getattr(delta, name) for name in _COUNTER_FIELDS}
    return Accumulators(chronic_paid=chronic, **counters)


def revert_delta(acc: Accumulators, delta: AccumulatorDelta) -> Accumulators:
    """Exact inverse of :func:`apply_delta`; raises ``ACCUMULATOR_UNDERFLOW`` if ``delta`` was never applied."""
    chronic = dict(acc.chronic_paid)
    for disease, fen in delta.chronic_paid.items():
        chronic[disease] = chronic.get(disease, 0) - fen
    counters = {name: getattr(acc, name) - getattr(delta, name) for name in _COUNTER_FIELDS}
    negative = [name for name, value in counters.items() if value < 0]
    negative += [f"chronic_paid[{disease}]" for disease, value in chronic.items() if value < 0]
    if negative:
        raise PolicyError("ACCUMULATOR_UNDERFLOW", f"reverting the delta makes {', '.join(negative)} negative")
    return Accumulators(chronic_paid=chronic, **counters)


def delta_to_json(delta: AccumulatorDelta) -> dict[str, Any]:
    """JSON-ready form for the ledger (jsonb): ints only, ``chronic_paid`` as an object of ints."""
    out: dict[str, Any] = {name: getattr(delta, name) for name in _DELTA_FIELDS if name != "chronic_paid"}
    out["chronic_paid"] = dict(sorted(delta.chronic_paid.items()))
    return out


def delta_from_json(data: Mapping[str, Any]) -> AccumulatorDelta:
    """Inverse of :func:`delta_to_json`.  Missing counters read as 0 (older rows); unknown keys are refused."""
    if not isinstance(data, Mapping):
        raise PolicyError("DELTA_INVALID", f"delta must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_DELTA_FIELDS))
    if unknown:
        raise PolicyError("DELTA_INVALID", f"unknown delta keys {unknown}")
    kwargs: dict[str, Any] = {name: data[name] for name in _DELTA_FIELDS if name in data}
    return AccumulatorDelta(**kwargs)


def accumulators_to_json(acc: Accumulators) -> dict[str, Any]:
    """JSON-ready form of the accumulators, same shape as :func:`delta_to_json` without ``account_spent``."""
    out: dict[str, Any] = {name: getattr(acc, name) for name in _COUNTER_FIELDS}
    out["chronic_paid"] = dict(sorted(acc.chronic_paid.items()))
    return out


def accumulators_from_json(data: Mapping[str, Any]) -> Accumulators:
    if not isinstance(data, Mapping):
        raise PolicyError("ACCUMULATOR_INVALID", f"accumulators must be a JSON object, got {type(data).__name__}")
    known = (*_COUNTER_FIELDS, "chronic_paid")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise PolicyError("ACCUMULATOR_INVALID", f"unknown accumulator keys {unknown}")
    kwargs: dict[str, Any] = {name: data[name] for name in known if name in data}
    return Accumulators(**kwargs)
