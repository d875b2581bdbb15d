"""The teacher passes on a tiny model: top-k / embedding / hidden-state caches against a plain forward, the
truncated hidden pass, resumable parts and the job summary."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdflow import cache_format, teacher_pass
from kdflow.cache_format import CacheError, CacheReader, PartWriter
from kdflow.manifest import Weights
from kdflow.models import load_model, load_tokenizer, read_manifest
from kdflow.prepare import prepare_teacher
from kdflow.teacher_pass import CacheJob, capture_hidden, capture_topk
from tiny_models import one_thread, tiny_teacher_dir, write_shard  # noqa: F401 (fixtures)

PREP = {"device": "cpu", "dtype": "float32", "max_length": 32, "batch_size": 2, "ppl_max_docs": 0}
SETTINGS = dict(
    k=4,
    max_length=24,
    batch_size=3,
    rows_per_part=5,
    device="cpu",
    dtype="float32",
    hidden_layers=[2],
    hidden_token_ratio=1.0,
    hidden_token_seed=0,
)
LP_TOL = 1e-2  # float16 storage of log-probabilities
MASS_TOL = 2e-3  # probabilities recovered from float16 log-probabilities
H_TOL = 5e-3  # float16 storage of hidden states (|h| of order 1)

# 12 documents, ASCII, of 1 to ~60 tokens: five are longer than max_length=24 and get truncated.
TEXTS = [
    "x = 1",
    "def add(a, b):\n    return a + b\n" * 3,
    "print('hi')",
    "a",
    "import os\nprint(os.path.join('a', 'b'))\n" * 2,
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "def f(x):\n    return x * 2\n",
    "items = [1, 2, 3]",
    "print(os.path)",
    "def push(self, x):\n    self.items.append(x)\n    return x\n" * 2,
    "b = a + b",
]


def make_teacher(out: Path, model, tokenizer, note: str | None = None) -> Path:
    """A teacher manifest (named "teacher") over a local model directory holding ``model`` (and ``note`` as a
    README, which changes the directory's source hash)."""
    model.save_pretrained(out / "weights")
    tokenizer.save_pretrained(out / "weights")
    if note is not None:
        (out / "weights" / "README.md").write_text(note)
    manifest = out / "models" / "teacher" / "kdflow_model.json"
    prepare_teacher({"name": "teacher", "source": {"kind": "hf", "path": str(out / "weights")}}, PREP, manifest, None)
    return manifest


@pytest.fixture(scope="module")
def teacher_manifest(tmp_path_factory, tiny_teacher_dir):
    """The tiny teacher with a sharpened LM head: peaked distributions (top-k mass well between 0 and 1)."""
    ref = Weights(str(tiny_teacher_dir))
    model = load_model(ref)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return make_teacher(tmp_path_factory.mktemp("sharp_teacher"), model, load_tokenizer(ref))


@pytest.fixture(scope="module")
def model(teacher_manifest):
    return load_model(read_manifest(teacher_manifest))


@pytest.fixture(scope="module")
def tokenizer(teacher_manifest):
    return load_tokenizer(read_manifest(teacher_manifest))


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("shards") / "shard_000.parquet", TEXTS)


def topk_job(root: Path, shard: Path, manifest: Path, **settings) -> CacheJob:
    return CacheJob(
        "topk",
        shard,
        {"topk": root / "topk.parquet", "embed": root / "embed.parquet"},
        root / ".partial" / "topk",
        manifest,
        {**SETTINGS, **settings},
    )


def hidden_job(root: Path, shard: Path, manifest: Path, **settings) -> CacheJob:
    return CacheJob(
        "hidden",
        shard,
        {"hidden": root / "hidden.parquet"},
        root / ".partial" / "hidden",
        manifest,
        {**SETTINGS, **settings},
    )


