"""The run spec: one training run's settings as typed, frozen dataclasses (:class:`RunSpec`).

:class:`RunSpec` is the contract between the plan and the training code: the train job gets
:meth:`RunSpec.to_json` as its ``spec`` parameter (a plain dict, so Snakemake's params trigger compares it), it
is written into ``results/train/<run>/run_config.json`` and hashed into the resume key, and the trainer reads it
back with :meth:`RunSpec.from_json`. Defaults live in the schema only (``$defs.run``), so every field is given.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from kdflow.errors import KdflowError
from kdflow.json_types import dataclass_problems, type_hints

RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
KD_TERMS = ("ce", "rb", "fb", "relb")
SHARED_VOCAB_TERMS = ("rb", "fb")  # need the teacher's token ids


class RunSpecError(KdflowError, ValueError):
    """A run spec that is not one: a missing or unknown key, a value of the wrong type, settings that conflict."""


S = TypeVar("S", bound="_Section")


@dataclass(frozen=True, kw_only=True)
class _Section:
    """A section of a run spec: read from and written to its JSON dict, with the keys in the order they came.

    The order is kept because Snakemake's params trigger compares ``repr(spec)``, which is order-sensitive,
    and the order is the config's (``training.defaults`` as written, then the schema's defaults)."""

    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)  # the JSON keys' order, as read

    @classmethod
    def from_json(cls: type[S], record: Any, where: str = "") -> S:
        """The section of the dict ``record`` (at key path ``where``, for errors); every key must be there."""
        return cls(**cls._values(record, where), key_order=tuple(record))

    @classmethod
    def _values(cls, record: Any, where: str) -> dict[str, Any]:
        at = f"{where}: " if where else ""
        if not isinstance(record, dict):
            raise RunSpecError(f"{at}expected a mapping, got {record!r}")
        names = [f.name for f in fields(cls) if f.name != "key_order"]
        unknown, missing = sorted(set(record) - set(names)), sorted(set(names) - set(record))
        if unknown or missing:
            listed = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing keys {missing}"] * bool(missing)
            raise RunSpecError(at + "; ".join(listed))
        hints = type_hints(cls)
        return {n: _read(record[n], hints[n], f"{where}.{n}" if where else n) for n in names}

    def to_json(self) -> dict[str, Any]:
        """The section as the dict it was read from (same keys, values and key order)."""
        names = self.key_order or tuple(f.name for f in fields(self) if f.name != "key_order")
        return {n: _write(getattr(self, n)) for n in names}


def _read(value: Any, hint: Any, where: str) -> Any:
    """A JSON value as the field's type holds it: sections parsed, lists as tuples; anything else as given."""
    if isinstance(hint, type) and issubclass(hint, _Section):
        return hint.from_json(value, where)
    if typing.get_origin(hint) is tuple and isinstance(value, list | tuple):
        item = typing.get_args(hint)[0]
        return tuple(_read(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    return copy.deepcopy(value)


def _write(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_json()
    if isinstance(value, tuple):
        return [_write(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True, kw_only=True)
class LayerPair(_Section):
    """One pair of ``fb.layer_map``, in transformers' numbering (0 = embeddings, l = output of layer l-1)."""

    student: int  # the student's hidden state
    teacher: int  # the teacher's hidden state (one of teacher_cache.hidden_layers)


@dataclass(frozen=True, kw_only=True)
class FeatureKD(_Section):
    """``fb``: feature-based KD."""

    layer_map: tuple[LayerPair, ...]  # the hidden states matched, one learned projector each
    loss: str  # cosine (1 - cos) or mse


@dataclass(frozen=True, kw_only=True)
class RelationKD(_Section):
    """``relb``: relation-based KD (RKD) over the batch's pooled embeddings."""

    distance_weight: float  # weight of the RKD distance term
    angle_weight: float  # weight of the RKD angle term


@dataclass(frozen=True, kw_only=True)
class LoRA(_Section):
    """``lora``: the adapters peft adds to the frozen student."""

    r: int  # rank
    alpha: float  # scaling numerator (scale = alpha / r)
    dropout: float  # dropout on the LoRA input
    target_modules: tuple[str, ...]  # module name suffixes that get adapters


@dataclass(frozen=True, kw_only=True)
class Optimizer(_Section):
    """``optimizer``: AdamW over the LoRA weights and the projectors."""

    lr: float  # peak learning rate
    weight_decay: float  # AdamW weight decay
    betas: tuple[float, float]  # AdamW betas
    max_grad_norm: float | None  # gradient clipping; None = none


@dataclass(frozen=True, kw_only=True)
class Schedule(_Section):
    """``schedule``: the learning-rate factor per step (kdflow.train.schedule)."""

    kind: str  # decay after the warm-up: cosine, linear or constant
    warmup_steps: int  # linear warm-up steps
    min_lr_ratio: float  # final lr / peak lr (cosine, linear)


@dataclass(frozen=True, kw_only=True)
class TeacherLogits(_Section):
    """``teacher_logits``: where the rb term's teacher distribution comes from. A null k or samples is the study's
    (teacher_cache's): the plan resolves it (:meth:`kdflow.plan.StudyPlan.logits_read`), and the trainer follows
    the metadata of the cache it reads."""

    source: str  # cache (a logit cache) or online (the teacher runs inside training)
    k: int | None  # exact head ids of the logit cache read; None = teacher_cache.k
    samples: int | None  # sampled-tail draws a position of that cache (0: none); None = teacher_cache.samples
    sampling: str | None  # how those draws fall: multinomial or systematic; None = teacher_cache.sampling


@dataclass(frozen=True, kw_only=True)
class RunSpec(_Section):
    """Every setting of one training run (config/schema.yaml ``$defs.run``) and what the run is: name, student,
    mode, terms, seed, tag. Built by :func:`expand_runs` or :meth:`from_json`; checked in ``__post_init__``."""

    temperature: float  # rb temperature T
    divergence: str  # rb divergence: forward_kl, reverse_kl or jsd
    missing_mass: str  # rb treatment of the mass outside the teacher's k ids: rest_bucket or renormalize
    jsd_beta: float  # mixture weight of the generalised JSD (divergence jsd)
    teacher_logits: TeacherLogits  # the rb term's teacher: a logit cache, or the teacher online
    fb: FeatureKD  # feature-based KD settings
    relb: RelationKD  # relation-based KD settings
    lora: LoRA  # the LoRA adapters
    optimizer: Optimizer  # AdamW
    schedule: Schedule  # learning-rate schedule
    batch_size: int  # documents per micro-batch per process
    grad_accum: int  # micro-batches per optimiser step
    steps: int | None  # optimiser steps; None = from epochs
    epochs: float | None  # passes over the training shards (when steps is None)
    seed: int  # seeds the model init of the adapters, dropout and the shuffle buffer
    shuffle_buffer: int  # documents in the seeded shuffle buffer
    checkpoint_every: int  # steps between checkpoints
    keep_checkpoints: int  # most recent checkpoints kept
    device: str  # cpu, cuda or cuda:N
    dtype: str  # float32, or bfloat16 (autocast on GPU)
    gradient_checkpointing: bool  # recompute activations in backward
    gpus: int  # GPUs per node; more than 1 starts torchrun
    nodes: int  # nodes; more than 1 starts one torchrun per node through srun
    heldout_docs: int  # held-out documents for the end-of-training perplexity; 0 skips it
    name: str  # <student>.<mode>.s<seed>[.<tag>]
    student: str  # the student's name (students[])
    mode: str  # the mode's name (training.modes)
    terms: dict[str, float]  # KD term -> weight (> 0), in the mode's order (which fixes the loss's rounding)
    tag: str | None  # the experiment's tag

    @classmethod
    def from_json(cls, record: Any, where: str = "") -> RunSpec:
        """The spec of a dict as :meth:`to_json` writes it (``run_config.json``'s ``spec``, the train job's
        ``spec`` parameter); raises :class:`RunSpecError` naming the run and the key."""
        try:
            values = cls._values(record, where)
        except RunSpecError as e:
            raise RunSpecError(f"run {record.get('name') if isinstance(record, dict) else None!r}: {e}") from None
        return cls(**values, key_order=tuple(record))

    def __post_init__(self) -> None:
        problems = dataclass_problems(self)
        if not problems:  # the cross-checks read the values: only once their types are right
            problems = self._conflicts()
        if problems:
            raise RunSpecError(f"run {self.name!r}: " + "; ".join(problems))

    def _conflicts(self) -> list[str]:
        """What the schema cannot say (expand_runs reports the same with the config's key paths)."""
        problems = []
        if not self.terms:
            problems.append("terms is empty")
        for term, weight in self.terms.items():
            if term not in KD_TERMS or not weight > 0:
                problems.append(f"terms.{term} = {weight}: terms are {list(KD_TERMS)} with weights > 0")
        if self.steps is None and self.epochs is None:
            problems.append("set steps or epochs (both are null)")
        if "fb" in self.terms and not self.fb.layer_map:
            problems.append("terms has fb but fb.layer_map is empty")
        if "rb" in self.terms:
            problems += logit_conflicts(self.teacher_logits, self.temperature, self.divergence, self.missing_mass)
        if self.name != run_name(self.student, self.mode, self.seed, self.tag):
            problems.append(
                f"name {self.name!r} is not {run_name(self.student, self.mode, self.seed, self.tag)!r} (from student, "
                f"mode, seed, tag)"
            )
        return problems


def logit_conflicts(logits: TeacherLogits, temperature: float, divergence: str, missing_mass: str) -> list[str]:
    """What an rb term cannot do with its teacher logits: a cache of no ids, or a sampled tail at T != 1, with
    another divergence than forward KL, or renormalised (kdflow.losses.sampled says why each is unsound)."""
    if logits.source != "cache":
        return []
    if logits.k == 0 and logits.samples == 0:
        return ["teacher_logits: k = 0 and samples = 0 leave no teacher distribution; set k or samples"]
    if not logits.samples:  # none, or the study's (checked by expand_runs, which knows it)
        if logits.samples == 0 and logits.sampling == "systematic":
            return ["teacher_logits: sampling = systematic with samples = 0: there are no draws to place; set samples"]
        return []
    why = "a sampled tail gives an unbiased KD gradient only"
    problems = []
    if temperature != 1:
        problems.append(f"temperature = {temperature} with teacher_logits.samples = {logits.samples}: {why} at T = 1")
    if divergence != "forward_kl":
        problems.append(
            f"divergence = {divergence} with teacher_logits.samples = {logits.samples}: {why} for forward_kl"
        )
    if missing_mass != "rest_bucket":
        problems.append(
            f"missing_mass = {missing_mass} with teacher_logits.samples = {logits.samples}: the tail carries the rest "
            "mass; use rest_bucket"
        )
    return problems


def run_group(student: str, mode: str, tag: str | None) -> str:
    """The runs that differ only by seed: ``<student>.<mode>[.<tag>]`` (one row of the study's summary)."""
    return f"{student}.{mode}" + (f".{tag}" if tag else "")


def run_name(student: str, mode: str, seed: int, tag: str | None) -> str:
    """``<student>.<mode>.s<seed>[.<tag>]``."""
    return f"{student}.{mode}.s{seed}" + (f".{tag}" if tag else "")
