"""The clearing staff's dashboard in a real headless Chromium: a user signs in through the form over TLS,
the page loads with live data from the running stack and shows the numbers the ledger says, and a
screenshot is kept as a test artifact (test-artifacts/dashboard-<run>.png, one per test run)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import asyncpg
import pytest

from services.common.config import PROJECT_ROOT, Settings
from services.dashboard.app import STATIC_DIR
from services.monitor.ledger import month_bounds
from tests.integration.browser import Page, chromium
from tests.integration.conftest import Ledger
from tests.integration.dashboard_client import dashboard_session, make_user, sign_in
from tests.integration.monitoring_data import (
    INSURED_PROV,
    LOW_DEPOSIT_PROV,
    N_INTRA,
    N_MANUAL,
    TREATING_CROSS_PROV,
    Traffic,
    ensure_traffic,
    exclusive,
    lower_deposit,
    prom_query,
    restore_deposit,
    wait_for,
)

pytestmark = pytest.mark.integration

ARTIFACTS = PROJECT_ROOT / "test-artifacts"


async def sign_in_in_browser(page: Page, s: Settings, username: str, password: str) -> None:
    """Open the dashboard, land on the sign-in form, type and submit like a person."""
    await page.navigate(s.dashboard_url)
    await page.wait_for("location.pathname === '/login' && !!document.querySelector('form[data-test=sign-in]')")
    await page.evaluate(
        "(() => { const f = document.querySelector('form[data-test=sign-in]');"
        f" f.username.value = {username!r}; f.password.value = {password!r};"
        " f.querySelector('button[type=submit]').click(); return true; })()")
    await page.wait_for("location.pathname === '/' && document.body.dataset.loaded === '1'")


async def reload_overview(page: Page, s: Settings) -> str:
    """The overview, drawn afresh from /api/overview: its rendered DOM. (CDP's navigate returns once the new
    document is committed, so the old one's data-loaded cannot be mistaken for the new one's.)"""
    await page.send("Page.navigate", url=s.dashboard_url)
    await page.wait_for("location.pathname === '/' && !!document.body && (document.body.dataset.loaded === '1'"
                        " || !!document.body.dataset.error)")
    return await page.html()


class Dom(HTMLParser):
    """Just enough of the rendered DOM: elements with data-* attributes, their text, and the
    nearest enclosing element that has a data-test attribute (`_in`)."""

    VOID = frozenset({"br", "img", "input", "meta", "link", "hr", "col", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[dict[str, str], list[str]]] = []
        self.body: dict[str, str] = {}
        self._open: list[tuple[dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if tag in self.VOID:
            return
        outer = next((o for o, _ in reversed(self._open) if "data-test" in o), None)
        entry: tuple[dict[str, str], list[str]] = ({**a, "_tag": tag, "_in": str(id(outer)) if outer else ""}, [])
        self._open.append(entry)
        if any(k.startswith("data-") for k in a):
            self.found.append(entry)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            attrs, _ = self._open.pop()
            if attrs["_tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, text in self._open:
            text.append(data)

    def select(self, **attrs: str) -> list[tuple[dict[str, str], str]]:
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [(a, "".join(t).strip()) for a, t in self.found if all(a.get(k) == v for k, v in want.items())]

    def fields_in(self, row: dict[str, str]) -> dict[str, str]:
        """The data-field cells inside one data-test element, by field name."""
        return {a["data-field"]: "".join(t).strip() for a, t in self.found
                if "data-field" in a and a["_in"] == str(id(row))}


def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


@pytest.fixture(scope="module")
async def traffic(refdata: dict, services: Settings, db: asyncpg.Pool,
                  tmp_path_factory: pytest.TempPathFactory) -> Traffic:
    return await ensure_traffic(services, db, tmp_path_factory.mktemp("monitoring-refdata"))


@pytest.fixture(scope="module")
async def low_deposit(db: asyncpg.Pool) -> AsyncIterator[int]:
    async with exclusive(db, "deposit"):
        yield await lower_deposit(db)
        await restore_deposit(db)


async def _ledger_truth(db: asyncpg.Pool, ledger: Ledger) -> dict[str, int]:
    """This month's figures for the test's route, counted straight from the ledger tables (every shard;
    the page reads the shards' daily aggregates)."""
    start, end = month_bounds()
    direct = await ledger.total(
        "SELECT count(DISTINCT s.mdtrt_id) FROM settlement s WHERE s.kind = 'settle' AND s.scope = 'intra_province'"
        " AND s.med_type = '21' AND left(s.insured_admdvs, 2) = $1 AND s.setl_time >= $2 AND s.setl_time < $3"
        " AND NOT EXISTS (SELECT 1 FROM settlement r WHERE r.orig_setl_id = s.setl_id)",
        INSURED_PROV[:2], start, end)
    manual = await db.fetchval(
        "SELECT count(*) FROM manual_claim WHERE insured_prov = $1 AND scope = 'intra_province'"
        " AND visit_type = 'inpatient' AND endtime >= $2 AND endtime < $3", INSURED_PROV, start, end)
    cross_fund = await ledger.total(
        "SELECT coalesce(sum(fund_pay_sumamt), 0)::bigint FROM settlement WHERE left(insured_admdvs, 2) = $1"
        " AND left(treating_admdvs, 2) = $2 AND setl_time >= $3 AND setl_time < $4",
        INSURED_PROV[:2], TREATING_CROSS_PROV[:2], start, end)
    return {"direct": direct, "manual": manual, "cross_fund": cross_fund}


async def _clearing_caught_up(db: asyncpg.Pool, traffic: Traffic) -> bool:
    """The clearing service has recorded the test's cross-province settlements and reversals."""
    ids = [s.setl_id for s in traffic.cross]
    n = await db.fetchval("SELECT count(*) FROM clearing_entry WHERE setl_id = ANY($1::text[])", ids)
    return bool(n == len(ids))


async def test_page_shows_the_ledger_in_chromium(services: Settings, traffic: Traffic, db: asyncpg.Pool,
                                                 ledger: Ledger, low_deposit: int) -> None:
    username, password = await make_user(db, "viewer")
    await wait_for("clearing positions to include the test's settlements", lambda: _clearing_caught_up(db, traffic),
                   timeout=60, every=0.5)
    # The 24 h rate needs a Prometheus evaluation after the traffic.
    await wait_for("the 24 h rate in Prometheus", lambda: prom_query(
        services, f'xs:direct_settlement_rate:ratio_24h{{insured_prov="{INSURED_PROV}",scope="intra_province"}}'),
        timeout=60)

    firing = f'ALERTS{{alertname="DepositBelowWarningLine",alertstate="firing",insured_prov="{LOW_DEPOSIT_PROV}"}}'
    await wait_for("the deposit alert to fire", lambda: prom_query(services, firing), timeout=60)

    async with chromium(services) as page:
        await sign_in_in_browser(page, services, username, password)
        assert await page.evaluate("document.querySelector('[data-test=user]').textContent") == username
        await _check_page(page, services, traffic, db, ledger, low_deposit)


async def _check_page(page: Page, services: Settings, traffic: Traffic, db: asyncpg.Pool, ledger: Ledger,
                      low_deposit: int) -> None:
    mismatch = ""
    for _attempt in range(4):  # others may settle on the same routes meanwhile: compare one snapshot
        before = await _ledger_truth(db, ledger)
        html = await reload_overview(page, services)
        after = await _ledger_truth(db, ledger)
        dom = Dom()
        dom.feed(html)
        assert dom.body.get("data-loaded") == "1", f"page did not load its data: {dom.body.get('data-error')}"
        rows = dom.select(data_test="rate-row", data_prov=INSURED_PROV, data_scope="intra_province",
                          data_visit_type="inpatient")
        assert rows, "no rate row for the test's route"
        row = dom.fields_in(rows[0][0])
        if before != after:
            mismatch = "ledger changed while the page loaded"
            continue
        truth = before
        # The traffic's stays and claims; test_metrics settles one more intra stay when it runs first.
        assert truth["manual"] == N_MANUAL and truth["direct"] in (N_INTRA, N_INTRA + 1)
        expected_rate = f"{100 * truth['direct'] / (truth['direct'] + truth['manual']):.1f}%"
        got = (row.get("direct"), row.get("manual"), row.get("rate"))
        want = (fmt_int(truth["direct"]), fmt_int(truth["manual"]), expected_rate)
        if got != want:
            mismatch = f"rate row shows {got}, the ledger says {want}"
            continue
        assert re.fullmatch(r"\d+\.\d%", row.get("rate_24h", "")), row  # live figure from Prometheus
        pairs = dom.select(data_test="position-row", data_ins=INSURED_PROV, data_trt=TREATING_CROSS_PROV)
        assert pairs, "no clearing position for the test's province pair"
        shown = dom.fields_in(pairs[0][0])["total"]
        if shown != fmt_yuan(truth["cross_fund"]):
            mismatch = f"position shows {shown}, the ledger says {fmt_yuan(truth['cross_fund'])}"
            continue
        deposit = dom.select(data_test="deposit", data_prov=LOW_DEPOSIT_PROV)
        assert deposit and deposit[0][0]["data-below"] == "true"
        balance = await db.fetchval("SELECT balance_fen FROM clearing_deposit WHERE insured_prov = $1",
                                    LOW_DEPOSIT_PROV)
        deposit_fields = dom.fields_in(deposit[0][0])
        assert (deposit_fields["balance"], deposit_fields["warning"]) == (fmt_yuan(balance), fmt_yuan(low_deposit))
        alerts = {a["data-alert"] for a, _ in dom.found if "data-alert" in a}
        assert "DepositBelowWarningLine" in alerts, alerts  # the banner at the top of the page
        break
    else:
        pytest.fail(mismatch)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"dashboard-{services.topic_prefix.rstrip('.') or 'local'}.png"  # parallel runs: one each
    shot.unlink(missing_ok=True)
    await page.screenshot(shot, 1400, 4600)
    assert shot.stat().st_size > 100_000  # charts and text, not a blank page


async def test_page_needs_no_internet(services: Settings, db: asyncpg.Pool) -> None:
    """Every asset is served by the dashboard itself: no absolute URL in the page or its scripts."""
    for f in (STATIC_DIR / "index.html", STATIC_DIR / "app.js", STATIC_DIR / "style.css"):
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", f.read_text(encoding="utf-8")))
        assert urls <= {"http://www.w3.org/2000/svg"}, (f.name, urls)  # the SVG namespace is a name, not a fetch
    async with dashboard_session(services) as session:
        await sign_in(services, session, *await make_user(db, "viewer"))
        for path in ("", "static/app.js", "static/style.css", "api/overview"):
            async with session.get(f"{services.dashboard_url}{path}") as resp:
                assert resp.status == 200, path
    # Prometheus scrapes /metrics on a plain loopback port of its own (no personal data there).
    with urllib.request.urlopen(f"http://127.0.0.1:{services.dashboard_metrics_port}/metrics", timeout=5) as resp:
        assert resp.status == 200
