"""The router's state: institutions in memory, persons read a batch at a time, and the few writes.

- Hospitals, catalog items, regions (`RefView`): read once in one snapshot, then one applier task
  applies the hub's `refdata_change` rows after the applied version, in order, reading only the
  changed keys. It wakes on NOTIFY `refdata_changed` and polls every `POLL_S` anyway (a NOTIFY sent
  while the LISTEN connection was away is lost; the change log is not). Nothing else writes the view,
  so there are never two reloads at once and the version never goes back.
- Persons, filings, eligibility (`read_batch`): per batch, the person index (hub) for the 1101
  certificates in one query, then one query per shard for the batch's psn_nos, the shards
  concurrently. Nothing about a person is kept after the batch.
- Writes (2501–2504, filings made on the spot) go to the person's shard and into the batch's view, so
  the batch's later records see them. Nobody caches persons, so nobody is told.
- Trust (hub, once per batch): the msgid registry `msgid_seen` (`register_msgids`) and the live
  sign-in sessions (`live_sessions`); 9001/9002 open and end sessions. Institution keys are part of
  the view (unsealed with the deployment's key-encryption key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

import asyncpg

from schemas.codec import Request
from schemas.person import Input1101
from services.common.config import Settings
from services.common.consumer import Backoff, FailureKind, classify, sleep_or_stop, until_up
from services.common.kafka import connect_pool
from services.common.shards import GENERIC_PLANS, ShardPools, certno_digest, person_index_key
from services.common.signing import key_encryption_key
from services.refdata.store import (
    Filing,
    RefData,
    RefView,
    apply_changes,
    fetch_changes,
    fetch_persons,
    fetch_view,
)
from services.router.logic import LedgerFacts, RefdataChange

log = logging.getLogger("router")
REFDATA_CHANNEL: Final = "refdata_changed"
# The change log is read at least this often, NOTIFY or not: a safety net only (a NOTIFY sent while LISTEN was
# away is caught up when it listens again), so not twice a second at every idle moment.
POLL_S: Final = 5.0
LISTENER_CHECK_S: Final = 0.5
CHANGES_PER_READ: Final = 5_000
POOL_SIZE_MAX: Final = 4
SESSION_HOURS: Final = 24  # a sign-in session ends with 9002, or a day after 9001


class RouterState:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.view: RefView | None = None
        self.ready = asyncio.Event()
        self.pool: asyncpg.Pool | None = None  # the hub
        self.shards: ShardPools | None = None
        self._index_key = person_index_key(s)
        self._kek = key_encryption_key(s)
        self._listener: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, stop: asyncio.Event) -> None:
        """Connect and read the view (waiting for the database if it is away); then keep it current."""
        # No session state on pooled connections (LISTEN has a connection of its own; the view's reads are
        # transaction-scoped): a released connection needs no reset statement, one round trip per acquire.
        self.pool = await until_up("PostgreSQL", lambda: connect_pool(self.s, POOL_SIZE_MAX, session_reset=False),
                                   stop)
        # The shards' statements are keyed lookups and writes: planned once per connection (GENERIC_PLANS).
        self.shards = await until_up(
            "shard databases", lambda: ShardPools.connect(self.s, POOL_SIZE_MAX, session_reset=False,
                                                          server_settings=GENERIC_PLANS), stop)
        await until_up("reference data", self._read_view, stop)
        if self.view is not None:
            self.ready.set()
            self._spawn(self._apply_changes(stop))
            self._spawn(self._watch_listener(stop))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        if self.shards is not None:
            await self.shards.close()
        if self.pool is not None:
            await self.pool.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Institutions ----------------------------------------------------------------------------------

    async def _read_view(self) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            self.view = await fetch_view(conn, self._kek)
        log.info("reference data read: %d hospitals, %d catalog items, keys of %d institutions, version %d",
                 len(self.view.hospitals), len(self.view.catalog), len(self.view.keys), self.view.version)

    async def catch_up(self) -> int:
        """Apply every change committed after the view's version. Only the applier task calls this."""
        assert self.pool is not None and self.view is not None
        total = 0
        while True:
            async with self.pool.acquire() as conn:
                changes, rows = await fetch_changes(conn, self.view.version, CHANGES_PER_READ, self._kek)
            total += apply_changes(self.view, changes, rows)
            if len(changes) < CHANGES_PER_READ:
                if total:
                    log.info("reference data: %d changes applied, version %d", total, self.view.version)
                return total

    async def _apply_changes(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            try:
                await self.catch_up()
                backoff = Backoff()
            except Exception as e:
                _warn("reference data update", e)
                await backoff.wait(stop)

    async def _listen(self) -> None:
        listener = await asyncpg.connect(self.s.pg_dsn)
        try:
            await listener.add_listener(REFDATA_CHANNEL, self._on_notify)
        except BaseException:
            await listener.close()
            raise
        self._listener = listener
        self._wake.set()  # whatever was announced while nobody listened: read the log now

    async def _watch_listener(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            if self._listener is not None and not self._listener.is_closed():
                backoff = Backoff()
                await sleep_or_stop(stop, LISTENER_CHECK_S)
                continue
            try:
                await self._listen()
                log.info("LISTEN %s", REFDATA_CHANNEL)
            except Exception as e:
                _warn("LISTEN", e)
                await backoff.wait(stop)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._wake.set()

    # Trust: the msgid registry and sign-in sessions (hub) ------------------------------------------

    async def register_msgids(self, digests: dict[str, bytes]) -> dict[str, bytes]:
        """Record each new msgid with its content digest; returns the digests recorded before for the
        others (the caller refuses a different one: MSGID_CONFLICT). The primary key decides between
        concurrent first uses, across router processes."""
        assert self.pool is not None
        if not digests:
            return {}
        msgids = list(digests)
        new = {r["msgid"] for r in await self.pool.fetch(
            "INSERT INTO msgid_seen (msgid, digest) SELECT * FROM unnest($1::text[], $2::bytea[])"
            " ON CONFLICT (msgid) DO NOTHING RETURNING msgid", msgids, [digests[m] for m in msgids])}
        seen = [m for m in msgids if m not in new]
        if not seen:
            return {}
        return {r["msgid"]: bytes(r["digest"]) for r in await self.pool.fetch(
            "SELECT msgid, digest FROM msgid_seen WHERE msgid = ANY($1::text[])", seen)}

    async def live_sessions(self, sign_nos: set[str]) -> dict[str, str]:
        """sign_no → institution, of the sessions among `sign_nos` that are open (9001, not yet 9002)."""
        assert self.pool is not None
        if not sign_nos:
            return {}
        return {r["sign_no"]: r["fixmedins_code"] for r in await self.pool.fetch(
            "SELECT sign_no, fixmedins_code FROM sign_session WHERE sign_no = ANY($1::text[])"
            " AND signed_out_at IS NULL AND signed_in_at > now() - make_interval(hours => $2)",
            list(sign_nos), SESSION_HOURS)}

    async def sign_in(self, sign_no: str, fixmedins_code: str, opter: str) -> None:
        assert self.pool is not None
        await self.pool.execute(
            "INSERT INTO sign_session (sign_no, fixmedins_code, opter) VALUES ($1, $2, $3)"
            " ON CONFLICT (sign_no) DO NOTHING", sign_no, fixmedins_code, opter)

    async def sign_out(self, sign_no: str) -> None:
        assert self.pool is not None
        await self.pool.execute(
            "UPDATE sign_session SET signed_out_at = now() WHERE sign_no = $1 AND signed_out_at IS NULL", sign_no)

    # Persons, a batch at a time --------------------------------------------------------------------

    def _shard(self, admdvs: str | None) -> str | None:
        assert self.shards is not None
        try:
            return self.shards.map.shard_of(admdvs) if admdvs else None
        except KeyError:  # a province no shard holds: nobody is insured there
            return None

    async def read_batch(self, requests: Sequence[Request]) -> RefData:
        """The batch's view: institutions from memory, the persons the requests name from their shards.
        A person is asked for in the shard of the region the request names (the insured region)."""
        assert self.pool is not None and self.shards is not None and self.view is not None
        wanted: dict[str, set[str]] = {}
        certs: dict[bytes, str] = {}  # digest → certificate, for 1101
        for req in requests:
            psn_no = req.psn_no
            if isinstance(req.body, Input1101):
                q = req.body.data
                cert = q.certno or q.mdtrt_cert_no
                certs[certno_digest(self._index_key, cert)] = cert
                psn_no = q.mdtrt_cert_no  # a psn_no may stand as the certificate
            if psn_no and (shard := self._shard(req.envelope.insuplc_admdvs)) is not None:
                wanted.setdefault(shard, set()).add(psn_no)
        by_cert: dict[str, str] = {}
        if certs:
            for r in await self.pool.fetch(
                    "SELECT certno_digest, psn_no, insuplc_admdvs FROM person_index"
                    " WHERE certno_digest = ANY($1::bytea[])", list(certs)):
                by_cert[certs[bytes(r["certno_digest"])]] = r["psn_no"]
                if (shard := self._shard(r["insuplc_admdvs"])) is not None:
                    wanted.setdefault(shard, set()).add(r["psn_no"])
        found = await asyncio.gather(*(fetch_persons(self.shards.pools[shard], sorted(psn_nos))
                                       for shard, psn_nos in wanted.items()))
        ref = RefData(hospitals=self.view.hospitals, catalog=self.view.catalog, persons_by_cert=by_cert,
                      shard_of=self.shards.map.shard_of)
        for persons, filings in found:
            ref.persons.update(persons)
            ref.filings.update(filings)
        return ref

    def _pool_of(self, ref: RefData, psn_no: str) -> asyncpg.Pool:
        assert self.shards is not None
        return self.shards.of(ref.persons[psn_no].insuplc_admdvs)

    async def save_filing(self, ref: RefData, psn_no: str, filing: Filing) -> None:
        """A filing made on the spot: durable before the request that relies on it moves on."""
        await self.apply_change(ref, RefdataChange(psn_no, {}, new_filing=filing))

    async def apply_change(self, ref: RefData, change: RefdataChange) -> None:
        """Write a filing / eligibility change to the person's shard, then into the batch's view. A change
        is one statement (2501–2504 each make one kind), which commits alone: a transaction around it
        would only add BEGIN and COMMIT round trips."""
        psn_no = change.psn_no
        chronic: list[str] | None = None
        kinds = (change.new_filing is not None) + (change.revoke_filing_id is not None) + (
            change.chronic_disease is not None)
        async with self._pool_of(ref, psn_no).acquire() as conn, (
                conn.transaction() if kinds > 1 else contextlib.nullcontext()):
            if (f := change.new_filing) is not None:
                await conn.execute(
                    "INSERT INTO filing (filing_id, psn_no, filing_type, begndate, enddate, target_admdvs, source)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (filing_id) DO NOTHING",
                    f.filing_id, psn_no, f.filing_type, f.begndate, f.enddate, f.target_admdvs, f.source,
                )
            if change.revoke_filing_id is not None:
                await conn.execute("UPDATE filing SET revoked = true WHERE filing_id = $1 AND psn_no = $2",
                                   change.revoke_filing_id, psn_no)
            if change.chronic_disease is not None:
                # Online wins over the file for this disease until its next online change (person_chronic).
                chronic = await conn.fetchval(
                    "UPDATE person SET chronic_online = chronic_online || jsonb_build_object($2::text, $3::boolean),"
                    " chronic = person_chronic(chronic_file,"
                    "                          chronic_online || jsonb_build_object($2::text, $3::boolean))"
                    " WHERE psn_no = $1 RETURNING chronic",
                    psn_no, change.chronic_disease, change.chronic_grant)
        _into_batch(ref, change, chronic)

    async def ledger_facts(self, ref: RefData, psn_no: str, year: int) -> LedgerFacts:
        """For 1101: the account balance now and this year's accumulators, from the person's shard."""
        # One round trip: the balance beside the year's accumulator row (all NULL when there is none).
        row = await self._pool_of(ref, psn_no).fetchrow(
            "SELECT (SELECT balc_fen FROM account WHERE psn_no = $1) AS balance_fen, a.*"
            " FROM (SELECT) AS one LEFT JOIN accumulator AS a ON a.psn_no = $1 AND a.acc_year = $2", psn_no, year)
        assert row is not None  # the outer side always yields its one row
        facts: dict[str, Any] = {}
        if row["acc_year"] is not None:
            facts = {k: v for k, v in dict(row).items() if k not in ("balance_fen", "psn_no", "acc_year")}
            facts["chronic_paid"] = json.loads(facts["chronic_paid"])
        return LedgerFacts(balance_fen=row["balance_fen"], year=year, accumulators=facts)


def _into_batch(ref: RefData, change: RefdataChange, chronic: list[str] | None) -> None:
    """What the shard now holds, as the rest of the batch must see it."""
    psn_no = change.psn_no
    filings = ref.filings.setdefault(psn_no, [])
    if (f := change.new_filing) is not None and all(x.filing_id != f.filing_id for x in filings):
        filings.append(f)
        filings.sort(key=lambda x: x.filing_id)
    if change.revoke_filing_id is not None:
        ref.filings[psn_no] = [replace(x, revoked=True) if x.filing_id == change.revoke_filing_id else x
                               for x in filings]
    if chronic is not None:
        ref.persons[psn_no] = replace(ref.persons[psn_no], chronic=frozenset(chronic))


def _warn(what: str, e: BaseException) -> None:
    if classify(e) is FailureKind.INFRASTRUCTURE:
        log.warning("%s failed (%s); trying again", what, type(e).__name__)
    else:
        log.exception("%s failed", what)
