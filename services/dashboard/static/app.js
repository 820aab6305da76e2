// Clearing dashboard: fetches /api/overview and draws tables and hand-written SVG charts.
// No external libraries (works without internet).
"use strict";

const REFRESH_MS = 10000;
const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = ["#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e"];

// ---- formatting -------------------------------------------------------------------------
const fmtInt = (n) => (n == null ? "—" : Math.round(n).toLocaleString("en-US"));
const fmtPct = (r) => (r == null ? "—" : (r * 100).toFixed(1) + "%");
const fmtYuan = (y) => (y == null ? "—" : y.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }));
const fmtWan = (y) => (y == null ? "—" : (y / 10000).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }));
const fmtSec = (s) => (s == null ? "—" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s");
const fmtClock = (ts) => new Date(ts * 1000).toLocaleTimeString("zh-CN", { timeZone: "Asia/Shanghai", hour12: false });
const fmtHM = (ts) => new Date(ts * 1000).toLocaleTimeString("zh-CN", { timeZone: "Asia/Shanghai", hour12: false, hour: "2-digit", minute: "2-digit" });

// ---- tiny DOM / SVG helpers ---------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === "class") el.className = v;
    else if (k === "html") el.innerHTML = v;
    else el.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) if (c != null) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v != null) el.setAttribute(k, v);
  for (const c of children.flat(Infinity)) if (c != null) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}
function bi(zh, en) { return [zh, " ", h("span", { class: "en" }, en)]; }
function fill(id, ...nodes) { const el = document.getElementById(id); el.replaceChildren(...nodes.flat(Infinity)); return el; }
function empty(zh, en) { return h("div", { class: "empty" }, `${zh} / ${en}`); }

// ---- charts -----------------------------------------------------------------------------------
// Horizontal bars. rows: {label, value, display, target, cls, star, title}; opts: {max, width}
function hbars(rows, opts = {}) {
  const W = opts.width || 720, labelW = opts.labelW || 190, valueW = opts.valueW || 90, rowH = 24, top = 6;
  const H = top + rows.length * rowH + 22;
  const max = opts.max || Math.max(1e-9, ...rows.map((r) => Math.max(r.value || 0, r.target || 0))) * 1.05;
  const x = (v) => labelW + (Math.max(0, v) / max) * (W - labelW - valueW);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    svg.append(s("text", { x: labelW - 8, y: y + 16, "text-anchor": "end" }, (r.star ? "★ " : "") + r.label));
    svg.append(s("rect", { x: labelW, y: y + 4, width: W - labelW - valueW, height: rowH - 8, fill: "#f1f3f6", rx: 2 }));
    if (r.value != null) {
      svg.append(s("rect", { x: labelW, y: y + 4, width: Math.max(1, x(r.value) - labelW), height: rowH - 8,
        fill: r.cls === "bad" ? "#c62828" : r.cls === "ok" ? "#2e7d32" : r.color || "#1565c0", rx: 2 },
        s("title", {}, r.title || r.display)));
    }
    if (r.target != null) {
      const tx = x(r.target);
      svg.append(s("line", { x1: tx, x2: tx, y1: y + 1, y2: y + rowH - 1, stroke: "#1f2933", "stroke-width": 2, "stroke-dasharray": "3 2" }));
    }
    svg.append(s("text", { x: W - valueW + 6, y: y + 16, class: r.value == null ? "muted" : "" }, r.display));
  });
  if (opts.ticks) {
    const yAxis = top + rows.length * rowH + 14;
    for (const t of opts.ticks) svg.append(s("text", { x: x(t), y: yAxis, "text-anchor": "middle", class: "muted" }, opts.tickFmt(t)));
  }
  return svg;
}

