"""The stage profiles' reading of py-spy's output and the ptrace rules (loadtest/profile.py)."""

from __future__ import annotations

from loadtest.profile import (
    StageSummary,
    frame_package,
    parse_folded,
    ptrace_obstacle,
    recorder_outcome,
    stage_lines,
    summarize,
)

LOOP = ("<module> (services/router/__main__.py:1);run_service (services/common/lifecycle.py:39);"
        "BaseEventLoop._run_once (asyncio/base_events.py:1845)")
ROUTE = "BatchConsumer.run (services/common/consumer.py:264);_enrich_fees (services/router/logic.py:263)"
FOLDED = "\n".join([
    f"{LOOP} 40",
    f"{LOOP};EpollSelector.select (selectors.py:451) 10",
    f"{LOOP};{ROUTE} 30",
    f"{LOOP};{ROUTE};Decoder.decode (msgspec/json.py:1) 15",
    f"thread (0x7F01);{LOOP};{ROUTE} 5",
    "Connection.execute (asyncpg/connection.py:320) 2",  # a partial stack (the sampler did not pause)
    "",
    "garbage without a count",
    "frame (x.py:1) notanumber",
])


def test_parse_folded_counts_stacks_and_drops_thread_frames() -> None:
    stacks = parse_folded(FOLDED)
    assert sum(stacks.values()) == 102
    assert len(stacks) == 5  # the thread-prefixed stack joins its twin
    assert stacks[(*LOOP.split(";"), *ROUTE.split(";"))] == 35
    assert stacks[("Connection.execute (asyncpg/connection.py:320)",)] == 2


def test_frame_package() -> None:
    assert frame_package("EpollSelector.select (selectors.py:451)") == "selectors"
    assert frame_package("Decoder.decode (msgspec/json.py:1)") == "msgspec"
    assert frame_package("_enrich_fees (services/router/logic.py:263)") == "services"
    assert frame_package("_run_code (<frozen runpy>:65)") == "<frozen runpy>"
    assert frame_package("no file at all") == "?"


def test_summary_own_packages_and_innermost_project_function() -> None:
    summary = summarize(parse_folded(FOLDED), top=3)
    assert summary.samples == 102
    assert summary.own == [
        ("BaseEventLoop._run_once (asyncio/base_events.py:1845)", 40),
        ("_enrich_fees (services/router/logic.py:263)", 35),
        ("Decoder.decode (msgspec/json.py:1)", 15),
    ]
    assert summary.packages == [("asyncio", 40), ("services", 35), ("msgspec", 15)]
    # the decode under _enrich_fees is _enrich_fees's; the loop's own time stays with run_service
    assert summary.project == [("run_service (services/common/lifecycle.py:39)", 50),
                               ("_enrich_fees (services/router/logic.py:263)", 50)]


def test_stage_lines() -> None:
    summary = StageSummary(200, [("f (services/a.py:1)", 150), ("g (asyncio/b.py:2)", 50)],
                           [("services", 150), ("asyncio", 50)], [("f (services/a.py:1)", 150)])
    lines = stage_lines("router", 4242, summary, 10.0, 2.5, 3, "router.folded", gil_rate_hz=100)
    assert lines[0] == ("  router (pid 4242): 200 samples (GIL held ≈ 20% of the time), CPU 2.50 s (25% of a core), "
                        "3 sampling errors — router.folded")
    assert lines[2] == "       75.0%  f (services/a.py:1)"
    assert lines[4] == "    own samples by package: services 75.0%, asyncio 25.0%"
    assert lines[-1] == "       75.0%  f (services/a.py:1)"
    empty = stage_lines("monitor", 7, StageSummary(0, [], [], []), 10.0, None, None, "monitor.folded")
    assert empty == ["  monitor (pid 7): 0 samples — monitor.folded", "    no samples (idle during the profile?)"]


def test_recorder_outcome() -> None:
    done = ("py-spy> Sampling process 100 times a second for 2 seconds. Press Control-C to exit.\n\n"
            "py-spy> Wrote raw flamegraph data to 'router.folded'. Samples: 796 Errors: 3\n")
    assert recorder_outcome(done) == (796, 3, None)
    failed = ("Error: Failed to get process executable name. Check that the process is running.\n\nCaused by:\n"
              "    0: No such file or directory (os error 2)\n")
    assert recorder_outcome(failed) == (
        None, None, "Error: Failed to get process executable name. Check that the process is running.")


def test_ptrace_rules() -> None:
    def why(**kw: object) -> str | None:
        facts: dict[str, object] = {"has_capability": False, "target_uid": 1000, "own_uid": 1000,
                                    "yama_scope": 1, "is_descendant": False}
        return ptrace_obstacle(**{**facts, **kw})  # type: ignore[arg-type]

    assert why(has_capability=True, target_uid=0, yama_scope=3) is None
    assert why(yama_scope=None) is None
    assert why(yama_scope=0) is None
    assert why(is_descendant=True) is None
    assert "only to its own descendants" in (why() or "")
    assert "ptrace_scope=2" in (why(yama_scope=2, is_descendant=True) or "")
    assert "ptrace_scope=3" in (why(yama_scope=3) or "")
    assert why(target_uid=0) == ("it runs as uid 0, this profiler as uid 1000: attaching needs the same user or "
                                 "CAP_SYS_PTRACE (run as root)")
    assert why(target_uid=None) == "the process is gone"

