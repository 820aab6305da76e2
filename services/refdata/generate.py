"""Deterministic generator of realistic (fake) reference data.

    python -m services.refdata.generate --out DIR [--seed 7] [--persons-per-region 200]
    python -m services.refdata.generate --out DIR --national [--scale F | --persons N]

writes hospitals.jsonl, persons.jsonl, filings.jsonl and catalog.jsonl. The same
seed and size give byte-identical files; nothing depends on today's date (the
data is built around the year `DATA_YEAR`).

What it produces:
- hospitals: levels 3, 2 and 1 in every treating region (`TREATING_REGIONS`): the
  seed regions, 红山区 and 攀枝花市 get two of each level, the first listed
  region of every other province one of each. Code = 'H' + admdvs + 5 digits.
- persons: `persons_per_region` insured in each seed region and
  max(1, persons_per_region // 20) in each other province's first region;
  insutype 310 (psn_type 1101/1102 in service, 1201/1202 retired, with an
  account balance) and 390 (1501 adult, 1601 minor, 1701 aged 60+: this
  generator's convention for the 15/16/17 prefixes; no account); residents
  may have assistance 1 (低保) or 2 (特困); older persons more often a chronic
  disease. certno is a valid ID number whose birth date matches the age;
  psn_no = 'P' + insured admdvs + 8-digit sequence; names are made up.
- filings: the first person of each seed region has the filing `SEED_FILINGS`
  names, target null, valid for all of `DATA_YEAR` (P15040000000001,
  P50015400000001, ...: handy demo subjects); about a third of the others have
  one (a few two), all four types, target a province or null; most valid
  through the whole of `DATA_YEAR`, some expired the year before, some starting
  in its second half.
- catalog: for every province, the same national items (西药, 中成药, 医疗服务,
  医用耗材) with all three classes, plus one provincial item (医疗机构制剂).
  甲 selfpay_prop 0, 乙 0.05–0.20 varying by province, 丙 1 (fully self-paid).
  Some items carry a unit price ceiling that varies a little by province. The
  `ITEM_*` anchors below have the same class, ratio and ceiling everywhere, for
  tests and demos that need an item valid in any province. Smart monitoring's
  fields (REFERENCE §8) are fixed per item, the same in every province and for
  every seed: bed fees, the inpatient and outpatient consultation fees and
  dialysis are billable once a day; 产前检查, 宫颈细胞学检查 and 黄体酮注射液 are for
  women only, 前列腺特异性抗原测定 for men only; boxes of 盐酸二甲双胍片 and
  硝苯地平缓释片 last 30 days, of 卡托普利片 and 缬沙坦胶囊 7 days. The flagged
  items added no random draw: every other row is what it was before them.

`--national` (`write_national`) writes the seed regions at their real sizes (`NATIONAL_PERSONS`,
~13.2 M persons; `--scale`/`--persons` for less) and `OTHER_PROVINCE_PERSONS` in every other
province, filings at the same shares, hospitals and pharmacies at national density (one per
`PERSONS_PER_INSTITUTION` persons of a seed region) on top of the ones above, the same catalog.
It streams: persons and filings are written as they are made; certificate numbers are unique by
construction (`_CertnoAllocator`), not by remembering them. Each region has its own random stream.
"""

from __future__ import annotations

import argparse
import random
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Final, Literal, TypeVar

import msgspec

from schemas.refdata import (
    CATALOG_FILE,
    FILINGS_FILE,
    HOSPITALS_FILE,
    PERSONS_FILE,
    CatalogRow,
    ChrgitmLv,
    ChronicDisease,
    FilingRow,
    FilingType,
    HospitalRow,
    Insutype,
    PersonRow,
    RefDataSet,
    certno_check_char,
)
from services.refdata.regions import PROVINCE_POOLED, PROVINCES, REGIONS, SEED_REGIONS, Region

DATA_YEAR: Final = 2026
PERSONS_PER_REGION_MAX: Final = 100_000

# Regions with two hospitals of each level (seed regions and their neighbours in the seed pairs).
FEATURED_REGIONS: Final[tuple[str, ...]] = (*SEED_REGIONS, "150402", "510400")


def _first_sub_region(prov: str) -> str:
    return next(code for code, r in REGIONS.items() if r.prov_admdvs == prov and code != prov)


