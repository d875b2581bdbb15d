"""The train rule: one LoRA student run distilled from the teacher caches (ce, rb, fb, relb and mixes).

One entry point for one process and for every process of a launcher (``torchrun`` / ``accelerate launch``
set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): :func:`run_training` with a :class:`TrainJob`, or
``python -m kdflow.train JOB.json`` (what the launcher starts; the rule writes the JSON).

* **Model**: the prepared student (``kdflow_model.json``) with peft LoRA adapters; the base weights are
  frozen. Feature KD adds one learned projector (student width -> teacher width, no bias) per pair of
  ``fb.layer_map``, initialised to the identity when the widths are equal. fp32 on CPU, bf16 autocast on GPU (``dtype: bfloat16``); the losses compute in fp32.
* **Data**: :class:`kdflow.cache_loader.CacheStream` over the training shards' caches: read one row group
  at a time, seeded shuffle buffer, documents split round-robin over the ranks, endless (epoch after
  epoch). A student with its own tokenizer (``vocab: own``, relation KD only) re-tokenises the text the
  teacher saw (from the embed cache).
* **Loss**: ``Σ w_t · term_t`` over the run's terms (kdflow.losses); every term is logged on its own. A
  NaN/inf term stops the run with the step, the batch's documents and the term named (on every rank).
* **Checkpoints** live in ``work`` (outside the rule's declared output, which Snakemake deletes when a job
  fails): every ``checkpoint_every`` steps and when SIGUSR1 or SIGTERM arrives (at the end of the step in
  progress; SIGTERM then stops the run with exit status 143, SIGUSR1 continues). A checkpoint holds the
  trainable weights (LoRA + projectors), optimiser, scheduler, every rank's RNG states and data position.
  A rerun with the same job resumes from the newest one; the result is the same as an uninterrupted run
  (bitwise on CPU). A checkpoint of another job (other settings, shards, student or world size) is never
  resumed: it is moved aside and the run starts from step 0 (logged).
* **Metrics**: ``work/metrics.jsonl``, one JSON line per optimiser step (every term, loss, lr, grad norm,
  tokens, tokens/s), truncated back to the checkpoint's step on resume; a tqdm progress bar.
* **Output** (atomic directory): ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT: loads with
  ``PeftModel.from_pretrained(base, dir)`` and lm-eval's ``pretrained=BASE,peft=DIR``),
  ``projector.safetensors`` (fb), ``run_config.json`` (the resolved run), ``provenance.json``,
  ``metrics.jsonl`` and ``summary.json`` (end-of-training held-out perplexity, throughput).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdflow.atomic import atomic_path, write_json
from kdflow.cache_format import read_meta, check_student_vocab
from kdflow.cache_loader import CacheStream, ShardCaches, collate
from kdflow.config import config_hash
from kdflow.losses import CELoss, FeatureKDLoss, RelationKDLoss, TopKKDLoss
from kdflow.provenance import provenance

log = logging.getLogger("kdflow.train")

CHECKPOINT_PREFIX = "step_"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on (bad inputs, diverged loss)."""


class Interrupted(SystemExit):
    """SIGTERM arrived: a checkpoint was written and the run stops (rerun to resume)."""

    def __init__(self, step: int):
        super().__init__(128 + signal.SIGTERM)
        self.step = step


