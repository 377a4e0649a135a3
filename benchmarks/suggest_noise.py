"""How honestly `check --labels` reads: its estimate of the share of wrong labels against labels flipped on purpose,
beside the length of its review queue (what it used to print as "N likely label errors").

    python benchmarks/suggest_noise.py --shared ../shared --out benchmarks/results-suggest-noise.json

Each set is embedded once by the MobileNetV2 ImageNet backbone as `check --labels` does (train and val pooled), then,
for each share of labels flipped to another class at random (seeded), the K=5 out-of-sample heads are fitted as
check does (L2 by cross-validation) and three numbers are kept: cleanlab's queue as a share of the images, the heads'
disagreement with the labels (1 - out-of-sample accuracy), and the estimate (finetune.quality.label_errors.
noise_estimate) with its 95 % interval. The sets' own labels are taken as right; any wrong ones among them add to
every row alike.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent
SETS = {"antsbees": "data/hymenoptera_data", "dogs": "data/dog_breeds/labels.csv"}
LEVELS = (0.0, 0.05, 0.10, 0.20)


def flipped(labels: list[int], classes: int, share: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = list(labels)
    for i in rng.sample(range(len(labels)), round(share * len(labels))):
        out[i] = rng.choice([c for c in range(classes) if c != labels[i]])
    return out


def one(emb, labels: list[int], share: float, seed: int) -> dict:
    from finetune.quality.label_errors import noise_estimate
    from finetune.training.label_issues import (
        out_of_sample_probabilities,
        rank_label_issues,
    )

    t0 = time.perf_counter()
    probs = out_of_sample_probabilities(emb.features, labels, len(emb.classes), 5, 0, emb.paths, emb.root)
    flagged, _ = rank_label_issues(labels, probs)
    est = noise_estimate(labels, probs)
    accuracy = float((probs.argmax(1) == probs.new_tensor(labels).long()).float().mean())
    return {"flipped": share, "seed": seed, "images": len(labels), "queue": len(flagged),
            "queue_share": len(flagged) / len(labels), "disagreement": 1 - accuracy, "estimate": est["rate"],
            "estimate_ci95": est["ci95"], "covers_flipped": est["ci95"][0] <= share <= est["ci95"][1],
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results-suggest-noise.json"))
    args = ap.parse_args()
    import torch

    from finetune.config import TrainConfig
    from finetune.quality.label_errors import embed

    torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    weights = str(shared / "weights" / "mobilenet_v2-imagenet-int8dequant.pth")
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {"sets": {}}
    for name in args.sets.split(","):
        start = begun()  # the code and the load as this set starts: recorded with it
        emb = embed(TrainConfig(data=str(shared / SETS[name]), model="mobilenet_v2", weights=weights, workers=2))
        rows = []
        for share in LEVELS:
            for seed in range(args.seeds if share else 1):
                rows.append(one(emb, flipped(emb.labels, len(emb.classes), share, seed), share, seed))
                print(json.dumps({"set": name} | rows[-1]), flush=True)
        results["sets"][name] = {"data": SETS[name], "classes": len(emb.classes), "rows": rows} | finished(start)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
