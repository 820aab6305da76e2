"""What the dashboard shows, as one JSON document (`/api/overview`).

Month figures (person-times, rates, money between provinces, deposits) come from
PostgreSQL — the ledger and the clearing tables — so the page shows what the ledger
says. Windows (1 h / 24 h rates), trends, throughput, latency, errors, lag and
alerts come from Prometheus. A source that does not answer leaves its panels empty
and is named in `sources`; the rest of the page still renders.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import asyncpg

from schemas.codes import NON_LOCAL_SCOPES
from services.clearing import store
from services.dashboard.names import FUND_NAMES, SCOPE_NAMES, VISIT_TYPE_NAMES, province_name, seed_regions
from services.monitor.ledger import FUND_COLUMNS, MonthFigures
from services.monitor.targets import Target

PROM_TIMEOUT_S: Final = 5.0
TREND_HOURS_MAX: Final = 48
NON_LOCAL: Final = NON_LOCAL_SCOPES
HEADLINE: Final = ("cross_province", "inpatient")

# Live figures: name → PromQL (instant vectors).
LIVE_QUERIES: Final[Mapping[str, str]] = {
    "rate_1h": "xs:direct_settlement_rate:ratio_1h",
    "rate_24h": "xs:direct_settlement_rate:ratio_24h",
    "settlements_per_min": 'sum(rate(xs_settlements_total{kind="settle"}[1m])) * 60',
    "requests_per_min": 'sum(rate(xs_requests_total{stage="gateway"}[1m])) * 60',
    "e2e_p50_s": "histogram_quantile(0.5, sum by (le) (rate(xs_settlement_end_to_end_seconds_bucket[5m])))",
    "e2e_p99_s": "histogram_quantile(0.99, sum by (le) (rate(xs_settlement_end_to_end_seconds_bucket[5m])))",
    "gateway_p99_s": "histogram_quantile(0.99, sum by (le) (rate(xs_gateway_request_seconds_bucket[5m])))",
    "rejected_5m": "sum by (stage, reason) (increase(xs_dead_letters_total[5m])) > 0",
    "timeouts_5m": 'sum(increase(xs_requests_total{outcome="TIMEOUT"}[5m]))',
    "lag": "sum by (group) (xs_kafka_consumer_lag_messages)",
    "up": "up",
}
# Trends: name → (PromQL, step in seconds per hour of range).
TREND_QUERIES: Final[Mapping[str, str]] = {
    "rate_by_province": 'xs:direct_settlement_rate:ratio_1h{scope="cross_province",visit_type="inpatient"}',
    "rate_national": (
        'sum(xs:person_times:increase1h{kind="direct",scope="cross_province",visit_type="inpatient"})'
        ' / sum(xs:person_times:increase1h{scope="cross_province",visit_type="inpatient"})'
    ),
    "settlements_per_min": 'sum(rate(xs_settlements_total{kind="settle"}[1m])) * 60',
    "rejected_per_min": "sum(rate(xs_dead_letters_total[1m])) * 60",
    "e2e_p99_s": "histogram_quantile(0.99, sum by (le) (rate(xs_settlement_end_to_end_seconds_bucket[1m])))",
    "e2e_p50_s": "histogram_quantile(0.5, sum by (le) (rate(xs_settlement_end_to_end_seconds_bucket[1m])))",
}


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def _get(self, path: str, params: Mapping[str, str]) -> Any:
        timeout = aiohttp.ClientTimeout(total=PROM_TIMEOUT_S)
        async with self.session.get(f"{self.base_url}{path}", params=params, timeout=timeout) as resp:
            body = await resp.json(content_type=None)
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/query", {"query": expr})
        return list(data["result"]) if data["resultType"] == "vector" else []

    async def query_range(self, expr: str, start: float, end: float, step_s: int) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/query_range",
                               {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s}s"})
        return list(data["result"])

    async def alerts(self) -> list[dict[str, Any]]:
        return list((await self._get("/api/v1/alerts", {}))["alerts"])


@dataclass
class Live:
    vectors: dict[str, list[dict[str, Any]]]
    trends: dict[str, list[dict[str, Any]]]
    alerts: list[dict[str, Any]]
    error: str | None


async def fetch_live(prom: Prometheus, trend_hours: int) -> Live:
    end = time.time()
    hours = max(1, min(trend_hours, TREND_HOURS_MAX))
    start, step = end - hours * 3600, max(5, hours * 3600 // 240)
    names = list(LIVE_QUERIES)
    trend_names = list(TREND_QUERIES)
    try:
        results = await asyncio.gather(
            *(prom.query(LIVE_QUERIES[n]) for n in names),
            *(prom.query_range(TREND_QUERIES[n], start, end, step) for n in trend_names),
            prom.alerts(),
        )
    except (aiohttp.ClientError, TimeoutError, PrometheusError, ValueError, KeyError) as e:
        return Live({}, {}, [], f"Prometheus: {type(e).__name__}: {e}")
    vectors = dict(zip(names, results[: len(names)], strict=True))
    trends = dict(zip(trend_names, results[len(names): len(names) + len(trend_names)], strict=True))
    return Live(vectors, trends, results[-1], None)


# --- clearing tables (services/clearing) ----------------------------------------------------------


async def fetch_clearing(pool: asyncpg.Pool, month: str) -> tuple[list[asyncpg.Record], list[tuple[str, int, int]]]:
    """This month's province positions and every deposit (balance, warning line in force), in fen."""
    async with pool.acquire() as conn:
        return await store.province_positions(conn, month), await store.deposits(conn)


