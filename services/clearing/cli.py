"""Clearing staff's command line. Every command is idempotent.

    python -m services.clearing.cli close --month 2026-06 --operator li.ming   # freeze the month (statement v1)
    python -m services.clearing.cli verify --month 2026-06           # streaming vs batch vs statement
    python -m services.clearing.cli positions --month 2026-06 [--level pool|province]
    python -m services.clearing.cli statement --month 2026-06 --region 510400 [--format json|csv|html]
                                              [--out FILE] [--version N]
    python -m services.clearing.cli statements --month 2026-06                   # its versions, oldest first
    python -m services.clearing.cli adjust --month 2026-06 --insured 510400 --treating 150400
        --amount hifp_pay=-12.34 [--amount medfee_sumamt=-12.34 ...] --reason TEXT --ref ADJ-2026-06-01
        --operator li.ming                                # a closed month's statement re-issued as version N+1
    python -m services.clearing.cli sweep [--before 2026-07] --operator li.ming  # ledger rows the stream missed
    python -m services.clearing.cli deposit topup --prov 510000 --yuan 5000000.00 --ref BANK-2026-0001
                                                  --operator li.ming
    python -m services.clearing.cli deposit line --prov 510000 (--yuan 800000.00 | --default) --operator li.ming
    python -m services.clearing.cli deposit show [--prov 510000]
    python -m services.clearing.cli claims submit FILE.jsonl --operator li.ming  # ManualClaim rows → fsi.manual_claims
    python -m services.clearing.cli claims rate --from 2026-06-01 --to 2026-06-30 [--recompute]

A statement of an open month is provisional (the running positions); of a closed month, the frozen
statement — its latest version unless `--version` asks for an older one. The commands that change
something (close, adjust, sweep, deposit topup and line, claims submit)
name their operator (`--operator NAME` or XS_OPERATOR) and each leaves one audit row
(services.common.audit) in its own transaction, published to fsi.audit when it is done.
Exit status: 0 done, 1 refused (the message says why), 2 usage (an operator missing, too).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from schemas.clearing import ManualClaim
from schemas.codec import encode
from schemas.codes import FUNDS
from schemas.errors import BrokerError
from schemas.money import AmountError, check_yuan, to_fen, to_yuan
from services.clearing import store
from services.clearing.logic import (
    Amounts,
    ClearingError,
    check_month,
    month_statement,
    pool_lines,
    province_lines,
)
from services.clearing.statement import RegionStatement, region_statement, render
from services.common import audit
from services.common.config import Settings, load_settings
from services.common.kafka import make_producer
from services.common.shards import ShardPools
from services.refdata.regions import UnknownRegion
from topics.catalog import MANUAL_CLAIMS

CLAIMS_PER_FILE_MAX = 1_000_000
_claim_decoder = msgspec.json.Decoder(ManualClaim)
_encoder = msgspec.json.Encoder(decimal_format="number")


# Reusable operations (the tests call these) ------------------------------------------------------


async def close(s: Settings, month: str, *, operator: str, publish: bool = True) -> store.CloseResult:
    pool = await asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=2)
    shards = await ShardPools.connect(s, 1)
    try:
        result = await store.close_month(pool, shards, month, operator=operator)
        if publish:
            await publish_outbox(s, pool)
            await audit.publish_after_action(s)
        return result
    finally:
        await shards.close()
        await pool.close()


async def publish_outbox(s: Settings, pool: asyncpg.Pool) -> int:
    """Publish what the last command queued (the clearing service does it too, within a second)."""
    producer = make_producer(s, "ops")  # operator tools act as ops
    await producer.start()
    acks: list[asyncio.Future[Any]] = []
    try:
        async def send(topic: str, key: bytes | None, value: bytes) -> None:
            acks.append(await producer.send(topic, value, key=key))  # queued in order; acked by flush

        async def flush() -> None:
            await asyncio.gather(*acks)
            acks.clear()

        return await store.publish_outbox(pool, send, flush)
    finally:
        await producer.stop()


async def statement_for(conn: asyncpg.Connection, month: str, region: str, version: int | None = None
                        ) -> RegionStatement:
    """The frozen statement of a closed month, else the running positions (provisional)."""
    check_month(month)
    stored = await store.statement(conn, month, version)
    if stored is not None:
        return region_statement(stored["body"], region, status="closed", digest=stored["digest"])
    if version is not None:
        raise BrokerError("STATEMENT_UNKNOWN", f"no statement version {version} for {month}")
    positions = await store.positions(conn, month)
    return region_statement(month_statement(month, 0, "", positions.values()), region, status="provisional")


async def deposit_topup(conn: asyncpg.Connection, prov: str, amount_fen: int, ref: str, memo: str = "", *,
                        operator: str) -> store.DepositMove:
    """One top-up, once per `ref` (a repeat changes nothing), audited as `deposit.topup`."""
    if amount_fen <= 0:
        raise ValueError("a top-up must be positive")
    async with conn.transaction():
        move = await store.deposit_move(conn, f"topup-{ref}", prov, "topup", amount_fen, None, memo)
        after = {"txn_id": move.txn_id, "amount_fen": amount_fen, "balance_fen": move.balance_fen,
                 "warning_line_fen": move.warning_line_fen, "alert": move.alert, "duplicate": move.duplicate}
        before = None if move.duplicate else {"balance_fen": move.balance_fen - amount_fen}
        await audit.record(conn, operator, "deposit.topup", prov, before=before, after=after)
        return move


async def set_warning_line(conn: asyncpg.Connection, prov: str, line_fen: int | None, *, operator: str) -> int:
    """Set a province's warning line (None: back to the default, one month's average cleared amount),
    audited as `deposit.line`; returns the line in force."""
    async with conn.transaction():
        override = await conn.fetchval("SELECT warning_line_fen FROM clearing_deposit WHERE insured_prov = $1", prov)
        before = {"override_fen": override, "line_fen": await store.current_line(conn, prov)}
        await store.set_warning_line(conn, prov, line_fen)
        line = await store.current_line(conn, prov)
        await audit.record(conn, operator, "deposit.line", prov, before=before,
                           after={"override_fen": line_fen, "line_fen": line})
        return line


async def submit_claims(s: Settings, claims: Sequence[ManualClaim], *, operator: str, source: str = "",
                        digest: str = "") -> int:
    """Queue the claims and their audit row (`claims.submit`: how many, the file's name and sha256 — no
    personal data) in one transaction of the clearing outbox, then publish them to fsi.manual_claims
    (the clearing service would within a second). The clearing service dedupes by claim_id."""
    submission = secrets.token_hex(8)  # each submission is sent, like a resend of the file
    pool = await asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await store.outbox_add_many(conn, [(f"claim-{submission}-{n}", MANUAL_CLAIMS.name, c.psn_no.encode(),
                                                _encoder.encode(c)) for n, c in enumerate(claims)])
            await audit.record(conn, operator, "claims.submit", source, after={
                "claims": len(claims), "sha256": digest or None, "submission": submission})
        await publish_outbox(s, pool)
        await audit.publish_after_action(s)
    finally:
        await pool.close()
    return len(claims)


def read_claims(path: Path) -> list[ManualClaim]:
    """Strict: every line a ManualClaim; errors name the line and the field, never a value."""
    claims = []
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if n > CLAIMS_PER_FILE_MAX:
                raise ValueError(f"{path.name}: more than {CLAIMS_PER_FILE_MAX} lines")
            if not line.strip():
                continue
            try:
                claims.append(_claim_decoder.decode(line))
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise ValueError(f"{path.name}:{n}: {e}") from None
    return claims


# Command line ---------------------------------------------------------------------------------------


def _yuan_fen(text: str) -> int:
    try:
        value = Decimal(text)
        check_yuan("yuan", value)
    except (ArithmeticError, AmountError) as e:
        raise argparse.ArgumentTypeError(f"not an amount in yuan: {e}") from None
    return to_fen(value)


def _month(text: str) -> str:
    try:
        return check_month(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


ADJUSTABLE = ("medfee_sumamt", *FUNDS)


def _amount(text: str) -> tuple[str, int]:
    """FIELD=YUAN (signed): a fund of the pair, or medfee_sumamt."""
    name, sep, value = text.partition("=")
    if not sep or name not in ADJUSTABLE:
        raise argparse.ArgumentTypeError(f"an amount is FIELD=YUAN with FIELD one of {', '.join(ADJUSTABLE)}")
    try:
        yuan = Decimal(value)
        check_yuan(name, yuan, allow_negative=True)
    except (ArithmeticError, AmountError) as e:
        raise argparse.ArgumentTypeError(f"not an amount in yuan: {e}") from None
    return name, to_fen(yuan)


def adjustment_amounts(pairs: Sequence[tuple[str, int]]) -> Amounts:
    """The adjustment's amounts from FIELD=fen pairs (a field named twice: refused); the fund total is their sum."""
    values = dict(pairs)
    if len(values) != len(pairs):
        raise ValueError("an amount field is named twice")
    funds = {f: values.get(f, 0) for f in FUNDS}
    return Amounts(values.get("medfee_sumamt", 0), **funds, fund_pay_sumamt=sum(funds.values()))


