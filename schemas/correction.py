"""2601 冲正 (correction): undo a transaction by its msgid, what a hospital sends when it does not know
whether the original went through (its HTTP call timed out). README "Corrections (2601)"."""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.envelope import InfNo, MsgId
from schemas.inpatient import PsnNo

# What a correction undid: the registry's `undo` of the original's infno (schemas/transactions.py), or
# "none" when the original was refused and so changed nothing.
Undone = Literal["reverse", "cancel_visit", "cancel_discharge", "withdraw_fees", "none"]


class CorrectionRef(msgspec.Struct, kw_only=True):
    psn_no: PsnNo  # the original's person: the correction lands on the original's partition and shard
    omsgid: MsgId  # the original's msgid
    oinfno: InfNo  # the original's infno


class Input2601(msgspec.Struct, kw_only=True, tag=True):
    data: CorrectionRef


class CorrectionResult(msgspec.Struct, kw_only=True):
    omsgid: str
    oinfno: str
    undone: Undone
    mdtrt_id: str = ""  # the original's visit ("" when nothing was undone)
    fees_cancelled: int = 0  # withdraw_fees: how many of the upload's items this correction cancelled


class Output2601(msgspec.Struct, kw_only=True):
    """The answer when the original was not a settlement; a settlement's correction answers its
    reversal's `setlinfo` / `setldetail`, as 2208/2305/2103 do."""

    data: CorrectionResult