# --- assembly (pure) -----------------------------------------------------------------------------


def _label_key(sample: Mapping[str, Any], *names: str) -> tuple[str, ...]:
    return tuple(sample["metric"].get(n, "") for n in names)


def _value(sample: Mapping[str, Any]) -> float | None:
    try:
        v = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if v != v else v  # NaN → None


def _scalar(vector: list[dict[str, Any]] | None) -> float | None:
    return _value(vector[0]) if vector else None


def _bilingual(names: Mapping[str, tuple[str, str]], code: str) -> dict[str, str]:
    zh, en = names.get(code, (code, code))
    return {"code": code, "zh": zh, "en": en}


def rate_rows(month: MonthFigures, targets: Iterable[Target], live: Live) -> list[dict[str, Any]]:
    """One row per insured province × non-local scope × visit type: this month's person-times from the
    ledger, the rate, the target, and the 1 h / 24 h rates from Prometheus."""
    direct: dict[tuple[str, str, str], int] = defaultdict(int)
    manual: dict[tuple[str, str, str], int] = defaultdict(int)
    for (ins, _trt, scope, vt), cell in month.cells.items():
        if scope in NON_LOCAL:
            direct[(ins, scope, vt)] += cell.direct
            manual[(ins, scope, vt)] += cell.manual
    target_of = {(t.insured_prov, t.scope, t.visit_type): t.ratio for t in targets}
    seeds = {r["province"] for r in seed_regions()}
    keys = set(direct) | set(manual) | {(p, *HEADLINE) for p in seeds}
    windows = {
        name: {_label_key(s, "insured_prov", "scope", "visit_type"): _value(s) for s in live.vectors.get(name, [])}
        for name in ("rate_1h", "rate_24h")
    }
    rows = []
    for key in sorted(keys):
        ins, scope, vt = key
        d, m = direct.get(key, 0), manual.get(key, 0)
        rate = d / (d + m) if d + m > 0 and d >= 0 else None
        target = target_of.get(key)
        rows.append({
            "insured_prov": ins, "insured_name": province_name(ins), "seed": ins in seeds,
            "scope": _bilingual(SCOPE_NAMES, scope), "visit_type": _bilingual(VISIT_TYPE_NAMES, vt),
            "direct": d, "manual": m, "rate": rate, "target": target,
            "below_target": rate is not None and target is not None and rate < target,
            "rate_1h": windows["rate_1h"].get(key), "rate_24h": windows["rate_24h"].get(key),
        })
    return rows


