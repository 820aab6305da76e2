"""Operator tools: consumer-group offsets, dead letters, retention, filing revocation.

    python -m deploy.ops groups list
    python -m deploy.ops groups describe GROUP
    python -m deploy.ops groups reset GROUP --topic T[:P] (--to-offset N | --to-earliest | --to-latest
                                              | --shift-by N | --to-datetime YYYY-MM-DDTHH:MM:SS)
                                              [--execute --operator NAME]
    python -m deploy.ops deadletters list [--stage S] [--code C] [--infno N] [--msgid M] [--since T] [--until T]
                                          [--limit N] [--json] [--show-original]
    python -m deploy.ops deadletters replay (--offset N ... | filters as for list) [--forget-refusal]
                                            [--execute --operator NAME]
    python -m deploy.ops filing revoke FILING_ID --operator NAME
    python -m deploy.ops audit list [--actor A] [--action X] [--target T] [--since T] [--limit N] [--json]

Whatever changes something (`--execute`, `filing revoke`) names its operator (`--operator NAME` or
XS_OPERATOR; without one: exit status 2, nothing done) and leaves one audit row (services.common.audit),
published to fsi.audit: `group.reset` (the partitions' offsets before and after), `deadletter.replay`
(which dead letters went where, refusals forgotten), `retention.prune` (per shard: responses deleted,
partitions created), `filing.revoke` (the filing's id, type and shard — never the person). Actions on
Kafka are recorded once they are done. `audit list` shows the hub's audit trail (the last N matching rows,
oldest first).

`groups` wraps Kafka's own ConsumerGroupCommand (artifact org.apache.kafka:kafka-tools, resolved by
deploy/bootstrap.sh into .state/kafka/tools-lib). A reset is a dry run unless --execute, and Kafka
only resets a group with no live members: stop the service first (`python -m deploy.stack
stop-service settle`), reset, start it again.

`deadletters` reads fsi.deadletter. The listing shows stage, error code, reason, msgid, infno and
hospital — never the original bytes (they hold personal identifiers) unless --show-original.
`replay` re-publishes the original bytes to the topic the record came from, which the stage tells:
gateway, router and engine (settle) rejections to fsi.ingress, clearing ones to
fsi.clearing / fsi.settlements / fsi.manual_claims (by what the bytes decode as). Every stage is
idempotent by msgid, so a replay never applies anything twice. The engine stores its refusals as a
msgid's answer: a replayed refusal returns that answer again unless --forget-refusal deletes the
stored refusal first (only refusals: a request that changed the ledger keeps its record).
A replay is a dry run unless --execute.

    python -m deploy.ops retention [--keep-days N] [--execute --operator NAME]
    python -m deploy.ops kafka-user issue CODE --operator NAME [--out FILE]
    python -m deploy.ops kafka-user revoke CODE --operator NAME

`retention` looks after how the shards' state grows (a dry run unless --execute): it creates the ledger's
monthly partitions (settlement_YYYY_MM) for this month and the next three where missing, and deletes
stored responses (processed_request) and corrections (correction, 2601) older than the window — by
default the clock window (XS_TIME_PAST_DAYS) plus a month: a request that old is refused by validation,
so its stored answer can never be asked for again, nor can it arrive after its correction. It never
deletes ledger rows, visits, fees, accumulators or accounts (the ledger,
reconciliation and clearing need them). Deletes go in chunks along processed_request_at.

`kafka-user issue` gives an institution (fixmedins_code CODE) its own Kafka principal `inst-CODE`: a
SCRAM-SHA-512 credential with a new random password, printed once (or written to --out FILE, mode
0600, which must not exist yet) and kept nowhere else, and one ACL: produce to fsi.ingress (of
XS_TOPIC_PREFIX), nothing else. Issuing again replaces the password. `revoke` deletes the credential
and the ACL (the ACL at once ends what open connections may do). Both are recorded in the audit log
(actor: the operator, `--operator` or XS_OPERATOR).

`filing revoke` revokes a cross-region filing (备案) by its id (5301 lists a person's filings with their
ids) in the shard that holds it, as 2502 does for a hospital; routers read filings per batch, so the
next request sees it. The audit row commits in the hub first, then the revocation in the shard: a
failure between the two leaves a recorded attempt (run it again), never an unrecorded revocation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy import kafka as cluster
from deploy.stack import StackError
from schemas.clearing import ManualClaim
from schemas.codec import decode_request
from schemas.errors import BrokerError
from schemas.internal import DeadLetter, RoutedRequest, SettlementEvent
from services.common import audit
from services.common.config import Settings, load_settings
from services.common.kafka import client_auth, make_admin, make_producer
from services.common.secrets import write_new_secret
from services.common.shards import shard_dsns
from services.router.store import SESSION_HOURS
from topics.acls import institution_acls, institution_principal
from topics.catalog import CLEARING, DEADLETTER, INGRESS, MANUAL_CLAIMS, SETTLEMENTS
from topics.security import (
    create_acls,
    delete_acls,
    delete_users,
    set_passwords,
    users_with_credentials,
    wait_for_acls,
)

GROUP_MAIN = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
RESET_MODES = ("to_offset", "to_earliest", "to_latest", "shift_by", "to_datetime")
REPLAY_HEADER = "replayed_from"  # "fsi.deadletter:<partition>:<offset>", for whoever traces a record
_letter_decoder = msgspec.json.Decoder(DeadLetter)


class OpsError(RuntimeError):
    """A clear message for the operator (exit code 1)."""


# --- consumer groups ------------------------------------------------------------------------


def group_command(s: Settings, *args: str) -> str:
    """Run ConsumerGroupCommand against this stack; its stdout, or OpsError with its message."""
    try:
        res = cluster.run_tool(s, GROUP_MAIN, "--bootstrap-server", s.kafka_bootstrap,
                               "--command-config", str(cluster.client_config(s, "ops")), *args)
    except StackError as exc:
        raise OpsError(str(exc)) from exc
    if res.returncode != 0 or "Error:" in res.stdout:
        text = (res.stdout + res.stderr).strip()
        if "inactive" in text or "is not empty" in text or "Not Empty" in text:
            text += "\nhint: stop the group's service first (python -m deploy.stack stop-service NAME), then reset"
        raise OpsError(text or f"ConsumerGroupCommand exited with {res.returncode}")
    return res.stdout


def offsets_table(text: str, column: str) -> dict[str, int | None]:
    """`TOPIC:PARTITION` → the value of `column` (e.g. CURRENT-OFFSET, NEW-OFFSET; None for "-") in a
    ConsumerGroupCommand table (describe or reset output)."""
    out: dict[str, int | None] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        fields = line.split()
        if "PARTITION" in fields and column in fields:
            header = fields
            continue
        if header is None or len(fields) <= header.index(column):
            continue
        row = dict(zip(header, fields, strict=False))
        if not row["PARTITION"].isdigit():
            continue
        value = row[column]
        out[f"{row['TOPIC']}:{row['PARTITION']}"] = int(value) if value.lstrip("-").isdigit() else None
    return out


def reset_args(group: str, topic: str, mode: str, value: str | None, execute: bool) -> list[str]:
    """The ConsumerGroupCommand arguments of one reset (a dry run unless execute)."""
    if mode not in RESET_MODES:
        raise OpsError(f"unknown reset mode {mode!r}")
    args = ["--reset-offsets", "--group", group, "--topic", topic, "--" + mode.replace("_", "-")]
    if mode in ("to_offset", "shift_by", "to_datetime"):
        if value is None:
            raise OpsError(f"--{mode.replace('_', '-')} needs a value")
        args.append(value)
    args.append("--execute" if execute else "--dry-run")
    return args


# --- dead letters ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    partition: int
    offset: int
    letter: DeadLetter

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.letter.at_ns / 1e9, UTC)


@dataclass(frozen=True)
class LetterFilter:
    stage: str | None = None
    code: str | None = None
    infno: str | None = None
    msgid: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    offsets: frozenset[int] = frozenset()

    def matches(self, item: Letter) -> bool:
        dl = item.letter
        return (
            (self.stage is None or dl.stage == self.stage)
            and (self.code is None or dl.err_code == self.code)
            and (self.infno is None or dl.infno == self.infno)
            and (self.msgid is None or dl.msgid == self.msgid)
            and (self.since is None or item.at >= self.since)
            and (self.until is None or item.at < self.until)
            and (not self.offsets or item.offset in self.offsets)
        )


async def read_letters(s: Settings, flt: LetterFilter, limit: int) -> list[Letter]:
    """The last `limit` matching dead letters (oldest first), read up to the end offsets at the start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **client_auth(s, "ops"), enable_auto_commit=False,
                                request_timeout_ms=15_000)
    await consumer.start()
    found: list[Letter] = []
    try:
        parts = [TopicPartition(DEADLETTER.name, p) for p in sorted(consumer.partitions_for_topic(DEADLETTER.name)
                                                                     or {0})]
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        starts = await consumer.beginning_offsets(parts)
        if flt.since is not None:
            by_time = await consumer.offsets_for_times({tp: int(flt.since.timestamp() * 1000) for tp in parts})
            starts = {tp: (found_at.offset if found_at else ends[tp]) for tp, found_at in by_time.items()}
        for tp in parts:
            consumer.seek(tp, starts[tp])
        remaining = {tp for tp in parts if starts[tp] < ends[tp]}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000, max_records=2000)
            for tp, records in batches.items():
                for rec in records:
                    if rec.offset >= ends[tp]:
                        continue
                    try:
                        letter = _letter_decoder.decode(rec.value or b"")
                    except (msgspec.ValidationError, msgspec.DecodeError):
                        continue  # not a dead letter of ours; nothing to show or replay
                    item = Letter(tp.partition, rec.offset, letter)
                    if flt.matches(item):
                        found.append(item)
                        del found[:-limit]
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return found


