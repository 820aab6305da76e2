"""The shell's offset commits in the background (`OffsetCommitter`): a batch's offsets are handed over
only after every record it published is acknowledged; the next batch does not wait for the commit's
round trip; offsets acknowledged while a commit is in flight go out together in the next one; a stop
waits for the last commit. The clients are in-memory stand-ins that log every call in order: this
tests the shell's sequencing, not Kafka (tests/integration/test_crash.py and the faults tests run the
shell against the broker)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError

from services.common.consumer import BatchConsumer, BatchProcessor, Outbox, Record
from topics.catalog import INGRESS

TP = TopicPartition(INGRESS.name, 0)


def _raw(offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(INGRESS.name, 0, offset, 1_700_000_000_000, 0, None, value, None, len(value), 0, [])


class Clients:
    """A consumer and a producer that log, in order, what the shell does with them. Polls are handed out
    by the test (`poll`); acknowledgements and commit answers are futures the test resolves itself."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.acks: dict[bytes, asyncio.Future[Any]] = {}
        self.commits: list[asyncio.Future[None]] = []
        self.polls: asyncio.Queue[dict[TopicPartition, list[ConsumerRecord]]] = asyncio.Queue()
        self.offset = 0

    def poll(self, *values: bytes) -> None:
        self.polls.put_nowait({TP: [_raw(self.offset + i, v) for i, v in enumerate(values)]})
        self.offset += len(values)

    # consumer
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.log.append("consumer stopped")

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[ConsumerRecord]]:
        try:
            return await asyncio.wait_for(self.polls.get(), timeout_ms / 1000)
        except TimeoutError:
            return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.log.append(f"commit {offsets[TP]}")
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.commits.append(answer)
        await answer

    def answer_commit(self, error: Exception | None = None) -> None:
        answer = next(f for f in self.commits if not f.done())
        answer.set_exception(error) if error is not None else answer.set_result(None)

    # producer
    async def send(self, topic: str, value: bytes, **_: Any) -> asyncio.Future[Any]:
        self.log.append(f"send {value.decode()}")
        self.acks[value] = asyncio.get_running_loop().create_future()
        return self.acks[value]

    def ack(self, *values: bytes) -> None:
        for value in values:
            self.log.append(f"ack {value.decode()}")
            self.acks[value].set_result(None)


class Echo(BatchProcessor[bytes]):
    """Publishes every record's value as it is; logs each batch it processes."""

    stage = "test"
    decoder = staticmethod(bytes)

    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    async def process(self, records: list[Record[bytes]], outbox: Outbox) -> None:
        self.clients.log.append("process " + ",".join(r.value.decode() for r in records))
        for r in records:
            outbox.add("out", r.value)


async def _until(condition: Any, seconds: float = 2.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.001)


def _start(clients: Clients, stop: asyncio.Event, commit_interval_s: float | None = None) -> asyncio.Task[None]:
    shell = BatchConsumer(clients, "test-group", INGRESS, Echo(clients), clients,  # type: ignore[arg-type]
                          max_records=10)
    if commit_interval_s is not None:
        shell.committer.min_interval_s = commit_interval_s
    return asyncio.create_task(shell.run(stop))


def test_offsets_follow_the_acks_and_batches_acknowledged_during_a_commit_go_out_in_the_next() -> None:
    async def scenario() -> list[str]:
        clients, stop = Clients(), asyncio.Event()
        run = _start(clients, stop)
        clients.poll(b"a", b"b")
        await _until(lambda: "send b" in clients.log)
        await asyncio.sleep(0.01)
        assert not clients.commits  # nothing committed before its acknowledgements
        clients.ack(b"a", b"b")
        await _until(lambda: "commit 2" in clients.log)
        # The commit of a,b is in flight: the next batches are processed, sent and acknowledged meanwhile.
        clients.poll(b"c")
        await _until(lambda: "send c" in clients.log)
        clients.ack(b"c")
        clients.poll(b"d")
        await _until(lambda: "send d" in clients.log)
        clients.ack(b"d")
        await asyncio.sleep(0.01)
        clients.answer_commit()
        await _until(lambda: "commit 4" in clients.log)  # c and d in one commit
        clients.answer_commit()
        stop.set()
        await run
        return clients.log

    assert asyncio.run(scenario()) == [
        "process a,b", "send a", "send b", "ack a", "ack b", "commit 2",
        "process c", "send c", "ack c", "process d", "send d", "ack d",
        "commit 4", "consumer stopped"]


