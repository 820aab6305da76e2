"""The demo: a day of hospitals and pharmacies through the HTTP gateway, live.

    python -m loadtest.demo [--seconds 60] [--concurrency 16] [--seed 7] [--max-stays 3000]

1. Makes sure the reference data is generated (`.state/refdata/`) and loaded
   (idempotent, fast when already done), and that the pipeline answers.
2. Runs `--concurrency` visits at once, each sequential: general outpatient (most:
   2201 → 2204 → 2206 → 2207), chronic outpatient (2201 → 2203 med_type 14 → …),
   inpatient stays (2401 → 2301 → 2402 → 2303 → 2304) and pharmacy purchases
   (2101 → 2102); ~10% reversed (2208 / 2305 / 2103), half of those settled again.
   Hospitals, pharmacies and persons of the five seed regions (赤峰 150400, 开州 500154, 米易 510421,
   莆田 350300, 太原 140100): care local, in another region of the same province,
   and in other provinces; most non-local persons are filed or use the promise
   flag, a few are unfiled and are refused (FILING_REQUIRED) — as expected.
3. Stops after `--seconds` or `--max-stays` stays, whichever comes first, lets the
   stays in flight finish (at most `--drain-seconds`), prints a summary and
   cross-checks it against the PostgreSQL ledger.
4. Smart monitoring: `--suspicious-share` (1 %) of the persons each show one rule's
   suspicious behaviour the first time they are picked (overlapping stays at two
   hospitals, a readmission within 15 days, an outpatient visit or purchase during a
   stay elsewhere, 10 outpatient visits in 5 days, 100 days of one drug in 8 days, a
   once-a-day item twice a day, a gender-restricted item on the other gender, a very
   expensive stay in a group of ordinary ones): extra visits dated in the past days.
   At the end the hits by rule — seeded behaviours against the judgements the stream
   wrote to the hub table `judgement` (waiting up to `--judgement-wait-seconds` for it
   to catch up) — and where the dashboard's Judgements page is.

A progress line every second. Exit status: 0 ok; 1 unexpected error answers or the
ledger disagrees with what the demo saw; 2 the pipeline is unreachable.
No personal identifiers are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import msgspec

from loadtest.his import GatewayClient
from loadtest.population import (
    DEFAULT_PERSONS_PER_REGION,
    DEFAULT_SEED,
    SCOPES,
    SETTLE_INFNOS,
    SUSPICIOUS_RULES,
    SUSPICIOUS_SHARE,
    PipelineUnavailable,
    Population,
    Stats,
    TransportError,
    drive_stay,
    ensure_refdata,
    load_population,
    percentile,
    population_signer,
    wait_ready,
)
from services.common import audit
from services.common.config import PG_PASSFILE, Settings, load_settings
from services.common.shards import shard_database, shard_dsns, shard_map
from services.common.tls import ca_paths, client_session
from services.dashboard.users import admin_password_file

INFNO_NAMES = {
    "2401": "admission", "2301": "fee upload", "2402": "discharge", "2303": "pre-settlement",
    "2304": "settlement", "2305": "reversal",
    "2201": "registration", "2203": "visit info", "2204": "fee upload", "2206": "pre-settlement",
    "2207": "settlement", "2208": "reversal", "2101": "pre-settlement", "2102": "settlement", "2103": "reversal",
    "2601": "correction", "5203": "settlement query", "1101": "person info",
}
KINDS = ("outpatient", "chronic", "inpatient", "pharmacy")
JUDGEMENTS_STEADY_S = 4.0  # the judgement counts unchanged this long: the stream has caught up


class HttpCaller:
    """loadtest.his.GatewayClient, with transport failures as TransportError and a time limit."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout_s: float) -> None:
        self.client = GatewayClient(url, session)
        self.url = url
        self.timeout_s = timeout_s
        self.sent: set[str] = set()  # every msgid sent, answered or not: the ledger cross-check's key

    async def call(self, envelope: dict[str, Any]) -> dict[str, Any]:
        self.sent.add(envelope["msgid"])
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.client.call(envelope)
        except aiohttp.ClientError as e:
            raise TransportError(f"gateway {self.url}: {type(e).__name__}: {e}") from None
        except (msgspec.DecodeError, RuntimeError) as e:
            raise TransportError(f"gateway {self.url} answered something that is not an envelope: {e}") from None


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.0f}"  # nan → "-"


