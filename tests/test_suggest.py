"""finetune suggest: the ranking on known vectors (uncertain first, spread out, never two near-duplicates, never a
near-copy of a labelled photo), the per-photo feature cache, the photos left out, --into as folders and as a label
file, multi-label models, the refusals; and the bar with the shared real weights (skipped where they are absent;
under CI=true, failed)."""

import csv
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.labelfile import read_label_file
from finetune.data.preprocessing import Preprocessing
from finetune.errors import UsageError
from finetune.models.model_file import ModelFile, save_model_file
from finetune.models.registry import build_network
from finetune.quality import photo_features, ranking
from finetune.quality.suggest import suggest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
SAME = 1.0  # near-duplicates only when the features are identical


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _unit(v):
    return torch.nn.functional.normalize(torch.as_tensor(v, dtype=torch.float32), dim=-1)


def test_margin_and_entropy_on_known_probabilities():
    margin, entropy = ranking.uncertainty(torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]]))
    assert margin.tolist() == pytest.approx([0.0, 0.85, 0.0], abs=1e-6)
    assert entropy[2] == pytest.approx(1.0, abs=1e-6) and entropy[1] < entropy[0] < entropy[2]
    # multi-label: each label against its own threshold; the closest one decides the margin
    margin, entropy = ranking.uncertainty(torch.tensor([[0.3, 0.99], [0.9, 0.01]]), True, [0.3, 0.5])
    assert margin.tolist() == pytest.approx([0.0, (0.9 - 0.3) / 0.7], abs=1e-6)
    assert 0 < entropy[1] < entropy[0] <= 1


