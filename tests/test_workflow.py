"""The real workflow, run by snakemake on a tiny config: prepare_models + corpus + shard.

One module-scoped run, then checks of what a user relies on: the outputs, a second run doing nothing,
a deleted shard rebuilt alone and byte-identical, a bad config refused before any job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tiny_models import tiny_teacher_dir, write_code_docs  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    """This checkout's workflow run in ``workdir`` with its config.yaml, on 2 cores."""
    snakefile, config = str(REPO / "Snakefile"), str(workdir / "config.yaml")
    cores = ["--cores", "2"]
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        snakefile,
        "-d",
        str(workdir),
        "--configfile",
        config,
        *cores,
        *args,
    ]


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd(workdir, *args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def planned_jobs(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1]
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)
        if m.group(1) not in ("total", "all")
    }


def tiny_config(workdir: Path, teacher_dir: Path) -> dict:
    docs = write_code_docs(workdir / "docs", 24)
    (docs / "dup.py").write_text((docs / "doc03.py").read_text())
    with open(workdir / "chat.jsonl", "wb") as f:
        for i in range(30):
            rec = {
                "messages": [
                    {"role": "user", "content": f"question {i}?"},
                    {"role": "assistant", "content": f"answer {i} " * 3},
                ]
            }
            f.write(json.dumps(rec).encode() + b"\n")
        f.write(b"{not json\n")
    return {
        "teacher": {"name": "tiny-teacher", "source": {"kind": "hf", "path": str(teacher_dir)}},
        "students": [{"name": "tiny-student", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 3]}}],
        "data": {
            "sources": [
                {"name": "code", "kind": "text_files", "paths": [str(docs / "*.py")]},
                {"name": "chat", "kind": "jsonl", "paths": [str(workdir / "chat.jsonl")], "weight": 0.5},
            ],
            "n_shards": 3,
            "min_chars": 10,
            "max_chars": 60,
            "long_docs": "split",
            "heldout": {"fraction": 0.2, "max_docs": 6},
            "bad_lines": {"max_fraction": 0.05},
        },
        "prepare": {"max_length": 32, "batch_size": 4, "ppl_max_docs": 4},
        "teacher_cache": {"k": 4, "max_length": 24, "batch_size": 4, "rows_per_part": 8, "hidden_layers": [2]},
        "training": {
            "defaults": {
                "steps": 4,
                "batch_size": 2,
                "checkpoint_every": 2,
                "heldout_docs": 2,
                "lora": {"r": 2, "alpha": 4},
                "fb": {"layer_map": [{"student": 1, "teacher": 2}]},
            },
            "experiments": [
                {"modes": ["ce", "mix"]},
                # long enough (on a tiny model) to be killed midway by test_killed_training_resumes
                {"modes": ["rb"], "tag": "long", "set": {"steps": 400, "checkpoint_every": 25}},
            ],
        },
        "eval": {"heldout": {"max_docs": 4}, "lm_eval": {"limit": 3, "batch_size": 4}},
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_teacher_dir):  # noqa: F811
    workdir = tmp_path_factory.mktemp("study")
    config = tiny_config(workdir, tiny_teacher_dir)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(workdir, "-n")
    run = snakemake(workdir)
    return workdir, config, dry, run


def test_dry_run_plans_the_foundation(study):
    _, _, dry, _ = study
    assert planned_jobs(dry.stdout) == {
        "corpus": 1,
        "shard": 4,
        "prepare_models": 2,
        "topk_cache": 4,
        "hidden_cache": 4,
        "cache_index": 3,
        "train": 3,
        "eval": 5,
        "parse_results": 1,
    }


def test_run_produces_models_shards_and_manifest(study):
    workdir, config, _, _ = study
    names = [f"shard_{i:05d}" for i in range(3)] + ["heldout"]
    counts = {n: pq.read_table(workdir / f"results/shards/{n}.parquet").num_rows for n in names}
    assert all(c > 0 for c in counts.values())
    manifest = json.loads((workdir / "results/data/manifest.json").read_text())
    assert manifest["shards"] == counts
    assert manifest["sources"]["code"]["duplicate"] == 1
    assert manifest["sources"]["chat"]["read"]["malformed"] == 1
    assert "chat.jsonl:31" in (workdir / "results/logs/corpus.log").read_text()

    teacher = json.loads((workdir / "resources/models/tiny-teacher/kdflow_model.json").read_text())
    student = json.loads((workdir / "resources/models/tiny-student/kdflow_model.json").read_text())
    assert teacher["heldout"]["ppl"] > 1 and student["heldout"]["ppl"] > 1
    assert student["teacher_heldout"]["ppl"] == teacher["heldout"]["ppl"]
    assert student["keep_layers"] == [0, 3] and student["num_layers"] == 2
    assert (workdir / "resources/models/tiny-student/hf/config.json").is_file()
    assert (workdir / "results/benchmarks/prepare_models/tiny-student.tsv").is_file()


