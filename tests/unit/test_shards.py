"""The shard map (services/common/shards.py): every province in exactly one shard, a person's routed
partition always among its shard's, an engine's partitions name exactly the shards it serves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.config import DEFAULT_SHARDS, ConfigError, load_settings
from services.common.shards import (
    certno_digest,
    parse_shard_map,
    person_index_key,
    shard_dsns,
)
from services.refdata.regions import PROVINCES, SEED_REGIONS

ALL = ",".join(sorted({p[:2] for p in PROVINCES}))


def test_default_map_puts_every_province_in_one_shard_and_seed_regions_on_both() -> None:
    m = parse_shard_map(DEFAULT_SHARDS)
    assert m.names == ("s1", "s2")
    assert sorted(m.by_prefix) == sorted(p[:2] for p in PROVINCES)
    assert {code: m.shard_of(code) for code in SEED_REGIONS} == {
        "150400": "s1", "500154": "s2", "510421": "s2", "350300": "s1", "140100": "s1"}


@pytest.mark.parametrize(("spec", "problem"), [
    ("", "no shard"),
    (f"s1={ALL.replace('11,', '')}", "no shard holds province(s) 110000"),
    (f"s1={ALL};s2=11", "province 110000 is in s1 and s2"),
    (f"s1={ALL};s1=", "shard s1 listed twice"),
    (f"S1={ALL}", "is not name=prefix"),
    (f"s1={ALL},1", "'1' is not a two-digit province prefix"),
])
def test_a_bad_map_is_refused_with_the_reason(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_shard_map(spec)


def test_shard_databases_default_to_the_hubs_server_and_may_be_pointed_elsewhere(monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    monkeypatch.setenv("XS_PG_DATABASE", "xs")
    monkeypatch.delenv("XS_SHARDS", raising=False)
    s = load_settings()
    assert shard_dsns(s) == {"s1": s.pg_dsn.rsplit("/", 1)[0] + "/xs_s1", "s2": s.pg_dsn.rsplit("/", 1)[0] + "/xs_s2"}
    s2 = dataclasses.replace(s, shard_dsns="s2=postgresql://u@10.0.0.2:5432/east")
    assert shard_dsns(s2)["s2"] == "postgresql://u@10.0.0.2:5432/east"
    with pytest.raises(ConfigError, match="s9 not in XS_SHARDS"):
        shard_dsns(dataclasses.replace(s, shard_dsns="s9=postgresql://u@h/x"))


def test_the_person_index_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    s = dataclasses.replace(load_settings(), state_dir=tmp_path)
    key = person_index_key(s)
    assert len(key) == 32 and person_index_key(s) == key
    path = tmp_path / "secrets" / "person-index.key"
    assert path.stat().st_mode & 0o777 == 0o600
    digest = certno_digest(key, "150400195803061234")
    assert len(digest) == 16 and digest == certno_digest(key, "150400195803061234")
    assert digest != certno_digest(b"another deployment's key", "150400195803061234")
