"""Splitting samples into train/val or k folds, stratified: per class for single-label data, and iterative
stratification for multi-label data (Sechidis, Tsoumakas and Vlahavas 2011, "On the
Stratification of Multi-Label Data"): the rarest label is dealt out first, each of its images to the
part that still wants most of that label, so every label keeps about its share in every part.

Written here rather than taken from the `iterative-stratification` package: that package's last release
is from 2024, it pulls in scikit-learn and SciPy, and it cannot keep groups together (identical files
must land on one side of a split, which the folder splits guarantee too).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def _groups(label_sets: Sequence[Sequence[int]], groups: Sequence | None) -> list[tuple[list[int], frozenset]]:
    """Items grouped (identical content stays together): (item indices, union of their labels), in first-seen order."""
    by_key: dict = {}
    for i, labels in enumerate(label_sets):
        key = groups[i] if groups is not None else i
        members, union = by_key.setdefault(key, ([], set()))
        members.append(i)
        union.update(labels)
    return [(members, frozenset(union)) for members, union in by_key.values()]


def iterative_stratification(label_sets: Sequence[Sequence[int]], fractions: Sequence[float], seed: int,
                             groups: Sequence | None = None) -> list[int]:
    """The part (0..len(fractions)-1) of each item, so that each part holds about its fraction of every label.

    label_sets: each item's label indices; groups: a key per item, items sharing a key go to one part.
    Deterministic for a seed: ties are broken by a seeded shuffle, never by set order.
    """
    rng = random.Random(seed)
    units = _groups(label_sets, groups)
    rng.shuffle(units)
    n_items = len(label_sets)
    wanted_total = [f * n_items for f in fractions]
    label_count: dict[int, int] = {}
    for members, labels in units:
        for label in labels:
            label_count[label] = label_count.get(label, 0) + len(members)
    wanted = [{label: f * c for label, c in label_count.items()} for f in fractions]
    by_label: dict[int, list[int]] = {}
    for u, (_, labels) in enumerate(units):
        for label in labels:
            by_label.setdefault(label, []).append(u)
    part_of = [0] * n_items
    done = [False] * len(units)

    def assign(u: int, label: int | None) -> None:
        members, labels = units[u]
        best = max(range(len(fractions)), key=lambda p: (wanted[p].get(label, 0.0) if label is not None else 0.0,
                                                         wanted_total[p], -p))
        for i in members:
            part_of[i] = best
        done[u] = True
        wanted_total[best] -= len(members)
        for other in labels:
            wanted[best][other] -= len(members)
            label_count[other] -= len(members)

    while any(label_count.values()):
        # The rarest label still to deal out (ties: the lowest index, independent of set order).
        rarest = min((c, label) for label, c in label_count.items() if c > 0)[1]
        for u in by_label[rarest]:
            if not done[u]:
                assign(u, rarest)
    for u in range(len(units)):  # items without any label: by the parts' overall wants
        if not done[u]:
            assign(u, None)
    return part_of


def label_balance(label_sets: Sequence[Sequence[int]], parts: Sequence[int], fractions: Sequence[float]) -> float:
    """Largest gap, over labels and parts, between a part's share of a label's items and its fraction."""
    totals: dict[int, int] = {}
    per_part: dict[tuple[int, int], int] = {}
    for labels, p in zip(label_sets, parts):
        for label in labels:
            totals[label] = totals.get(label, 0) + 1
            per_part[p, label] = per_part.get((p, label), 0) + 1
    return max((abs(per_part.get((p, label), 0) / n - f) for label, n in totals.items()
                for p, f in enumerate(fractions)), default=0.0)


def _units(samples: Sequence, groups: dict[str, str]) -> dict[int, list[list]]:
    """Per class, the samples grouped by identical content, in a fixed order."""
    by_class: dict[int, dict[str, list]] = {}
    for s in samples:
        by_class.setdefault(s.label, {}).setdefault(groups.get(s.path, s.path), []).append(s)
    return {label: [units[k] for k in sorted(units)] for label, units in sorted(by_class.items())}


def stratified_split(samples: Sequence, val_fraction: float, seed: int,
                     groups: dict[str, str] | None = None) -> tuple[list, list]:
    """Seeded per-class split: every class keeps about val_fraction of its images in val.

    Samples sharing a group (identical content) land on the same side, so a duplicate never leaks
    between train and val.
    """
    rng = random.Random(seed)
    train, val = [], []
    for units in _units(samples, groups or {}).values():
        rng.shuffle(units)
        n_val = round(sum(map(len, units)) * val_fraction)
        taken = 0
        for i, unit in enumerate(units):
            if taken < n_val and i < len(units) - 1:  # the last unit always trains
                val.extend(unit)
                taken += len(unit)
            else:
                train.extend(unit)
    key = lambda s: s.path  # noqa: E731 - deterministic order independent of class iteration
    return sorted(train, key=key), sorted(val, key=key)


def stratified_folds(samples: Sequence, k: int, seed: int,
                     groups: dict[str, str] | None = None) -> list[list]:
    """k disjoint folds covering every sample, each holding about 1/k of every class.

    Per class, groups of identical files are shuffled (seeded) and each goes to the fold that has the
    fewest images of that class so far, so a duplicate never sits in two folds.
    """
    rng = random.Random(seed)
    folds: list[list] = [[] for _ in range(k)]
    for units in _units(samples, groups or {}).values():
        rng.shuffle(units)
        units.sort(key=len, reverse=True)  # big groups first: the greedy fill stays balanced (stable sort)
        counts = [0] * k
        for unit in units:
            i = min(range(k), key=lambda f: (counts[f], f))
            folds[i].extend(unit)
            counts[i] += len(unit)
    return [sorted(f, key=lambda s: s.path) for f in folds]


def iterative_parts(samples: Sequence, fractions: Sequence[float], seed: int, groups: dict[str, str] | None = None
                    ) -> list[list]:
    """Multi-label samples (with .labels) in len(fractions) parts by iterative stratification, each sorted by path;
    samples sharing a group (identical content) land in the same part."""
    groups = groups or {}
    part = iterative_stratification([s.labels for s in samples], fractions, seed,
                                    [groups.get(s.path, s.path) for s in samples])
    return [sorted((s for s, p in zip(samples, part) if p == i), key=lambda s: s.path) for i in range(len(fractions))]
