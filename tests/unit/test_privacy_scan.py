"""The privacy log scan finds what is planted, says where and what kind, and never echoes it."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.refdata import certno_check_char
from tests import privacy

PSN = "T1234567890001"
CERTNO = "15040019580306123" + certno_check_char("15040019580306123")
NAME = "张伟强"


def population() -> privacy.Population:
    pop = privacy.Population()
    pop.add_person(PSN, CERTNO, NAME)
    pop.add_person("PX1", None, None)  # too short to search: counted, not searched
    return pop


def test_planted_identifiers_are_reported_by_file_line_and_kind_never_by_value(tmp_path: Path) -> None:
    log = tmp_path / "router.log"
    log.write_text("\n".join([
        "INFO router: batch of 12 records",                                   # 1 clean
        f"WARNING router: person {PSN} unknown",                              # 2 psn_no
        f"DEBUG raw={{\"mdtrt_cert_no\":\"X{CERTNO}\"}}",                     # 3 certno inside a token
        "ERROR " + json.dumps({"psn_name": NAME}),                            # 4 a name, \\u-escaped by json
        f"INFO {NAME[:2]}",                                                   # 5 part of a name: not the name
        "INFO PX1 P0000001 ok",                                               # 6 too short / not a person
        f"INFO {PSN}{CERTNO} {NAME}",                                         # 7 all three
    ]) + "\n", encoding="utf-8")
    pop = population()
    report = privacy.scan([(log, 0)], pop)
    assert [(f.line, f.kind) for f in report.findings] == [
        (2, "psn_no"), (3, "certno"), (4, "name"), (7, "certno"), (7, "name"), (7, "psn_no")]
    assert report.files == 1 and report.bytes == log.stat().st_size
    text = "\n".join(map(str, report.findings)) + report.summary(pop)
    assert str(log) in text and "router.log:2: a psn_no of the test population" in text
    for value in (PSN, CERTNO, NAME, NAME[:2]):
        assert value not in text
    assert "1 too short to search" in report.summary(pop) and "3 identifiers" in report.summary(pop)


def test_only_what_was_appended_is_scanned_with_absolute_line_numbers(tmp_path: Path) -> None:
    log = tmp_path / "kafka.log"
    log.write_text(f"before the session: {PSN}\nstill before\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("during the session\n" f"leaked {PSN}\n")
    report = privacy.scan([(log, start)], population())
    assert [(f.line, f.kind) for f in report.findings] == [(4, "psn_no")]
    assert report.bytes == log.stat().st_size - start
    assert privacy.scan([(log, log.stat().st_size)], population()).files == 0  # nothing new: not counted


def test_the_population_is_read_from_persons_files_and_the_session_logs_are_found(tmp_path: Path) -> None:
    persons = tmp_path / "persons.jsonl"
    persons.write_bytes(json.dumps({"psn_no": PSN, "certno": CERTNO, "psn_name": NAME}).encode() + b"\n"
                        + b"{not json\n" + json.dumps({"psn_no": "P15040000000001"}).encode() + b"\n")
    pop = privacy.Population()
    pop.add_persons_file(persons)
    assert pop.values == {"certno": {CERTNO}, "name": {NAME}, "psn_no": {PSN, "P15040000000001"}}

    state_logs, run_dir = tmp_path / "state" / "logs", tmp_path / "state" / "runs" / "t1"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "supervisor").mkdir()
    state_logs.mkdir(parents=True)
    (state_logs / "kafka.log").write_text("old\n")
    sizes = privacy.log_sizes(state_logs)
    (state_logs / "kafka.log").write_text("old\nnew\n")
    (state_logs / "postgres.log").write_text("new file\n")
    (run_dir / "logs" / "settle.log").write_text("x\n")
    (run_dir / "supervisor" / "supervisord.log").write_text("y\n")
    assert privacy.session_logs(run_dir, state_logs, sizes) == sorted([
        (state_logs / "kafka.log", 4), (state_logs / "postgres.log", 0), (run_dir / "logs" / "settle.log", 0),
        (run_dir / "supervisor" / "supervisord.log", 0)])
