"""The router's shell-independent part: reference data in memory, and one record → what to produce.

For each request: decode (records may come straight from a HIS, not only from the
gateway), route with `services.router.logic`, then forward to `fsi.routed` (key
psn_no) or `fsi.clearing`, or answer directly (1101, filings), or reject (the error
as the reply + a dead letter). `RouterCore.handle` returns the records to produce,
in order; the Kafka shell (`consumer.py`, aiokafka; or `app.py`, faust) produces
them and commits the input offsets only after the broker acknowledged them.

Reference data is held in memory and reloaded when the loader NOTIFYs
`refdata_changed`; filings created on the spot (promise / emergency / 2501–2504)
are written to PostgreSQL first, so they survive a restart, and announced to every
router with a per-person NOTIFY.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import msgspec

from schemas.codec import decode_request
from schemas.errors import BrokerError
from schemas.internal import DeadLetter
from schemas.wire import parse_wire_time
from services.common.config import Settings
from services.common.metrics import DEAD_LETTERS, REQUESTS, STAGE_SECONDS, record_settlement_request
from services.common.response import received_from_ns, response_bytes
from services.refdata.regions import UnknownRegion, classify_scope
from services.refdata.store import Filing, RefData, fetch_refdata
from services.router.logic import (
    Answer,
    ForwardClearing,
    IngressMeta,
    LedgerFacts,
    NewFiling,
    PersonQuery,
    RefdataChange,
    person_info,
    route,
)
from topics.catalog import CLEARING, DEADLETTER, REPLIES, ROUTED

log = logging.getLogger("router")
REFDATA_CHANNEL = "refdata_changed"
_encoder = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True, slots=True)
class Out:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    partition: int | None = None
    headers: list[tuple[str, bytes]] | None = None


class RouterState:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.ref: RefData | None = None
        self.ready = asyncio.Event()
        self.pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.s.pg_dsn, min_size=1, max_size=4)
        await self.reload()
        self._listener = await asyncpg.connect(self.s.pg_dsn)
        await self._listener.add_listener(REFDATA_CHANNEL, self._on_notify)
        self.ready.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # "person:<psn_no>": one person's filings or eligibility changed (any router may have done it);
        # otherwise a reference-data load changed anything: reload everything.
        if payload.startswith("person:"):
            asyncio.get_running_loop().create_task(self.reload_person(payload.removeprefix("person:")))
        else:
            asyncio.get_running_loop().create_task(self.reload())

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


def _scope_of(req: Any) -> str:
    """The scope a rejected request would have had (metrics label only)."""
    try:
        return classify_scope(req.envelope.insuplc_admdvs, req.envelope.mdtrtarea_admvs)
    except (AttributeError, UnknownRegion):
        return "unknown"


class RouterCore:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.state = RouterState(s)

    async def handle(self, raw: bytes, headers: dict[str, bytes]) -> list[Out]:
        """Route one ingress record; never raises for a bad record (it becomes a dead letter)."""
        try:
            return await self._handle(raw, headers)
        except Exception:  # a bug must not stop the pipeline: keep the record for analysis
            log.exception("unexpected error routing a record; sent to dead letters")
            DEAD_LETTERS.labels("router", "INTERNAL").inc()
            letter = DeadLetter(stage="router", err_code="INTERNAL", err_msg="INTERNAL: unexpected error",
                                msgid=None, infno=None, fixmedins_code=None, at_ns=time.time_ns(), original=raw)
            return [Out(DEADLETTER.name, None, _encoder.encode(letter))]

    async def _handle(self, raw: bytes, headers: dict[str, bytes]) -> list[Out]:
        state = self.state
        started = time.perf_counter()
        reply_partition = headers.get("reply_partition")
        meta = IngressMeta(
            reply_topic=(headers.get("reply_topic") or REPLIES.name.encode()).decode(),
            reply_partition=int(reply_partition) if reply_partition else None,
            received_ns=int(headers.get("received_ns") or time.time_ns()),
        )
        outs: list[Out] = []
        infno, msgid, admdvs = "unknown", None, ""
        req = None

        def answer(output: Any = None, err_msg: str = "") -> Out:
            body = response_bytes(admdvs, received_from_ns(meta.received_ns), output=output, err_msg=err_msg)
            return Out(meta.reply_topic, (msgid or "").encode(), body, meta.reply_partition)

        try:
            req = decode_request(raw)
            infno, msgid = req.envelope.infno, req.envelope.msgid
            admdvs = req.envelope.insuplc_admdvs or req.envelope.mdtrtarea_admvs
            if state.ref is None:
                raise RuntimeError("reference data not loaded")  # shells wait for `ready`: a bug
            decision = route(req, state.ref, meta, self.s.fee_items_per_upload_max)
            if isinstance(decision, PersonQuery):
                year = parse_wire_time("inf_time", req.envelope.inf_time).year
                facts = await state.ledger_facts(decision.psn_no, year)
                outs.append(answer(person_info(decision.psn_no, state.ref, req.envelope.inf_time, facts)))
            elif isinstance(decision, RefdataChange):
                await state.apply_change(decision)
                outs.append(answer(decision.output))
            elif isinstance(decision, ForwardClearing):
                partition = str(meta.reply_partition).encode() if meta.reply_partition is not None else b""
                outs.append(Out(CLEARING.name, decision.fixmedins_code.encode(), raw, headers=[
                    ("reply_topic", meta.reply_topic.encode()), ("reply_partition", partition),
                    ("received_ns", str(meta.received_ns).encode()),
                ]))
            elif isinstance(decision, Answer):
                outs.append(answer(decision.output))
            else:
                if decision.new_filing is not None:
                    await state.save_filing(decision.new_filing)
                outs.append(Out(ROUTED.name, decision.request.person.psn_no.encode(),
                                _encoder.encode(decision.request)))
            outcome = "ok"
        except BrokerError as e:
            outcome = e.code
            DEAD_LETTERS.labels("router", e.code).inc()
            record_settlement_request(infno, _scope_of(req), e.code)
            letter = DeadLetter(stage="router", err_code=e.code, err_msg=e.err_msg, msgid=msgid, infno=infno,
                                fixmedins_code=None, at_ns=time.time_ns(), original=raw)
            outs.append(Out(DEADLETTER.name, (msgid or "").encode() or None, _encoder.encode(letter)))
            if msgid is not None:
                outs.append(answer(err_msg=e.err_msg))
        REQUESTS.labels("router", infno, outcome).inc()
        STAGE_SECONDS.labels("router").observe(time.perf_counter() - started)
        return outs
