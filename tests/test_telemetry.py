"""kdflow.telemetry: the per-job JSON-lines file of the GPU rules, with and without NVML, and what parse_results
makes of it (energy per token, peak memory per stage).

There is no GPU here: the NVML path runs on a small fake ``pynvml`` module; the no-NVML path is the real one.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdflow.results import ResultsError, build_results
from kdflow.telemetry import EnergyMeter, Telemetry, job_telemetry, load_telemetry, visible_gpu_indices

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


class FakeNVML:
    """The pynvml calls Telemetry makes, for ``count`` GPUs; a GPU in ``no_counter`` lacks the energy counter.

    Each reading advances that GPU's state, so successive samples differ: power 100 W + 10 W per reading, the
    energy counter +50 J per reading, memory 1000 MB + 100 MB per reading.
    """

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 4, no_counter: tuple[int, ...] = (), fail_util_after: int | None = None):
        self.count, self.no_counter, self.fail_util_after = count, no_counter, fail_util_after
        self.reads = {i: 0 for i in range(count)}
        self.util_reads = 0
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return f"Fake H100 #{h}".encode()

    def nvmlDeviceGetPowerUsage(self, h):
        self.reads[h] += 1
        return 100_000 + 10_000 * self.reads[h]  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h in self.no_counter:
            raise self.NVMLError("Not Supported")
        return 7_000_000 + 50_000 * self.reads[h]  # mJ, since the driver loaded

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 * 1024 * MB, used=(1000 + 100 * self.reads[h]) * MB, free=0)

    def nvmlDeviceGetUtilizationRates(self, h):
        self.util_reads += 1
        if self.fail_util_after is not None and self.util_reads > self.fail_util_after:
            raise RuntimeError("the GPU fell off the bus")
        return SimpleNamespace(gpu=90, memory=40)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(1000))


def real_nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- the file


def test_without_nvml_records_why_once_and_samples_cpu_and_memory(tmp_path):
    if real_nvml_available():
        pytest.skip("NVML works on this machine (the fake-NVML tests cover that path)")
    path = tmp_path / "telemetry" / "topk_cache" / "shard_00000.jsonl"
    with Telemetry(path, rule="topk_cache", job="shard_00000", interval_s=0.05) as tel:
        burn(0.2)
        tel.tokens = 1234
    recs = lines(path)
    start, samples, end = recs[0], recs[1:-1], recs[-1]
    assert start["kind"] == "start" and (start["rule"], start["job"]) == ("topk_cache", "shard_00000")
    assert start["nvml"] is False and start["gpus"] == [] and start["interval_s"] == 0.05
    assert start["nvml_error"]  # the reason, e.g. "NVMLError_LibraryNotFound: NVML Shared Library Not Found"
    assert sum(r.get("nvml_error") is not None for r in recs) == 1  # recorded once
    assert len(samples) >= 3 and all(s["kind"] == "sample" and s["gpus"] == [] for s in samples)
    assert samples[0]["cpu_percent"] is None and all(s["cpu_percent"] >= 0 for s in samples[1:])
    assert max(s["cpu_percent"] for s in samples[1:]) > 10  # burn() keeps a core busy
    assert all(s["rss_mb"] > 1 for s in samples)
    assert [s["elapsed_s"] for s in samples] == sorted(s["elapsed_s"] for s in samples)
    assert end == {
        "kind": "end",
        "t": end["t"],
        "elapsed_s": end["elapsed_s"],
        "tokens": 1234,
        "load_s": None,  # not set by this job
        "compute_s": None,
        "energy_j": None,
        "ok": True,
    }
    assert end["elapsed_s"] >= 0.2


def test_nvml_failing_to_initialise_is_no_error(tmp_path):
    fake = FakeNVML()

    def refuse():
        raise FakeNVML.NVMLError("Driver Not Loaded")

    fake.nvmlInit = refuse
    path = tmp_path / "t.jsonl"
    with Telemetry(path, "eval", "teach", interval_s=10, nvml=fake):
        pass
    start = lines(path)[0]
    assert start["nvml"] is False and start["nvml_error"] == "NVMLError: Driver Not Loaded"
    assert [r["kind"] for r in lines(path)] == ["start", "sample", "sample", "end"]  # short job: two samples


def test_nvml_samples_the_visible_gpus_and_sums_their_energy(tmp_path):
    fake = FakeNVML(count=4, no_counter=(3,))
    path = tmp_path / "train.jsonl"
    with Telemetry(
        path, "train", "stu.rb.s0", interval_s=0.05, nvml=fake, environ={"CUDA_VISIBLE_DEVICES": "1,3"}
    ) as tel:
        burn(0.2)
        tel.tokens = 1000
    recs = lines(path)
    start, samples, end = recs[0], recs[1:-1], recs[-1]
    assert start["nvml"] is True and start["nvml_error"] is None and start["cuda_visible_devices"] == "1,3"
    assert start["gpus"] == [
        {"index": 1, "name": "Fake H100 #1", "memory_total_mb": 81920.0},
        {"index": 3, "name": "Fake H100 #3", "memory_total_mb": 81920.0},
    ]
    assert fake.reads[0] == fake.reads[2] == 0  # the hidden GPUs are never read
    assert len(samples) >= 3
    for n, s in enumerate(samples, 1):
        g1, g3 = s["gpus"]
        assert (g1["index"], g3["index"]) == (1, 3)
        assert g1 == {
            "index": 1,
            "power_w": 100.0 + 10 * n,
            "energy_j": 7000.0 + 50 * n,
            "mem_used_mb": 1000.0 + 100 * n,
            "util_gpu": 90.0,
        }
        assert g3["energy_j"] is None and g3["power_w"] == 100.0 + 10 * n  # no counter: null, not a failure
    # GPU 1: counter difference; GPU 3: trapezoid of its power over the samples
    counter = samples[-1]["gpus"][0]["energy_j"] - samples[0]["gpus"][0]["energy_j"]
    assert counter == 50.0 * (len(samples) - 1)
    integral = sum(
        (b["elapsed_s"] - a["elapsed_s"]) * (a["gpus"][1]["power_w"] + b["gpus"][1]["power_w"]) / 2
        for a, b in zip(samples, samples[1:], strict=False)
    )
    assert end["energy_j"] == pytest.approx(counter + integral, rel=1e-12)
    assert end["tokens"] == 1000 and end["ok"] is True
    assert fake.inits == fake.shutdowns == 1


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("2,0", [2, 0]),
        (" 1 , 3 ", [1, 3]),
        ("0,7,1", [0]),
        ("-1", []),
        ("1,1", [1]),
        ("GPU-8f3c1a2b-0000", [0, 1, 2, 3]),
        ("MIG-1234", [0, 1, 2, 3]),
    ],
)
def test_cuda_visible_devices(value, expected):
    assert visible_gpu_indices(value, 4) == expected


def test_energy_meter_falls_back_to_power_when_the_counter_goes_backwards():
    meter = EnergyMeter()
    meter.add(0.0, [{"index": 0, "power_w": 100.0, "energy_j": 500.0}])
    meter.add(2.0, [{"index": 0, "power_w": 200.0, "energy_j": 10.0}])  # the driver reloaded
    assert meter.total_j() == pytest.approx(300.0)
    assert EnergyMeter().total_j() is None
    one = EnergyMeter()
    one.add(0.0, [{"index": 0, "power_w": 100.0, "energy_j": None}])
    assert one.total_j() is None  # one power reading measures no energy


def test_a_sampling_error_is_logged_once_and_the_job_goes_on(tmp_path, caplog):
    fake = FakeNVML(count=1, fail_util_after=2)
    path = tmp_path / "t.jsonl"
    with caplog.at_level(logging.WARNING, logger="kdflow.telemetry"):
        with Telemetry(path, "topk_cache", "shard_00001", interval_s=0.02, nvml=fake) as tel:
            burn(0.15)
            tel.tokens = 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sampling stopped" in warnings[0].getMessage()
    recs = lines(path)
    assert [r["kind"] for r in recs] == ["start", "sample", "sample", "end"]  # nothing sampled after the error
    assert recs[-1]["tokens"] == 5 and recs[-1]["energy_j"] == 50.0


def test_the_work_failing_is_recorded_and_raised(tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(ZeroDivisionError):
        with Telemetry(path, "eval", "stu.init", interval_s=10):
            raise ZeroDivisionError
    assert lines(path)[-1]["kind"] == "end" and lines(path)[-1]["ok"] is False


def test_disabled_or_unwritable_writes_nothing_and_never_fails(tmp_path, caplog):
    with Telemetry(tmp_path / "off.jsonl", "eval", "x", enabled=False) as tel:
        tel.tokens = 3
    assert not (tmp_path / "off.jsonl").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="kdflow.telemetry"):
        with Telemetry(blocker / "t.jsonl", "eval", "x", interval_s=0.05):
            pass
    assert "runs without telemetry" in caplog.text
    with pytest.raises(ValueError, match="interval_s"):
        Telemetry(tmp_path / "t.jsonl", "eval", "x", interval_s=0)


def test_job_telemetry_reads_config_rule_and_wildcards():
    smk = SimpleNamespace(
        config={"telemetry": {"enabled": True, "interval_s": 0.25}}, rule="hidden_cache", wildcards=["heldout"]
    )
    tel = job_telemetry(smk)
    assert (tel.rule, tel.job, tel.interval_s, tel.enabled) == ("hidden_cache", "heldout", 0.25, True)
    # derived, not a rule param: adding telemetry to a rule must not rerun its finished jobs
    assert tel.path == Path("results/telemetry/hidden_cache/heldout.jsonl")
    assert job_telemetry(smk, enabled=False).enabled is False
    smk.config = {"telemetry": {"enabled": False, "interval_s": 5}}
    assert job_telemetry(smk).enabled is False
    smk.config = {}
    assert job_telemetry(smk).interval_s == 5.0 and job_telemetry(smk).enabled


# --------------------------------------------------------------------------- a killed job

KILLED_JOB = """
import sys, time
sys.path.insert(0, {src!r})
from kdflow.telemetry import Telemetry
with Telemetry({path!r}, "train", "stu.ce.s0", interval_s=0.02):
    while True:
        time.sleep(0.01)
