"""The router's routing of one decoded request into what to produce.

For each request (decoded by the shell with `schemas.codec.decode_request`: records may
come straight from a HIS, not only from the gateway): route with `services.router.logic`,
then forward to `fsi.routed` (key psn_no) or `fsi.clearing`, or answer directly (1101,
filings), or reject (the error as the reply + a dead letter). `RouterCore.begin_batch` reads the
batch's persons (`store.py`: one query per shard), then `RouterCore.handle` adds the records to
produce, in order, to the batch's outbox; the shared consumer shell
(`consumer.py` → `services/common/consumer.py`) produces them and commits the input
offsets only after the broker acknowledged them. State and SQL: `store.py`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from schemas.codec import Request
from schemas.errors import BrokerError
from schemas.wire import parse_wire_time
from services.common.config import Settings
from services.common.consumer import Outbox
from services.common.metrics import REQUESTS, STAGE_SECONDS, record_settlement_request
from services.common.response import received_from_ns, response_bytes
from services.common.shards import shard_map
from services.refdata.regions import UnknownRegion, classify_scope
from services.refdata.store import RefData
from services.router.logic import (
    Answer,
    ForwardClearing,
    IngressMeta,
    PersonQuery,
    RefdataChange,
    person_info,
    route,
)
from services.router.store import RouterState
from topics.catalog import CLEARING, REPLIES, ROUTED

_encoder = msgspec.json.Encoder(decimal_format="number")


def ingress_meta(headers: Mapping[str, bytes]) -> IngressMeta:
    """Where the answer goes, from the record's headers (the gateway's; defaults for a HIS's own records)."""
    reply_partition = headers.get("reply_partition")
    return IngressMeta(
        reply_topic=(headers.get("reply_topic") or REPLIES.name.encode()).decode(),
        reply_partition=int(reply_partition) if reply_partition else None,
        received_ns=int(headers.get("received_ns") or time.time_ns()),
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
        self.shards = shard_map(s)
        self.routed_partitions = 0  # fsi.routed's real partition count, asked of the broker at start
        self.batch: RefData | None = None  # the current batch's view (begin_batch)

    async def begin_batch(self, requests: Sequence[Request]) -> None:
        """Read what the batch's requests need about their persons (nothing before the view is read)."""
        self.batch = await self.state.read_batch(requests) if self.state.view is not None else None

    def routed_partition(self, insured_admdvs: str, psn_no: str) -> int | None:
        """The person's partition of fsi.routed: one of its shard's (ShardMap.partition_for)."""
        if not self.routed_partitions:
            return None
        return self.shards.partition_for(self.shards.shard_of(insured_admdvs), psn_no.encode(),
                                         self.routed_partitions)

    async def handle(self, req: Request, raw: bytes, headers: Mapping[str, bytes], outbox: Outbox) -> None:
        """Route one decoded request into the outbox. A refusal (BrokerError) is answered and
        dead-lettered here; any other exception is the shell's to classify (database away, or a bug)."""
        state, ref = self.state, self.batch
        started = time.perf_counter()
        meta = ingress_meta(headers)
        env = req.envelope
        infno, msgid = env.infno, env.msgid
        admdvs = env.insuplc_admdvs or env.mdtrtarea_admvs

        def answer(output: Any = None, err_msg: str = "") -> None:
            body = response_bytes(admdvs, received_from_ns(meta.received_ns), output=output, err_msg=err_msg)
            outbox.add(meta.reply_topic, body, key=msgid.encode(), partition=meta.reply_partition)

        try:
            if ref is None:
                raise RuntimeError("reference data not loaded")  # the shell waits for `ready`: a bug
            decision = route(req, ref, meta, self.s.fee_items_per_upload_max)
            if isinstance(decision, PersonQuery):
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
                person = decision.request.person
                outbox.add(ROUTED.name, _encoder.encode(decision.request), key=person.psn_no.encode(),
                           partition=self.routed_partition(person.insured_admdvs, person.psn_no))
            outcome = "ok"
        except BrokerError as e:
            outcome = e.code
            record_settlement_request(infno, scope_of(req), e.code)
            outbox.dead_letter(e.code, e.err_msg, raw, msgid=msgid, infno=infno)
            answer(err_msg=e.err_msg)
        REQUESTS.labels("router", infno, outcome).inc()
        STAGE_SECONDS.labels("router").observe(time.perf_counter() - started)
