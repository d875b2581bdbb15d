"""bench/dryrun.py: the planning time of a config beside Snakemake's bare floor, as JSON on the last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "bench/dryrun.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_one_round_on_the_default_config_reports_every_key():
    proc = run_bench(
        "--config", "config/config.yaml", "--rounds", "1", "--floor-jobs", "3", "--at-shards", "8", "--directive-costs"
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["config"] == "config/config.yaml"
    # the default study's DAG: corpus; shard, topk_cache and hidden_cache for 4 shards + held-out; rb's own
    # logit_cache for the 4 training shards; 2 models; 4 cache indexes; 5 runs; 7 evaluations; parse_results; all
    assert result["jobs"] == 1 + 3 * 5 + 4 + 2 + 4 + 5 + 7 + 1 + 1
    for key in (
        "dryrun_s",
        "floor_s",
        "slurm_import_s",
        "overhead_ratio",
        "dryrun_2048_s",
        "floor_2048_s",
        "floor_script_2048_s",
        "floor_shaped_2048_s",
        "floor_profile_2048_s",
    ):
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert result["at_shards"] == 8 and result["jobs_2048"] == result["jobs"] + 4 * (8 - 4)  # 4 jobs per shard
    assert result["overhead_ratio_2048"] == pytest.approx(result["dryrun_2048_s"] / result["floor_2048_s"], abs=0.01)
    # kdflow's rule shapes without kdflow: shard, topk_cache and hidden_cache per shard, and `all`
    assert result["jobs_shaped_2048"] == 3 * 8 + 1
    assert result["overhead_over_shaped_2048"] == pytest.approx(
        result["dryrun_2048_s"] / result["floor_shaped_2048_s"], abs=0.01
    )
    assert result["overhead_over_profile_floor_2048"] == pytest.approx(
        result["dryrun_2048_s"] / result["floor_profile_2048_s"], abs=0.01
    )
    assert result["profile_floor_ratio_2048"] == pytest.approx(
        result["floor_profile_2048_s"] / result["floor_2048_s"], abs=0.01
    )
    # the shapes with each directive taken out, and with all of them: each a Snakefile that dry-runs
    names = ["script", "log_benchmark", "conda", "params", "teacher_input", "all"]
    assert list(result["shaped_without_2048_s"]) == list(result["shaped_without_ratio_2048"]) == names
    for name in names:
        assert result["shaped_without_2048_s"][name] > 0, name
        assert result["shaped_without_ratio_2048"][name] == pytest.approx(
            result["shaped_without_2048_s"][name] / result["floor_2048_s"], abs=0.01
        )
    assert len(result["dryrun_rounds"]) == len(result["floor_rounds"]) == 1
    assert list(result["floor_by_jobs"]) == ["3"] and result["floor_by_jobs"]["3"] > 0
    assert "round 0: dry run" in proc.stderr and "bare Snakefile of 3 jobs" in proc.stderr


def test_a_bad_job_count_is_refused_with_the_option_named():
    for bad in ("12,x", "1"):
        proc = run_bench("--floor-jobs", bad)
        assert proc.returncode == 2, proc.stderr
        assert "--floor-jobs" in proc.stderr and repr(bad) in proc.stderr


def test_directive_costs_need_a_shard_count():
    proc = run_bench("--directive-costs", "--at-shards", "0")
    assert proc.returncode == 2 and "--directive-costs" in proc.stderr and "--at-shards" in proc.stderr


def test_each_shape_variant_takes_out_only_its_directive():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import dryrun
    finally:
        sys.path.remove(str(REPO / "bench"))
    shaped = dryrun.SHAPED
    assert shaped.count("script:") == 3 and shaped.count("log:") == 3 and shaped.count("benchmark:") == 2
    without_script = dryrun.shaped_without(["script"])
    assert "script:" not in without_script and without_script.count('shell: "touch {{output}}"') == 3
    without_logs = dryrun.shaped_without(["log_benchmark"])
    assert "log:" not in without_logs and "benchmark:" not in without_logs and without_logs.count("script:") == 3
    assert "conda:" not in dryrun.shaped_without(["conda"]) and "params:" not in dryrun.shaped_without(["params"])
    assert "manifest.json" not in dryrun.shaped_without(["teacher_input"])
    bare = dryrun.shaped_without(list(dryrun.WITHOUT))
    for directive in ("script:", "log:", "benchmark:", "conda:", "params:", "manifest.json"):
        assert directive not in bare, directive
    assert bare.count("rule ") == 4 and bare.count("output:") == 3  # the same rules and outputs
