"""Rule prepare_models: convert / prune / pin one model and write its manifest (see kdflow.prepare)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # (this checkout's package)

import torch

from kdflow.logs import run_logged
from kdflow.prepare import prepare_model
from kdflow.telemetry import job_telemetry

sm = snakemake
torch.set_num_threads(sm.threads)


def main():
    with job_telemetry(sm):
        prepare_model(
            sm.params.role,
            sm.params.model,
            sm.params.settings,
            sm.output.manifest,
            sm.input.heldout,
            teacher_manifest=sm.input.get("teacher"),
        )


run_logged(sm.log[0], main)
