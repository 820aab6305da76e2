"""Chaos run: hospital load while services, a Kafka broker and PostgreSQL are killed on a schedule;
then the ledger is checked.

    python -m loadtest.chaos [--kills 4] [--broker-kills 1] [--db-restarts 1] [--seconds 90] [--persons 24]

Hospitals (one task per person, complete inpatient stays: 2401 → 2301 → 2402 → 2304, every 4th
reversed with 2305) send through the HTTP gateway and, like a careful HIS, resend the same msgid
after TIMEOUT or a lost connection. Meanwhile, one event every --interval seconds, round robin:
`kill -9` of settle, gateway, clearing or monitor (then started again through deploy.stack,
which waits until it answers), of one Kafka broker when the stack runs a cluster (`deploy.stack
start --brokers 3`; every other broker kill hits the active controller; the broker restarts after
--broker-down seconds) and a stop/start of PostgreSQL. Bounded: it ends after --kills kills of
each service (and the broker and database events), or after --seconds, whichever comes first.

Then it waits for quiescence (every hospital finished its stay, clearing caught up) and checks:
  lost      an answered settlement or reversal with no ledger row
  doubled   a visit with more than one settlement, or a settlement with more than one reversal
  invariants  one open settlement per visit, accumulators and accounts equal to the sums of the
              person's ledger rows, clearing entries equal to the non-local ledger rows
and prints the stall after each kill: the longest time without any answer from the moment of the
kill until the next event. Exit code 0 when nothing is lost or doubled and every invariant holds.
Only 127.0.0.1; the run's persons are its own (psn_no carries a per-run token), dates are fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec

from deploy import kafka as cluster
from deploy import stack as stack_ctl
from loadtest.his import FeeLine, GatewayClient, Hospital, Signer, SignInFailed, Stay, simulator_signer
from loadtest.population import tool_operator
from services.common.config import Settings, load_settings
from services.common.shards import ShardPools
from services.common.tls import client_session
from services.refdata.load import load_dir

SERVICES = ("settle", "gateway", "clearing", "monitor")
HOSPITAL = Hospital("H15040099903", "赤峰混沌测试医院", "150400")
ITEM_A, ITEM_B10 = "CHAOSA01", "CHAOSB10"
FEES = [FeeLine(ITEM_A, Decimal(3), Decimal("210.50")), FeeLine(ITEM_B10, Decimal(1), Decimal("333.33"))]
FIRST_DAY = datetime(2026, 3, 2, 9, 0, 0)
DAYS = 200  # stay k of a person starts FIRST_DAY + (k mod DAYS) days: all within 2026
ACCOUNT_YUAN = "800.00"
STALL_WINDOW_S = 30.0  # a stall is measured until the next event, at most this long


def say(msg: str) -> None:
    print(f"[chaos] {msg}", flush=True)


@dataclass(frozen=True)
class Person:
    psn_no: str
    insuplc: str
    insutype: str


def make_persons(token: str, n: int) -> list[Person]:
    """Half local employees of 赤峰 (with an account), half 米易县 residents treated in 赤峰 with a
    LONG_TERM filing (cross-province: their rows go to clearing)."""
    return [Person(f"X{token}{i:03d}", "150400", "310") if i % 2 == 0 else Person(f"X{token}{i:03d}", "510421", "390")
            for i in range(n)]


def write_refdata(directory: Path, persons: Sequence[Person]) -> None:
    enc = msgspec.json.Encoder()
    rows: dict[str, list[dict[str, Any]]] = {
        "hospitals": [{"fixmedins_code": HOSPITAL.fixmedins_code, "fixmedins_name": HOSPITAL.fixmedins_name,
                       "admdvs": HOSPITAL.admdvs, "hosp_lv": 3}],
        "catalog": [
            {"admdvs": "150000", "med_list_codg": ITEM_A, "name": "混沌甲类", "chrgitm_lv": "01", "selfpay_prop": "0"},
            {"admdvs": "150000", "med_list_codg": ITEM_B10, "name": "混沌乙类", "chrgitm_lv": "02",
             "selfpay_prop": "0.10"},
        ],
        "persons": [{"psn_no": p.psn_no, "insuplc_admdvs": p.insuplc, "insutype": p.insutype,
                     "psn_type": "1101" if p.insutype == "310" else "1501", "assistance": None,
                     "acct_balc": ACCOUNT_YUAN if p.insutype == "310" else "0.00", "chronic": [], "certno": None}
                    for p in persons],
        "filings": [{"psn_no": p.psn_no, "filing_type": "LONG_TERM", "begndate": "2026-01-01",
                     "enddate": "2026-12-31", "target_admdvs": None} for p in persons if p.insuplc != "150400"],
    }
    for name, items in rows.items():
        (directory / f"{name}.jsonl").write_bytes(b"\n".join(enc.encode(r) for r in items) + b"\n")


class ChaosClient(GatewayClient):
    """A resending HIS that also notes when each answer (anything but TIMEOUT) arrived."""

    def __init__(self, url: str, session: aiohttp.ClientSession, *, retry_for_s: float, answers: list[float],
                 signer: Signer) -> None:
        super().__init__(url, session, retry_for_s=retry_for_s, signer=signer)
        self.answers = answers
        self.requests = 0

    async def _post(self, data: bytes) -> dict[str, Any]:
        self.requests += 1
        result = await super()._post(data)
        if not result["err_msg"].startswith("TIMEOUT"):
            self.answers.append(time.monotonic())
        return result


@dataclass
class StayResult:
    mdtrt_id: str
    setl_id: str
    settled: bool  # the settlement was answered OK
    reversed: bool  # the reversal was answered OK
    error: str = ""  # the first refusal, when the stay did not settle


@dataclass
class Event:
    target: str  # a service, "broker" or "postgres"
    at: float  # monotonic time of the kill / stop
    detail: str = ""
    stall_s: float = 0.0


@dataclass
class Config:
    kills: int = 4  # kill -9 of each service
    broker_kills: int = 1  # in a cluster only
    db_restarts: int = 1
    seconds: float = 90.0  # the schedule's bound; quiescence and checks come after
    interval: float = 3.0
    persons: int = 24
    broker_down_s: float = 3.0
    retry_for_s: float = 120.0
    seed: int = 7
    services: tuple[str, ...] = SERVICES


@dataclass
class Report:
    events: list[Event] = field(default_factory=list)
    stays: list[StayResult] = field(default_factory=list)
    requests: int = 0
    resends: int = 0
    run_s: float = 0.0
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    unanswered: int = 0
    revived: list[str] = field(default_factory=list)  # services found dead and started (not scheduled kills)
    refused: dict[str, int] = field(default_factory=dict)
    invariants: dict[str, list[str]] = field(default_factory=dict)  # name -> problems (empty: holds)
    behind: list[str] = field(default_factory=list)  # the monitor's clearing lag, when clearing did not catch up

    @property
    def ok(self) -> bool:
        return not self.lost and not self.doubled and not any(self.invariants.values())

    def kills(self, target: str) -> int:
        return sum(1 for e in self.events if e.target == target)

    def lines(self) -> list[str]:
        settled = sum(1 for r in self.stays if r.settled)
        reversed_ = sum(1 for r in self.stays if r.reversed)
        out = [
            f"run {self.run_s:.0f} s: {len(self.events)} events, {len(self.stays)} stays "
            f"({settled} settled, {reversed_} reversed), {self.requests} requests, {self.resends} resends",
            f"{'target':10} {'kills':>5} {'stall median s':>15} {'stall max s':>12}",
        ]
        for target in (*SERVICES, "broker", "postgres"):
            stalls = [e.stall_s for e in self.events if e.target == target]
            if stalls:
                out.append(f"{target:10} {len(stalls):5} {statistics.median(stalls):15.2f} {max(stalls):12.2f}")
        brokers = [e.detail for e in self.events if e.target == "broker"]
        if brokers:
            out.append("broker kills: " + ", ".join(brokers))
        if self.refused:
            out.append("refused stays (answered, not settled): "
                       + ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items())))
        if self.revived:
            out.append(f"found dead and started: {', '.join(self.revived)}")
        out.append(f"lost: {len(self.lost)}   doubled: {len(self.doubled)}   unanswered: {self.unanswered}")
        for what in self.lost[:10]:
            out.append(f"  lost {what}")
        for what in self.doubled[:10]:
            out.append(f"  doubled {what}")
        for name, problems in self.invariants.items():
            out.append(f"invariant {name}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
            out.extend(f"  {p}" for p in problems[:5])
        if self.behind:
            out.append("clearing's groups per the monitor (members, and partitions with a lag):")
            out.extend(f"  {line}" for line in self.behind)
        out.append(f"RESULT: {'PASS' if self.ok else 'FAIL'}")
        return out


# --- load ----------------------------------------------------------------------------------


async def router_knows(client: GatewayClient, person: Person, timeout_s: float, seen: Counter[str]) -> bool:
    """Whether the router resolves the run's hospital and person (it reloads on NOTIFY refdata_changed).
    Every other answer's error code is counted in `seen`, so a failure can say what the path answered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        env = HOSPITAL.envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": person.psn_no}},
                                insuplc=person.insuplc)
        try:
            r = await client.call(env)
        except SignInFailed:  # the router has not applied the hospital's key yet
            seen["SIGN_IN_FAILED"] += 1
            await asyncio.sleep(0.5)
            continue
        except (aiohttp.ClientError, OSError) as e:  # the gateway itself not answering
            seen[type(e).__name__] += 1
            await asyncio.sleep(0.5)
            continue
        if not r["err_msg"].startswith(("PERSON_UNKNOWN", "TIMEOUT", "HOSPITAL_UNKNOWN", "KEY_UNKNOWN")):
            return True
        seen[r["err_msg"].split(":", 1)[0]] += 1
        await asyncio.sleep(0.5)
    return False


