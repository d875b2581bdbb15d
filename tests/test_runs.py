"""The ``training`` section expanded into runs (kdflow.runs.expand_runs) and its checks in validate_config."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest

from conftest import stub_config
from kdflow.config import ConfigError, load_schema, validate_config
from kdflow.runs import LayerPair, RunSpec, RunSpecError, caches_read, expand_runs, run_name
from kdflow.schema import deep_merge

SCHEMA = load_schema()


def config_with(training: dict | None = None, **top) -> dict:
    """A not yet validated config: students ``a`` and ``b`` (shared vocab), ``own`` (vocab: own), and ``training``."""
    config = stub_config([{"name": "stdlib", "kind": "python_stdlib"}])
    config["students"] = [
        {"name": "a", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 1]}},
        {"name": "b", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 2]}},
        {"name": "own", "source": {"kind": "hf", "path": "org/other"}, "vocab": "own"},
    ]
    if training is not None:
        config["training"] = copy.deepcopy(training)
    config.update(copy.deepcopy(top))
    return config


def runs_of(training: dict, **top) -> dict:
    config = validate_config(config_with(training, **top), SCHEMA)
    runs, problems = expand_runs(config, SCHEMA)
    assert problems == []
    return runs


def refused(training: dict, **top) -> list[str]:
    """The problem lines of the ConfigError for this training section; fails the test if it validates."""
    with pytest.raises(ConfigError) as info:
        validate_config(config_with(training, **top), SCHEMA)
    return [line[4:] for line in str(info.value).splitlines() if line.startswith("  - ")]


def one(problems: list[str], pattern: str) -> str:
    hits = [p for p in problems if re.search(pattern, p)]
    assert len(hits) == 1, (pattern, problems)
    return hits[0]


# --- expansion ---------------------------------------------------------------------------------------------


def test_no_training_section_or_no_experiments_gives_no_runs():
    assert runs_of(None) == {}
    assert runs_of({"experiments": []}) == {}
    config = validate_config(config_with(None), SCHEMA)
    assert config["training"]["experiments"] == []
    assert set(config["training"]["modes"]) == {"ce", "rb", "fb", "relb", "mix"}
    assert config["training"]["defaults"]["steps"] == 24


def test_names_and_count_are_students_x_modes_x_seeds():
    runs = runs_of({"experiments": [{"students": ["a", "b"], "modes": ["ce", "rb"], "seeds": [0, 1, 7]}]})
    expected = {f"{s}.{m}.s{seed}" for s in ("a", "b") for m in ("ce", "rb") for seed in (0, 1, 7)}
    assert set(runs) == expected and len(runs) == 12
    spec = runs["b.rb.s7"]
    assert (spec.name, spec.student, spec.mode, spec.seed, spec.tag) == ("b.rb.s7", "b", "rb", 7, None)
    assert spec.terms == {"ce": 0.5, "rb": 0.5}


def test_students_default_to_all_and_seeds_to_zero():
    runs = runs_of({"experiments": [{"modes": ["relb"]}]})
    assert set(runs) == {"a.relb.s0", "b.relb.s0", "own.relb.s0"}


def test_tag_is_appended_and_separates_experiments():
    runs = runs_of(
        {
            "experiments": [
                {"students": ["a"], "modes": ["ce"]},
                {"students": ["a"], "modes": ["ce"], "tag": "lowlr", "set": {"optimizer": {"lr": 0.0001}}},
            ]
        }
    )
    assert set(runs) == {"a.ce.s0", "a.ce.s0.lowlr"}
    assert runs["a.ce.s0.lowlr"].tag == "lowlr"
    assert runs["a.ce.s0.lowlr"].optimizer.lr == 0.0001
    assert runs["a.ce.s0"].optimizer.lr == 0.001
    assert run_name("x", "rb", 3, None) == "x.rb.s3" and run_name("x", "rb", 3, "t") == "x.rb.s3.t"


def test_every_run_setting_is_in_the_spec_with_its_default():
    spec = runs_of({"experiments": [{"students": ["a"], "modes": ["ce"]}]})["a.ce.s0"].to_json()
    run_keys = set(SCHEMA["$defs"]["run"]["properties"])
    assert run_keys <= set(spec)
    assert set(spec) - run_keys == {"name", "student", "mode", "terms", "tag"}  # seed is a run key
    assert spec["temperature"] == 1.0 and spec["divergence"] == "forward_kl"
    assert spec["missing_mass"] == "rest_bucket" and spec["jsd_beta"] == 0.5
    assert spec["fb"] == {"layer_map": [], "loss": "cosine"}
    assert spec["relb"] == {"distance_weight": 1.0, "angle_weight": 2.0}
    assert spec["schedule"] == {"kind": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1}
    assert spec["steps"] == 24 and spec["epochs"] is None and spec["gpus"] == 0


def test_set_merges_nested_over_the_defaults():
    runs = runs_of(
        {
            "defaults": {"lora": {"alpha": 8}, "batch_size": 2},
            "experiments": [{"students": ["a"], "modes": ["ce"], "set": {"lora": {"r": 4}, "temperature": 2.0}}],
        }
    )
    spec = runs["a.ce.s0"]
    assert spec.lora.r == 4  # from set
    assert spec.lora.alpha == 8  # from training.defaults, kept by the nested merge
    assert spec.lora.dropout == 0.0  # schema default, kept
    assert spec.lora.target_modules[0] == "q_proj"
    assert spec.batch_size == 2 and spec.temperature == 2.0


def test_set_replaces_lists_and_does_not_leak_between_experiments():
    runs = runs_of(
        {
            "defaults": {"fb": {"layer_map": [{"student": 5, "teacher": 20}]}},
            "experiments": [
                {"students": ["a"], "modes": ["fb"], "set": {"fb": {"layer_map": [{"student": 1, "teacher": 20}]}}},
                {"students": ["b"], "modes": ["fb"]},
            ],
        }
    )
    assert runs["a.fb.s0"].fb.to_json() == {"layer_map": [{"student": 1, "teacher": 20}], "loss": "cosine"}
    assert runs["b.fb.s0"].fb.layer_map == (LayerPair(student=5, teacher=20),)
    runs["a.fb.s0"].terms["ce"] = 99.0
    assert runs["b.fb.s0"].terms["ce"] == 1.0  # specs are independent copies
    with pytest.raises(dataclasses.FrozenInstanceError):
        runs["a.fb.s0"].lora.r = 99  # type: ignore[misc]


def test_deep_merge_does_not_touch_its_inputs():
    base = {"x": {"y": 1, "z": [1]}, "w": 0}
    over = {"x": {"y": 2}, "v": {"u": 1}}
    merged = deep_merge(base, over)
    assert merged == {"x": {"y": 2, "z": [1]}, "w": 0, "v": {"u": 1}}
    assert base == {"x": {"y": 1, "z": [1]}, "w": 0} and over == {"x": {"y": 2}, "v": {"u": 1}}
    merged["x"]["z"].append(2)
    assert base["x"]["z"] == [1]


def test_zero_weights_are_dropped_from_terms():
    runs = runs_of(
        {
            "modes": {"half": {"ce": 1.0, "rb": 0, "relb": 0.25}},
            "experiments": [{"students": ["a"], "modes": ["half"]}],
        }
    )
    assert runs["a.half.s0"].terms == {"ce": 1.0, "relb": 0.25}
    assert caches_read(runs["a.half.s0"].terms, own_vocab=False) == {"embed": True, "hidden": False}
    assert caches_read({"ce": 1.0, "fb": 1.0}, own_vocab=False) == {"embed": False, "hidden": True}
    assert caches_read({"ce": 1.0}, own_vocab=True) == {"embed": True, "hidden": False}


def test_given_modes_replace_the_default_modes():
    config = validate_config(config_with({"modes": {"only": {"ce": 1}}}), SCHEMA)
    assert config["training"]["modes"] == {"only": {"ce": 1}}
    assert "unknown mode 'rb'" in one(
        refused({"modes": {"only": {"ce": 1}}, "experiments": [{"modes": ["rb"]}]}), "unknown mode"
    )


def test_own_vocab_student_may_run_relb_and_ce():
    runs = runs_of({"experiments": [{"students": ["own"], "modes": ["ce", "relb"], "seeds": [0, 1]}]})
    assert set(runs) == {"own.ce.s0", "own.ce.s1", "own.relb.s0", "own.relb.s1"}


def test_fb_with_a_cached_layer_is_accepted():
    runs = runs_of(
        {
            "defaults": {"fb": {"layer_map": [{"student": 1, "teacher": 12}]}},
            "experiments": [{"students": ["a"], "modes": ["fb", "mix"]}],
        },
        teacher_cache={"hidden_layers": [12, 20]},
    )
    assert set(runs) == {"a.fb.s0", "a.mix.s0"}


def test_epochs_instead_of_steps_is_accepted():
    runs = runs_of({"experiments": [{"students": ["a"], "modes": ["ce"], "set": {"steps": None, "epochs": 0.5}}]})
    assert runs["a.ce.s0"].steps is None and runs["a.ce.s0"].epochs == 0.5


def test_shipped_configs_expand():
    from pathlib import Path

    from kdflow.config import load_config

    for path in sorted((Path(__file__).resolve().parents[1] / "config").glob("*.yaml")):
        if path.name == "schema.yaml":
            continue
        config = load_config(path)
        runs, problems = expand_runs(config)
        assert problems == [], (path, problems)
        for name, spec in runs.items():
            assert name == run_name(spec.student, spec.mode, spec.seed, spec.tag)


# --- refusals ----------------------------------------------------------------------------------------------


def test_unknown_student_is_refused():
    problem = one(refused({"experiments": [{"students": ["a", "nobody"], "modes": ["ce"]}]}), "nobody")
    assert problem.startswith("training.experiments[0].students: unknown student 'nobody'")


def test_unknown_mode_is_refused():
    problems = refused({"experiments": [{"modes": ["ce"]}, {"modes": ["ce", "bogus"], "tag": "x"}]})
    assert one(problems, "bogus").startswith("training.experiments[1].modes: unknown mode 'bogus'")


@pytest.mark.parametrize("mode", ["rb", "fb", "mix"])
def test_rb_and_fb_are_refused_for_an_own_vocab_student(mode):
    training = {
        "defaults": {"fb": {"layer_map": [{"student": 1, "teacher": 20}]}},
        "experiments": [{"students": ["a", "own"], "modes": [mode]}],
    }
    problems = refused(training)
    assert all("student 'own' has vocab: own" in p for p in problems), problems
    used = [t for t in ("rb", "fb") if t in {"rb": "rb", "fb": "fb", "mix": "rb fb"}[mode]]
    for term in used:
        assert one(problems, f" uses {term} KD").startswith(f"training.experiments[0]: mode {mode!r} uses {term}")
    assert len(problems) == len(used)


def test_fb_needs_a_layer_map():
    problem = one(refused({"experiments": [{"students": ["a"], "modes": ["fb"]}]}), "layer_map")
    assert problem.startswith("training.experiments[0]: mode 'fb' uses fb but fb.layer_map is empty")


def test_fb_teacher_layer_must_be_cached():
    training = {
        "experiments": [
            {
                "students": ["a"],
                "modes": ["fb"],
                "set": {"fb": {"layer_map": [{"student": 1, "teacher": 20}, {"student": 2, "teacher": 7}]}},
            }
        ]
    }
    problem = one(refused(training, teacher_cache={"hidden_layers": [20]}), "not cached")
    assert problem.startswith("training.experiments[0]: fb.layer_map[1].teacher = 7 is not cached")
    assert "teacher_cache.hidden_layers = [20]" in problem


def test_layer_map_is_only_checked_for_fb_runs():
    # an uncached layer in the defaults does not matter to runs without fb
    runs = runs_of(
        {
            "defaults": {"fb": {"layer_map": [{"student": 1, "teacher": 3}]}},
            "experiments": [{"students": ["a"], "modes": ["ce", "rb", "relb"]}],
        }
    )
    assert len(runs) == 3


def test_steps_and_epochs_both_null_is_refused():
    problems = refused({"experiments": [{"students": ["a"], "modes": ["ce"], "set": {"steps": None}}]})
    assert one(problems, "steps").startswith("training.experiments[0]: set steps or epochs (both are null)")


def test_duplicate_run_names_across_experiments_are_refused():
    problems = refused(
        {"experiments": [{"modes": ["ce"], "seeds": [0, 1]}, {"students": ["b"], "modes": ["rb", "ce"], "seeds": [1]}]}
    )
    problem = one(problems, "b.ce.s1")
    assert problem.startswith("training.experiments[1]: run 'b.ce.s1' is also made by training.experiments[0]")
    assert "different tag" in problem


def test_a_student_listed_twice_is_refused():
    problem = one(refused({"experiments": [{"students": ["a", "a"], "modes": ["ce"]}]}), "a.ce.s0")
    assert problem.startswith("training.experiments[0].students: student 'a' is listed twice")


def test_a_mode_with_only_zero_weights_is_refused():
    problem = one(refused({"modes": {"ce": {"ce": 1}, "nothing": {"ce": 0, "rb": 0.0}}}), "nothing")
    assert problem.startswith("training.modes.nothing: every weight is 0")


@pytest.mark.parametrize(
    "bad_set, key",
    [
        ({"lora": {"rank": 4}}, "training.experiments[0].set.lora.rank"),
        ({"rank": 4}, "training.experiments[0].set.rank"),
        ({"optimizer": {"learning_rate": 0.1}}, "training.experiments[0].set.optimizer.learning_rate"),
        (
            {"fb": {"layer_map": [{"student": 1, "teacher": 20, "weight": 2}]}},
            "training.experiments[0].set.fb.layer_map[0].weight",
        ),
    ],
    ids=["nested", "top", "optimizer", "list-item"],
)
def test_unknown_key_in_set_is_refused_with_its_path(bad_set, key):
    problems = refused({"experiments": [{"students": ["a"], "modes": ["ce"], "set": bad_set}]})
    assert re.search(rf"^unknown key {re.escape(key)}\b", one(problems, "unknown key")), problems


def test_every_unknown_key_in_set_gets_its_full_path():
    problem = one(refused({"experiments": [{"modes": ["ce"], "set": {"lora": {"rank": 4, "size": 1}}}]}), "unknown key")
    assert "training.experiments[0].set.lora.rank" in problem
    assert "training.experiments[0].set.lora.size" in problem


@pytest.mark.parametrize(
    "bad_set, key",
    [
        ({"lora": {"r": 0}}, "training.experiments[1].set.lora.r"),
        ({"temperature": 0}, "training.experiments[1].set.temperature"),
        ({"divergence": "kl"}, "training.experiments[1].set.divergence"),
        ({"missing_mass": "drop"}, "training.experiments[1].set.missing_mass"),
        ({"optimizer": {"betas": [0.9]}}, "training.experiments[1].set.optimizer.betas"),
        ({"steps": 2.5}, "training.experiments[1].set.steps"),
        ({"lora": 5}, "training.experiments[1].set.lora"),
    ],
    ids=["lora-r", "temperature", "divergence", "missing_mass", "betas", "steps-float", "lora-type"],
)
def test_wrong_value_in_set_is_refused_with_its_path(bad_set, key):
    problems = refused({"experiments": [{"modes": ["ce"]}, {"modes": ["ce"], "tag": "bad", "set": bad_set}]})
    assert re.search(rf"^{re.escape(key)}: ", one(problems, re.escape(key))), problems


@pytest.mark.parametrize(
    "training, key",
    [
        ({"defaults": {"lora": {"rank": 4}}}, "unknown key training.defaults.lora.rank"),
        ({"defaults": {"temperature": -1}}, "training.defaults.temperature: "),
        ({"modes": {"x": {"ce": 1, "kd": 1}}}, "unknown key training.modes.x.kd"),
        ({"modes": {"x": {"ce": -1}}}, "training.modes.x.ce: "),
        ({"modes": {"x": {}}}, "training.modes.x: "),
        ({"modes": {"a.b": {"ce": 1}}}, "training.modes: "),
        ({"experiments": [{"students": ["a"]}]}, "training.experiments[0]: 'modes' is a required property"),
        ({"experiments": [{"modes": ["ce"], "tag": "has.dot"}]}, "training.experiments[0].tag: "),
        ({"experiments": [{"modes": ["ce"], "seeds": [1, 1]}]}, "training.experiments[0].seeds: "),
        ({"experiments": [{"modes": ["ce"], "seed": [1]}]}, "unknown key training.experiments[0].seed"),
    ],
    ids=[
        "defaults-unknown",
        "defaults-value",
        "terms-unknown",
        "terms-negative",
        "terms-empty",
        "mode-name",
        "no-modes",
        "tag-pattern",
        "seeds-unique",
        "experiment-unknown",
    ],
)
def test_schema_refuses_bad_training_keys_with_their_path(training, key):
    problems = refused(training)
    assert any(p.startswith(key) for p in problems), problems


def test_a_bad_set_does_not_hide_the_other_experiments_problems():
    problems = refused(
        {"experiments": [{"modes": ["ce"], "set": {"lora": {"rank": 4}}}, {"students": ["ghost"], "modes": ["ce"]}]}
    )
    one(problems, r"training\.experiments\[0\]\.set\.lora\.rank")
    one(problems, r"training\.experiments\[1\]\.students: unknown student 'ghost'")


def test_expand_runs_reports_instead_of_raising():
    config = validate_config(config_with(None), SCHEMA)
    config["training"]["experiments"] = [
        {"students": ["a"], "modes": ["ce"], "seeds": [0], "set": {}, "tag": None},
        {"students": ["a"], "modes": ["nope"], "seeds": [0], "set": {}, "tag": None},
    ]
    runs, problems = expand_runs(config, SCHEMA)
    assert set(runs) == {"a.ce.s0"}
    assert len(problems) == 1 and problems[0].startswith("training.experiments[1].modes: unknown mode 'nope'")


def test_study_cpu_is_the_default_teacher_and_student_on_more_data_with_three_seeds():
    """config/study_cpu.yaml trains the embedded default's student from the same teacher, on its own larger data
    (it runs in a directory of its own), every mode with three seeds, tagged so that no run name is shared."""
    import yaml

    from kdflow.config import load_config

    repo = Path(__file__).resolve().parents[1]
    default, study = (yaml.safe_load((repo / p).read_text()) for p in ("config/config.yaml", "config/study_cpu.yaml"))
    for key in ("teacher", "students"):
        assert study[key] == default[key], key
    assert study["data"]["sources"][0]["weight"] > default["data"]["sources"][0]["weight"]
    assert "--directory study_cpu" in (repo / "config/study_cpu.yaml").read_text()
    study_runs = expand_runs(load_config(repo / "config/study_cpu.yaml"))[0]
    default_runs = expand_runs(load_config(repo / "config/config.yaml"))[0]
    assert not set(study_runs) & set(default_runs)
    modes = {}
    for spec in study_runs.values():
        modes.setdefault(spec.mode, set()).add(spec.seed)
    assert set(modes) >= {"ce", "rb", "fb", "relb"} and all(len(seeds) >= 3 for seeds in modes.values())


# --- the run spec ------------------------------------------------------------------------------------------

SHIPPED = ("config/config.yaml", "config/study_cpu.yaml", "config/llama70b.yaml")


def dicts_of_before(config: dict) -> dict[str, dict]:
    """The spec dicts expand_runs made before RunSpec, made again the way it made them: the merged settings in the
    config's key order, then name, student, mode, terms, (seed in the settings' place) and tag."""
    training, out = config["training"], {}
    for exp in training["experiments"]:
        settings = deep_merge(training["defaults"], exp["set"])
        for student in exp.get("students") or [s["name"] for s in config["students"]]:
            for mode in exp["modes"]:
                terms = {t: float(w) for t, w in training["modes"][mode].items() if w > 0}
                for seed in exp["seeds"]:
                    name = run_name(student, mode, seed, exp["tag"])
                    out[name] = {
                        **copy.deepcopy(settings),
                        **{"name": name, "student": student, "mode": mode, "terms": terms},
                        **{"seed": int(seed), "tag": exp["tag"]},
                    }
    return out


@pytest.mark.parametrize("path", SHIPPED)
def test_the_spec_json_is_the_dict_of_before_key_order_included(path):
    """The train job's spec parameter (Snakemake compares its repr), run_config.json and the resume key's hash
    must not change: to_json gives the dict of before, and from_json(d).to_json() gives d back, in d's order."""
    from kdflow.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / path)
    runs, before = expand_runs(config)[0], dicts_of_before(config)
    assert list(runs) == list(before)
    for name, spec in runs.items():
        d = spec.to_json()
        assert d == before[name] and repr(d) == repr(before[name]), name
        again = RunSpec.from_json(d)
        assert again == spec and repr(again.to_json()) == repr(d), name


