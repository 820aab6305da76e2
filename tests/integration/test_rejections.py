"""Bad input: a clear error naming the field, a stable code, a dead letter — and the pipeline keeps going."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from loadtest.his import FeeLine, GatewayClient, Signer, Stay
from schemas.codec import encode
from schemas.internal import DeadLetter
from services.common.config import Settings
from services.common.kafka import ADMIN, client_auth
from tests.integration.conftest import HOSPITALS, ITEM_A, PERSONS, STAY_START
from topics.catalog import DEADLETTER

pytestmark = pytest.mark.integration
D = Decimal


def _stay(key: str = "plain") -> Stay:
    p = PERSONS[key][0]
    return Stay(HOSPITALS["chifeng"], p.psn_no, p.insuplc, p.insutype, STAY_START)


async def _expect(gateway: GatewayClient, env: dict[str, Any] | bytes, code: str, *fragments: str) -> str:
    r = await gateway.call(env)
    assert r["infcode"] == -1, r
    assert r["err_msg"].startswith(code + ": "), r["err_msg"]
    for fragment in fragments:
        assert fragment in r["err_msg"], r["err_msg"]
    return str(r["err_msg"])


async def test_not_json(refdata: dict, gateway: GatewayClient) -> None:
    await _expect(gateway, b"{not json", "ENVELOPE_MALFORMED")


async def test_envelope_missing_and_wrong_fields(refdata: dict, gateway: GatewayClient) -> None:
    env = _stay().admit()
    del env["msgid"]
    await _expect(gateway, env, "ENVELOPE_MALFORMED", "msgid")
    env = _stay().admit()
    env["inf_time"] = 20260601
    await _expect(gateway, env, "ENVELOPE_MALFORMED", "inf_time")
    env = _stay().admit()
    env["inf_time"] = "2026-13-01 00:00:00"
    await _expect(gateway, env, "ENVELOPE_MALFORMED", "inf_time")
    env = _stay().admit()
    env["msgid"] = "X" * 30
    await _expect(gateway, env, "MSGID_MALFORMED")
    env = _stay().admit()
    env["infno"] = "7777"
    await _expect(gateway, env, "INFNO_UNSUPPORTED")
    env = _stay().admit()
    env["insuplc_admdvs"] = ""
    await _expect(gateway, env, "INSUPLC_REQUIRED")


async def test_body_errors_name_the_field(refdata: dict, gateway: GatewayClient) -> None:
    env = _stay().admit()
    env["input"]["mdtrtinfo"]["psn_no"] = 12345
    await _expect(gateway, env, "BODY_MALFORMED", "$.input.mdtrtinfo.psn_no")
    env = _stay().admit()
    env["input"]["mdtrtinfo"]["med_type"] = "99"
    await _expect(gateway, env, "BODY_MALFORMED", "$.input.mdtrtinfo.med_type")
    env = _stay().admit()
    del env["input"]["mdtrtinfo"]["begntime"]
    await _expect(gateway, env, "BODY_MALFORMED", "begntime")
    stay = _stay()
    stay.mdtrt_id = "M1"
    env = stay.upload([FeeLine(ITEM_A, D(1), D("10.00"))])
    env["input"]["feedetail"][0]["det_item_fee_sumamt"] = D("10.001")
    await _expect(gateway, env, "BODY_MALFORMED", "det_item_fee_sumamt", "$.input.feedetail[0]")
    env = stay.upload([FeeLine(ITEM_A, D(1), D("10.00"))])
    env["input"]["feedetail"][0]["fee_ocur_time"] = "2026-02-30 10:00:00"
    await _expect(gateway, env, "BODY_MALFORMED", "fee_ocur_time")


async def test_unknown_references(refdata: dict, gateway: GatewayClient) -> None:
    env = _stay().admit()
    env["fixmedins_code"] = "H99999999999"
    env["msgid"] = "H99999999999" + env["msgid"][12:]
    await _expect(gateway, env, "SIGNATURE_MISSING")  # the run's signer has no key for it: sent unsigned
    r = await gateway.call(Signer({"H99999999999": bytes(32)}).sign(env))  # signed, but the broker issued no key
    assert r["err_msg"].startswith("KEY_UNKNOWN: "), r["err_msg"]
    env = _stay().admit()
    env["input"]["mdtrtinfo"]["psn_no"] = "NOBODY0000001"
    await _expect(gateway, env, "PERSON_UNKNOWN")
    env = _stay().admit()
    env["insuplc_admdvs"] = "150100"  # 呼和浩特: the shard of the person's 赤峰, another region
    await _expect(gateway, env, "INSUPLC_MISMATCH")
    env = _stay().admit()
    env["insuplc_admdvs"] = "510421"  # another shard's region: the person is looked up there only
    await _expect(gateway, env, "PERSON_UNKNOWN")
    stay = _stay()
    r = await gateway.call(stay.admit())
    stay.mdtrt_id = r["output"]["result"]["mdtrt_id"]
    await _expect(gateway, stay.upload([FeeLine("NO-SUCH-ITEM", D(1), D("10.00"))]), "CATALOG_ITEM_UNKNOWN",
                  "feedetail[0]")
    bad_visit = _stay()
    bad_visit.mdtrt_id = "MNOSUCHVISIT"
    await _expect(gateway, bad_visit.discharge(), "VISIT_UNKNOWN")
    # medfee_sumamt must equal the uploaded items
    await gateway.call(stay.upload([FeeLine(ITEM_A, D(2), D("50.00"))]))
    await gateway.call(stay.discharge())
    await _expect(gateway, stay.settle(medfee=D("99.00")), "MEDFEE_MISMATCH")


async def test_rejections_reach_dead_letters_and_pipeline_continues(
    refdata: dict, gateway: GatewayClient, services: Settings
) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap, **client_auth(services, ADMIN),
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(DEADLETTER.name, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        bad = _stay().admit()
        bad["input"]["mdtrtinfo"]["psn_no"] = "NOBODY0000002"  # rejected by the router
        worse = _stay().admit()
        worse["input"]["mdtrtinfo"]["med_type"] = "XX"  # rejected by the gateway
        await _expect(gateway, bad, "PERSON_UNKNOWN")
        await _expect(gateway, worse, "BODY_MALFORMED")
        letters = await _read_letters(consumer, {bad["msgid"], worse["msgid"]})
        assert letters[bad["msgid"]].err_code == "PERSON_UNKNOWN" and letters[bad["msgid"]].stage == "router"
        assert letters[worse["msgid"]].err_code == "BODY_MALFORMED" and letters[worse["msgid"]].stage == "gateway"
        assert msgspec.json.decode(letters[bad["msgid"]].original)["msgid"] == bad["msgid"]
    finally:
        await consumer.stop()
    # The same pipeline still settles a good stay afterwards.
    stay = _stay()
    stay.start = STAY_START.replace(month=7)
    r = await gateway.run_stay(stay, [FeeLine(ITEM_A, D(1), D("100.00"))])
    assert r["infcode"] == 0, r["err_msg"]


async def _read_letters(consumer: AIOKafkaConsumer, msgids: set[str]) -> dict[str, DeadLetter]:
    found: dict[str, DeadLetter] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not msgids <= found.keys():
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for rec in records:
                letter = msgspec.json.decode(rec.value, type=DeadLetter)
                if letter.msgid in msgids:
                    found[letter.msgid] = letter
        await asyncio.sleep(0)
    assert msgids <= found.keys(), f"dead letters missing for {msgids - found.keys()}"
    return found


async def test_oversized_body_refused(refdata: dict, gateway: GatewayClient, services: Settings) -> None:
    env = _stay().admit()
    env["input"]["padding"] = "x" * (services.request_body_bytes_max + 10)
    await _expect(gateway, encode(env), "BODY_TOO_LARGE")
