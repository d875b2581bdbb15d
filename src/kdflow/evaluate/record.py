"""The eval rule itself: :func:`evaluate_model` evaluates one target (a run, the teacher or a student's init)
and writes its ``heldout.json`` and ``lm_eval.json`` records (:class:`kdflow.eval_record.EvalRecord`, the
contract kdflow.results reads) and lm-eval's own ``lm_eval_raw.json``."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from kdflow.atomic import write_json
from kdflow.eval_record import EvalRecord, Metric
from kdflow.evaluate.harness import HELDOUT_TASK, lm_eval_metrics, lm_eval_version, run_lm_eval, write_heldout_task_data
from kdflow.evaluate.heldout import HELDOUT_METRICS, heldout_metrics
from kdflow.evaluate.loading import EvalError, load_eval_model, model_identity, release_memory
from kdflow.models import read_manifest
from kdflow.plan import EvalTarget, PlanError
from kdflow.provenance import provenance
from kdflow.schema import deep_merge, section_defaults

log = logging.getLogger("kdflow.evaluate")


def _sanitised(obj: Any) -> Any:
    """``obj`` as plain JSON values (dtypes, paths and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))


def _settings(settings: dict | None) -> dict:
    """config ``eval`` with the schema's defaults under whatever it leaves out."""
    return deep_merge(section_defaults("eval"), settings or {})


def _record(target: EvalTarget, evaluation: str, metrics: list[Metric], details: dict, prov: dict) -> EvalRecord:
    return EvalRecord(
        model=target.model,
        kind=target.kind,
        student=target.student,
        mode=target.mode,
        seed=target.seed,
        tag=target.tag,
        evaluation=evaluation,
        metrics=metrics,
        details=details,
        provenance=prov,
    )


