"""What each reader of `fsi.settlements` decodes of a settlement event (`schemas.internal.SettlementEvent`).

msgspec skips the fields a Struct does not name without building them: a reader that names only its own
fields pays nothing for the rest — above all the visit's facts and fee items, which the monitoring stream
needs and nobody else. Field names and types are the event's own, so a record the full type refuses for
one of these fields is refused here alike.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.codes import Scope


class ClearingEventView(msgspec.Struct, kw_only=True):
    """The clearing service's part of a settlement event: the ledger row's keys, regions and fund amounts
    (fen), and what a dead letter names. No person identifier, no visit."""

    setl_id: str
    kind: Literal["settle", "reverse"]
    msgid: str
    mdtrt_id: str
    fixmedins_code: str
    insutype: str
    med_type: str
    scope: Scope
    insured_admdvs: str
    treating_admdvs: str
    setl_time: str
    medfee_sumamt: int
    hifp_pay: int
    hifmi_pay: int
    hifob_pay: int
    maf_pay: int
    fund_pay_sumamt: int
