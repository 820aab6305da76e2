"""Reference-data generator, file validation (no database) and the filing rule of the snapshot."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import Counter
from datetime import date
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from schemas.refdata import (
    FILINGS_FILE,
    HOSPITALS_FILE,
    PERSONS_FILE,
    CatalogRow,
    FilingRow,
    HospitalRow,
    PersonRow,
    RefDataSet,
    certno_birth_date,
    certno_check_char,
    certno_problem,
    yuan_to_fen,
)
from services.refdata.generate import (
    ITEM_CLASS_A,
    ITEM_CLASS_B,
    ITEM_CLASS_B_WITH_CEILING,
    ITEM_CLASS_C,
    ITEM_WITH_CEILING,
    NATIONAL_PERSONS,
    PERSONS_PER_INSTITUTION,
    SEED_FILINGS,
    TREATING_REGIONS,
    generate,
    national_counts,
    write_jsonl,
    write_national,
)
from services.refdata.load import RefDataError, filing_id, read_dir
from services.refdata.regions import PROVINCES, REGIONS, SEED_REGIONS, region_of
from services.refdata.store import Filing, filing_in_force

FILES = ("hospitals.jsonl", "persons.jsonl", "filings.jsonl", "catalog.jsonl")
ROW_TYPES = {
    "hospitals.jsonl": HospitalRow,
    "persons.jsonl": PersonRow,
    "filings.jsonl": FilingRow,
    "catalog.jsonl": CatalogRow,
}


@pytest.fixture(scope="module")
def dataset() -> RefDataSet:
    return generate(seed=7, persons_per_region=60)


@pytest.fixture(scope="module")
def files(dataset: RefDataSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refdata")
    write_jsonl(dataset, out)
    return out


# Generator ------------------------------------------------------------------------------


def test_same_seed_same_bytes(files: Path, tmp_path: Path) -> None:
    write_jsonl(generate(seed=7, persons_per_region=60), tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (files / name).read_bytes(), name


def test_other_seed_other_data(dataset: RefDataSet) -> None:
    other = generate(seed=8, persons_per_region=60)
    assert other.persons != dataset.persons
    assert [h.fixmedins_code for h in other.hospitals] == [h.fixmedins_code for h in dataset.hospitals]


def test_every_line_decodes_strictly(files: Path) -> None:
    for name, row_type in ROW_TYPES.items():
        decoder = msgspec.json.Decoder(row_type)
        lines = (files / name).read_bytes().splitlines()
        assert lines, name
        for line in lines:
            decoder.decode(line)


def test_files_pass_the_loader_checks(files: Path, dataset: RefDataSet) -> None:
    assert read_dir(files) == dataset


def test_hospitals(dataset: RefDataSet) -> None:
    levels: dict[str, set[int]] = {}
    for h in dataset.hospitals:
        assert h.fixmedins_code[0] in "HP" and h.fixmedins_code[1:7] == h.admdvs and len(h.fixmedins_code) == 12
        assert h.admdvs in REGIONS
        levels.setdefault(h.admdvs, set()).add(h.hosp_lv)
    for code in (*SEED_REGIONS, "150402", "510400"):
        assert levels[code] == {1, 2, 3}, code
    provinces = {REGIONS[code].prov_admdvs for code, lvs in levels.items() if lvs == {1, 2, 3}}
    assert provinces == set(PROVINCES)
    assert set(levels) == set(TREATING_REGIONS)
    assert len({h.fixmedins_code for h in dataset.hospitals}) == len(dataset.hospitals)
    names = {h.fixmedins_name for h in dataset.hospitals}
    assert {"赤峰市医院", "米易县人民医院", "重庆市开州区人民医院"} <= names
    pharmacies = {h.admdvs for h in dataset.hospitals if h.fixmedins_code.startswith("P")}
    assert set(SEED_REGIONS) <= pharmacies


def test_persons(dataset: RefDataSet) -> None:
    by_region = Counter(p.insuplc_admdvs for p in dataset.persons)
    for code in SEED_REGIONS:
        assert by_region[code] == 60
    assert {REGIONS[c].prov_admdvs for c in by_region} == set(PROVINCES)
    assert {p.insutype for p in dataset.persons} == {"310", "390"}
    assert {p.psn_type[:2] for p in dataset.persons} == {"11", "12", "15", "16", "17"}
    assert {p.assistance for p in dataset.persons} == {None, "1", "2"}
    assert any(p.acct_balc > 0 for p in dataset.persons if p.insutype == "310")
    assert all(p.acct_balc == 0 for p in dataset.persons if p.insutype == "390")
    assert any(p.chronic for p in dataset.persons)
    assert len({p.psn_no for p in dataset.persons}) == len(dataset.persons)
    certnos = [p.certno for p in dataset.persons]
    assert None not in certnos and len(set(certnos)) == len(certnos)
    for p in dataset.persons:
        assert p.psn_no.startswith("P" + p.insuplc_admdvs) and len(p.psn_no) == 15
        assert p.certno is not None and certno_problem(p.certno) is None
        assert p.certno[17] == certno_check_char(p.certno[:17])
        age = 2026 - certno_birth_date(p.certno).year
        if p.psn_type.startswith("16"):
            assert age <= 18
        if p.psn_type.startswith(("12", "17")):
            assert age >= 55
        assert p.psn_name and 2 <= len(p.psn_name) <= 3


def test_filings(dataset: RefDataSet) -> None:
    psn_nos = {p.psn_no for p in dataset.persons}
    assert {f.filing_type for f in dataset.filings} == {"LONG_TERM", "REFERRAL", "EMERGENCY", "TEMPORARY"}
    assert all(f.psn_no in psn_nos for f in dataset.filings)
    assert None in {f.target_admdvs for f in dataset.filings}
    assert all(f.target_admdvs is None or f.target_admdvs in PROVINCES for f in dataset.filings)
    in_force = [f for f in dataset.filings if f.begndate <= date(2026, 6, 30) <= f.enddate]
    expired = [f for f in dataset.filings if f.enddate < date(2026, 1, 1)]
    assert len(in_force) > len(dataset.filings) / 2
    assert expired
    assert len({filing_id(f) for f in dataset.filings}) == len(dataset.filings)


def test_first_person_of_each_seed_region_is_filed_for_the_year(dataset: RefDataSet) -> None:
    by_psn: dict[str, list[Filing]] = {}
    for row in dataset.filings:
        by_psn.setdefault(row.psn_no, []).append(
            Filing(filing_id(row), row.filing_type, row.begndate, row.enddate, row.target_admdvs)
        )
    for admdvs, kind in SEED_FILINGS.items():
        psn_no = f"P{admdvs}00000001"
        for on in (date(2026, 1, 1), date(2026, 12, 31)):
            for prov in ("110000", "510000", "650000"):
                found = filing_in_force(by_psn[psn_no], on, prov)
                assert found is not None and found.filing_type == kind


def test_catalog_covers_every_hospital_province(dataset: RefDataSet) -> None:
    provinces = {c.admdvs for c in dataset.catalog}
    assert {region_of(h.admdvs).prov_admdvs for h in dataset.hospitals} <= provinces
    assert provinces == set(PROVINCES)
    assert {c.chrgitm_lv for c in dataset.catalog} == {"01", "02", "03"}
    assert any(c.pric_uplmt_amt is not None for c in dataset.catalog)
    for c in dataset.catalog:
        if c.chrgitm_lv == "01":
            assert c.selfpay_prop == 0
        elif c.chrgitm_lv == "02":
            assert Decimal("0.05") <= c.selfpay_prop <= Decimal("0.20")
        else:
            assert c.selfpay_prop == 1


def test_catalog_anchor_items_are_the_same_everywhere(dataset: RefDataSet) -> None:
    index = {(c.admdvs, c.med_list_codg): c for c in dataset.catalog}
    expected = {
        ITEM_CLASS_A: ("01", Decimal(0), None),
        ITEM_CLASS_B: ("02", Decimal("0.10"), None),
        ITEM_CLASS_C: ("03", Decimal(1), None),
        ITEM_WITH_CEILING: ("01", Decimal(0), Decimal("60.00")),
        ITEM_CLASS_B_WITH_CEILING: ("02", Decimal("0.10"), Decimal("800.00")),
    }
    for prov in PROVINCES:
        for code, want in expected.items():
            c = index[(prov, code)]
            assert (c.chrgitm_lv, c.selfpay_prop, c.pric_uplmt_amt) == want
    # Most codes are national: shared by every province.
    codes = Counter(c.med_list_codg for c in dataset.catalog)
    shared = [code for code, n in codes.items() if n == len(PROVINCES)]
    assert len(shared) >= 0.9 * (len(dataset.catalog) / len(PROVINCES))


def test_size_is_bounded() -> None:
    with pytest.raises(ValueError):
        generate(7, 0)
    with pytest.raises(ValueError):
        national_counts(0)


def test_default_output_is_unchanged(tmp_path: Path) -> None:
    # The demo's and the tests' data (seed 7, 200 per region): the same bytes from one version to the
    # next. Changed on purpose twice: the catalog got its own random stream (the national mode's catalog);
    # catalog rows carry the monitoring fields (issue 13), set on some items, with four gender-restricted
    # items more (every other row as it was: test_refdata_monitoring_flags.py).
    write_jsonl(generate(7, 200), tmp_path)
    digest = hashlib.sha256(b"".join((tmp_path / name).read_bytes() for name in FILES)).hexdigest()
    assert digest == "d1d8aa71404a3ac6c8726cc240a7202468c1cf693c09c8a5d91d6a2ad261aee2"


def test_the_catalog_is_the_same_whatever_the_size_and_in_the_national_mode(tmp_path: Path) -> None:
    from services.refdata.generate import write_national

    write_national(tmp_path, seed=7, scale=0.0001)
    national = (tmp_path / "catalog.jsonl").read_bytes()
    for size in (200, 1000):
        write_jsonl(generate(7, size), tmp_path / str(size))
        assert (tmp_path / str(size) / "catalog.jsonl").read_bytes() == national


# National shape ----------------------------------------------------------------------------

NATIONAL_SCALE = 0.002  # 26,420 persons in the seed regions


@pytest.fixture(scope="module")
def national(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("national")
    return out, write_national(out, seed=5, scale=NATIONAL_SCALE)


def test_national_sizes_and_density(national: tuple[Path, dict[str, int]]) -> None:
    out, written = national
    assert sum(NATIONAL_PERSONS.values()) == 13_210_000
    counts = national_counts(NATIONAL_SCALE)
    assert {code: counts[code] for code in NATIONAL_PERSONS} == {
        "150400": 8_000, "500154": 3_220, "510421": 400, "350300": 5_800, "140100": 9_000}
    assert written[PERSONS_FILE] == sum(counts.values())
    by_region = Counter(msgspec.json.decode(line)["insuplc_admdvs"]
                        for line in (out / PERSONS_FILE).read_bytes().splitlines())
    assert dict(by_region) == counts
    institutions = Counter(msgspec.json.decode(line)["admdvs"]
                           for line in (out / HOSPITALS_FILE).read_bytes().splitlines())
    for code, n in NATIONAL_PERSONS.items():
        dense = round(n * NATIONAL_SCALE) // PERSONS_PER_INSTITUTION
        assert institutions[code] == dense + 7  # + the 6 featured hospitals and 1 pharmacy of the default set
    # Filings at the default set's share: about a third of persons (0.33 × ~1.05 filings each).
    assert 0.30 < written[FILINGS_FILE] / written[PERSONS_FILE] < 0.40


def test_national_files_pass_the_checks(national: tuple[Path, dict[str, int]]) -> None:
    out, written = national
    dataset = read_dir(out)  # strict decoding, unique psn_no and certno, filings of known persons
    assert len(dataset.persons) == written[PERSONS_FILE]
    assert all(p.certno is not None and certno_problem(p.certno) is None for p in dataset.persons)


def test_national_is_deterministic_and_streamed(national: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    out, _ = national
    tracemalloc.start()
    try:
        write_national(tmp_path, seed=5, scale=NATIONAL_SCALE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    written = sum((out / name).stat().st_size for name in FILES)
    # Streamed: the peak is the write buffer and per-region counters (about 4.2 MB traced), not the rows — held
    # as bytes they would be the whole 6.7 MB written, as Python objects several times that. (The bound was
    # 4 MiB, which the peak crossed by 2.5 KB in one CI run: what else the process allocates meanwhile counts.)
    assert peak < 0.8 * written


# Schema checks ---------------------------------------------------------------------------


def _person(**changes: object) -> bytes:
    row: dict[str, object] = {
        "psn_no": "P15040000000001",
        "insuplc_admdvs": "150400",
        "insutype": "310",
        "psn_type": "1101",
        "assistance": None,
        "acct_balc": "12.30",
        "chronic": ["HTN"],
        "certno": "11010519491231002X",
        "psn_name": "张三",
    }
    row.update(changes)
    return msgspec.json.encode(row)


def test_certno_check_character() -> None:
    assert certno_check_char("11010519491231002") == "X"  # the GB 11643 example
    assert certno_problem("11010519491231002X") is None
    assert certno_problem("110105194912310021") == "check character does not match"
    assert certno_problem("110105194902310028") == "birth date is not a valid date"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"insutype": "320"}, "insutype"),
        ({"psn_type": "1501"}, "psn_type"),  # a resident code on an employee
        ({"acct_balc": "1.234"}, "acct_balc"),
        ({"acct_balc": "-1"}, "acct_balc"),
        ({"acct_balc": "NaN"}, "acct_balc"),
        ({"chronic": ["HTN", "HTN"]}, "chronic"),
        ({"chronic": ["FLU"]}, "chronic[0]"),
        ({"certno": "110105194912310021"}, "certno"),
        ({"assistance": "3"}, "assistance"),
    ],
)
def test_person_row_rejects(changes: dict[str, object], field: str) -> None:
    with pytest.raises(msgspec.ValidationError) as exc:
        msgspec.json.decode(_person(**changes), type=PersonRow)
    assert f"`$.{field}`" in str(exc.value)
    assert "110105194912310021" not in str(exc.value)


def test_person_row_unknown_field() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `extra`"):
        msgspec.json.decode(_person(extra=1), type=PersonRow)


def test_amounts_to_fen_exactly() -> None:
    row = msgspec.json.decode(_person(acct_balc="0.29"), type=PersonRow)
    assert yuan_to_fen(row.acct_balc) == 29
    assert yuan_to_fen(msgspec.json.decode(_person(acct_balc=1234567.89), type=PersonRow).acct_balc) == 123456789
    assert yuan_to_fen(Decimal("1E+3")) == 100000
    assert yuan_to_fen(Decimal("2.500")) == 250
    with pytest.raises(ValueError):
        yuan_to_fen(Decimal("0.001"))


@pytest.mark.parametrize(
    ("lv", "prop", "ok"),
    [
        ("01", "0", True),
        ("01", "0.1", False),
        ("02", "0.1", True),
        ("02", "1", False),
        ("03", "1", True),
        ("03", "0", False),
        ("02", "0.12345", False),
        ("02", "-0.1", False),
    ],
)
def test_catalog_class_fixes_ratio(lv: str, prop: str, ok: bool) -> None:
    raw = msgspec.json.encode(
        {"admdvs": "510000", "med_list_codg": "X1", "name": "n", "chrgitm_lv": lv, "selfpay_prop": prop}
    )
    if ok:
        assert msgspec.json.decode(raw, type=CatalogRow).selfpay_prop == Decimal(prop)
    else:
        with pytest.raises(msgspec.ValidationError, match=r"\$\.selfpay_prop"):
            msgspec.json.decode(raw, type=CatalogRow)


# File validation ------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    for name in FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _replace_line(path: Path, lineno: int, new: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[lineno - 1] = new + b"\n"
    path.write_bytes(b"".join(lines))


def test_malformed_line_names_file_line_and_field(files: Path, tmp_path: Path) -> None:
    d = _copy(files, tmp_path)
    line3 = (d / "persons.jsonl").read_bytes().splitlines()[2]
    _replace_line(d / "persons.jsonl", 3, line3.replace(b'"insutype":"3', b'"insutype":"4'))
    with pytest.raises(RefDataError) as exc:
        read_dir(d)
    assert len(exc.value.errors) == 1
    assert exc.value.errors[0].startswith("persons.jsonl:3: Invalid enum value")
    assert exc.value.errors[0].endswith(" - at `$.insutype`")


def test_errors_never_show_personal_identifiers(files: Path, tmp_path: Path) -> None:
    d = _copy(files, tmp_path)
    person = msgspec.json.decode((d / "persons.jsonl").read_bytes().splitlines()[4], type=PersonRow)
    assert person.certno is not None
    bad_cert = person.certno[:17] + ("1" if person.certno[17] != "1" else "2")
    raw = msgspec.to_builtins(person)
    _replace_line(d / "persons.jsonl", 5, msgspec.json.encode({**raw, "certno": bad_cert}))
    _replace_line(d / "persons.jsonl", 6, msgspec.json.encode({**raw, "psn_name": 7}))
    with pytest.raises(RefDataError) as exc:
        read_dir(d)
    assert exc.value.errors == [
        "persons.jsonl:5: certno check character does not match - at `$.certno`",
        "persons.jsonl:6: Expected `str | null`, got `int` - at `$.psn_name`",
    ]
    for secret in (bad_cert, person.certno, person.psn_no, person.psn_name or "-"):
        assert secret not in str(exc.value)


def _append(path: Path, line: bytes) -> int:
    data = path.read_bytes() + line + b"\n"
    path.write_bytes(data)
    return data.count(b"\n")


def test_duplicates(files: Path, tmp_path: Path) -> None:
    d = _copy(files, tmp_path)
    lines = (d / "persons.jsonl").read_bytes().splitlines()
    person = msgspec.json.decode(lines[4], type=PersonRow)
    other = msgspec.json.decode(lines[7], type=PersonRow)
    n1 = _append(d / "persons.jsonl", msgspec.json.encode(msgspec.structs.replace(person, certno=None)))
    n2 = _append(d / "persons.jsonl", msgspec.json.encode(msgspec.structs.replace(other, psn_no="PX1")))
    n3 = _append(d / "filings.jsonl", (d / "filings.jsonl").read_bytes().splitlines()[1])
    n4 = _append(d / "catalog.jsonl", (d / "catalog.jsonl").read_bytes().splitlines()[0])
    with pytest.raises(RefDataError) as exc:
        read_dir(d)
    assert exc.value.errors == [
        f"persons.jsonl:{n1}: duplicate psn_no (first at line 5) - at `$.psn_no`",
        f"persons.jsonl:{n2}: duplicate certno (first at line 8) - at `$.certno`",
        f"filings.jsonl:{n3}: duplicate filing (first at line 2) - at `$`",
        f"catalog.jsonl:{n4}: duplicate catalog item (first at line 1) - at `$.med_list_codg`",
    ]
    for secret in (person.certno, person.psn_no, other.certno, other.psn_no):
        assert secret is not None and secret not in str(exc.value)


def test_reference_checks(files: Path, tmp_path: Path) -> None:
    d = _copy(files, tmp_path)
    hospital = msgspec.json.decode((d / "hospitals.jsonl").read_bytes().splitlines()[0], type=HospitalRow)
    _replace_line(
        d / "hospitals.jsonl",
        1,
        msgspec.json.encode(msgspec.structs.replace(hospital, admdvs="159900", fixmedins_code="H15990000001")),
    )
    _replace_line(
        d / "filings.jsonl",
        2,
        b'{"psn_no":"P99","filing_type":"TEMPORARY","begndate":"2026-01-01",'
        b'"enddate":"2026-12-31","target_admdvs":"990000"}',
    )
    _replace_line(
        d / "catalog.jsonl",
        1,
        b'{"admdvs":"990000","med_list_codg":"X1","name":"n","chrgitm_lv":"01","selfpay_prop":"0"}',
    )
    with pytest.raises(RefDataError) as exc:
        read_dir(d)
    assert exc.value.errors == [
        "hospitals.jsonl:1: unknown region - at `$.admdvs`",
        "filings.jsonl:2: person not in persons.jsonl - at `$.psn_no`",
        "filings.jsonl:2: not a province in the region table - at `$.target_admdvs`",
        "catalog.jsonl:1: not a province in the region table - at `$.admdvs`",
    ]


def test_line_that_is_not_json(files: Path, tmp_path: Path) -> None:
    d = _copy(files, tmp_path)
    _replace_line(d / "catalog.jsonl", 2, b"{not json")
    _replace_line(d / "hospitals.jsonl", 4, b"[]")
    with pytest.raises(RefDataError) as exc:
        read_dir(d)
    assert exc.value.errors == [
        "hospitals.jsonl:4: Expected `object`, got `array` - at `$`",
        "catalog.jsonl:2: line is not a valid JSON object",
    ]


def test_missing_file(files: Path, tmp_path: Path) -> None:
    d = _copy(files, tmp_path)
    (d / "filings.jsonl").unlink()
    with pytest.raises(RefDataError, match=r"filings.jsonl:0: file is missing"):
        read_dir(d)


def test_filing_id_is_deterministic_and_content_based() -> None:
    a = FilingRow("P1", "TEMPORARY", date(2026, 1, 1), date(2026, 12, 31), None)
    assert filing_id(a) == filing_id(FilingRow("P1", "TEMPORARY", date(2026, 1, 1), date(2026, 12, 31)))
    assert filing_id(a) != filing_id(msgspec.structs.replace(a, target_admdvs="510000"))
    assert filing_id(a).startswith("rd-") and len(filing_id(a)) == 35


# filing_in_force -------------------------------------------------------------------------


def _f(fid: str, kind: str, begin: date, end: date, target: str | None = None, revoked: bool = False) -> Filing:
    return Filing(fid, kind, begin, end, target, "refdata", revoked)


Y0, Y1 = date(2026, 1, 1), date(2026, 12, 31)
ON = date(2026, 5, 20)


def test_filing_in_force_dates_target_revoked() -> None:
    assert filing_in_force([], ON, "510000") is None
    t = _f("a", "TEMPORARY", Y0, Y1)
    assert filing_in_force([t], ON, "510000") is t
    assert filing_in_force([t], Y0, "510000") is t and filing_in_force([t], Y1, "510000") is t
    assert filing_in_force([t], date(2025, 12, 31), "510000") is None
    assert filing_in_force([t], date(2027, 1, 1), "510000") is None
    sichuan = _f("b", "TEMPORARY", Y0, Y1, "510000")
    assert filing_in_force([sichuan], ON, "510000") is sichuan
    assert filing_in_force([sichuan], ON, "510421") is sichuan  # any region code of the province
    assert filing_in_force([sichuan], ON, "500000") is None
    assert filing_in_force([_f("c", "LONG_TERM", Y0, Y1, revoked=True)], ON, "510000") is None


def test_filing_in_force_prefers_the_smallest_cut() -> None:
    fs = [
        _f("t", "TEMPORARY", Y0, Y1),
        _f("l", "LONG_TERM", Y0, Y1),
        _f("r", "REFERRAL", Y0, Y1, "510000"),
        _f("e", "EMERGENCY", Y0, date(2026, 5, 19)),  # expired the day before
        _f("e2", "EMERGENCY", Y0, Y1, "500000"),  # other province
    ]
    assert filing_in_force(fs, ON, "510000").filing_id == "r"  # type: ignore[union-attr]
    assert filing_in_force(fs, ON, "500000").filing_id == "e2"  # type: ignore[union-attr]
    assert filing_in_force(fs, ON, "140000").filing_id == "l"  # type: ignore[union-attr]
    assert filing_in_force(fs[:1], ON, "140000").filing_id == "t"  # type: ignore[union-attr]
    longer = _f("l0", "LONG_TERM", Y0, date(2028, 12, 31))
    assert filing_in_force([*fs, longer], ON, "140000") is longer


def test_the_national_population_lives_beside_the_default_reference_data() -> None:
    """Loaded into the same databases (the demo's data and the benchmark's national population), the two
    never share a psn_no or a certificate number, so neither load rewrites the other's persons."""
    from services.refdata.generate import _national_persons, national_counts

    default = generate(7, 1000)
    national = [p for p, _ in _national_persons(7, national_counts(0.0005))]
    assert len(national) > 6_000
    assert not {p.psn_no for p in default.persons} & {p.psn_no for p in national}
    assert not {p.certno for p in default.persons} & {p.certno for p in national}
