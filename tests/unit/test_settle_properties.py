"""Property tests of the settlement engine's logic over random sequences of visits and reversals.

The engine runs the same message sequence once as a single batch and once cut into random
batches, each loaded from and written back to an in-memory ledger that persists exactly what
the PostgreSQL ledger persists (the dirty sets of BatchState) — a model of partitions moving
and processes restarting between batches. Both runs must agree, and the ledger must keep its
invariants: fund + personal part = total, nothing negative, no annual cap exceeded, and the
accumulators equal the sum of the deltas of the settlements that were not reversed.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import encode
from schemas.codes import InsuType
from schemas.errors import BrokerError
from schemas.inpatient import (
    AdmissionInfo,
    DischargeInfo,
    FeeDetail,
    Input2301,
    Input2304,
    Input2305,
    Input2401,
    Input2402,
    ReverseRef,
    SettleInfo,
)
from schemas.internal import CatalogCtx, HospitalCtx, PersonCtx, RoutedRequest
from schemas.pharmacy import DrugDetail, Input2102, Input2103, PurchaseInfo, PurchaseReverseRef
from schemas.transactions import BODY_TYPES, TRANSACTIONS
from services.policy.logic import Accumulators, apply_delta, delta_from_json
from services.policy.policies import PolicyBook
from services.settle.logic import handle
from services.settle.state import BatchState, Fee, Settlement, Visit

POLICIES = PolicyBook.load()
HOSPITAL = HospitalCtx(fixmedins_code="H15040000001", admdvs="150400", prov_admdvs="150000", pool_admdvs="150400",
                       hosp_lv=3)
CATALOG = {"01": CatalogCtx(chrgitm_lv="01", selfpay_prop=Decimal(0), pric_uplmt_fen=None),
           "02": CatalogCtx(chrgitm_lv="02", selfpay_prop=Decimal("0.15"), pric_uplmt_fen=None),
           "03": CatalogCtx(chrgitm_lv="03", selfpay_prop=Decimal(1), pric_uplmt_fen=None)}
T0 = datetime(2026, 3, 1, 8, 0)


@dataclass
class Ledger:
    """What PostgreSQL keeps between batches, written only through BatchState's change sets."""

    visits: dict[str, Visit] = field(default_factory=dict)
    fees: dict[str, dict[str, Fee]] = field(default_factory=dict)
    settlements: dict[str, Settlement] = field(default_factory=dict)
    accumulators: dict[tuple[str, int], Accumulators] = field(default_factory=dict)
    accounts: dict[str, int] = field(default_factory=dict)
    processed: dict[str, bytes] = field(default_factory=dict)

    def load(self) -> BatchState:
        st = BatchState(processed=dict(self.processed), visits=copy.deepcopy(self.visits),
                        fees=copy.deepcopy(self.fees), settlements=copy.deepcopy(self.settlements),
                        accumulators=dict(self.accumulators), accounts=dict(self.accounts))
        reversed_ids = {s.orig_setl_id for s in st.settlements.values() if s.orig_setl_id}
        for s in st.settlements.values():  # the real ledger derives this with EXISTS
            s.reversed = s.setl_id in reversed_ids
        return st

    def write(self, st: BatchState) -> None:
        for v in {*st.new_visits, *st.changed_visits}:
            self.visits[v] = copy.deepcopy(st.visits[v])
        for m, sn in [*st.new_fees, *st.cancelled_fees]:
            self.fees.setdefault(m, {})[sn] = copy.deepcopy(st.fees[m][sn])
        for m, setl_id in st.unsettled_by:  # the ledger's order: a reversal's items first, then the marks
            for fee in self.fees.get(m, {}).values():
                if fee.setl_id == setl_id:
                    fee.setl_id = None
        for (m, sn), marked in st.settled_fees.items():
            self.fees[m][sn].setl_id = marked
        for s in st.new_settlements:
            self.settlements[s] = copy.deepcopy(st.settlements[s])
        for key in st.changed_accumulators:
            self.accumulators[key] = st.accumulators[key]
        for p in st.changed_accounts:
            self.accounts[p] = st.accounts[p]
        for msgid, (_, _, _, body) in st.responses.items():
            self.processed[msgid] = body


