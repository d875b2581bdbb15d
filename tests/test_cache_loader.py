"""The training-side cache reader: every document once per epoch and bit-exact, seeded order, rank split,
exact resume, row-group streaming, refused mismatches, collate and DataLoader use.

The caches are synthetic: random arrays written through the real PartWriter / assemble path, in the
writer's layout (documents sorted by length, one row group per part of ``rows_per_part`` documents) and
with the metadata keys the capture jobs set. Tests on files written by the real capture jobs (tiny teacher)
check that top-k, embed and hidden files of a shard line up row group by row group, and that the metadata
keys the loader knows are the keys really written (and the synthetic files carry).
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdflow.cache_format import (
    COMMON_META_KEYS,
    KIND_META_KEYS,
    OPTIONAL_KEYS,
    CacheMeta,
    CacheMismatch,
    PartWriter,
    assemble,
    embed_schema,
    fixed,
    hidden_schema,
    ragged,
    read_meta,
    topk_schema,
)
from kdflow.cache_loader import SAME_SHARD_KEYS, SAME_TEACHER_KEYS, CacheStream, ShardCaches, collate, reservoir_order
from tiny_models import tiny_teacher_dir  # noqa: F401 (fixture)

K, D, LAYERS = 3, 5, [1, 3]
SHARDS = {"shard_00000": 8, "shard_00001": 11, "shard_00002": 6}  # documents per shard
ROWS_PER_PART = 4  # -> 2, 3 and 2 row groups
N_DOCS = sum(SHARDS.values())


def _f16(rng: np.random.Generator, shape) -> np.ndarray:
    values = (rng.standard_normal(shape) * 8).astype(np.float16)
    flat = values.reshape(-1)
    specials = np.array([-0.0, 6e-8, 65504, -np.inf], dtype=np.float16)
    flat[: min(len(flat), len(specials))] = specials[: len(flat)]
    return values


def make_docs(rng: np.random.Generator, n_docs: int, ratio: float = 1.0, k: int = K) -> list[dict]:
    """Random documents in shard order (doc_index = position), one of them empty."""
    docs = []
    for i in range(n_docs):
        n = 0 if i == 2 else int(rng.integers(1, 13))
        positions = (
            np.arange(n, dtype=np.int32)
            if ratio >= 1
            else np.sort(rng.choice(n, size=max(1, round(ratio * n)), replace=False)).astype(np.int32)
            if n
            else np.zeros(0, np.int32)
        )
        docs.append(
            {
                "doc_index": i,
                "input_ids": rng.integers(0, 1000, n).astype(np.int32),
                "topk_ids": rng.integers(0, 1000, (n, k)).astype(np.int32),
                "topk_logprobs": _f16(rng, (n, k)),
                "rest_logprob": _f16(rng, (n,)),
                "embedding": _f16(rng, (D,)),
                "hidden_positions": positions,
                "hidden": {layer: _f16(rng, (len(positions), D)) for layer in LAYERS},
            }
        )
    return docs


def base_meta(shard: str, **over) -> dict:
    """The common fields CacheJob.base_meta sets (test_the_loaders_key_sets_are_the_keys_written)."""
    meta = {
        "format_version": 1,
        "kdflow_version": "0.1.0",
        "git_commit": "abc",
        "teacher": "teacher",
        "teacher_source_hash": "src0",
        "teacher_revision": None,
        "teacher_layers": 4,
        "tokenizer_fingerprint": "fp0",
        "vocab_size": 1000,
        "max_length": 16,
        "dtype": "float32",
        "value_dtype": "float16",
        "shard": shard,
        "shard_sha256": f"sha-{shard}",
        "settings_hash": "s",
        "resume_key": "r",
    }
    return {**meta, **over}


def _columns(kind: str, docs: list[dict]) -> dict:
    lengths = np.asarray([len(d["input_ids"]) for d in docs], dtype=np.int32)
    cols = {
        "doc_index": np.asarray([d["doc_index"] for d in docs], dtype=np.int32),
        "doc_id": [f"doc-{d['doc_index']}" for d in docs],
        "n_tokens": lengths,
    }
    cat = lambda name: np.concatenate([d[name] for d in docs])  # noqa: E731
    if kind == "topk":
        cols.update(
            truncated=np.zeros(len(docs), bool),
            input_ids=ragged(cat("input_ids"), lengths),
            topk_ids=ragged(cat("topk_ids"), lengths),
            topk_logprobs=ragged(cat("topk_logprobs"), lengths),
            rest_logprob=ragged(cat("rest_logprob"), lengths),
        )
    elif kind == "embed":
        cols.update(text=["t"] * len(docs), embedding=fixed(np.stack([d["embedding"] for d in docs])))
    else:
        plen = np.asarray([len(d["hidden_positions"]) for d in docs], dtype=np.int32)
        cols["positions"] = ragged(cat("hidden_positions"), plen)
        for layer in LAYERS:
            cols[f"hidden_l{layer}"] = ragged(np.concatenate([d["hidden"][layer] for d in docs]), plen)
    return cols


def write_cache(
    path: Path,
    kind: str,
    docs: list[dict],
    shard: str,
    *,
    rows_per_part: int = ROWS_PER_PART,
    order: np.ndarray | None = None,
    **meta_over,
) -> Path:
    """One cache file as the capture jobs write it: length-sorted documents, parts of ``rows_per_part``
    documents written with PartWriter, assembled into one row group per part."""
    k = docs[0]["topk_ids"].shape[1]
    schema = {"topk": topk_schema(k), "embed": embed_schema(D), "hidden": hidden_schema(D, LAYERS)}[kind]
    extra = {
        "topk": {"k": k},
        "embed": {"hidden_size": D},
        "hidden": {"layers": tuple(LAYERS), "hidden_size": D, "token_ratio": 1.0, "token_seed": 0},
    }[kind]
    meta = CacheMeta(**base_meta(shard, **meta_over), cache=kind, **extra)
    if order is None:
        order = np.argsort([len(d["input_ids"]) for d in docs], kind="stable")
    parts = []
    for part, start in enumerate(range(0, len(order), rows_per_part)):
        part_path = path.parent / ".partial" / f"{path.stem}_{kind}_part{part:05d}.parquet"
        PartWriter(schema).write(
            part_path, _columns(kind, [docs[i] for i in order[start : start + rows_per_part]]), meta
        )
        parts.append(part_path)
    assemble(parts, path, meta)
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Three shards with top-k, embed and hidden files; the documents by (shard, doc_index); and each
    unit's doc_index in file order, by (shard, row group)."""
    root = tmp_path_factory.mktemp("caches")
    rng = np.random.default_rng(5)
    shards, docs, units = [], {}, {}
    for name, n in SHARDS.items():
        shard_docs = make_docs(rng, n, ratio=0.5 if name == "shard_00001" else 1.0)
        files = ShardCaches(
            *(
                write_cache(root / kind / f"{name}.parquet", kind, shard_docs, name)
                for kind in ("topk", "embed", "hidden")
            )
        )
        shards.append(files)
        docs.update({(name, d["doc_index"]): d for d in shard_docs})
        pf = pq.ParquetFile(files.topk)
        for g in range(pf.num_row_groups):
            units[(name, g)] = pf.read_row_group(g, columns=["doc_index"]).column(0).to_pylist()
    return shards, docs, units


