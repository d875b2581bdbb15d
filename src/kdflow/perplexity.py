"""Held-out perplexity of a causal LM over a list of documents."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from kdflow.models import pad_id_of


@torch.inference_mode()
def perplexity(
    model, tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 8, desc: str = "perplexity"
) -> dict:
    """Token-level perplexity: exp(total next-token NLL / predicted tokens).

    Each document is truncated to ``max_length`` tokens; its first token is context only. Documents are
    batched by length so that little compute goes to padding. Returns ``ppl``, ``nll_per_token``,
    ``tokens`` (predicted tokens) and ``docs``.
    """
    if not texts:
        raise ValueError("perplexity: no documents given")
    encoded = [
        tokenizer(t, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"] for t in texts
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        valid = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_nll += nll[valid].sum().item()
        total_tokens += int(valid.sum())
    if total_tokens == 0:
        raise ValueError("perplexity: every document is a single token; nothing to predict")
    nll_per_token = total_nll / total_tokens
    return {"ppl": math.exp(nll_per_token), "nll_per_token": nll_per_token, "tokens": total_tokens, "docs": len(texts)}