// Diverging bars around zero: positive to the right (green), negative to the left (red).
function divergingBars(rows, opts = {}) {
  const W = opts.width || 620, labelW = 150, rowH = 24, top = 22;
  const H = top + rows.length * rowH + 8;
  const max = Math.max(1e-9, ...rows.map((r) => Math.abs(r.value)));
  const mid = labelW + (W - labelW) / 2, half = (W - labelW) / 2 - 70;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  svg.append(s("text", { x: mid - 6, y: 14, "text-anchor": "end", fill: "#c62828" }, "← 应付 payable"));
  svg.append(s("text", { x: mid + 6, y: 14, fill: "#2e7d32" }, "应收 receivable →"));
  svg.append(s("line", { x1: mid, x2: mid, y1: top, y2: H - 4, class: "axis", stroke: "#ccd3db" }));
  rows.forEach((r, i) => {
    const y = top + i * rowH, w = (Math.abs(r.value) / max) * half;
    svg.append(s("text", { x: labelW - 8, y: y + 16, "text-anchor": "end" }, r.label));
    const pos = r.value >= 0;
    svg.append(s("rect", { x: pos ? mid : mid - w, y: y + 4, width: Math.max(1, w), height: rowH - 8, rx: 2,
      fill: pos ? "#2e7d32" : "#c62828" }, s("title", {}, r.display)));
    svg.append(s("text", { x: pos ? mid + w + 4 : mid - w - 4, y: y + 16, "text-anchor": pos ? "start" : "end" }, r.display));
  });
  return svg;
}

// A round axis maximum: 1, 2, 2.5 or 5 times a power of ten.
function niceMax(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// Time series. series: [{name, points: [[t, v]], color, width, dash}]; opts: {yMax, yFmt, target, height}
function lineChart(series, opts = {}) {
  const W = opts.width || 1300, H = opts.height || 260, L = 56, R = 170, T = 10, B = 26;
  const all = series.flatMap((x) => x.points);
  if (!all.length) return null;
  let t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  if (t1 - t0 < 60) { t0 -= 30; t1 += 30; }
  const yMax = opts.yMax || niceMax(Math.max(1e-9, ...all.map((p) => p[1]), opts.target || 0) * 1.1);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - Math.min(v, yMax) / yMax) * (H - T - B);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    svg.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e3e7ec" }));
    svg.append(s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "muted" }, opts.yFmt(v)));
  }
  for (let i = 0; i <= 5; i++) {
    const t = t0 + ((t1 - t0) * i) / 5;
    svg.append(s("text", { x: x(t), y: H - 8, "text-anchor": "middle", class: "muted" }, t1 - t0 < 900 ? fmtClock(t) : fmtHM(t)));
  }
  if (opts.target != null) {
    svg.append(s("line", { x1: L, x2: W - R, y1: y(opts.target), y2: y(opts.target), stroke: "#1f2933", "stroke-dasharray": "6 4", "stroke-width": 1.5 }));
    svg.append(s("text", { x: L + 6, y: y(opts.target) - 5 }, `目标 target ${opts.yFmt(opts.target)}`));
  }
  let legendY = T + 4;
  for (const sr of series) {
    if (!sr.points.length) continue;
    const d = sr.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
    svg.append(s("path", { d, fill: "none", stroke: sr.color, "stroke-width": sr.width || 2, "stroke-dasharray": sr.dash }));
    if (sr.points.length === 1) svg.append(s("circle", { cx: x(sr.points[0][0]), cy: y(sr.points[0][1]), r: 3, fill: sr.color }));
    if (sr.legend !== false) {
      legendY += 16;
      svg.append(s("rect", { x: W - R + 8, y: legendY + 14, width: 14, height: 4, fill: sr.color }));
      const last = sr.points[sr.points.length - 1][1];
      svg.append(s("text", { x: W - R + 28, y: legendY + 20 }, `${sr.name} ${opts.yFmt(last)}`));
    }
  }
  return svg;
}

// ---- sections ---------------------------------------------------------------------------------
function renderHeader(d) {
  fill("month", d.month);
  fill("updated", fmtClock(d.generated_at));
  const src = [];
  src.push(h("span", { class: d.sources.ledger === "ok" ? "ok" : "err" }, "台账 ledger"));
  src.push(h("span", { class: d.sources.prometheus === "ok" ? "ok" : "err", title: d.sources.prometheus }, "监控 Prometheus"));
  fill("sources", src);
}

