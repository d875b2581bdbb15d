"""Loading and validating a study config against ``config/schema.yaml``.

The schema is the single source of truth for keys, types and defaults. Validation fills defaults in
place, refuses unknown keys and wrong types, and reports every problem with its dotted key path
(``data.sources[0].max_docs``), so a bad config fails before any job is planned.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from kdflow.errors import KdflowError
from kdflow.runs import expand_runs
from kdflow.schema import DEFAULT_SCHEMA, describe, load_schema, validator_class

__all__ = [
    "DEFAULT_SCHEMA",
    "ConfigError",
    "config_hash",
    "key_locations",
    "load_config",
    "load_schema",
    "read_yaml",
    "validate_config",
]


class ConfigError(KdflowError, ValueError):
    """A config that does not match the schema or contradicts itself."""


def validate_config(
    config: dict, schema: dict | None = None, source: str = "config", locations: dict[str, str] | None = None
) -> dict:
    """Validate ``config`` in place (defaults filled) and return it.

    Raises ConfigError listing every violation with its key path, plus the cross-key checks the schema
    cannot express (unique names, a pruned student's layers). With ``locations`` (:func:`key_locations` of the
    files the config came from), each problem starts with the file, line and column of its key.
    """
    schema = load_schema() if schema is None else schema
    validator = validator_class()(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    problems = [describe(e) for e in errors]
    if not problems:
        problems = _cross_checks(config, schema)
    if problems:
        raise config_error(source, problems, locations)
    return config


def config_error(source: str, problems: Iterable[str], locations: dict[str, str] | None = None) -> ConfigError:
    """One ConfigError listing ``problems`` (each starting with its key path), located in the files if known."""
    lines = [locate(p, locations or {}) for p in dict.fromkeys(problems)]
    return ConfigError(f"{source} is invalid:\n  - " + "\n  - ".join(lines))


# --------------------------------------------------------------------------- YAML files, with line and column


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given at line {first.line + 1}, column {first.column + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _mark(path: Path, mark: yaml.Mark | None) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping. A file that is not YAML, is empty, repeats a key or is not a mapping
    raises ConfigError naming the file, line and column (``config/x.yaml:12:5: …``) and what to do."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from e
    try:
        config = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(filter(None, [e.context, e.problem]))
        if what.startswith("duplicate key"):
            raise ConfigError(
                f"{_mark(path, mark)}: {what}; YAML would keep only the last one, silently, so kdflow refuses the "
                f"file: remove or merge one of them"
            ) from None
        tab = "\t" in what or "'\\t'" in what  # PyYAML writes the character as '\t'
        hint = " (YAML indents with spaces; a tab is not allowed there)" if tab else ""
        raise ConfigError(f"{_mark(path, mark)}: not valid YAML: {what}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if config is None:
        raise ConfigError(
            f"{path}: the file is empty (or only comments); a study config is a mapping with teacher, students, "
            f"data … (config/README.md; config/config.yaml is a complete example)"
        )
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path}:1:1: the top level must be a mapping of keys (teacher:, students:, data: …), "
            f"not a {type(config).__name__}"
        )
    return config


def key_locations(paths: Iterable[str | Path]) -> dict[str, str]:
    """``{dotted key path: "file:line:column"}`` of every key and list item in the YAML files, the later file
    winning (as Snakemake merges several --configfile files). Files that do not parse are left out."""
    out: dict[str, str] = {}
    for path in paths:
        try:
            node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        _walk(node, "", Path(path), out)
    return out


def _walk(node: yaml.Node, where: str, path: Path, out: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            key = f"{where}.{key_node.value}" if where else str(key_node.value)
            out[key] = _mark(path, key_node.start_mark)
            _walk(value, key, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{where}[{i}]"
            out[key] = _mark(path, item.start_mark)
            _walk(item, key, path, out)


_LEADING_KEY = re.compile(r"^(?:unknown key )?([A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*)")


def locate(problem: str, locations: dict[str, str]) -> str:
    """``problem`` prefixed with where its leading key path (or the nearest enclosing key given) is written."""
    m = _LEADING_KEY.match(problem)
    if not m or not locations:
        return problem
    key = m.group(1)
    while key:
        if key in locations:
            return f"{locations[key]}: {problem}"
        key = re.sub(r"(\.[\w-]+|\[\d+\])$", "", key) if re.search(r"(\.[\w-]+|\[\d+\])$", key) else ""
    return problem


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
    cache = config["teacher_cache"]
    if cache["parallel"] == "device_map" and cache["device"] != "auto":
        problems.append(
            f"teacher_cache.parallel: device_map places the teacher's layers on the job's GPUs; it needs "
            f"teacher_cache.device: auto, not {cache['device']!r}"
        )
    if cache["parallel"] == "single" and cache["device"] == "auto":
        problems.append(
            "teacher_cache.device: auto spreads the teacher over the job's GPUs; say how with teacher_cache.parallel: "
            "tensor (one rank per GPU, all computing) or device_map (layers on the GPUs one after another)"
        )
    if cache["parallel"] == "tensor":
        if cache["device"] == "cpu" and cache["tp_size"] is None:
            problems.append(
                "teacher_cache.tp_size: parallel tensor on device cpu needs the number of gloo ranks (tp_size: 2, "
                "say); on GPUs it defaults to one rank per GPU of the job"
            )
        if cache["device"] not in ("cpu", "cuda"):
            problems.append(
                f"teacher_cache.device: parallel tensor places rank r on GPU r of the job (device cuda) or runs gloo "
                f"ranks on the CPU (device cpu); {cache['device']!r} is neither"
            )
    if cache["logit_floor"] and cache["samples"]:
        problems.append(
            f"teacher_cache.logit_floor: {cache['logit_floor']} with teacher_cache.samples: {cache['samples']}: the "
            "tail's draws exclude the head, so head mass moved into the rest would be spread over ids drawn without "
            "it (a biased estimate); use logit_floor: 0 with a sampled tail"
        )
    if cache["sampling"] == "systematic" and not cache["samples"]:
        problems.append(
            "teacher_cache.sampling: systematic with teacher_cache.samples: 0: there are no draws to place; set "
            "samples, or leave sampling at multinomial"
        )
    if cache["logit_floor"] and cache["logit_encoding"] != "compact":
        problems.append(
            f"teacher_cache.logit_floor: {cache['logit_floor']} needs teacher_cache.logit_encoding: compact (the plain "
            "encoding keeps every head entry)"
        )
    if cache["k"] == 0:
        problems.append(
            "teacher_cache.k: 0; the study's logit cache needs a head (evaluation reads the held-out top-k: top-1 "
            "agreement and the KL to the teacher). Give a run a cache of samples alone with training.defaults or an "
            "experiment's set: teacher_logits: {k: 0, samples: N}"
        )
    data = config["data"]
    if data["long_docs"] != "truncate" and data["max_chars"] is None:
        problems.append(f"data.long_docs: {data['long_docs']!r} needs data.max_chars to be set")
    return problems + expand_runs(config, schema)[1]


def load_config(path: str | Path, schema: dict | None = None) -> dict:
    """Read a YAML config file and validate it (defaults filled); problems located in the file."""
    config = read_yaml(path)
    return validate_config(config, schema, source=str(path), locations=key_locations([path]))


def config_hash(section: Any) -> str:
    """A short stable hash of a config section, recorded in provenance."""
    blob = json.dumps(section, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
