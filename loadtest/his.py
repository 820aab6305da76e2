"""A hospital information system (HIS) as the broker sees it: builds national envelopes
and drives visits. Used by the tests, the demo and the benchmark.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import msgspec

from schemas.codec import encode
from services.common.config import Settings
from services.common.response import SHANGHAI
from services.common.secrets import secrets_dir, write_atomically
from services.common.signing import SIGNTYPE, key_encryption_key, sign
from services.refdata.keys import issue_key

_json_decoder = msgspec.json.Decoder(float_hook=Decimal)  # amounts stay exact
# msgid = fixmedins_code + yyyyMMddHHmmss + 4-digit sequence. Each process starts its clock
# at "now" and moves it one second forward every 10,000 messages, so msgids never repeat.
_clock_base = int(time.time())
_counter = itertools.count()


_stamp: tuple[int, str] = (-1, "")  # (second, its yyyyMMddHHmmss): formatted once per 10,000 msgids


def next_msgid(fixmedins_code: str) -> str:
    global _stamp
    n = next(_counter)
    second = _clock_base + n // 10_000
    if _stamp[0] != second:
        _stamp = (second, datetime.fromtimestamp(second).strftime("%Y%m%d%H%M%S"))
    code = fixmedins_code[:12].ljust(12, "0")
    return f"{code}{_stamp[1]}{n % 10_000:04d}"


def msgids_continue_at() -> int:
    """A clock (s) from which another process's msgids cannot repeat this process's: past every stamp used."""
    return _clock_base + next(_counter) // 10_000 + 1


def start_msgids_at(clock: int) -> None:
    """Stamp this process's msgids from `clock` (or now, if later): a generator process of loadtest.bench
    sending for institutions its parent already sent for (the readiness probe, a sign-in)."""
    global _clock_base, _counter
    _clock_base, _counter = max(clock, int(time.time())), itertools.count()


def wire_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def shanghai_now() -> datetime:
    """The wall-clock time inf_time is written in (Asia/Shanghai), whatever the machine's zone."""
    return datetime.now(SHANGHAI).replace(tzinfo=None, microsecond=0)


_sending_time: tuple[int, str] = (-1, "")  # (epoch second, its inf_time): formatted once a second


def sending_time() -> str:
    """inf_time of a message sent now (wire_time(shanghai_now()), formatted once per second)."""
    global _sending_time
    second = int(time.time())
    if _sending_time[0] != second:
        _sending_time = (second, wire_time(datetime.fromtimestamp(second, SHANGHAI).replace(tzinfo=None)))
    return _sending_time[1]


@dataclass
class Hospital:
    """An institution as its HIS writes envelopes. With `live_clock`, inf_time is always the sending time —
    what a real HIS does and what the broker's ±300 s signature window expects — while the bodies keep the
    simulated visit times; without, inf_time is the simulated time (the tests replay fixed dates)."""

    fixmedins_code: str
    fixmedins_name: str
    admdvs: str
    live_clock: bool = False
    # Every stay's main diagnosis here (ICD-10): with the level and province, a stay's COST_OUTLIER group.
    main_diagnosis: str = "I10.x00"

    def envelope(self, infno: str, body: dict[str, Any], *, insuplc: str = "", msgid: str | None = None,
                 inf_time: datetime | None = None) -> dict[str, Any]:
        return {
            "infno": infno,
            "msgid": msgid or next_msgid(self.fixmedins_code),
            "mdtrtarea_admvs": self.admdvs,
            "insuplc_admdvs": insuplc,
            "recer_sys_code": "FSI",
            "dev_no": "",
            "dev_safe_info": "",
            "cainfo": "",
            "signtype": "",
            "infver": "V1.0",
            "opter_type": "1",
            "opter": "OP001",
            "opter_name": "operator",
            "inf_time": sending_time() if self.live_clock or inf_time is None else wire_time(inf_time),
            "fixmedins_code": self.fixmedins_code,
            "fixmedins_name": self.fixmedins_name,
            "sign_no": "",
            "input": body,
        }

    def correct(self, omsgid: str, oinfno: str, psn_no: str, *, insuplc: str, inf_time: datetime | None = None,
                msgid: str | None = None) -> dict[str, Any]:
        """2601 冲正: undo this institution's transaction `omsgid` (of infno `oinfno`, about `psn_no`)."""
        return self.envelope("2601", {"data": {"psn_no": psn_no, "omsgid": omsgid, "oinfno": oinfno}},
                             insuplc=insuplc, msgid=msgid, inf_time=inf_time)

    def query(self, infno: str, data: dict[str, Any], *, insuplc: str,
              inf_time: datetime | None = None) -> dict[str, Any]:
        """A query of this institution's own data (5201–5206): `data` is the body's `data` (psn_no, …)."""
        return self.envelope(infno, {"data": data}, insuplc=insuplc, inf_time=inf_time)


