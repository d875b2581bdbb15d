"""Arrow columns from NumPy arrays and back, without per-value Python objects: a per-token column is an Arrow
``list`` (one entry a document) of scalars or of fixed-size lists (one entry a token position); a per-token
column of a variable number of entries a position (the sampled ids of a logit cache) is a list of lists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

LOGPROB_FLOOR = -1.0e4  # log-probabilities below this (incl. -inf) are stored as this: the cache's "zero mass"


def ragged(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType | None = None) -> pa.ListArray:
    """A list array whose i-th entry is the next ``lengths[i]`` rows of ``values``.

    ``values`` of shape [T] gives list<scalar>; of shape [T, d] gives list<fixed_size_list<scalar, d>>.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != len(values):
        raise ValueError(f"ragged: lengths sum to {offsets[-1]} but there are {len(values)} rows")
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=type_)
    inner = flat if values.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] -> fixed_size_list<scalar, d> of length n."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])


def list_values(column: pa.ChunkedArray | pa.Array, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`ragged`: (values [T] or [T, width], lengths [n]) as NumPy, without Python objects."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    inner = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    flat = (inner.flatten() if width is not None else inner).to_numpy(zero_copy_only=False)
    values = flat.reshape(-1, width) if width is not None else flat
    return values, np.diff(offsets)


def nested(values: np.ndarray, inner: np.ndarray, outer: np.ndarray, type_: pa.DataType | None = None) -> pa.ListArray:
    """list<list<scalar>>: entry i (a document) holds the next ``outer[i]`` lists (its positions), each of the next
    ``inner[j]`` ``values`` (that position's entries)."""
    flat = pa.array(np.ascontiguousarray(values), type=type_)
    return pa.ListArray.from_arrays(
        _offsets(outer, len(inner)), pa.ListArray.from_arrays(_offsets(inner, len(values)), flat)
    )


def nested_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`nested`: (values [E], entries per position [T], positions per document [n])."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    outer = arr.offsets.to_numpy()
    lists = arr.values.slice(outer[0], outer[-1] - outer[0])
    inner = lists.offsets.to_numpy()
    values = lists.values.slice(inner[0], inner[-1] - inner[0]).to_numpy(zero_copy_only=False)
    return values, np.diff(inner), np.diff(outer)


def _offsets(lengths: np.ndarray, total: int) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != total:
        raise ValueError(f"nested: lengths sum to {offsets[-1]} but there are {total} rows")
    return pa.array(offsets)
