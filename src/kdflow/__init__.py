"""kdflow: knowledge distillation of large language models as a Snakemake workflow."""

__version__ = "0.1.0"
