# Evaluation of every training run and the baselines (kdflow.evaluate), then one study database and report
# (kdflow.results). See docs/results.md.


rule eval:
    input:
        unpack(eval_inputs),
    output:
        heldout="results/eval/{model}/heldout.json",
        lm_eval="results/eval/{model}/lm_eval.json",
        raw="results/eval/{model}/lm_eval_raw.json",
    params:
        target=eval_target,
        settings=PLAN.eval_settings(),
    threads: JOB_THREADS
    resources:
        gpu=eval_gpus,
    log:
        "results/logs/eval/{model}.log",
    benchmark:
        "results/benchmarks/eval/{model}.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/eval.py"


rule parse_results:
    input:
        evals=PLAN.eval_files(),
        runs=PLAN.train_outputs(),
    output:
        db="results/kdflow.duckdb",
        csv=report("results/summary.csv", category="Summary", caption="../workflow/report/summary.rst"),
        md="results/summary.md",
        plots=report(
            directory("results/plots"),
            patterns=["{name}.png"],
            category="Plots",
            caption="../workflow/report/plots.rst",
        ),
    params:
        expected=PLAN.expected_results(),
        benchmarks="results/benchmarks",
        telemetry="results/telemetry",
    log:
        "results/logs/parse_results.log",
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/parse_results.py"