def _date(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError("a date is yyyy-mm-dd") from None


def _print_json(obj: Any) -> None:
    sys.stdout.write(msgspec.json.format(encode(obj), indent=2).decode() + "\n")


async def _run(args: argparse.Namespace, s: Settings) -> int:
    if args.cmd == "close":
        r = await close(s, args.month, operator=args.operator)
        _print_json({**asdict(r), "drawdowns": {p: to_yuan(f) for p, f in r.drawdowns.items()},
                     "fund_pay_sumamt": to_yuan(r.fund_pay_sumamt)})
        return 0
    if args.cmd == "claims" and args.action == "submit":
        digest = hashlib.sha256(args.file.read_bytes()).hexdigest()
        n = await submit_claims(s, read_claims(args.file), operator=args.operator, source=args.file.name,
                                digest=digest)
        print(f"submitted {n} claims to {MANUAL_CLAIMS.name}")
        return 0
    pool = await asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=2)
    shards = await ShardPools.connect(s, 1)
    try:
        async with pool.acquire() as conn:
            return await _run_db(args, s, pool, shards, conn)
    finally:
        await shards.close()
        await pool.close()


async def _run_db(args: argparse.Namespace, s: Settings, pool: asyncpg.Pool, shards: ShardPools,
                  conn: asyncpg.Connection) -> int:
    if args.cmd == "verify":
        problems = await store.verify(conn, shards, args.month)
        for p in problems:
            print(p)
        print(f"{args.month}: " + ("streaming, batch and statement agree to the fen" if not problems
                                   else f"{len(problems)} differences"))
        return 1 if problems else 0
    if args.cmd == "positions":
        positions = (await store.positions(conn, args.month)).values()
        lines = pool_lines(positions) if args.level == "pool" else province_lines(pool_lines(positions))
        for ln in lines:
            deducted = (f" (deducted {to_yuan(ln.deducted.fund_pay_sumamt)} for {ln.deduct_cnt} judgement(s))"
                        if ln.deduct_cnt else "")
            print(f"{ln.insured}->{ln.treating} {ln.scope:14} net_cnt {ln.net_cnt:6} "
                  + " ".join(f"{f} {to_yuan(v)}" for f, v in ln.net.as_dict().items()) + deducted)
        return 0
    if args.cmd == "statement":
        st = await statement_for(conn, args.month, args.region, args.version)
        data = render(st, args.format)
        if args.out:
            Path(args.out).write_bytes(data)
            print(f"wrote {args.out} ({st.status})")
        else:
            sys.stdout.buffer.write(data + (b"\n" if not data.endswith(b"\n") else b""))
        return 0
    if args.cmd == "statements":
        versions = await store.statement_versions(conn, args.month)
        if not versions:
            raise BrokerError("STATEMENT_UNKNOWN", f"no statement for {args.month}: the month is not closed")
        for r in versions:
            print(f"{args.month} v{r['version']} issued {r['issued_at']} by {r['issued_by'] or '-'}"
                  f" fund_pay_sumamt {to_yuan(r['fund_pay_sumamt'])} digest {r['digest']}"
                  + (f" reason: {r['reason']}" if r["reason"] else ""))
        return 0
    if args.cmd == "adjust":
        done = await store.reissue_statement(conn, args.month, args.ref, args.insured, args.treating,
                                             adjustment_amounts(args.amount), args.reason, operator=args.operator)
        await publish_outbox(s, pool)
        await audit.publish_after_action(s)
        _print_json({**asdict(done), "fund_pay_sumamt": to_yuan(done.fund_pay_sumamt),
                     "drawdowns": {p: to_yuan(f) for p, f in done.drawdowns.items()}})
        return 0
    if args.cmd == "sweep":
        async with conn.transaction():
            n = await store.sweep(conn, shards, store.month_start(args.before) if args.before else None)
            await audit.record(conn, args.operator, "clearing.sweep", args.before or "", after={"recorded": n})
        await audit.publish_after_action(s)
        print(f"recorded {n} ledger rows the stream had not delivered")
        return 0
    if args.cmd == "deposit":
        if args.action == "topup":
            move = await deposit_topup(conn, args.prov, args.yuan, args.ref, args.memo, operator=args.operator)
            await publish_outbox(s, pool)
            await audit.publish_after_action(s)
            print(f"{args.prov}: balance {to_yuan(move.balance_fen)} warning line {to_yuan(move.warning_line_fen)}"
                  + (" (already recorded)" if move.duplicate else "") + (" ALERT: at or below the line"
                                                                           if move.alert else ""))
        elif args.action == "line":
            line = await set_warning_line(conn, args.prov, None if args.default else args.yuan, operator=args.operator)
            await audit.publish_after_action(s)
            print(f"{args.prov}: warning line {to_yuan(line)}")
        else:
            for prov, balance, line in await store.deposits(conn):
                if args.prov in (None, prov):
                    flag = "  BELOW LINE" if line > 0 and balance <= line else ""
                    print(f"{prov} balance {to_yuan(balance)} warning line {to_yuan(line)}{flag}")
        return 0
    if args.cmd == "claims":
        rates = store.rates_recomputed if args.recompute else store.rates
        _print_json(await rates(conn, shards, args.date_from, args.date_to))
        return 0
    raise AssertionError(args.cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.clearing.cli", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("close", "verify"):
        sub.add_parser(name).add_argument("--month", type=_month, required=True)
    audit.add_operator_argument(sub.choices["close"])
    pos = sub.add_parser("positions")
    pos.add_argument("--month", type=_month, required=True)
    pos.add_argument("--level", choices=("pool", "province"), default="pool")
    st = sub.add_parser("statement")
    st.add_argument("--month", type=_month, required=True)
    st.add_argument("--region", required=True, help="a pooling region (e.g. 510400) or a province (XX0000)")
    st.add_argument("--format", choices=("json", "csv", "html"), default="json")
    st.add_argument("--out")
    st.add_argument("--version", type=int)
    sub.add_parser("statements", help="a closed month's statement versions").add_argument(
        "--month", type=_month, required=True)
    adj = sub.add_parser("adjust", help="correct a region pair's amounts in a closed month; re-issue its statement")
    adj.add_argument("--month", type=_month, required=True)
    adj.add_argument("--insured", required=True, help="the insured pooling region (owes)")
    adj.add_argument("--treating", required=True, help="the treating pooling region (is owed)")
    adj.add_argument("--amount", type=_amount, action="append", required=True,
                     help="FIELD=YUAN, signed: what the pair's amount changes by (repeat per field)")
    adj.add_argument("--reason", required=True, help="why (kept with the statement version; no personal data)")
    adj.add_argument("--ref", required=True, help="the adjustment's reference: a second run with it is a no-op")
    audit.add_operator_argument(adj)
    sw = sub.add_parser("sweep")
    sw.add_argument("--before", type=_month, help="only rows of months before this one")
    audit.add_operator_argument(sw)
    dep = sub.add_parser("deposit").add_subparsers(dest="action", required=True)
    top = dep.add_parser("topup")
    top.add_argument("--prov", required=True)
    top.add_argument("--yuan", type=_yuan_fen, required=True)
    top.add_argument("--ref", required=True, help="the transfer's reference: a second top-up with it is a no-op")
    top.add_argument("--memo", default="")
    audit.add_operator_argument(top)
    line = dep.add_parser("line")
    line.add_argument("--prov", required=True)
    group = line.add_mutually_exclusive_group(required=True)
    group.add_argument("--yuan", type=_yuan_fen)
    group.add_argument("--default", action="store_true", help="one month's average cleared amount")
    audit.add_operator_argument(line)
    dep.add_parser("show").add_argument("--prov")
    claims = sub.add_parser("claims").add_subparsers(dest="action", required=True)
    submit = claims.add_parser("submit")
    submit.add_argument("file", type=Path)
    audit.add_operator_argument(submit)
    rate = claims.add_parser("rate")
    rate.add_argument("--from", dest="date_from", type=_date, required=True)
    rate.add_argument("--to", dest="date_to", type=_date, required=True)
    rate.add_argument("--recompute", action="store_true",
                      help="count from the ledger rows instead of the daily aggregates (a check)")
    return p


def changes_state(args: argparse.Namespace) -> bool:
    """The commands that change something, and so name their operator."""
    return args.cmd in ("close", "sweep", "adjust") or (args.cmd, getattr(args, "action", None)) in (
        ("deposit", "topup"), ("deposit", "line"), ("claims", "submit"))


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if changes_state(args):
        args.operator = audit.operator_or_exit(p, args.operator)
    try:
        return asyncio.run(_run(args, load_settings()))
    except (ClearingError, BrokerError, ValueError, UnknownRegion) as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
