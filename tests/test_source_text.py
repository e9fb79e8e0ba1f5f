"""The package's own text points at things a reader has: a paper or a reason, never a tracker
issue number, and no file that is not in the repository (DESIGN.md, conventions: cite the paper
for each schedule, formula and recovery rule)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "spotpipe").rglob("*.py"))

ISSUE_NUMBER = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)
NOTES_FILE = re.compile(r"\bnotes/[\w.-]+\.md\b")


def _hits(pattern: re.Pattern[str], paths: list[Path]) -> list[str]:
    """Every ``file:line: text`` of ``paths`` where ``pattern`` matches.

    Args:
        pattern: What to look for.
        paths: Python files to read (UTF-8).

    Returns:
        One entry per matching line, the path relative to the repository root.
    """
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_the_walk_finds_the_package() -> None:
    assert len(SOURCES) > 50 and ROOT / "src" / "spotpipe" / "cli.py" in SOURCES


def test_no_source_cites_a_tracker_issue_number() -> None:
    """A reader of the code cannot open the tracker: say the reason (or cite the paper) instead."""
    assert _hits(ISSUE_NUMBER, SOURCES) == []


def test_no_source_points_to_a_notes_file_the_repository_lacks() -> None:
    paths = SOURCES + sorted((ROOT / "tests").rglob("*.py"))
    named = {name for path in paths for name in NOTES_FILE.findall(path.read_text(encoding="utf-8"))}
    assert sorted(name for name in named if not (ROOT / name).exists()) == []
