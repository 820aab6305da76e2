"""The watchdogs' pure part (when a group counts as stuck) and the loop watchdog in a real process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

from services.common.watchdog import Progress, task_stacks

A, B = ("t", 0), ("t", 1)


def test_a_partition_is_stalled_only_after_stall_s_behind_the_same_committed_offset() -> None:
    p = Progress(stall_s=30)
    assert p.update({A: 5}, {}, {A: 9}, now=100) == []
    assert p.update({A: 5}, {}, {A: 12}, now=129) == []  # records keep coming: still the first 29 s
    assert p.update({A: 5}, {}, {A: 12}, now=130) == [A]


def test_progress_or_catching_up_restarts_the_clock() -> None:
    p = Progress(stall_s=30)
    p.update({A: 5, B: 7}, {}, {A: 9, B: 7}, now=0)  # B caught up
    assert p.update({A: 6, B: 7}, {}, {A: 9, B: 8}, now=20) == []  # A moved; B got a record since
    assert p.update({A: 6, B: 7}, {}, {A: 9, B: 8}, now=29) == []
    # B's clock runs from the last look that found it caught up (0): the record came after that look.
    assert p.update({A: 6, B: 7}, {}, {A: 9, B: 8}, now=30) == [B]
    assert p.update({A: 6, B: 7}, {}, {A: 9, B: 8}, now=50) == [A, B]


def test_a_partition_never_committed_counts_from_its_log_start() -> None:
    p = Progress(stall_s=10)
    p.update({A: -1}, {A: 4}, {A: 4}, now=0)  # empty since its start: nothing waits
    assert p.update({}, {A: 4}, {A: 4}, now=20) == []
    p.update({}, {A: 4}, {A: 6}, now=20)
    assert p.update({}, {A: 4}, {A: 6}, now=30) == [A]


def test_waiting_on_purpose_restarts_every_clock() -> None:
    p = Progress(stall_s=10)
    p.update({A: 1}, {}, {A: 5}, now=0)
    p.restart_clock(now=9)
    assert p.update({A: 1}, {}, {A: 5}, now=18) == []
    assert p.update({A: 1}, {}, {A: 5}, now=19) == [A]


def test_a_blocked_event_loop_ends_its_process_with_every_stack_in_the_log() -> None:
    script = textwrap.dedent("""
        import asyncio, time
        from services.common.watchdog import loop_watchdog

        def block_the_loop():
            time.sleep(30)

        async def main():
            stop = asyncio.Event()
            asyncio.create_task(loop_watchdog(stop, timeout_s=1.0, rearm_s=0.1))
            await asyncio.sleep(0.5)  # the loop runs: re-armed several times, nothing happens
            print("alive", flush=True)
            block_the_loop()

        asyncio.run(main())
    """)
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=25)
    assert time.monotonic() - started < 20
    assert res.returncode != 0
    assert res.stdout == "alive\n"
    assert "Timeout" in res.stderr and "block_the_loop" in res.stderr, res.stderr


def test_a_loop_that_runs_is_left_alone_and_the_timer_is_cancelled_at_stop() -> None:
    script = textwrap.dedent("""
        import asyncio, time
        from services.common.watchdog import loop_watchdog

        async def main():
            stop = asyncio.Event()
            task = asyncio.create_task(loop_watchdog(stop, timeout_s=1.0, rearm_s=0.1))
            await asyncio.sleep(2.5)  # longer than the timeout, but the loop keeps re-arming it
            stop.set()
            await task
            time.sleep(1.5)  # after stop the timer is gone: a blocking exit path is not killed

        asyncio.run(main())
        print("clean", flush=True)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=25)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "clean\n"


async def test_task_stacks_say_where_each_task_waits() -> None:
    gate = asyncio.Event()

    async def waits_for_an_answer() -> None:
        await gate.wait()

    task = asyncio.create_task(waits_for_an_answer(), name="answer-waiter")
    await asyncio.sleep(0)
    lines = [line for line in task_stacks() if line.startswith("task answer-waiter:")]
    gate.set()
    await task
    assert len(lines) == 1 and "waits_for_an_answer (test_watchdog.py:" in lines[0], lines
