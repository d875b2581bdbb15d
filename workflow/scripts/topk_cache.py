"""Rule topk_cache: one teacher pass over one shard (kdflow.teacher_pass.run_cache_rule)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # (this checkout's package)

from kdflow.logs import run_logged
from kdflow.teacher_pass import run_cache_rule
from kdflow.telemetry import job_telemetry

sm = snakemake
args = (sm.input.shard, dict(sm.output.items()), sm.params.partial, sm.input.teacher, sm.params.settings)
run_logged(
    sm.log[0],
    lambda: run_cache_rule("topk", *args, threads=sm.threads, telemetry=job_telemetry(sm), log_file=sm.log[0]),
)
