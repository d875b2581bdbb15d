"""The training-side reader of the teacher caches: a shuffled, rank-split, resumable stream of documents.

:class:`CacheStream` reads the cache files of several shards (:class:`ShardCaches`: one top-k file and,
optionally, the embed file of the same pass and the hidden-state file of the hidden pass) and yields one
dict per document with NumPy arrays; :func:`collate` (kdflow.cache_batch, importable from here too) pads
a list of them into a batch of tensors.

What it relies on, and checks (``CacheMismatch`` naming both files otherwise):

* every file is opened with :meth:`kdflow.cache_format.CacheReader.open`, so a file of another kind or
  built with other settings than ``expected`` is refused;
* the files of one shard were made from the same shard file (same ``shard`` and ``shard_sha256``) by the
  same teacher (same ``teacher_source_hash``, ``tokenizer_fingerprint``, ``max_length``);
* they have the same row groups (same count, same number of rows in each) — the jobs write one row
  group per part of ``rows_per_part`` documents in length-sorted order, so with the same settings the
  parts coincide — and, checked on every row group read, the same ``doc_index`` column (same documents
  in the same order) and the same ``n_tokens``;
* all shards agree on ``k``, on having an embed / hidden file or not, and on the hidden layers and sizes,
  so that their documents can share a batch.

Nothing reads a whole file: the stream reads one row group at a time (only the columns it needs) and
keeps at most about ``shuffle_buffer`` documents plus one row group in memory.

How an epoch is ordered, split over ranks and resumed: docs/cache_format.md, "The training stream".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdflow.cache_batch import collate  # noqa: F401  (re-exported: batches of this stream's items)
from kdflow.cache_format import CacheError, CacheMismatch, CacheReader, list_values, split_expected
from kdflow.cache_fp8 import FP8, decode_fp8_columns
from kdflow.cache_logits import doc_logits, logit_columns, read_logit_columns

# Must be equal in the files of one shard: same shard file, same teacher and tokenisation.
SAME_SHARD_KEYS = ("shard", "shard_sha256")
SAME_TEACHER_KEYS = ("teacher_source_hash", "tokenizer_fingerprint", "max_length")

# Must be equal in every shard's file of a kind, so that their documents can share a batch.
SAME_KIND_KEYS = (
    ("topk", ("k", "samples", "sampling")),
    ("embed", ("hidden_size",)),
    ("hidden", ("layers", "hidden_size")),
)


@dataclass
class ShardCaches:
    """The cache files of one shard: the top-k file, and optionally the embed file written by the same
    pass and the hidden-state file of the hidden pass."""

    topk: Path
    embed: Path | None = None
    hidden: Path | None = None

    def __post_init__(self) -> None:
        self.topk = Path(self.topk)
        self.embed = None if self.embed is None else Path(self.embed)
        self.hidden = None if self.hidden is None else Path(self.hidden)


@dataclass
class _Shard:
    """One shard's opened files and its row-group sizes."""

    name: str
    readers: dict[str, CacheReader]  # kind -> reader; "topk" always, "embed"/"hidden" if given
    row_groups: list[int] = field(default_factory=list)  # rows per row group (equal in every file)


def _row_group_sizes(path: Path) -> list[int]:
    md = pq.ParquetFile(path).metadata
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def reservoir_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``size`` emits items ``0 .. n-1`` that arrive in that order.

    Fill the buffer; then for each further item emit a random element of the buffer and put the item in
    its place; at the end emit what is left in random order. ``size <= 1`` keeps the order.
    """
    if size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    fill = min(size, n)
    picks = rng.integers(0, fill, size=n - fill)
    buf = list(range(fill))
    out = np.empty(n, dtype=np.int64)
    for t, j in enumerate(picks.tolist()):
        out[t] = buf[j]
        buf[j] = fill + t
    out[n - fill :] = np.asarray(buf, dtype=np.int64)[rng.permutation(fill)]
    return out


def _fixed_values(column: pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list<scalar, d> -> [n, d] NumPy."""
    arr = column.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


