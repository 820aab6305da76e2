"""The router's state: reference data in memory, and the few rows it reads and writes in PostgreSQL.

Reference data is held in memory and reloaded when the loader NOTIFYs `refdata_changed`;
filings created on the spot (promise / emergency / 2501–2504) are written to PostgreSQL
first, so they survive a restart, and announced to every router with a per-person NOTIFY.

The LISTEN connection is watched: after a database restart it is opened again, LISTENs
again and reloads everything (a NOTIFY sent while it was away is lost, the reload is not).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any, Final

import asyncpg

from services.common.config import Settings
from services.common.consumer import Backoff, FailureKind, classify, sleep_or_stop, until_up
from services.common.kafka import connect_pool
from services.refdata.store import Filing, RefData, fetch_refdata
from services.router.logic import LedgerFacts, NewFiling, RefdataChange

log = logging.getLogger("router")
REFDATA_CHANNEL: Final = "refdata_changed"
LISTENER_CHECK_S: Final = 0.5
POOL_SIZE_MAX: Final = 4


class RouterState:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.ref: RefData | None = None
        self.ready = asyncio.Event()
        self.pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, stop: asyncio.Event) -> None:
        """Connect and load (waiting for the database if it is away); then keep the LISTEN alive."""
        self.pool = await until_up("PostgreSQL", lambda: connect_pool(self.s, POOL_SIZE_MAX), stop)
        await until_up("reference data", self._listen_and_reload, stop)
        if self.ref is not None:
            self.ready.set()
            self._spawn(self._watch_listener(stop))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        if self.pool is not None:
            await self.pool.close()

    async def _listen_and_reload(self) -> None:
        listener = await asyncpg.connect(self.s.pg_dsn)
        try:
            await listener.add_listener(REFDATA_CHANNEL, self._on_notify)
            await self.reload()  # after LISTEN: a change committed in between is not missed
        except BaseException:
            await listener.close()
            raise
        self._listener = listener

    async def _watch_listener(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            if self._listener is not None and not self._listener.is_closed():
                backoff = Backoff()
                await sleep_or_stop(stop, LISTENER_CHECK_S)
                continue
            try:
                await self._listen_and_reload()
                log.info("LISTEN %s restored; reference data reloaded", REFDATA_CHANNEL)
            except Exception as e:
                _warn("LISTEN reconnect", e)
                await backoff.wait(stop)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # "person:<psn_no>": one person's filings or eligibility changed (any router may have done it);
        # otherwise a reference-data load changed anything: reload everything.
        if payload.startswith("person:"):
            self._spawn(_logged("person reload", self.reload_person(payload.removeprefix("person:"))))
        else:
            self._spawn(_logged("reference data reload", self.reload()))

    async def reload(self) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            self.ref = await fetch_refdata(conn)
        log.info(
            "reference data loaded: %d hospitals, %d persons", len(self.ref.hospitals), len(self.ref.persons)
        )

    async def reload_person(self, psn_no: str) -> None:
        assert self.pool is not None and self.ref is not None
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT chronic FROM person WHERE psn_no = $1", psn_no)
            filings = await conn.fetch(
                "SELECT filing_id, filing_type, begndate, enddate, target_admdvs, source, revoked FROM filing"
                " WHERE psn_no = $1 ORDER BY filing_id", psn_no)
        person = self.ref.persons.get(psn_no)
        if row is not None and person is not None:
            self.ref.persons[psn_no] = replace(person, chronic=frozenset(row["chronic"]))
        self.ref.filings[psn_no] = [Filing(**dict(f)) for f in filings]

    async def save_filing(self, new: NewFiling) -> None:
        """Durable before the request that relies on it moves on; idempotent by filing_id."""
        await self.apply_change(RefdataChange(new.psn_no, {}, new_filing=new.filing))

    async def apply_change(self, change: RefdataChange) -> None:
        """Write a filing / eligibility change, tell every router, then update this one's snapshot."""
        assert self.pool is not None and self.ref is not None
        psn_no = change.psn_no
        async with self.pool.acquire() as conn, conn.transaction():
            if (f := change.new_filing) is not None:
                await conn.execute(
                    "INSERT INTO filing (filing_id, psn_no, filing_type, begndate, enddate, target_admdvs, source)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (filing_id) DO NOTHING",
                    f.filing_id, psn_no, f.filing_type, f.begndate, f.enddate, f.target_admdvs, f.source,
                )
            if change.revoke_filing_id is not None:
                await conn.execute("UPDATE filing SET revoked = true WHERE filing_id = $1 AND psn_no = $2",
                                   change.revoke_filing_id, psn_no)
            if change.chronic is not None:
                await conn.execute("UPDATE person SET chronic = $2 WHERE psn_no = $1", psn_no, sorted(change.chronic))
            await conn.execute("SELECT pg_notify($1, $2)", REFDATA_CHANNEL, f"person:{psn_no}")
        await self.reload_person(psn_no)

    async def ledger_facts(self, psn_no: str, year: int) -> LedgerFacts:
        """For 1101: the account balance now and this year's accumulators, read from the ledger."""
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            balance = await conn.fetchval("SELECT balc_fen FROM account WHERE psn_no = $1", psn_no)
            acc = await conn.fetchrow("SELECT * FROM accumulator WHERE psn_no = $1 AND acc_year = $2", psn_no, year)
        facts: dict[str, Any] = {}
        if acc is not None:
            facts = {k: v for k, v in dict(acc).items() if k not in ("psn_no", "acc_year")}
            facts["chronic_paid"] = json.loads(facts["chronic_paid"])
        return LedgerFacts(balance_fen=balance, year=year, accumulators=facts)


async def _logged(what: str, coro: Any) -> None:
    try:
        await coro
    except Exception as e:  # the watcher reloads everything after a reconnect; nothing else to do here
        _warn(what, e)


def _warn(what: str, e: BaseException) -> None:
    if classify(e) is FailureKind.INFRASTRUCTURE:
        log.warning("%s failed (%s); trying again", what, type(e).__name__)
    else:
        log.exception("%s failed", what)