@dataclass
class Encounter:
    """A visit as 3101/3102 describe it (fsi_encounter_dtos): the facts known so far, orders included."""

    mdtrt_id: str
    medins_id: str
    med_type: str
    adm: datetime
    dscg: datetime | None = None
    diagnoses: list[str] = field(default_factory=list)  # ICD-10 codes, the first the main one
    orders: list[tuple[FeeLine, datetime]] = field(default_factory=list)  # (line, order date)

    def dto(self) -> dict[str, Any]:
        return {
            "mdtrt_id": self.mdtrt_id, "medins_id": self.medins_id, "med_type": self.med_type,
            "adm_date": wire_time(self.adm), "dscg_date": wire_time(self.dscg) if self.dscg else None,
            "fsi_diagnose_dtos": [{"dise_codg": code, "dise_name": "-", "maindise_flag": "1" if i == 0 else "0"}
                                  for i, code in enumerate(self.diagnoses)],
            "fsi_order_dtos": [{"rx_id": f"RX{n:04d}", "hilist_code": line.med_list_codg, "cnt": line.cnt,
                                "pric": line.pric, "sumamt": line.amount, "drord_begn_date": wire_time(at)}
                               for n, (line, at) in enumerate(self.orders, start=1)],
        }


def analysis(psn_no: str, current: Encounter, *others: Encounter, rule_ids: tuple[str, ...] = (),
             trig_scen: str = "1") -> dict[str, Any]:
    """The body of a 3101 (pre-event) or 3102 (in-event) analysis of one patient: `current` first."""
    return {"data": {"rule_ids": list(rule_ids), "trig_scen": trig_scen, "syscode": "HIS",
                     "patient_dtos": [{"patn_id": psn_no, "curr_mdtrt_id": current.mdtrt_id,
                                       "fsi_encounter_dtos": [e.dto() for e in (current, *others)]}]}}


def disposal(jr_id: str, psn_no: str, *, change: bool = False, reason: str = "reviewed") -> dict[str, Any]:
    """The body of a 3103: the hospital continued (dspo_way 1) or changed (2) after warning `jr_id`."""
    return {"data": {"jr_id": jr_id, "patn_id": psn_no, "dspo_way": "2" if change else "1",
                     "dspo_way_rea": reason}}


@dataclass
class FeeLine:
    med_list_codg: str
    cnt: Decimal
    pric: Decimal

    @property
    def amount(self) -> Decimal:
        return (self.cnt * self.pric).quantize(Decimal("0.01"))


