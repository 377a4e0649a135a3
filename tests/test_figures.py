"""The figures in README.md, docs/ and benchmarks/README.md against the results files they cite.

The convention is written at the top of benchmarks/README.md: a table of figures is preceded by
`<!-- results: benchmarks/results-x.json[#dotted.keys][, more files] [ratios: 4 = 3/2; ...] -->`, and every number
in its rows must be in those files at the precision printed, in a record of the file that holds two more of the
row's numbers, or be a ratio of two of its columns as the comment says. A table whose file does not record commit,
CPU, torch, load and command is marked as history. Pure file reading, no torch: about a second.
"""

import bisect
import functools
import itertools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

CITE = re.compile(r"<!--\s*results:\s*(?P<cites>[^;\]]*?\.json[^\s,]*(?:\s*,\s*\S+\.json[^\s,]*)*)"
                  r"(?:\s+ratios:\s*(?P<ratios>[\d\s=/,;]+?))?\s*-->")
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

    def __init__(self, match: re.Match, text: str, unit: str = ""):
        whole, decimals = match.group(1).replace(",", ""), match.group(2) or ""
        self.text = match.group(0)
        self.value = float(f"{whole}.{decimals}" if decimals else whole)
        self.half = 0.5 * 10 ** -len(decimals)
        after = text[match.end():].lstrip()
        self.percent = "%" in text  # "5-7 %", "3.8 % (1.3-10.6)": the cell's figures are percentages or not
        # seconds printed may be milliseconds in the file and the other way; the unit may be the column's
        printed = re.match(r"(m?s|min)\b", after)
        self.scale = {"s": 1 / 1000, "ms": 1000.0, "min": 1 / 60}.get(printed.group(0) if printed else unit, 1.0)

    def found_in(self, values: list[float]) -> bool:
        """Whether one of `values` (sorted), rounded as this number is printed, prints as it."""
        low, high = self.value - self.half * (1 + 1e-9) - 1e-12, self.value + self.half * (1 + 1e-9) + 1e-12
        scales = {1.0, self.scale} | ({100.0} if self.percent else set())  # min: the file holds seconds
        return any(bisect.bisect_left(values, low / k) < bisect.bisect_right(values, high / k) for k in scales)

    def is_ratio_of(self, a: "Printed", b: "Printed") -> bool:
        """Whether a / b, for any values a and b could have had before rounding, prints as this number."""
        if b.value - b.half <= 0:
            return False
        low, high = (a.value - a.half) / (b.value + b.half), (a.value + a.half) / (b.value - b.half)
        return low - self.half <= self.value <= high + self.half


def numbers_in(text: str, header: str = "") -> list[Printed]:
    """The numbers a reader sees in a table cell (backticked code left out); `header` is its column's."""
    text = re.sub(r"`[^`]*`", " ", text)
    unit = next((u for u, pattern in (("ms", r"\bms\b"), ("s", r"\b(s|seconds)\b")) if re.search(pattern, header)), "")
    return [Printed(m, text, unit) for m in NUMBER.finditer(text)]


def file_numbers(node) -> list[float]:
    """Every number in a JSON value, numbers inside strings and keys included ("load 3-4"), long series left out: a
    curve or a list of samples (more than 8 numbers) holds too many values for a printed one to be told apart."""
    if isinstance(node, bool):
        return []
    if isinstance(node, (int, float)):
        return [float(node)]
    if isinstance(node, str):
        return [float(m.group(0)) for m in re.finditer(r"\d+(?:\.\d+)?", node)]
    if isinstance(node, list) and len(node) > 8 and all(_numeric(item) for item in node):
        return []
    if isinstance(node, dict):  # keys too: {"statuses": {"503": 10}}, {"train step (176 px)": ...}
        return [n for key, value in node.items() for n in file_numbers(key) + file_numbers(value)]
    return [n for child in node for n in file_numbers(child)] if isinstance(node, list) else []


def _numeric(node) -> bool:
    return isinstance(node, (int, float)) or isinstance(node, list) and all(_numeric(item) for item in node)


def file_keys(node) -> set[str]:
    """Every key at any depth of a JSON value."""
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in file_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in file_keys(v)}
    return set()


def records(node, cap: int = 80, top: bool = True, name: tuple = ()) -> list[list[float]]:
    """The numbers (sorted) of each part of a JSON value small enough to be one measurement's record (at most `cap`
    numbers: a run, a row, a summary of one variant), with the numbers of the key it is under ("train step (176 px)"),
    at any depth; never a collection of such records, and the whole value only when it is flat."""
    if not isinstance(node, (dict, list)):
        return []
    items = list(node.items()) if isinstance(node, dict) else [("", child) for child in node]
    numbers = file_numbers(node) + list(name)
    nested = sum(isinstance(child, (dict, list)) and bool(file_numbers(child)) for _, child in items)
    collection = isinstance(node, list) and nested >= 2  # a list of runs, not one run
    found = []
    if numbers and len(numbers) <= cap and not (top and nested) and not collection:
        found.append(sorted(numbers))
    own = file_numbers([child for _, child in items if not isinstance(child, (dict, list))]) + list(name)
    if nested and own:  # a set's own figures (its size, its target) beside its runs
        found.append(sorted(own))
    for key, child in items:
        found += records(child, cap, top=False, name=tuple(file_numbers(key)))
    return found


