"""Rule shard: slice one shard (or the held-out set) out of the corpus (see kdflow.shards)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

from kdflow.logs import run_logged
from kdflow.shards import write_shard

run_logged(
    snakemake.log[0],
    lambda: write_shard(
        snakemake.input.corpus,
        snakemake.wildcards.shard,  # noqa: F821
        snakemake.output.shard,
    ),
)  # noqa: F821
