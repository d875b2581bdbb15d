"""Loading and validating a study config against ``config/schema.yaml``.

The schema is the single source of truth for keys, types and defaults. Validation fills defaults in
place, refuses unknown keys and wrong types, and reports every problem with its dotted key path
(``data.sources[0].max_docs``), so a bad config fails before any job is planned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from kdflow.runs import expand_runs
from kdflow.schema import DEFAULT_SCHEMA, describe, load_schema, validator_class

__all__ = ["DEFAULT_SCHEMA", "ConfigError", "config_hash", "load_config", "load_schema", "validate_config"]


class ConfigError(ValueError):
    """A config that does not match the schema or contradicts itself."""


def validate_config(config: dict, schema: dict | None = None, source: str = "config") -> dict:
    """Validate ``config`` in place (defaults filled) and return it.

    Raises ConfigError listing every violation with its key path, plus the cross-key checks the schema
    cannot express (unique names, a pruned student's layers).
    """
    schema = load_schema() if schema is None else schema
    validator = validator_class()(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    problems = [describe(e) for e in errors]
    if not problems:
        problems = _cross_checks(config, schema)
    if problems:
        raise ConfigError(f"{source} is invalid:\n  - " + "\n  - ".join(dict.fromkeys(problems)))
    return config


def _cross_checks(config: dict, schema: dict) -> list[str]:
    problems = []
    names = [s["name"] for s in config["data"]["sources"]]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"data.sources: the name {dup!r} is used twice; source names must be unique")
    models = [config["teacher"]["name"]] + [s["name"] for s in config["students"]]
    for dup in sorted({n for n in models if models.count(n) > 1}):
        problems.append(f"teacher.name / students[].name: {dup!r} is used twice; model names must be unique")
    for i, student in enumerate(config["students"]):
        keep = student["source"].get("keep_layers")
        if keep is not None and keep != sorted(keep):
            problems.append(f"students[{i}].source.keep_layers: must be ascending, got {keep}")
    data = config["data"]
    if data["long_docs"] != "truncate" and data["max_chars"] is None:
        problems.append(f"data.long_docs: {data['long_docs']!r} needs data.max_chars to be set")
    return problems + expand_runs(config, schema)[1]


def load_config(path: str | Path, schema: dict | None = None) -> dict:
    """Read a YAML config file and validate it (defaults filled)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return validate_config(config, schema, source=str(path))


def config_hash(section: Any) -> str:
    """A short stable hash of a config section, recorded in provenance."""
    blob = json.dumps(section, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
