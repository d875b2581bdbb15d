"""Checkpoints in ``work/checkpoints/step_NNNNNNNN/``: ``state.pt`` (trainable weights, optimiser, scheduler, every
rank's RNG states) and ``checkpoint.json`` (step, tokens, elapsed time, every rank's data position, the resume
key). Written atomically by rank 0; the newest ``keep`` are kept. A checkpoint whose resume key is not this run's
(other settings, shards, student or world size) is moved aside, never resumed."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdflow.atomic import atomic_path, write_json
from kdflow.train.job import TrainingError

log = logging.getLogger("kdflow.train")

CHECKPOINT_PREFIX = "step_"


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, trainable: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a checkpoint's trainable weights into ``module``; every trainable weight must be there."""
    own = dict(module.named_parameters())
    missing = sorted(set(n for n, p in own.items() if p.requires_grad) - set(trainable))
    if missing:
        raise TrainingError(
            f"{where}: checkpoint lacks trainable weights {missing[:3]}…; delete {where.parent} to start over"
        )
    with torch.no_grad():
        for name, value in trainable.items():
            own[name].copy_(value.to(own[name].device))


def checkpoint_dir(work: Path, step: int) -> Path:
    return work / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoints(work: Path) -> list[Path]:
    """The checkpoints in ``work``, oldest first."""
    root = work / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        (
            p
            for p in root.iterdir()
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        ),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
    )


def write_checkpoint(target: Path, state: dict[str, Any], info: dict[str, Any], keep: int) -> None:
    """``state`` (torch objects) and ``info`` (JSON) as the checkpoint ``target``; older ones beyond ``keep`` go."""
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
        write_json(tmp / "checkpoint.json", info)
    work = target.parents[1]
    for old in checkpoints(work)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint at step %d: %s", info["step"], target)


def latest_checkpoint(work: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint and its ``checkpoint.json``, or None."""
    found = checkpoints(work)
    if not found:
        return None
    return found[-1], json.loads((found[-1] / "checkpoint.json").read_text(encoding="utf-8"))


def move_aside(work: Path, latest: Path) -> None:
    """Checkpoints of another version of the run: kept (``stale-<time>``), never resumed."""
    aside = work / f"stale-{int(time.time())}"
    (work / "checkpoints").rename(aside)
    log.warning(
        "%s was written by another version of this run (other settings, shards, student or "
        "world size); moved the checkpoints to %s and starting from step 0",
        latest,
        aside,
    )


def read_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
