"""The policy file's tool: ``python -m services.policy list [REGION] | validate [FILE] | diff REGION DATE1 DATE2``.

- ``list``: every table (``DEFAULT`` and each region) with its versions' labels and effective dates;
  with REGION only that region (an admdvs code without a table of its own shows the table it uses).
- ``validate``: load a policy file (default: the service's ``policies.toml``); on an error, exit 1 with
  the region, version and dotted key.
- ``diff``: what changed between the versions in force on two dates for REGION, one key a line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from datetime import date
from pathlib import Path
from typing import Any

from services.policy.policies import DEFAULT_POLICY_PATH, DEFAULT_TABLE, Policy, PolicyBook, PolicyConfigError
from services.refdata.regions import UnknownRegion, pool_of


def flatten(policy: Policy) -> dict[str, Any]:
    """The policy's values by dotted key (money in fen, as the engine uses them); the label left out."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(value, Mapping):
            for key in sorted(value):
                yield from walk(f"{prefix}.{key}", value[key])
        else:
            yield prefix, value

    for f in fields(policy):
        if f.name in ("version", "region"):
            continue
        out.update(walk(f.name, getattr(policy, f.name)))
    return out


def diff(book: PolicyBook, region: str, first: date, second: date) -> list[str]:
    """Lines ``key: old -> new`` for each value that differs between the two dates' versions."""
    old, new = _policy_of(book, region, first), _policy_of(book, region, second)
    before, after = flatten(old), flatten(new)
    lines = [f"{old.version} -> {new.version}"]
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            lines.append(f"{key}: {_show(before.get(key))} -> {_show(after.get(key))}")
    return lines


def _policy_of(book: PolicyBook, region: str, on: date | None) -> Policy:
    """As the engine picks it: the region's table, else its pooling region's, else [DEFAULT]."""
    try:
        pool = pool_of(region)
    except UnknownRegion:
        pool = region
    return book.for_region(region, pool, on=on)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def listing(book: PolicyBook, region: str | None) -> list[str]:
    tables = [DEFAULT_TABLE, *book.regions] if region is None else [_policy_of(book, region, None).region]
    lines = []
    for table in tables:
        for effective, policy in zip(book.effective_dates(table), book.versions(table), strict=True):
            since = "since forever" if effective is None else f"from {effective.isoformat()}"
            lines.append(f"{policy.version}\t{policy.name}\t{since}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.policy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the versions of every table, or of one region's")
    p_list.add_argument("region", nargs="?", help="an admdvs code (6 digits)")
    p_list.add_argument("--file", type=Path, default=DEFAULT_POLICY_PATH)
    p_validate = sub.add_parser("validate", help="load and validate a policy file")
    p_validate.add_argument("file", nargs="?", type=Path, default=DEFAULT_POLICY_PATH)
    p_diff = sub.add_parser("diff", help="what changed for a region between the versions of two dates")
    p_diff.add_argument("region")
    p_diff.add_argument("first", type=date.fromisoformat)
    p_diff.add_argument("second", type=date.fromisoformat)
    p_diff.add_argument("--file", type=Path, default=DEFAULT_POLICY_PATH)
    args = parser.parse_args(argv)
    try:
        book = PolicyBook.load(args.file)
    except PolicyConfigError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    if args.command == "validate":
        count = sum(len(book.versions(t)) for t in (DEFAULT_TABLE, *book.regions))
        print(f"ok: {args.file}: {1 + len(book.regions)} tables, {count} versions")
    elif args.command == "list":
        print("\n".join(listing(book, args.region)))
    else:
        print("\n".join(diff(book, args.region, args.first, args.second)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