function renderAlerts(d) {
  const nodes = [];
  if (d.sources.prometheus !== "ok") {
    nodes.push(h("div", { class: "alert warning" }, h("b", {}, "监控数据暂不可用"), "Live figures (Prometheus) are unavailable; month figures still come from the ledger."));
  }
  // One line per kind of alert, naming everything it concerns (a page of 20 red boxes helps nobody).
  const active = d.alerts.filter((a) => a.state === "firing");
  const groups = new Map();
  for (const a of active) {
    if (!groups.has(a.name)) groups.set(a.name, []);
    groups.get(a.name).push(a);
  }
  for (const [name, list] of groups) {
    const a = list[0];
    const sev = a.severity === "critical" ? "严重 Critical" : a.severity === "info" ? "提示 Info" : "警告 Warning";
    const subjects = list.map((x) => x.subject).filter((x) => x);
    const shown = subjects.slice(0, 8).join("、") + (subjects.length > 8 ? ` 等 ${subjects.length} 项 (${subjects.length} in all)` : "");
    nodes.push(h("div", { class: `alert ${a.severity || "warning"}`, "data-alert": name, title: list.map((x) => x.summary).join("\n") },
      h("b", {}, sev),
      h("span", {}, h("b", {}, a.title_zh), " ", h("span", { class: "d" }, a.title_en), list.length > 1 ? ` ×${list.length}` : "",
        h("div", { class: "d" }, shown || (a.description || "")))));
  }
  if (!active.length && d.sources.prometheus === "ok") {
    nodes.push(h("div", { class: "alert clear" }, h("b", {}, "一切正常"), "No alerts firing — all clear."));
  }
  fill("alerts", nodes);
}

function tile(title, value, unit, note, cls, field) {
  return h("div", { class: `tile ${cls || ""}`, "data-tile": field },
    h("div", { class: "t" }, ...title), h("div", { class: "v" }, h("span", { "data-field": field }, value), unit ? h("small", {}, unit) : null),
    note ? h("div", { class: "n" }, note) : null);
}

function renderTiles(d) {
  const head = d.national.find((r) => r.scope.code === "cross_province" && r.visit_type.code === "inpatient");
  const headCls = head && head.rate != null && head.target != null ? (head.rate < head.target ? "bad" : "good") : "";
  const rejected = d.now.rejected_5m.reduce((a, r) => a + (r.count || 0), 0);
  const firing = d.alerts.filter((a) => a.state === "firing").length;
  const manualNote = "来自手工报销记录 from manual-claim records";
  fill("tiles",
    tile(bi("本月异地直接结算", "non-local direct settlements"), fmtInt(d.totals.direct), "人次", `另有本地结算 plus local settlements: ${fmtInt(d.totals.local_settled)} 笔`, "", "total-direct"),
    tile(bi("本月手工零星报销", "manual claims"), fmtInt(d.totals.manual), "人次", manualNote, "", "total-manual"),
    tile(bi("跨省住院直接结算率", "cross-province inpatient rate"), fmtPct(head && head.rate), "",
      head && head.target != null ? `目标 target ${fmtPct(head.target)} · 本月 this month` : "本月 this month", headCls, "headline-rate"),
    tile(bi("本月异地基金支付", "fund paid, non-local"), fmtWan(d.totals.fund_fen / 100), "万元", `医疗费用 medical fees ${fmtWan(d.totals.medfee_fen / 100)} 万元`, "", "total-fund"),
    tile(bi("当前结算量", "settlements now"), d.now.settlements_per_min == null ? "—" : d.now.settlements_per_min.toFixed(1), "笔/分钟 per min",
      `请求 requests ${d.now.requests_per_min == null ? "—" : d.now.requests_per_min.toFixed(0)} /min`, "", "now-settlements"),
    tile(bi("结算耗时 p99", "settlement time p99"), fmtSec(d.now.e2e_p99_s), "", `中位数 median ${fmtSec(d.now.e2e_p50_s)} · 目标 objective 2.5 s`,
      d.now.e2e_p99_s != null && d.now.e2e_p99_s > 2.5 ? "bad" : "good", "now-p99"),
    tile(bi("近5分钟被拒绝", "rejected, last 5 min"), fmtInt(rejected), "笔", `超时 timeouts ${fmtInt(d.now.timeouts_5m)}`, rejected > 0 ? "" : "good", "now-rejected"),
    tile(bi("告警", "alerts firing"), String(firing), "", firing ? "见页面顶部 see top of page" : "一切正常 all clear", firing ? "bad" : "good", "alerts-firing"),
  );
}

