"""The study plan: every file target of a study and what each job reads, computed once from the config.

``rules/common.smk`` builds one :class:`StudyPlan` after validating the config and its input functions only
look things up in it (``PLAN.train_inputs(wildcards.run)``); the training job decides which caches it reads
with the same :func:`kdflow.runs.caches_read`. Paths are relative to the workflow's working directory, as
Snakemake's are.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from kdflow.config import config_error, key_locations, load_schema, read_yaml, validate_config
from kdflow.corpus import shard_name
from kdflow.model_facts import ModelFacts
from kdflow.plan_caches import CACHE_ROOT, CachePlan, PlanError, logit_name, parse_logit_name  # noqa: F401  (re-exported)
from kdflow.plan_checks import check_plan
from kdflow.runs import RunSpec, caches_read, expand_runs

SHARDS_DIR = "results/shards"
HELDOUT_SHARD = f"{SHARDS_DIR}/heldout.parquet"
RESULTS = ["results/kdflow.duckdb", "results/summary.csv", "results/summary.md", "results/plots"]


# What an evaluated model is (EvalTarget.kind): a training run or one of the two baselines.
KINDS = ("run", "teacher", "student_init")


def study_plan(config: dict[str, Any], repo: str | Path, files: Sequence[str | Path] = ()) -> StudyPlan:
    """Validate ``config`` in place against ``<repo>/config/schema.yaml`` (defaults filled), check it against
    the file system and the models' local facts (kdflow.plan_checks), and plan the study it describes.

    ``files`` are the YAML files the config was read from: each is read again strictly (a key given twice is
    refused), and every problem is located in them (``config/x.yaml:12:5: data.sources[0]…``). Raises
    ConfigError naming every key at fault; checks that need what is not on this machine are in the plan's
    ``deferred``."""
    for path in files:
        read_yaml(path)
    locations = key_locations(files)
    source = " + ".join(map(str, files)) or "config"
    validate_config(config, load_schema(Path(repo) / "config" / "schema.yaml"), source=source, locations=locations)
    checks = check_plan(config, Path(repo))
    if checks.problems:
        raise config_error(source, checks.problems, locations)
    return StudyPlan(config, Path(repo), deferred=tuple(checks.deferred), facts=checks.facts)


def model_manifest(name: str) -> str:
    return f"resources/models/{name}/kdflow_model.json"


@dataclass(frozen=True, kw_only=True)
class EvalTarget:
    """One evaluated model: a training run, the teacher, or a student's untrained init (``<student>.init``).
    The eval job's ``target`` parameter (:meth:`to_dict`), read back by kdflow.evaluate (:meth:`from_dict`)."""

    kind: str  # one of KINDS
    student: str | None = None
    mode: str | None = None
    seed: int | None = None
    tag: str | None = None
    manifest: str  # the model's kdflow_model.json
    adapter: str | None = None  # results/train/<run> for a run
    gpus: int = 0
    model: str  # its id: the run name, the teacher's name or <student>.init

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EvalTarget:
        unknown = sorted(set(record) - {f.name for f in fields(cls)})
        if unknown:
            raise PlanError(f"eval target {record.get('model')!r}: unknown keys {unknown}")
        return cls(**record)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(f"eval target {self.model!r}: kind {self.kind!r} is none of {list(KINDS)}")
        if (self.kind == "run") != (self.adapter is not None):
            raise PlanError(f"eval target {self.model!r}: a run has an adapter directory, a baseline none")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StudyPlan(CachePlan):
    config: dict[str, Any]
    repo: Path  # the workflow's base directory (shipped lm-eval tasks live there)
    deferred: tuple[str, ...] = ()  # plan-time checks left to the first job that can make them (plan_checks)
    facts: Mapping[str, ModelFacts] = field(default_factory=dict)  # model name -> its shape, where known

    @property
    def teacher(self) -> str:
        return self.config["teacher"]["name"]

    @cached_property
    def students(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.config["students"]}

    # -- data ------------------------------------------------------------------------------------------------
    def source_files(self) -> list[str]:
        """The local files the configured sources read, so that editing one reruns the corpus."""
        files: list[str] = []
        for source in self.config["data"]["sources"]:
            for pattern in source.get("paths", []):
                files += sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        return list(dict.fromkeys(files))

    def shard_names(self, with_heldout: bool = True) -> list[str]:
        names = [shard_name(i) for i in range(self.config["data"]["n_shards"])]
        return names + ["heldout"] if with_heldout else names

    def shard_files(self) -> list[str]:
        return [f"{SHARDS_DIR}/{s}.parquet" for s in self.shard_names()]

    # -- models ----------------------------------------------------------------------------------------------
    def model_config(self, model: str) -> dict:
        if model == self.teacher:
            return self.config["teacher"]
        if model in self.students:
            return self.students[model]
        raise PlanError(
            f"model {model!r} is not in the config: known are teacher {self.teacher!r} and students "
            f"{sorted(self.students)}"
        )

    def model_role(self, model: str) -> str:
        return "teacher" if model == self.teacher else "student"

    def prepare_settings(self, model: str) -> dict[str, Any]:
        """The prepare_models settings of one model: config ``prepare``; for the teacher of a study whose caches
        run tensor-parallel, also ``teacher_parallel`` (``teacher_cache``'s device, parallel, tp_size), so that
        its held-out perplexity runs on the same ranks."""
        cache = self.config["teacher_cache"]
        if self.model_role(model) == "teacher" and cache["parallel"] == "tensor":
            keys = ("device", "parallel", "tp_size")
            return {**self.config["prepare"], "teacher_parallel": {k: cache[k] for k in keys}}
        return self.config["prepare"]

    def prepare_inputs(self, model: str) -> dict[str, str]:
        self.model_config(model)  # fails early on an unknown name
        inputs = {"heldout": HELDOUT_SHARD}
        if self.model_role(model) == "student":
            inputs["teacher"] = model_manifest(self.teacher)
        return inputs

    # -- training --------------------------------------------------------------------------------------------
    @cached_property
    def runs(self) -> dict[str, RunSpec]:
        """Training runs by name (kdflow.runs; the config is already validated)."""
        return expand_runs(self.config)[0]

    def run(self, run: str) -> RunSpec:
        if run not in self.runs:
            raise PlanError(f"run {run!r} is not in the config's training.experiments; known runs: {sorted(self.runs)}")
        return self.runs[run]

    def run_spec(self, run: str) -> dict[str, Any]:
        """The train job's ``spec`` parameter: a plain dict (:meth:`RunSpec.to_json`), which Snakemake's params
        trigger compares, read back by the trainer with :meth:`RunSpec.from_json`."""
        return self.run(run).to_json()

    def train_inputs(self, run: str) -> dict[str, str]:
        """The student, the index of each cache this run reads (kdflow.cache_index), and the held-out shard."""
        spec = self.run(run)
        own_vocab = self.students[spec.student].get("vocab") == "own"
        inputs = {
            "student": model_manifest(spec.student),
            "heldout": HELDOUT_SHARD,
            "topk": f"{self.cache_path(self.logits_read(spec))}/index.json",
        }
        if "rb" in spec.terms and spec.teacher_logits.source == "online":
            inputs["teacher"] = model_manifest(self.teacher)
        need = caches_read(spec.terms, own_vocab)
        if need["embed"]:
            inputs["embed"] = f"{self.cache_path('embed')}/index.json"
        if need["hidden"]:
            inputs["hidden"] = f"{self.cache_path(self.hidden_name)}/index.json"
        return inputs

    def train_gpus(self, run: str) -> int:
        """GPUs of a run's job: per node x nodes (SLURM: --gpus=<model>:<total> with --nodes)."""
        spec = self.run(run)
        return spec.gpus * spec.nodes

    def train_nodes(self, run: str) -> int:
        return self.run(run).nodes

    def train_tasks(self, run: str) -> int | None:
        """Several nodes: one srun task per node, started by the job's script itself (kdflow.launch)."""
        nodes = self.train_nodes(run)
        return nodes if nodes > 1 else None

    def train_mpi(self, run: str) -> str | None:
        return "srun" if self.train_nodes(run) > 1 else None

    def train_expected(self, run: str) -> dict[str, Any]:
        """Cache metadata a run's files must carry (the loader refuses others, naming the file and key)."""
        spec = self.run(run)
        cfg = self.cache_cfg
        logits = self.logits_read(spec)
        k, samples, sampling = parse_logit_name(logits)
        expected = {"teacher": self.teacher, "k": k, "max_length": cfg["max_length"], "samples": samples or None}
        if samples:
            expected["sample_seed"] = cfg["sample_seed"]
            expected["sampling"] = "systematic" if sampling == "systematic" else None
        if caches_read(spec.terms, False)["hidden"]:
            expected["layers"] = sorted(set(cfg["hidden_layers"]))
            expected["token_ratio"] = cfg["hidden_token_ratio"]
        return expected

    def train_outputs(self) -> list[str]:
        return [f"results/train/{run}" for run in self.runs]

    # -- evaluation ------------------------------------------------------------------------------------------
    def eval_settings(self) -> dict[str, Any]:
        """config["eval"] with a relative lm_eval.include_path resolved against the workflow's directory (where
        the shipped tasks live), so that a study run with --directory elsewhere finds them."""
        cfg = self.config["eval"]
        settings = {**cfg, "lm_eval": dict(cfg["lm_eval"])}
        tasks_dir = settings["lm_eval"]["include_path"]
        if tasks_dir and not os.path.isabs(tasks_dir):
            settings["lm_eval"]["include_path"] = str(self.repo / tasks_dir)
        return settings

    @cached_property
    def eval_targets(self) -> dict[str, EvalTarget]:
        """Every evaluated model by id: the runs, then the teacher and each student's untrained init (as the
        config's eval.baselines ask)."""
        baselines = self.config["eval"]["baselines"]
        targets = {}
        for run, spec in self.runs.items():
            targets[run] = EvalTarget(
                kind="run",
                student=spec.student,
                mode=spec.mode,
                seed=spec.seed,
                tag=spec.tag,
                manifest=model_manifest(spec.student),
                adapter=f"results/train/{run}",
                gpus=spec.gpus,
                model=run,
            )
        if "teacher" in baselines:
            targets[self.teacher] = EvalTarget(
                kind="teacher",
                student=None,
                mode=None,
                seed=None,
                tag=None,
                manifest=model_manifest(self.teacher),
                adapter=None,
                gpus=0,
                model=self.teacher,
            )
        if "student_init" in baselines:
            for student in self.students:
                targets[f"{student}.init"] = EvalTarget(
                    kind="student_init",
                    student=student,
                    mode=None,
                    seed=None,
                    tag=None,
                    manifest=model_manifest(student),
                    adapter=None,
                    gpus=0,
                    model=f"{student}.init",
                )
        return targets

    def eval_target(self, model: str) -> EvalTarget:
        if model not in self.eval_targets:
            raise PlanError(
                f"{model!r} is neither a training run nor a baseline of this config; evaluated "
                f"models: {sorted(self.eval_targets)}"
            )
        return self.eval_targets[model]

    def eval_params(self, model: str) -> dict[str, Any]:
        """The eval job's ``target`` parameter (kdflow.evaluate.evaluate_model)."""
        return self.eval_target(model).to_dict()

    def eval_gpus(self, model: str) -> int:
        return 1 if self.eval_target(model).gpus else 0

    def eval_inputs(self, model: str) -> dict[str, str]:
        target = self.eval_target(model)
        inputs = {
            "manifest": target.manifest,
            "heldout": HELDOUT_SHARD,
            "heldout_topk": f"{self.cache_path(self.topk_name)}/heldout.parquet",
        }
        if target.adapter:
            inputs["adapter"] = target.adapter
        return inputs

    def eval_files(self) -> list[str]:
        return [f"results/eval/{m}/{e}.json" for m in self.eval_targets for e in ("heldout", "lm_eval")]

    def expected_results(self) -> dict[str, Any]:
        """What parse_results must find: every model, every evaluation, every configured task."""
        return {
            "models": sorted(self.eval_targets),
            "evaluations": {"heldout": ["heldout"], "lm_eval": list(self.config["eval"]["lm_eval"]["tasks"])},
        }

    # -- the whole study -------------------------------------------------------------------------------------
    def final_outputs(self) -> list[str]:
        """What `rule all` asks for: every file of the study by name, the shards and each shard's cache files
        included. Snakemake rebuilds a missing file only when a job that must run needs it, so a deleted shard
        or cache file is rebuilt because `all` names it (tests/test_workflow.py); naming only the caches'
        indexes would plan 8,196 fewer lookups at 2,048 shards (0.8 s of an 11.6 s dry run: docs/benchmarks.md)
        and leave such a file missing."""
        return (
            self.shard_files()
            + ["results/data/manifest.json"]
            + [model_manifest(m) for m in [self.teacher, *self.students]]
            + self.cache_files()
            + self.train_outputs()
            + self.eval_files()
            + RESULTS
        )
