"""The eval rule: one model (a trained run, the teacher, or a student's untrained init) on the held-out set
and on lm-evaluation-harness tasks, written as two JSON files of the same shape.

A model is a prepared model's manifest (``kdflow_model.json``, see kdflow.models) plus, for a trained run,
its output directory (a PEFT adapter, kdflow.train). :func:`evaluate_model` writes, atomically:

* ``heldout.json`` (:func:`heldout_metrics`): the model on the teacher's held-out top-k cache
  (``results/cache/<teacher>/topk_k<k>/heldout.parquet``): it reads the teacher's tokens, so its numbers
  are per *teacher* token and directly comparable across the teacher, the inits and the runs:

  - ``nll_per_token`` / ``ppl``: next-token cross-entropy over the real positions (row j predicts token
    j + 1, so a document of n tokens has n − 1 targets), and its exp;
  - ``top1_agreement``: share of the cached rows (all n rows of each document) where the model's argmax
    is the teacher's most probable token;
  - ``kl_teacher_student``: mean over the same rows of the exact KL(teacher ‖ model) over k + 1 buckets
    (the teacher's k cached ids and everything else):
    ``TopKKDLoss(temperature=1, divergence="forward_kl", missing_mass="rest_bucket")``.

  A model whose tokenizer is not the teacher's (``vocab: own`` students) cannot read the cache: its
  perplexity is measured on its own tokenisation of the same documents (kdflow.perplexity, same
  ``max_length``) and top-1 agreement and KL are null, with the reason in ``details``.
  Documents: the first ``max_docs`` rows of the held-out shard (``doc_index < max_docs``; all when
  null), i.e. the same documents ``kdflow.shards.read_texts(heldout, max_docs)`` returns and the
  ``kdflow_heldout`` lm-eval task reads. Each is cut at the cache's ``max_length`` teacher tokens.
* ``lm_eval.json`` (:func:`run_lm_eval`, :func:`lm_eval_metrics`): the configured lm-evaluation-harness
  tasks, run as ``lm_eval --model hf --model_args pretrained=<weights>,peft=<adapter>,dtype=…`` would run
  them. The shipped offline task ``kdflow_heldout`` (resources/lm_eval_tasks/kdflow_heldout.yaml) scores
  the held-out documents' whole texts by rolling log-likelihood: ``word_perplexity``,
  ``byte_perplexity``, ``bits_per_byte``, comparable across tokenizers. lm-eval's whole result dict is
  kept beside it as ``lm_eval_raw.json``.

Both files: ``{"model", "kind" ("run" | "teacher" | "student_init"), "student", "mode", "seed", "tag",
"evaluation" ("heldout" | "lm_eval"), "metrics": [{"task", "metric", "value", "stderr",
"higher_is_better"}, …], "details": {…}, "provenance": {git commit, package versions, "model": the
weights' and adapter's identity}}``.
"""

from __future__ import annotations

import copy
import gc
import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq
import torch

from kdflow.atomic import atomic_path, write_json
from kdflow.cache_format import CacheReader
from kdflow.cache_loader import collate
from kdflow.config import config_hash
from kdflow.losses import TopKKDLoss, ce_targets
from kdflow.models import load_model, load_tokenizer, read_manifest, tokenizer_fingerprint
from kdflow.provenance import file_sha256, provenance

log = logging.getLogger(__name__)

HELDOUT_TASK = "kdflow_heldout"          # the shipped lm-eval task
TASK_TEMPLATE = "kdflow_heldout.yaml"    # its file in the include directory (the template)
HELDOUT_METRICS = {"ppl": False, "nll_per_token": False, "top1_agreement": True, "kl_teacher_student": False}
KINDS = ("run", "teacher", "student_init")
DEFAULT_SETTINGS: dict[str, Any] = {  # config["eval"] (config/schema.yaml) with its defaults
    "device": "cpu", "dtype": "float32",
    "heldout": {"max_docs": None, "batch_size": 8},
    "lm_eval": {"tasks": [HELDOUT_TASK], "include_path": "resources/lm_eval_tasks", "limit": None,
                "num_fewshot": None, "batch_size": 8},
}
ROW_CHUNK = 4096  # logit rows turned into fp32 at a time (bounds the extra memory for large vocabularies)