@dataclass
class Stay:
    """One inpatient stay of one person at one hospital, message by message."""

    hospital: Hospital
    psn_no: str
    insuplc: str
    insutype: str
    start: datetime
    mdtrt_id: str = ""
    setl_id: str = ""
    settle_msgid: str = ""  # the msgid of the settlement answered last (what a correction names)
    fees: list[FeeLine] = field(default_factory=list)
    promise_filing: bool = False
    use_account: bool = False

    def _env(self, infno: str, body: dict[str, Any], at: datetime) -> dict[str, Any]:
        return self.hospital.envelope(infno, body, insuplc=self.insuplc, inf_time=at)

    def admit(self, emergency: bool = False) -> dict[str, Any]:
        return self._env("2401", {"mdtrtinfo": {
            "psn_no": self.psn_no, "insutype": self.insutype, "mdtrt_cert_type": "02", "mdtrt_cert_no": "-",
            "med_type": "21", "ipt_otp_no": f"ZY{self.start:%m%d%H%M%S}", "begntime": wire_time(self.start),
            "atddr_no": "D001", "chfpdr_name": "doctor", "adm_diag_dscr": "-",
            "dise_codg": self.hospital.main_diagnosis,
            "dise_name": "-", "promise_filing_flag": "1" if self.promise_filing else "0",
            "emergency_flag": "1" if emergency else "0",
        }, "diseinfo": [{
            "diag_type": "1", "diag_srt_no": 1, "diag_code": self.hospital.main_diagnosis, "diag_name": "-",
            "maindiag_flag": "1",
            "diag_dept": "D01", "dise_dor_no": "D001", "diag_time": wire_time(self.start),
        }]}, self.start)

    def upload(self, lines: list[FeeLine], first_sn: int = 1) -> dict[str, Any]:
        self.fees.extend(lines)
        items = [{
            "feedetl_sn": f"{first_sn + i:06d}", "mdtrt_id": self.mdtrt_id, "psn_no": self.psn_no, "med_type": "21",
            "fee_ocur_time": wire_time(self.start + timedelta(hours=1)), "med_list_codg": line.med_list_codg,
            "medins_list_codg": "H-" + line.med_list_codg, "det_item_fee_sumamt": line.amount, "cnt": line.cnt,
            "pric": line.pric, "bilg_dept_codg": "D01", "bilg_dr_codg": "D001",
        } for i, line in enumerate(lines)]
        return self._env("2301", {"feedetail": items}, self.start + timedelta(hours=2))

    def discharge(self) -> dict[str, Any]:
        end = self.start + timedelta(days=3)
        return self._env("2402", {"dscginfo": {
            "mdtrt_id": self.mdtrt_id, "psn_no": self.psn_no, "insutype": self.insutype, "endtime": wire_time(end),
            "dscg_way": "1",
        }}, end)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.fees), Decimal(0))

    def settle(self, *, pre: bool = False, medfee: Decimal | None = None) -> dict[str, Any]:
        return self._env("2303" if pre else "2304", {"mdtrtinfo": {
            "psn_no": self.psn_no, "mdtrt_cert_type": "02", "mdtrt_cert_no": "-",
            "medfee_sumamt": self.total if medfee is None else medfee, "psn_setlway": "01",
            "mdtrt_id": self.mdtrt_id, "insutype": self.insutype, "acct_used_flag": "1" if self.use_account else "0",
            "mid_setl_flag": "0", "promise_filing_flag": "1" if self.promise_filing else "0",
        }}, self.start + timedelta(days=3, hours=1))

    def reverse(self) -> dict[str, Any]:
        return self._env("2305", {"data": {"psn_no": self.psn_no, "mdtrt_id": self.mdtrt_id, "setl_id": self.setl_id}},
                         self.start + timedelta(days=3, hours=2))


Post = Callable[[bytes], Awaitable[dict[str, Any]]]


class SignInFailed(RuntimeError):
    pass


SIGN_IN_RESENDS = 2  # a sign-in answered TIMEOUT (a busy pipeline) is sent again this many times


