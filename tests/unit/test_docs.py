"""The README documents what the code does."""

from __future__ import annotations

from schemas.errors import readme_with_table
from services.common.config import PROJECT_ROOT


def test_readme_error_table_matches_the_code() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == readme_with_table(readme), "run: python -m schemas.errors --write README.md"


def test_readme_gives_exactly_two_setup_commands() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["./demo.sh", "./test.sh"]
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert "./test.sh" in ci
