"""Which photos of an unlabelled pool would teach the model most: BADGE (Ash et al. 2020, "Deep Batch Active
Learning by Diverse, Uncertain Gradient Lower Bounds") on the model's own head, minus near-duplicates.

A photo's gradient embedding is what its label would change in the head: (calibrated probabilities - the model's
guess) x the photo's features, the gradient of the loss if the guess were right. Its length grows with the model's
uncertainty about the photo; k-means++ seeding in that space then takes photos that are both uncertain and unlike
the ones taken before them, so a batch is never ten copies of one confusing photo, and any prefix of the order is
itself spread out (labelling the first ten of thirty still labels a good ten). Chosen over margin or entropy alone,
k-center greedy on the features and uncertainty-weighted k-means by the simulated labelling of
benchmarks/suggest.py (benchmarks/README.md#which-photo-to-label-next). A photo whose features are a near-duplicate
(cosine similarity >= NEAR_DUPLICATE, as check --labels) of one taken, or of one already labelled, is never taken.

Single-label models: softmax(logits / T) against the one-hot guess; multi-label: each label's sigmoid against
whether it reaches its threshold (the gradient of the per-label cross-entropy). The distances come from the
embeddings' inner products, <a_i x_i, a_j x_j> = <a_i, a_j><x_i, x_j>, never the classes x features matrix itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.quality.near_duplicates import BLOCK, NEAR_DUPLICATE


@dataclass
class Choice:
    """One photo taken, in the order taken, with what says why."""

    index: int  # into the pool
    margin: float  # single-label: top-1 minus top-2 probability; multi-label: the closest label's distance to its
    # threshold, as a share of the way to certainty (0 = on the threshold)
    entropy: float  # normalised to [0, 1]: over the classes, or the mean over the labels of each one's
    uncertainty_rank: int  # 1 = the photo of the pool the model is least sure about (smallest margin)
    closest_chosen: tuple[int, float] | None  # (pool index, cosine similarity) of the most similar photo taken before
    closest_labelled: tuple[int, float] | None  # (index into the labelled photos, cosine similarity)


def uncertainty(probs, multi_label: bool = False, thresholds=None):
    """(margin, normalised entropy) per photo, from calibrated probabilities [photos, classes]."""
    import torch

    p = torch.as_tensor(probs, dtype=torch.float64)
    if multi_label:
        t = torch.as_tensor(thresholds if thresholds is not None else [0.5] * p.shape[1], dtype=torch.float64)
        margin = ((p - t).abs() / torch.where(p >= t, 1 - t, t)).min(1).values
        q = p.clamp(1e-12, 1 - 1e-12)
        entropy = (-(q * q.log() + (1 - q) * (1 - q).log()) / math.log(2)).mean(1)
        return margin.float(), entropy.float()
    top = p.topk(min(2, p.shape[1]), dim=1).values
    margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else 1 - top[:, 0]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(max(p.shape[1], 2))
    return margin.float(), entropy.float()


def guess_gap(probs, multi_label: bool = False, thresholds=None):
    """[photos, classes]: probabilities minus the model's guess (one-hot argmax, or the labels at their thresholds)."""
    import torch

    p = torch.as_tensor(probs, dtype=torch.float32)
    if multi_label:
        t = torch.as_tensor(thresholds if thresholds is not None else [0.5] * p.shape[1], dtype=torch.float32)
        return p - (p >= t).float()
    return p - torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).float()


def closest(z, others):
    """(index into others, cosine similarity) of each row of z's most similar row of others (unit rows), in blocks."""
    import torch

    if len(others) == 0 or len(z) == 0:
        return torch.full((len(z),), -1, dtype=torch.long), torch.full((len(z),), -1.0)
    best, where = [], []
    for start in range(0, len(z), BLOCK):
        sim = z[start:start + BLOCK] @ others.T
        values, index = sim.max(1)
        best.append(values)
        where.append(index)
    return torch.cat(where), torch.cat(best)


def choose(features, probs, n: int, labelled=None, multi_label: bool = False, thresholds=None, seed: int = 0,
           near: float = NEAR_DUPLICATE) -> tuple[list[Choice], list[int]]:
    """Up to n photos of the pool, most useful first, and the pool indices left out as near-duplicates of labelled
    photos. features [pool, dim] are the head's inputs, probs its calibrated probabilities; labelled: the features
    of the photos already labelled (or None)."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    z = torch.nn.functional.normalize(x, dim=1)
    zl = torch.nn.functional.normalize(torch.as_tensor(labelled, dtype=torch.float32), dim=1) \
        if labelled is not None and len(labelled) else torch.zeros(0, x.shape[1])
    margin, entropy = uncertainty(probs, multi_label, thresholds)
    rank = torch.empty(len(x), dtype=torch.long)
    rank[margin.argsort(stable=True)] = torch.arange(1, len(x) + 1)
    near_labelled, similarity = closest(z, zl)
    available = similarity < near
    left_out = (~available).nonzero().flatten().tolist()
    order = _badge(x, z, guess_gap(probs, multi_label, thresholds), available, n, seed, near, margin)
    out = []
    for k, i in enumerate(order):
        before = None
        if k:
            sims = z[order[:k]] @ z[i]
            j = int(sims.argmax())
            before = (order[j], float(sims[j]))
        labelled_close = (int(near_labelled[i]), float(similarity[i])) if len(zl) else None
        out.append(Choice(i, float(margin[i]), float(entropy[i]), int(rank[i]), before, labelled_close))
    return out, left_out


def _badge(x, z, gap, available, n: int, seed: int, near: float, margin) -> list[int]:
    """k-means++ seeding over the gradient embeddings gap_i x x_i: the longest first, then each with probability
    proportional to its squared distance from the nearest taken; near-duplicates of a taken photo are passed over.
    Where every distance left is zero (the model is certain of all), the least certain photo comes next."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    free = available.clone()
    length2 = (gap * gap).sum(1).double() * (x * x).sum(1).double()
    nearest = torch.full((len(x),), math.inf, dtype=torch.float64)
    order: list[int] = []
    while len(order) < n and bool(free.any()):
        weight = torch.where(free, nearest, 0.0)
        if not order:
            i = int(torch.where(free, length2, -1.0).argmax())
        elif float(weight.sum()) > 0:
            i = int(torch.multinomial(weight / weight.sum(), 1, generator=gen))
        else:
            i = int(torch.where(free, -margin.double(), -math.inf).argmax())
        order.append(i)
        d2 = length2 + length2[i] - 2 * (gap @ gap[i]).double() * (x @ x[i]).double()
        nearest = torch.minimum(nearest, d2.clamp_min(0))
        free &= (z @ z[i]) < near
        free[i] = False
    return order