def run(messages: list[RoutedRequest], cuts: list[int], ledger: Ledger | None = None) -> tuple[Ledger, list[bytes]]:
    """The engine's batch loop (services/settle/handler.py) over an in-memory ledger: a msgid already
    processed is answered from the ledger, anything else goes through `handle`."""
    ledger = Ledger() if ledger is None else ledger
    answers: list[bytes] = []
    bounds = [0, *sorted(set(cuts)), len(messages)]
    for lo, hi in itertools.pairwise(bounds):
        st = ledger.load()
        for msg in messages[lo:hi]:
            if msg.msgid in st.processed:
                answers.append(st.processed[msg.msgid])
                continue
            try:
                body = encode(handle(msg, st, POLICIES).output)
            except BrokerError as e:
                # Every refusal is one the transaction registry lists for that infno (README error table).
                assert e.code in TRANSACTIONS[msg.infno].error_codes, (msg.infno, e.code)
                body = e.err_msg.encode()
            st.responses[msg.msgid] = (msg.infno, msg.fixmedins_code, 0, body)
            st.processed[msg.msgid] = body
            answers.append(body)
        ledger.write(st)
    return ledger, answers


@dataclass
class Script:
    """Builds routed requests the way the router would, with deterministic msgids."""

    persons: dict[str, PersonCtx]
    messages: list[RoutedRequest] = field(default_factory=list)
    settled: list[tuple[str, str, str]] = field(default_factory=list)  # (psn_no, kind, setl_id)
    clock: datetime = T0

    def _msg(self, psn: PersonCtx, body: Any, catalog: list[CatalogCtx] | None = None) -> RoutedRequest:
        self.clock += timedelta(minutes=7)
        msgid = f"H15040000001{self.clock:%Y%m%d%H%M%S}{len(self.messages) % 10000:04d}"
        msg = RoutedRequest(
            msgid=msgid, infno=_infno(body), fixmedins_code=HOSPITAL.fixmedins_code,
            inf_time=f"{self.clock:%Y-%m-%d %H:%M:%S}", received_ns=0, reply_topic="r", reply_partition=None,
            hospital=HOSPITAL, person=psn, scope="local", filing_type=None, body=body, catalog=catalog or [])
        self.messages.append(msg)
        return msg

    def purchase(self, psn: PersonCtx, amounts: list[int]) -> None:
        drugs = [DrugDetail(feedetl_sn=str(i), fee_ocur_time=f"{self.clock:%Y-%m-%d %H:%M:%S}", med_list_codg="X",
                            medins_list_codg="X", det_item_fee_sumamt=Decimal(a) / 100, cnt=Decimal(1),
                            pric=Decimal(a) / 100) for i, a in enumerate(amounts)]
        info = PurchaseInfo(psn_no=psn.psn_no, mdtrt_cert_type="01", mdtrt_cert_no="-",
                            begntime=f"{self.clock:%Y-%m-%d %H:%M:%S}", medfee_sumamt=Decimal(sum(amounts)) / 100,
                            insutype=_insutype(psn))
        msg = self._msg(psn, Input2102(data=info, drugdetail=drugs), [CATALOG["01"]] * len(amounts))
        self.settled.append((psn.psn_no, "pharmacy", "S" + msg.msgid))

    def stay(self, psn: PersonCtx, items: list[tuple[str, int]], parts: int = 0) -> None:
        """Admission, fees, discharge, settlement; with `parts`, that many mid-stay parts first (each
        settling the next of the items uploaded one by one), the discharge settlement settling the rest."""
        admit = self._msg(psn, Input2401(mdtrtinfo=AdmissionInfo(
            psn_no=psn.psn_no, insutype=_insutype(psn), mdtrt_cert_type="01", mdtrt_cert_no="-", med_type="21",
            ipt_otp_no="Z", begntime=f"{self.clock:%Y-%m-%d %H:%M:%S}", atddr_no="D", dise_codg="X")))
        mdtrt_id = "M" + admit.msgid
        fees = [FeeDetail(feedetl_sn=str(i), mdtrt_id=mdtrt_id, psn_no=psn.psn_no, med_type="21",
                          fee_ocur_time=f"{self.clock:%Y-%m-%d %H:%M:%S}", med_list_codg="X", medins_list_codg="X",
                          det_item_fee_sumamt=Decimal(a) / 100, cnt=Decimal(1), pric=Decimal(a) / 100)
                for i, (_, a) in enumerate(items)]
        parts = min(parts, len(items) - 1)
        for i in range(parts):
            self._msg(psn, Input2301(feedetail=[fees[i]]), [CATALOG[items[i][0]]])
            self._settle(psn, mdtrt_id, items[i][1], mid=True)
        self._msg(psn, Input2301(feedetail=fees[parts:]), [CATALOG[lv] for lv, _ in items[parts:]])
        self._msg(psn, Input2402(dscginfo=DischargeInfo(mdtrt_id=mdtrt_id, psn_no=psn.psn_no, insutype=_insutype(psn),
                                                          endtime=f"{self.clock:%Y-%m-%d %H:%M:%S}")))
        self._settle(psn, mdtrt_id, sum(a for _, a in items[parts:]), mid=False)

    def _settle(self, psn: PersonCtx, mdtrt_id: str, fen: int, *, mid: bool) -> None:
        settle = self._msg(psn, Input2304(mdtrtinfo=SettleInfo(
            psn_no=psn.psn_no, mdtrt_cert_type="01", mdtrt_cert_no="-", medfee_sumamt=Decimal(fen) / 100,
            mdtrt_id=mdtrt_id, insutype=_insutype(psn), acct_used_flag="1", mid_setl_flag="1" if mid else "0")))
        self.settled.append((psn.psn_no, mdtrt_id, "S" + settle.msgid))

    def reverse(self, index: int) -> None:
        psn_no, kind, setl_id = self.settled[index % len(self.settled)]
        psn = self.persons[psn_no]
        if kind == "pharmacy":
            self._msg(psn, Input2103(data=PurchaseReverseRef(psn_no=psn_no, setl_id=setl_id)))
        else:
            self._msg(psn, Input2305(data=ReverseRef(psn_no=psn_no, mdtrt_id=kind, setl_id=setl_id)))