def test_second_run_does_nothing(study):
    workdir, _, _, _ = study
    assert planned_jobs(snakemake(workdir, "-n").stdout) == {}


def test_deleted_shard_is_rebuilt_alone_and_identical(study):
    workdir, _, _, _ = study
    target = workdir / "results/shards/shard_00001.parquet"
    caches = [
        workdir / f"results/cache/tiny-teacher/{c}/shard_00001.parquet" for c in ("topk_k4", "embed", "hidden_l2")
    ]
    before = {p: p.read_bytes() for p in [target, *caches]}
    others = {
        p: p.stat().st_mtime_ns
        for d in ("results/shards", "results/cache")
        for p in (workdir / d).rglob("*")
        if p.is_file() and p not in before
    }
    target.unlink()
    # the shard and the caches made from it (and the runs trained on them), nothing of the other shards
    assert planned_jobs(snakemake(workdir, "-n").stdout) == {
        "shard": 1,
        "topk_cache": 1,
        "hidden_cache": 1,
        "cache_index": 3,
        "train": 3,
        "eval": 3,
        "parse_results": 1,
    }
    # the shard and its caches by name (the caches alone would not do: their outputs stand, so Snakemake would
    # not need the missing shard to make them)
    snakemake(workdir, *[str(p.relative_to(workdir)) for p in [target, *caches]])
    assert {p: p.read_bytes() for p in before} == before, "the rebuilt shard or its caches differ"
    assert {p: p.stat().st_mtime_ns for p in others} == others
    # byte-identical shard and caches: the runs trained on them stand (training them again is the workflow's
    # ordinary rerun, which test_killed_training_resumes_from_its_checkpoint_on_rerun runs)
    snakemake(workdir, "--touch")
    assert planned_jobs(snakemake(workdir, "-n").stdout) == {}


@pytest.mark.parametrize(
    "target,rule",
    [
        ("results/shards/shard_00002.parquet", "shard"),
        ("results/cache/tiny-teacher/topk_k4/shard_00001.parquet", "topk_cache"),
        ("results/cache/tiny-teacher/embed/heldout.parquet", "topk_cache"),
        ("results/cache/tiny-teacher/hidden_l2/shard_00000.parquet", "hidden_cache"),
    ],
)
def test_forcing_one_file_plans_one_job(study, target, rule):
    workdir, _, _, _ = study
    out = snakemake(workdir, "-n", "--force", target).stdout
    assert planned_jobs(out) == {rule: 1}


def test_caches_exist_for_every_shard_with_summaries(study):
    workdir, _, _, _ = study
    from kdflow.cache_format import CacheReader

    for shard in [f"shard_{i:05d}" for i in range(3)] + ["heldout"]:
        docs = pq.read_table(workdir / f"results/shards/{shard}.parquet").num_rows
        for kind, sub in (("topk", "topk_k4"), ("embed", "embed"), ("hidden", "hidden_l2")):
            reader = CacheReader.open(
                workdir / f"results/cache/tiny-teacher/{sub}/{shard}.parquet", kind, {"shard": shard}
            )
            assert reader.num_rows == docs
        log = (workdir / f"results/logs/topk_cache/{shard}.log").read_text()
        summary = json.loads(log.split("summary ", 1)[1].splitlines()[0])
        assert summary["documents"] == docs and summary["tokens_per_s"] > 0
    assert not list((workdir / "results/cache/.partial").rglob("*.parquet"))