def keys(items) -> list[tuple[str, int]]:
    return [(d["shard"], d["doc_index"]) for d in items]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(a.view(np.uint16), b.view(np.uint16)) if a.dtype == np.float16 else np.array_equal(a, b)


# --------------------------------------------------------------------------- content and order


def test_every_document_once_per_epoch_and_bit_exact(caches):
    shards, docs, _ = caches
    stream = CacheStream(
        shards, expected={"k": K, "tokenizer_fingerprint": "fp0", "layers": LAYERS}, seed=3, shuffle_buffer=5
    )
    assert len(stream) == stream.num_documents == N_DOCS
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        items = list(stream)
        assert sorted(keys(items)) == sorted(docs)
    for item in items:
        want = docs[(item["shard"], item["doc_index"])]
        for name in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob", "embedding", "hidden_positions"):
            assert _same_bits(item[name], want[name]), name
        assert list(item["hidden"]) == LAYERS
        for layer in LAYERS:
            assert _same_bits(item["hidden"][layer], want["hidden"][layer])
        assert item["input_ids"].flags.writeable and item["input_ids"].base is None  # its own copy


def test_topk_only_stream_and_plain_paths(caches):
    shards, docs, _ = caches
    items = list(CacheStream([s.topk for s in shards], seed=1))
    assert sorted(keys(items)) == sorted(docs)
    assert set(items[0]) == {"shard", "doc_index", "input_ids", "topk_ids", "topk_logprobs", "rest_logprob"}


