"""What one engine write costs per encoding of its rows: one array per column (asyncpg encodes every element,
with Python-level type checks for each) against one JSON parameter (msgspec encodes it in C; the engine's
`_Writes` since 2026-12-01).

Inserts fee items (the widest rows the engine writes, the most per request) into a temporary table of the
hub database, alternating the two encodings, and prints the client's CPU and the wall time per statement
(medians of the rounds; building the rows is measured alone and left out). Bounded: --rounds x 2 x
--statements statements, nothing kept (the table is temporary).

    .venv/bin/python -m loadtest.rows_encoding --rows 30
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from deploy.db import owner_settings
from services.common.config import load_settings
from services.settle import ledger
from services.settle.state import Fee, columns

COLUMNS = columns(Fee)
TABLE = ("CREATE TEMP TABLE rows_encoding (mdtrt_id text, feedetl_sn text, med_list_codg text, medins_list_codg text,"
         " chrgitm_lv text, selfpay_prop numeric(5,4), pric_uplmt_fen bigint, fee_fen bigint, cnt numeric(16,4),"
         " pric_fen bigint, fee_ocur_time timestamp, upload_msgid text, cancelled boolean, setl_id text,"
         " once_per_day boolean, gender_only text, supply_days numeric, PRIMARY KEY (mdtrt_id, feedetl_sn))")


def fee_rows(upload: int, rows: int) -> list[tuple[Any, ...]]:
    fees = [Fee(mdtrt_id=f"M{upload:08d}", feedetl_sn=f"{i:04d}", med_list_codg="XB01AC064A001010101445",
                medins_list_codg="H11010500001", chrgitm_lv="01", selfpay_prop=Decimal("0.1000"), pric_uplmt_fen=None,
                fee_fen=12_345, cnt=Decimal("2.0000"), pric_fen=6_172, fee_ocur_time=datetime(2026, 11, 30, 9, 15),
                upload_msgid=f"H11010500001202611300915{upload:06d}") for i in range(rows)]
    return [tuple(getattr(f, c) for c in COLUMNS) for f in fees]


def as_arrays(rows: Sequence[tuple[Any, ...]]) -> tuple[str, list[list[Any]]]:
    """The former encoding: `unnest` of one typed array per column."""
    arrays = ", ".join(f"${i}::{ledger._PG_TYPES.get(c, 'text')}[]" for i, c in enumerate(COLUMNS, start=1))
    sql = f"INSERT INTO rows_encoding ({', '.join(COLUMNS)}) SELECT * FROM unnest({arrays}) AS u({', '.join(COLUMNS)})"
    return sql, [list(column) for column in zip(*rows, strict=True)]


def as_json(rows: Sequence[tuple[Any, ...]]) -> tuple[str, list[str | list[str]]]:
    """The engine's: one JSON parameter read by json_to_recordset."""
    writes = ledger._Writes()
    writes.insert("rows_encoding", COLUMNS, list(rows))
    return writes.parts[0], writes.args


async def measure(conn: asyncpg.Connection, encode: Any, first: int, statements: int, rows: int) -> tuple[float, float]:
    """(client CPU µs, wall µs) per statement, building the rows excluded."""
    built = [fee_rows(first + k, rows) for k in range(statements)]
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in built:
        sql, args = encode(batch)
        await conn.execute(sql, *args)
    return ((time.process_time() - cpu) / statements * 1e6, (time.perf_counter() - wall) / statements * 1e6)


async def main(args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(owner_settings(load_settings()).pg_dsn, timeout=10)
    try:
        await conn.execute(TABLE)
        results: dict[str, list[tuple[float, float]]] = {"arrays": [], "json": []}
        upload = 0
        for _ in range(args.rounds):
            for name, encode in (("arrays", as_arrays), ("json", as_json)):
                results[name].append(await measure(conn, encode, upload, args.statements, args.rows))
                upload += args.statements
        print(f"rows encoding: {args.rows} fee items per statement, {args.rounds} rounds of {args.statements} "
              "statements each way, alternating (medians)")
        for name, runs in results.items():
            print(f"  {name:6}  client CPU {statistics.median(c for c, _ in runs):7.0f} us   "
                  f"wall {statistics.median(w for _, w in runs):7.0f} us per statement")
        cpu = {name: statistics.median(c for c, _ in runs) for name, runs in results.items()}
        print(f"  client CPU, arrays / json: {cpu['arrays'] / cpu['json']:.2f}")
    finally:
        await conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=30, help="fee items per statement (default 30)")
    p.add_argument("--statements", type=int, default=200, help="statements per round and encoding (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each both encodings (default 5)")
    asyncio.run(main(p.parse_args()))
