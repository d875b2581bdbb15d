"""The tiny study through a real SLURM cluster with the users' profile (profiles/slurm), preemption included.

Needs a running cluster with partitions ``cpu`` and ``h100`` (CI starts one with ``.ci/slurm/cluster.sh up``);
without one these tests are skipped, unless ``KDFLOW_REQUIRE_SLURM=1`` (set by CI), which makes a missing cluster
a failure. Only CI-only settings are layered over the profile on the command line (``SLURM_CI_ARGS``): the
status command (no accounting daemon here), fast polling, and one torch thread per job on these 2 cores.

One module-scoped run: while it trains, the long run's job is requeued (what a preemption does) once it has
written a checkpoint; the requeued job resumes from that checkpoint and ends with the same adapter, bit for bit,
as an identical run that nobody touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny_models import tiny_teacher_dir, write_code_docs  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# CI-only settings, never written into profiles/slurm: no slurmdbd here (squeue, not sacct, for status), a
# first status check after 1 s, and one torch thread per job (the profile asks for 16-32 per GPU job).
SLURM_CI_ARGS = [
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--slurm-no-account",
    "--set-threads",
    "prepare_models=1",
    "topk_cache=1",
    "hidden_cache=1",
    "train=2",
    "eval=1",
    "--latency-wait",
    "5",
]
LONG, REF, DDP = "tiny-student.rb.s0.long", "tiny-student.rb.s0.ref", "tiny-student.ce.s0.ddp"
STUDY_TIMEOUT = 900


def cluster_running() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return {"cpu*", "h100"} <= set(out.split()) or {"cpu", "h100"} <= {p.rstrip("*") for p in out.split()}


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if cluster_running():
        return
    if os.environ.get("KDFLOW_REQUIRE_SLURM") == "1":
        pytest.fail(
            "KDFLOW_REQUIRE_SLURM=1 but no SLURM cluster with partitions cpu and h100 answers "
            "(start one with: bash .ci/slurm/cluster.sh up /tmp/kdflow-slurm)"
        )
    pytest.skip("no SLURM cluster with partitions cpu and h100 (bash .ci/slurm/cluster.sh up DIR starts one)")


def study_config(workdir: Path, teacher_dir: Path) -> dict:
    docs = write_code_docs(workdir / "docs", 20)
    rb_long = {"steps": 40, "checkpoint_every": 5}
    return {
        "teacher": {"name": "tiny-teacher", "source": {"kind": "hf", "path": str(teacher_dir)}},
        "students": [{"name": "tiny-student", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 3]}}],
        "data": {
            "sources": [{"name": "code", "kind": "text_files", "paths": [str(docs / "*.py")]}],
            "n_shards": 1,
            "min_chars": 10,
            "max_chars": 60,
            "long_docs": "split",
            "heldout": {"fraction": 0.2, "max_docs": 4},
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
                # the run that is preempted, and its twin that is not
                {"modes": ["rb"], "tag": "long", "set": rb_long},
                {"modes": ["rb"], "tag": "ref", "set": rb_long},
                # two GPUs granted: torchrun starts two processes (gloo on this CPU)
                {"modes": ["ce"], "tag": "ddp", "set": {"gpus": 2}},
            ],
        },
        # the runs only, held-out metrics only (lm-eval is covered by test_workflow): fewer jobs on 2 cores
        "eval": {"baselines": [], "heldout": {"max_docs": 4}, "lm_eval": {"tasks": []}},
    }


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--profile",
        str(REPO / "profiles/slurm"),
        *SLURM_CI_ARGS,
        *args,
    ]


def squeue_jobs(name: str) -> list[dict]:
    """Every job of one Snakemake run (its jobs carry the run's uuid as name), finished ones included."""
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "--name", name, "-o", "%i|%T|%k"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    fields = ("id", "state", "comment")
    return [dict(zip(fields, line.split("|", 2), strict=False)) for line in out.splitlines() if line]


def job_details(job_id: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def rule_of(comment: str) -> str:
    """The rule of a job from the comment the SLURM plugin gives it (rule_<rule> or rule_<rule>_wildcards_<…>)."""
    return re.match(r"rule_(\w+?)(_wildcards_|$)", comment).group(1)


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_teacher_dir):  # noqa: F811
    workdir = tmp_path_factory.mktemp("slurm-study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(study_config(workdir, tiny_teacher_dir)))
    log = open(workdir / "snakemake.out", "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.Popen(
        snakemake_cmd(workdir), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    ckpts = workdir / "results/checkpoints" / LONG / "checkpoints"
    requeued = None
    deadline = time.time() + STUDY_TIMEOUT
    try:
        while proc.poll() is None and time.time() < deadline:
            if requeued is None and list(ckpts.glob("step_*")):
                uuid = run_uuid(workdir)
                job = next(j for j in squeue_jobs(uuid) if LONG in j["comment"] and j["state"] == "RUNNING")
                subprocess.run(["scontrol", "requeue", job["id"]], check=True, timeout=30)
                requeued = {"id": job["id"], "checkpoints": sorted(p.name for p in ckpts.glob("step_*"))}
                release_requeued(job["id"])
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
            pytest.fail(f"the SLURM study did not finish in {STUDY_TIMEOUT}s; see {workdir / 'snakemake.out'}")
    finally:
        log.close()
    output = (workdir / "snakemake.out").read_text()
    assert proc.returncode == 0, f"snakemake --profile profiles/slurm failed ({proc.returncode}):\n{output[-6000:]}"
    return {"workdir": workdir, "output": output, "uuid": run_uuid(workdir), "requeued": requeued}


def release_requeued(job_id: str, timeout: float = 120) -> None:
    """SLURM holds a requeued job back for two minutes (reason BeginTime); once it is pending again (its
    processes have stopped), let it start at once."""
    deadline, out, pending = time.time() + timeout, "", False
    while time.time() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        pending = pending or out.startswith("PENDING")
        if out == "PENDING|BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        elif pending and not out.startswith("PENDING"):  # running (or done) again
            return
        time.sleep(0.5)
    raise AssertionError(f"requeued SLURM job {job_id} did not start again within {timeout}s ({out})")


def run_uuid(workdir: Path) -> str:
    """The Snakemake run's uuid: the SLURM job name of every job it submitted (from the plugin's log line)."""
    text = (workdir / "snakemake.out").read_text()
    match = re.search(r"SLURM run ID: ([0-9a-f-]{36})", text) or re.search(r"--job-name[ =]'?([0-9a-f-]{36})", text)
    if match:
        return match.group(1)
    logs = sorted((workdir / ".snakemake/slurm_logs").rglob("*.log"))
    raise AssertionError(f"no SLURM run id in {workdir / 'snakemake.out'} ({len(logs)} slurm logs)")


def test_every_job_ran_on_slurm_and_the_study_is_complete(study):
    workdir = study["workdir"]
    jobs = squeue_jobs(study["uuid"])
    rules = {rule_of(j["comment"]) for j in jobs}
    assert {
        "corpus",
        "shard",
        "prepare_models",
        "topk_cache",
        "hidden_cache",
        "train",
        "eval",
        "parse_results",
    } <= rules, rules
    assert all(j["state"] == "COMPLETED" for j in jobs), [j for j in jobs if j["state"] != "COMPLETED"]
    for run in (LONG, REF, DDP):
        assert (workdir / "results/train" / run / "adapter_model.safetensors").is_file()
    assert (workdir / "results/kdflow.duckdb").is_file()
    rerun = subprocess.run(snakemake_cmd(workdir, "-n"), capture_output=True, text=True, timeout=120)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr


def test_gpu_rules_went_to_h100_with_the_gpus_they_asked_for(study):
    seen: dict[str, set] = {}
    for job in squeue_jobs(study["uuid"]):
        d = job_details(job["id"])
        rule = rule_of(job["comment"])
        seen.setdefault(rule, set()).add((d["Partition"], d.get("TresPerJob", "")))
        if rule == "train" and DDP in job["comment"]:
            assert (d["Partition"], d.get("TresPerJob")) == ("h100", "gres:gpu:h100:2")
    for rule in ("topk_cache", "hidden_cache", "eval", "prepare_models"):
        assert seen[rule] == {("h100", "gres:gpu:h100:1")}, (rule, seen[rule])
    assert {p for p, _ in seen["train"]} == {"h100"}
    for rule in ("corpus", "shard", "parse_results"):
        assert seen[rule] == {("cpu", "")}, (rule, seen[rule])


def test_two_gpus_start_two_training_processes(study):
    summary = json.loads((study["workdir"] / "results/train" / DDP / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


def test_a_requeued_training_job_resumes_and_matches_an_uninterrupted_run(study):
    workdir, requeued = study["workdir"], study["requeued"]
    assert requeued, "the long run never wrote a checkpoint while snakemake ran"
    details = job_details(requeued["id"])
    assert int(details["Restarts"]) >= 1, details  # the same SLURM job ran again
    long_summary = json.loads((workdir / "results/train" / LONG / "summary.json").read_text())
    ref_summary = json.loads((workdir / "results/train" / REF / "summary.json").read_text())
    first = int(requeued["checkpoints"][0].split("_")[1])
    assert long_summary["resumed_from_steps"] and long_summary["resumed_from_steps"][0] >= first > 0
    assert ref_summary["resumed_from_steps"] == []
    rows = (workdir / "results/train" / LONG / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 41))
    a, b = adapter_tensors(workdir / "results/train" / LONG), adapter_tensors(workdir / "results/train" / REF)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    ev = {r: json.loads((workdir / f"results/eval/{r}/heldout.json").read_text()) for r in (LONG, REF)}
    values = {r: {m["metric"]: m["value"] for m in ev[r]["metrics"]} for r in ev}
    assert values[LONG] == values[REF]
