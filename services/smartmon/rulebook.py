"""The rules file of smart monitoring: loading and validation (pure: reads one file, no other I/O).

`rules.toml` holds the book's version, a history margin, and one table per rule: name, severity, version,
whether it is enabled, its parameters (every parameter the rule reads, with its default) and per-region
overrides keyed by the insured pool ("350300") or province ("350000"). A bad file raises `RuleBookError`
naming the rule and the field; the services let it stop their start-up.

    python -m services.smartmon.rulebook [PATH]   # check a file before deploying it
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, get_args

from schemas.monitoring import Severity

DEFAULT_RULES_PATH: Final = Path(__file__).with_name("rules.toml")

# Every rule the code implements, with the parameters it reads and their bounds (inclusive). A file must
# name exactly these parameters per rule: a typo is an error, not a silently ignored key.
PARAM_BOUNDS: Final[Mapping[str, Mapping[str, tuple[int, int]]]] = MappingProxyType({
    "OVERLAP_INPATIENT": {},
    "SPLIT_ADMISSION": {"readmit_days": (0, 366)},
    "OUTPATIENT_DURING_STAY": {},
    "FREQUENT_VISITS": {"max_visits": (1, 1000), "window_days": (1, 366)},
    "PHARMACY_OVERSUPPLY": {"max_supply_days": (1, 3660), "window_days": (1, 366)},
    "DUPLICATE_CHARGE": {"max_per_day": (1, 100)},
    "GENDER_RESTRICTED": {},
    "COST_OUTLIER": {"percentile": (1, 100), "window_days": (1, 366), "min_stays": (1, 1_000_000)},
})
# Parameters that are windows looking back in time: they set how much history the stream must keep.
WINDOW_PARAMS: Final = ("readmit_days", "window_days")

SEVERITIES: Final[tuple[str, ...]] = get_args(Severity)
_ADMDVS_RE: Final = re.compile(r"^[0-9]{6}$")
_RULE_KEYS: Final = frozenset({"name", "severity", "version", "enabled", "params", "overrides"})
_BOOK_KEYS: Final = frozenset({"version", "history_margin_days", "rules"})


class RuleBookError(ValueError):
    """The rules file is unusable; the message names the file, the rule and the field."""


@dataclass(frozen=True)
class Rule:
    rule_id: str
    name: str  # Chinese name, shown to hospitals (rule_name of 3101/3102) and reviewers
    severity: Severity
    version: int  # part of every jr_id: a changed rule produces new judgements
    enabled: bool
    params: Mapping[str, int]  # the defaults
    overrides: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # admdvs → changed params


@dataclass(frozen=True)
class RuleBook:
    version: str
    rules: Mapping[str, Rule]
    history_margin_days: int  # how late an episode may arrive and still be judged with its history
    # (rule_id, insured_admdvs) → merged parameters: the rules ask for them per episode and purchase, for
    # every event, and the book never changes. Bounded by the region table (at most a few thousand pools).
    _params: dict[tuple[str, str], Mapping[str, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def params(self, rule_id: str, insured_admdvs: str) -> Mapping[str, int]:
        """The rule's parameters for a person insured in `insured_admdvs`: pool beats province beats default."""
        key = (rule_id, insured_admdvs)
        found = self._params.get(key)
        if found is None:
            rule = self.rules[rule_id]
            merged = dict(rule.params)
            merged.update(rule.overrides.get(insured_admdvs[:2] + "0000", {}))
            merged.update(rule.overrides.get(insured_admdvs, {}))
            found = self._params[key] = MappingProxyType(merged)
        return found

    def enabled(self, rule_ids: Collection[str] | None = None) -> list[Rule]:
        """The enabled rules, restricted to `rule_ids` when given."""
        wanted = None if rule_ids is None else set(rule_ids)
        return [r for r in self.rules.values() if r.enabled and (wanted is None or r.rule_id in wanted)]


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuleBookError(f"{where}: must be an integer")
    if not lo <= value <= hi:
        raise RuleBookError(f"{where}: must be between {lo} and {hi}")
    return value


