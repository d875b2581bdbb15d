"""The student being distilled: the prepared student with LoRA adapters (:func:`build_student`) and its loss
terms (:class:`Distiller`), summed by :func:`kdflow.losses.combine`.

Feature KD adds one learned projector (student width -> teacher width, no bias) per pair of ``fb.layer_map``,
initialised to the identity when the widths are equal. The losses compute in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from kdflow.losses import CELoss, FeatureKDLoss, FullKDLoss, RelationKDLoss, SampledTailKDLoss, TopKKDLoss, combine
from kdflow.train.job import TrainingError

if TYPE_CHECKING:
    from kdflow.manifest import ModelManifest
    from kdflow.runs import RunSpec


class Distiller(nn.Module):
    """The LoRA student with its loss modules: ``forward(batch) -> {term: scalar}`` (fp32 values)."""

    def __init__(
        self,
        student: nn.Module,
        spec: RunSpec,
        teacher_hidden_size: int | None,
        teacher: nn.Module | None = None,
        samples: int = 0,
    ):
        """``teacher``: the teacher online (teacher_logits.source: online); ``samples``: the draws a position of
        the logit cache read (its metadata's ``samples``; 0: a top-k cache)."""
        super().__init__()
        self.student = student
        self.terms = dict(spec.terms)
        self.ce = CELoss()
        # The rb term's teacher: a top-k cache, a cache with a sampled tail, or the teacher itself (online).
        logits = spec.teacher_logits
        self.rb_source = "online" if logits.source == "online" else "sampled" if samples else "topk"
        if self.rb_source == "online":
            self.rb = FullKDLoss(spec.temperature, spec.divergence, spec.jsd_beta)
        elif self.rb_source == "sampled":
            self.rb = SampledTailKDLoss(samples, spec.temperature, spec.divergence)
        else:
            self.rb = TopKKDLoss(spec.temperature, spec.divergence, spec.missing_mass, spec.jsd_beta)
        if "rb" in self.terms and (self.rb_source == "online") != (teacher is not None):
            raise TrainingError(f"run {spec.name}: teacher_logits.source {logits.source} needs the teacher online")
        self._teacher = [teacher]  # not a submodule: no gradient, not in checkpoints or DDP
        self.relb = RelationKDLoss(spec.relb.distance_weight, spec.relb.angle_weight)
        self.layer_map = [(p.student, p.teacher) for p in spec.fb.layer_map]
        self.fb = nn.ModuleDict()
        if "fb" in self.terms:
            width = student.config.hidden_size
            for s, t in self.layer_map:
                loss = FeatureKDLoss(width, int(teacher_hidden_size), spec.fb.loss)
                if width == int(teacher_hidden_size):
                    # Same width (a pruned or same-family student): start from the identity, so that the loss
                    # first measures the real gap and the student, not only the projector, has to close it.
                    with torch.no_grad():
                        loss.projector.weight.copy_(torch.eye(width))
                self.fb[f"s{s}_t{t}"] = loss
        self.want_hidden = "fb" in self.terms or "relb" in self.terms
        self.last_parts: dict[str, float] = {}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        ids, mask = batch["student_ids"], batch["student_mask"]
        out = self.student(input_ids=ids, attention_mask=mask, output_hidden_states=self.want_hidden, use_cache=False)
        logits = out.logits
        terms: dict[str, torch.Tensor] = {}
        head = batch["topk_ids"], batch["topk_logprobs"], batch["rest_logprob"]
        tail = (batch["sample_ids"], batch["sample_counts"]) if self.rb_source == "sampled" else ()
        if "ce" in self.terms and "rb" in self.terms and self.rb_source != "online":  # one pass over the vocabulary
            terms["ce"], terms["rb"] = self.rb.forward_with_ce(logits, ids, mask, *head, *tail, batch["mask"])
        elif "ce" in self.terms:
            terms["ce"] = self.ce(logits, ids, mask)
        if "rb" in self.terms and "rb" not in terms:
            if self.rb_source == "topk":
                terms["rb"] = self.rb(logits, *head, batch["mask"])
            elif self.rb_source == "sampled":
                terms["rb"] = self.rb(logits, *head, *tail, batch["mask"])
            else:
                with torch.no_grad():
                    teacher_logits = self._teacher[0](input_ids=batch["input_ids"], attention_mask=batch["mask"]).logits
                terms["rb"] = self.rb(logits, teacher_logits, batch["mask"])
        if "fb" in self.terms:
            parts = [
                self.fb[f"s{s}_t{t}"](out.hidden_states[s], batch["hidden"][t], batch["hidden_positions"])
                for s, t in self.layer_map
            ]
            terms["fb"] = torch.stack(parts).mean()
        if "relb" in self.terms:
            last = out.hidden_states[-1].float()
            m = mask.unsqueeze(-1).to(last.dtype)
            pooled = (last * m).sum(1) / m.sum(1).clamp_min(1.0)
            terms["relb"] = self.relb(pooled, batch["embedding"])
            self.last_parts = {f"relb_{k}": v for k, v in self.relb.last_terms.items()}
        return terms

    def loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Σ w_t · term_t`` by :func:`kdflow.losses.combine`, in the order of the run's ``terms`` setting (the order
        fixes the float rounding, so it is the same on every rank and every rerun)."""
        return combine({n: terms[n] for n in self.terms}, self.terms)


def not_finite(terms: dict[str, torch.Tensor], batch: dict) -> str:
    """Which terms are NaN/inf, and on which documents of the batch (for the error that stops the run)."""
    bad = {n: float(v.detach()) for n, v in terms.items() if not bool(torch.isfinite(v.detach()))}
    if not bad:
        return "a term is not finite on another rank"
    docs = list(zip(batch["shard"], batch["doc_index"].tolist(), strict=True))
    return f"term {', '.join(f'{n} = {v}' for n, v in bad.items())} on documents (shard, doc_index) {docs}"


def build_student(info: ModelManifest, spec: RunSpec, device: torch.device):
    """The prepared student with LoRA adapters (peft); the base weights frozen."""
    from peft import LoraConfig, get_peft_model

    from kdflow.models import load_model

    model = load_model(info, "cpu", "float32")
    n_layers = model.config.num_hidden_layers
    for j, pair in enumerate(spec.fb.layer_map if "fb" in spec.terms else ()):
        if not 0 <= pair.student <= n_layers:
            raise TrainingError(
                f"run {spec.name}: fb.layer_map[{j}].student = {pair.student}, but student "
                f"{info.name!r} has hidden states 0..{n_layers} ({n_layers} layers)"
            )
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in spec.lora.target_modules if m not in names]
    if missing:
        raise TrainingError(
            f"run {spec.name}: lora.target_modules {missing} match no module of student "
            f"{info.name!r}; its linear layers are e.g. "
            f"{sorted(n for n in names if n.endswith('_proj'))[:8]}"
        )
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),  # a list, which peft keeps as a set (a tuple it keeps)
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = info.load_path
    model.train()
    return model.to(device)
