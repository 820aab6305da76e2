"""The router's views, pure: applying the ordered change log, and routing over one batch's persons."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from loadtest.his import Hospital, Stay
from schemas.codec import decode_request, encode
from schemas.errors import BrokerError
from services.common.shards import parse_shard_map
from services.refdata.regions import Region
from services.refdata.store import (
    CatalogEntry,
    ChangedRows,
    Filing,
    Person,
    RefChange,
    RefData,
    RefView,
    apply_changes,
    catalog_key,
)
from services.refdata.store import Hospital as HospitalRef
from services.router.logic import IngressMeta, RefdataChange, Routed, route
from services.router.store import _into_batch

H1, H2 = HospitalRef("150400", 3, "赤峰市医院"), HospitalRef("510421", 2, "米易县人民医院")
ITEM = CatalogEntry("01", Decimal("0"), None, "甲")
ITEM_DEAR = CatalogEntry("02", Decimal("0.10"), 10_000, "乙")
SHARDS = parse_shard_map("s1=11,12,13,14,15,21,22,23,31,32,33,34,35,36,37;"
                         "s2=41,42,43,44,45,46,50,51,52,53,54,61,62,63,64,65")


def view(version: int = 0) -> RefView:
    return RefView(hospitals={"H1": H1}, catalog={("150000", "A1"): ITEM}, version=version)


def test_changes_apply_in_version_order_and_only_the_changed_keys() -> None:
    v = view(version=3)
    rows = ChangedRows(hospitals={"H2": H2}, catalog={("150000", "A1"): ITEM_DEAR},
                       regions={"150421": Region("150421", "阿鲁科尔沁旗", "150000", "150400")})
    changes = [RefChange(6, "region", "150421"), RefChange(4, "hospital", "H2"),
               RefChange(5, "catalog_item", "150000:A1")]
    assert apply_changes(v, changes, rows) == 3
    assert v.version == 6
    assert v.hospitals == {"H1": H1, "H2": H2}
    assert v.catalog == {("150000", "A1"): ITEM_DEAR}
    assert v.regions["150421"].pool_admdvs == "150400"


def test_a_key_without_a_row_is_removed() -> None:
    v = view(version=1)
    assert apply_changes(v, [RefChange(2, "hospital", "H1"), RefChange(3, "catalog_item", "150000:A1")],
                         ChangedRows()) == 2
    assert (v.hospitals, v.catalog, v.version) == ({}, {}, 3)


def test_changes_already_applied_are_skipped_and_the_version_never_goes_back() -> None:
    v = view(version=10)
    # The snapshot at version 10 already holds H1 as it is; an older change of H1 (no row now) is not re-applied.
    assert apply_changes(v, [RefChange(9, "hospital", "H1"), RefChange(10, "hospital", "H2")], ChangedRows()) == 0
    assert v.version == 10 and v.hospitals == {"H1": H1}
    assert apply_changes(v, [], ChangedRows()) == 0
    assert v.version == 10


def test_unknown_entity_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown entity 'person'"):
        apply_changes(view(), [RefChange(1, "person", "P1")], ChangedRows())


def test_catalog_key() -> None:
    assert catalog_key("510000:TESTA001") == ("510000", "TESTA001")


# Routing over a batch view -------------------------------------------------------------------------

META = IngressMeta(reply_topic="fsi.replies", reply_partition=0, received_ns=0)
CHIFENG = Hospital("H1", "赤峰市医院", "150400")
MIYI_PERSON = Person("510421", "390", "1501", None, 0, frozenset({"HTN"}))
CHIFENG_PERSON = Person("150400", "310", "1101", None, 80_000, frozenset())


def batch(**persons: Person) -> RefData:
    v = view()
    return RefData(hospitals=v.hospitals, catalog=v.catalog, persons=dict(persons),
                   filings={p: [] for p in persons}, shard_of=SHARDS.shard_of)


def admit(psn_no: str, insuplc: str, insutype: str) -> object:
    s = Stay(CHIFENG, psn_no, insuplc, insutype, datetime(2026, 5, 1, 8))
    return route(decode_request(encode(s.admit())), batch(P1=MIYI_PERSON, P2=CHIFENG_PERSON), META, 10)


def test_persons_of_both_shards_route_in_one_batch() -> None:
    miyi, chifeng = admit("P1", "510421", "390"), admit("P2", "150400", "310")
    assert isinstance(miyi, Routed) and isinstance(chifeng, Routed)
    assert (miyi.request.scope, miyi.request.person.insured_prov) == ("cross_province", "510000")
    assert (chifeng.request.scope, chifeng.request.person.acct_balc_fen) == ("local", 80_000)


def test_a_person_of_another_shard_is_unknown_one_of_the_same_shard_mismatches() -> None:
    with pytest.raises(BrokerError) as other_shard:
        admit("P1", "150400", "390")  # P1 is insured in 510421 (s2); the request names 赤峰 (s1)
    assert other_shard.value.code == "PERSON_UNKNOWN"
    with pytest.raises(BrokerError) as same_shard:
        admit("P1", "510100", "390")  # 成都: the same shard as 米易, another region
    assert same_shard.value.code == "INSUPLC_MISMATCH"
    with pytest.raises(BrokerError) as nobody:
        admit("P9", "510421", "390")
    assert nobody.value.code == "PERSON_UNKNOWN"


def test_a_change_in_the_batch_is_seen_by_its_later_records() -> None:
    ref = batch(P1=MIYI_PERSON)
    f = Filing("F2", "TEMPORARY", datetime(2026, 5, 1).date(), datetime(2026, 10, 1).date(), "150000", "promise")
    _into_batch(ref, RefdataChange("P1", {}, new_filing=f), None)
    _into_batch(ref, RefdataChange("P1", {}, new_filing=f), None)  # a replay adds nothing
    assert ref.filings["P1"] == [f]
    _into_batch(ref, RefdataChange("P1", {}, revoke_filing_id="F2"), None)
    assert [x.revoked for x in ref.filings["P1"]] == [True]
    _into_batch(ref, RefdataChange("P1", {}, chronic_disease="DM", chronic_grant=True), ["DM", "HTN"])
    assert ref.persons["P1"].chronic == frozenset({"DM", "HTN"})
