"""The checks of a study that need the file system or the models, run when the DAG is built (``snakemake -n``).

kdflow.config checks what the config says by itself (the schema and the cross-key rules). This module checks
what it says against what is on this machine, before any job runs:

* **paths**: every data source's ``paths`` pattern matches a file; a local ``.gguf`` file or Hugging Face
  model directory exists (with its ``config.json``); a local dataset directory exists; the lm-eval
  ``include_path`` is a directory;
* **model facts** (kdflow.model_facts, read from local files only): each ``keep_layers`` index is a teacher
  layer; each ``teacher_cache.hidden_layers`` entry is a teacher hidden state; each ``fb.layer_map`` student
  entry is a hidden state of that student; ``teacher_cache.k`` is at most the teacher's vocabulary.

Each problem names its key and the valid range. A fact no local file gives (a hub model not in the local
Hugging Face cache, a hub dataset) is *deferred*: the first job that loads it checks it, and the dry run lists
what was deferred. Torch-free, and fast: the plan of a study of thousands of jobs runs this once.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdflow.model_facts import (
    FactsError,
    ModelFacts,
    Unknown,
    looks_local,
    model_facts,
    pruned_facts,
    tp_plan_problem,
)

__all__ = ["PlanChecks", "check_plan"]


@dataclass
class PlanChecks:
    problems: list[str] = field(default_factory=list)  # each names its key; any one refuses the study
    deferred: list[str] = field(default_factory=list)  # checks left to the first job that can make them
    facts: dict[str, ModelFacts] = field(default_factory=dict)  # model name -> what was known

    def add(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def defer(self, line: str) -> None:
        if line not in self.deferred:
            self.deferred.append(line)


def check_plan(config: dict[str, Any], repo: Path) -> PlanChecks:
    """Every plan-time check of a validated config (defaults filled). Relative data and model paths are relative
    to the working directory (Snakemake's ``--directory``), as the jobs read them; ``repo`` resolves
    ``eval.lm_eval.include_path``, as kdflow.plan does."""
    out = PlanChecks()
    _check_sources(config["data"]["sources"], out)
    _check_model_paths(config, out)
    _check_include_path(config["eval"]["lm_eval"], repo, out)
    if not out.problems:  # facts come from the files just checked
        _check_model_facts(config, out)
    return out


# --------------------------------------------------------------------------- paths


def _where_relative() -> str:
    return f"relative to the working directory {os.getcwd()}"


def _check_sources(sources: list[dict], out: PlanChecks) -> None:
    for i, source in enumerate(sources):
        for j, pattern in enumerate(source.get("paths") or []):
            if not any(os.path.isfile(p) for p in glob.iglob(os.path.expanduser(pattern), recursive=True)):
                rel = "" if os.path.isabs(pattern) else f" ({_where_relative()})"
                out.add(
                    f"data.sources[{i}].paths[{j}]: {pattern!r} matches no file{rel}; fix the path or the pattern, "
                    f"or remove it"
                )
        if source["kind"] == "hf":
            dataset = source["dataset"]
            if looks_local(dataset):
                if not Path(dataset).expanduser().exists():
                    out.add(
                        f"data.sources[{i}].dataset: {dataset!r} is not a directory ({_where_relative()}), and a "
                        f"hub dataset is named org/name"
                    )
            else:
                out.defer(
                    f"data.sources[{i}].dataset {dataset!r}: a hub dataset; the corpus job checks that it can be "
                    f"read (offline: that it is in the local cache)"
                )


def _model_sources(config: dict) -> list[tuple[str, dict]]:
    """``(key of the source section, the section)`` of the teacher and every student."""
    out = [("teacher.source", config["teacher"]["source"])]
    out += [(f"students[{i}].source", s["source"]) for i, s in enumerate(config["students"])]
    return out


def _check_model_paths(config: dict, out: PlanChecks) -> None:
    for key, source in _model_sources(config):
        kind, path = source["kind"], source.get("path")
        if kind == "gguf":
            if not path:
                out.add(f"{key}.path: required for kind 'gguf' (the .gguf file)")
            elif not Path(path).expanduser().is_file():
                out.add(f"{key}.path: {path!r} is not a file ({_where_relative()}); give the .gguf file")
        elif kind == "hf":
            if not path:
                out.add(f"{key}.path: required for kind 'hf' (a hub id org/name or a local directory)")
            elif looks_local(path):
                local = Path(path).expanduser()
                if not local.is_dir():
                    out.add(
                        f"{key}.path: {path!r} is not a directory ({_where_relative()}), and a hub model is "
                        f"named org/name"
                    )
                elif not (local / "config.json").is_file():
                    out.add(f"{key}.path: {path!r} has no config.json; it is not a Hugging Face model directory")


def _check_include_path(lm_eval: dict, repo: Path, out: PlanChecks) -> None:
    tasks_dir = lm_eval.get("include_path")
    if tasks_dir and lm_eval.get("tasks"):
        resolved = Path(tasks_dir) if os.path.isabs(tasks_dir) else repo / tasks_dir
        if not resolved.is_dir():
            out.add(
                f"eval.lm_eval.include_path: {tasks_dir!r} is not a directory ({resolved}; a relative path is "
                f"relative to the kdflow repository); give the directory of task YAMLs, or null"
            )


# --------------------------------------------------------------------------- model facts


_DEFERRED_TEACHER = (
    "students[].source.keep_layers is checked by prepare_models, teacher_cache.hidden_layers and k by the cache "
    "jobs, fb.layer_map of pruned students when their runs start"
)
_DEFERRED_STUDENT = "fb.layer_map[].student is checked when its runs start"


def _facts(key: str, source: dict, out: PlanChecks, name: str, deferred: str) -> ModelFacts | None:
    try:
        found = model_facts(source)
    except FactsError as e:
        out.add(f"{key}: {e}")
        return None
    if isinstance(found, Unknown):
        out.defer(f"{key} ({name}): {found.reason}, so its shape is not known at plan time; {deferred}")
        return None
    out.facts[name] = found
    return found


def _check_model_facts(config: dict, out: PlanChecks) -> None:
    teacher_cfg = config["teacher"]
    teacher = _facts("teacher.source", teacher_cfg["source"], out, teacher_cfg["name"], _DEFERRED_TEACHER)
    cache = config["teacher_cache"]
    if teacher is not None:
        for j, layer in enumerate(cache["hidden_layers"]):
            if not 0 <= layer <= teacher.layers:
                out.add(
                    f"teacher_cache.hidden_layers[{j}]: {layer} is not a hidden state of the teacher "
                    f"(0..{teacher.layers}: 0 = embeddings, {teacher.layers} = after the final norm; {teacher.source})"
                )
        if teacher.vocab_size is not None and cache["k"] > teacher.vocab_size:
            out.add(
                f"teacher_cache.k: {cache['k']} is more than the teacher's vocabulary of {teacher.vocab_size} ids "
                f"({teacher.source})"
            )
        if cache["parallel"] == "tensor":
            _check_tensor_parallel(cache, teacher, out)
    elif cache["parallel"] == "tensor":
        out.defer(
            "teacher_cache.parallel tensor: the teacher's heads and tensor-parallel plan are checked by the cache jobs"
        )
    for i, student in enumerate(config["students"]):
        source = student["source"]
        if source["kind"] == "prune_from_teacher":
            if teacher is None:
                continue
            keep = source["keep_layers"]
            bad = [layer for layer in keep if not 0 <= layer < teacher.layers]
            if bad:
                out.add(
                    f"students[{i}].source.keep_layers: {bad} are not teacher layers; the teacher has layers "
                    f"0..{teacher.layers - 1} ({teacher.source})"
                )
                continue
            out.facts[student["name"]] = pruned_facts(teacher, keep)
        else:
            _facts(f"students[{i}].source", source, out, student["name"], _DEFERRED_STUDENT)
    _check_layer_maps(config, out)


def _check_tensor_parallel(cache: dict, teacher: ModelFacts, out: PlanChecks) -> None:
    """parallel tensor: the teacher's architecture has a tensor-parallel plan, and the rank count (tp_size, else the
    profile's KDFLOW_TEACHER_GPUS when set) divides its attention and key-value heads."""
    fallback = "use teacher_cache.parallel: device_map (device auto) instead"
    why = tp_plan_problem(teacher.model_type)
    if isinstance(why, Unknown):
        out.defer(
            f"teacher_cache.parallel tensor: whether the teacher has a tensor-parallel plan ({why.reason}) is "
            "checked by the cache jobs"
        )
    elif why:
        out.add(f"teacher_cache.parallel: tensor, but {why} ({teacher.source}); {fallback}")
        return
    if cache["tp_size"] is not None:
        ranks, key = cache["tp_size"], "teacher_cache.tp_size"
    elif os.environ.get("KDFLOW_TEACHER_GPUS", "").isdigit():
        ranks, key = int(os.environ["KDFLOW_TEACHER_GPUS"]), "KDFLOW_TEACHER_GPUS (the GPUs of each teacher job)"
    else:
        out.defer(
            "teacher_cache.parallel tensor: the rank count is the number of GPUs each cache job is granted; "
            "each job checks that it divides the teacher's heads"
        )
        return
    heads = {"attention heads": teacher.heads, "key-value heads": teacher.kv_heads}
    bad = {what: n for what, n in heads.items() if n is not None and n % ranks}
    if bad:
        said = " and ".join(f"{n} {what}" for what, n in bad.items())
        out.add(
            f"{key}: {ranks} tensor-parallel ranks do not divide the teacher's {said} ({teacher.source}); choose a "
            f"divisor of {math.gcd(*[n for n in heads.values() if n])}, or {fallback}"
        )


def _check_layer_maps(config: dict, out: PlanChecks) -> None:
    """Each fb.layer_map student entry against each student a mode with fb trains, naming the key it came from
    (training.defaults or the experiment's set)."""
    training = config.get("training") or {}
    modes = training.get("modes") or {}
    students = [s["name"] for s in config["students"]]
    for i, exp in enumerate(training.get("experiments") or []):
        if not any((modes.get(m) or {}).get("fb", 0) > 0 for m in exp["modes"]):
            continue
        override = ((exp.get("set") or {}).get("fb") or {}).get("layer_map")
        if override is not None:
            key, layer_map = f"training.experiments[{i}].set.fb.layer_map", override
        else:
            defaults = training.get("defaults") or {}
            key, layer_map = "training.defaults.fb.layer_map", (defaults.get("fb") or {}).get("layer_map", [])
        for student in exp.get("students") or students:
            facts = out.facts.get(student)
            if facts is None:
                continue  # unknown student (kdflow.config reports it) or facts deferred
            for j, pair in enumerate(layer_map):
                if not 0 <= pair["student"] <= facts.layers:
                    out.add(
                        f"{key}[{j}].student: {pair['student']} is not a hidden state of student {student!r} "
                        f"(0..{facts.layers}: it has {facts.layers} layers; {facts.source}), used by "
                        f"training.experiments[{i}]"
                    )
