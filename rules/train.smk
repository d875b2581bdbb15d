# Students: one LoRA training run per entry of the expanded experiment list (kdflow.runs, kdflow.train).
# Checkpoints and per-step metrics live in results/checkpoints/{run}: outside the declared output, which
# Snakemake deletes when a job fails, so that a rerun resumes where the killed job stopped.


rule train:
    input:
        unpack(train_inputs),
    output:
        run=directory("results/train/{run}"),
    params:
        spec=lambda wildcards: run_spec(wildcards),
        expected=lambda wildcards: train_expected(wildcards),
        work="results/checkpoints/{run}",
    threads: JOB_THREADS
    resources:
        gpu=lambda wildcards: train_gpus(wildcards),
        nodes=lambda wildcards: run_spec(wildcards)["nodes"],
        # several nodes: one srun task per node, started by the script itself (kdflow.launch)
        tasks=lambda wildcards: run_spec(wildcards)["nodes"] if run_spec(wildcards)["nodes"] > 1 else None,
        mpi=lambda wildcards: "srun" if run_spec(wildcards)["nodes"] > 1 else None,
    log:
        "results/logs/train/{run}.log",
    benchmark:
        "results/benchmarks/train/{run}.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/train.py"