TREATING_REGIONS: Final[tuple[str, ...]] = tuple(
    dict.fromkeys([*FEATURED_REGIONS, *(_first_sub_region(p) for p in PROVINCES)])
)

# Catalog anchors: present in every province with the same class, ratio and ceiling.
ITEM_CLASS_A: Final = "XJ01CAA040A001001"  # 阿莫西林胶囊, 甲, no ceiling
ITEM_CLASS_B: Final = "XC10AAA055A001001"  # 阿托伐他汀钙片, 乙, selfpay_prop 0.10, no ceiling
ITEM_CLASS_C: Final = "XA11JAV008A001001"  # 复合维生素片, 丙, no ceiling
ITEM_WITH_CEILING: Final = "002201000010000"  # 普通病房床位费, 甲, ceiling 60.00 yuan per day
ITEM_CLASS_B_WITH_CEILING: Final = "C0302010010200100001"  # 冠脉药物洗脱支架, 乙 0.10, ceiling 800.00
# Monitoring anchors: restricted to one gender in every province (GENDER_RESTRICTED).
ITEM_FEMALE_ONLY: Final = "003106060010000"  # 产前检查, women only
ITEM_FEMALE_DRUG: Final = "XG03DAH001B002001"  # 黄体酮注射液, women only
ITEM_MALE_ONLY: Final = "003109020030000"  # 前列腺特异性抗原测定, men only
_MONTH_BOX, _WEEK_BOX = Decimal(30), Decimal(7)  # days of supply of one box of tablets


@dataclass(frozen=True)
class _Item:
    code: str
    name: str
    lv: ChrgitmLv
    ceiling: Decimal | None = None  # base unit price ceiling, yuan
    fixed: bool = False  # same ratio and ceiling in every province
    # Smart monitoring (REFERENCE §8), the same in every province: billable at most once a day on a visit,
    # restricted to one gender ("1" male, "2" female), days of supply per unit (a box of tablets).
    once_per_day: bool = False
    gender_only: Literal["1", "2"] | None = None
    supply_days: Decimal = Decimal(1)


_B10 = Decimal("0.10")

CATALOG_ITEMS: Final[tuple[_Item, ...]] = (
    # 西药
    _Item(ITEM_CLASS_A, "阿莫西林胶囊", "01", fixed=True),
    _Item("XN02BEA001A001001", "对乙酰氨基酚片", "01"),
    _Item("XA10BAD001A001001", "盐酸二甲双胍片", "01", supply_days=_MONTH_BOX),
    _Item("XC08CAN001A001001", "硝苯地平缓释片", "01", supply_days=_MONTH_BOX),
    _Item("XC09AAK001A001001", "卡托普利片", "01", supply_days=_WEEK_BOX),
    _Item("XB05BBL001B002001", "氯化钠注射液", "01"),
    _Item("XA10ABY001B002001", "胰岛素注射液", "01"),
    _Item(ITEM_CLASS_B, "阿托伐他汀钙片", "02", fixed=True),
    _Item("XA02BCA001A001001", "奥美拉唑肠溶胶囊", "02"),
    _Item("XJ01DDT001B002001", "注射用头孢曲松钠", "02"),
    _Item("XC09CAX001A001001", "缬沙坦胶囊", "02", supply_days=_WEEK_BOX),
    _Item("XL01BCK001A001001", "卡培他滨片", "02"),
    _Item("XL04ADT001A001001", "他克莫司胶囊", "02"),
    _Item("XL04AAM001A001001", "吗替麦考酚酯胶囊", "02"),
    _Item("XB03XAC001B002001", "重组人促红素注射液", "02"),
    _Item(ITEM_CLASS_C, "复合维生素片", "03", fixed=True),
    _Item(ITEM_FEMALE_DRUG, "黄体酮注射液", "01", gender_only="2"),
    _Item("XD11AXM001L001001", "米诺地尔酊", "03"),
    # 中成药
    _Item("ZA06AAL001A001001", "六味地黄丸", "01"),
    _Item("ZA12BAF001A001001", "复方丹参滴丸", "01"),
    _Item("ZA04CAL001A001001", "连花清瘟胶囊", "02"),
    _Item("ZA12EAX001A001001", "血塞通软胶囊", "02"),
    _Item("ZA09AAE001A001001", "阿胶", "03"),
    # 医疗服务项目
    _Item("001102000010000", "普通门诊诊察费", "01", once_per_day=True),
    _Item("001103000010000", "住院诊察费", "01", once_per_day=True),
    _Item(ITEM_WITH_CEILING, "普通病房床位费", "01", Decimal("60.00"), fixed=True, once_per_day=True),
    _Item("002502000010000", "静脉输液", "01"),
    _Item("003105010010000", "X线计算机体层(CT)平扫", "02", Decimal("180.00")),
    _Item("003111010020000", "磁共振成像(MRI)平扫", "02", Decimal("550.00")),
    _Item("003107010010000", "血液透析", "02", Decimal("420.00"), once_per_day=True),
    _Item("004204000010000", "调强放射治疗", "02", Decimal("1500.00")),
    _Item("001202000020000", "特需病房床位费", "03", once_per_day=True),
    _Item("002000000010000", "健康体检", "03"),
    # Gender-restricted services: class 甲 without a ceiling, so they draw nothing from the catalog's stream.
    _Item(ITEM_FEMALE_ONLY, "产前检查", "01", gender_only="2"),
    _Item("003110010050000", "宫颈细胞学检查", "01", gender_only="2"),
    _Item(ITEM_MALE_ONLY, "前列腺特异性抗原测定", "01", gender_only="1"),
    # 医用耗材
    _Item("C0101020010100100001", "一次性使用输液器", "02", Decimal("8.00")),
    _Item(ITEM_CLASS_B_WITH_CEILING, "冠脉药物洗脱支架", "02", Decimal("800.00"), fixed=True),
    _Item("C1401010020100200001", "人工髋关节假体", "02", Decimal("7200.00")),
    _Item("C1201010010100100001", "血液透析器", "02", Decimal("95.00")),
    _Item("C0901010010100100001", "医用护理垫", "03"),
)

