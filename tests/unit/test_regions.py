"""The region table and the scope rules built on it."""

from __future__ import annotations

import pytest

from services.refdata.regions import (
    PROVINCE_POOLED,
    PROVINCES,
    REGIONS,
    SEED_REGIONS,
    Region,
    UnknownRegion,
    classify_scope,
    is_known,
    pool_of,
    province_of,
    region_of,
)


def test_table_has_all_31_provinces_with_sub_regions() -> None:
    assert len(PROVINCES) == 31
    for prov in PROVINCES:
        assert prov.endswith("0000")
        subs = [r for r in REGIONS.values() if r.prov_admdvs == prov and r.admdvs != prov]
        assert len(subs) >= 2, prov


def test_every_row_is_consistent() -> None:
    for code, r in REGIONS.items():
        assert r.admdvs == code and len(code) == 6 and code.isdigit()
        assert r.prov_admdvs == code[:2] + "0000"
        assert r.pool_admdvs in REGIONS
        assert r.name


def test_seed_regions() -> None:
    assert SEED_REGIONS == ("150400", "500154", "510421", "350300", "140100")
    names = {code: REGIONS[code].name for code in (*SEED_REGIONS, "150402", "510400")}
    assert names == {
        "150400": "赤峰市",
        "500154": "开州区",
        "510421": "米易县",
        "350300": "莆田市",
        "140100": "太原市",
        "150402": "红山区",
        "510400": "攀枝花市",
    }


@pytest.mark.parametrize(
    ("admdvs", "pool", "prov"),
    [
        ("500154", "500000", "500000"),  # 重庆 pools at the municipality
        ("110105", "110000", "110000"),
        ("120104", "120000", "120000"),
        ("310115", "310000", "310000"),
        ("510421", "510400", "510000"),  # 米易县 pools at 攀枝花
        ("510400", "510400", "510000"),
        ("150402", "150400", "150000"),
        ("150400", "150400", "150000"),
        ("140100", "140100", "140000"),
        ("350300", "350300", "350000"),
        ("429004", "429004", "420000"),  # 仙桃市: 省直辖, pools on its own
    ],
)
def test_pooling(admdvs: str, pool: str, prov: str) -> None:
    assert pool_of(admdvs) == pool
    assert province_of(admdvs) == prov
    assert set(PROVINCE_POOLED) == {"110000", "120000", "310000", "500000"}


@pytest.mark.parametrize(
    ("insured", "treating", "scope"),
    [
        ("510421", "510400", "local"),
        ("510421", "510402", "local"),
        ("510421", "510100", "intra_province"),
        ("500154", "500101", "local"),  # 重庆 pools at 500000
        ("500154", "500103", "local"),
        ("150400", "140100", "cross_province"),
        ("150400", "150402", "local"),
        ("150402", "150100", "intra_province"),
        ("350300", "350100", "intra_province"),
        ("140100", "140105", "local"),
        ("500154", "510421", "cross_province"),
        ("110105", "120101", "cross_province"),
    ],
)
def test_classify_scope(insured: str, treating: str, scope: str) -> None:
    assert classify_scope(insured, treating) == scope
    assert classify_scope(treating, insured) == scope


def test_county_not_in_table_inherits_from_its_prefecture() -> None:
    r = region_of("150499")
    assert r == Region("150499", r.name, "150000", "150400")
    assert "赤峰市" in r.name
    assert classify_scope("150499", "150400") == "local"
    # A district of a municipality inherits from the province.
    assert pool_of("500155") == "500000"
    assert classify_scope("500155", "500154") == "local"


@pytest.mark.parametrize(
    "code", ["150500", "159900", "429005", "990000", "990101", "1504", "15040a", "", "１５０４００"]
)
def test_unknown_codes_are_refused(code: str) -> None:
    with pytest.raises(UnknownRegion):
        region_of(code)
    assert not is_known(code)
    with pytest.raises(UnknownRegion):
        classify_scope(code, "150400")


def test_regions_are_read_only() -> None:
    with pytest.raises(TypeError):
        REGIONS["999999"] = Region("999999", "x", "990000", "990000")  # type: ignore[index]
