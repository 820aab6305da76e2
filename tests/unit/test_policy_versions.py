"""Policy versions by effective date (REFERENCE §10): the TOML shape, PolicyBook.for_region(on=), the
`python -m services.policy` CLI, and the deductible once per stay of mid-stay parts."""

from __future__ import annotations

import tomllib
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.policy.__main__ import main
from services.policy.logic import Accumulators, FeeItem, SettlementInput, compute_split
from services.policy.policies import DEFAULT_POLICY_PATH, DEFAULT_TABLE, PolicyBook, PolicyConfigError, deep_merge

D = Decimal
BOOK = PolicyBook.load()
CHANGE = date(2027, 1, 1)  # the shipped file's version of 150400


def _raw() -> dict[str, Any]:
    with DEFAULT_POLICY_PATH.open("rb") as f:
        return tomllib.load(f, parse_float=Decimal)


def _without_versions(raw: dict[str, Any]) -> dict[str, Any]:
    return {t: {k: v for k, v in table.items() if not k[:4].isdigit()} for t, table in raw.items()}


def _tables(book: PolicyBook) -> list[str]:
    return [DEFAULT_TABLE, *book.regions]


def _policy(book: PolicyBook, table: str, on: date | None = None) -> Any:
    return book.for_region(table, table, on=on)  # DEFAULT: no region has that code


# --- the shipped file -----------------------------------------------------------------------------


def test_shipped_file_loads_unchanged_before_its_first_version() -> None:
    plain = PolicyBook.from_tables(_without_versions(_raw()))
    for table in _tables(BOOK):
        for on in (None, date(1990, 1, 1), date(2026, 12, 31)):
            assert _policy(BOOK, table, on) == _policy(plain, table)
        assert _policy(BOOK, table, date(2026, 12, 31)).version == f"{table}@base"


def test_version_in_force_by_settlement_date() -> None:
    before = BOOK.for_region("150402", "150400", on=date(2026, 12, 31))
    after = BOOK.for_region("150402", "150400", on=CHANGE)
    assert (before.version, after.version) == ("150400@base", "150400@2027-01-01")
    assert before.inpatient_deductible_fen["310"] == (30000, 60000, 90000)
    assert after.inpatient_deductible_fen["310"] == (20000, 50000, 80000)
    assert after.inpatient_ratio["310"] == (D("0.93"), D("0.91"), D("0.88"))
    # everything else is the version before it: residents' parameters, caps
    assert after.inpatient_deductible_fen["390"] == before.inpatient_deductible_fen["390"]
    assert after.basic_annual_cap_fen == before.basic_annual_cap_fen
    assert BOOK.for_region("140100", "140100", on=CHANGE).version == "140100@base"


def test_default_version_reaches_every_region_and_the_region_keeps_its_own(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
                    + '\n[DEFAULT."2028-07-01"]\ncritical.deductible = 16000\ninpatient.ratio_ceiling = 0.96\n',
                    encoding="utf-8")
    book = PolicyBook.load(path)
    kaizhou = book.for_region("500154", "500000", on=date(2028, 7, 1))
    assert kaizhou.version == "500154@2028-07-01"
    assert kaizhou.critical_deductible_fen == 1200000  # 开州区's own value stays over DEFAULT's new one
    assert kaizhou.ratio_ceiling == D("0.96")
    chifeng = book.for_region("150400", "150400", on=date(2028, 7, 1))
    assert chifeng.version == "150400@2028-07-01"
    assert chifeng.critical_deductible_fen == 1600000 and chifeng.inpatient_deductible_fen["310"][2] == 80000
    assert book.for_region("150400", "150400", on=date(2028, 6, 30)).version == "150400@2027-01-01"
    assert book.for_region("999999", "999900", on=date(2028, 7, 1)).version == "DEFAULT@2028-07-01"


