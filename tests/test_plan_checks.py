"""Plan-time checks (kdflow.plan_checks, kdflow.model_facts): what a dry run can know from local files is refused
there, naming its key, the valid range and the file:line:column; what it cannot know is listed as deferred."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdflow.config import ConfigError
from kdflow.model_facts import ModelFacts, embedded_gguf_path, gguf_facts, gguf_metadata, hf_config_facts
from kdflow.plan import study_plan

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "config/config.yaml").read_text())


def edited(**sections) -> dict:
    """The default config with top-level sections replaced or, given as callables, edited in place."""
    config = copy.deepcopy(DEFAULT)
    for key, value in sections.items():
        if callable(value):
            value(config)
        else:
            config[key] = value
    return config


def refused(config: dict, files=()) -> str:
    with pytest.raises(ConfigError) as err:
        study_plan(config, REPO, files=files)
    return str(err.value)


def hf_dir(path: Path, layers: int, hidden: int = 16, vocab: int = 100) -> Path:
    """A local Hugging Face model directory holding only its config.json: all the plan reads."""
    path.mkdir(parents=True)
    config = {"num_hidden_layers": layers, "hidden_size": hidden, "vocab_size": vocab, "num_attention_heads": 4}
    (path / "config.json").write_text(json.dumps(config))
    return path


# --------------------------------------------------------------------------- model facts


def test_the_embedded_teachers_facts_come_from_its_gguf_header():
    facts = gguf_facts(embedded_gguf_path())
    assert (facts.layers, facts.hidden_size, facts.vocab_size, facts.heads, facts.kv_heads) == (30, 576, 49152, 9, 3)
    assert "GGUF metadata of" in facts.source


def test_the_gguf_header_reader_agrees_with_the_gguf_package(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(7)
    writer.add_embedding_length(48)
    writer.add_head_count(6)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_tensor("token_embd.weight", np.zeros((4, 48), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = gguf_metadata(path)
    theirs = gguf.GGUFReader(str(path)).fields
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count", "general.architecture"):
        field = theirs[key]
        value = field.parts[field.data[0]]
        expected = bytes(value).decode() if key == "general.architecture" else int(value[0])
        assert ours[key] == expected, key
    assert ours["tokenizer.ggml.tokens"].length == 300
    facts = gguf_facts(path)
    assert (facts.layers, facts.hidden_size, facts.vocab_size, facts.heads, facts.kv_heads) == (7, 48, 300, 6, 2)


def test_a_file_that_is_not_gguf_is_refused_naming_it(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    config = edited(teacher={"name": "t", "source": {"kind": "gguf", "path": str(path)}})
    assert f"teacher.source: {path}: not a GGUF file" in refused(config)


def test_a_config_json_gives_layers_width_and_vocabulary(tmp_path):
    facts = hf_config_facts(hf_dir(tmp_path / "m", layers=5, hidden=24, vocab=77) / "config.json")
    assert facts == ModelFacts(5, 24, 77, 4, 4, f"config.json of {tmp_path / 'm'}")
    nested = tmp_path / "vlm.json"
    nested.write_text(json.dumps({"text_config": {"num_hidden_layers": 3, "hidden_size": 8, "vocab_size": 9}}))
    assert hf_config_facts(nested).layers == 3


# --------------------------------------------------------------------------- layers, hidden states, k


def test_keep_layers_beyond_the_teacher_are_refused_with_the_range():
    config = edited(students=[{"name": "s", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 5, 30, 31]}}])
    message = refused(config)
    assert "students[0].source.keep_layers: [30, 31] are not teacher layers; the teacher has layers 0..29" in message


def test_a_hidden_layer_beyond_the_teacher_is_refused_by_its_own_key():
    config = edited(teacher_cache=dict(DEFAULT["teacher_cache"], hidden_layers=[20, 31]))
    message = refused(config)
    assert "teacher_cache.hidden_layers[1]: 31 is not a hidden state of the teacher (0..30" in message
    assert "fb.layer_map" not in message  # not blamed on the run that reads it


def test_a_layer_map_student_beyond_the_student_is_refused_naming_where_it_was_set():
    def deep(config):
        config["training"]["defaults"]["fb"]["layer_map"] = [{"student": 16, "teacher": 20}]

    message = refused(edited(training=deep))
    assert (
        "training.defaults.fb.layer_map[0].student: 16 is not a hidden state of student 'smollm2-pruned15'" in message
    )
    assert "(0..15: it has 15 layers" in message

    def in_set(config):
        config["training"]["experiments"].append(
            {
                "modes": ["fb"],
                "tag": "deep",
                "set": {"fb": {"layer_map": [{"student": 5, "teacher": 20}, {"student": 40, "teacher": 20}]}},
            }
        )

    message = refused(edited(training=in_set))
    assert "training.experiments[1].set.fb.layer_map[1].student: 40 is not a hidden state" in message
    assert "training.defaults" not in message


def test_a_layer_map_is_checked_against_an_hf_students_own_depth(tmp_path):
    student = hf_dir(tmp_path / "student", layers=3, vocab=49152)

    def with_hf_student(config):
        config["students"] = [{"name": "small", "source": {"kind": "hf", "path": str(student)}}]
        config["training"]["defaults"]["fb"]["layer_map"] = [{"student": 4, "teacher": 20}]

    message = refused(edited(training=with_hf_student))
    assert "layer_map[0].student: 4 is not a hidden state of student 'small' (0..3" in message
    assert f"config.json of {student}" in message


def test_k_beyond_the_teachers_vocabulary_is_refused(tmp_path):
    teacher = hf_dir(tmp_path / "teacher", layers=4, vocab=100)
    config = edited(
        teacher={"name": "t", "source": {"kind": "hf", "path": str(teacher)}},
        students=[{"name": "s", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 3]}}],
        teacher_cache=dict(DEFAULT["teacher_cache"], k=128, hidden_layers=[2]),
        training={"experiments": [{"modes": ["ce", "rb"]}]},
    )
    assert "teacher_cache.k: 128 is more than the teacher's vocabulary of 100 ids" in refused(config)


# --------------------------------------------------------------------------- paths


def test_a_source_pattern_that_matches_no_file_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    sources = [
        {"name": "ok", "kind": "jsonl", "paths": [str(tmp_path / "*.jsonl")]},
        {"name": "gone", "kind": "text_files", "paths": [str(tmp_path / "a.jsonl"), str(tmp_path / "docs/**/*.md")]},
    ]
    message = refused(edited(data=dict(DEFAULT["data"], sources=sources)))
    assert f"data.sources[1].paths[1]: '{tmp_path / 'docs/**/*.md'}' matches no file" in message
    assert "paths[0]" not in message


@pytest.mark.parametrize(
    "source, message",
    [
        ({"kind": "gguf", "path": "no/such/model.gguf"}, "teacher.source.path: 'no/such/model.gguf' is not a file"),
        ({"kind": "hf", "path": "./no/such/dir"}, "teacher.source.path: './no/such/dir' is not a directory"),
    ],
    ids=["gguf", "hf-dir"],
)
def test_a_missing_local_model_is_refused(source, message):
    assert message in refused(edited(teacher={"name": "t", "source": source}))


def test_a_model_directory_without_config_json_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    students = [{"name": "s", "source": {"kind": "hf", "path": str(tmp_path / "weights")}}]
    message = refused(edited(students=students, training={"experiments": [{"modes": ["ce"]}]}))
    assert f"students[0].source.path: '{tmp_path / 'weights'}' has no config.json" in message


def test_a_missing_lm_eval_include_path_and_local_dataset_are_refused():
    def bad(config):
        config["eval"] = {"lm_eval": {"include_path": "no/such/tasks"}}
        config["data"]["sources"].append({"name": "local", "kind": "hf", "dataset": "./no/such/dataset"})

    message = refused(edited(data=bad))
    assert "eval.lm_eval.include_path: 'no/such/tasks' is not a directory" in message
    assert "data.sources[1].dataset: './no/such/dataset' is not a directory" in message


def test_problems_are_located_in_the_config_file(tmp_path):
    config = edited(teacher_cache=dict(DEFAULT["teacher_cache"], hidden_layers=[20, 31]))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "- 31")
    assert f"{path}:{line}:" in refused(yaml.safe_load(path.read_text()), files=[path])


# --------------------------------------------------------------------------- deferred checks


def test_a_hub_model_not_in_the_cache_defers_its_checks(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    students = [{"name": "hub", "source": {"kind": "hf", "path": "org/not-cached"}}]
    plan = study_plan(edited(students=students, training={"experiments": [{"modes": ["ce"]}]}), REPO)
    assert plan.deferred == (
        "students[0].source (hub): hub model 'org/not-cached' (revision main) is not in the local Hugging Face cache, "
        "so its shape is not known at plan time; fb.layer_map[].student is checked when its runs start",
    )
    assert "hub" not in plan.facts and plan.facts["smollm2-135m-instruct"].layers == 30


def test_a_cached_hub_model_is_checked_from_its_cached_config(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--cached"
    hf_dir(repo / "snapshots" / commit, layers=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def hub_student(config):
        config["students"] = [{"name": "hub", "source": {"kind": "hf", "path": "org/cached"}}]
        config["training"]["defaults"]["fb"]["layer_map"] = [{"student": 3, "teacher": 20}]

    message = refused(edited(training=hub_student))
    assert "layer_map[0].student: 3 is not a hidden state of student 'hub' (0..2" in message
    assert "hub model 'org/cached' (cached)" in message


def test_a_hub_dataset_is_deferred_to_the_corpus_job():
    def hub(config):
        config["data"]["sources"].append({"name": "chat", "kind": "hf", "dataset": "org/chats"})

    plan = study_plan(edited(data=hub), REPO)
    assert plan.deferred == (
        "data.sources[1].dataset 'org/chats': a hub dataset; the corpus job checks that it can be read (offline: "
        "that it is in the local cache)",
    )


# --------------------------------------------------------------------------- python -m kdflow.check


def test_the_check_command_refuses_a_bad_file_and_passes_the_shipped_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "config/config.yaml").read_text().replace("hidden_layers: [20]", "hidden_layers: [20, 40]"))
    cmd = [sys.executable, "-m", "kdflow.check"]
    proc = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "teacher_cache.hidden_layers[1]: 40 is not a hidden state of the teacher" in proc.stderr
    assert f"{bad}:" in proc.stderr
    proc = subprocess.run([*cmd, "config/config.yaml"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"ok {REPO / 'config/config.yaml'}: 5 training runs")


# --------------------------------------------------------------------------- tensor parallelism


def tensor(tp_size, device="cpu") -> dict:
    return edited(teacher_cache=lambda c: c["teacher_cache"].update(parallel="tensor", tp_size=tp_size, device=device))


def test_tensor_parallel_ranks_that_do_not_divide_the_teachers_heads_are_refused(monkeypatch):
    monkeypatch.delenv("KDFLOW_TEACHER_GPUS", raising=False)
    # The embedded teacher (SmolLM2-135M) has 9 attention heads and 3 key-value heads.
    message = refused(tensor(2))
    assert "teacher_cache.tp_size: 2 tensor-parallel ranks do not divide the teacher's 9 attention heads" in message
    assert "3 key-value heads" in message and "choose a divisor of 3" in message and "device_map" in message
    assert study_plan(tensor(3), REPO).facts["smollm2-135m-instruct"].heads == 9
    # tp_size null: the profile's GPUs per teacher job, when the dry run sees them
    monkeypatch.setenv("KDFLOW_TEACHER_GPUS", "4")
    assert "KDFLOW_TEACHER_GPUS (the GPUs of each teacher job): 4 tensor-parallel ranks" in refused(
        tensor(None, "cuda")
    )
    monkeypatch.delenv("KDFLOW_TEACHER_GPUS")
    plan = study_plan(tensor(None, "cuda"), REPO)
    assert any("the rank count is the number of GPUs each cache job is granted" in d for d in plan.deferred)


def test_a_teacher_without_a_tensor_parallel_plan_is_refused(tmp_path):
    model = hf_dir(tmp_path / "gpt2", layers=4)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    config = edited(
        teacher={"name": "gpt", "source": {"kind": "hf", "path": str(model)}},
        students=[{"name": "s", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 1]}}],
        teacher_cache=dict(DEFAULT["teacher_cache"], parallel="tensor", tp_size=2, hidden_layers=[2]),
        training={"experiments": [{"modes": ["ce", "rb"]}]},
    )
    message = refused(config)
    assert (
        "teacher_cache.parallel: tensor, but transformers has no tensor-parallel plan for its architecture" in message
    )
    assert "'gpt2'" in message
    assert "use teacher_cache.parallel: device_map (device auto) instead" in message
