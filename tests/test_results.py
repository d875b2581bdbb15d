"""kdflow.results: the DuckDB database, the checks, the summary (mean ± stderr, best, deltas) and the plots.

Everything is built from small synthetic files in tmp_path (no models): a teacher, a student's init, the groups
stu.ce and stu.rb with seeds 0, 1, 2, and stu.ce.long / stu.rb.long with seed 0 only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from conftest import stub_config
from kdflow.atomic import write_json
from kdflow.config import validate_config
from kdflow.eval_record import EvalRecord, Metric
from kdflow.results import TABLES, ResultsError, build_results, main, metric_class
from kdflow.results.stats import cell_stats
from kdflow.runs import RunSpec, expand_runs
from kdflow.train.job import TrainJob
from kdflow.train.outputs import write_run_record

REPO = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "teach", "stu"

# held-out perplexity, top-1 agreement and KL per model; None: not applicable
HELDOUT = {
    "teach": (8.0, 1.0, -0.0005),  # a hair below 0: float16 cache noise, allowed
    "stu.init": (40.0, 0.3, None),
    "stu.ce.s0": (15.0, 0.40, 1.0),
    "stu.ce.s1": (16.0, 0.42, 1.1),
    "stu.ce.s2": (20.0, 0.44, 1.2),
    "stu.rb.s0": (10.0, 0.5, 0.5),
    "stu.rb.s1": (12.0, 0.6, 0.6),
    "stu.rb.s2": (14.0, 0.7, 0.7),
    "stu.ce.s0.long": (13.0, 0.45, 0.9),
    "stu.rb.s0.long": (11.0, 0.55, 0.55),
}
ARC = {
    "teach": 0.8,
    "stu.init": 0.3,
    "stu.ce.s0": 0.5,
    "stu.ce.s1": 0.5,
    "stu.ce.s2": 0.5,
    "stu.rb.s0": 0.6,
    "stu.rb.s1": 0.6,
    "stu.rb.s2": 0.6,
    "stu.ce.s0.long": 0.55,
    "stu.rb.s0.long": 0.6,
}  # rb and rb.long tie
EXPECTED = {
    "models": sorted(HELDOUT),
    "evaluations": {"heldout": ["heldout"], "lm_eval": ["kdflow_heldout", "arc_easy"]},
}


def identity(model: str) -> dict:
    if model == TEACHER:
        return {"kind": "teacher", "student": None, "mode": None, "seed": None, "tag": None}
    if model.endswith(".init"):
        return {"kind": "student_init", "student": STUDENT, "mode": None, "seed": None, "tag": None}
    parts = model.split(".")
    return {
        "kind": "run",
        "student": parts[0],
        "mode": parts[1],
        "seed": int(parts[2][1:]),
        "tag": parts[3] if len(parts) > 3 else None,
    }


def m(task, metric, value, hib, stderr=None) -> Metric:
    return Metric(task, metric, value, stderr, hib)


def write_eval(root: Path, model: str, evaluation: str, metrics: list[Metric]) -> Path:
    """An eval file as the eval rule writes it: an EvalRecord through the same JSON writer."""
    path = root / "eval" / model / f"{evaluation}.json"
    record = EvalRecord(model=model, **identity(model), evaluation=evaluation, metrics=metrics)
    write_json(path, record.to_json())
    return path


def run_spec(name: str) -> RunSpec:
    """A full run spec as the plan makes it (kdflow.runs), renamed to ``name``; modes ce and rb."""
    ident = identity(name)
    config = stub_config([{"name": "stdlib", "kind": "python_stdlib"}])
    config["students"][0]["name"] = ident["student"]
    config["teacher_cache"] = {"hidden_layers": [1]}
    config["training"] = {
        "defaults": {"fb": {"layer_map": [{"student": 1, "teacher": 1}]}},
        "experiments": [{"modes": [ident["mode"]], "seeds": [ident["seed"]], "tag": ident["tag"]}],
    }
    (spec,) = expand_runs(validate_config(config))[0].values()
    assert spec.name == name
    return spec


def write_run(root: Path, name: str, steps: int = 3) -> Path:
    """A run directory as the train rule writes it (kdflow.train.outputs.write_run_record), without weights."""
    spec = run_spec(name)
    terms = dict(spec.terms)
    d = root / "train" / name
    d.mkdir(parents=True)
    lines = []
    for i in range(1, steps + 1):
        row = {
            "step": i,
            "epoch": 0,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens": 100,
            "docs": 4,
            "tokens_per_s": 50.0,
            "step_s": 2.0,
            "elapsed_s": 2.0 * i,
            **{t: 5.0 / i for t in terms},
        }
        row["loss"] = sum(row[t] * w for t, w in terms.items())
        lines.append(json.dumps(row, sort_keys=True))
    metrics = root / "work" / name / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("\n".join(lines) + "\n")
    job = TrainJob(spec=spec.to_json(), student_manifest="m.json", shards=[], expected={}, output=str(d), work="w")
    summary = {"run": name, "steps": steps, "tokens": 100 * steps, "train_seconds": 2.0 * steps, "final": {"loss": 2.5}}
    write_run_record(d, job, metrics, summary, {})
    return d


def write_bench(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def make_study(root: Path, skip: tuple[str, ...] = ()) -> dict:
    """The synthetic study's input files; ``skip`` leaves out eval files ``<model>/<evaluation>``."""
    evals = []
    for model, (ppl, top1, kl) in HELDOUT.items():
        heldout = [
            m("heldout", "ppl", ppl, False),
            m("heldout", "nll_per_token", math.log(ppl), False),
            m("heldout", "top1_agreement", top1, True),
            m("heldout", "kl_teacher_student", kl, False),
        ]
        lm = [
            m("kdflow_heldout", "word_perplexity", 2 * ppl, False, 0.1),
            m("kdflow_heldout", "bits_per_byte", math.log2(ppl) / 4, False),
            m("arc_easy", "acc", ARC[model], True, 0.01),
        ]
        for evaluation, metrics in (("heldout", heldout), ("lm_eval", lm)):
            if f"{model}/{evaluation}" not in skip:
                evals.append(write_eval(root, model, evaluation, metrics))
    runs = [n for n in HELDOUT if identity(n)["kind"] == "run"] + ["stu.fb.s0"]  # fb: trained, not evaluated
    train = [write_run(root, n) for n in runs]
    bench = root / "benchmarks"
    benches = [
        write_bench(
            bench / "train" / "stu.rb.s0.tsv", ["12.5\t0:00:12\t1200.5\t3400\t1100\t1150\t6.5\t18.7\t146.7\t20.2"]
        ),
        write_bench(bench / "topk_cache" / "shard_00000.tsv", ["30\t0:00:30\tNA\t-\tNA\tNA\t-\t-\t99\t29"]),
        write_bench(bench / "corpus.tsv", ["3\t0:00:03\t200\t400\t150\t160\t1\t2\t90\t2.7"]),
        write_bench(
            bench / "eval" / "teach.tsv",
            ["5\t0:00:05\t300\t500\t250\t260\t1\t1\t80\t4", "6\t0:00:06\t310\t510\t255\t265\t1\t1\t81\t5"],
        ),
    ]
    return {"eval_files": evals, "train_dirs": train, "benchmark_files": benches}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    inputs = make_study(root)
    out = root / "out"
    result = build_results(
        **inputs,
        expected=EXPECTED,
        db_path=out / "kdflow.duckdb",
        csv_path=out / "summary.csv",
        md_path=out / "summary.md",
        plots_dir=out / "plots",
    )
    return root, result


