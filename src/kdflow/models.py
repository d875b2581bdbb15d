"""Prepared models loaded back by their manifest (``kdflow.prepare`` writes the manifests).

Every prepared model is described by ``resources/models/<name>/kdflow_model.json`` (the rule's
output). It says where the weights are (``load_path``: a local directory relative to the manifest, or a
hub id with its resolved revision), how the model was made (GGUF conversion, layer pruning, as is), the
tokenizer fingerprint, and the held-out perplexity measured at preparation. Everything downstream loads
models through :func:`load_model` / :func:`load_tokenizer` with that manifest, never by guessing paths. The
manifest's contract is :class:`kdflow.manifest.ModelManifest`; :func:`read_manifest` reads one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kdflow.errors import KdflowError
from kdflow.manifest import ManifestError, ModelManifest, Weights

MANIFEST_NAME = "kdflow_model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(KdflowError, RuntimeError):
    """A model that cannot be found, converted, pruned or matched; the message says what to do."""


# --------------------------------------------------------------------------- locating sources


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@dataclass(frozen=True)
class ResolvedHf:
    """An ``hf`` model reference resolved: the manifest fields of its weights."""

    load_path: str  # the local directory (absolute) or the hub id
    revision: str | None  # the hub commit it resolved to; None for a directory
    origin: str  # local_dir | hub
    source_hash: str
    source_hash_of: str

    @property
    def weights(self) -> Weights:
        return Weights(self.load_path, self.revision)


def resolve_hf(path: str, revision: str | None, key: str) -> ResolvedHf:
    """Describe an ``hf`` model reference: a local directory is used in place, a hub id is fetched
    into (or found in) the Hugging Face cache and pinned to the commit it resolved to."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{key} {path!r}: directory has no config.json; it is not a Hugging Face model")
        # Hashing every weight file of a 140 GB model would take minutes; names, sizes and modification
        # times catch weights replaced in place.
        listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.iterdir() if p.is_file())
        digest = hashlib.sha256(json.dumps(listing).encode() + (local / "config.json").read_bytes()).hexdigest()
        return ResolvedHf(
            load_path=str(local.resolve()),
            revision=None,
            origin="local_dir",
            source_hash=digest,
            source_hash_of="config.json + file names, sizes and mtimes",
        )
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelError(f"{key} {path!r}: no such directory, and not a hub id of the form org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snap = snapshot_download(
            path,
            revision=revision,
            local_files_only=_offline(),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
        )
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        why = (
            "offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
            if _offline()
            else f"the hub could not be reached to fetch it ({type(e.__cause__ or e).__name__}: no network here?)"
        )
        fix = ", or unset the offline variable" if _offline() else ""
        raise ModelError(
            f"{key} {path!r}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. Download "
            f"it once where the network is reachable (`hf download {path}`), or point HF_HOME at a cache that has "
            f"it{fix}."
        ) from e
    except Exception as e:  # network, auth (gated models need HF_TOKEN in the environment), bad revision
        raise ModelError(f"{key} {path!r} (revision {revision or 'main'}): could not be fetched: {e}") from e
    if not any(Path(snap).glob("*.safetensors")):
        raise ModelError(
            f"{key} {path!r}: the hub repository has no .safetensors weights; convert it or use a local directory"
        )
    resolved = Path(snap).name  # snapshot directories are named after the commit
    return ResolvedHf(
        load_path=path, revision=resolved, origin="hub", source_hash=resolved, source_hash_of="hub commit"
    )


# --------------------------------------------------------------------------- tokenizer checks


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the token -> id map (added tokens included): equal fingerprints mean token ids agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- manifests and loading


def resolve_load_path(info: ModelManifest, manifest: Path) -> ModelManifest:
    """``info`` with ``load_path`` made absolute (local weights sit beside the manifest)."""
    if info.origin == "hub":
        return info
    path = Path(info.load_path)
    info = replace(info, load_path=str(path if path.is_absolute() else (manifest.parent / path).resolve()))
    if not Path(info.load_path).is_dir():
        raise ModelError(
            f"{manifest}: its weights directory {info.load_path} is missing; rebuild it "
            f"with `snakemake --force {manifest}`"
        )
    return info


