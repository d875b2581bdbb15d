rule prepare_models:
    input:
        unpack(prepare_inputs),
    output:
        manifest="resources/models/{model}/kdflow_model.json",
    params:
        model=model_config,
        role=model_role,
        settings=prepare_settings,
    threads: JOB_THREADS
    log:
        "results/logs/prepare_models/{model}.log",
    benchmark:
        "results/benchmarks/prepare_models/{model}.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/prepare_models.py"