def _insutype(psn: PersonCtx) -> InsuType:
    return cast(InsuType, psn.insutype)


def _infno(body: Any) -> str:
    return next(infno for infno, t in BODY_TYPES.items() if type(body) is t)


persons_st = st.lists(
    st.tuples(st.sampled_from(["310", "390"]), st.booleans(), st.sampled_from([None, "1", "2"]),
              st.integers(0, 500_000)),
    min_size=1, max_size=3,
)
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("purchase"), st.integers(0, 9), st.lists(st.integers(1, 200_000), min_size=1, max_size=3)),
        st.tuples(st.just("stay"), st.integers(0, 9),
                  st.lists(st.tuples(st.sampled_from(["01", "02", "03"]), st.integers(1, 150_000_000)),
                           min_size=1, max_size=4)),
        st.tuples(st.just("reverse"), st.integers(0, 50), st.just([])),
        # a stay settled in mid-stay parts (the first items one part each) and a discharge settlement
        st.tuples(st.just("parts"), st.integers(0, 9),
                  st.lists(st.tuples(st.sampled_from(["01", "02", "03"]), st.integers(1, 150_000_000)),
                           min_size=2, max_size=4)),
    ),
    min_size=1, max_size=14,
)


def build(persons_spec: list[tuple[str, bool, str | None, int]], ops: list[tuple[str, int, Any]]) -> Script:
    persons = {}
    for i, (insutype, retired, assistance, balance) in enumerate(persons_spec):
        psn_type = ("12" if retired else "11") if insutype == "310" else "15"
        persons[f"P{i}"] = PersonCtx(psn_no=f"P{i}", insured_admdvs="150400", insured_prov="150000",
                                     insured_pool="150400", insutype=insutype, psn_type=psn_type + "01",
                                     assistance=assistance, acct_balc_fen=balance if insutype == "310" else 0)
    script = Script(persons)
    people = list(persons.values())
    for kind, who, arg in ops:
        psn = people[who % len(people)]
        if kind == "purchase":
            script.purchase(psn, arg)
        elif kind == "stay":
            script.stay(psn, arg)
        elif kind == "parts":
            script.stay(psn, arg, parts=len(arg) - 1)
        elif script.settled:
            script.reverse(who)
    return script


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(persons_spec=persons_st, ops=ops_st, cuts=st.lists(st.integers(0, 80), max_size=6))
def test_batches_and_restarts_do_not_change_results(persons_spec: list[Any], ops: list[Any], cuts: list[int]) -> None:
    script = build(persons_spec, ops)
    one, answers_one = run(script.messages, [])
    split, answers_split = run(script.messages, [c % (len(script.messages) + 1) for c in cuts])
    assert answers_one == answers_split
    assert one.accumulators == split.accumulators
    assert one.accounts == split.accounts
    check_ledger(one, script)


