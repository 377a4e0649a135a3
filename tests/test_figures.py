"""The figures in README.md, docs/ and benchmarks/README.md against the results files they cite.

The convention is written at the top of benchmarks/README.md: a table of figures is preceded by
`<!-- results: benchmarks/results-x.json[#dotted.keys] -->`, and every number in its rows must be in that file at
the precision printed, or be derived from its own row (a ratio of two of its numbers, a mean or standard deviation
of one of its cells). Pure file reading: no torch, no benchmark run.
"""

import json
import math
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

CITE = re.compile(r"<!--\s*results:\s*(?P<path>\S+?\.json)(?:#(?P<part>[\w.\-/]+))?\s*-->")
# A number as printed: not inside a word ("ResNet-18", "x86_64"), not the first half of a compound ("2-core",
# "12-MP"); thousands commas allowed.
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?!\.?\d)(?!-[A-Za-z])")
COMMIT = re.compile(r"(?<![\w-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-])")
PROVENANCE = ("commit", "cpu", "torch", "command")


@pytest.fixture(autouse=True)
def _torch_flags_restored():
    """conftest's guard of torch's switches, not needed here: these tests never import torch (seconds saved)."""
    yield


class Printed:
    """One number as printed: its value and the half-unit of its last decimal (what rounding may have hidden)."""

    def __init__(self, match: re.Match, text: str):
        whole, decimals = match.group(1).replace(",", ""), match.group(2) or ""
        self.text = match.group(0)
        self.value = float(f"{whole}.{decimals}" if decimals else whole)
        self.half = 0.5 * 10 ** -len(decimals)
        self.percent = text[match.end():].lstrip().startswith("%")

    def shows(self, value: float) -> bool:
        """Whether `value`, rounded as this number is printed, prints as it."""
        candidates = [value, value * 100] if self.percent else [value]
        return any(abs(v - self.value) <= self.half * (1 + 1e-9) + 1e-12 for v in candidates)


def numbers_in(text: str) -> list[Printed]:
    """The numbers a reader sees in a table cell (backticked code left out)."""
    text = re.sub(r"`[^`]*`", " ", text)
    return [Printed(m, text) for m in NUMBER.finditer(text)]


def file_numbers(node) -> list[float]:
    """Every number in a JSON value, numbers inside strings included ("load 3-4", "0.967 in 12 s")."""
    if isinstance(node, bool):
        return []
    if isinstance(node, (int, float)):
        return [float(node)]
    if isinstance(node, str):
        return [float(m.group(0)) for m in re.finditer(r"\d+(?:\.\d+)?", node)]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return [n for child in children for n in file_numbers(child)]


def file_keys(node) -> set[str]:
    """Every key at any depth of a JSON value."""
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in file_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in file_keys(v)}
    return set()


def derived(p: Printed, row: list[list[Printed]], cell: int) -> bool:
    """Whether `p` is a ratio of two other numbers of its row, or the mean or sd of another cell's numbers."""
    others = [q for i, cell_numbers in enumerate(row) if i != cell for q in cell_numbers]
    for a in others:
        for b in others:
            if a is not b and b.value - b.half > 0:
                low, high = (a.value - a.half) / (b.value + b.half), (a.value + a.half) / (b.value - b.half)
                if low - p.half <= p.value <= high + p.half:
                    return True
    for i, cell_numbers in enumerate(row):
        values = [q.value for q in cell_numbers]
        if i == cell or len(values) < 2:
            continue
        slack = max(q.half for q in cell_numbers) + p.half
        spreads = (statistics.mean(values), statistics.pstdev(values), statistics.stdev(values))
        if any(abs(p.value - s) <= slack * (1 + 1e-9) for s in spreads):
            return True
    return False


def cited_tables():
    """(doc, line number, results path, part, table rows) for every table that cites a results file."""
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        fenced = False
        for at, line in enumerate(lines):
            fenced ^= line.lstrip().startswith("```")
            cite = None if fenced else CITE.search(line)
            if not cite:
                continue
            rows, j = [], at + 1
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(lines[j])
                j += 1
            yield doc, at + 1, cite.group("path"), cite.group("part"), rows, lines[:at]


TABLES = list(cited_tables())


def _id(table) -> str:
    doc, line, path, part, *_ = table
    return f"{doc.relative_to(ROOT)}:{line}:{Path(path).name}{'#' + part if part else ''}"


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _part(data, part: str | None):
    for key in part.split(".") if part else []:
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def mismatches(rows: list[str], data, raw: str) -> list[str]:
    """Each printed number of the table's body that neither the file nor its row backs."""
    known = file_numbers(data)
    wrong = []
    for row in rows[2:]:  # header and |---| line
        numbers = [numbers_in(c) for c in cells(row)]
        for i, cell_numbers in enumerate(numbers):
            for p in cell_numbers:
                if not any(p.shows(v) for v in known) and not derived(p, numbers, i):
                    wrong.append(f"{p.text!r} in row {cells(row)[0]!r}")
        for sha in COMMIT.findall(re.sub(r"`[^`]*`", " ", row)):
            if sha not in raw:
                wrong.append(f"commit {sha} in row {cells(row)[0]!r}")
    return wrong


def test_tables_cite_results_files():
    assert TABLES, "no table cites a results file: the convention is at the top of benchmarks/README.md"


@pytest.mark.parametrize("table", TABLES, ids=_id)
def test_table_matches_its_results_file(table):
    doc, line, path, part, rows, _ = table
    results = (doc.parent / path) if not path.startswith("benchmarks/") else ROOT / path
    assert results.is_file(), f"{_id(table)}: {path} does not exist"
    raw = results.read_text()
    assert len(rows) > 2, f"{_id(table)}: the comment is not followed by a table"
    wrong = mismatches(rows, _part(json.loads(raw), part), raw)
    assert not wrong, f"{_id(table)}: numbers not in {path}: " + "; ".join(wrong)


@pytest.mark.parametrize("table", TABLES, ids=_id)
def test_table_file_records_provenance_or_is_history(table):
    doc, line, path, part, rows, before = table
    results = ROOT / path if path.startswith("benchmarks/") else doc.parent / path
    keys = file_keys(json.loads(results.read_text()))
    missing = [k for k in PROVENANCE if k not in keys] + ([] if any(k.startswith("load") for k in keys) else ["load"])
    if not missing:
        return
    heading = max((i for i, text in enumerate(before) if text.startswith("#")), default=0)
    section = "\n".join(before[heading:]).lower()
    assert "history: measured" in section, (
        f"{_id(table)}: {path} records no {', '.join(missing)}; re-run it, or say 'history: measured <date> on "
        f"<machine>' before the table")


def test_a_changed_digit_fails():
    """The check itself: a digit changed in a cited table is caught."""
    doc, line, path, part, rows, _ = next(t for t in TABLES if len(t[4]) > 2)
    raw = (ROOT / path).read_text() if path.startswith("benchmarks/") else (doc.parent / path).read_text()
    data = _part(json.loads(raw), part)
    for r, row in enumerate(rows[2:], start=2):
        for p in (q for c in cells(row) for q in numbers_in(c)):
            if p.half < 0.5 and not math.isclose(p.value, 0):
                digit = p.text.rstrip("%xsMB ")[-1]
                changed = p.text[: len(p.text.rstrip("%xsMB ")) - 1] + str((int(digit) + 3) % 10)
                bad = rows[:r] + [row.replace(p.text, changed, 1)] + rows[r + 1:]
                assert mismatches(bad, data, raw), f"{p.text} -> {changed} in {_id((doc, line, path, part))} passed"
                return
    pytest.fail("no decimal figure found to change")
