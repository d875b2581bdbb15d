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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdflow.atomic import atomic_path, write_json
from kdflow.train.distributed import Dist, barrier, gather
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


@dataclass
class Resumable:
    """What a checkpoint restores besides the RNG states: the trainable weights of ``model``, the optimiser, the
    scheduler, and the data position of ``batches`` (kdflow.train.batches.Batches)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Any


def save(work: Path, ctx: Dist, parts: Resumable, info: dict[str, Any], keep: int) -> Path:
    """A checkpoint at ``info["step"]``, collectively: every rank's data position and RNG states are gathered
    before rank 0 writes; ``info`` (JSON) gets the data positions."""
    data = gather(parts.batches.state_dict(), ctx)
    rng = gather(rng_state(ctx.device), ctx)
    target = checkpoint_dir(work, info["step"])
    if ctx.main:
        state = {
            "trainable": trainable_state(parts.model),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "rng": rng,
        }
        write_checkpoint(target, state, {**info, "data": data}, keep)
    barrier(ctx)
    return target


def resume(work: Path, ctx: Dist, key: str, parts: Resumable) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint loaded into ``parts``, the RNGs and this rank's data position, with its
    ``checkpoint.json``; None if there is none, or none made with this resume ``key`` (moved aside)."""
    found = latest_checkpoint(work)
    if found is None:
        return None
    latest, info = found
    if info.get("resume_key") != key:
        if ctx.main:
            move_aside(work, latest)
        barrier(ctx)
        return None
    state = read_state(latest)
    load_trainable(parts.model, state["trainable"], latest)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][ctx.rank], ctx.device)
    parts.batches.load_state_dict(info["data"][ctx.rank])
    return latest, info