def replay_target(letter: DeadLetter) -> tuple[str, bytes | None]:
    """Where a dead letter's original bytes came from, and their partition key there."""
    raw = letter.original
    if letter.stage in ("gateway", "router", "settle"):
        if letter.stage == "settle" and _is_routed_request(raw):
            raise OpsError(f"settle dead letter {letter.msgid or '(no msgid)'} is a routed request of the old "
                           "fsi.routed topic (before router and engine were one stage): nothing reads it any more; "
                           "the hospital resends the request")
        try:
            psn_no = decode_request(raw).psn_no
        except BrokerError:
            psn_no = None  # still refused: the stage dead-letters it again, with the reason
        key = psn_no or letter.msgid
        return INGRESS.name, key.encode() if key else None
    if letter.stage == "clearing":
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            return SETTLEMENTS.name, msgspec.json.decode(raw, type=SettlementEvent).psn_no.encode()
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            return MANUAL_CLAIMS.name, msgspec.json.decode(raw, type=ManualClaim).psn_no.encode()
        return CLEARING.name, letter.fixmedins_code.encode() if letter.fixmedins_code else None
    raise OpsError(f"dead letter of unknown stage {letter.stage!r}: nothing to replay")


async def forget_refusals(s: Settings, msgids: Sequence[str]) -> int:
    """Delete the engine's stored refusals (infcode -1) of these msgids: a refusal changed nothing, so the
    replayed request is then decided anew. Accepted requests keep their record. A msgid is stored in the shard
    of its person's insured province only: each shard is asked (the request's bytes may not name it)."""
    if not msgids:
        return 0
    deleted = 0
    for _, dsn in sorted(shard_dsns(s).items()):
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            status = await conn.execute("DELETE FROM processed_request WHERE msgid = ANY($1) AND infcode = -1",
                                        list(msgids))
        finally:
            await conn.close()
        deleted += int(status.split()[-1])
    return deleted


