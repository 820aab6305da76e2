"""The national platform's request and response envelope (REFERENCE §2).

The request's `input` stays raw here; `schemas.codec` decodes it with the body
type its `infno` names, so a body error is reported under `input`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from schemas.wire import Admdvs, Code, Text, WireTime, check_times

MsgId = Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{30}$")]
InfNo = Annotated[str, Meta(pattern=r"^[0-9]{4}$")]


class RequestEnvelope(msgspec.Struct, kw_only=True):
    infno: InfNo
    msgid: MsgId
    mdtrtarea_admvs: Admdvs
    insuplc_admdvs: Annotated[str, Meta(pattern=r"^([0-9]{6})?$")] = ""
    recer_sys_code: Code
    dev_no: Annotated[str, Meta(max_length=100)] = ""
    dev_safe_info: Annotated[str, Meta(max_length=500)] = ""
    cainfo: Annotated[str, Meta(max_length=2000)] = ""
    signtype: Annotated[str, Meta(max_length=20)] = ""
    infver: Code
    opter_type: Annotated[str, Meta(pattern=r"^[123]$")]
    opter: Code
    opter_name: Text
    inf_time: WireTime
    fixmedins_code: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{1,20}$")]
    fixmedins_name: Text
    sign_no: Annotated[str, Meta(max_length=64)] = ""
    input: msgspec.Raw

    def __post_init__(self) -> None:
        check_times(self, "inf_time")


class ResponseEnvelope(msgspec.Struct, kw_only=True, omit_defaults=False):
    infcode: int
    inf_refmsgid: str
    refmsg_time: str
    respond_time: str
    err_msg: str = ""
    warn_msg: str = ""
    output: Any = None
