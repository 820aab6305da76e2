"""The engine's grouped writes (services/settle/ledger.py `_Writes`): one statement whose parts number their
parameters in order, one array per column."""

from __future__ import annotations

import re

from services.settle.ledger import _Writes


def _placeholders(sql: str) -> list[int]:
    return [int(n) for n in re.findall(r"\$(\d+)::", sql)]


def test_parts_become_one_statement_with_consecutive_parameters() -> None:
    writes = _Writes()
    writes.insert("visit", ("mdtrt_id", "begntime"), [("M1", "t1"), ("M2", "t2")])
    writes.update("visit", ("mdtrt_id", "state"), "state = u.state", ("mdtrt_id",), [("M0", "closed")])
    writes.insert("account", ("psn_no", "balc_fen"), [("P1", 100)], " ON CONFLICT (psn_no) DO NOTHING")
    sql = " ".join(writes.parts)
    assert _placeholders(sql) == [1, 2, 3, 4, 5, 6]
    assert writes.args == [["M1", "M2"], ["t1", "t2"], ["M0"], ["closed"], ["P1"], [100]]
    assert writes.parts[0] == ("INSERT INTO visit (mdtrt_id, begntime) SELECT * FROM "
                               "unnest($1::text[], $2::timestamp[]) AS u(mdtrt_id, begntime)")
    assert writes.parts[1] == ("UPDATE visit t SET state = u.state FROM unnest($3::text[], $4::text[])"
                               " AS u(mdtrt_id, state) WHERE t.mdtrt_id = u.mdtrt_id")
    assert writes.parts[2].endswith("unnest($5::text[], $6::bigint[]) AS u(psn_no, balc_fen) ON CONFLICT (psn_no)"
                                    " DO NOTHING")


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
        "WITH w0 AS (INSERT INTO visit (mdtrt_id) SELECT * FROM unnest($1::text[]) AS u(mdtrt_id))"
        " INSERT INTO account (psn_no, balc_fen) SELECT * FROM unnest($2::text[], $3::bigint[]) AS u(psn_no, balc_fen)",
        (["M1"], ["P1"], [5]))]


async def test_one_part_is_a_plain_statement_and_none_is_no_round_trip() -> None:
    conn = _Conn()
    await _Writes().run(conn)  # type: ignore[arg-type]
    assert conn.calls == []
    writes = _Writes()
    writes.insert("account", ("psn_no", "balc_fen"), [("P1", 5)])
    await writes.run(conn)  # type: ignore[arg-type]
    assert conn.calls == [("INSERT INTO account (psn_no, balc_fen) SELECT * FROM unnest($1::text[], $2::bigint[])"
                           " AS u(psn_no, balc_fen)", (["P1"], [5]))]