@pytest.mark.parametrize(("extra", "where"), [
    ('["150400"."2027-02-30"]\nname = "x"', "[150400@2027-02-30]"),
    ('["150400"."2027-03-01"]\ninpatient.ratio.310 = [0.9, 1.5, 0.8]', "[150400@2027-03-01] inpatient.ratio.310[1]"),
    ('["150400"."2027-03-01"]\ninpatient.bonus = 0.1', "[150400@2027-03-01] inpatient.bonus: unknown key"),
    ('["150400"."2027-03-01"]\n', "[150400@2027-03-01]: a version must change at least one key"),
    ('[DEFAULT."2027-03-01"]\ncritical.bands = [[10, 0.5]]', "[DEFAULT@2027-03-01] critical.bands[0]"),
])
def test_bad_version_is_named(tmp_path: Path, extra: str, where: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(DEFAULT_POLICY_PATH.read_text(encoding="utf-8") + "\n" + extra + "\n", encoding="utf-8")
    with pytest.raises(PolicyConfigError) as err:
        PolicyBook.load(path)
    assert where in str(err.value)


# --- a chain of versions merges like the single file --------------------------------------------

_LEAVES: dict[str, Any] = {
    "inpatient.deductible.310": st.lists(st.integers(0, 3000), min_size=3, max_size=3),
    "inpatient.ratio.390": st.lists(st.integers(0, 100).map(lambda n: D(n) / 100), min_size=3, max_size=3),
    "outpatient.ratio.310": st.integers(0, 100).map(lambda n: D(n) / 100),
    "critical.deductible": st.integers(0, 50000),
    "chronic.annual_cap": st.fixed_dictionaries({"HTN": st.integers(0, 9000)}),
    "basic_annual_cap.390": st.integers(0, 500000),
}


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return dict(out)


_override = st.dictionaries(st.sampled_from(sorted(_LEAVES)), st.just(None), min_size=1, max_size=3).flatmap(
    lambda keys: st.tuples(*(_LEAVES[k].map(lambda v, k=k: _nested(k, v)) for k in keys)).map(
        lambda parts: _merge_all(parts)))


def _merge_all(parts: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for p in parts:
        merged = deep_merge(merged, p)
    return merged


_TABLES = [DEFAULT_TABLE, "150400", "500154", "510421"]
_version = st.tuples(st.sampled_from(_TABLES), st.dates(date(2020, 1, 1), date(2030, 12, 31)), _override)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_version, min_size=1, max_size=4, unique_by=lambda v: (v[0], v[1])))
def test_version_chain_merges_like_a_single_file(versions: list[tuple[str, date, dict[str, Any]]]) -> None:
    base = _without_versions(_raw())
    chained = {t: dict(table) for t, table in base.items()}
    for table, effective, override in versions:
        chained[table][effective.isoformat()] = override
    book = PolicyBook.from_tables(chained)
    plain = PolicyBook.from_tables(base)
    for on in sorted({d for _, d, _ in versions} | {date(2019, 12, 31)}):
        # the single file with each version in force on `on` merged into its table, in date order
        single = {t: dict(table) for t, table in base.items()}
        for table, effective, override in sorted(versions, key=lambda v: v[1]):
            if effective <= on:
                single[table] = deep_merge(single[table], override)
        expected = PolicyBook.from_tables(single)
        for table in _tables(plain):
            assert _policy(book, table, on) == _policy(expected, table)
            contributing = [d for t, d, _ in versions if d <= on and t in (table, DEFAULT_TABLE)]
            label = max(contributing).isoformat() if contributing else "base"
            assert _policy(book, table, on).version == f"{table}@{label}"


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "150400@base\t赤峰市\tsince forever" in lines
    assert "150400@2027-01-01\t赤峰市\tfrom 2027-01-01" in lines
    assert lines[0] == "DEFAULT@base\tdefault\tsince forever"
    assert main(["list", "150402"]) == 0  # a county of 赤峰 uses the pooling region's table
    assert capsys.readouterr().out.splitlines() == ["150400@base\t赤峰市\tsince forever",
                                                    "150400@2027-01-01\t赤峰市\tfrom 2027-01-01"]


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_POLICY_PATH.read_text(encoding="utf-8")
                   + '\n["510421"."2027-05-01"]\nassistance.ratio = { "1" = 0.123456 }\n', encoding="utf-8")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "[510421@2027-05-01] assistance.ratio.1" in err and "at most 4 decimal places" in err


def test_cli_diff(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "150400", "2026-12-31", "2027-01-01"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "150400@base -> 150400@2027-01-01",
        "inpatient_deductible_fen.310: [30000, 60000, 90000] -> [20000, 50000, 80000]",
        "inpatient_ratio.310: [0.9200, 0.9000, 0.8500] -> [0.9300, 0.9100, 0.8800]",
    ]
    assert main(["diff", "150400", "2027-01-01", "2030-01-01"]) == 0
    assert capsys.readouterr().out.splitlines() == ["150400@2027-01-01 -> 150400@2027-01-01"]


# --- the deductible once per stay -----------------------------------------------------------------


def _inpatient(fen: int, taken: int) -> SettlementInput:
    return SettlementInput(med_type="21", insutype="310", psn_type="1101", hosp_lv=3, assistance=None,
                           filing_type=None, chronic_disease=None, use_account=False, account_balance_fen=0,
                           items=[FeeItem(fee_fen=fen, cnt=D(1), chrgitm_lv="01", selfpay_prop=D(0))],
                           inpatient_deductible_taken_fen=taken)


@pytest.mark.parametrize(("taken", "dedc", "hifp"), [
    (0, 90000, 178500),       # the first part: the whole deductible, (300000 − 90000) × 0.85
    (40000, 50000, 212500),   # what the earlier parts left of it
    (90000, 0, 255000),       # taken already: none
    (120000, 0, 255000),      # more than this version's deductible (a higher one before): none
])
def test_deductible_once_per_stay(taken: int, dedc: int, hifp: int) -> None:
    split = compute_split(BOOK.for_region("150400", "150400", on=date(2026, 5, 1)), _inpatient(300000, taken),
                          Accumulators())
    assert (split.act_pay_dedc, split.hifp_pay) == (dedc, hifp)
