"""Where a prepared model runs with ``device="auto"``: spread over the job's visible GPUs, and only over
them. :func:`kdflow.models.load_model` checks before loading (:func:`check_fits_gpus`) and after
(:func:`check_on_gpus`), so a model that does not fit is refused instead of run with layers offloaded to
CPU memory or disk, hours slower."""

from __future__ import annotations

import os

import torch

from kdflow.models import DTYPES, ModelError

# What to change when a model does not fit the GPUs a job was given (device: auto).
_MORE_GPUS = ("give the job more GPUs (profiles/slurm: KDFLOW_TEACHER_GPUS for prepare_models and the teacher "
              "caches, KDFLOW_EVAL_GPUS for eval; docs/cluster.md) or set the config's device to cpu to run on "
              "the CPU on purpose")


def _visible_gpus() -> str:
    return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"


def model_bytes(info: dict, dtype: str) -> int:
    """Bytes of a prepared model's parameters in ``dtype``, counted on an empty (meta-device) copy built from
    its config: no weights are read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(info["load_path"], revision=info.get("revision"))
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return sum(p.numel() * p.element_size() for p in empty.parameters())


def check_fits_gpus(info: dict, dtype: str) -> None:
    """Before loading with ``device="auto"``: refuse when no GPU is visible or when the parameters alone need
    more than the visible GPUs have free (the error says what to set)."""
    n_gpus = torch.cuda.device_count()
    if n_gpus == 0:
        raise ModelError(f"{info['load_path']}: device auto spreads the model over the job's GPUs, but this "
                         f"process sees none ({_visible_gpus()}); {_MORE_GPUS}")
    need = model_bytes(info, dtype)
    free = [torch.cuda.mem_get_info(i)[0] for i in range(n_gpus)]
    if need > sum(free):
        raise ModelError(f"{info['load_path']}: its parameters need {need / 2**30:.1f} GiB in {dtype}, but the "
                         f"{n_gpus} visible GPU(s) have {sum(free) / 2**30:.1f} GiB free "
                         f"({', '.join(f'{f / 2**30:.1f}' for f in free)}; {_visible_gpus()}); {_MORE_GPUS}")


def check_on_gpus(info: dict, device_map: dict) -> None:
    """After loading with ``device="auto"``: refuse a placement that put any module on the CPU or disk."""
    offloaded = sorted(name for name, where in device_map.items() if str(where) in ("cpu", "disk", "meta"))
    if offloaded:
        where = sorted({str(device_map[name]) for name in offloaded})
        raise ModelError(f"{info['load_path']}: device auto placed {len(offloaded)} of {len(device_map)} modules "
                         f"on {' and '.join(where)} (first: {offloaded[0]}), not on the GPUs "
                         f"({_visible_gpus()}): the model does not fit them with room for its activations; "
                         f"{_MORE_GPUS}")