_B_RATIOS: Final = (Decimal("0.05"), Decimal("0.08"), Decimal("0.10"), Decimal("0.15"), Decimal("0.20"))

# Hospital name patterns by level: for a city (prefecture) and for a county or district.
_L3_CITY = ("{p}医院", "{p}中心医院")
_L3_COUNTY = ("{p}人民医院", "{p}中医医院")
_L2 = ("{p}第二人民医院", "{p}妇幼保健院")
_L1_URBAN = ("{p}{t}街道社区卫生服务中心", "{p}{t}街道社区卫生服务中心")
_L1_COUNTY = ("{p}{t}镇卫生院", "{p}{t}街道社区卫生服务中心")
# Hospital name patterns by kind of region (city, urban district, county) and level.
_NAME_PATTERNS: Final[dict[str, dict[int, tuple[str, str]]]] = {
    "city": {3: _L3_CITY, 2: _L2, 1: _L1_URBAN},
    "district": {3: _L3_COUNTY, 2: _L2, 1: _L1_URBAN},
    "county": {3: _L3_COUNTY, 2: _L2, 1: _L1_COUNTY},
}
_TOWNS: Final = ("城关", "新城", "东风", "和平", "解放", "长安", "永安", "河西", "南关", "北关", "青山", "新华")

_SURNAMES: Final = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
)
_GIVEN_MALE: Final = "伟强磊军勇杰涛斌超明刚平辉鹏华飞鑫波宇浩凯健俊帆志国建峰"
_GIVEN_FEMALE: Final = "芳娜敏静丽艳娟霞燕玲婷雪慧红梅琳颖洁倩晶萍莉兰琴云秀英"

_CHRONIC_WEIGHTS: Final[tuple[tuple[ChronicDisease, int], ...]] = (
    ("HTN", 40),
    ("DM", 30),
    ("CANCER_TX", 12),
    ("ESRD_DIALYSIS", 10),
    ("TRANSPLANT_AR", 5),
)
_RESIDENT_AGES: Final = {"1501": (18, 59), "1601": (0, 17), "1701": (60, 92)}
# The first person insured in each seed region has this filing, valid anywhere for all of DATA_YEAR.
SEED_FILINGS: Final[dict[str, FilingType]] = {
    "150400": "LONG_TERM",
    "500154": "REFERRAL",
    "510421": "TEMPORARY",
    "350300": "EMERGENCY",
    "140100": "LONG_TERM",
}
_FILING_WEIGHTS: Final[tuple[tuple[FilingType, int], ...]] = (
    ("LONG_TERM", 35),
    ("TEMPORARY", 35),
    ("REFERRAL", 20),
    ("EMERGENCY", 10),
)