def _yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def progress_line(stats: Stats, elapsed: float) -> str:
    settle = [x for i in SETTLE_INFNOS for x in stats.latencies.get(i, [])]
    scopes = " ".join(f"{s.split('_')[0]} {stats.settled_by_scope[s]}" for s in SCOPES)
    errors = stats.errors()
    refused = sum(stats.expected_refusals.values())
    err = " ".join(f"{code}:{n}" for code, n in errors.most_common(4)) or "none"
    return (
        f"{elapsed:5.0f}s  settled {stats.settled:6d} ({stats.rate_in_window(stats.settled_at, 1.0):5.1f}/s)  "
        f"p50 {_ms(percentile(settle, 50)):>4} ms p99 {_ms(percentile(settle, 99)):>5} ms  "
        f"[{scopes}]  reversed {stats.reversed}  refused {refused}  errors {err}  in flight {stats.in_flight}"
    )


async def ledger_rows(
    s: Settings, msgids: list[str], since: datetime, until: datetime, psn_nos: list[str]
) -> tuple[list[asyncpg.Record], int]:
    """The ledger rows created by the requests this demo sent (settlement.msgid is the request's
    msgid), and how many other rows other clients committed for this dataset's persons meanwhile;
    from every shard (each holds its persons' ledger and processed requests)."""
    ours: list[asyncpg.Record] = []
    others = 0
    for dsn in shard_dsns(s).values():
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            ours += await conn.fetch(
                "SELECT setl_id, kind, fund_pay_sumamt, policy_version FROM settlement WHERE msgid = ANY($1)", msgids
            )
            others += await conn.fetchval(
                "SELECT count(*) FROM settlement s JOIN processed_request p ON p.msgid = s.msgid"
                " WHERE p.processed_at >= $1 AND p.processed_at <= $2 AND s.psn_no = ANY($3)"
                " AND NOT s.msgid = ANY($4)",
                since, until, psn_nos, msgids,
            )
        finally:
            await conn.close()
    return ours, others


async def db_now(s: Settings) -> datetime:
    conn = await asyncpg.connect(s.pg_dsn, timeout=5)
    try:
        now: datetime = await conn.fetchval("SELECT clock_timestamp()")
        return now
    finally:
        await conn.close()