def _pool(seed=0):
    """Three groups of 10 photos: A and B the model is unsure of (far apart), C it is sure of; A holds an exact pair.
    Photos of a group are alike (cosine about 0.6), never near-duplicates; groups are unrelated."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 32, generator=g)
    group = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    x = centres[group] + 0.8 * torch.randn(30, 32, generator=g)
    x[1] = x[0]  # a near-duplicate pair inside the pool
    probs = torch.where((group < 2)[:, None], torch.tensor([0.55, 0.45]), torch.tensor([0.99, 0.01]))
    return x, probs, group


@pytest.mark.parametrize("seed", range(5))
def test_the_choice_is_uncertain_spread_out_and_never_a_near_duplicate(seed):
    x, probs, group = _pool(seed)
    choices, left_out = ranking.choose(x, probs, 6, seed=seed)
    taken = [c.index for c in choices]
    assert len(taken) == 6 and len(set(taken)) == 6 and left_out == []
    assert group[taken[0]] < 2  # the first is one the model is unsure of
    assert sum(int(group[i] == 2) for i in taken) <= 1  # sure photos are worth little next to unsure ones
    assert {int(group[i]) for i in taken} >= {0, 1}  # both unsure groups, not six photos of one
    assert not {0, 1} <= set(taken)  # never both photos of the pair
    z = _unit(x[taken])
    assert float((z @ z.T - 2 * torch.eye(6)).max()) < ranking.NEAR_DUPLICATE
    assert choices[0].closest_chosen is None and all(c.closest_chosen is not None for c in choices[1:])
    assert choices == ranking.choose(x, probs, 6, seed=seed)[0]  # the same seed gives the same list
    # asking for more than there is gives what there is: every photo but near-duplicates of one taken
    every = [c.index for c in ranking.choose(x, probs, 100)[0]]
    z, rest = _unit(x), sorted(set(range(30)) - set(every))
    assert len({0, 1} & set(rest)) == 1, rest  # one photo of the exact pair taken, the other left out
    assert all(float((z[every] @ z[i]).max()) >= ranking.NEAR_DUPLICATE for i in rest)


def test_near_copies_of_labelled_photos_are_left_out():
    x, probs, _ = _pool()
    labelled = x[[2, 3]] + 0.01  # two photos of group A labelled already (a re-encoded copy reads like this)
    choices, left_out = ranking.choose(x, probs, 5, labelled=labelled)
    assert {2, 3} <= set(left_out) and not set(left_out) & {c.index for c in choices}
    assert all(c.closest_labelled is not None and -1 <= c.closest_labelled[1] <= 1 for c in choices)


def test_multi_label_choice_takes_the_photo_on_a_threshold():
    x = torch.eye(8)[:, :8] * 5  # eight unrelated photos
    probs = torch.full((8, 3), 0.02)
    probs[5, 1] = 0.31  # one label right on its threshold of 0.3
    choices, _ = ranking.choose(x, probs, 1, multi_label=True, thresholds=[0.5, 0.3, 0.5])
    assert choices[0].index == 5 and choices[0].margin == pytest.approx(0.01 / 0.7, abs=1e-4)
    gap = ranking.guess_gap(probs, True, [0.5, 0.3, 0.5])
    assert gap[5].tolist() == pytest.approx([0.02, 0.31 - 1, 0.02], abs=1e-6)  # its guess: label 1 present


def _model_file(path: Path, classes: list[str], multi: bool = False, seed: int = 0) -> Path:
    """A random-init MobileNetV2 model file (no split.json beside it: no labelled photos known). Its features make
    any two photos look alike (cosine above 0.88), so the tests of mechanics pass similarity 1 (SAME)."""
    torch.manual_seed(seed)
    net = build_network("mobilenet_v2", len(classes))
    pre = Preprocessing(resize_size=160, crop_size=128, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                        interpolation="bilinear")
    save_model_file(path, ModelFile(arch="mobilenet_v2", classes=classes, preprocessing=pre,
                                    state_dict=net.plain_state_dict(), head=net.head, multi_label=multi,
                                    thresholds=[0.5] * len(classes) if multi else None))
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """A flat folder of 20 sample photos the tiny_data model never saw (sample_data/train beyond the first 6)."""
    root = tmp_path_factory.mktemp("pool") / "pool"
    root.mkdir()
    for cls in ("ants", "bees"):
        for f in sorted((SAMPLE / "train" / cls).iterdir())[6:16]:
            shutil.copy(f, root / f.name)
    return root


def test_features_are_the_heads_input_and_come_from_the_cache_the_second_time(tmp_path, pool):
    from finetune.inference.predictor import load_predictor

    path = _model_file(tmp_path / "m.pt", ["ants", "bees"])
    model = photo_features.open_model(path, "cpu")
    photos = sorted(str(p) for p in pool.iterdir())[:6]
    feats, good, failed, cached = photo_features.photo_features(model, photos, batch_size=4, workers=1)
    assert good == photos and failed == [] and cached == 0 and feats.shape == (6, 1280)
    logits = torch.tensor([p.logits for p in load_predictor([path], "cpu").predict(photos)])
    assert torch.allclose(photo_features.head_logits(model, feats), logits, atol=1e-4)
    again, _, _, cached = photo_features.photo_features(model, photos, workers=1)
    assert cached == 6 and torch.equal(again, feats)
    os.utime(photos[0], ns=(1, 1))  # an edited photo (new modification time) is computed again, the rest read
    _, _, _, cached = photo_features.photo_features(model, photos, workers=1)
    assert cached == 5
    # retraining the head keeps the backbone: the same cache serves the new model file
    other = ModelFile(**{**vars(model.info), "state_dict": {k: (v + 1 if model.net.is_head(k) else v)
                                                              for k, v in model.info.state_dict.items()}})
    save_model_file(tmp_path / "m2.pt", other)
    assert photo_features.open_model(tmp_path / "m2.pt", "cpu").key == model.key


def test_a_probe_run_leaves_its_photos_features_for_suggest(tiny_data, local_weights, pool, tmp_path, monkeypatch):
    """The cache is shared with training: a probe run keeps the pretrained backbone, so the features it computed of
    its own photos are the ones suggest needs with its best.pt, and suggest does not run the backbone on them."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    r = invoke("train", tiny_data, "--weights", local_weights, "-j", 0, "-o", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.output
    model = photo_features.open_model(tmp_path / "run" / "best.pt", "cpu")
    own = sorted(str(p) for p in tiny_data.rglob("*.jpg"))
    feats, good, _, cached = photo_features.photo_features(model, own, workers=1)
    assert len(own) == 18 and cached == 18 and good == own  # the run's 12 train and 6 val photos
    s = suggest(str(tmp_path / "run" / "best.pt"), [str(pool)], 4, workers=1, similarity=SAME)
    assert s.labelled == 18 and s.features_cached == 18 and len(s.suggestions) == 4  # the pool's 20 computed
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "empty"))  # as suggest would compute them itself
    fresh, _, _, none = photo_features.photo_features(model, own[:3], workers=1)
    assert none == 0 and torch.allclose(feats[:3], fresh, atol=1e-4)  # what training stored is the same


