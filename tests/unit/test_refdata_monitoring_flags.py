"""The generated catalog's smart-monitoring fields (services.refdata.generate): fixed per item, the same in
every province and for every seed, valid for the loader, and added without shifting any other row."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from pathlib import Path

import msgspec

from services.refdata.generate import (
    ITEM_CLASS_A,
    ITEM_FEMALE_DRUG,
    ITEM_FEMALE_ONLY,
    ITEM_MALE_ONLY,
    ITEM_WITH_CEILING,
    generate,
    write_jsonl,
)
from services.refdata.load import read_dir
from services.refdata.regions import PROVINCES

ONCE_PER_DAY = {"001102000010000", "001103000010000", ITEM_WITH_CEILING, "003107010010000", "001202000020000"}
FEMALE = {ITEM_FEMALE_ONLY, "003110010050000", ITEM_FEMALE_DRUG}
SUPPLY_DAYS = {"XA10BAD001A001001": Decimal(30), "XC08CAN001A001001": Decimal(30),
               "XC09AAK001A001001": Decimal(7), "XC09CAX001A001001": Decimal(7)}


def _flags(seed: int) -> dict[str, set[tuple[str, bool, str | None, Decimal]]]:
    out: dict[str, set[tuple[str, bool, str | None, Decimal]]] = {}
    for c in generate(seed, 5).catalog:
        if c.once_per_day or c.gender_only or c.supply_days != 1:
            out.setdefault(c.admdvs, set()).add((c.med_list_codg, c.once_per_day, c.gender_only, c.supply_days))
    return out


def test_the_flags_are_the_items_own_in_every_province_and_for_every_seed() -> None:
    flags = _flags(7)
    assert set(flags) == set(PROVINCES)
    expected = ({(code, True, None, Decimal(1)) for code in ONCE_PER_DAY}
                | {(code, False, "2", Decimal(1)) for code in FEMALE}
                | {(ITEM_MALE_ONLY, False, "1", Decimal(1))}
                | {(code, False, None, days) for code, days in SUPPLY_DAYS.items()})
    assert all(rows == expected for rows in flags.values())
    assert _flags(8) == flags == _flags(7)
    plain = next(c for c in generate(7, 5).catalog if c.med_list_codg == ITEM_CLASS_A)
    assert (plain.once_per_day, plain.gender_only, plain.supply_days) == (False, None, Decimal(1))


def test_the_flagged_catalog_reads_back_as_the_loader_reads_it(tmp_path: Path) -> None:
    dataset = generate(7, 5)
    write_jsonl(dataset, tmp_path)
    assert read_dir(tmp_path).catalog == dataset.catalog


def test_no_other_row_moved() -> None:
    # Digests of what the generator wrote before the flags: hospitals, persons and filings as they were, and
    # the catalog's rows without the four gender-restricted items and the monitoring fields.
    dataset = generate(7, 200)
    added = {ITEM_MALE_ONLY, *FEMALE}
    rows = [(c.admdvs, c.med_list_codg, c.name, c.chrgitm_lv, str(c.selfpay_prop), str(c.pric_uplmt_amt))
            for c in dataset.catalog if c.med_list_codg not in added]
    assert hashlib.sha256(repr(rows).encode()).hexdigest() == (
        "a5a1b5d2bc4a6fafd0b19d661abe6661ccf3161a6854b59667b24e59db5bbe47")
    others = msgspec.json.encode([dataset.hospitals, dataset.persons, dataset.filings])
    assert hashlib.sha256(others).hexdigest() == "239d8ec514f2b20910c8102686996cef014d925b0eb7f86988c9649ff48ba4ce"