def test_every_run_leaves_a_peft_adapter_and_metrics(study):
    workdir, _, _, _ = study
    for run in ("tiny-student.ce.s0", "tiny-student.mix.s0", "tiny-student.rb.s0.long"):
        out = workdir / "results/train" / run
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == (400 if run.endswith("long") else 4) and summary["heldout"]["ppl"] > 1
        assert (workdir / f"results/benchmarks/train/{run}.tsv").is_file()
    assert (workdir / "results/train/tiny-student.mix.s0/projector.safetensors").is_file()
    rows = (workdir / "results/train/tiny-student.mix.s0/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]


def test_every_model_is_evaluated_into_one_database_summary_and_report(study, tmp_path):
    import duckdb

    workdir, _, _, _ = study
    models = [
        "tiny-student.ce.s0",
        "tiny-student.mix.s0",
        "tiny-student.rb.s0.long",
        "tiny-teacher",
        "tiny-student.init",
    ]
    for model in models:
        heldout = json.loads((workdir / f"results/eval/{model}/heldout.json").read_text())
        assert {m["metric"] for m in heldout["metrics"]} == {
            "ppl",
            "nll_per_token",
            "top1_agreement",
            "kl_teacher_student",
        }
        lm = json.loads((workdir / f"results/eval/{model}/lm_eval.json").read_text())
        assert {m["metric"] for m in lm["metrics"]} >= {"bits_per_byte", "word_perplexity"}
    with duckdb.connect(str(workdir / "results/kdflow.duckdb"), read_only=True) as db:
        assert sorted(r[0] for r in db.execute("select model from runs").fetchall()) == sorted(models)
        assert db.execute("select count(*) from metrics where task = 'kdflow_heldout'").fetchone()[0] >= 15
        assert db.execute("select count(*) from train_steps").fetchone()[0] == 4 + 4 + 400
        assert db.execute("select count(distinct rule) from jobs").fetchone()[0] >= 6
        assert db.execute(
            "select rule, count(*), count(tokens) from energy group by rule order by rule"
        ).fetchall() == [
            ("eval", 5, 5),
            ("hidden_cache", 4, 4),
            ("prepare_models", 2, 0),
            ("topk_cache", 4, 4),
            ("train", 3, 3),
        ]
    summary = (workdir / "results/summary.md").read_text()
    assert all(m in summary for m in ("tiny-teacher", "tiny-student.init", "tiny-student.ce", "tiny-student.mix"))
    assert list((workdir / "results/plots").glob("*.png"))
    report = tmp_path / "report.html"
    snakemake(workdir, "--report", str(report))
    assert report.stat().st_size > 10_000


def test_forcing_one_run_plans_one_train_job(study):
    workdir, _, _, _ = study
    out = snakemake(workdir, "-n", "--force", "results/train/tiny-student.ce.s0").stdout
    assert planned_jobs(out) == {"train": 1}


def test_unknown_key_fails_before_any_job(study, tmp_path):
    _, config, _, _ = study
    bad = dict(config, data=dict(config["data"], n_shard=3))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(bad))
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0
    assert "unknown key data.n_shard" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_editing_a_source_file_reruns_the_corpus(study):
    workdir, _, _, _ = study
    doc = workdir / "docs" / "doc05.py"
    text, stat = doc.read_text(), doc.stat()
    doc.write_text(text + "extra = 1\n")
    try:
        assert planned_jobs(snakemake(workdir, "-n").stdout) == {
            "corpus": 1,
            "shard": 4,
            "prepare_models": 2,
            "topk_cache": 4,
            "hidden_cache": 4,
            "cache_index": 3,
            "train": 3,
            "eval": 5,
            "parse_results": 1,
        }
    finally:  # the file as it was, time stamp included: the study stays complete for the tests after this one
        doc.write_text(text)
        os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned_jobs(snakemake(workdir, "-n").stdout) == {}


def test_killed_training_resumes_from_its_checkpoint_on_rerun(study):
    """SIGKILL the whole snakemake process group while a run trains; the checkpoints live outside the declared
    output, so the rerun resumes from the last one and ends with every step logged once."""
    import signal
    import time

    workdir, _, _, _ = study
    run = "tiny-student.rb.s0.long"
    ckpts = workdir / "results/checkpoints" / run / "checkpoints"
    cmd = snakemake_cmd(workdir, "--force", f"results/train/{run}")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step_*")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert list(ckpts.glob("step_*")), "no checkpoint appeared before the kill"
    assert not (workdir / "results/train" / run).exists(), "the run finished before it could be killed"
    snakemake(workdir, "--unlock")
    snakemake(workdir)
    log = (workdir / f"results/logs/train/{run}.log").read_text()
    assert "resumed from" in log
    rows = (workdir / "results/train" / run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 401))
    assert planned_jobs(snakemake(workdir, "-n").stdout) == {}