def read_manifest(manifest: str | Path) -> ModelManifest:
    """A prepared model's manifest, with ``load_path`` ready for ``from_pretrained``."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ModelError(f"{manifest}: no prepared model here; run `snakemake {manifest}` first")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{manifest}: not JSON ({e}); rebuild it with `snakemake --force {manifest}`") from None
    try:
        info = ModelManifest.from_json(data, manifest)
    except ManifestError as e:
        raise ModelError(
            f"{e}; not a manifest this kdflow reads: rebuild it with `snakemake --force {manifest}`"
        ) from None
    return resolve_load_path(info, manifest)


def _weights(model_ref: str | Path | ModelManifest | Weights) -> Weights:
    if isinstance(model_ref, Weights):
        return model_ref
    return (model_ref if isinstance(model_ref, ModelManifest) else read_manifest(model_ref)).weights


def load_tokenizer(model_ref: str | Path | ModelManifest | Weights):
    """The tokenizer of a prepared model, given its manifest path (or its resolved manifest, or where its
    weights are)."""
    from transformers import AutoTokenizer

    w = _weights(model_ref)
    return AutoTokenizer.from_pretrained(w.load_path, revision=w.revision)


def load_model(
    model_ref: str | Path | ModelManifest | Weights, device: str = "cpu", dtype: str = "float32", tp_size: int = 1
):
    """Load a prepared model for inference (given as for :func:`load_tokenizer`). ``device="auto"`` spreads it
    over the visible GPUs, and only over them: a model that does not fit them is refused
    (:func:`check_fits_gpus`, :func:`check_on_gpus`) rather than run with layers offloaded to CPU memory or
    disk, hours slower. ``tp_size > 1``: this process is one rank of ``tp_size`` (torchrun, process group
    initialised: :func:`kdflow.teacher_parallel.init_ranks`) and holds its slice of every layer, split by
    transformers' tensor-parallel plan (:func:`check_tensor_parallel` first)."""
    from transformers import AutoModelForCausalLM

    w = _weights(model_ref)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "revision": w.revision}
    if tp_size > 1:
        from transformers.distributed import DistributedConfig

        check_tensor_parallel(w, tp_size)
        model = AutoModelForCausalLM.from_pretrained(
            w.load_path, distributed_config=DistributedConfig(tp_size=tp_size), **kwargs
        )
        return model.eval()
    if device == "auto":
        check_fits_gpus(w, dtype)
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(w.load_path, **kwargs)
    if device == "auto":
        check_on_gpus(w, getattr(model, "hf_device_map", None) or {})
    else:
        model.to(device)
    return model.eval()


_TP_FALLBACK = "set teacher_cache.parallel: device_map (with device: auto) to spread it over the GPUs instead"


def check_tensor_parallel(weights: Weights, ranks: int) -> None:
    """Before a tensor-parallel load: the model's architecture has a tensor-parallel plan in transformers and
    ``ranks`` divides its attention and key-value heads (the message names the key and the fallback)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(weights.load_path, revision=weights.revision)
    config = config.get_text_config()
    if not getattr(config, "base_model_tp_plan", None):
        raise ModelError(
            f"{weights.load_path}: teacher_cache.parallel is tensor, but transformers has no tensor-parallel "
            f"plan for its architecture {config.model_type!r}; {_TP_FALLBACK}"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % ranks or kv_heads % ranks:
        raise ModelError(
            f"{weights.load_path}: {ranks} tensor-parallel ranks (teacher_cache.tp_size, or the job's GPUs) do not "
            f"divide its {heads} attention and {kv_heads} key-value heads; give teacher jobs a divisor of "
            f"{math.gcd(heads, kv_heads)} GPUs (KDFLOW_TEACHER_GPUS), or {_TP_FALLBACK}"
        )


def pad_id_of(tokenizer) -> int:
    """The id batches are right-padded with: the tokenizer's pad token, else 0 (padded positions are masked
    out, so any id in the vocabulary serves)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def input_device(model) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first GPU of a ``device="auto"``
    placement)."""
    return model.get_input_embeddings().weight.device


# --------------------------------------------------------------------------- placement on the job's GPUs
# Where a prepared model runs with device="auto": spread over the job's visible GPUs, and only over them.

# What to change when a model does not fit the GPUs a job was given (device: auto).
_MORE_GPUS = (
    "give the job more GPUs (profiles/slurm: KDFLOW_TEACHER_GPUS for prepare_models and the teacher "
    "caches, KDFLOW_EVAL_GPUS for eval; docs/cluster.md) or set the config's device to cpu to run on "
    "the CPU on purpose"
)


def _visible_gpus() -> str:
    return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"


def model_bytes(weights: Weights, dtype: str) -> int:
    """Bytes of a prepared model's parameters in ``dtype``, counted on an empty (meta-device) copy built from
    its config: no weights are read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(weights.load_path, revision=weights.revision)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return sum(p.numel() * p.element_size() for p in empty.parameters())


def check_fits_gpus(weights: Weights, dtype: str) -> None:
    """Before loading with ``device="auto"``: refuse when no GPU is visible or when the parameters alone need
    more than the visible GPUs have free (the error says what to set)."""
    n_gpus = torch.cuda.device_count()
    if n_gpus == 0:
        raise ModelError(
            f"{weights.load_path}: device auto spreads the model over the job's GPUs, but this "
            f"process sees none ({_visible_gpus()}); {_MORE_GPUS}"
        )
    need = model_bytes(weights, dtype)
    free = [torch.cuda.mem_get_info(i)[0] for i in range(n_gpus)]
    if need > sum(free):
        raise ModelError(
            f"{weights.load_path}: its parameters need {need / 2**30:.1f} GiB in {dtype}, but the "
            f"{n_gpus} visible GPU(s) have {sum(free) / 2**30:.1f} GiB free "
            f"({', '.join(f'{f / 2**30:.1f}' for f in free)}; {_visible_gpus()}); {_MORE_GPUS}"
        )


def check_on_gpus(weights: Weights, device_map: dict) -> None:
    """After loading with ``device="auto"``: refuse a placement that put any module on the CPU or disk."""
    offloaded = sorted(name for name, where in device_map.items() if str(where) in ("cpu", "disk", "meta"))
    if offloaded:
        where = sorted({str(device_map[name]) for name in offloaded})
        raise ModelError(
            f"{weights.load_path}: device auto placed {len(offloaded)} of {len(device_map)} modules "
            f"on {' and '.join(where)} (first: {offloaded[0]}), not on the GPUs "
            f"({_visible_gpus()}): the model does not fit them with room for its activations; "
            f"{_MORE_GPUS}"
        )