def test_the_spec_keeps_the_configs_key_order_and_compares_without_it():
    runs = runs_of({"defaults": {"lora": {"alpha": 8}, "batch_size": 2}, "experiments": [{"modes": ["ce"]}]})
    d = runs["a.ce.s0"].to_json()
    assert list(d)[:2] == ["lora", "batch_size"] and list(d["lora"]) == ["alpha", "r", "dropout", "target_modules"]
    reordered = {k: d[k] for k in sorted(d)}
    assert RunSpec.from_json(reordered) == runs["a.ce.s0"] and list(RunSpec.from_json(reordered).to_json()) == sorted(d)
    assert isinstance(RunSpec.from_json(d).optimizer.betas, tuple) and d["optimizer"]["betas"] == [0.9, 0.999]


def a_spec(**edits) -> dict:
    fb = {"fb": {"layer_map": [{"student": 1, "teacher": 20}]}}
    d = runs_of({"defaults": fb, "experiments": [{"students": ["a"], "modes": ["mix"]}]})["a.mix.s0"].to_json()
    for key, value in edits.items():
        section, _, inner = key.partition("__")
        if inner:
            d[section][inner] = value
        else:
            d[section] = value
    return d


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"steps": None}, "set steps or epochs (both are null)"),
        ({"terms": {"ce": 1.0, "fb": 1.0}, "fb__layer_map": []}, "terms has fb but fb.layer_map is empty"),
        ({"terms": {}}, "terms is empty"),
        ({"terms": {"ce": 1.0, "kd": 1.0}}, "terms.kd = 1.0: terms are ['ce', 'rb', 'fb', 'relb'] with weights > 0"),
        ({"terms": {"ce": 0.0}}, "terms.ce = 0.0"),
        ({"seed": 3}, "name 'a.mix.s0' is not 'a.mix.s3'"),
        ({"steps": "24"}, "steps = '24' is not int or null"),
        ({"lora__r": 4.0}, "lora.r = 4.0 is not int"),
        ({"gpus": True}, "gpus = True is not int"),
        ({"optimizer__betas": [0.9]}, "optimizer.betas = [0.9] does not have 2 items"),
        ({"fb__layer_map": [{"student": "1", "teacher": 20}]}, "fb.layer_map[0].student = '1' is not int"),
        ({"lora__rank": 4}, "lora: unknown keys ['rank']"),
        ({"relb": {"angle_weight": 2.0}}, "relb: missing keys ['distance_weight']"),
        ({"lora": 5}, "lora: expected a mapping, got 5"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_a_spec_read_back_or_built_by_hand_is_checked_naming_the_run_and_key(edits, message):
    with pytest.raises(RunSpecError) as info:
        RunSpec.from_json(a_spec(**edits))
    assert str(info.value).startswith("run 'a.mix.s0': ") and message in str(info.value), str(info.value)


def test_a_spec_changed_in_code_is_checked_too():
    spec = RunSpec.from_json(a_spec())
    with pytest.raises(RunSpecError, match="set steps or epochs"):
        dataclasses.replace(spec, steps=None)
    d = a_spec()
    del d["steps"]
    with pytest.raises(RunSpecError, match=r"^run 'a.mix.s0': missing keys \['steps'\]"):
        RunSpec.from_json(d)
