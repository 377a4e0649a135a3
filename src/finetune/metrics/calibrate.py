"""How far to trust the probabilities: expected calibration error, reliability bins, temperature scaling.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T > 0
divides the logits before the softmax, fitted by minimising the negative log-likelihood on held-out
(validation) images. It changes no prediction (argmax is unchanged), only how confident they are.
"""

from __future__ import annotations

ECE_BINS = 15  # the usual choice in the calibration literature


def reliability_bins(probs, labels, bins: int = ECE_BINS) -> list[dict]:
    """Top-1 confidence split into equal-width bins: per bin its count, mean confidence and accuracy."""
    import torch

    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    out = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence > low) & (confidence <= high) if b else (confidence >= low) & (confidence <= high)
        n = int(inside.sum())
        out.append({"low": low, "high": high, "count": n,
                    "confidence": float(confidence[inside].mean()) if n else None,
                    "accuracy": float(correct[inside].mean()) if n else None})
    return out


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the reliability bins."""
    table = reliability_bins(probs, labels, bins)
    total = sum(b["count"] for b in table)
    if not total:
        return 0.0
    return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]) / total


def fit_temperature(logits, labels) -> float:
    """The T minimising the NLL of softmax(logits / T) on (logits, labels); searched over log T."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    nll = torch.nn.functional.cross_entropy

    # The NLL in log T is smooth and has one minimum: a coarse log-spaced scan brackets it,
    # a golden-section search pins it (no optimiser state, deterministic, no step size to tune).
    grid = torch.logspace(-1.3, 1.3, 53, dtype=torch.float64)  # T from 0.05 to 20: beyond, a fit is degenerate
    losses = torch.stack([nll(logits / t, labels) for t in grid])
    i = int(losses.argmin())
    lo, hi = float(grid[max(i - 1, 0)].log()), float(grid[min(i + 1, len(grid) - 1)].log())
    ratio = (5 ** 0.5 - 1) / 2

    def f(log_t: float) -> float:
        return float(nll(logits / torch.tensor(log_t, dtype=torch.float64).exp(), labels))

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return float(torch.tensor((lo + hi) / 2).exp())


def calibration_summary(logits, labels, temperature: float) -> dict:
    """ECE, NLL and reliability bins with the raw logits and with logits / temperature."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    nll = torch.nn.functional.cross_entropy
    before, after = logits.softmax(1), (logits / temperature).softmax(1)
    return {"temperature": temperature, "images": len(labels),
            "ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(after, labels),
            "nll_before": float(nll(logits, labels)), "nll_after": float(nll(logits / temperature, labels)),
            "bins_before": reliability_bins(before, labels), "bins_after": reliability_bins(after, labels)}


def cross_fitted_ece(logits, labels) -> float:
    """The ECE a fitted temperature gives on images it was not fitted on: val split in two halves (every other
    image by confidence rank), a temperature fitted on each half measured on the other, the two averaged."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    order = logits.softmax(1).max(1).values.argsort()
    halves = (order[0::2], order[1::2])
    if min(len(h) for h in halves) == 0:
        return expected_calibration_error(logits.softmax(1), labels)
    eces = []
    for fit, test in (halves, halves[::-1]):
        t = fit_temperature(logits[fit], labels[fit])
        eces.append(expected_calibration_error((logits[test] / t).softmax(1), labels[test]))
    return sum(eces) / 2
