"""Export a JSON Schema for every message: python -m schemas.export [OUT_DIR]."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from schemas import clearing
from schemas.audit import AuditRecord
from schemas.codec import BODY_TYPES
from schemas.envelope import RequestEnvelope, ResponseEnvelope
from schemas.inpatient import Output2301, Output2401, OutputSettlement
from schemas.internal import DeadLetter, RoutedRequest, SettlementEvent
from schemas.person import Output1101

MESSAGES: dict[str, type] = {
    "request_envelope": RequestEnvelope,
    "response_envelope": ResponseEnvelope,
    **{f"input_{infno}": t for infno, t in BODY_TYPES.items()},
    "output_1101": Output1101,
    "output_2401": Output2401,
    "output_2301": Output2301,
    "output_settlement": OutputSettlement,
    "routed_request": RoutedRequest,
    "settlement_event": SettlementEvent,
    "dead_letter": DeadLetter,
    "output_3201": clearing.Output3201,
    "output_3202": clearing.Output3202,
    "output_3203": clearing.Output3203,
    "output_3260": clearing.Output3260,
    "output_3261": clearing.Output3261,
    "manual_claim": clearing.ManualClaim,
    "deposit_event": clearing.DepositEvent,
    "deposit_alert": clearing.DepositAlert,
    "audit_record": AuditRecord,
}


def _schema_hook(t: type) -> dict:
    if t is msgspec.Raw:  # the envelope's `input`: its schema is the input_<infno> file
        return {"type": "object", "description": "the transaction body; see input_<infno>.schema.json"}
    raise NotImplementedError(t)


def export(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, t in MESSAGES.items():
        path = out_dir / f"{name}.schema.json"
        schema = msgspec.json.schema(t, schema_hook=_schema_hook)
        path.write_bytes(msgspec.json.format(msgspec.json.encode(schema), indent=2))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("build/json-schema")
    for p in export(target):
        print(p)
