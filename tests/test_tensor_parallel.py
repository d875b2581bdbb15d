"""Tensor-parallel cache jobs (kdflow.teacher_parallel) on CPU: two gloo ranks under torchrun against a
single-process capture of the same shard, a rank killed midway, and the refusals."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdflow.config import ConfigError, read_yaml, validate_config
from kdflow.launch import LaunchError
from kdflow.manifest import Weights
from kdflow.models import ModelError, check_tensor_parallel
from kdflow.prepare import prepare_teacher
from kdflow.teacher_parallel import ParallelError, job_ranks
from kdflow.teacher_pass import run_cache_rule
from tiny_models import one_thread, tiny_teacher_dir, write_shard  # noqa: F401 (fixtures)

PREP = {"device": "cpu", "dtype": "float32", "max_length": 32, "batch_size": 2, "ppl_max_docs": 0}
SETTINGS = dict(
    k=4,
    max_length=24,
    batch_size=3,
    rows_per_part=3,
    device="cpu",
    parallel="single",
    tp_size=None,
    dtype="float32",
    hidden_layers=[1, 2],
    hidden_token_ratio=1.0,
    hidden_token_seed=0,
)
TENSOR = dict(SETTINGS, parallel="tensor", tp_size=2)
REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * (1 + i % 4) for i in range(18)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_teacher_dir):
    manifest = tmp_path_factory.mktemp("tp_teacher") / "models" / "teacher" / "kdflow_model.json"
    prepare_teacher({"name": "teacher", "source": {"kind": "hf", "path": str(tiny_teacher_dir)}}, PREP, manifest)
    return manifest


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_shard(tmp_path_factory.mktemp("tp_shard") / "shard_0000.parquet", TEXTS)


def capture(root: Path, kind: str, shard: Path, teacher: Path, settings: dict) -> tuple[dict, dict[str, Path]]:
    names = ["topk", "embed"] if kind == "topk" else ["hidden"]
    outputs = {n: root / n / f"{shard.stem}.parquet" for n in names}
    summary = run_cache_rule(
        kind, shard, outputs, root / ".partial" / kind, teacher, settings, threads=2, log_file=root / f"{kind}.log"
    )
    return summary, outputs


def columns(path: Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def assert_close_ragged(a: list, b: list, tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), atol=tol)


@pytest.fixture(scope="module")
def single(tmp_path_factory, shard, teacher):
    root = tmp_path_factory.mktemp("single")
    return {kind: capture(root, kind, shard, teacher, SETTINGS)[1] for kind in ("topk", "hidden")}


def test_two_gloo_ranks_capture_what_one_process_does(tmp_path, shard, teacher, single):
    summary, tp = capture(tmp_path, "topk", shard, teacher, TENSOR)
    assert summary["tensor_parallel_ranks"] == 2 and summary["tokens_computed"] == summary["tokens"] > 0
    ref, got = columns(single["topk"]["topk"]), columns(tp["topk"])
    for exact in ("doc_id", "doc_index", "n_tokens", "input_ids", "topk_ids"):
        assert got[exact] == ref[exact], exact
    assert_close_ragged(got["topk_logprobs"], ref["topk_logprobs"], 2e-3)  # float16 storage of fp32 values
    assert_close_ragged(got["rest_logprob"], ref["rest_logprob"], 2e-3)
    assert_close_ragged(columns(tp["embed"])["embedding"], columns(single["topk"]["embed"])["embedding"], 1e-3)

    summary, tp = capture(tmp_path, "hidden", shard, teacher, TENSOR)
    assert summary["passes_per_token"] == pytest.approx(2 / 4)  # the early stop after layer 2 of 4 still holds
    ref, got = columns(single["hidden"]["hidden"]), columns(tp["hidden"])
    assert got["positions"] == ref["positions"]
    for layer in (1, 2):
        assert_close_ragged(got[f"hidden_l{layer}"], ref[f"hidden_l{layer}"], 2e-3)
    log = (tmp_path / "hidden.log").read_text()
    assert "rank0 INFO kdflow.teacher_pass" in log  # the ranks append their lines to the rule's log
    assert not list((tmp_path / ".partial").glob("*.json"))  # the job and summary files are cleaned up


KILL_RANK_1 = """
import os, signal, threading, time
from pathlib import Path

if os.environ.get("RANK") == "1" and os.environ.get("KDFLOW_TEST_KILL_AFTER"):
    parts = Path(os.environ["KDFLOW_TEST_PARTS"])
    def _kill():
        while len(list(parts.glob("topk_part*.parquet"))) < int(os.environ["KDFLOW_TEST_KILL_AFTER"]):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_kill, daemon=True).start()