function renderRates(d) {
  const head = d.rates.filter((r) => r.scope.code === "cross_province" && r.visit_type.code === "inpatient");
  head.sort((a, b) => (a.rate == null) - (b.rate == null) || (a.rate ?? 0) - (b.rate ?? 0) || a.insured_prov.localeCompare(b.insured_prov));
  const rows = head.map((r) => ({
    label: r.insured_name, star: r.seed, value: r.rate, target: r.target,
    cls: r.rate == null ? null : r.below_target ? "bad" : "ok",
    display: r.rate == null ? "无数据 no data" : `${fmtPct(r.rate)} (${fmtInt(r.direct)}/${fmtInt(r.direct + r.manual)})`,
  }));
  fill("rate-chart", rows.length ? hbars(rows, { max: 1, ticks: [0, 0.25, 0.5, 0.7, 1], tickFmt: fmtPct, width: 780, labelW: 130, valueW: 170 }) : empty("暂无数据", "no data"));

  const nat = h("table", { class: "grid" },
    h("tr", {}, h("th", { class: "l" }, ...bi("范围", "scope")), h("th", { class: "l" }, ...bi("类型", "visit type")),
      h("th", {}, ...bi("直接", "direct")), h("th", {}, ...bi("手工", "manual")), h("th", {}, ...bi("直接结算率", "rate")), h("th", {}, ...bi("目标", "target"))),
    d.national.map((r) => h("tr", { class: r.rate != null && r.target != null && r.rate < r.target ? "below" : "" },
      h("td", { class: "l" }, r.scope.zh, h("span", { class: "en" }, " " + r.scope.en)),
      h("td", { class: "l" }, r.visit_type.zh, h("span", { class: "en" }, " " + r.visit_type.en)),
      h("td", {}, fmtInt(r.direct)), h("td", {}, fmtInt(r.manual)), h("td", { class: "rate" }, fmtPct(r.rate)), h("td", {}, fmtPct(r.target)))));
  fill("national", d.national.length ? nat : empty("暂无数据", "no data"));

  const seedRows = d.seeds.map((sd) => {
    const r = d.rates.find((x) => x.insured_prov === sd.province && x.scope.code === "cross_province" && x.visit_type.code === "inpatient");
    const badge = !r || r.rate == null ? h("span", { class: "badge na" }, "无数据 no data")
      : r.below_target ? h("span", { class: "badge bad" }, "低于目标 below") : h("span", { class: "badge ok" }, "达标 on target");
    return h("tr", {}, h("td", { class: "l" }, `${sd.name} (${sd.province_name})`, sd.note ? h("span", { class: "en" }, " · " + sd.note) : null),
      h("td", {}, fmtPct(r && r.rate)), h("td", {}, "≥ " + fmtPct(r && r.target)), h("td", {}, badge));
  });
  fill("seeds", h("table", { class: "grid" },
    h("tr", {}, h("th", { class: "l" }, ...bi("地区", "region")), h("th", {}, ...bi("跨省住院", "cross-prov. inpatient")), h("th", {}, ...bi("目标", "target")), h("th", {}, "")),
    seedRows));

  const sorted = [...d.rates].filter((r) => r.direct || r.manual || r.seed);
  sorted.sort((a, b) => (b.below_target - a.below_target) || a.scope.code.localeCompare(b.scope.code) * -1
    || (a.visit_type.code !== "inpatient") - (b.visit_type.code !== "inpatient") || a.insured_prov.localeCompare(b.insured_prov));
  fill("rate-table",
    h("tr", {}, h("th", { class: "l" }, ...bi("参保省", "insured province")), h("th", { class: "l" }, ...bi("范围", "scope")),
      h("th", { class: "l" }, ...bi("类型", "visit type")), h("th", {}, ...bi("直接结算人次", "direct")), h("th", {}, ...bi("手工报销人次", "manual")),
      h("th", {}, ...bi("本月直接结算率", "rate, month")), h("th", {}, ...bi("近24小时", "24 h")), h("th", {}, ...bi("近1小时", "1 h")),
      h("th", {}, ...bi("目标", "target")), h("th", {}, ...bi("状态", "status"))),
    sorted.map((r) => h("tr", {
      class: `${r.below_target ? "below" : ""} ${r.seed ? "seed" : ""}`, "data-test": "rate-row",
      "data-prov": r.insured_prov, "data-scope": r.scope.code, "data-visit-type": r.visit_type.code,
    },
      h("td", { class: "l" }, r.insured_name), h("td", { class: "l" }, r.scope.zh, h("span", { class: "en" }, " " + r.scope.en)),
      h("td", { class: "l" }, r.visit_type.zh, h("span", { class: "en" }, " " + r.visit_type.en)),
      h("td", { "data-field": "direct" }, fmtInt(r.direct)), h("td", { "data-field": "manual" }, fmtInt(r.manual)),
      h("td", { class: "rate", "data-field": "rate" }, fmtPct(r.rate)), h("td", { "data-field": "rate_24h" }, fmtPct(r.rate_24h)),
      h("td", { "data-field": "rate_1h" }, fmtPct(r.rate_1h)), h("td", { "data-field": "target" }, r.target == null ? "—" : "≥ " + fmtPct(r.target)),
      h("td", {}, r.rate == null ? h("span", { class: "badge na" }, "无数据 no data") : r.target == null ? "" :
        r.below_target ? h("span", { class: "badge bad" }, "低于目标 below target") : h("span", { class: "badge ok" }, "达标 on target")))));
}