class CacheStream(torch.utils.data.IterableDataset):
    """One dict per document of the given shards' caches, shuffled per epoch, split over ranks, resumable.

    Each item: ``{"shard": str, "doc_index": int, "input_ids": int32 [n], "topk_ids": int32 [n, k],
    "topk_logprobs": float16 [n, k], "rest_logprob": float16 [n]}``, with a sampled tail ``"sample_ids"`` int32 [e],
    ``"sample_counts"`` uint8 [e] and ``"sample_n"`` [n] (entries a position, kdflow.cache_logits), plus
    ``"embedding": float16 [D]`` when the shards have embed files, and ``"hidden_positions": int32 [p],
    "hidden": {layer: float16 [p, D]}`` when they have hidden files (layers in the file's order), and ``"text":
    str`` (the text the teacher saw, from the embed file) with ``with_text=True``. Arrays are the document's own copies.
    Row ``j`` of the top-k arrays is the teacher's prediction for token ``j + 1`` (docs/cache_format.md).

    ``expected``: metadata the files must have been built with, e.g. ``{"k": 16, "tokenizer_fingerprint":
    …, "layers": [20]}``; each key is checked against every file whose kind carries it (``k`` the top-k
    files, ``layers`` / ``token_ratio`` the hidden files, ``hidden_size`` the embed and hidden files, the
    common keys such as ``tokenizer_fingerprint`` and ``max_length`` all files) and ignored by the other
    kinds; a key no kind carries raises ``ValueError``. A shard given as a plain path is a top-k file alone.
    ``state_dict`` is per rank (mid-epoch it is the same on every rank). See the module docstring for
    order, ranks and resume.
    """

    def __init__(
        self,
        shards: Sequence[ShardCaches],
        *,
        expected: dict | None = None,
        seed: int = 0,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        asked_by: str = "training",
        with_text: bool = False,
    ):
        super().__init__()
        if not shards:
            raise ValueError("CacheStream: no shards given")
        if int(seed) < 0:
            raise ValueError(f"CacheStream: seed must be >= 0, got {seed}")
        if int(shuffle_buffer) < 1:
            raise ValueError(f"CacheStream: shuffle_buffer must be >= 1 (1 = no shuffling), got {shuffle_buffer}")
        if not (int(world_size) >= 1 and 0 <= int(rank) < int(world_size)):
            raise ValueError(f"CacheStream: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.seed, self.shuffle_buffer = int(seed), int(shuffle_buffer)
        self.rank, self.world_size, self.asked_by = int(rank), int(world_size), asked_by
        per_kind = split_expected(expected)
        self._shards = [self._open(s if isinstance(s, ShardCaches) else ShardCaches(s), per_kind) for s in shards]
        self.with_text = bool(with_text)
        if self.with_text and any("embed" not in sh.readers for sh in self._shards):
            raise ValueError(
                "CacheStream(with_text=True): the document texts are read from the embed files; give "
                "every shard its embed file"
            )
        self._check_across_shards()
        # The units of an epoch: (shard number, row group number, rows).
        self._units = [(si, gi, n) for si, sh in enumerate(self._shards) for gi, n in enumerate(sh.row_groups)]
        self.num_documents = sum(n for _, _, n in self._units)
        self._epoch, self._position, self._resume_at = 0, 0, 0

    # ------------------------------------------------------------------ opening and checks

    def _open(self, files: ShardCaches, per_kind: dict[str, dict]) -> _Shard:
        readers = {"topk": CacheReader.open(files.topk, "topk", per_kind["topk"], self.asked_by)}
        for kind in ("embed", "hidden"):
            path = getattr(files, kind)
            if path is not None:
                readers[kind] = CacheReader.open(path, kind, per_kind[kind], self.asked_by)
        top = readers["topk"]
        for kind, reader in readers.items():
            if kind == "topk":
                continue
            for key in SAME_SHARD_KEYS + SAME_TEACHER_KEYS:
                if getattr(reader.meta, key) != getattr(top.meta, key):
                    what = "the same shard file" if key in SAME_SHARD_KEYS else "the same teacher and settings"
                    raise CacheMismatch(
                        f"{reader.path}: {key}={getattr(reader.meta, key)!r}, but {top.path}: {key}="
                        f"{getattr(top.meta, key)!r}; the {kind} and top-k caches of a shard must come from {what}"
                    )
        sizes = _row_group_sizes(top.path)
        for kind, reader in readers.items():
            if kind != "topk" and (other := _row_group_sizes(reader.path)) != sizes:
                raise CacheMismatch(
                    f"{reader.path}: row groups of {other} rows, but {top.path}: {sizes}; the caches of a shard must "
                    f"be built with the same rows_per_part (one row group per part, same length-sorted order)"
                )
        return _Shard(top.meta.shard, readers, sizes)

    def _check_across_shards(self) -> None:
        first = self._shards[0]
        seen: dict[tuple, Path] = {}
        for sh in self._shards:
            top = sh.readers["topk"]
            key = (top.meta.shard, top.meta.shard_sha256)
            if key in seen:
                raise ValueError(
                    f"CacheStream: {top.path} and {seen[key]} are caches of the same shard {key[0]!r}; "
                    "each shard may be given once (its documents would appear twice per epoch)"
                )
            seen[key] = top.path
            if set(sh.readers) != set(first.readers):
                raise ValueError(
                    f"CacheStream: {top.path} comes with {sorted(sh.readers)} caches but "
                    f"{first.readers['topk'].path} with {sorted(first.readers)}; "
                    "give every shard the same kinds"
                )
            for kind, keys in SAME_KIND_KEYS:
                if kind not in sh.readers:
                    continue
                a, b = sh.readers[kind], first.readers[kind]
                ma, mb = a.meta.to_json(), b.meta.to_json()  # (values as written: layers a list)
                for k in keys:
                    if ma.get(k) != mb.get(k):
                        raise CacheMismatch(
                            f"{a.path}: {k}={ma.get(k)!r}, but {b.path}: {k}={mb.get(k)!r}; "
                            f"the shards of one stream must share {k}"
                        )

    # ------------------------------------------------------------------ order

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit permutation, unit position and row of this rank's items in order) for ``epoch``."""
        perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self._units))
        sizes = np.asarray([self._units[u][2] for u in perm], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        order = reservoir_order(int(sizes.sum()), self.shuffle_buffer, np.random.default_rng([self.seed, epoch, 1]))
        mine = order[self.rank :: self.world_size]
        pos = np.repeat(np.arange(len(perm), dtype=np.int64), sizes)[mine]
        return perm, pos, mine - starts[pos]

    def __len__(self) -> int:
        """Examples this rank yields in a whole epoch (ranks may differ by one)."""
        n, w = self.num_documents, self.world_size
        return n // w + (1 if self.rank < n % w else 0)

    def order_key(self) -> str:
        """A hash of what the order depends on: seed, buffer, world size, the shards and their row groups (not
        the rank: at a given step every rank has yielded the same number of examples)."""
        shards = [
            (sh.readers["topk"].meta.shard, sh.readers["topk"].meta.shard_sha256, sh.row_groups) for sh in self._shards
        ]
        blob = json.dumps([self.seed, self.shuffle_buffer, self.world_size, shards], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ epochs and resume

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at position 0; the current epoch again: no change (keeps a loaded resume point)."""
        if int(epoch) < 0:
            raise ValueError(f"CacheStream.set_epoch: epoch must be >= 0, got {epoch}")
        if int(epoch) != self._epoch:
            self._epoch, self._position, self._resume_at = int(epoch), 0, 0

    def state_dict(self) -> dict:
        """``{"epoch", "position", "order_key"}``: position = examples this rank has yielded in this epoch."""
        return {"epoch": self._epoch, "position": self._position, "order_key": self.order_key()}

    def load_state_dict(self, state: dict) -> None:
        """The next ``iter()`` resumes right after ``state["position"]`` examples of ``state["epoch"]``."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if "order_key" in state and state["order_key"] != self.order_key():
            raise ValueError(
                "CacheStream.load_state_dict: the state was saved by a stream with other shards, seed, "
                "shuffle_buffer or world_size; resuming would not continue the same order"
            )
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(
                f"CacheStream.load_state_dict: epoch {epoch}, position {position} out of range "
                f"(this rank has {len(self)} examples per epoch)"
            )
        self._epoch, self._position, self._resume_at = epoch, position, position

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "CacheStream does not support DataLoader(num_workers > 0): every worker would yield "
                "the same documents and the resume position would be wrong; use num_workers=0"
            )
        start, self._resume_at = self._resume_at, 0
        self._position = start
        return self._generate(self._epoch, start)

    def _generate(self, epoch: int, start: int) -> Iterator[dict]:
        perm, pos, rows = self._plan(epoch)
        pos, rows = pos[start:], rows[start:]
        if len(pos) == 0:
            return
        # Row groups to read, in reading order, and which of their rows this rank still needs.
        by_pos = np.argsort(pos, kind="stable")
        unit_pos, first = np.unique(pos[by_pos], return_index=True)
        groups = np.split(rows[by_pos], first[1:])
        pending: dict[tuple[int, int], dict] = {}
        nxt = 0
        for p, need in zip(unit_pos.tolist(), groups, strict=False):
            si, gi, _ = self._units[perm[p]]
            for row, doc in self._read_unit(si, gi, np.unique(need)):
                pending[(p, row)] = doc
            # Every item whose row group has been read can go out (the buffer's order is fixed by the plan).
            while nxt < len(pos) and pos[nxt] <= p:
                doc = pending.pop((int(pos[nxt]), int(rows[nxt])))
                nxt += 1
                self._position += 1
                yield doc

    def _read_unit(self, si: int, gi: int, need: np.ndarray) -> Iterator[tuple[int, dict]]:
        """The documents at rows ``need`` of row group ``gi`` of shard ``si``, read from each of its files."""
        sh = self._shards[si]
        top = sh.readers["topk"]
        t = _read_row_group(top.path, gi, logit_columns(top.meta.k, top.meta.samples))
        doc_index = t.column("doc_index").to_numpy()
        ids, lengths = list_values(t.column("input_ids"))
        logits = read_logit_columns(t, top.path, gi, lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)])

        emb = None
        if "embed" in sh.readers:
            er = sh.readers["embed"]
            te = _read_row_group(
                er.path, gi, ["doc_index", "n_tokens", "embedding"] + (["text"] if self.with_text else [])
            )
            _check_rows(top.path, er.path, gi, doc_index, te.column("doc_index").to_numpy(), "doc_index")
            _check_rows(top.path, er.path, gi, lengths, te.column("n_tokens").to_numpy(), "n_tokens")
            emb = _fixed_values(te.column("embedding"))
            texts = te.column("text").to_pylist() if self.with_text else None

        hid = None
        if "hidden" in sh.readers:
            hr = sh.readers["hidden"]
            layers = list(hr.meta.layers)
            fp8 = hr.meta.value_dtype == FP8
            states_cols = [f"hidden_l{x}" for x in layers] + ([f"hidden_l{x}_scale" for x in layers] if fp8 else [])
            th = _read_row_group(hr.path, gi, ["doc_index", "n_tokens", "positions", *states_cols])
            if fp8:  # decoded to float16 [p, D], as a float16 file's values
                th = decode_fp8_columns(th)
            width = th.column(f"hidden_l{layers[0]}").type.value_type.list_size
            _check_rows(top.path, hr.path, gi, doc_index, th.column("doc_index").to_numpy(), "doc_index")
            _check_rows(top.path, hr.path, gi, lengths, th.column("n_tokens").to_numpy(), "n_tokens")
            positions, plen = list_values(th.column("positions"))
            states = {}
            for layer in layers:
                states[layer], n = list_values(th.column(f"hidden_l{layer}"), width)
                if not np.array_equal(n, plen):
                    raise CacheError(
                        f"{hr.path}: row group {gi}: hidden_l{layer} has other lengths than positions; "
                        "the file is damaged"
                    )
            hid = (np.concatenate([[0], np.cumsum(plen)]), positions, states)

        for row in need.tolist():
            a, b = offsets[row], offsets[row + 1]
            doc = {
                "shard": sh.name,
                "doc_index": int(doc_index[row]),
                "input_ids": ids[a:b].copy(),
                **doc_logits(logits, a, b),
            }
            if emb is not None:
                doc["embedding"] = emb[row].copy()
                if texts is not None:
                    doc["text"] = texts[row]
            if hid is not None:
                hoff, positions, states = hid
                c, d = hoff[row], hoff[row + 1]
                doc["hidden_positions"] = positions[c:d].copy()
                doc["hidden"] = {layer: values[c:d].copy() for layer, values in states.items()}
            yield row, doc


def _read_row_group(path: Path, index: int, columns: list[str]) -> pa.Table:
    with pq.ParquetFile(path) as pf:
        return pf.read_row_group(index, columns=columns)


def _check_rows(path_a: Path, path_b: Path, group: int, a: np.ndarray, b: np.ndarray, column: str) -> None:
    if len(a) != len(b) or not np.array_equal(a, b):
        bad = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        va = a[bad] if bad < len(a) else "missing"
        vb = b[bad] if bad < len(b) else "missing"
        raise CacheMismatch(
            f"{path_b}: row group {group}, row {bad} has {column}={vb}, but {path_a} has {column}={va} there; the "
            f"caches of a shard must hold the same documents in the same order (same rows_per_part and shard); "
            f"rebuild the one that is stale"
        )
