"""The compact encoding of a logit cache (``teacher_cache.logit_encoding: compact``; docs/cache_format.md,
"Compact encoding").

* **Ids** (head and sampled) in the narrowest unsigned integer that holds the teacher's vocabulary rows: uint16 up
  to 65,536 rows, else uint32 (a 128k vocabulary needs 17 bits; zstd takes the high zeros).
* **Log-probabilities** on a grid of ``STEP`` = 1/16 nat: a head entry's code is q = round(−log p / STEP) (most
  probable first, so q never decreases along a position), stored as its gap to the previous entry's q (the
  first as q itself), one byte each; ``ZERO`` (255) marks an entry of zero mass. The rest's log-mass has a
  code of its own (its q, at most the grid's bottom; ``ZERO`` only when it has no mass at all). Rounding moves a
  log-probability by at most STEP / 2 = 1/32 nat.
* **Probability floor** (``logit_floor``, default 0): head entries with p below it, and any below e^−254/16 ≈
  1.3·10⁻⁷ (beyond the grid), are moved into the rest: their code is ``ZERO``, their id 0, their mass added to
  the rest's.
* **Decoding** (vectorised over a row group) gives float32 log-probabilities renormalised over the k + 1 buckets
  (Σ = 1 exactly), the entries of zero mass at the cache's floor (−10000), and int32 ids.
* **Its own error**: KL(stored‖decoded) over the k + 1 buckets, where *stored* is the float32 distribution before
  encoding with the floored entries counted in the rest on both sides (a floored entry's own share is what the
  floor gives up, reported apart as the mass moved). Bounded by about STEP² / 8 ≈ 5·10⁻⁴ nats a position;
  every capture job reports its largest (``encoding_kl_max``) and the largest mass moved (``floor_mass_max``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kdflow.cache_columns import LOGPROB_FLOOR, list_values, nested_values

COMPACT = "compact"
STEP = 1.0 / 16  # nats a code
ZERO = 255  # the code of an entry of zero mass
GRID_MIN = -(ZERO - 1) * STEP  # the most negative log-probability on the grid


def id_type(vocab_rows: int) -> pa.DataType:
    """The Arrow type of the ids of a teacher with ``vocab_rows`` LM-head rows."""
    return pa.uint16() if vocab_rows <= 1 << 16 else pa.uint32()


def encode_logprobs(lp: np.ndarray, rest: np.ndarray, floor: float = 0.0) -> dict[str, np.ndarray]:
    """Codes of head log-probs ``lp`` [T, k] (float32, full-vocabulary, most probable first) and the rest's
    log-mass ``rest`` [T]: ``codes`` uint8 [T, k] (gaps), ``rest_code`` uint8 [T], ``live`` bool [T, k] (entries
    kept), ``moved`` float64 [T] (mass moved into the rest by the floor)."""
    lp = lp.astype(np.float64)
    live = (lp >= GRID_MIN) & (np.exp(lp) >= floor)
    # A live entry below a dead one would break the gaps; sorted rows have none (ties aside): keep a prefix.
    live = np.cumprod(live, axis=-1).astype(bool)
    moved = np.where(live, 0.0, np.exp(lp)).sum(-1)
    q = np.where(live, np.clip(np.rint(-lp / STEP), 0, ZERO - 1), 0).astype(np.int64)
    q = np.maximum.accumulate(q, axis=-1)  # rounding keeps the order; this makes it certain
    gaps = np.diff(q, axis=-1, prepend=0)
    codes = np.where(live, gaps, ZERO).astype(np.uint8)
    rest_mass = np.exp(rest.astype(np.float64)) + moved
    with np.errstate(divide="ignore"):
        log_rest = np.log(rest_mass)
    # A rest below the grid is kept at its bottom (overstated by at most 1.3e-7): only a rest of no mass at all
    # (the head holds the whole vocabulary) is ZERO.
    rq = np.clip(np.rint(-np.maximum(log_rest, GRID_MIN) / STEP), 0, ZERO - 1)
    rest_code = np.where(rest_mass > 0, rq, ZERO).astype(np.uint8)
    return {"codes": codes, "rest_code": rest_code, "live": live, "moved": moved}


def decode_logprobs(codes: np.ndarray, rest_code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 log-probs [T, k] and rest log-mass [T] of the codes, renormalised over the k + 1 buckets; zero mass
    at ``LOGPROB_FLOOR``."""
    live = codes != ZERO
    q = np.cumsum(np.where(live, codes, 0).astype(np.int64), axis=-1)
    lp = np.where(live, -q * STEP, -np.inf)
    rest_live = rest_code != ZERO
    rest = np.where(rest_live, -rest_code.astype(np.float64) * STEP, -np.inf)
    if lp.shape[-1]:
        total = np.logaddexp(np.logaddexp.reduce(lp, axis=-1), rest)
    else:
        total = rest
    total = np.where(np.isfinite(total), total, 0.0)
    lp = np.where(live, lp - total[:, None], LOGPROB_FLOOR).astype(np.float32)
    rest = np.where(rest_live, rest - total, LOGPROB_FLOOR).astype(np.float32)
    return lp, rest


