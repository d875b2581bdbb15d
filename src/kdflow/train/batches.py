"""Training batches from the cache stream: :class:`kdflow.cache_loader.CacheStream` over the training shards'
caches (one row group at a time, seeded shuffle buffer, documents split round-robin over the ranks), endless
(epoch after epoch) and resumable. A student with its own tokenizer (``vocab: own``, relation KD only)
re-tokenises the text the teacher saw (from the embed cache)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from kdflow.cache_loader import CacheStream, ShardCaches, collate
from kdflow.models import pad_id_of
from kdflow.train.distributed import Dist
from kdflow.train.job import RunInputs, TrainingError, TrainJob

if TYPE_CHECKING:
    from kdflow.runs import RunSpec


class Batches:
    """Endless batches of ``batch_size`` documents from a CacheStream (epoch after epoch), resumable."""

    def __init__(
        self, stream: CacheStream, batch_size: int, pad_id: int, student_tokenizer=None, max_length: int | None = None
    ):
        if len(stream) == 0:
            raise TrainingError(
                f"this rank has no training documents ({stream.num_documents} documents over "
                f"{stream.world_size} ranks); use fewer processes or more data"
            )
        self.stream, self.batch_size, self.pad_id = stream, batch_size, pad_id
        self.tokenizer, self.max_length = student_tokenizer, max_length
        self._it: Iterator[dict] | None = None

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self._it = None

    def next(self) -> dict:
        examples = []
        while len(examples) < self.batch_size:
            if self._it is None:
                self._it = iter(self.stream)
            try:
                examples.append(next(self._it))
            except StopIteration:
                self.stream.set_epoch(self.stream.epoch + 1)
                self._it = None
        batch = collate(examples, self.pad_id)
        if self.tokenizer is None:
            batch["student_ids"], batch["student_mask"] = batch["input_ids"], batch["mask"]
        else:  # the student's own tokens of the text the teacher saw (relation KD across vocabularies)
            enc = self.tokenizer(
                batch["text"], truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
            )
            batch["student_ids"], batch["student_mask"] = enc["input_ids"], enc["attention_mask"]
        return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors (and those of its dicts, e.g. the hidden states by layer) on ``device``."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        else:
            out[key] = value
    return out


def training_batches(job: TrainJob, spec: RunSpec, inputs: RunInputs, ctx: Dist, tokenizer) -> Batches:
    """This rank's batches over the training shards' caches that the run's terms read."""
    shards = [
        ShardCaches(
            s["topk"],
            s.get("embed") if inputs.need["embed"] else None,
            s.get("hidden") if inputs.need["hidden"] else None,
        )
        for s in job.shards
    ]
    stream = CacheStream(
        shards,
        expected=job.expected,
        seed=spec.seed,
        shuffle_buffer=spec.shuffle_buffer,
        rank=ctx.rank,
        world_size=ctx.world,
        asked_by=f"run {spec.name}",
        with_text=inputs.own_vocab,
    )
    own = tokenizer if inputs.own_vocab else None
    return Batches(stream, spec.batch_size, pad_id_of(tokenizer), own, job.expected.get("max_length"))
