"""Smart monitoring on the settlement path, end to end through the gateway (signed like every test):
the facts on fsi.settlements (fresh and replayed), 3101/3102 analyses, 3103 disposals, and the warnings
of 2206/2303 (`warn_msg`).

The module owns its reference data: two hospitals and a pharmacy in 赤峰 (150400), persons with
certificates (gender from the 17th digit), and catalog items with the monitoring fields set (an
obstetric item for women only, a once-per-day item, a drug with 30 days of supply per unit). Dates are
fixed in 2026; every person is the module's own, so the history each check reads is exactly what the
test settled.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loadtest.his import (
    Encounter,
    FeeLine,
    GatewayClient,
    Hospital,
    OutpatientVisit,
    Purchase,
    analysis,
    disposal,
    run_purchase,
)
from loadtest.prescreen import measure_3102
from schemas.internal import SettlementEvent
from schemas.monitoring import ItemFact, VisitFacts
from schemas.refdata import certno_check_char
from services.common.config import Settings
from services.common.kafka import ADMIN, client_auth
from services.refdata.load import load_dir
from tests.integration.conftest import (
    ITEM_A,
    RUN_TOKEN,
    Ledger,
    issue_missing_keys,
    wait_router_knows,
)
from tests.integration.conftest import (
    TestPerson as Person,  # (not collected as a test class)
)
from tests.integration.stays import TimedStay
from topics.catalog import ALL_TOPICS, SETTLEMENTS, catalog

pytestmark = pytest.mark.integration

D = Decimal
WAIT_S = 30
REGION, PROV = "150400", "150000"
HOSP_A = Hospital("H15040099950", "赤峰测试监控甲医院", REGION)
HOSP_B = Hospital("H15040099951", "赤峰测试监控乙医院", REGION)
PHARMACY = Hospital("P15040099950", "赤峰测试监控药房", REGION)
# Catalog items with monitoring fields (hub catalog_item, 0009), in the treating province.
OBSTETRIC, ONCE_A_DAY, DRUG_30 = "EVGEN001", "EVONCE01", "EVDRUG30"


def epsn(n: int) -> str:
    return f"E{RUN_TOKEN}{n:03d}"


def _certno(n: int, female: bool) -> str:
    body17 = f"15040019900101{n % 50 * 2 + (0 if female else 1):03d}"  # 17th digit: odd male, even female
    return body17 + certno_check_char(body17)


# n → female?; every test has its own persons.
PERSONS = {1: True, 2: False, 3: True, 4: False, 5: True, 6: False, 7: True, 8: False}


def person(n: int) -> Person:
    return Person(epsn(n), REGION, "390")


def _write_refdata(directory: Path) -> None:
    enc = msgspec.json.Encoder()
    hospitals = [{"fixmedins_code": h.fixmedins_code, "fixmedins_name": h.fixmedins_name, "admdvs": h.admdvs,
                  "hosp_lv": 1 if h.fixmedins_code.startswith("P") else lv}
                 for h, lv in ((HOSP_A, 3), (HOSP_B, 2), (PHARMACY, 1))]
    catalog = [{"admdvs": PROV, "med_list_codg": code, "name": name, "chrgitm_lv": "01", "selfpay_prop": "0"}
               for code, name in ((ITEM_A, "测试甲类"), (OBSTETRIC, "测试产科"), (ONCE_A_DAY, "测试每日一次"),
                                  (DRUG_30, "测试三十日药"))]
    persons = [{"psn_no": epsn(n), "insuplc_admdvs": REGION, "insutype": "390", "psn_type": "1501",
                "assistance": None, "acct_balc": "0.00", "certno": _certno(n, female)}
               for n, female in PERSONS.items()]
    for name, rows in (("hospitals", hospitals), ("persons", persons), ("catalog", catalog)):
        (directory / f"{name}.jsonl").write_bytes(b"\n".join(enc.encode(r) for r in rows) + b"\n")
    (directory / "filings.jsonl").write_bytes(b"")  # local care: no filing needed


async def _flag_catalog(db: asyncpg.Pool) -> None:
    """The items' monitoring fields, set as an operator would, announced through the hub's change log."""
    async with db.acquire() as conn, conn.transaction():
        for code, column, value in ((OBSTETRIC, "gender_only", "2"), (ONCE_A_DAY, "once_per_day", True),
                                    (DRUG_30, "supply_days", D(30))):
            await conn.execute(f"UPDATE catalog_item SET {column} = $1 WHERE admdvs = $2 AND med_list_codg = $3",
                               value, PROV, code)
            await conn.execute("INSERT INTO refdata_change (entity, key) VALUES ('catalog_item', $1)",
                               f"{PROV}:{code}")
        await conn.execute("SELECT pg_notify('refdata_changed', (SELECT max(version) FROM refdata_change)::text)")


@pytest.fixture(scope="module")
async def events_refdata(refdata: dict, db: asyncpg.Pool, services: Settings,
                         tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("events_refdata")
    _write_refdata(directory)
    await load_dir(db, directory, operator="test.loader")
    await _flag_catalog(db)
    await issue_missing_keys(services, db)
    for n in PERSONS:
        await wait_router_knows(services, HOSP_A, epsn(n), REGION)


class SettlementTap:
    """fsi.settlements from its end offsets at the start of a test: the events by setl_id, in order."""

    def __init__(self, s: Settings) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, ADMIN),
                                         enable_auto_commit=False, isolation_level="read_committed")
        self.events: dict[str, list[SettlementEvent]] = {}
        self.topic = catalog(s)[ALL_TOPICS.index(SETTLEMENTS)]  # the run's own (prefixed) topic

    async def start(self) -> None:
        await self.consumer.start()
        tps = [TopicPartition(self.topic.name, p) for p in range(self.topic.partitions)]
        self.consumer.assign(tps)
        for tp, offset in (await self.consumer.end_offsets(tps)).items():
            self.consumer.seek(tp, offset)

    async def wait_for(self, setl_id: str, count: int = 1) -> list[SettlementEvent]:
        deadline = time.monotonic() + WAIT_S
        while len(self.events.get(setl_id, [])) < count:
            assert time.monotonic() < deadline, f"{count} event(s) of a settlement not seen within {WAIT_S} s"
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    ev = msgspec.json.decode(rec.value, type=SettlementEvent)
                    self.events.setdefault(ev.setl_id, []).append(ev)
        return self.events[setl_id]


@pytest.fixture
async def tap(services: Settings) -> AsyncIterator[SettlementTap]:
    t = SettlementTap(services)
    await t.start()
    yield t
    await t.consumer.stop()


def _ok(r: dict[str, Any]) -> dict[str, Any]:
    assert r["infcode"] == 0, r["err_msg"]
    return r


def _item(code: str, day: str, cnt: str, fen: int, **flags: Any) -> ItemFact:
    return ItemFact(med_list_codg=code, day=day, cnt=D(cnt), sumamt=fen, **flags)


# --- facts on fsi.settlements ----------------------------------------------------------------------


async def test_settlement_events_carry_the_visit_facts(events_refdata: None, gateway: GatewayClient,
                                                       tap: SettlementTap) -> None:
    woman = person(1)
    # Outpatient at A (level 3): registered, diagnosed J06.900, two items (one once-per-day), settled.
    at = datetime(2026, 3, 2, 9, 0)
    visit = OutpatientVisit(HOSP_A, woman.psn_no, REGION, "390", at)
    visit.mdtrt_id = _ok(await gateway.call(visit.register()))["output"]["data"]["mdtrt_id"]
    _ok(await gateway.call(visit.declare()))
    _ok(await gateway.call(visit.upload([FeeLine(ITEM_A, D(2), D("10.00")), FeeLine(ONCE_A_DAY, D(1), D("5.00"))])))
    setl_id = _ok(await gateway.call(visit.settle()))["output"]["setlinfo"]["setl_id"]
    [ev] = await tap.wait_for(setl_id)
    assert ev.visit == VisitFacts(
        visit_type="outpatient", gend="2", begntime="2026-03-02 09:00:00", endtime="", main_dise="J06.900",
        hosp_lv=3, treating_prov=PROV,
        items=[_item(ITEM_A, "2026-03-02", "2", 2000), _item(ONCE_A_DAY, "2026-03-02", "1", 500, once_per_day=True)])

    # Pharmacy (level 1): a drug with 30 days of supply per unit.
    purchase = Purchase(PHARMACY, woman.psn_no, REGION, "390", datetime(2026, 3, 3, 10, 0),
                        [FeeLine(DRUG_30, D(3), D("12.50"))], use_account=False)
    _ok(await run_purchase(gateway, purchase))
    [ev] = await tap.wait_for(purchase.setl_id)
    assert ev.visit == VisitFacts(
        visit_type="pharmacy", gend="2", begntime="2026-03-03 10:00:00", endtime="", main_dise="", hosp_lv=1,
        treating_prov=PROV, items=[_item(DRUG_30, "2026-03-03", "3", 3750, supply_days=D(30))])

    # Inpatient at B (level 2) with a mid-stay part: each settlement carries its own items; the final one
    # the discharge time; the obstetric item keeps its restriction.
    stay = TimedStay(gateway, HOSP_B, woman)
    await stay.admit(datetime(2026, 3, 10, 9, 0))
    await stay.upload([FeeLine(ITEM_A, D(10), D("30.00"))], datetime(2026, 3, 11, 9, 0))
    part = _ok(await stay.settle(D("300.00"), datetime(2026, 3, 12, 10, 0), mid=True))["output"]["setlinfo"]
    await stay.upload([FeeLine(OBSTETRIC, D(1), D("800.00"))], datetime(2026, 3, 13, 9, 0))
    _ok(await stay.discharge(datetime(2026, 3, 15, 9, 0)))
    final = _ok(await stay.settle(D("800.00"), datetime(2026, 3, 15, 11, 0), mid=False))["output"]["setlinfo"]
    [ev_part] = await tap.wait_for(part["setl_id"])
    [ev_final] = await tap.wait_for(final["setl_id"])
    def stay_facts(endtime: str, items: list[ItemFact]) -> VisitFacts:
        return VisitFacts(visit_type="inpatient", gend="2", begntime="2026-03-10 09:00:00", endtime=endtime,
                          main_dise="I10.x00", hosp_lv=2, treating_prov=PROV, items=items)

    assert (ev_part.mid_setl, ev_part.visit) == (True, stay_facts("", [_item(ITEM_A, "2026-03-11", "10", 30000)]))
    assert (ev_final.mid_setl, ev_final.visit) == (False, stay_facts(
        "2026-03-15 09:00:00", [_item(OBSTETRIC, "2026-03-13", "1", 80000, gender_only="2")]))

    # A reversal carries no facts.
    back = _ok(await stay.reverse(final["setl_id"], datetime(2026, 3, 15, 12, 0)))["output"]["setlinfo"]
    [ev_back] = await tap.wait_for(back["setl_id"])
    assert (ev_back.kind, ev_back.visit) == ("reverse", None)


async def test_replayed_settlement_republishes_the_same_facts(events_refdata: None, gateway: GatewayClient,
                                                              tap: SettlementTap) -> None:
    man = person(2)
    visit = OutpatientVisit(HOSP_A, man.psn_no, REGION, "390", datetime(2026, 3, 4, 9, 0))
    visit.mdtrt_id = _ok(await gateway.call(visit.register()))["output"]["data"]["mdtrt_id"]
    _ok(await gateway.call(visit.upload([FeeLine(ITEM_A, D(1), D("42.00"))])))
    envelope = visit.settle()
    first = _ok(await gateway.call(envelope))
    again = _ok(await gateway.call(envelope))  # the same msgid: answered from the ledger, its event resent
    assert again["output"] == first["output"]
    events = await tap.wait_for(first["output"]["setlinfo"]["setl_id"], count=2)
    assert events[0] == events[1]
    assert events[1].visit is not None and events[1].visit.gend == "1"
    assert [i.sumamt for i in events[1].visit.items] == [4200]


# --- 3101 / 3102 / 3103 ----------------------------------------------------------------------------


def _encounter(mdtrt_id: str, orders: list[tuple[FeeLine, datetime]], *, medins: Hospital = HOSP_A,
               med_type: str = "11", adm: datetime = datetime(2026, 4, 1, 9, 0), dscg: datetime | None = None,
               diagnoses: tuple[str, ...] = ("O80.000",)) -> Encounter:
    return Encounter(mdtrt_id, medins.fixmedins_code, med_type, adm, dscg, list(diagnoses), orders)


async def _analyse(gateway: GatewayClient, infno: str, who: Person, current: Encounter,
                   *, hospital: Hospital = HOSP_A, rule_ids: tuple[str, ...] = ()) -> dict[str, Any]:
    env = hospital.envelope(infno, analysis(who.psn_no, current, rule_ids=rule_ids), insuplc=who.insuplc,
                            inf_time=current.adm + timedelta(hours=1))
    return await gateway.call(env)


async def test_3102_hits_and_misses_with_the_rule_filter(events_refdata: None, gateway: GatewayClient,
                                                         ledger: Ledger) -> None:
    man, woman = person(4), person(3)
    day = datetime(2026, 4, 1, 10, 0)
    orders = [(FeeLine(OBSTETRIC, D(1), D("800.00")), day)]
    hit = _ok(await _analyse(gateway, "3102", man, _encounter("CUR" + RUN_TOKEN, orders)))
    [result] = hit["output"]["result"]
    assert (result["rule_id"], result["sev_deg"], result["vola_amt"], result["mdtrt_id"], result["patn_id"]) == (
        "GENDER_RESTRICTED", result["sev_deg"], D("800.00"), "CUR" + RUN_TOKEN, man.psn_no)
    assert len(result["jr_id"]) == 32 and result["rule_name"] and OBSTETRIC in result["vola_cont"]
    assert man.psn_no not in result["vola_cont"]
    issued = await ledger.fetchrow("SELECT infno, fixmedins_code, rule_id, vola_amt_fen FROM warning_issued"
                                   " WHERE jr_id = $1", result["jr_id"])
    assert dict(issued) == {"infno": "3102", "fixmedins_code": HOSP_A.fixmedins_code,
                            "rule_id": "GENDER_RESTRICTED", "vola_amt_fen": 80000}

    # The same order for a woman: nothing. The rule filter: another rule only → nothing; this rule → the hit.
    assert _ok(await _analyse(gateway, "3102", woman, _encounter("CUR" + RUN_TOKEN, orders)))["output"] == {
        "result": []}
    only_other = await _analyse(gateway, "3101", man, _encounter("CUR" + RUN_TOKEN, orders),
                                rule_ids=("DUPLICATE_CHARGE",))
    assert _ok(only_other)["output"] == {"result": []}
    only_this = await _analyse(gateway, "3101", man, _encounter("CUR" + RUN_TOKEN, orders),
                               rule_ids=("GENDER_RESTRICTED",))
    assert [r["rule_id"] for r in _ok(only_this)["output"]["result"]] == ["GENDER_RESTRICTED"]

    # 3101 before the upload: a once-per-day item ordered twice the same day.
    twice = [(FeeLine(ONCE_A_DAY, D(1), D("5.00")), day), (FeeLine(ONCE_A_DAY, D(1), D("5.00")), day)]
    dup = _ok(await _analyse(gateway, "3101", woman, _encounter("DUP" + RUN_TOKEN, twice)))
    assert [r["rule_id"] for r in dup["output"]["result"]] == ["DUPLICATE_CHARGE"]
    # An unknown item is refused like in a fee upload.
    unknown = await _analyse(gateway, "3102", woman, _encounter("UNK" + RUN_TOKEN,
                                                                 [(FeeLine("NOSUCH01", D(1), D("1.00")), day)]))
    assert unknown["infcode"] == -1 and unknown["err_msg"].startswith("CATALOG_ITEM_UNKNOWN")


async def test_3103_disposal_ok_repeat_unknown_and_other_institution(events_refdata: None, gateway: GatewayClient,
                                                                     ledger: Ledger) -> None:
    man = person(6)
    day = datetime(2026, 4, 2, 10, 0)
    hit = _ok(await _analyse(gateway, "3102", man, _encounter(
        "DSP" + RUN_TOKEN, [(FeeLine(OBSTETRIC, D(1), D("800.00")), day)], adm=day)))
    jr_id = hit["output"]["result"][0]["jr_id"]

    env = HOSP_A.envelope("3103", disposal(jr_id, man.psn_no, reason="confirmed with the patient"),
                          insuplc=REGION, inf_time=day + timedelta(hours=2))
    first = _ok(await gateway.call(env))
    assert first["output"] == {"jr_id": jr_id, "dspo_way": "1"}
    repeat = _ok(await gateway.call(env))  # the same msgid: the same answer, recorded once
    assert repeat["output"] == first["output"]
    rows = await ledger.fetch("SELECT dspo_way, dspo_way_rea, fixmedins_code FROM warning_disposal WHERE jr_id = $1",
                              jr_id)
    assert [tuple(r) for r in rows] == [("1", "confirmed with the patient", HOSP_A.fixmedins_code)]

    unknown = await gateway.call(HOSP_A.envelope("3103", disposal("0" * 32, man.psn_no), insuplc=REGION,
                                                 inf_time=day + timedelta(hours=2)))
    assert unknown["infcode"] == -1 and unknown["err_msg"].startswith("WARNING_UNKNOWN")
    other = await gateway.call(HOSP_B.envelope("3103", disposal(jr_id, man.psn_no, change=True), insuplc=REGION,
                                               inf_time=day + timedelta(hours=2)))
    assert other["infcode"] == -1 and other["err_msg"].startswith("WARNING_OTHER_INSTITUTION")
    # Another person's patn_id does not reach this warning either.
    stranger = await gateway.call(HOSP_A.envelope("3103", disposal(jr_id, person(8).psn_no), insuplc=REGION,
                                                  inf_time=day + timedelta(hours=2)))
    assert stranger["infcode"] == -1 and stranger["err_msg"].startswith("WARNING_UNKNOWN")
    assert await ledger.total("SELECT count(*) FROM warning_disposal WHERE jr_id = $1", jr_id) == 1


# --- 2206 / 2303 warn_msg ----------------------------------------------------------------------------


async def test_pre_settlement_warnings_from_the_history(events_refdata: None, gateway: GatewayClient) -> None:
    woman = person(5)
    # History: a stay at A, 2026-05-01 .. 05-10, settled.
    stay_a = TimedStay(gateway, HOSP_A, woman)
    await stay_a.admit(datetime(2026, 5, 1, 9, 0))
    await stay_a.upload([FeeLine(ITEM_A, D(10), D("50.00"))], datetime(2026, 5, 2, 9, 0))
    _ok(await stay_a.discharge(datetime(2026, 5, 10, 9, 0)))
    _ok(await stay_a.settle(D("500.00"), datetime(2026, 5, 10, 10, 0), mid=False))

    # An outpatient visit at B during that stay: its pre-settlement warns, and still answers the split.
    during = OutpatientVisit(HOSP_B, woman.psn_no, REGION, "390", datetime(2026, 5, 5, 9, 0))
    during.mdtrt_id = _ok(await gateway.call(during.register()))["output"]["data"]["mdtrt_id"]
    _ok(await gateway.call(during.upload([FeeLine(ITEM_A, D(1), D("20.00"))])))
    pre = _ok(await gateway.call(during.settle(pre=True)))
    assert "OUTPATIENT_DURING_STAY" in pre["warn_msg"] and woman.psn_no not in pre["warn_msg"]
    assert pre["output"]["setlinfo"]["medfee_sumamt"] == D("20.00")
    # The settlement itself is never held back by a warning.
    _ok(await gateway.call(during.settle()))

    # A stay at B overlapping A's: its pre-settlement (2303) warns of the overlap.
    stay_b = TimedStay(gateway, HOSP_B, woman)
    await stay_b.admit(datetime(2026, 5, 8, 9, 0))
    await stay_b.upload([FeeLine(ITEM_A, D(2), D("50.00"))], datetime(2026, 5, 8, 10, 0))
    _ok(await stay_b.discharge(datetime(2026, 5, 12, 9, 0)))
    pre_b = _ok(await stay_b.settle(D("100.00"), datetime(2026, 5, 12, 10, 0), mid=False, pre=True))
    assert "OVERLAP_INPATIENT" in pre_b["warn_msg"]

    # Another person with no history: no warning.
    calm = person(7)
    plain = OutpatientVisit(HOSP_B, calm.psn_no, REGION, "390", datetime(2026, 5, 5, 9, 0))
    plain.mdtrt_id = _ok(await gateway.call(plain.register()))["output"]["data"]["mdtrt_id"]
    _ok(await gateway.call(plain.upload([FeeLine(ITEM_A, D(1), D("20.00"))])))
    quiet = _ok(await gateway.call(plain.settle(pre=True)))
    assert quiet["warn_msg"] == ""
    assert quiet["output"]["setlinfo"]["medfee_sumamt"] == D("20.00")



# --- latency -----------------------------------------------------------------------------------------

# The target is p99 < 50 ms at light load (README); the assertion leaves room for a test machine shared
# with other work, so it fails on a real regression (an unbounded history read, a per-request reload),
# not on a busy neighbour.
P99_CEILING_MS = 250.0


async def test_3102_latency_at_light_load(events_refdata: None, gateway: GatewayClient) -> None:
    who = person(8)
    # Some history to read: two settled outpatient visits.
    for day in (6, 7):
        visit = OutpatientVisit(HOSP_A, who.psn_no, REGION, "390", datetime(2026, 6, day, 9, 0))
        visit.mdtrt_id = _ok(await gateway.call(visit.register()))["output"]["data"]["mdtrt_id"]
        _ok(await gateway.call(visit.upload([FeeLine(ITEM_A, D(1), D("30.00"))])))
        _ok(await gateway.call(visit.settle()))
    at = datetime(2026, 6, 8, 9, 0)
    encounter = _encounter("LAT" + RUN_TOKEN, [(FeeLine(ITEM_A, D(2), D("15.00")), at),
                                                (FeeLine(ONCE_A_DAY, D(1), D("5.00")), at)], adm=at)
    body = analysis(who.psn_no, encounter)
    latency = await measure_3102(
        gateway, lambda _: HOSP_A.envelope("3102", body, insuplc=REGION, inf_time=at + timedelta(hours=1)),
        count=200, seconds=60)
    print(latency.line())
    assert latency.refused == 0
    assert latency.count >= 50, "too few requests within the time budget"
    assert latency.p99_ms < P99_CEILING_MS, latency.line()
