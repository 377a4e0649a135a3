"""The option tables in docs/, generated from the commands' own --help, so they cannot drift from it.

    python -m finetune.cli.reference          rewrite every <!-- options:COMMAND --> block under docs/
    python -m finetune.cli.reference --check  list the blocks that differ (a test runs this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from finetune.cli.app import app

MARKER = re.compile(r"(<!-- options:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /options:(?P=name) -->)", re.S)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _names(param) -> str:
    if param.param_type_name == "argument":
        return param.metavar or param.name.upper()
    names = sorted(param.opts, key=len) + list(param.secondary_opts)
    return "/".join(f"`{n}`" for n in names)


def _default(param) -> str:
    if param.param_type_name == "argument" or param.default is None or param.default == () or \
            (param.is_flag and not param.secondary_opts):
        return ""
    if param.is_flag:
        return f"`{param.opts[0] if param.default else param.secondary_opts[0]}`"
    return f"`{param.default}`"


def options_table(command: str) -> str:
    """A markdown table of a command's arguments and options, grouped by their --help panel."""
    click_app = typer.main.get_command(app)
    cmd = click_app.commands[command]
    rows, panels = [], {}
    for param in cmd.params:
        if param.name == "help":
            continue
        panel = getattr(param, "rich_help_panel", None) or ("Arguments" if param.param_type_name == "argument"
                                                          else "Options")
        panels.setdefault(panel, []).append(param)
    for panel, params in panels.items():
        if len(panels) > 1:
            rows.append(f"| **{panel}** | | | |")
        for p in params:
            value = "" if p.param_type_name == "argument" or p.is_flag else (p.metavar or "")
            rows.append(f"| {_names(p)} | {value} | {_default(p)} | {_cell(p.help or '')} |")
    return "\n".join(["| option | value | default | meaning |", "|---|---|---|---|", *rows]) + "\n"


def sync(docs: Path, check: bool = False) -> list[str]:
    """Rewrite (or, with check, only find) the option blocks of docs/*.md that differ from --help."""
    stale = []
    for page in sorted(docs.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = MARKER.sub(lambda m: m.group(1) + options_table(m.group("name")) + m.group(4), text)
        if new != text:
            stale.append(str(page))
            if not check:
                page.write_text(new, encoding="utf-8")
    return stale


if __name__ == "__main__":
    docs = Path(__file__).resolve().parents[3] / "docs"
    changed = sync(docs, check="--check" in sys.argv)
    sys.stdout.write("".join(f"{p}\n" for p in changed))
    sys.exit(1 if changed and "--check" in sys.argv else 0)
