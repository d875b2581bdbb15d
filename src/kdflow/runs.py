"""Training runs: the compact ``training`` section of a config expanded into one :class:`RunSpec` per run.

A run is one (student, mode, seed) of an experiment::

    training:
      defaults: {steps: 24, lora: {r: 16}}        # every run setting; the schema fills the rest
      modes: {ce: {ce: 1.0}, rb: {ce: 0.5, rb: 0.5}}
      experiments:
        - modes: [ce, rb]                          # students: all of students[] unless listed
          seeds: [0, 1, 2]
          set: {optimizer: {lr: 0.0005}}           # overrides of the defaults (nested merge)
          tag: lowlr                               # appended to the names

gives the runs ``<student>.ce.s0.lowlr``, ``<student>.rb.s0.lowlr`` … Each spec is the merged settings plus
``name``, ``student``, ``mode``, ``terms`` (the mode's weights without zero entries), ``seed`` and ``tag``.
Everything a run needs that the schema cannot check alone is checked here, with the key path at fault:
unknown students or modes, logit/feature KD for a student with its own vocabulary, a feature-KD layer that
the hidden cache does not hold, duplicate run names.

The spec's type, the contract between the plan and the training code: :mod:`kdflow.run_spec`.
"""

from __future__ import annotations

from kdflow.run_spec import (
    KD_TERMS,
    RUN_NAME_PATTERN,
    SHARED_VOCAB_TERMS,
    FeatureKD,
    LayerPair,
    LoRA,
    Optimizer,
    RelationKD,
    RunSpec,
    RunSpecError,
    Schedule,
    TeacherLogits,
    logit_conflicts,
    run_group,
    run_name,
)
from kdflow.schema import deep_merge, describe, key_path, load_schema, validator_class

__all__ = [
    "RUN_NAME_PATTERN",
    "KD_TERMS",
    "SHARED_VOCAB_TERMS",
    "RunSpecError",
    "LayerPair",
    "FeatureKD",
    "RelationKD",
    "LoRA",
    "Optimizer",
    "Schedule",
    "TeacherLogits",
    "RunSpec",
    "run_group",
    "run_name",
    "caches_read",
    "expand_runs",
]


def _check_settings(settings: dict, schema: dict, where: str) -> list[str]:
    """Validate merged run settings against ``$defs.run`` of the schema; problems prefixed with ``where``."""
    sub = {"$defs": schema["$defs"], "$ref": "#/$defs/run"}
    validator = validator_class()(sub)
    problems = []
    for error in sorted(validator.iter_errors(settings), key=lambda e: list(map(str, e.absolute_path))):
        if error.validator == "additionalProperties":
            # every unknown key gets the full path (not only the first of several)
            inner = key_path(error)
            base = where if inner == "(top level)" else f"{where}.{inner}"
            allowed = sorted(error.schema.get("properties", {}))
            extra = sorted(set(error.instance) - set(allowed))
            problems.append(
                f"unknown key {', '.join(f'{base}.{k}' for k in extra)} (allowed here: {', '.join(allowed)})"
            )
            continue
        problems.append(f"{where}.{describe(error)}".replace(f"{where}.(top level)", where))
    return problems