def evaluate_model(
    target: EvalTarget | dict,
    settings: dict | None,
    heldout_shard: str | Path,
    heldout_topk: str | Path,
    out_heldout: str | Path,
    out_lm_eval: str | Path,
    out_raw: str | Path | None = None,
    work_dir: str | Path | None = None,
    telemetry: Any = None,
) -> dict[str, dict]:
    """Evaluate one model and write ``heldout.json``, ``lm_eval.json`` and ``lm_eval_raw.json`` (default:
    beside ``lm_eval.json``). Returns ``{"heldout": record, "lm_eval": record}``, each the file's object
    (:meth:`EvalRecord.to_json`). ``telemetry`` (the job's :class:`kdflow.telemetry.Telemetry`, if any) is given
    the held-out tokens scored (lm-eval's are not counted) once both records are written.

    ``target``: ``{"model": id, "kind": "run" | "teacher" | "student_init", "student", "mode", "seed",
    "tag", "manifest": kdflow_model.json, "adapter": run directory | None}`` (the eval rule's
    ``eval_target``). ``settings``: config ``eval`` (``device``, ``dtype``, ``heldout.{max_docs,
    batch_size}``, ``lm_eval.{tasks, include_path, limit, num_fewshot, batch_size}``); missing keys take the
    schema defaults. A relative ``include_path`` is resolved against the current directory (the workflow
    directory in a job). ``heldout_shard``: ``results/shards/heldout.parquet``; ``heldout_topk``: its
    teacher top-k cache.
    """
    try:
        target = target if isinstance(target, EvalTarget) else EvalTarget.from_dict(target)
    except (PlanError, TypeError) as e:
        raise EvalError(f"evaluate_model: {e}") from None
    s = _settings(settings)
    adapter = target.adapter
    info = read_manifest(target.manifest)
    identity = model_identity(info, adapter)
    identity["manifest"] = str(target.manifest)

    # ---- held-out set, through the teacher's cache
    started = time.time()
    model, tokenizer, _ = load_eval_model(info, adapter, s["device"], s["dtype"])
    timings = {"load_s": time.time() - started, "compute_s": 0.0}  # the job's model loads and its compute
    loaded = time.time()
    held = heldout_metrics(
        model,
        tokenizer,
        info,
        heldout_topk,
        s["heldout"]["max_docs"],
        s["heldout"]["batch_size"],
        heldout_shard=heldout_shard,
    )
    timings["compute_s"] += time.time() - loaded
    del model, tokenizer
    release_memory()
    metrics = [Metric("heldout", name, held[name], None, hib) for name, hib in HELDOUT_METRICS.items()]
    details = {
        **{k: v for k, v in held.items() if k not in HELDOUT_METRICS},
        "device": s["device"],
        "dtype": s["dtype"],
        "batch_size": s["heldout"]["batch_size"],
        "seconds": time.time() - started,
    }
    records = {"heldout": _record(target, "heldout", metrics, details, {**provenance(), "model": identity}).to_json()}
    write_json(out_heldout, records["heldout"])
    log.info(
        "%s: held-out ppl %.3f, top-1 agreement %s, KL %s (%d docs, %d tokens)",
        target.model,
        held["ppl"],
        held["top1_agreement"],
        held["kl_teacher_student"],
        held["docs"],
        held["tokens"],
    )

    # ---- lm-evaluation-harness
    le = s["lm_eval"]
    out_raw = Path(out_raw) if out_raw is not None else Path(out_lm_eval).with_name("lm_eval_raw.json")
    include = le.get("include_path")
    include = None if include is None else str(Path(include).resolve())
    lm_details: dict[str, Any] = {
        "lm_eval_version": lm_eval_version(),
        "tasks": list(le["tasks"]),
        "include_path": include,
        "limit": le["limit"],
        "num_fewshot": le["num_fewshot"],
        "batch_size": le["batch_size"],
        "device": s["device"],
        "dtype": s["dtype"],
        "raw_file": str(out_raw),
    }
    started = time.time()
    if not le["tasks"]:
        raw: dict[str, Any] = {"skipped": "eval.lm_eval.tasks is empty"}
        lm_metrics: list[Metric] = []
        lm_details["skipped"] = raw["skipped"]
    else:
        lm_timings: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="kdflow_eval_", dir=work_dir) as tmp:
            data = None
            if HELDOUT_TASK in le["tasks"]:
                data = Path(tmp) / f"{HELDOUT_TASK}.jsonl"
                lm_details["heldout_task_docs"] = write_heldout_task_data(heldout_shard, data, s["heldout"]["max_docs"])
            raw = _sanitised(
                run_lm_eval(
                    info.load_path,
                    adapter,
                    le["tasks"],
                    include,
                    le["batch_size"],
                    le["limit"],
                    s["device"],
                    le["num_fewshot"],
                    dtype=s["dtype"],
                    revision=info.revision,
                    heldout_data=data,
                    work_dir=tmp,
                    timings=lm_timings,
                )
            )
        timings["load_s"] += lm_timings["load_s"]
        timings["compute_s"] += lm_timings["compute_s"]
        lm_metrics = [Metric(**m) for m in lm_eval_metrics(raw)]
        lm_details["n_samples"] = raw.get("n-samples")
        lm_details["versions"] = raw.get("versions")
        lm_details["n_shot"] = raw.get("n-shot")
        lm_details["config"] = raw.get("config")
    lm_details["seconds"] = time.time() - started
    write_json(out_raw, raw)
    prov = {**provenance(), "model": identity}
    prov["versions"] = {**prov["versions"], "lm_eval": lm_eval_version()}
    records["lm_eval"] = _record(target, "lm_eval", lm_metrics, lm_details, prov).to_json()
    write_json(out_lm_eval, records["lm_eval"])
    for m in lm_metrics:
        log.info("%s: lm-eval %s %s = %s (stderr %s)", target.model, m.task, m.metric, m.value, m.stderr)
    if telemetry is not None:
        telemetry.tokens = held["tokens"]
        telemetry.load_s, telemetry.compute_s = timings["load_s"], timings["compute_s"]
    return records
