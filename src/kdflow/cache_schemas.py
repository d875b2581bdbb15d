"""The Arrow schemas of the three teacher caches (docs/cache_format.md documents every column)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from kdflow.cache_compact import COMPACT, id_type
from kdflow.cache_fp8 import FP8


def topk_schema(k: int, samples: int = 0, encoding: str = "plain", vocab_rows: int = 0) -> pa.Schema:
    """The logit cache: an exact head of ``k`` ids a position and, with ``samples`` > 0, a sampled tail: per
    position the unique ids drawn from the teacher outside the head and their counts (most drawn first). With
    ``k`` = 0 the head's ids and log-probs are left out (Arrow has no fixed-size list of width 0). ``encoding``
    compact: ids in the type ``vocab_rows`` needs, log-probs as one-byte codes (kdflow.cache_compact)."""
    ids, lp = (id_type(vocab_rows), pa.uint8()) if encoding == COMPACT else (pa.int32(), pa.float16())
    tail = [("sample_ids", pa.list_(pa.list_(ids))), ("sample_counts", pa.list_(pa.list_(pa.uint8())))]
    head = [
        ("topk_ids", pa.list_(pa.list_(ids, k))),  # [n_tokens][k], most probable first
        ("topk_logprobs", pa.list_(pa.list_(lp, k))),  # full-vocabulary log p at T=1 (compact: codes)
    ]
    return pa.schema(
        [
            ("doc_index", pa.int32()),  # row of the source shard
            ("doc_id", pa.string()),
            ("n_tokens", pa.int32()),  # tokens the teacher saw (after truncation)
            ("truncated", pa.bool_()),  # the document was longer than max_length tokens
            ("input_ids", pa.list_(pa.int32())),  # [n_tokens]
            *(head if k else []),
            ("rest_logprob", pa.list_(lp)),  # log of the probability mass outside the k ids
            *(tail if samples else []),
        ]
    )


def embed_schema(hidden: int) -> pa.Schema:
    return pa.schema(
        [
            ("doc_index", pa.int32()),
            ("doc_id", pa.string()),
            ("n_tokens", pa.int32()),
            ("text", pa.string()),  # the text the teacher saw (the document up to truncation)
            ("embedding", pa.list_(pa.float16(), hidden)),  # mean of the final hidden state over its tokens
        ]
    )


# The hidden-state cache's value encodings (teacher_cache.hidden_dtype -> CacheMeta.value_dtype).
HIDDEN_DTYPES = {"float16": "float16", "float8": FP8}


def hidden_schema(hidden: int, layers: Sequence[int], value_dtype: str = "float16") -> pa.Schema:
    """float16: ``hidden_l<l>`` list<fixed_size_list<float16, D>>. float8_e4m3: ``hidden_l<l>`` holds the D e4m3
    bytes of each position (list<fixed_size_binary[D]>) and ``hidden_l<l>_scale`` one float32 scale per position
    (:func:`fp8_encode`, :func:`ragged_bytes`)."""
    fields = [
        ("doc_index", pa.int32()),
        ("doc_id", pa.string()),
        ("n_tokens", pa.int32()),
        ("positions", pa.list_(pa.int32())),  # the token positions stored (all, or a seeded subset)
    ]
    for layer in layers:
        if value_dtype == FP8:
            fields += [  # one binary value a position: Parquet then keeps levels per position, not per value
                (f"hidden_l{layer}", pa.list_(pa.binary(hidden))),
                (f"hidden_l{layer}_scale", pa.list_(pa.float32())),
            ]
        elif value_dtype == "float16":
            fields.append((f"hidden_l{layer}", pa.list_(pa.list_(pa.float16(), hidden))))
        else:
            raise ValueError(f"hidden_schema: value_dtype {value_dtype!r} is none of {sorted(HIDDEN_DTYPES.values())}")
    return pa.schema(fields)
