# kdflow: knowledge distillation of large language models as one Snakemake DAG.
# Wiring only: the rules live in rules/, the logic in the kdflow package (src/kdflow).
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# This checkout's package, also when another kdflow is installed or none is (conda envs).
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kdflow.config import ConfigError, read_yaml

# The embedded default, unless --configfile names a study: a study config is complete by itself, never
# laid over the default (Snakemake would deep-merge the two). Read by kdflow first, so that an edit that breaks
# the YAML is reported with its line and column (Snakemake's own message names neither); a --configfile is
# parsed by Snakemake before this file runs (`python -m kdflow.config check FILE` locates its errors).
if not workflow.overwrite_configfiles:
    try:
        read_yaml("config/config.yaml")
    except ConfigError as e:
        raise WorkflowError(str(e)) from None

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
