"""How well `finetune check --labels` finds wrong labels and near-duplicates, measured on real photos.

    python benchmarks/trust.py --data ../shared/data/hymenoptera_data --model mobilenet_v2 \\
        --weights ../shared/weights/mobilenet_v2-imagenet-int8dequant.pth --out benchmarks/results-trust.json

1. Label errors: a copy of DATA with a known 5 % of its training photos moved into the other class folder; the
   finder runs end to end on it (features computed, then again from the cache, then K=5 heads + cleanlab), and
   the precision and recall of the moved set among cleanlab's flagged images and among the top-N ranked suspects
   are reported. Further flip seeds re-label the same features in memory (the features of a photo do not depend
   on the folder it sits in), so that one lucky draw does not make the figure.
2. Near-duplicates: a copy of DATA plus, for some photos, a JPEG quality-60 re-encode and a 75 % resize saved
   into the other class (or into val/): the similarity of every copy to its original against the most similar
   pair of distinct photos, and what the default threshold finds.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from machine import begun, finished

from finetune.config import TrainConfig
from finetune.quality.label_errors import embed
from finetune.quality.near_duplicates import NEAR_DUPLICATE, near_duplicates, neighbours
from finetune.training.label_issues import out_of_sample_probabilities, rank_label_issues


def flip_files(root: Path, fraction: float, seed: int) -> set[str]:
    """Move a seeded fraction of train/ photos into the other class folder; returns their new relative paths."""
    files = sorted(p for p in (root / "train").glob("*/*") if p.is_file())
    classes = sorted(p.name for p in (root / "train").iterdir())
    chosen = random.Random(seed).sample(files, round(fraction * len(files)))
    moved = set()
    for f in chosen:
        other = next(c for c in classes if c != f.parent.name)
        target = root / "train" / other / f.name
        f.rename(target)
        moved.add(str(target.relative_to(root)))
    return moved


def scores(flagged: list[int], ranked: list[int], truth: set[int], total: int) -> dict:
    """Precision/recall of the flipped set among the flagged images and among the top-N of the ranking."""
    hit = lambda xs: len(set(xs) & truth)  # noqa: E731
    out = {"flipped": len(truth), "images": total, "flagged": len(flagged),
           "flagged_precision": hit(flagged) / max(1, len(flagged)), "flagged_recall": hit(flagged) / len(truth),
           "chance_precision": len(truth) / total}
    for n in (len(truth), 2 * len(truth)):
        out[f"top{n}_precision"] = hit(ranked[:n]) / n
        out[f"top{n}_recall"] = hit(ranked[:n]) / len(truth)
    return out


def label_benchmark(data: Path, work: Path, cfg: dict, fraction: float, seeds: int) -> dict:
    noisy = work / "noisy"
    shutil.copytree(data, noisy)
    moved = flip_files(noisy, fraction, 0)
    t0 = time.perf_counter()
    emb = embed(TrainConfig(data=str(noisy), **cfg))
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = embed(TrainConfig(data=str(noisy), **cfg))
    t_cached = time.perf_counter() - t0
    rel = [str(Path(p).relative_to(noisy)) for p in emb.paths]
    runs = []
    true_labels = [1 - y if r in moved else y for r, y in zip(rel, emb.labels)]  # two classes: a flip is 1 - y
    train = [i for i, part in enumerate(emb.parts) if part == "train"]
    for seed in range(seeds):
        if seed == 0:
            labels, truth = emb.labels, {i for i, r in enumerate(rel) if r in moved}
        else:
            truth = set(random.Random(seed).sample(train, len(moved)))
            labels = [1 - y if i in truth else y for i, y in enumerate(true_labels)]
        t0 = time.perf_counter()
        probs = out_of_sample_probabilities(emb.features, labels, len(emb.classes), 5, 0, emb.paths, emb.root)
        flagged, quality = rank_label_issues(labels, probs)
        seconds = time.perf_counter() - t0
        ranked = sorted(range(len(labels)), key=lambda i: quality[i])
        runs.append({"seed": seed, "files_moved": seed == 0, "seconds_k5_heads_and_cleanlab": round(seconds, 1),
                     **scores(flagged, ranked, truth, len(labels))})
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if k.endswith(("precision", "recall"))}
    return {"fraction": fraction, "seconds_features_computed": round(t_embed, 1),
            "seconds_features_cached": round(t_cached, 1), "runs": runs, "mean_over_seeds": mean}


def make_copies(root: Path, count: int, seed: int) -> list[tuple[str, str, str]]:
    """(original, copy, kind) relative paths: JPEG q60 re-encodes and 75 % resizes into the other class, half of
    them in val/ (leakage across the split)."""
    files = sorted(p for p in root.glob("*/*/*") if p.is_file())
    classes = sorted(p.name for p in (root / "train").iterdir())
    out = []
    for n, f in enumerate(random.Random(seed).sample(files, count)):
        kind = ("jpeg-q60", "resize-75%")[n % 2]
        other = next(c for c in classes if c != f.parent.name)
        split = ("train", "val")[(n // 2) % 2]
        target = root / split / other / f"copy-{n}-{f.stem}.jpg"
        with Image.open(f) as img:
            img = img.convert("RGB")
            if kind == "resize-75%":
                img = img.resize((round(img.width * 0.75), round(img.height * 0.75)), Image.LANCZOS)
                img.save(target, quality=90)
            else:
                img.save(target, quality=60)
        out.append((str(f.relative_to(root)), str(target.relative_to(root)), kind))
    return out


def duplicate_benchmark(data: Path, work: Path, cfg: dict, count: int) -> dict:
    root = work / "copies"
    shutil.copytree(data, root)
    copies = make_copies(root, count, 1)
    emb = embed(TrainConfig(data=str(root), **cfg))
    at = {str(Path(p).relative_to(root)): i for i, p in enumerate(emb.paths)}
    pairs, _ = neighbours(emb.features, threshold=-1.0, k=1)
    sim = {(i, j): s for i, j, s in pairs}
    copy_sims = [{"kind": kind, "similarity": round(sim[tuple(sorted((at[a], at[b])))], 4)} for a, b, kind in copies]
    copied = {at[b] for _, b, _ in copies}
    unrelated = sorted((s for (i, j), s in sim.items() if i not in copied and j not in copied), reverse=True)
    found = near_duplicates(emb)
    groups = found["across_classes"] + found["within_class"]
    found_pairs = {frozenset(m["path"] for m in g["members"]) for g in groups}
    return {"copies": len(copies), "min_copy_similarity": min(c["similarity"] for c in copy_sims),
            "max_copy_similarity": max(c["similarity"] for c in copy_sims),
            "min_by_kind": {k: min(c["similarity"] for c in copy_sims if c["kind"] == k)
                            for k in ("jpeg-q60", "resize-75%")},
            "max_unrelated_similarity": round(unrelated[0], 4), "unrelated_pairs": len(unrelated),
            "unrelated_above_0.85": sum(s >= 0.85 for s in unrelated), "threshold": NEAR_DUPLICATE,
            "copies_found": sum(any({a, b} <= p for p in found_pairs) for a, b, _ in copies),
            "groups_found": len(groups), "leakage_groups": len(found["train_val_leakage"]),
            "groups_that_are_not_a_copy": sum(not any({a, b} <= p for a, b, _ in copies) for p in found_pairs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results-trust.json")
    args = ap.parse_args()
    start = begun()  # the code measured and the load, as it starts: recorded with the results
    cfg = {"model": args.model, "weights": str(Path(args.weights).resolve()), "workers": 2}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {"model": args.model, "weights": Path(args.weights).name,
                  "labels": label_benchmark(Path(args.data), work, cfg, args.flip, args.seeds),
                  "near_duplicates": duplicate_benchmark(Path(args.data), work, cfg, args.copies)}
    result = finished(start) | result
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
