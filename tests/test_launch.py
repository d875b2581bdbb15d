"""Launch lines for the GPUs and nodes SLURM grants (kdflow.launch); the processes themselves are tested in
test_train (two gloo ranks under torchrun) and test_slurm (two GPUs granted by a real SLURM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdflow.launch import (
    LaunchError,
    expand_hostlist,
    launch_command,
    multi_node_command,
    node_command,
    single_node_command,
)


@pytest.mark.parametrize(
    "hostlist,hosts",
    [
        ("gpu07", ["gpu07"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("gpu[08-10,12],login1", ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]),
        ("a[1-2],b[7]", ["a1", "a2", "b7"]),
    ],
)
def test_hostlists_expand_in_order(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_one_node_is_torchrun_standalone_with_one_process_per_gpu():
    cmd = launch_command("work/job.json", 4)
    assert cmd == single_node_command("work/job.json", 4)
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "kdflow.train",
        "work/job.json",
    ]


def test_several_nodes_start_one_srun_task_per_node():
    cmd = launch_command("job.json", 8, nodes=2)
    assert cmd == multi_node_command("job.json", 8, 2)
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[-4:] == ["-m", "kdflow.launch", "job.json", "8"]


def test_each_node_becomes_a_torchrun_that_meets_at_the_first_node():
    env = {"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "h100-[04-06]", "SLURM_JOB_ID": "4242"}
    cmd = node_command("job.json", 8, env)
    assert cmd[3:] == [
        "--nnodes=3",
        "--node_rank=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=h100-04:29500",
        "--rdzv_id=4242",
        "-m",
        "kdflow.train",
        "job.json",
    ]
    assert node_command("job.json", 8, {**env, "KDFLOW_RDZV_PORT": "31000"})[7] == "--rdzv_endpoint=h100-04:31000"


def test_outside_srun_the_node_launcher_says_what_is_missing():
    with pytest.raises(LaunchError, match="SLURM_NNODES, SLURM_NODEID"):
        node_command("job.json", 8, {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a1"})
    proc = subprocess.run([sys.executable, "-m", "kdflow.launch", "job.json"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _job(tmp_path):
    from kdflow.train import TrainJob

    return TrainJob(
        spec={"name": "r"},
        student_manifest="m.json",
        shards=[{"topk": "t.parquet"}],
        expected={},
        output=str(tmp_path / "out"),
        work=str(tmp_path / "work"),
    )


@pytest.mark.parametrize("gpus,nodes", [(4, 1), (8, 2)])
def test_several_gpus_or_nodes_write_the_job_file_and_run_the_launch_line(tmp_path, monkeypatch, gpus, nodes):
    import json
    import os

    import kdflow.launch as launch
    from kdflow.train import TrainJob

    job, ran = _job(tmp_path), []

    def fake_run(cmd, env):  # what torchrun's rank 0 leaves: the run directory with its summary
        ran.append((cmd, env))
        Path(job.output).mkdir(parents=True)
        (Path(job.output) / "summary.json").write_text(json.dumps({"tokens": 7, "world_size": gpus * nodes}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    summary = launch.launch_training(job, gpus_per_node=gpus, nodes=nodes)
    job_file = Path(job.work) / "job.json"
    assert summary == {"tokens": 7, "world_size": gpus * nodes} and TrainJob.load(job_file) == job
    ((cmd, env),) = ran
    assert cmd == launch_command(job_file, gpus, nodes)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == launch.SRC == str(Path(launch.__file__).parents[1])


def test_a_failed_launch_ends_with_kdflows_message(tmp_path, monkeypatch):
    import kdflow.launch as launch

    job = _job(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch.subprocess, "run", lambda cmd, env: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(LaunchError) as err:
        launch.launch_training(job, gpus_per_node=2)
    message = str(err.value)
    assert f"run {job.spec['name']!r}:" in message and "exited with status 1" in message
    assert "each failed rank logged why above" in message and job.work in message


@pytest.mark.parametrize("gpus,world", [(0, None), (1, None), (4, "4")])
def test_one_gpu_or_a_launched_rank_trains_in_this_process(tmp_path, monkeypatch, capsys, gpus, world):
    import json

    import kdflow.launch as launch
    import kdflow.train

    job = _job(tmp_path)
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: pytest.fail("launched a subprocess"))
    monkeypatch.setattr(kdflow.train, "run_training", lambda j: {"tokens": 3, "run": j.spec["name"]})
    assert launch.launch_training(job, gpus_per_node=gpus) == {"tokens": 3, "run": "r"}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"run": "r", "tokens": 3}
    assert not (Path(job.work) / "job.json").exists()


def test_the_training_entry_point_wants_one_job_file():
    proc = subprocess.run([sys.executable, "-m", "kdflow.train"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: python -m kdflow.train JOB.json" in proc.stderr


def test_a_multi_node_run_asks_slurm_for_nodes_tasks_and_every_gpu(tmp_path):
    """Dry run of the default config plus a 2-node run with the users' profile: what the job would ask for."""
    import os

    import yaml

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "config/config.yaml").read_text())
    config["training"]["experiments"] = [
        {"modes": ["ce"], "tag": "wide", "set": {"gpus": 4, "nodes": 2}},
        {"modes": ["ce"], "tag": "one", "set": {"gpus": 4}},
    ]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(repo / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "config.yaml"),
            "--profile",
            str(repo / "profiles/slurm"),
            "-n",
            "--forceall",
            "results/train/smollm2-pruned15.ce.s0.wide",
            "results/train/smollm2-pruned15.ce.s0.one",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, KDFLOW_SLURM_GPU_MODEL="h100"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    blocks = {b.split("wildcards: run=")[1].split()[0]: b for b in proc.stdout.split("rule train:")[1:]}
    wide = blocks["smollm2-pruned15.ce.s0.wide"].split("resources:")[1].splitlines()[0]
    one = blocks["smollm2-pruned15.ce.s0.one"].split("resources:")[1].splitlines()[0]
    assert all(f in wide for f in ("gpu=8", "nodes=2", "tasks=2", "mpi=srun", "gpu_model=h100", "slurm_partition=h100"))
    assert "gpu=4" in one and "nodes=1" in one and "mpi" not in one and "tasks" not in one
