"""bench/gpu_check.py on a machine without a GPU: it says so, prints its JSON object with every key, exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KEYS = ("gpu", "capture_ratio_cuda", "mfu_8b", "mfu_8b_tp", "kd_step_ratio_cuda", "nvml_samples", "default_study_s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run bench/gpu_check.py itself")
def test_without_a_gpu_it_says_so_and_exits_non_zero():
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA GPU visible" in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(key in result for key in KEYS) and result["gpu"] is None and result["error"]
