"""The exit-code contract: every code errors.EXIT_CODES declares is produced by a real command line, with one line
saying why and no traceback; README's table lists exactly those codes; and no expected outcome exits 1."""

import ast
import os
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import EXIT_CODES, FinetuneError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
runner = CliRunner()


def _photo(tiny_data: Path) -> Path:
    return next((tiny_data / "val" / "ants").iterdir())


def _ok(request, tmp):
    return ["check", request.getfixturevalue("tiny_data")], None


def _bug(request, tmp):
    """A bug stands in for any: the library raises something no message was written for."""
    def broken(*a, **k):
        raise ValueError("an unforeseen failure\nits second line")

    request.getfixturevalue("monkeypatch").setattr("finetune.cli.tools.check_dataset", broken)
    return ["check", request.getfixturevalue("tiny_data")], "internal error: ValueError: an unforeseen failure"


def _usage(request, tmp):
    return ["train", request.getfixturevalue("tiny_data"), "--epochs", "0"], "--epochs 0"


def _dataset(request, tmp):
    return ["check", tmp / "missing"], "no such folder"


def _inputs_unreadable(request, tmp):
    (tmp / "a.jpg").write_bytes(b"not a photo")
    (tmp / "b.png").write_bytes(b"")
    return ["predict", tmp / "a.jpg", tmp / "b.png", "-m", request.getfixturevalue("trained_model"), "-j", "1"], \
        "none of the inputs could be used"


def _model_file(request, tmp):
    (tmp / "model.pt").write_bytes(b"not a model")
    return ["predict", _photo(request.getfixturevalue("tiny_data")), "-m", tmp / "model.pt"], \
        "not a finetune model file"


def _resources(request, tmp):
    from finetune.training.outputs import RunLock

    (tmp / "r").mkdir()
    lock = RunLock(tmp / "r")  # another run, writing there right now
    request.addfinalizer(lock.release)
    return ["train", request.getfixturevalue("tiny_data"), "--weights", "none", "--epochs", "1", "-o", tmp / "r"], \
        "another finetune run is writing to this run folder"


def _diverged(request, tmp):
    return ["train", request.getfixturevalue("tiny_data"), "--mode", "finetune", "--weights", "none", "--epochs", "1",
            "-b", "8", "-j", "0", "--lr", "1e9", "-o", tmp / "r"], "training diverged"


def _export_disagrees(request, tmp):
    """An exporter that writes a wrong file stands in for a real one: the file, run back, answers the negated logits."""
    from finetune.formats import export

    run = export._run
    request.getfixturevalue("monkeypatch").setattr(export, "_run", lambda path, fmt, x: -run(path, fmt, x))
    return ["export", tmp / "m.pt", "-m", request.getfixturevalue("trained_model")], \
        "exported model disagrees with PyTorch"


def _int8_refused(request, tmp):
    pytest.importorskip("onnxruntime")
    # The int8 model may lose nothing and still be refused: the allowed drop is below zero.
    return ["export", tmp / "m-int8.onnx", "-m", request.getfixturevalue("trained_model"), "--int8",
            "--max-accuracy-drop", "-1", "--calibration-count", "4"], "the file was not kept"


def _nothing_to_do(request, tmp):
    pool = tmp / "pool"
    pool.mkdir()
    for cls in ("ants", "bees"):  # photos the model never saw; its random features make them all near-duplicates
        for f in sorted((SAMPLE / "train" / cls).iterdir())[6:9]:
            shutil.copy(f, pool / f.name)
    return ["suggest", pool, "-m", request.getfixturevalue("trained_model"), "-j", "1"], "nothing to suggest"


