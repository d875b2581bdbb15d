"""The logit cache's two knobs on the tiny teacher: an exact head of k ids and a sampled tail of N draws a
position (kdflow.cache_logits), written by the real capture job, read back by the training stream, padded by
collate and scored by SampledTailKDLoss; seeded draws (a rerun, or another batching, makes the same bytes); the
config keys and what they refuse; the online full-KD loss and its refusal when the teacher would not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdflow.cache_format import CacheReader, read_meta
from kdflow.cache_loader import CacheStream, ShardCaches, collate
from kdflow.cache_logits import draw_uniforms
from kdflow.losses import FullKDLoss, SampledTailKDLoss, TopKKDLoss
from kdflow.losses.sampled import tail_counts
from kdflow.teacher_pass import capture_topk
from test_teacher_pass import (  # noqa: F401 (fixtures)
    LP_TOL,
    model,
    shard,
    teacher_manifest,
    tokenizer,
    topk_job,
    topk_run,
)
from tiny_models import one_thread, tiny_teacher_dir  # noqa: F401 (fixtures)

TAIL = {"k": 4, "samples": 12, "sample_seed": 3}


def run_topk(root: Path, shard: Path, manifest: Path, **settings) -> Path:
    job = topk_job(root, shard, manifest, **settings)
    capture_topk(job)
    return job.outputs["topk"]


@pytest.fixture(scope="module")
def tail_file(tmp_path_factory, shard, teacher_manifest) -> Path:
    return run_topk(tmp_path_factory.mktemp("tail"), shard, teacher_manifest, **TAIL)


def per_position(doc: dict, name: str) -> list[np.ndarray]:
    """A nested column of one document (iter_docs: an array of per-position arrays)."""
    return [np.asarray(x) for x in doc[name]]


def test_tail_rows_are_draws_outside_the_head_summing_to_n(tail_file, topk_run):
    meta = read_meta(tail_file)
    assert (meta.k, meta.samples, meta.sample_seed) == (4, 12, 3)
    assert "sample_ids" in pq.read_schema(tail_file).names
    plain = topk_run[2]
    docs = list(CacheReader.open(tail_file, "topk", {"k": 4, "samples": 12}).iter_docs())
    assert len(docs) == len(plain)
    for doc in docs:
        ref = plain[doc["doc_index"]]
        np.testing.assert_array_equal(doc["topk_ids"], ref["topk_ids"])  # the same head as a cache without tail
        np.testing.assert_allclose(doc["topk_logprobs"], ref["topk_logprobs"], atol=LP_TOL)
        np.testing.assert_allclose(doc["rest_logprob"], ref["rest_logprob"], atol=LP_TOL)
        ids, counts = per_position(doc, "sample_ids"), per_position(doc, "sample_counts")
        assert len(ids) == len(counts) == doc["n_tokens"]
        for j, (u, c) in enumerate(zip(ids, counts, strict=True)):
            assert int(c.sum()) == 12 and (c > 0).all() and len(set(u.tolist())) == len(u)
            assert not set(u.tolist()) & set(doc["topk_ids"][j].tolist())  # drawn outside the head
            assert list(c) == sorted(c, reverse=True)  # most drawn first


def recomputed_draws(path: Path, model, sampling: str = "multinomial"):
    """For every position of a head-4, 12-draw, seed-3 file: (its teacher log-probs [V], the draws tail_counts
    makes of them at default_rng([3, doc_index])'s uniforms as {id: count}, the file's {id: count}), from a plain
    forward of each document."""
    width = 1 if sampling == "systematic" else 12
    with torch.inference_mode():
        for doc in CacheReader.open(path, "topk").iter_docs():
            ids = torch.tensor([doc["input_ids"].tolist()])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            u = torch.from_numpy(draw_uniforms(3, doc["doc_index"], doc["n_tokens"], width))
            _, _, _, want_ids, want_counts = tail_counts(logp, 4, 12, u, sampling)
            got = zip(per_position(doc, "sample_ids"), per_position(doc, "sample_counts"), strict=True)
            for j, (got_u, got_c) in enumerate(got):
                live = want_counts[j] > 0
                want = dict(zip(want_ids[j][live].tolist(), want_counts[j][live].tolist(), strict=True))
                yield logp[j], want, dict(zip(got_u.tolist(), got_c.tolist(), strict=True))


def test_draws_are_those_of_the_seeded_uniforms(tail_file, model, tokenizer):
    """Each position's draws are tail_counts of the teacher's distribution at default_rng([seed, doc_index])'s
    uniforms: recomputed here from a plain forward of each document."""
    checked = 0
    for _, want, got in recomputed_draws(tail_file, model):
        assert want == got
        checked += 1
    assert checked > 100


def test_rerun_and_other_batching_write_the_same_tail(tmp_path, tail_file, shard, teacher_manifest):
    again = run_topk(tmp_path / "again", shard, teacher_manifest, **TAIL)
    rebatched = run_topk(tmp_path / "rebatched", shard, teacher_manifest, **{**TAIL, "batch_size": 1})
    cols = ["doc_index", "topk_ids", "sample_ids", "sample_counts"]
    first = pq.read_table(tail_file, columns=cols)
    assert pq.read_table(again).equals(pq.read_table(tail_file))
    assert pq.read_table(again).schema.metadata == pq.read_table(tail_file).schema.metadata
    assert pq.read_table(rebatched, columns=cols).equals(first)


def test_other_seed_other_draws_and_no_tail_no_keys(tmp_path, tail_file, topk_run, shard, teacher_manifest):
    other = run_topk(tmp_path / "seed4", shard, teacher_manifest, **{**TAIL, "sample_seed": 4})
    assert not pq.read_table(other, columns=["sample_ids"]).equals(pq.read_table(tail_file, columns=["sample_ids"]))
    assert read_meta(other).settings_hash != read_meta(tail_file).settings_hash
    plain = topk_run[0].outputs["topk"]
    keys = {k.decode() for k in pq.read_schema(plain).metadata}
    assert "kdflow.k" in keys and not {"kdflow.samples", "kdflow.sample_seed"} & keys  # written as before tails
    assert "sample_ids" not in pq.read_schema(plain).names


def test_systematic_tail_is_the_evenly_spaced_draws_of_one_uniform(tmp_path, tail_file, shard, teacher_manifest, model):
    """sampling: systematic writes the draws of tail_counts at one uniform a position (default_rng([seed,
    doc_index]).random((n, 1))), names itself in the metadata and the settings hash, is byte-identical on a rerun
    and under another batching, and is read by the stream only when asked for."""
    settings = {**TAIL, "sampling": "systematic"}
    path = run_topk(tmp_path / "sys", shard, teacher_manifest, **settings)
    meta = read_meta(path)
    assert meta.sampling == "systematic" and read_meta(tail_file).sampling is None
    assert meta.settings_hash != read_meta(tail_file).settings_hash
    again = run_topk(tmp_path / "again", shard, teacher_manifest, **{**settings, "batch_size": 1})
    assert pq.read_table(again).equals(pq.read_table(path))
    checked = sure_ids = 0
    for logp, want, got in recomputed_draws(path, model, "systematic"):
        assert want == got
        # every id with at least a 1/N share of the tail is drawn, ⌊N p/R⌋ or ⌈N p/R⌉ times
        tail = logp.exp().scatter(-1, logp.topk(4).indices, 0.0)
        expected = tail / tail.sum() * 12
        sure = (expected >= 1 + 1e-4).nonzero().flatten().tolist()
        assert all(expected[v].floor() <= want[v] <= expected[v].ceil() for v in sure), (checked, sure)
        checked, sure_ids = checked + 1, sure_ids + len(sure)
    assert checked > 100 and sure_ids > 50
    with pytest.raises(Exception, match="sampling"):
        list(CacheStream([ShardCaches(path)], expected={"k": 4, "samples": 12, "sampling": None}, seed=0))
    assert list(CacheStream([ShardCaches(path)], expected={"k": 4, "samples": 12, "sampling": "systematic"}, seed=0))


def test_samples_alone_k0(tmp_path, shard, teacher_manifest):
    path = run_topk(tmp_path, shard, teacher_manifest, k=0, samples=8, sample_seed=0)
    names = pq.read_schema(path).names
    assert "topk_ids" not in names and "topk_logprobs" not in names and "sample_ids" in names
    stream = CacheStream([ShardCaches(path)], expected={"k": 0, "samples": 8}, seed=0, shuffle_buffer=4)
    items = list(stream)
    assert items and all(it["topk_ids"].shape == (len(it["input_ids"]), 0) for it in items)
    assert all((np.abs(it["rest_logprob"]) < 1e-3).all() for it in items)  # log 1: everything is tail
    batch = collate(items[:3], pad_id=0)
    per_row = batch["sample_counts"].sum(-1)
    assert (per_row[batch["mask"] == 1] == 8).all() and (per_row[batch["mask"] == 0] == 0).all()


def test_stream_collate_and_loss_on_a_tail_cache(tail_file, model):
    stream = CacheStream([ShardCaches(tail_file)], expected={"k": 4, "samples": 12}, seed=1, shuffle_buffer=4)
    items = list(stream)
    docs = {d["doc_index"]: d for d in CacheReader.open(tail_file, "topk").iter_docs()}
    for it in items:
        want = docs[it["doc_index"]]
        np.testing.assert_array_equal(it["sample_ids"], np.concatenate(per_position(want, "sample_ids")))
        np.testing.assert_array_equal(it["sample_n"], [len(x) for x in per_position(want, "sample_ids")])
    batch = collate(items[:4], pad_id=0)
    b, length = batch["mask"].shape
    assert batch["sample_ids"].shape[:2] == (b, length) and batch["sample_counts"].shape == batch["sample_ids"].shape
    assert ((batch["sample_ids"] == -1) == (batch["sample_counts"] == 0)).all()
    logits = torch.randn(b, length, model.config.vocab_size, requires_grad=True)
    loss = SampledTailKDLoss(12)(
        logits,
        batch["topk_ids"],
        batch["topk_logprobs"],
        batch["rest_logprob"],
        batch["sample_ids"],
        batch["sample_counts"],
        batch["mask"],
    )
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and logits.grad.abs().sum() > 0
    assert (logits.grad[batch["mask"] == 0] == 0).all()


def test_a_stream_refuses_a_cache_of_other_samples(tail_file):
    with pytest.raises(ValueError, match="samples=12, but run x needs samples=None"):
        CacheStream([ShardCaches(tail_file)], expected={"samples": None}, asked_by="run x")


# --------------------------------------------------------------------------- the online reference


def test_full_kd_equals_the_top_k_loss_over_the_whole_vocabulary():
    torch.manual_seed(0)
    v = 11
    zs, zt = torch.randn(2, 5, v), torch.randn(2, 5, v) * 3
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    lp = torch.log_softmax(zt, -1)
    top_lp, top_ids = lp.topk(v, -1)
    rest = torch.full((2, 5), -1.0e4)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        full = FullKDLoss(2.0, div, 0.3)(zs, zt, mask)
        topk = TopKKDLoss(2.0, div, "rest_bucket", 0.3)(zs, top_ids, top_lp, rest, mask)
        torch.testing.assert_close(full, topk, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="another vocabulary size"):
        FullKDLoss()(zs, zt[..., :-1], mask)


def test_online_teacher_that_does_not_fit_is_refused(teacher_manifest, monkeypatch):
    from kdflow.train import online
    from kdflow.train.job import TrainingError

    monkeypatch.setattr(online, "free_bytes", lambda device: 1024)
    with pytest.raises(TrainingError, match=r"teacher_logits.source: online .* GiB free"):
        online.load_online_teacher(str(teacher_manifest), torch.device("cpu"), "float32", "r.rb.s0")
    monkeypatch.undo()
    teacher = online.load_online_teacher(str(teacher_manifest), torch.device("cpu"), "float32", "r.rb.s0")
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


# --------------------------------------------------------------------------- config keys and the plan

REPO = Path(__file__).resolve().parents[1]


def study(experiments: list[dict], **cache) -> dict:
    import copy

    import yaml

    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["teacher_cache"].update(cache)
    config["training"]["defaults"].pop("teacher_logits", None)  # (the default study's rb cache: each test sets its own)
    config["training"]["experiments"] = copy.deepcopy(experiments)
    return config


def test_runs_of_their_own_logit_cache_and_online_in_the_plan():
    from kdflow.plan import study_plan

    plan = study_plan(
        study(
            [
                {"modes": ["ce", "rb"], "seeds": [0]},
                {"modes": ["rb"], "seeds": [0], "set": {"teacher_logits": {"k": 4, "samples": 12}}, "tag": "s12"},
                {"modes": ["rb"], "seeds": [0], "set": {"teacher_logits": {"k": 0, "samples": 50}}, "tag": "sls"},
                {"modes": ["rb"], "seeds": [0], "set": {"teacher_logits": {"source": "online"}}, "tag": "full"},
            ]
        ),
        REPO,
    )
    cache = "results/cache/smollm2-135m-instruct"
    assert plan.extra_logit_names == ("topk_k0_s50", "topk_k4_s12")
    assert plan.train_inputs("smollm2-pruned15.rb.s0.s12")["topk"] == f"{cache}/topk_k4_s12/index.json"
    assert plan.train_expected("smollm2-pruned15.rb.s0.s12")["samples"] == 12
    online = plan.train_inputs("smollm2-pruned15.rb.s0.full")
    assert online["topk"] == f"{cache}/topk_k16/index.json"  # its tokens
    assert online["teacher"] == "resources/models/smollm2-135m-instruct/kdflow_model.json"
    assert "teacher" not in plan.train_inputs("smollm2-pruned15.rb.s0")
    files = plan.cache_files()
    assert f"{cache}/topk_k4_s12/shard_00003.parquet" in files
    assert f"{cache}/topk_k4_s12/heldout.parquet" not in files  # evaluation reads the study's cache
    assert plan.logit_settings("topk_k0_s50") == {
        **plan.cache_settings("topk"),
        "k": 0,
        "samples": 50,
        "sample_seed": 0,
    }
    with pytest.raises(ValueError, match="no run of this config reads logit cache 'topk_k8'"):
        plan.logit_settings("topk_k8")


def test_a_study_cache_with_a_tail_names_its_directory_and_settings():
    from kdflow.plan import study_plan

    plan = study_plan(study([{"modes": ["rb"], "seeds": [0]}], samples=12, sample_seed=5), REPO)
    assert plan.topk_name == "topk_k16_s12" and plan.extra_logit_names == ()
    assert plan.cache_settings("topk")["samples"] == 12 and plan.cache_settings("topk")["sample_seed"] == 5
    assert "samples" not in study_plan(study([{"modes": ["rb"], "seeds": [0]}]), REPO).cache_settings("topk")


@pytest.mark.parametrize(
    "run_set, cache, pattern",
    [
        ({"temperature": 2.0, "teacher_logits": {"samples": 12}}, {}, r"temperature = 2.0 with teacher_logits.samples"),
        ({"divergence": "jsd"}, {"samples": 8}, r"divergence = jsd .* for forward_kl"),
        ({"missing_mass": "renormalize", "teacher_logits": {"samples": 8}}, {}, r"missing_mass = renormalize"),
        ({"teacher_logits": {"k": 0, "samples": 0}}, {}, r"k = 0 and samples = 0"),
        ({}, {"k": 0, "samples": 8}, r"teacher_cache.k: 0; the study's logit cache needs a head"),
        ({}, {"samples": 8, "logit_encoding": "compact", "logit_floor": 0.001}, r"logit_floor: 0.001 with .*samples"),
        ({}, {"logit_floor": 0.001}, r"logit_floor: 0.001 needs teacher_cache.logit_encoding: compact"),
    ],
)
def test_unsound_logit_settings_are_refused_naming_the_key(run_set, cache, pattern):
    from kdflow.config import ConfigError
    from kdflow.plan import study_plan

    with pytest.raises(ConfigError, match=pattern):
        study_plan(study([{"modes": ["rb"], "seeds": [0], "set": run_set}], **cache), REPO)


def test_a_run_of_its_own_tail_gets_no_floor():
    from kdflow.plan import study_plan

    exps = [{"modes": ["rb"], "seeds": [0], "set": {"teacher_logits": {"k": 4, "samples": 12}}, "tag": "t"}]
    plan = study_plan(study(exps, logit_encoding="compact", logit_floor=0.002), REPO)
    assert plan.cache_settings("topk")["logit_floor"] == 0.002
    assert plan.logit_settings("topk_k4_s12")["logit_floor"] == 0.0
    assert plan.logit_settings("topk_k4_s12")["logit_encoding"] == "compact"


def test_a_tail_with_a_ce_only_run_is_fine():
    """ce does not read the teacher's logits: no tail check, and it reads the study's cache."""
    from kdflow.plan import study_plan

    plan = study_plan(study([{"modes": ["ce"], "seeds": [0], "set": {"temperature": 2.0}}], samples=8), REPO)
    assert plan.train_inputs("smollm2-pruned15.ce.s0")["topk"].endswith("topk_k16_s8/index.json")


# --------------------------------------------------------------------------- the compact encoding


def random_rows(n: int, vocab: int, k: int, sharpness: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(n, vocab, generator=g) * sharpness, -1)
    top, _ = lp.topk(k, -1)
    rest = torch.logsumexp(lp.scatter(-1, lp.topk(k, -1).indices, -torch.inf), -1)
    return top.numpy(), rest.numpy()


@pytest.mark.parametrize("sharpness", [0.5, 3.0, 12.0])
def test_compact_codes_round_trip_within_the_kl_bound(sharpness):
    from kdflow.cache_compact import STEP, decode_logprobs, encode_logprobs, encoding_kl

    lp, rest = random_rows(400, 3000, 16, sharpness, seed=int(sharpness))
    enc = encode_logprobs(lp, rest)
    assert enc["codes"].dtype == np.uint8 and enc["rest_code"].dtype == np.uint8
    lp_dec, rest_dec = decode_logprobs(enc["codes"], enc["rest_code"])
    live = enc["live"]
    total = np.logaddexp(np.logaddexp.reduce(np.where(live, lp_dec, -np.inf), -1), rest_dec)
    np.testing.assert_allclose(total, 0.0, atol=1e-5)  # renormalised over the k + 1 buckets
    kl = encoding_kl(lp, rest, live, lp_dec, rest_dec)
    assert kl.max() <= STEP**2 / 8 + 1e-6 and kl.max() < 1e-3
    # each live entry within half a step of its value, up to the shared renormalisation
    shift = (lp_dec - lp)[live].mean()
    assert np.abs((lp_dec - lp - shift)[live]).max() <= STEP + 1e-6


def test_the_floor_moves_small_entries_into_the_rest():
    from kdflow.cache_compact import ZERO, decode_logprobs, encode_logprobs

    lp, rest = random_rows(200, 3000, 16, 6.0, seed=1)
    enc = encode_logprobs(lp, rest, floor=1e-3)
    small = np.exp(lp) < 1e-3
    assert small.any() and ((enc["codes"] == ZERO) == small).all()
    np.testing.assert_allclose(enc["moved"], np.where(small, np.exp(lp), 0).sum(-1), rtol=1e-6)
    lp_dec, rest_dec = decode_logprobs(enc["codes"], enc["rest_code"])
    assert (lp_dec[small] == -1.0e4).all()
    want = np.log(np.exp(rest) + enc["moved"])
    assert np.abs(rest_dec - want)[want > -15].max() <= 1 / 16 + 1e-6  # the moved mass is in the rest (one step)


@pytest.fixture(scope="module")
def compact_run(tmp_path_factory, shard, teacher_manifest):
    root = tmp_path_factory.mktemp("compact")
    job = topk_job(root, shard, teacher_manifest, logit_encoding="compact", logit_floor=0.0, **TAIL)
    return job.outputs["topk"], capture_topk(job)


def test_a_compact_cache_decodes_to_the_plain_one(compact_run, tail_file):
    path, summary = compact_run
    assert 0 < summary["encoding_kl_max"] < 1e-3 and summary["floor_mass_max"] < 1e-6
    schema = pq.read_schema(path)
    assert schema.field("topk_logprobs").type.value_type.value_type == pa.uint8()
    assert read_meta(path).logit_encoding == "compact" and read_meta(path).logit_floor == 0.0
    chunks = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {chunks.column(c).path_in_schema: chunks.column(c).encodings for c in range(chunks.num_columns)}
    assert "RLE_DICTIONARY" in encodings["topk_logprobs.list.element.list.element"]  # unsigned codes: dictionary
    assert "RLE_DICTIONARY" not in encodings["input_ids.list.element"]
    plain = {d["doc_index"]: d for d in CacheReader.open(tail_file, "topk").iter_docs()}
    for doc in CacheReader.open(path, "topk").iter_docs():
        ref = plain[doc["doc_index"]]
        assert doc["topk_ids"].dtype == np.int32 and doc["topk_logprobs"].dtype == np.float32
        np.testing.assert_array_equal(doc["topk_ids"], ref["topk_ids"])  # no floor: every head id kept
        np.testing.assert_allclose(doc["topk_logprobs"], ref["topk_logprobs"], atol=0.06)
        for a, b in zip(per_position(doc, "sample_ids"), per_position(ref, "sample_ids"), strict=True):
            np.testing.assert_array_equal(a, b)  # the same draws
    items = list(CacheStream([ShardCaches(path)], expected={"samples": 12, "logit_encoding": "compact"}))
    assert items[0]["topk_logprobs"].dtype == np.float32 and items[0]["sample_ids"].dtype == np.int32
    # (sizes are measured on real data by bench/capture.py and bench/logit_fidelity.py, not on the tiny teacher)
