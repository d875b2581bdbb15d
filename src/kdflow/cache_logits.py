"""The logit cache's two knobs: an exact head of ``k`` ids and a sampled tail of ``samples`` draws a position.

* The head (``topk_ids``, ``topk_logprobs``, ``rest_logprob``) is today's top-k cache: the k most probable ids
  with their full-vocabulary log-probabilities and the log of the mass R outside them.
* The tail (``samples`` = N > 0): N draws with replacement from the teacher's distribution over the ids outside
  the head (v with probability p_v / R), stored per position as the unique ids drawn (``sample_ids``, most drawn
  first) and their counts (``sample_counts``, summing to N). ``k = 0`` is Sparse Logit Sampling (R = 1).
  The loss that reads it is :class:`kdflow.losses.SampledTailKDLoss` (an unbiased full-vocabulary KD gradient).
* The draws of position j of a document are the inverse CDF of the tail at the uniforms
  ``numpy.random.default_rng([sample_seed, doc_index]).random((n_tokens, N))[j]``: a function of the seed, the
  document's shard row and the position alone, so a rerun, another batching or another part boundary makes the
  same bytes.

This module computes both from the teacher's final hidden states (:func:`logits_of_hidden`), turns the tail
into Arrow columns (:func:`tail_columns`) and reads a row group's logit columns back for training
(:func:`read_logit_columns`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from kdflow.cache_columns import list_values, nested, nested_values
from kdflow.cache_format import CacheError
from kdflow.losses.sampled import tail_counts

HEAD_COLUMNS = ("topk_ids", "topk_logprobs", "rest_logprob")
TAIL_COLUMNS = ("sample_ids", "sample_counts")
MAX_SAMPLES = 255  # counts are stored as uint8


def logit_columns(k: int, samples: int | None) -> list[str]:
    """The columns training reads of a logit cache of ``k`` head ids and ``samples`` draws (None or 0: no tail)."""
    head = ["topk_ids", "topk_logprobs"] if k else []
    return ["doc_index", "input_ids", *head, "rest_logprob", *(TAIL_COLUMNS if samples else ())]


def draw_uniforms(seed: int, doc_index: int, n_tokens: int, samples: int) -> np.ndarray:
    """The uniforms of a document's draws, [n_tokens, samples] float64 (module docstring)."""
    return np.random.default_rng([seed, int(doc_index)]).random((n_tokens, samples))


def logits_of_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    k: int,
    samples: int = 0,
    uniforms: torch.Tensor | None = None,
    chunk: int = 512,
):
    """Head ids, full-vocabulary head log-probs and the log of the rest mass for each row of ``hidden`` [T, H]
    (valid positions only); with ``samples`` > 0 also the tail's ids and counts [T, samples] (padded with −1 / 0)
    drawn at ``uniforms`` [T, samples]. Logits are made ``chunk`` rows at a time in fp32 (a 128k vocabulary never
    needs a [T, V] tensor; the tail's float64 CDF is made 128 rows at a time)."""
    if not samples:
        return topk_of_hidden(hidden, lm_head, k, chunk)
    if uniforms is None or uniforms.shape != (hidden.shape[0], samples):
        raise ValueError(f"logits_of_hidden: uniforms must be [{hidden.shape[0]}, {samples}]")
    outs: list[list[torch.Tensor]] = [[], [], [], [], []]
    step = min(chunk, 128)
    for start in range(0, hidden.shape[0], step):
        logprobs = torch.log_softmax(lm_head(hidden[start : start + step]).float(), -1)
        u = uniforms[start : start + step].to(logprobs.device)
        for out, part in zip(outs, tail_counts(logprobs, k, samples, u), strict=True):
            out.append(part)
    ids, lp, rest, sample_ids, sample_counts = (torch.cat(o) for o in outs)
    return ids.to(torch.int32), lp, rest, sample_ids.to(torch.int32), sample_counts.to(torch.uint8)


