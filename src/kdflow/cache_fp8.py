"""float8 (e4m3) hidden states: the encoding behind ``teacher_cache.hidden_dtype: float8``.

Each position's values are scaled by its own max |h| / 448 (e4m3's largest value) and rounded to e4m3; the file
keeps the D bytes of a position as one fixed-size binary value and the float32 scale beside it
(docs/cache_format.md, "float8 hidden states"). Readers get float16 back (:func:`decode_fp8_columns`), so a run
reads either encoding alike. Torch is imported only to encode and to build the decoding table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from kdflow.errors import KdflowError

if TYPE_CHECKING:
    import torch

FP8 = "float8_e4m3"  # CacheMeta.value_dtype of a hidden-state cache stored as e4m3 bytes with per-position scales


class Fp8Error(KdflowError, ValueError):
    """A float8 hidden-state column whose scales do not match its values: a damaged file."""


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value


def fp8_encode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """[T, D] float -> (uint8 [T, D] e4m3 bytes, float32 [T] scales): each position scaled by its own
    max |x| / 448, so that its largest value is e4m3's largest and nothing saturates. A position of zeros has
    scale 0 (and decodes to zeros). Relative rounding error of each value: at most 2^-4 (3 mantissa bits), plus
    e4m3's subnormal step (2^-9 x scale) for values under 2^-6 x scale."""
    import torch

    x = x.float()
    amax = x.abs().amax(-1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("fp8_encode: a hidden state holds inf or NaN; the teacher's forward is broken")
    scale = amax / E4M3_MAX
    safe = torch.where(scale > 0, scale, torch.ones((), dtype=scale.dtype, device=scale.device))
    q = (x / safe.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).cpu().numpy(), scale.cpu().numpy().astype(np.float32)


def ragged_bytes(codes: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """:func:`ragged` for uint8 [T, D] rows stored as one fixed-size binary value each."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != len(codes):
        raise ValueError(f"ragged_bytes: lengths sum to {offsets[-1]} but there are {len(codes)} rows")
    inner = pa.FixedSizeBinaryArray.from_buffers(pa.binary(codes.shape[1]), len(codes), [None, pa.py_buffer(codes)])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def bytes_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`ragged_bytes`: (uint8 [T, D], lengths [n]), without Python objects."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    inner = arr.values
    width = inner.type.byte_width
    start = (inner.offset + offsets[0]) * width
    data = np.frombuffer(inner.buffers()[1], dtype=np.uint8)[start : start + (offsets[-1] - offsets[0]) * width]
    return data.reshape(-1, width), np.diff(offsets)


_E4M3_TABLE: np.ndarray | None = None


def fp8_decode(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fp8_encode`: uint8 [T, D], float32 [T] -> float16 [T, D] (one table lookup and one
    multiply per value; values beyond float16's range, ±65504, are clamped to it)."""
    global _E4M3_TABLE
    if _E4M3_TABLE is None:
        import torch

        table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
        _E4M3_TABLE = np.nan_to_num(table, nan=0.0)  # 0x7f/0xff are e4m3's NaN; fp8_encode never writes them
    values = _E4M3_TABLE[codes] * scale.astype(np.float32)[:, None]
    return np.clip(values, -65504.0, 65504.0).astype(np.float16)


def decode_fp8_columns(table: pa.Table) -> pa.Table:
    """A table of a float8 hidden-state file with every ``hidden_l<l>`` (and its ``_scale``) replaced by the
    decoded float16 column, as a float16 file holds it."""
    for name in [n for n in table.column_names if n.startswith("hidden_l") and not n.endswith("_scale")]:
        codes, lengths = bytes_values(table.column(name))
        scales = table.column(f"{name}_scale").combine_chunks()
        n = np.diff(scales.offsets.to_numpy())
        if not np.array_equal(lengths, n):
            raise Fp8Error(f"{name}_scale has other lengths than {name}; the file is damaged")
        scale = scales.values.slice(scales.offsets[0].as_py(), int(n.sum())).to_numpy()
        index = table.column_names.index(name)
        values = fp8_decode(codes, scale)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = table.set_column(index, name, pa.ListArray.from_arrays(pa.array(offsets), inner))
        table = table.remove_column(table.column_names.index(f"{name}_scale"))
    return table
