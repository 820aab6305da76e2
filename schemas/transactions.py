"""The registry of transactions, keyed by infno: everything the broker knows about each one, in one place.

For each transaction: its body type (the decoder), the stage that answers it, what the router does
before forwarding (catalog pricing, one-visit check, filing requirement), what the settlement engine
loads for it, its effect on the visit state machine (as data the engine applies), the ledger row it
writes (which also decides its `xs_settlement_requests_total` series) and the error codes it may
answer. The README's error table takes its "transactions" column from here.

Adding a transaction: one `Transaction(...)` row here, its body type in `schemas/`, and its own logic
in the stage that answers it — nothing else. Pure data: nothing here imports from `services/`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from schemas.clearing import (
    Input3201,
    Input3202,
    Input3203,
    Input3204,
    Input3260,
    Input3261,
    Input3262,
)
from schemas.codes import VisitKind, VisitState
from schemas.correction import Input2601
from schemas.filing import Input2501, Input2502, Input2503, Input2504, Input5301
from schemas.inpatient import (
    Input2301,
    Input2302,
    Input2303,
    Input2304,
    Input2305,
    Input2401,
    Input2402,
    Input2403,
    Input2404,
    Input2405,
)
from schemas.outpatient import Input2201, Input2202, Input2203, Input2204, Input2205, Input2206, Input2207, Input2208
from schemas.person import Input1101, Input9001, Input9002
from schemas.pharmacy import Input2101, Input2102, Input2103
from schemas.prescreen import Input3101, Input3102, Input3103
from schemas.query import Input5201, Input5202, Input5203, Input5204, Input5205, Input5206

# gateway: answered at the HTTP gateway; router: answered by the router from reference data;
# engine: the settlement engine (visits, fees, ledger); clearing: the clearing service.
Stage = Literal["gateway", "router", "engine", "clearing"]
STAGES: Final[tuple[Stage, ...]] = ("gateway", "router", "engine", "clearing")

# What the engine loads (and locks) for a batch beyond the visits it names:
#   money — the persons' accounts and accumulators; fees — the visits' fee items;
#   settlements — the visits' earlier ledger rows (a reversal needs the row it reverses).
#   history — the persons' recent settlements with their visits and items (monitoring's in-event checks);
#   warnings — the warnings (3101/3102) a disposal (3103) names.
Load = Literal["money", "fees", "settlements", "history", "warnings"]

# How a correction (2601) undoes a transaction: reverse its settlement; cancel the visit it created;
# cancel its discharge; withdraw (cancel) exactly the fee items it uploaded.
Undo = Literal["reverse", "cancel_visit", "cancel_discharge", "withdraw_fees"]

# The states a visit of each kind can be in.
VISIT_KIND_STATES: Final[Mapping[VisitKind, tuple[VisitState, ...]]] = MappingProxyType({
    "outpatient": ("registered", "settled", "cancelled"),
    "inpatient": ("admitted", "discharged", "settled", "cancelled"),
    "pharmacy": ("settled", "cancelled"),
})

# A transaction refused because of the visit's state answers the code of that state.
STATE_REFUSALS: Final[Mapping[VisitState, tuple[str, str]]] = MappingProxyType({
    "settled": ("VISIT_SETTLED", "the visit is settled; reverse it first"),
    "cancelled": ("VISIT_CANCELLED", "the visit was cancelled"),
    "discharged": ("VISIT_DISCHARGED", "the stay is already discharged"),
    "admitted": ("VISIT_NOT_DISCHARGED", "the stay is not discharged; send the discharge (2402) first"),
})
# Finding the visit a transaction names (mdtrt_id, this person, this hospital, the right kind).
VISIT_LOOKUP_ERRORS: Final = ("VISIT_UNKNOWN", "VISIT_TYPE_MISMATCH")

# Codes any transaction may answer: the envelope and body checks, the hospital and its region
# (the router checks them first, for every infno arriving on the ingress topic), and the transport.
COMMON_ERRORS: Final = (
    "ENVELOPE_MALFORMED", "BODY_TOO_LARGE", "INFNO_UNSUPPORTED", "MSGID_MALFORMED", "BODY_MALFORMED",
    "MDTRTAREA_MISMATCH", "HOSPITAL_UNKNOWN", "REGION_UNKNOWN", "TIMEOUT", "INTERNAL",
    # Trust (the router authenticates every request first; 9001 needs no sign_no).
    "SIGNATURE_MISSING", "SIGNATURE_INVALID", "KEY_UNKNOWN", "KEY_REVOKED", "INF_TIME_OUT_OF_WINDOW",
    "MSGID_CONFLICT", "SIGN_NO_INVALID", "INSTITUTION_NOT_ALLOWED", "CLIENT_CERT_MISMATCH",
)
# Who may send a transaction, by the first letter of fixmedins_code (the national code: H 定点医疗机构,
# P 定点零售药店): pharmacy purchases (21xx) only pharmacies, visits (22xx–24xx) only hospitals; the rest
# (sign-in, person info, filings, clearing) both.
SENDERS: Final[Mapping[str, str]] = MappingProxyType({"21": "P", "22": "H", "23": "H", "24": "H"})


# The treating region's agency (经办机构, code `A` + pooling admdvs + `00000`; services/refdata/agency.py):
# sign-in/out and the clearing details of its region's institutions, nothing else (clearing at national shape).
AGENCY_INFNOS: Final = frozenset({"9001", "9002", "3260", "3261", "3262"})


def may_send(infno: str, fixmedins_code: str) -> bool:
    if fixmedins_code[:1] == "A":
        return infno in AGENCY_INFNOS
    return fixmedins_code[:1] in SENDERS.get(infno[:2], "HP")


# A body naming a person: the router resolves the person and checks the insured region.
_PERSON = ("INSUPLC_REQUIRED", "PERSON_UNKNOWN", "INSUPLC_MISMATCH")
# A body carrying insutype: it must be the person's.
_INSUTYPE = ("INSUTYPE_MISMATCH",)
# Fee or drug items priced against the treating province's catalog.
_PRICED = ("TOO_MANY_FEE_ITEMS", "CATALOG_ITEM_UNKNOWN", "FEE_ITEM_INCONSISTENT")
_SETTLE = ("NO_FEES", "MEDFEE_MISMATCH")
_REVERSE = ("SETTLEMENT_UNKNOWN", "SETTLEMENT_REVERSED")
_CORRECTION = ("CORRECTION_NOT_SUPPORTED", "ORIGINAL_OTHER_INSTITUTION", "ORIGINAL_UNKNOWN", "ORIGINAL_MISMATCH",
               "ORIGINAL_UNDONE", "CORRECTION_NOT_ALLOWED")


@dataclass(frozen=True)
class VisitEffect:
    """What a transaction does to the visit it names (or creates).

    `from_states` empty: the transaction creates the visit (in `to_state`). Otherwise the visit
    must be of `kind` and in one of `from_states` (any other state is refused with its
    STATE_REFUSALS code); `to_state` None leaves the state as it is.
    """

    kind: VisitKind
    from_states: tuple[VisitState, ...]
    to_state: VisitState | None = None

    @property
    def creates(self) -> bool:
        return not self.from_states

    def refused_states(self) -> tuple[VisitState, ...]:
        if self.creates:
            return ()
        return tuple(s for s in VISIT_KIND_STATES[self.kind] if s not in self.from_states)


@dataclass(frozen=True)
class Transaction:
    infno: str
    title: str
    body: type
    stage: Stage
    errors: tuple[str, ...] = ()  # codes of its own, beyond COMMON_ERRORS and those the visit effect implies
    visit: VisitEffect | None = None
    loads: frozenset[Load] = frozenset()
    ledger_row: Literal["settle", "reverse"] | None = None  # the ledger row it writes when it succeeds
    needs_filing: bool = False  # non-local: refused without a filing in force (FILING_REQUIRED)
    priced_items: str | None = None  # the body's list of fee/drug items the router prices with the catalog
    one_visit_items: str | None = None  # the body's list of items that must all name one visit
    # How a correction (2601) undoes it, and the transaction whose engine function (and visit rules) it
    # applies to do so (2207 → 2208); None: a correction of it is refused (CORRECTION_NOT_SUPPORTED).
    undo: Undo | None = None
    undone_as: str | None = None
    error_codes: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        codes = {*COMMON_ERRORS, *self.errors}
        if self.visit is not None and not self.visit.creates:
            codes |= set(VISIT_LOOKUP_ERRORS)
            codes |= {STATE_REFUSALS[s][0] for s in self.visit.refused_states()}
        if self.needs_filing:
            codes.add("FILING_REQUIRED")
        if self.priced_items or self.one_visit_items:
            codes.add("FEE_ITEM_INCONSISTENT")
        if (self.undo is None) != (self.undone_as is None):
            raise ValueError(f"transaction registry: {self.infno} needs both undo and undone_as, or neither")
        if self.undo is not None:
            codes.add("ORIGINAL_CORRECTED")  # corrected before it arrived: never applied
        object.__setattr__(self, "error_codes", frozenset(codes))


def _outpatient(*from_states: VisitState, to: VisitState | None = None) -> VisitEffect:
    return VisitEffect("outpatient", from_states, to)


def _inpatient(*from_states: VisitState, to: VisitState | None = None) -> VisitEffect:
    return VisitEffect("inpatient", from_states, to)


_ALL_OUTPATIENT = VISIT_KIND_STATES["outpatient"]
_ALL_INPATIENT = VISIT_KIND_STATES["inpatient"]

_TRANSACTIONS: tuple[Transaction, ...] = (
    Transaction("9001", "sign-in (returns `sign_no`; the only request without one)", Input9001, "router"),
    Transaction("9002", "sign-out (ends the `sign_no` of 9001)", Input9002, "router"),
    Transaction("1101", "person info", Input1101, "router", ("PERSON_UNKNOWN", "RATE_LIMITED")),
    # Pharmacy: the purchase creates its visit settled at once; the reversal cancels it.
    Transaction("2101", "pharmacy pre-settlement", Input2101, "engine", (*_PERSON, *_INSUTYPE, *_PRICED,
                "FEE_ITEM_DUPLICATE", "MEDFEE_MISMATCH"), loads=frozenset({"money"}), needs_filing=True,
                priced_items="drugdetail"),
    Transaction("2102", "pharmacy settlement", Input2102, "engine", (*_PERSON, *_INSUTYPE, *_PRICED,
                "FEE_ITEM_DUPLICATE", "MEDFEE_MISMATCH"), VisitEffect("pharmacy", (), "settled"),
                frozenset({"money"}), "settle", needs_filing=True, priced_items="drugdetail", undo="reverse",
                undone_as="2103"),
    Transaction("2103", "pharmacy reversal", Input2103, "engine", (*_PERSON, *_REVERSE),
                VisitEffect("pharmacy", VISIT_KIND_STATES["pharmacy"], "cancelled"),
                frozenset({"money", "settlements"}), "reverse"),
    # Outpatient.
    Transaction("2201", "outpatient registration", Input2201, "engine", (*_PERSON, *_INSUTYPE),
                _outpatient(to="registered"), undo="cancel_visit", undone_as="2202"),
    Transaction("2202", "outpatient registration cancellation", Input2202, "engine", _PERSON,
                _outpatient("registered", to="cancelled")),
    Transaction("2203", "outpatient visit info", Input2203, "engine", (*_PERSON, "CHRONIC_DISEASE_NOT_COVERED"),
                _outpatient("registered")),
    Transaction("2204", "outpatient fee upload", Input2204, "engine", (*_PERSON, *_PRICED, "FEE_ITEM_DUPLICATE"),
                _outpatient("registered"), frozenset({"fees"}), priced_items="feedetail",
                one_visit_items="feedetail", undo="withdraw_fees", undone_as="2205"),
    Transaction("2205", "outpatient fee cancellation", Input2205, "engine", _PERSON, _outpatient("registered"),
                frozenset({"fees"}), one_visit_items="data"),
    Transaction("2206", "outpatient pre-settlement", Input2206, "engine", (*_PERSON, *_INSUTYPE, *_SETTLE,
                "MED_TYPE_UNSUPPORTED", "CHRONIC_DISEASE_NOT_COVERED"), _outpatient("registered"),
                frozenset({"money", "fees", "history"}), needs_filing=True),
    Transaction("2207", "outpatient settlement", Input2207, "engine", (*_PERSON, *_INSUTYPE, *_SETTLE,
                "MED_TYPE_UNSUPPORTED", "CHRONIC_DISEASE_NOT_COVERED"), _outpatient("registered", to="settled"),
                frozenset({"money", "fees"}), "settle", needs_filing=True, undo="reverse", undone_as="2208"),
    Transaction("2208", "outpatient reversal", Input2208, "engine", (*_PERSON, *_REVERSE),
                _outpatient(*_ALL_OUTPATIENT, to="registered"), frozenset({"money", "settlements"}), "reverse"),
    # Inpatient.
    Transaction("2301", "inpatient fee upload", Input2301, "engine", (*_PERSON, *_PRICED, "FEE_ITEM_DUPLICATE"),
                _inpatient("admitted", "discharged"), frozenset({"fees"}), priced_items="feedetail",
                one_visit_items="feedetail", undo="withdraw_fees", undone_as="2302"),
    # Mid-stay settlement (mid_setl_flag 1): a part of an admitted stay (the state stays); the discharge
    # settlement (flag 0) needs the stay discharged (VISIT_NOT_DISCHARGED, checked by the engine) and is
    # the last part. Both load the stay's earlier parts (the deductible applies once per stay).
    Transaction("2302", "inpatient fee cancellation", Input2302, "engine", (*_PERSON, "FEE_ITEM_SETTLED"),
                _inpatient("admitted", "discharged"), frozenset({"fees"}), one_visit_items="data"),
    Transaction("2303", "inpatient pre-settlement", Input2303, "engine", (*_PERSON, *_INSUTYPE, *_SETTLE,
                "VISIT_DISCHARGED"), _inpatient("admitted", "discharged"),
                frozenset({"money", "fees", "settlements", "history"}), needs_filing=True),
    Transaction("2304", "inpatient settlement", Input2304, "engine", (*_PERSON, *_INSUTYPE, *_SETTLE,
                "VISIT_NOT_DISCHARGED", "VISIT_DISCHARGED"), _inpatient("admitted", "discharged", to="settled"),
                frozenset({"money", "fees", "settlements"}), "settle", needs_filing=True,
                undo="reverse", undone_as="2305"),
    Transaction("2305", "inpatient reversal", Input2305, "engine", (*_PERSON, *_REVERSE, "MID_SETTLEMENT_NOT_LATEST"),
                _inpatient(*_ALL_INPATIENT, to="discharged"), frozenset({"money", "settlements"}), "reverse"),
    Transaction("2401", "admission", Input2401, "engine", (*_PERSON, *_INSUTYPE, "MED_TYPE_UNSUPPORTED"),
                _inpatient(to="admitted"), undo="cancel_visit", undone_as="2404"),
    Transaction("2402", "discharge", Input2402, "engine", _PERSON, _inpatient("admitted", to="discharged"),
                undo="cancel_discharge", undone_as="2405"),
    Transaction("2403", "admission change", Input2403, "engine", (*_PERSON, "MED_TYPE_UNSUPPORTED",
                "VISIT_NOT_DISCHARGED"), _inpatient("admitted", "discharged")),
    Transaction("2404", "admission cancellation", Input2404, "engine", (*_PERSON, "VISIT_PART_SETTLED"),
                _inpatient("admitted", "discharged", to="cancelled"), frozenset({"settlements"})),
    Transaction("2405", "discharge cancellation", Input2405, "engine", _PERSON,
                _inpatient("discharged", to="admitted")),
    # Correction (冲正) of a transaction by its msgid (services/settle/correction.py): it loads what any
    # undoing may touch; it writes a reversal row only when the original is a settlement.
    Transaction("2601", "correction (冲正): undo a transaction by its `omsgid` / `oinfno`", Input2601, "engine",
                (*_PERSON, *_CORRECTION), loads=frozenset({"money", "fees", "settlements"})),
    # Filings and chronic-disease eligibility, answered by the router (written to PostgreSQL first).
    Transaction("2501", "create a cross-region filing", Input2501, "router", _PERSON),
    Transaction("2502", "revoke a cross-region filing", Input2502, "router", (*_PERSON, "FILING_UNKNOWN")),
    Transaction("2503", "register chronic-disease eligibility", Input2503, "router", _PERSON),
    Transaction("2504", "revoke chronic-disease eligibility", Input2504, "router", _PERSON),
    Transaction("5301", "a person's filings and chronic eligibility", Input5301, "router", _PERSON),
    # Smart monitoring on the national interface (services/settle/prescreen.py): the person's shard answers
    # from its history and the request's encounters; issued warnings and their disposals are stored there.
    Transaction("3101", "pre-event analysis (事前分析): the monitoring rules over the history and the orders",
                Input3101, "engine", (*_PERSON, "TOO_MANY_FEE_ITEMS", "CATALOG_ITEM_UNKNOWN", "FEE_ITEM_INCONSISTENT"),
                loads=frozenset({"history"})),
    Transaction("3102", "in-event analysis (事中分析): the monitoring rules before settlement", Input3102, "engine",
                (*_PERSON, "TOO_MANY_FEE_ITEMS", "CATALOG_ITEM_UNKNOWN", "FEE_ITEM_INCONSISTENT"),
                loads=frozenset({"history"})),
    Transaction("3103", "disposal of a 3101/3102 warning (continue or change, with a reason)", Input3103, "engine",
                (*_PERSON, "WARNING_UNKNOWN", "WARNING_OTHER_INSTITUTION"), loads=frozenset({"warnings"})),
    # Reconciliation and clearing (services/clearing).
    Transaction("3201", "day totals reconciliation", Input3201, "clearing"),
    Transaction("3202", "settlement list reconciliation", Input3202, "clearing"),
    Transaction("3203", "clearing application", Input3203, "clearing", ("APPLICATION_MISMATCH",)),
    Transaction("3204", "clearing application withdrawal", Input3204, "clearing",
                ("APPLICATION_UNKNOWN", "MONTH_CLOSED")),
    Transaction("3260", "clearing details of a closed month", Input3260, "clearing", ("MONTH_NOT_CLOSED",)),
    Transaction("3261", "clearing details confirmation", Input3261, "clearing",
                ("MONTH_NOT_CLOSED", "CONFIRMATION_MISMATCH", "CONFIRMATION_BATCH_SIZE", "CONFIRMATION_ROW_UNKNOWN")),
    Transaction("3262", "clearing confirmation rollback", Input3262, "clearing",
                ("MONTH_NOT_CLOSED", "CONFIRMATION_UNKNOWN")),
    # Queries of the asking institution's own data, answered by the engine from the person's shard
    # (services/settle/queries.py): no visit effect, nothing loaded or locked, nothing stored.
    Transaction("5201", "query: the person's visits here (paged)", Input5201, "engine", _PERSON),
    Transaction("5202", "query: a visit's diagnoses", Input5202, "engine", (*_PERSON, "VISIT_UNKNOWN")),
    Transaction("5203", "query: settlements and reversals with their fund split (paged)", Input5203, "engine",
                _PERSON),
    Transaction("5204", "query: a visit's fee details (paged)", Input5204, "engine",
                (*_PERSON, "VISIT_UNKNOWN", "SETTLEMENT_UNKNOWN")),
    Transaction("5205", "query: chronic-disease drug records (paged)", Input5205, "engine", _PERSON),
    Transaction("5206", "query: the person's accumulators", Input5206, "engine", (*_PERSON, "QUERY_NOT_ALLOWED")),
)

TRANSACTIONS: Final[Mapping[str, Transaction]] = MappingProxyType({t.infno: t for t in _TRANSACTIONS})
if len(TRANSACTIONS) != len(_TRANSACTIONS):
    raise ValueError("transaction registry: an infno is listed twice")

BODY_TYPES: Final[Mapping[str, type]] = MappingProxyType({t.infno: t.body for t in _TRANSACTIONS})


def by_stage(stage: Stage) -> frozenset[str]:
    return frozenset(t.infno for t in _TRANSACTIONS if t.stage == stage)


def correctable() -> frozenset[str]:
    """The infnos a correction (2601) can undo."""
    return frozenset(t.infno for t in _TRANSACTIONS if t.undo is not None)


def infnos_loading(load: Load) -> frozenset[str]:
    """The infnos for which the engine must load `load` (see Load)."""
    return frozenset(t.infno for t in _TRANSACTIONS if load in t.loads)


def transactions_column(code: str) -> str | None:
    """The README error table's "transactions" cell for `code`: `all`, the infnos in numeric order with
    runs of three or more registered neighbours shortened to `first-last` (every infno between them
    answers it), or None when no transaction answers it."""
    infnos = [t.infno for t in _TRANSACTIONS if code in t.error_codes]
    if not infnos:
        return None
    if len(infnos) == len(_TRANSACTIONS):
        return "all"
    return ", ".join(_runs(infnos, sorted(TRANSACTIONS)))


def _runs(infnos: Iterable[str], order: list[str]) -> list[str]:
    positions = sorted(order.index(i) for i in infnos)
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    out = []
    for run in runs:
        if len(run) >= 3:
            out.append(f"{order[run[0]]}-{order[run[-1]]}")
        else:
            out.extend(order[p] for p in run)
    return out
