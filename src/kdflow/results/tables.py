"""The tables of the results database: their columns, DuckDB types and comments (the DDL, the comments stored
in the database and docs/results.md are all made from :data:`TABLES`)."""

from __future__ import annotations

# {table: (comment, [(column, DuckDB type, comment), ...])}: the DDL, the DuckDB comments and docs/results.md.
LOAD_SHARE_WARNING = 0.2  # a stage's load share above this is flagged (load_share.too_high, summary.md)

TABLES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "runs": (
        "one row per evaluated model (runs, teacher, student init) and per training run directory",
        [
            (
                "model",
                "VARCHAR",
                "model id: run name <student>.<mode>.s<seed>[.<tag>], the teacher's name, <student>.init",
            ),
            ("kind", "VARCHAR", "run | teacher | student_init"),
            ("student", "VARCHAR", "student name (NULL for the teacher)"),
            ("mode", "VARCHAR", "training mode (runs only)"),
            ("seed", "INTEGER", "seed (runs only)"),
            ("tag", "VARCHAR", "experiment tag (runs only, NULL without one)"),
            (
                "run_group",
                "VARCHAR",
                "the run name without its seed: <student>.<mode>[.<tag>]; baselines: their model id",
            ),
            (
                "terms",
                "VARCHAR",
                'loss weights as JSON text, e.g. {"ce": 0.5, "rb": 0.5} (runs with a training directory)',
            ),
            ("steps", "INTEGER", "optimiser steps trained"),
            ("tokens", "BIGINT", "student tokens trained on"),
            ("train_seconds", "DOUBLE", "seconds in training steps (summary.json train_seconds)"),
            ("final_loss", "DOUBLE", "training loss, mean of the last 5 steps (summary.json final.loss)"),
            ("evaluated", "BOOLEAN", "whether the model has evaluation files"),
            ("train_dir", "VARCHAR", "the training run directory read (NULL: none given)"),
        ],
    ),
    "metrics": (
        "one row per metric of an evaluation file",
        [
            ("model", "VARCHAR", "model id (runs.model)"),
            ("evaluation", "VARCHAR", "heldout | lm_eval"),
            ("task", "VARCHAR", "task, e.g. heldout, kdflow_heldout, arc_easy"),
            (
                "metric",
                "VARCHAR",
                "metric, e.g. ppl, nll_per_token, top1_agreement, kl_teacher_student, word_perplexity, acc",
            ),
            ("value", "DOUBLE", "the value (NULL: not applicable to this model)"),
            ("stderr", "DOUBLE", "the evaluation's own standard error (NULL: not computed)"),
            ("higher_is_better", "BOOLEAN", "direction as the evaluation file gives it (NULL: not given)"),
            ("source", "VARCHAR", "the evaluation file"),
        ],
    ),
    "train_steps": (
        "one row per optimiser step of a training run (metrics.jsonl); NULL where the run does not log it",
        [
            ("model", "VARCHAR", "run name (runs.model)"),
            ("step", "INTEGER", "optimiser step, from 1"),
            ("epoch", "INTEGER", "data epoch, from 0"),
            ("loss", "DOUBLE", "weighted sum of the terms"),
            ("ce", "DOUBLE", "cross-entropy term (nats per token)"),
            ("rb", "DOUBLE", "response-based (logit) KD term"),
            ("fb", "DOUBLE", "feature-based KD term"),
            ("relb", "DOUBLE", "relation-based KD term"),
            ("relb_distance", "DOUBLE", "RKD distance part of relb"),
            ("relb_angle", "DOUBLE", "RKD angle part of relb"),
            ("lr", "DOUBLE", "learning rate of the step"),
            ("grad_norm", "DOUBLE", "gradient norm before clipping"),
            ("tokens", "BIGINT", "student tokens in the step (all ranks)"),
            ("docs", "INTEGER", "documents in the step (all ranks)"),
            ("tokens_per_s", "DOUBLE", "tokens per second of the step"),
            ("step_s", "DOUBLE", "seconds of the step"),
            ("elapsed_s", "DOUBLE", "seconds of training so far (over resumes)"),
        ],
    ),
    "jobs": (
        "one row per Snakemake benchmark file (per repeat)",
        [
            (
                "rule",
                "VARCHAR",
                "the rule: the benchmark file's folder under results/benchmarks "
                "(the file stem for a file directly in it)",
            ),
            ("name", "VARCHAR", "the file stem: the shard, run or model of the job"),
            ("repeat", "INTEGER", "row of the file, from 0 (benchmark repeats)"),
            ("seconds", "DOUBLE", "wall-clock seconds (s)"),
            ("max_rss_mb", "DOUBLE", "peak resident set size, MB"),
            ("max_vms_mb", "DOUBLE", "peak virtual memory, MB"),
            ("max_uss_mb", "DOUBLE", "peak unique set size, MB"),
            ("max_pss_mb", "DOUBLE", "peak proportional set size, MB"),
            ("io_in", "DOUBLE", "MB read"),
            ("io_out", "DOUBLE", "MB written"),
            ("mean_load", "DOUBLE", "mean CPU load, percent of one core"),
            ("cpu_time", "DOUBLE", "CPU seconds (user + system)"),
            ("source", "VARCHAR", "the benchmark file"),
        ],
    ),
    "telemetry": (
        "one row per telemetry sample and GPU (one row with gpu NULL where a job sampled no GPU)",
        [
            ("rule", "VARCHAR", "the rule of the job (the file's start line)"),
            ("job", "VARCHAR", "the job: its shard, model or run (jobs.name)"),
            ("sample", "INTEGER", "sample of the job, from 0 (the first is taken at the start, the last at the end)"),
            ("t", "DOUBLE", "Unix time of the sample, s"),
            ("elapsed_s", "DOUBLE", "seconds since the job's telemetry started"),
            ("gpu", "INTEGER", "NVML index of the GPU (NULL: no GPU sampled)"),
            ("power_w", "DOUBLE", "GPU power draw, W"),
            ("energy_j", "DOUBLE", "the GPU's energy counter (since the driver loaded), J; NULL where unsupported"),
            ("mem_used_mb", "DOUBLE", "GPU memory in use (all processes on the GPU), MB"),
            ("util_gpu", "DOUBLE", "GPU utilisation, percent of the last sample period with a kernel running"),
            (
                "cpu_percent",
                "DOUBLE",
                "CPU of the job's processes since the previous sample, percent of one core "
                "(NULL in sample 0); repeated on each GPU row of a sample",
            ),
            ("rss_mb", "DOUBLE", "resident memory of the job's processes, MB; repeated on each GPU row of a sample"),
            ("line", "INTEGER", "line of the telemetry file, from 1"),
            ("source", "VARCHAR", "the telemetry file"),
        ],
    ),
    "energy": (
        "one row per telemetry file: energy, tokens and peak memory of one job",
        [
            ("rule", "VARCHAR", "the rule of the job"),
            ("job", "VARCHAR", "the job: its shard, model or run (jobs.name)"),
            ("host", "VARCHAR", "the machine it ran on"),
            ("nvml", "BOOLEAN", "whether NVML (GPU telemetry) was available"),
            ("nvml_error", "VARCHAR", "why NVML was unavailable (NULL with NVML)"),
            ("gpus", "INTEGER", "GPUs sampled"),
            ("gpu_names", "VARCHAR", "their names, comma-separated (NULL: none)"),
            ("samples", "INTEGER", "sample lines"),
            ("complete", "BOOLEAN", "the file has its end line and the job's work succeeded (false: killed or failed)"),
            ("elapsed_s", "DOUBLE", "seconds measured (end line; without one, up to the last sample)"),
            ("tokens", "BIGINT", "tokens the job processed, as it reported them (NULL: none reported)"),
            ("load_s", "DOUBLE", "seconds the job spent loading models (NULL: not reported)"),
            ("compute_s", "DOUBLE", "seconds the job spent computing after the load (NULL: not reported)"),
            (
                "energy_j",
                "DOUBLE",
                "GPU energy of the job over all its GPUs, J: the energy counters' difference, "
                "integrated power where a GPU has no counter; NULL without NVML",
            ),
            ("energy_per_token_j", "DOUBLE", "energy_j / tokens, J per token (NULL without energy or tokens)"),
            ("peak_gpu_mem_mb", "DOUBLE", "highest GPU memory in use on any one of its GPUs, MB (NULL: no GPU)"),
            ("peak_rss_mb", "DOUBLE", "highest resident memory of the job's processes, MB"),
            ("source", "VARCHAR", "the telemetry file"),
        ],
    ),
    "load_share": (
        "one row per stage (rule) whose jobs report their model-load seconds: the share of their time spent loading",
        [
            ("rule", "VARCHAR", "the rule (stage)"),
            ("jobs", "INTEGER", "its jobs that report load_s (telemetry end lines)"),
            ("load_s", "DOUBLE", "model-load seconds summed over those jobs"),
            ("compute_s", "DOUBLE", "compute seconds summed over those jobs"),
            ("elapsed_s", "DOUBLE", "the jobs' measured seconds summed (load, compute and the rest: I/O, set-up)"),
            ("load_share", "DOUBLE", "load_s / elapsed_s"),
            (
                "too_high",
                "BOOLEAN",
                "load_share above 0.2: fewer, larger jobs would waste less (docs/cluster.md, shards sized by cost)",
            ),
        ],
    ),
    "summary": (
        "one row per (summary row, evaluation, task, metric): what summary.csv and summary.md show",
        [
            ("run_group", "VARCHAR", "run group (runs aggregated over seeds) or baseline model id"),
            ("kind", "VARCHAR", "run | teacher | student_init"),
            ("student", "VARCHAR", "student name (NULL for the teacher)"),
            ("mode", "VARCHAR", "training mode (run groups only)"),
            ("tag", "VARCHAR", "experiment tag (run groups only)"),
            ("evaluation", "VARCHAR", "heldout | lm_eval"),
            ("task", "VARCHAR", "task"),
            ("metric", "VARCHAR", "metric"),
            (
                "higher_is_better",
                "BOOLEAN",
                "direction used for best and deltas (the files' value, else from the metric name; NULL: unknown)",
            ),
            ("n", "INTEGER", "seeds (models) with a value"),
            ("mean", "DOUBLE", "mean over the seeds (NULL: not applicable)"),
            ("stderr", "DOUBLE", "sample standard deviation / sqrt(n) over the seeds (NULL with one seed)"),
            (
                "best",
                "BOOLEAN",
                "the best student row for this metric (teacher excluded; ties all marked; NULL: unknown direction)",
            ),
            ("ce_group", "VARCHAR", "the no-KD group of the same student and tag (run groups of another mode only)"),
            ("delta_ce", "DOUBLE", "mean - mean of ce_group"),
            ("delta_ce_stderr", "DOUBLE", "sqrt(stderr^2 + stderr of ce_group^2); NULL when either has one seed"),
            ("teacher", "VARCHAR", "the teacher's model id"),
            ("delta_teacher", "DOUBLE", "mean - the teacher's value"),
            ("delta_teacher_stderr", "DOUBLE", "stderr of this row (the teacher's value is one number)"),
        ],
    ),
}

STEP_COLUMNS = [c for c, _, _ in TABLES["train_steps"][1]]
