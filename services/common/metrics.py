"""Prometheus metrics shared by the services.

Names follow the Prometheus conventions: `xs_` prefix, base units in the name
(`_seconds`; money in `_yuan` — currency has no base unit, yuan is the
platform's wire unit), counters end in `_total`. Label values are bounded code
values only — transaction numbers, error codes, scopes, visit types, province
codes (XX0000), fund names, Kafka topics and groups — never a person,
visit or settlement id. Every `record_*` helper maps an unexpected value to a
fixed fallback (`other`, `unknown`, `OTHER`) so a bad input cannot grow the label
space.

The direct-settlement rate (REFERENCE §6) is a PromQL expression over two
counters with the same labels (insured_prov, treating_prov, scope, visit_type):

    direct = xs_settlements_total{kind="settle"} − xs_settlements_total{kind="reverse"}
    rate   = direct ÷ (direct + xs_manual_claims_total)

(recording rules in deploy/prometheus/rules/recording.yml). A reversal always
has a settlement before it with the same labels, so a settlement reversed and
not settled again nets to zero, and one settled again counts once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, get_args
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# The code tables label values come from (the monitor imports SCOPES, VISIT_TYPES, visit_type_of from here).
from schemas.codes import FUND_TOTAL, FUNDS, SCOPES, VISIT_TYPES, is_province_code, visit_type_of
from schemas.errors import ERRORS
from schemas.monitoring import Severity
from schemas.transactions import TRANSACTIONS

# No `_created` series: Prometheus 2 does not use them, and they would double every counter's series.
disable_created_metrics()

# Milliseconds to seconds: the platform's inpatient settlement averages ~0.8 s (REFERENCE §7).
LATENCY_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

OUTCOMES: Final = frozenset({"ok", "duplicate", "settled", "reversed"}) | frozenset(ERRORS)

REQUESTS = Counter(
    "xs_requests_total", "Messages handled, by stage, transaction and outcome (ok, duplicate or error code)",
    ["stage", "infno", "outcome"],
)
# Person look-ups (1101) refused by the per-institution rate limit, by the treating province (bounded).
PERSON_QUERIES_REFUSED = Counter(
    "xs_person_queries_refused_total", "1101 look-ups refused by the per-institution rate limit", ["treating_prov"]
)
DEAD_LETTERS = Counter("xs_dead_letters_total", "Records sent to the dead-letter topic", ["stage", "reason"])
STAGE_SECONDS = Histogram(
    "xs_stage_seconds", "Processing time per record (router) or batch (settle) in a stage", ["stage"],
    buckets=LATENCY_BUCKETS_S,
)
GATEWAY_SECONDS = Histogram(
    "xs_gateway_request_seconds", "HTTP request to response at the gateway", ["infno"],
    buckets=LATENCY_BUCKETS_S,
)
END_TO_END_SECONDS = Histogram(
    "xs_settlement_end_to_end_seconds", "From gateway/ingress receipt to ledger commit",
    ["infno"], buckets=LATENCY_BUCKETS_S,
)
SETTLEMENTS = Counter(
    "xs_settlements_total",
    "Ledger rows committed: kind=settle (directly settled person-times) or kind=reverse, by scope, "
    "visit type and insured/treating province (mid-stay parts are not counted: a stay counts once)",
    ["kind", "scope", "visit_type", "insured_prov", "treating_prov"],
)
FUND_PAID = Counter(
    "xs_fund_paid_yuan_total",
    "Fund amounts of committed ledger rows, in yuan; reversals count positive under kind=reverse "
    "(net = settle − reverse)",
    ["fund", "kind", "insured_prov", "treating_prov"],
)
SETTLEMENT_REQUESTS = Counter(
    "xs_settlement_requests_total",
    "Settlement and reversal requests by outcome: settled, reversed, duplicate or the error code that refused it",
    ["infno", "scope", "visit_type", "outcome"],
)
MANUAL_CLAIMS = Counter(
    "xs_manual_claims_total",
    "Manual (手工零星报销) person-times: the non-direct part of the direct-settlement rate denominator",
    ["insured_prov", "treating_prov", "scope", "visit_type"],
)
DEPOSIT_BALANCE = Gauge(
    "xs_deposit_balance_yuan", "Advance deposit (预付金) balance of an insured province, in yuan", ["insured_prov"]
)
DEPOSIT_WARNING_LINE = Gauge(
    "xs_deposit_warning_line_yuan", "Advance deposit warning line of an insured province, in yuan", ["insured_prov"]
)
CLEARING_POSITION = Gauge(
    "xs_clearing_position_yuan",
    "Current month's running net amount the insured province owes the treating province, per fund "
    "(fund=fund_pay_sumamt: all funds), in yuan",
    ["insured_prov", "treating_prov", "fund"],
)
PRODUCE_ERRORS = Counter(
    "xs_kafka_produce_errors_total", "Records the service failed to produce (the batch is retried)", ["topic"]
)
REBALANCES = Counter(
    "xs_kafka_rebalances_total", "Consumer-group rebalances this process took part in", ["group"]
)
ASSIGNED_PARTITIONS = Gauge(
    "xs_kafka_assigned_partitions", "Partitions currently assigned to this process's consumer", ["group"]
)


def _prov(prov_admdvs: str) -> str:
    """The caller passes a province code XX0000 (the region table maps a region to its province); anything
    else becomes `unknown`, so the label space stays bounded."""
    return prov_admdvs if is_province_code(prov_admdvs) else "unknown"


def _scope(scope: str) -> str:
    return scope if scope in SCOPES else "unknown"


def _visit_type(visit_type: str) -> str:
    return visit_type if visit_type in VISIT_TYPES.values() else visit_type_of(visit_type)


def _outcome(outcome: str) -> str:
    return outcome if outcome in OUTCOMES else "OTHER"


def record_ledger_row(
    kind: str, scope: str, med_type: str, insured_prov: str, treating_prov: str, funds: Mapping[str, int],
    *, person_time: bool = True,
) -> None:
    """One committed settlement (kind=settle) or reversal (kind=reverse); funds in fen, reversals negative;
    provinces as XX0000 codes. A mid-stay part (and its reversal) is not a person-time of its own
    (`person_time` False): its money counts, the stay counts once, with its discharge settlement."""
    kind = kind if kind in ("settle", "reverse") else "other"
    ins, trt = _prov(insured_prov), _prov(treating_prov)
    labels = (_scope(scope), visit_type_of(med_type), ins, trt)
    if person_time:
        SETTLEMENTS.labels(kind, *labels).inc()
    if kind == "settle":
        SETTLEMENTS.labels("reverse", *labels)  # exists at 0, so settle − reverse is defined at once
    for fund, fen in funds.items():
        if fen:
            fund = fund if fund in FUNDS else "other"
            FUND_PAID.labels(fund, kind, ins, trt).inc(abs(fen) / 100)
            if kind == "settle":
                FUND_PAID.labels(fund, "reverse", ins, trt)


def record_settlement_request(infno: str, scope: str, outcome: str, med_type: str | None = None) -> None:
    """A settlement or reversal request's outcome (transactions writing no ledger row are ignored).

    outcome "ok" becomes `settled` or `reversed`; an error code stays as it is. The visit type comes
    from med_type when known, else it is the transaction's visit kind (an outpatient settlement may be
    11 or 14), both from the transaction registry.
    """
    transaction = TRANSACTIONS.get(infno)
    if transaction is None or transaction.ledger_row is None or transaction.visit is None:
        return
    if outcome == "ok":
        outcome = "reversed" if transaction.ledger_row == "reverse" else "settled"
    visit_type = visit_type_of(med_type) if med_type else transaction.visit.kind
    SETTLEMENT_REQUESTS.labels(infno, _scope(scope), visit_type, _outcome(outcome)).inc()


def record_manual_claim(insured_prov: str, treating_prov: str, scope: str, visit_type: str) -> None:
    """One manual reimbursement person-time; visit_type code-like (inpatient, general_outpatient, …) or a
    med_type code (21, 11, …)."""
    MANUAL_CLAIMS.labels(_prov(insured_prov), _prov(treating_prov), _scope(scope), _visit_type(visit_type)).inc()


def set_deposit(insured_prov: str, balance_fen: int, warning_line_fen: int) -> None:
    prov = _prov(insured_prov)
    DEPOSIT_BALANCE.labels(prov).set(balance_fen / 100)
    DEPOSIT_WARNING_LINE.labels(prov).set(warning_line_fen / 100)


def set_clearing_position(insured_prov: str, treating_prov: str, fund: str, amount_fen: int) -> None:
    """fund: one of FUNDS, or fund_pay_sumamt for all funds together (filter it out before summing funds)."""
    fund = fund if fund in FUNDS or fund == FUND_TOTAL else "other"
    CLEARING_POSITION.labels(_prov(insured_prov), _prov(treating_prov), fund).set(amount_fen / 100)


def record_produce_error(topic: str) -> None:
    PRODUCE_ERRORS.labels(topic).inc()


def record_rebalance(group: str, assigned_partitions: int) -> None:
    REBALANCES.labels(group).inc()
    ASSIGNED_PARTITIONS.labels(group).set(assigned_partitions)


def init_stage(stage: str) -> None:
    """Create a stage's dead-letter series at 0 for every error code, so `increase()` sees the first one."""
    for code in (*ERRORS, "OTHER"):
        DEAD_LETTERS.labels(stage, code)


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def metrics_app() -> WsgiApp:
    """prometheus_client's /metrics app, always in the plain text format and never gzipped.

    Prometheus asks for OpenMetrics and gzip; over loopback both are only CPU: prometheus_client renders
    OpenMetrics about 1.5x slower than the text format, and gzip (level 9) adds to every scrape, rendered
    every 5 s in the service's own process. Prometheus reads the text format just as well."""
    app = make_wsgi_app(REGISTRY, disable_compression=True)

    def text_format_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ.pop("HTTP_ACCEPT", None)  # no Accept header: the text format
        return app(environ, start_response)  # type: ignore[no-any-return]

    return text_format_app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log line per scrape."""


def serve_metrics(port: int, stage: str | None = None) -> ThreadingWSGIServer:
    """Expose /metrics on loopback (a daemon thread); also the readiness probe of the local stack."""
    if stage is not None:
        init_stage(stage)
    server = make_server("127.0.0.1", port, metrics_app(), ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


# --- Smart monitoring (issue 13) -------------------------------------------------------------------
# The stream (services/smartmon) counts what it handled and sent; the clearing service's judgement
# sink counts judgements once, by the INSERT that created the row. Rule ids come from the rule book
# (a bounded set); anything else is `other`.
SMARTMON_EVENTS = Counter(
    "xs_smartmon_events_total",
    "Records the monitoring stream handled: outcome=ok (applied) or the dead letter's code (INTERNAL: "
    "undecodable or failing), by agent (persons: fsi.settlements, cost_groups: fsi.monitor.stays)",
    ["agent", "outcome"],
)
SMARTMON_STAYS_DROPPED = Counter(
    "xs_smartmon_stays_dropped_total",
    "Stays a busy cost group let go before their window ended, to keep its state within one changelog record "
    "(services/smartmon/state.py MAX_GROUP_STAYS): its COST_OUTLIER percentile is then of its newest stays",
)
SMARTMON_SENT = Counter(
    "xs_smartmon_judgements_sent_total",
    "Judgements the monitoring stream sent to fsi.judgements, by rule and action (emit: new or with new "
    "evidence, withdraw: no longer supported)",
    ["rule", "action"],
)
MONITORING_JUDGEMENTS = Counter(
    "xs_monitoring_judgements_total",
    "New judgements stored (counted once, by the insert that created the row), by rule, severity and "
    "insured province",
    ["rule", "severity", "insured_prov"],
)
MONITORING_WITHDRAWN = Counter(
    "xs_monitoring_withdrawn_total", "Stored judgements set to withdrawn by the stream, by rule", ["rule"]
)
SEVERITIES: Final = frozenset(get_args(Severity))


def _rule(rule_id: str, known: frozenset[str] | None) -> str:
    return rule_id if known is None or rule_id in known else "other"


def record_judgement_sent(rule_id: str, withdrawn: bool, known_rules: frozenset[str] | None = None) -> None:
    SMARTMON_SENT.labels(_rule(rule_id, known_rules), "withdraw" if withdrawn else "emit").inc()


def record_judgement_stored(rule_id: str, severity: str, insured_prov: str,
                            known_rules: frozenset[str] | None = None) -> None:
    MONITORING_JUDGEMENTS.labels(_rule(rule_id, known_rules), severity if severity in SEVERITIES else "other",
                                 _prov(insured_prov)).inc()


def record_judgement_withdrawn(rule_id: str, known_rules: frozenset[str] | None = None) -> None:
    MONITORING_WITHDRAWN.labels(_rule(rule_id, known_rules)).inc()
