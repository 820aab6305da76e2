"""Smart monitoring, post-event: a faust-streaming app over the settlement stream.

    fsi.settlements (key psn_no) ──agent `persons`──▶ table persons (psn_no → PersonState)
        │                                             ├─▶ fsi.judgements (key jr_id)
        │                                             └─▶ fsi.monitor.stays (key cost group)
        └ undecodable → fsi.deadletter                       │
                                     agent `cost_groups` ◀───┘ table cost_groups (group → CostGroupState)
                                                             └─▶ fsi.judgements (COST_OUTLIER)

The transitions are services/smartmon/state.py (pure); this module only wires them to faust. Tables are
faust's memory store, rebuilt from their compacted changelog topics at start (topics/catalog.py declares
every topic: the app declares none). Values are msgspec JSON bytes (raw serializers), so faust never
pickles or guesses a codec. Delivery is faust's at-least-once: after a crash some events are applied
again, which changes nothing (the state is a set keyed by setl_id and the output a diff against what was
sent). An event's output is acknowledged before its state is written, so a crash never loses output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import faust
import msgspec
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas.internal import DeadLetter, SettlementEvent
from schemas.monitoring import Judgement, StayCost
from services.common.config import Settings
from services.common.kafka import SCRAM_MECHANISM, SESSION_TIMEOUT_MS, background_fetch
from services.common.metrics import DEAD_LETTERS, SMARTMON_EVENTS, SMARTMON_STAYS_DROPPED, record_judgement_sent
from services.common.secrets import password
from services.common.watchdog import ProgressWatchdog, loop_watchdog
from services.smartmon.rules import RuleBook, load_rules
from services.smartmon.state import apply_event, apply_stay, cap_stays, decode_group, decode_person, encode
from topics.catalog import DEADLETTER, JUDGEMENTS, MONITOR_STAYS, SETTLEMENTS, SMARTMON_APP

log = logging.getLogger("smartmon")
STAGE = "smartmon"
PRINCIPAL = "smartmon"

_event_decoder = msgspec.json.Decoder(SettlementEvent)
_stay_decoder = msgspec.json.Decoder(StayCost)
_encoder = msgspec.json.Encoder(decimal_format="number")


class BatchingConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):  # type: ignore[misc]
    """Faust's consumer thread, whose aiokafka consumer fetches as every background consumer does
    (services/common/kafka.py, background_fetch): faust builds that consumer itself with a fixed 1.5 s wait
    and no minimum, and has no setting for either. The consumer reads both options when it starts."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        fetch = background_fetch()
        consumer._fetch_min_bytes = fetch["fetch_min_bytes"]
        consumer._fetch_max_wait_ms = fetch["fetch_max_wait_ms"]
        return consumer


class BatchingConsumer(faust_aiokafka.Consumer):  # type: ignore[misc]
    def _new_consumer_thread(self) -> BatchingConsumerThread:
        return BatchingConsumerThread(self, loop=self.loop, beacon=self.beacon)


class BatchingTransport(faust_aiokafka.Transport):  # type: ignore[misc]
    """faust's aiokafka transport with BatchingConsumer; the app takes it through its `transport` setter."""

    Consumer = BatchingConsumer


def app_id(s: Settings) -> str:
    return s.topic_prefix + SMARTMON_APP


