# Config validation, wildcard constraints and every input function; the other .smk files hold rules only.
# The study plan (kdflow.plan) is computed once here; each input function is a lookup into it.
# (The Snakefile has put this checkout's src/ first on sys.path.)
from snakemake.logging import logger

from kdflow.errors import KdflowError
from kdflow.plan import PlanError, model_manifest, study_plan
from kdflow.runs import RUN_NAME_PATTERN
from kdflow.shards import SHARD_PATTERN

# The config files as given (the embedded default unless --configfile): read again strictly and used to
# locate every problem (file:line:column). Every check that can be made here is (kdflow.plan_checks); the rest
# are listed once, by the main process, and made by the first job that can.
try:
    PLAN = study_plan(config, workflow.basedir, files=workflow.configfiles)
except KdflowError as e:
    raise WorkflowError(str(e)) from None
if PLAN.deferred and workflow.is_main_process:
    logger.info(
        "kdflow: checks deferred to the jobs (not knowable from local files):\n  - " + "\n  - ".join(PLAN.deferred)
    )


wildcard_constraints:
    shard=SHARD_PATTERN,
    cache="topk_k[0-9]+(_s[0-9]+(_sys)?)?|embed|hidden_l[0-9-]+",
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


TEACHER = PLAN.teacher
TOPK_NAME = PLAN.topk_name
HIDDEN_NAME = PLAN.hidden_name
CACHE = PLAN.cache_dir
# The extra logit caches' names (rule logit_cache), as a wildcard pattern; none matches nothing.
EXTRA_LOGITS = "|".join(PLAN.extra_logit_names) or "(?!x)x"


def lookup(method, *wildcard_names):
    """An input function ``wildcards -> PLAN.method(*wildcards)``; a target outside the plan fails naming it."""

    def from_wildcards(wildcards):
        try:
            return method(*(wildcards[name] for name in wildcard_names))
        except PlanError as e:
            raise WorkflowError(str(e)) from None

    return from_wildcards


model_config = lookup(PLAN.model_config, "model")
model_role = lookup(PLAN.model_role, "model")
prepare_settings = lookup(PLAN.prepare_settings, "model")
prepare_inputs = lookup(PLAN.prepare_inputs, "model")
cache_index_inputs = lookup(PLAN.cache_index_inputs, "cache")
logit_settings = lookup(PLAN.logit_settings, "logits")
train_inputs = lookup(PLAN.train_inputs, "run")
run_spec = lookup(PLAN.run_spec, "run")
train_gpus = lookup(PLAN.train_gpus, "run")
train_expected = lookup(PLAN.train_expected, "run")
train_nodes = lookup(PLAN.train_nodes, "run")
train_tasks = lookup(PLAN.train_tasks, "run")
train_mpi = lookup(PLAN.train_mpi, "run")
eval_target = lookup(PLAN.eval_params, "model")
eval_gpus = lookup(PLAN.eval_gpus, "model")
eval_inputs = lookup(PLAN.eval_inputs, "model")


def get_final_output():
    return PLAN.final_outputs()