function renderTrend(d) {
  const seeds = new Set(d.seeds.map((x) => x.province));
  const series = [];
  let c = 0;
  for (const sr of d.trends.rate_by_province || []) {
    const seed = seeds.has(sr.label);
    series.push({ name: (seed ? "★ " : "") + sr.name, points: sr.points, color: seed ? COLORS[(c++ % (COLORS.length - 1)) + 1] : "#c5ccd6",
      width: seed ? 2 : 1, legend: seed });
  }
  for (const sr of d.trends.rate_national || []) series.push({ name: "全国 all provinces", points: sr.points, color: "#1565c0", width: 3 });
  const chart = lineChart(series, { yMax: 1, yFmt: fmtPct, target: 0.7 });
  fill("trend-chart", chart || empty("近期无跨省住院结算", "no cross-province inpatient person-times in this period"));
}

function renderPositions(d) {
  fill("positions-source", d.positions_source === "clearing_position" ? "来源：清算服务 source: clearing service" : "来源：结算台账 source: ledger");
  const net = {};
  for (const p of d.positions) {
    net[p.insured_prov] = net[p.insured_prov] || { name: p.insured_name, v: 0 };
    net[p.treating_prov] = net[p.treating_prov] || { name: p.treating_name, v: 0 };
    net[p.insured_prov].v -= p.total_fen / 100;
    net[p.treating_prov].v += p.total_fen / 100;
  }
  const netRows = Object.entries(net).sort((a, b) => b[1].v - a[1].v);
  const shown = netRows.length > 16 ? [...netRows.slice(0, 8), ...netRows.slice(-8)] : netRows;
  fill("net-chart", shown.length ? divergingBars(shown.map(([, x]) => ({ label: x.name, value: x.v, display: fmtWan(x.v) + " 万" }))) : empty("本月暂无跨省结算", "no cross-province settlements this month"));

  const fundTotals = d.funds.map((f) => ({ label: `${f.zh} ${f.en}`, value: d.positions.reduce((a, p) => a + p.funds_fen[f.code] / 100, 0) }));
  fill("fund-chart", d.positions.length ? hbars(fundTotals.map((r) => ({ ...r, display: fmtWan(r.value) + " 万", color: "#1565c0" })), { width: 560, labelW: 210 }) : empty("暂无", "none"));

  const byIns = {}, byTrt = {};
  for (const p of d.positions) {
    byIns[p.insured_prov] = (byIns[p.insured_prov] || 0) + p.total_fen;
    byTrt[p.treating_prov] = (byTrt[p.treating_prov] || 0) + p.total_fen;
  }
  const N = 10;
  const ins = Object.keys(byIns).sort((a, b) => byIns[b] - byIns[a]);
  const trt = Object.keys(byTrt).sort((a, b) => byTrt[b] - byTrt[a]);
  const insShown = ins.slice(0, N), trtShown = trt.slice(0, N);
  const nameOf = {};
  for (const p of d.positions) { nameOf[p.insured_prov] = p.insured_name; nameOf[p.treating_prov] = p.treating_name; }
  const cell = {};
  let maxCell = 1;
  for (const p of d.positions) {
    const r = insShown.includes(p.insured_prov) ? p.insured_prov : "_other";
    const c = trtShown.includes(p.treating_prov) ? p.treating_prov : "_other";
    cell[r + "|" + c] = (cell[r + "|" + c] || 0) + p.total_fen;
    maxCell = Math.max(maxCell, Math.abs(cell[r + "|" + c]));
  }
  const cols = [...trtShown, ...(trt.length > N ? ["_other"] : [])];
  const rowsK = [...insShown, ...(ins.length > N ? ["_other"] : [])];
  const label = (k) => (k === "_other" ? "其他 others" : nameOf[k]);
  const shade = (v) => `background: rgba(21,101,192,${(0.08 + 0.55 * Math.abs(v) / maxCell).toFixed(2)})`;
  const exact = Object.fromEntries(d.positions.map((p) => [p.insured_prov + "|" + p.treating_prov, p]));
  if (!d.positions.length) {
    fill("matrix", h("tr", {}, h("td", { class: "l empty" }, "本月暂无跨省结算 / no cross-province settlements this month")));
    fill("pairs");
    return;
  }
  const pairs = [...d.positions].sort((a, b) => b.total_fen - a.total_fen);
  fill("pairs",
    h("tr", {}, h("th", { class: "l" }, ...bi("参保省（付款）", "insured province pays")), h("th", { class: "l" }, ...bi("就医省（收款）", "treating province receives")),
      d.funds.map((f) => h("th", {}, ...bi(f.zh, f.en))), h("th", {}, ...bi("合计（元）", "total, yuan")), h("th", {}, ...bi("直接结算人次", "person-times"))),
    pairs.map((p) => h("tr", { "data-test": "position-row", "data-ins": p.insured_prov, "data-trt": p.treating_prov },
      h("td", { class: "l" }, p.insured_name), h("td", { class: "l" }, p.treating_name),
      d.funds.map((f) => h("td", { "data-field": f.code }, fmtYuan(p.funds_fen[f.code] / 100))),
      h("td", { "data-field": "total" }, h("b", {}, fmtYuan(p.total_fen / 100))), h("td", { "data-field": "person_times" }, fmtInt(p.person_times)))));
  fill("matrix",
    h("tr", {}, h("th", { class: "l" }, "参保省 ↓ 就医省 →"), cols.map((c) => h("th", {}, label(c))), h("th", {}, ...bi("合计", "total"))),
    rowsK.map((r) => h("tr", {}, h("td", { class: "l" }, label(r)),
      cols.map((c) => {
        const v = cell[r + "|" + c];
        const p = exact[r + "|" + c];
        return h("td", { style: v ? shade(v) : null,
          title: p ? `${p.insured_name} → ${p.treating_name}: ${fmtYuan(p.total_fen / 100)} 元, ${p.person_times} 人次` : null }, v ? fmtYuan(v / 100) : "");
      }),
      h("td", {}, h("b", {}, fmtYuan(rowsK.length && r !== "_other" ? byIns[r] / 100 : ins.slice(N).reduce((a, k) => a + byIns[k], 0) / 100))))));
}

