"""The config schema (``config/schema.yaml``) and the jsonschema machinery kdflow validates with.

Shared by ``kdflow.config`` (the whole config) and ``kdflow.runs`` (each run's merged settings), so that
neither imports the other's internals: both describe an error the same way, by its dotted key path.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = REPO_ROOT / "config" / "schema.yaml"


def load_schema(path: str | Path = DEFAULT_SCHEMA) -> dict:
    # libyaml's loader where PyYAML has it: the same mapping, parsed about 10x faster (the schema is read at every
    # Snakemake start, a dry run's included)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)


def validator_class() -> type:
    """Draft 2020-12 that fills ``default`` values in place and counts no float as an integer."""
    base = jsonschema.Draft202012Validator
    # jsonschema's documented recipe: fill "default" while descending through "properties", so a
    # defaulted parent object ({}) then gets its own children's defaults too.
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    # JSON Schema counts 4.0 as an integer; kdflow's integers are counts and indices, so refuse floats.
    types = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(base, {"properties": set_defaults}, type_checker=types)


def key_path(error: jsonschema.ValidationError) -> str:
    """The dotted key path of an error (``data.sources[0].max_docs``), ``(top level)`` for the root."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe(error: jsonschema.ValidationError) -> str:
    """One line for one error, starting with its key path; unknown keys listed with the allowed ones."""
    where = key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"{where}.{k}" if where != "(top level)" else k for k in extra)
        return f"unknown key {keys} (allowed here: {', '.join(allowed)})"
    return f"{where}: {error.message}"


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` laid over it; nested dicts merge, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def section_defaults(section: str, schema: dict | None = None) -> dict:
    """The top-level config section ``section`` as the schema fills it when the config leaves it out."""
    schema = load_schema() if schema is None else schema
    sub = {**schema["properties"][section], "$defs": schema.get("$defs", {})}
    filled: dict = {}
    for _ in validator_class()(sub).iter_errors(filled):
        pass  # validation of {} only fills defaults; the schema's own tests check it is valid
    return filled
