"""`finetune suggest`: which photos of an unlabelled pool to label next, most useful first, with the model's guess
and why each was chosen; then copied as DEST/<guess>/<photo> (labelling is moving the wrong ones) or listed in a
label file with a `guess` column to correct, either ready for `finetune train`.

The model's own features (cached per photo and backbone: quality.photo_features) and calibrated probabilities
(its temperature) feed the ranking (quality.ranking). Photos already labelled are never suggested: the ones the
model was trained on (split.json beside the model file) or those given, any byte-identical copy of them, those
waiting in the destination from an earlier round, and near-duplicates of labelled photos.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.config import MAX_PIXELS
from finetune.data import content_index
from finetune.data.inputs import check_inputs, expand_inputs
from finetune.errors import UsageError
from finetune.quality.near_duplicates import NEAR_DUPLICATE
from finetune.quality.photo_features import (
    LoadedModel,
    head_logits,
    open_model,
    photo_features,
)
from finetune.quality.ranking import Choice, choose
from finetune.quality.suggest_into import check_into, pending_in, suggest_into

TOP = 3  # classes shown per photo (single-label), labels nearest their thresholds (multi-label)
# A margin at or above this reads "fairly sure" in a reason: such a photo was taken mostly for being unlike the
# others (two classes: 75 % against 25 %; multi-label: halfway from the threshold to certainty).
SURE_MARGIN = 0.5


@dataclass
class Suggestion:
    """One photo to label: where it is, the model's guess and why it was chosen."""

    rank: int  # 1 = label first
    path: str
    guess: list[str]  # single-label: [class]; multi-label: the labels at or above their thresholds (may be empty)
    probability: float  # single-label: of the guess; multi-label: of the label nearest its threshold
    top: list[tuple[str, float]]  # the top classes; multi-label: the labels nearest their thresholds
    margin: float  # top-1 minus top-2 (multi-label: the nearest label's distance to its threshold); 0 = unsure
    entropy: float  # normalised to [0, 1]
    uncertainty_rank: int  # 1 = the photo of the pool the model is least sure about
    closest_chosen: dict | None  # {"path", "similarity"}: the most similar photo suggested before this one
    closest_labelled: dict | None  # {"path", "similarity"}: the most similar labelled photo
    reason: str


@dataclass
class Suggestions:
    """What `suggest` found: the photos to label, most useful first, and what the ranking left out and why."""

    model: str
    model_description: str
    multi_label: bool
    classes: list[str]
    requested: int
    pool: int  # photos found in the pool
    ranked: int  # photos ranked: read, and neither labelled nor waiting in the destination
    labelled: int  # labelled photos known (compared against)
    labelled_source: str
    already_labelled: list[str]  # pool photos left out: labelled already (or a byte-identical copy of one)
    pending: list[str]  # pool photos left out: waiting in the destination from an earlier round
    near_labelled: list[str]  # pool photos left out: near-duplicates of a labelled photo
    skipped: list[dict]  # {"path", "reason"}: names that match nothing, files that cannot be read
    features_cached: int  # photos whose features came from the cache
    seconds: float  # the whole call, from loading the model (torch's import included) to the ranked list
    timings: dict = field(default_factory=dict)  # seconds: model (loading it), pool (listing, left-outs), features,
    # ranking
    suggestions: list[Suggestion] = field(default_factory=list)
    into: dict | None = None  # where the photos were copied or listed (suggest_into)

    def to_dict(self) -> dict:
        """The --json form (documented in docs/data.md#which-photos-to-label-next-finetune-suggest)."""
        out = asdict(self)
        out["suggestions"] = [asdict(s) | {"top": [{"class": c, "probability": p} for c, p in s.top]}
                              for s in self.suggestions]
        return out