def check_ledger(ledger: Ledger, script: Script) -> None:
    totals: dict[tuple[str, int], Accumulators] = defaultdict(Accumulators)
    for row in ledger.settlements.values():
        a = row.amounts
        assert a["fund_pay_sumamt"] == a["hifp_pay"] + a["hifmi_pay"] + a["hifob_pay"] + a["maf_pay"]
        assert a["psn_part_amt"] == a["medfee_sumamt"] - a["fund_pay_sumamt"]
        assert a["psn_cash_pay"] == a["psn_part_amt"] - a["acct_pay"]
        if row.kind == "settle":
            assert all(v >= 0 for v in a.values()), row.amounts
        delta = row.accum_delta if row.kind == "settle" else None
        if delta is not None and not any(r.orig_setl_id == row.setl_id for r in ledger.settlements.values()):
            key = (row.psn_no, row.acc_year)
            totals[key] = apply_delta(totals[key], delta_from_json(delta))
    # Accumulators = what the settlements that were not reversed added (reversal of any subset).
    for key, acc in ledger.accumulators.items():
        assert acc == totals.get(key, Accumulators()), key
    for (psn_no, _), acc in ledger.accumulators.items():
        psn = script.persons[psn_no]
        policy = POLICIES.for_region(psn.insured_admdvs, psn.insured_pool)
        assert acc.basic_paid <= policy.basic_annual_cap_fen[psn.insutype]
        assert acc.critical_paid <= policy.critical_annual_cap_fen
        assert acc.supplementary_paid <= policy.supplementary_annual_cap_fen
        assert acc.assistance_paid <= policy.assistance_annual_cap_fen
    for psn_no, balance in ledger.accounts.items():
        spent = sum(r.amounts["acct_pay"] for r in ledger.settlements.values() if r.psn_no == psn_no)
        assert balance == script.persons[psn_no].acct_balc_fen - spent >= 0