def _part(data, part: str):
    for key in part.split(".") if part else []:
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


class Table:
    """A table that cites results files: where it is, the files (each with an optional part), the ratio columns
    ({column: [(numerator column, denominator column), ...]}, 1-based), its lines and the lines before it."""

    def __init__(self, doc: Path, line: int, cite: re.Match, rows: list[str], before: list[str]):
        self.doc, self.line, self.rows, self.before = doc, line, rows, before
        self._held = {}
        self.cites = [tuple(c.strip().partition("#")[::2]) for c in cite.group("cites").split(",")]
        self.ratios = {}
        for spec in filter(None, (cite.group("ratios") or "").split(";")):
            column, _, quotients = spec.partition("=")
            self.ratios[int(column)] = [tuple(int(n) for n in q.split("/")) for q in quotients.split(",")]

    def __repr__(self) -> str:
        names = ",".join(Path(path).name + (f"#{part}" if part else "") for path, part in self.cites)
        return f"{self.doc.relative_to(ROOT)}:{self.line}:{names}"

    @functools.cached_property
    def raw(self) -> str:
        return "\n".join((ROOT / path).read_text() for path, _ in self.cites)

    @functools.cached_property
    def data(self) -> list:
        return [_part(json.loads((ROOT / path).read_text()), part) for path, part in self.cites]

    @functools.cached_property
    def numbers(self) -> tuple[list[float], list[list[float]]]:
        """Every number of the cited parts (sorted), and each record's."""
        return sorted(file_numbers(self.data)), [r for part in self.data for r in records(part)]

    def records_holding(self, p: Printed) -> frozenset[int]:
        """The indices of the records that hold `p` (cached: the changed-digit test asks again for every row)."""
        key = (p.value, p.half, p.percent, p.scale)
        if key not in self._held:
            self._held[key] = frozenset(i for i, part in enumerate(self.numbers[1]) if p.found_in(part))
        return self._held[key]

    def mismatches(self, rows: list[str] | None = None) -> list[str]:
        """Each printed number (and commit) of the table's body that neither its files nor its row backs."""
        header = cells(self.rows[0])
        wrong = []
        for row in (rows or self.rows)[2:]:  # header and |---| line
            numbers = [numbers_in(c, h) for c, h in itertools.zip_longest(cells(row), header, fillvalue="")]
            wrong += [f"{p.text!r} in row {cells(row)[0]!r}" for c, cell_numbers in enumerate(numbers)
                      for k, p in enumerate(cell_numbers) if not self.backed(p, numbers, c, k)]
            wrong += [f"commit {sha} in row {cells(row)[0]!r}"
                      for sha in COMMIT.findall(re.sub(r"`[^`]*`", " ", row)) if sha not in self.raw]
        return wrong

    def backed(self, p: Printed, row: list[list[Printed]], cell: int, k: int) -> bool:
        """Whether the k-th number of a cell is a ratio the comment names, or is in the files: for a row of several
        numbers, in a record (`records`) that holds two more of them (one more where the row or the record has only
        two), so that a figure changed to a neighbour row's or another seed's value is still caught."""
        if cell + 1 in self.ratios:
            return k < len(self.ratios[cell + 1]) and _ratio_backed(p, row, *self.ratios[cell + 1][k])
        others = [q for cell_numbers in row for q in cell_numbers if q is not p]
        if not others:
            return p.found_in(self.numbers[0])
        parts = self.numbers[1]
        return any(sum(r in self.records_holding(q) for q in others) >= min(2, len(others), len(parts[r]) - 1)
                   for r in self.records_holding(p))


def _ratio_backed(p: Printed, row: list[list[Printed]], numerator: int, denominator: int) -> bool:
    """A ratio column: the last number of one cell over the last number of another."""
    a, b = row[numerator - 1], row[denominator - 1]
    return bool(a and b) and p.is_ratio_of(a[-1], b[-1])


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def cited_tables() -> list[Table]:
    """Every table preceded by a `<!-- results: ... -->` comment (outside fenced code)."""
    tables = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        fenced = False
        for at, line in enumerate(lines):
            fenced ^= line.lstrip().startswith("```")
            cite = None if fenced else CITE.search(line)
            if cite:
                rows = list(itertools.takewhile(lambda text: text.lstrip().startswith("|"), lines[at + 1:]))
                tables.append(Table(doc, at + 1, cite, rows, lines[:at]))
    return tables


