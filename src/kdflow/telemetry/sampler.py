"""The telemetry writer: :class:`Telemetry` samples a job into its JSON-lines file (the format:
:mod:`kdflow.telemetry`), :func:`job_telemetry` makes one for a Snakemake script job."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from kdflow.telemetry.energy import EnergyMeter

log = logging.getLogger("kdflow.telemetry")

DEFAULT_INTERVAL_S = 5.0
TELEMETRY_DIR = "results/telemetry"  # relative to the workflow's working directory; parse_results reads it whole
MB = 2**20


def visible_gpu_indices(value: str | None, count: int) -> list[int]:
    """The NVML indices a job may use: all ``count`` GPUs, or those listed in ``CUDA_VISIBLE_DEVICES``.

    Like CUDA, the list ends at the first index that does not exist (so ``-1`` hides every GPU). A list that
    is not integer indices (GPU UUIDs, MIG ids) cannot be matched by index: every GPU is sampled then.
    NVML numbers GPUs in PCI bus order; CUDA does too with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (SLURM's
    assignment is by index either way).
    """
    if value is None:
        return list(range(count))
    items = [x.strip() for x in value.split(",") if x.strip()]
    try:
        indices = [int(x) for x in items]
    except ValueError:
        return list(range(count))
    out: list[int] = []
    for i in indices:
        if not 0 <= i < count or i in out:
            break
        out.append(i)
    return out


def _rss_and_cpu_s() -> tuple[float | None, float]:
    """(resident MB, CPU seconds) of this process and its children (torchrun's workers): with psutil, the whole
    tree; without it (a minimal conda env) this process only, from /proc/self."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/self/statm", encoding="ascii") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
        except (OSError, ValueError, IndexError):
            rss = None
        return rss, time.process_time()
    me = psutil.Process()
    try:
        procs = [me, *me.children(recursive=True)]
    except psutil.Error:
        procs = [me]
    rss, cpu = 0.0, 0.0
    for p in procs:
        try:
            t, m = p.cpu_times(), p.memory_info()
        except psutil.Error:  # a child that ended between listing and reading
            continue
        # children_*: children already waited for, so a finished worker's CPU time is not lost
        cpu += t.user + t.system + t.children_user + t.children_system
        rss += m.rss
    return rss / MB, cpu