def test_suggest_leaves_out_the_model_s_own_photos_and_their_copies(trained_model, tiny_data, flat_data, pool):
    mixed = [str(tiny_data), str(flat_data), str(pool)]  # the training photos, byte-identical copies, new photos
    # similarity 1: this model's random features make every photo a near-duplicate of every other at 0.88
    r = suggest(str(trained_model), mixed, 8, workers=1, similarity=1.0)
    new = {str(p) for p in pool.iterdir()}
    assert r.labelled == 18 and "split.json" in r.labelled_source
    assert len(r.already_labelled) == 36 and r.ranked == 20  # 18 photos and their 18 copies
    assert len(r.suggestions) == 8 and {s.path for s in r.suggestions} <= new
    assert [s.rank for s in r.suggestions] == list(range(1, 9))
    assert all(s.guess and s.guess[0] in ("ants", "bees") and s.reason for s in r.suggestions)
    payload = r.to_dict()
    assert json.loads(json.dumps(payload))["suggestions"][0]["top"][0]["class"] in ("ants", "bees")
    crowded = invoke("suggest", pool, "-m", trained_model, "-j", 1)  # at 0.88 they are all near-duplicates
    assert crowded.exit_code == 8 and "nothing to suggest" in crowded.stderr  # nothing to do (errors.EXIT_CODES)
    assert "near-duplicates of labelled photos" in crowded.output
    assert "random or untrained weights" in crowded.output


def test_into_a_folder_copies_by_guess_and_the_next_round_suggests_other_photos(tmp_path, pool):
    model = _model_file(tmp_path / "m.pt", ["ants", "bees"])
    before = sorted(os.listdir(pool))
    first = suggest(str(model), [str(pool)], 5, into=str(tmp_path / "to-label"), workers=1, similarity=SAME)
    assert first.into["copied"] == 5 and sorted(os.listdir(pool)) == before  # copies: the pool is never changed
    for s in first.suggestions:
        assert (tmp_path / "to-label" / s.guess[0] / Path(s.path).name).is_file()
    log = _rows(tmp_path / "to-label" / "suggested.csv")
    assert [row["source"] for row in log] == [s.path for s in first.suggestions]
    second = suggest(str(model), [str(pool)], 5, into=str(tmp_path / "to-label"), workers=1, similarity=SAME)
    assert len(second.pending) == 5 and not {s.path for s in second.suggestions} & {s.path for s in first.suggestions}
    assert len(_rows(tmp_path / "to-label" / "suggested.csv")) == 10


def test_into_a_label_file_gives_rows_to_correct_that_train_reads(tmp_path, pool):
    model = _model_file(tmp_path / "m.pt", ["ants", "bees"])
    labels = tmp_path / "to-label.csv"
    r = suggest(str(model), [str(pool)], 6, into=str(labels), workers=1, similarity=SAME)
    rows = _rows(labels)
    assert r.into == {"form": "label_file", "path": str(labels), "added": 6, "rows": 6}
    assert list(rows[0]) == ["path", "guess"] and all(row["guess"] in ("ants", "bees") for row in rows)
    for i, row in enumerate(rows):  # the user corrects the guesses
        row["guess"] = ("ants", "bees")[i % 2]
    with open(labels, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "guess"])
        w.writeheader()
        w.writerows(rows)
    table = read_label_file(labels)
    assert table.classes == ["ants", "bees"] and len(table.rows) == 6 and "label column 'guess'" in table.columns
    again = suggest(str(model), [str(pool)], 4, into=str(labels), workers=1, similarity=SAME)
    kept = _rows(labels)
    assert kept[:6] == rows and len(kept) == 10 and len(again.pending) == 6  # corrections kept, nothing twice


def test_multi_label_models_rank_per_label_and_go_to_a_label_file_only(tmp_path, pool):
    model = _model_file(tmp_path / "ml.pt", ["ants", "bees", "grass"], multi=True)
    r = suggest(str(model), [str(pool)], 3, into=str(tmp_path / "ml.csv"), workers=1, similarity=SAME)
    assert r.multi_label and len(r.suggestions) == 3
    assert all("threshold" in s.reason and len(s.top) == 3 for s in r.suggestions)
    rows = _rows(tmp_path / "ml.csv")
    assert all(set(filter(None, row["guess"].split(";"))) <= {"ants", "bees", "grass"} for row in rows)
    with pytest.raises(UsageError, match="label file instead"):
        suggest(str(model), [str(pool)], 3, into=str(tmp_path / "folder"), workers=1)