async def wait_router_knows(s: Settings, client: GatewayClient, person: Person) -> None:
    seen: Counter[str] = Counter()
    if await router_knows(client, person, 15, seen):
        return
    # Seen after an earlier run's database restart: the router kept running but its LISTEN connection
    # was gone, so it never heard of the new reference data. A restart makes it load a fresh snapshot.
    # Seen in CI right after the switch to three brokers: TIMEOUT for over two minutes, the path's groups
    # not consuming. So every stage on the request's path starts afresh, not the router alone.
    say(f"the request path does not answer the run's person yet ({_codes(seen)}): restarting {', '.join(PATH)}")
    for name in PATH:
        await asyncio.to_thread(stack_ctl.restart_service, name, s)
    seen.clear()
    if not await router_knows(client, person, 120, seen):
        raise RuntimeError(f"the request path did not answer the chaos run's person in 2 minutes ({_codes(seen)})")


PATH = ("settle", "gateway")  # the processes a request crosses


def _codes(seen: Counter[str]) -> str:
    return ", ".join(f"{code} ×{n}" for code, n in seen.most_common()) or "no answer"


async def hospital(client: GatewayClient, person: Person, stop: asyncio.Event, out: list[StayResult],
                   report: Report) -> None:
    """Stays of one person, one after the other, until told to stop (the current stay is finished)."""
    for k in itertools.count():
        if stop.is_set():
            return
        start = FIRST_DAY + timedelta(days=k % DAYS, minutes=k // DAYS)
        stay = Stay(HOSPITAL, person.psn_no, person.insuplc, person.insutype, start, use_account=True)
        reverse = k % 4 == 3
        try:
            r = await client.run_stay(stay, FEES, reverse=False)
        except (aiohttp.ClientError, OSError):
            report.unanswered += 1  # the hospital gave up after retry_for_s: checked in the ledger anyway
            continue
        result = StayResult(stay.mdtrt_id, stay.setl_id, r["infcode"] == 0, False)
        if not result.settled:
            result.error = r["err_msg"].split(":")[0]
        elif reverse:
            try:
                rv = await client.call(stay.reverse())
                result.reversed = rv["infcode"] == 0
                if not result.reversed:
                    result.error = rv["err_msg"].split(":")[0]
            except (aiohttp.ClientError, OSError):
                report.unanswered += 1
        out.append(result)


# --- faults --------------------------------------------------------------------------------


def schedule(cfg: Config, brokers: int) -> list[str]:
    """Round robin over the services; broker kills and database restarts spread evenly in between."""
    events = [name for _ in range(cfg.kills) for name in cfg.services]
    extra = [("broker", cfg.broker_kills if brokers > 1 else 0), ("postgres", cfg.db_restarts)]
    for target, count in extra:
        for i in range(count):
            events.insert(min(len(events), (i + 1) * len(events) // (count + 1) + 1), target)
    return events


async def inflict(s: Settings, target: str, n_broker_kill: int, cfg: Config) -> Event:
    if target == "postgres":
        event = Event(target, time.monotonic(), "stop/start")
        await asyncio.to_thread(stack_ctl.stop_postgres, s)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(stack_ctl.start_postgres, s)
        return event
    if target == "broker":
        # Even kills hit the active controller; odd ones the next other node in turn, so every node dies.
        nodes = cluster.nodes(s)
        leader = await asyncio.to_thread(cluster.quorum_leader, s)
        if n_broker_kill % 2 == 0 and leader is not None:
            victim = next(n for n in nodes if n.node_id == leader)
        else:
            turn = [nodes[(n_broker_kill // 2 + 1 + i) % len(nodes)] for i in range(len(nodes))]
            victim = next(n for n in turn if n.node_id != leader)
        event = Event(target, time.monotonic(),
                      f"kafka-{victim.node_id}{' (active controller)' if victim.node_id == leader else ''}")
        await asyncio.to_thread(cluster.kill_node, s, victim)
        await asyncio.sleep(cfg.broker_down_s)
        await asyncio.to_thread(cluster.start_node, s, victim)
        await asyncio.to_thread(cluster.wait_ready, s)
        return event
    event = Event(target, time.monotonic(), "kill -9")
    await asyncio.to_thread(stack_ctl.stop_service, target, True, s)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(stack_ctl.start_service, target, s)
    return event


async def revive(s: Settings, report: Report) -> None:
    """Start any service found dead that the schedule did not kill (e.g. one that gave up during a
    database or broker outage): the chaos run restarts what a supervisor would."""
    for name in (*SERVICES, "dashboard"):
        if not await asyncio.to_thread(stack_ctl.is_running, name, s):
            say(f"{name} found dead: starting it")
            report.revived.append(name)
            await asyncio.to_thread(stack_ctl.start_service, name, s)


def measure_stalls(events: list[Event], answers: list[float], end: float) -> None:
    """Stall after an event: the longest time without any answer, from the kill until the next event."""
    times = sorted(answers)
    for i, event in enumerate(events):
        window_end = min(events[i + 1].at if i + 1 < len(events) else end, event.at + STALL_WINDOW_S)
        inside = [t for t in times if event.at <= t <= window_end]
        points = [event.at, *inside, window_end]
        event.stall_s = max(b - a for a, b in itertools.pairwise(points))


# --- checks --------------------------------------------------------------------------------


async def _on_shards(shards: ShardPools, sql: str, *args: Any) -> list[asyncpg.Record]:
    """A per-person query on every shard (a person's rows are all in one shard), rows concatenated."""
    return [r for _, shard in shards for r in await shard.fetch(sql, *args)]


async def _uncleared(hub: asyncpg.Pool, shards: ShardPools, persons: list[str]) -> list[str]:
    """The persons' non-local ledger rows (shards) without an equal clearing entry (hub)."""
    ledger = {r["setl_id"]: r["fund_pay_sumamt"] for r in await _on_shards(
        shards, "SELECT setl_id, fund_pay_sumamt FROM settlement WHERE psn_no = ANY($1) AND scope <> 'local'",
        persons)}
    cleared = {r["setl_id"]: r["fund_pay_sumamt"] for r in await hub.fetch(
        "SELECT setl_id, fund_pay_sumamt FROM clearing_entry WHERE setl_id = ANY($1::text[])", list(ledger))}
    return [f"{setl_id}: ledger {fen} fen, clearing {cleared.get(setl_id)} fen"
            for setl_id, fen in sorted(ledger.items()) if cleared.get(setl_id) != fen]


async def wait_clearing(hub: asyncpg.Pool, shards: ShardPools, persons: list[str], timeout_s: float = 90) -> bool:
    """Whether clearing has every non-local ledger row of the persons within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not await _uncleared(hub, shards, persons):
            return True
        await asyncio.sleep(1)
    return False


def clearing_lag(s: Settings) -> list[str]:
    """The monitor's series of the clearing groups: their members and every partition still behind."""
    url = f"http://127.0.0.1:{s.monitor_metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        return [f"monitor metrics unreadable: {type(e).__name__}"]
    return [line for line in text.splitlines() if "clearing" in line and (
        line.startswith("xs_kafka_consumer_group_members{")
        or (line.startswith("xs_kafka_consumer_lag_messages{") and not line.endswith(" 0.0")))]


async def check(hub: asyncpg.Pool, shards: ShardPools, persons: list[Person], report: Report) -> None:
    psn = [p.psn_no for p in persons]
    rows = await _on_shards(shards, "SELECT mdtrt_id, kind, setl_id, orig_setl_id FROM settlement"
                            " WHERE psn_no = ANY($1)", psn)
    settles: dict[str, list[str]] = {}
    reversals: dict[str, list[str]] = {}
    for r in rows:
        if r["kind"] == "settle":
            settles.setdefault(r["mdtrt_id"], []).append(r["setl_id"])
        else:
            reversals.setdefault(r["orig_setl_id"], []).append(r["setl_id"])
    for stay in report.stays:
        if stay.settled and stay.setl_id not in settles.get(stay.mdtrt_id, []):
            report.lost.append(f"settlement {stay.setl_id} of visit {stay.mdtrt_id}")
        if stay.reversed and not reversals.get(stay.setl_id):
            report.lost.append(f"reversal of {stay.setl_id}")
    report.doubled += [f"visit {m}: {len(v)} settlements" for m, v in settles.items() if len(v) > 1]
    report.doubled += [f"settlement {s}: {len(v)} reversals" for s, v in reversals.items() if len(v) > 1]
    refused: dict[str, int] = {}
    for stay in report.stays:
        if stay.error:
            refused[stay.error] = refused.get(stay.error, 0) + 1
    report.refused = refused

    open_settlements = await _on_shards(
        shards,
        """SELECT mdtrt_id, count(*) FROM settlement s WHERE psn_no = ANY($1) AND kind = 'settle'
           AND NOT EXISTS (SELECT 1 FROM settlement r WHERE r.orig_setl_id = s.setl_id)
           GROUP BY mdtrt_id HAVING count(*) > 1""", psn)
    report.invariants["one open settlement per visit"] = [f"visit {r['mdtrt_id']}: {r['count']}"
                                                          for r in open_settlements]
    accumulators = await _on_shards(
        shards,
        """SELECT a.psn_no FROM accumulator a
           LEFT JOIN (SELECT psn_no, acc_year, sum(hifp_pay) AS hifp,
                             sum((accum_delta->>'supplementary_paid')::bigint) AS supp
                      FROM settlement WHERE psn_no = ANY($1) GROUP BY psn_no, acc_year) s USING (psn_no, acc_year)
           WHERE a.psn_no = ANY($1)
             AND (a.basic_paid <> coalesce(s.hifp, 0) OR a.supplementary_paid <> coalesce(s.supp, 0))""", psn)
    report.invariants["accumulators = sums of ledger rows"] = [f"person #{psn.index(r['psn_no'])}"
                                                               for r in accumulators]
    accounts = await _on_shards(
        shards,
        """SELECT p.psn_no FROM person p JOIN account a USING (psn_no) LEFT JOIN settlement s USING (psn_no)
           WHERE p.psn_no = ANY($1) GROUP BY p.psn_no, p.acct_balc_fen, a.balc_fen
           HAVING p.acct_balc_fen - coalesce(sum(s.acct_pay), 0) <> a.balc_fen""", psn)
    report.invariants["accounts = opening balance - ledger"] = [f"person #{psn.index(r['psn_no'])}"
                                                                for r in accounts]
    report.invariants["clearing = non-local ledger rows"] = await _uncleared(hub, shards, psn)


# --- the run -------------------------------------------------------------------------------


async def run_chaos(s: Settings, cfg: Config) -> Report:
    report = Report()
    rng = random.Random(cfg.seed)
    token = f"{int(time.time()) % 10**8:08d}{os.getpid() % 100:02d}"
    persons = make_persons(token, cfg.persons)
    pool = await asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=2)
    try:
        with tempfile.TemporaryDirectory(prefix="chaos-refdata-") as tmp:
            write_refdata(Path(tmp), persons)
            await load_dir(pool, tmp, operator=tool_operator("loadtest.chaos"))
        signer = await simulator_signer(s, pool, [HOSPITAL.fixmedins_code], operator=tool_operator("loadtest.chaos"))
    finally:
        await pool.close()
    answers: list[float] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=30)
    async with client_session(s, timeout=timeout) as session:
        clients = [ChaosClient(s.gateway_url, session, retry_for_s=cfg.retry_for_s, answers=answers, signer=signer)
                   for _ in persons]
        await wait_router_knows(s, clients[0], persons[-1])
        say(f"{len(persons)} hospitals driving stays; schedule of {cfg.kills} kill(s) per service, "
            f"{cfg.broker_kills if s.kafka_brokers > 1 else 0} broker kill(s), {cfg.db_restarts} database restart(s), "
            f"at most {cfg.seconds:.0f} s")
        t0 = time.monotonic()
        load = [asyncio.create_task(hospital(c, p, stop, report.stays, report)) for c, p in zip(clients, persons,
                                                                                                strict=True)]
        await asyncio.sleep(cfg.interval)
        broker_kills = 0
        for target in schedule(cfg, s.kafka_brokers):
            if time.monotonic() - t0 > cfg.seconds:
                say("time bound reached: ending the schedule early")
                break
            event = await inflict(s, target, broker_kills, cfg)
            broker_kills += target == "broker"
            report.events.append(event)
            say(f"{len(report.events):3}: {target} {event.detail} (back after {time.monotonic() - event.at:.1f} s)")
            await revive(s, report)
            await asyncio.sleep(cfg.interval * rng.uniform(0.7, 1.3))
        stop.set()
        say("schedule done: waiting for every hospital to finish its stay")
        await asyncio.wait_for(asyncio.gather(*load), timeout=cfg.retry_for_s * 6 + 60)
        end = time.monotonic()
        report.run_s = end - t0
        report.requests = sum(c.requests for c in clients)
        report.resends = sum(c.retries for c in clients)
    measure_stalls(report.events, answers, end)
    pool = await asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=2)
    shards = await ShardPools.connect(s, 2)
    try:
        if not await wait_clearing(pool, shards, [p.psn_no for p in persons]):
            report.behind = clearing_lag(s)
        await check(pool, shards, persons, report)
    finally:
        await shards.close()
        await pool.close()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=(__doc__ or "").split("\n")[0])
    d = Config()
    parser.add_argument("--kills", type=int, default=d.kills, help="kill -9 of each service (default %(default)s)")
    parser.add_argument("--broker-kills", type=int, default=d.broker_kills, help="in a --brokers 3 stack")
    parser.add_argument("--db-restarts", type=int, default=d.db_restarts)
    parser.add_argument("--seconds", type=float, default=d.seconds, help="bound of the schedule")
    parser.add_argument("--interval", type=float, default=d.interval, help="seconds between events (±30%%)")
    parser.add_argument("--persons", type=int, default=d.persons, help="hospitals driving stays at once")
    parser.add_argument("--broker-down", type=float, default=d.broker_down_s, help="seconds a killed broker stays down")
    parser.add_argument("--services", nargs="+", default=list(d.services), choices=SERVICES)
    args = parser.parse_args(argv)
    if not 1 <= args.persons <= 200 or args.kills > 100 or args.seconds > 3600:
        parser.error("bounded runs only: --persons 1..200, --kills ≤ 100, --seconds ≤ 3600")
    cfg = Config(kills=args.kills, broker_kills=args.broker_kills, db_restarts=args.db_restarts,
                 seconds=args.seconds, interval=args.interval, persons=args.persons, broker_down_s=args.broker_down,
                 services=tuple(args.services))
    s = load_settings()
    report = asyncio.run(run_chaos(s, cfg))
    for line in report.lines():
        say(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
