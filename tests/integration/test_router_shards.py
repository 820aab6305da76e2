"""The router over sharded persons, on the real stack: persons of both shards at one hospital, routed
to their shard's partitions; 1101 by certificate in both shards; a hospital added while requests run
is accepted by every router within a second; an online 2503 survives a file load."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiokafka.partitioner import DefaultPartitioner

from deploy.db import SERVICE_ROLES
from deploy.services import venv_python
from loadtest.his import FeeLine, GatewayClient, Hospital, SignInFailed, Stay
from schemas.refdata import certno_check_char
from services.common.config import Settings, settings_env
from services.common.shards import shard_map
from services.common.signing import key_encryption_key
from services.refdata.keys import issue_key
from services.refdata.load import load_dir
from services.refdata.store import CatalogEntry, apply_changes, fetch_changes, fetch_view
from tests.integration.conftest import HOSPITALS, ITEM_A, PERSONS, RUN_TOKEN, SIGNER, STAY_START, Ledger, psn
from topics.catalog import INGRESS

pytestmark = pytest.mark.integration
D = Decimal
DAY = datetime(2026, 8, 3, 9, 0)
SECOND_ROUTER_METRICS_PORT = 21102  # this worktree's free range (wt-router.env)


def _ok(r: dict[str, Any]) -> dict[str, Any]:
    assert r["infcode"] == 0, r["err_msg"]
    return r


# Persons of this module only, loaded with the file loader (interim load_dir of the base commit).
def _certno(body17: str) -> str:
    return body17 + certno_check_char(body17)


CERT_S1 = _certno(f"15040019700101{int(RUN_TOKEN) % 1000:03d}")
CERT_S2 = _certno(f"51042119800202{int(RUN_TOKEN) % 1000:03d}")
MINE: dict[str, dict[str, Any]] = {
    "s1": {"psn_no": psn(951), "insuplc_admdvs": "150400", "insutype": "310", "psn_type": "1101",
           "assistance": None, "acct_balc": "12.34", "chronic": ["DM"], "certno": CERT_S1},
    "s2": {"psn_no": psn(952), "insuplc_admdvs": "510421", "insutype": "390", "psn_type": "1501",
           "assistance": None, "acct_balc": "0.00", "chronic": [], "certno": CERT_S2},
}


# The s2 person is treated in 赤峰 (another province): filed for it.
FILINGS = [{"psn_no": MINE["s2"]["psn_no"], "filing_type": "TEMPORARY", "begndate": "2026-01-01",
            "enddate": "2026-12-31", "target_admdvs": "150000"}]


def _write_dir(directory: Path, persons: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    h = HOSPITALS["chifeng"]
    rows = {
        "hospitals": [{"fixmedins_code": h.fixmedins_code, "fixmedins_name": h.fixmedins_name, "admdvs": h.admdvs,
                       "hosp_lv": 3}],
        "persons": persons,
        "filings": [f for f in FILINGS if f["psn_no"] in {p["psn_no"] for p in persons}],
        "catalog": [{"admdvs": "150000", "med_list_codg": ITEM_A, "name": "测试甲类", "chrgitm_lv": "01",
                     "selfpay_prop": "0"}],
    }
    enc = msgspec.json.Encoder()
    for name, items in rows.items():
        (directory / f"{name}.jsonl").write_bytes(b"".join(enc.encode(r) + b"\n" for r in items))
    return directory


@pytest.fixture(scope="module")
async def mine(refdata: dict, db: asyncpg.Pool, services: Settings,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = _write_dir(tmp_path_factory.mktemp("router_persons"), list(MINE.values()))
    await load_dir(db, directory, services, operator="test.loader")
    return directory


async def test_1101_by_certificate_in_both_shards(mine: Path, gateway: GatewayClient) -> None:
    chifeng = HOSPITALS["chifeng"]
    for shard, cert in (("s1", CERT_S1), ("s2", CERT_S2)):
        r = _ok(await gateway.call(chifeng.envelope("1101", {"data": {
            "mdtrt_cert_type": "02", "mdtrt_cert_no": cert, "psn_cert_type": "01", "certno": cert}})))
        out = r["output"]
        assert out["baseinfo"]["psn_no"] == MINE[shard]["psn_no"]
        assert out["insuinfo"][0]["insuplc_admdvs"] == MINE[shard]["insuplc_admdvs"]
        assert out["insuinfo"][0]["balc"] == D(MINE[shard]["acct_balc"])
    unknown = await gateway.call(chifeng.envelope("1101", {"data": {
        "mdtrt_cert_type": "02", "mdtrt_cert_no": _certno("51042119000101000")}}))
    assert unknown["err_msg"].startswith("PERSON_UNKNOWN: "), unknown["err_msg"]


async def test_online_2503_survives_a_file_load(mine: Path, gateway: GatewayClient, db: asyncpg.Pool,
                                                ledger: Ledger, services: Settings) -> None:
    p = MINE["s1"]
    chifeng = HOSPITALS["chifeng"]

    async def chronic() -> list[str]:
        r = _ok(await gateway.call(chifeng.envelope("5301", {"data": {"psn_no": p["psn_no"]}},
                                                    insuplc=p["insuplc_admdvs"])))
        return [c["chronic_disease"] for c in r["output"]["chronicinfo"]]

    assert await chronic() == ["DM"]
    granted = _ok(await gateway.call(chifeng.envelope("2503", {"data": {"psn_no": p["psn_no"],
                  "chronic_disease": "HTN"}}, insuplc=p["insuplc_admdvs"])))
    assert granted["output"]["chronicinfo"] == [{"chronic_disease": "DM"}, {"chronic_disease": "HTN"}]
    withdrawn = _ok(await gateway.call(chifeng.envelope("2504", {"data": {"psn_no": p["psn_no"],
                    "chronic_disease": "DM"}}, insuplc=p["insuplc_admdvs"])))
    assert withdrawn["output"]["chronicinfo"] == [{"chronic_disease": "HTN"}]
    # The file still says DM only: loaded again (changed: the balance), the online changes win.
    again = _write_dir(mine.parent / "router_persons_again", [{**p, "acct_balc": "56.78"}])
    await load_dir(db, again, services, operator="test.loader")
    assert await chronic() == ["HTN"]
    row = await ledger.of("150400").fetchrow(
        "SELECT chronic_file, chronic_online, acct_balc_fen FROM person WHERE psn_no = $1", p["psn_no"])
    assert row is not None
    assert (row["chronic_file"], msgspec.json.decode(row["chronic_online"]), row["acct_balc_fen"]) == (
        ["DM"], {"HTN": True, "DM": False}, 5678)


async def test_persons_of_both_shards_settle_at_one_hospital(mine: Path, gateway: GatewayClient,
                                                             ledger: Ledger, services: Settings) -> None:
    smap = shard_map(services)
    stays = {key: Stay(HOSPITALS["chifeng"], p["psn_no"], p["insuplc_admdvs"], p["insutype"], STAY_START)
             for key, p in MINE.items()}
    assert {smap.shard_of(s.insuplc) for s in stays.values()} == {"s1", "s2"}
    setl_ids: dict[str, str] = {}
    for key, stay in stays.items():
        r = _ok(await gateway.run_stay(stay, [FeeLine(ITEM_A, D(2), D("150.00"))]))
        assert r["output"]["setlinfo"]["medfee_sumamt"] == D("300.00")
        setl_ids[key] = r["output"]["setlinfo"]["setl_id"]
    for key, stay in stays.items():
        own = smap.shard_of(stay.insuplc)
        for name, pool in ledger.shards:  # the ledger row is in the person's shard and only there
            n = await pool.fetchval("SELECT count(*) FROM settlement WHERE setl_id = $1", setl_ids[key])
            assert n == (1 if name == own else 0), (key, name)


# A hospital added while requests run, seen by two routers ----------------------------------------


def _assigned(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("xs_kafka_assigned_partitions{"))


async def _metrics(session: aiohttp.ClientSession, port: int) -> str:
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
            return await r.text()
    except aiohttp.ClientError:
        return ""


@pytest.fixture
async def second_router(services: Settings) -> AsyncIterator[int]:
    """Another settlement stage (it routes) of the run (its own XS_INSTANCE and metrics port); both hold
    partitions, and both settle: two instances in one shard's database at once."""
    env = {**os.environ, **settings_env(services), "XS_INSTANCE": "settle-test-2",
           "XS_PG_USER": SERVICE_ROLES["settle"], "XS_SETTLE_METRICS_PORT": str(SECOND_ROUTER_METRICS_PORT),
           "PYTHONUNBUFFERED": "1"}
    log = (services.run_dir / "logs" / "settle-2.log").open("ab")
    proc = subprocess.Popen([str(venv_python()), "-m", "services.settle"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                first = _assigned(await _metrics(session, services.settle_metrics_port))
                second = _assigned(await _metrics(session, SECOND_ROUTER_METRICS_PORT))
                if first > 0 and second > 0 and first + second == INGRESS.partitions:
                    break
                assert proc.poll() is None, "the second settlement stage exited"
                assert time.monotonic() < deadline, f"partitions not shared: {first} + {second}"
                await asyncio.sleep(0.3)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        # A static member keeps its partitions until its session times out (10 s): wait for the
        # run's settlement stage to hold them all again, so later tests are not answered TIMEOUT.
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while _assigned(await _metrics(session, services.settle_metrics_port)) != INGRESS.partitions:
                assert time.monotonic() < deadline, "the run's settlement stage did not get its partitions back"
                await asyncio.sleep(0.5)


def _keys_for_every_partition(n: int) -> list[str]:
    """psn_nos whose ingress records (key psn_no, the default partitioner) cover every partition."""
    partitioner = DefaultPartitioner()
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < n:
        key = f"NOBODY{RUN_TOKEN}{i:04d}"
        keys.setdefault(partitioner(key.encode(), list(range(n)), list(range(n))), key)
        i += 1
    return [keys[p] for p in range(n)]


async def test_hospital_added_while_requests_run_is_accepted_by_every_router(
        refdata: dict, gateway: GatewayClient, db: asyncpg.Pool, services: Settings, second_router: int) -> None:
    new = Hospital(f"H150400{RUN_TOKEN[-5:]}", "赤峰新接入测试医院", "150400")
    keys = _keys_for_every_partition(INGRESS.partitions)
    background_stop = asyncio.Event()
    answered = 0

    async def requests_run() -> None:  # ongoing load on a known hospital meanwhile
        nonlocal answered
        p = PERSONS["plain"].person
        while not background_stop.is_set():
            env = HOSPITALS["chifeng"].envelope("5301", {"data": {"psn_no": p.psn_no}}, insuplc=p.insuplc)
            _ok(await gateway.call(env))
            answered += 1

    async def outcome(psn_no: str) -> str:
        env = new.envelope("2404", {"data": {"mdtrt_id": "NONE", "psn_no": psn_no}}, insuplc="150400")
        try:
            return str((await gateway.call(env))["err_msg"]).split(":", 1)[0]
        except SignInFailed:  # its key is not applied yet: its 9001 was refused
            return "SIGN_IN_REFUSED"

    load = asyncio.create_task(requests_run())
    try:
        # Unknown and without a key: what it sends is unsigned.
        assert set(await asyncio.gather(*(outcome(k) for k in keys))) == {"SIGNATURE_MISSING"}
        async with db.acquire() as conn, conn.transaction():  # as every writer of the hub's reference data
            await conn.execute("SELECT pg_advisory_xact_lock(refdata_lock_id())")
            await conn.execute("INSERT INTO hospital (fixmedins_code, fixmedins_name, admdvs, hosp_lv)"
                               " VALUES ($1, $2, $3, 2)", new.fixmedins_code, new.fixmedins_name, new.admdvs)
            await conn.execute("INSERT INTO refdata_change (entity, key) VALUES ('hospital', $1)", new.fixmedins_code)
            issued = await issue_key(conn, key_encryption_key(services), new.fixmedins_code, "pytest")
        SIGNER.keys[new.fixmedins_code] = issued.secret
        committed = time.monotonic()
        pending = set(keys)
        unaccepted = {"SIGNATURE_MISSING", "SIGN_IN_REFUSED", "KEY_UNKNOWN", "HOSPITAL_UNKNOWN"}
        while pending:  # every partition (so both routers) must accept the hospital and its key
            results = await asyncio.gather(*(outcome(k) for k in sorted(pending)))
            pending = {k for k, code in zip(sorted(pending), results, strict=True) if code in unaccepted}
            assert time.monotonic() - committed < 1.0 or not pending, f"{len(pending)} partitions still refuse"
        assert set(await asyncio.gather(*(outcome(k) for k in keys))) == {"PERSON_UNKNOWN"}
    finally:
        background_stop.set()
        await load
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(refdata_lock_id())")
            await conn.execute("DELETE FROM hospital WHERE fixmedins_code = $1", new.fixmedins_code)
            await conn.execute("INSERT INTO refdata_change (entity, key) VALUES ('hospital', $1)", new.fixmedins_code)
    assert answered > 0


async def test_change_log_reads_only_the_changed_keys_of_every_entity(refdata: dict, db: asyncpg.Pool) -> None:
    """fetch_changes + apply_changes on the real hub: a hospital, a catalog item and a region changed
    after a snapshot reach the view; an unchanged row is not read again; deletions remove the key."""
    code, item, region = f"H150400{RUN_TOKEN[-5:]}8", f"TESTNEW{RUN_TOKEN[-4:]}", "150499"

    async def write(sql: str, *args: object, entity: str, key: str) -> None:
        async with db.acquire() as conn, conn.transaction():  # as every writer of the hub's reference data
            await conn.execute("SELECT pg_advisory_xact_lock(refdata_lock_id())")
            await conn.execute(sql, *args)
            await conn.execute("INSERT INTO refdata_change (entity, key) VALUES ($1, $2)", entity, key)

    async with db.acquire() as conn:
        view = await fetch_view(conn)
    before = view.version
    chifeng = view.hospitals[HOSPITALS["chifeng"].fixmedins_code]
    try:
        await write("INSERT INTO hospital (fixmedins_code, fixmedins_name, admdvs, hosp_lv)"
                    " VALUES ($1, 'x', '150400', 1)", code, entity="hospital", key=code)
        await write("INSERT INTO catalog_item (admdvs, med_list_codg, name, chrgitm_lv, selfpay_prop, pric_uplmt_fen)"
                    " VALUES ('150000', $1, 'x', '02', 0.15, 1234)", item, entity="catalog_item", key=f"150000:{item}")
        await write("INSERT INTO region (admdvs, name, prov_admdvs, pool_admdvs) VALUES ($1, 'x', '150000', '150400')",
                    region, entity="region", key=region)
        async with db.acquire() as conn:
            changes, rows = await fetch_changes(conn, before, 100)
        mine = [c for c in changes if c.key in (code, f"150000:{item}", region)]
        assert [c.entity for c in mine] == ["hospital", "catalog_item", "region"]
        assert set(rows.hospitals) <= {c.key for c in changes if c.entity == "hospital"}
        apply_changes(view, changes, rows)
        assert view.version == max(c.version for c in changes) > before
        assert view.hospitals[code].hosp_lv == 1
        assert view.catalog[("150000", item)] == CatalogEntry("02", D("0.1500"), 1234, "x")
        assert view.regions[region].pool_admdvs == "150400"
        assert view.hospitals[HOSPITALS["chifeng"].fixmedins_code] is chifeng  # unchanged: not read again
    finally:
        await write("DELETE FROM hospital WHERE fixmedins_code = $1", code, entity="hospital", key=code)
        await write("DELETE FROM catalog_item WHERE admdvs = '150000' AND med_list_codg = $1", item,
                    entity="catalog_item", key=f"150000:{item}")
        await write("DELETE FROM region WHERE admdvs = $1", region, entity="region", key=region)
    async with db.acquire() as conn:
        changes, rows = await fetch_changes(conn, view.version, 100)
    apply_changes(view, changes, rows)
    assert code not in view.hospitals and ("150000", item) not in view.catalog and region not in view.regions
