"""Events are declared once (finetune.events.Observer): every emit in the source names a declared event with its
declared fields, every observer handles only declared events, and an undeclared event fails at once."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from finetune.events import EVENTS, Observer, UnknownEvent, emitter

SRC = Path(__file__).resolve().parents[1] / "src" / "finetune"


def _emits():
    """(module, line, event, keyword names, has **) of every emit("name", ...) call in the source."""
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and (
                        (isinstance(node.func, ast.Name) and node.func.id == "emit")
                        or (isinstance(node.func, ast.Attribute) and node.func.attr == "emit")):
                keywords = [k.arg for k in node.keywords]
                yield (path.relative_to(SRC), node.lineno, node.args[0].value, [k for k in keywords if k],
                       None in keywords)


def test_every_emit_names_a_declared_event_with_its_declared_fields():
    found = list(_emits())
    assert len({e for _, _, e, _, _ in found}) >= 30  # the scan sees the source's events
    wrong = []
    for module, line, event, keywords, spread in found:
        if event not in EVENTS:
            wrong.append(f"{module}:{line}: undeclared event {event!r}")
            continue
        params = inspect.signature(getattr(Observer, "on_" + event)).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        unknown = [k for k in keywords if k not in params]
        missing = [n for n, p in params.items() if n != "self" and p.default is p.empty and n not in keywords]
        if unknown or (missing and not spread):
            wrong.append(f"{module}:{line}: {event} given {unknown} not declared, missing {missing}")
    assert not wrong


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_observers_in_the_source_handle_only_declared_events():
    """A misspelt handler (on_epoch_ended) would never be called: it fails here instead."""
    for module in sorted(SRC.rglob("*.py")):  # every observer of the package, the CLI's views and tracking included
        name = ".".join(module.relative_to(SRC.parent).with_suffix("").parts)
        if not name.endswith("__main__"):
            importlib.import_module(name.removesuffix(".__init__"))
    observers = [c for c in _subclasses(Observer) if c.__module__.startswith("finetune.")]
    assert {"TrainView", "Trackers"} <= {c.__name__ for c in observers}
    misspelt = [f"{c.__module__}.{c.__name__}.{n}" for c in observers for n in vars(c)
                if n.startswith("on_") and n[3:] not in EVENTS]
    assert not misspelt


def test_an_undeclared_event_fails_at_once_and_a_declared_one_reaches_every_observer():
    seen = []

    class Epochs(Observer):
        def on_epoch_start(self, epoch):
            seen.append(("observer", epoch))

    emit = emitter(Epochs(), lambda name, **fields: seen.append((name, fields)))
    emit("epoch_start", epoch=3)
    emit("batch", step=1, loss=0.5, size=8)  # the Observer ignores it (a no-op), the callable sees it
    assert seen == [("observer", 3), ("epoch_start", {"epoch": 3}), ("batch", {"step": 1, "loss": 0.5, "size": 8})]
    with pytest.raises(UnknownEvent, match="'epoch_ended' is not declared"):
        emit("epoch_ended", epoch=3)
    with pytest.raises(UnknownEvent):
        Epochs()("epoch_ended", epoch=3)
