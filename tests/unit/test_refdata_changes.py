"""The loader's pure rules: change computation, precedence, change-log order, chunks, progress."""

from __future__ import annotations

import pytest

from services.refdata.changes import (
    change_log,
    chunks,
    diff_rows,
    effective_chronic,
    progress_line,
    remaining_steps,
)


def test_diff_inserts_updates_and_unchanged() -> None:
    current = {"H1": ("A", 3), "H2": ("B", 2), "H3": ("C", 1)}
    incoming = [("H1", ("A", 3)), ("H2", ("B2", 2)), ("H4", ("D", 1))]
    d = diff_rows(current, incoming)
    assert d.inserts == [("H4", ("D", 1))]
    assert d.updates == [("H2", ("B2", 2))]
    assert d.unchanged == 1
    assert d.changed == 2
    assert d.changed_keys() == ["H4", "H2"]


def test_diff_never_deletes_and_is_empty_the_second_time() -> None:
    current = {"H1": ("A",), "H9": ("Z",)}
    d = diff_rows(current, [("H1", ("A",))])
    assert (d.inserts, d.updates, d.unchanged) == ([], [], 1)  # H9, absent from the file, is kept
    applied = {**current, **dict(diff_rows(current, [("H1", ("X",))]).updates)}
    assert diff_rows(applied, [("H1", ("X",))]).changed == 0


def test_diff_insert_only_keeps_existing_rows() -> None:
    # Filings: an existing one (maybe revoked online) is never changed by a file.
    d = diff_rows({"rd-1": ("revoked",)}, [("rd-1", ("in force",)), ("rd-2", ("in force",))], update=False)
    assert d.inserts == [("rd-2", ("in force",))]
    assert d.updates == [] and d.unchanged == 1


def test_diff_compares_exact_values() -> None:
    from decimal import Decimal

    # numeric(5,4) comes back as 0.1000: equal to the file's 0.10; one fen more is a change.
    assert diff_rows({"X": (Decimal("0.1000"), 6000)}, [("X", (Decimal("0.10"), 6000))]).changed == 0
    assert diff_rows({"X": (Decimal("0.1000"), 6000)}, [("X", (Decimal("0.10"), 6001))]).changed == 1


@pytest.mark.parametrize(
    ("file", "online", "effective"),
    [
        (["HTN"], {}, ["HTN"]),
        ([], {"DM": True}, ["DM"]),  # granted online (2503), not in the file
        (["HTN", "DM"], {"DM": False}, ["HTN"]),  # withdrawn online (2504): the file does not bring it back
        (["HTN"], {"HTN": True}, ["HTN"]),
        (["CANCER_TX"], {"HTN": False, "DM": True}, ["CANCER_TX", "DM"]),
        (["DM", "HTN"], {}, ["DM", "HTN"]),
    ],
)
def test_online_changes_win_over_the_file(file: list[str], online: dict[str, bool], effective: list[str]) -> None:
    assert effective_chronic(file, online) == effective


def test_a_new_file_changes_only_diseases_not_changed_online() -> None:
    online = {"DM": False}
    assert effective_chronic(["DM"], online) == []
    assert effective_chronic(["DM", "HTN"], online) == ["HTN"]  # next file adds HTN: it counts
    assert effective_chronic([], online) == []


def test_change_log_order_is_fixed() -> None:
    rows = change_log({"catalog_item": ["510000:X2", "150000:X1"], "hospital": ["H2", "H1"], "region": ["510421"]})
    assert rows == [("region", "510421"), ("hospital", "H1"), ("hospital", "H2"),
                    ("catalog_item", "150000:X1"), ("catalog_item", "510000:X2")]
    assert change_log({"hospital": []}) == []
    with pytest.raises(ValueError, match="person"):
        change_log({"person": ["P1"]})


def test_chunks_cover_every_line_once() -> None:
    assert chunks(1, 10, 4) == [(1, 5), (5, 9), (9, 11)]
    assert chunks(1, 4, 4) == [(1, 5)]
    assert chunks(1, 0, 4) == []
    covered = [line for a, b in chunks(1, 2_500, 1_000) for line in range(a, b)]
    assert covered == list(range(1, 2_501))
    with pytest.raises(ValueError):
        chunks(1, 10, 0)


def test_remaining_steps_keep_plan_order() -> None:
    plan = ["hub", "person:s1:1", "person:s1:1001", "person:s2:1", "person_index:1"]
    assert remaining_steps(plan, {"hub", "person:s1:1"}) == ["person:s1:1001", "person:s2:1", "person_index:1"]
    assert remaining_steps(plan, plan) == []
    assert remaining_steps(plan, ["other"]) == plan


def test_progress_line() -> None:
    assert progress_line("persons.jsonl", 1_200_000, 25, 100, 12.0) == (
        "persons.jsonl: 1,200,000 rows, 100,000 rows/s, 25.0%, ETA 0m36s")
    assert progress_line("merge", 10, 3, 3, 2.0) == "merge: 10 rows, 5 rows/s, 100.0%, ETA 0m00s"
    assert progress_line("x", 0, 0, 10, 0.0) == "x: 0 rows, 0 rows/s, 0.0%, ETA 0m00s"
    assert progress_line("x", 5, 1, 10, 400.0).endswith("ETA 1h00m")
