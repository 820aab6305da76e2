"""Prometheus metrics shared by the services. Labels are bounded code values only:
transaction numbers, error codes, scopes, provinces — never a person or settlement id."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "xs_requests_total", "Requests handled, by stage, transaction and outcome (ok or error code)",
    ["stage", "infno", "outcome"],
)
DEAD_LETTERS = Counter("xs_dead_letters_total", "Records sent to the dead-letter topic", ["stage", "reason"])
STAGE_SECONDS = Histogram(
    "xs_stage_seconds", "Processing time per record or batch in a stage", ["stage"], buckets=LATENCY_BUCKETS_S
)
GATEWAY_SECONDS = Histogram(
    "xs_gateway_request_seconds", "HTTP request to response at the gateway", ["infno"],
    buckets=LATENCY_BUCKETS_S,
)
SETTLEMENTS = Counter(
    "xs_settlements_total", "Ledger rows written, by kind, scope, visit type and provinces",
    ["kind", "scope", "med_type", "insured_prov", "treating_prov"],
)
FUND_PAID = Counter(
    "xs_fund_paid_yuan_total", "Fund amounts settled (reversals subtract via kind=reverse), in yuan",
    ["fund", "kind", "insured_prov", "treating_prov"],
)
END_TO_END_SECONDS = Histogram(
    "xs_settlement_end_to_end_seconds", "From gateway/ingress receipt to ledger commit",
    ["infno"], buckets=LATENCY_BUCKETS_S,
)


def record_ledger_row(
    kind: str, scope: str, med_type: str, insured_prov: str, treating_prov: str, funds: Mapping[str, int]
) -> None:
    """One committed settlement (kind=settle) or reversal (kind=reverse); funds in fen, reversals negative."""
    SETTLEMENTS.labels(kind, scope, med_type, insured_prov, treating_prov).inc()
    for fund, fen in funds.items():
        if fen:
            FUND_PAID.labels(fund, kind, insured_prov, treating_prov).inc(abs(fen) / 100)


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
    "Current month's running net amount the insured province owes the treating province, per fund, in yuan",
    ["insured_prov", "treating_prov", "fund"],
)


def record_manual_claim(insured_prov: str, treating_prov: str, scope: str, visit_type: str) -> None:
    """One manual reimbursement person-time (visit_type code-like: inpatient, general_outpatient, ...)."""
    MANUAL_CLAIMS.labels(insured_prov, treating_prov, scope, visit_type).inc()


def set_deposit(insured_prov: str, balance_fen: int, warning_line_fen: int) -> None:
    DEPOSIT_BALANCE.labels(insured_prov).set(balance_fen / 100)
    DEPOSIT_WARNING_LINE.labels(insured_prov).set(warning_line_fen / 100)


def set_clearing_position(insured_prov: str, treating_prov: str, fund: str, amount_fen: int) -> None:
    CLEARING_POSITION.labels(insured_prov, treating_prov, fund).set(amount_fen / 100)


def serve_metrics(port: int) -> None:
    """Expose /metrics on loopback; also the readiness probe of the local stack."""
    start_http_server(port, addr="127.0.0.1")