class Signer:
    """What an institution adds to each envelope it sends (README "Security"): its signature (HMAC-SM3
    with the key the broker issued it, `services.common.signing.sign`) and the `sign_no` of its sign-in
    session — opened with 9001 the first time it sends anything (`ensure_session`)."""

    def __init__(self, keys: Mapping[str, bytes], *, opter: str = "OP001") -> None:
        self.keys = dict(keys)  # fixmedins_code → secret
        self.opter = opter
        self.sessions: dict[str, str] = {}  # fixmedins_code → sign_no
        self._locks: dict[str, asyncio.Lock] = {}

    def sign(self, envelope: dict[str, Any]) -> bytes:
        """The envelope's bytes as its institution sends them: signed, with its session's sign_no unless the
        envelope names one. Unknown institutions are sent unsigned (the broker refuses them)."""
        code = envelope.get("fixmedins_code", "")
        env = {**envelope, "signtype": SIGNTYPE, "cainfo": ""}
        if not env.get("sign_no") and env.get("infno") != "9001":
            env["sign_no"] = self.sessions.get(code, "")
        secret = self.keys.get(code)
        return sign(encode(env), secret) if secret is not None else encode(envelope)

    async def ensure_session(self, envelope: dict[str, Any], post: Post) -> None:
        """Sign the envelope's institution in (9001) unless it has a session or this is the 9001 itself."""
        code = envelope.get("fixmedins_code", "")
        if envelope.get("infno") == "9001" or code in self.sessions or code not in self.keys:
            return
        async with self._locks.setdefault(code, asyncio.Lock()):
            if code in self.sessions:
                return
            sign_in = {**envelope, "infno": "9001", "msgid": next_msgid(code), "insuplc_admdvs": "", "sign_no": "",
                       "inf_time": wire_time(shanghai_now()),
                       "input": {"signIn": {"opter_no": self.opter, "mac": "", "ip": "127.0.0.1"}}}
            signed = self.sign(sign_in)
            answer = await post(signed)
            for _ in range(SIGN_IN_RESENDS):  # a careful HIS resends the same msgid after a TIMEOUT
                if answer.get("infcode") == 0 or not str(answer.get("err_msg", "")).startswith("TIMEOUT"):
                    break
                answer = await post(signed)
            if answer.get("infcode") != 0:
                raise SignInFailed(f"sign-in (9001) of an institution refused: {answer.get('err_msg')}")
            self.sessions[code] = answer["output"]["signinoutb"]["sign_no"]


KEY_STORE = "his-keys-{database}.json"  # under <state_dir>/secrets/


async def simulator_signer(s: Settings, hub: asyncpg.Pool, codes: list[str], operator: str = "loadtest") -> Signer:
    """The keys of the institutions the HIS simulator plays (demo, benchmark, chaos), as their agency would have
    issued them: kept in `<state_dir>/secrets/his-keys-<database>.json` (0600) and reused while live; the
    missing ones are issued now (audited as `operator`). The router applies new keys within a second."""
    path = secrets_dir(s) / KEY_STORE.format(database=s.pg_database)
    stored: dict[str, list[str]] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        stored = msgspec.json.decode(path.read_bytes())
    live = {r["key_id"] for r in await hub.fetch(
        "SELECT key_id FROM institution_key WHERE key_id = ANY($1::text[]) AND revoked_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > now() + interval '1 hour')", [v[0] for v in stored.values()])}
    keys = {code: base64.b64decode(stored[code][1]) for code in codes if code in stored and stored[code][0] in live}
    missing = [code for code in codes if code not in keys]
    if missing:
        kek = key_encryption_key(s)
        async with hub.acquire() as conn:
            for code in missing:
                issued = await issue_key(conn, kek, code, operator)
                keys[code] = issued.secret
                stored[code] = [issued.key_id, issued.secret_b64]
        write_atomically(path, msgspec.json.encode(stored))
    return Signer(keys)


