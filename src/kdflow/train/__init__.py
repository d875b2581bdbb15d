"""The train rule: one LoRA student run distilled from the teacher caches (ce, rb, fb, relb and mixes).

One entry point for one process and for every process of a launcher (``torchrun`` / ``accelerate launch``
set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): :func:`run_training` with a :class:`TrainJob`, or
``python -m kdflow.train JOB.json`` (what the launcher starts; the rule writes the JSON). Which of the two,
and torchrun or srun + torchrun: :func:`kdflow.launch.launch_training`.

One module a concern:

* :mod:`.job` – :class:`TrainJob` (what a run is given: its :class:`kdflow.runs.RunSpec` as JSON, the files) and the
  checks of its inputs before anything is loaded.
* :mod:`.trainer` – the loop: :class:`Trainer` (``setup`` / ``train_step`` / ``run`` / ``finish``), which reads the
  job's spec once (``RunSpec.from_json``) and hands the typed spec to everything below.
* :mod:`.distiller` – the prepared student with peft LoRA adapters (base weights frozen) and its loss terms;
  ``loss = Σ w_t · term_t`` (:func:`kdflow.losses.combine`); every term is logged on its own. A NaN/inf term
  stops the run with the step, the batch's documents and the term named (on every rank). fp32 on CPU, bf16
  autocast on GPU (``dtype: bfloat16``); the losses compute in fp32.
* :mod:`.batches` – endless, resumable batches from :class:`kdflow.cache_loader.CacheStream`.
* :mod:`.schedule` – the learning-rate factor per step (warm-up, cosine / linear / constant).
* :mod:`.checkpoint` – checkpoints in ``work`` (outside the rule's declared output, which Snakemake deletes
  when a job fails; ``save`` / ``resume``): every ``checkpoint_every`` steps and when SIGUSR1 or SIGTERM arrives
  (:mod:`.signals`). A rerun with the same job resumes from the newest one; the result is the same as an
  uninterrupted run (bitwise on CPU). A checkpoint of another job (other settings, shards, student or world
  size) is never resumed: it is moved aside and the run starts from step 0 (logged).
* :mod:`.distributed` – the process group (:class:`Dist`, :func:`setup_distributed`, :func:`all_reduce`,
  :func:`gather`).
* :mod:`.outputs` – ``work/metrics.jsonl`` (one JSON line per optimiser step) and the run directory
  ``results/train/<run>/`` (PEFT adapter, projectors, run config, provenance, metrics, summary).
"""

from kdflow.train.batches import Batches, to_device, training_batches
from kdflow.train.checkpoint import CHECKPOINT_PREFIX, trainable_state
from kdflow.train.distiller import Distiller, build_student
from kdflow.train.distributed import Dist, all_reduce, gather, setup_distributed
from kdflow.train.job import RunInputs, TrainingError, TrainJob, read_inputs, training_shards
from kdflow.train.schedule import lr_lambda
from kdflow.train.signals import STOP_SIGNALS, Interrupted
from kdflow.train.trainer import Trainer, run_training

__all__ = [
    "Batches",
    "to_device",
    "training_batches",
    "CHECKPOINT_PREFIX",
    "trainable_state",
    "Distiller",
    "build_student",
    "Dist",
    "all_reduce",
    "gather",
    "setup_distributed",
    "RunInputs",
    "TrainingError",
    "TrainJob",
    "read_inputs",
    "training_shards",
    "lr_lambda",
    "STOP_SIGNALS",
    "Interrupted",
    "Trainer",
    "run_training",
]
