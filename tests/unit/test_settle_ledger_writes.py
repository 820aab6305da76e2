"""The engine's grouped writes (services/settle/ledger.py `_Writes`): one statement whose parts number their
parameters in order, one JSON parameter of rows per part."""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from decimal import Decimal

from services.settle.ledger import _bytea, _Writes


def _placeholders(sql: str) -> list[int]:
    return [int(n) for n in re.findall(r"\$(\d+)::", sql)]


def test_parts_become_one_statement_with_consecutive_parameters() -> None:
    writes = _Writes()
    writes.insert("visit", ("mdtrt_id", "begntime"), [("M1", datetime(2026, 11, 30, 9, 15)), ("M2", None)])
    writes.update("visit", ("mdtrt_id", "state"), "state = u.state", ("mdtrt_id",),
                  [("M9", "closed"), ("M0", "open")])
    writes.insert("account", ("psn_no", "balc_fen"), [("P1", 100)], " ON CONFLICT (psn_no) DO NOTHING")
    sql = " ".join(writes.parts)
    assert _placeholders(sql) == [1, 2, 3, 4]
    assert [json.loads(a) if isinstance(a, str) else a for a in writes.args] == [
        [{"mdtrt_id": "M1", "begntime": "2026-11-30T09:15:00"}, {"mdtrt_id": "M2", "begntime": None}],
        [{"mdtrt_id": "M9", "state": "closed"}, {"mdtrt_id": "M0", "state": "open"}],
        ["M0", "M9"],  # the leading key's values: the plan finds the rows by index
        [{"psn_no": "P1", "balc_fen": 100}]]
    assert writes.parts[0] == ("INSERT INTO visit (mdtrt_id, begntime) SELECT * FROM "
                               "json_to_recordset($1::json) AS u(mdtrt_id text, begntime timestamp)")
    assert writes.parts[1] == ("UPDATE visit t SET state = u.state FROM json_to_recordset($2::json)"
                               " AS u(mdtrt_id text, state text) WHERE t.mdtrt_id = ANY($3::text[])"
                               " AND t.mdtrt_id = u.mdtrt_id")
    assert writes.parts[2].endswith("json_to_recordset($4::json) AS u(psn_no text, balc_fen bigint)"
                                    " ON CONFLICT (psn_no) DO NOTHING")
    items = _Writes()  # a visit's items share its key: each value once in the array
    items.update("fee_item", ("mdtrt_id", "feedetl_sn", "setl_id"), "setl_id = u.setl_id", ("mdtrt_id", "feedetl_sn"),
                 [("M1", "1", "S1"), ("M1", "2", "S1"), ("M0", "1", "S0")])
    assert items.args[1] == ["M0", "M1"]


def test_values_keep_their_exact_form_in_the_rows_json() -> None:
    """Decimals as JSON numbers with all their digits (PostgreSQL reads numeric exactly), dates as ISO text, JSON
    columns as nested values (not strings), bytea in PostgreSQL's hex input format, text as it is."""
    writes = _Writes()
    row = (Decimal("2.0000"), Decimal("0.1"), {"outpatient_paid": 5}, date(2026, 11, 30), _bytea(b"\x00{"), 'a"b\\c医')
    writes.insert("fee_item", ("cnt", "selfpay_prop", "accum_delta", "day", "response", "mdtrt_id"), [row])
    (rows,) = writes.args
    assert isinstance(rows, str)
    assert '"cnt":2.0000,"selfpay_prop":0.1,"accum_delta":{"outpatient_paid":5},"day":"2026-11-30"' in rows
    assert json.loads(rows) == [{"cnt": 2.0, "selfpay_prop": 0.1, "accum_delta": {"outpatient_paid": 5},
                                 "day": "2026-11-30", "response": "\\x007b", "mdtrt_id": 'a"b\\c医'}]


class _Conn:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    async def execute(self, sql: str, *args: object) -> str:
        self.calls.append((sql, args))
        return "INSERT 0 1"


async def test_run_sends_the_last_part_as_the_main_statement() -> None:
    writes = _Writes()
    writes.insert("visit", ("mdtrt_id",), [("M1",)])
    writes.insert("account", ("psn_no", "balc_fen"), [("P1", 5)])
    conn = _Conn()
    await writes.run(conn)  # type: ignore[arg-type]
    assert conn.calls == [(
        "WITH w0 AS (INSERT INTO visit (mdtrt_id) SELECT * FROM json_to_recordset($1::json) AS u(mdtrt_id text))"
        " INSERT INTO account (psn_no, balc_fen) SELECT * FROM json_to_recordset($2::json)"
        " AS u(psn_no text, balc_fen bigint)",
        ('[{"mdtrt_id":"M1"}]', '[{"psn_no":"P1","balc_fen":5}]'))]


async def test_one_part_is_a_plain_statement_and_none_is_no_round_trip() -> None:
    conn = _Conn()
    await _Writes().run(conn)  # type: ignore[arg-type]
    assert conn.calls == []
    writes = _Writes()
    writes.insert("account", ("psn_no", "balc_fen"), [("P1", 5)])
    await writes.run(conn)  # type: ignore[arg-type]
    assert conn.calls == [("INSERT INTO account (psn_no, balc_fen) SELECT * FROM json_to_recordset($1::json)"
                           " AS u(psn_no text, balc_fen bigint)", ('[{"psn_no":"P1","balc_fen":5}]',))]
