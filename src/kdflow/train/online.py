"""The teacher online, for the full-KD reference (``teacher_logits.source: online``): loaded beside the student on
the training device, frozen, and run on every batch (:class:`kdflow.losses.FullKDLoss` compares its logits over
the whole vocabulary). A teacher whose parameters would not fit the device's free memory is refused before its
weights are read."""

from __future__ import annotations

import torch

from kdflow.train.job import TrainingError


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's (CUDA), or the machine's available memory (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def load_online_teacher(manifest: str, device: torch.device, dtype: str, run: str) -> torch.nn.Module:
    """The frozen teacher on ``device`` in ``dtype``; :class:`TrainingError` (naming the key and the sizes) when its
    parameter bytes exceed the device's free memory."""
    from kdflow.models import load_model, model_bytes, read_manifest

    info = read_manifest(manifest)
    need, free = model_bytes(info.weights, dtype), free_bytes(device)
    if need > free:
        raise TrainingError(
            f"run {run}: teacher_logits.source: online loads teacher {info.name!r} beside the student on {device}; its "
            f"parameters need {need / 2**30:.2f} GiB in {dtype}, but {device} has {free / 2**30:.2f} GiB free. Use a "
            "logit cache for this run (teacher_logits.source: cache), or train on a device with more memory"
        )
    teacher = load_model(info, str(device), dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
