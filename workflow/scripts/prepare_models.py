"""Rule prepare_models: convert / prune / pin one model and write its manifest (see kdflow.models)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

import torch

from kdflow.logs import run_logged
from kdflow.models import prepare_student, prepare_teacher
from kdflow.telemetry import job_telemetry

sm = snakemake  # noqa: F821
torch.set_num_threads(sm.threads)


def main():
    with job_telemetry(sm):
        if sm.params.role == "teacher":
            return prepare_teacher(sm.params.model, sm.params.settings, sm.output.manifest, sm.input.heldout)
        return prepare_student(sm.params.model, sm.params.settings, sm.input.teacher, sm.output.manifest,
                               sm.input.heldout)


run_logged(sm.log[0], main)