def test_order_is_seeded_per_epoch(caches):
    shards, _, _ = caches
    run = lambda seed, epoch: keys(_epoch(CacheStream(shards, seed=seed, shuffle_buffer=6), epoch))  # noqa: E731
    assert run(0, 0) == run(0, 0)
    assert run(0, 1) == run(0, 1)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)


def _epoch(stream: CacheStream, epoch: int) -> list[dict]:
    stream.set_epoch(epoch)
    return list(stream)


def test_shuffle_buffer_1_keeps_row_groups_whole_and_in_file_order(caches):
    shards, _, units = caches
    orders = set()
    for epoch in range(4):
        items = keys(_epoch(CacheStream(shards, seed=2, shuffle_buffer=1), epoch))
        runs = [(shard, [i for _, i in group]) for shard, group in itertools.groupby(items, key=lambda x: x[0])]
        # consecutive runs of one shard are whole row groups of it, in file order
        seen = []
        for shard, indexes in runs:
            while indexes:
                unit = next(u for u in units if u[0] == shard and units[u] == indexes[: len(units[u])])
                seen.append(unit)
                indexes = indexes[len(units[unit]) :]
        assert sorted(seen) == sorted(units)
        orders.add(tuple(seen))
    assert len(orders) > 1  # the unit order itself is shuffled per epoch


def test_reservoir_order():
    rng = np.random.default_rng(0)
    assert reservoir_order(10, 1, rng).tolist() == list(range(10))
    for n, size in [(10, 3), (4, 10), (1, 5), (0, 4), (50, 50)]:
        order = reservoir_order(n, size, np.random.default_rng(1))
        assert sorted(order.tolist()) == list(range(n))
    # an item comes out only after it went in: the t-th emitted before the final flush is among the first size + t
    order = reservoir_order(100, 8, np.random.default_rng(2))
    assert all(order[t] <= t + 8 - 1 for t in range(100 - 8))
    assert order.tolist() != list(range(100))


# --------------------------------------------------------------------------- ranks and resume


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_epoch_round_robin(caches, world_size):
    shards, docs, _ = caches
    full = keys(_epoch(CacheStream(shards, seed=4, shuffle_buffer=7), 1))
    parts = []
    for rank in range(world_size):
        stream = CacheStream(shards, seed=4, shuffle_buffer=7, rank=rank, world_size=world_size)
        part = keys(_epoch(stream, 1))
        assert part == full[rank::world_size]
        assert len(stream) == len(part)
        parts.append(part)
    assert sum(len(p) for p in parts) == N_DOCS and set().union(*map(set, parts)) == set(docs)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
