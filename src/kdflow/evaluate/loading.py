"""Loading the model to evaluate: a prepared model (kdflow.models) with a trained run's PEFT adapter on top,
and the identity of those weights that the eval records' provenance carries."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch

from kdflow.config import config_hash
from kdflow.errors import KdflowError
from kdflow.manifest import ModelManifest
from kdflow.models import load_model, load_tokenizer, read_manifest
from kdflow.provenance import file_sha256


class EvalError(KdflowError, RuntimeError):
    """An evaluation that cannot run (missing or mismatched inputs); the message says what to do."""


def load_eval_model(
    manifest: str | Path | ModelManifest,
    adapter_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
):
    """``(model, tokenizer, info)``: a prepared model (its manifest path or resolved manifest) in eval
    mode, with a trained run's PEFT adapter on top when ``adapter_dir`` is given (not merged).

    Refuses an adapter whose ``run_config.json`` names another student than the manifest."""
    info = manifest if isinstance(manifest, ModelManifest) else read_manifest(manifest)
    tokenizer = load_tokenizer(info)
    model = load_model(info, device, dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise EvalError(
                f"{adapter_dir}: no adapter_config.json; not a finished training run (rerun `snakemake {adapter_dir}`)"
            )
        trained_on = _run_config(adapter_dir).get("spec", {}).get("student")
        if trained_on is not None and trained_on != info.name:
            raise EvalError(
                f"{adapter_dir}: the adapter was trained on student {trained_on!r}, but the base "
                f"model given is {info.name!r}"
            )
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval(), tokenizer, info


def _run_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "run_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def model_identity(info: ModelManifest, adapter_dir: str | Path | None = None) -> dict[str, Any]:
    """What identifies the evaluated weights: the manifest's name, source and hashes, and for a run its
    adapter directory, the hash of its run config and of its adapter weights."""
    ident: dict[str, Any] = {
        "name": info.name,
        "role": info.role,
        "origin": info.origin,
        "load_path": info.load_path,
        "revision": info.revision,
        "source_hash": info.source_hash,
        "source_hash_of": info.source_hash_of,
        "tokenizer_fingerprint": info.tokenizer_fingerprint,
        "config_hash": info.config_hash,
    }
    ident["adapter"] = None
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        run_config = _run_config(adapter_dir)
        weights = adapter_dir / "adapter_model.safetensors"
        rc = adapter_dir / "run_config.json"
        ident["adapter"] = {
            "dir": str(adapter_dir.resolve()),
            "run": run_config.get("spec", {}).get("name"),
            "run_hash": config_hash(run_config["spec"]) if "spec" in run_config else None,  # = train provenance
            "run_config_sha256": file_sha256(rc) if rc.is_file() else None,
            "adapter_sha256": file_sha256(weights) if weights.is_file() else None,
        }
    return ident


def release_memory() -> None:
    """Give back what a dropped model held (before lm-eval loads its own copy)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