def encoding_kl(lp: np.ndarray, rest: np.ndarray, live: np.ndarray, lp_dec: np.ndarray, rest_dec: np.ndarray):
    """KL(stored‖decoded) a position over the k + 1 buckets, floored entries counted in the rest on both sides
    (module docstring). ``lp``, ``rest``: the float32 values before encoding."""
    p = np.where(live, np.exp(lp.astype(np.float64)), 0.0)
    r = np.exp(rest.astype(np.float64)) + np.where(live, 0.0, np.exp(lp.astype(np.float64))).sum(-1)
    total = p.sum(-1) + r
    p, r = p / total[:, None], r / total
    pd = np.where(live, np.exp(lp_dec.astype(np.float64)), 0.0)
    rd = np.where(rest_dec > LOGPROB_FLOOR, np.exp(rest_dec.astype(np.float64)), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        head = np.where(p > 0, p * (np.log(p) - np.log(pd)), 0.0).sum(-1)
        tail = np.where(r > 0, r * (np.log(r) - np.log(rd)), 0.0)
    return head + tail


def decode_compact_columns(table: pa.Table) -> pa.Table:
    """A row group of a compact logit cache with its logit columns as a plain file's: ids int32, log-probs
    float32 (decoded, renormalised), so that every reader reads either encoding alike."""
    names = table.column_names
    if "rest_logprob" not in names:
        return table
    rest_codes, lengths = list_values(table.column("rest_logprob"))
    if "topk_logprobs" in names:
        k = table.column("topk_logprobs").type.value_type.list_size
        codes, _ = list_values(table.column("topk_logprobs"), k)
    else:
        k, codes = 0, np.zeros((len(rest_codes), 0), dtype=np.uint8)
    lp, rest = decode_logprobs(codes, rest_codes)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    out = table.set_column(
        names.index("rest_logprob"), "rest_logprob", pa.ListArray.from_arrays(offsets, pa.array(rest))
    )
    if k:
        flat = pa.FixedSizeListArray.from_arrays(pa.array(lp.reshape(-1)), k)
        out = out.set_column(names.index("topk_logprobs"), "topk_logprobs", pa.ListArray.from_arrays(offsets, flat))
        ids, _ = list_values(table.column("topk_ids"), k)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int32).reshape(-1)), k)
        out = out.set_column(names.index("topk_ids"), "topk_ids", pa.ListArray.from_arrays(offsets, flat))
    if "sample_ids" in names:
        values, per_position, per_doc = nested_values(table.column("sample_ids"))
        inner = pa.array(np.concatenate([[0], np.cumsum(per_position)]).astype(np.int32))
        positions = pa.ListArray.from_arrays(inner, pa.array(values.astype(np.int32)))
        outer = pa.array(np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int32))
        out = out.set_column(names.index("sample_ids"), "sample_ids", pa.ListArray.from_arrays(outer, positions))
    return out