"""


def test_a_rank_killed_midway_fails_the_job_and_the_rerun_resumes(tmp_path, shard, teacher, single, monkeypatch):
    """Rank 1 is SIGKILLed (by a thread a sitecustomize module starts in it) once rank 0 has written two parts:
    the job fails naming what happened, the finished parts stay, and the rerun computes only the rest."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(KILL_RANK_1))
    partial = tmp_path / ".partial" / "topk"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KDFLOW_TEST_KILL_AFTER", "2")
    monkeypatch.setenv("KDFLOW_TEST_PARTS", str(partial))
    with pytest.raises(LaunchError) as failed:
        capture(tmp_path, "topk", shard, teacher, TENSOR)
    message = str(failed.value)
    assert "topk cache job of shard_0000 on 2 tensor-parallel ranks" in message
    assert "exited with status" in message and f"kept in {partial}: a rerun resumes from them" in message
    kept = sorted(partial.glob("topk_part*.parquet"))
    assert len(kept) >= 2 and not (tmp_path / "topk" / "shard_0000.parquet").exists()

    monkeypatch.delenv("KDFLOW_TEST_KILL_AFTER")
    summary, tp = capture(tmp_path, "topk", shard, teacher, TENSOR)
    assert summary["parts_resumed"] == len(kept) and 0 < summary["tokens_computed"] < summary["tokens"]
    ref, got = columns(single["topk"]["topk"]), columns(tp["topk"])
    assert got["topk_ids"] == ref["topk_ids"] and got["doc_id"] == ref["doc_id"]
    assert_close_ragged(got["topk_logprobs"], ref["topk_logprobs"], 2e-3)


def test_ranks_that_do_not_divide_the_heads_are_refused(tiny_teacher_dir):
    check_tensor_parallel(Weights(str(tiny_teacher_dir)), 2)  # 4 heads, 2 key-value heads
    with pytest.raises(ModelError, match=r"3 tensor-parallel ranks .* do not divide its 4 attention and 2 key-value"):
        check_tensor_parallel(Weights(str(tiny_teacher_dir)), 3)


def test_job_ranks():
    assert job_ranks(SETTINGS) == 1
    assert job_ranks(TENSOR) == 2
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ParallelError, match="this job sees no GPU"):
            job_ranks(dict(TENSOR, device="cuda", tp_size=None))


def _config(**cache) -> dict:
    config = read_yaml(REPO / "config" / "config.yaml")
    config["teacher_cache"] = {**config.get("teacher_cache", {}), **cache}
    return config


@pytest.mark.parametrize(
    "cache, message",
    [
        (
            {"device": "auto", "parallel": "single"},
            "teacher_cache.device: auto spreads the teacher over the job's GPUs; say how",
        ),
        (
            {"parallel": "device_map", "device": "cpu"},
            "teacher_cache.parallel: device_map .* needs teacher_cache.device: auto",
        ),
        (
            {"parallel": "tensor", "device": "cpu"},
            "teacher_cache.tp_size: parallel tensor on device cpu needs the number",
        ),
        ({"parallel": "tensor", "device": "auto"}, "teacher_cache.device: parallel tensor places rank r"),
    ],
)
def test_parallel_settings_that_do_not_go_together_are_refused(cache, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_config(**cache))


def test_the_teachers_heldout_perplexity_on_two_ranks_is_the_single_process_one(tmp_path, tiny_teacher_dir, shard):
    """prepare_models of a teacher whose caches run tensor-parallel measures it on the same ranks."""
    teacher = {"name": "teacher", "source": {"kind": "hf", "path": str(tiny_teacher_dir)}}
    prep = dict(PREP, ppl_max_docs=10)
    single = prepare_teacher(teacher, prep, tmp_path / "single" / "kdflow_model.json", shard)
    parallel = {"device": "cpu", "parallel": "tensor", "tp_size": 2}
    tp = prepare_teacher(teacher, dict(prep, teacher_parallel=parallel), tmp_path / "tp" / "kdflow_model.json", shard)
    assert tp.heldout.tokens == single.heldout.tokens > 0 and tp.heldout.docs == single.heldout.docs == 10
    assert tp.heldout.ppl == pytest.approx(single.heldout.ppl, rel=1e-5)
    assert (tp.num_layers, tp.num_parameters) == (single.num_layers, single.num_parameters)
    assert tp.tokenizer_fingerprint == single.tokenizer_fingerprint
    assert not list((tmp_path / "tp").glob("*.json.*"))  # the task and result files are cleaned up