def _is_routed_request(raw: bytes) -> bool:
    try:
        msgspec.json.decode(raw, type=RoutedRequest)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return False
    return True


async def replay(s: Settings, letters: Sequence[Letter], *, execute: bool, forget_refusal: bool) -> list[str]:
    """Re-publish each letter's original bytes to its source topic (acks=all, idempotent producer)."""
    plan = [(item, *replay_target(item.letter)) for item in letters]
    lines = [f"{'replay' if execute else 'would replay'} {DEADLETTER.name}:{item.partition}:{item.offset} "
             f"{item.letter.stage}/{item.letter.err_code} msgid={item.letter.msgid or '-'} -> {topic}"
             for item, topic, _ in plan]
    if not execute:
        return [*lines, "dry run: nothing sent (add --execute)"]
    if forget_refusal:
        refused = [item.letter.msgid for item, _, _ in plan if item.letter.stage == "settle" and item.letter.msgid]
        lines.append(f"forgot {await forget_refusals(s, refused)} stored refusal(s) of the engine")
    producer = make_producer(s, "ops")
    await producer.start()
    try:
        for item, topic, key in plan:
            origin = f"{DEADLETTER.name}:{item.partition}:{item.offset}".encode()
            await producer.send_and_wait(topic, item.letter.original, key=key, headers=[(REPLAY_HEADER, origin)])
    finally:
        await producer.stop()
    return lines


