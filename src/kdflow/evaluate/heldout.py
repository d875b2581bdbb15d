"""The held-out metrics of the eval rule: a model on the teacher's held-out top-k cache (perplexity, top-1
agreement, KL to the teacher), or on its own tokenisation of the texts when its tokenizer is not the
teacher's. See kdflow.evaluate for the definitions."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdflow.cache_batch import collate
from kdflow.cache_format import CacheMeta, CacheReader
from kdflow.evaluate.loading import EvalError
from kdflow.losses import TopKKDLoss, ce_targets
from kdflow.manifest import ModelManifest
from kdflow.models import input_device, pad_id_of, tokenizer_fingerprint

log = logging.getLogger("kdflow.evaluate")

# The metrics, in record order, and whether higher is better.
HELDOUT_METRICS = {"ppl": False, "nll_per_token": False, "top1_agreement": True, "kl_teacher_student": False}
ROW_CHUNK = 4096  # logit rows turned into fp32 at a time (bounds the extra memory for large vocabularies)


def heldout_docs(topk_file: str | Path, max_docs: int | None = None) -> Iterator[dict]:
    """The held-out cache's documents whose shard row is below ``max_docs`` (all when None), in file order
    (length-sorted), as :class:`kdflow.cache_loader.CacheStream` items (``collate`` batches them)."""
    reader = CacheReader.open(topk_file, "topk", asked_by="the eval rule")
    name = reader.meta.shard
    columns = ["doc_index", "input_ids", "topk_ids", "topk_logprobs", "rest_logprob"]
    for doc in reader.iter_docs(columns):
        if max_docs is None or doc["doc_index"] < max_docs:
            yield {"shard": name, **doc}


def _batches(docs: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def heldout_metrics(
    model,
    tokenizer,
    info: ModelManifest,
    topk_file: str | Path,
    max_docs: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    heldout_shard: str | Path | None = None,
) -> dict[str, Any]:
    """Perplexity, top-1 agreement with the teacher and KL(teacher ‖ model) on the held-out top-k cache.

    ``info`` is the model's manifest (for messages). ``device``: where the inputs go (default: the model's
    input embeddings'). ``heldout_shard`` (the held-out shard Parquet) is needed only when the model's
    tokenizer is not the cache's. Returns ``{"ppl", "nll_per_token", "top1_agreement",
    "kl_teacher_student", "docs", "tokens" (next-token targets), "positions" (cached rows scored),
    "tokenization" ("teacher_cache" | "own"), "null_reason", "k", "max_length", "heldout_file"}``.
    """
    topk_file = Path(topk_file)
    reader = CacheReader.open(topk_file, "topk", asked_by="the eval rule")
    meta = reader.meta
    fingerprint = tokenizer_fingerprint(tokenizer)
    common = {
        "k": meta.k,
        "max_length": meta.max_length,
        "teacher": meta.teacher,
        "cache_tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "model_tokenizer_fingerprint": fingerprint,
        "max_docs": max_docs,
    }
    if fingerprint != meta.tokenizer_fingerprint:
        return _own_vocab_metrics(model, tokenizer, info, meta, heldout_shard, max_docs, batch_size, common)

    device = torch.device(device) if device is not None else input_device(model)
    pad_id = pad_id_of(tokenizer)
    kd = TopKKDLoss(temperature=1.0, divergence="forward_kl", missing_mass="rest_bucket")
    nll_sum, kl_sum, agree, targets_n, rows_n, docs = 0.0, 0.0, 0, 0, 0, 0
    for examples in _batches(heldout_docs(topk_file, max_docs), batch_size):
        batch = collate(examples, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        keep = mask.reshape(-1).bool()
        rows = keep.nonzero().squeeze(-1).to(flat.device)
        targets = ce_targets(ids, mask).reshape(-1).to(flat.device)
        topk_ids = batch["topk_ids"].reshape(-1, batch["topk_ids"].shape[-1]).to(flat.device)
        topk_lp = batch["topk_logprobs"].reshape(-1, topk_ids.shape[-1]).to(flat.device)
        rest = batch["rest_logprob"].reshape(-1).to(flat.device)
        if bool((topk_ids[rows] >= vocab).any()):
            raise EvalError(
                f"{topk_file}: a cached teacher id is beyond {info.name!r}'s {vocab} logits; "
                "the cache was not made with this model's tokenizer"
            )
        for chunk in rows.split(ROW_CHUNK):
            z = flat[chunk].float()  # [n, V]
            t = targets[chunk]
            counted = t >= 0
            if bool(counted.any()):
                nll_sum += torch.nn.functional.cross_entropy(z[counted], t[counted], reduction="sum").item()
                targets_n += int(counted.sum())
            agree += int((z.argmax(-1) == topk_ids[chunk, 0]).sum())
            log_p, log_q = kd.bucket_logprobs(z, topk_ids[chunk], topk_lp[chunk], rest[chunk])
            kl_sum += kd.divergence_per_row(log_p, log_q).sum().item()
            rows_n += len(chunk)
        docs += len(examples)
    if docs == 0:
        raise EvalError(
            f"{topk_file}: no held-out documents to score (max_docs={max_docs}); raise "
            "data.heldout.fraction or eval.heldout.max_docs"
        )
    if targets_n == 0:
        raise EvalError(f"{topk_file}: every selected document is a single token; nothing to predict")
    nll = nll_sum / targets_n
    return {
        "ppl": math.exp(nll),
        "nll_per_token": nll,
        "top1_agreement": agree / rows_n,
        "kl_teacher_student": kl_sum / rows_n,
        "docs": docs,
        "tokens": targets_n,
        "positions": rows_n,
        "tokenization": "teacher_cache",
        "null_reason": None,
        "heldout_file": str(topk_file),
        **common,
    }


def _own_vocab_metrics(
    model, tokenizer, info: ModelManifest, meta: CacheMeta, heldout_shard, max_docs, batch_size, common
) -> dict:
    """Perplexity on the model's own tokenisation of the held-out texts; no teacher comparison."""
    from kdflow.perplexity import perplexity
    from kdflow.shards import read_texts

    reason = (
        f"the tokenizer of {info.name!r} (fingerprint {common['model_tokenizer_fingerprint']}) is not "
        f"the teacher's (cache fingerprint {meta.tokenizer_fingerprint}): its logits do not index the "
        "teacher's token ids, so top-1 agreement and KL to the teacher are undefined; ppl is per token of the "
        "model's own tokenizer"
    )
    if heldout_shard is None:
        raise EvalError(
            f"{info.name!r} does not share the teacher's tokenizer: its held-out perplexity needs "
            "the held-out shard's texts (heldout_shard=…)"
        )
    texts = read_texts(heldout_shard, max_docs)
    if not texts:
        raise EvalError(f"{heldout_shard}: the held-out set is empty; raise data.heldout.fraction")
    result = perplexity(
        model,
        tokenizer,
        texts,
        max_length=meta.max_length,
        batch_size=batch_size,
        desc=f"held-out ppl {info.name}",
    )
    log.warning("%s: %s", info.name, reason)
    return {
        "ppl": result["ppl"],
        "nll_per_token": result["nll_per_token"],
        "top1_agreement": None,
        "kl_teacher_student": None,
        "docs": result["docs"],
        "tokens": result["tokens"],
        "positions": None,
        "tokenization": "own",
        "null_reason": reason,
        "heldout_file": str(heldout_shard),
        **common,
    }
