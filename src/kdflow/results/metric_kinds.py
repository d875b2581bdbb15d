"""What a metric is from its name: its range (checked by :mod:`kdflow.results.checks`) and, where a file does
not say, whether higher is better (used by :mod:`kdflow.results.stats`)."""

from __future__ import annotations


def metric_class(metric: str) -> str | None:
    """``accuracy`` ([0, 1]), ``perplexity`` (>= 1), ``nonnegative`` (>= 0), ``kl`` (>= -1e-3) or None."""
    base = metric.split(",")[0].strip().lower()
    if base.startswith("acc") or base.startswith("exact_match") or "agreement" in base:
        return "accuracy"
    if base == "ppl" or base.startswith("ppl_") or "perplexity" in base:
        return "perplexity"
    if base.startswith("kl") or "_kl" in base:
        return "kl"
    if base.startswith("bits_per_byte") or base.startswith("nll") or base.startswith("bpb"):
        return "nonnegative"
    return None


def infer_higher_is_better(metric: str) -> bool | None:
    """The direction of a metric from its name, where a file does not give it."""
    kind = metric_class(metric)
    if kind == "accuracy":
        return True
    if kind in ("perplexity", "kl", "nonnegative"):
        return False
    return None
