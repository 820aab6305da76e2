"""Settlement state sharded by insured province.

The insured region owns its persons, their filings, accounts, accumulators, visits, fees, ledger
rows and processed requests (REFERENCE §1): all of it lives in the shard of the person's insured
province, each shard its own PostgreSQL database (`deploy/migrations/shard/`). Everything else —
regions, hospitals, catalogs, the person index, clearing — is in the hub database (`Settings.pg_dsn`,
`deploy/migrations/hub/`).

`ShardMap` is pure: which shard holds a province (by the first two digits of any region code).
`ShardPools` holds one asyncpg pool per shard.

The person index maps a certificate number to (psn_no, insured region) for 1101 without knowing the
shard. It stores a keyed digest (HMAC-SHA-256, first 16 bytes), never the number itself: the key is
generated at first start in the state dir (`secrets/person-index.key`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg

from services.common.config import ConfigError, Settings
from services.common.secrets import create_once
from services.refdata.regions import PROVINCES

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
PERSON_INDEX_KEY_FILE: Final = Path("secrets") / "person-index.key"
DIGEST_BYTES: Final = 16


@dataclass(frozen=True)
class ShardMap:
    names: tuple[str, ...]  # in configuration order: shard i owns routed partitions p with p % n == i
    by_prefix: dict[str, str]  # two-digit province prefix → shard name

    def shard_of(self, admdvs: str) -> str:
        """The shard of any region code (its province's). KeyError for a province no shard holds."""
        return self.by_prefix[admdvs[:2]]


def parse_shard_map(spec: str) -> ShardMap:
    """"s1=11,12,...;s2=41,..." — every province of the region table in exactly one shard."""
    names: list[str] = []
    by_prefix: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, prefixes = part.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise ConfigError(f"XS_SHARDS: {part!r} is not name=prefix,prefix,... (name: a-z, 0-9, _)")
        if name in names:
            raise ConfigError(f"XS_SHARDS: shard {name} listed twice")
        names.append(name)
        for prefix in filter(None, (x.strip() for x in prefixes.split(","))):
            if not re.fullmatch(r"\d\d", prefix):
                raise ConfigError(f"XS_SHARDS: {prefix!r} is not a two-digit province prefix")
            if prefix in by_prefix:
                raise ConfigError(f"XS_SHARDS: province {prefix}0000 is in {by_prefix[prefix]} and {name}")
            by_prefix[prefix] = name
    if not names:
        raise ConfigError("XS_SHARDS: no shard")
    missing = [p for p in PROVINCES if p[:2] not in by_prefix]
    if missing:
        raise ConfigError(f"XS_SHARDS: no shard holds province(s) {', '.join(missing)}")
    return ShardMap(tuple(names), by_prefix)


def shard_map(s: Settings) -> ShardMap:
    return parse_shard_map(s.shards)


def shard_database(s: Settings, name: str) -> str:
    return f"{s.pg_database}_{name}"


def shard_dsns(s: Settings) -> dict[str, str]:
    """Every shard's DSN: XS_SHARD_DSNS's, else `<pg_database>_<name>` on the hub's server."""
    overrides: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in s.shard_dsns.split(";"))):
        name, sep, dsn = part.partition("=")
        if not sep or not dsn.startswith("postgresql://"):
            raise ConfigError(f"XS_SHARD_DSNS: {part!r} is not name=postgresql://...")
        overrides[name.strip()] = dsn.strip()
    names = shard_map(s).names
    unknown = set(overrides) - set(names)
    if unknown:
        raise ConfigError(f"XS_SHARD_DSNS: {', '.join(sorted(unknown))} not in XS_SHARDS")
    base = s.pg_dsn.rsplit("/", 1)[0]
    return {n: overrides.get(n, f"{base}/{shard_database(s, n)}") for n in names}


# For the request path's shard statements (router, engine): every one is keyed (`= ANY($1)` on a primary key or
# an index, the ledger's month partitions pruned at run time). PostgreSQL's default plans each execution of
# such a prepared statement afresh (a plan for the array's actual length looks cheaper than the generic one),
# which cost the engine as much CPU as executing them (pg_stat_statements at 80 requests/s); a generic plan
# is made once per connection. Not for the hub's hash-partitioned person index (only a custom plan prunes
# it by the digests) nor for analytical readers.
GENERIC_PLANS: Final[dict[str, str]] = {"plan_cache_mode": "force_generic_plan"}


class ShardPools:
    """One asyncpg pool per shard (all of them: a batch of any partition may name any of its shards)."""

    def __init__(self, map_: ShardMap, pools: dict[str, asyncpg.Pool]) -> None:
        self.map = map_
        self.pools = pools

    @classmethod
    async def connect(cls, s: Settings, max_size: int, *, session_reset: bool = True,
                      server_settings: dict[str, str] | None = None) -> ShardPools:
        """`session_reset=False` for users that keep no session state (no SET, LISTEN, session advisory
        locks or cursors outside a transaction): a released connection skips the reset statement asyncpg
        sends by default (one more round trip per acquire); an open transaction is still rolled back.
        `server_settings`: the connections' PostgreSQL settings, sent when each connects (no round trip)."""
        map_ = shard_map(s)
        dsns = shard_dsns(s)
        reset = None if session_reset else _no_session_reset
        pools: dict[str, asyncpg.Pool] = {}
        try:
            for name in map_.names:
                pools[name] = await asyncpg.create_pool(dsns[name], min_size=0, max_size=max_size, reset=reset,
                                                          server_settings=server_settings)
        except BaseException:
            await asyncio.gather(*(p.close() for p in pools.values()), return_exceptions=True)
            raise
        return cls(map_, pools)

    def of(self, admdvs: str) -> asyncpg.Pool:
        """The pool of the shard holding region `admdvs`'s province."""
        return self.pools[self.map.shard_of(admdvs)]

    def __iter__(self) -> Iterator[tuple[str, asyncpg.Pool]]:
        return iter(self.pools.items())

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """`sql` on every shard, one after the other; their rows concatenated in shard order."""
        rows: list[asyncpg.Record] = []
        for pool in self.pools.values():
            rows += await pool.fetch(sql, *args)
        return rows

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Nothing beyond what the pool does before calling it (roll back an open transaction, drop listeners)."""


def person_index_key(s: Settings) -> bytes:
    """The deployment's key for certificate digests, created (0600) on first use."""
    return create_once(s.state_dir / PERSON_INDEX_KEY_FILE, os.urandom(32))


def certno_digest(key: bytes, certno: str) -> bytes:
    return hmac.new(key, certno.encode(), hashlib.sha256).digest()[:DIGEST_BYTES]