def cross_check(stats: Stats, rows: Sequence[Any]) -> tuple[bool, list[str]]:
    ledger: dict[str, dict[str, int]] = {"settle": {}, "reverse": {}}
    for r in rows:
        ledger[r["kind"]][r["setl_id"]] = r["fund_pay_sumamt"]
    seen = {"settle": stats.settle_ids, "reverse": stats.reverse_ids}
    lines = [f"    {'kind':8} {'demo saw':>8} {'fund (yuan)':>16}   {'ledger':>8} {'fund (yuan)':>16}"]
    ok = True
    for kind in ("settle", "reverse"):
        mine, theirs = seen[kind], ledger[kind]
        agree = mine == theirs
        ok &= agree
        lines.append(
            f"    {kind:8} {len(mine):8d} {_yuan(sum(mine.values())):>16}   {len(theirs):8d} "
            f"{_yuan(sum(theirs.values())):>16}   {'agree' if agree else 'DIFFER'}"
        )
        if not agree:
            only_ledger = len(theirs.keys() - mine.keys())
            only_demo = len(mine.keys() - theirs.keys())
            amounts = sum(1 for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
            lines.append(f"      {only_ledger} only in the ledger, {only_demo} only in the demo, "
                         f"{amounts} with different fund amounts")
    return ok, lines


def policy_versions_line(rows: Sequence[Any]) -> str:
    """Which insured-region policy versions the run's settlements used (README "Policy versions")."""
    used = Counter(r["policy_version"] for r in rows if r["kind"] == "settle")
    return "policy versions used by the settlements: " + ", ".join(f"{v} {n}" for v, n in sorted(used.items())) + (
        "  (later versions: python -m services.policy list)")


def summary(stats: Stats, run_s: float, drain_s: float, args: argparse.Namespace) -> list[str]:
    out = ["", "== summary ==",
           f"ran {run_s:.1f} s (+ {drain_s:.1f} s for the stays in flight), concurrency {args.concurrency}, "
           f"seed {args.seed}"]
    o = stats.stay_outcomes
    out.append(f"visits: {stats.stays_started} started — {o['done']} complete, {o['refused']} refused as expected "
               f"(unfiled non-local persons), {o['failed']} failed, {o['cut']} cut at the end")
    out.append(f"settlements (2207/2304/2102): {stats.settled}  = {stats.settled / run_s:.1f}/s; "
               f"reversals (2208/2305/2103, or 2601 correcting the settlement): {stats.reversed}; "
               f"{stats.resettled} visits settled again")
    out.append("  settlements by visit type: " + "   ".join(f"{k} {stats.settled_by_kind[k]}" for k in KINDS))
    out.append("  settlements by scope: " + "   ".join(f"{s} {stats.settled_by_scope[s]}" for s in SCOPES)
               + "   (visits started: " + ", ".join(f"{s} {stats.started_by_scope[s]}" for s in SCOPES) + ")")
    settled_fund = sum(stats.settle_ids.values())
    reversed_fund = sum(stats.reverse_ids.values())
    out.append(f"  medical fees settled {_yuan(stats.settle_medfee_fen)} yuan; funds paid {_yuan(settled_fund)}, "
               f"reversed {_yuan(reversed_fund)}, net {_yuan(settled_fund + reversed_fund)} yuan")
    out.append(f"requests: {stats.requests()} answered = {stats.requests() / run_s:.1f}/s; same msgid resent "
               f"after a TIMEOUT: {stats.resends}, after a failed delivery: {stats.transport_retries}")
    out.append(f"  {'latency ms':22} {'count':>7} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
    rows = [(f"{i} {INFNO_NAMES.get(i, '')}", v) for i, v in sorted(stats.latencies.items())]
    rows.append(("all requests", stats.all_latencies()))
    for name, values in rows:
        out.append(f"  {name:22} {len(values):7d} {_ms(percentile(values, 50)):>6} {_ms(percentile(values, 90)):>6} "
                   f"{_ms(percentile(values, 99)):>6} {_ms(max(values) if values else float('nan')):>6}")
    codes: Counter[str] = Counter()
    for (_, code), n in stats.outcomes.items():
        if code != "ok":
            codes[code] += n
    if codes:
        out.append("error answers by code:")
        for code, n in codes.most_common():
            expected = stats.expected_refusals[code]
            note = f"  ({expected} expected: unfiled non-local persons)" if expected else ""
            out.append(f"  {code:24} {n:6d}{note}")
    else:
        out.append("error answers: none")
    return out


def how_to_look(s: Settings) -> list[str]:
    q = ("SELECT scope, kind, count(*), sum(fund_pay_sumamt)/100.0 AS fund_yuan FROM settlement "
         "GROUP BY 1, 2 ORDER BY 1, 2")
    return [
        "",
        "how to look further:",
        "  .venv/bin/python -m deploy.stack status                 # processes, ports, logs",
        *(f"  PGPASSFILE={s.state_dir / PG_PASSFILE} psql -h 127.0.0.1 -p {s.pg_port} -U {s.pg_user}"
          f" {shard_database(s, name)} -c '{q}'   # shard {name}"
          for name in shard_map(s).names),
        f"  curl -s http://127.0.0.1:{s.gateway_metrics_port}/metrics | grep ^xs_   # gateway "
        f"(settlement stage :{s.settle_metrics_port})",
        f"  dashboard: {s.dashboard_url} — sign in as admin, password in {admin_password_file(s)}",
        f"  curl --cacert {ca_paths(s).cert} {s.gateway_url.split('/fsi/')[0]}/health/ready   # TLS with the local CA",
        "  .venv/bin/python -m deploy.stack stop                   # stop everything",
    ]


async def judgement_counts(s: Settings, since: datetime, seeded_persons: dict[str, str]
                           ) -> tuple[Counter[str], Counter[str], int]:
    """Judgements detected since `since` (hub table `judgement`, written by the clearing service from the
    monitoring stream): (not withdrawn, by rule), (of those, the ones of a person seeded with that very
    rule, by rule), withdrawn. psn_no is compared here and never printed."""
    conn = await asyncpg.connect(s.pg_dsn, timeout=5)
    try:
        rows = await conn.fetch("SELECT rule_id, psn_no, status FROM judgement WHERE detected_at >= $1", since)
    finally:
        await conn.close()
    found: Counter[str] = Counter()
    seeded: Counter[str] = Counter()
    withdrawn = 0
    for r in rows:
        if r["status"] == "withdrawn":
            withdrawn += 1
            continue
        found[r["rule_id"]] += 1
        if seeded_persons.get(r["psn_no"]) == r["rule_id"]:
            seeded[r["rule_id"]] += 1
    return found, seeded, withdrawn


async def judgement_report(s: Settings, pop: Population, stats: Stats, since: datetime,
                           wait_s: float) -> list[str]:
    """Hits by rule: the demo's seeded behaviours against the judgements the monitoring stream found,
    once the counts have stopped moving for a few seconds (or after `wait_s`)."""
    deadline = time.monotonic() + wait_s
    last: tuple[Counter[str], Counter[str], int] | None = None
    steady_since = time.monotonic()
    try:
        while True:
            counts = await judgement_counts(s, since, pop.seeded_persons)
            if counts != last:
                last, steady_since = counts, time.monotonic()
            if time.monotonic() >= deadline or time.monotonic() - steady_since >= JUDGEMENTS_STEADY_S:
                break
            await asyncio.sleep(1.0)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        return ["", f"smart monitoring: the judgements could not be read ({type(e).__name__})"]
    found, of_seeded, withdrawn = last
    out = ["", f"smart monitoring — hits by rule (judgements detected since the demo started, waited "
               f"{wait_s - max(0.0, deadline - time.monotonic()):.0f} s for the stream):",
           f"  {'rule':24} {'seeded':>7} {'visits':>9} {'hit (seeded)':>13} {'all hits':>9}"]
    for rule in SUSPICIOUS_RULES:
        visits = f"{stats.behaviour_visits[rule]}/{pop.planned_visits[rule]}"
        out.append(f"  {rule:24} {pop.seeded[rule]:7d} {visits:>9} {of_seeded[rule]:13d} {found[rule]:9d}")
    for rule in sorted(set(found) - set(SUSPICIOUS_RULES)):
        out.append(f"  {rule:24} {'-':>7} {'-':>9} {'-':>13} {found[rule]:9d}")
    out.append("  seeded: persons who showed the behaviour (at most once per person and run; COST_OUTLIER: one per "
               f"{pop.cost_group_stays} ordinary stays the demo adds to a cost group); visits: their extra visits "
               "done / planned (none starts once the run's time is up); hit (seeded): judgements of that rule for "
               "those persons; all hits: every judgement of the run (chance adds some: a person picked twice for a "
               f"stay has two overlapping stays); {withdrawn} withdrawn (reversals)")
    if not found.total() and pop.seeded.total():
        out.append("  no judgements yet: is the monitoring stream running? "
                   "(.venv/bin/python -m deploy.stack status: program smartmon)")
    out.append(f"  review them on the dashboard's Judgements page: {s.dashboard_url.rstrip('/')}/judgements")
    return out


async def run(args: argparse.Namespace) -> int:
    s = load_settings()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they are printed
    print(f"xsettle demo: {args.seconds:g} s or {args.max_stays} stays, {args.concurrency} concurrent, "
          f"seed {args.seed}, gateway {s.gateway_url}")
    try:
        dataset, info = await ensure_refdata(s, seed=args.seed, persons_per_region=args.persons_per_region,
                                             operator=args.operator)
        pop = await load_population(s, dataset)
        pop.seed, pop.suspicious_share = args.seed, args.suspicious_share
    except PipelineUnavailable as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    print(f"reference data: {info['hospitals']} hospitals, {info['persons']} persons, {info['filings']} filings, "
          f"{info['catalog']} catalog items ({'generated, ' if info['generated'] else ''}"
          f"{info['changed_rows']} rows changed by the load, {info['seconds']:.1f} s) in {info['dir']}")
    pairs = ", ".join(f"{scope} {len(pop.pairs[scope])}" for scope in SCOPES)
    print(f"scenarios: {len(pop.hospitals)} hospitals × insured regions, pairs by scope: {pairs}")

    GatewayClient.default_signer = await population_signer(s, pop, operator="demo")
    # TLS with the deployment's CA; keep-alive connections, so a handshake per connection, not per request.
    async with client_session(s, limit=args.concurrency + 4) as session:
        caller = HttpCaller(s.gateway_url, session, timeout_s=s.gateway_timeout_ms / 1000 + 5)
        try:
            print(await wait_ready(caller, pop, timeout_s=30))
        except (TransportError, PipelineUnavailable) as e:
            print(f"demo: the pipeline is unreachable: {e}\n"
                  "demo: start the stack with '.venv/bin/python -m deploy.stack start' "
                  "(or ./demo.sh, which does it)", file=sys.stderr)
            return 2
        since = await db_now(s)
        stats = Stats()
        unreachable = await drive(caller, pop, stats, args)
        until = await db_now(s)
    run_s = min(stats.run_s, args.seconds) if stats.run_s else 0.0
    for line in summary(stats, max(run_s, 1e-9), stats.drain_s, args):
        print(line)
    rows, others = await ledger_rows(s, sorted(caller.sent), since, until, [p.psn_no for p in pop.persons])
    ok, lines = cross_check(stats, rows)
    print(f"cross-check with the PostgreSQL ledger (settlement rows written by the {len(caller.sent)} requests "
          "this demo sent, answered or not):")
    for line in lines:
        print(line)
    if others:
        print(f"  ({others} other settlement rows were committed for these persons during the run by other "
              "clients: not compared)")
    print(f"  → {'the ledger agrees with what the hospitals were told' if ok else 'MISMATCH (see above)'}")
    print(policy_versions_line(rows))
    if args.suspicious_share > 0:
        for line in await judgement_report(s, pop, stats, since, args.judgement_wait_seconds):
            print(line)
    for line in how_to_look(s):
        print(line)
    if unreachable:
        print(f"demo: the pipeline became unreachable during the run: {unreachable}", file=sys.stderr)
        return 2
    if not ok or stats.errors():
        return 1
    return 0


async def drive(caller: HttpCaller, pop: Population, stats: Stats, args: argparse.Namespace) -> str | None:
    """Run the stays; returns a message when the gateway became unreachable."""
    rng = random.Random(args.seed ^ time.time_ns())  # a new mix each run; --seed fixes the reference data
    stop = asyncio.Event()
    unreachable: list[str] = []
    launched = 0
    t0 = time.monotonic()
    stats.t0 = t0

    async def worker() -> None:
        nonlocal launched
        while not stop.is_set() and launched < args.max_stays:
            scn = pop.scenario(rng)
            if scn is None:
                await asyncio.sleep(0.01)
                continue
            launched += 1
            try:
                await drive_stay(caller, scn, stats, outage_s=args.outage_seconds, more=lambda: not stop.is_set())
            except TransportError as e:
                unreachable.append(str(e))
                stop.set()
            finally:
                pop.release(scn)

    tty = sys.stdout.isatty()

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            line = progress_line(stats, time.monotonic() - t0)
            print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", flush=True)

    reporter = asyncio.create_task(progress())
    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    all_done = asyncio.gather(*workers)
    await asyncio.wait({all_done}, timeout=args.seconds)
    stats.run_s = time.monotonic() - t0
    stop.set()  # no new stays; the ones in flight finish
    try:
        await asyncio.wait_for(all_done, timeout=args.drain_seconds)
    except TimeoutError:  # wait_for cancelled the workers
        print(f"\ndemo: stays still in flight after {args.drain_seconds:g} s were abandoned", file=sys.stderr)
    stats.drain_s = time.monotonic() - t0 - stats.run_s
    reporter.cancel()
    if tty:
        print()
    return unreachable[0] if unreachable else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60.0, help="run time (default 60)")
    p.add_argument("--operator", default=None, help="who the reference-data load is audited under "
                   "(default: $XS_OPERATOR, else loadtest.demo)")
    p.add_argument("--concurrency", type=int, default=16, help="stays in flight at once (default 16)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="reference-data seed (default 7)")
    p.add_argument("--max-stays", type=int, default=3000, help="stop after this many stays (default 3000)")
    p.add_argument("--drain-seconds", type=float, default=20.0,
                   help="time allowed for the stays in flight at the end (default 20)")
    p.add_argument("--outage-seconds", type=float, default=15.0,
                   help="how long a request is retried while the gateway does not accept it, e.g. during a "
                   "restart (default 15); then the demo stops with exit status 2")
    p.add_argument("--suspicious-share", type=float, default=SUSPICIOUS_SHARE,
                   help=f"share of the persons showing each rule's suspicious behaviour (default "
                   f"{SUSPICIOUS_SHARE:g}, at most {1 / len(SUSPICIOUS_RULES):g}; 0: none)")
    p.add_argument("--judgement-wait-seconds", type=float, default=20.0,
                   help="how long the end waits for the monitoring stream's judgements to settle (default 20)")
    p.add_argument("--persons-per-region", type=int, default=DEFAULT_PERSONS_PER_REGION,
                   help=f"reference-data size: persons per seed region (default {DEFAULT_PERSONS_PER_REGION})")
    args = p.parse_args(argv)
    # A development tool: its load is recorded under XS_OPERATOR if set, else under its own name.
    args.operator = audit.operator_or_exit(p, args.operator or os.environ.get(audit.OPERATOR_ENV) or "loadtest.demo")
    if args.seconds <= 0 or args.concurrency < 1 or args.max_stays < 1 or args.drain_seconds < 0:
        p.error("--seconds, --concurrency and --max-stays must be positive, --drain-seconds not negative")
    if not 0 <= args.suspicious_share <= 1 / len(SUSPICIOUS_RULES) or args.judgement_wait_seconds < 0:
        p.error(f"--suspicious-share must be within 0..{1 / len(SUSPICIOUS_RULES):g}, "
                "--judgement-wait-seconds not negative")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