@pytest.mark.parametrize("consumed", [0, 1, 6, "all"])
def test_resume_continues_exactly(caches, world_size, rank, consumed):
    shards, _, _ = caches
    make = lambda: CacheStream(shards, seed=9, shuffle_buffer=4, rank=rank, world_size=world_size)  # noqa: E731
    full = [keys(_epoch(make(), e)) for e in (2, 3)]
    n = len(full[0]) if consumed == "all" else consumed
    first = make()
    first.set_epoch(2)
    head = keys(itertools.islice(iter(first), n))
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == n and head == full[0][:n]

    again = make()
    again.load_state_dict(state)
    again.set_epoch(2)  # the usual epoch loop: the current epoch again keeps the loaded position
    assert keys(again) == full[0][n:]
    assert again.state_dict()["position"] == len(full[0])
    again.set_epoch(3)
    assert keys(again) == full[1]
    assert keys(again) == full[1]  # a new iter() without a loaded state replays the epoch


def test_resume_through_dataloader_and_skips_consumed_row_groups(caches, monkeypatch):
    shards, _, _ = caches
    make = lambda: CacheStream(shards, seed=1, shuffle_buffer=3)  # noqa: E731
    full = keys(make())
    loader = torch.utils.data.DataLoader(make(), batch_size=4, collate_fn=partial(collate, pad_id=0))
    it = iter(loader)
    got = [list(zip(b["shard"], b["doc_index"].tolist(), strict=False)) for b in itertools.islice(it, 5)]
    state = loader.dataset.state_dict()
    assert state["position"] == 20 and sum(got, []) == full[:20]

    reads = count_row_group_reads(monkeypatch)
    resumed = make()
    resumed.load_state_dict(state)
    assert keys(resumed) == full[20:]
    assert len(reads) < 3 * 7  # not every row group of the epoch is read again


