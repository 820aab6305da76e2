"""Building the national response envelope (REFERENCE §2)."""

from __future__ import annotations

import itertools
import os
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from schemas.codec import encode
from schemas.envelope import ResponseEnvelope

SHANGHAI = ZoneInfo("Asia/Shanghai")
# Receiver sequence: 3 digits of the pid + 7 of a counter, unique per process restart window.
_seq = itertools.count(1)
_PID3 = f"{os.getpid() % 1000:03d}"


def _now() -> datetime:
    return datetime.now(SHANGHAI)


def stamp_ms(t: datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S") + f"{t.microsecond // 1000:03d}"


def response_bytes(
    receiver_admdvs: str,
    received: datetime,
    *,
    output: Any = None,
    err_msg: str = "",
    warn_msg: str = "",
) -> bytes:
    now = _now()
    refmsgid = f"{receiver_admdvs or '000000'}{now.strftime('%Y%m%d%H%M%S')}{_PID3}{next(_seq) % 10**7:07d}"
    env = ResponseEnvelope(
        infcode=-1 if err_msg else 0,
        inf_refmsgid=refmsgid,
        refmsg_time=stamp_ms(received),
        respond_time=stamp_ms(now),
        err_msg=err_msg,
        warn_msg=warn_msg,
        output=output if output is not None else {},
    )
    return encode(env)


def received_from_ns(received_ns: int) -> datetime:
    return datetime.fromtimestamp(received_ns / 1e9, SHANGHAI)
