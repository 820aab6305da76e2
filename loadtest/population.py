"""Shared by the demo and the benchmark: reference data, scenarios, the stay driver, statistics.

- `ensure_refdata`: generate the reference data into `.state/refdata/` (only when the
  directory is missing or was generated with another seed/size) and load it into
  PostgreSQL (idempotent: a second load changes nothing and is fast).
- `load_population`: the hospitals, persons, filings and catalog items of that
  dataset as PostgreSQL has them now (filings include those the router created on
  the spot), indexed for picking scenarios.
- `Population.scenario`: one visit to drive — general outpatient (most), chronic
  outpatient, inpatient stay or pharmacy purchase (`KIND_WEIGHTS`; the benchmark asks
  for inpatient only) — at a treating hospital or pharmacy and a person where one of
  them belongs to the five seed regions, with a scope drawn by weight (local /
  intra_province / cross_province), fee items of the treating province's catalog, and
  the filing situation: filed, or promise flag (承诺制), or a declared emergency, or (a
  few) unfiled — those are refused with FILING_REQUIRED at pre-settlement, as expected.
- `drive_stay`, each request after the previous answer, a TIMEOUT answer resent with
  the same msgid (the broker returns the stored result):
  inpatient  2401 → 2301 ×1–2 → 2402 → 2303 → 2304 (→ 2305 (→ 2304 again))
  outpatient 2201 (→ 2203 for chronic, med_type 14) → 2204 → 2206 → 2207 (→ 2208 (→ 2207 again))
  pharmacy   2101 → 2102 (→ 2103)
- `Stats`: latencies per transaction, outcomes, settlements seen, for progress lines
  and summaries.

Nothing here prints personal identifiers; psn_no never leaves this module except in
the envelopes themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

import asyncpg

from loadtest.his import FeeLine, Hospital, OutpatientVisit, Purchase, Signer, SignInFailed, Stay, simulator_signer
from schemas.codes import SCOPES, Scope
from schemas.refdata import CATALOG_FILE, FILINGS_FILE, HOSPITALS_FILE, PERSONS_FILE, RefDataSet, certno_gender
from services.common import audit
from services.common.config import Settings, settings_env
from services.common.response import SHANGHAI
from services.common.shards import ShardPools
from services.refdata import generate as generate_module
from services.refdata.generate import generate, write_jsonl
from services.refdata.load import load_dataset, read_dir
from services.refdata.regions import SEED_REGIONS, classify_scope, region_of
from services.refdata.store import Filing, filing_in_force

DEFAULT_SEED: Final = 7
DEFAULT_PERSONS_PER_REGION: Final = 1000
STAMP_FILE: Final = "generated-with.json"
NATIONAL_PERSONS_MIN: Final = 13_000_000  # the seed regions' insured persons (REFERENCE §10), about
SCOPE_WEIGHTS: Final[dict[Scope, float]] = {"local": 0.5, "intra_province": 0.2, "cross_province": 0.3}
# For non-local care of a person without a filing in force: promise flag / declared emergency / nothing.
PROMISE_SHARE: Final = 0.85
EMERGENCY_SHARE: Final = 0.05
REVERSAL_SHARE: Final = 0.10
RESETTLE_SHARE: Final = 0.5  # of the reversed stays, settled again afterwards
# Of the reversals, sent as a correction (2601) of the settlement instead: a hospital unsure of its answer.
CORRECTION_SHARE: Final = 0.3
# Visits whose hospital reads the settlement back (5203 by setl_id), as one that lost the answer does.
QUERY_SHARE: Final = 0.05
ACCOUNT_SHARE: Final = 0.5  # employees asking to pay the personal part from their account
# Mirrors the router (services.router.logic): how long a filing made on the spot stays valid.
PROMISE_FILING_DAYS: Final = 180
EMERGENCY_FILING_DAYS: Final = 90
STAY_DAYS: Final = 3  # loadtest.his.Stay: discharge = admission + 3 days, settlement 1 h later, reversal 2 h
# The day's mix of visits (REFERENCE §7: outpatient far outnumbers inpatient; pharmacy is a large share).
KIND_WEIGHTS: Final[dict[str, float]] = {"outpatient": 0.55, "chronic": 0.1, "inpatient": 0.2, "pharmacy": 0.15}
INPATIENT_ONLY: Final[dict[str, float]] = {"inpatient": 1.0}
# The national mix of cross-province visits, Q1 2025 (REFERENCE §7, millions of person-times): the open-loop
# benchmark's default.
NATIONAL_MIX: Final[dict[str, float]] = {"outpatient": 45.16, "pharmacy": 18.87, "inpatient": 3.64, "chronic": 3.08}
# Share of the national mix's visits that start with a person look-up (1101: the hospital reads the card
# first). An assumption: no public figure gives the share.
LOOKUP_SHARE: Final = 0.3
# Fee items per visit, (fewest, most) by kind: today's counts, and a national-mix estimate of real bills (an
# inpatient stay bills drugs, tests and services every day, uploaded in daily batches of at most
# UPLOAD_LINES_MAX lines; an outpatient visit a prescription and a few services).
ITEMS_TODAY: Final[dict[str, tuple[int, int]]] = {"inpatient": (3, 15), "pharmacy": (1, 4), "outpatient": (1, 5),
                                                   "chronic": (1, 5)}
ITEMS_NATIONAL: Final[dict[str, tuple[int, int]]] = {"inpatient": (15, 60), "pharmacy": (1, 5),
                                                      "outpatient": (2, 8), "chronic": (2, 6)}
UPLOAD_LINES_MAX: Final = 20
# Per kind: (pre-settlement, settlement, reversal) transaction numbers.
SETTLEMENT_INFNOS: Final[dict[str, tuple[str, str, str]]] = {
    "inpatient": ("2303", "2304", "2305"), "outpatient": ("2206", "2207", "2208"),
    "chronic": ("2206", "2207", "2208"), "pharmacy": ("2101", "2102", "2103"),
}
PRE_INFNOS: Final = frozenset(k[0] for k in SETTLEMENT_INFNOS.values())
SETTLE_INFNOS: Final = frozenset(k[1] for k in SETTLEMENT_INFNOS.values())
REVERSE_INFNOS: Final = frozenset(k[2] for k in SETTLEMENT_INFNOS.values())

# Seeded suspicious behaviour (smart monitoring, REFERENCE §8): with `Population.suspicious_share` s, a person
# shows the behaviour of rule i when its side draw falls in [i·s, (i+1)·s) — s of the persons for each rule.
SUSPICIOUS_RULES: Final = ("OVERLAP_INPATIENT", "SPLIT_ADMISSION", "OUTPATIENT_DURING_STAY", "FREQUENT_VISITS",
                           "PHARMACY_OVERSUPPLY", "DUPLICATE_CHARGE", "GENDER_RESTRICTED", "COST_OUTLIER")
SUSPICIOUS_SHARE: Final = 0.01  # the demo's and the benchmark's default, for each rule
SPLIT_GAP_DAYS: Final = 7  # readmission after the discharge (the rule looks 15 days back)
FREQUENT_VISITS_SEEDED: Final = 10  # outpatient visits within about 5 days (the rule: more than 8 in 7)
OVERSUPPLY_DAYS_PER_PURCHASE: Final = 50  # two purchases: 100 days of one drug within 8 days (the rule: 90 in 30)
SUPPLY_DAYS_PER_VISIT: Final = 30  # an ordinary purchase: about a month of a drug of several days per unit
# COST_OUTLIER compares a stay with the 99th percentile of its group's stays discharged in the 30 days before
# (at least 50): one seeded outlier per this many ordinary stays added to its group, so that the percentile
# of its peers is an ordinary stay's.
COST_GROUP_STAYS: Final = 60
COMPANIONS_AT_ONCE: Final = 8  # a cost group's ordinary stays (other persons) driven this many at a time
EXPENSIVE_UNITS: Final = 60  # the expensive stay: 60 units of 4,000–6,000 yuan on top of an ordinary bill


def suspicious_rule(seed: int, psn_no: str, share: float) -> str | None:
    """The rule whose behaviour the person shows in the demo and the benchmark, or None (most persons): a draw
    of its own, from the reference-data seed and the psn_no, so that no scenario draw shifts."""
    if share <= 0:
        return None
    if share * len(SUSPICIOUS_RULES) > 1:
        raise ValueError(f"suspicious share must be at most 1/{len(SUSPICIOUS_RULES)}")
    i = int(random.Random(f"{seed}|suspicious|{psn_no}").random() // share)
    return SUSPICIOUS_RULES[i] if i < len(SUSPICIOUS_RULES) else None


class PipelineUnavailable(RuntimeError):
    """The stack does not answer (gateway, Kafka or PostgreSQL): the message says what to do."""


class TransportError(RuntimeError):
    """The request could not be delivered (connection refused, broker gone)."""


# Reference data -----------------------------------------------------------------------


def refdata_dir(s: Settings) -> Path:
    return s.state_dir / "refdata"


def generate_if_needed(out_dir: Path, seed: int, persons_per_region: int) -> bool:
    """Generate the four files unless `out_dir` already holds them for this seed and size."""
    # The generator's own source is part of the stamp: a changed generator regenerates the files.
    source = Path(generate_module.__file__ or "").read_bytes()
    wanted = {"seed": seed, "persons_per_region": persons_per_region,
              "generator": hashlib.sha256(source).hexdigest()[:16]}
    stamp = out_dir / STAMP_FILE
    try:
        if json.loads(stamp.read_text()) == wanted and all(
            (out_dir / name).is_file() for name in (HOSPITALS_FILE, PERSONS_FILE, FILINGS_FILE, CATALOG_FILE)
        ):
            return False
    except (OSError, ValueError):
        pass
    write_jsonl(generate(seed, persons_per_region), out_dir)
    stamp.write_text(json.dumps(wanted) + "\n")
    return True


def tool_operator(tool: str) -> str:
    """Who a load tool's reference-data loads are audited under: XS_OPERATOR, else the tool itself."""
    return audit.check_operator(os.environ.get(audit.OPERATOR_ENV) or tool)