class GatewayClient:
    """Posts envelopes to the gateway. With `retry_for_s`, behaves like a careful HIS: on TIMEOUT
    or a lost connection it resends the same envelope (same msgid) until answered or out of time.
    With a `signer` (default: `GatewayClient.default_signer`, the process's institutions — set by the
    test harness, the demo and the benchmark), every envelope given as a dict is signed and sent within
    its institution's session; bytes are sent as they are."""

    default_signer: Signer | None = None

    def __init__(self, url: str, session: aiohttp.ClientSession, *, retry_for_s: float = 0,
                 signer: Signer | None = None) -> None:
        self.url = url
        self.session = session
        self.retry_for_s = retry_for_s
        self.signer = signer or GatewayClient.default_signer
        self.retries = 0

    async def call(self, envelope: dict[str, Any] | bytes) -> dict[str, Any]:
        if isinstance(envelope, bytes):
            data = envelope
        elif self.signer is not None:
            await self.signer.ensure_session(envelope, self._post)
            data = self.signer.sign(envelope)
        else:
            data = encode(envelope)
        deadline = time.monotonic() + self.retry_for_s
        while True:
            try:
                result = await self._post(data)
                if not result["err_msg"].startswith("TIMEOUT") or time.monotonic() > deadline:
                    return result
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > deadline:
                    raise
            self.retries += 1
            await asyncio.sleep(0.2)

    async def _post(self, data: bytes) -> dict[str, Any]:
        async with self.session.post(self.url, data=data, headers={"Content-Type": "application/json"}) as resp:
            raw = await resp.read()
        result = _json_decoder.decode(raw)
        if not isinstance(result, dict):
            raise RuntimeError("gateway answered a non-object")
        return result

    async def run_stay(self, stay: Stay, lines: list[FeeLine], *, reverse: bool = False) -> dict[str, Any]:
        """Admission → fees → discharge → settlement (→ reversal). Returns the settlement response."""
        r = await self.call(stay.admit())
        if r["infcode"] != 0:
            return r
        stay.mdtrt_id = r["output"]["result"]["mdtrt_id"]
        for step in (stay.upload(lines), stay.discharge()):
            r = await self.call(step)
            if r["infcode"] != 0:
                return r
        settled = await self.call(stay.settle())
        if settled["infcode"] == 0:
            stay.setl_id = settled["output"]["setlinfo"]["setl_id"]
            if reverse:
                await self.call(stay.reverse())
        return settled


@dataclass
class OutpatientVisit:
    """One outpatient visit (general 11 or chronic 14): register, declare, upload, settle, reverse."""

    hospital: Hospital
    psn_no: str
    insuplc: str
    insutype: str
    at: datetime
    med_type: str = "11"
    chronic_disease: str | None = None
    use_account: bool = False
    promise_filing: bool = False
    mdtrt_id: str = ""
    setl_id: str = ""
    settle_msgid: str = ""  # the msgid of the settlement answered last (what a correction names)
    fees: list[FeeLine] = field(default_factory=list)

    def _env(self, infno: str, body: dict[str, Any], minutes: int) -> dict[str, Any]:
        return self.hospital.envelope(infno, body, insuplc=self.insuplc, inf_time=self.at + timedelta(minutes=minutes))

    def register(self) -> dict[str, Any]:
        return self._env("2201", {"data": {
            "psn_no": self.psn_no, "insutype": self.insutype, "begntime": wire_time(self.at), "mdtrt_cert_type": "01",
            "mdtrt_cert_no": "-", "ipt_otp_no": f"MZ{self.at:%m%d%H%M%S}", "atddr_no": "D001", "dr_name": "doctor",
            "dept_code": "A03", "dept_name": "internal", "caty": "A03",
            "promise_filing_flag": "1" if self.promise_filing else "0",
        }}, 0)

    def declare(self) -> dict[str, Any]:
        return self._env("2203", {"mdtrtinfo": {
            "mdtrt_id": self.mdtrt_id, "psn_no": self.psn_no, "med_type": self.med_type, "begntime": wire_time(self.at),
            "dise_codg": "E11.900" if self.med_type == "14" else "J06.900", "dise_name": "-",
            "chronic_disease": self.chronic_disease,
        }}, 1)

    def upload(self, lines: list[FeeLine]) -> dict[str, Any]:
        self.fees.extend(lines)
        items = [{
            "feedetl_sn": f"{i + 1:06d}", "mdtrt_id": self.mdtrt_id, "psn_no": self.psn_no, "med_type": self.med_type,
            "fee_ocur_time": wire_time(self.at), "med_list_codg": line.med_list_codg,
            "medins_list_codg": "H-" + line.med_list_codg, "det_item_fee_sumamt": line.amount, "cnt": line.cnt,
            "pric": line.pric,
        } for i, line in enumerate(lines)]
        return self._env("2204", {"feedetail": items}, 2)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.fees), Decimal(0))

    def settle(self, *, pre: bool = False) -> dict[str, Any]:
        return self._env("2206" if pre else "2207", {"data": {
            "psn_no": self.psn_no, "mdtrt_cert_type": "01", "mdtrt_cert_no": "-", "med_type": self.med_type,
            "medfee_sumamt": self.total, "psn_setlway": "01", "mdtrt_id": self.mdtrt_id, "insutype": self.insutype,
            "acct_used_flag": "1" if self.use_account else "0",
            "promise_filing_flag": "1" if self.promise_filing else "0",
        }}, 3)

    def reverse(self) -> dict[str, Any]:
        return self._env("2208", {"data": {"psn_no": self.psn_no, "mdtrt_id": self.mdtrt_id, "setl_id": self.setl_id}},
                         4)


