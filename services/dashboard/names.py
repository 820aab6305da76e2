"""Bilingual names for the codes the dashboard shows (中文 / English)."""

from __future__ import annotations

from typing import Final

from schemas.codes import FUND_NAMES as FUND_NAMES  # (zh, en) of each fund, for the dashboard
from services.refdata.regions import REGIONS, SEED_REGIONS, province_of

SCOPE_NAMES: Final = {
    "local": ("本地", "local"),
    "intra_province": ("省内异地", "intra-province"),
    "cross_province": ("跨省异地", "cross-province"),
}
VISIT_TYPE_NAMES: Final = {
    "inpatient": ("住院", "inpatient"),
    "general_outpatient": ("普通门诊", "general outpatient"),
    "chronic_outpatient": ("门诊慢特病", "chronic-disease outpatient"),
    "pharmacy": ("定点药店", "pharmacy"),
    "outpatient": ("门诊", "outpatient"),
}
# Published baselines of the seed regions (REFERENCE §1), shown next to their targets.
SEED_NOTES: Final = {
    "150400": "2020 跨省住院直接结算率 64% / 64% in 2020",
    "510421": "省内住院直接结算率 58% → ≥70% / intra-province 58% → ≥70%",
}


def province_name(prov: str) -> str:
    r = REGIONS.get(prov)
    return r.name if r else prov


def seed_regions() -> list[dict[str, str]]:
    return [
        {"admdvs": code, "name": REGIONS[code].name if code in REGIONS else code, "province": province_of(code),
         "province_name": province_name(province_of(code)), "note": SEED_NOTES.get(code, "")}
        for code in SEED_REGIONS
    ]
