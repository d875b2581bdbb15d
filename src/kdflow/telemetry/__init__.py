"""Telemetry of a GPU job: power, energy, memory and utilisation per GPU (NVML) and the CPU and resident memory
of the job's processes, sampled by a daemon thread into one JSON-lines file per job.

Why: the benchmark files Snakemake writes know nothing of GPUs; what a study costs is GPU energy and what
decides the hardware is peak GPU memory, per stage. :func:`kdflow.results.build_results` turns these files into
energy per token and peak memory per stage (docs/results.md).

The file (``results/telemetry/<rule>/<job>.jsonl``) has a ``start`` line, then ``sample`` lines, then an ``end``
line; each line is written whole and flushed at once, so a killed or preempted job leaves valid JSON lines
up to its last sample (and no ``end``)::

    {"kind": "start", "rule", "job", "host", "nvml": bool, "nvml_error": why NVML is unavailable | null,
     "gpus": [{"index", "name", "memory_total_mb"}], "cuda_visible_devices", "interval_s", "t"}
    {"kind": "sample", "t", "elapsed_s", "cpu_percent", "rss_mb",
     "gpus": [{"index", "power_w", "energy_j", "mem_used_mb", "util_gpu"}]}
    {"kind": "end", "t", "elapsed_s", "tokens", "energy_j", "ok"}

``t`` is Unix time, ``elapsed_s`` seconds since the start (monotonic clock). Without NVML (no driver, no GPU,
no ``pynvml``) the start line says so once, with the reason, and samples carry only CPU and memory: that is
a normal state on a laptop or a CPU node, not an error. Telemetry never fails the job it measures: an error
while sampling is logged once and sampling stops; the work goes on.

The writer is :mod:`kdflow.telemetry.sampler`, the reader :mod:`kdflow.telemetry.reader`, and both count
energy with :class:`~kdflow.telemetry.energy.EnergyMeter`.
"""

from kdflow.telemetry.energy import EnergyMeter
from kdflow.telemetry.reader import GPU_FIELDS, load_telemetry
from kdflow.telemetry.sampler import (
    DEFAULT_INTERVAL_S,
    MB,
    TELEMETRY_DIR,
    Telemetry,
    job_telemetry,
    visible_gpu_indices,
)

__all__ = [
    "DEFAULT_INTERVAL_S",
    "GPU_FIELDS",
    "MB",
    "TELEMETRY_DIR",
    "EnergyMeter",
    "Telemetry",
    "job_telemetry",
    "load_telemetry",
    "visible_gpu_indices",
]
