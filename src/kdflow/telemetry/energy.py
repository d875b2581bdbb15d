"""The energy of a job from its telemetry samples: what the sampler writes on the end line and what the reader
takes for a file without one (a killed job)."""

from __future__ import annotations

from typing import Any


class EnergyMeter:
    """Energy of a job from its samples, summed over GPUs.

    Per GPU the difference of the driver's energy counter (exact: the driver integrates at a high rate);
    where the counter is unsupported (older GPUs) or goes backwards (a driver reload), the trapezoid integral
    of the sampled power instead (an estimate, as good as the sampling interval).
    """

    def __init__(self) -> None:
        self._gpus: dict[int, dict[str, Any]] = {}

    def add(self, elapsed_s: float, gpus: list[dict]) -> None:
        for g in gpus:
            s = self._gpus.setdefault(
                g["index"], {"first": None, "last": None, "counter": True, "joules": 0.0, "power": None, "powered": 0}
            )
            energy, power = g.get("energy_j"), g.get("power_w")
            if energy is None:
                s["counter"] = False
            else:
                s["first"] = energy if s["first"] is None else s["first"]
                s["last"] = energy
            if power is not None:
                if s["power"] is not None:
                    t0, p0 = s["power"]
                    s["joules"] += (elapsed_s - t0) * (power + p0) / 2
                s["power"] = (elapsed_s, power)
                s["powered"] += 1

    def total_j(self) -> float | None:
        """Joules over every GPU measured; None when no GPU had a counter or two power readings."""
        total, measured = 0.0, False
        for s in self._gpus.values():
            if s["counter"] and s["first"] is not None and s["last"] >= s["first"]:
                total += s["last"] - s["first"]
            elif s["powered"] >= 2:
                total += s["joules"]
            else:
                continue
            measured = True
        return total if measured else None
