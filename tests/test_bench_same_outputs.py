"""bench/same_outputs.py: the before/after check of a refactor finds a changed output, and only that."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "same_outputs.py"


def write_study(root: Path, commit: str) -> None:
    (root / "results/shards").mkdir(parents=True)
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["x", "y"]}), root / "results/shards/shard_00000.parquet")
    cache = root / "results/cache/t/topk_k2"
    cache.mkdir(parents=True)
    meta = {b"kdflow.cache": b'"topk"', b"kdflow.k": b"2", b"kdflow.git_commit": json.dumps(commit).encode()}
    table = pa.table({"doc_index": pa.array([0, 1], pa.int32()), "rest_logprob": [[-1.0], [-2.0]]})
    pq.write_table(table.replace_schema_metadata(meta), cache / "shard_00000.parquet")
    run = root / "results/train/s.ce.s0"
    run.mkdir(parents=True)
    (run / "adapter_model.safetensors").write_bytes(b"weights")
    (root / "results/eval/s.ce.s0").mkdir(parents=True)
    record = {"model": "s.ce.s0", "metrics": [{"metric": "ppl", "value": 3.5}], "provenance": {"commit": commit}}
    (root / "results/eval/s.ce.s0/heldout.json").write_text(json.dumps(record))
    (root / "results/summary.csv").write_text("run_group,heldout/ppl\ns.ce,3.5\n")


def run(before: Path, after: Path) -> tuple[int, list[str]]:
    out = subprocess.run([sys.executable, str(BENCH), str(before), str(after)], capture_output=True, text=True)
    return out.returncode, out.stdout.splitlines()


@pytest.fixture
def studies(tmp_path):
    write_study(tmp_path / "before", commit="aaa")
    write_study(tmp_path / "after", commit="bbb-dirty")  # another checkout: provenance differs, nothing else
    return tmp_path / "before", tmp_path / "after"


def test_two_runs_that_differ_only_in_provenance_are_the_same(studies):
    rc, lines = run(*studies)
    result = json.loads(lines[-1])
    assert rc == 0 and result["same"] is True
    assert result["shard_files"] == result["cache_files"] == result["adapter_files"] == result["eval_records"] == 1
    assert result["summary_cells"] == 2


@pytest.mark.parametrize(
    "change, reported",
    [
        (lambda a: (a / "results/train/s.ce.s0/adapter_model.safetensors").write_bytes(b"other"), "bytes differ"),
        (lambda a: (a / "results/summary.csv").write_text("run_group,heldout/ppl\ns.ce,3.6\n"), "heldout/ppl"),
        (lambda a: (a / "results/shards/shard_00000.parquet").unlink(), "only in before"),
        (
            lambda a: pq.write_table(
                pa.table({"doc_index": pa.array([0, 1], pa.int32()), "rest_logprob": [[-1.0], [-9.0]]}),
                a / "results/cache/t/topk_k2/shard_00000.parquet",
            ),
            "values differ in ['rest_logprob']",
        ),
    ],
)
def test_a_changed_output_is_named(studies, change, reported):
    before, after = studies
    change(after)
    rc, lines = run(before, after)
    assert rc == 1 and json.loads(lines[-1])["same"] is False
    assert any(reported in line for line in lines[:-1]), lines


def test_a_directory_without_results_is_refused(studies, tmp_path):
    before, after = studies
    shutil.rmtree(after / "results")
    rc, _ = run(before, after)
    assert rc == 2
