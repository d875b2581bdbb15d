"""What the bench scripts share: a byte-level BPE tokenizer trained on a few texts (for their tiny random models)
and the quiet logging they run with. Imported as a sibling module (``python bench/<script>.py`` puts bench/ on
sys.path)."""

from __future__ import annotations

import logging


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 300):
    """A ``PreTrainedTokenizerFast``: byte-level BPE of ``vocab_size`` trained on ``texts``, ``<|endoftext|>`` as
    end-of-sequence and padding (as tests/tiny_models.py builds it)."""
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


def quiet_logs() -> None:
    """Warnings and errors only, and no progress bars from transformers: a bench's own lines stay readable."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