def test_a_stop_waits_for_the_last_commit_and_a_failed_commit_does_not_stop_the_next() -> None:
    async def scenario() -> list[str]:
        clients, stop = Clients(), asyncio.Event()
        run = _start(clients, stop)
        clients.poll(b"a")
        await _until(lambda: "send a" in clients.log)
        clients.ack(b"a")
        await _until(lambda: "commit 1" in clients.log)
        clients.answer_commit(CommitFailedError("rebalanced"))  # logged; the new owner would replay
        clients.poll(b"b")
        await _until(lambda: "send b" in clients.log)
        clients.ack(b"b")
        await _until(lambda: "commit 2" in clients.log)
        stop.set()
        await asyncio.sleep(0.15)
        assert not run.done()  # the commit in flight is awaited before the consumer stops
        clients.answer_commit()
        await run
        return clients.log

    assert asyncio.run(scenario()) == [
        "process a", "send a", "ack a", "commit 1", "process b", "send b", "ack b", "commit 2", "consumer stopped"]


def test_commits_go_out_at_most_once_per_interval_and_a_stop_does_not_wait_it_out() -> None:
    async def scenario() -> tuple[list[str], float, float]:
        clients, stop = Clients(), asyncio.Event()
        run = _start(clients, stop, commit_interval_s=0.3)
        clients.poll(b"a")
        await _until(lambda: "send a" in clients.log)
        clients.ack(b"a")
        await _until(lambda: "commit 1" in clients.log)
        first = time.monotonic()
        clients.answer_commit()  # answered at once: the next commit still waits for the interval
        for value in (b"b", b"c"):
            clients.poll(value)
            await _until(lambda v=value: f"send {v.decode()}" in clients.log)  # type: ignore[misc]
            clients.ack(value)
        await _until(lambda: "commit 3" in clients.log)  # b and c together
        second = time.monotonic() - first
        clients.answer_commit()
        clients.poll(b"d")
        await _until(lambda: "send d" in clients.log)
        clients.ack(b"d")
        await asyncio.sleep(0.01)
        stopping = time.monotonic()
        stop.set()  # d's offsets go out now, not when the interval ends
        await _until(lambda: "commit 4" in clients.log)
        clients.answer_commit()
        await run
        return clients.log, second, time.monotonic() - stopping

    log, second, stopped = asyncio.run(scenario())
    assert log == ["process a", "send a", "ack a", "commit 1", "process b", "send b", "ack b",
                   "process c", "send c", "ack c", "commit 3", "process d", "send d", "ack d", "commit 4",
                   "consumer stopped"]
    assert second >= 0.29  # not before the interval since the first commit began
    assert stopped < 0.29  # the stop's commit did not wait out the interval begun by commit 3


def test_commits_after_a_flush_keep_the_interval() -> None:
    from aiokafka import TopicPartition

    from services.common.consumer import OffsetCommitter

    class Consumer:
        def __init__(self) -> None:
            self.at: list[float] = []

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            self.at.append(time.monotonic())

    async def scenario() -> list[float]:
        consumer = Consumer()
        committer = OffsetCommitter(consumer, "test-group", min_interval_s=0.2)  # type: ignore[arg-type]
        tp = TopicPartition("t", 0)
        committer.add({tp: 1})
        await committer.flush()
        for offset in (2, 3):  # the first goes out at once, the second waits for the interval
            committer.add({tp: offset})
            await asyncio.sleep(0.01)
        await _until(lambda: len(consumer.at) == 3, seconds=2)
        return consumer.at

    at = asyncio.run(scenario())
    assert at[2] - at[1] >= 0.19
