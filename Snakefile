# kdflow: knowledge distillation of large language models as one Snakemake DAG.
# Wiring only: the rules live in rules/, the logic in the kdflow package (src/kdflow).
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless --configfile names a study: a study config is complete by itself, never
# laid over the default (Snakemake would deep-merge the two).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/teacher.smk"
include: "rules/train.smk"
include: "rules/eval.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
