"""Insured-region policies: load ``policies.toml``, deep-merge each region over ``[DEFAULT]``, validate.

Policy versions (REFERENCE §10): a table (``[DEFAULT]`` or a region's) may hold sub-tables named by an
effective-from date, e.g. ``["150400"."2027-01-01"]``. A version is deep-merged over the version before
it (the table's own keys are the version in force since forever), and a region's policy on a date is its
chain up to that date deep-merged over ``[DEFAULT]``'s chain up to that date. Its label is
``REGION@DATE``, the latest effective date that contributed (``REGION@base`` before any), so a ledger
row records exactly which parameters it used. A file without dated sub-tables loads as before.

Money in the TOML is yuan; inside a :class:`Policy` it is integer fen.  Ratios are :class:`Decimal`
(the TOML is parsed with ``parse_float=Decimal``, so no value ever passes through a float).

Validation happens once, at load time, for every region: a bad table stops the service with a
:class:`PolicyConfigError` that names the region and the dotted key instead of producing a wrong
settlement later.  The only I/O in this module is reading the TOML file.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from schemas.codes import FILING_TYPES, INSUTYPES

_V = TypeVar("_V")

DEFAULT_TABLE = "DEFAULT"
DEFAULT_POLICY_PATH = Path(__file__).with_name("policies.toml")

HOSP_LEVELS = 3
RATIO_DECIMAL_PLACES_MAX = 4  # pool_prop_selfpay is reported with 4 places: a ratio must fit exactly
MONEY_YUAN_MAX = Decimal(10) ** 9  # sanity bound on any amount in the policy file (one billion yuan)

BASE_VERSION = "base"  # the label of the version in force since forever (the table's own keys)

_ADMDVS_RE = re.compile(r"^[0-9]{6}$")
_VERSION_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_RATIO_QUANTUM = Decimal(1).scaleb(-RATIO_DECIMAL_PLACES_MAX)


class PolicyConfigError(ValueError):
    """The policy file is unusable; ``region`` and ``key`` (dotted) say where."""

    def __init__(self, region: str, key: str, problem: str) -> None:
        self.region = region
        self.key = key
        self.problem = problem
        where = f"[{region}] {key}" if key else f"[{region}]"
        super().__init__(f"policies.toml {where}: {problem}")


@dataclass(frozen=True)
class Policy:
    """One insured region's policy, ``[DEFAULT]`` deep-merged under the region's table.

    Per-``insutype`` values are keyed ``"310"`` / ``"390"``; per-hospital-level tuples are indexed
    ``hosp_lv - 1``.  Money is integer fen, ratios :class:`Decimal` in 0..1.
    """

    region: str  # the table the policy came from: an admdvs code or "DEFAULT"
    name: str
    inpatient_deductible_fen: Mapping[str, tuple[int, int, int]]
    inpatient_ratio: Mapping[str, tuple[Decimal, Decimal, Decimal]]
    retiree_bonus: Decimal
    ratio_ceiling: Decimal
    basic_annual_cap_fen: Mapping[str, int]
    outpatient_deductible_fen: Mapping[str, int]
    outpatient_ratio: Mapping[str, Decimal]
    outpatient_annual_cap_fen: Mapping[str, int]
    chronic_ratio: Mapping[str, Decimal]
    chronic_annual_cap_fen: Mapping[str, int]  # disease code -> annual cap
    critical_deductible_fen: int
    critical_bands: tuple[tuple[int, Decimal], ...]  # (lower bound above the deductible in fen, ratio)
    critical_annual_cap_fen: int
    supplementary_ratio: Decimal
    supplementary_annual_cap_fen: int
    assistance_ratio: Mapping[str, Decimal]  # assistance category -> ratio
    assistance_annual_cap_fen: int
    ratio_cut: Mapping[str, Decimal]  # filing type -> ratio cut for non-local care
    # "150400@2027-01-01": the table and the latest effective date that contributed (not compared:
    # two versions with equal parameters are equal policies).
    version: str = field(default="", compare=False)


# --- schema -----------------------------------------------------------------------------------
# Leaves name a value kind; a dict is a sub-table with exactly those keys; a "*_map" leaf is a
# sub-table with free keys (disease codes, assistance categories, filing types).

_PER_INSUTYPE_MONEY = {t: "money" for t in INSUTYPES}
_PER_INSUTYPE_RATIO = {t: "ratio" for t in INSUTYPES}

_SCHEMA: dict[str, Any] = {
    "name": "str",
    "inpatient": {
        "deductible": {t: "money_levels" for t in INSUTYPES},
        "ratio": {t: "ratio_levels" for t in INSUTYPES},
        "retiree_bonus": "ratio",
        "ratio_ceiling": "ratio",
    },
    "basic_annual_cap": _PER_INSUTYPE_MONEY,
    "outpatient": {
        "deductible": _PER_INSUTYPE_MONEY,
        "ratio": _PER_INSUTYPE_RATIO,
        "annual_cap": _PER_INSUTYPE_MONEY,
    },
    "chronic": {"ratio": _PER_INSUTYPE_RATIO, "annual_cap": "money_map"},
    "critical": {"deductible": "money", "bands": "bands", "annual_cap": "money"},
    "supplementary": {"ratio": "ratio", "annual_cap": "money"},
    "assistance": {"ratio": "ratio_map", "annual_cap": "money"},
    "cross_region": {"ratio_cut": "ratio_map"},
}


def _check_shape(region: str, table: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    """Reject unknown keys and scalars where a sub-table belongs (before merging, so the region is right)."""
    for key, value in table.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise PolicyConfigError(region, path, "unknown key")
        sub = schema[key]
        if isinstance(sub, dict):
            if not isinstance(value, dict):
                raise PolicyConfigError(region, path, "must be a table")
            _check_shape(region, value, sub, f"{path}.")
        elif sub.endswith("_map") and not isinstance(value, dict):
            raise PolicyConfigError(region, path, "must be a table")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key, recursively; any other value (scalar, array) in ``override`` replaces."""
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = value
    return merged


