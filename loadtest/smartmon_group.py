"""What one stay event costs smartmon's cost agent, by the size of its cost group (in-process, no stack).

    .venv/bin/python -m loadtest.smartmon_group [--sizes 50,500,2000] [--events 50]

Per event the agent decodes the group's whole state from its table, applies the stay (`apply_stay`, then
`cap_stays`) and encodes the whole state again for the table's changelog, as `services/smartmon/stream.py`
does. Prints the state's size and the CPU per event, and the decoding and encoding alone.
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import date, timedelta

from schemas.monitoring import StayCost
from services.smartmon.rulebook import load_rules
from services.smartmon.state import CostGroupState, apply_stay, cap_stays, decode_group, encode

GROUP = "I21|3|11"
FIRST_DAY = date(2026, 11, 1)  # fixed dates: the run does not depend on today
WINDOW_DAYS = 30


def _stay(mdtrt_id: str, day: date, medfee: int) -> StayCost:
    # ids as long as the pipeline's (a stay's state is mostly its ids)
    return StayCost(group=GROUP, mdtrt_id=mdtrt_id, psn_no="P" + mdtrt_id[1:], setl_ids=["S" + mdtrt_id[1:]],
                    fixmedins_code="H11010500001", insured_admdvs="110105", treating_admdvs="110105",
                    dscg_day=day.isoformat(), medfee=medfee)


def group_of(size: int, rnd: random.Random) -> bytes:
    """An encoded group of `size` stays spread over the window."""
    state = CostGroupState()
    for i in range(size):
        stay = _stay(f"M{i:032d}", FIRST_DAY + timedelta(days=i * WINDOW_DAYS // size), rnd.randint(100_000, 5_000_000))
        state.stays[stay.mdtrt_id] = stay
    return encode(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50,500,2000", help="group sizes in stays (default 50,500,2000)")
    ap.add_argument("--events", type=int, default=50, help="stay events per size (default 50)")
    args = ap.parse_args()
    book = load_rules()
    rnd = random.Random(7)
    print(f"cost agent, one stay event: decode the group, apply, cap, encode ({args.events} events per size)")
    for size in (int(v) for v in args.sizes.split(",")):
        raw = group_of(size, rnd)
        day = FIRST_DAY + timedelta(days=WINDOW_DAYS)
        started = time.process_time()
        for i in range(args.events):
            state = decode_group(raw)
            apply_stay(state, _stay(f"N{i:032d}", day, 3_000_000), book)
            cap_stays(state)
            encode(state)
        per_event = (time.process_time() - started) / args.events
        started = time.process_time()
        for _ in range(args.events):
            encode(decode_group(raw))
        codec = (time.process_time() - started) / args.events
        print(f"  {size:5} stays: state {len(raw) / 1024:6.0f} KB, {1000 * per_event:6.2f} ms of CPU per event "
              f"({1000 * codec:.2f} ms decoding and encoding)", flush=True)


if __name__ == "__main__":
    main()
