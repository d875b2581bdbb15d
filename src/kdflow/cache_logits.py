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
  same bytes. With ``sampling: systematic`` (teacher_cache or a run's teacher_logits) a position has one uniform u,
  ``.random((n_tokens, 1))[j]``, and its N draws are at (u + i) / N, i < N: unbiased as before, with counts that
  never stray more than one from N · p_v / R (kdflow.losses.sampled.tail_counts).

This module computes both from the teacher's final hidden states (:func:`logits_of_hidden`), turns the tail
into Arrow columns (:func:`tail_columns`) and reads a row group's logit columns back for training
(:func:`read_logit_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdflow.cache_columns import LOGPROB_FLOOR, list_values, nested, nested_values, ragged
from kdflow.cache_compact import COMPACT, decode_compact_columns, decode_logprobs, encode_logprobs, encoding_kl
from kdflow.cache_format import CacheError
from kdflow.losses.sampled import tail_counts, uniform_width
from kdflow.topk import block_topk, exp_rows_

FP16_MAX = float(np.finfo(np.float16).max)

HEAD_COLUMNS = ("topk_ids", "topk_logprobs", "rest_logprob")
TAIL_COLUMNS = ("sample_ids", "sample_counts")


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
    sampling: str = "multinomial",
):
    """Head ids, full-vocabulary head log-probs and the log of the rest mass for each row of ``hidden`` [T, H]
    (valid positions only); with ``samples`` > 0 also the tail's ids and counts [T, samples] (padded with −1 / 0)
    drawn at ``uniforms`` ([T, samples]; [T, 1] for ``sampling="systematic"``: kdflow.losses.sampled.tail_counts).
    Logits are made ``chunk`` rows at a time in fp32 (a 128k vocabulary never needs a [T, V] tensor)."""
    if not samples:
        return topk_of_hidden(hidden, lm_head, k, chunk)
    width = uniform_width(samples, sampling)
    if uniforms is None or uniforms.shape != (hidden.shape[0], width):
        raise ValueError(f"logits_of_hidden: uniforms must be [{hidden.shape[0]}, {width}] for {sampling} sampling")
    outs: list[list[torch.Tensor]] = [[], [], [], [], []]
    for start in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[start : start + chunk]).float()  # tail_counts normalises each row itself
        u = uniforms[start : start + chunk].to(logits.device)
        for out, part in zip(outs, tail_counts(logits, k, samples, u, sampling, overwrite=True), strict=True):
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
        values, ids = block_topk(logits, k)  # torch.topk's values and ids, 4x faster on a CPU (kdflow.topk)
        # One exp pass, in place (shifted only where the row maximum calls for it: kdflow.topk.exp_rows_); the
        # sum with the k entries zeroed gives the mass outside the k directly (not as 1 - sum, which would lose
        # precision when the k hold nearly all of it), and that rest plus the k entries' own masses the total.
        shift = exp_rows_(logits, values[:, :1])
        head = values - shift
        rest_mass = logits.scatter_(-1, ids, 0.0).sum(-1, keepdim=True)
        log_total = (rest_mass.double() + head.double().exp().sum(-1, keepdim=True)).log().float()
        ids_out.append(ids.to(torch.int32))
        lp_out.append(head - log_total)
        rest_out.append((rest_mass.log() - log_total).squeeze(-1))
    return torch.cat(ids_out), torch.cat(lp_out), torch.cat(rest_out)


def to_f16(x: torch.Tensor, floor: float | None = None) -> tuple[np.ndarray, int]:
    """fp16 NumPy copy; values beyond fp16's range are clamped (and counted) rather than made inf."""
    x = x.float()
    lo = -FP16_MAX if floor is None else floor
    clamped = int(((x > FP16_MAX) | (x < lo)).sum())
    return x.clamp(lo, FP16_MAX).cpu().numpy().astype(np.float16), clamped


@dataclass
class LogitCodec:
    """How one logit-cache job encodes its columns (settings ``k``, ``samples``, ``sample_seed``,
    ``logit_encoding``, ``logit_floor``), and what that has cost so far: values clamped (plain) or the encoding's
    largest KL and floored mass (compact)."""

    k: int
    samples: int
    sample_seed: int
    encoding: str  # plain | compact
    floor: float
    vocab_rows: int
    sampling: str = "multinomial"  # how the tail's draws fall (kdflow.losses.sampled.tail_counts)
    clamped: dict[str, int] = field(default_factory=lambda: {"rest_logprob": 0, "embedding": 0})
    stats: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: dict[str, Any], vocab_rows: int) -> LogitCodec:
        s = settings
        encoding = s.get("logit_encoding", "plain")
        return cls(
            s["k"],
            s.get("samples", 0),
            s.get("sample_seed", 0),
            encoding,
            s.get("logit_floor", 0.0),
            vocab_rows,
            s.get("sampling", "multinomial"),
        )

    @property
    def hashed_keys(self) -> list[str]:
        """The settings that change the file beyond k; none for a plain cache without tail (hashed as before)."""
        tail = ["samples", "sample_seed"] * bool(self.samples) + ["sampling"] * self.systematic
        return tail + ["logit_encoding", "logit_floor"] * self.compact

    @property
    def systematic(self) -> bool:
        return bool(self.samples) and self.sampling == "systematic"

    @property
    def compact(self) -> bool:
        return self.encoding == COMPACT

    @property
    def meta(self) -> dict[str, Any]:
        """The file's optional metadata keys (kdflow.cache_format.OPTIONAL_KEYS) that this job sets."""
        tail = {"samples": self.samples, "sample_seed": self.sample_seed} if self.samples else {}
        if self.systematic:
            tail["sampling"] = "systematic"
        return {**tail, **({"logit_encoding": COMPACT, "logit_floor": float(self.floor)} if self.compact else {})}

    def columns(self, ids: np.ndarray, lp: torch.Tensor, rest: torch.Tensor, tail, lengths) -> dict[str, pa.Array]:
        """The part's head, rest and tail columns from the head ids [T, k], the float32 head log-probs [T, k] and
        rest log-mass [T], and the tail's padded (ids, counts) [T, samples] (or None)."""
        cols: dict[str, pa.Array] = {}
        if self.compact:
            lp32, rest32 = lp.float().cpu().numpy(), rest.float().cpu().numpy()
            enc = encode_logprobs(lp32, rest32, self.floor)
            ids = np.where(enc["live"], ids, 0)
            lp_dec, rest_dec = decode_logprobs(enc["codes"], enc["rest_code"])
            kl = encoding_kl(lp32, rest32, enc["live"], lp_dec, rest_dec)
            for key, value in (("encoding_kl_max", kl), ("floor_mass_max", enc["moved"])):
                self.stats[key] = max(self.stats.get(key, 0.0), float(value.max(initial=0.0)))
            values, rest_values = enc["codes"], enc["rest_code"]
            id_np = np.uint16 if self.vocab_rows <= 1 << 16 else np.uint32
        else:
            values, _ = to_f16(lp, LOGPROB_FLOOR)
            rest_values, n_rest = to_f16(rest, LOGPROB_FLOOR)
            self.clamped["rest_logprob"] += n_rest
            id_np = np.int32
        if self.k:
            cols["topk_ids"] = ragged(ids.astype(id_np), lengths)
            cols["topk_logprobs"] = ragged(values, lengths)
        cols["rest_logprob"] = ragged(rest_values, lengths)
        if tail is not None:
            cols.update(tail_columns(tail[0], tail[1], lengths, id_np))
        return cols


def tail_columns(
    sample_ids: np.ndarray, sample_counts: np.ndarray, lengths: np.ndarray, id_np: type = np.int32
) -> dict[str, pa.Array]:
    """The tail's Arrow columns from [T, samples] padded arrays (T the positions of documents of ``lengths``):
    per document, per position, the drawn ids (``id_np``, and counts) without the padding."""
    live = sample_counts > 0
    per_position = live.sum(-1)
    return {
        "sample_ids": nested(sample_ids[live].astype(id_np), per_position, lengths, pa.from_numpy_dtype(id_np)),
        "sample_counts": nested(sample_counts[live].astype(np.uint8), per_position, lengths, pa.uint8()),
    }


def read_logit_columns(table: pa.Table, path: Path, group: int, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """A row group's logit columns as flat arrays over its positions: ``topk_ids`` [T, k], ``topk_logprobs``
    [T, k], ``rest_logprob`` [T]; with a tail also ``sample_ids`` and ``sample_counts`` [E] (every position's
    entries, one after another), ``sample_n`` [T] (entries a position) and ``sample_offsets`` [T + 1].
    ``lengths`` are the documents' ``input_ids`` lengths; a column of other lengths is a damaged file
    (:class:`CacheError`). A compact file's columns come decoded (int32 ids, float32 log-probs)."""
    if pa.types.is_uint8(table.schema.field("rest_logprob").type.value_type):  # compact codes
        table = decode_compact_columns(table)
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
