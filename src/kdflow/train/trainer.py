"""The training loop of one run: :class:`Trainer` (``setup`` / ``train_step`` / ``run`` / ``finish``).

Reads top to bottom: the run spec read and the inputs checked before anything is loaded, the set-up (seed,
student, optimiser, data, schedule), checkpoint and resume, one optimiser step (micro-batches, loss, clipping),
the loop (metrics, signals, checkpoints), the output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdflow.runs import RunSpec
from kdflow.train import checkpoint as ckpt
from kdflow.train import outputs
from kdflow.train.batches import to_device, training_batches
from kdflow.train.distiller import Distiller, build_student, not_finite
from kdflow.train.distributed import all_reduce, barrier, setup_distributed, teardown
from kdflow.train.job import TrainingError, TrainJob, read_inputs, resume_key
from kdflow.train.online import load_online_teacher
from kdflow.train.schedule import lr_lambda
from kdflow.train.signals import Interrupted, StopSignals

log = logging.getLogger("kdflow.train")


class Trainer:
    def __init__(self, job: TrainJob):
        self.job = job
        self.spec = RunSpec.from_json(job.spec)  # the one place the job's spec dict is read
        self.work, self.output = Path(job.work), Path(job.output)
        self.ctx = setup_distributed(self.spec.device)
        if job.threads:
            torch.set_num_threads(int(job.threads))
        self.signals = StopSignals()
        # before anything is loaded: a wrong student or a missing cache fails fast
        self.inputs = read_inputs(job, self.spec)

    def resume_key(self) -> str:
        return resume_key(self.job, self.inputs, self.ctx.world)

    def setup(self) -> None:
        """Seed, student with its losses (DDP-wrapped on several ranks), optimiser, data, schedule; step 0."""
        from kdflow.models import load_tokenizer

        spec, ctx = self.spec, self.ctx
        random.seed(spec.seed)
        np.random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        self.model = build_student(self.inputs.student, spec, ctx.device)
        teacher = None
        if "rb" in spec.terms and spec.teacher_logits.source == "online":
            if not self.job.teacher_manifest:
                raise TrainingError(f"run {spec.name}: teacher_logits.source: online, but the job names no teacher")
            teacher = load_online_teacher(self.job.teacher_manifest, ctx.device, spec.dtype, spec.name)
        samples = self.inputs.metas[0].samples or 0  # the loss follows the logit cache read (checked: expected)
        self.distiller = Distiller(self.model, spec, self.inputs.teacher_hidden, teacher, samples).to(ctx.device)
        self.params = [p for p in self.distiller.parameters() if p.requires_grad]
        self.engine: nn.Module = self.distiller
        if ctx.active:
            self.engine = nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        opt = spec.optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        self.tokenizer = load_tokenizer(self.inputs.student)
        self.batches = training_batches(self.job, spec, self.inputs, ctx, self.tokenizer)
        if spec.steps is not None:
            self.total_steps = spec.steps
        else:  # RunSpec guarantees epochs when steps is None
            per_step = spec.batch_size * spec.grad_accum * ctx.world
            self.total_steps = max(1, math.ceil(spec.epochs * self.batches.stream.num_documents / per_step))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec.schedule, self.total_steps))
        self.resumable = ckpt.Resumable(self.distiller, self.optimizer, self.scheduler, self.batches)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.resumes: list[int] = []  # the steps this run was resumed from (a preempted run may be resumed often)

    def save_checkpoint(self) -> Path:
        info = {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed, "resumes": self.resumes}
        info.update(resume_key=self.resume_key(), run=self.spec.name, world_size=self.ctx.world)
        return ckpt.save(self.work, self.ctx, self.resumable, info, self.spec.keep_checkpoints)

    def try_resume(self) -> bool:
        found = ckpt.resume(self.work, self.ctx, self.resume_key(), self.resumable)
        if found is None:
            return False
        latest, info = found
        self.step, self.tokens, self.elapsed = int(info["step"]), int(info["tokens"]), float(info["elapsed_s"])
        self.resumes = [*info.get("resumes", []), self.step]
        log.info("resumed from %s (step %d of %d)", latest, self.step, self.total_steps)
        return True

    def _pending_signal(self) -> int:
        """The signal any rank received (all ranks checkpoint and stop together)."""
        flag = torch.tensor([float(self.signals.received or 0)], device=self.ctx.device)
        return int(all_reduce(flag, self.ctx, "max").item())

    def _autocast(self):
        if self.ctx.device.type == "cuda" and self.spec.dtype == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; the row of metrics it logs (without step times)."""
        spec, ctx = self.spec, self.ctx
        names = list(spec.terms)
        sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # terms…, tokens, docs
        parts: dict[str, float] = {}
        accum = spec.grad_accum
        for micro in range(accum):
            batch = to_device(self.batches.next(), ctx.device)
            sync = micro == accum - 1 or not ctx.active  # DDP reduces gradients on the last micro-batch only
            with contextlib.nullcontext() if sync else self.engine.no_sync(), self._autocast():
                terms = self.engine(batch)
                values = torch.stack([terms[n].detach().float() for n in names])
                # every rank stops at the same step, or the others would hang in the next collective
                ok = torch.tensor([1.0 if bool(torch.isfinite(values).all()) else 0.0], device=ctx.device)
                if int(all_reduce(ok, ctx, "min").item()) == 0:
                    raise FloatingPointError(
                        f"run {spec.name}: step {self.step + 1} (rank {ctx.rank}): {not_finite(terms, batch)}; "
                        f"training diverged or the cache holds NaN/inf; lower optimizer.lr or check the cache files "
                        f"of those shards"
                    )
                loss = self.distiller.loss(terms) / accum
            loss.backward()
            sums[: len(names)] += values.double().cpu()
            sums[-2] += float(batch["student_mask"].sum())
            sums[-1] += len(batch["doc_index"])
            for key, value in self.distiller.last_parts.items():
                parts[key] = parts.get(key, 0.0) + value / accum
        max_norm = spec.optimizer.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm is not None else float("inf"))
        if not bool(torch.isfinite(grad_norm)):
            raise TrainingError(
                f"run {spec.name}: step {self.step + 1}: gradient norm is {float(grad_norm)}; "
                f"lower optimizer.lr or set optimizer.max_grad_norm"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = all_reduce(sums.to(ctx.device), ctx).cpu()
        out = {n: float(totals[i]) / (accum * ctx.world) for i, n in enumerate(names)}
        out["loss"] = float(self.distiller.loss({n: torch.tensor(out[n], dtype=torch.float64) for n in names}))
        out.update(parts)
        out.update(lr=lr, grad_norm=float(grad_norm), tokens=int(totals[-2]), docs=int(totals[-1]))
        return out

    def run(self) -> dict[str, Any]:
        """Set up, resume if a checkpoint of this run exists, train to ``total_steps``, write the output."""
        from tqdm.auto import tqdm

        spec, ctx = self.spec, self.ctx
        self.setup()
        self.work.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        metrics = outputs.MetricsLog(self.work, self.step, enabled=ctx.main)
        if ctx.main:
            log.info(
                "run %s: terms %s, %d steps of %d x %d docs x %d ranks, student %s, device %s%s",
                spec.name,
                spec.terms,
                self.total_steps,
                spec.batch_size,
                spec.grad_accum,
                ctx.world,
                self.inputs.student.name,
                ctx.device,
                ", resumed" if resumed else "",
            )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=spec.name,
            unit="step",
            disable=not ctx.main,
            dynamic_ncols=True,
            mininterval=2.0,
        )
        try:
            with self.signals:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    row = self.train_step()
                    dt = time.perf_counter() - t0
                    self.step += 1
                    self.tokens += row["tokens"]
                    self.elapsed += dt
                    row.update(step=self.step, epoch=self.batches.stream.epoch, step_s=dt, elapsed_s=self.elapsed)
                    row["tokens_per_s"] = row["tokens"] / dt if dt > 0 else None
                    metrics.write(row)
                    bar.update(1)
                    bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", *spec.terms)}, refresh=False)
                    signum = self._pending_signal()
                    if signum or self.step % spec.checkpoint_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if signum == signal.SIGTERM:
                        log.warning("stopping after the checkpoint of step %d (SIGTERM); rerun to resume", self.step)
                        raise Interrupted(self.step)
                    if signum:
                        self.signals.received = None
        finally:
            bar.close()
            metrics.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Rank 0 writes the run directory (held-out perplexity included) and drops the checkpoints."""
        summary: dict[str, Any] = {}
        if self.ctx.main:
            self.distiller.eval()
            summary = outputs.write_outputs(
                self.job,
                self.spec,
                self.inputs,
                self.model,
                self.tokenizer,
                self.distiller.fb,
                steps=self.step,
                tokens=self.tokens,
                elapsed=self.elapsed,
                world=self.ctx.world,
                resumes=self.resumes,
                resume_key=self.resume_key(),
            )
            shutil.rmtree(self.work / "checkpoints", ignore_errors=True)
        barrier(self.ctx)
        return summary


def run_training(job: TrainJob) -> dict[str, Any]:
    """Train one run (in this process, or as one rank of a launcher) and write its output directory."""
    trainer = Trainer(job)
    try:
        return trainer.run()
    finally:
        teardown(trainer.ctx)
