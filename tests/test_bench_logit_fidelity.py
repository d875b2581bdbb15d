"""bench/logit_fidelity.py: --quick (tiny random models in-process) and the refusal when the study is missing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NAMES = [
    "top16_renorm",
    "top16_rest",
    "top64_rest",
    "samples12",
    "samples50",
    "head4_samples12",
    "top16_rest_compact",
    "top16_rest_compact_floor1e-3",
    "top16_rest_compact_floor1e-2",
    "samples12_compact",
    "samples16_compact",
    "head4_samples12_compact",
    "samples12_systematic",
    "samples8_systematic",
    "samples12_systematic_compact",
    "head4_samples12_systematic",
]
SETTING_KEYS = {
    "name",
    "k",
    "samples",
    "logit_encoding",
    "bytes_per_token",
    "encoding_kl_max",
    "angle_logits_deg",
    "angle_params_deg",
}
TOP_KEYS = {"settings", "best", "best_rule", "documents", "positions", "draw_seeds", "teacher", "student"}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "bench/logit_fidelity.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quick_mode_prints_every_setting_as_json_on_its_last_line():
    proc = run_bench("--quick", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert TOP_KEYS <= set(result), sorted(TOP_KEYS - set(result))
    assert result["quick"] is True and "not meaningful" in result["note"]
    assert result["positions"] > 0 and result["documents"] > 0 and result["draw_seeds"] == 8
    settings = {s["name"]: s for s in result["settings"]}
    assert [s["name"] for s in result["settings"]] == NAMES
    for name, s in settings.items():
        want = (
            SETTING_KEYS
            | ({"angle_params_mean_deg", "sampling"} if s["samples"] else set())
            | ({"logit_floor"} if "floor" in name else set())
        )
        assert set(s) == want, (name, sorted(set(s) ^ want))
        angles = [s["angle_logits_deg"], s["angle_params_deg"], s.get("angle_params_mean_deg", 0.0)]
        assert all(math.isfinite(a) and 0 <= a <= 180 for a in angles), (name, angles)
        assert s["bytes_per_token"] > 0, (name, s["bytes_per_token"])
        assert 0 <= s["encoding_kl_max"] < 1e-2, (name, s["encoding_kl_max"])
    assert settings["top16_rest"]["angle_logits_deg"] < settings["top16_renorm"]["angle_logits_deg"]
    assert [(settings[n]["k"], settings[n]["samples"]) for n in NAMES] == [
        (16, 0),
        (16, 0),
        (64, 0),
        (0, 12),
        (0, 50),
        (4, 12),
        (16, 0),
        (16, 0),
        (16, 0),
        (0, 12),
        (0, 16),
        (4, 12),
        (0, 12),
        (0, 8),
        (0, 12),
        (4, 12),
    ]
    assert [settings[n]["sampling"] for n in NAMES if "samples" in n] == ["multinomial"] * 6 + ["systematic"] * 4
    assert all(settings[n]["encoding_kl_max"] < 1e-3 for n in NAMES if n.endswith(("compact", "floor")))
    assert result["best"] in NAMES and isinstance(result["best_rule"], str)


def test_default_mode_without_the_study_exits_2_naming_the_missing_path(tmp_path):
    proc = run_bench("--study", str(tmp_path))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert str(tmp_path / "config/config.yaml") in proc.stderr
    assert "snakemake --cores all" in proc.stderr
