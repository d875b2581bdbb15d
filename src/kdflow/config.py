"""Loading and validating a study config against ``config/schema.yaml``.

The schema is the single source of truth for keys, types and defaults. Validation fills defaults in
place, refuses unknown keys and wrong types, and reports every problem with its dotted key path
(``data.sources[0].max_docs``), so a bad config fails before any job is planned.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = REPO_ROOT / "config" / "schema.yaml"


class ConfigError(ValueError):
    """A config that does not match the schema or contradicts itself."""


def _with_defaults(validator_class: type) -> type:
    # jsonschema's documented recipe: fill "default" while descending through "properties", so a
    # defaulted parent object ({}) then gets its own children's defaults too.
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    # JSON Schema counts 4.0 as an integer; kdflow's integers are counts and indices, so refuse floats.
    types = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(validator_class, {"properties": set_defaults}, type_checker=types)


def load_schema(path: str | Path = DEFAULT_SCHEMA) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _key_path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"{where}.{k}" if where != "(top level)" else k for k in extra)
        return f"unknown key {keys} (allowed here: {', '.join(allowed)})"
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def validate_config(config: dict, schema: dict | None = None, source: str = "config") -> dict:
    """Validate ``config`` in place (defaults filled) and return it.

    Raises ConfigError listing every violation with its key path, plus the cross-key checks the schema
    cannot express (unique names, a pruned student's layers).
    """
    schema = load_schema() if schema is None else schema
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    problems = [_describe(e) for e in errors]
    if not problems:
        problems = _cross_checks(config, schema)
    if problems:
        raise ConfigError(f"{source} is invalid:\n  - " + "\n  - ".join(dict.fromkeys(problems)))
    return config


def _cross_checks(config: dict, schema: dict) -> list[str]:
    from kdflow.runs import expand_runs

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
