"""The read statement's text: parts in the order added (the order PostgreSQL locks in), placeholders numbered
in the order their values were given, named sets ahead of the parts."""

from __future__ import annotations

import pytest

from services.settle.reads import Reads


def test_parts_come_in_the_order_added_with_their_placeholders_numbered_in_turn() -> None:
    reads = Reads()
    persons = reads.arg(["P1", "P2"], "text[]")
    reads.rows("accounts", ("psn_no", "balc_fen"), f"FROM account WHERE psn_no = ANY({persons}) FOR UPDATE")
    reads.with_("named", f"SELECT unnest({reads.arg(['M1'], 'text[]')}) AS mdtrt_id")
    reads.rows("visits", ("mdtrt_id", "reversed"), "FROM visit WHERE mdtrt_id IN (SELECT mdtrt_id FROM named)",
               exprs=("mdtrt_id", "false"))
    assert reads.sql() == (
        "WITH named AS MATERIALIZED (SELECT unnest($2::text[]) AS mdtrt_id) SELECT"
        " ARRAY(SELECT ROW(psn_no, balc_fen) FROM account WHERE psn_no = ANY($1::text[]) FOR UPDATE) AS accounts,"
        " ARRAY(SELECT ROW(mdtrt_id, false) FROM visit WHERE mdtrt_id IN (SELECT mdtrt_id FROM named)) AS visits")
    assert reads


def test_a_value_no_part_places_is_refused() -> None:
    """PostgreSQL would answer "expects 1 argument, 2 were passed" at run time: the text says so first."""
    reads = Reads()
    reads.arg(["unused"], "text[]")
    reads.rows("accounts", ("psn_no",), f"FROM account WHERE psn_no = ANY({reads.arg(['P1'], 'text[]')})")
    with pytest.raises(AssertionError, match="no part uses"):
        reads.sql()


def test_no_parts_is_no_statement() -> None:
    reads = Reads()
    reads.arg([], "text[]")
    assert not reads