TABLES = cited_tables()


def test_tables_cite_results_files():
    assert TABLES, "no table cites a results file: the convention is at the top of benchmarks/README.md"


@pytest.mark.parametrize("table", TABLES, ids=repr)
def test_table_matches_its_results_file(table):
    missing = [path for path, _ in table.cites if not (ROOT / path).is_file()]
    assert not missing, f"{table}: {', '.join(missing)} not found (paths are from the repository root)"
    assert len(table.rows) > 2, f"{table}: the comment is not followed by a table"
    wrong = table.mismatches()
    assert not wrong, f"{table}: numbers not in {', '.join(p for p, _ in table.cites)}: " + "; ".join(wrong)


@pytest.mark.parametrize("table", TABLES, ids=repr)
def test_table_file_records_provenance_or_is_history(table):
    for path, _ in table.cites:
        keys = file_keys(json.loads((ROOT / path).read_text()))
        missing = [k for k in PROVENANCE if k not in keys] + ([] if any(k.startswith("load") for k in keys) else
                                                              ["load"])
        if not missing:
            continue
        heading = max((i for i, text in enumerate(table.before) if text.startswith("#")), default=0)
        assert "history: measured" in " ".join(" ".join(table.before[heading:]).lower().split()), (
            f"{table}: {path} records no {', '.join(missing)}; re-run it, or say 'History: measured <date> on "
            f"<machine>' (and why it is not current) between the section's heading and the table")


def changed(p: Printed) -> str:
    """The number as printed with its last digit moved by one (up, or down from 9)."""
    digits = p.text.rstrip("%xsMB ")
    last = int(digits[-1])
    return digits[:-1] + str(last + 1 if last < 9 else last - 1) + p.text[len(digits):]


@functools.cache
def changed_figures_passed(table: Table) -> tuple[list[str], int]:
    """Each figure with decimals changed in its last digit, one at a time: those the check let pass, and how many."""
    missed, tried = [], 0
    for r, row in enumerate(table.rows[2:], start=2):
        for c, cell in enumerate(cells(row)):
            for p in numbers_in(cell):
                if p.half >= 0.5 or p.text not in cell:
                    continue
                tried += 1
                bad_cells = cells(row)
                bad_cells[c] = cell.replace(p.text, changed(p), 1)
                if not table.mismatches(table.rows[:2] + ["| " + " | ".join(bad_cells) + " |"]):
                    missed.append(f"{p.text} -> {changed(p)} in row {r - 1}")
    return missed, tried


@pytest.mark.parametrize("table", TABLES, ids=repr)
def test_a_changed_digit_fails(table):
    """The check itself, per table: most figures changed in their last digit are caught; those that are not then
    coincide with another value of a record that holds the row's other figures (a p99 equal to the max, an sd the
    file rounded to a boundary, another seed's run). Tables of fewer than 6 such figures are left to the total."""
    missed, tried = changed_figures_passed(table)
    assert tried < 6 or len(missed) <= tried / 3, f"{table}: {len(missed)} of {tried} changed figures passed: {missed}"


def test_changed_digits_mostly_fail():
    """The check itself, over every cited table: at least 85 % of the figures changed in their last digit (the
    smallest change there is) are caught; a larger change is caught more often."""
    counts = [changed_figures_passed(table) for table in TABLES]
    missed, tried = sum(len(m) for m, _ in counts), sum(t for _, t in counts)
    assert missed <= 0.15 * tried, f"{missed} of {tried} changed figures passed"


def uncited_tables_of_figures() -> list[str]:
    """Where each table with figures (four or more numbers with decimals in its rows) that cites no results file
    is; option tables (the options' own defaults) are not figures."""
    found = []
    for doc in DOCS:
        lines, fenced, at = doc.read_text().splitlines(), False, 0
        while at < len(lines):
            fenced ^= lines[at].lstrip().startswith("```")
            if fenced or not lines[at].startswith("|"):
                at += 1
                continue
            rows = list(itertools.takewhile(lambda text: text.startswith("|"), lines[at:]))
            figures = [p for row in rows[2:] for c in cells(row) for p in numbers_in(c) if p.half < 0.5]
            if len(figures) >= 4 and not rows[0].startswith("| option ") and not (at and CITE.search(lines[at - 1])):
                found.append(f"{doc.relative_to(ROOT)}:{at + 1}: {rows[0][:50]}")
            at += len(rows)
    return found


def test_every_table_of_figures_cites_its_file():
    uncited = uncited_tables_of_figures()
    assert not uncited, "tables of figures without <!-- results: ... --> before them: " + "; ".join(uncited)
