"""The settlement engine's working state for one batch, in memory.

The ledger loads every row a batch may touch in two statements, the pure logic
changes this state, and the ledger writes back what changed, all in one
PostgreSQL transaction. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from schemas.codes import FUNDS, VisitState
from schemas.monitoring import VisitFacts
from services.policy.logic import Accumulators


@dataclass
class Visit:
    mdtrt_id: str
    psn_no: str
    fixmedins_code: str
    med_type: str
    insutype: str
    scope: str
    insured_admdvs: str
    treating_admdvs: str
    ipt_otp_no: str
    begntime: datetime
    endtime: datetime | None
    dise_codg: str | None
    state: VisitState
    created_msgid: str
    chronic_disease: str | None = None  # outpatient med_type 14
    # The visit's diagnoses as last sent (2401/2402/2403/2203 `diseinfo`, national field names): 5202 and
    # monitoring read them. A message with an empty list leaves them as they are.
    diseinfo: list[dict[str, Any]] = field(default_factory=list)
    # The stay's particulars (doctor, department, bed, descriptions: schemas.inpatient.ADM_INFO_FIELDS).
    adm_info: dict[str, str] = field(default_factory=dict)


@dataclass
class Fee:
    mdtrt_id: str
    feedetl_sn: str
    med_list_codg: str
    medins_list_codg: str
    chrgitm_lv: str
    selfpay_prop: Decimal
    pric_uplmt_fen: int | None
    fee_fen: int
    cnt: Decimal
    pric_fen: int
    fee_ocur_time: datetime
    upload_msgid: str
    cancelled: bool = False
    setl_id: str | None = None  # the settlement (mid-stay part or final) that settled the item; None = not yet
    # The catalog's monitoring fields when the item was billed (shard 0008): the settlement's facts carry them.
    once_per_day: bool = False
    gender_only: str = ""
    supply_days: Decimal = Decimal(1)


@dataclass
class Settlement:
    """One ledger row (a settlement, or a reversal with negated amounts)."""

    setl_id: str
    msgid: str
    kind: str  # settle | reverse
    orig_setl_id: str | None
    mdtrt_id: str
    psn_no: str
    fixmedins_code: str
    insutype: str
    med_type: str
    scope: str
    filing_type: str | None
    insured_admdvs: str
    insured_pool: str
    treating_admdvs: str
    treating_pool: str
    clr_optins: str
    setl_time: datetime
    acc_year: int
    amounts: dict[str, int]  # medfee_sumamt ... balc, in fen (see AMOUNT_FIELDS)
    pool_prop_selfpay: Decimal
    accum_delta: dict[str, Any]
    policy_version: str = ""  # the insured region's policy version used ("150400@2027-01-01"); a reversal copies it
    mid_setl: bool = False  # a mid-stay part (mid_setl_flag 1): the stay stayed open
    stay_part: int = 1  # its number among the visit's settlements not reversed when it was written
    reversed: bool = False  # set on a settle row once its reversal exists
    visit: VisitFacts | None = None  # a settle row's facts for monitoring (not a column: rebuilt on replay)


def columns(cls: type) -> tuple[str, ...]:
    """A row dataclass's fields in order: the columns the ledger selects for it."""
    return tuple(f.name for f in fields(cls))


AMOUNT_FIELDS = (
    "medfee_sumamt", "fulamt_ownpay_amt", "overlmt_selfpay", "preselfpay_amt", "inscp_scp_amt", "act_pay_dedc",
    *FUNDS, "fund_pay_sumamt", "psn_part_amt", "acct_pay", "psn_cash_pay", "balc",
)


@dataclass
class Original:
    """What the engine answered a request a correction (2601) names (its processed_request row)."""

    msgid: str
    infno: str
    fixmedins_code: str
    infcode: int  # 0 accepted, -1 refused (it changed nothing)
    mdtrt_id: str | None  # the visit it acted on or created


@dataclass
class Correction:
    """A corrected msgid and the first correction's answer (table `correction`, shard 0005)."""

    omsgid: str
    msgid: str
    oinfno: str
    fixmedins_code: str
    undone: str  # reverse | cancel_visit | cancel_discharge | withdraw_fees | none | unknown
    output: bytes | None  # the answer's output (JSON) ...
    err_msg: str | None  # ... or its refusal


