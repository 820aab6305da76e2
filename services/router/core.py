"""The router's routing of one decoded request into what to produce.

For each request (decoded by the shell with `schemas.codec.decode_request`: records may
come straight from a HIS, not only from the gateway): route with `services.router.logic`,
then hand it to the settlement engine (a `RoutedRequest`, settled in the same batch: see
`services/settle/stage.py`) or forward it to `fsi.clearing`, or answer directly (1101,
filings), or reject (the error as the reply + a dead letter). `RouterCore.begin_batch` reads the
batch's persons (`store.py`: one query per shard), then `RouterCore.handle` adds what to produce,
in order, to the batch's outbox and returns what the engine settles. State and SQL: `store.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from schemas.codec import Request
from schemas.errors import BrokerError
from schemas.internal import RoutedRequest
from schemas.wire import parse_wire_time
from services.common.config import Settings
from services.common.consumer import Outbox
from services.common.metrics import PERSON_QUERIES_REFUSED, REQUESTS, STAGE_SECONDS, record_settlement_request
from services.common.response import received_from_ns, response_bytes
from services.common.signing import content_digest
from services.refdata.regions import UnknownRegion, classify_scope, province_of
from services.refdata.store import RefData
from services.router.auth import RateLimiter, authenticate, session_of, sign_no_for
from services.router.logic import (
    Answer,
    ForwardClearing,
    IngressMeta,
    PersonQuery,
    RefdataChange,
    Session,
    person_info,
    route,
)
from services.router.store import RouterState
from topics.catalog import CLEARING, REPLIES


def ingress_meta(headers: Mapping[str, bytes]) -> IngressMeta:
    """Where the answer goes, from the record's headers (the gateway's; defaults for a HIS's own records).
    Only the replies topic and one of its partitions: a header naming another topic (a HIS asking the
    router to write into fsi.settlements, say) is ignored, as is a partition out of range or not a number."""
    partition = headers.get("reply_partition") or b""
    received = headers.get("received_ns") or b""
    return IngressMeta(
        reply_topic=REPLIES.name,
        reply_partition=int(partition) if partition.isdigit() and int(partition) < REPLIES.partitions else None,
        received_ns=int(received) if received.isdigit() else time.time_ns(),
    )


def scope_of(req: Any) -> str:
    """The scope a rejected request would have had (metrics label only)."""
    try:
        return classify_scope(req.envelope.insuplc_admdvs, req.envelope.mdtrtarea_admvs)
    except (AttributeError, UnknownRegion):
        return "unknown"


class RouterCore:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.state = RouterState(s)
        self.batch: RefData | None = None  # the current batch's view (begin_batch)
        self.refusals: dict[int, BrokerError] = {}  # id(request) → why the batch's request is not trusted
        self.sessions: dict[str, str] = {}  # the batch's live sign-in sessions: sign_no → institution
        self.person_queries = RateLimiter(s.person_queries_per_minute)

    async def begin_batch(self, batch: Sequence[tuple[Request, bytes]]) -> None:
        """Authenticate the batch's requests (auth.py), then — for those that pass — read what they
        need about their persons (nothing before the view is read)."""
        self.refusals = {}
        self.sessions = {}
        view = self.state.view
        if view is None:
            self.batch = None
            return
        now = datetime.now(UTC)
        signed = []
        for req, raw in batch:
            refusal = authenticate(req.envelope, raw, view.keys, now, self.s.inf_time_window_s)
            if refusal is None:
                signed.append(req)
            else:
                self.refusals[id(req)] = refusal
        self.sessions = await self.state.live_sessions(
            {sign_no for req in signed if (sign_no := session_of(req.envelope, req.body))})
        trusted: list[Request] = []
        digest_of: dict[int, bytes] = {}  # id(request) → what its msgid stands for
        digests: dict[str, bytes] = {}  # msgid → the first digest in this batch
        for req in signed:
            env = req.envelope
            sign_no = session_of(env, req.body)
            if sign_no is not None and self.sessions.get(sign_no) != env.fixmedins_code:
                self.refusals[id(req)] = BrokerError(
                    "SIGN_NO_INVALID", "sign_no is not a live sign-in session of this institution")
                continue
            trusted.append(req)
            digest_of[id(req)] = _digest(req)
            digests.setdefault(env.msgid, digest_of[id(req)])
        stored, self.batch = await asyncio.gather(self.state.register_msgids(digests),
                                                  self.state.read_batch(trusted))
        for req in trusted:  # a msgid recorded before (or earlier in this batch) with other content
            if digest_of[id(req)] != stored.get(req.envelope.msgid, digests[req.envelope.msgid]):
                self.refusals[id(req)] = BrokerError("MSGID_CONFLICT", "this msgid was already used for a "
                                                     "different request")

    async def handle(self, req: Request, raw: bytes, headers: Mapping[str, bytes], outbox: Outbox
                     ) -> RoutedRequest | None:
        """Route one decoded request: what to produce goes into the outbox, a request to settle is returned.
        A refusal (BrokerError) is answered and dead-lettered here; any other exception is the shell's to
        classify (database away, or a bug)."""
        state, ref = self.state, self.batch
        started = time.perf_counter()
        meta = ingress_meta(headers)
        env = req.envelope
        infno, msgid = env.infno, env.msgid
        admdvs = env.insuplc_admdvs or env.mdtrtarea_admvs

        def answer(output: Any = None, err_msg: str = "") -> None:
            body = response_bytes(admdvs, received_from_ns(meta.received_ns), output=output, err_msg=err_msg)
            outbox.add(meta.reply_topic, body, key=msgid.encode(), partition=meta.reply_partition)

        routed = None
        try:
            if (refusal := self.refusals.get(id(req))) is not None:
                raise refusal
            if ref is None:
                raise RuntimeError("reference data not loaded")  # the shell waits for `ready`: a bug
            if infno == "1101" and not self.person_queries.allow(env.fixmedins_code, time.monotonic()):
                PERSON_QUERIES_REFUSED.labels(_province(env.mdtrtarea_admvs)).inc()
                raise BrokerError("RATE_LIMITED", f"more than {self.s.person_queries_per_minute} person "
                                  "look-ups a minute from this institution")
            decision = route(req, ref, meta, self.s.fee_items_per_upload_max)
            if isinstance(decision, Session):
                answer(await self._session(decision, env.fixmedins_code, msgid, meta.received_ns))
            elif isinstance(decision, PersonQuery):
                year = parse_wire_time("inf_time", env.inf_time).year
                facts = await state.ledger_facts(ref, decision.psn_no, year)
                answer(person_info(decision.psn_no, ref, env.inf_time, facts))
            elif isinstance(decision, RefdataChange):
                await state.apply_change(ref, decision)
                answer(decision.output)
            elif isinstance(decision, ForwardClearing):
                partition = str(meta.reply_partition).encode() if meta.reply_partition is not None else b""
                outbox.add(CLEARING.name, raw, key=decision.fixmedins_code.encode(), headers=[
                    ("reply_topic", meta.reply_topic.encode()), ("reply_partition", partition),
                    ("received_ns", str(meta.received_ns).encode()),
                ])
            elif isinstance(decision, Answer):
                answer(decision.output)
            else:
                if decision.new_filing is not None:
                    await state.save_filing(ref, decision.new_filing.psn_no, decision.new_filing.filing)
                routed = decision.request
            outcome = "ok"
        except BrokerError as e:
            outcome = e.code
            record_settlement_request(infno, scope_of(req), e.code)
            outbox.dead_letter(e.code, e.err_msg, raw, msgid=msgid, infno=infno)
            answer(err_msg=e.err_msg)
        REQUESTS.labels("router", infno, outcome).inc()
        STAGE_SECONDS.labels("router").observe(time.perf_counter() - started)
        return routed

    async def _session(self, decision: Session, fixmedins_code: str, msgid: str, received_ns: int) -> dict[str, Any]:
        """9001: open a session (its sign_no derived from the msgid: a replayed 9001 opens no second one);
        9002: end one (checked live and of this institution in begin_batch)."""
        at = received_from_ns(received_ns)
        sign_time = at.strftime("%Y-%m-%d %H:%M:%S")
        if decision.sign_in:
            sign_no = sign_no_for(msgid, at)
            await self.state.sign_in(sign_no, fixmedins_code, decision.opter)
            return {"signinoutb": {"sign_time": sign_time, "sign_no": sign_no}}
        await self.state.sign_out(decision.sign_no)
        self.sessions.pop(decision.sign_no, None)
        return {"signoutoutb": {"sign_time": sign_time}}


def _digest(req: Request) -> bytes:
    env = req.envelope
    return content_digest(env.infno, env.fixmedins_code, env.insuplc_admdvs, env.mdtrtarea_admvs, bytes(env.input))


def _province(admdvs: str) -> str:
    try:
        return province_of(admdvs)
    except (UnknownRegion, ValueError):
        return "unknown"
