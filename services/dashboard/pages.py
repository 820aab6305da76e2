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
    return ('<form class="who" method="post" action="/logout" data-test="sign-out">'
            f'<span data-test="user" data-role="{escape(role)}">{escape(username)}</span> ({escape(role)}){users} '
            f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
            '<button type="submit">退出 Sign out</button></form>')
