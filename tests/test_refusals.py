"""What a user sees when a study is wrong: the dry run refuses what local files can show, naming key and place;
lists what it must leave to the jobs; and a job that fails on one of kdflow's own errors ends with its message,
not a traceback."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdflow.errors import KdflowError
from kdflow.logs import run_logged

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config/config.yaml").read_text())


def dry_run(workdir: Path, config: dict | None, *args: str, snakefile: Path = REPO / "Snakefile", **env):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), "--cores", "1", *args]
    if config is not None:  # last: --configfile takes every argument after it
        (workdir / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        cmd += ["--configfile", str(workdir / "study.yaml")]
    environ = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    return subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=300)


def test_the_dry_run_refuses_layers_beyond_the_models_naming_each_key(tmp_path):
    config = copy.deepcopy(DEFAULT)
    config["teacher_cache"]["hidden_layers"] = [20, 31]
    config["training"]["defaults"]["fb"]["layer_map"] = [{"student": 16, "teacher": 20}]
    proc = dry_run(tmp_path, config, "-n")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    study = tmp_path / "study.yaml"
    assert f"{study}:" in out and "teacher_cache.hidden_layers[1]: 31 is not a hidden state of the teacher" in out
    assert "training.defaults.fb.layer_map[0].student: 16 is not a hidden state of student" in out
    assert not (tmp_path / "results").exists()


def test_the_dry_run_lists_the_checks_it_defers(tmp_path):
    config = copy.deepcopy(DEFAULT)
    config["students"].append({"name": "hub-student", "source": {"kind": "hf", "path": "org/not-cached"}})
    proc = dry_run(tmp_path, config, "-n", HF_HUB_CACHE=str(tmp_path / "empty-hub"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "kdflow: checks deferred to the jobs (not knowable from local files):" in out
    assert "students[1].source (hub-student): hub model 'org/not-cached' (revision main) is not in the local" in out
    assert out.count("checks deferred to the jobs") == 1


def test_a_job_failing_on_kdflows_error_ends_with_the_message_alone(tmp_path):
    """A hub dataset cannot be checked at plan time (deferred); offline and not cached, the corpus job fails."""
    config = copy.deepcopy(DEFAULT)
    config["data"]["sources"] = [{"name": "chat", "kind": "hf", "dataset": "org/no-such-chats"}]
    proc = dry_run(tmp_path, config, "results/data/manifest.json", HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode != 0
    log = (tmp_path / "results/logs/corpus.log").read_text()
    message = "source 'chat': dataset 'org/no-such-chats', split 'train' is not in the local cache and offline mode"
    assert message in log and message in proc.stderr
    assert "Traceback" not in log and "Traceback" not in proc.stderr
    assert log.count("job failed") == 1 and "set KDFLOW_TRACEBACK=1 for the traceback" in log


def test_a_default_config_that_does_not_parse_is_reported_with_line_and_column(tmp_path):
    for part in ("Snakefile", "rules", "workflow", "resources"):
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / part)
    (tmp_path / "src").symlink_to(REPO / "src")
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config/schema.yaml", tmp_path / "config/schema.yaml")
    text = (REPO / "config/config.yaml").read_text().replace("  k: 16\n", "  k: [16\n")
    (tmp_path / "config/config.yaml").write_text(text)
    proc = dry_run(tmp_path, None, "-n", snakefile=tmp_path / "Snakefile")
    assert proc.returncode != 0
    line = text.splitlines().index("  k: [16") + 2  # the parser notices at the next line
    out = proc.stdout + proc.stderr
    assert f"config/config.yaml:{line}:" in out and "not valid YAML" in out, out[-2000:]


# --------------------------------------------------------------------------- run_logged


class _Refused(KdflowError, ValueError):
    pass


def _run(tmp_path, error: Exception):
    def job():
        raise error

    with pytest.raises(SystemExit) as ended:
        run_logged(tmp_path / "job.log", job)
    logging.getLogger().handlers.clear()
    return ended.value.code, (tmp_path / "job.log").read_text()


def test_kdflows_error_is_logged_as_its_message_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.delenv("KDFLOW_TRACEBACK", raising=False)
    code, log = _run(tmp_path, _Refused("data.sources[0]: no such file; fix the path"))
    assert code == 1
    assert "ERROR kdflow: job failed: data.sources[0]: no such file; fix the path" in log
    assert "Traceback" not in log


def test_kdflow_traceback_asks_for_the_traceback_too(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFLOW_TRACEBACK", "1")
    code, log = _run(tmp_path, _Refused("data.sources[0]: no such file"))
    assert code == 1 and "Traceback" in log and "_Refused: data.sources[0]: no such file" in log


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("KDFLOW_TRACEBACK", raising=False)
    code, log = _run(tmp_path, ZeroDivisionError("division by zero"))
    assert code == 1 and "job failed: ZeroDivisionError: division by zero" in log and "Traceback" in log
