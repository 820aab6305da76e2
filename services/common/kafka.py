"""Kafka clients with every option that matters set explicitly at the call site.

Every client authenticates with SASL/SCRAM-SHA-512 as one principal (README "Security"); the broker's
ACLs (topics/acls.py) say what each principal may do.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.common.config import Settings
from services.common.metrics import ASSIGNED_PARTITIONS, record_rebalance
from services.common.secrets import password

SCRAM_MECHANISM = "SCRAM-SHA-512"
# `admin` is the stack's own tooling (super user); `his` the demo's and the benchmark's HIS simulator;
# `inst-<fixmedins_code>` (issued by `deploy.ops kafka-user`) an institution writing straight to Kafka.
SERVICE_PRINCIPALS = ("gateway", "settle", "clearing", "monitor", "ops", "his", "smartmon")
ADMIN = "admin"


def client_auth(s: Settings, principal: str, secret: str | None = None) -> dict[str, Any]:
    """The aiokafka options that authenticate as `principal`; its password is the generated secret
    `kafka-<principal>` unless given (an institution's, which the stack does not keep)."""
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": SCRAM_MECHANISM,
        "sasl_plain_username": principal,
        "sasl_plain_password": secret if secret is not None else password(s, f"kafka-{principal}"),
    }


def make_producer(s: Settings, principal: str, *, linger_ms: int = 2) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        **client_auth(s, principal),
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=30_000,
        compression_type=None,
    )


def make_admin(s: Settings, principal: str = ADMIN, *, request_timeout_ms: int = 15_000,
               bootstrap: str | None = None) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap or s.kafka_bootstrap, request_timeout_ms=request_timeout_ms,
                               **client_auth(s, principal))


class CountRebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    """Counts each rebalance of the group and exports the partitions assigned (metrics only)."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id

    def on_partitions_revoked(self, revoked: object) -> None:
        ASSIGNED_PARTITIONS.labels(self.group_id).set(0)

    def on_partitions_assigned(self, assigned: set[object]) -> None:
        record_rebalance(self.group_id, len(assigned))


IDLE_FETCH_WAIT_MS = 100
# Background consumers, whose output no request waits for (clearing's positions, manual claims, the judgements
# sink; smartmon's stream), let the broker gather records: it answers their fetch once BACKGROUND_FETCH_MIN_BYTES
# are there or BACKGROUND_FETCH_WAIT_MS have passed. Under load they wake a few times a second for a batch, not
# once per record; a lone record reaches them within the wait (QUIET_FETCH_WAIT_MS after a quiet spell).
BACKGROUND_FETCH_WAIT_MS = 500
BACKGROUND_FETCH_MIN_BYTES = 256 * 1024
# A request-path consumer that gathers (Settings.request_gather_ms) asks for this many bytes, so that the window,
# not the bytes, ends its fetch at the rates this stack sees (about 250 requests; a fuller fetch comes sooner).
REQUEST_GATHER_MIN_BYTES = 256 * 1024
# A consumer whose partitions have been quiet this long holds its empty fetches QUIET_FETCH_WAIT_MS instead.
QUIET_AFTER_S = 2.0
QUIET_FETCH_WAIT_MS = 1_000


class QuietAwareConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """A consumer that asks the broker less often while its partitions are quiet.

    The held fetch is the one request of an idle consumer, sent again every fetch_max_wait_ms. A short wait
    matters only while records flow: aiokafka then may leave a partition whose records are still buffered
    out of the held fetch, and that partition's next record waits for the fetch to end. When every partition
    has been quiet for QUIET_AFTER_S none is buffered, so all are in the held fetch and the broker answers it
    as soon as `quiet_min_bytes` are there, however long the wait; the first records switch back to the
    active wait and minimum before aiokafka sends its next fetch (it sends none to a broker while records
    from it are buffered and fresh). A request-path consumer's quiet minimum is one byte: a request after a
    quiet spell is answered at once, even when its active fetch gathers (REQUEST_GATHER_MIN_BYTES). A
    background consumer's held fetch keeps its minimum: a record after a quiet spell reaches it within the
    quiet wait. The wait and the minimum are aiokafka's Fetcher._fetch_max_wait_ms and _fetch_min_bytes,
    read for every fetch it builds (aiokafka < 0.15)."""

    def __init__(self, *topics: str, fetch_max_wait_ms: int = IDLE_FETCH_WAIT_MS, fetch_min_bytes: int = 1,
                 quiet_min_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__(*topics, fetch_max_wait_ms=fetch_max_wait_ms, fetch_min_bytes=fetch_min_bytes, **kwargs)
        self.active_fetch_wait_ms = fetch_max_wait_ms
        self.active_fetch_min_bytes = fetch_min_bytes
        # None: the held fetch keeps the active minimum while quiet (a background consumer's).
        self.quiet_min_bytes = fetch_min_bytes if quiet_min_bytes is None else quiet_min_bytes
        self._last_records = time.monotonic()

    @property
    def fetch_wait_ms(self) -> int:
        """The wait the next fetch will ask for (the fetcher exists once the consumer started)."""
        fetcher = getattr(self, "_fetcher", None)
        return int(fetcher._fetch_max_wait_ms) if fetcher is not None else self.active_fetch_wait_ms

    @property
    def fetch_min_bytes(self) -> int:
        """The minimum the next fetch will ask for."""
        fetcher = getattr(self, "_fetcher", None)
        return int(fetcher._fetch_min_bytes) if fetcher is not None else self.active_fetch_min_bytes

    def _set_fetch(self, wait_ms: int, min_bytes: int) -> None:
        fetcher = getattr(self, "_fetcher", None)
        if fetcher is not None:
            fetcher._fetch_max_wait_ms = wait_ms
            fetcher._fetch_min_bytes = min_bytes

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        batches = await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        now = time.monotonic()
        if batches:
            self._last_records = now
            self._set_fetch(self.active_fetch_wait_ms, self.active_fetch_min_bytes)
        elif now - self._last_records >= QUIET_AFTER_S and not self.paused():
            # (A paused partition is left out of the held fetch: on resume it would wait for it.)
            self._set_fetch(max(QUIET_FETCH_WAIT_MS, self.active_fetch_wait_ms), self.quiet_min_bytes)
        return batches  # type: ignore[no-any-return]


# Static membership (KIP-345): a restarted process rejoins under the same instance id and gets its
# partitions back at once, instead of the group waiting out the dead member's session (README, Failures).
SESSION_TIMEOUT_MS = 10_000


def instance_id(s: Settings, group_id: str) -> str:
    return f"{group_id}-{s.instance}"


async def connect_pool(s: Settings, max_size: int, *, session_reset: bool = True) -> asyncpg.Pool:
    """A pool whose connections are replaced after a database restart (asyncpg reconnects on acquire).
    No connection floor: asyncpg would log a traceback for every failed refill while the database is
    away; the shell's retries say it once per attempt. One query proves the database is there.
    `session_reset=False` (as `ShardPools.connect`) for users that keep no session state: a released
    connection skips asyncpg's reset statement, one round trip per acquire."""
    reset = None if session_reset else _no_session_reset
    pool = await asyncpg.create_pool(s.pg_dsn, min_size=0, max_size=max_size, reset=reset)
    try:
        await pool.execute("SELECT 1")
    except BaseException:
        await pool.close()
        raise
    return pool


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Nothing beyond what the pool does before calling it (roll back an open transaction, drop listeners)."""


def background_fetch() -> dict[str, int]:
    """The aiokafka options of a background consumer (see BACKGROUND_FETCH_MIN_BYTES)."""
    return {"fetch_min_bytes": BACKGROUND_FETCH_MIN_BYTES, "fetch_max_wait_ms": BACKGROUND_FETCH_WAIT_MS}


def request_fetch(gather_ms: int) -> dict[str, int]:
    """The fetch options of a request-path consumer: the broker answers at the first record (gather_ms 0;
    the wait then only bounds idle polling), or gathers for gather_ms (REQUEST_GATHER_MIN_BYTES)."""
    if gather_ms <= 0:
        return {"fetch_min_bytes": 1, "fetch_max_wait_ms": IDLE_FETCH_WAIT_MS, "quiet_min_bytes": 1}
    return {"fetch_min_bytes": REQUEST_GATHER_MIN_BYTES, "fetch_max_wait_ms": gather_ms, "quiet_min_bytes": 1}


def make_group_consumer(s: Settings, principal: str, group_id: str, *topics: str,
                        background: bool = False) -> QuietAwareConsumer:
    """A consumer of the group; `background`: one whose output no request waits for (background_fetch)."""
    fetch = background_fetch() if background else request_fetch(s.request_gather_ms)
    consumer = QuietAwareConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        **client_auth(s, principal),
        # The prefix keeps a test run's groups apart from other runs' (metric labels keep the plain name).
        group_id=s.topic_prefix + group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=s.batch_size_max,
        # The request path's (request_fetch): the broker answers at once or after the gather window; an idle
        # wait of 5 ms meant ~200 empty fetches a second per consumer, a third of a core on this box.
        **fetch,
        group_instance_id=instance_id(s, group_id),
        session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=3_000,
        max_poll_interval_ms=60_000,
    )
    consumer.subscribe(list(topics), listener=CountRebalances(group_id))
    return consumer


def header(headers: list[tuple[str, bytes]] | tuple | None, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return bytes(value)
    return None
