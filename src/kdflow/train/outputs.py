"""What a run leaves: ``work/metrics.jsonl`` while it trains (one JSON line per optimiser step, trimmed back to
the checkpoint's step on resume) and, when it is done, the run directory ``results/train/<run>/`` (atomic):

``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT: loads with ``PeftModel.from_pretrained(base, dir)``
and lm-eval's ``pretrained=BASE,peft=DIR``), ``projector.safetensors`` (fb), ``run_config.json`` (the resolved
run), ``provenance.json``, ``metrics.jsonl`` and ``summary.json`` (end-of-training held-out perplexity,
throughput).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from kdflow.atomic import atomic_path, write_json
from kdflow.config import config_hash
from kdflow.provenance import provenance
from kdflow.train.job import RunInputs, TrainJob

if TYPE_CHECKING:
    from kdflow.cache_format import CacheMeta
    from kdflow.manifest import ModelManifest
    from kdflow.runs import RunSpec

log = logging.getLogger("kdflow.train")


def metrics_file(work: Path) -> Path:
    return work / "metrics.jsonl"


def trim_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps up to ``step`` (a resumed run rewrites what came after)."""
    if step == 0 or not path.exists():
        path.unlink(missing_ok=True)
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by a kill: nothing after it counts
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")


class MetricsLog:
    """``work/metrics.jsonl``, written by rank 0 only (``enabled``): trimmed back to ``step`` (a resumed run
    rewrites what came after), then one key-sorted JSON line per optimiser step, flushed at once."""

    def __init__(self, work: Path, step: int, enabled: bool):
        self.file = None
        if enabled:
            trim_metrics(metrics_file(work), step)
            self.file = open(metrics_file(work), "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row, sort_keys=True) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run_summary(
    spec: RunSpec,
    metrics: Path,
    *,
    steps: int,
    tokens: int,
    elapsed: float,
    world: int,
    resumes: list[int],
    student: ModelManifest,
) -> dict[str, Any]:
    """``summary.json`` without its ``heldout`` entry: totals, throughput, the mean of the last 5 steps' terms."""
    rows = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    last = rows[-min(len(rows), 5) :]
    return {
        "run": spec.name,
        "student": spec.student,
        "mode": spec.mode,
        "seed": spec.seed,
        "terms": spec.terms,
        "steps": steps,
        "tokens": tokens,
        "train_seconds": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed else None,
        "world_size": world,
        "resumed_from_steps": resumes,
        "final": {k: float(np.mean([r[k] for r in last])) for k in ("loss", *spec.terms)} if last else {},
        "student_heldout_ppl_init": student.heldout.ppl if student.heldout is not None else None,
    }


def run_provenance(
    job: TrainJob, spec: RunSpec, resume_key: str, student: ModelManifest, metas: list[CacheMeta]
) -> dict[str, Any]:
    top = metas[0]
    return {
        **provenance(),
        "run": spec.name,
        "seed": spec.seed,
        "run_hash": config_hash(job.spec),
        "resume_key": resume_key,
        "student": {
            "name": student.name,
            "source": student.source,
            "source_hash": student.source_hash,
            "revision": student.revision,
            "tokenizer_fingerprint": student.tokenizer_fingerprint,
            "config_hash": student.config_hash,
            "load_path": student.load_path,
        },
        "teacher_caches": {
            "teacher": top.teacher,
            "teacher_source_hash": top.teacher_source_hash,
            "teacher_revision": top.teacher_revision,
            "tokenizer_fingerprint": top.tokenizer_fingerprint,
            "k": top.k,
            "max_length": top.max_length,
        },
        "shards": [{"topk": s["topk"], "shard_sha256": m.shard_sha256} for s, m in zip(job.shards, metas, strict=True)],
    }


def heldout_perplexity(model: nn.Module, tokenizer, job: TrainJob, spec: RunSpec) -> dict | None:
    """The trained student's perplexity on the first ``heldout_docs`` held-out documents (None: none asked)."""
    n = spec.heldout_docs
    if not job.heldout or n == 0:
        return None
    from kdflow.perplexity import perplexity
    from kdflow.shards import read_texts

    texts = read_texts(job.heldout, n)
    if not texts:
        return None
    result = perplexity(
        model,
        tokenizer,
        texts,
        max_length=job.expected.get("max_length", 256),
        batch_size=8,
        desc=f"held-out ppl {spec.name}",
    )
    return {**result, "heldout_file": job.heldout}


def write_run_dir(
    job: TrainJob,
    model: nn.Module,
    projectors: nn.ModuleDict,
    metrics: Path,
    summary: dict[str, Any],
    provenance_info: dict[str, Any],
) -> None:
    """The run directory ``job.output``, atomically: adapter, projectors, run config, provenance, metrics, summary."""
    from safetensors.torch import save_file

    with atomic_path(Path(job.output)) as tmp:
        model.save_pretrained(tmp)
        if len(projectors):
            save_file(
                {k: v.contiguous() for k, v in projectors.state_dict().items()}, str(tmp / "projector.safetensors")
            )
        write_run_record(tmp, job, metrics, summary, provenance_info)


def write_run_record(
    directory: Path, job: TrainJob, metrics: Path, summary: dict[str, Any], provenance_info: dict[str, Any]
) -> None:
    """The records of a run directory beside its weights, what kdflow.results reads: ``run_config.json`` (the
    spec and the inputs), ``provenance.json``, ``metrics.jsonl`` (a copy of ``metrics``) and ``summary.json``."""
    write_json(
        directory / "run_config.json",
        {
            "spec": job.spec,
            "expected": job.expected,
            "student_manifest": job.student_manifest,
            "shards": job.shards,
            "heldout": job.heldout,
        },
    )
    write_json(directory / "provenance.json", provenance_info)
    shutil.copyfile(metrics, directory / "metrics.jsonl")
    write_json(directory / "summary.json", summary)


def write_outputs(
    job: TrainJob,
    spec: RunSpec,
    inputs: RunInputs,
    model: nn.Module,
    tokenizer,
    projectors: nn.ModuleDict,
    *,
    steps: int,
    tokens: int,
    elapsed: float,
    world: int,
    resumes: list[int],
    resume_key: str,
) -> dict[str, Any]:
    """The finished run's directory (rank 0): summary with the held-out perplexity, provenance, adapter; the
    summary it wrote."""
    metrics = metrics_file(Path(job.work))
    summary = run_summary(
        spec,
        metrics,
        steps=steps,
        tokens=tokens,
        elapsed=elapsed,
        world=world,
        resumes=resumes,
        student=inputs.student,
    )
    summary["heldout"] = heldout_perplexity(model, tokenizer, job, spec)
    prov = run_provenance(job, spec, resume_key, inputs.student, inputs.metas)
    write_run_dir(job, model, projectors, metrics, summary, prov)
    log.info(
        "run %s done: %d steps, %d tokens in %.0f s; held-out ppl %s (student init %s) -> %s",
        spec.name,
        steps,
        tokens,
        elapsed,
        (summary["heldout"] or {}).get("ppl"),
        summary["student_heldout_ppl_init"],
        job.output,
    )
    return summary