def expand_runs(config: dict, schema: dict | None = None) -> tuple[dict[str, RunSpec], list[str]]:
    """``({run name: spec}, problems)`` for a validated config (defaults filled); problems name key paths. A run
    with a problem of its own has no spec."""
    schema = load_schema() if schema is None else schema
    training = config.get("training") or {}
    defaults = training.get("defaults") or {}
    modes = training.get("modes") or {}
    students = {s["name"]: s for s in config["students"]}
    cache_cfg = config.get("teacher_cache") or {}
    hidden_layers = set(cache_cfg.get("hidden_layers") or [])
    runs: dict[str, RunSpec] = {}
    made_by: dict[str, int] = {}  # run name -> index of the experiment that made it
    problems: list[str] = []
    for name, terms in modes.items():
        if not any(w > 0 for w in terms.values()):
            problems.append(f"training.modes.{name}: every weight is 0; give at least one term a weight > 0")
    for i, exp in enumerate(training.get("experiments") or []):
        where = f"training.experiments[{i}]"
        settings = deep_merge(defaults, exp.get("set") or {})
        bad = _check_settings(settings, schema, f"{where}.set")
        problems += bad
        if bad:
            continue
        for mode in exp["modes"]:
            if mode not in modes:
                problems.append(f"{where}.modes: unknown mode {mode!r} (training.modes has {sorted(modes)})")
        for student in exp.get("students") or list(students):
            if student not in students:
                problems.append(f"{where}.students: unknown student {student!r} (students[] has {sorted(students)})")
                continue
            for mode in exp["modes"]:
                if mode not in modes:
                    continue
                terms = {t: float(w) for t, w in modes[mode].items() if w > 0}
                bad = _check_run(where, student, students[student], mode, terms, settings, hidden_layers, cache_cfg)
                problems += bad
                for seed in exp["seeds"]:
                    name = run_name(student, mode, seed, exp.get("tag"))
                    if name in made_by:
                        if made_by[name] == i:
                            problems.append(
                                f"{where}.students: student {student!r} is listed twice (run "
                                f"{name!r} would be made twice)"
                            )
                        else:
                            problems.append(
                                f"{where}: run {name!r} is also made by training.experiments"
                                f"[{made_by[name]}]; give one of them a different tag"
                            )
                        continue
                    made_by[name] = i
                    if bad:
                        continue
                    spec = {
                        **settings,
                        "name": name,
                        "student": student,
                        "mode": mode,
                        "terms": terms,
                        "seed": int(seed),
                        "tag": exp.get("tag"),
                    }
                    runs[name] = RunSpec.from_json(spec)
    return runs, list(dict.fromkeys(problems))


def _check_run(
    where: str,
    student: str,
    student_cfg: dict,
    mode: str,
    terms: dict,
    settings: dict,
    hidden_layers: set,
    cache_cfg: dict,
) -> list[str]:
    problems = []
    if student_cfg.get("vocab", "shared") == "own":
        for term in SHARED_VOCAB_TERMS:
            if term in terms:
                problems.append(
                    f"{where}: mode {mode!r} uses {term} KD, but student {student!r} has vocab: own (its tokenizer "
                    f"differs from the teacher's, so the teacher's token ids mean nothing to it); use relb (and ce) "
                    f"modes for this student"
                )
    if "fb" in terms:
        layer_map = settings["fb"]["layer_map"]
        if not layer_map:
            problems.append(
                f"{where}: mode {mode!r} uses fb but fb.layer_map is empty; map a student hidden state "
                f"to a cached teacher layer, e.g. training.defaults.fb.layer_map: [{{student: 5, teacher: "
                f"20}}]"
            )
        for j, pair in enumerate(layer_map):
            if pair["teacher"] not in hidden_layers:
                problems.append(
                    f"{where}: fb.layer_map[{j}].teacher = {pair['teacher']} is not cached "
                    f"(teacher_cache.hidden_layers = {sorted(hidden_layers)})"
                )
    if "rb" in terms:
        logits = TeacherLogits.from_json(resolve_logits(settings["teacher_logits"], cache_cfg))
        for problem in logit_conflicts(
            logits, settings["temperature"], settings["divergence"], settings["missing_mass"]
        ):
            problems.append(f"{where}: mode {mode!r}: {problem} (training.defaults or the experiment's set)")
    if settings["steps"] is None and settings["epochs"] is None:
        problems.append(f"{where}: set steps or epochs (both are null)")
    return problems


def resolve_logits(logits: dict, cache_cfg: dict) -> dict:
    """``teacher_logits`` with a null k, samples or sampling taken from ``teacher_cache`` (what the run then reads)."""
    out = dict(logits)
    for key, default in (("k", 16), ("samples", 0), ("sampling", "multinomial")):
        if out.get(key) is None:
            out[key] = cache_cfg.get(key, default)
    return out


def caches_read(terms: dict[str, float], own_vocab: bool) -> dict[str, bool]:
    """Which caches a run reads besides the top-k one (which also carries the tokens): the pooled embeddings
    for relation KD, or for a student with its own vocabulary (it re-tokenises the text stored beside them);
    the hidden states for feature KD."""
    return {"embed": "relb" in terms or own_vocab, "hidden": "fb" in terms}