class EvalError(RuntimeError):
    """An evaluation that cannot run (missing or mismatched inputs); the message says what to do."""


# --------------------------------------------------------------------------- the model

def load_eval_model(manifest: str | Path | dict, adapter_dir: str | Path | None = None, device: str = "cpu",
                    dtype: str = "float32"):
    """``(model, tokenizer, info)``: a prepared model (its manifest path or resolved manifest dict) in eval
    mode, with a trained run's PEFT adapter on top when ``adapter_dir`` is given (not merged).

    Refuses an adapter whose ``run_config.json`` names another student than the manifest."""
    info = manifest if isinstance(manifest, dict) else read_manifest(manifest)
    tokenizer = load_tokenizer(info)
    model = load_model(info, device, dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise EvalError(f"{adapter_dir}: no adapter_config.json; not a finished training run (rerun "
                            f"`snakemake {adapter_dir}`)")
        trained_on = _run_config(adapter_dir).get("spec", {}).get("student")
        if trained_on is not None and trained_on != info.get("name"):
            raise EvalError(f"{adapter_dir}: the adapter was trained on student {trained_on!r}, but the base "
                            f"model given is {info.get('name')!r}")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval(), tokenizer, info


def _run_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "run_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def model_identity(info: dict, adapter_dir: str | Path | None = None) -> dict[str, Any]:
    """What identifies the evaluated weights: the manifest's name, source and hashes, and for a run its
    adapter directory, the hash of its run config and of its adapter weights."""
    ident: dict[str, Any] = {k: info.get(k) for k in ("name", "role", "origin", "load_path", "revision",
                                                      "source_hash", "source_hash_of", "tokenizer_fingerprint",
                                                      "config_hash")}
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


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _release_memory() -> None:
    """Give back what a dropped model held (before lm-eval loads its own copy)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- held-out metrics

def heldout_docs(topk_file: str | Path, max_docs: int | None = None) -> Iterator[dict]:
    """The held-out cache's documents whose shard row is below ``max_docs`` (all when None), in file order
    (length-sorted), as :class:`kdflow.cache_loader.CacheStream` items (``collate`` batches them)."""
    reader = CacheReader.open(topk_file, "topk", asked_by="the eval rule")
    name = str(reader.meta.get("shard"))
    columns = ["doc_index", "input_ids", "topk_ids", "topk_logprobs", "rest_logprob"]
    for doc in reader.iter_docs(columns):
        if max_docs is None or doc["doc_index"] < max_docs:
            yield {"shard": name, **doc}


def _batches(docs: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def heldout_metrics(model, tokenizer, info: dict, topk_file: str | Path, max_docs: int | None = None,
                    batch_size: int = 8, device: str | torch.device | None = None,
                    heldout_shard: str | Path | None = None) -> dict[str, Any]:
    """Perplexity, top-1 agreement with the teacher and KL(teacher ‖ model) on the held-out top-k cache.

    ``info`` is the model's manifest (for messages). ``device``: where the inputs go (default: the model's
    input embeddings'). ``heldout_shard`` (the held-out shard Parquet) is needed only when the model's
    tokenizer is not the cache's. Returns ``{"ppl", "nll_per_token", "top1_agreement",
    "kl_teacher_student", "docs", "tokens" (next-token targets), "positions" (cached rows scored),
    "tokenization" ("teacher_cache" | "own"), "null_reason", "k", "max_length", "heldout_file"}``.
    """
    topk_file = Path(topk_file)
    reader = CacheReader.open(topk_file, "topk", asked_by="the eval rule")
    meta = reader.meta
    fingerprint = tokenizer_fingerprint(tokenizer)
    common = {"k": meta.get("k"), "max_length": meta.get("max_length"), "teacher": meta.get("teacher"),
              "cache_tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
              "model_tokenizer_fingerprint": fingerprint, "max_docs": max_docs}
    if fingerprint != meta.get("tokenizer_fingerprint"):
        return _own_vocab_metrics(model, tokenizer, info, meta, heldout_shard, max_docs, batch_size, common)

    device = torch.device(device) if device is not None else _input_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kd = TopKKDLoss(temperature=1.0, divergence="forward_kl", missing_mass="rest_bucket")
    nll_sum, kl_sum, agree, targets_n, rows_n, docs = 0.0, 0.0, 0, 0, 0, 0
    for examples in _batches(heldout_docs(topk_file, max_docs), batch_size):
        batch = collate(examples, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        keep = mask.reshape(-1).bool()
        rows = keep.nonzero().squeeze(-1).to(flat.device)
        targets = ce_targets(ids, mask).reshape(-1).to(flat.device)
        topk_ids = batch["topk_ids"].reshape(-1, batch["topk_ids"].shape[-1]).to(flat.device)
        topk_lp = batch["topk_logprobs"].reshape(-1, topk_ids.shape[-1]).to(flat.device)
        rest = batch["rest_logprob"].reshape(-1).to(flat.device)
        if bool((topk_ids[rows] >= vocab).any()):
            raise EvalError(f"{topk_file}: a cached teacher id is beyond {info.get('name')!r}'s {vocab} logits; "
                            "the cache was not made with this model's tokenizer")
        for chunk in rows.split(ROW_CHUNK):
            z = flat[chunk].float()                                   # [n, V]
            t = targets[chunk]
            counted = t >= 0
            if bool(counted.any()):
                nll_sum += torch.nn.functional.cross_entropy(z[counted], t[counted], reduction="sum").item()
                targets_n += int(counted.sum())
            agree += int((z.argmax(-1) == topk_ids[chunk, 0]).sum())
            log_p, log_q = kd.bucket_logprobs(z, topk_ids[chunk], topk_lp[chunk], rest[chunk])
            kl_sum += kd.divergence_per_row(log_p, log_q).sum().item()
            rows_n += len(chunk)
        docs += len(examples)
    if docs == 0:
        raise EvalError(f"{topk_file}: no held-out documents to score (max_docs={max_docs}); raise "
                        "data.heldout.fraction or eval.heldout.max_docs")
    if targets_n == 0:
        raise EvalError(f"{topk_file}: every selected document is a single token; nothing to predict")
    nll = nll_sum / targets_n
    return {"ppl": math.exp(nll), "nll_per_token": nll, "top1_agreement": agree / rows_n,
            "kl_teacher_student": kl_sum / rows_n, "docs": docs, "tokens": targets_n, "positions": rows_n,
            "tokenization": "teacher_cache", "null_reason": None, "heldout_file": str(topk_file), **common}


def _own_vocab_metrics(model, tokenizer, info, meta, heldout_shard, max_docs, batch_size, common) -> dict:
    """Perplexity on the model's own tokenisation of the held-out texts; no teacher comparison."""
    from kdflow.perplexity import perplexity
    from kdflow.shards import read_texts

    reason = (f"the tokenizer of {info.get('name')!r} (fingerprint {common['model_tokenizer_fingerprint']}) is not "
              f"the teacher's (cache fingerprint {meta.get('tokenizer_fingerprint')}): its logits do not index the "
              "teacher's token ids, so top-1 agreement and KL to the teacher are undefined; ppl is per token of the "
              "model's own tokenizer")
    if heldout_shard is None:
        raise EvalError(f"{info.get('name')!r} does not share the teacher's tokenizer: its held-out perplexity needs "
                        "the held-out shard's texts (heldout_shard=…)")
    texts = read_texts(heldout_shard, max_docs)
    if not texts:
        raise EvalError(f"{heldout_shard}: the held-out set is empty; raise data.heldout.fraction")
    result = perplexity(model, tokenizer, texts, max_length=int(meta.get("max_length") or 256),
                        batch_size=batch_size, desc=f"held-out ppl {info.get('name')}")
    log.warning("%s: %s", info.get("name"), reason)
    return {"ppl": result["ppl"], "nll_per_token": result["nll_per_token"], "top1_agreement": None,
            "kl_teacher_student": None, "docs": result["docs"], "tokens": result["tokens"], "positions": None,
            "tokenization": "own", "null_reason": reason, "heldout_file": str(heldout_shard), **common}


