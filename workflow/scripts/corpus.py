"""Rule corpus: read every configured source into results/data/corpus.parquet (see kdflow.corpus)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

from kdflow.corpus import build_corpus
from kdflow.logs import run_logged

run_logged(
    snakemake.log[0],
    lambda: build_corpus(
        snakemake.params.data,
        snakemake.output.corpus,  # noqa: F821
        snakemake.output.manifest,
    ),
)  # noqa: F821