function renderDeposits(d) {
  if (!d.deposits.length) { fill("deposit-chart", empty("尚无预付金账户", "no deposit accounts yet")); return; }
  const rows = [...d.deposits].sort((a, b) => (b.below - a.below) || a.insured_prov.localeCompare(b.insured_prov));
  const bar = (x) => {
    // Balance against the warning line: the line sits at 2/3 of the bar; an overdrawn balance shows no bar.
    const scale = Math.max(x.warning_line_yuan * 1.5, x.balance_yuan, 1);
    const w = Math.max(0, Math.min(100, (100 * x.balance_yuan) / scale));
    const line = x.warning_line_yuan > 0 ? (100 * x.warning_line_yuan) / scale : null;
    return h("div", { class: "dbar" }, h("i", { class: x.below ? "bad" : "ok", style: `width:${w.toFixed(1)}%` }),
      line == null ? null : h("b", { style: `left:${line.toFixed(1)}%`, title: "预警线 warning line" }));
  };
  const status = (x) => x.balance_yuan < 0 ? h("span", { class: "badge bad" }, "透支，需补充 overdrawn, top up")
    : x.below ? h("span", { class: "badge bad" }, "低于预警线，需补充 top up") : h("span", { class: "badge ok" }, "正常 ok");
  fill("deposit-chart", h("table", { class: "grid" },
    h("tr", {}, h("th", { class: "l" }, ...bi("参保省", "insured province")), h("th", {}, ...bi("余额（元）", "balance, yuan")),
      h("th", {}, ...bi("预警线（元）", "warning line, yuan")), h("th", { class: "l" }, ...bi("余额与预警线", "balance against the line")),
      h("th", {}, ...bi("状态", "status"))),
    rows.map((x) => h("tr", { "data-test": "deposit", "data-prov": x.insured_prov, "data-balance": x.balance_yuan,
      "data-warning": x.warning_line_yuan, "data-below": String(x.below) },
      h("td", { class: "l" }, x.insured_name), h("td", { "data-field": "balance" }, fmtYuan(x.balance_yuan)),
      h("td", { "data-field": "warning" }, x.warning_line_yuan > 0 ? fmtYuan(x.warning_line_yuan) : "—"),
      h("td", { class: "l" }, bar(x)), h("td", {}, status(x))))));
}