def docs_of(path: Path, kind: str) -> dict[int, dict]:
    return {d["doc_index"]: d for d in CacheReader.open(path, kind).iter_docs()}


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory, shard, teacher_manifest):
    root = tmp_path_factory.mktemp("topk_run")
    job = topk_job(root, shard, teacher_manifest)
    summary = capture_topk(job)
    return job, summary, docs_of(job.outputs["topk"], "topk"), docs_of(job.outputs["embed"], "embed")


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """Per document (shard row): full-vocabulary log-probs [n, V] and all hidden states, from one plain
    unpadded forward over its first max_length tokens."""
    out = {}
    with torch.inference_mode():
        for i, text in enumerate(TEXTS):
            ids = tokenizer(text)["input_ids"][: SETTINGS["max_length"]]
            res = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            out[i] = {
                "ids": ids,
                "logp": torch.log_softmax(res.logits[0].float(), -1),
                "hidden": [h[0].float() for h in res.hidden_states],
            }
    return out


def _assert_topk_matches(doc: dict, logp: torch.Tensor, k: int) -> None:
    ids = torch.from_numpy(doc["topk_ids"].astype(np.int64))
    stored = torch.from_numpy(doc["topk_logprobs"].astype(np.float32))
    assert ids.shape == stored.shape == (logp.shape[0], k)
    ref_sorted = logp.sort(-1, descending=True).values[:, :k]
    at_ids = logp.gather(-1, ids)
    # the stored ids are the k most probable, most probable first (ties within 1e-5 may come in either order)
    torch.testing.assert_close(at_ids, ref_sorted, atol=1e-5, rtol=0)
    assert all(len(set(row.tolist())) == k for row in ids)
    # the stored values are full-vocabulary log-probs of those ids (not renormalised over the k)
    torch.testing.assert_close(stored, at_ids, atol=LP_TOL, rtol=0)


# --------------------------------------------------------------------------- top-k cache


def test_topk_equals_full_vocabulary_log_softmax_and_is_not_renormalised(topk_run, reference):
    _, _, topk, _ = topk_run
    assert sorted(topk) == list(range(len(TEXTS)))
    masses = []
    for i, doc in topk.items():
        _assert_topk_matches(doc, reference[i]["logp"], SETTINGS["k"])
        masses.append(np.exp(doc["topk_logprobs"].astype(np.float64)).sum(-1))
    masses = np.concatenate(masses)
    assert (masses <= 1 + MASS_TOL).all()
    # renormalised over k they would all sum to 1; the sharpened teacher keeps the true top-k mass well
    # inside (0, 1) at most positions, so this is a meaningful check
    assert (masses < 0.97).mean() > 0.5
    assert 0.2 < masses.mean() < 0.97


