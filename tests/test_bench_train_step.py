"""bench/train_step.py --quick: tiny models and caches built in a temp dir, the real Trainer timed per mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RATIOS = ("kd_step_ratio_rb", "kd_step_ratio_fb", "kd_step_ratio_relb", "loader_ratio")
FIGURES = (
    "step_s_ce",
    "step_s_rb",
    "step_s_fb",
    "step_s_relb",
    "loader_docs_per_s",
    "train_docs_per_s",
    "batch_size",
    "steps",
    "rounds",
    "torch_threads",
    "goal_kd_step_ratio",
    "goal_loader_ratio",
)


def test_quick_mode_prints_the_figures_as_json_on_its_last_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "bench/train_step.py", "--quick", "--threads", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in RATIOS + FIGURES:
        value = result[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    assert result["goal_kd_step_ratio"] == 1.10 and result["goal_loader_ratio"] == 10
    assert result["quick"] is True and result["same_documents"] is True
    assert result["student"] == "tiny-student" and result["device"] == "cpu" and result["torch_threads"] == 1
    assert result["timed_steps_per_mode"] == result["steps"] * result["rounds"]
    assert {m: set(t) for m, t in result["terms"].items()} == {
        "ce": {"ce"},
        "rb": {"ce", "rb"},
        "fb": {"ce", "fb"},
        "relb": {"ce", "relb"},
    }
    assert "ratio to ce" in proc.stderr and "loader_ratio" in proc.stderr  # the table
    # rb read the logit cache of the config's own rb run (no head, 4 systematic draws), as the default study's does
    assert result["rb_logits"] == "topk_k0_s4_sys"


def test_the_default_study_inputs_are_the_plan_files_its_rb_run_included():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from train_step import study_inputs
    finally:
        sys.path.remove(str(REPO / "bench"))
    files = study_inputs(REPO / "config/config.yaml", REPO)
    root = "results/cache/smollm2-135m-instruct"
    caches = ("embed", "hidden_l20", "topk_k0_s12_sys", "topk_k16")  # the study's three, and rb's own
    shards = [f"shard_{i:05d}.parquet" for i in range(4)]
    assert files == ["resources/models/smollm2-pruned15/kdflow_model.json"] + [
        f"{root}/{c}/{s}" for c in caches for s in shards
    ]
