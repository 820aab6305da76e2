"""A region's clearing statement for a month, from a month statement body (`logic.month_statement`):
JSON, CSV and a printable HTML page. Pure: no I/O.

A region is a pooling region (统筹区, e.g. 510400) or a province (XX0000). Its statement lists
what it owes as insured region (payable, per counterparty), what it is owed as treating region
(receivable), and its net position (receivable − payable), each fund separately and in total,
with person-times: settled, reversed, adjustments (rows of an earlier closed month), net. A
province's own intra-province flows are listed as internal: they move nothing at province level.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.codec import encode
from schemas.money import to_yuan
from services.clearing.logic import (
    AMOUNT_FIELDS,
    FUND_NAMES,
    ZERO,
    Amounts,
    PairLine,
    RegionNet,
)
from services.refdata.regions import PROVINCE_POOLED, UnknownRegion, region_of


@dataclass(frozen=True, slots=True)
class RegionStatement:
    region: str
    region_name: str
    level: str  # pool | province
    clr_month: str
    status: str  # closed | provisional
    version: int
    closed_at: str
    digest: str
    payable: list[PairLine]
    receivable: list[PairLine]
    internal: PairLine | None
    net: RegionNet
    adjustments: tuple[Mapping[str, Any], ...] = ()  # operator adjustments of this version naming the region


def _adjustments_of(body: Mapping[str, Any], region: str, level: str) -> tuple[Mapping[str, Any], ...]:
    """The adjustments a re-issued version lists whose pair names the region (at province level: either
    pooling region of the province)."""
    def names(pool: str) -> bool:
        return pool == region if level == "pool" else region_of(pool).prov_admdvs == region

    return tuple(a for a in body.get("adjustments", ()) if names(a["insured_pool"]) or names(a["treating_pool"]))


def _line(d: Mapping[str, Any]) -> PairLine:
    return PairLine(
        insured=d["insured"], treating=d["treating"], insured_prov=d["insured_prov"],
        treating_prov=d["treating_prov"], scope=d["scope"], settle_cnt=d["settle_cnt"], reverse_cnt=d["reverse_cnt"],
        adj_settle_cnt=d["adj_settle_cnt"], adj_reverse_cnt=d["adj_reverse_cnt"],
        settled=Amounts.of(d["settled"]), reversed=Amounts.of(d["reversed"]), adjusted=Amounts.of(d["adjusted"]),
        # statements frozen before deductions existed have none
        deduct_cnt=d.get("deduct_cnt", 0), deducted=Amounts.of(d["deducted"]) if "deducted" in d else ZERO,
    )


def region_level(region: str) -> str:
    """'pool' for a pooling region (a municipality pools at province level), 'province' for a province."""
    r = region_of(region)
    if r.prov_admdvs == region and region not in PROVINCE_POOLED:
        return "province"
    if r.pool_admdvs == region:
        return "pool"
    raise UnknownRegion(f"{region} is neither a pooling region nor a province")


def region_statement(body: Mapping[str, Any], region: str, *, status: str, digest: str = "") -> RegionStatement:
    level = region_level(region)
    lines = [_line(d) for d in body["pool_lines" if level == "pool" else "province_lines"]]
    payable = [ln for ln in lines if ln.insured == region and ln.treating != region]
    receivable = [ln for ln in lines if ln.treating == region and ln.insured != region]
    internal = next((ln for ln in lines if ln.insured == region and ln.treating == region), None)
    nets = {d["region"]: d for d in body["pool_net" if level == "pool" else "province_net"]}
    n = nets.get(region)
    net = (RegionNet(region, Amounts.of(n["payable"]), Amounts.of(n["receivable"]), n["payable_cnt"],
                     n["receivable_cnt"]) if n else RegionNet(region, ZERO, ZERO, 0, 0))
    return RegionStatement(region, region_of(region).name, level, str(body["clr_month"]), status,
                           int(body["version"]), str(body["closed_at"]), digest, payable, receivable, internal, net,
                           _adjustments_of(body, region, level))


def _yuan(a: Amounts) -> dict[str, Any]:
    return {f: to_yuan(getattr(a, f)) for f in AMOUNT_FIELDS}


def _line_wire(ln: PairLine, counterparty: str) -> dict[str, Any]:
    return {
        "counterparty": counterparty, "counterparty_name": _name(counterparty), "scope": ln.scope,
        "settle_cnt": ln.settle_cnt, "reverse_cnt": ln.reverse_cnt,
        "adjust_cnt": ln.adj_settle_cnt + ln.adj_reverse_cnt, "net_cnt": ln.net_cnt,
        "settled": _yuan(ln.settled), "reversed": _yuan(ln.reversed), "adjusted": _yuan(ln.adjusted),
        "deduct_cnt": ln.deduct_cnt, "deducted": _yuan(ln.deducted), "net": _yuan(ln.net),
    }


def _name(code: str) -> str:
    try:
        return region_of(code).name
    except UnknownRegion:
        return ""


def to_wire(st: RegionStatement) -> dict[str, Any]:
    return {
        "region": st.region, "region_name": st.region_name, "level": st.level, "clr_month": st.clr_month,
        "status": st.status, "version": st.version, "closed_at": st.closed_at, "digest": st.digest,
        "payable": [_line_wire(ln, ln.treating) for ln in st.payable],
        "receivable": [_line_wire(ln, ln.insured) for ln in st.receivable],
        "internal": _line_wire(st.internal, st.region) if st.internal else None,
        "payable_total": _yuan(st.net.payable), "receivable_total": _yuan(st.net.receivable),
        "payable_cnt": st.net.payable_cnt, "receivable_cnt": st.net.receivable_cnt,
        "net_position": _yuan(st.net.net),
        "adjustments": [{"ref": a["ref"], "insured_pool": a["insured_pool"], "treating_pool": a["treating_pool"],
                         "version": a["version"], "reason": a["reason"], **{f: to_yuan(a[f]) for f in AMOUNT_FIELDS}}
                        for a in st.adjustments],
    }


def to_json(st: RegionStatement) -> bytes:
    return encode(to_wire(st))


CSV_HEADER = ("section", "counterparty", "counterparty_name", "scope", "settle_cnt", "reverse_cnt", "adjust_cnt",
              "net_cnt", *(f"net_{f}" for f in AMOUNT_FIELDS), *(f"adjusted_{f}" for f in AMOUNT_FIELDS),
              "deduct_cnt", *(f"deducted_{f}" for f in AMOUNT_FIELDS))


def to_csv(st: RegionStatement) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(("# clearing statement", st.region, st.region_name, st.level, st.clr_month, st.status,
                f"version {st.version}", st.closed_at, st.digest))
    w.writerow(CSV_HEADER)

    def row(section: str, ln: PairLine, counterparty: str) -> None:
        w.writerow((section, counterparty, _name(counterparty), ln.scope, ln.settle_cnt, ln.reverse_cnt,
                    ln.adj_settle_cnt + ln.adj_reverse_cnt, ln.net_cnt,
                    *(to_yuan(getattr(ln.net, f)) for f in AMOUNT_FIELDS),
                    *(to_yuan(getattr(ln.adjusted, f)) for f in AMOUNT_FIELDS), ln.deduct_cnt,
                    *(to_yuan(getattr(ln.deducted, f)) for f in AMOUNT_FIELDS)))

    for ln in st.payable:
        row("payable", ln, ln.treating)
    for ln in st.receivable:
        row("receivable", ln, ln.insured)
    if st.internal:
        row("internal", st.internal, st.region)
    blank = ("",) * (2 * len(AMOUNT_FIELDS) + 1)
    w.writerow(("payable_total", "", "", "", "", "", "", st.net.payable_cnt,
                *(to_yuan(getattr(st.net.payable, f)) for f in AMOUNT_FIELDS), *blank))
    w.writerow(("receivable_total", "", "", "", "", "", "", st.net.receivable_cnt,
                *(to_yuan(getattr(st.net.receivable, f)) for f in AMOUNT_FIELDS), *blank))
    w.writerow(("net_position", "", "", "", "", "", "", "",
                *(to_yuan(getattr(st.net.net, f)) for f in AMOUNT_FIELDS), *blank))
    return out.getvalue()


_CSS = """
body { font-family: "Noto Sans CJK SC", "Source Han Sans SC", sans-serif; margin: 2em; color: #111; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; font-size: 0.85em; }
th, td { border: 1px solid #999; padding: 0.25em 0.45em; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eee; } tr.total td { font-weight: bold; background: #f6f6f6; }
.meta { color: #444; font-size: 0.85em; } .provisional { color: #a00; font-weight: bold; }
@media print { body { margin: 1cm; } h2 { page-break-after: avoid; } tr { page-break-inside: avoid; } }
"""


def to_html(st: RegionStatement) -> str:
    e = html.escape
    fund_heads = "".join(f"<th>{e(FUND_NAMES.get(f, f))}</th>" for f in AMOUNT_FIELDS if f != "medfee_sumamt")

    def table(title: str, lines: list[tuple[str, PairLine]], total: Amounts | None, total_cnt: int | None) -> str:
        rows = []
        for cp, ln in lines:
            cells = "".join(f'<td class="n">{to_yuan(getattr(ln.net, f))}</td>' for f in AMOUNT_FIELDS)
            rows.append(
                f"<tr><td>{e(cp)} {e(_name(cp))}</td><td>{e(ln.scope)}</td><td class=\"n\">{ln.settle_cnt}</td>"
                f"<td class=\"n\">{ln.reverse_cnt}</td><td class=\"n\">{ln.adj_settle_cnt + ln.adj_reverse_cnt}</td>"
                f"<td class=\"n\">{ln.net_cnt}</td>{cells}</tr>"
            )
        if total is not None:
            cells = "".join(f'<td class="n">{to_yuan(getattr(total, f))}</td>' for f in AMOUNT_FIELDS)
            rows.append(f'<tr class="total"><td colspan="5">total</td><td class="n">{total_cnt}</td>{cells}</tr>')
        if not lines:
            rows.insert(0, f'<tr><td colspan="{6 + len(AMOUNT_FIELDS)}">none</td></tr>')
        return (f"<h2>{e(title)}</h2><table><tr><th>counterparty</th><th>scope</th><th>settled</th><th>reversed</th>"
                f"<th>adjustments</th><th>net person-times</th><th>medical fees</th>{fund_heads}</tr>"
                + "".join(rows) + "</table>")

    status = ('<span class="provisional">provisional: running positions of an open month</span>'
              if st.status != "closed" else f"closed {e(st.closed_at)}, version {st.version}")
    net_cells = "".join(f'<td class="n">{to_yuan(getattr(st.net.net, f))}</td>' for f in AMOUNT_FIELDS)
    parts = [
        "<!DOCTYPE html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\">",
        f"<title>清算单 {e(st.region)} {e(st.clr_month)}</title><style>{_CSS}</style></head><body>",
        f"<h1>异地就医清算单 Clearing statement — {e(st.region)} {e(st.region_name)} — {e(st.clr_month)}</h1>",
        f"<p class=\"meta\">level: {e(st.level)}; {status}"
        + (f"; digest <code>{e(st.digest)}</code>" if st.digest else "") + "; amounts in yuan</p>",
        table("Payable — as insured region (参保地应付)", [(ln.treating, ln) for ln in st.payable],
              st.net.payable, st.net.payable_cnt),
        table("Receivable — as treating region (就医地应收)", [(ln.insured, ln) for ln in st.receivable],
              st.net.receivable, st.net.receivable_cnt),
    ]
    if st.internal:
        parts.append(table("Internal — within the province (省内, moves nothing at province level)",
                           [(st.region, st.internal)], None, None))
    deducted = [(ln.treating, "payable", ln) for ln in st.payable if ln.deduct_cnt] + [
        (ln.insured, "receivable", ln) for ln in st.receivable if ln.deduct_cnt]
    if deducted:
        rows = "".join(
            f"<tr><td>{e(cp)} {e(_name(cp))}</td><td>{side}</td><td class=\"n\">{ln.deduct_cnt}</td>"
            + "".join(f'<td class="n">{to_yuan(getattr(ln.deducted, f))}</td>' for f in AMOUNT_FIELDS) + "</tr>"
            for cp, side, ln in deducted)
        parts.append("<h2>Deductions — confirmed monitoring judgements (拒付, in the net above)</h2><table><tr>"
                     f"<th>counterparty</th><th>side</th><th>judgements</th><th>medical fees</th>{fund_heads}</tr>"
                     + rows + "</table>")
    if st.adjustments:
        items = "".join(
            f"<li>{e(a['ref'])} (version {a['version']}): {e(a['insured_pool'])} → {e(a['treating_pool'])}, "
            f"all funds {to_yuan(a['fund_pay_sumamt'])}, medical fees {to_yuan(a['medfee_sumamt'])} — {e(a['reason'])}"
            "</li>" for a in st.adjustments)
        parts.append("<h2>Operator adjustments (in the adjusted column)</h2><ul>" + items + "</ul>")
    parts.append(
        "<h2>Net position (receivable − payable)</h2><table><tr><th>medical fees</th>"
        f"{fund_heads}</tr><tr class=\"total\">{net_cells}</tr></table></body></html>"
    )
    return "\n".join(parts)


def render(st: RegionStatement, fmt: str) -> bytes:
    if fmt == "json":
        return to_json(st)
    if fmt == "csv":
        return to_csv(st).encode()
    if fmt == "html":
        return to_html(st).encode()
    raise ValueError(f"unknown format {fmt!r} (json, csv, html)")
