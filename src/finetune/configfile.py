"""Settings from a file: `finetune train --config run.yaml|run.toml|run.json`.

Three shapes are read: a flat mapping of settings (keys as in TrainConfig or as options: batch_size,
batch-size, --batch-size), a best.json from `finetune tune` ({"settings": {...}}), and a run folder's
config.json (its settings plus facts about the run, which are set aside, as is its run folder: the
repeated run writes a new one). Unknown keys are refused naming the closest setting; values are checked
against each setting's type, so YAML's `lr: 1e-3` (a string to YAML 1.1) still reads as a number.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from finetune.config import RUN_FACTS, SETTINGS, check_names, typed
from finetune.errors import UsageError

SUFFIXES = (".yaml", ".yml", ".toml", ".json")
# Options of `finetune train` that are not settings of a run: given on the command line only.
COMMAND_LINE_ONLY = ("gpus", "resume", "config", "quiet")
# A run's own folder and its --overwrite are not repeated from its config.json: the repeat gets a new folder.
NOT_REPEATED = ("output", "overwrite")


def load_config(path: str | Path) -> dict:
    """The settings a config file sets, checked by name and type (UsageError, exit 2, naming the key)."""
    p = Path(path)
    raw = _parse(p)
    if not isinstance(raw, dict):
        raise UsageError(f"--config {p}: holds a {type(raw).__name__}, not a mapping of settings (key: value)")
    run_record = any(k in raw for k in RUN_FACTS)
    settings = raw.get("settings", raw) if raw.get("format") == "finetune-config" or "settings" in raw else raw
    if not isinstance(settings, dict):  # best.json's shape: {"format": "finetune-config", "settings": {...}}
        raise UsageError(f"--config {p}: its 'settings' is not a mapping of settings")
    settings = {_key(k): v for k, v in settings.items()}
    recorded = settings.pop("given", None)
    if run_record:  # a run folder's config.json: the run's facts and its own folder are not settings
        settings = {k: v for k, v in settings.items() if k not in RUN_FACTS and k not in NOT_REPEATED}
    for name in settings:
        if name in COMMAND_LINE_ONLY:
            raise UsageError(f"--config {p}: {name!r} is a command-line option, not a setting of the run; give "
                             f"--{name} on the command line")
    check_names(settings, set(SETTINGS), f"--config {p}")
    out = {name: _typed(p, name, value) for name, value in settings.items()}
    if run_record or recorded is not None:  # it records every setting and which its user had given (a run's
        out["given"] = tuple(n for n in recorded or [] if n in settings)  # config.json, tune's best.json)
    return out


def given_in(settings: dict) -> tuple[str, ...]:
    """The settings a config file's author chose (load_config's result): every key of a hand-written file; of a run's
    config.json, the ones that run's user had given."""
    return tuple(settings["given"]) if "given" in settings else tuple(settings)


def _parse(p: Path):
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"--config {p}: unknown file type '{p.suffix}'; use a {', '.join(SUFFIXES)} file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--config {p}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {p}: not a text file (UTF-8)") from None
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            return tomllib.loads(text)
        return _yaml(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        where = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UsageError(f"--config {p}: not valid {suffix[1:].upper()} ({where})") from None


def _yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)  # plain data only: no Python objects built from tags
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ValueError(f"line {mark.line + 1}: {getattr(e, 'problem', e)}" if mark else str(e)) from None


def _key(name) -> str:
    return str(name).lstrip("-").replace("-", "_")


def _typed(p: Path, name: str, value):
    """value as the setting's type (config.typed), refusals naming the file."""
    return typed(name, value, f"--config {p}")
