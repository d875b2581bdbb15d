rule corpus:
    input:
        PLAN.source_files(),
    output:
        corpus="results/data/corpus.parquet",
        manifest="results/data/manifest.json",
    params:
        data=config["data"],
    log:
        "results/logs/corpus.log",
    benchmark:
        "results/benchmarks/corpus.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/corpus.py"


rule shard:
    input:
        corpus="results/data/corpus.parquet",
    output:
        shard="results/shards/{shard}.parquet",
    log:
        "results/logs/shard/{shard}.log",
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/shard.py"
