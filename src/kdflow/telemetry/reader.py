"""The telemetry reader: one job's JSON-lines file (the format: :mod:`kdflow.telemetry`) as the rows of the
results' ``telemetry`` and ``energy`` tables (:mod:`kdflow.results`), with every problem named by file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdflow.telemetry.energy import EnergyMeter

GPU_FIELDS = ("power_w", "energy_j", "mem_used_mb", "util_gpu")  # the numbers of a sample's GPU entry


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _opt_number(record: dict, key: str) -> bool:
    v = record.get(key)
    return v is None or (_is_number(v) and math.isfinite(float(v)))


def _opt_float(record: dict | None, key: str) -> float | None:
    value = None if record is None else record.get(key)
    return None if value is None else float(value)


def _max(*values: float | None) -> float | None:
    present = [float(v) for v in values if v is not None]
    return max(present) if present else None


def load_telemetry(path: str | Path, problems: list[str]) -> tuple[list[dict], dict | None]:
    """One telemetry file: its sample rows and its job's energy row (None if unreadable).

    A file without its end line (a killed job) still counts, with ``complete`` false: its elapsed time and
    energy are taken from the samples.
    """
    p = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        problems.append(f"{p}: telemetry file not found")
        return [], None
    except UnicodeDecodeError as e:
        problems.append(f"{p}: not UTF-8 text ({e}); delete it or rerun the job")
        return [], None
    start: dict | None = None
    end: dict | None = None
    rows: list[dict] = []
    meter = EnergyMeter()
    samples = 0
    last_elapsed: float | None = None
    peak_mem: float | None = None
    peak_rss: float | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        fix = f"delete {p} or rerun its job" + (f" ({start['rule']} {start['job']})" if start else "")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e}); {fix}")
            return [], None
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if start is None:
            if kind != "start" or not isinstance(rec.get("rule"), str) or not isinstance(rec.get("job"), str):
                problems.append(
                    f"{where}: the first line of a telemetry file must be its start line (kind "
                    f"start, with rule and job), found {line[:80]!r}; {fix}"
                )
                return [], None
            start = rec
            continue
        if end is not None:
            problems.append(f"{where}: a line after the end line; {fix}")
            return [], None
        if kind == "sample":
            gpus = rec.get("gpus", [])
            bad = [k for k in ("elapsed_s", "t") if not _is_number(rec.get(k))]
            bad += [k for k in ("cpu_percent", "rss_mb") if not _opt_number(rec, k)]
            if not isinstance(gpus, list) or not all(
                isinstance(g, dict) and isinstance(g.get("index"), int) and not isinstance(g["index"], bool)
                for g in gpus
            ):
                bad.append("gpus")
            else:
                bad += [f"gpus[{i}].{k}" for i, g in enumerate(gpus) for k in GPU_FIELDS if not _opt_number(g, k)]
            if bad:
                problems.append(f"{where}: sample with missing or non-numeric {', '.join(bad)}; {fix}")
                return [], None
            base = {
                "rule": start["rule"],
                "job": start["job"],
                "sample": samples,
                "t": float(rec["t"]),
                "elapsed_s": float(rec["elapsed_s"]),
                "cpu_percent": rec.get("cpu_percent"),
                "rss_mb": rec.get("rss_mb"),
                "line": n,
                "source": p,
            }
            for g in gpus or [None]:
                rows.append(
                    {
                        **base,
                        "gpu": None if g is None else g["index"],
                        **{k: None if g is None else g.get(k) for k in GPU_FIELDS},
                    }
                )
            meter.add(float(rec["elapsed_s"]), gpus)
            peak_mem = _max(peak_mem, *(g.get("mem_used_mb") for g in gpus))
            peak_rss = _max(peak_rss, rec.get("rss_mb"))
            last_elapsed = float(rec["elapsed_s"])
            samples += 1
        elif kind == "end":
            tokens = rec.get("tokens")
            bad = [k for k in ("elapsed_s",) if not _is_number(rec.get(k))]
            bad += [k for k in ("energy_j", "load_s", "compute_s") if not _opt_number(rec, k)]
            if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
                bad.append("tokens")
            if bad:
                problems.append(f"{where}: end line with missing or invalid {', '.join(bad)}; {fix}")
                return [], None
            end = rec
        else:
            problems.append(f"{where}: unknown line kind {kind!r} (expected sample or end); {fix}")
            return [], None
    if start is None:
        problems.append(f"{p}: empty telemetry file; delete it or rerun its job")
        return [], None
    gpu_info = start.get("gpus") or []
    names = [str(g.get("name")) for g in gpu_info if isinstance(g, dict) and g.get("name") is not None]
    energy = end.get("energy_j") if end is not None else meter.total_j()
    tokens = end.get("tokens") if end is not None else None
    job = {
        "rule": start["rule"],
        "job": start["job"],
        "host": start.get("host"),
        "nvml": bool(start.get("nvml")),
        "nvml_error": start.get("nvml_error"),
        "gpus": len(gpu_info),
        "gpu_names": ", ".join(names) or None,
        "samples": samples,
        "complete": end is not None and end.get("ok", True) is not False,
        "elapsed_s": float(end["elapsed_s"]) if end is not None else last_elapsed,
        "tokens": tokens,
        "load_s": _opt_float(end, "load_s"),
        "compute_s": _opt_float(end, "compute_s"),
        "energy_j": None if energy is None else float(energy),
        "energy_per_token_j": float(energy) / tokens if energy is not None and tokens else None,
        "peak_gpu_mem_mb": peak_mem,
        "peak_rss_mb": peak_rss,
        "source": p,
    }
    return rows, job