def _hospital_prefix(region: Region) -> tuple[str, str]:
    """(name prefix, kind of region) for hospitals in `region`."""
    kind = "city" if region.admdvs.endswith("00") else "district" if region.name.endswith("区") else "county"
    if region.prov_admdvs in PROVINCE_POOLED:
        return REGIONS[region.prov_admdvs].name + region.name, kind
    if kind == "district":
        return REGIONS[region.pool_admdvs].name + region.name, kind
    return region.name, kind


def _hospitals(rng: random.Random) -> list[HospitalRow]:
    rows: list[HospitalRow] = []
    for admdvs in TREATING_REGIONS:
        region = REGIONS[admdvs]
        prefix, kind = _hospital_prefix(region)
        patterns = _NAME_PATTERNS[kind]
        per_level = 2 if admdvs in FEATURED_REGIONS else 1
        towns = rng.sample(_TOWNS, 2)
        seq = 0
        for lv in (3, 2, 1):
            for i in range(per_level):
                seq += 1
                name = patterns[lv][i].format(p=prefix, t=towns[i])
                rows.append(HospitalRow(f"H{admdvs}{seq:05d}", name, admdvs, lv))
        if admdvs in FEATURED_REGIONS:  # designated pharmacies (定点药店) where the seed traffic buys drugs
            rows.append(HospitalRow(f"P{admdvs}00001", f"{prefix}{towns[0]}大药房", admdvs, 1))
    return rows


def _certno(rng: random.Random, area: str, birth: date, male: bool, taken: set[str]) -> str:
    while True:
        seq = rng.randrange(0, 500) * 2 + (1 if male else 0)
        first17 = f"{area}{birth:%Y%m%d}{seq:03d}"
        certno = first17 + certno_check_char(first17)
        if certno not in taken:
            taken.add(certno)
            return certno


def _name(rng: random.Random, male: bool) -> str:
    pool = _GIVEN_MALE if male else _GIVEN_FEMALE
    given = "".join(rng.choice(pool) for _ in range(rng.choice((1, 2, 2))))
    return rng.choice(_SURNAMES) + given


_S = TypeVar("_S", bound=str)


def _weighted(rng: random.Random, options: Sequence[tuple[_S, int]]) -> _S:
    return rng.choices([o for o, _ in options], weights=[w for _, w in options])[0]


def _person(rng: random.Random, admdvs: str, seq: int, certno: Callable[[date, bool], str]) -> PersonRow:
    assistance: Literal["1", "2"] | None = None
    insutype: Insutype
    balance_fen = 0
    if rng.random() < 0.45:
        insutype = "310"
        retired = rng.random() < 0.3
        civil = rng.random() < 0.1
        psn_type = ("12" if retired else "11") + ("02" if civil else "01")
        age = rng.randint(55, 90) if retired else rng.randint(20, 59)
        cap_fen = 2_000_000 if retired else 800_000
        balance_fen = 0 if rng.random() < 0.05 else rng.randint(1, cap_fen)
    else:
        insutype = "390"
        psn_type = _weighted(rng, (("1501", 50), ("1601", 25), ("1701", 25)))
        age = rng.randint(*_RESIDENT_AGES[psn_type])
        roll = rng.random()
        assistance = "1" if roll < 0.08 else "2" if roll < 0.11 else None
    chronic_p = 0.35 if age >= 60 else 0.15 if age >= 40 else 0.03
    chronic: list[ChronicDisease] = []
    if rng.random() < chronic_p:
        for _ in range(rng.choice((1, 1, 2))):
            disease = _weighted(rng, _CHRONIC_WEIGHTS)
            if disease not in chronic:
                chronic.append(disease)
    male = rng.random() < 0.5
    birth = date(DATA_YEAR - age - 1, 1, 1) + timedelta(days=rng.randrange(365))
    return PersonRow(
        psn_no=f"P{admdvs}{seq:08d}",
        insuplc_admdvs=admdvs,
        insutype=insutype,
        psn_type=psn_type,
        assistance=assistance,
        acct_balc=Decimal(balance_fen).scaleb(-2),
        chronic=chronic,
        certno=certno(birth, male),
        psn_name=_name(rng, male),
    )