async def ensure_refdata(
    s: Settings, *, seed: int = DEFAULT_SEED, persons_per_region: int = DEFAULT_PERSONS_PER_REGION,
    out_dir: Path | None = None, operator: str | None = None,
) -> tuple[RefDataSet, dict[str, Any]]:
    """Generate (if needed) and load the reference data (audited under `operator`, default
    `tool_operator("loadtest")`); returns the dataset and what happened."""
    directory = out_dir or refdata_dir(s)
    started = time.perf_counter()
    generated = generate_if_needed(directory, seed, persons_per_region)
    dataset = read_dir(directory)
    try:
        conn = await asyncpg.connect(s.pg_dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        raise PipelineUnavailable(
            f"PostgreSQL is not reachable at 127.0.0.1:{s.pg_port} ({type(e).__name__}); "
            "start the stack: .venv/bin/python -m deploy.stack start"
        ) from None
    try:
        counts = await load_dataset(conn, dataset, operator=operator or tool_operator("loadtest"))
    finally:
        await conn.close()
    changed = sum(n for k, n in counts.items() if k.endswith("_changed"))
    info = {
        "dir": str(directory), "generated": generated, "changed_rows": changed,
        "hospitals": len(dataset.hospitals), "persons": len(dataset.persons), "filings": len(dataset.filings),
        "catalog": len(dataset.catalog), "seconds": time.perf_counter() - started,
    }
    return dataset, info


# Population and scenarios ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HospitalInfo:
    his: Hospital
    admdvs: str
    hosp_lv: int
    prov: str
    pool: str


@dataclass(frozen=True, slots=True)
class PersonInfo:
    psn_no: str
    insuplc: str
    insutype: str
    chronic: tuple[str, ...] = ()
    gend: str = ""  # "1" male / "2" female from the dataset's certificate, "" unknown


@dataclass(frozen=True, slots=True)
class CatalogInfo:
    code: str
    lv: str
    ceiling_fen: int | None
    # The catalog's monitoring fields (hub migration 0009): billable once a day, one gender only, days per unit.
    once_per_day: bool = False
    gender_only: str = ""
    supply_days: Decimal = Decimal(1)


@dataclass
class Scenario:
    kind: str  # inpatient | outpatient | chronic | pharmacy
    hospital: HospitalInfo
    person: PersonInfo
    scope: Scope
    filing: str  # "local" | "filed" | "promise" | "emergency" | "unfiled"
    uploads: list[list[FeeLine]]
    reverse: bool
    resettle: bool  # after the reversal, settle the visit again (a corrected settlement)
    use_account: bool
    start: datetime
    # Called when the first request is accepted: the router has then made the filing on the spot (if any).
    on_admitted: Callable[[], None] | None = None
    chronic_disease: str | None = None
    lookup: bool = False  # a person look-up (1101) before the first request of the visit
    correct: bool = False  # the reversal is a correction (2601) of the settlement's msgid
    query: bool = False  # after the settlement, 5203 reads it back by setl_id
    # Seeded suspicious behaviour (smart monitoring): the rule it should hit, and the visits that make it up,
    # driven one after the other after this one (`drive_stay`); their persons are busy until `release`.
    behaviour: str | None = None
    companions: list[Scenario] = field(default_factory=list)
    expensive: bool = False  # the seeded COST_OUTLIER stay

    @property
    def expect_refusal(self) -> str | None:
        return "FILING_REQUIRED" if self.filing == "unfiled" else None

    def stay(self) -> Stay:
        return Stay(
            self.hospital.his, self.person.psn_no, self.person.insuplc, self.person.insutype, self.start,
            promise_filing=self.filing == "promise", use_account=self.use_account,
        )

    def outpatient(self) -> OutpatientVisit:
        return OutpatientVisit(
            self.hospital.his, self.person.psn_no, self.person.insuplc, self.person.insutype, self.start,
            med_type="14" if self.kind == "chronic" else "11", chronic_disease=self.chronic_disease,
            use_account=self.use_account, promise_filing=self.filing == "promise",
        )

    def purchase(self) -> Purchase:
        return Purchase(
            self.hospital.his, self.person.psn_no, self.person.insuplc, self.person.insutype, self.start,
            self.uploads[0], use_account=self.use_account, promise_filing=self.filing == "promise",
        )


def shanghai_now() -> datetime:
    return datetime.now(SHANGHAI).replace(tzinfo=None)


def fee_lines(rng: random.Random, items: Sequence[CatalogInfo], n: int) -> list[FeeLine]:
    """n fee lines with plausible unit prices (2 decimals) and integer counts."""
    lines = []
    for item in rng.sample(items if isinstance(items, list) else list(items), min(n, len(items))):
        if item.ceiling_fen is not None:  # around the ceiling: sometimes above it (overlmt_selfpay)
            pric_fen = int(item.ceiling_fen * rng.uniform(0.7, 1.15))
            cnt = rng.randint(1, 3) if item.code.startswith("C") else rng.randint(1, 6)
        elif item.code.startswith("X"):  # 西药
            pric_fen, cnt = rng.randint(200, 12_000), rng.randint(1, 20)
        elif item.code.startswith("Z"):  # 中成药, 制剂
            pric_fen, cnt = rng.randint(1_000, 20_000), rng.randint(1, 10)
        elif item.code.startswith("C"):  # 耗材
            pric_fen, cnt = rng.randint(500, 30_000), rng.randint(1, 4)
        else:  # 医疗服务
            pric_fen, cnt = rng.randint(500, 60_000), rng.randint(1, 5)
        lines.append(FeeLine(item.code, Decimal(usual_cnt(item, cnt)), Decimal(max(pric_fen, 1)).scaleb(-2)))
    return lines


def usual_cnt(item: CatalogInfo, cnt: int) -> int:
    """What an honest visit bills of the item (the draw itself is kept, so no later draw shifts): an item
    billable once a day once, a drug of several days per unit about a month's supply at most."""
    if item.once_per_day:
        return 1
    if item.supply_days > 1:
        return min(cnt, max(1, int(SUPPLY_DAYS_PER_VISIT // item.supply_days)))
    return cnt


def usual_items(items: Sequence[CatalogInfo]) -> list[CatalogInfo]:
    """The items an honest visit draws from: none restricted to one gender (the scenarios do not know every
    person's gender; the seeded GENDER_RESTRICTED behaviour bills them on purpose)."""
    return [c for c in items if not c.gender_only]


class Population:
    """What scenarios are drawn from. `busy` persons (in a stay now) are never picked twice at once."""

    def __init__(self, hospitals: list[HospitalInfo], persons: list[PersonInfo],
                 filings: dict[str, list[Filing]], catalog: dict[str, list[CatalogInfo]], *,
                 seed: int = DEFAULT_SEED, suspicious_share: float = 0.0) -> None:
        usable = [h for h in hospitals if len(catalog.get(h.prov, ())) >= 3]
        self.hospitals = [h for h in usable if not h.his.fixmedins_code.startswith("P")]
        self.pharmacies = [h for h in usable if h.his.fixmedins_code.startswith("P")]
        self.persons = persons
        self.filings = filings
        self.catalog = catalog
        self.busy: set[str] = set()
        self._usual: dict[tuple[str, bool], list[CatalogInfo]] = {}
        # Seeded suspicious behaviour: each person's rule is drawn from `seed` and the psn_no alone
        # (`suspicious_rule`), shown once per run (the first time the person is picked); 0: none.
        self.seed = seed
        self.suspicious_share = suspicious_share
        self.seeded: Counter[str] = Counter()  # behaviours handed out, by rule
        self.seeded_persons: dict[str, str] = {}  # psn_no → the rule its behaviour should hit
        self.planned_visits: Counter[str] = Counter()  # the behaviours' extra visits, by rule
        # COST_OUTLIER's groups (hospital level, province): ordinary stays added this run, and outliers.
        self.cost_fillers: Counter[tuple[int, str]] = Counter()
        self.outliers: Counter[tuple[int, str]] = Counter()
        self.cost_group_stays = COST_GROUP_STAYS
        groups: dict[str, list[PersonInfo]] = defaultdict(list)
        for p in persons:
            groups[p.insuplc].append(p)
        self.groups = dict(groups)
        # (hospital, insured region) pairs per scope, where the hospital or the insured region is a seed region.
        self.pairs = self._pairs(self.hospitals)
        self.pharmacy_pairs = self._pairs(self.pharmacies)
        self.scopes = [s for s in SCOPES if self.pairs[s]]
        if not self.scopes:
            raise ValueError("no hospital/person pairs: is the reference data loaded?")

    def _pairs(self, places: list[HospitalInfo]) -> dict[Scope, list[tuple[HospitalInfo, str]]]:
        pairs: dict[Scope, list[tuple[HospitalInfo, str]]] = {scope: [] for scope in SCOPES}
        for h in places:
            for insuplc in self.groups:
                if h.admdvs in SEED_REGIONS or insuplc in SEED_REGIONS:
                    pairs[classify_scope(insuplc, h.admdvs)].append((h, insuplc))
        return pairs

    def __len__(self) -> int:
        return len(self.persons)

    def probe_pair(self) -> tuple[HospitalInfo, PersonInfo]:
        """A local pair whose person is the last of its region in the dataset (the newest row)."""
        for h, insuplc in self.pairs["local"] or [p for s in self.scopes for p in self.pairs[s]]:
            return h, self.groups[insuplc][-1]
        raise ValueError("no pair to probe with")

    def filing_status(self, person: PersonInfo, treating_prov: str, on: date) -> bool:
        return filing_in_force(self.filings.get(person.psn_no, ()), on, treating_prov) is not None

    def scenario(self, rng: random.Random, *, reversal_share: float = REVERSAL_SHARE,
                 now: datetime | None = None, kinds: dict[str, float] = KIND_WEIGHTS,
                 items: dict[str, tuple[int, int]] = ITEMS_TODAY, lookup_share: float = 0.0) -> Scenario | None:
        """A new visit, its person marked busy (call `release` when done); None when every pick was busy.
        `items`: fee items per kind; `lookup_share`: visits starting with a 1101 look-up."""
        for _ in range(20):
            kind = rng.choices(list(kinds), list(kinds.values()))[0]
            pairs = self.pharmacy_pairs if kind == "pharmacy" else self.pairs
            scopes = [s for s in SCOPES if pairs[s]] or self.scopes
            if kind == "pharmacy" and not any(pairs.values()):
                kind, pairs = "outpatient", self.pairs
            scope = rng.choices(scopes, [SCOPE_WEIGHTS[s] for s in scopes])[0]
            hospital, insuplc = rng.choice(pairs[scope])
            candidates = self.groups[insuplc]
            if kind == "chronic":
                candidates = [p for p in candidates if p.chronic] or candidates
            person = rng.choice(candidates)
            if kind == "chronic" and not person.chronic:
                kind = "outpatient"
            if person.psn_no in self.busy:
                continue
            self.busy.add(person.psn_no)
            if kind == "inpatient":
                # Admission 3 days + a bit ago, so the settlement (admission + 3 d + 1 h) and a reversal
                # (+ 2 h) are just past: the broker refuses inf_time more than a few minutes ahead.
                start = (now or shanghai_now()) - timedelta(days=STAY_DAYS, hours=2, minutes=rng.randint(1, 600))
                settle_day = (start + timedelta(days=STAY_DAYS, hours=1)).date()
            else:
                start = (now or shanghai_now()) - timedelta(minutes=rng.randint(5, 60))
                settle_day = start.date()
            start = start.replace(microsecond=0)
            filing = "local"
            on_admitted = None
            if scope != "local":
                if self.filing_status(person, hospital.prov, settle_day):
                    filing = "filed"
                else:
                    roll = rng.random()
                    filing = ("promise" if roll < PROMISE_SHARE
                              else "emergency" if roll < PROMISE_SHARE + EMERGENCY_SHARE else "unfiled")
                    if filing == "emergency" and kind != "inpatient":
                        filing = "promise"  # a declared emergency is an inpatient admission's flag
                    if filing != "unfiled":
                        on_admitted = partial(self._remember_spot_filing, person, hospital.prov, filing,
                                              start.date())
            reverse = rng.random() < reversal_share
            # Drawn apart from `rng`, so that a seed's visits stay what they were before these two existed.
            side = random.Random(f"{person.psn_no}|{start.isoformat()}")
            correct, query = reverse and side.random() < CORRECTION_SHARE, side.random() < QUERY_SHARE
            catalog_items = self._usual_items(hospital.prov, pharmacy=kind == "pharmacy")
            lines = fee_lines(rng, catalog_items, rng.randint(*items[kind]))
            if items is ITEMS_TODAY:
                uploads = [lines] if len(lines) <= 8 or rng.random() < 0.5 else [lines[: len(lines) // 2],
                                                                                  lines[len(lines) // 2:]]
            else:
                uploads = [lines[i:i + UPLOAD_LINES_MAX] for i in range(0, len(lines), UPLOAD_LINES_MAX)]
            scn = Scenario(
                kind=kind, hospital=hospital, person=person, scope=scope, filing=filing, uploads=uploads,
                reverse=reverse, resettle=reverse and kind != "pharmacy" and rng.random() < RESETTLE_SHARE,
                use_account=person.insutype == "310" and rng.random() < ACCOUNT_SHARE, start=start,
                on_admitted=on_admitted, chronic_disease=rng.choice(person.chronic) if kind == "chronic" else None,
                lookup=rng.random() < lookup_share, correct=correct, query=query,
            )
            # Shown at a visit that is not a stay: a stay of the last 3 days would hold the behaviour's
            # backdated visits and add judgements of other rules.
            rule = suspicious_rule(self.seed, person.psn_no, self.suspicious_share)
            if rule is not None and kind != "inpatient" and person.psn_no not in self.seeded_persons:
                self.seed_behaviour(scn, rule, now=now)
            return scn
        return None

    def _usual_items(self, prov: str, *, pharmacy: bool) -> list[CatalogInfo]:
        """usual_items of the province's catalog (a pharmacy's: its drugs), filtered once per province."""
        key = (prov, pharmacy)
        items = self._usual.get(key)
        if items is None:
            items = usual_items(self.catalog[prov])
            if pharmacy:
                items = [c for c in items if c.code[:1] in "XZ"] or items  # drugs
            self._usual[key] = items
        return items

    def release(self, scenario: Scenario) -> None:
        self.busy.discard(scenario.person.psn_no)
        for visit in scenario.companions:
            self.busy.discard(visit.person.psn_no)

    # Seeded suspicious behaviour ------------------------------------------------------------------------

    def reset_seeding(self) -> None:
        """Forget the behaviours shown so far (after drawing scenarios that are not driven)."""
        self.seeded.clear()
        self.seeded_persons.clear()
        self.planned_visits.clear()
        self.cost_fillers.clear()
        self.outliers.clear()

    def seed_behaviour(self, scn: Scenario, rule: str, *, now: datetime | None = None) -> bool:
        """Attach to `scn` the visits of its person that make up `rule`'s behaviour (REFERENCE §8), drawn from
        a side stream of the person and the visit time, so that the scenario stream itself never shifts.
        False when this population cannot show it now (no second hospital, no flagged catalog item, gender
        unknown, no cost group with room): the person may show it when picked again."""
        now = (now or shanghai_now()).replace(microsecond=0)
        side = random.Random(f"{scn.person.psn_no}|{scn.start.isoformat()}|{rule}")
        visits = _PLANS[rule](self, scn.person, side, now)
        if visits is None:
            return False
        scn.behaviour, scn.companions = rule, visits
        self.seeded[rule] += 1
        self.planned_visits[rule] += len(visits)
        self.seeded_persons[scn.person.psn_no] = rule
        return True

    def _places(self, insuplc: str, *, pharmacy: bool = False) -> list[HospitalInfo]:
        """Institutions a person insured in `insuplc` is treated at in the scenarios, local ones first."""
        pairs = self.pharmacy_pairs if pharmacy else self.pairs
        return list({h.his.fixmedins_code: h for scope in SCOPES for h, i in pairs[scope] if i == insuplc}.values())

    def _visit(self, kind: str, hospital: HospitalInfo, person: PersonInfo, start: datetime,
               uploads: list[list[FeeLine]], today: date) -> Scenario:
        """One visit of a seeded behaviour: never reversed; filed, or the promise flag (the router checks the
        filing on the day the request is sent — `today` — whatever the visit's own, earlier date)."""
        scope = classify_scope(person.insuplc, hospital.admdvs)
        filing, on_admitted = "local", None
        if scope != "local":
            filing = "filed" if self.filing_status(person, hospital.prov, today) else "promise"
            if filing == "promise":
                on_admitted = partial(self._remember_spot_filing, person, hospital.prov, "promise", today)
        self.busy.add(person.psn_no)
        return Scenario(kind=kind, hospital=hospital, person=person, scope=scope, filing=filing, uploads=uploads,
                        reverse=False, resettle=False, use_account=False, start=start, on_admitted=on_admitted)

    def _lines(self, side: random.Random, hospital: HospitalInfo, kind: str) -> list[FeeLine]:
        items = usual_items(self.catalog[hospital.prov])
        if kind == "pharmacy":
            items = [c for c in items if c.code[:1] in "XZ"] or items
        return fee_lines(side, items, side.randint(*ITEMS_TODAY[kind]))

    def _stay_start(self, side: random.Random, now: datetime) -> datetime:
        """An admission whose discharge, settlement and reversal times are all past (as `scenario` does)."""
        return now - timedelta(days=STAY_DAYS, hours=2, minutes=side.randint(1, 600))

    def _plan_overlap(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        places = self._places(person.insuplc)
        if len(places) < 2:
            return None
        first, second = side.sample(places, 2)
        start = self._stay_start(side, now)
        # The second stay began a day before the first: two days in two hospitals at once.
        return [self._visit("inpatient", h, person, at, [self._lines(side, h, "inpatient")], now.date())
                for h, at in ((first, start), (second, start - timedelta(days=1)))]

    def _plan_split(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        places = self._places(person.insuplc)
        if not places:
            return None
        h = side.choice(places)
        start = self._stay_start(side, now)
        # Same hospital, same main diagnosis (its main_diagnosis), readmitted 7 days after the discharge.
        gap = timedelta(days=STAY_DAYS + SPLIT_GAP_DAYS)
        return [self._visit("inpatient", h, person, at, [self._lines(side, h, "inpatient")], now.date())
                for at in (start - gap, start)]

    def _plan_during_stay(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        places = self._places(person.insuplc)
        pharmacies = self._places(person.insuplc, pharmacy=True)
        if not places:
            return None
        h = side.choice(places)
        start = self._stay_start(side, now)
        stay = self._visit("inpatient", h, person, start, [self._lines(side, h, "inpatient")], now.date())
        kind = "pharmacy" if pharmacies and side.random() < 0.5 else "outpatient"
        others = [p for p in (pharmacies if kind == "pharmacy" else places) if p is not h]
        if not others:
            return None
        other = side.choice(others)
        at = start + timedelta(days=1, hours=side.randint(1, 20))  # inside the stay, at another institution
        return [stay, self._visit(kind, other, person, at, [self._lines(side, other, kind)], now.date())]

    def _plan_frequent(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        places = self._places(person.insuplc)
        if not places:
            return None
        visits = []
        for i in range(FREQUENT_VISITS_SEEDED):  # every 14 hours: 10 visits within 5 days and a quarter
            h = side.choice(places)
            at = now - timedelta(hours=14 * i + 1, minutes=side.randint(0, 50))
            visits.append(self._visit("outpatient", h, person, at, [self._lines(side, h, "outpatient")], now.date()))
        return visits

    def _plan_oversupply(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        pharmacies = self._places(person.insuplc, pharmacy=True)
        if not pharmacies:
            return None
        first, second = side.sample(pharmacies, 2) if len(pharmacies) > 1 else (pharmacies[0], pharmacies[0])
        sold_at_second = {c.code for c in self.catalog[second.prov]}  # a provincial item is sold in its province
        drugs = [c for c in self.catalog[first.prov]
                 if c.code[:1] in "XZ" and not c.gender_only and c.code in sold_at_second]
        if not drugs:
            return None
        drug = side.choice([c for c in drugs if c.supply_days > 1] or drugs)
        # Each purchase about 50 days' supply: two within 8 days are over the 90 days a month allows.
        cnt = Decimal(math.ceil(OVERSUPPLY_DAYS_PER_PURCHASE / drug.supply_days))
        visits = []
        for p, days_ago in ((first, 10), (second, 2)):
            line = fee_lines(side, [drug], 1)[0]
            at = now - timedelta(days=days_ago, minutes=side.randint(1, 600))
            visits.append(self._visit("pharmacy", p, person, at, [[FeeLine(drug.code, cnt, line.pric)]], now.date()))
        return visits

    def _plan_duplicate(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        places = self._places(person.insuplc)
        if not places:
            return None
        h = side.choice(places)
        daily = [c for c in self.catalog[h.prov] if c.once_per_day and not c.gender_only]
        if not daily:
            return None
        item = side.choice(daily)
        lines = [line for line in self._lines(side, h, "inpatient") if line.med_list_codg != item.code]
        twice = fee_lines(side, [item], 1)[0]
        lines += [FeeLine(item.code, Decimal(1), twice.pric), FeeLine(item.code, Decimal(1), twice.pric)]
        # All of a stay's fees are dated admission + 1 h (loadtest.his.Stay.upload): twice on one day.
        return [self._visit("inpatient", h, person, self._stay_start(side, now), [lines], now.date())]

    def _plan_gender(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        places = self._places(person.insuplc)
        if person.gend not in ("1", "2") or not places:
            return None
        h = side.choice(places)
        other = "2" if person.gend == "1" else "1"
        restricted = [c for c in self.catalog[h.prov] if c.gender_only == other]
        if not restricted:
            return None
        lines = self._lines(side, h, "outpatient") + fee_lines(side, [side.choice(restricted)], 1)
        at = now - timedelta(hours=1, minutes=side.randint(0, 300))
        return [self._visit("outpatient", h, person, at, [lines], now.date())]

    def _plan_cost(self, person: PersonInfo, side: random.Random, now: datetime) -> list[Scenario] | None:
        """A stay costing many times the usual, discharged today, in a (hospital level, province) group whose
        stays of the 30 days before (the rule's peers: earlier days only) are ordinary: the first such plan of
        a run adds `cost_group_stays` ordinary stays of other persons there, discharged 4–28 days ago, and
        each of them makes room for one outlier (a percentile of ordinary stays, not of outliers)."""
        places = self._places(person.insuplc)
        room = [h for h in places if self.cost_fillers[self._group(h)]
                >= self.cost_group_stays * (self.outliers[self._group(h)] + 1)]
        fillers: list[Scenario] | None = []
        if room:
            h = side.choice(room)
        elif self.cost_fillers or not places:
            return None  # this run's filled group has no room left: the person may show it another run
        else:
            h = side.choice(places)
            fillers = self._cost_fillers(h, person, side, now)
        if fillers is None:
            return None
        self.outliers[self._group(h)] += 1
        items = usual_items(self.catalog[h.prov])
        item = side.choice([c for c in items if c.ceiling_fen is None and not c.once_per_day
                            and not c.supply_days > 1] or items)
        lines = [line for line in self._lines(side, h, "inpatient") if line.med_list_codg != item.code]
        lines.append(FeeLine(item.code, Decimal(EXPENSIVE_UNITS), Decimal(side.randint(4_000, 6_000))))
        start = now - timedelta(days=STAY_DAYS, hours=2, minutes=side.randint(1, 60))  # discharged today
        stay = self._visit("inpatient", h, person, start, [lines], now.date())
        stay.expensive = True
        return [stay, *fillers]  # the stream judges the group as a whole: the outlier first, its peers after

    @staticmethod
    def _group(h: HospitalInfo) -> tuple[int, str]:
        return h.hosp_lv, h.prov  # COST_OUTLIER's group, with the hospital's one main diagnosis (I10 unless set)

    def _cost_fillers(self, h: HospitalInfo, person: PersonInfo, side: random.Random,
                      now: datetime) -> list[Scenario] | None:
        group = self._group(h)
        pairs = [(p, i) for scope in SCOPES for p, i in self.pairs[scope] if self._group(p) == group]
        candidates = sorted({q.psn_no: q for _, i in pairs for q in self.groups[i]
                             if q.psn_no not in self.busy and q.psn_no != person.psn_no}.values(),
                            key=lambda q: q.psn_no)
        if len(candidates) < self.cost_group_stays:
            return None
        places_of = {i: sorted({p.his.fixmedins_code: p for p, j in pairs if j == i}.values(),
                               key=lambda p: p.his.fixmedins_code) for _, i in pairs}
        visits = []
        for n, filler in enumerate(side.sample(candidates, self.cost_group_stays)):
            at_h = side.choice(places_of[filler.insuplc])
            # Discharged 4–28 days ago: never overlapping a stay the person may have in this run.
            start = self._stay_start(side, now) - timedelta(days=4 + n % 25)
            visits.append(self._visit("inpatient", at_h, filler, start, [self._lines(side, at_h, "inpatient")],
                                      now.date()))
        self.cost_fillers[group] += len(visits)
        return visits

    def _remember_spot_filing(self, person: PersonInfo, prov: str, kind: str, on: date) -> None:
        """The router created this filing when it accepted the admission; later picks must know it."""
        days = PROMISE_FILING_DAYS if kind == "promise" else EMERGENCY_FILING_DAYS
        self.filings.setdefault(person.psn_no, []).append(Filing(
            filing_id=f"local-{kind}-{on}", filing_type="TEMPORARY" if kind == "promise" else "EMERGENCY",
            begndate=on, enddate=on + timedelta(days=days), target_admdvs=prov,
        ))

_Plan = Callable[[Population, PersonInfo, random.Random, datetime], "list[Scenario] | None"]
_PLANS: Final[dict[str, _Plan]] = {
    "OVERLAP_INPATIENT": Population._plan_overlap,
    "SPLIT_ADMISSION": Population._plan_split,
    "OUTPATIENT_DURING_STAY": Population._plan_during_stay,
    "FREQUENT_VISITS": Population._plan_frequent,
    "PHARMACY_OVERSUPPLY": Population._plan_oversupply,
    "DUPLICATE_CHARGE": Population._plan_duplicate,
    "GENDER_RESTRICTED": Population._plan_gender,
    "COST_OUTLIER": Population._plan_cost,
}
assert set(_PLANS) == set(SUSPICIOUS_RULES)


async def load_population(s: Settings, dataset: RefDataSet) -> Population:
    """The dataset's rows as PostgreSQL has them now (filings made on the spot included): hospitals and
    catalog from the hub, persons and filings from their shards."""
    psn_nos = [p.psn_no for p in dataset.persons]
    # Genders from the dataset's certificates (GB 11643), for the seeded GENDER_RESTRICTED behaviour.
    genders = {p.psn_no: certno_gender(p.certno) for p in dataset.persons if p.certno}
    return await _population(s, [h.fixmedins_code for h in dataset.hospitals], psn_nos,
                             sorted({c.med_list_codg for c in dataset.catalog}), genders)


async def persons_in_shards(s: Settings) -> int:
    """How many persons the shards hold (the planner's estimate: exact counts of 13 million rows take
    seconds)."""
    shards = await ShardPools.connect(s, 1)
    try:
        return sum(r[0] for r in await shards.fetch(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE relname = 'person'"))
    finally:
        await shards.close()


async def ensure_national(s: Settings, seed: int, operator: str | None = None) -> int:
    """The seed regions' real population in the shards: generated and loaded (with progress) unless the
    shards already hold about that many persons. Returns how many persons they hold."""
    held = await persons_in_shards(s)
    if held >= NATIONAL_PERSONS_MIN:
        return held
    directory = s.state_dir / "refdata-national"
    env = {**os.environ, **settings_env(s)}
    for argv in (["-m", "services.refdata.generate", "--out", str(directory), "--national", "--seed", str(seed)],
                 ["-m", "services.refdata.load", str(directory), "--operator",
                  operator or tool_operator("loadtest")]):
        res = await asyncio.create_subprocess_exec(sys.executable, *argv, env=env)
        if await res.wait() != 0:
            raise PipelineUnavailable(f"national population: {' '.join(argv[1:3])} failed (exit {res.returncode})")
    shards = await ShardPools.connect(s, 1)
    try:
        for _, pool in shards:
            await pool.execute("ANALYZE person")  # the estimate persons_in_shards reads
    finally:
        await shards.close()
    return await persons_in_shards(s)


async def sample_population(s: Settings, dataset: RefDataSet, n: int, seed: int) -> Population:
    """The dataset's hospitals and catalog with n persons sampled from the whole population of the seed
    regions (spread over the shards' tables, not the newest rows), insured where the dataset's are."""
    regions = sorted({p.insuplc_admdvs for p in dataset.persons})
    shards = await ShardPools.connect(s, 1)
    psn_nos: list[str] = []
    try:
        for _, pool in shards:
            held = max(1, int(await pool.fetchval(
                "SELECT greatest(reltuples, 1)::bigint FROM pg_class WHERE relname = 'person'") or 1))
            pct = min(100.0, 100.0 * 4 * n / held)  # pages sampled: a few times what is needed, then a cut
            psn_nos += [r[0] for r in await pool.fetch(
                f"SELECT psn_no FROM person TABLESAMPLE SYSTEM ({pct:.6f}) REPEATABLE ($1)"
                " WHERE insuplc_admdvs = ANY($2) LIMIT $3", seed, regions, n)]
    finally:
        await shards.close()
    random.Random(seed).shuffle(psn_nos)
    return await _population(s, [h.fixmedins_code for h in dataset.hospitals], psn_nos[:n],
                             sorted({c.med_list_codg for c in dataset.catalog}))


async def _population(s: Settings, hospital_codes: list[str], psn_nos: list[str], item_codes: list[str],
                      genders: Mapping[str, str] | None = None, main_diagnosis: str = "I10.x00") -> Population:
    try:
        conn = await asyncpg.connect(s.pg_dsn, timeout=5)
        shards = await ShardPools.connect(s, 1)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        raise PipelineUnavailable(
            f"PostgreSQL is not reachable at 127.0.0.1:{s.pg_port} ({type(e).__name__}); "
            "start the stack: .venv/bin/python -m deploy.stack start"
        ) from None
    try:
        hrows = await conn.fetch(
            "SELECT fixmedins_code, fixmedins_name, admdvs, hosp_lv FROM hospital WHERE fixmedins_code = ANY($1)",
            hospital_codes,
        )
        crows = await conn.fetch(
            "SELECT admdvs, med_list_codg, chrgitm_lv, pric_uplmt_fen, once_per_day, gender_only, supply_days"
            " FROM catalog_item"
            " WHERE med_list_codg = ANY($1)", item_codes,
        )
        prows = await shards.fetch(
            "SELECT psn_no, insuplc_admdvs, insutype, chronic FROM person WHERE psn_no = ANY($1)", psn_nos)
        frows = await shards.fetch(
            "SELECT psn_no, filing_id, filing_type, begndate, enddate, target_admdvs, source, revoked"
            " FROM filing WHERE psn_no = ANY($1)", psn_nos)
    finally:
        await conn.close()
        await shards.close()
    hospitals = []
    for r in sorted(hrows, key=lambda r: r["fixmedins_code"]):
        region = region_of(r["admdvs"])
        hospitals.append(HospitalInfo(
            Hospital(r["fixmedins_code"], r["fixmedins_name"], r["admdvs"], live_clock=True,
                     main_diagnosis=main_diagnosis), r["admdvs"], r["hosp_lv"],
            region.prov_admdvs, region.pool_admdvs,
        ))
    genders = genders or {}
    persons = [PersonInfo(r["psn_no"], r["insuplc_admdvs"], r["insutype"], tuple(r["chronic"]),
                          genders.get(r["psn_no"], ""))
               for r in sorted(prows, key=lambda r: r[0])]
    filings: dict[str, list[Filing]] = defaultdict(list)
    for r in frows:
        filings[r["psn_no"]].append(Filing(
            r["filing_id"], r["filing_type"], r["begndate"], r["enddate"], r["target_admdvs"], r["source"],
            r["revoked"],
        ))
    catalog: dict[str, list[CatalogInfo]] = defaultdict(list)
    for r in sorted(crows, key=lambda r: (r["admdvs"], r["med_list_codg"])):
        catalog[r["admdvs"]].append(CatalogInfo(r["med_list_codg"], r["chrgitm_lv"], r["pric_uplmt_fen"],
                                                r["once_per_day"], r["gender_only"] or "", r["supply_days"]))
    return Population(hospitals, persons, dict(filings), dict(catalog))


# Driving a stay ----------------------------------------------------------------------------


class Caller(Protocol):
    """Sends one envelope and returns the response envelope (HTTP gateway or Kafka ingress)."""

    async def call(self, envelope: dict[str, Any]) -> dict[str, Any]: ...


def error_code(response: dict[str, Any]) -> str:
    """'ok', or the stable error code that starts err_msg ('CODE: text')."""
    if response.get("infcode") == 0:
        return "ok"
    msg = str(response.get("err_msg") or "")
    code = msg.split(":", 1)[0].strip()
    return code if code and code.replace("_", "").isalnum() and code.isupper() else "UNKNOWN"


def to_fen(amount: Any) -> int:
    return int((Decimal(str(amount)) * 100).to_integral_value())


@dataclass
class Stats:
    """Everything a run saw. Latencies in seconds, per infno; `t0` is the run's monotonic start."""

    t0: float = field(default_factory=time.monotonic)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    answered_at: list[float] = field(default_factory=list)  # monotonic time of every final answer
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (infno, code)
    expected_refusals: Counter[str] = field(default_factory=Counter)
    resends: int = 0  # same msgid again after a TIMEOUT
    transport_retries: int = 0  # same msgid again after a failed delivery (a service restarting)
    stays_started: int = 0
    # done | refused (the expected FILING_REQUIRED) | failed (an unexpected error) | cut (the run was over)
    stay_outcomes: Counter[str] = field(default_factory=Counter)
    settled_by_scope: Counter[str] = field(default_factory=Counter)
    settled_by_kind: Counter[str] = field(default_factory=Counter)
    started_by_scope: Counter[str] = field(default_factory=Counter)
    settle_ids: dict[str, int] = field(default_factory=dict)  # setl_id → fund_pay_sumamt fen
    reverse_ids: dict[str, int] = field(default_factory=dict)
    settle_medfee_fen: int = 0
    settled_at: list[float] = field(default_factory=list)
    behaviour_visits: Counter[str] = field(default_factory=Counter)  # seeded behaviours' visits done, by rule
    in_flight: int = 0
    resettled: int = 0  # settlements of a visit whose earlier settlement was reversed
    run_s: float = 0.0  # the load phase (rates are per this)
    drain_s: float = 0.0  # after it, for the requests in flight
    # Also called with every answer (infno, latency s, code, expected): the open loop's HDR histograms.
    on_record: Callable[[str, float, str, bool], None] | None = None

    def record(self, infno: str, seconds: float, code: str, *, expected: bool = False) -> None:
        now = time.monotonic()
        self.latencies[infno].append(seconds)
        self.answered_at.append(now)
        self.outcomes[(infno, code)] += 1
        if expected:
            self.expected_refusals[code] += 1
        if self.on_record is not None:
            self.on_record(infno, seconds, code, expected)

    @property
    def settled(self) -> int:
        return len(self.settle_ids)

    @property
    def reversed(self) -> int:
        return len(self.reverse_ids)

    def requests(self) -> int:
        return len(self.answered_at)

    def absorb(self, other: Stats) -> None:
        """Add what `other` saw (another generator process's share of the same run)."""
        for infno, values in other.latencies.items():
            self.latencies[infno].extend(values)
        self.answered_at.extend(other.answered_at)
        self.settled_at.extend(other.settled_at)
        self.outcomes.update(other.outcomes)
        for name in ("expected_refusals", "stay_outcomes", "settled_by_scope", "settled_by_kind", "started_by_scope",
                     "behaviour_visits"):
            counts: Counter[str] = getattr(self, name)
            counts.update(getattr(other, name))
        self.settle_ids.update(other.settle_ids)
        self.reverse_ids.update(other.reverse_ids)
        self.resends += other.resends
        self.transport_retries += other.transport_retries
        self.stays_started += other.stays_started
        self.settle_medfee_fen += other.settle_medfee_fen
        self.in_flight += other.in_flight
        self.resettled += other.resettled
        self.run_s = max(self.run_s, other.run_s)
        self.drain_s = max(self.drain_s, other.drain_s)

    def errors(self) -> Counter[str]:
        """Unexpected error answers by code (expected refusals are not errors)."""
        out: Counter[str] = Counter()
        for (_, code), n in self.outcomes.items():
            if code != "ok":
                out[code] += n
        for code, n in self.expected_refusals.items():
            out[code] -= n
        return +out

    def all_latencies(self) -> list[float]:
        return [x for values in self.latencies.values() for x in values]

    def rate_in_window(self, times: list[float], seconds: float) -> float:
        now = time.monotonic()
        return sum(1 for t in reversed(times[-100_000:]) if t >= now - seconds) / seconds


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


async def _send(
    caller: Caller, envelope: dict[str, Any], stats: Stats, resends: int, outage_s: float
) -> tuple[str, dict[str, Any]]:
    """One request until a final answer. A TIMEOUT (answered or local) is resent with the same msgid, for
    which the broker returns the stored result; so is a request that could not be delivered, for up to
    `outage_s` (a service restarting), after which TransportError propagates. Returns (code, response)."""
    code, response = "TIMEOUT", {}
    attempt = 0
    outage_until: float | None = None
    while attempt <= resends:
        try:
            response = await caller.call(envelope)
        except TimeoutError:
            attempt += 1
            if attempt <= resends:
                stats.resends += 1
            continue
        except TransportError:
            now = time.monotonic()
            outage_until = outage_until or now + outage_s
            if now >= outage_until:
                raise
            stats.transport_retries += 1
            await asyncio.sleep(0.5)
            continue
        outage_until = None
        code = error_code(response)
        if code != "TIMEOUT":
            break
        attempt += 1
        if attempt <= resends:
            stats.resends += 1
    return code, response


async def drive_stay(
    caller: Caller, scn: Scenario, stats: Stats, *, go_on: Callable[[], bool] = lambda: True,
    resends: int = 3, outage_s: float = 0.0, due: float | None = None, more: Callable[[], bool] | None = None,
) -> str:
    """One stay, step by step; returns and counts its outcome: done | refused (the expected refusal) |
    failed (an unexpected error answer) | cut (go_on() turned false before a step). `due`
    (time.perf_counter()): when the first request was meant to be sent — its latency counts from then, so a
    sender that falls behind shows as latency (open loop); each later request is due when the previous
    answer came. `more()`: whether a seeded behaviour's next visit may start (default `go_on`; the demo
    stops starting them when its time is up, and lets the ones started finish)."""
    stats.stays_started += 1
    stats.started_by_scope[scn.scope] += 1
    stats.in_flight += 1
    outcome = "failed"
    try:
        outcome = await _visit_steps(caller, scn, stats, go_on, resends, outage_s, due)
    except asyncio.CancelledError:
        outcome = "cut"
        raise
    finally:
        stats.stay_outcomes[outcome] += 1
        stats.in_flight -= 1
    if scn.companions and outcome != "cut":
        await _drive_companions(caller, scn, stats, go_on, more or go_on, resends, outage_s)
    return outcome


async def _drive_companions(caller: Caller, scn: Scenario, stats: Stats, go_on: Callable[[], bool],
                            more: Callable[[], bool], resends: int, outage_s: float) -> None:
    """A seeded behaviour's visits, each counted as a visit of its own: one person's in order, several
    persons' (a cost group's ordinary stays) a few at a time."""
    by_person: dict[str, list[Scenario]] = defaultdict(list)
    for visit in scn.companions:
        by_person[visit.person.psn_no].append(visit)
    at_once = asyncio.Semaphore(COMPANIONS_AT_ONCE)

    async def person_visits(visits: list[Scenario]) -> None:
        async with at_once:
            for visit in visits:
                if not (go_on() and more()):
                    return
                done = await drive_stay(caller, visit, stats, go_on=go_on, resends=resends, outage_s=outage_s)
                if scn.behaviour is not None and done == "done":
                    stats.behaviour_visits[scn.behaviour] += 1

    await asyncio.gather(*(person_visits(visits) for visits in by_person.values()))


def _steps(scn: Scenario) -> tuple[Stay | Purchase | OutpatientVisit, list[Callable[[], dict[str, Any]]]]:
    """The visit object and its requests in order, each built just before it is sent."""
    steps: list[Callable[[], dict[str, Any]]]
    settle: Callable[[], dict[str, Any]]
    visit: Stay | Purchase | OutpatientVisit
    if scn.kind == "inpatient":
        stay = scn.stay()
        steps = [lambda: stay.admit(emergency=scn.filing == "emergency")]
        first = 1
        for lines in scn.uploads:
            steps.append(partial(stay.upload, lines, first_sn=first))
            first += len(lines)
        steps += [stay.discharge, lambda: stay.settle(pre=True), stay.settle]
        settle, visit = stay.settle, stay
    elif scn.kind == "pharmacy":
        purchase = scn.purchase()
        steps = [lambda: purchase.settle(pre=True), purchase.settle]
        settle, visit = purchase.settle, purchase
    else:
        out = scn.outpatient()
        steps = [out.register, *([out.declare] if scn.kind == "chronic" else []),
                 partial(out.upload, [line for lines in scn.uploads for line in lines]),
                 lambda: out.settle(pre=True), out.settle]
        settle, visit = out.settle, out
    his, psn = scn.hospital.his, scn.person
    if scn.query:  # read the settlement back, as a hospital that lost the answer does
        steps.append(lambda: his.query("5203", {"psn_no": psn.psn_no, "setl_id": visit.setl_id},
                                       insuplc=psn.insuplc))
    if scn.reverse:
        steps.append(partial(_correction, scn, visit) if scn.correct else visit.reverse)
        if scn.resettle:
            steps.append(settle)
    if scn.lookup:  # the card read before the visit: the psn_no stands as the certificate
        steps.insert(0, partial(scn.hospital.his.envelope, "1101", {"data": {
            "mdtrt_cert_type": "02", "mdtrt_cert_no": scn.person.psn_no}}, insuplc=scn.person.insuplc))
    return visit, steps


def _correction(scn: Scenario, visit: Stay | Purchase | OutpatientVisit) -> dict[str, Any]:
    """The reversal sent as a correction (2601) of the settlement, at the time the reversal would have had."""
    at = datetime.strptime(visit.reverse()["inf_time"], "%Y-%m-%d %H:%M:%S")
    return scn.hospital.his.correct(visit.settle_msgid, SETTLEMENT_INFNOS[scn.kind][1], scn.person.psn_no,
                                    insuplc=scn.person.insuplc, inf_time=at)


async def _visit_steps(
    caller: Caller, scn: Scenario, stats: Stats, go_on: Callable[[], bool], resends: int, outage_s: float,
    due: float | None = None,
) -> str:
    visit, steps = _steps(scn)
    for build in steps:
        if not go_on():
            return "cut"
        envelope = build()  # built just before sending: it needs the mdtrt_id / setl_id of earlier answers
        infno = envelope["infno"]
        started = time.perf_counter() if due is None else min(due, time.perf_counter())
        due = None
        code, r = await _send(caller, envelope, stats, resends, outage_s)
        # A look-up refused by the institution's 1101 rate limit is the limit working, not a failure.
        expected = (infno in PRE_INFNOS and code == scn.expect_refusal) or (infno == "1101" and code == "RATE_LIMITED")
        stats.record(infno, time.perf_counter() - started, code, expected=expected)
        if infno == "1101":
            continue  # the visit goes on whatever the look-up answered
        if code != "ok":
            return "refused" if expected else "failed"
        if isinstance(visit, Stay | OutpatientVisit) and infno in ("2401", "2201"):
            visit.mdtrt_id = r["output"]["result" if infno == "2401" else "data"]["mdtrt_id"]
        if scn.on_admitted is not None and infno in ("2401", "2201", "2101"):
            scn.on_admitted()
            scn.on_admitted = None
        if infno in SETTLE_INFNOS:
            info = r["output"]["setlinfo"]
            if visit.setl_id:
                stats.resettled += 1
            visit.setl_id, visit.settle_msgid = info["setl_id"], info["medins_setl_id"]
            stats.settle_ids[visit.setl_id] = to_fen(info["fund_pay_sumamt"])
            stats.settle_medfee_fen += to_fen(info["medfee_sumamt"])
            stats.settled_by_scope[scn.scope] += 1
            stats.settled_by_kind[scn.kind] += 1
            stats.settled_at.append(time.monotonic())
        elif infno in REVERSE_INFNOS or infno == "2601":  # a corrected settlement answers its reversal
            info = r["output"]["setlinfo"]
            stats.reverse_ids[info["setl_id"]] = to_fen(info["fund_pay_sumamt"])
    return "done"


# Answers to the probe that may go away: reference data not reloaded yet by the router, a slow start.
_PROBE_RETRY: Final = frozenset({"PERSON_UNKNOWN", "HOSPITAL_UNKNOWN", "TIMEOUT", "INTERNAL", "KEY_UNKNOWN"})


async def population_signer(s: Settings, pop: Population, operator: str = "loadtest") -> Signer:
    """Keys for every institution the scenarios use (`his.simulator_signer`)."""
    hub = await asyncpg.create_pool(s.pg_dsn, min_size=1, max_size=2)
    try:
        codes = sorted({h.his.fixmedins_code for h in (*pop.hospitals, *pop.pharmacies)})
        return await simulator_signer(s, hub, codes, operator)
    finally:
        await hub.close()


async def wait_ready(caller: Caller, pop: Population, timeout_s: float) -> str:
    """Send a harmless request (2404 of an unknown visit) through the whole pipeline until the
    settlement engine answers VISIT_UNKNOWN — which also proves the router knows the newest persons.
    Returns a one-line description; raises PipelineUnavailable."""
    hospital, person = pop.probe_pair()
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    started = time.monotonic()
    while time.monotonic() < deadline:
        env = hospital.his.envelope("2404", {"data": {"mdtrt_id": "MPROBE0", "psn_no": person.psn_no}},
                                    insuplc=person.insuplc)
        try:
            async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                r = await caller.call(env)
        except TimeoutError:
            last = "no answer (timeout)"
            continue
        except SignInFailed as e:  # a key issued just now is applied by the router within a second
            last = str(e)
            await asyncio.sleep(0.3)
            continue
        code = error_code(r)
        if code in ("VISIT_UNKNOWN", "ok"):
            return f"pipeline answers ({code} for a probe, {1000 * (time.monotonic() - started):.0f} ms)"
        last = code
        if code not in _PROBE_RETRY:
            raise PipelineUnavailable(f"the pipeline answered a probe with {code}: {r.get('err_msg', '')}")
        await asyncio.sleep(0.3 if code != "TIMEOUT" else 1.0)
    raise PipelineUnavailable(
        f"the pipeline did not answer a probe within {timeout_s:.0f} s (last: {last}); check "
        "'python -m deploy.stack status' and the logs in .state/logs/"
    )