def test_state_from_other_settings_is_refused(caches):
    shards, _, _ = caches
    state = CacheStream(shards, seed=1).state_dict()
    with pytest.raises(ValueError, match="other shards, seed"):
        CacheStream(shards, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        CacheStream(shards, seed=1).load_state_dict({**state, "position": N_DOCS + 1})


# --------------------------------------------------------------------------- streaming


def count_row_group_reads(monkeypatch) -> list[tuple[int, tuple]]:
    """Record every ParquetFile.read_row_group call (row group, columns); refuse whole-file reads."""
    calls = []
    real = pq.ParquetFile.read_row_group

    def read_row_group(self, i, columns=None, **kw):
        calls.append((i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    def refuse(*_a, **_k):
        raise AssertionError("a whole cache file was read")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    return calls


def test_reads_one_row_group_at_a_time_and_only_needed_columns(caches, monkeypatch):
    shards, _, _ = caches
    calls = count_row_group_reads(monkeypatch)
    n_groups = sum(pq.ParquetFile(s.topk).num_row_groups for s in shards)
    for _ in itertools.islice(iter(CacheStream(shards, seed=0, shuffle_buffer=1)), 1):
        assert len(calls) == 3  # the first document needed one row group of each of the 3 files
    calls.clear()
    assert len(list(CacheStream(shards, seed=0, shuffle_buffer=4))) == N_DOCS
    assert len(calls) == 3 * n_groups  # a full epoch: each row group of each file once
    assert all(cols and "doc_id" not in cols and "text" not in cols for _, cols in calls)


# --------------------------------------------------------------------------- mismatches


def test_other_k_than_expected_is_refused(caches):
    shards, _, _ = caches
    with pytest.raises(CacheMismatch, match=r"topk/shard_00000\.parquet: built with k=3, but trainer needs k=8"):
        CacheStream(shards, expected={"k": 8}, asked_by="trainer")
    with pytest.raises(CacheMismatch, match=r"hidden/shard_00000\.parquet: built with layers=\[1, 3\].*layers=\[2\]"):
        CacheStream(shards, expected={"layers": [2], "k": K})
    with pytest.raises(CacheMismatch, match="tokenizer_fingerprint='fp0'.*tokenizer_fingerprint='other'"):
        CacheStream(shards, expected={"tokenizer_fingerprint": "other"})
    with pytest.raises(ValueError, match=r"\['cache', 'kk'\] is not a metadata key"):
        CacheStream(shards, expected={"kk": 3, "cache": "topk"})


def test_hidden_file_of_another_shard_is_refused(caches):
    shards, _, _ = caches
    mixed = ShardCaches(shards[0].topk, shards[0].embed, shards[1].hidden)
    with pytest.raises(CacheMismatch) as err:
        CacheStream([mixed])
    msg = str(err.value)
    assert str(shards[1].hidden) in msg and str(shards[0].topk) in msg
    assert "shard='shard_00001'" in msg and "shard='shard_00000'" in msg


def test_same_shard_name_other_bytes_or_teacher_is_refused(tmp_path):
    docs = make_docs(np.random.default_rng(0), 5)
    topk = write_cache(tmp_path / "topk.parquet", "topk", docs, "shard_00000")
    for key, value in [("shard_sha256", "sha-new"), ("tokenizer_fingerprint", "fp1")]:
        hidden = write_cache(tmp_path / f"hidden_{key}.parquet", "hidden", docs, "shard_00000", **{key: value})
        with pytest.raises(CacheMismatch, match=f"hidden_{key}.parquet: {key}='{value}', but .*topk.parquet"):
            CacheStream([ShardCaches(topk, hidden=hidden)])


def test_doc_index_disagreement_between_topk_and_hidden_is_refused(tmp_path):
    docs = make_docs(np.random.default_rng(1), 7)
    topk = write_cache(tmp_path / "topk.parquet", "topk", docs, "shard_00000")
    order = np.argsort([len(d["input_ids"]) for d in docs], kind="stable")
    swapped = order.copy()
    swapped[[4, 5]] = swapped[[5, 4]]  # same row groups, two rows of the second one swapped
    hidden = write_cache(tmp_path / "hidden.parquet", "hidden", docs, "shard_00000", order=swapped)
    stream = CacheStream([ShardCaches(topk, hidden=hidden)], shuffle_buffer=1)
    with pytest.raises(CacheMismatch) as err:
        list(stream)
    msg = str(err.value)
    assert str(hidden) in msg and str(topk) in msg and "row group 1, row 0" in msg
    assert f"doc_index={order[5]}" in msg and f"doc_index={order[4]}" in msg


def test_other_row_groups_are_refused(tmp_path):
    docs = make_docs(np.random.default_rng(2), 7)
    topk = write_cache(tmp_path / "topk.parquet", "topk", docs, "shard_00000")
    embed = write_cache(tmp_path / "embed.parquet", "embed", docs, "shard_00000", rows_per_part=3)
    with pytest.raises(
        CacheMismatch, match=r"embed.parquet: row groups of \[3, 3, 1\] rows, but .*topk.parquet: \[4, 3\]"
    ):
        CacheStream([ShardCaches(topk, embed=embed)])


def test_shards_must_share_k_and_kinds_and_not_repeat(caches, tmp_path):
    shards, _, _ = caches
    docs = make_docs(np.random.default_rng(3), 4, k=4)
    k4 = write_cache(tmp_path / "k4.parquet", "topk", docs, "shard_00009")
    with pytest.raises(CacheMismatch, match="k4.parquet: k=4, but .*k=3"):
        CacheStream([shards[0].topk, k4])
    with pytest.raises(ValueError, match="same kinds"):
        CacheStream([shards[0], shards[1].topk])
    with pytest.raises(ValueError, match="same shard 'shard_00000'"):
        CacheStream([shards[0], shards[0]])


# --------------------------------------------------------------------------- batches


def test_collate_shapes_padding_and_mask(caches):
    shards, _, _ = caches
    items = list(CacheStream(shards, shuffle_buffer=1))
    batch_items = [d for d in items if len(d["input_ids"]) == 0][:1] + [d for d in items if len(d["input_ids"])][:3]
    batch = collate(batch_items, pad_id=7)
    lengths = [len(d["input_ids"]) for d in batch_items]
    plens = [len(d["hidden_positions"]) for d in batch_items]
    b, length, most = len(batch_items), max(lengths), max(plens)
    assert batch["input_ids"].shape == batch["mask"].shape == batch["rest_logprob"].shape == (b, length)
    assert batch["topk_ids"].shape == batch["topk_logprobs"].shape == (b, length, K)
    assert batch["embedding"].shape == (b, D) and batch["hidden_positions"].shape == (b, most)
    assert list(batch["hidden"]) == LAYERS and all(v.shape == (b, most, D) for v in batch["hidden"].values())
    for name in ("input_ids", "mask", "topk_ids", "hidden_positions", "doc_index"):
        assert batch[name].dtype == torch.long, name
    for t in (batch["topk_logprobs"], batch["rest_logprob"], batch["embedding"], *batch["hidden"].values()):
        assert t.dtype == torch.float32
    assert batch["mask"].sum(1).tolist() == lengths
    assert batch["shard"] == [d["shard"] for d in batch_items]
    assert batch["doc_index"].tolist() == [d["doc_index"] for d in batch_items]
    for i, (d, n, p) in enumerate(zip(batch_items, lengths, plens, strict=False)):
        assert (batch["input_ids"][i, n:] == 7).all() and batch["input_ids"][i, :n].tolist() == d["input_ids"].tolist()
        assert (batch["mask"][i, :n] == 1).all() and (batch["mask"][i, n:] == 0).all()
        assert (batch["topk_ids"][i, n:] == 0).all() and (batch["topk_logprobs"][i, n:] == 0).all()
        assert (batch["rest_logprob"][i, n:] == 0).all()
        assert torch.equal(batch["topk_logprobs"][i, :n], torch.from_numpy(d["topk_logprobs"].astype(np.float32)))
        assert batch["hidden_positions"][i, :p].tolist() == d["hidden_positions"].tolist()
        assert (batch["hidden_positions"][i, p:] == -1).all()
        for layer in LAYERS:
            assert torch.equal(batch["hidden"][layer][i, :p], torch.from_numpy(d["hidden"][layer].astype(np.float32)))
            assert (batch["hidden"][layer][i, p:] == 0).all()
    assert plens[0] == 0 and (batch["hidden_positions"][0] == -1).all()


def test_dataloader_without_workers(caches):
    shards, docs, _ = caches
    stream = CacheStream(shards, seed=5, shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(stream, batch_size=6, collate_fn=partial(collate, pad_id=0))
    batches = list(loader)
    assert len(batches) == 5 and [len(b["shard"]) for b in batches] == [6, 6, 6, 6, 1]
    seen = [(s, i) for b in batches for s, i in zip(b["shard"], b["doc_index"].tolist(), strict=True)]
    assert sorted(seen) == sorted(docs)


def test_dataloader_with_workers_is_refused(caches):
    shards, _, _ = caches
    loader = torch.utils.data.DataLoader(
        CacheStream([s.topk for s in shards]), batch_size=2, num_workers=2, collate_fn=partial(collate, pad_id=0)
    )
    it = iter(loader)
    try:
        with pytest.raises(RuntimeError, match=r"CacheStream does not support DataLoader\(num_workers > 0\)"):
            next(it)
    finally:
        # Stop the workers now: left to the garbage collector, torch's shutdown waits 5 s for each.
        getattr(it, "_shutdown_workers", lambda: None)()


# --------------------------------------------------------------------------- the real capture jobs


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tiny_teacher_dir):
    """A real shard captured by capture_topk and capture_hidden (tiny teacher, 3 row groups, a token subset)."""
    import pyarrow as pa

    from kdflow.prepare import prepare_teacher
    from kdflow.teacher_pass import CacheJob, capture_hidden, capture_topk

    root = tmp_path_factory.mktemp("captured")
    texts = [
        "x = 1",
        "def add(a, b):\n    return a + b\n" * 2,
        "a",
        "print('hi')",
        "items = [1, 2, 3]",
        "for i in range(3):\n    print(i)\n",
        "b = a + b",
        "import os\nprint(os.path)",
    ]
    shard = root / "shards" / "shard_00004.parquet"
    shard.parent.mkdir()
    pq.write_table(
        pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "source": ["code"] * len(texts), "text": texts}),
        shard,
    )
    manifest = root / "models" / "teacher" / "kdflow_model.json"
    prepare_teacher(
        {"name": "teacher", "source": {"kind": "hf", "path": str(tiny_teacher_dir)}},
        {"device": "cpu", "dtype": "float32", "max_length": 32, "batch_size": 2, "ppl_max_docs": 0},
        manifest,
        None,
    )
    settings = dict(
        k=4,
        max_length=16,
        batch_size=2,
        rows_per_part=3,
        device="cpu",
        dtype="float32",
        hidden_layers=[2, 1],
        hidden_token_ratio=0.5,
        hidden_token_seed=3,
    )
    files = ShardCaches(root / "topk.parquet", root / "embed.parquet", root / "hidden.parquet")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capture_topk(
            CacheJob("topk", shard, {"topk": files.topk, "embed": files.embed}, root / ".p" / "t", manifest, settings)
        )
        capture_hidden(CacheJob("hidden", shard, {"hidden": files.hidden}, root / ".p" / "h", manifest, settings))
    finally:
        torch.set_num_threads(before)
    return files, len(texts)


def test_real_capture_files_line_up(captured):
    """capture_topk and capture_hidden write the same row groups in the same order: the stream reads them
    together, and every document comes out once with arrays that belong to it."""
    from kdflow.teacher_pass import hidden_positions

    files, n_docs = captured
    assert pq.ParquetFile(files.topk).num_row_groups == 3
    stream = CacheStream([files], expected={"k": 4, "layers": [1, 2], "max_length": 16}, seed=1, shuffle_buffer=4)
    items = list(stream)
    assert sorted(d["doc_index"] for d in items) == list(range(n_docs))
    for d in items:
        n = len(d["input_ids"])
        assert d["topk_ids"].shape == (n, 4) and d["rest_logprob"].shape == (n,) and d["embedding"].shape == (32,)
        assert np.array_equal(d["hidden_positions"], hidden_positions(n, 0.5, 3, d["doc_index"]))
        assert list(d["hidden"]) == [1, 2] and all(
            v.shape == (len(d["hidden_positions"]), 32) for v in d["hidden"].values()
        )
    batch = collate(items[:4], pad_id=0)
    assert batch["hidden"][1].shape[0] == 4 and batch["input_ids"].shape[1] == max(
        len(d["input_ids"]) for d in items[:4]
    )


def test_the_loaders_key_sets_are_the_keys_written(captured, caches):
    """Each kind's metadata as a real capture job wrote it has exactly the keys CacheStream(expected=…) knows
    for that kind (so any key a file carries can be asked for; the sampled tail's keys are in files that have
    one, tests/test_logit_cache.py), and so do this module's synthetic files."""
    files, _ = captured
    shards, _, _ = caches
    for kind in ("topk", "embed", "hidden"):
        written = read_meta(getattr(files, kind)).to_json()
        assert written["cache"] == kind
        optional = OPTIONAL_KEYS if kind == "topk" else set()  # a top-k file without a sampled tail leaves them out
        assert set(written) - {"cache"} == KIND_META_KEYS[kind] - optional, kind
        assert set(read_meta(getattr(shards[0], kind)).to_json()) == set(written), kind
    # what the stream compares between the files of one shard is in every kind's files
    assert set(SAME_SHARD_KEYS + SAME_TEACHER_KEYS) <= COMMON_META_KEYS