def _params(raw: object, rule_id: str, where: str, *, complete: bool) -> dict[str, int]:
    bounds = PARAM_BOUNDS[rule_id]
    if not isinstance(raw, dict):
        raise RuleBookError(f"{where}: must be a table")
    unknown = sorted(set(raw) - set(bounds))
    if unknown:
        raise RuleBookError(f"{where}.{unknown[0]}: unknown parameter (known: {', '.join(bounds) or 'none'})")
    missing = sorted(set(bounds) - set(raw)) if complete else []
    if missing:
        raise RuleBookError(f"{where}.{missing[0]}: missing (every parameter needs its default)")
    return {k: _int(v, f"{where}.{k}", *bounds[k]) for k, v in raw.items()}


def _rule(rule_id: str, raw: object, where: str) -> Rule:
    if rule_id not in PARAM_BOUNDS:
        raise RuleBookError(f"{where}: no such rule in the code (known: {', '.join(PARAM_BOUNDS)})")
    if not isinstance(raw, dict):
        raise RuleBookError(f"{where}: must be a table")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise RuleBookError(f"{where}.{unknown[0]}: unknown field")
    name = raw.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 50:
        raise RuleBookError(f"{where}.name: must be a text of 1 to 50 characters")
    severity = raw.get("severity")
    if severity not in SEVERITIES:
        raise RuleBookError(f"{where}.severity: must be one of {', '.join(SEVERITIES)}")
    version = _int(raw.get("version"), f"{where}.version", 1, 1_000_000)
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleBookError(f"{where}.enabled: must be true or false")
    params = _params(raw.get("params", {}), rule_id, f"{where}.params", complete=True)
    overrides_raw = raw.get("overrides", {})
    if not isinstance(overrides_raw, dict):
        raise RuleBookError(f"{where}.overrides: must be a table keyed by admdvs")
    overrides: dict[str, Mapping[str, int]] = {}
    for admdvs, changed in overrides_raw.items():
        if not _ADMDVS_RE.match(admdvs):
            raise RuleBookError(f"{where}.overrides.{admdvs}: key must be a 6-digit pool or province code")
        overrides[admdvs] = MappingProxyType(_params(changed, rule_id, f"{where}.overrides.{admdvs}",
                                                     complete=False))
    return Rule(rule_id, name, severity, version, enabled, MappingProxyType(params),  # type: ignore[arg-type]
                MappingProxyType(overrides))


def parse_rules(text: str, source: str = "rules.toml") -> RuleBook:
    """Validate the text of a rules file; errors start with `source`."""
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleBookError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - _BOOK_KEYS)
    if unknown:
        raise RuleBookError(f"{source}: {unknown[0]}: unknown field")
    version = raw.get("version")
    if not isinstance(version, str) or not 1 <= len(version) <= 40:
        raise RuleBookError(f"{source}: version: must be a text of 1 to 40 characters")
    margin = _int(raw.get("history_margin_days"), f"{source}: history_margin_days", 0, 366)
    rules_raw = raw.get("rules")
    if not isinstance(rules_raw, dict) or not rules_raw:
        raise RuleBookError(f"{source}: rules: at least one [rules.<RULE_ID>] table is needed")
    rules = {rid: _rule(rid, body, f"{source}: rule {rid}") for rid, body in rules_raw.items()}
    return RuleBook(version, MappingProxyType(rules), margin)


def load_rules(path: Path | None = None) -> RuleBook:
    """The rule book in `path` (default: `services/smartmon/rules.toml`); `RuleBookError` when unusable."""
    path = path or DEFAULT_RULES_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleBookError(f"{path}: cannot read the rules file: {exc}") from None
    return parse_rules(text, str(path.name))


def main(argv: Sequence[str] | None = None) -> int:
    """Check a rules file before deploying it: its rules and parameters, or the first error."""
    parser = argparse.ArgumentParser(description="Check a smart-monitoring rules file.")
    parser.add_argument("path", type=Path, nargs="?", default=DEFAULT_RULES_PATH)
    args = parser.parse_args(argv)
    try:
        book = load_rules(args.path)
    except RuleBookError as exc:
        print(f"rules file refused: {exc}", file=sys.stderr)
        return 1
    print(f"rules {book.version}: {len(book.rules)} rule(s)")
    for rule in book.rules.values():
        params = ", ".join(f"{k}={v}" for k, v in rule.params.items()) or "-"
        overrides = "; ".join(f"{a}: " + ", ".join(f"{k}={v}" for k, v in o.items())
                              for a, o in sorted(rule.overrides.items()))
        state = "" if rule.enabled else " (disabled)"
        print(f"  {rule.rule_id} v{rule.version} {rule.severity} {rule.name}{state}: {params}"
              + (f" [overrides {overrides}]" if overrides else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
