"""Tiny randomly initialised models and tokenizers, built in the test (no hub access)."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS_A = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
]
CORPUS_B = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]


def make_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model(vocab_size: int, layers: int = 4, seed: int = 0):
    """A small Llama (32-dim) with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_model_dir(path: Path, texts: list[str], vocab_size: int, layers: int = 4, seed: int = 0) -> Path:
    """A Hugging Face model directory (weights + tokenizer) as ``from_pretrained`` expects it."""
    tok = make_tokenizer(texts, vocab_size)
    # Padding rows beyond the tokenizer, as real checkpoints often have.
    model = make_model(len(tok) + 3, layers, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_code_docs(folder: Path, n: int) -> Path:
    """``n`` small Python files ``doc00.py`` … in ``folder`` (distinct, of varying length): a text_files corpus."""
    folder.mkdir(parents=True)
    for i in range(n):
        lines = [f"# document {i}"] + [f"value_{i}_{j} = {i * j} + {j}" for j in range(i % 5 + 3)]
        (folder / f"doc{i:02d}.py").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("teacher"), CORPUS_A * 5, vocab_size=300)


@pytest.fixture(scope="session")
def other_vocab_dir(tmp_path_factory) -> Path:
    """A model whose tokenizer differs from the tiny teacher's."""
    return save_model_dir(tmp_path_factory.mktemp("other"), CORPUS_B * 5, vocab_size=280, layers=2, seed=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and several threads spin for ages on busy cores. Autouse in every
    test module that imports it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PREP = {"device": "cpu", "dtype": "float32", "max_length": 16, "batch_size": 4, "ppl_max_docs": 0}


def prepare_tiny_models(root: Path, teacher_dir: Path, other_dir: Path) -> dict[str, Path]:
    """Manifests of the tiny teacher, a student pruned from it (layers 0 and 3) and a student with its own
    vocabulary (``vocab: own``), as prepare_models writes them: {"teacher", "student", "foreign"}."""
    from kdflow.prepare import prepare_student, prepare_teacher

    out = {name: root / f"models/{name}/kdflow_model.json" for name in ("teacher", "student", "foreign")}
    prepare_teacher({"name": "teacher", "source": {"kind": "hf", "path": str(teacher_dir)}}, PREP, out["teacher"])
    prepare_student(
        {"name": "student", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 3]}},
        PREP,
        out["teacher"],
        out["student"],
    )
    prepare_student(
        {"name": "foreign", "vocab": "own", "source": {"kind": "hf", "path": str(other_dir)}},
        PREP,
        out["teacher"],
        out["foreign"],
    )
    return out


def write_shard(path: Path, texts: list[str]) -> Path:
    """A shard file (doc_id, source, text) as the shard rule writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "doc_id": pa.array([f"doc-{i:02d}" for i in range(len(texts))], pa.string()),
                "source": pa.array(["code"] * len(texts), pa.string()),
                "text": pa.array(texts, pa.string()),
            }
        ),
        path,
    )
    return path
