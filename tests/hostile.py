"""Hostile requests for the fuzz tests: valid envelopes of every family, and hypothesis strategies that
break them — bytes that are not UTF-8, control characters, deep nesting, numbers no decimal context
holds, dates from year 1 to 9999, wrong types, missing and extra fields, and plain random bytes.

Used by tests/unit/test_fuzz_decoder.py (the decoder) and tests/integration/test_fuzz_gateway.py
(the HTTP gateway and the router). Personal-looking values carry markers that must never show up in
an error text.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from datetime import datetime, timedelta
from typing import Any

from hypothesis import strategies as st

# The clock the unit tests decode at (Asia/Shanghai wall time); the requests are dated just before it.
NOW = datetime(2026, 11, 23, 10, 0, 0)
PERSONAL_MARKERS = ("T9876543210", "张三丰", "150400195803061234")
FIXMEDINS = "H15040099951"
_msg_seq = itertools.count(1)


def wire_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S")


def msgid(fixmedins: str = FIXMEDINS) -> str:
    """A valid msgid (30 alphanumerics starting with the hospital code), unique in this process."""
    return f"{fixmedins}{next(_msg_seq):0{30 - len(fixmedins)}d}"


def envelope(infno: str, body: dict[str, Any], at: datetime = NOW, *, fixmedins: str = FIXMEDINS,
             admdvs: str = "150400", insuplc: str = "510421") -> dict[str, Any]:
    return {
        "infno": infno, "msgid": msgid(fixmedins), "mdtrtarea_admvs": admdvs, "insuplc_admdvs": insuplc,
        "recer_sys_code": "FSI", "dev_no": "", "dev_safe_info": "", "cainfo": "", "signtype": "",
        "infver": "V1.0", "opter_type": "1", "opter": "OP001", "opter_name": "operator",
        "inf_time": wire_time(at), "fixmedins_code": fixmedins, "fixmedins_name": "fuzz hospital",
        "sign_no": "", "input": body,
    }


def valid_requests(at: datetime = NOW, psn_no: str = PERSONAL_MARKERS[0], *, fixmedins: str = FIXMEDINS,
                   admdvs: str = "150400", insuplc: str = "510421") -> list[dict[str, Any]]:
    """One valid envelope per body family the broker stores (each decodes without error at `at`)."""
    t = wire_time(at - timedelta(hours=1))
    drug = {"feedetl_sn": "000001", "fee_ocur_time": t, "med_list_codg": "TESTA001", "medins_list_codg": "P-1",
            "det_item_fee_sumamt": 20.5, "cnt": 1, "pric": 20.5}
    fee = {**drug, "mdtrt_id": "MFUZZ1", "psn_no": psn_no, "med_type": "21", "medins_list_codg": "H-1"}
    settle = {"psn_no": psn_no, "mdtrt_cert_type": "02", "mdtrt_cert_no": PERSONAL_MARKERS[2], "medfee_sumamt": 20.5,
              "mdtrt_id": "MFUZZ1", "insutype": "390"}
    bodies: dict[str, dict[str, Any]] = {
        "1101": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": PERSONAL_MARKERS[2],
                          "psn_name": PERSONAL_MARKERS[1]}},
        "2102": {"data": {"psn_no": psn_no, "mdtrt_cert_type": "01", "mdtrt_cert_no": "-", "begntime": t,
                          "medfee_sumamt": 20.5, "insutype": "310"}, "drugdetail": [drug]},
        "2201": {"data": {"psn_no": psn_no, "insutype": "310", "begntime": t, "mdtrt_cert_type": "01",
                          "mdtrt_cert_no": "-", "ipt_otp_no": "MZ1", "atddr_no": "D001", "dept_code": "K01"}},
        "2203": {"mdtrtinfo": {"mdtrt_id": "MFUZZ1", "psn_no": psn_no, "med_type": "11", "begntime": t,
                               "dise_codg": "I10"}},
        "2301": {"feedetail": [fee]},
        "2304": {"mdtrtinfo": settle},
        "2401": {"mdtrtinfo": {"psn_no": psn_no, "insutype": "390", "mdtrt_cert_type": "02",
                               "mdtrt_cert_no": PERSONAL_MARKERS[2], "med_type": "21", "ipt_otp_no": "ZY1",
                               "begntime": t, "atddr_no": "D001", "dise_codg": "I10",
                               "chfpdr_name": PERSONAL_MARKERS[1]},
                 "diseinfo": [{"diag_code": "I10", "diag_name": "hypertension"}]},
        "2402": {"dscginfo": {"mdtrt_id": "MFUZZ1", "psn_no": psn_no, "insutype": "390", "endtime": t}},
        "2403": {"adminfo": {"mdtrt_id": "MFUZZ1", "psn_no": psn_no, "dise_codg": "I11", "adm_bed": "12",
                             "main_cond_dscr": "stable", "coner_name": PERSONAL_MARKERS[1]},
                 "diseinfo": [{"diag_code": "I11", "diag_srt_no": 1, "diag_time": t, "dise_dor_no": "D001"}]},
        "2601": {"data": {"psn_no": psn_no, "omsgid": f"{fixmedins}{at:%Y%m%d%H%M%S}0001", "oinfno": "2304"}},
        "5203": {"data": {"psn_no": psn_no, "begntime": t, "endtime": wire_time(at), "page_num": 1,
                          "page_size": 20}},
        "3102": {"data": {"rule_ids": ["GENDER_RESTRICTED"], "trig_scen": "2", "syscode": "HIS", "patient_dtos": [{
            "patn_id": psn_no, "gend": "1", "brdy": "1958-03-06", "poolarea": "510421", "curr_mdtrt_id": "MFUZZ1",
            "fsi_encounter_dtos": [{
                "mdtrt_id": "MFUZZ1", "medins_id": fixmedins, "med_type": "21", "adm_date": t, "dscg_date": t,
                "fsi_diagnose_dtos": [{"dise_codg": "O80", "dise_name": PERSONAL_MARKERS[1], "maindise_flag": "1"}],
                "fsi_order_dtos": [{"rx_id": "RX1", "hilist_code": "TESTA001", "cnt": 2, "pric": 10.25,
                                    "sumamt": 20.5, "drord_begn_date": t}]}]}]}},
        "3103": {"data": {"jr_id": "0123456789abcdef0123456789abcdef", "warn_rslt_id": "W1", "patn_id": psn_no,
                          "dspo_way": "2", "dspo_way_rea": "changed the order"}},
        "2501": {"data": {"psn_no": psn_no, "filing_type": "TEMPORARY", "begndate": at.date().isoformat(),
                          "enddate": (at.date() + timedelta(days=30)).isoformat(), "target_admdvs": "150000",
                          "promise_flag": "1"}},
    }
    return [envelope(infno, body, at, fixmedins=fixmedins, admdvs=admdvs, insuplc=insuplc)
            for infno, body in bodies.items()]


_DEFAULT_BASE = valid_requests()

# Raw JSON number texts no decimal context holds, or outside every bound.
HOSTILE_NUMBERS = ("1E+999999999", "-1E+999999999", "1E-999999999", "123456789012345678901234567890.123",
                   "1.005", "0.001", "-0.01", "99999999999999999999", "1e400", "-0", "1E+2", "0.0000")
# Characters storage refuses or that break naive code.
HOSTILE_CHARS = ("\x00", "\x01", "\x1f", "\x7f", "\n", "\t", "\u2028", "\ufeff", "\u202e", "'", '"', "\\", "%s")
HOSTILE_DATES = ("0001-01-01", "1900-01-01", "1970-01-01", "2100-01-01", "9999-12-31", "2026-02-30", "2026-13-01")

_NUMBER_SENTINEL = "__fuzz_number_{}__"


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in a JSON-like tree (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_DELETE = object()


def _nested(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


# Strategies built once (building them per draw costs more than the draws themselves).
_SHORT_TEXT = st.text(max_size=20)
_HOSTILE_CHAR = st.sampled_from(HOSTILE_CHARS)
_KIND = st.sampled_from(("text", "number", "date", "time", "nest", "type", "long", "delete", "unicode"))
_NUMBER = st.sampled_from(HOSTILE_NUMBERS).map(_NUMBER_SENTINEL.format)
_DATE = st.sampled_from(HOSTILE_DATES)
_TIME = st.builds("{} {}".format, st.sampled_from((*HOSTILE_DATES, "2026-11-23")),
                  st.sampled_from(("00:00:00", "23:59:59", "24:00:00", "10:00")))
_NEST = st.integers(1, 60).map(lambda depth: _nested(depth))
_WRONG_TYPE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
_LONG = st.integers(30, 3000).map(lambda n: "9" * n)
_UNICODE = st.text(min_size=1, max_size=30)


@st.composite
def hostile_value(draw: st.DrawFn) -> Any:
    kind = draw(_KIND)
    if kind == "text":
        base = draw(_SHORT_TEXT)
        pos = draw(st.integers(0, len(base)))
        return base[:pos] + draw(_HOSTILE_CHAR) + base[pos:]
    if kind == "delete":
        return _DELETE
    strategy = {"number": _NUMBER, "date": _DATE, "time": _TIME, "nest": _NEST, "type": _WRONG_TYPE,
                "long": _LONG, "unicode": _UNICODE}[kind]
    return draw(strategy)


_HOSTILE_VALUE = hostile_value()
_MUTATIONS = st.integers(1, 3)
_ON_BODY = st.integers(0, 2)


def _encode(env: dict[str, Any]) -> bytes:
    text = json.dumps(env, ensure_ascii=False)
    for number in HOSTILE_NUMBERS:
        text = text.replace(json.dumps(_NUMBER_SENTINEL.format(number)), number)
    return text.encode("utf-8", errors="surrogatepass")


@st.composite
def mutated_request(draw: st.DrawFn, base: list[dict[str, Any]] | None = None) -> bytes:
    """A valid envelope with 1-3 values replaced by hostile ones (or a field deleted)."""
    env = json.loads(json.dumps(draw(st.sampled_from(base or _DEFAULT_BASE))))
    env["msgid"] = msgid(env["fixmedins_code"])
    for _ in range(draw(_MUTATIONS)):
        paths = _paths(env)
        body_paths = [p for p in paths if p[0] == "input" and len(p) > 1]
        # Two in three mutations hit the body, where most fields are; hypothesis favours early elements.
        on_body = bool(body_paths) and draw(_ON_BODY) > 0
        path = draw(st.sampled_from(body_paths if on_body else paths))
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier mutation removed the parent
            _set(env, path, draw(_HOSTILE_VALUE))
    return _encode(env)


@st.composite
def corrupted_bytes(draw: st.DrawFn, base: list[dict[str, Any]] | None = None) -> bytes:
    """A valid envelope's bytes, corrupted: a byte that is not UTF-8, truncated, bytes replaced or
    inserted, or wrapped in deep nesting."""
    raw = _encode(draw(st.sampled_from(base or _DEFAULT_BASE)))
    kind = draw(st.sampled_from(("invalid_utf8", "truncate", "flip", "insert", "deep")))
    pos = draw(st.integers(0, len(raw)))
    if kind == "invalid_utf8":
        bad = draw(st.sampled_from((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80")))
        return raw[:pos] + bad + raw[pos:]
    if kind == "truncate":
        return raw[:pos]
    if kind == "flip":
        return raw[:pos] + bytes([draw(st.integers(0, 255))]) + raw[pos + 1:]
    if kind == "insert":
        return raw[:pos] + draw(st.binary(min_size=1, max_size=8)) + raw[pos:]
    depth = draw(st.integers(17, 2000))
    return b"[" * depth + raw + b"]" * depth if draw(st.booleans()) else raw.replace(
        b'"input":', b'"input":' + b"[" * depth, 1) + b"]" * depth


def random_json() -> st.SearchStrategy[bytes]:
    """Any JSON value at all, or any bytes."""
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=12,
    )
    return st.one_of(values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))


def hostile_request(base: list[dict[str, Any]] | None = None) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated_request(base), mutated_request(base), corrupted_bytes(base), random_json())