def _signal(sig: signal.Signals):
    """The signal itself, delivered to this process while a command runs: the handler finetune installs stops it.
    Training's clean stop after a step (exit 130: test_two_epochs_interrupt_resume_equals_four_straight) and a
    signal from outside the process (143: test_sigterm_stops_keeps_best_and_prints_resume_command, slow; a second
    signal: test_a_second_signal_ends_the_process_at_once_and_loses_nothing) are in test_faults.py."""
    def case(request, tmp):
        def interrupted(*a, **k):
            os.kill(os.getpid(), sig)
            time.sleep(30)  # the handler raises in here, at once
            raise AssertionError("the signal was not handled")

        request.getfixturevalue("monkeypatch").setattr("finetune.cli.tools.check_dataset", interrupted)
        return ["check", request.getfixturevalue("tiny_data")], "interrupted"

    case.__name__ = sig.name
    return case


# Every code of errors.EXIT_CODES, and command lines that produce it.
CASES = {0: [_ok], 1: [_bug], 2: [_usage], 3: [_dataset, _inputs_unreadable], 4: [_model_file], 5: [_resources],
         6: [_diverged], 7: [_export_disagrees, _int8_refused], 8: [_nothing_to_do], 130: [_signal(signal.SIGINT)],
         143: [_signal(signal.SIGTERM)]}
SLOW = {_int8_refused}  # an ONNX export and its quantization: ~30 s


def _walk():
    for code, cases in CASES.items():
        for case in cases:
            name = f"{code}-{case.__name__.strip('_')}"
            yield pytest.param(code, case, id=name, marks=[pytest.mark.slow] if case in SLOW else [])


def test_every_declared_code_has_a_case():
    assert set(CASES) == set(EXIT_CODES)


@pytest.mark.parametrize("code, case", list(_walk()))
def test_the_command_line_exits_with_each_code(code, case, request, tmp_path):
    args, says = case(request, tmp_path)
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    if says is None:
        assert "error" not in r.stderr
        return
    lines = [line for line in r.stderr.splitlines() if says in line]
    assert len(lines) == 1, r.stderr  # said once, on one line
    assert lines[0].startswith(("error: ", "internal error: ", "interrupted")), lines[0]
    assert not any(line.startswith(("error:", "internal error:")) for line in r.stderr.splitlines()
                   if line != lines[0]), r.stderr  # and nothing else is called an error


@pytest.mark.parametrize("trials, code", [(["diverged", "failed"], 6), (["failed"], 5), ([], 5)],
                         ids=["diverged", "failed for resources", "budget spent first"])
def test_a_search_with_no_finished_trial_says_why_by_its_code(trials, code):
    """tune's outcome (the search itself, run through Optuna, is in test_tune.py): 6 when learning rates were too
    high, 5 when memory, disk or the --budget ran out."""
    from finetune.cli.tools import _tune_outcome

    result = SimpleNamespace(trials=[SimpleNamespace(status=s, number=i + 1, error="out of CPU memory")
                                     for i, s in enumerate(trials)], best=None, stopped_by_budget=not trials)
    with pytest.raises(FinetuneError, match="no trial finished") as e:
        _tune_outcome(result, 4, "data", Path("search"))
    assert e.value.exit_code == code


def _readme_codes() -> dict[int, str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if re.match(r"\|\s*\d", line)]
    return {int(code): meaning.strip() for code, meaning in rows}


def test_the_readme_table_lists_exactly_the_declared_codes():
    assert sorted(_readme_codes()) == sorted(EXIT_CODES)


def test_nothing_raises_the_base_error_whose_code_means_a_bug():
    """FinetuneError's own exit code is 1 (internal error): every expected outcome raises a subclass with its own
    code. (_util/ddp.py rebuilds a relayed error as a FinetuneError carrying the code the other process exited
    with.)"""
    raised = []
    for path in sorted((REPO / "src" / "finetune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and getattr(node.exc.func, "id", None) == FinetuneError.__name__:
                raised.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert raised == []


def test_only_the_error_boundary_exits_1():
    """The command line leaves with 1 in one place: app._unexpected, for exceptions no message was written for."""
    exits = []
    for path in sorted((REPO / "src" / "finetune").rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(Exit|exit)\(1\)|exit_code\s*=\s*1\b", line):
                exits.append(f"{path.relative_to(REPO / 'src' / 'finetune')}:{n}")
    assert [e.split(":")[0] for e in exits] == ["cli/app.py", "errors.py"], exits