@dataclass
class TrainJob:
    """Everything one run needs; JSON-serialisable so that a launcher's processes can read it."""

    spec: dict[str, Any]                 # one value of kdflow.runs.expand_runs (settings + name, terms, seed)
    student_manifest: str                # the student's kdflow_model.json
    shards: list[dict[str, str | None]]  # [{"topk": …, "embed": … | None, "hidden": … | None}] training shards
    expected: dict[str, Any]             # cache metadata the files must carry (k, max_length, layers …)
    output: str                          # the run directory (the rule's declared output)
    work: str                            # checkpoints and metrics, outside the declared outputs
    heldout: str | None = None           # held-out shard Parquet for the end-of-training perplexity
    threads: int | None = None           # torch threads per process (None: leave torch's default)

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "TrainJob":
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- distributed context

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """One process, or one rank of a launcher (env WORLD_SIZE/RANK/LOCAL_RANK): gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"training device {device!r} asked for, but torch sees no GPU (torch "
                                f"{torch.__version__}); set training.defaults.device: cpu or run on a GPU node")
        dev = torch.device(f"cuda:{local}") if world > 1 or device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def _all_reduce(values: torch.Tensor, ctx: Dist, op=None) -> torch.Tensor:
    if ctx.active:
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


def _gather(obj: Any, ctx: Dist) -> list:
    if not ctx.active:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- the model and its losses

class Distiller(nn.Module):
    """The LoRA student with its loss modules: ``forward(batch) -> {term: scalar}`` (fp32 values)."""

    def __init__(self, student: nn.Module, spec: dict, teacher_hidden_size: int | None):
        super().__init__()
        self.student = student
        self.terms = dict(spec["terms"])
        self.ce = CELoss()
        self.rb = TopKKDLoss(spec["temperature"], spec["divergence"], spec["missing_mass"], spec["jsd_beta"])
        self.relb = RelationKDLoss(spec["relb"]["distance_weight"], spec["relb"]["angle_weight"])
        self.layer_map = [(int(p["student"]), int(p["teacher"])) for p in spec["fb"]["layer_map"]]
        self.fb = nn.ModuleDict()
        if "fb" in self.terms:
            width = student.config.hidden_size
            for s, t in self.layer_map:
                loss = FeatureKDLoss(width, int(teacher_hidden_size), spec["fb"]["loss"])
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
        out = self.student(input_ids=ids, attention_mask=mask, output_hidden_states=self.want_hidden,
                           use_cache=False)
        logits = out.logits
        terms: dict[str, torch.Tensor] = {}
        if "ce" in self.terms and "rb" in self.terms:  # one pass over the vocabulary for both (where possible)
            terms["ce"], terms["rb"] = self.rb.forward_with_ce(logits, ids, mask, batch["topk_ids"],
                                                               batch["topk_logprobs"], batch["rest_logprob"],
                                                               batch["mask"])
        elif "ce" in self.terms:
            terms["ce"] = self.ce(logits, ids, mask)
        if "rb" in self.terms and "rb" not in terms:
            terms["rb"] = self.rb(logits, batch["topk_ids"], batch["topk_logprobs"], batch["rest_logprob"],
                                  batch["mask"])
        if "fb" in self.terms:
            parts = [self.fb[f"s{s}_t{t}"](out.hidden_states[s], batch["hidden"][t], batch["hidden_positions"])
                     for s, t in self.layer_map]
            terms["fb"] = torch.stack(parts).mean()
        if "relb" in self.terms:
            last = out.hidden_states[-1].float()
            m = mask.unsqueeze(-1).to(last.dtype)
            pooled = (last * m).sum(1) / m.sum(1).clamp_min(1.0)
            terms["relb"] = self.relb(pooled, batch["embedding"])
            self.last_parts = {f"relb_{k}": v for k, v in self.relb.last_terms.items()}
        return terms


def build_student(info: dict, spec: dict, device: torch.device):
    """The prepared student with LoRA adapters (peft); the base weights frozen."""
    from peft import LoraConfig, get_peft_model

    from kdflow.models import load_model

    model = load_model(info, "cpu", "float32")
    n_layers = model.config.num_hidden_layers
    for j, pair in enumerate(spec["fb"]["layer_map"] if "fb" in spec["terms"] else []):
        if not 0 <= pair["student"] <= n_layers:
            raise TrainingError(f"run {spec['name']}: fb.layer_map[{j}].student = {pair['student']}, but student "
                                f"{info['name']!r} has hidden states 0..{n_layers} ({n_layers} layers)")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in spec["lora"]["target_modules"] if m not in names]
    if missing:
        raise TrainingError(f"run {spec['name']}: lora.target_modules {missing} match no module of student "
                            f"{info['name']!r}; its linear layers are e.g. "
                            f"{sorted(n for n in names if n.endswith('_proj'))[:8]}")
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=spec["lora"]["r"], lora_alpha=spec["lora"]["alpha"], lora_dropout=spec["lora"]["dropout"],
                      target_modules=list(spec["lora"]["target_modules"]), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = info["load_path"]
    model.train()
    return model.to(device)


# --------------------------------------------------------------------------- data

class Batches:
    """Endless batches of ``batch_size`` documents from a CacheStream (epoch after epoch), resumable."""

    def __init__(self, stream: CacheStream, batch_size: int, pad_id: int, student_tokenizer=None,
                 max_length: int | None = None):
        if len(stream) == 0:
            raise TrainingError(f"this rank has no training documents ({stream.num_documents} documents over "
                                f"{stream.world_size} ranks); use fewer processes or more data")
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
            enc = self.tokenizer(batch["text"], truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
            batch["student_ids"], batch["student_mask"] = enc["input_ids"], enc["attention_mask"]
        return batch


def _to(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- schedule

def lr_lambda(spec: dict, total_steps: int):
    sched = spec["schedule"]
    warm, kind, floor = sched["warmup_steps"], sched["kind"], sched["min_lr_ratio"]

    def factor(step: int) -> float:  # step = optimiser steps already taken
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warm)
        progress = min(1.0, (step - warm) / span)
        if kind == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------- checkpoints

def _rng_state(ctx: Dist) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict, ctx: Dist) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def _checkpoints(work: Path) -> list[Path]:
    root = work / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                   and p.name[len(CHECKPOINT_PREFIX):].isdigit()), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# --------------------------------------------------------------------------- the run

class Trainer:
    def __init__(self, job: TrainJob):
        self.job = job
        self.spec = spec = job.spec
        self.work, self.output = Path(job.work), Path(job.output)
        self.ctx = setup_distributed(spec["device"])
        if job.threads:
            torch.set_num_threads(int(job.threads))
        self.stop_signal: int | None = None
        self._check_inputs()

    # ---------------------------------------------------------------- set-up

    def _check_inputs(self) -> None:
        from kdflow.models import read_manifest

        spec, job = self.spec, self.job
        self.student_info = read_manifest(job.student_manifest)
        self.metas = [read_meta(s["topk"]) for s in job.shards]
        if not job.shards:
            raise TrainingError(f"run {spec['name']}: no training shards given")
        for term in spec["terms"]:
            for s, meta in zip(job.shards, self.metas):
                check_student_vocab(meta, self.student_info, term, s["topk"])
        self.own_vocab = self.student_info.get("tokenizer_fingerprint") != self.metas[0].get("tokenizer_fingerprint")
        need = {"embed": "relb" in spec["terms"] or self.own_vocab, "hidden": "fb" in spec["terms"]}
        for kind, wanted in need.items():
            if wanted and any(not s.get(kind) for s in job.shards):
                raise TrainingError(f"run {spec['name']}: the {kind} cache of every shard is needed for terms "
                                    f"{sorted(spec['terms'])}, but some shard has none")
        self.teacher_hidden = None
        if need["hidden"]:
            self.teacher_hidden = int(read_meta(job.shards[0]["hidden"])["hidden_size"])
        self.need = need

    def resume_key(self) -> str:
        """What a checkpoint must have been made by to be resumed: the run, its inputs, the world size."""
        caches = [(m.get("shard"), m.get("shard_sha256"), m.get("settings_hash")) for m in self.metas]
        return config_hash({"spec": self.spec, "expected": self.job.expected, "caches": caches,
                            "student": self.student_info.get("config_hash"), "world": self.ctx.world,
                            "own_vocab": self.own_vocab})

    def _setup(self) -> None:
        from kdflow.models import load_tokenizer

        spec, ctx = self.spec, self.ctx
        seed = int(spec["seed"])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.model = build_student(self.student_info, spec, ctx.device)
        self.distiller = Distiller(self.model, spec, self.teacher_hidden).to(ctx.device)
        self.params = [p for p in self.distiller.parameters() if p.requires_grad]
        self.engine: nn.Module = self.distiller
        if ctx.active:
            self.engine = nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        opt = spec["optimizer"]
        self.optimizer = torch.optim.AdamW(self.params, lr=opt["lr"], betas=tuple(opt["betas"]),
                                           weight_decay=opt["weight_decay"])
        shards = [ShardCaches(s["topk"], s.get("embed") if self.need["embed"] else None,
                              s.get("hidden") if self.need["hidden"] else None) for s in self.job.shards]
        stream = CacheStream(shards, expected=self.job.expected, seed=seed, shuffle_buffer=spec["shuffle_buffer"],
                             rank=ctx.rank, world_size=ctx.world, asked_by=f"run {spec['name']}",
                             with_text=self.own_vocab)
        self.tokenizer = load_tokenizer(self.student_info)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = Batches(stream, spec["batch_size"], pad, self.tokenizer if self.own_vocab else None,
                               self.job.expected.get("max_length"))
        per_step = spec["batch_size"] * spec["grad_accum"] * ctx.world
        if spec["steps"] is not None:
            self.total_steps = int(spec["steps"])
        else:
            self.total_steps = max(1, math.ceil(spec["epochs"] * stream.num_documents / per_step))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec, self.total_steps))
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.resumes: list[int] = []  # the steps this run was resumed from (a preempted run may be resumed often)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        ctx = self.ctx
        data = _gather(self.batches.state_dict(), ctx)
        rng = _gather(_rng_state(ctx), ctx)
        target = self.work / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        if ctx.main:
            with atomic_path(target) as tmp:
                tmp.mkdir(parents=True)
                torch.save({"trainable": trainable_state(self.distiller), "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
                write_json(tmp / "checkpoint.json", {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed,
                                                     "data": data, "resume_key": self.resume_key(),
                                                     "run": self.spec["name"], "world_size": ctx.world,
                                                     "resumes": self.resumes})
            for old in _checkpoints(self.work)[:-self.spec["keep_checkpoints"]]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint at step %d: %s", self.step, target)
        if ctx.active:
            dist.barrier()
        return target

    def try_resume(self) -> bool:
        ckpts = _checkpoints(self.work)
        if not ckpts:
            return False
        latest = ckpts[-1]
        info = json.loads((latest / "checkpoint.json").read_text(encoding="utf-8"))
        if info.get("resume_key") != self.resume_key():
            if self.ctx.main:
                aside = self.work / f"stale-{int(time.time())}"
                (self.work / "checkpoints").rename(aside)
                log.warning("%s was written by another version of this run (other settings, shards, student or "
                            "world size); moved the checkpoints to %s and starting from step 0", latest, aside)
            if self.ctx.active:
                dist.barrier()
            return False
        state = torch.load(latest / "state.pt", map_location="cpu", weights_only=False)
        own = dict(self.distiller.named_parameters())
        missing = sorted(set(n for n, p in own.items() if p.requires_grad) - set(state["trainable"]))
        if missing:
            raise TrainingError(f"{latest}: checkpoint lacks trainable weights {missing[:3]}…; delete {latest.parent} "
                                f"to start over")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                own[name].copy_(value.to(own[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][self.ctx.rank], self.ctx)
        self.batches.load_state_dict(info["data"][self.ctx.rank])
        self.step, self.tokens, self.elapsed = int(info["step"]), int(info["tokens"]), float(info["elapsed_s"])
        self.resumes = [*info.get("resumes", []), self.step]
        log.info("resumed from %s (step %d of %d)", latest, self.step, self.total_steps)
        return True

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum
        log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)

    @contextlib.contextmanager
    def _signals(self):
        previous = {}
        try:
            for s in STOP_SIGNALS:
                previous[s] = signal.signal(s, self._on_signal)
        except ValueError:  # not the main thread: leave the handlers alone
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _pending_signal(self) -> int:
        flag = torch.tensor([float(self.stop_signal or 0)], device=self.ctx.device)
        return int(_all_reduce(flag, self.ctx, dist.ReduceOp.MAX if self.ctx.active else None).item())

    # ---------------------------------------------------------------- steps

    def _autocast(self):
        if self.ctx.device.type == "cuda" and self.spec["dtype"] == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        spec, ctx = self.spec, self.ctx
        weights = spec["terms"]
        names = list(weights)
        sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # terms…, tokens, docs
        parts: dict[str, float] = {}
        accum = spec["grad_accum"]
        for micro in range(accum):
            batch = _to(self.batches.next(), ctx.device)
            sync = micro == accum - 1 or not ctx.active
            with (contextlib.nullcontext() if sync else self.engine.no_sync()), self._autocast():
                terms = self.engine(batch)
                values = torch.stack([terms[n].detach().float() for n in names])
                ok = torch.tensor([1.0 if bool(torch.isfinite(values).all()) else 0.0], device=ctx.device)
                if int(_all_reduce(ok, ctx, dist.ReduceOp.MIN if ctx.active else None).item()) == 0:
                    self._diverged(terms, batch)
                loss = sum(terms[n] * weights[n] for n in names) / accum
            loss.backward()
            sums[: len(names)] += values.double().cpu()
            sums[-2] += float(batch["student_mask"].sum())
            sums[-1] += len(batch["doc_index"])
            for key, value in self.distiller.last_parts.items():
                parts[key] = parts.get(key, 0.0) + value / accum
        max_norm = spec["optimizer"]["max_grad_norm"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm is not None else float("inf"))
        if not bool(torch.isfinite(grad_norm)):
            raise TrainingError(f"run {spec['name']}: step {self.step + 1}: gradient norm is {float(grad_norm)}; "
                                f"lower optimizer.lr or set optimizer.max_grad_norm")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = _all_reduce(sums.to(ctx.device), ctx).cpu()
        out = {n: float(totals[i]) / (accum * ctx.world) for i, n in enumerate(names)}
        out["loss"] = sum(out[n] * weights[n] for n in names)
        out.update(parts)
        out.update(lr=lr, grad_norm=float(grad_norm), tokens=int(totals[-2]), docs=int(totals[-1]))
        return out

    def _diverged(self, terms: dict, batch: dict) -> None:
        bad = {n: float(v.detach()) for n, v in terms.items() if not bool(torch.isfinite(v.detach()))}
        docs = list(zip(batch["shard"], batch["doc_index"].tolist()))
        where = (f"term {', '.join(f'{n} = {v}' for n, v in bad.items())} on documents (shard, doc_index) {docs}"
                 if bad else "a term is not finite on another rank")
        raise FloatingPointError(f"run {self.spec['name']}: step {self.step + 1} (rank {self.ctx.rank}): {where}; "
                                 f"training diverged or the cache holds NaN/inf; lower optimizer.lr or check the "
                                 f"cache files of those shards")

    # ---------------------------------------------------------------- metrics

    def _metrics_file(self) -> Path:
        return self.work / "metrics.jsonl"

    def _trim_metrics(self) -> None:
        """Keep the lines of steps up to the current one (a resumed run rewrites what came after)."""
        path = self._metrics_file()
        if not self.ctx.main:
            return
        if self.step == 0 or not path.exists():
            path.unlink(missing_ok=True)
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                break  # a line cut by a kill: nothing after it counts
        with atomic_path(path) as tmp:
            tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")

    # ---------------------------------------------------------------- main loop

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        spec, ctx = self.spec, self.ctx
        self._setup()
        self.work.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        self._trim_metrics()
        if ctx.main:
            log.info("run %s: terms %s, %d steps of %d x %d docs x %d ranks, student %s, device %s%s",
                     spec["name"], spec["terms"], self.total_steps, spec["batch_size"], spec["grad_accum"],
                     ctx.world, self.student_info["name"], ctx.device, ", resumed" if resumed else "")
        metrics = open(self._metrics_file(), "a", encoding="utf-8") if ctx.main else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc=spec["name"], unit="step", disable=not ctx.main,
                   dynamic_ncols=True, mininterval=2.0)
        try:
            with self._signals():
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    row = self.train_step()
                    dt = time.perf_counter() - t0
                    self.step += 1
                    self.tokens += row["tokens"]
                    self.elapsed += dt
                    row = {"step": self.step, "epoch": self.batches.stream.epoch, **row,
                           "step_s": dt, "tokens_per_s": row["tokens"] / dt if dt > 0 else None,
                           "elapsed_s": self.elapsed}
                    if metrics is not None:
                        metrics.write(json.dumps(row, sort_keys=True) + "\n")
                        metrics.flush()
                    bar.update(1)
                    bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", *spec["terms"])}, refresh=False)
                    signum = self._pending_signal()
                    if signum or self.step % spec["checkpoint_every"] == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if signum == signal.SIGTERM:
                        log.warning("stopping after the checkpoint of step %d (SIGTERM); rerun to resume", self.step)
                        raise Interrupted(self.step)
                    if signum:
                        self.stop_signal = None
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return self.finish()

    # ---------------------------------------------------------------- output

    def finish(self) -> dict[str, Any]:
        ctx, spec = self.ctx, self.spec
        summary: dict[str, Any] = {}
        if ctx.main:
            summary = self._write_output()
            shutil.rmtree(self.work / "checkpoints", ignore_errors=True)
        if ctx.active:
            dist.barrier()
        return summary

    def _write_output(self) -> dict[str, Any]:
        from safetensors.torch import save_file

        spec = self.spec
        self.distiller.eval()
        rows = [json.loads(x) for x in self._metrics_file().read_text(encoding="utf-8").splitlines() if x.strip()]
        last = rows[-min(len(rows), 5):]
        summary: dict[str, Any] = {
            "run": spec["name"], "student": spec["student"], "mode": spec["mode"], "seed": spec["seed"],
            "terms": spec["terms"], "steps": self.step, "tokens": self.tokens, "train_seconds": self.elapsed,
            "tokens_per_s": self.tokens / self.elapsed if self.elapsed else None, "world_size": self.ctx.world,
            "resumed_from_steps": self.resumes,
            "final": {k: float(np.mean([r[k] for r in last])) for k in ("loss", *spec["terms"])} if last else {},
            "student_heldout_ppl_init": (self.student_info.get("heldout") or {}).get("ppl"),
        }
        summary["heldout"] = self._heldout()
        provenance_info = {
            **provenance(), "run": spec["name"], "seed": spec["seed"], "run_hash": config_hash(spec),
            "resume_key": self.resume_key(),
            "student": {k: self.student_info.get(k) for k in ("name", "source", "source_hash", "revision",
                                                              "tokenizer_fingerprint", "config_hash", "load_path")},
            "teacher_caches": {k: self.metas[0].get(k) for k in ("teacher", "teacher_source_hash", "teacher_revision",
                                                                 "tokenizer_fingerprint", "k", "max_length")},
            "shards": [{"topk": s["topk"], "shard_sha256": m.get("shard_sha256")} for s, m in zip(self.job.shards, self.metas)],
        }
        with atomic_path(self.output) as tmp:
            self.model.save_pretrained(tmp)
            if len(self.distiller.fb):
                save_file({k: v.contiguous() for k, v in self.distiller.fb.state_dict().items()},
                          str(tmp / "projector.safetensors"))
            write_json(tmp / "run_config.json", {"spec": spec, "expected": self.job.expected,
                                                 "student_manifest": self.job.student_manifest,
                                                 "shards": self.job.shards, "heldout": self.job.heldout})
            write_json(tmp / "provenance.json", provenance_info)
            shutil.copyfile(self._metrics_file(), tmp / "metrics.jsonl")
            write_json(tmp / "summary.json", summary)
        log.info("run %s done: %d steps, %d tokens in %.0f s; held-out ppl %s (student init %s) -> %s", spec["name"],
                 self.step, self.tokens, self.elapsed, (summary["heldout"] or {}).get("ppl"),
                 summary["student_heldout_ppl_init"], self.output)
        return summary

    def _heldout(self) -> dict | None:
        n = self.spec["heldout_docs"]
        if not self.job.heldout or n == 0:
            return None
        from kdflow.perplexity import perplexity
        from kdflow.shards import read_texts

        texts = read_texts(self.job.heldout, n)
        if not texts:
            return None
        result = perplexity(self.model, self.tokenizer, texts, max_length=self.job.expected.get("max_length", 256),
                            batch_size=8, desc=f"held-out ppl {self.spec['name']}")
        return {**result, "heldout_file": self.job.heldout}


def run_training(job: TrainJob) -> dict[str, Any]:
    """Train one run (in this process, or as one rank of a launcher) and write its output directory."""
    trainer = Trainer(job)
    try:
        return trainer.run()
    finally:
        if trainer.ctx.active and dist.is_initialized():
            dist.destroy_process_group()


def launch_command(job_file: str | Path, nproc: int, nodes: int = 1) -> list[str]:
    """How the train rule starts ``nproc`` processes per node on ``nodes`` nodes (see :mod:`kdflow.launch`): torchrun
    on this node, or srun with one torchrun per node."""
    from kdflow.launch import multi_node_command, single_node_command

    return single_node_command(job_file, nproc) if nodes <= 1 else multi_node_command(job_file, nproc, nodes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kdflow.train JOB.json   (a TrainJob written by the train rule)", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    summary = run_training(TrainJob.load(argv[0]))
    if rank == "0":
        print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