def national_rows(month: MonthFigures, targets: Iterable[Target]) -> list[dict[str, Any]]:
    direct: dict[tuple[str, str], int] = defaultdict(int)
    manual: dict[tuple[str, str], int] = defaultdict(int)
    for (_ins, _trt, scope, vt), cell in month.cells.items():
        if scope in NON_LOCAL:
            direct[(scope, vt)] += cell.direct
            manual[(scope, vt)] += cell.manual
    default_target = {(t.scope, t.visit_type): t.ratio for t in targets}
    rows = []
    for key in sorted(set(direct) | set(manual)):
        d, m = direct[key], manual[key]
        rows.append({"scope": _bilingual(SCOPE_NAMES, key[0]), "visit_type": _bilingual(VISIT_TYPE_NAMES, key[1]),
                     "direct": d, "manual": m, "rate": d / (d + m) if d + m > 0 and d >= 0 else None,
                     "target": default_target.get(key)})
    return rows


def position_rows(month: MonthFigures, clearing: list[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Cross-province net amounts this month (insured province owes treating province), per fund, in fen:
    the clearing service's running positions; summed from the ledger while it has recorded none."""
    amounts: dict[tuple[str, str], dict[str, int]] = {}
    people: dict[tuple[str, str], int] = defaultdict(int)
    for (ins, trt, _scope, _vt), cell in month.cells.items():
        if ins != trt:
            people[(ins, trt)] += cell.direct
    rows = [r for r in clearing if r["insured_prov"].strip() != r["treating_prov"].strip()]
    if rows:
        source = "clearing_position"
        for r in rows:
            amounts[(r["insured_prov"].strip(), r["treating_prov"].strip())] = {f: int(r[f]) for f in FUND_COLUMNS}
    else:
        source = "ledger"
        for (ins, trt, _scope, _vt), cell in month.cells.items():
            if ins != trt:
                acc = amounts.setdefault((ins, trt), dict.fromkeys(FUND_COLUMNS, 0))
                for f in FUND_COLUMNS:
                    acc[f] += cell.funds_fen[f]
    out = [
        {"insured_prov": ins, "insured_name": province_name(ins), "treating_prov": trt,
         "treating_name": province_name(trt), "funds_fen": funds, "total_fen": sum(funds.values()),
         "person_times": people[(ins, trt)]}
        for (ins, trt), funds in sorted(amounts.items())
    ]
    return source, out


def deposit_rows(deposits: Iterable[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Balances and warning lines in force, from the clearing tables; `below` as the clearing service
    alerts: at or below a positive line."""
    return [
        {"insured_prov": prov.strip(), "insured_name": province_name(prov.strip()), "balance_yuan": balance / 100,
         "warning_line_yuan": line / 100, "below": line > 0 and balance <= line}
        for prov, balance, line in sorted(deposits)
    ]


def trend_series(live: Live) -> dict[str, list[dict[str, Any]]]:
    def pts(values: list[list[Any]]) -> list[list[float]]:
        out = []
        for t, v in values:
            f = float(v)
            if f == f:
                out.append([float(t), f])
        return out

    out: dict[str, list[dict[str, Any]]] = {}
    for name, series in live.trends.items():
        out[name] = [
            {"label": s["metric"].get("insured_prov", ""), "name": province_name(s["metric"].get("insured_prov", "")),
             "points": pts(s["values"])}
            for s in series
        ]
    return out


def now_figures(live: Live) -> dict[str, Any]:
    v = live.vectors
    return {
        "settlements_per_min": _scalar(v.get("settlements_per_min")),
        "requests_per_min": _scalar(v.get("requests_per_min")),
        "e2e_p50_s": _scalar(v.get("e2e_p50_s")),
        "e2e_p99_s": _scalar(v.get("e2e_p99_s")),
        "gateway_p99_s": _scalar(v.get("gateway_p99_s")),
        "timeouts_5m": _scalar(v.get("timeouts_5m")),
        "rejected_5m": sorted(
            ({"stage": s["metric"].get("stage", ""), "reason": s["metric"].get("reason", ""), "count": _value(s)}
             for s in v.get("rejected_5m", [])), key=lambda r: -(r["count"] or 0)),
        "lag": [{"group": s["metric"].get("group", ""), "lag": _value(s)} for s in v.get("lag", [])],
        "services": sorted(({"job": s["metric"].get("job", ""), "up": _value(s) == 1} for s in v.get("up", [])),
                           key=lambda r: str(r["job"])),
    }


# Alert names of deploy/prometheus/rules/alerts.yml, for people: (中文, English).
ALERT_TITLES: Final[Mapping[str, tuple[str, str]]] = {
    "DirectSettlementRateBelowTarget": ("直接结算率低于目标（近24小时）",
                                        "direct-settlement rate below target, last 24 h"),
    "DirectSettlementRateBelowTargetThisMonth": ("本月直接结算率低于目标",
                                                 "this month's direct-settlement rate below target"),
    "DepositBelowWarningLine": ("预付金低于预警线", "advance deposit at or below its warning line"),
    "DeadLettersRising": ("被拒绝的请求增多", "rejected requests (dead letters) rising"),
    "ConsumerLagGrowing": ("消息积压增长", "Kafka consumer lag growing"),
    "SettlementLatencyP99High": ("结算耗时超过目标", "settlement p99 time above objective"),
    "ProduceErrors": ("Kafka 写入失败", "Kafka produce errors"),
    "ServiceDown": ("服务不可用", "service not answering"),
}


def _subject(labels: Mapping[str, str]) -> str:
    """What an alert is about, in words: a province and route, an error code, a group, a transaction."""
    if "insured_prov" in labels:
        parts = [province_name(labels["insured_prov"])]
        if "scope" in labels:
            parts.append(SCOPE_NAMES.get(labels["scope"], (labels["scope"],))[0])
        if "visit_type" in labels:
            parts.append(VISIT_TYPE_NAMES.get(labels["visit_type"], (labels["visit_type"],))[0])
        return " ".join(parts)
    if "reason" in labels:
        return f"{labels['reason']} ({labels.get('stage', '')})"
    if "group" in labels:
        return labels["group"]
    if "infno" in labels:
        return f"infno {labels['infno']}"
    if "topic" in labels:
        return f"{labels.get('job', '')} → {labels['topic']}"
    return labels.get("job", "")


def alert_rows(live: Live) -> list[dict[str, Any]]:
    rows = []
    for a in live.alerts:
        labels = a.get("labels", {})
        name = labels.get("alertname", "")
        zh, en = ALERT_TITLES.get(name, (name, name))
        rows.append({"name": name, "title_zh": zh, "title_en": en, "state": a.get("state", ""),
                     "severity": labels.get("severity", ""), "subject": _subject(labels),
                     "summary": a.get("annotations", {}).get("summary", ""),
                     "description": a.get("annotations", {}).get("description", ""), "since": a.get("activeAt", "")})
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(rows, key=lambda r: (r["state"] != "firing", order.get(r["severity"], 3), r["name"], r["subject"]))


def assemble(month: MonthFigures, targets: list[Target], clearing_positions: list[Mapping[str, Any]],
             deposits: Iterable[tuple[str, int, int]], live: Live, generated_at: float) -> dict[str, Any]:
    source, positions = position_rows(month, clearing_positions)
    non_local = [c for k, c in month.cells.items() if k[2] in NON_LOCAL]
    return {
        "generated_at": generated_at,
        "month": month.month,
        "totals": {
            "direct": sum(c.direct for c in non_local),
            "manual": sum(c.manual for c in non_local),
            "fund_fen": sum(c.fund_fen for c in non_local),
            "medfee_fen": sum(c.medfee_fen for c in non_local),
            "local_settled": sum(c.settled - c.reversed for k, c in month.cells.items() if k[2] == "local"),
        },
        "rates": rate_rows(month, targets, live),
        "national": national_rows(month, targets),
        "positions": positions,
        "positions_source": source,
        "funds": [{"code": f, "zh": FUND_NAMES[f][0], "en": FUND_NAMES[f][1]} for f in FUND_COLUMNS],
        "deposits": deposit_rows(deposits),
        "trends": trend_series(live),
        "now": now_figures(live),
        "alerts": alert_rows(live),
        "seeds": seed_regions(),
        "sources": {"ledger": "ok", "prometheus": live.error or "ok"},
    }