def test_what_suggest_cannot_use_is_refused_with_what_to_do(tmp_path, pool):
    model = _model_file(tmp_path / "m.pt", ["ants", "bees"])
    r = invoke("suggest", pool, "-m", model, "-n", 0)
    assert r.exit_code == 2 and "-n 0" in r.output
    (tmp_path / "m.onnx").write_bytes(b"x")
    r = invoke("suggest", pool, "-m", tmp_path / "m.onnx")
    assert r.exit_code == 2 and "best.pt" in r.output and "Traceback" not in r.output
    (tmp_path / "other.csv").write_text("file,label\na.jpg,ants\n")
    r = invoke("suggest", pool, "-m", model, "--into", tmp_path / "other.csv")
    assert r.exit_code == 2 and "path and guess columns" in r.output
    assert (tmp_path / "other.csv").read_text() == "file,label\na.jpg,ants\n"
    squeeze = build_network("squeezenet1_0", 2)
    save_model_file(tmp_path / "sq.pt", ModelFile(
        arch="squeezenet1_0", classes=["a", "b"], state_dict=squeeze.plain_state_dict(), head=squeeze.head,
        preprocessing=Preprocessing(256, 224, [0.5] * 3, [0.5] * 3, "bilinear")))
    r = invoke("suggest", pool, "-m", tmp_path / "sq.pt")
    assert r.exit_code == 2 and "not a linear layer" in r.output
    r = invoke("suggest", tmp_path / "nothing-here", "-m", model)
    assert r.exit_code == 2 and "no images found" in r.output


def test_cli_json_lists_exactly_n_photos_of_the_pool(tmp_path, pool):
    model = _model_file(tmp_path / "m.pt", ["ants", "bees"])
    r = invoke("suggest", pool, "-m", model, "-n", 7, "--json", "-j", 1, "--similarity", SAME)
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    paths = [s["path"] for s in payload["suggestions"]]
    assert len(paths) == 7 == len(set(paths)) and set(paths) <= {str(p) for p in pool.iterdir()}
    assert payload["pool"] == 20 and payload["requested"] == 7
    r = invoke("suggest", pool, "-m", model, "-n", 3, "-j", 1, "--similarity", SAME)
    assert r.exit_code == 0 and "label these 3 next" in r.stdout and "ranked 20 of the pool's 20 photos" in r.output


@pytest.mark.slow
def test_the_bar_suggestions_hold_four_times_the_pools_rate_of_mistakes(tmp_path, antsbees, real_weights):
    """10+10 real ants/bees photos train the CPU default (the probe on MobileNetV2); the other training photos, in
    one flat folder, are the pool. The 30 suggested must hold at least 4 times the pool's rate of photos the model gets
    wrong (docs/data.md: 5.2x), and --json must list exactly 30 paths of the pool."""
    truth, labelled, pool = {}, tmp_path / "labelled", tmp_path / "pool"
    pool.mkdir()
    for cls in ("ants", "bees"):
        files = sorted((antsbees / "train" / cls).iterdir())
        random.Random(0).shuffle(files)
        (labelled / cls).mkdir(parents=True)
        for f in files[:10]:
            shutil.copy(f, labelled / cls / f.name)
        for f in files[10:]:
            shutil.copy(f, pool / f.name)
            truth[f.name] = cls
    r = invoke("train", labelled, "--model", "mobilenet_v2", "--weights", real_weights, "-o", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("suggest", pool, "-m", tmp_path / "run" / "best.pt", "-n", 30, "--json")
    assert r.exit_code == 0, r.output
    paths = [s["path"] for s in json.loads(r.stdout)["suggestions"]]
    assert len(paths) == 30 == len(set(paths)) and {Path(p).name for p in paths} <= set(truth)
    r = invoke("predict", pool, "-m", tmp_path / "run" / "best.pt", "--json", "-q")
    wrong = {Path(p["path"]).name for p in json.loads(r.stdout) if p["predictions"][0]["class"] != truth[
        Path(p["path"]).name]}
    pool_rate = len(wrong) / len(truth)
    suggested_rate = sum(Path(p).name in wrong for p in paths) / 30
    # docs/data.md (draw 0, as here): 13 of 225 pool photos wrong, 9 of the 30 suggested, 5.2x the pool's rate.
    # Measured 2026-12-07 (2-core AMD EPYC) on draw 0 with training seeds 0-2: 13 and 9 (5.2x), 15 and 12 (6.0x),
    # 12 and 8 (5.0x); benchmarks/README.md's other draws 2.3x and 5.2x. The floor, 4x, is seed 0's 9 less two photos.
    assert 0 < pool_rate < 0.1 and suggested_rate >= 4 * pool_rate, (pool_rate, suggested_rate)
