# Students: one LoRA training run per entry of the expanded experiment list (kdflow.runs, kdflow.train).
# Checkpoints and per-step metrics live in results/checkpoints/{run}: outside the declared output, which
# Snakemake deletes when a job fails, so that a rerun resumes where the killed job stopped.


rule train:
    input:
        unpack(train_inputs),
    output:
        run=directory("results/train/{run}"),
    params:
        spec=run_spec,
        expected=train_expected,
        work="results/checkpoints/{run}",
    threads: JOB_THREADS
    resources:
        gpu=train_gpus,
        nodes=train_nodes,
        # several nodes: one srun task per node, started by the script itself (kdflow.launch)
        tasks=train_tasks,
        mpi=train_mpi,
    log:
        "results/logs/train/{run}.log",
    benchmark:
        "results/benchmarks/train/{run}.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/train.py"
