"""Server-rendered pages of the dashboard's sign-in (HTML built here; every value escaped)."""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any


def _page(title: str, body: str) -> str:
    return ('<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="/static/style.css"></head>'
            f'<body class="signin">{body}</body></html>\n')


def sign_in_page(csrf: str, message: str = "") -> str:
    note = f'<p class="alert critical" data-test="sign-in-error">{escape(message)}</p>' if message else ""
    return _page("登录 Sign in · 清算看板", (
        '<main class="card signin-card"><h1>清算看板 · 登录 <span class="en">Sign in</span></h1>'
        f'{note}<form method="post" action="/login" data-test="sign-in">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        '<label>用户名 Username <input name="username" autocomplete="username" required maxlength="32"></label>'
        '<label>密码 Password <input name="password" type="password" autocomplete="current-password" required'
        ' maxlength="256"></label>'
        '<button type="submit">登录 Sign in</button></form></main>'))


def users_page(users: Iterable[Any], me: str, csrf: str, sessions: int) -> str:
    rows = "".join(
        f'<tr data-test="user-row" data-user="{escape(u["username"])}"><td>{escape(u["username"])}</td>'
        f'<td>{escape(u["role"])}</td><td>{"停用 disabled" if u["disabled"] else "启用 active"}</td></tr>'
        for u in users)
    return _page("用户 Users · 清算看板", (
        '<main class="card"><h1>用户 <span class="en">Users</span></h1>'
        f'<p>Signed in as {escape(me)} · <a href="/">看板 Dashboard</a></p>'
        '<p class="explain">Add, disable or reset users with <code>python -m services.dashboard.users</code>'
        ' (audited).</p>'
        f'<table><tr><th>username</th><th>role</th><th>state</th></tr>{rows}</table>'
        f'<h2>会话 <span class="en">Sessions</span></h2><p>{sessions} live session(s).</p>'
        '<form method="post" action="/sessions/end-all" data-test="end-all">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        '<button type="submit">结束所有会话 Sign out all sessions</button></form></main>'))


def user_bar(username: str, role: str, csrf: str) -> str:
    users = ' <a href="/users" data-test="users-link">用户 Users</a>' if role == "operator" else ""
    users = ' <a href="/judgements" data-test="judgements-link">研判 Judgements</a>' + users
    return ('<form class="who" method="post" action="/logout" data-test="sign-out">'
            f'<span data-test="user" data-role="{escape(role)}">{escape(username)}</span> ({escape(role)}){users} '
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            '<button type="submit">退出 Sign out</button></form>')


# --- Judgements (智能监控研判): list, hits, detail and review (services/dashboard/review.py) ---------------

STATUS_NAMES: dict[str, str] = {"open": "待审 open", "withdrawn": "已撤回 withdrawn", "confirmed": "已确认 confirmed",
                                "dismissed": "已驳回 dismissed"}


def _yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def _app_page(title: str, body: str) -> str:
    return ('<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="/static/style.css"></head>'
            f'<body><main>{body}</main></body></html>\n')


def _nav(username: str, role: str) -> str:
    return (f'<p>Signed in as <span data-test="user" data-role="{escape(role)}">{escape(username)}</span>'
            f' ({escape(role)}) · <a href="/">看板 Dashboard</a> · <a href="/judgements">研判 Judgements</a></p>')


def judgements_page(rows: Iterable[Any], total: int, counts: Iterable[Any], f: Any, page_size: int,
                    username: str, role: str, mask: Any) -> str:
    """The list with its filters, the hits by rule and status, and paging. `f` is a judgements.Filters."""
    def val(v: str | None) -> str:
        return escape(v or "")

    status_opts = "".join(f'<option value="{s}"{" selected" if f.status == s else ""}>{escape(n)}</option>'
                          for s, n in STATUS_NAMES.items())
    form = ('<form method="get" action="/judgements" data-test="filters" class="filters">'
            f'<label>规则 Rule <input name="rule" value="{val(f.rule)}" maxlength="40"></label> '
            f'<label>状态 Status <select name="status"><option value="">—</option>{status_opts}</select></label> '
            f'<label>参保省 Insured province <input name="prov" value="{val(f.prov)}" maxlength="6"></label> '
            f'<label>就医机构 Hospital <input name="hospital" value="{val(f.hospital)}" maxlength="30"></label> '
            f'<label>发现月份 Month <input name="month" value="{val(f.month)}" placeholder="YYYY-MM" maxlength="7">'
            '</label> <button type="submit">筛选 Filter</button></form>')
    count_rows = "".join(
        f'<tr data-test="hit" data-rule="{escape(c["rule_id"])}" data-status="{escape(c["status"])}">'
        f'<td class="l">{escape(c["rule_id"])}</td><td class="l">{escape(STATUS_NAMES.get(c["status"], c["status"]))}'
        f'</td><td>{c["n"]}</td><td>{_yuan(c["suspect_amt"])}</td></tr>' for c in counts)
    hits = ('<h2>命中 <span class="en">Hits by rule and status</span></h2><table class="grid" data-test="hits">'
            '<tr><th class="l">rule</th><th class="l">status</th><th>judgements</th><th>suspect amount (yuan)</th>'
            f'</tr>{count_rows or "<tr><td class=l colspan=4>none</td></tr>"}</table>')
    items = "".join(
        f'<tr data-test="judgement" data-jr-id="{escape(r["jr_id"])}"><td class="l">'
        f'<a href="/judgements/{escape(r["jr_id"])}">{escape(r["jr_id"][:12])}…</a></td>'
        f'<td class="l">{escape(r["rule_id"])}</td><td class="l">{escape(r["severity"])}</td>'
        f'<td class="l">{escape(STATUS_NAMES.get(r["status"], r["status"]))}</td>'
        f'<td class="l">{escape(mask(r["psn_no"]))}</td><td class="l">{escape(r["insured_prov"])}</td>'
        f'<td class="l">{escape(r["fixmedins_code"])}</td><td class="l">{r["window_begin"]} – {r["window_end"]}</td>'
        f'<td>{_yuan(r["suspect_amt"])}</td><td class="l">{escape(r["detected_at"])}</td></tr>' for r in rows)
    pages = max(1, -(-total // page_size))
    prev = f'<a href="/judgements?{escape(f.query(page=f.page - 1))}">← prev</a> ' if f.page > 1 else ""
    nxt = f' <a href="/judgements?{escape(f.query(page=f.page + 1))}">next →</a>' if f.page < pages else ""
    listing = ('<h2>研判 <span class="en">Judgements</span></h2>'
               f'<p data-test="total">{total} judgement(s) · page {f.page} of {pages}</p>'
               '<table class="grid" data-test="judgements"><tr><th class="l">jr_id</th><th class="l">rule</th>'
               '<th class="l">severity</th><th class="l">status</th><th class="l">person</th>'
               '<th class="l">insured prov</th><th class="l">hospital</th><th class="l">window</th>'
               '<th>suspect (yuan)</th><th class="l">detected</th></tr>'
               f'{items or "<tr><td class=l colspan=10>none</td></tr>"}</table><p>{prev}{nxt}</p>')
    return _app_page("研判 Judgements · 清算看板", f'<section class="card">{_nav(username, role)}{form}{hits}'
                     f'{listing}</section>')


def judgement_page(r: Any, username: str, role: str, csrf: str, may_review: bool, mask: Any,
                   message: str = "") -> str:
    """One judgement's evidence, its review, and (open, for a reviewer) the confirm / dismiss form."""
    note = f'<p class="alert critical" data-test="review-error">{escape(message)}</p>' if message else ""

    def li(values: Iterable[str]) -> str:
        return ", ".join(escape(v) for v in values) or "—"

    facts = [
        ("jr_id", escape(r["jr_id"])), ("rule", f'{escape(r["rule_id"])} (version {r["rule_version"]})'),
        ("severity", escape(r["severity"])),
        ("status", f'<span data-test="status">{escape(STATUS_NAMES.get(r["status"], r["status"]))}</span>'),
        ("person", escape(mask(r["psn_no"]))),
        ("insured", f'{escape(r["insured_admdvs"])} (province {escape(r["insured_prov"])})'),
        ("treating", f'{escape(r["treating_admdvs"])} (province {escape(r["treating_prov"])}),'
                     f' institution {escape(r["fixmedins_code"])}'),
        ("settlements", li(r["setl_ids"])), ("visits", li(r["mdtrt_ids"])), ("items", li(r["items"])),
        ("window", f'{r["window_begin"]} – {r["window_end"]}'),
        ("suspect amount", f'<span data-test="suspect">{_yuan(r["suspect_amt"])}</span> yuan'),
        ("detail", escape(r["detail"])), ("detected", escape(r["detected_at"])),
    ]
    if r["reviewed_by"]:
        facts += [("reviewed", f'{escape(r["reviewed_by"])} at {escape(r["reviewed_at"] or "")}'),
                  ("reason", escape(r["review_reason"] or ""))]
    if r["deduct_month"]:
        m = r["deduct_month"]
        facts.append(("deducted in", f'<span data-test="deduct-month">{escape(m[:4])}-{escape(m[4:])}</span>'
                                     ' (拒付, clearing month)'))
    table = "".join(f'<tr><th class="l">{k}</th><td class="l">{v}</td></tr>' for k, v in facts)
    form = ""
    if may_review and r["status"] == "open":
        form = (f'<form method="post" action="/judgements/{escape(r["jr_id"])}/review" data-test="review">'
                f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
                '<label>理由 Reason (1–500) <textarea name="reason" required maxlength="500" rows="3"></textarea>'
                '</label><button type="submit" name="decision" value="confirm">确认违规 Confirm (deduct)</button> '
                '<button type="submit" name="decision" value="dismiss">驳回 Dismiss</button></form>')
    elif r["status"] == "open":
        form = '<p class="explain">Only operators review judgements; viewers read.</p>'
    return _app_page(f"研判 {r['jr_id'][:12]} · 清算看板", (
        f'<section class="card">{_nav(username, role)}<h2>研判 <span class="en">Judgement</span></h2>{note}'
        f'<table class="grid" data-test="evidence">{table}</table>{form}</section>'))
