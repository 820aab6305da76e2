"""The engine's UPDATE statements find a batch's rows by index however large the table: planned once per
connection (generic plans, as the engine's pools are), a join to the batch's JSON rows alone was a
sequential scan of the whole table per batch once it held some thousands of rows — a cost that grew with
the ledger. On a shard database of the run, in a transaction that is rolled back."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from services.settle.ledger import _Writes
from tests.integration.conftest import Ledger

pytestmark = pytest.mark.integration

VISITS = 5_000
ITEMS_PER_VISIT = 4


def _scans(plan: Any) -> list[tuple[str, str]]:
    """(node type, relation) of every scan in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if "Relation Name" in node:
            found.append((node["Node Type"], node["Relation Name"]))
        stack.extend(node.get("Plans", []))
    return found


async def _generic_plan(conn: asyncpg.Connection, writes: _Writes) -> list[tuple[str, str]]:
    """The scans of the statement `writes` makes, planned as the engine's connections plan it."""
    (sql,) = writes.parts
    types = ", ".join("json" if isinstance(a, str) else "text[]" for a in writes.args)
    literals = ", ".join(
        "'" + (a if isinstance(a, str) else "{" + ",".join(a) + "}").replace("'", "''") + "'" for a in writes.args)
    await conn.execute(f"PREPARE batch_update ({types}) AS {sql}")
    try:
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE batch_update ({literals})")
    finally:
        await conn.execute("DEALLOCATE batch_update")
    return _scans(json.loads(plan))


async def test_the_engines_updates_look_their_rows_up_by_index_in_a_large_table(ledger: Ledger) -> None:
    _, pool = next(iter(ledger.shards))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        # Tables of this transaction's own, shaped as the ledger's (columns, keys, indexes), big enough.
        await conn.execute("CREATE TEMP TABLE visit (LIKE public.visit INCLUDING ALL) ON COMMIT DROP")
        await conn.execute("CREATE TEMP TABLE fee_item (LIKE public.fee_item INCLUDING ALL) ON COMMIT DROP")
        await conn.execute(
            "INSERT INTO visit (mdtrt_id, psn_no, fixmedins_code, med_type, insutype, scope, insured_admdvs,"
            " treating_admdvs, ipt_otp_no, begntime, state, created_msgid)"
            " SELECT 'M' || v, 'P' || v, 'H1', '11', '310',"
            " 'intra_province', '150400', '150100', 'N' || v, '2026-11-30', 'open', 'A' || v"
            " FROM generate_series(1, $1) v", VISITS)
        await conn.execute(
            "INSERT INTO fee_item (mdtrt_id, feedetl_sn, med_list_codg, medins_list_codg, chrgitm_lv, selfpay_prop,"
            " fee_fen, cnt, pric_fen, fee_ocur_time, upload_msgid, setl_id)"
            " SELECT 'M' || v, i::text, 'X', 'X', '01', 0, 100, 1, 100, '2026-11-30', 'U' || v,"
            " CASE WHEN v % 2 = 0 THEN 'S' || v END"
            " FROM generate_series(1, $1) v, generate_series(1, $2) i", VISITS, ITEMS_PER_VISIT)
        await conn.execute("ANALYZE visit")
        await conn.execute("ANALYZE fee_item")

        settled = _Writes()  # the items a settlement settles
        settled.update("fee_item", ("mdtrt_id", "feedetl_sn", "setl_id"), "setl_id = u.setl_id",
                       ("mdtrt_id", "feedetl_sn"), [("M7", "1", "S7"), ("M7", "2", "S7"), ("M9", "1", "S9")])
        unsettled = _Writes()  # a reversed settlement's items
        unsettled.update("fee_item", ("mdtrt_id", "setl_id"), "setl_id = NULL", ("mdtrt_id", "setl_id"),
                         [("M8", "S8")])
        visits = _Writes()  # visits a batch changes
        visits.update("visit", ("mdtrt_id", "state"), "state = u.state", ("mdtrt_id",),
                      [("M3", "closed"), ("M4", "closed")])
        for writes, table in ((settled, "fee_item"), (unsettled, "fee_item"), (visits, "visit")):
            scans = [node for node, relation in await _generic_plan(conn, writes) if relation == table]
            assert scans and "Seq Scan" not in scans, (writes.parts, scans)

        # The test's tables are large enough to show the difference: the join alone scans them whole.
        plain = "UPDATE fee_item t SET setl_id = $2 FROM json_to_recordset($1::json) AS u(mdtrt_id text, setl_id" \
                " text) WHERE t.mdtrt_id = u.mdtrt_id AND t.setl_id = u.setl_id"
        await conn.execute(f"PREPARE plain (json, text) AS {plain}")
        plan = await conn.fetchval(
            """EXPLAIN (FORMAT JSON) EXECUTE plain ('[{"mdtrt_id":"M8","setl_id":"S8"}]', NULL)""")
        await conn.execute("DEALLOCATE plain")
        assert ("Seq Scan", "fee_item") in _scans(json.loads(plan))

        # And the statements do what they say.
        for writes in (settled, unsettled, visits):
            await writes.run(conn)
        items = await conn.fetch("SELECT mdtrt_id, feedetl_sn, setl_id FROM fee_item"
                                 " WHERE mdtrt_id IN ('M7', 'M8', 'M9') ORDER BY 1, 2")
        assert [tuple(r) for r in items] == [
            ("M7", "1", "S7"), ("M7", "2", "S7"), ("M7", "3", None), ("M7", "4", None),
            ("M8", "1", None), ("M8", "2", None), ("M8", "3", None), ("M8", "4", None),
            ("M9", "1", "S9"), ("M9", "2", None), ("M9", "3", None), ("M9", "4", None)]
        assert await conn.fetchval("SELECT count(*) FROM visit WHERE state = 'closed'") == 2
