"""Which photo to label next: simulated pool-based labelling with `finetune suggest`'s ranking against random picks.

    python benchmarks/suggest.py --shared ../shared --out benchmarks/results-suggest.json \\
        --plot benchmarks/suggest.png [--sets antsbees,dogs] [--seeds 3]

Each set's training photos are the pool and its val photos the test (ants/bees: its train/ and val/ folders; the dog
breeds: finetune's stratified 80/20 split, seed 0). Every photo is embedded once by the MobileNetV2 ImageNet
backbone through training's own feature path (cached on disk). A run starts from a few labels per class drawn at
random (seeded), then each round fits the CPU default head (finetune.training.probe.fit_probe: L-BFGS logistic
regression, its L2 chosen by cross-validation on the labelled photos, as `finetune train` does), measures test
accuracy, and adds N photos of the pool: the ones `suggest` ranks first (finetune.quality.ranking.choose on the
head's probabilities and the features, the photos labelled so far passed as labelled), or N at random. Until the
pool is used up.

With --arms, other rankings run beside them (the ablation behind suggest's choice): margin (the N smallest top-1
minus top-2), entropy (the N largest), kcenter (k-center greedy on the features' cosine distance from the labelled and
chosen photos) and wkmeans (the 10N smallest margins clustered by k-means weighted by uncertainty, the photo nearest
each centre: Zhdanov 2019); --fixed-l2 fits every head at one L2 (no search: an ablation runs in minutes, not hours).

The score: labels needed to reach 95 % of the accuracy with every pool photo labelled, per seed, read two ways:
first reached (the first round at or above it), and reached for good (the first round from which every later
round stays at or above it: where a user can stop). The file holds every curve; the plot draws the mean over seeds
with the range between the lowest and highest seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from machine import begun, finished

HERE = Path(__file__).resolve().parent
SETS = {  # data (relative to --shared), labels to start with per class, photos added per round
    "antsbees": ("data/hymenoptera_data", 2, 4),
    "dogs": ("data/dog_breeds/labels.csv", 1, 40),
}
TARGET = 0.95


def embedded(data: str, weights: str):
    """(pool features, pool labels, test features, test labels, classes): training's features of its split."""
    import torch

    from finetune.config import TrainConfig
    from finetune.quality.label_errors import embed

    emb = embed(TrainConfig(data=data, model="mobilenet_v2", weights=weights, workers=2))
    train = torch.tensor([i for i, p in enumerate(emb.parts) if p == "train"])
    test = torch.tensor([i for i, p in enumerate(emb.parts) if p == "val"])
    y = torch.tensor(emb.labels)
    return emb.features[train], y[train], emb.features[test], y[test], emb.classes


FIXED_L2: list = [None]  # --fixed-l2: one L2 for every fit (None: searched by cross-validation, as train does)


def fitted(x, y, classes: int, seed: int):
    from finetune.training.probe import fit_probe

    return fit_probe(x, y, classes, seed, l2=FIXED_L2[0])


def accuracy(probe, x, y) -> float:
    return float(((x @ probe.weight.T + probe.bias).argmax(1) == y).float().mean())


def picks(arm: str, probe, x, labelled: list[int], n: int, seed: int, rng) -> tuple[list[int], float]:
    """(pool indices to label next, seconds the ranking took)."""
    import torch

    from finetune.quality.ranking import choose

    left = torch.tensor(sorted(set(range(len(x))) - set(labelled)))
    t0 = time.perf_counter()
    if arm == "random":
        chosen = left[torch.randperm(len(left), generator=rng)[:n]].tolist()
    elif arm in BASELINES:
        probs = (x[left] @ probe.weight.T + probe.bias).softmax(1)
        chosen = [int(left[i]) for i in BASELINES[arm](x[left], probs, x[labelled], n, rng)]
    else:
        probs = (x[left] @ probe.weight.T + probe.bias).softmax(1)
        choices, _ = choose(x[left], probs, n, x[labelled], seed=seed)
        chosen = [int(left[c.index]) for c in choices]
        if len(chosen) < n:  # near-duplicates of labelled photos were passed over: the pool is nearly used up
            rest = [int(i) for i in left if int(i) not in chosen]
            chosen += rest[:n - len(chosen)]
    return chosen, time.perf_counter() - t0


def _margin(x, probs, labelled, n, rng):
    top = probs.topk(2, 1).values
    return (top[:, 0] - top[:, 1]).argsort()[:n].tolist()


def _entropy(x, probs, labelled, n, rng):
    return (probs * probs.clamp_min(1e-12).log()).sum(1).argsort()[:n].tolist()


def _kcenter(x, probs, labelled, n, rng):
    import torch

    z, zl = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(labelled, dim=1)
    far = (1 - z @ zl.T).min(1).values
    out = []
    for _ in range(min(n, len(x))):
        i = int(far.argmax())
        out.append(i)
        far = torch.minimum(far, 1 - z @ z[i])
        far[out] = -1
    return out