# --- retention -----------------------------------------------------------------------------

RETENTION_MARGIN_DAYS = 31  # past the clock window: no resend of a request that old is accepted
RETENTION_CHUNK_ROWS = 10_000
PARTITIONS_AHEAD_MONTHS = 3


@dataclass
class ShardRetention:
    shard: str
    cutoff: datetime
    responses_due: int  # stored responses older than the window
    responses_deleted: int
    corrections_due: int  # corrections (2601) older than the window: their originals can no longer arrive
    corrections_deleted: int
    partitions_missing: list[str]  # of this month and the next ones (dry run: what --execute creates)
    partitions_created: list[str]


def months_ahead(now: datetime, n: int = PARTITIONS_AHEAD_MONTHS) -> list[date]:
    first = date(now.year, now.month, 1)
    return [date(first.year + (first.month - 1 + i) // 12, (first.month - 1 + i) % 12 + 1, 1) for i in range(n + 1)]


async def retention(s: Settings, *, execute: bool, keep_days: int | None = None,
                    now: datetime | None = None) -> list[ShardRetention]:
    keep = s.time_past_days + RETENTION_MARGIN_DAYS if keep_days is None else keep_days
    if keep <= s.time_past_days:
        raise OpsError(f"--keep-days {keep} is inside the clock window (XS_TIME_PAST_DAYS = {s.time_past_days}): "
                       "a resend of such a request must still find its stored answer")
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=keep)
    months = months_ahead(now)
    out = []
    for shard, dsn in shard_dsns(s).items():
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            due = await conn.fetchval("SELECT count(*) FROM processed_request WHERE processed_at < $1", cutoff)
            corrections_due = await conn.fetchval("SELECT count(*) FROM correction WHERE corrected_at < $1", cutoff)
            missing = [r[0] for r in await conn.fetch(
                "SELECT name FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL",
                [f"settlement_{m:%Y_%m}" for m in months])]
            created: list[str] = []
            deleted = corrections_deleted = 0
            if execute:
                created = list(await conn.fetchval("SELECT ensure_ledger_partitions($1, $2)", months[0], months[-1]))
                deleted = await _delete_in_chunks(  # short transactions, no long lock on the engine's table
                    conn, "DELETE FROM processed_request WHERE msgid IN (SELECT msgid FROM processed_request"
                    " WHERE processed_at < $1 ORDER BY processed_at LIMIT $2)", cutoff)
                corrections_deleted = await _delete_in_chunks(
                    conn, "DELETE FROM correction WHERE omsgid IN (SELECT omsgid FROM correction"
                    " WHERE corrected_at < $1 ORDER BY corrected_at LIMIT $2)", cutoff)
            out.append(ShardRetention(shard, cutoff, due, deleted, corrections_due, corrections_deleted, missing,
                                      created))
        finally:
            await conn.close()
    return out


async def _delete_in_chunks(conn: asyncpg.Connection, delete_sql: str, cutoff: datetime) -> int:
    """Run `delete_sql` ($1 the cutoff, $2 the chunk size) until a chunk deletes fewer rows; the total."""
    total = 0
    while True:
        n = int((await conn.execute(delete_sql, cutoff, RETENTION_CHUNK_ROWS)).split()[-1])
        total += n
        if n < RETENTION_CHUNK_ROWS:
            return total


@dataclass(frozen=True)
class TrustRetention:
    msgids_due: int  # registry rows (msgid_seen) older than the cutoff
    msgids_deleted: int
    sessions_due: int  # sign-in sessions ended (9002, or a day after 9001) before the cutoff
    sessions_deleted: int


async def trust_retention(s: Settings, cutoff: datetime, *, execute: bool) -> TrustRetention:
    """The hub's msgid registry and old sign-in sessions, pruned with the same cutoff as the stored answers:
    a msgid is remembered as long as its answer is (a reuse with other content stays MSGID_CONFLICT)."""
    conn = await asyncpg.connect(s.pg_dsn, timeout=10)
    ended = ("(signed_out_at IS NOT NULL OR signed_in_at < now() - make_interval(hours => $2))"
             " AND signed_in_at < $1")
    try:
        msgids = await conn.fetchval("SELECT count(*) FROM msgid_seen WHERE seen_at < $1", cutoff)
        sessions = await conn.fetchval(f"SELECT count(*) FROM sign_session WHERE {ended}", cutoff, SESSION_HOURS)
        deleted = (0, 0)
        if execute:
            gone = await _delete_in_chunks(  # short transactions beside the routers' inserts
                conn, "DELETE FROM msgid_seen WHERE msgid IN (SELECT msgid FROM msgid_seen WHERE seen_at < $1"
                " ORDER BY seen_at LIMIT $2)", cutoff)
            status = await conn.execute(f"DELETE FROM sign_session WHERE {ended}", cutoff, SESSION_HOURS)
            deleted = (gone, int(status.split()[-1]))
        return TrustRetention(msgids, deleted[0], sessions, deleted[1])
    finally:
        await conn.close()


def retention_lines(report: list[ShardRetention], execute: bool) -> list[str]:
    lines = []
    for r in report:
        if execute:
            lines.append(f"{r.shard}: deleted {r.responses_deleted} stored response(s) and {r.corrections_deleted} "
                         f"correction(s) before {r.cutoff:%Y-%m-%d}; "
                         f"created partitions: {', '.join(r.partitions_created) or 'none needed'}")
        else:
            lines.append(f"{r.shard}: would delete {r.responses_due} stored response(s) and {r.corrections_due} "
                         f"correction(s) before {r.cutoff:%Y-%m-%d}; "
                         f"would create partitions: {', '.join(r.partitions_missing) or 'none needed'}")
    lines.append("ledger rows, visits, fees, accumulators and accounts are kept (never pruned)")
    if not execute:
        lines.append("dry run: nothing changed (add --execute)")
    return lines


# --- institutions' Kafka users -----------------------------------------------------------------

FIXMEDINS_CODE = re.compile(r"^[0-9A-Za-z]{1,20}$")  # as the envelope's fixmedins_code


def _institution(code: str) -> str:
    if not FIXMEDINS_CODE.match(code):
        raise OpsError("the institution code must be 1-20 letters or digits (its fixmedins_code)")
    return institution_principal(code)


async def issue_kafka_user(s: Settings, code: str, operator: str) -> str:
    """Create (or give a new password to) `inst-<code>` with produce-only on fsi.ingress; returns the
    password, which nothing keeps."""
    principal, actor = _institution(code), audit.check_operator(operator)
    secret = secrets.token_urlsafe(32)
    acls = institution_acls(s, code)
    conn = await asyncpg.connect(s.pg_dsn, timeout=10)
    admin = make_admin(s)
    await admin.start()
    try:
        existed = principal in await users_with_credentials(admin, [principal])
        async with conn.transaction():  # the audit row commits only if the broker took the change
            await audit.record(conn, actor, "kafka_user.issue", principal, before={"credential": existed},
                         after={"credential": True, "produce_to": [a.name for a in acls]})
            await set_passwords(admin, {principal: secret})
            await create_acls(admin, acls)
            await wait_for_acls(admin, acls)
    finally:
        await admin.close()
        await conn.close()
    return secret


async def revoke_kafka_user(s: Settings, code: str, operator: str) -> None:
    principal, actor = _institution(code), audit.check_operator(operator)
    acls = institution_acls(s, code)
    conn = await asyncpg.connect(s.pg_dsn, timeout=10)
    admin = make_admin(s)
    await admin.start()
    try:
        if principal not in await users_with_credentials(admin, [principal]):
            raise OpsError(f"no Kafka user {principal}")
        async with conn.transaction():
            await audit.record(conn, actor, "kafka_user.revoke", principal,
                         before={"credential": True, "produce_to": [a.name for a in acls]}, after={"credential": False})
            await delete_acls(admin, acls)
            await delete_users(admin, [principal])
    finally:
        await admin.close()
        await conn.close()


async def _kafka_user(s: Settings, args: argparse.Namespace) -> int:
    operator = args.operator or os.environ.get("XS_OPERATOR")
    try:
        audit.check_operator(operator)
    except ValueError as exc:
        raise OpsError(str(exc)) from None
    assert operator is not None
    principal = _institution(args.code)
    if args.action == "revoke":
        await revoke_kafka_user(s, args.code, operator)
        print(f"revoked Kafka user {principal} (credential and ACL deleted)")
        return 0
    if args.out and os.path.exists(args.out):
        raise OpsError(f"{args.out} exists: choose a new file")
    secret = await issue_kafka_user(s, args.code, operator)
    if args.out:
        try:
            write_new_secret(args.out, secret)
        except FileExistsError:
            raise OpsError(f"{args.out} exists: choose a new file") from None
        print(f"issued Kafka user {principal} (SCRAM-SHA-512, produce to {INGRESS.name} only); "
              f"password written to {args.out}")
    else:
        print(f"issued Kafka user {principal} (SCRAM-SHA-512, produce to {INGRESS.name} only); "
              "its password, shown once:")
        print(secret)
    return 0


# --- filing revocation ----------------------------------------------------------------------


async def revoke_filing(s: Settings, filing_id: str, operator: str) -> dict[str, object]:
    """Revoke one filing by id in whichever shard holds it; audited (see the module's docstring)."""
    audit.check_operator(operator)
    for shard, dsn in sorted(shard_dsns(s).items()):
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            async with conn.transaction():
                row = await conn.fetchrow("SELECT filing_type, source, revoked FROM filing WHERE filing_id = $1"
                                          " FOR UPDATE", filing_id)
                if row is None:
                    continue
                if row["revoked"]:
                    raise OpsError(f"filing {filing_id} is revoked already: nothing to do")
                await conn.execute("UPDATE filing SET revoked = true WHERE filing_id = $1", filing_id)
                before = {"shard": shard, "filing_type": row["filing_type"], "source": row["source"], "revoked": False}
                hub = await asyncpg.connect(s.pg_dsn, timeout=10)
                try:
                    await audit.record(hub, operator, "filing.revoke", filing_id, before=before,
                                       after={**before, "revoked": True})
                finally:
                    await hub.close()
            return before
        finally:
            await conn.close()
    raise OpsError(f"no filing {filing_id} in any shard")


async def audit_rows(s: Settings, *, actor: str | None = None, action: str | None = None,
                     target: str | None = None, since: datetime | None = None, limit: int = 50
                     ) -> list[asyncpg.Record]:
    """The last `limit` audit rows matching, oldest first."""
    hub = await asyncpg.connect(s.pg_dsn, timeout=10)
    try:
        rows = await hub.fetch(
            "SELECT audit_id, at, actor, action, target, before, after FROM audit_log"
            " WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR action = $2)"
            "   AND ($3::text IS NULL OR target = $3) AND ($4::timestamptz IS NULL OR at >= $4)"
            " ORDER BY audit_id DESC LIMIT $5", actor, action, target, since, limit)
    finally:
        await hub.close()
    return rows[::-1]


def audit_line(r: asyncpg.Record, as_json: bool) -> str:
    if as_json:
        return msgspec.json.encode(audit.audit_record(r)).decode()
    return (f"{r['audit_id']}  {r['at']:%Y-%m-%dT%H:%M:%S}Z  {r['actor']}  {r['action']}  {r['target'] or '-'}  "
            f"{r['before'] or '-'} -> {r['after'] or '-'}")


async def record_action(s: Settings, operator: str, action: str, target: str, before: object, after: object) -> None:
    """The audit row of an action done outside the hub (Kafka, the shards), then published."""
    hub = await asyncpg.connect(s.pg_dsn, timeout=10)
    try:
        await audit.record(hub, operator, action, target, before=before, after=after)
    finally:
        await hub.close()
    await audit.publish_after_action(s)


# --- command line ---------------------------------------------------------------------------


def _when(text: str) -> datetime:
    """An ISO date or date-time; UTC unless it names an offset."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _filter(args: argparse.Namespace) -> LetterFilter:
    return LetterFilter(stage=args.stage, code=args.code, infno=args.infno, msgid=args.msgid, since=args.since,
                        until=args.until, offsets=frozenset(args.offset or ()))


def letter_row(item: Letter, show_original: bool = False) -> str:
    dl = item.letter
    row = (f"{item.partition}:{item.offset}  {item.at:%Y-%m-%dT%H:%M:%S}Z  {dl.stage:8}  {dl.err_code:22}  "
           f"{dl.infno or '-':5}  {dl.msgid or '-':30}  {dl.fixmedins_code or '-':12}  {dl.err_msg}")
    if show_original:
        row += "\n    original: " + dl.original.decode("utf-8", errors="replace")
    return row


def letter_json(item: Letter, show_original: bool = False) -> bytes:
    dl = item.letter
    doc: dict[str, object] = {"partition": item.partition, "offset": item.offset, "at": item.at.isoformat(),
                              "stage": dl.stage, "err_code": dl.err_code, "err_msg": dl.err_msg, "msgid": dl.msgid,
                              "infno": dl.infno, "fixmedins_code": dl.fixmedins_code}
    if show_original:
        doc["original"] = dl.original.decode("utf-8", errors="replace")
    return msgspec.json.encode(doc)


async def _deadletters(s: Settings, args: argparse.Namespace) -> int:
    flt = _filter(args)
    if args.action == "replay" and not (flt.offsets or flt.msgid or flt.stage or flt.code or flt.since):
        raise OpsError("replay needs a selection: --offset, --msgid, --stage, --code or --since")
    letters = await read_letters(s, flt, args.limit)
    if args.action == "list":
        if args.json:
            for item in letters:
                print(letter_json(item, args.show_original).decode())
        else:
            print(f"{len(letters)} dead letter(s)")
            for item in letters:
                print(letter_row(item, args.show_original))
        return 0
    if not letters:
        raise OpsError("no dead letter matches the selection")
    lines = await replay(s, letters, execute=args.execute, forget_refusal=args.forget_refusal)
    for line in lines:
        print(line)
    if args.execute:
        targets: dict[str, int] = {}
        for item in letters:
            topic, _ = replay_target(item.letter)
            targets[topic] = targets.get(topic, 0) + 1
        forgot = next((int(line.split()[1]) for line in lines if line.startswith("forgot ")), 0)
        await record_action(s, args.operator, "deadletter.replay", DEADLETTER.name, None, {
            "offsets": [f"{item.partition}:{item.offset}" for item in letters], "to": targets,
            "forgot_refusals": forgot})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.ops", description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    groups = sub.add_parser("groups", help="consumer groups (Kafka's ConsumerGroupCommand)")
    gsub = groups.add_subparsers(dest="action", required=True)
    gsub.add_parser("list")
    describe = gsub.add_parser("describe")
    describe.add_argument("group")
    reset = gsub.add_parser("reset", help="a dry run unless --execute; the group must have no live members")
    reset.add_argument("group")
    reset.add_argument("--topic", required=True, help="TOPIC or TOPIC:PARTITION[,PARTITION...]")
    how = reset.add_mutually_exclusive_group(required=True)
    how.add_argument("--to-offset", metavar="N")
    how.add_argument("--shift-by", metavar="N")
    how.add_argument("--to-datetime", metavar="YYYY-MM-DDTHH:mm:SS.sss")
    how.add_argument("--to-earliest", action="store_true")
    how.add_argument("--to-latest", action="store_true")
    reset.add_argument("--execute", action="store_true")
    audit.add_operator_argument(reset)

    letters = sub.add_parser("deadletters", help=f"list or replay {DEADLETTER.name}")
    lsub = letters.add_subparsers(dest="action", required=True)
    for action in ("list", "replay"):
        sp = lsub.add_parser(action)
        sp.add_argument("--stage", choices=("gateway", "router", "settle", "clearing"))
        sp.add_argument("--code", help="error code, e.g. PERSON_UNKNOWN")
        sp.add_argument("--infno")
        sp.add_argument("--msgid")
        sp.add_argument("--since", type=_when, help="ISO time (UTC unless an offset is given)")
        sp.add_argument("--until", type=_when)
        sp.add_argument("--offset", type=int, nargs="+", help=f"offsets on {DEADLETTER.name}")
        sp.add_argument("--limit", type=int, default=100, help="the last N matches (default 100)")
        if action == "list":
            sp.add_argument("--json", action="store_true", help="one JSON object per line")
            sp.add_argument("--show-original", action="store_true",
                            help="also print the original bytes (personal identifiers!)")
        else:
            sp.add_argument("--forget-refusal", action="store_true",
                            help="delete the engine's stored refusal of each msgid first, so it is decided anew")
            sp.add_argument("--execute", action="store_true", help="send (default: a dry run)")
            audit.add_operator_argument(sp)
    keep = sub.add_parser("retention", help="ledger partitions ahead, old stored responses pruned (dry run)")
    keep.add_argument("--keep-days", type=int, default=None,
                      help="keep stored responses this many days (default: XS_TIME_PAST_DAYS + 31)")
    keep.add_argument("--execute", action="store_true", help="change (default: a dry run)")
    users = sub.add_parser("kafka-user", help="an institution's own Kafka principal: produce to fsi.ingress only")
    usub = users.add_subparsers(dest="action", required=True)
    for action in ("issue", "revoke"):
        sp = usub.add_parser(action)
        sp.add_argument("code", help="the institution's fixmedins_code")
        sp.add_argument("--operator", help="who does this (the audit log's actor; default XS_OPERATOR)")
        if action == "issue":
            sp.add_argument("--out", help="write the password to this new file (0600) instead of printing it")
    audit.add_operator_argument(keep)
    filing = sub.add_parser("filing", help="cross-region filings (备案)").add_subparsers(dest="action", required=True)
    revoke = filing.add_parser("revoke", help="revoke a filing by its id, in the shard that holds it")
    revoke.add_argument("filing_id")
    audit.add_operator_argument(revoke)
    trail = sub.add_parser("audit", help="the operators' audit trail").add_subparsers(dest="action", required=True)
    show = trail.add_parser("list", help="the last audit rows (oldest first)")
    show.add_argument("--actor")
    show.add_argument("--action", dest="audit_action", metavar="ACTION", help="e.g. month.close, key.rotate")
    show.add_argument("--target")
    show.add_argument("--since", type=_when, help="ISO time (UTC unless an offset is given)")
    show.add_argument("--limit", type=int, default=50, help="the last N rows (default 50)")
    show.add_argument("--json", action="store_true", help="one fsi.audit record (JSON) per line")
    return parser


def changes_state(args: argparse.Namespace) -> bool:
    return args.cmd == "filing" or bool(getattr(args, "execute", False))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if changes_state(args):
        args.operator = audit.operator_or_exit(parser, args.operator)
    s = load_settings()
    try:
        if args.cmd == "audit":
            rows = asyncio.run(audit_rows(s, actor=args.actor, action=args.audit_action, target=args.target,
                                          since=args.since, limit=args.limit))
            for r in rows:
                print(audit_line(r, args.json))
            if not args.json:
                print(f"{len(rows)} audit row(s)")
            return 0
        if args.cmd == "filing":
            revoked = asyncio.run(revoke_filing(s, args.filing_id, args.operator))
            asyncio.run(audit.publish_after_action(s))
            print(f"revoked filing {args.filing_id} ({revoked['filing_type']}, shard {revoked['shard']})")
            return 0
        if args.cmd == "groups":
            if args.action == "list":
                print(group_command(s, "--list"), end="")
            elif args.action == "describe":
                print(group_command(s, "--describe", "--group", args.group), end="")
            else:
                mode = next(m for m in RESET_MODES if getattr(args, m) not in (None, False))
                value = getattr(args, mode)
                cmd = reset_args(args.group, args.topic, mode, None if value is True else value, args.execute)
                before = (offsets_table(group_command(s, "--describe", "--group", args.group), "CURRENT-OFFSET")
                          if args.execute else {})
                out = group_command(s, *cmd)
                print(out, end="")
                if not args.execute:
                    print("dry run: nothing changed (add --execute)")
                else:
                    after = offsets_table(out, "NEW-OFFSET")
                    asyncio.run(record_action(
                        s, args.operator, "group.reset", args.group,
                        {"offsets": {tp: before.get(tp) for tp in after}},
                        {"offsets": after, "topic": args.topic, "mode": mode,
                         "value": None if value is True else value}))
            return 0
        if args.cmd == "retention":
            report = asyncio.run(retention(s, execute=args.execute, keep_days=args.keep_days))
            trust = asyncio.run(trust_retention(s, report[0].cutoff, execute=args.execute))
            print("\n".join(retention_lines(report, args.execute)))
            print(f"hub: {'deleted' if args.execute else 'would delete'} "
                  f"{trust.msgids_deleted if args.execute else trust.msgids_due} msgid(s) of the registry and "
                  f"{trust.sessions_deleted if args.execute else trust.sessions_due} ended sign-in session(s) "
                  f"before {report[0].cutoff:%Y-%m-%d}")
            if args.execute:
                asyncio.run(record_action(s, args.operator, "retention.prune", "shards", None, {
                    **{r.shard: {"cutoff": r.cutoff.isoformat(), "responses_deleted": r.responses_deleted,
                                 "corrections_deleted": r.corrections_deleted,
                                 "partitions_created": r.partitions_created} for r in report},
                    "hub": {"msgids_deleted": trust.msgids_deleted, "sessions_deleted": trust.sessions_deleted}}))
            return 0
        if args.cmd == "kafka-user":
            return asyncio.run(_kafka_user(s, args))
        return asyncio.run(_deadletters(s, args))
    except OpsError as exc:
        print(f"[ops] ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