def _persons(rng: random.Random, persons_per_region: int) -> list[PersonRow]:
    taken: set[str] = set()
    others = max(1, persons_per_region // 20)
    counts = {code: persons_per_region for code in SEED_REGIONS}
    for prov in PROVINCES:
        code = _first_sub_region(prov)
        counts.setdefault(code, others)
    return [
        _person(rng, admdvs, seq, lambda birth, male: _certno(rng, admdvs, birth, male, taken))  # noqa: B023 (called at once)
        for admdvs, n in counts.items()
        for seq in range(1, n + 1)
    ]


def _filing_dates(rng: random.Random, filing_type: str) -> tuple[date, date]:
    year_start, year_end = date(DATA_YEAR, 1, 1), date(DATA_YEAR, 12, 31)
    roll = rng.random()
    if roll < 0.10:  # expired last year
        begin = date(DATA_YEAR - 1, rng.randint(1, 6), 1)
        return begin, date(DATA_YEAR - 1, rng.randint(7, 12), 28)
    if roll < 0.15:  # starts in the second half of the year
        return date(DATA_YEAR, rng.randint(7, 10), 1), year_end
    if filing_type == "LONG_TERM":
        begin = date(rng.randint(DATA_YEAR - 3, DATA_YEAR - 1), rng.randint(1, 12), 1)
        return begin, date(DATA_YEAR + rng.randint(1, 3), 12, 31)
    begin = year_start - timedelta(days=rng.randint(0, 90))
    return begin, year_end


def _person_filings(rng: random.Random, person: PersonRow, seeded: set[str]) -> list[FilingRow]:
    admdvs = person.insuplc_admdvs
    if admdvs in SEED_FILINGS and admdvs not in seeded:
        seeded.add(admdvs)
        kind = SEED_FILINGS[admdvs]
        return [FilingRow(person.psn_no, kind, date(DATA_YEAR, 1, 1), date(DATA_YEAR, 12, 31), None)]
    if rng.random() >= 0.33:
        return []
    home = REGIONS[admdvs].prov_admdvs
    kinds = [_weighted(rng, _FILING_WEIGHTS)]
    if rng.random() < 0.1:
        kinds.append(_weighted(rng, _FILING_WEIGHTS))
    rows: list[FilingRow] = []
    seen: set[tuple[str, date, date, str | None]] = set()
    for kind in kinds:
        roll = rng.random()
        target = None if roll < 0.25 else home if roll < 0.4 else rng.choice([p for p in PROVINCES if p != home])
        begin, end = _filing_dates(rng, kind)
        if (kind, begin, end, target) in seen:
            continue
        seen.add((kind, begin, end, target))
        rows.append(FilingRow(person.psn_no, kind, begin, end, target))
    return rows


def _filings(rng: random.Random, persons: list[PersonRow]) -> list[FilingRow]:
    seeded: set[str] = set()
    return [row for person in persons for row in _person_filings(rng, person, seeded)]


def _catalog(rng: random.Random) -> list[CatalogRow]:
    rows: list[CatalogRow] = []
    for prov in PROVINCES:
        for item in CATALOG_ITEMS:
            if item.lv == "01":
                prop = Decimal(0)
            elif item.lv == "03":
                prop = Decimal(1)
            else:
                prop = _B10 if item.fixed else rng.choice(_B_RATIOS)
            ceiling = item.ceiling
            if ceiling is not None and not item.fixed:
                factor = Decimal(rng.randint(90, 110)) / 100
                ceiling = (ceiling * factor).quantize(Decimal("0.01"))
            rows.append(CatalogRow(prov, item.code, item.name, item.lv, prop, ceiling, item.once_per_day,
                                   item.gender_only, item.supply_days))
        short = REGIONS[prov].name[:2]
        rows.append(
            CatalogRow(prov, f"Z{prov[:2]}YNZJ0001", f"{short}医疗机构制剂·清肺止咳合剂", "02", rng.choice(_B_RATIOS))
        )
    return rows


def generate(seed: int = 7, persons_per_region: int = 200) -> RefDataSet:
    if not 1 <= persons_per_region <= PERSONS_PER_REGION_MAX:
        raise ValueError(f"persons_per_region must be within 1..{PERSONS_PER_REGION_MAX}")
    rng = random.Random(seed)
    hospitals = _hospitals(rng)
    persons = _persons(rng, persons_per_region)
    filings = _filings(rng, persons)
    # Its own stream: the same catalog whatever the size, and the national mode's (they share databases).
    catalog = _catalog(random.Random(f"{seed}:catalog"))
    return RefDataSet(hospitals=hospitals, persons=persons, filings=filings, catalog=catalog)


def write_jsonl(dataset: RefDataSet, out_dir: str | Path) -> dict[str, int]:
    """Write the four files (one JSON object per line); returns rows written per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = msgspec.json.Encoder()
    files: dict[str, Sequence[msgspec.Struct]] = {
        HOSPITALS_FILE: dataset.hospitals,
        PERSONS_FILE: dataset.persons,
        FILINGS_FILE: dataset.filings,
        CATALOG_FILE: dataset.catalog,
    }
    for name, rows in files.items():
        buf = bytearray()
        for row in rows:
            encoder.encode_into(row, buf, -1)
            buf += b"\n"
        tmp = out / (name + ".tmp")
        tmp.write_bytes(bytes(buf))
        tmp.replace(out / name)
    return {name: len(rows) for name, rows in files.items()}


# National shape, streamed ----------------------------------------------------------------------

# Insured persons of the seed regions (REFERENCE §10): 赤峰 4.00 M, 开州 1.61 M, 莆田 ~2.9 M,
# 太原 ~4.5 M, 米易 ~0.2 M — about 13.2 million.
NATIONAL_PERSONS: Final[dict[str, int]] = {
    "150400": 4_000_000,
    "500154": 1_610_000,
    "510421": 200_000,
    "350300": 2_900_000,
    "140100": 4_500_000,
}
# The national population lives beside the default reference data (the demo's and the tests', loaded into
# the same databases): its psn_no sequence and certificate area codes start where the default's never reach.
NATIONAL_FIRST_SEQ: Final = 50_000_001
NATIONAL_AREA_OFFSET: Final = 50
OTHER_PROVINCE_PERSONS: Final = 1_000  # visitors insured elsewhere, in each other province's first region
# About 650,000 designated institutions for 1.33 billion insured: one per ~2,000 persons, about
# half of them pharmacies; hospitals mostly level 1 (clinics, township health centres).
PERSONS_PER_INSTITUTION: Final = 2_000
_DENSE_LEVELS: Final[tuple[Literal[1, 2, 3], ...]] = (3,) * 5 + (2,) * 15 + (1,) * 80  # per cent
_FIRST_DENSE_SEQ: Final = 101  # after the featured hospitals' and pharmacy's sequence numbers
_FLUSH_BYTES: Final = 1 << 20


def national_counts(scale: float = 1.0) -> dict[str, int]:
    """Persons per insured region at national shape times `scale` (at least 1 each)."""
    if not 0 < scale <= 10:
        raise ValueError("scale must be within (0, 10]")
    counts = {code: max(1, round(n * scale)) for code, n in NATIONAL_PERSONS.items()}
    for prov in PROVINCES:
        counts.setdefault(_first_sub_region(prov), max(1, round(OTHER_PROVINCE_PERSONS * scale)))
    return counts


class _CertnoAllocator:
    """Unique certificate numbers without remembering them: a counter per (birth date, gender) picks
    the 3-digit sequence and, past 500, the next area code of the prefecture. Memory: one counter per
    day of birth and gender (an array of ~70,000 ints), not per person."""

    _FIRST_BIRTH: Final = date(DATA_YEAR - 100, 1, 1).toordinal()

    def __init__(self, admdvs: str) -> None:
        # Area codes from the region's + 50: never one the default generator's persons of the region use.
        self.prefix, self.area = admdvs[:4], int(admdvs[4:]) + NATIONAL_AREA_OFFSET
        self.used = array("I", bytes(4 * 2 * (date(DATA_YEAR, 12, 31).toordinal() - self._FIRST_BIRTH + 1)))

    def __call__(self, birth: date, male: bool) -> str:
        i = 2 * (birth.toordinal() - self._FIRST_BIRTH) + male
        n = self.used[i]
        if n >= 500 * 100:
            raise ValueError("more than 50,000 persons born on one day in one region")
        self.used[i] = n + 1
        first17 = f"{self.prefix}{(self.area + n // 500) % 100:02d}{birth:%Y%m%d}{n % 500 * 2 + male:03d}"
        return first17 + certno_check_char(first17)


def _dense_institutions(rng: random.Random, admdvs: str, persons: int) -> list[HospitalRow]:
    """Extra hospitals and pharmacies of a seed region at national density."""
    region = REGIONS[admdvs]
    prefix, _ = _hospital_prefix(region)
    n = persons // PERSONS_PER_INSTITUTION
    rows: list[HospitalRow] = []
    for i in range(n // 2):
        lv = rng.choice(_DENSE_LEVELS)
        seq = _FIRST_DENSE_SEQ + i
        kind = {3: "医院", 2: "医院", 1: "卫生院"}[lv]
        rows.append(HospitalRow(f"H{admdvs}{seq:05d}", f"{prefix}{rng.choice(_TOWNS)}第{i + 1}{kind}", admdvs, lv))
    for i in range(n - n // 2):
        seq = _FIRST_DENSE_SEQ + i
        rows.append(HospitalRow(f"P{admdvs}{seq:05d}", f"{prefix}{rng.choice(_TOWNS)}大药房第{i + 1}分店", admdvs, 1))
    return rows


def _national_persons(seed: int, counts: dict[str, int]) -> Iterator[tuple[PersonRow, list[FilingRow]]]:
    seeded: set[str] = set()
    for admdvs, n in counts.items():
        rng = random.Random(f"{seed}:persons:{admdvs}")  # one stream per region: sizes do not shift others
        certno = _CertnoAllocator(admdvs)
        for seq in range(NATIONAL_FIRST_SEQ, NATIONAL_FIRST_SEQ + n):
            person = _person(rng, admdvs, seq, certno)
            yield person, _person_filings(rng, person, seeded)


class _LineWriter:
    """JSON Lines to `<name>.tmp`, renamed into place by `close` (a killed run leaves no half file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = self.tmp.open("wb")
        self.buf = bytearray()
        self.rows = 0
        self.encoder = msgspec.json.Encoder()

    def write(self, row: msgspec.Struct) -> None:
        self.encoder.encode_into(row, self.buf, -1)
        self.buf += b"\n"
        self.rows += 1
        if len(self.buf) >= _FLUSH_BYTES:
            self.f.write(self.buf)
            self.buf.clear()

    def close(self) -> None:
        self.f.write(self.buf)
        self.f.close()
        self.tmp.replace(self.path)


def write_national(out_dir: str | Path, seed: int = 7, scale: float = 1.0) -> dict[str, int]:
    """Write the four files at national shape (`scale` 1: ~13.2 M persons), streaming: persons and
    their filings are written as they are made, never held. Deterministic for a seed and scale."""
    counts = national_counts(scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    hospitals = _hospitals(rng)
    for admdvs in NATIONAL_PERSONS:
        hospitals += _dense_institutions(random.Random(f"{seed}:institutions:{admdvs}"), admdvs, counts[admdvs])
    writers = {name: _LineWriter(out / name) for name in (HOSPITALS_FILE, PERSONS_FILE, FILINGS_FILE, CATALOG_FILE)}
    for h in hospitals:
        writers[HOSPITALS_FILE].write(h)
    for c in _catalog(random.Random(f"{seed}:catalog")):
        writers[CATALOG_FILE].write(c)
    for person, filings in _national_persons(seed, counts):
        writers[PERSONS_FILE].write(person)
        for f in filings:
            writers[FILINGS_FILE].write(f)
    for w in writers.values():
        w.close()
    return {name: w.rows for name, w in writers.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", required=True, type=Path, help="directory for the four .jsonl files")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--national", action="store_true",
                        help="the seed regions at their real sizes (~13.2 M persons), streamed; see --scale/--persons")
    parser.add_argument("--scale", type=float, help="with --national: multiply every size (e.g. 0.01)")
    parser.add_argument("--persons", type=int, help="with --national: about this many persons in all")
    parser.add_argument(
        "--persons-per-region",
        type=int,
        default=200,
        help=f"persons insured in each seed region (1..{PERSONS_PER_REGION_MAX})",
    )
    args = parser.parse_args(argv)
    try:
        if args.national or args.scale is not None or args.persons is not None:
            if args.scale is not None and args.persons is not None:
                parser.error("--scale and --persons exclude each other")
            scale = args.scale or (args.persons / sum(NATIONAL_PERSONS.values()) if args.persons else 1.0)
            counts = write_national(args.out, args.seed, scale)
        else:
            counts = write_jsonl(generate(args.seed, args.persons_per_region), args.out)
    except ValueError as exc:
        parser.error(str(exc))
    for name, n in counts.items():
        print(f"{args.out / name}: {n} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
