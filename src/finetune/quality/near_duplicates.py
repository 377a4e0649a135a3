"""Near-duplicates and outliers from frozen-backbone embeddings: the copies a byte comparison misses (re-encoded,
resized) and the photos unlike any other, reported like check's exact duplicates, leakage included.

Cosine similarity of the feature vectors, computed in row blocks so memory stays bounded; each image's k
nearest neighbours come from the same pass.
"""

from __future__ import annotations

import os

from finetune.data import content_index

# Cosine similarity at or above which two photos count as near-duplicates: halfway between what was measured with
# the ImageNet MobileNetV2 on the ants/bees photos (benchmarks/trust.py): 40 copies, JPEG q60 re-encodes and 75 %
# resizes, scored at least 0.925 against their originals; of 78,606 pairs of distinct photos the closest, 0.847.
NEAR_DUPLICATE = 0.88
OUTLIER_NEIGHBOURS = 10
# An image is an outlier when its mean cosine distance to its nearest neighbours exceeds Q3 + FENCE x IQR of
# everyone's: cleanlab Datalab's rule for features, with its default threshold 0.37037 (1 / 0.37037 - 1 = 1.7).
OUTLIER_FENCE = 1 / 0.37037 - 1
BLOCK = 1024  # rows of the similarity matrix at a time: 1024 x 100k floats is 400 MB


def neighbours(features, threshold: float = NEAR_DUPLICATE, k: int = OUTLIER_NEIGHBOURS):
    """([(i, j, similarity)] for i < j at or above threshold, mean cosine distance of each image to its k
    nearest others)."""
    import torch

    z = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    n = len(z)
    k = max(1, min(k, n - 1))
    pairs, knn = [], torch.zeros(n)
    for start in range(0, n, BLOCK):
        sim = z[start:start + BLOCK] @ z.T
        rows = torch.arange(start, min(start + BLOCK, n))
        sim[torch.arange(len(rows)), rows] = -2.0  # never its own neighbour
        knn[rows] = (1 - sim.topk(k, dim=1).values).mean(1)
        hit = (sim >= threshold).nonzero()
        for r, j in hit.tolist():
            if start + r < j:
                pairs.append((start + r, j, float(sim[r, j])))
    return pairs, knn


def outliers(knn, fence: float = OUTLIER_FENCE) -> tuple[list[int], float]:
    """(indices of outliers, most atypical first; the distance above which an image is one)."""
    import torch

    if len(knn) < 4:
        return [], float("inf")
    q1, q3 = torch.quantile(knn, torch.tensor([0.25, 0.75])).tolist()
    limit = q3 + fence * (q3 - q1)
    flagged = (knn > limit).nonzero().flatten()
    return [int(i) for i in flagged[knn[flagged].argsort(descending=True)]], limit


def _groups(n: int, pairs: list[tuple[int, int, float]]) -> list[tuple[list[int], float]]:
    """Connected groups of similar images (union-find), each with the lowest similarity among its pairs."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    lowest: dict[int, float] = {}
    for i, j, s in pairs:
        root = find(i)
        lowest[root] = min(lowest.get(root, 1.0), s)
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return sorted(((m, lowest[r]) for r, m in members.items() if len(m) > 1), key=lambda g: -g[1])


def near_duplicates(emb, threshold: float = NEAR_DUPLICATE, k: int = OUTLIER_NEIGHBOURS) -> dict:
    """Near-duplicate groups (within a class, across classes, across train and val) and outliers, JSON-ready.

    Pairs of byte-identical files are left out: check reports them as exact duplicates already.
    """
    pairs, knn = neighbours(emb.features, threshold, k)
    twins = content_index.content_groups(emb.paths, emb.root)
    pairs = [(i, j, s) for i, j, s in pairs if twins.get(emb.paths[i], i) != twins.get(emb.paths[j], j)]
    rel = lambda i: os.path.relpath(emb.paths[i], emb.root)  # noqa: E731
    out = {"threshold": threshold, "within_class": [], "across_classes": [], "train_val_leakage": []}
    for group, lowest in _groups(len(emb.paths), pairs):
        found = {"similarity": round(lowest, 4), "members": [
            {"split": emb.parts[i], "class": emb.classes[emb.labels[i]], "path": rel(i)} for i in group]}
        classes, parts = {emb.labels[i] for i in group}, {emb.parts[i] for i in group}
        if len(classes) > 1:
            out["across_classes"].append(found)
        if len(parts) > 1:
            out["train_val_leakage"].append(found)
        if len(classes) == 1 and len(parts) == 1:
            out["within_class"].append(found)
    flagged, limit = outliers(knn)
    out["outliers"] = {"neighbours": max(1, min(k, len(emb.paths) - 1)), "distance_limit": limit, "images": [
        {"split": emb.parts[i], "class": emb.classes[emb.labels[i]], "path": rel(i), "distance": float(knn[i])}
        for i in flagged]}
    return out