def test_row_j_holds_the_distribution_predicting_token_j_plus_1(topk_run, model, reference):
    """Row j is the teacher's distribution after reading tokens 0..j: the same as a forward over that prefix
    alone, whose last position predicts token j+1."""
    _, _, topk, _ = topk_run
    i = max(topk, key=lambda d: topk[d]["n_tokens"])
    doc = topk[i]
    n = doc["n_tokens"]
    with torch.inference_mode():
        for j in (0, 1, n // 2, n - 2, n - 1):
            prefix = torch.from_numpy(doc["input_ids"][: j + 1].astype(np.int64))[None]
            logp = torch.log_softmax(model(input_ids=prefix).logits[0, -1].float(), -1)
            _assert_topk_matches(
                {"topk_ids": doc["topk_ids"][j : j + 1], "topk_logprobs": doc["topk_logprobs"][j : j + 1]},
                logp[None],
                SETTINGS["k"],
            )
            torch.testing.assert_close(
                torch.tensor(float(doc["rest_logprob"][j])),
                torch.log1p(-logp.exp().topk(SETTINGS["k"]).values.sum()),
                atol=LP_TOL,
                rtol=0,
            )
    # and the cached distributions differ from one row to the next (no row is repeated or shifted in)
    assert not np.array_equal(doc["topk_ids"][:-1], doc["topk_ids"][1:])


def test_rest_logprob_is_the_missing_mass(topk_run, reference):
    _, _, topk, _ = topk_run
    for i, doc in topk.items():
        top = np.exp(doc["topk_logprobs"].astype(np.float64)).sum(-1)
        rest = np.exp(doc["rest_logprob"].astype(np.float64))
        assert doc["rest_logprob"].shape == (doc["n_tokens"],)
        np.testing.assert_allclose(top + rest, 1.0, atol=MASS_TOL, rtol=0)
        ref_top = reference[i]["logp"].exp().topk(SETTINGS["k"], -1).values.sum(-1).double().numpy()
        np.testing.assert_allclose(rest, 1.0 - ref_top, atol=MASS_TOL, rtol=0)
        assert (doc["rest_logprob"] < 0).all()


def test_input_ids_truncation_and_covered_text(topk_run, tokenizer):
    _, summary, topk, embed = topk_run
    max_length = SETTINGS["max_length"]
    retokenised_truncated = 0
    for i, text in enumerate(TEXTS):
        full = tokenizer(text)["input_ids"]
        doc, emb = topk[i], embed[i]
        assert doc["input_ids"].dtype == np.int32
        assert doc["input_ids"].tolist() == full[:max_length]
        assert doc["truncated"] is (len(full) > max_length)
        assert doc["n_tokens"] == emb["n_tokens"] == min(len(full), max_length) == len(doc["topk_ids"])
        assert doc["doc_id"] == emb["doc_id"] == f"doc-{i:02d}"
        # the embed cache's text is the part of the document the teacher saw
        assert text.startswith(emb["text"])
        assert tokenizer.decode(doc["input_ids"].tolist()) == emb["text"]
        if not doc["truncated"]:
            assert emb["text"] == text
        else:
            assert len(emb["text"]) < len(text)
            # a cut after a whitespace run re-tokenises differently (byte-level BPE); elsewhere it is exact
            if not emb["text"][-1].isspace():
                assert tokenizer(emb["text"])["input_ids"] == doc["input_ids"].tolist()
                retokenised_truncated += 1
    assert sum(d["truncated"] for d in topk.values()) == summary["truncated_documents"] == 5
    assert retokenised_truncated >= 2


def test_pooled_embedding_is_masked_mean_of_final_hidden_state(topk_run, reference):
    _, _, _, embed = topk_run
    for i, doc in embed.items():
        want = reference[i]["hidden"][-1].mean(0)
        assert doc["embedding"].dtype == np.float16 and doc["embedding"].shape == want.shape
        np.testing.assert_allclose(doc["embedding"].astype(np.float32), want.numpy(), atol=H_TOL, rtol=1e-3)


def test_padding_in_a_batch_changes_nothing(tmp_path, shard, teacher_manifest, topk_run):
    job = topk_job(tmp_path, shard, teacher_manifest, batch_size=1)
    capture_topk(job)
    _, _, batched, batched_embed = topk_run
    single, single_embed = docs_of(job.outputs["topk"], "topk"), docs_of(job.outputs["embed"], "embed")
    assert sorted(single) == sorted(batched)
    for i in batched:
        a, b = single[i], batched[i]
        assert np.array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_allclose(
            a["topk_logprobs"].astype(np.float32), b["topk_logprobs"].astype(np.float32), atol=2e-3, rtol=0
        )
        np.testing.assert_allclose(
            a["rest_logprob"].astype(np.float32), b["rest_logprob"].astype(np.float32), atol=2e-3, rtol=0
        )
        differ = a["topk_ids"] != b["topk_ids"]  # only near-ties may swap
        assert differ.mean() < 0.05
        np.testing.assert_allclose(
            a["topk_logprobs"][differ].astype(np.float32),
            b["topk_logprobs"][differ].astype(np.float32),
            atol=2e-3,
            rtol=0,
        )
        np.testing.assert_allclose(
            single_embed[i]["embedding"].astype(np.float32),
            batched_embed[i]["embedding"].astype(np.float32),
            atol=2e-3,
            rtol=1e-3,
        )


def test_jobs_run_on_a_given_setup_and_topk_pass_runs_nothing(tmp_path, shard, teacher_manifest, topk_run, monkeypatch):
    """A caller that has loaded the teacher and tokenised the shard (bench/capture.py) passes them in: the
    files are the same as from a job that loads them itself, and nothing is loaded again."""
    clean_job, _, _, _ = topk_run
    job = topk_job(tmp_path, shard, teacher_manifest)
    setup = teacher_pass.setup_cache_job(job)
    assert setup.pad_id == setup.tokenizer.pad_token_id and setup.model.config.num_hidden_layers == 4
    plan = teacher_pass.topk_pass(job, setup)
    assert set(plan.metas) == set(plan.schemas) == {"topk", "embed"} and not tmp_path.joinpath(".partial").exists()
    monkeypatch.setattr(teacher_pass, "load_model", lambda *a, **k: pytest.fail("loaded the teacher again"))
    capture_topk(job, setup)
    for name in ("topk", "embed"):
        assert tables_equal(job.outputs[name], clean_job.outputs[name]), name
    columns = plan.make_part(np.arange(3))  # shard rows 0..2, one part's columns for both files
    assert columns["topk"]["doc_index"].tolist() == [0, 1, 2] and len(columns["embed"]["doc_id"]) == 3
    hidden = capture_hidden(hidden_job(tmp_path, shard, teacher_manifest), setup)
    assert hidden["documents"] == len(TEXTS)


def test_summary_counts_and_bytes(topk_run):
    job, summary, topk, _ = topk_run
    for key in ("documents", "tokens", "seconds", "tokens_per_s", "bytes_written", "truncated_documents"):
        assert key in summary, key
    assert summary["documents"] == len(TEXTS)
    assert summary["tokens"] == sum(d["n_tokens"] for d in topk.values()) == summary["tokens_computed"]
    assert summary["bytes_written"] == sum(p.stat().st_size for p in job.outputs.values())
    assert summary["bytes"] == {name: p.stat().st_size for name, p in job.outputs.items()}
    assert summary["seconds"] >= 0 and summary["tokens_per_s"] > 0 and summary["load_s"] > 0
    assert summary["parts"] == 3 and summary["parts_resumed"] == 0
    assert summary["values_clamped"] == {"rest_logprob": 0, "embedding": 0}


def test_every_document_once_and_one_row_group_per_part(topk_run, shard):
    job, _, _, _ = topk_run
    n_docs = pq.read_metadata(shard).num_rows
    for name, path in job.outputs.items():
        table = pq.read_table(path, columns=["doc_index", "doc_id"])
        assert sorted(table.column("doc_index").to_pylist()) == list(range(n_docs)), name
        ids = dict(zip(table.column("doc_index").to_pylist(), table.column("doc_id").to_pylist(), strict=False))
        assert ids == {i: f"doc-{i:02d}" for i in range(n_docs)}
        assert pq.ParquetFile(path).num_row_groups == math.ceil(n_docs / SETTINGS["rows_per_part"]) == 3
    meta = CacheReader.open(job.outputs["topk"], "topk", expected={"k": 4, "max_length": 24}).meta
    assert meta.shard == "shard_000" and meta.teacher == "teacher" and meta.teacher_layers == 4
    assert CacheReader.open(job.outputs["embed"], "embed", expected={"hidden_size": 32}).meta.vocab_size > 0
    assert not job.partial_dir.exists()


# --------------------------------------------------------------------------- hidden-state cache


def test_hidden_cache_equals_output_hidden_states(tmp_path, shard, teacher_manifest, reference):
    layers = [0, 1, 2, 4]  # embeddings, decoder layers 1 and 2, and after the final norm
    job = hidden_job(tmp_path, shard, teacher_manifest, hidden_layers=layers)
    summary = capture_hidden(job)
    assert summary["passes_per_token"] == 1.0 and summary["layers"] == layers
    reader = CacheReader.open(job.outputs["hidden"], "hidden", expected={"layers": layers})
    docs = {d["doc_index"]: d for d in reader.iter_docs()}
    assert sorted(docs) == list(range(len(TEXTS)))
    assert pq.ParquetFile(job.outputs["hidden"]).num_row_groups == 3
    for i, doc in docs.items():
        n = len(reference[i]["ids"])
        assert doc["n_tokens"] == n and doc["positions"].tolist() == list(range(n))
        for layer in layers:
            got = doc[f"hidden_l{layer}"]
            assert got.dtype == np.float16 and got.shape == (n, 32)
            np.testing.assert_allclose(
                got.astype(np.float32),
                reference[i]["hidden"][layer].numpy(),
                atol=H_TOL,
                rtol=1e-3,
                err_msg=f"doc {i} layer {layer}",
            )


def test_hidden_token_subset_is_seeded_sorted_and_matches(tmp_path, shard, teacher_manifest, reference):
    def run(name: str, seed: int) -> dict[int, dict]:
        job = hidden_job(
            tmp_path / name,
            shard,
            teacher_manifest,
            hidden_layers=[1, 3],
            hidden_token_ratio=0.5,
            hidden_token_seed=seed,
        )
        capture_hidden(job)
        return docs_of(job.outputs["hidden"], "hidden")

    a, again, other = run("a", 0), run("again", 0), run("other", 7)
    for i, doc in a.items():
        n = doc["n_tokens"]
        pos = doc["positions"]
        assert len(pos) == max(1, round(0.5 * n))
        assert (np.diff(pos) > 0).all() and pos.min() >= 0 and pos.max() < n
        assert np.array_equal(pos, again[i]["positions"])
        for layer in (1, 3):
            got = doc[f"hidden_l{layer}"]
            assert got.shape == (len(pos), 32)
            want = reference[i]["hidden"][layer][torch.from_numpy(pos.astype(np.int64))]
            np.testing.assert_allclose(got.astype(np.float32), want.numpy(), atol=H_TOL, rtol=1e-3)
            assert np.array_equal(got.view(np.uint16), again[i][f"hidden_l{layer}"].view(np.uint16))
    assert any(not np.array_equal(a[i]["positions"], other[i]["positions"]) for i in a)
    assert all(len(a[i]["positions"]) == len(other[i]["positions"]) for i in a)
    # documents do not all share one subset pattern
    long_docs = [i for i in a if a[i]["n_tokens"] == SETTINGS["max_length"]]
    assert len({tuple(a[i]["positions"]) for i in long_docs}) > 1


def test_hidden_pass_stops_after_deepest_layer(tmp_path, shard, teacher_manifest, reference, monkeypatch):
    held = load_model(read_manifest(teacher_manifest))
    calls = {name: 0 for name in ("layer0", "layer1", "layer2", "layer3", "norm", "lm_head")}

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    for idx, layer in enumerate(held.model.layers):
        layer.register_forward_hook(counter(f"layer{idx}"))
    held.model.norm.register_forward_hook(counter("norm"))
    held.lm_head.register_forward_hook(counter("lm_head"))
    monkeypatch.setattr(teacher_pass, "load_model", lambda *a, **k: held)

    job = hidden_job(tmp_path, shard, teacher_manifest, hidden_layers=[2])
    summary = capture_hidden(job)
    parts = [5, 5, 2]
    batches = sum(math.ceil(p / SETTINGS["batch_size"]) for p in parts)
    assert calls == {"layer0": batches, "layer1": batches, "layer2": 0, "layer3": 0, "norm": 0, "lm_head": 0}
    assert summary["passes_per_token"] == 2 / 4
    for i, doc in docs_of(job.outputs["hidden"], "hidden").items():
        np.testing.assert_allclose(
            doc["hidden_l2"].astype(np.float32), reference[i]["hidden"][2].numpy(), atol=H_TOL, rtol=1e-3
        )
    # the stopping hooks are gone afterwards: the model runs to the end again
    with torch.inference_mode():
        held(input_ids=torch.tensor([reference[0]["ids"]]))
    assert calls["layer3"] == 1 and calls["lm_head"] == 1


@pytest.mark.parametrize("layers", [[5], [1, 9]])
def test_hidden_layers_out_of_range_refused(tmp_path, shard, teacher_manifest, layers):
    with pytest.raises(CacheError, match=r"teacher_cache.hidden_layers: .* hidden states 0\.\.4"):
        capture_hidden(hidden_job(tmp_path, shard, teacher_manifest, hidden_layers=layers))
    assert not (tmp_path / "hidden.parquet").exists()


# --------------------------------------------------------------------------- resumability


class Killed(Exception):
    pass


def kill_at_write(monkeypatch, n: int) -> None:
    """Make the n-th part-file write die midway (its temporary file half written)."""
    original = PartWriter.write
    count = [0]

    def write(self, path, columns, meta):
        count[0] += 1
        if count[0] == n:
            from kdflow.atomic import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_bytes(b"PAR1 half a part")
                raise Killed(path)
        return original(self, path, columns, meta)

    monkeypatch.setattr(cache_format.PartWriter, "write", write)


def tables_equal(a: Path, b: Path) -> bool:
    return (
        pq.read_table(a).equals(pq.read_table(b))
        and pq.ParquetFile(a).num_row_groups == pq.ParquetFile(b).num_row_groups
    )


def test_killed_job_resumes_from_finished_parts(tmp_path, shard, teacher_manifest, topk_run, monkeypatch):
    clean_job, clean_summary, _, _ = topk_run
    job = topk_job(tmp_path, shard, teacher_manifest)
    with monkeypatch.context() as m:
        kill_at_write(m, 3)  # part 0 writes topk + embed, then part 1's topk dies
        with pytest.raises(Killed):
            capture_topk(job)
    assert not any(p.exists() for p in job.outputs.values())
    assert not list(tmp_path.rglob(".*.tmp-*"))
    assert sorted(p.name for p in job.partial_dir.iterdir()) == ["embed_part00000.parquet", "topk_part00000.parquet"]

    summary = capture_topk(job)
    assert summary["parts_resumed"] == 1
    assert 0 < summary["tokens_computed"] < summary["tokens"] == clean_summary["tokens"]
    for name in ("topk", "embed"):
        assert tables_equal(job.outputs[name], clean_job.outputs[name]), name
    assert not job.partial_dir.exists()
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_killed_hidden_job_resumes(tmp_path, shard, teacher_manifest, monkeypatch):
    job = hidden_job(tmp_path / "killed", shard, teacher_manifest)
    with monkeypatch.context() as m:
        kill_at_write(m, 2)
        with pytest.raises(Killed):
            capture_hidden(job)
    assert not job.outputs["hidden"].exists()
    assert [p.name for p in job.partial_dir.iterdir()] == ["hidden_part00000.parquet"]
    assert capture_hidden(job)["parts_resumed"] == 1
    clean = hidden_job(tmp_path / "clean", shard, teacher_manifest)
    capture_hidden(clean)
    assert tables_equal(job.outputs["hidden"], clean.outputs["hidden"])


def _kill_after_first_part(job: CacheJob, monkeypatch) -> None:
    with monkeypatch.context() as m:
        kill_at_write(m, 3)
        with pytest.raises(Killed):
            capture_topk(job)
    assert (job.partial_dir / "topk_part00000.parquet").is_file()


@pytest.mark.parametrize("stale", ["other_k", "other_shard_content", "damaged_part"])
def test_stale_partial_part_is_recomputed(tmp_path, shard, teacher_manifest, topk_run, monkeypatch, stale):
    clean_job, _, _, _ = topk_run
    job = topk_job(tmp_path / "out", shard, teacher_manifest)
    if stale == "other_k":
        _kill_after_first_part(topk_job(tmp_path / "out", shard, teacher_manifest, k=3), monkeypatch)
    elif stale == "other_shard_content":
        other = write_shard(tmp_path / "elsewhere" / shard.name, [t.upper() for t in TEXTS])
        _kill_after_first_part(topk_job(tmp_path / "out", other, teacher_manifest), monkeypatch)
    else:
        _kill_after_first_part(job, monkeypatch)
        part = job.partial_dir / "embed_part00000.parquet"
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    summary = capture_topk(job)
    assert summary["parts_resumed"] == 0
    assert summary["tokens_computed"] == summary["tokens"]
    for name in ("topk", "embed"):
        assert tables_equal(job.outputs[name], clean_job.outputs[name]), name
    assert not job.partial_dir.exists()


def test_partial_part_from_other_teacher_weights_is_recomputed(
    tmp_path, shard, teacher_manifest, topk_run, tiny_teacher_dir, monkeypatch
):
    """The teacher's weights change (same name, e.g. another teacher.source.path), after a killed job."""
    clean_job, _, _, _ = topk_run
    ref = Weights(str(tiny_teacher_dir))
    other_manifest = make_teacher(
        tmp_path / "other_teacher", load_model(ref), load_tokenizer(ref), note="the unsharpened tiny teacher"
    )
    assert read_manifest(other_manifest).source_hash != read_manifest(teacher_manifest).source_hash
    _kill_after_first_part(topk_job(tmp_path / "out", shard, other_manifest), monkeypatch)
    job = topk_job(tmp_path / "out", shard, teacher_manifest)
    summary = capture_topk(job)
    assert summary["parts_resumed"] == 0
    assert tables_equal(job.outputs["topk"], clean_job.outputs["topk"])


_SLOW_CHILD = """
import sys, time
import kdflow.cache_format as cf
from pathlib import Path
from kdflow.teacher_pass import CacheJob, capture_topk
settings = {settings!r}
real_write = cf.PartWriter.write
calls = [0]
def write(self, path, columns, meta):
    calls[0] += 1
    if calls[0] == 3:                       # part 0 is finished: stall in part 1 until killed
        Path({ready!r}).write_text("ready")
        time.sleep(600)
    return real_write(self, path, columns, meta)
cf.PartWriter.write = write
capture_topk(CacheJob("topk", Path({shard!r}), {{"topk": Path({topk!r}), "embed": Path({embed!r})}},
                      Path({partial!r}), Path({manifest!r}), settings))
"""


def test_sigkill_mid_job_leaves_no_output_and_the_rerun_resumes(tmp_path, shard, teacher_manifest, topk_run):
    """A real kill -9 (as SLURM preemption without a grace period does), not an exception."""
    import signal
    import subprocess
    import sys
    import time

    clean_job, _, _, _ = topk_run
    job = topk_job(tmp_path, shard, teacher_manifest)
    ready = tmp_path / "ready"
    code = _SLOW_CHILD.format(
        settings=dict(job.settings),
        ready=str(ready),
        shard=str(shard),
        topk=str(job.outputs["topk"]),
        embed=str(job.outputs["embed"]),
        partial=str(job.partial_dir),
        manifest=str(teacher_manifest),
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the capture process ended before it could be killed"
            assert time.monotonic() < deadline, "the capture process never reached its second part"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not any(p.exists() for p in job.outputs.values())
    assert sorted(p.name for p in job.partial_dir.iterdir()) == ["embed_part00000.parquet", "topk_part00000.parquet"]

    summary = capture_topk(job)
    assert summary["parts_resumed"] == 1
    for name in ("topk", "embed"):
        assert tables_equal(job.outputs[name], clean_job.outputs[name]), name
    assert not job.partial_dir.exists()


# --------------------------------------------------------------------------- float8 hidden states


def test_float8_hidden_cache_is_within_e4m3s_rounding_and_a_byte_a_value(
    tmp_path, shard, teacher_manifest, reference, topk_run
):
    layers = [1, 4]
    job = hidden_job(tmp_path / "fp8", shard, teacher_manifest, hidden_layers=layers, hidden_dtype="float8")
    summary = capture_hidden(job)
    f16 = hidden_job(tmp_path / "fp16", shard, teacher_manifest, hidden_layers=layers)
    capture_hidden(f16)
    reader = CacheReader.open(job.outputs["hidden"], "hidden", expected={"layers": layers})
    assert reader.meta.value_dtype == "float8_e4m3" and reader.meta.hidden_size == 32
    docs = {d["doc_index"]: d for d in reader.iter_docs()}
    tokens = 0
    for i, doc in docs.items():
        n = len(reference[i]["ids"])
        tokens += n
        assert set(doc) >= {f"hidden_l{x}" for x in layers} and not any(k.endswith("_scale") for k in doc)
        for layer in layers:
            got, want = doc[f"hidden_l{layer}"].astype(np.float32), reference[i]["hidden"][layer].numpy()
            assert doc[f"hidden_l{layer}"].dtype == np.float16 and got.shape == (n, 32)
            # e4m3: 3 mantissa bits, so at most 1/16 relative per value at the position's scale (amax / 448),
            # plus the subnormal step below 2^-6 of it; the float16 cache's own rounding on top
            amax = np.abs(want).max(-1, keepdims=True)
            assert np.all(np.abs(got - want) <= np.abs(want) / 16 + amax / 448 * 2**-9 + H_TOL), (i, layer)
            cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
            assert cos.min() > 0.998, (i, layer, cos.min())
    # the values: one byte each plus a float32 scale a position, 1 + 4 / D bytes a dimension (1.125 at this
    # teacher's D = 32; at most 1.1 from D = 40 on, 1.0005 at 8,192)
    table = pq.read_table(job.outputs["hidden"])
    for layer in layers:
        codes = table.column(f"hidden_l{layer}").combine_chunks().flatten()
        scales = table.column(f"hidden_l{layer}_scale").combine_chunks().flatten()
        assert codes.type == pa.binary(32) and len(codes) == tokens
        assert scales.type == pa.float32() and len(scales) == tokens
    # on disk (zstd): the values' column chunks, against the float16 file's
    sizes = {}
    for path in (job.outputs["hidden"], f16.outputs["hidden"]):
        md = pq.ParquetFile(path).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                if col.path_in_schema.startswith("hidden_l"):
                    sizes[path] = sizes.get(path, 0) + col.total_compressed_size
    per_dim = sizes[job.outputs["hidden"]] / (tokens * 32 * len(layers))
    assert per_dim <= 1 + 4 / 32 + 0.02, per_dim
    assert sizes[f16.outputs["hidden"]] / (tokens * 32 * len(layers)) > 1.7
    assert summary["bytes"]["hidden"] < f16.outputs["hidden"].stat().st_size
    # training's loader decodes the same values as the reader, beside the top-k file of the same shard
    from kdflow.cache_loader import CacheStream, ShardCaches

    stream = CacheStream([ShardCaches(topk=topk_run[0].outputs["topk"], hidden=job.outputs["hidden"])], seed=0)
    items = list(stream)
    assert len(items) == len(docs)
    for item in items:
        doc = docs[item["doc_index"]]
        assert np.array_equal(item["hidden_positions"], doc["positions"])
        for layer in layers:
            assert item["hidden"][layer].dtype == np.float16
            assert np.array_equal(item["hidden"][layer], doc[f"hidden_l{layer}"])


def test_float8_hidden_cache_is_byte_identical_on_a_rerun_and_not_resumed_from_float16(
    tmp_path, shard, teacher_manifest, monkeypatch
):
    job = hidden_job(tmp_path / "a", shard, teacher_manifest, hidden_dtype="float8")
    capture_hidden(job)
    again = hidden_job(tmp_path / "b", shard, teacher_manifest, hidden_dtype="float8")
    capture_hidden(again)
    assert job.outputs["hidden"].read_bytes() == again.outputs["hidden"].read_bytes()
    # a float16 job killed after its first part: the float8 job in the same place computes every part anew
    mixed = hidden_job(tmp_path / "c", shard, teacher_manifest)
    with monkeypatch.context() as m:
        kill_at_write(m, 2)
        with pytest.raises(Killed):
            capture_hidden(mixed)
    summary = capture_hidden(hidden_job(tmp_path / "c", shard, teacher_manifest, hidden_dtype="float8"))
    assert summary["parts_resumed"] == 0
    assert tables_equal(mixed.outputs["hidden"], job.outputs["hidden"])
