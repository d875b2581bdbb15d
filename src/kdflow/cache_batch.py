"""A batch of cache documents: :func:`collate` right-pads a list of :class:`kdflow.cache_loader.CacheStream`
items (or the eval rule's held-out documents, the same dicts) into tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def collate(examples: list[dict], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of :class:`~kdflow.cache_loader.CacheStream` items to the longest document
    (B examples, L its length).

    Returns ``input_ids`` long [B, L] (padded with ``pad_id``), ``mask`` long [B, L] (1 where the position
    is a real token: row j of the top-k tensors is the teacher's prediction for token j + 1; which
    positions have targets is for the loss to decide), ``topk_ids`` long [B, L, k] (pad 0),
    ``topk_logprobs`` float32 [B, L, k] (pad 0), ``rest_logprob`` float32 [B, L] (pad 0), ``doc_index``
    long [B], ``shard`` list[str]; with a sampled tail ``sample_ids`` long [B, L, m] (pad −1) and
    ``sample_counts`` long [B, L, m] (pad 0), m the most entries of a position; with embed caches ``embedding``
    float32 [B, D]; with hidden caches
    ``hidden_positions`` long [B, P] (P the most stored positions, padded with -1) and ``hidden``
    {layer: float32 [B, P, D]} (pad 0); with ``with_text`` streams ``text`` list[str] (the part of each
    document the teacher's tokens cover).
    """
    if not examples:
        raise ValueError("collate: no examples")
    keys = set(examples[0])
    for ex in examples[1:]:
        if set(ex) != keys:
            raise ValueError(f"collate: examples with different fields {sorted(keys)} and {sorted(ex)}")
    bsz = len(examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    width = max(lengths)
    k = examples[0]["topk_ids"].shape[1]
    input_ids = np.full((bsz, width), pad_id, dtype=np.int64)
    mask = np.zeros((bsz, width), dtype=np.int64)
    topk_ids = np.zeros((bsz, width, k), dtype=np.int64)
    topk_lp = np.zeros((bsz, width, k), dtype=np.float32)
    rest = np.zeros((bsz, width), dtype=np.float32)
    for i, (ex, n) in enumerate(zip(examples, lengths, strict=False)):
        input_ids[i, :n] = ex["input_ids"]
        mask[i, :n] = 1
        topk_ids[i, :n] = ex["topk_ids"]
        topk_lp[i, :n] = ex["topk_logprobs"]
        rest[i, :n] = ex["rest_logprob"]
    out: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "mask": torch.from_numpy(mask),
        "topk_ids": torch.from_numpy(topk_ids),
        "topk_logprobs": torch.from_numpy(topk_lp),
        "rest_logprob": torch.from_numpy(rest),
        "doc_index": torch.tensor([int(ex["doc_index"]) for ex in examples], dtype=torch.long),
        "shard": [ex["shard"] for ex in examples],
    }
    if "sample_ids" in keys:
        out["sample_ids"], out["sample_counts"] = _pad_tail(examples, width)
    if "embedding" in keys:
        out["embedding"] = torch.from_numpy(np.stack([ex["embedding"] for ex in examples]).astype(np.float32))
    if "hidden" in keys:
        plens = [len(ex["hidden_positions"]) for ex in examples]
        most = max(plens)
        positions = np.full((bsz, most), -1, dtype=np.int64)
        hidden = {}
        for layer, first in examples[0]["hidden"].items():
            hidden[layer] = np.zeros((bsz, most, first.shape[1]), dtype=np.float32)
        for i, (ex, p) in enumerate(zip(examples, plens, strict=False)):
            positions[i, :p] = ex["hidden_positions"]
            for layer, values in ex["hidden"].items():
                hidden[layer][i, :p] = values
        out["hidden_positions"] = torch.from_numpy(positions)
        out["hidden"] = {layer: torch.from_numpy(v) for layer, v in hidden.items()}
    if "text" in keys:
        out["text"] = [ex["text"] for ex in examples]
    return out


def _pad_tail(examples: list[dict], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled tails of a batch as [B, L, m] ids (pad −1) and counts (pad 0)."""
    most = max(int(ex["sample_n"].max(initial=0)) for ex in examples)
    ids = np.full((len(examples), width, max(most, 1)), -1, dtype=np.int64)
    counts = np.zeros(ids.shape, dtype=np.int64)
    for i, ex in enumerate(examples):
        per_position = ex["sample_n"].astype(np.int64)
        position = np.repeat(np.arange(len(per_position)), per_position)
        slot = np.arange(len(position)) - np.repeat(np.cumsum(per_position) - per_position, per_position)
        ids[i, position, slot] = ex["sample_ids"]
        counts[i, position, slot] = ex["sample_counts"]
    return torch.from_numpy(ids), torch.from_numpy(counts)