def topk_of_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module, k: int, chunk: int = 512):
    """Top-k ids, full-vocabulary log-probs and the log of the remaining mass for each row of ``hidden``.

    ``hidden`` is [T, H] (valid positions only). Logits are made ``chunk`` rows at a time in fp32, so a
    128k vocabulary never needs a [T, V] tensor.
    """
    ids_out, lp_out, rest_out = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk]).float()
        values, ids = torch.topk(logits, k, dim=-1)
        # One exp pass, in place, shifted by the row maximum (the top-1 value): the total gives the
        # log-normaliser, and the sum with the k entries zeroed gives the mass outside the k directly
        # (not as 1 - sum, which would lose precision when the k hold nearly all of it).
        probs = logits.sub_(values[:, :1]).exp_()
        log_total = probs.sum(-1, keepdim=True).log_()
        rest = probs.scatter_(-1, ids, 0.0).sum(-1, keepdim=True).log_() - log_total
        ids_out.append(ids.to(torch.int32))
        lp_out.append(values - values[:, :1] - log_total)
        rest_out.append(rest.squeeze(-1))
    return torch.cat(ids_out), torch.cat(lp_out), torch.cat(rest_out)


def tail_columns(sample_ids: np.ndarray, sample_counts: np.ndarray, lengths: np.ndarray) -> dict[str, pa.Array]:
    """The tail's Arrow columns from [T, samples] padded arrays (T the positions of documents of ``lengths``):
    per document, per position, the drawn ids (and counts) without the padding."""
    live = sample_counts > 0
    per_position = live.sum(-1)
    return {
        "sample_ids": nested(sample_ids[live].astype(np.int32), per_position, lengths, pa.int32()),
        "sample_counts": nested(sample_counts[live].astype(np.uint8), per_position, lengths, pa.uint8()),
    }


def read_logit_columns(table: pa.Table, path: Path, group: int, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """A row group's logit columns as flat arrays over its positions: ``topk_ids`` [T, k], ``topk_logprobs``
    [T, k], ``rest_logprob`` [T]; with a tail also ``sample_ids`` and ``sample_counts`` [E] (every position's
    entries, one after another), ``sample_n`` [T] (entries a position) and ``sample_offsets`` [T + 1].
    ``lengths`` are the documents' ``input_ids`` lengths; a column of other lengths is a damaged file
    (:class:`CacheError`)."""
    k = table.column("topk_ids").type.value_type.list_size if "topk_ids" in table.column_names else 0
    arrays: dict[str, np.ndarray] = {}
    if not k:  # a sampled tail alone: no head columns in the file
        arrays["topk_ids"] = np.zeros((int(lengths.sum()), 0), dtype=np.int32)
        arrays["topk_logprobs"] = np.zeros((int(lengths.sum()), 0), dtype=np.float16)
    for name, width in zip(HEAD_COLUMNS, (k, k, None), strict=True):
        if name in arrays:
            continue
        arrays[name], n = list_values(table.column(name), width)
        if not np.array_equal(n, lengths):
            raise CacheError(f"{path}: row group {group}: {name} has other lengths than input_ids; the file is damaged")
    if "sample_ids" in table.column_names:
        ids, per_position, n = nested_values(table.column("sample_ids"))
        counts, per_position_c, n_c = nested_values(table.column("sample_counts"))
        if not (
            np.array_equal(n, lengths) and np.array_equal(n_c, lengths) and np.array_equal(per_position, per_position_c)
        ):
            raise CacheError(
                f"{path}: row group {group}: sample_ids and sample_counts do not match input_ids position by "
                "position; the file is damaged"
            )
        offsets = np.concatenate([[0], np.cumsum(per_position)])
        arrays.update(sample_ids=ids, sample_counts=counts, sample_n=per_position, sample_offsets=offsets)
    return arrays


def doc_logits(arrays: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
    """The logit arrays of the document whose positions are ``a .. b-1`` of a row group (copies)."""
    doc = {name: arrays[name][a:b].copy() for name in HEAD_COLUMNS}
    if "sample_n" in arrays:
        c, d = arrays["sample_offsets"][a], arrays["sample_offsets"][b]
        doc.update(
            sample_ids=arrays["sample_ids"][c:d].copy(),
            sample_counts=arrays["sample_counts"][c:d].copy(),
            sample_n=arrays["sample_n"][a:b].copy(),
        )
    return doc