class Telemetry:
    """Context manager sampling into ``path`` every ``interval_s`` seconds while the work in its block runs.

    The first sample is taken on entry and a last one on exit, so even a job shorter than the interval has
    two. The measured work may set :attr:`tokens` (tokens processed) for the end line, which the results turn
    into energy per token, and :attr:`load_s` / :attr:`compute_s` (seconds spent loading models and computing),
    which the results turn into each stage's load share. ``nvml``: a ``pynvml``-like module to use instead of
    importing ``pynvml`` (tests); ``environ``: instead of ``os.environ`` (for ``CUDA_VISIBLE_DEVICES``).
    ``enabled=False`` writes nothing.
    """

    def __init__(
        self,
        path: str | Path,
        rule: str,
        job: str,
        interval_s: float = DEFAULT_INTERVAL_S,
        enabled: bool = True,
        nvml: Any = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"telemetry interval_s must be > 0, got {interval_s!r}")
        self.path, self.rule, self.job = Path(path), rule, job
        self.interval_s, self.enabled = float(interval_s), enabled
        self.tokens: int | None = None
        self.load_s: float | None = None
        self.compute_s: float | None = None
        self._nvml_module, self._environ = nvml, environ
        self._nvml: Any = None
        self._handles: list[tuple[int, Any]] = []
        self._file: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampling = False
        self._energy = EnergyMeter()
        self._t0 = 0.0
        self._last: tuple[float, float] | None = None  # (elapsed_s, CPU seconds) of the previous sample

    # ------------------------------------------------------------------ NVML

    def _open_nvml(self) -> tuple[list[dict], str | None]:
        """Initialise NVML and find the visible GPUs; on any failure, no GPUs and the reason."""
        nvml = self._nvml_module
        try:
            if nvml is None:
                import pynvml as nvml
        except ImportError as e:
            return [], f"pynvml is not installed (pip install nvidia-ml-py): {e}"
        try:
            nvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, _NoPermission …
            return [], f"{type(e).__name__}: {e}"
        try:
            env = os.environ if self._environ is None else self._environ
            indices = visible_gpu_indices(env.get("CUDA_VISIBLE_DEVICES"), int(nvml.nvmlDeviceGetCount()))
            handles = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
            gpus = []
            for i, h in handles:
                name = nvml.nvmlDeviceGetName(h)
                gpus.append(
                    {
                        "index": i,
                        "name": name.decode() if isinstance(name, bytes) else str(name),
                        "memory_total_mb": nvml.nvmlDeviceGetMemoryInfo(h).total / MB,
                    }
                )
        except Exception as e:
            _shutdown(nvml)
            return [], f"{type(e).__name__}: {e}"
        self._nvml, self._handles = nvml, handles
        return gpus, None

    def _gpu_sample(self, index: int, handle: Any) -> dict:
        nvml = self._nvml
        unsupported = getattr(nvml, "NVMLError", Exception)

        def read(fn: str, scale: float = 1.0, attr: str | None = None) -> float | None:
            try:
                value = getattr(nvml, fn)(handle)
            except unsupported:  # e.g. no energy counter before Volta: null, not a failure
                return None
            x = float(getattr(value, attr) if attr else value) / scale
            return x if math.isfinite(x) else None

        return {
            "index": index,
            "power_w": read("nvmlDeviceGetPowerUsage", 1000.0),
            "energy_j": read("nvmlDeviceGetTotalEnergyConsumption", 1000.0),
            "mem_used_mb": read("nvmlDeviceGetMemoryInfo", MB, "used"),
            "util_gpu": read("nvmlDeviceGetUtilizationRates", 1.0, "gpu"),
        }

    # ------------------------------------------------------------------ writing

    def _write(self, record: dict) -> None:
        # one write of a whole line, flushed: what a SIGKILL leaves is valid JSON lines
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def _sample(self) -> None:
        with self._lock:
            if not self._sampling:
                return
            try:
                rss, cpu_s = _rss_and_cpu_s()
                elapsed, t = time.monotonic() - self._t0, time.time()
                cpu_pct = None
                if self._last is not None and elapsed > self._last[0]:
                    cpu_pct = 100.0 * (cpu_s - self._last[1]) / (elapsed - self._last[0])
                self._last = (elapsed, cpu_s)
                gpus = [self._gpu_sample(i, h) for i, h in self._handles]
                self._energy.add(elapsed, gpus)
                self._write(
                    {
                        "kind": "sample",
                        "t": t,
                        "elapsed_s": elapsed,
                        "cpu_percent": cpu_pct,
                        "rss_mb": rss,
                        "gpus": gpus,
                    }
                )
            except Exception:
                self._sampling = False
                log.warning("telemetry %s: sampling stopped after an error (the job goes on)", self.path, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and self._sampling:
            self._sample()

    # ------------------------------------------------------------------ context

    def __enter__(self) -> Telemetry:
        if not self.enabled:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8", buffering=1)
        except OSError as e:
            log.warning("telemetry: cannot write %s (%s); the job runs without telemetry", self.path, e)
            return self
        gpus, why = self._open_nvml()
        if why is None:
            log.info(
                "telemetry -> %s: NVML, %d GPU(s) %s, every %g s",
                self.path,
                len(gpus),
                [g["index"] for g in gpus],
                self.interval_s,
            )
        else:
            log.info("telemetry -> %s: no NVML (%s); CPU and memory only, every %g s", self.path, why, self.interval_s)
        self._t0 = time.monotonic()
        try:
            self._write(
                {
                    "kind": "start",
                    "rule": self.rule,
                    "job": self.job,
                    "host": socket.gethostname(),
                    "nvml": why is None,
                    "nvml_error": why,
                    "gpus": gpus,
                    "cuda_visible_devices": (os.environ if self._environ is None else self._environ).get(
                        "CUDA_VISIBLE_DEVICES"
                    ),
                    "interval_s": self.interval_s,
                    "t": time.time(),
                }
            )
        except Exception:
            log.warning("telemetry %s: cannot write the start line; no telemetry", self.path, exc_info=True)
            self._close()
            return self
        self._sampling = True
        self._sample()
        self._thread = threading.Thread(target=self._run, name=f"kdflow-telemetry-{self.job}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 10)
        self._sample()
        with self._lock:
            self._sampling = False
            try:
                tokens = None if self.tokens is None else int(self.tokens)
                energy = self._energy.total_j()
                self._write(
                    {
                        "kind": "end",
                        "t": time.time(),
                        "elapsed_s": time.monotonic() - self._t0,
                        "tokens": tokens,
                        "load_s": None if self.load_s is None else float(self.load_s),
                        "compute_s": None if self.compute_s is None else float(self.compute_s),
                        "energy_j": energy if energy is None or math.isfinite(energy) else None,
                        "ok": exc_type is None,
                    }
                )
            except Exception:
                log.warning("telemetry %s: cannot write the end line", self.path, exc_info=True)
            self._close()

    def _close(self) -> None:
        try:
            self._file.close()
        except Exception:
            pass
        self._file = None
        if self._nvml is not None:
            _shutdown(self._nvml)
            self._nvml = None


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass


def job_telemetry(smk: Any, enabled: bool = True) -> Telemetry:
    """The :class:`Telemetry` of a Snakemake script job: the file is ``results/telemetry/<rule>/<wildcards>.jsonl``
    (derived here, not a rule param, so that adding telemetry never reruns a finished GPU job), the settings
    are the config's ``telemetry`` section (read from the config rather than params, so that changing the
    interval never reruns a finished job), the job's name its wildcard values. ``enabled=False``: nothing
    (e.g. a rank other than 0 of a launched run)."""
    settings = (getattr(smk, "config", None) or {}).get("telemetry") or {}
    name = ".".join(str(v) for v in smk.wildcards) or smk.rule
    return Telemetry(
        Path(TELEMETRY_DIR) / smk.rule / f"{name}.jsonl",
        rule=smk.rule,
        job=name,
        interval_s=settings.get("interval_s", DEFAULT_INTERVAL_S),
        enabled=enabled and settings.get("enabled", True),
    )