@dataclass
class Purchase:
    """A designated-pharmacy purchase (med_type 41): one message settles it."""

    pharmacy: Hospital
    psn_no: str
    insuplc: str
    insutype: str
    at: datetime
    lines: list[FeeLine]
    use_account: bool = True
    promise_filing: bool = False
    setl_id: str = ""
    settle_msgid: str = ""  # the msgid of the settlement answered last (what a correction names)

    def settle(self, *, pre: bool = False) -> dict[str, Any]:
        total = sum((line.amount for line in self.lines), Decimal(0))
        drugs = [{
            "feedetl_sn": f"{i + 1:06d}", "fee_ocur_time": wire_time(self.at), "med_list_codg": line.med_list_codg,
            "medins_list_codg": "P-" + line.med_list_codg, "det_item_fee_sumamt": line.amount, "cnt": line.cnt,
            "pric": line.pric,
        } for i, line in enumerate(self.lines)]
        return self.pharmacy.envelope("2101" if pre else "2102", {"data": {
            "psn_no": self.psn_no, "mdtrt_cert_type": "01", "mdtrt_cert_no": "-", "begntime": wire_time(self.at),
            "medfee_sumamt": total, "insutype": self.insutype, "acct_used_flag": "1" if self.use_account else "0",
            "promise_filing_flag": "1" if self.promise_filing else "0",
        }, "drugdetail": drugs}, insuplc=self.insuplc, inf_time=self.at)

    def reverse(self) -> dict[str, Any]:
        return self.pharmacy.envelope("2103", {"data": {"psn_no": self.psn_no, "setl_id": self.setl_id}},
                                      insuplc=self.insuplc, inf_time=self.at + timedelta(minutes=5))


async def run_outpatient(client: GatewayClient, visit: OutpatientVisit, lines: list[FeeLine]) -> dict[str, Any]:
    """Registration → (2203 when chronic) → fees → settlement. Returns the first failure or the settlement."""
    r = await client.call(visit.register())
    if r["infcode"] != 0:
        return r
    visit.mdtrt_id = r["output"]["data"]["mdtrt_id"]
    steps = [visit.declare()] if visit.med_type == "14" else []
    for step in [*steps, visit.upload(lines)]:
        r = await client.call(step)
        if r["infcode"] != 0:
            return r
    r = await client.call(visit.settle())
    if r["infcode"] == 0:
        visit.setl_id = r["output"]["setlinfo"]["setl_id"]
    return r


async def run_purchase(client: GatewayClient, purchase: Purchase) -> dict[str, Any]:
    r = await client.call(purchase.settle())
    if r["infcode"] == 0:
        purchase.setl_id = r["output"]["setlinfo"]["setl_id"]
    return r
