"""The one weighted sum of a run's loss terms."""

from __future__ import annotations

import torch


def combine(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum ``Σ weights[name] · terms[name]`` of scalar loss terms.

    Every term needs a weight (KeyError otherwise); weights of terms not given are ignored, so one
    weights dict can serve every KD mode. Raises FloatingPointError naming the term and its value if a
    term is NaN or inf: a diverged run should stop at the step that diverged, with the culprit named.
    """
    if not terms:
        raise ValueError("combine: no loss terms given")
    total: torch.Tensor | None = None
    for name, term in terms.items():
        if name not in weights:
            raise KeyError(f"combine: loss term {name!r} has no weight (weights given: {sorted(weights)})")
        if term.dim() != 0:
            raise ValueError(f"combine: loss term {name!r} must be a scalar, got shape {tuple(term.shape)}")
        if not bool(torch.isfinite(term.detach())):
            raise FloatingPointError(
                f"combine: loss term {name!r} is {float(term.detach())} (weight "
                f"{weights[name]}); training diverged or an input holds NaN/inf"
            )
        weighted = term * weights[name]
        total = weighted if total is None else total + weighted
    assert total is not None
    return total