"""


def test_a_killed_job_leaves_valid_lines_that_parse_results_reads(tmp_path):
    path = tmp_path / "telemetry" / "train" / "stu.ce.s0.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_JOB.format(src=str(REPO / "src"), path=str(path))])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().count('"kind": "sample"') >= 4:
                break
            time.sleep(0.02)
        else:
            pytest.fail("no samples written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    text = path.read_text()
    assert text.endswith("\n")
    recs = [json.loads(x) for x in text.splitlines()]  # every line is valid JSON
    assert recs[0]["kind"] == "start" and "end" not in {r["kind"] for r in recs}
    problems: list[str] = []
    rows, job = load_telemetry(path, problems)
    assert problems == []
    assert job["complete"] is False and job["samples"] == len(recs) - 1 == len(rows)
    assert job["elapsed_s"] == recs[-1]["elapsed_s"] and job["tokens"] is None and job["energy_j"] is None
    assert job["peak_rss_mb"] == max(r["rss_mb"] for r in recs[1:])


# --------------------------------------------------------------------------- into the results


def test_parse_results_gives_energy_per_token_and_peak_memory_per_stage(tmp_path):
    import duckdb

    root = tmp_path / "telemetry"
    fakes = {}
    for rule, job, tokens in (
        ("topk_cache", "shard_00000", 4000),
        ("topk_cache", "shard_00001", 6000),
        ("train", "stu.rb.s0", 2000),
    ):
        fakes[(rule, job)] = fake = FakeNVML(count=2)
        with Telemetry(root / rule / f"{job}.jsonl", rule, job, interval_s=0.02, nvml=fake, environ={}) as tel:
            burn(0.06)
            tel.tokens = tokens
    with Telemetry(
        root / "prepare_models" / "stu.jsonl", "prepare_models", "stu", interval_s=0.02, nvml=FakeNVML(count=1)
    ):
        pass  # no tokens
    files = sorted(root.rglob("*.jsonl"))
    ends = {(lines(f)[0]["rule"], lines(f)[0]["job"]): lines(f)[-1] for f in files}
    out = tmp_path / "out"
    build_results([], telemetry_files=files, db_path=out / "kdflow.duckdb", md_path=out / "summary.md")
    con = duckdb.connect(str(out / "kdflow.duckdb"), read_only=True)
    try:
        energy = {
            (r[0], r[1]): r[2:]
            for r in con.execute(
                "select rule, job, nvml, gpus, tokens, energy_j, energy_per_token_j, peak_gpu_mem_mb, complete "
                "from energy"
            ).fetchall()
        }
        n_rows = con.execute("select count(*) from telemetry where rule = 'train'").fetchone()[0]
    finally:
        con.close()
    for (rule, job), fake in fakes.items():
        nvml, gpus, tokens, joules, per_token, peak, complete = energy[(rule, job)]
        assert nvml and gpus == 2 and complete and tokens == ends[(rule, job)]["tokens"]
        # two GPUs, each counter +50 J per sample after the first
        assert joules == ends[(rule, job)]["energy_j"] == 2 * 50.0 * (fake.reads[0] - 1)
        assert per_token == pytest.approx(joules / tokens)
        assert peak == 1000.0 + 100 * fake.reads[0]  # the last sample's memory: the highest
    assert energy[("prepare_models", "stu")][2] is None and energy[("prepare_models", "stu")][4] is None
    samples = len(lines(root / "train" / "stu.rb.s0.jsonl")) - 2
    assert n_rows == 2 * samples  # one row per sample and GPU
    md = (out / "summary.md").read_text()
    section = md[md.index("## Energy and memory per stage") :]
    topk = [energy[("topk_cache", j)] for j in ("shard_00000", "shard_00001")]
    joules = topk[0][3] + topk[1][3]
    row = next(x for x in section.splitlines() if x.startswith("| topk_cache |"))
    cells = [c.strip().replace(",", "") for c in row.strip("|").split("|")]
    assert cells[:4] == ["topk_cache", "2", "2/2", "10000"]
    assert float(cells[4]) == pytest.approx(joules, rel=1e-3)
    assert float(cells[5]) == pytest.approx(joules / 10000, rel=1e-3)
    assert float(cells[6]) == pytest.approx(max(t[5] for t in topk), rel=1e-3)
    assert "| prepare_models | 1 | 1/1 |  |" in section  # no tokens, so no J/token


def test_a_malformed_telemetry_line_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "telemetry" / "eval" / "teach.jsonl"
    with Telemetry(path, "eval", "teach", interval_s=10):
        pass
    good = path.read_text().splitlines()
    path.write_text("\n".join([good[0], good[1], '{"kind": "sample", "t": 1, "elaps', *good[2:]]) + "\n")
    with pytest.raises(ResultsError) as info:
        build_results([], telemetry_files=[path], db_path=tmp_path / "x.duckdb")
    assert f"{path}:3: not valid JSON" in str(info.value) and "rerun its job (eval teach)" in str(info.value)
    assert not (tmp_path / "x.duckdb").exists()
    path.write_text("\n".join([good[0], '{"kind": "sample", "t": 1, "elapsed_s": "soon", "gpus": []}']) + "\n")
    with pytest.raises(ResultsError, match=re.escape(f"{path}:2: sample with missing or non-numeric elapsed_s")):
        build_results([], telemetry_files=[path])


def test_parse_results_gives_the_load_share_per_stage_and_warns_above_20_percent(tmp_path):
    import duckdb

    root = tmp_path / "telemetry"
    jobs = {  # (rule, job): (load_s, compute_s) reported by a job of ~0.1 s
        ("topk_cache", "shard_00000"): (0.004, 0.09),
        ("topk_cache", "shard_00001"): (0.006, 0.09),
        ("hidden_cache", "shard_00000"): (0.09, 0.005),
        ("eval", "stu.init"): (None, None),  # not reported: not in load_share
    }
    for (rule, job), (load, compute) in jobs.items():
        with Telemetry(root / rule / f"{job}.jsonl", rule, job, interval_s=10, environ={}) as tel:
            time.sleep(0.1)
            tel.load_s, tel.compute_s = load, compute
    files = sorted(root.rglob("*.jsonl"))
    elapsed = {(lines(f)[0]["rule"], lines(f)[0]["job"]): lines(f)[-1]["elapsed_s"] for f in files}
    out = tmp_path / "out"
    build_results([], telemetry_files=files, db_path=out / "kdflow.duckdb", md_path=out / "summary.md")
    con = duckdb.connect(str(out / "kdflow.duckdb"), read_only=True)
    try:
        shares = {r[0]: r[1:] for r in con.execute("select * from load_share").fetchall()}
        per_job = con.execute("select rule, job, load_s, compute_s from energy order by rule, job").fetchall()
    finally:
        con.close()
    assert ("eval", "stu.init", None, None) in per_job and ("topk_cache", "shard_00001", 0.006, 0.09) in per_job
    assert set(shares) == {"topk_cache", "hidden_cache"}
    n, load, compute, total, share, too_high = shares["topk_cache"]
    topk_elapsed = elapsed[("topk_cache", "shard_00000")] + elapsed[("topk_cache", "shard_00001")]
    assert (n, load, compute) == (2, pytest.approx(0.01), pytest.approx(0.18)) and total == pytest.approx(topk_elapsed)
    assert share == pytest.approx(0.01 / topk_elapsed) and share < 0.2 and not too_high
    assert shares["hidden_cache"][4] > 0.2 and shares["hidden_cache"][5]  # 0.09 s of a ~0.1 s job
    md = (out / "summary.md").read_text()
    section = md[md.index("## Model load per stage") :]
    assert "| topk_cache | 2 |" in section and f"{share:.1%} |" in section
    assert "WARNING: hidden_cache spends" in section and "more than 20%" in section and "docs/cluster.md" in section
    assert "WARNING: topk_cache" not in section
