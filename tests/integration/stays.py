"""An inpatient stay at fixed times, message by message, for the mid-stay and policy-version tests:
every message carries its own inf_time (the settlement date decides the policy version and the year)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from loadtest.his import FeeLine, GatewayClient, Hospital, wire_time
from tests.integration.conftest import TestPerson


@dataclass
class TimedStay:
    client: GatewayClient
    hospital: Hospital
    person: TestPerson
    mdtrt_id: str = ""
    next_sn: int = 1
    uploaded: list[str] = field(default_factory=list)  # feedetl_sn in upload order

    async def call(self, infno: str, body: dict[str, Any], at: datetime) -> dict[str, Any]:
        env = self.hospital.envelope(infno, body, insuplc=self.person.insuplc, inf_time=at)
        return await self.client.call(env)

    async def admit(self, at: datetime) -> None:
        r = await self.call("2401", {"mdtrtinfo": {
            "psn_no": self.person.psn_no, "insutype": self.person.insutype, "mdtrt_cert_type": "02",
            "mdtrt_cert_no": "-", "med_type": "21", "ipt_otp_no": f"ZY{at:%m%d%H%M%S}", "begntime": wire_time(at),
            "atddr_no": "D001", "chfpdr_name": "doctor", "adm_diag_dscr": "-", "dise_codg": "I10.x00",
            "dise_name": "-", "promise_filing_flag": "0", "emergency_flag": "0",
        }, "diseinfo": []}, at)
        assert r["infcode"] == 0, r["err_msg"]
        self.mdtrt_id = r["output"]["result"]["mdtrt_id"]

    async def upload(self, lines: list[FeeLine], at: datetime) -> list[str]:
        """Uploads the lines (new feedetl_sn each); returns their feedetl_sn."""
        sns = [f"{self.next_sn + i:06d}" for i in range(len(lines))]
        self.next_sn += len(lines)
        items = [{
            "feedetl_sn": sn, "mdtrt_id": self.mdtrt_id, "psn_no": self.person.psn_no, "med_type": "21",
            "fee_ocur_time": wire_time(at), "med_list_codg": line.med_list_codg,
            "medins_list_codg": "H-" + line.med_list_codg, "det_item_fee_sumamt": line.amount, "cnt": line.cnt,
            "pric": line.pric, "bilg_dept_codg": "D01", "bilg_dr_codg": "D001",
        } for sn, line in zip(sns, lines, strict=True)]
        r = await self.call("2301", {"feedetail": items}, at)
        assert r["infcode"] == 0, r["err_msg"]
        self.uploaded += sns
        return sns

    async def discharge(self, at: datetime) -> dict[str, Any]:
        return await self.call("2402", {"dscginfo": {
            "mdtrt_id": self.mdtrt_id, "psn_no": self.person.psn_no, "insutype": self.person.insutype,
            "endtime": wire_time(at), "dscg_way": "1"}}, at)

    async def settle(self, medfee: Decimal, at: datetime, *, mid: bool, pre: bool = False) -> dict[str, Any]:
        return await self.call("2303" if pre else "2304", {"mdtrtinfo": {
            "psn_no": self.person.psn_no, "mdtrt_cert_type": "02", "mdtrt_cert_no": "-", "medfee_sumamt": medfee,
            "psn_setlway": "01", "mdtrt_id": self.mdtrt_id, "insutype": self.person.insutype, "acct_used_flag": "0",
            "mid_setl_flag": "1" if mid else "0", "promise_filing_flag": "0"}}, at)

    async def reverse(self, setl_id: str, at: datetime) -> dict[str, Any]:
        return await self.call("2305", {"data": {"psn_no": self.person.psn_no, "mdtrt_id": self.mdtrt_id,
                                                 "setl_id": setl_id}}, at)

    async def cancel_fees(self, sns: list[str], at: datetime) -> dict[str, Any]:
        return await self.call("2302", {"data": [{"feedetl_sn": sn, "mdtrt_id": self.mdtrt_id,
                                                  "psn_no": self.person.psn_no} for sn in sns]}, at)

    async def cancel_admission(self, at: datetime) -> dict[str, Any]:
        return await self.call("2404", {"data": {"mdtrt_id": self.mdtrt_id, "psn_no": self.person.psn_no}}, at)


def refused(r: dict[str, Any], code: str) -> bool:
    return r["infcode"] == -1 and r["err_msg"].startswith(code)
