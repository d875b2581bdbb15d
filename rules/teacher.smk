# Teacher caches, one job per shard (and the held-out set). See docs/cache_format.md.


rule topk_cache:
    input:
        shard="results/shards/{shard}.parquet",
        teacher=model_manifest(TEACHER),
    output:
        topk=f"{CACHE}/{TOPK_NAME}/{{shard}}.parquet",
        embed=f"{CACHE}/embed/{{shard}}.parquet",
    params:
        settings=PLAN.cache_settings("topk"),
        partial=PLAN.partial_dir(TOPK_NAME, "{shard}"),
    threads: JOB_THREADS
    log:
        "results/logs/topk_cache/{shard}.log",
    benchmark:
        "results/benchmarks/topk_cache/{shard}.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/topk_cache.py"


# A logit cache of runs that ask for another k or samples than the study's (teacher_logits): the training shards
# only, no embed file. The same job as topk_cache otherwise (one full teacher pass).
rule logit_cache:
    input:
        shard="results/shards/{shard}.parquet",
        teacher=model_manifest(TEACHER),
    output:
        topk=f"{CACHE}/{{logits}}/{{shard}}.parquet",
    wildcard_constraints:
        logits=EXTRA_LOGITS,
    params:
        settings=logit_settings,
        partial=PLAN.partial_dir("{logits}", "{shard}"),
    threads: JOB_THREADS
    log:
        "results/logs/logit_cache/{logits}/{shard}.log",
    benchmark:
        "results/benchmarks/logit_cache/{logits}/{shard}.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/topk_cache.py"


rule hidden_cache:
    input:
        shard="results/shards/{shard}.parquet",
        teacher=model_manifest(TEACHER),
    output:
        hidden=f"{CACHE}/{HIDDEN_NAME}/{{shard}}.parquet",
    params:
        settings=PLAN.cache_settings("hidden"),
        partial=PLAN.partial_dir(HIDDEN_NAME, "{shard}"),
    threads: JOB_THREADS
    log:
        "results/logs/hidden_cache/{shard}.log",
    benchmark:
        "results/benchmarks/hidden_cache/{shard}.tsv"
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/hidden_cache.py"


# One index per cache over the training shards' files (kdflow.cache_index): what a training run depends on.
# Cheap (file footers only), so it runs where Snakemake runs, not as a cluster job.
localrules:
    cache_index,


rule cache_index:
    input:
        files=cache_index_inputs,
    output:
        index=f"{CACHE}/{{cache}}/index.json",
    log:
        "results/logs/cache_index/{cache}.log",
    conda:
        "../workflow/envs/kdflow.yaml"
    script:
        "../workflow/scripts/cache_index.py"
