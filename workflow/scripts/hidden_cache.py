"""Rule hidden_cache: one teacher pass over one shard (kdflow.teacher_pass.run_cache_rule)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # (this checkout's package)

import json

import torch

from kdflow.logs import run_logged
from kdflow.teacher_pass import run_cache_rule
from kdflow.telemetry import job_telemetry

sm = snakemake
torch.set_num_threads(sm.threads)


def main():
    with job_telemetry(sm) as tel:
        summary = run_cache_rule(
            "hidden",
            sm.input.shard,
            dict(sm.output.items()),
            sm.params.partial,
            sm.input.teacher,
            sm.params.settings,
            telemetry=tel,
        )
    print(json.dumps(summary, sort_keys=True))


run_logged(sm.log[0], main)
