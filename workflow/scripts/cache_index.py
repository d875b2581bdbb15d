"""Rule cache_index: the index of one teacher cache over the training shards (see kdflow.cache_index)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821  (this checkout's package)

from kdflow.cache_index import write_index
from kdflow.logs import run_logged

sm = snakemake  # noqa: F821


def main():
    write_index(list(sm.input.files), sm.output.index)


run_logged(sm.log[0], main)
