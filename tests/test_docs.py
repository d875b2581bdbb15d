"""The documentation covers what users configure."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _keys(node, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            out.add(name)
            _keys(sub, out)
        for value in node.values():
            if isinstance(value, (dict, list)):
                _keys(value, out)
    elif isinstance(node, list):
        for item in node:
            _keys(item, out)
    return out


def test_every_schema_key_is_documented_in_config_readme():
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    keys = _keys(schema, set())
    assert {"n_shards", "keep_layers", "bad_lines", "streaming", "ppl_max_docs"} <= keys
    readme = (REPO / "config/README.md").read_text()
    # a key counts as documented when it appears in a backticked key path: `k`, `a.k`, `k.b`, `a.k.b`
    missing = sorted(k for k in keys if not re.search(rf"[`.]{re.escape(k)}[`.]", readme))
    assert not missing, f"config/README.md does not document: {missing}"


def test_readme_opens_with_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```bash") + 3]
    assert block[0].startswith("bash install.sh && snakemake --cores all")
    assert block[1].startswith("bash install.sh && python -m pytest")
    ci = (REPO / ".ci/run").read_text()
    assert "bash install.sh" in ci and "python -m pytest" in ci and "snakemake --cores all" in ci
