"""Rule eval: held-out metrics and lm-evaluation-harness tasks for one run or baseline (kdflow.evaluate)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

import torch

from kdflow.evaluate import evaluate_model
from kdflow.logs import run_logged
from kdflow.telemetry import job_telemetry

sm = snakemake  # noqa: F821
torch.set_num_threads(sm.threads)


def main():
    with job_telemetry(sm) as tel:
        evaluate_model(
            dict(sm.params.target),
            sm.params.settings,
            sm.input.heldout,
            sm.input.heldout_topk,
            sm.output.heldout,
            sm.output.lm_eval,
            out_raw=sm.output.raw,
            telemetry=tel,  # counts the held-out tokens scored (not lm-eval's)
        )


run_logged(sm.log[0], main)
