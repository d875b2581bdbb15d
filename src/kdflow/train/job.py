"""What one training run is given: a :class:`TrainJob` (JSON, so that every process of a launcher reads the same)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdflow.atomic import write_json
from kdflow.errors import KdflowError

if TYPE_CHECKING:
    from kdflow.cache_format import CacheMeta
    from kdflow.manifest import ModelManifest
    from kdflow.runs import RunSpec


class TrainingError(KdflowError, RuntimeError):
    """A run that cannot start or cannot go on (bad inputs, diverged loss)."""


@dataclass
class TrainJob:
    """Everything one run needs; JSON-serialisable so that a launcher's processes can read it."""

    spec: dict[str, Any]  # the run's RunSpec.to_json() (kdflow.runs); the trainer reads it with RunSpec.from_json
    student_manifest: str  # the student's kdflow_model.json
    shards: list[dict[str, str | None]]  # [{"topk": …, "embed": … | None, "hidden": … | None}] training shards
    expected: dict[str, Any]  # cache metadata the files must carry (k, max_length, layers …)
    output: str  # the run directory (the rule's declared output)
    work: str  # checkpoints and metrics, outside the declared outputs
    heldout: str | None = None  # held-out shard Parquet for the end-of-training perplexity
    threads: int | None = None  # torch threads per process (None: leave torch's default)
    teacher_manifest: str | None = None  # the teacher's kdflow_model.json, for a run with the teacher online

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> TrainJob:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def training_shards(
    topk_index: str | Path, embed_index: str | Path | None = None, hidden_index: str | Path | None = None
) -> list[dict[str, str | None]]:
    """Per training shard, its file of each cache the run reads (from the caches' index files, kdflow.cache_index);
    ``None`` for a cache the run does not read."""
    from kdflow.cache_index import index_files

    topk = index_files(topk_index)
    embed = index_files(embed_index) if embed_index is not None else [None] * len(topk)
    hidden = index_files(hidden_index) if hidden_index is not None else [None] * len(topk)
    return [{"topk": t, "embed": e, "hidden": h} for t, e, h in zip(topk, embed, hidden, strict=True)]


@dataclass
class RunInputs:
    """What the run's input files say, read and checked before anything is loaded."""

    student: ModelManifest  # the student's manifest
    metas: list[CacheMeta]  # each training shard's top-k cache metadata
    own_vocab: bool  # the student's tokenizer is not the teacher's (relation KD only)
    need: dict[str, bool]  # {"embed": …, "hidden": …}: the caches the run reads
    teacher_hidden: int | None  # the teacher's width (fb), from the hidden cache


def read_inputs(job: TrainJob, spec: RunSpec) -> RunInputs:
    """The student's manifest and the caches' metadata, checked against the run's terms: a student of another
    vocabulary is refused for rb/fb, a cache a term needs must exist for every shard."""
    from kdflow.cache_format import check_student_vocab, read_meta
    from kdflow.models import read_manifest
    from kdflow.runs import caches_read

    student = read_manifest(job.student_manifest)
    metas = [read_meta(s["topk"]) for s in job.shards]
    if not job.shards:
        raise TrainingError(f"run {spec.name}: no training shards given")
    for term in spec.terms:
        for s, meta in zip(job.shards, metas, strict=True):
            check_student_vocab(meta, student, term, s["topk"])
    own_vocab = student.tokenizer_fingerprint != metas[0].tokenizer_fingerprint
    need = caches_read(spec.terms, own_vocab)
    for kind, wanted in need.items():
        if wanted and any(not s.get(kind) for s in job.shards):
            raise TrainingError(
                f"run {spec.name}: the {kind} cache of every shard is needed for terms "
                f"{sorted(spec.terms)}, but some shard has none"
            )
    teacher_hidden = read_meta(job.shards[0]["hidden"]).hidden_size if need["hidden"] else None
    return RunInputs(student, metas, own_vocab, need, teacher_hidden)


def resume_key(job: TrainJob, inputs: RunInputs, world: int) -> str:
    """What a checkpoint must have been made by to be resumed: the run (its spec as the job carries it), its
    inputs, the world size."""
    from kdflow.config import config_hash

    caches = [(m.shard, m.shard_sha256, m.settings_hash) for m in inputs.metas]
    return config_hash(
        {
            "spec": job.spec,
            "expected": job.expected,
            "caches": caches,
            "student": inputs.student.config_hash,
            "world": world,
            "own_vocab": inputs.own_vocab,
        }
    )
