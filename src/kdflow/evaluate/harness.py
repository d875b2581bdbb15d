"""The eval rule's lm-evaluation-harness side: the shipped ``kdflow_heldout`` task's data and task directory,
one lm-eval run of a model (and adapter), and its result dict parsed into metric records."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from kdflow.atomic import atomic_path
from kdflow.evaluate.loading import EvalError

log = logging.getLogger("kdflow.evaluate")

HELDOUT_TASK = "kdflow_heldout"  # the shipped lm-eval task
TASK_TEMPLATE = "kdflow_heldout.yaml"  # its file in the include directory (the template)


def write_heldout_task_data(heldout_parquet: str | Path, out_jsonl: str | Path, max_docs: int | None = None) -> int:
    """The ``kdflow_heldout`` task's data: the first ``max_docs`` documents of the held-out shard (all when
    None) as JSON lines ``{"doc_id", "source", "text"}``, written atomically; returns the number written."""
    table = pq.read_table(heldout_parquet, columns=["doc_id", "source", "text"])
    if max_docs is not None:
        table = table.slice(0, max_docs)
    if table.num_rows == 0:
        raise EvalError(f"{heldout_parquet}: the held-out set is empty; raise data.heldout.fraction")
    with atomic_path(out_jsonl) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return table.num_rows


def resolve_include_dir(include_path: str | Path, heldout_data: str | Path | None, out_dir: str | Path) -> Path:
    """A copy of the task directory ``include_path`` in ``out_dir`` whose ``kdflow_heldout.yaml`` reads
    ``heldout_data`` (an absolute path, so lm-eval finds it from any directory) and keeps its datasets
    cache in ``out_dir`` (nothing is added to the user's Hugging Face cache; parallel jobs do not share
    one). Returns the copy."""
    import yaml

    include_path = Path(include_path)
    if not include_path.is_dir():
        raise EvalError(f"eval.lm_eval.include_path {str(include_path)!r}: no such directory")
    out = Path(out_dir) / "tasks"
    shutil.copytree(include_path, out)
    template = out / TASK_TEMPLATE
    if template.is_file() and heldout_data is not None:
        task = yaml.safe_load(template.read_text(encoding="utf-8"))
        kwargs = task.setdefault("dataset_kwargs", {})
        kwargs["data_files"] = {"test": str(Path(heldout_data).resolve())}
        kwargs["cache_dir"] = str((Path(out_dir) / "datasets_cache").resolve())
        template.write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return out


def run_lm_eval(
    pretrained_dir: str,
    adapter_dir: str | Path | None,
    tasks: Sequence[str],
    include_path: str | Path | None,
    batch_size: int | str,
    limit: int | float | None,
    device: str,
    num_fewshot: int | None = None,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    heldout_data: str | Path | None = None,
    work_dir: str | Path | None = None,
    bootstrap_iters: int = 100000,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """lm-eval's result dict for ``tasks`` on the ``hf`` model ``pretrained_dir`` (a directory or hub id
    at ``revision``) with the PEFT adapter ``adapter_dir`` if given; per-sample logs are not kept.

    ``include_path``: extra task YAMLs (the shipped ``resources/lm_eval_tasks``). ``kdflow_heldout`` needs
    ``heldout_data`` (from :func:`write_heldout_task_data`); the include directory is then used through a
    resolved temporary copy (:func:`resolve_include_dir`) in ``work_dir`` (default: the system temp dir).
    When every task is in ``include_path`` lm-eval's own task index is not scanned (that takes seconds).
    ``device="auto"`` spreads the model over the visible GPUs (lm-eval's ``parallelize=True``).
    Offline use: lm-eval's datasets come from the local files or the Hugging Face cache when
    ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` are set; ``kdflow_heldout`` needs nothing else.

    ``timings``: a dict to receive ``load_s`` (building lm-eval's ``hf`` model: the weights and the adapter loaded)
    and ``compute_s`` (the evaluation).

    Caveat (lm-eval's, not kdflow's): with ``peft`` lm-eval resizes the base model's embeddings to
    ``len(tokenizer)`` when ``config.vocab_size`` differs (padding rows, e.g. Qwen2.5); those rows then
    take no probability mass, unlike in the baseline runs without an adapter. SmolLM2 and Llama 3 have
    no padding rows.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_lm_eval: no tasks given")
    if HELDOUT_TASK in tasks and heldout_data is None:
        raise EvalError(
            f"lm-eval task {HELDOUT_TASK} needs its data file (heldout_data=…, from write_heldout_task_data)"
        )
    model_args: dict[str, Any] = {"pretrained": str(pretrained_dir), "dtype": dtype}
    if revision:
        model_args["revision"] = revision
    if adapter_dir is not None:
        model_args["peft"] = str(Path(adapter_dir).resolve())
    lm_device: str | None = device
    if device == "auto":
        model_args["parallelize"] = True
        lm_device = "cuda"
    with tempfile.TemporaryDirectory(prefix="kdflow_lm_eval_", dir=work_dir) as tmp:
        manager = None
        if include_path is not None:
            resolved = resolve_include_dir(include_path, heldout_data, tmp)
            manager = TaskManager(include_path=str(resolved), include_defaults=False)
            if not all(t in manager.all_tasks for t in tasks):
                manager = TaskManager(include_path=str(resolved))
        elif HELDOUT_TASK in tasks:
            raise EvalError(
                f"lm-eval task {HELDOUT_TASK} is defined in resources/lm_eval_tasks; set "
                "eval.lm_eval.include_path to that directory"
            )
        else:
            manager = TaskManager()
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise EvalError(
                f"eval.lm_eval.tasks: {missing} are not lm-eval tasks, groups or tags "
                f"(include_path {include_path}); see `lm_eval ls tasks`"
            )
        log.info(
            "lm-eval %s: tasks %s on %s%s",
            lm_eval_version(),
            tasks,
            pretrained_dir,
            f" + adapter {adapter_dir}" if adapter_dir else "",
        )
        # The hf model built here as simple_evaluate would build it from model="hf", so that its load is timed apart.
        t0 = time.perf_counter()
        lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
            model_args, {"batch_size": batch_size, "max_batch_size": None, "device": lm_device}
        )
        t1 = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=tasks,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=lm_device,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
        )
        t2 = time.perf_counter()
    if results is None:  # not rank 0 of a distributed lm-eval
        raise EvalError("lm-eval returned no results (not the main process?)")
    results["config"]["model"] = "hf"  # what model="hf" records (given the model object, lm-eval names its path)
    if timings is not None:
        timings.update(load_s=t1 - t0, compute_s=t2 - t1)
    return results


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def _number(value: Any) -> float | None:
    """A finite float, or None for lm-eval's "N/A", None, NaN and anything non-numeric."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def lm_eval_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record ``{"task", "metric", "value", "stderr", "higher_is_better"}`` per metric of lm-eval's
    ``results`` section (tasks and groups), sorted by task and metric.

    lm-eval keys a value ``"<metric>,<filter>"`` and its standard error ``"<metric>_stderr,<filter>"``.
    ``metric`` is ``<metric>`` for the ``none`` filter and ``"<metric>,<filter>"`` otherwise (e.g.
    gsm8k's ``exact_match,strict-match``). ``stderr`` is null where lm-eval gives ``"N/A"`` or nothing.
    ``higher_is_better`` comes from lm-eval's ``higher_is_better`` section, else its metric registry,
    else null.
    """
    from lm_eval.api.registry import is_higher_better

    out = []
    hib_section = results.get("higher_is_better") or {}
    for task, values in sorted((results.get("results") or {}).items()):
        for key, raw in values.items():
            if "," not in key:
                continue  # "alias", "samples", …
            name, filt = key.split(",", 1)
            if name.endswith("_stderr"):
                continue
            value = _number(raw)
            if value is None and not isinstance(raw, (int, float)):
                continue  # a placeholder (" ") of a group without its own value
            hib = (hib_section.get(task) or {}).get(name)
            if hib is None:
                try:
                    hib = is_higher_better(name)
                except Exception:  # unknown to the registry
                    hib = None
            out.append(
                {
                    "task": task,
                    "metric": name if filt == "none" else key,
                    "value": value,
                    "stderr": _number(values.get(f"{name}_stderr,{filt}")),
                    "higher_is_better": None if hib is None else bool(hib),
                }
            )
    return sorted(out, key=lambda r: (r["task"], r["metric"]))
