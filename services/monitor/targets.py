"""Direct-settlement rate targets per insured province, scope and visit type (targets.toml)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.common.metrics import SCOPES, VISIT_TYPES

TARGETS_FILE: Final = Path(__file__).with_name("targets.toml")


class TargetsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Target:
    insured_prov: str
    scope: str
    visit_type: str
    ratio: float


def _parse(table: dict, where: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for key, value in table.items():
        scope, _, visit_type = key.partition(".")
        if scope not in SCOPES or visit_type not in VISIT_TYPES.values():
            raise TargetsError(f"{where}: {key!r} is not '<scope>.<visit_type>'")
        if not isinstance(value, int | float) or not 0 < value <= 1:
            raise TargetsError(f"{where}: {key} = {value!r} is not a fraction in (0, 1]")
        out[(scope, visit_type)] = float(value)
    return out


def load_targets(provinces: Iterable[str], path: Path = TARGETS_FILE) -> list[Target]:
    """One target per province × (scope, visit_type) that has one, default overlaid by the province's table."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    default = _parse(raw.get("default", {}), f"{path.name} [default]")
    per_prov = raw.get("province", {})
    known = set(provinces)
    for prov in per_prov:
        if prov not in known:
            raise TargetsError(f"{path.name}: [province.{prov!r}] is not a province of the region table")
    targets: list[Target] = []
    for prov in sorted(known):
        merged = {**default, **_parse(per_prov.get(prov, {}), f"{path.name} [province.{prov!r}]")}
        targets += [Target(prov, scope, vt, ratio) for (scope, vt), ratio in sorted(merged.items())]
    return targets