def _wkmeans(x, probs, labelled, n, rng, iters: int = 20):
    import torch

    top = probs.topk(2, 1).values
    margin = top[:, 0] - top[:, 1]
    pool = margin.argsort()[:10 * n]
    z, w = torch.nn.functional.normalize(x[pool], dim=1), (1 - margin[pool]).clamp_min(1e-6)
    centres = [int(torch.multinomial(w / w.sum(), 1, generator=rng))]
    d2 = ((z - z[centres[0]]) ** 2).sum(1)
    while len(centres) < min(n, len(pool)):
        weight = w * d2
        centres.append(int(torch.multinomial(weight / weight.sum(), 1, generator=rng)) if weight.sum() > 0
                       else int(d2.argmax()))
        d2 = torch.minimum(d2, ((z - z[centres[-1]]) ** 2).sum(1))
    c = z[centres].clone()
    for _ in range(iters):
        nearest = torch.cdist(z, c).argmin(1)
        for j in range(len(c)):
            if (nearest == j).any():
                c[j] = (w[nearest == j, None] * z[nearest == j]).sum(0) / w[nearest == j].sum()
    dist = torch.cdist(z, c)
    out = list(dict.fromkeys(int(pool[dist[:, j].argmin()]) for j in range(len(c))))
    rest = [int(i) for i in pool if int(i) not in out] + [i for i in range(len(x)) if i not in set(pool.tolist())]
    return (out + rest)[:n]


BASELINES = {"margin": _margin, "entropy": _entropy, "kcenter": _kcenter, "wkmeans": _wkmeans}


def simulate(data, arm: str, seed: int, start: int, step: int) -> dict:
    import torch

    x, y, xt, yt, classes = data
    rng = torch.Generator().manual_seed(seed)
    labelled = []
    for c in range(len(classes)):
        members = (y == c).nonzero().flatten()
        labelled += members[torch.randperm(len(members), generator=rng)[:start]].tolist()
    curve, ranking = [], []
    while True:
        probe = fitted(x[labelled], y[labelled], len(classes), seed)
        curve.append([len(labelled), accuracy(probe, xt, yt)])
        if len(labelled) >= len(x):
            break
        chosen, seconds = picks(arm, probe, x, labelled, min(step, len(x) - len(labelled)), seed, rng)
        labelled += chosen
        ranking.append(seconds)
        print(json.dumps({"arm": arm, "seed": seed, "labels": curve[-1][0], "accuracy": round(curve[-1][1], 4)}),
              flush=True)
    return {"arm": arm, "seed": seed, "curve": curve, "ranking_seconds_mean": sum(ranking) / max(1, len(ranking))}


def needed(curve: list, target: float) -> dict:
    """Labels at which the curve first reaches target, and from which it never falls below it again."""
    first = next((n for n, a in curve if a >= target), None)
    for_good = next((curve[i][0] for i in range(len(curve)) if all(a >= target for _, a in curve[i:])), None)
    return {"first": first, "for_good": for_good}


def run_set(name: str, shared: Path, weights: str, seeds: int, arms: tuple = ("suggest", "random")) -> dict:
    rel, start, step = SETS[name]
    data = embedded(str(shared / rel), weights)
    x, y, xt, yt, classes = data
    full = accuracy(fitted(x, y, len(classes), 0), xt, yt)
    target = TARGET * full
    runs = []
    for arm in arms:
        for seed in range(seeds):
            t0 = time.perf_counter()
            r = simulate(data, arm, seed, start, step)
            runs.append(r | needed(r["curve"], target) | {"seconds": round(time.perf_counter() - t0, 1)})
    summary = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {k: {"per_seed": [r[k] for r in mine], "mean": sum(r[k] for r in mine) / len(mine)}
                        for k in ("first", "for_good")}
    ratio = {k: summary["random"][k]["mean"] / summary["suggest"][k]["mean"] for k in ("first", "for_good")} \
        if {"random", "suggest"} <= set(arms) else None
    return {"data": rel, "pool": len(x), "test": len(xt), "classes": len(classes), "start_per_class": start,
            "step": step, "all_labels_accuracy": full, "target": target, "labels_needed": summary,
            "fewer_labels_than_random": ratio, "runs": runs}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s for s in SETS if s in results["sets"]]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2), squeeze=False)
    for ax, name in zip(axes[0], sets):
        r = results["sets"][name]
        for arm, colour in (("suggest", "tab:blue"), ("random", "tab:grey")):
            curves = [run["curve"] for run in r["runs"] if run["arm"] == arm]
            labels = [n for n, _ in curves[0]]
            acc = [[a for _, a in c] for c in curves]
            mean = [sum(col) / len(col) for col in zip(*acc)]
            ax.fill_between(labels, [min(c) for c in zip(*acc)], [max(c) for c in zip(*acc)], color=colour, alpha=0.2)
            need = r["labels_needed"][arm]["for_good"]["mean"]
            ax.plot(labels, mean, color=colour, label=f"{arm}: {need:.0f} labels to stay at 95 % (mean)")
        ax.axhline(r["target"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"95 % of all {r['pool']} labels ({r['all_labels_accuracy']:.3f})")
        ax.set(title=f"{name}: {r['classes']} classes, +{r['step']} per round", xlabel="labelled photos",
               ylabel="test accuracy")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results-suggest.json"))
    ap.add_argument("--plot", default=str(HERE / "suggest.png"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--arms", default="suggest,random", help=f"suggest, random, {', '.join(BASELINES)}")
    ap.add_argument("--fixed-l2", type=float, help="one L2 for every head fit (no search)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    FIXED_L2[0] = args.fixed_l2
    shared = Path(args.shared)
    weights = str(shared / "weights" / "mobilenet_v2-imagenet-int8dequant.pth")
    for name in args.sets.split(","):
        t0, start = time.perf_counter(), begun()  # the code and the load: recorded with the set's results
        found = run_set(name, shared, weights, args.seeds, tuple(args.arms.split(",")))
        results = json.loads(Path(args.out).read_text()) if os.path.exists(args.out) else {"sets": {}}
        results["sets"][name] = found | {"seconds": round(time.perf_counter() - t0)} | finished(start)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        if args.plot != "none":
            plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