# --- value converters ---------------------------------------------------------------------------


class _Reader:
    """Typed access to a merged table; every error names the region and the dotted key."""

    def __init__(self, region: str, table: Mapping[str, Any]) -> None:
        self.region = region
        self.table = table

    def fail(self, key: str, problem: str) -> PolicyConfigError:
        return PolicyConfigError(self.region, key, problem)

    def get(self, key: str) -> Any:
        node: Any = self.table
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise self.fail(key, "missing")
            node = node[part]
        return node

    def _number(self, key: str, value: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise self.fail(key, f"must be a number, got {value!r}")
        number = Decimal(value)
        if not number.is_finite():
            raise self.fail(key, f"must be finite, got {value!r}")
        return number

    def money_value(self, key: str, value: Any) -> int:
        yuan = self._number(key, value)
        if yuan < 0:
            raise self.fail(key, f"must be >= 0, got {value}")
        if yuan > MONEY_YUAN_MAX:
            raise self.fail(key, f"must be <= {MONEY_YUAN_MAX} yuan, got {value}")
        fen = yuan * 100
        if fen != fen.to_integral_value():
            raise self.fail(key, f"must be a whole number of fen, got {value}")
        return int(fen)

    def ratio_value(self, key: str, value: Any) -> Decimal:
        ratio = self._number(key, value)
        if not Decimal(0) <= ratio <= Decimal(1):
            raise self.fail(key, f"ratio must be within 0..1, got {value}")
        if ratio != ratio.quantize(_RATIO_QUANTUM):
            raise self.fail(key, f"ratio must have at most {RATIO_DECIMAL_PLACES_MAX} decimal places, got {value}")
        return ratio.quantize(_RATIO_QUANTUM)

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "must be a non-empty string")
        return value

    def money(self, key: str) -> int:
        return self.money_value(key, self.get(key))

    def ratio(self, key: str) -> Decimal:
        return self.ratio_value(key, self.get(key))

    def _levels(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list) or len(value) != HOSP_LEVELS:
            raise self.fail(key, f"must be an array of {HOSP_LEVELS} values (hosp_lv 1, 2, 3), got {value!r}")
        return value

    def money_levels(self, key: str) -> tuple[int, int, int]:
        a, b, c = (self.money_value(f"{key}[{i}]", v) for i, v in enumerate(self._levels(key)))
        return (a, b, c)

    def ratio_levels(self, key: str) -> tuple[Decimal, Decimal, Decimal]:
        a, b, c = (self.ratio_value(f"{key}[{i}]", v) for i, v in enumerate(self._levels(key)))
        return (a, b, c)

    def _map(self, key: str) -> Mapping[str, Any]:
        value = self.get(key)
        if not isinstance(value, dict) or not value:
            raise self.fail(key, "must be a non-empty table")
        for sub in value:
            if not sub.strip():
                raise self.fail(key, "keys must be non-empty")
        return value

    def money_map(self, key: str) -> dict[str, int]:
        return {k: self.money_value(f"{key}.{k}", v) for k, v in self._map(key).items()}

    def ratio_map(self, key: str) -> dict[str, Decimal]:
        return {k: self.ratio_value(f"{key}.{k}", v) for k, v in self._map(key).items()}

    def per_insutype_money(self, key: str) -> dict[str, int]:
        return {t: self.money(f"{key}.{t}") for t in INSUTYPES}

    def per_insutype_ratio(self, key: str) -> dict[str, Decimal]:
        return {t: self.ratio(f"{key}.{t}") for t in INSUTYPES}

    def bands(self, key: str) -> tuple[tuple[int, Decimal], ...]:
        value = self.get(key)
        if not isinstance(value, list) or not value:
            raise self.fail(key, "must be a non-empty array of [lower bound, ratio] pairs")
        bands: list[tuple[int, Decimal]] = []
        for i, pair in enumerate(value):
            item_key = f"{key}[{i}]"
            if not isinstance(pair, list) or len(pair) != 2:
                raise self.fail(item_key, f"must be a [lower bound, ratio] pair, got {pair!r}")
            lower = self.money_value(f"{item_key}[0]", pair[0])
            ratio = self.ratio_value(f"{item_key}[1]", pair[1])
            if not bands and lower != 0:
                raise self.fail(item_key, "the first band must start at 0 (measured above the deductible)")
            if bands and lower <= bands[-1][0]:
                raise self.fail(item_key, "band lower bounds must be strictly ascending")
            bands.append((lower, ratio))
        return tuple(bands)


