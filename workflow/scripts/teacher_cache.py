"""Rules topk_cache and hidden_cache: one teacher pass over one shard (see kdflow.teacher_pass)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

import json
import logging

import torch

from kdflow.logs import run_logged
from kdflow.teacher_pass import CacheJob, capture_hidden, capture_topk
from kdflow.telemetry import job_telemetry

sm = snakemake  # noqa: F821
torch.set_num_threads(sm.threads)


def main():
    kind = "topk" if sm.rule == "topk_cache" else "hidden"
    job = CacheJob(kind=kind, shard=Path(sm.input.shard), outputs={k: Path(v) for k, v in sm.output.items()},
                   partial_dir=Path(sm.params.partial), teacher_manifest=Path(sm.input.teacher),
                   settings=sm.params.settings)
    with job_telemetry(sm) as tel:
        summary = capture_topk(job) if kind == "topk" else capture_hidden(job)
        tel.tokens = summary["tokens_computed"]  # this attempt's: parts resumed from a killed one cost nothing now
    line = json.dumps(summary, sort_keys=True)
    logging.getLogger("kdflow.teacher_pass").info("summary %s", line)
    print(line)


run_logged(sm.log[0], main)
