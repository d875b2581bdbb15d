# Config validation, wildcard constraints and every input function; the other .smk files hold rules only.
import glob
import os
import sys
from pathlib import Path

# This checkout's package, also when another kdflow is installed or none is (conda envs).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kdflow.config import ConfigError, load_schema, validate_config
from kdflow.corpus import shard_name
from kdflow.runs import RUN_NAME_PATTERN, expand_runs
from kdflow.shards import SHARD_PATTERN

try:
    validate_config(config, load_schema(Path(workflow.basedir) / "config" / "schema.yaml"))
except ConfigError as e:
    raise WorkflowError(str(e)) from None


wildcard_constraints:
    shard=SHARD_PATTERN,
    cache="topk_k[0-9]+|embed|hidden_l[0-9-]+",
    model="[A-Za-z0-9][A-Za-z0-9._-]*",
    run=RUN_NAME_PATTERN,


# Threads of each model job (prepare_models, the caches, train, eval) when jobs run where Snakemake runs: half
# the cores given (--cores), so that two jobs run side by side. A third or more of such a job on a CPU is
# single-threaded start-up (imports, model loading); two at once keep every core busy (the default study in CI
# on 2 cores: 470 s, against 641 s one 2-thread job at a time in the CI run before, 2026-12-01). The SLURM
# profile sets these rules' threads itself (set-threads), and SLURM gives each job its own CPUs.
try:
    JOB_THREADS = max(1, workflow.cores // 2)
except WorkflowError:  # no --cores (a dry run, or a cluster executor): the profile's set-threads decide
    JOB_THREADS = 1


TEACHER = config["teacher"]["name"]
STUDENTS = {s["name"]: s for s in config["students"]}
CACHE_CFG = config["teacher_cache"]
TOPK_NAME = f"topk_k{CACHE_CFG['k']}"
HIDDEN_NAME = f"hidden_l{'-'.join(map(str, sorted(CACHE_CFG['hidden_layers'])))}"
CACHE = f"results/cache/{TEACHER}"
TOPK_DIR = f"{CACHE}/{TOPK_NAME}"
EMBED_DIR = f"{CACHE}/embed"
HIDDEN_DIR = f"{CACHE}/{HIDDEN_NAME}"
# Finished parts of unfinished cache jobs: outside the declared outputs, which Snakemake deletes on failure.
PARTIAL = f"results/cache/.partial/{TEACHER}"
# Training runs by name (already checked by validate_config).
RUNS = expand_runs(config)[0]


def source_files():
    """The local files the configured sources read, so that editing one reruns the corpus."""
    files = []
    for source in config["data"]["sources"]:
        for pattern in source.get("paths", []):
            files += sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return list(dict.fromkeys(files))


def shard_names(with_heldout=True):
    names = [shard_name(i) for i in range(config["data"]["n_shards"])]
    return names + ["heldout"] if with_heldout else names


def shard_files():
    return [f"results/shards/{s}.parquet" for s in shard_names()]


def model_manifest(name):
    return f"resources/models/{name}/kdflow_model.json"


def model_config(wildcards):
    if wildcards.model == TEACHER:
        return config["teacher"]
    if wildcards.model in STUDENTS:
        return STUDENTS[wildcards.model]
    raise WorkflowError(
        f"model {wildcards.model!r} is not in the config: known are teacher {TEACHER!r} and students "
        f"{sorted(STUDENTS)}"
    )


def model_role(wildcards):
    return "teacher" if wildcards.model == TEACHER else "student"


def prepare_inputs(wildcards):
    inputs = {"heldout": "results/shards/heldout.parquet"}
    if model_role(wildcards) == "student":
        model_config(wildcards)  # fails early on an unknown name
        inputs["teacher"] = model_manifest(TEACHER)
    return inputs


def cache_settings(*keys):
    """The teacher_cache settings a cache rule depends on (so that other changes do not rerun it)."""
    common = ("max_length", "batch_size", "rows_per_part", "device", "dtype")
    return {k: CACHE_CFG[k] for k in (*common, *keys)}


def cache_files():
    return [
        f"{d}/{s}.parquet" for d in (TOPK_DIR, EMBED_DIR, HIDDEN_DIR) for s in shard_names()
    ]


def run_spec(wildcards):
    if wildcards.run not in RUNS:
        raise WorkflowError(
            f"run {wildcards.run!r} is not in the config's training.experiments; known runs: {sorted(RUNS)}"
        )
    return RUNS[wildcards.run]


def cache_index_inputs(wildcards):
    """The training shards' files of one cache (the held-out shard's file is for evaluation)."""
    if wildcards.cache not in (TOPK_NAME, "embed", HIDDEN_NAME):
        raise WorkflowError(f"results/cache/{TEACHER}/{wildcards.cache}: not a cache of this config "
                            f"(caches: {TOPK_NAME}, embed, {HIDDEN_NAME})")
    return [f"{CACHE}/{wildcards.cache}/{s}.parquet" for s in shard_names(with_heldout=False)]


def train_inputs(wildcards):
    """The student, the index of each cache this run reads (kdflow.cache_index), and the held-out shard."""
    spec = run_spec(wildcards)
    own_vocab = STUDENTS[spec["student"]].get("vocab") == "own"
    inputs = {
        "student": model_manifest(spec["student"]),
        "heldout": "results/shards/heldout.parquet",
        "topk": f"{TOPK_DIR}/index.json",
    }
    if "relb" in spec["terms"] or own_vocab:
        inputs["embed"] = f"{EMBED_DIR}/index.json"
    if "fb" in spec["terms"]:
        inputs["hidden"] = f"{HIDDEN_DIR}/index.json"
    return inputs


def train_gpus(wildcards):
    """GPUs of a run's job: per node x nodes (SLURM: --gpus=<model>:<total> with --nodes)."""
    spec = run_spec(wildcards)
    return spec["gpus"] * spec["nodes"]


def train_expected(wildcards):
    """Cache metadata a run's files must carry (the loader refuses others, naming the file and key)."""
    spec = run_spec(wildcards)
    expected = {"teacher": TEACHER, "k": CACHE_CFG["k"], "max_length": CACHE_CFG["max_length"]}
    if "fb" in spec["terms"]:
        expected["layers"] = sorted(set(CACHE_CFG["hidden_layers"]))
        expected["token_ratio"] = CACHE_CFG["hidden_token_ratio"]
    return expected


def train_outputs():
    return [f"results/train/{run}" for run in RUNS]


EVAL_CFG = config["eval"]


def eval_settings():
    """config["eval"] with a relative lm_eval.include_path resolved against this repository (where the shipped
    tasks live), so that a study run with --directory elsewhere finds them."""
    settings = {**EVAL_CFG, "lm_eval": dict(EVAL_CFG["lm_eval"])}
    tasks_dir = settings["lm_eval"]["include_path"]
    if tasks_dir and not os.path.isabs(tasks_dir):
        settings["lm_eval"]["include_path"] = str(Path(workflow.basedir) / tasks_dir)
    return settings


def eval_models():
    """Every evaluated model by id: the runs, the teacher, each student's untrained init (``<student>.init``)."""
    models = {}
    for run, spec in RUNS.items():
        models[run] = {"kind": "run", "student": spec["student"], "mode": spec["mode"], "seed": spec["seed"],
                       "tag": spec["tag"], "manifest": model_manifest(spec["student"]),
                       "adapter": f"results/train/{run}", "gpus": spec["gpus"]}
    if "teacher" in EVAL_CFG["baselines"]:
        models[TEACHER] = {"kind": "teacher", "student": None, "mode": None, "seed": None, "tag": None,
                           "manifest": model_manifest(TEACHER), "adapter": None, "gpus": 0}
    if "student_init" in EVAL_CFG["baselines"]:
        for student in STUDENTS:
            models[f"{student}.init"] = {"kind": "student_init", "student": student, "mode": None, "seed": None,
                                         "tag": None, "manifest": model_manifest(student), "adapter": None,
                                         "gpus": 0}
    return models


EVAL_MODELS = eval_models()


def eval_target(wildcards):
    if wildcards.model not in EVAL_MODELS:
        raise WorkflowError(
            f"{wildcards.model!r} is neither a training run nor a baseline of this config; evaluated models: "
            f"{sorted(EVAL_MODELS)}"
        )
    return dict(EVAL_MODELS[wildcards.model], model=wildcards.model)


def eval_gpus(wildcards):
    return 1 if eval_target(wildcards)["gpus"] else 0


def eval_inputs(wildcards):
    target = eval_target(wildcards)
    inputs = {
        "manifest": target["manifest"],
        "heldout": "results/shards/heldout.parquet",
        "heldout_topk": f"{TOPK_DIR}/heldout.parquet",
    }
    if target["adapter"]:
        inputs["adapter"] = target["adapter"]
    return inputs


def eval_files():
    return [f"results/eval/{m}/{e}.json" for m in EVAL_MODELS for e in ("heldout", "lm_eval")]


def expected_results():
    """What parse_results must find: every model, every evaluation, every configured task."""
    return {
        "models": sorted(EVAL_MODELS),
        "evaluations": {"heldout": ["heldout"], "lm_eval": list(EVAL_CFG["lm_eval"]["tasks"])},
    }


RESULTS = ["results/kdflow.duckdb", "results/summary.csv", "results/summary.md", "results/plots"]


def get_final_output():
    return (
        shard_files()
        + ["results/data/manifest.json"]
        + [model_manifest(m) for m in [TEACHER, *STUDENTS]]
        + cache_files()
        + train_outputs()
        + eval_files()
        + RESULTS
    )
