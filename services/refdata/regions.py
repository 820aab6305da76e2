"""The region table (医保区划) as data, and the scope rules built on it.

A region code (`admdvs`) is 6 digits: the first 2 name the province, the first 4
the prefecture. Every region's province and pooling region (统筹区) are stored in
its table row, computed once when the table is built from two pieces of data:

- `PROVINCE_POOLED`: provinces whose pooling region is the province itself
  (the four municipalities 北京 11, 天津 12, 上海 31, 重庆 50);
- `_POOL_OVERRIDES`: single regions that pool on their own (省直辖县级市);
- every other region pools at its prefecture `XXXX00`.

Codes not in the table (`region_of`): a county or district code is accepted when
its parent is in the table — the prefecture `XXXX00`, or the province for a
municipality — and inherits the parent's province and pooling region, so a
hospital in a county the table does not list still classifies correctly. A
prefecture or province code not in the table, a county whose parent is unknown,
and anything that is not 6 digits raise `UnknownRegion`. The table lists every
province, so only counties and prefectures are ever derived or refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from schemas.codes import SCOPE_CROSS_PROVINCE, SCOPE_INTRA_PROVINCE, SCOPE_LOCAL, Scope


class UnknownRegion(LookupError):
    """A region code that is malformed or not derivable from the region table."""


@dataclass(frozen=True, slots=True)
class Region:
    admdvs: str
    name: str
    prov_admdvs: str
    pool_admdvs: str

    @property
    def is_province(self) -> bool:
        return self.admdvs == self.prov_admdvs


# Provinces whose pooling region is the whole province (直辖市).
PROVINCE_POOLED: Final[frozenset[str]] = frozenset({"110000", "120000", "310000", "500000"})

# Regions that are their own pooling region although their prefecture code is
# not a prefecture (省直辖县级行政区划).
_POOL_OVERRIDES: Final[Mapping[str, str]] = {"429004": "429004"}

# Province code → (name, ((sub-region code, name), ...)). Sub-regions are real
# prefectures, municipal districts and counties; the list is a sample, not the
# full national table.
_TABLE: Final[dict[str, tuple[str, tuple[tuple[str, str], ...]]]] = {
    "110000": ("北京市", (("110101", "东城区"), ("110102", "西城区"), ("110105", "朝阳区"), ("110108", "海淀区"))),
    "120000": ("天津市", (("120101", "和平区"), ("120103", "河西区"), ("120104", "南开区"))),
    "130000": ("河北省", (("130100", "石家庄市"), ("130200", "唐山市"), ("130400", "邯郸市"), ("130600", "保定市"))),
    "140000": (
        "山西省",
        (("140100", "太原市"), ("140105", "小店区"), ("140106", "迎泽区"), ("140200", "大同市"), ("140400", "长治市")),
    ),
    "150000": (
        "内蒙古自治区",
        (
            ("150100", "呼和浩特市"),
            ("150200", "包头市"),
            ("150400", "赤峰市"),
            ("150402", "红山区"),
            ("150404", "松山区"),
            ("150421", "阿鲁科尔沁旗"),
        ),
    ),
    "210000": ("辽宁省", (("210100", "沈阳市"), ("210200", "大连市"), ("210300", "鞍山市"))),
    "220000": ("吉林省", (("220100", "长春市"), ("220200", "吉林市"), ("220300", "四平市"))),
    "230000": ("黑龙江省", (("230100", "哈尔滨市"), ("230200", "齐齐哈尔市"), ("230600", "大庆市"))),
    "310000": ("上海市", (("310101", "黄浦区"), ("310104", "徐汇区"), ("310115", "浦东新区"))),
    "320000": ("江苏省", (("320100", "南京市"), ("320200", "无锡市"), ("320500", "苏州市"))),
    "330000": ("浙江省", (("330100", "杭州市"), ("330200", "宁波市"), ("330300", "温州市"))),
    "340000": ("安徽省", (("340100", "合肥市"), ("340200", "芜湖市"), ("340300", "蚌埠市"))),
    "350000": (
        "福建省",
        (
            ("350100", "福州市"),
            ("350200", "厦门市"),
            ("350300", "莆田市"),
            ("350302", "城厢区"),
            ("350303", "涵江区"),
            ("350500", "泉州市"),
        ),
    ),
    "360000": ("江西省", (("360100", "南昌市"), ("360400", "九江市"), ("360700", "赣州市"))),
    "370000": ("山东省", (("370100", "济南市"), ("370200", "青岛市"), ("370600", "烟台市"))),
    "410000": ("河南省", (("410100", "郑州市"), ("410300", "洛阳市"), ("410700", "新乡市"))),
    "420000": ("湖北省", (("420100", "武汉市"), ("420500", "宜昌市"), ("420600", "襄阳市"), ("429004", "仙桃市"))),
    "430000": ("湖南省", (("430100", "长沙市"), ("430200", "株洲市"), ("430300", "湘潭市"))),
    "440000": ("广东省", (("440100", "广州市"), ("440300", "深圳市"), ("440600", "佛山市"))),
    "450000": ("广西壮族自治区", (("450100", "南宁市"), ("450200", "柳州市"), ("450300", "桂林市"))),
    "460000": ("海南省", (("460100", "海口市"), ("460200", "三亚市"))),
    "500000": ("重庆市", (("500101", "万州区"), ("500103", "渝中区"), ("500106", "沙坪坝区"), ("500154", "开州区"))),
    "510000": (
        "四川省",
        (
            ("510100", "成都市"),
            ("510104", "锦江区"),
            ("510400", "攀枝花市"),
            ("510402", "东区"),
            ("510421", "米易县"),
            ("510422", "盐边县"),
            ("510700", "绵阳市"),
        ),
    ),
    "520000": ("贵州省", (("520100", "贵阳市"), ("520300", "遵义市"))),
    "530000": ("云南省", (("530100", "昆明市"), ("530300", "曲靖市"), ("530400", "玉溪市"))),
    "540000": ("西藏自治区", (("540100", "拉萨市"), ("540200", "日喀则市"))),
    "610000": ("陕西省", (("610100", "西安市"), ("610300", "宝鸡市"), ("610400", "咸阳市"))),
    "620000": ("甘肃省", (("620100", "兰州市"), ("620200", "嘉峪关市"))),
    "630000": ("青海省", (("630100", "西宁市"), ("630200", "海东市"))),
    "640000": ("宁夏回族自治区", (("640100", "银川市"), ("640200", "石嘴山市"))),
    "650000": ("新疆维吾尔自治区", (("650100", "乌鲁木齐市"), ("650200", "克拉玛依市"))),
}

# The seed regions of the planning documents: 赤峰, 开州 (pools at 重庆), 米易 (pools at 攀枝花), 莆田, 太原.
SEED_REGIONS: Final[tuple[str, ...]] = ("150400", "500154", "510421", "350300", "140100")


def _is_code(admdvs: object) -> bool:
    return isinstance(admdvs, str) and len(admdvs) == 6 and admdvs.isascii() and admdvs.isdigit()


def _parent_code(admdvs: str) -> str:
    """The code a table-less region inherits from: its prefecture, or its province for a municipality."""
    prov = admdvs[:2] + "0000"
    return prov if prov in PROVINCE_POOLED else admdvs[:4] + "00"


def _pool_code(admdvs: str) -> str:
    return _POOL_OVERRIDES.get(admdvs) or _parent_code(admdvs)


def _build() -> dict[str, Region]:
    table: dict[str, Region] = {}
    for prov, (prov_name, subs) in _TABLE.items():
        if not (_is_code(prov) and prov.endswith("0000")):
            raise ValueError(f"region table: bad province code {prov!r}")
        table[prov] = Region(prov, prov_name, prov, prov)  # a province row pools at itself (省本级)
        for code, name in subs:
            if not _is_code(code) or code[:2] != prov[:2] or code == prov:
                raise ValueError(f"region table: {code!r} does not belong to province {prov}")
            if code in table:
                raise ValueError(f"region table: {code} listed twice")
            table[code] = Region(code, name, prov, _pool_code(code))
    # Every pooling region must itself be a row, so a pool's name is always known.
    for region in table.values():
        if region.pool_admdvs not in table:
            raise ValueError(f"region table: pooling region {region.pool_admdvs} of {region.admdvs} is missing")
    for seed in SEED_REGIONS:
        if seed not in table:
            raise ValueError(f"region table: seed region {seed} is missing")
    return table


REGIONS: Final[Mapping[str, Region]] = MappingProxyType(_build())

PROVINCES: Final[tuple[str, ...]] = tuple(code for code, r in REGIONS.items() if r.is_province)


def region_of(admdvs: str) -> Region:
    """The region for `admdvs`; a county/district not in the table inherits from its parent (module doc)."""
    region = REGIONS.get(admdvs)
    if region is not None:
        return region
    if not _is_code(admdvs):
        raise UnknownRegion("region code must be 6 digits")
    if admdvs.endswith("00"):
        # A prefecture (or province) the table does not list: not derivable.
        raise UnknownRegion(f"unknown region {admdvs}")
    parent = REGIONS.get(_parent_code(admdvs))
    if parent is None:
        raise UnknownRegion(f"unknown region {admdvs}")
    return Region(admdvs, f"{parent.name}所辖区县{admdvs}", parent.prov_admdvs, parent.pool_admdvs)


def pool_of(admdvs: str) -> str:
    return region_of(admdvs).pool_admdvs


def province_of(admdvs: str) -> str:
    return region_of(admdvs).prov_admdvs


def is_known(admdvs: str) -> bool:
    try:
        region_of(admdvs)
    except UnknownRegion:
        return False
    return True


def classify_scope(insured_admdvs: str, treating_admdvs: str) -> Scope:
    """local: same pooling region; intra_province: same province; else cross_province."""
    insured = region_of(insured_admdvs)
    treating = region_of(treating_admdvs)
    if insured.pool_admdvs == treating.pool_admdvs:
        return SCOPE_LOCAL
    if insured.prov_admdvs == treating.prov_admdvs:
        return SCOPE_INTRA_PROVINCE
    return SCOPE_CROSS_PROVINCE
