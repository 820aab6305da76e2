"""How fast the monitoring stream's person agent applies settlement events (README "Smart monitoring").

    .venv/bin/python -m loadtest.smartmon_rate [--persons 1000] [--per-person 5]

Writes persons × per-person settlement events with visit facts (an inpatient stay, then outpatient visits
at another hospital, some during the stay: every person gets judgements; the stays spread over 100 cost
groups, ~10 stays each per 1000 persons) straight into fsi.settlements, as
`admin`, and reads smartmon's own counter (xs_smartmon_events_total on its metrics port) until the agent
has applied them all; prints events/s from the first write to the last event applied. smartmon must run
(`python -m deploy.stack start`). Bounded: at most 20,000 events, at most 300 s.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from schemas.internal import SettlementEvent
from schemas.monitoring import VisitFacts
from services.common.config import Settings, load_settings
from services.common.kafka import ADMIN, make_producer
from topics.catalog import SETTLEMENTS

MAX_EVENTS = 20_000
TIMEOUT_S = 300.0
_encoder = msgspec.json.Encoder(decimal_format="number")


def applied(s: Settings) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.smartmon_metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(x.value for f in text_string_to_metric_families(text) for x in f.samples
               if x.name == "xs_smartmon_events_total" and x.labels.get("agent") == "persons")


def events(run: str, persons: int, per_person: int) -> list[SettlementEvent]:
    out = []
    for p in range(persons):
        psn = f"rate{run}{p:05d}"
        for k in range(per_person):
            inpatient = k == 0
            day = 1 + k
            begin, end = ("2026-03-01 09:00:00", "2026-03-09 10:00:00") if inpatient else (
                f"2026-03-{day:02d} 14:00:00", f"2026-03-{day:02d} 15:00:00")
            setl_id = f"rate{run}-{p}-{k}"
            out.append(SettlementEvent(
                setl_id=setl_id, kind="settle", orig_setl_id=None, msgid=f"m-{setl_id}", mdtrt_id=f"v-{setl_id}",
                psn_no=psn, fixmedins_code="H32050000001" if inpatient else "H32050000002", insutype="310",
                med_type="21" if inpatient else "11", scope="intra_province", filing_type=None,
                insured_admdvs="320100", treating_admdvs="320500", setl_time=end, medfee_sumamt=10_000,
                hifp_pay=5_000, hifmi_pay=0, hifob_pay=0, maf_pay=0, fund_pay_sumamt=5_000, acct_pay=0,
                psn_cash_pay=5_000,
                visit=VisitFacts(visit_type="inpatient" if inpatient else "outpatient", gend="1", begntime=begin,
                                 endtime=end, main_dise=f"J{p % 100:02d}.900", hosp_lv=3, treating_prov="320000")))
    return out


async def measure(s: Settings, persons: int, per_person: int) -> None:
    batch = events(str(time.time_ns() % 10**6), persons, per_person)
    if len(batch) > MAX_EVENTS:
        raise SystemExit(f"at most {MAX_EVENTS} events")
    start_count = applied(s)
    producer = make_producer(s, ADMIN, linger_ms=5)
    await producer.start()
    started = time.monotonic()
    try:
        futures = [await producer.send(SETTLEMENTS.name, _encoder.encode(ev), key=ev.psn_no.encode()) for ev in batch]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    written = time.monotonic() - started
    while applied(s) - start_count < len(batch):
        if time.monotonic() - started > TIMEOUT_S:
            raise SystemExit(f"smartmon applied {applied(s) - start_count:.0f} of {len(batch)} in {TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.2)
    took = time.monotonic() - started
    print(f"{len(batch)} events ({persons} persons × {per_person}) written in {written:.1f} s, "
          f"applied by smartmon in {took:.1f} s: {len(batch) / took:.0f} events/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=1000)
    parser.add_argument("--per-person", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(measure(load_settings(), args.persons, args.per_person))


if __name__ == "__main__":
    main()