# --------------------------------------------------------------------------- lm-evaluation-harness

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


def run_lm_eval(pretrained_dir: str, adapter_dir: str | Path | None, tasks: Sequence[str],
                include_path: str | Path | None, batch_size: int | str, limit: int | float | None, device: str,
                num_fewshot: int | None = None, *, dtype: str = "float32", revision: str | None = None,
                heldout_data: str | Path | None = None, work_dir: str | Path | None = None,
                bootstrap_iters: int = 100000) -> dict[str, Any]:
    """lm-eval's result dict for ``tasks`` on the ``hf`` model ``pretrained_dir`` (a directory or hub id
    at ``revision``) with the PEFT adapter ``adapter_dir`` if given; per-sample logs are not kept.

    ``include_path``: extra task YAMLs (the shipped ``resources/lm_eval_tasks``). ``kdflow_heldout`` needs
    ``heldout_data`` (from :func:`write_heldout_task_data`); the include directory is then used through a
    resolved temporary copy (:func:`resolve_include_dir`) in ``work_dir`` (default: the system temp dir).
    When every task is in ``include_path`` lm-eval's own task index is not scanned (that takes seconds).
    ``device="auto"`` spreads the model over the visible GPUs (lm-eval's ``parallelize=True``).
    Offline use: lm-eval's datasets come from the local files or the Hugging Face cache when
    ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` are set; ``kdflow_heldout`` needs nothing else.

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
        raise EvalError(f"lm-eval task {HELDOUT_TASK} needs its data file (heldout_data=…, from "
                        "write_heldout_task_data)")
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
            raise EvalError(f"lm-eval task {HELDOUT_TASK} is defined in resources/lm_eval_tasks; set "
                            "eval.lm_eval.include_path to that directory")
        else:
            manager = TaskManager()
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise EvalError(f"eval.lm_eval.tasks: {missing} are not lm-eval tasks, groups or tags "
                            f"(include_path {include_path}); see `lm_eval ls tasks`")
        log.info("lm-eval %s: tasks %s on %s%s", lm_eval_version(), tasks, pretrained_dir,
                 f" + adapter {adapter_dir}" if adapter_dir else "")
        results = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size,
            device=lm_device, limit=limit, task_manager=manager, log_samples=False,
            bootstrap_iters=bootstrap_iters)
    if results is None:  # not rank 0 of a distributed lm-eval
        raise EvalError("lm-eval returned no results (not the main process?)")
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
            out.append({"task": task, "metric": name if filt == "none" else key, "value": value,
                        "stderr": _number(values.get(f"{name}_stderr,{filt}")),
                        "higher_is_better": None if hib is None else bool(hib)})
    return sorted(out, key=lambda r: (r["task"], r["metric"]))


def _sanitised(obj: Any) -> Any:
    """``obj`` as plain JSON values (dtypes, paths and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------- the eval rule

def _settings(settings: dict | None) -> dict:
    out = copy.deepcopy(DEFAULT_SETTINGS)
    for key, value in (settings or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def _record(target: dict, evaluation: str, metrics: list[dict], details: dict, prov: dict) -> dict:
    return {"model": target["model"], "kind": target["kind"], "student": target.get("student"),
            "mode": target.get("mode"), "seed": target.get("seed"), "tag": target.get("tag"),
            "evaluation": evaluation, "metrics": metrics, "details": details, "provenance": prov}


def evaluate_model(target: dict, settings: dict | None, heldout_shard: str | Path, heldout_topk: str | Path,
                   out_heldout: str | Path, out_lm_eval: str | Path, out_raw: str | Path | None = None,
                   work_dir: str | Path | None = None) -> dict[str, dict]:
    """Evaluate one model and write ``heldout.json``, ``lm_eval.json`` and ``lm_eval_raw.json`` (default:
    beside ``lm_eval.json``). Returns ``{"heldout": record, "lm_eval": record}``.

    ``target``: ``{"model": id, "kind": "run" | "teacher" | "student_init", "student", "mode", "seed",
    "tag", "manifest": kdflow_model.json, "adapter": run directory | None}`` (the eval rule's
    ``eval_target``). ``settings``: config ``eval`` (``device``, ``dtype``, ``heldout.{max_docs,
    batch_size}``, ``lm_eval.{tasks, include_path, limit, num_fewshot, batch_size}``); missing keys take the
    schema defaults. A relative ``include_path`` is resolved against the current directory (the workflow
    directory in a job). ``heldout_shard``: ``results/shards/heldout.parquet``; ``heldout_topk``: its
    teacher top-k cache.
    """
    if target.get("kind") not in KINDS:
        raise EvalError(f"evaluate_model: kind must be one of {KINDS}, got {target.get('kind')!r}")
    s = _settings(settings)
    adapter = target.get("adapter")
    if (target["kind"] == "run") != (adapter is not None):
        raise EvalError(f"{target['model']}: a run is evaluated with its adapter directory and a baseline without "
                        f"one (kind {target['kind']!r}, adapter {adapter!r})")
    info = read_manifest(target["manifest"])
    identity = model_identity(info, adapter)
    identity["manifest"] = str(target["manifest"])

    # ---- held-out set, through the teacher's cache
    started = time.time()
    model, tokenizer, _ = load_eval_model(info, adapter, s["device"], s["dtype"])
    held = heldout_metrics(model, tokenizer, info, heldout_topk, s["heldout"]["max_docs"],
                           s["heldout"]["batch_size"], heldout_shard=heldout_shard)
    del model, tokenizer
    _release_memory()
    metrics = [{"task": "heldout", "metric": name, "value": held[name], "stderr": None, "higher_is_better": hib}
               for name, hib in HELDOUT_METRICS.items()]
    details = {**{k: v for k, v in held.items() if k not in HELDOUT_METRICS}, "device": s["device"],
               "dtype": s["dtype"], "batch_size": s["heldout"]["batch_size"], "seconds": time.time() - started}
    records = {"heldout": _record(target, "heldout", metrics, details, {**provenance(), "model": identity})}
    write_json(out_heldout, records["heldout"])
    log.info("%s: held-out ppl %.3f, top-1 agreement %s, KL %s (%d docs, %d tokens)", target["model"], held["ppl"],
             held["top1_agreement"], held["kl_teacher_student"], held["docs"], held["tokens"])

    # ---- lm-evaluation-harness
    le = s["lm_eval"]
    out_raw = Path(out_raw) if out_raw is not None else Path(out_lm_eval).with_name("lm_eval_raw.json")
    include = le.get("include_path")
    include = None if include is None else str(Path(include).resolve())
    lm_details: dict[str, Any] = {"lm_eval_version": lm_eval_version(), "tasks": list(le["tasks"]),
                                  "include_path": include, "limit": le["limit"], "num_fewshot": le["num_fewshot"],
                                  "batch_size": le["batch_size"], "device": s["device"], "dtype": s["dtype"],
                                  "raw_file": str(out_raw)}
    started = time.time()
    if not le["tasks"]:
        raw: dict[str, Any] = {"skipped": "eval.lm_eval.tasks is empty"}
        lm_metrics: list[dict] = []
        lm_details["skipped"] = raw["skipped"]
    else:
        with tempfile.TemporaryDirectory(prefix="kdflow_eval_", dir=work_dir) as tmp:
            data = None
            if HELDOUT_TASK in le["tasks"]:
                data = Path(tmp) / f"{HELDOUT_TASK}.jsonl"
                lm_details["heldout_task_docs"] = write_heldout_task_data(heldout_shard, data,
                                                                          s["heldout"]["max_docs"])
            raw = _sanitised(run_lm_eval(info["load_path"], adapter, le["tasks"], include, le["batch_size"],
                                         le["limit"], s["device"], le["num_fewshot"], dtype=s["dtype"],
                                         revision=info.get("revision"), heldout_data=data, work_dir=tmp))
        lm_metrics = lm_eval_metrics(raw)
        lm_details["n_samples"] = raw.get("n-samples")
        lm_details["versions"] = raw.get("versions")
        lm_details["n_shot"] = raw.get("n-shot")
        lm_details["config"] = raw.get("config")
    lm_details["seconds"] = time.time() - started
    write_json(out_raw, raw)
    prov = {**provenance(), "model": identity}
    prov["versions"] = {**prov["versions"], "lm_eval": lm_eval_version()}
    records["lm_eval"] = _record(target, "lm_eval", lm_metrics, lm_details, prov)
    write_json(out_lm_eval, records["lm_eval"])
    for m in lm_metrics:
        log.info("%s: lm-eval %s %s = %s (stderr %s)", target["model"], m["task"], m["metric"], m["value"],
                 m["stderr"])
    return records