function renderNow(d) {
  const tp = lineChart([
    { name: "结算 settled", points: (d.trends.settlements_per_min || []).flatMap((x) => x.points), color: "#1565c0" },
    { name: "拒绝 rejected", points: (d.trends.rejected_per_min || []).flatMap((x) => x.points), color: "#c62828" },
  ], { width: 460, height: 220, yFmt: (v) => v.toFixed(v < 10 ? 1 : 0) });
  fill("tp-chart", tp || empty("暂无数据", "no data"));
  const lat = lineChart([
    { name: "p50", points: (d.trends.e2e_p50_s || []).flatMap((x) => x.points), color: "#2e7d32" },
    { name: "p99", points: (d.trends.e2e_p99_s || []).flatMap((x) => x.points), color: "#ef6c00" },
  ], { width: 460, height: 220, yFmt: fmtSec, target: 2.5 });
  fill("lat-chart", lat || empty("暂无数据", "no data"));
  const errs = d.now.rejected_5m.slice(0, 8);
  fill("err-chart", errs.length ? hbars(errs.map((e) => ({ label: e.reason, value: e.count, display: fmtInt(e.count) + ` (${e.stage})`, color: "#c62828" })), { width: 460, labelW: 200 })
    : empty("无", "none"));
  fill("lag", d.now.lag.length ? h("div", { class: "kv" }, d.now.lag.map((l) => [h("div", {}, l.group),
    h("div", { class: "r" }, fmtInt(l.lag), " ", h("span", { class: `badge ${l.lag > 50 ? "bad" : "ok"}` }, l.lag > 50 ? "积压 backlog" : "正常 ok"))])) : empty("暂无数据", "no data"));
  fill("services", d.now.services.length ? h("div", { class: "kv" }, d.now.services.map((x) => [h("div", {}, x.job),
    h("div", { class: "r" }, h("span", { class: `badge ${x.up ? "ok" : "bad"}` }, x.up ? "运行 up" : "停止 down"))])) : empty("暂无数据", "no data"));
}

async function load() {
  try {
    const resp = await fetch("/api/overview?hours=6", { cache: "no-store" });
    if (resp.status === 401) { location.assign("/login"); return; }  // the session ended
    if (!resp.ok) throw new Error(`HTTP ${resp.status}: ${await resp.text()}`);
    const d = await resp.json();
    renderHeader(d); renderAlerts(d); renderTiles(d); renderRates(d); renderTrend(d);
    renderPositions(d); renderDeposits(d); renderNow(d);
    if (!document.body.dataset.loaded && location.hash) {  // deep link to a section, once drawn
      const target = document.getElementById(location.hash.slice(1));
      if (target) target.scrollIntoView();
    }
    document.body.dataset.loaded = "1";
    document.body.dataset.generatedAt = String(d.generated_at);
  } catch (e) {
    fill("alerts", h("div", { class: "alert critical" }, h("b", {}, "无法加载数据"), `Could not load data: ${e.message}`));
    document.body.dataset.error = String(e.message);
  }
  setTimeout(load, REFRESH_MS);
}
load();