def sql(db: Path, query: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def summary_row(db: Path, group: str, metric: str) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute("select * from summary where run_group = ? and metric = ?", [group, metric])
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    finally:
        con.close()
    assert len(rows) == 1, rows
    return dict(zip(names, rows[0], strict=True))


# --------------------------------------------------------------------------- the database


def test_schema_and_row_counts(built):
    root, result = built
    db = result["database"]
    assert db.is_file() and not list(db.parent.glob(".*tmp*")) and not Path(str(db) + ".wal").exists()
    tables = [t for (t,) in sql(db, "select table_name from information_schema.tables order by table_name")]
    assert tables == ["energy", "jobs", "load_share", "metrics", "runs", "summary", "telemetry", "train_steps"]
    cols = {
        t: [
            c
            for (c,) in sql(
                db,
                f"select column_name from information_schema.columns where table_name = '{t}' "
                f"order by ordinal_position",
            )
        ]
        for t in tables
    }
    assert cols["runs"] == [
        "model",
        "kind",
        "student",
        "mode",
        "seed",
        "tag",
        "run_group",
        "terms",
        "steps",
        "tokens",
        "train_seconds",
        "final_loss",
        "evaluated",
        "train_dir",
    ]
    assert cols["metrics"] == ["model", "evaluation", "task", "metric", "value", "stderr", "higher_is_better", "source"]
    assert cols["train_steps"] == [
        "model",
        "step",
        "epoch",
        "loss",
        "ce",
        "rb",
        "fb",
        "relb",
        "relb_distance",
        "relb_angle",
        "lr",
        "grad_norm",
        "tokens",
        "docs",
        "tokens_per_s",
        "step_s",
        "elapsed_s",
    ]
    assert cols["jobs"] == [
        "rule",
        "name",
        "repeat",
        "seconds",
        "max_rss_mb",
        "max_vms_mb",
        "max_uss_mb",
        "max_pss_mb",
        "io_in",
        "io_out",
        "mean_load",
        "cpu_time",
        "source",
    ]
    assert cols["energy"] == [
        "rule",
        "job",
        "host",
        "nvml",
        "nvml_error",
        "gpus",
        "gpu_names",
        "samples",
        "complete",
        "elapsed_s",
        "tokens",
        "load_s",
        "compute_s",
        "energy_j",
        "energy_per_token_j",
        "peak_gpu_mem_mb",
        "peak_rss_mb",
        "source",
    ]
    assert cols == {t: [c for c, _, _ in TABLES[t][1]] for t in tables}
    # the documentation is in the database too
    assert sql(db, "select comment from duckdb_columns() where table_name = 'jobs' and column_name = 'max_rss_mb'") == [
        ("peak resident set size, MB",)
    ]
    counts = {t: sql(db, f"select count(*) from {t}")[0][0] for t in tables}
    # 10 evaluated models + 1 trained only; 10 x 7 metrics; 9 runs x 3 steps; 4 files, one with 2 repeats;
    # 6 summary rows (teacher, init, ce, rb, ce.long, rb.long) x 7 metrics
    assert counts == {
        "runs": 11,
        "metrics": 70,
        "train_steps": 27,
        "jobs": 5,
        "summary": 42,
        "telemetry": 0,
        "energy": 0,
        "load_share": 0,
    }


def test_runs_metrics_steps_jobs_content(built):
    _, result = built
    db = result["database"]
    rows = {
        r[0]: r
        for r in sql(
            db,
            "select model, kind, run_group, seed, tag, terms, steps, tokens, train_seconds, "
            "final_loss, evaluated from runs",
        )
    }
    assert rows["stu.rb.s1"] == (
        "stu.rb.s1",
        "run",
        "stu.rb",
        1,
        None,
        '{"ce": 0.5, "rb": 0.5}',
        3,
        300,
        6.0,
        2.5,
        True,
    )
    assert rows["stu.rb.s0.long"][2:5] == ("stu.rb.long", 0, "long")
    assert rows["teach"][1:3] == ("teacher", "teach") and rows["teach"][5] is None
    assert rows["stu.init"][1:3] == ("student_init", "stu.init")
    assert rows["stu.fb.s0"][1:3] == ("run", "stu.fb") and rows["stu.fb.s0"][-1] is False
    # n/a values and stderr not computed are NULL
    assert sql(db, "select value from metrics where model = 'stu.init' and metric = 'kl_teacher_student'") == [(None,)]
    assert sql(db, "select count(*) from metrics where metric = 'bits_per_byte' and stderr is null") == [(10,)]
    # train steps: terms a run does not log are NULL
    assert sql(db, "select ce, rb, fb from train_steps where model = 'stu.rb.s0' and step = 2") == [(2.5, 2.5, None)]
    assert sql(db, "select rb from train_steps where model = 'stu.ce.s0' and step = 1") == [(None,)]
    jobs = {
        (r[0], r[1], r[2]): r[3:]
        for r in sql(db, "select rule, name, repeat, seconds, max_rss_mb, max_vms_mb, io_in, mean_load from jobs")
    }
    assert jobs[("train", "stu.rb.s0", 0)] == (12.5, 1200.5, 3400.0, 6.5, 146.7)
    assert jobs[("topk_cache", "shard_00000", 0)] == (30.0, None, None, None, 99.0)  # NA and - are NULL
    assert jobs[("corpus", "corpus", 0)][0] == 3.0
    assert jobs[("eval", "teach", 1)][0] == 6.0


# --------------------------------------------------------------------------- aggregation, best, deltas


def test_mean_and_stderr_over_three_seeds_and_one(built):
    db = built[1]["database"]
    rb = summary_row(db, "stu.rb", "ppl")  # 10, 12, 14
    assert (rb["n"], rb["mean"]) == (3, 12.0)
    assert rb["stderr"] == pytest.approx(2.0 / math.sqrt(3), rel=1e-12)  # sample std 2
    ce = summary_row(db, "stu.ce", "ppl")  # 15, 16, 20
    assert ce["mean"] == 17.0 and ce["stderr"] == pytest.approx(math.sqrt(7.0) / math.sqrt(3), rel=1e-12)
    top1 = summary_row(db, "stu.rb", "top1_agreement")  # 0.5, 0.6, 0.7
    assert top1["mean"] == pytest.approx(0.6) and top1["stderr"] == pytest.approx(0.1 / math.sqrt(3), rel=1e-12)
    one = summary_row(db, "stu.rb.long", "ppl")  # one seed: no stderr
    assert (one["n"], one["mean"], one["stderr"]) == (1, 11.0, None)
    teacher = summary_row(db, "teach", "ppl")
    assert (teacher["n"], teacher["mean"], teacher["stderr"], teacher["best"]) == (1, 8.0, None, None)


def test_best_marking(built):
    db = built[1]["database"]

    def best(metric: str) -> list[str]:
        return sorted(g for (g,) in sql(db, f"select run_group from summary where metric = '{metric}' and best"))

    assert best("ppl") == ["stu.rb.long"]  # lowest: 11 < 12 (teacher's 8 is not ranked)
    assert best("top1_agreement") == ["stu.rb"]  # highest mean 0.6
    assert best("acc") == ["stu.rb", "stu.rb.long"]  # a tie marks both
    assert best("kl_teacher_student") == ["stu.rb.long"]
    assert summary_row(db, "stu.init", "kl_teacher_student")["best"] is None  # n/a is not ranked


def test_deltas_against_ce_and_teacher(built):
    db = built[1]["database"]
    rb = summary_row(db, "stu.rb", "ppl")
    assert rb["ce_group"] == "stu.ce" and rb["delta_ce"] == pytest.approx(-5.0)
    assert rb["delta_ce_stderr"] == pytest.approx(math.sqrt(4 / 3 + 7 / 3), rel=1e-12)
    assert rb["teacher"] == "teach" and rb["delta_teacher"] == pytest.approx(4.0)
    assert rb["delta_teacher_stderr"] == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    long = summary_row(db, "stu.rb.long", "ppl")  # against the ce group of the same tag
    assert (long["ce_group"], long["delta_ce"], long["delta_ce_stderr"]) == ("stu.ce.long", -2.0, None)
    acc = summary_row(db, "stu.rb", "acc")
    assert acc["delta_ce"] == pytest.approx(0.1) and acc["delta_teacher"] == pytest.approx(-0.2)
    ce = summary_row(db, "stu.ce", "ppl")
    assert ce["delta_ce"] is None and ce["delta_teacher"] == pytest.approx(9.0)
    init = summary_row(db, "stu.init", "ppl")
    assert init["delta_ce"] is None and init["delta_teacher"] == pytest.approx(32.0)


def test_summary_csv(built):
    _, result = built
    with open(result["csv"], newline="") as f:
        rows = {r["run_group"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["teach", "stu.init", "stu.ce", "stu.rb", "stu.ce.long", "stu.rb.long"]
    rb = rows["stu.rb"]
    assert (rb["kind"], rb["mode"], rb["n_seeds"], rb["seeds"], rb["terms"]) == (
        "run",
        "rb",
        "3",
        "0;1;2",
        '{"ce": 0.5, "rb": 0.5}',
    )
    assert float(rb["heldout/ppl"]) == 12.0
    assert float(rb["heldout/ppl.stderr"]) == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    assert rb["heldout/ppl.n"] == "3" and rb["heldout/ppl.best"] == "0"
    assert rows["stu.rb.long"]["heldout/ppl.best"] == "1"
    assert float(rb["heldout/ppl.delta_ce"]) == -5.0 and float(rb["heldout/ppl.delta_teacher"]) == 4.0
    assert rows["stu.rb.long"]["heldout/ppl.stderr"] == ""  # one seed
    assert rows["stu.init"]["heldout/kl_teacher_student"] == ""  # n/a
    assert rows["stu.init"]["heldout/kl_teacher_student.n"] == "0"
    assert rows["teach"]["heldout/ppl.best"] == ""  # the teacher is not ranked
    assert float(rows["stu.rb"]["arc_easy/acc"]) == pytest.approx(0.6)


def test_summary_markdown(built):
    text = built[1]["markdown"].read_text()
    assert "## heldout" in text and "## kdflow_heldout (lm_eval)" in text and "## arc_easy (lm_eval)" in text
    assert "| row | n | ppl ↓ | nll_per_token ↓ | top1_agreement ↑ | kl_teacher_student ↓ |" in text
    rb_long = next(line for line in text.splitlines() if line.startswith("| stu.rb.long | 1 | "))
    assert rb_long.startswith("| stu.rb.long | 1 | **11** ★ |")  # best ppl, one seed: no ±
    rb = next(line for line in text.splitlines() if line.startswith("| stu.rb | 3 | "))
    assert "| 12 ± 1.155 |" in rb and "**0.6 ± 0.05774** ★" in rb
    assert "| stu.init | 1 | 40 |" in text and "| n/a |" in text
    assert "- stu.init: heldout/kl_teacher_student (heldout)" in text  # the n/a list
    assert "| stu.rb | -5 ± 1.915 | +4 ± 1.155 |" in text  # Δ ce, Δ teacher of ppl
    assert "| train | 1 | 12.5 | 12.5 | 1200 |" in text  # jobs per rule


def test_plots_written(built):
    root, result = built
    plots = result["plots"]
    names = [p.name for p in plots]
    assert names == sorted(names) and all(p.parent == root / "out" / "plots" for p in plots)
    assert {"train_loss.png", "train_ce.png", "train_rb.png", "train_fb.png"} <= set(names)
    assert "train_relb.png" not in names  # no run logs relb
    assert "metric_heldout_heldout_ppl.png" in names and "metric_lm_eval_arc_easy_acc.png" in names
    assert "delta_ce_heldout_heldout_ppl.png" in names
    assert len([n for n in names if n.startswith("metric_")]) == 7
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert sorted(x.name for x in (root / "out" / "plots").iterdir()) == names


# --------------------------------------------------------------------------- checks


def fails(tmp_path, inputs, expected=EXPECTED) -> str:
    db = tmp_path / "out" / "kdflow.duckdb"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"previous")
    with pytest.raises(ResultsError) as e:
        build_results(**inputs, expected=expected, db_path=db, csv_path=tmp_path / "out" / "summary.csv")
    assert db.read_bytes() == b"previous" and not (tmp_path / "out" / "summary.csv").exists()  # nothing written
    return str(e.value)


def edit_metric(path: Path, metric: str, value) -> None:
    data = json.loads(path.read_text())
    for entry in data["metrics"]:
        if entry["metric"] == metric:
            entry["value"] = value
    path.write_text(json.dumps(data))  # NaN is written as NaN, as json.dumps does


def test_accuracy_out_of_range(tmp_path):
    inputs = make_study(tmp_path)
    path = tmp_path / "eval" / "stu.rb.s1" / "lm_eval.json"
    edit_metric(path, "acc", 1.2)
    msg = fails(tmp_path, inputs)
    assert msg.startswith("1 problem(s)")
    assert f"{path}: model stu.rb.s1, task arc_easy, metric acc: value = 1.2 is outside [0, 1]" in msg
    assert f"`snakemake {path} --force`" in msg


def test_perplexity_below_one(tmp_path):
    inputs = make_study(tmp_path)
    path = tmp_path / "eval" / "stu.ce.s0" / "heldout.json"
    edit_metric(path, "ppl", 0.5)
    msg = fails(tmp_path, inputs)
    assert f"{path}: model stu.ce.s0, task heldout, metric ppl: value = 0.5 is below 1 (a perplexity)" in msg
    assert "--force" in msg


def test_nan_and_negative_kl(tmp_path):
    inputs = make_study(tmp_path)
    path = tmp_path / "eval" / "stu.rb.s0" / "heldout.json"
    edit_metric(path, "top1_agreement", float("nan"))
    edit_metric(path, "kl_teacher_student", -0.01)
    msg = fails(tmp_path, inputs)
    assert msg.startswith("2 problem(s)")
    assert "model stu.rb.s0, task heldout, metric top1_agreement: value = nan is not finite (NaN or inf)" in msg
    assert "metric kl_teacher_student: value = -0.01 is below -0.001" in msg


def test_missing_task(tmp_path):
    inputs = make_study(tmp_path)
    path = tmp_path / "eval" / "stu.ce.s2" / "lm_eval.json"
    data = json.loads(path.read_text())
    data["metrics"] = [x for x in data["metrics"] if x["task"] != "arc_easy"]
    path.write_text(json.dumps(data))
    msg = fails(tmp_path, inputs)
    assert (
        f"{path}: model stu.ce.s2, evaluation lm_eval: no metric for task arc_easy (tasks present: ['kdflow_heldout'])"
    ) in msg
    assert f"`snakemake {path} --force`" in msg


def test_missing_model(tmp_path):
    inputs = make_study(tmp_path, skip=("stu.rb.s2/heldout", "stu.rb.s2/lm_eval"))
    msg = fails(tmp_path, inputs)
    assert msg.startswith("2 problem(s)")
    target = tmp_path / "eval" / "stu.rb.s2" / "heldout.json"
    assert f"model stu.rb.s2: no heldout results ({target} is not among the inputs); run `snakemake {target}`" in msg
    assert "model stu.rb.s2: no lm_eval results" in msg
    # without the coverage check the same inputs build (the group then has two seeds)
    s = build_results(**inputs, expected=None)["summary"]
    assert s.cell("stu.rb", ("heldout", "heldout", "ppl")).n == 2


def test_malformed_files_and_inconsistent_ids(tmp_path):
    inputs = make_study(tmp_path)
    (tmp_path / "eval" / "teach" / "heldout.json").write_text("{not json")
    path = tmp_path / "eval" / "stu.ce.s1" / "lm_eval.json"
    data = json.loads(path.read_text())
    data["seed"] = 7
    path.write_text(json.dumps(data))
    msg = fails(tmp_path, inputs)
    assert f"{tmp_path / 'eval' / 'teach' / 'heldout.json'}: not valid JSON" in msg
    assert f"{path}: model stu.ce.s1: student/mode/seed/tag say the run is 'stu.ce.s7'" in msg


def test_malformed_records_list_every_fault(tmp_path):
    inputs = make_study(tmp_path)
    path = tmp_path / "eval" / "stu.rb.s1" / "heldout.json"
    data = json.loads(path.read_text())
    data["metrics"][0]["value"] = 0.5  # ppl below 1: still checked beside the entries that are not metrics
    data["metrics"][1]["stderr"] = "x"
    data["metrics"][2]["higher_is_better"] = "yes"
    data["metrics"].append({"task": 3})
    path.write_text(json.dumps(data))
    init = tmp_path / "eval" / "stu.init" / "lm_eval.json"
    data = json.loads(init.read_text())
    data["kind"] = "nope"
    init.write_text(json.dumps(data))
    msg = fails(tmp_path, inputs)
    assert msg.startswith("6 problem(s)")
    hint = f"rerun `snakemake {path} --force`"
    where = f"{path}: model stu.rb.s1, task heldout, metric"
    assert f"{where} nll_per_token: stderr 'x' is not a number; {hint}" in msg
    assert f"{where} top1_agreement: higher_is_better 'yes' is not true/false/null; {hint}" in msg
    assert f"{path}: model stu.rb.s1: metrics[4] = {{'task': 3}} lacks a task or metric name; {hint}" in msg
    assert f"{where} ppl: value = 0.5 is below 1 (a perplexity)" in msg
    assert f"{init}: model stu.init: kind 'nope' is none of ['run', 'teacher', 'student_init']; " in msg
    assert f"model stu.init: no lm_eval results ({init} is not among the inputs)" in msg


def test_stderr_marks_of_lm_eval_read_as_null(tmp_path):
    inputs = make_study(tmp_path)
    path = tmp_path / "eval" / "teach" / "lm_eval.json"
    data = json.loads(path.read_text())
    for entry in data["metrics"]:
        entry["stderr"] = "N/A"  # what lm-eval itself writes where it computed none
    path.write_text(json.dumps(data))
    db = build_results(**inputs, expected=EXPECTED, db_path=tmp_path / "x.duckdb")["database"]
    query = "select count(*) from metrics where model = 'teach' and evaluation = 'lm_eval' and stderr is null"
    assert sql(db, query) == [(3,)]


def test_summary_statistics_in_sql_match_python_statistics():
    """The cells' SQL (kdflow.results.stats.CELL_STATS) against the definitions: the mean is statistics.fmean to
    the bit (so summary.csv keeps its digits), the standard error statistics.stdev / sqrt(n) to rounding, best the
    non-teacher rows within rounding of the top mean."""
    rng = random.Random(0)
    entries, expected, direction = [], {}, {}
    for k in range(12):
        key = ("heldout", "heldout", f"m{k}")
        direction[key] = [True, False, None][k % 3]
        scale = rng.choice([1e-3, 0.5, 10.0, 3e4])
        for g in range(15):
            n = 1 + g % 5
            values = [scale * (1 + rng.gauss(0, 0.01 if g % 2 else 0.3)) for _ in range(n)]
            if g == 14:
                values = [None] * n  # not applicable
            kind = "teacher" if g == 0 else "run"
            entries += [(f"g{g}", kind, key, v) for v in values]
            present = [v for v in values if v is not None]
            mean = statistics.fmean(present) if present else None
            se = statistics.stdev(present) / math.sqrt(n) if len(present) > 1 else None
            expected[(f"g{g}", key)] = (len(present), mean, se, kind)
    got = cell_stats(entries, direction)
    assert set(got) == set(expected)
    for cell, (n, mean, se, _) in expected.items():
        assert got[cell][:2] == (n, mean), cell
        assert got[cell][2] == (None if se is None else pytest.approx(se, rel=1e-12)), cell
    for key, hib in direction.items():
        means = {g: v[1] for (g, k), v in expected.items() if k == key and v[3] != "teacher" and v[1] is not None}
        top = (max if hib else min)(means.values())
        for (g, k), (_, mean, _, kind) in expected.items():
            if k != key:
                continue
            want = None if hib is None or kind == "teacher" or mean is None else math.isclose(mean, top, rel_tol=1e-12)
            assert got[(g, key)][3] == want, (g, key)


def test_metric_classes():
    assert [
        metric_class(x)
        for x in (
            "acc",
            "acc_norm",
            "exact_match,strict-match",
            "top1_agreement",
            "ppl",
            "word_perplexity",
            "bits_per_byte",
            "nll_per_token",
            "kl_teacher_student",
            "f1",
        )
    ] == [
        "accuracy",
        "accuracy",
        "accuracy",
        "accuracy",
        "perplexity",
        "perplexity",
        "nonnegative",
        "nonnegative",
        "kl",
        None,
    ]


def write_telemetry(path: Path, rule: str, job: str, samples: list[tuple], end: dict | None, nvml: bool = True) -> Path:
    """A telemetry file; samples are (elapsed_s, rss_mb, [(gpu, power_w, energy_j, mem_used_mb), ...])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gpus = sorted({g[0] for _, _, gs in samples for g in gs})
    recs = [
        {
            "kind": "start",
            "rule": rule,
            "job": job,
            "host": "node1",
            "nvml": nvml,
            "nvml_error": None if nvml else "NVMLError_LibraryNotFound: NVML Shared Library Not Found",
            "gpus": [{"index": i, "name": "H100", "memory_total_mb": 81559.0} for i in gpus],
            "interval_s": 5,
            "t": 1.7e9,
        }
    ]
    for n, (elapsed, rss, gs) in enumerate(samples):
        recs.append(
            {
                "kind": "sample",
                "t": 1.7e9 + elapsed,
                "elapsed_s": elapsed,
                "cpu_percent": None if n == 0 else 99.0,
                "rss_mb": rss,
                "gpus": [
                    {"index": i, "power_w": p, "energy_j": e, "mem_used_mb": m, "util_gpu": 90.0} for i, p, e, m in gs
                ],
            }
        )
    if end is not None:
        recs.append({"kind": "end", "t": 1.7e9 + samples[-1][0], "elapsed_s": samples[-1][0], "ok": True, **end})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_telemetry_energy_per_token_peaks_and_cli(tmp_path, capsys):
    inputs = make_study(tmp_path)
    tel = tmp_path / "telemetry"
    files = [
        # two GPUs with energy counters: 1000 + 3000 J over 6000 tokens
        write_telemetry(
            tel / "topk_cache" / "shard_00000.jsonl",
            "topk_cache",
            "shard_00000",
            [
                (0.0, 900.0, [(0, 300.0, 10_000.0, 20_000.0), (1, 310.0, 50_000.0, 30_000.0)]),
                (5.0, 1200.0, [(0, 320.0, 11_000.0, 60_000.0), (1, 330.0, 53_000.0, 40_000.0)]),
            ],
            {"tokens": 6000, "energy_j": 4000.0},
        ),
        write_telemetry(
            tel / "topk_cache" / "shard_00001.jsonl",
            "topk_cache",
            "shard_00001",
            [(0.0, 800.0, [(0, 300.0, 20_000.0, 10_000.0)]), (5.0, 800.0, [(0, 300.0, 21_000.0, 10_000.0)])],
            {"tokens": 4000, "energy_j": 1000.0},
        ),
        # killed: no end line; no counter, so the energy is the power's trapezoid: (100 + 300) / 2 * 10 s
        write_telemetry(
            tel / "train" / "stu.rb.s0.jsonl",
            "train",
            "stu.rb.s0",
            [(0.0, 500.0, [(0, 100.0, None, 5000.0)]), (10.0, 700.0, [(0, 300.0, None, 7000.0)])],
            None,
        ),
        # no NVML: CPU and memory only
        write_telemetry(
            tel / "eval" / "teach.jsonl",
            "eval",
            "teach",
            [(0.0, 300.0, []), (3.0, 350.0, [])],
            {"tokens": 100, "energy_j": None},
            nvml=False,
        ),
    ]
    out = tmp_path / "t"
    build_results(**inputs, db_path=out / "t.duckdb", md_path=out / "summary.md", telemetry_files=files)
    db = out / "t.duckdb"
    assert sql(
        db,
        "select rule, job, nvml, gpus, samples, complete, elapsed_s, tokens, energy_j, energy_per_token_j, "
        "peak_gpu_mem_mb, peak_rss_mb from energy order by rule, job",
    ) == [
        ("eval", "teach", False, 0, 2, True, 3.0, 100, None, None, None, 350.0),
        ("topk_cache", "shard_00000", True, 2, 2, True, 5.0, 6000, 4000.0, 4000.0 / 6000, 60_000.0, 1200.0),
        ("topk_cache", "shard_00001", True, 1, 2, True, 5.0, 4000, 1000.0, 0.25, 10_000.0, 800.0),
        ("train", "stu.rb.s0", True, 1, 2, False, 10.0, None, 2000.0, None, 7000.0, 700.0),
    ]
    assert sql(db, "select nvml_error from energy where not nvml") == [
        ("NVMLError_LibraryNotFound: NVML Shared Library Not Found",)
    ]
    assert sql(db, "select count(*), count(gpu), sum(power_w) from telemetry") == [(4 + 2 + 2 + 2, 8, 2260.0)]
    assert sql(
        db,
        "select sample, gpu, power_w, cpu_percent, rss_mb, line from telemetry "
        "where job = 'shard_00000' order by sample, gpu",
    ) == [
        (0, 0, 300.0, None, 900.0, 2),
        (0, 1, 310.0, None, 900.0, 2),
        (1, 0, 320.0, 99.0, 1200.0, 3),
        (1, 1, 330.0, 99.0, 1200.0, 3),
    ]
    md = (out / "summary.md").read_text()
    assert "## Energy and memory per stage" in md
    assert "| rule | jobs | NVML | tokens | energy J | J/token | peak GPU MB | peak RSS MB |" in md
    assert "| topk_cache | 2 | 2/2 | 10,000 | 5,000 | 0.5 | 60,000 | 1,200 |" in md
    assert "| train | 1 | 1/1 |  | 2,000 |  | 7,000 | 700 |" in md
    assert "| eval | 1 | 0/1 | 100 |  |  |  | 350 |" in md
    assert "NVML unavailable in 1 of 4 jobs (NVMLError_LibraryNotFound: NVML Shared Library Not Found)" in md
    assert "Incomplete telemetry (killed or failed jobs): train/stu.rb.s0." in md
    # a malformed line: named by file and line, nothing written
    bad = tel / "hidden_cache" / "shard_00000.jsonl"
    bad.parent.mkdir()
    bad.write_text(files[0].read_text().splitlines()[0] + '\n{"kind": "sample", "t"\n')
    with pytest.raises(ResultsError, match=re.escape(f"{bad}:2: not valid JSON")):
        build_results(**inputs, db_path=tmp_path / "never.duckdb", telemetry_files=files + [bad])
    assert not (tmp_path / "never.duckdb").exists()
    # the command line: --telemetry; an error is one message and exit status 1
    ok = tmp_path / "cli_ok"
    assert (
        main(
            [
                "--eval",
                *map(str, inputs["eval_files"]),
                "--telemetry",
                *map(str, files),
                "--db",
                str(ok / "x.duckdb"),
                "--csv",
                str(ok / "s.csv"),
                "--md",
                str(ok / "s.md"),
                "--plots",
                str(ok / "plots"),
            ]
        )
        == 0
    )
    assert sql(ok / "x.duckdb", "select count(*) from energy") == [(4,)]
    edit_metric(tmp_path / "eval" / "teach" / "heldout.json", "ppl", 0.5)
    out = tmp_path / "cli"
    rc = main(
        [
            "--eval",
            *map(str, inputs["eval_files"]),
            "--db",
            str(out / "x.duckdb"),
            "--csv",
            str(out / "s.csv"),
            "--md",
            str(out / "s.md"),
            "--plots",
            str(out / "plots"),
        ]
    )
    assert rc == 1 and "is below 1 (a perplexity)" in capsys.readouterr().err
    assert not out.exists()


def test_python_m_kdflow_results_is_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "kdflow.results", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert out.startswith("usage: python -m kdflow.results") and "--telemetry" in out and "--expected" in out
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdflow.results",
            "--eval",
            str(tmp_path / "none.json"),
            "--db",
            str(tmp_path / "x.duckdb"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 1 and "none.json: file not found" in bad.stderr
    assert not (tmp_path / "x.duckdb").exists()


def test_docs_describe_every_column():
    text = (REPO / "docs" / "results.md").read_text()
    for table, (_, columns) in TABLES.items():
        assert f"`{table}`" in text, table
        missing = [c for c, _, _ in columns if not re.search(rf"`{re.escape(c)}`", text)]
        assert not missing, f"docs/results.md does not document {table} columns {missing}"
    assert "duckdb results/kdflow.duckdb" in text and ".df()" in text