@dataclass
class IssuedWarning:
    """A warning a pre/in-event check answered (shard table warning_issued): 3103 disposes of it."""

    jr_id: str
    msgid: str
    infno: str
    fixmedins_code: str
    psn_no: str
    rule_id: str
    mdtrt_id: str
    vola_amt_fen: int


@dataclass
class Disposal:
    """A hospital's disposal of a warning (3103, shard table warning_disposal)."""

    msgid: str
    jr_id: str
    fixmedins_code: str
    dspo_way: str
    dspo_way_rea: str


@dataclass
class BatchState:
    processed: dict[str, bytes] = field(default_factory=dict)  # msgid → stored response (earlier batches)
    # Ledger rows of already-processed msgids: their events are published again on replay, because a
    # crash between the database commit and the produce would otherwise lose them (consumers dedupe by setl_id).
    replayed: dict[str, Settlement] = field(default_factory=dict)
    replayed_visits: dict[str, Visit] = field(default_factory=dict)  # their visits and settled items, for
    replayed_fees: dict[str, list[Fee]] = field(default_factory=dict)  # their facts (setl_id → items)
    visits: dict[str, Visit] = field(default_factory=dict)
    fees: dict[str, dict[str, Fee]] = field(default_factory=dict)  # mdtrt_id → feedetl_sn → fee
    settlements: dict[str, Settlement] = field(default_factory=dict)  # setl_id → row (of loaded visits)
    accumulators: dict[tuple[str, int], Accumulators] = field(default_factory=dict)
    accounts: dict[str, int] = field(default_factory=dict)  # psn_no → balance fen

    # What this batch changed, for the ledger to write.
    new_visits: list[str] = field(default_factory=list)
    changed_visits: set[str] = field(default_factory=set)
    new_fees: list[tuple[str, str]] = field(default_factory=list)
    cancelled_fees: list[tuple[str, str]] = field(default_factory=list)
    settled_fees: dict[tuple[str, str], str | None] = field(default_factory=dict)  # (mdtrt_id, sn) → setl_id
    # (mdtrt_id, setl_id) of reversed settlements: their items are not settled any more
    unsettled_by: list[tuple[str, str]] = field(default_factory=list)
    new_settlements: list[str] = field(default_factory=list)
    changed_accumulators: set[tuple[str, int]] = field(default_factory=set)
    changed_accounts: set[str] = field(default_factory=set)
    responses: dict[str, tuple[str, str, int, bytes]] = field(default_factory=dict)  # msgid → (infno, hosp, code, body)
    # Corrections (2601): the originals the batch's corrections name (earlier batches), the corrections of
    # the batch's msgids and omsgids (earlier batches and this one), those this batch adds, and the visit
    # each of this batch's requests acted on (processed_request.mdtrt_id).
    originals: dict[str, Original] = field(default_factory=dict)
    corrections: dict[str, Correction] = field(default_factory=dict)  # omsgid → correction
    new_corrections: list[str] = field(default_factory=list)
    request_visits: dict[str, str] = field(default_factory=dict)  # msgid → mdtrt_id
    # Smart monitoring (services/settle/monitoring.py): the settled history of the persons whose requests
    # run the rules (psn_no → rules Episodes), the warnings the batch's disposals name (jr_id →), and what
    # the batch issues and records.
    history: dict[str, list[Any]] = field(default_factory=dict)
    warnings: dict[str, IssuedWarning] = field(default_factory=dict)
    new_warnings: list[IssuedWarning] = field(default_factory=list)
    new_disposals: list[Disposal] = field(default_factory=list)

    def add_settlement(self, row: Settlement) -> None:
        self.settlements[row.setl_id] = row
        self.new_settlements.append(row.setl_id)

    def active_fees(self, mdtrt_id: str) -> list[Fee]:
        return [f for f in self.fees.get(mdtrt_id, {}).values() if not f.cancelled]

    def open_settlements(self, mdtrt_id: str) -> list[Settlement]:
        """The visit's settle rows not reversed (loaded for the infnos that load "settlements"), in part order."""
        rows = [s for s in self.settlements.values() if s.mdtrt_id == mdtrt_id and s.kind == "settle"
                and not s.reversed]
        return sorted(rows, key=lambda s: s.stay_part)