def test_replayed_batch_answers_from_the_ledger() -> None:
    """A crash after the database commit and before the offset commit: the batch is delivered again, now
    followed by reversals. The replayed requests get their first answers byte for byte and change nothing;
    the reversals run through the engine against what the first delivery committed and undo it exactly."""
    balance = 100_000
    script = build([("310", False, None, balance)], [("stay", 0, [("01", 500_000)]), ("purchase", 0, [5_000])])
    batch = list(script.messages)
    ledger, first = run(batch, [])
    settle_rows = {r.setl_id: r for r in ledger.settlements.values()}
    assert [m.infno for m in batch] == ["2401", "2301", "2402", "2304", "2102"]
    # The first delivery settled both. The stay (赤峰, level 3, employee): deductible 900 yuan, the pool pays
    # 85% of the rest, the account pays 1000 yuan of the personal part; no fund pays for the purchase.
    stay, purchase = (settle_rows["S" + batch[3].msgid], settle_rows["S" + batch[4].msgid])
    assert {k: stay.amounts[k] for k in ("medfee_sumamt", "act_pay_dedc", "hifp_pay", "acct_pay", "psn_cash_pay")} \
        == {"medfee_sumamt": 500_000, "act_pay_dedc": 90_000, "hifp_pay": 348_500, "acct_pay": 100_000,
            "psn_cash_pay": 51_500}
    assert (purchase.amounts["fund_pay_sumamt"], purchase.amounts["psn_cash_pay"]) == (0, 5_000)
    assert ledger.accounts["P0"] == 0
    assert ledger.accumulators[("P0", 2026)] == Accumulators(basic_paid=348_500)
    assert ledger.visits["M" + batch[0].msgid].state == "settled"
    for answer, msg in zip(first[3:], batch[3:], strict=True):
        assert decode_response_output(answer)["setlinfo"]["setl_id"] == "S" + msg.msgid

    committed = copy.deepcopy(ledger)
    script.reverse(0)
    script.reverse(1)
    reversals = script.messages[len(batch):]
    assert [m.infno for m in reversals] == ["2305", "2103"]
    _, again = run(batch + reversals, [], ledger)  # the redelivered batch, then the new requests

    assert again[:len(batch)] == first
    assert {k: v for k, v in ledger.settlements.items() if k in committed.settlements} == committed.settlements
    for msg, orig in zip(reversals, (stay, purchase), strict=True):
        row = ledger.settlements["R" + msg.msgid]
        assert row.orig_setl_id == orig.setl_id
        assert {k: v for k, v in row.amounts.items() if k != "balc"} == {
            k: -v for k, v in orig.amounts.items() if k != "balc"}
    assert ledger.accounts["P0"] == balance
    assert ledger.accumulators[("P0", 2026)] == Accumulators()
    assert ledger.visits["M" + batch[0].msgid].state == "discharged"
    assert ledger.visits["M" + batch[4].msgid].state == "cancelled"
    # The same requests delivered once, without the crash, give the same answers and the same ledger.
    once, answers_once = run(script.messages, [])
    assert answers_once == again
    # (through load(): a row's `reversed` flag is derived on loading, as the real ledger does)
    assert (once.accounts, once.accumulators, once.load().settlements) == (
        ledger.accounts, ledger.accumulators, ledger.load().settlements)


def decode_response_output(answer: bytes) -> dict[str, Any]:
    """A successful answer of the test's run loop (the bare `output`, see `run`)."""
    import json

    out = json.loads(answer)
    assert isinstance(out, dict) and "setlinfo" in out, answer[:200]
    return out


def test_mid_stay_parts_reverse_newest_first() -> None:
    """Three parts and a discharge settlement in one stay, cut into batches anywhere: the deductible is
    taken once, an earlier settlement of the stay cannot be reversed while a later one stands, and
    reversing them newest first leaves nothing in the accumulators."""
    script = build([("310", False, None, 0)], [("parts", 0, [("01", 300_000), ("01", 200_000), ("01", 50_000),
                                                             ("01", 10_000)])])
    setl_ids = [s for _, _, s in script.settled]
    for setl_id in [setl_ids[0], *reversed(setl_ids)]:
        script.reverse(setl_ids.index(setl_id))
    for cuts in ([], list(range(len(script.messages)))):
        ledger, answers = run(script.messages, cuts)
        rows = [ledger.settlements[s] for s in setl_ids]
        assert [r.amounts["act_pay_dedc"] for r in rows] == [90000, 0, 0, 0]  # 赤峰 employee, 三级: 900.00
        assert [(r.mid_setl, r.stay_part) for r in rows] == [(True, 1), (True, 2), (True, 3), (False, 4)]
        assert answers[-5].startswith(b"MID_SETTLEMENT_NOT_LATEST")
        assert all(ledger.settlements.get("R" + m.msgid) for m in script.messages[-4:])
        assert ledger.accumulators[("P0", 2026)] == Accumulators()
        assert all(f.setl_id is None for fees in ledger.fees.values() for f in fees.values())
        check_ledger(ledger, script)