def make_app(s: Settings, book: RuleBook | None = None) -> faust.App:
    """The app with its topics, tables and agents."""
    book = book or load_rules()
    known_rules = frozenset(book.rules)
    app = faust.App(
        app_id(s),
        broker=[f"kafka://{host}" for host in s.kafka_bootstrap.split(",")],
        broker_credentials=faust.SASLCredentials(
            username=PRINCIPAL, password=password(s, f"kafka-{PRINCIPAL}"), mechanism=SCRAM_MECHANISM),
        store="memory://",  # rebuilt from the changelog at start: the state is small (a horizon per person)
        # Faust makes a data directory even for memory tables; its default is one in the working directory.
        datadir=str(s.run_dir / "smartmon-data"),
        topic_allow_declare=False,  # topics.apply creates every topic, with the ACLs that go with it
        topic_disable_leader=True,  # no leader election (and no `__assignor-__leader` topic): nothing needs it
        topic_partitions=s.partitions,
        topic_replication_factor=s.replication_factor,
        consumer_auto_offset_reset="earliest",
        # Like every consumer of the broker (faust's default is 60 s): after a kill -9 the group waits this
        # long for the dead member before the new process gets the partitions.
        broker_session_timeout=SESSION_TIMEOUT_MS / 1000,
        broker_heartbeat_interval=3.0,
        producer_acks=-1,
        web_enabled=False,  # metrics are prometheus_client's (serve_metrics)
        key_serializer="raw",  # every key and value is bytes, decoded here with msgspec
        value_serializer="raw",
    )
    # Before anything asks the app for its transport (topics, tables and agents do).
    app.transport = BatchingTransport(app.conf.broker_consumer, app)

    # Keys and values are bytes as they are on the wire ("raw"): msgspec decodes and encodes them here.
    def raw_topic(name: str, partitions: int | None = None) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=partitions)

    settlements = raw_topic(SETTLEMENTS.name, s.partitions)
    stays_topic = raw_topic(MONITOR_STAYS.name, s.partitions)
    judgements_topic, deadletter = raw_topic(JUDGEMENTS.name), raw_topic(DEADLETTER.name)
    # bytes keys and values: faust picks the raw serializer for a table's changelog
    persons = app.Table("persons", key_type=bytes, value_type=bytes, partitions=s.partitions)
    cost_groups = app.Table("cost_groups", key_type=bytes, value_type=bytes, partitions=s.partitions)

    async def send_judgements(judgements: list[Judgement]) -> list[Awaitable[Any]]:
        sent = []
        for j in judgements:
            sent.append(await judgements_topic.send(key=j.jr_id.encode(), value=_encoder.encode(j)))
            record_judgement_sent(j.rule_id, j.withdrawn, known_rules)
        return sent

    async def dead_letter(agent: str, raw: bytes, reason: str, msgid: str | None = None) -> None:
        DEAD_LETTERS.labels(STAGE, "INTERNAL").inc()
        SMARTMON_EVENTS.labels(agent, "INTERNAL").inc()
        letter = DeadLetter(stage=STAGE, err_code="INTERNAL", err_msg=f"INTERNAL: {reason}", msgid=msgid, infno=None,
                            fixmedins_code=None, at_ns=time.time_ns(), original=raw)
        await deadletter.send(key=msgid.encode() if msgid else None, value=_encoder.encode(letter))

    @app.agent(settlements, name="persons")
    async def person_agent(stream: faust.StreamT[Any]) -> None:
        async for event in stream.events():
            raw: bytes = event.value
            try:
                ev = _event_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                await dead_letter("persons", raw, f"undecodable {SETTLEMENTS.name} record: {e}")
                continue
            try:
                key = ev.psn_no.encode()
                before = persons.get(key)
                state = decode_person(before)
                out = apply_event(state, ev, book)
            except Exception as e:  # a bug the record triggers: dead-lettered, the stream goes on
                log.exception("settlement event %s could not be applied", ev.setl_id)
                await dead_letter("persons", raw, f"settlement event not applied ({type(e).__name__})", ev.msgid)
                continue
            sent = await send_judgements(out.judgements)
            sent += [await stays_topic.send(key=stay.group.encode(), value=_encoder.encode(stay)) for stay in out.stays]
            # Output acknowledged before the state says it was sent: a crash in between replays the event and
            # sends the same again (the sink and the cost groups take a repeat as nothing new), where the other
            # order could lose it. Only events with output wait.
            if sent:
                await asyncio.gather(*sent)
            after = encode(state)
            if after != before:  # a replayed event changes nothing: no changelog record either
                persons[key] = after
            SMARTMON_EVENTS.labels("persons", "ok").inc()

    @app.agent(stays_topic, name="cost_groups")
    async def cost_agent(stream: faust.StreamT[Any]) -> None:
        async for event in stream.events():
            raw = event.value
            try:
                stay = _stay_decoder.decode(raw)
                key = stay.group.encode()
                before = cost_groups.get(key)
                group = decode_group(before)
                judgements = apply_stay(group, stay, book)
                SMARTMON_STAYS_DROPPED.inc(cap_stays(group))
            except Exception as e:
                log.warning("stay record not applied (%s)", type(e).__name__)
                await dead_letter("cost_groups", raw, f"{MONITOR_STAYS.name} record not applied ({type(e).__name__})")
                continue
            sent = await send_judgements(judgements)
            if sent:
                await asyncio.gather(*sent)  # acknowledged first, as above
            after = encode(group)
            if after != before:
                cost_groups[key] = after
            SMARTMON_EVENTS.labels("cost_groups", "ok").inc()

    @app.task
    async def watchdogs() -> None:
        """The service's watchdogs (services/common/watchdog.py), until faust cancels its tasks at stop.
        Recovering the tables from their changelogs is waiting on purpose, not a stall."""
        stop = asyncio.Event()
        progress = ProgressWatchdog(s, PRINCIPAL)
        try:
            await asyncio.gather(
                progress.guard(SMARTMON_APP, [SETTLEMENTS.name, MONITOR_STAYS.name], stop,
                               exempt=lambda: bool(app.in_recovery)),
                loop_watchdog(stop))
        finally:
            await progress.close()

    return app
