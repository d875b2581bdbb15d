"""The logit cache's knobs and the online reference in the real workflow (snakemake on a tiny config): a run of
its own logit cache (an exact head of 2 ids and a sampled tail of 6 draws), a run of 6 systematic draws alone and a
run with the teacher online train, are evaluated and land in the results; the extra caches are made by rule
logit_cache for the training shards only; a second run does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from kdflow.cache_format import read_meta
from test_workflow import planned_jobs, snakemake, tiny_config
from tiny_models import tiny_teacher_dir  # noqa: F401 (fixture)

TAIL, ONLINE, SYS = "tiny-student.rb.s0.tail", "tiny-student.rb.s0.full", "tiny-student.rb.s0.sys"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_teacher_dir):  # noqa: F811
    workdir = tmp_path_factory.mktemp("logit_study")
    config = tiny_config(workdir, tiny_teacher_dir)
    config["training"]["experiments"] = [
        {"modes": ["rb"], "tag": "tail", "set": {"teacher_logits": {"k": 2, "samples": 6}}},
        {"modes": ["rb"], "tag": "full", "set": {"teacher_logits": {"source": "online"}}},
        {"modes": ["rb"], "tag": "sys", "set": {"teacher_logits": {"k": 0, "samples": 6, "sampling": "systematic"}}},
    ]
    config["eval"]["baselines"] = []
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(workdir, "-n")
    snakemake(workdir)
    return workdir, dry


def test_the_extra_logit_cache_is_planned_for_the_training_shards(study):
    workdir, dry = study
    jobs = planned_jobs(dry.stdout)
    assert jobs["logit_cache"] == 6 and jobs["topk_cache"] == 4 and jobs["train"] == 3
    cache = workdir / "results/cache/tiny-teacher"
    assert sorted(p.name for p in (cache / "topk_k2_s6").iterdir()) == [
        "index.json",
        "shard_00000.parquet",
        "shard_00001.parquet",
        "shard_00002.parquet",
    ]
    meta = read_meta(cache / "topk_k2_s6/shard_00001.parquet")
    assert (meta.k, meta.samples, meta.sample_seed) == (2, 6, 0)
    main = pq.read_table(cache / "topk_k4/shard_00001.parquet", columns=["doc_index", "input_ids"])
    assert pq.read_table(cache / "topk_k2_s6/shard_00001.parquet", columns=["doc_index", "input_ids"]).equals(main)
    meta = read_meta(cache / "topk_k0_s6_sys/shard_00001.parquet")  # systematic draws: a cache of their own
    assert (meta.k, meta.samples, meta.sampling) == (0, 6, "systematic") and meta.sampling != read_meta(
        cache / "topk_k2_s6/shard_00001.parquet"
    ).sampling


def test_both_runs_train_with_their_teacher_and_are_evaluated(study):
    workdir, _ = study
    for run in (TAIL, ONLINE, SYS):
        summary = json.loads((workdir / "results/train" / run / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["terms"] == {"ce": 0.5, "rb": 0.5}
        rows = [json.loads(r) for r in (workdir / "results/train" / run / "metrics.jsonl").read_text().splitlines()]
        assert all(r["rb"] > 0 for r in rows), rows
        assert (workdir / f"results/eval/{run}/heldout.json").is_file()
    spec = json.loads((workdir / "results/train" / ONLINE / "run_config.json").read_text())["spec"]
    assert spec["teacher_logits"] == {"source": "online", "k": None, "samples": None, "sampling": None}
    summary_md = (workdir / "results/summary.md").read_text()
    assert "tiny-student.rb.tail" in summary_md and "tiny-student.rb.full" in summary_md


def test_second_run_does_nothing_and_one_logit_file_is_one_job(study):
    workdir, _ = study
    assert planned_jobs(snakemake(workdir, "-n").stdout) == {}
    target = "results/cache/tiny-teacher/topk_k2_s6/shard_00002.parquet"
    assert planned_jobs(snakemake(workdir, "-n", "--force", target).stdout) == {"logit_cache": 1}


def test_the_study_bench_compares_each_setting_with_full_kd(study):
    import subprocess
    import sys

    workdir, _ = study
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "bench/study_logits.py",
            "--configfile",
            str(workdir / "config.yaml"),
            "--study",
            str(workdir),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["name"]: r for r in result["settings"]}
    assert set(rows) == {"tail", "full", "sys"} and sorted(result["ranking"]) == ["full", "sys", "tail"]
    assert (rows["sys"]["k"], rows["sys"]["samples"], rows["sys"]["sampling"]) == (0, 6, "systematic")
    assert (rows["tail"]["k"], rows["tail"]["samples"], rows["tail"]["source"]) == (2, 6, "cache")
    assert rows["tail"]["bytes_per_token"] > 0 and rows["full"]["bytes_per_token"] is None
    assert rows["tail"]["wins_vs_full"] in ("0 of 1", "1 of 1") and "d_nll_vs_full" not in rows["full"]
    # the same directory twice stands for two draws of every sampled cache: pooled by (study, seed)
    proc = subprocess.run(
        [sys.executable, "bench/study_logits.py", "--configfile", str(workdir / "config.yaml"), "--study"]
        + [str(workdir)] * 2,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pooled = {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["settings"]}
    d = rows["sys"]["d_nll_vs_full"]
    assert pooled["sys"]["studies"] == 2 and pooled["sys"]["d_nll_vs_full_by_study"] == [d, d]
    assert pooled["sys"]["wins_vs_full"] in ("0 of 2", "2 of 2") and pooled["sys"]["d_nll_vs_full_se"] == 0
    assert pooled["full"]["studies"] == 1 and "d_nll_vs_full_by_study" not in pooled["full"]
