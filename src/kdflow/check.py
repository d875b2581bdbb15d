"""``python -m kdflow.check FILE …``: every check the dry run makes, on config files, without Snakemake.

For each file: read strictly (a file that is not YAML, is empty or repeats a key is refused with its line and
column), validated against ``config/schema.yaml`` and the cross-key rules (each problem located in the file),
then checked against this machine (kdflow.plan_checks: paths, model layers, hidden states, ``k``). Prints one
verdict per file, with the checks deferred to the jobs, and exits 1 when any file is refused. Relative paths in
a config are relative to the current directory, as in ``snakemake`` run from here; ``--directory DIR`` checks
as ``snakemake --directory DIR`` would.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kdflow.config import read_yaml
from kdflow.errors import KdflowError
from kdflow.plan import study_plan
from kdflow.schema import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdflow.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="study config files (YAML)")
    parser.add_argument("--directory", type=Path, help="the working directory the study runs in (default: here)")
    args = parser.parse_args(argv)
    files = [f.resolve() for f in args.files]
    if args.directory:
        os.chdir(args.directory)
    failed = 0
    for path in files:
        try:
            plan = study_plan(read_yaml(path), REPO_ROOT, files=[path])
        except KdflowError as e:
            failed += 1
            print(f"REFUSED {e}", file=sys.stderr)
            continue
        jobs = len(plan.final_outputs())
        print(f"ok {path}: {len(plan.runs)} training runs, {len(plan.eval_targets)} evaluated models, {jobs} targets")
        for line in plan.deferred:
            print(f"  deferred to the jobs: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