def _frozen(mapping: Mapping[str, _V]) -> Mapping[str, _V]:
    """A read-only view: one Policy is shared by every settlement of its region."""
    return MappingProxyType(dict(mapping))


def _build_policy(region: str, table: Mapping[str, Any], version: str = BASE_VERSION) -> Policy:
    label = f"{region}@{version}"
    r = _Reader(region if version == BASE_VERSION else label, table)
    ratio_cut = r.ratio_map("cross_region.ratio_cut")
    for filing in FILING_TYPES:
        if filing not in ratio_cut:
            raise r.fail(f"cross_region.ratio_cut.{filing}", "missing")
    for name in ratio_cut:
        if name not in FILING_TYPES:
            raise r.fail(f"cross_region.ratio_cut.{name}", f"unknown filing type (expected one of {FILING_TYPES})")
    return Policy(
        region=region,
        name=r.text("name"),
        inpatient_deductible_fen=_frozen({t: r.money_levels(f"inpatient.deductible.{t}") for t in INSUTYPES}),
        inpatient_ratio=_frozen({t: r.ratio_levels(f"inpatient.ratio.{t}") for t in INSUTYPES}),
        retiree_bonus=r.ratio("inpatient.retiree_bonus"),
        ratio_ceiling=r.ratio("inpatient.ratio_ceiling"),
        basic_annual_cap_fen=_frozen(r.per_insutype_money("basic_annual_cap")),
        outpatient_deductible_fen=_frozen(r.per_insutype_money("outpatient.deductible")),
        outpatient_ratio=_frozen(r.per_insutype_ratio("outpatient.ratio")),
        outpatient_annual_cap_fen=_frozen(r.per_insutype_money("outpatient.annual_cap")),
        chronic_ratio=_frozen(r.per_insutype_ratio("chronic.ratio")),
        chronic_annual_cap_fen=_frozen(r.money_map("chronic.annual_cap")),
        critical_deductible_fen=r.money("critical.deductible"),
        critical_bands=r.bands("critical.bands"),
        critical_annual_cap_fen=r.money("critical.annual_cap"),
        supplementary_ratio=r.ratio("supplementary.ratio"),
        supplementary_annual_cap_fen=r.money("supplementary.annual_cap"),
        assistance_ratio=_frozen(r.ratio_map("assistance.ratio")),
        assistance_annual_cap_fen=r.money("assistance.annual_cap"),
        ratio_cut=_frozen(ratio_cut),
        version=label,
    )


def _split_versions(region: str, table: Mapping[str, Any]) -> tuple[dict[str, Any], dict[date, dict[str, Any]]]:
    """A table's own keys (the base version) and its dated sub-tables, each shape-checked."""
    base: dict[str, Any] = {}
    versions: dict[date, dict[str, Any]] = {}
    for key, value in table.items():
        if not _VERSION_RE.match(key):
            base[key] = value
            continue
        where = f"{region}@{key}"
        try:
            effective = date.fromisoformat(key)
        except ValueError:
            raise PolicyConfigError(where, "", "not a valid effective-from date (YYYY-MM-DD)") from None
        if not isinstance(value, dict):
            raise PolicyConfigError(where, "", "must be a table")
        if not value:
            raise PolicyConfigError(where, "", "a version must change at least one key")
        _check_shape(where, value, _SCHEMA, "")
        versions[effective] = value
    _check_shape(region, base, _SCHEMA, "")
    return base, versions


