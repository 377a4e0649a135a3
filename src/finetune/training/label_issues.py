"""Which labels to doubt: out-of-sample probabilities for every image from K linear probes on frozen-backbone
features, ranked by confident learning (cleanlab, an optional extra).

A probe never sees the label of an image it scores (K-fold over train and val pooled), so a photo filed under
the wrong class shows as a confident vote for another class. The backbone must be the pretrained one, never a
fine-tuned one: a backbone trained on the labels has learnt the wrong ones too. Used by `check --labels`
(finetune.quality.label_errors) and, in feature-extract runs, by the run's report.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from finetune.data import content_index
from finetune.data.dataset import Sample, stratified_folds
from finetune.errors import DatasetError, UsageError
from finetune.training.probe import fit_probe

LABEL_FOLDS = 5  # K probes: each scores the fifth of the images it was not fitted on
INSTALL = "pip install 'finetune[labels]'"


@dataclass
class Embeddings:
    """Every usable image of a dataset (train, then val) with its label and its frozen-backbone feature vector."""

    root: str
    classes: list[str]
    paths: list[str]
    labels: list[int]
    parts: list[str]  # "train" or "val", per image
    features: object  # float32 [images, dim]
    skipped: list  # (path, reason)
    weights: str  # the backbone's weights, as the model file names them


def require_cleanlab() -> None:
    """Refuse early (before any image is read) when the labels extra is not installed."""
    try:
        import cleanlab.filter  # noqa: F401
    except ImportError:
        raise UsageError(f"--labels ranks label issues with cleanlab, which is not installed: {INSTALL}") from None


def fold_count(labels: list[int], classes: int | list[str], folds: int = LABEL_FOLDS) -> int:
    """K: the folds asked for, fewer when the smallest class has fewer images (each fold needs one of each).
    classes: their number, or their names (named in the error)."""
    names = classes if isinstance(classes, list) else [str(c) for c in range(classes)]
    counts = [labels.count(c) for c in range(len(names))]
    if min(counts) < 2:
        raise DatasetError(f"class {names[counts.index(min(counts))]} has {min(counts)} image(s): finding label "
                           "issues needs at least 2 images of every class")
    return max(2, min(folds, min(counts)))


def out_of_sample_probabilities(features, labels: list[int], classes: int, folds: int = LABEL_FOLDS, seed: int = 0,
                                paths: list[str] | None = None, root: str | None = None, l2: float | None = None):
    """[images, classes] probabilities, each from a linear probe fitted on the other folds (stratified; byte-identical
    files stay in one fold, or they would vouch for each other's label).

    The probes' L2 strength is chosen once, by fit_probe's cross-validation over all images (or given: a run's own
    probe chose it on its training images), then the K probes are fitted with it: one scalar shared by every image,
    against K full searches (5x the time).
    """
    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels)
    k = fold_count(list(labels), classes, folds)
    paths = paths or [str(i) for i in range(len(labels))]
    twins = content_index.content_groups(paths, root) if root is not None else {}
    position = {p: i for i, p in enumerate(paths)}
    l2 = fit_probe(x, y, classes, seed, folds=k).l2 if l2 is None else l2
    probs = torch.zeros(len(labels), classes)
    for held in stratified_folds([Sample(p, int(c)) for p, c in zip(paths, y)], k, seed, twins):
        held_idx = torch.tensor([position[s.path] for s in held], dtype=torch.long)
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[held_idx] = False
        probe = fit_probe(x[keep], y[keep], classes, seed, l2=l2)
        probs[held_idx] = (x[held_idx] @ probe.weight.T + probe.bias).softmax(1)
    return probs


def rank_label_issues(labels: list[int], probs) -> tuple[list[int], list[float]]:
    """(indices cleanlab flags as likely mislabelled, worst first; every image's label quality in [0, 1]).

    Confident learning (Northcutt et al. 2021): per-class thresholds on the out-of-sample probabilities count
    the images confidently of another class, and the ones to flag are pruned by the estimated noise rates.
    """
    import numpy as np

    require_cleanlab()
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    given = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(probs, dtype=np.float64)
    pred = pred / pred.sum(1, keepdims=True)
    with warnings.catch_warnings():  # small classes draw cleanlab warnings the report already states plainly
        warnings.simplefilter("ignore")
        flagged = find_label_issues(given, pred, return_indices_ranked_by="self_confidence", n_jobs=1)
        quality = get_label_quality_scores(given, pred, method="self_confidence")
    return [int(i) for i in flagged], [float(q) for q in quality]


def label_issues(emb: Embeddings, folds: int = LABEL_FOLDS, seed: int = 0, l2: float | None = None) -> dict:
    """The suspects of a dataset, most likely mislabelled first, with how well the K heads did (JSON-ready)."""
    k = fold_count(emb.labels, emb.classes, folds)  # a class too small is named before any work
    probs = out_of_sample_probabilities(emb.features, emb.labels, len(emb.classes), folds, seed, emb.paths,
                                        emb.root, l2)
    flagged, quality = rank_label_issues(emb.labels, probs)
    rows = [suspect(emb, i, probs[i], quality[i]) for i in flagged]
    accuracy = float((probs.argmax(1) == probs.new_tensor(emb.labels).long()).float().mean())
    return {"folds": k, "images": len(emb.labels),
            "out_of_sample_accuracy": accuracy, "weights": emb.weights, "suspects": rows}


def suspect(emb: Embeddings, i: int, probs, quality: float) -> dict:
    """One flagged image: its given label, the most likely other label and the probabilities of both."""
    given = emb.labels[i]
    others = probs.clone()
    others[given] = -1
    suggested = int(others.argmax())
    return {"path": os.path.relpath(emb.paths[i], emb.root), "split": emb.parts[i], "given": emb.classes[given],
            "suggested": emb.classes[suggested], "confidence": float(probs[suggested]),
            "given_probability": float(probs[given]), "quality": quality}


def run_label_issues(p, folds: int = LABEL_FOLDS) -> dict:
    """The report's label section for a finished run (p: training.setup.Prepared): in feature-extract mode from the
    run's own pretrained-backbone features (a training image's views averaged); else how to get it."""
    import torch

    feats = p.epochs.train_feats
    cfg = p.trainer.cfg
    if feats is None:
        return {"skipped": "a fine-tuned backbone has learnt the labels it would judge; rank label issues with the "
                           f"pretrained one: finetune check {cfg.data} --labels --model {cfg.model} --weights "
                           f"{cfg.weights}"}
    try:
        require_cleanlab()
    except UsageError as e:
        return {"skipped": str(e)}
    split = p.split
    samples = split.train + split.val
    features = torch.cat([feats.float().mean(0).cpu(), p.epochs.val_feats.float().cpu()])
    emb = Embeddings(split.root, split.classes, [s.path for s in samples], [s.label for s in samples],
                     ["train"] * len(split.train) + ["val"] * len(split.val), features, [], p.choice.label)
    probe = p.epochs.probe  # the run's L-BFGS probe: its L2 was chosen by CV already
    try:
        return label_issues(emb, folds, cfg.seed, probe.l2 if probe is not None else None)
    except DatasetError as e:  # a class too small for K folds: the run is fine, the section says why it is empty
        return {"skipped": str(e)}
