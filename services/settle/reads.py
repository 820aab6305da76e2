"""Reads sent as one statement: the read side of the ledger's `_Writes`.

Each part is one table's rows for the batch, collected into an array of anonymous records
(`ARRAY(SELECT ROW(...) ...)`) in one column of the statement's single result row. However many parts a
batch needs, they cost one round trip, one parse-free execution (the statement text depends only on which
parts are present, so each connection plans a handful of variants once) and one reply; asyncpg decodes the
records' fields with their own types (timestamps, numerics, bytea), as it does a plain row.

PostgreSQL evaluates the parts (uncorrelated subqueries: init plans) in the order of the select list, so
locking parts (`FOR UPDATE`) lock in the order they were added. Every part reads the statement's one
snapshot, except that rows a `FOR UPDATE` part waited for are read as committed by the transaction it
waited for: a read that must see what a concurrent writer committed goes in a statement after the locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

Row = dict[str, Any]


class Reads:
    def __init__(self) -> None:
        self._ctes: list[str] = []
        self._parts: list[tuple[str, tuple[str, ...], str]] = []
        self._args: list[Any] = []

    def arg(self, value: Any, pg_type: str) -> str:
        """A parameter placeholder for `value`, cast to `pg_type` (arrays say so: `text[]`)."""
        self._args.append(value)
        return f"${len(self._args)}::{pg_type}"

    def with_(self, name: str, sql: str) -> None:
        """A named set the parts may read (computed once, when a part first reads it)."""
        self._ctes.append(f"{name} AS MATERIALIZED ({sql})")

    def rows(self, name: str, columns: Sequence[str], from_: str, exprs: Sequence[str] | None = None) -> None:
        """Part `name`: the rows of `SELECT <exprs> <from_>` (FROM, WHERE, ORDER BY, FOR UPDATE), each as a
        dict by `columns` (the expressions' names; `exprs` defaults to the columns themselves)."""
        selected = ", ".join(exprs if exprs is not None else columns)
        self._parts.append((name, tuple(columns), f"ARRAY(SELECT ROW({selected}) {from_})"))

    def __bool__(self) -> bool:
        return bool(self._parts)

    def sql(self) -> str:
        with_ = f"WITH {', '.join(self._ctes)} " if self._ctes else ""
        text = f"{with_}SELECT {', '.join(f'{sql} AS {name}' for name, _, sql in self._parts)}"
        # PostgreSQL counts the parameters the text names: a value given but not placed is a bug here.
        assert all(f"${i}::" in text for i in range(1, len(self._args) + 1)), "a parameter no part uses"
        return text

    async def run(self, conn: asyncpg.Connection) -> dict[str, list[Row]]:
        """Every part's rows by part name (nothing sent when there are no parts)."""
        if not self._parts:
            return {}
        result = await conn.fetchrow(self.sql(), *self._args)
        assert result is not None  # a SELECT without FROM has exactly one row
        return {name: [dict(zip(columns, values, strict=True)) for values in result[name]]
                for name, columns, _ in self._parts}