def _chain(base: Mapping[str, Any], versions: Mapping[date, Mapping[str, Any]], on: date) -> dict[str, Any]:
    """The table in force on ``on``: each version up to that date merged over the one before it."""
    merged = dict(base)
    for effective in sorted(versions):
        if effective <= on:
            merged = deep_merge(merged, versions[effective])
    return merged


class PolicyBook:
    """All regions' policies in every version, merged and validated once."""

    def __init__(self, default: Policy, regions: Mapping[str, Policy],
                 versions: Mapping[str, tuple[tuple[date, Policy], ...]] | None = None) -> None:
        self._default = default
        self._regions = dict(regions)
        # table -> its later versions (date ascending; the base version is `default` / `regions`)
        self._versions = dict(versions or {})

    @classmethod
    def load(cls, path: Path | None = None) -> PolicyBook:
        """Read and validate the policy file (default: ``policies.toml`` beside this module)."""
        source = path or DEFAULT_POLICY_PATH
        try:
            with source.open("rb") as f:
                raw = tomllib.load(f, parse_float=Decimal)
        except OSError as exc:
            raise PolicyConfigError("*", "", f"cannot read {source}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PolicyConfigError("*", "", f"{source} is not valid TOML: {exc}") from exc
        return cls.from_tables(raw)

    @classmethod
    def from_tables(cls, raw: Mapping[str, Any]) -> PolicyBook:
        """Build from already-parsed tables (yuan amounts as int/Decimal, as ``tomllib`` with Decimal floats)."""
        if DEFAULT_TABLE not in raw:
            raise PolicyConfigError(DEFAULT_TABLE, "", "missing [DEFAULT] table")
        split: dict[str, tuple[dict[str, Any], dict[date, dict[str, Any]]]] = {}
        for region, table in raw.items():
            if region != DEFAULT_TABLE and not _ADMDVS_RE.match(region):
                raise PolicyConfigError(region, "", "table name must be DEFAULT or a 6-digit admdvs code")
            if not isinstance(table, dict):
                raise PolicyConfigError(region, "", "must be a table")
            split[region] = _split_versions(region, table)
        default_base, default_versions = split[DEFAULT_TABLE]
        default = _build_policy(DEFAULT_TABLE, default_base)
        versions: dict[str, tuple[tuple[date, Policy], ...]] = {
            DEFAULT_TABLE: tuple((d, _build_policy(DEFAULT_TABLE, _chain(default_base, default_versions, d),
                                                   d.isoformat()))
                                 for d in sorted(default_versions)),
        }
        regions: dict[str, Policy] = {}
        for region, (base, own) in split.items():
            if region == DEFAULT_TABLE:
                continue
            regions[region] = _build_policy(region, deep_merge(default_base, base))
            # every date on which the region's own chain or [DEFAULT]'s changes starts a version
            dates = sorted(set(own) | set(default_versions))
            versions[region] = tuple(
                (d, _build_policy(region, deep_merge(_chain(default_base, default_versions, d),
                                                     _chain(base, own, d)), d.isoformat()))
                for d in dates
            )
        return cls(default, regions, versions)

    @property
    def default(self) -> Policy:
        return self._default

    @property
    def regions(self) -> tuple[str, ...]:
        """The admdvs codes that have their own table."""
        return tuple(sorted(self._regions))

    def versions(self, table: str) -> tuple[Policy, ...]:
        """Every version of a table (``DEFAULT`` or an admdvs code with its own table), oldest first."""
        base = self._default if table == DEFAULT_TABLE else self._regions[table]
        return (base, *(p for _, p in self._versions.get(table, ())))

    def effective_dates(self, table: str) -> tuple[date | None, ...]:
        """The effective-from date of each of ``versions(table)`` (None: in force since forever)."""
        return (None, *(d for d, _ in self._versions.get(table, ())))

    def for_region(self, insured_admdvs: str, pool_admdvs: str, on: date | None = None) -> Policy:
        """The exact admdvs table, else the pooling region's table, else ``[DEFAULT]``; in the version in
        force on ``on`` (the settlement date). Without ``on``: the version in force since forever."""
        if insured_admdvs in self._regions:
            table = insured_admdvs
        elif pool_admdvs in self._regions:
            table = pool_admdvs
        else:
            table = DEFAULT_TABLE
        base = self._default if table == DEFAULT_TABLE else self._regions[table]
        later = self._versions.get(table, ())
        if on is None or not later:
            return base
        i = bisect.bisect_right([d for d, _ in later], on)
        return later[i - 1][1] if i else base
