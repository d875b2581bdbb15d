"""Training runs on tiny models and real caches built in the test: every mode, the PEFT output, exact resume
after a signal and after SIGKILL, DDP over two gloo processes, divergence and compatibility errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdflow.cache_format import CacheMismatch
from kdflow.config import validate_config
from kdflow.launch import launch_command
from kdflow.models import load_model, load_tokenizer
from kdflow.runs import RunSpec, expand_runs, run_name
from kdflow.teacher_pass import CacheJob, capture_hidden, capture_topk
from kdflow.train import Batches, Trainer, TrainingError, TrainJob, lr_lambda, run_training
from tiny_models import one_thread, other_vocab_dir, prepare_tiny_models, tiny_teacher_dir, write_shard  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 12  # every document below is longer, so every cached document has exactly 12 tokens
CACHE = dict(
    k=4,
    max_length=MAX_LENGTH,
    batch_size=4,
    rows_per_part=4,
    device="cpu",
    dtype="float32",
    hidden_layers=[2],
    hidden_token_ratio=1.0,
    hidden_token_seed=0,
)


def texts(offset: int, n: int) -> list[str]:
    return [
        f"def f{i}(x, y):\n    total = x * {i} + y\n    return total - {i * i}\n" for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_teacher_dir, other_vocab_dir):  # noqa: F811
    """Teacher, pruned student, a foreign-vocabulary student, two training shards with all three caches."""
    root = tmp_path_factory.mktemp("train_study")
    models = prepare_tiny_models(root, tiny_teacher_dir, other_vocab_dir)
    teacher, student, foreign = models["teacher"], models["student"], models["foreign"]
    shards = []
    for i, docs in enumerate([texts(0, 10), texts(10, 9)]):
        shard = write_shard(root / f"shards/shard_{i:05d}.parquet", docs)
        out = {
            "topk": root / f"cache/topk/{shard.name}",
            "embed": root / f"cache/embed/{shard.name}",
            "hidden": root / f"cache/hidden/{shard.name}",
        }
        capture_topk(
            CacheJob("topk", shard, {"topk": out["topk"], "embed": out["embed"]}, root / f".p/t{i}", teacher, CACHE)
        )
        capture_hidden(CacheJob("hidden", shard, {"hidden": out["hidden"]}, root / f".p/h{i}", teacher, CACHE))
        shards.append({k: str(v) for k, v in out.items()})
    heldout = write_shard(root / "shards/heldout.parquet", texts(100, 4))
    return {
        "root": root,
        "teacher": teacher,
        "student": student,
        "foreign": foreign,
        "shards": shards,
        "heldout": str(heldout),
    }


def spec_for(mode: str, **settings) -> RunSpec:
    """A run spec as the config expands it (schema defaults + ``settings``)."""
    config = validate_config(
        {
            "teacher": {"name": "teacher", "source": {"kind": "hf", "path": "x"}},
            "students": [{"name": "student", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 3]}}],
            "data": {"sources": [{"name": "s", "kind": "python_stdlib"}]},
            "teacher_cache": {"hidden_layers": [2]},
            "training": {
                "defaults": {
                    "steps": 6,
                    "batch_size": 2,
                    "checkpoint_every": 2,
                    "heldout_docs": 2,
                    "optimizer": {"lr": 0.01},
                    "fb": {"layer_map": [{"student": 1, "teacher": 2}]},
                    "lora": {"r": 4, "alpha": 8},
                },
                "experiments": [{"modes": [mode], "set": settings}],
            },
        }
    )
    (spec,) = expand_runs(config)[0].values()
    return spec


def job_for(study, tmp: Path, spec: RunSpec, **kw) -> TrainJob:
    expected = {"k": 4, "max_length": MAX_LENGTH, "teacher": "teacher"}
    return TrainJob(
        spec=spec.to_json(),
        student_manifest=str(study[spec.student]),
        shards=copy.deepcopy(study["shards"]),
        expected=expected,
        output=str(tmp / "out" / spec.name),
        work=str(tmp / "work" / spec.name),
        heldout=study["heldout"],
        threads=1,
        **kw,
    )


def of_student(spec: RunSpec, student: str) -> RunSpec:
    """The same run for another student (named after it; the spec checks that name and student agree)."""
    return dataclasses.replace(spec, student=student, name=run_name(student, spec.mode, spec.seed, spec.tag))


def adapter(path: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    if (Path(path) / "projector.safetensors").exists():
        weights.update({f"projector.{k}": v for k, v in load_file(str(Path(path) / "projector.safetensors")).items()})
    return weights


def metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


# --------------------------------------------------------------------------- every mode


@pytest.mark.parametrize("mode", ["ce", "rb", "fb", "relb", "mix"])
def test_each_mode_trains_and_leaves_a_loadable_peft_adapter(study, tmp_path, mode):
    from peft import PeftModel

    spec = spec_for(mode)
    summary = run_training(job_for(study, tmp_path, spec))
    out = tmp_path / "out" / spec.name
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "run_config.json",
        "provenance.json",
        "metrics.jsonl",
        "summary.json",
    } <= {p.name for p in out.iterdir()}
    assert (out / "projector.safetensors").exists() == ("fb" in spec.terms)
    rows = metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        for key in (*spec.terms, "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
            assert r[key] is not None and r[key] == r[key], (key, r)
        assert r["docs"] == 2 and r["tokens"] == 2 * MAX_LENGTH
        assert r["loss"] == pytest.approx(sum(r[t] * w for t, w in spec.terms.items()))
    if "relb" in spec.terms:
        assert {"relb_distance", "relb_angle"} <= set(rows[0])
    assert summary["heldout"]["ppl"] > 1 and summary["steps"] == 6
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["teacher_caches"]["k"] == 4 and prov["student"]["name"] == "student"
    # PeftModel loads it on the base student, and the trained adapter changes the output.
    base = load_model(study["student"])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, str(out)).eval()
        after = peft(input_ids=ids).logits
    assert not torch.allclose(before, after)
    assert not (tmp_path / "work" / spec.name / "checkpoints").exists()  # removed once the output exists


def test_ce_training_lowers_the_loss(study, tmp_path):
    spec = spec_for("ce", steps=30, optimizer={"lr": 0.02}, schedule={"kind": "constant"})
    run_training(job_for(study, tmp_path, spec))
    rows = metrics(tmp_path / "out" / spec.name / "metrics.jsonl")
    first, last = sum(r["ce"] for r in rows[:5]) / 5, sum(r["ce"] for r in rows[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_learning_rate_schedules():
    spec = spec_for("ce", schedule={"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1})
    f = lr_lambda(spec.schedule, 12)
    assert [round(f(s), 4) for s in (0, 1)] == [round(1 / 3, 4), round(2 / 3, 4)]
    assert f(2) == pytest.approx(1.0) and f(12) == pytest.approx(0.1) and f(7) == pytest.approx(0.55)
    lin = lr_lambda(spec_for("ce", schedule={"kind": "linear", "min_lr_ratio": 0.0}).schedule, 10)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert lr_lambda(spec_for("ce", schedule={"kind": "constant"}).schedule, 10)(9) == 1.0


# --------------------------------------------------------------------------- resume


def test_sigterm_checkpoints_and_rerun_ends_bitwise_equal(study, tmp_path, monkeypatch):
    spec = spec_for("mix", steps=7, checkpoint_every=3, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    run_training(job_for(study, tmp_path / "ref", spec))
    reference = tmp_path / "ref" / "out" / spec.name

    job = job_for(study, tmp_path / "cut", spec)
    real_step = Trainer.train_step

    def step_then_signal(self):
        out = real_step(self)
        if self.step == 4:  # the 5th step is running: SIGTERM arrives mid-step
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(SystemExit) as stop:
        run_training(job)
    assert stop.value.code == 128 + signal.SIGTERM
    checkpoints = sorted(p.name for p in (Path(job.work) / "checkpoints").iterdir())
    assert checkpoints == ["step_00000003", "step_00000005"]  # every 3 steps, and at the signal
    assert not Path(job.output).exists()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    run_training(job)
    assert_same_weights(adapter(reference), adapter(job.output))
    drop = ("step_s", "tokens_per_s", "elapsed_s")
    clean = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert clean(metrics(Path(job.output) / "metrics.jsonl")) == clean(metrics(reference / "metrics.jsonl"))


def test_sigkill_then_rerun_resumes_from_the_checkpoint(study, tmp_path):
    spec = spec_for("rb", steps=200, checkpoint_every=5)
    job = job_for(study, tmp_path, spec)
    job_file = tmp_path / "job.json"
    job.save(job_file)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "kdflow.train", str(job_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt_dir = Path(job.work) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(ckpt_dir.glob("step_*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not Path(job.output).exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step_00000000" not in done.stderr
    resumed_at = int(done.stderr.split("resumed from")[1].split("(step ")[1].split(" ")[0])
    assert 5 <= resumed_at < 200
    rows = metrics(Path(job.output) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 201))  # the cut-off lines were rewritten, none twice


def test_checkpoint_of_other_settings_is_not_resumed(study, tmp_path, monkeypatch):
    spec = spec_for("ce", steps=6, checkpoint_every=2)
    job = job_for(study, tmp_path, spec)
    real_step = Trainer.train_step

    def stop_at_3(self):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", stop_at_3)
    with pytest.raises(SystemExit):
        run_training(job)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    job.spec = spec_for("ce", steps=6, checkpoint_every=2, optimizer={"lr": 0.005}).to_json()
    run_training(job)
    assert list(Path(job.work).glob("stale-*/step_00000004"))
    assert [r["step"] for r in metrics(Path(job.output) / "metrics.jsonl")] == list(range(1, 7))


# --------------------------------------------------------------------------- distributed


def test_ddp_two_gloo_processes_equal_one_process_with_twice_the_batch(study, tmp_path):
    """Rank r gets documents r, r+2, … of the global order, so two ranks of batch 2 see the documents one
    process of batch 4 sees; with equal-length documents the averaged gradients are the same."""
    single = spec_for("rb", steps=4, batch_size=4)
    run_training(job_for(study, tmp_path / "one", single))
    ddp = spec_for("rb", steps=4, batch_size=2)
    job = job_for(study, tmp_path / "two", ddp)
    job_file = tmp_path / "job.json"
    job.save(job_file)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run(launch_command(job_file, 2), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = metrics(Path(job.output) / "metrics.jsonl")
    assert [r["docs"] for r in rows] == [4] * 4
    assert json.loads((Path(job.output) / "summary.json").read_text())["world_size"] == 2
    one = metrics(tmp_path / "one" / "out" / single.name / "metrics.jsonl")
    for a, b in zip(rows, one, strict=False):
        assert a["rb"] == pytest.approx(b["rb"], rel=1e-5, abs=1e-7) and a["ce"] == pytest.approx(b["ce"], rel=1e-5)
    assert_same_weights(adapter(job.output), adapter(tmp_path / "one" / "out" / single.name), atol=1e-6)


def test_the_per_node_launcher_of_a_multi_node_job_trains_through_a_c10d_rendezvous(study, tmp_path):
    """What each srun task of a multi-node job runs (kdflow.launch), here as the one node of a one-node job:
    torchrun with a c10d rendezvous at the first node of SLURM_JOB_NODELIST, two gloo processes."""
    import socket

    spec = spec_for("ce", steps=2, batch_size=2)
    job = job_for(study, tmp_path / "node", spec)
    job_file = tmp_path / "job.json"
    job.save(job_file)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO / "src"),
        OMP_NUM_THREADS="1",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="77",
        KDFLOW_RDZV_PORT=str(port),
    )
    done = subprocess.run(
        [sys.executable, "-m", "kdflow.launch", str(job_file), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"--rdzv_endpoint=localhost:{port}" in done.stderr
    summary = json.loads((Path(job.output) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2


# --------------------------------------------------------------------------- errors and compatibility


def test_nan_loss_stops_naming_step_batch_and_term(study, tmp_path, monkeypatch):
    real_next = Batches.next
    calls = []

    def poisoned(self):
        batch = real_next(self)
        calls.append(1)
        if len(calls) == 3:
            batch["topk_logprobs"][0, 2, 0] = float("nan")
        return batch

    monkeypatch.setattr(Batches, "next", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 3 .*term rb = nan on documents \(shard, doc_index\)"):
        run_training(job_for(study, tmp_path, spec_for("rb")))


def test_foreign_vocabulary_student_refused_for_logit_kd(study, tmp_path):
    spec = of_student(spec_for("rb"), "foreign")
    with pytest.raises(CacheMismatch, match="differs from student 'foreign'.*rb KD needs the same token ids"):
        Trainer(job_for(study, tmp_path, spec))


def test_foreign_vocabulary_student_trains_relation_kd_on_its_own_tokens(study, tmp_path):
    spec = of_student(spec_for("relb", steps=3), "foreign")
    summary = run_training(job_for(study, tmp_path, spec))
    rows = metrics(tmp_path / "out" / spec.name / "metrics.jsonl")
    foreign_tok = load_tokenizer(study["foreign"])
    assert summary["steps"] == 3 and all(r["relb"] >= 0 for r in rows)
    # its tokens are its own tokenizer's, not the teacher's cached ids
    n = len(foreign_tok(texts(0, 1)[0], truncation=True, max_length=MAX_LENGTH)["input_ids"])
    assert n == MAX_LENGTH and rows[0]["tokens"] <= 2 * MAX_LENGTH


def test_missing_cache_for_a_term_is_named(study, tmp_path):
    job = job_for(study, tmp_path, spec_for("fb"))
    for s in job.shards:
        s["hidden"] = None
    with pytest.raises(TrainingError, match="the hidden cache of every shard is needed"):
        Trainer(job)


def test_bad_lora_target_and_layer_are_named(study, tmp_path):
    job = job_for(study, tmp_path, spec_for("ce", lora={"target_modules": ["query"]}))
    with pytest.raises(TrainingError, match=r"lora.target_modules \['query'\] match no module"):
        run_training(job)
    job = job_for(study, tmp_path, spec_for("fb", fb={"layer_map": [{"student": 9, "teacher": 2}]}))
    with pytest.raises(
        TrainingError,
        match=r"fb.layer_map\[0\].student = 9, but student 'student' has hidden "
        r"states 0..2",
    ):
        run_training(job)


def test_gradient_checkpointing_gives_the_same_adapter(study, tmp_path):
    plain = spec_for("mix", steps=3)
    run_training(job_for(study, tmp_path / "plain", plain))
    ckpt = spec_for("mix", steps=3, gradient_checkpointing=True)
    run_training(job_for(study, tmp_path / "ckpt", ckpt))
    assert_same_weights(
        adapter(tmp_path / "plain" / "out" / plain.name),
        adapter(tmp_path / "ckpt" / "out" / ckpt.name),
        atol=1e-6,
    )
