"""Which labels to doubt: out-of-sample probabilities for every image from K linear heads on frozen-backbone
features, ranked by confident learning (cleanlab), and suspects copied out for a person to look at.

A head never sees the label of an image it scores (K-fold over train and val pooled), so a photo filed
under the wrong class shows as a confident vote for another class. The backbone is the pretrained one,
never a fine-tuned one: a backbone trained on the labels has learnt the wrong ones too. Features come
through training's own path (finetune.training.features), so they are computed once and cached on disk.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from finetune import index
from finetune.config import TrainConfig
from finetune.dataset import Sample, stratified_folds
from finetune.errors import DatasetError, UsageError
from finetune.files import write_csv_atomic
from finetune.models import build_network
from finetune.predict import copy_into
from finetune.similar import NEAR_DUPLICATE, near_duplicates
from finetune.training.probe import ProbeEpochs, fit_probe
from finetune.training.setup import prepare, silent, torch_flags
from finetune.weights import resolve_weights

LABEL_FOLDS = 5  # K heads: each scores the fifth of the images it was not fitted on
INSTALL = "pip install 'finetune[labels]'"
REVIEW_LOG = "review.csv"


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


def check_family(model: str, weights: str) -> None:
    """Refuse (exit 2) a model whose head does not read one feature vector per image (SqueezeNet's conv head)."""
    choice = resolve_weights(model, weights)
    net = build_network(model, 2)
    if not net.head_gives_logits(choice.preprocessing.crop_size):
        raise UsageError(f"--model {model}: its head is not a linear layer on one feature vector per image, so it "
                         "gives no embedding to compare images with; use another family, e.g. resnet18 or "
                         "mobilenet_v2")


def embed(cfg: TrainConfig, emit=silent) -> Embeddings:
    """Frozen-backbone features (eval preprocessing, no augmentation) of every image; cached like training's."""
    check_family(cfg.model, cfg.weights)
    cfg = dataclasses.replace(cfg, mode="feature-extract", solver="lbfgs", augment="none", folds=0, fold=0,
                              overfit=0)
    import torch

    with torch_flags(cfg):
        p = prepare(cfg, emit)
    if not isinstance(p.epochs, ProbeEpochs):  # check_family refuses these first; never a silent wrong answer
        raise UsageError(f"--model {cfg.model}: no feature vector per image")
    split = p.split
    samples = split.train + split.val
    return Embeddings(split.root, split.classes, [s.path for s in samples], [s.label for s in samples],
                      ["train"] * len(split.train) + ["val"] * len(split.val),
                      torch.cat([p.epochs.train_feats[0], p.epochs.val_feats]).float(), list(split.skipped),
                      p.choice.label)


def fold_count(labels: list[int], classes: int, folds: int = LABEL_FOLDS) -> int:
    """K: the folds asked for, fewer when the smallest class has fewer images (each fold needs one of each)."""
    counts = [labels.count(c) for c in range(classes)]
    if min(counts) < 2:
        raise DatasetError(f"class {counts.index(min(counts))} has {min(counts)} image(s): finding label issues "
                           "needs at least 2 images of every class")
    return max(2, min(folds, min(counts)))


def out_of_sample_probabilities(features, labels: list[int], classes: int, folds: int = LABEL_FOLDS, seed: int = 0,
                                paths: list[str] | None = None, root: str | None = None):
    """[images, classes] probabilities, each from a linear probe fitted on the other folds (stratified; byte-identical
    files stay in one fold, or they would vouch for each other's label).

    The probes' L2 strength is chosen once, by fit_probe's cross-validation over all images, then the K probes are
    fitted with it: one scalar shared by every image, against K full searches (5x the time).
    """
    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels)
    k = fold_count(list(labels), classes, folds)
    paths = paths or [str(i) for i in range(len(labels))]
    twins = index.content_groups(paths, root) if root is not None else {}
    position = {p: i for i, p in enumerate(paths)}
    l2 = fit_probe(x, y, classes, seed, folds=k).l2
    probs = torch.zeros(len(labels), classes)
    for held in stratified_folds([Sample(p, int(c)) for p, c in zip(paths, y)], k, seed, twins):
        held_idx = torch.tensor([position[s.path] for s in held])
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
    import warnings

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


def label_issues(emb: Embeddings, folds: int = LABEL_FOLDS, seed: int = 0) -> dict:
    """The suspects of a dataset, most likely mislabelled first, with how well the K heads did (JSON-ready)."""
    probs = out_of_sample_probabilities(emb.features, emb.labels, len(emb.classes), folds, seed, emb.paths,
                                        emb.root)
    flagged, quality = rank_label_issues(emb.labels, probs)
    rows = [suspect(emb, i, probs[i], quality[i]) for i in flagged]
    accuracy = float((probs.argmax(1) == probs.new_tensor(emb.labels).long()).float().mean())
    return {"folds": fold_count(emb.labels, len(emb.classes), folds), "images": len(emb.labels),
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


def check_review_folder(root: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Refuse a review folder inside the dataset: the copies would be read as training images next time."""
    root, dest = Path(root).resolve(), Path(dest).resolve()
    if dest == root or root in dest.parents:
        raise UsageError(f"--review-into {dest}: inside the dataset {root}; the copies would become training "
                         "images. Choose a folder outside it")


def review_into(suspects: list[dict], root: str, dest: str | os.PathLike) -> dict:
    """Copy each suspect into dest/<given>-><suggested>/ (copies: the dataset is never moved or edited) and log
    them in dest/review.csv. An identical copy already there is kept; a different file of the same name gets a
    numbered name."""
    dest = Path(dest)
    check_review_folder(root, dest)
    rows, folders = [], {}
    for s in suspects:
        folder = dest / f"{s['given']}->{s['suggested']}"
        folder.mkdir(parents=True, exist_ok=True)
        target, copied = copy_into(Path(root) / s["path"], folder)
        folders[folder.name] = folders.get(folder.name, 0) + 1
        rows.append(s | {"copied_to": str(target), "action": "copied" if copied else "already there"})
    log = write_csv_atomic(dest / REVIEW_LOG, ["path", "split", "given", "suggested", "confidence",
                                               "given_probability", "quality", "copied_to", "action"], rows)
    return {"folders": dict(sorted(folders.items())), "log": str(log), "copied": sum(r["action"] == "copied"
                                                                                   for r in rows)}


def check_trust(cfg: TrainConfig, folds: int = LABEL_FOLDS, similarity: float = NEAR_DUPLICATE,
                review: str | None = None, emit=silent) -> dict:
    """`check --labels`: label issues, near-duplicates and outliers from one embedding of every image (JSON-ready);
    with review, the suspects copied into that folder for a person to look at."""
    require_cleanlab()
    if not -1 <= similarity <= 1:
        raise UsageError(f"--similarity {similarity}: a cosine similarity, between -1 and 1 (default "
                         f"{NEAR_DUPLICATE})")
    if folds < 2:
        raise UsageError(f"--label-folds {folds}: at least 2 (each image is scored by heads fitted without it)")
    if review:
        check_review_folder(cfg.data, review)
    emb = embed(cfg, emit)
    emit("label_heads", images=len(emb.paths), folds=fold_count(emb.labels, len(emb.classes), folds))
    out = {"labels": label_issues(emb, folds, cfg.seed), "near_duplicates": near_duplicates(emb, similarity)}
    out["outliers"] = out["near_duplicates"].pop("outliers")
    if review:
        out["review"] = review_into(out["labels"]["suspects"], emb.root, review)
    return out