def labelled_photos(model: LoadedModel, given: Sequence[str] | None) -> tuple[list[str], str]:
    """(the photos already labelled, where that list came from): those given, else the images the model was
    trained and validated on (split.json beside the model file), else none."""
    if given:
        files, _ = expand_inputs(list(given))
        if not files:
            raise UsageError(f"--labelled {', '.join(given)}: no images found; name the labelled photos' folder, "
                             "label file or glob")
        return files, ", ".join(given)
    split = Path(model.info.source).parent / "split.json"
    root = model.info.config.get("data_root") or model.info.config.get("data")
    if not split.is_file() or not root:
        return [], f"none known (no split.json beside {model.info.source}; --labelled names them)"
    try:
        record = json.loads(split.read_text(encoding="utf-8"))
        rel = [r[0] for r in record["train"] + record["val"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return [], f"none known ({split} is unreadable; --labelled names them)"
    return [os.path.join(root, r) for r in rel], f"the model's training and val images ({split})"


def same_photos(pool: list[str], others: list[str]) -> set[str]:
    """The pool photos that are one of others: the same file, or the same bytes."""
    real = {os.path.realpath(p) for p in others}
    same = {p for p in pool if os.path.realpath(p) in real}
    twins = content_index.content_groups(list(others) + [p for p in pool if p not in same])
    firsts = {twins.get(p, p) for p in others}
    return same | {p for p in pool if p not in same and twins.get(p) in firsts}


def suggest(model_path: str, pool: Sequence[str], n: int, labelled: Sequence[str] | None = None,
            into: str | None = None, seed: int = 0, device: str = "auto", batch_size: int = 32, workers: int = 2,
            max_pixels: int = MAX_PIXELS, similarity: float = NEAR_DUPLICATE,
            on_start: Callable[[int], None] = lambda total: None,
            on_progress: Callable[[int], None] = lambda n: None) -> Suggestions:
    """Rank the photos of pool (files, folders, globs, label files) and return the n to label next; with into,
    copy them there (a folder) or list them (a .csv label file). similarity: the cosine similarity of features at
    which two photos are near-duplicates."""
    t0 = clock = time.perf_counter()
    timings = {}

    def lap(what: str) -> None:
        nonlocal clock
        timings[what], clock = time.perf_counter() - clock, time.perf_counter()

    if n < 1:
        raise UsageError(f"-n {n}: suggest at least 1 photo")
    if not -1 < similarity <= 1:
        raise UsageError(f"--similarity {similarity}: a cosine similarity above -1, at most 1 (default "
                         f"{NEAR_DUPLICATE}; 1 passes over only photos whose features are identical)")
    model = open_model(model_path, device)
    lap("model")
    if into:
        check_into(into, model.info.multi_label)
    files, missing = expand_inputs(list(pool))
    check_inputs(files, missing)
    known, source = labelled_photos(model, labelled)
    known = [p for p in known if os.path.isfile(p)]
    done = same_photos(files, known)
    waiting = same_photos([p for p in files if p not in done], pending_in(into)) if into else set()
    todo = [p for p in files if p not in done and p not in waiting]
    lap("pool")
    on_start(len(todo) + len(known))
    everything, got, failed, cached = photo_features(model, todo + known, batch_size, workers, max_pixels,
                                                     on_progress)  # one pass: the cache is read and written once
    ours = set(todo)
    good = [p for p in got if p in ours]
    lab_good = [p for p in got if p not in ours]
    feats, lab_feats = everything[:len(good)], everything[len(good):]
    lap("features")
    result = Suggestions(model_path, model.info.describe(), model.info.multi_label, list(model.info.classes), n,
                         len(files), len(good), len(lab_good), source, sorted(done), sorted(waiting), [],
                         [{"path": f.path, "reason": f.reason} for f in missing + [f for f in failed if f.path in ours]],
                         cached, 0.0, timings)
    if good:
        _rank(result, model, feats, good, lab_feats, lab_good, seed, similarity)
    lap("ranking")
    if into and result.suggestions:
        result.into = suggest_into(result.suggestions, into, model.info.multi_label)
    result.seconds = time.perf_counter() - t0
    return result


def probabilities(model: LoadedModel, features):
    """Calibrated probabilities (the model's temperature): softmax, or one sigmoid per label."""
    logits = head_logits(model, features) / model.info.temperature
    return logits.sigmoid() if model.info.multi_label else logits.softmax(1)


def _rank(result: Suggestions, model: LoadedModel, feats, good: list[str], lab_feats, lab_good: list[str],
          seed: int, similarity: float) -> None:
    info = model.info
    thresholds = (info.thresholds or [0.5] * len(info.classes)) if info.multi_label else None
    probs = probabilities(model, feats)
    choices, left_out = choose(feats, probs, result.requested, lab_feats if lab_good else None, info.multi_label,
                               thresholds, seed, similarity)
    result.near_labelled = [good[i] for i in left_out]
    for k, c in enumerate(choices, 1):
        result.suggestions.append(_suggestion(k, c, good, lab_good, probs[c.index], info.classes, thresholds,
                                              len(good)))


def _suggestion(rank: int, c: Choice, good: list[str], lab_good: list[str], probs, classes: list[str],
                thresholds, ranked: int) -> Suggestion:
    if thresholds is not None:
        order = sorted(range(len(classes)), key=lambda j: abs(float(probs[j]) - thresholds[j]))
        top = [(classes[j], float(probs[j])) for j in order[:TOP]]
        guess = [classes[j] for j in range(len(classes)) if float(probs[j]) >= thresholds[j]]
        unsure = f"{classes[order[0]]} {float(probs[order[0]]):.0%} against its threshold {thresholds[order[0]]:.0%}"
    else:
        values, index = probs.topk(min(TOP, len(classes)))
        top = [(classes[int(j)], float(v)) for v, j in zip(values, index)]
        guess = [top[0][0]]
        unsure = " vs ".join(f"{name} {p:.0%}" for name, p in top[:2])
    chosen = {"path": good[c.closest_chosen[0]], "similarity": c.closest_chosen[1]} if c.closest_chosen else None
    near = {"path": lab_good[c.closest_labelled[0]], "similarity": c.closest_labelled[1]} \
        if c.closest_labelled else None
    return Suggestion(rank, good[c.index], guess, top[0][1], top, c.margin, c.entropy, c.uncertainty_rank, chosen,
                      near, reason(c, unsure, ranked))


def reason(c: Choice, unsure: str, ranked: int) -> str:
    """Why a photo was chosen, in words: how sure the model is of it, and how unlike the photos above it."""
    sure = c.margin >= SURE_MARGIN
    how = f"{'fairly sure' if sure else 'unsure'} ({unsure}; {_ordinal(c.uncertainty_rank)} least sure of {ranked})"
    words = [how]
    if c.closest_chosen is None:
        words.append("the most to learn from of all: the largest change to the model once labelled")
    else:
        words.append(f"{'but ' if sure else ''}unlike the photos above (closest {c.closest_chosen[1]:.2f})")
    if c.closest_labelled is not None:
        words.append(f"closest labelled photo {c.closest_labelled[1]:.2f}")
    return "; ".join(words)


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"

