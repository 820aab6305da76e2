"""The treating region's agency (经办机构) as a sender: institution code `A` + pooling admdvs + `00000`.

An agency holds a key like an institution (issued with `services.refdata.keys`) but has no hospital
row: its region comes from its code, which must name a known pooling region (统筹区). It may send
only sign-in/out and the clearing details of its region's institutions (`schemas.transactions.may_send`).
"""

from __future__ import annotations

import re

from services.refdata.regions import UnknownRegion, region_of

_AGENCY_CODE = re.compile(r"^A([0-9]{6})00000$")


def is_agency_code(code: str) -> bool:
    """The code has an agency's shape (its region is not checked)."""
    return _AGENCY_CODE.match(code) is not None


def agency_pool(code: str) -> str | None:
    """The pooling region of agency `code`; None when `code` is not an agency's. Raises UnknownRegion when
    the code has an agency's shape but its region is not a known pooling region."""
    m = _AGENCY_CODE.match(code)
    if m is None:
        return None
    admdvs = m.group(1)
    if region_of(admdvs).pool_admdvs != admdvs:
        raise UnknownRegion("an agency code names a region that is not a pooling region")
    return admdvs


def agency_code(pool_admdvs: str) -> str:
    """The agency code of a pooling region (for tools and tests)."""
    code = f"A{pool_admdvs}00000"
    agency_pool(code)
    return code
