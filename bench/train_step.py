"""What knowledge distillation costs per training step, and whether the cache loader keeps up.

Runs the real training code (``kdflow.train.Trainer``: ``setup()``, then ``train_step()`` calls; nothing is
written, no checkpoints) for four runs of the same student on the same documents, same batch size and
same settings, differing only in their terms:

* ``ce`` = {ce} (the plain fine-tuning baseline), ``rb`` = {ce, rb}, ``fb`` = {ce, fb}, ``relb`` = {ce, relb}
  (weights from the config's ``training.modes`` of the same name when it has those terms, else the schema's
  default modes). ``rb`` reads the logit cache the config's own rb run reads (its ``teacher_logits``, resolved as
  the workflow does: the embedded default's ``topk_k0_s12_sys``, 12 systematic draws and no head; ``rb_logits``
  names it); the other modes read the study's caches.
* A step is what the training loop times: the next batch from the cache stream (reading, decoding and
  collating the caches the run needs), forward, losses, backward, gradient clipping, optimiser and
  scheduler step (``time.perf_counter`` around ``train_step()``; on a GPU synchronised before and after).
* The modes alternate round by round (ce, rb, fb, relb, ce, rb, …: ``--steps`` timed steps of each per
  round, ``--rounds`` rounds, after ``--warmup`` untimed steps of each), so that noise on this shared
  machine hits all modes alike. All runs share seed and shuffle buffer, so step i of every mode sees the
  same documents (checked: ``same_documents``).
* ``kd_step_ratio_<term>`` = median step seconds of the {ce, term} run / median step seconds of the ce
  run, over all timed steps (``*_rounds``: the same per round). Goal: <= ``goal_kd_step_ratio`` = 1.10.
* ``loader_ratio``: documents/s of the cache loader alone (a ``CacheStream`` over the top-k + embed +
  hidden files of the training shards, as the fb/relb runs read them, and ``collate`` into batches of
  ``batch_size``; one full epoch and at least ``--loader-docs`` documents) over the training documents/s
  of the ce run (``batch_size * grad_accum`` / median ce step seconds). Goal: >= ``goal_loader_ratio`` = 10.

Default: the embedded study's prepared first student and its caches, as ``snakemake --cores all`` leaves
them (``config/config.yaml``; settings of one of its training runs). ``--quick``: a tiny random Llama
teacher, a pruned student and their caches built in a temp dir (a smoke test; its figures mean nothing).

    python bench/train_step.py                 # default study, 4 steps x 3 rounds per mode
    python bench/train_step.py --quick         # tiny models, seconds

Prints a table to stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # cache jobs' progress bars in --quick; read when tqdm is imported

import argparse
import copy
import dataclasses
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdflow.cache_loader import CacheStream, ShardCaches, collate
from kdflow.config import load_config, validate_config
from kdflow.corpus import shard_name
from kdflow.models import pad_id_of
from kdflow.plan_caches import logit_name
from kdflow.runs import RunSpec, expand_runs, run_name
from kdflow.train import Trainer, TrainJob
from tiny import quiet_logs

MODES = ("ce", "rb", "fb", "relb")
# The schema's default modes (config/schema.yaml, training.modes), used when the config has no such mode.
DEFAULT_TERMS = {
    "ce": {"ce": 1.0},
    "rb": {"ce": 0.5, "rb": 0.5},
    "fb": {"ce": 1.0, "fb": 1.0},
    "relb": {"ce": 1.0, "relb": 1.0},
}
GOAL_KD_STEP_RATIO = 1.10
GOAL_LOADER_RATIO = 10
ME = "bench/train_step.py"
REPO = Path(__file__).resolve().parents[1]
# --quick's rb run reads a logit cache of its own, as the embedded default's does: no head, systematic draws
QUICK_RB_LOGITS = {"k": 0, "samples": 4, "sampling": "systematic"}


@dataclass
class Study:
    """What the measurement needs: the base run spec, the student, the training shards' caches."""

    config: dict
    spec: RunSpec  # one run of the study (terms, mode, tag and name are replaced per mode)
    student_manifest: Path
    shards: list[dict[str, str]]  # [{"topk", "embed", "hidden"}] per training shard
    quick: bool
    rb: RbLogits  # what the rb mode reads: the logit cache of the config's own rb run


@dataclass
class RbLogits:
    """The logit cache the config's rb run reads (its teacher_logits, resolved as the plan does): the rb mode
    times the study's rb as it is configured, e.g. the embedded default's 12 systematic samples and no head."""

    name: str  # the cache's directory name, e.g. topk_k0_s12_sys
    teacher_logits: Any  # the run's RunSpec.teacher_logits
    files: list[str]  # the training shards' files of that cache
    expected: dict[str, Any]  # the metadata they must carry (as the plan's train_expected)


# --------------------------------------------------------------------------- inputs


def base_spec(config: dict, student: str) -> RunSpec:
    runs, problems = expand_runs(config)
    if problems:
        sys.exit(f"{ME}: the config's training section has problems: {'; '.join(problems)}")
    mine = [s for s in runs.values() if s.student == student]
    if not mine:
        sys.exit(f"{ME}: the config has no training run of student {student!r}; add an experiment for it")
    return next((s for s in mine if s.mode == "ce"), mine[0])


def default_study(config_path: str) -> Study:
    from kdflow.plan import study_plan

    config = load_config(config_path)
    plan = study_plan(config, REPO)  # the cache names and the rb run's logit cache, as the workflow has them
    student_cfg = config["students"][0]
    if student_cfg.get("vocab", "shared") == "own":
        sys.exit(
            f"{ME}: student {student_cfg['name']!r} has vocab: own; rb and fb KD need a student with the "
            f"teacher's vocabulary (list such a student first in students[])"
        )
    names = [f"{shard_name(i)}.parquet" for i in range(config["data"]["n_shards"])]
    shards = [
        {
            "topk": f"{plan.cache_path(plan.topk_name)}/{name}",
            "embed": f"{plan.cache_path('embed')}/{name}",
            "hidden": f"{plan.cache_path(plan.hidden_name)}/{name}",
        }
        for name in names
    ]
    student = student_cfg["name"]
    rb_runs = [s for s in plan.runs.values() if s.student == student and "rb" in s.terms]
    rb_run = next((s for s in rb_runs if s.teacher_logits.source == "cache"), None)
    if rb_run is None:
        sys.exit(f"{ME}: the config has no rb run of student {student!r} that reads a logit cache; add one")
    logits = plan.logits_read(rb_run)
    rb = RbLogits(
        logits,
        rb_run.teacher_logits,
        [f"{plan.cache_path(logits)}/{name}" for name in names],
        plan.train_expected(rb_run.name),
    )
    manifest = Path("resources/models") / student / "kdflow_model.json"
    missing = [p for p in [str(manifest), *(v for s in shards for v in s.values()), *rb.files] if not Path(p).is_file()]
    if missing:
        sys.exit(
            f"{ME}: {len(missing)} input file(s) missing, e.g. {missing[0]}; run `snakemake --cores all` "
            f"first (it prepares the student and builds the teacher caches), or use --quick"
        )
    return Study(config, base_spec(config, student), manifest, shards, quick=False, rb=rb)


def study_inputs(config_path: str | Path, repo: Path = REPO) -> list[str]:
    """The files :func:`default_study` reads, relative to the study's directory ``repo`` (bench/gpu_check.py
    builds them first)."""
    from kdflow.plan import model_manifest, study_plan

    config = load_config(config_path)
    plan = study_plan(config, repo)
    student = config["students"][0]["name"]
    caches = {plan.topk_name, "embed", plan.hidden_name}
    caches |= {plan.logits_read(s) for s in plan.runs.values() if s.student == student and "rb" in s.terms}
    names = [f"{shard_name(i)}.parquet" for i in range(config["data"]["n_shards"])]
    return [model_manifest(student)] + [f"{plan.cache_path(c)}/{n}" for c in sorted(caches) for n in names]


def _quick_texts(offset: int, n: int) -> list[str]:
    return [
        f"def f{i}(x, y):\n    total = x * {i} + y\n    if total > {i}:\n        return total - {i * i}\n"
        f"    return [x, y, {i}]\n"
        for i in range(offset, offset + n)
    ]


def _quick_model_dir(path: Path) -> Path:
    """A random 4-layer, 32-wide Llama with a byte-level BPE tokenizer (as tests/tiny_models.py builds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer(_quick_texts(0, 40))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def quick_study(root: Path) -> Study:
    """Tiny teacher + pruned student + two shards with all three caches, through the real prepare/cache code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdflow.prepare import prepare_student, prepare_teacher
    from kdflow.teacher_pass import CacheJob, capture_hidden, capture_topk

    config = validate_config(
        {
            "teacher": {"name": "tiny-teacher", "source": {"kind": "hf", "path": str(_quick_model_dir(root / "hf"))}},
            "students": [{"name": "tiny-student", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 3]}}],
            "data": {"sources": [{"name": "s", "kind": "python_stdlib"}], "n_shards": 2},
            "prepare": {"device": "cpu", "dtype": "float32", "max_length": 32, "batch_size": 4, "ppl_max_docs": 0},
            "teacher_cache": {
                "k": 4,
                "max_length": 32,
                "batch_size": 8,
                "rows_per_part": 8,
                "device": "cpu",
                "dtype": "float32",
                "hidden_layers": [2],
            },
            "training": {
                "defaults": {
                    "steps": 8,
                    "batch_size": 4,
                    "shuffle_buffer": 16,
                    "optimizer": {"lr": 0.01},
                    "fb": {"layer_map": [{"student": 1, "teacher": 2}]},
                    "lora": {"r": 4, "alpha": 8},
                },
                "experiments": [
                    {"modes": [m for m in MODES if m != "rb"]},
                    {"modes": ["rb"], "set": {"teacher_logits": QUICK_RB_LOGITS}},
                ],
            },
        }
    )
    teacher = root / "models/tiny-teacher/kdflow_model.json"
    prepare_teacher(config["teacher"], config["prepare"], teacher)
    student = root / "models/tiny-student/kdflow_model.json"
    prepare_student(config["students"][0], config["prepare"], teacher, student)
    shards, rb_files = [], []
    for i in range(config["data"]["n_shards"]):
        name = f"{shard_name(i)}.parquet"
        docs = _quick_texts(100 * i, 24)
        shard = root / "shards" / name
        shard.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"doc_id": [f"d{j}" for j in range(len(docs))], "source": ["code"] * len(docs), "text": docs}),
            shard,
        )
        out = {
            "topk": root / "cache/topk" / name,
            "embed": root / "cache/embed" / name,
            "hidden": root / "cache/hidden" / name,
        }
        settings = config["teacher_cache"]
        capture_topk(
            CacheJob("topk", shard, {"topk": out["topk"], "embed": out["embed"]}, root / f".p/t{i}", teacher, settings)
        )
        capture_hidden(CacheJob("hidden", shard, {"hidden": out["hidden"]}, root / f".p/h{i}", teacher, settings))
        rb_settings = {**settings, **QUICK_RB_LOGITS}
        rb_out = {"topk": root / "cache/rb" / name}
        capture_topk(CacheJob("topk", shard, rb_out, root / f".p/r{i}", teacher, rb_settings))
        shards.append({k: str(v) for k, v in out.items()})
        rb_files.append(str(rb_out["topk"]))
    cache = config["teacher_cache"]
    rb_spec = next(s for s in expand_runs(config)[0].values() if s.mode == "rb")
    rb_expected = {
        "teacher": "tiny-teacher",
        "k": QUICK_RB_LOGITS["k"],
        "max_length": cache["max_length"],
        "samples": QUICK_RB_LOGITS["samples"],
        "sample_seed": cache["sample_seed"],
        "sampling": "systematic",
    }
    rb = RbLogits(logit_name(**QUICK_RB_LOGITS), rb_spec.teacher_logits, rb_files, rb_expected)
    return Study(config, base_spec(config, "tiny-student"), student, shards, quick=True, rb=rb)


# --------------------------------------------------------------------------- the runs


def mode_terms(config: dict, mode: str) -> dict[str, float]:
    """The config's mode of that name if it has exactly the terms {ce, mode}, else the schema default."""
    want = set(DEFAULT_TERMS[mode])
    given = {t: float(w) for t, w in ((config.get("training") or {}).get("modes") or {}).get(mode, {}).items() if w > 0}
    return given if set(given) == want else dict(DEFAULT_TERMS[mode])


def expected_for(config: dict, terms: dict) -> dict[str, Any]:
    """Cache metadata the run's files must carry (as rules/common.smk's train_expected)."""
    cache = config["teacher_cache"]
    expected = {"teacher": config["teacher"]["name"], "k": cache["k"], "max_length": cache["max_length"]}
    if "fb" in terms:
        expected["layers"] = sorted(set(cache["hidden_layers"]))
        expected["token_ratio"] = cache["hidden_token_ratio"]
    return expected


class Recorder:
    """Wraps ``Batches.next`` to record which documents each step got."""

    def __init__(self, batches):
        self.inner, self.seen = batches.next, []
        batches.next = self

    def __call__(self):
        batch = self.inner()
        self.seen.append(list(zip(batch["shard"], batch["doc_index"].tolist(), strict=False)))
        return batch


def make_trainers(study: Study, args, tmp: Path) -> dict[str, Trainer]:
    trainers = {}
    for mode in MODES:
        terms = mode_terms(study.config, mode)
        base = study.spec
        spec = dataclasses.replace(
            base, terms=terms, mode=mode, tag="bench", name=run_name(base.student, mode, base.seed, "bench")
        )
        if args.batch_size:
            spec = dataclasses.replace(spec, batch_size=int(args.batch_size))
        if args.device:
            spec = dataclasses.replace(spec, device=args.device)
        shards, expected = copy.deepcopy(study.shards), expected_for(study.config, terms)
        if mode == "rb":  # the config's rb: its own logit cache where it reads one
            spec = dataclasses.replace(spec, teacher_logits=study.rb.teacher_logits)
            shards = [{**s, "topk": f} for s, f in zip(shards, study.rb.files, strict=True)]
            expected = study.rb.expected
        job = TrainJob(
            spec=spec.to_json(),
            student_manifest=str(study.student_manifest),
            shards=shards,
            expected=expected,
            output=str(tmp / "output" / mode),
            work=str(tmp / "work" / mode),
            heldout=None,
            threads=args.threads,
        )
        trainer = Trainer(job)
        trainer.setup()
        trainer.recorder = Recorder(trainer.batches)
        trainers[mode] = trainer
    return trainers


def timed_step(trainer: Trainer) -> tuple[float, dict]:
    cuda = trainer.ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(trainer.ctx.device)
    t0 = time.perf_counter()
    row = trainer.train_step()
    if cuda:
        torch.cuda.synchronize(trainer.ctx.device)
    dt = time.perf_counter() - t0
    trainer.step += 1
    return dt, row


def time_steps(trainers: dict[str, Trainer], args) -> tuple[dict[str, list[list[float]]], dict[str, list[dict]]]:
    """Per mode: seconds of each timed step, per round; and the rows train_step returned."""
    for trainer in trainers.values():
        for _ in range(args.warmup):
            timed_step(trainer)
    seconds = {m: [] for m in trainers}
    rows = {m: [] for m in trainers}
    for r in range(args.rounds):
        for mode, trainer in trainers.items():
            this = []
            for _ in range(args.steps):
                dt, row = timed_step(trainer)
                this.append(dt)
                rows[mode].append(row)
            seconds[mode].append(this)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{m} {statistics.median(seconds[m][-1]):.3f} s" for m in trainers),
            file=sys.stderr,
            flush=True,
        )
    return seconds, rows


def loader_throughput(study: Study, spec: RunSpec, batch_size: int, pad_id: int, min_docs: int) -> dict[str, Any]:
    """Documents/s of CacheStream (top-k + embed + hidden) + collate, over >= one epoch and >= min_docs."""
    shards = [ShardCaches(s["topk"], s["embed"], s["hidden"]) for s in study.shards]
    stream = CacheStream(
        shards,
        expected=expected_for(study.config, {"fb": 1.0}),
        seed=spec.seed,
        shuffle_buffer=spec.shuffle_buffer,
        asked_by=ME,
    )
    target = max(min_docs, stream.num_documents)
    docs = batches = tokens = 0
    examples: list[dict] = []
    epoch = 0
    t0 = time.perf_counter()
    while docs < target:
        stream.set_epoch(epoch)
        for example in stream:
            examples.append(example)
            if len(examples) == batch_size:
                batch = collate(examples, pad_id)
                tokens += int(batch["mask"].sum())
                docs += len(examples)
                batches += 1
                examples = []
                if docs >= target:
                    break
        epoch += 1
    seconds = time.perf_counter() - t0
    return {
        "loader_docs": docs,
        "loader_batches": batches,
        "loader_tokens": tokens,
        "loader_seconds": seconds,
        "loader_docs_per_s": docs / seconds,
        "loader_epochs": epoch,
        "documents": stream.num_documents,
    }


# --------------------------------------------------------------------------- main


def measure(study: Study, args, tmp: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    trainers = make_trainers(study, args, tmp)
    ce = trainers["ce"]
    spec = ce.spec
    print(
        f"{ME}: student {ce.inputs.student.name}, {len(study.shards)} shards, batch {spec.batch_size} x "
        f"accum {spec.grad_accum}, device {ce.ctx.device}, {torch.get_num_threads()} torch threads; "
        f"{args.warmup} warm-up + {args.steps} timed steps per mode per round, {args.rounds} rounds",
        file=sys.stderr,
        flush=True,
    )
    t_start = time.perf_counter()
    seconds, rows = time_steps(trainers, args)
    timing_s = time.perf_counter() - t_start
    seen = {m: t.recorder.seen for m, t in trainers.items()}
    same_documents = all(seen[m] == seen["ce"] for m in MODES)

    pad = pad_id_of(ce.tokenizer)
    loader = loader_throughput(study, spec, spec.batch_size, pad, args.loader_docs)

    med = statistics.median
    flat = {m: [s for r in seconds[m] for s in r] for m in MODES}
    step_s = {m: med(flat[m]) for m in MODES}
    round_s = {m: [med(r) for r in seconds[m]] for m in MODES}
    docs_per_step = spec.batch_size * spec.grad_accum
    train_docs_per_s = docs_per_step / step_s["ce"]
    result: dict[str, Any] = {}
    for m in MODES[1:]:
        result[f"kd_step_ratio_{m}"] = round(step_s[m] / step_s["ce"], 4)
        result[f"kd_step_ratio_{m}_rounds"] = [round(a / b, 4) for a, b in zip(round_s[m], round_s["ce"], strict=False)]
    result.update(
        {
            "loader_ratio": round(loader["loader_docs_per_s"] / train_docs_per_s, 2),
            "goal_kd_step_ratio": GOAL_KD_STEP_RATIO,
            "goal_loader_ratio": GOAL_LOADER_RATIO,
            **{f"step_s_{m}": round(step_s[m], 5) for m in MODES},
            "step_s_rounds": {m: [round(x, 5) for x in round_s[m]] for m in MODES},
            "step_s_min": {m: round(min(flat[m]), 5) for m in MODES},
            "train_docs_per_s": round(train_docs_per_s, 3),
            "train_tokens_per_step": round(statistics.mean(r["tokens"] for r in rows["ce"]), 1),
            "loader_docs_per_s": round(loader["loader_docs_per_s"], 2),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in loader.items() if k != "loader_docs_per_s"},
            "terms": {m: t.spec.terms for m, t in trainers.items()},
            "same_documents": same_documents,
            "batch_size": spec.batch_size,
            "grad_accum": spec.grad_accum,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "timed_steps_per_mode": args.steps * args.rounds,
            "student": ce.inputs.student.name,
            "device": str(ce.ctx.device),
            "dtype": spec.dtype,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gradient_checkpointing": spec.gradient_checkpointing,
            "lora_r": spec.lora.r,
            "k": study.config["teacher_cache"]["k"],
            "rb_logits": study.rb.name,
            "max_length": study.config["teacher_cache"]["max_length"],
            "fb_layer_map": spec.fb.to_json()["layer_map"],
            "timing_s": round(timing_s, 1),
            "quick": study.quick,
        }
    )
    if study.quick:
        result["note"] = "--quick: tiny random models built in a temp dir; the figures are not meaningful"
    return result


def print_table(r: dict[str, Any]) -> None:
    out = sys.stderr
    print(
        f"\n{r['student']} on {r['device']} ({r['torch_threads']} threads), batch {r['batch_size']} x accum "
        f"{r['grad_accum']}, {r['timed_steps_per_mode']} timed steps per mode over {r['rounds']} rounds"
        f"{' [--quick: not meaningful]' if r['quick'] else ''}",
        file=out,
    )
    print(f"{'mode':<6} {'terms':<28} {'median step s':>13} {'ratio to ce':>11}  per round", file=out)
    for m in MODES:
        terms = ", ".join(f"{t} {w:g}" for t, w in r["terms"][m].items())
        ratio = "" if m == "ce" else f"{r[f'kd_step_ratio_{m}']:.3f}"
        rounds = "" if m == "ce" else " ".join(f"{x:.3f}" for x in r[f"kd_step_ratio_{m}_rounds"])
        print(f"{m:<6} {terms:<28} {r[f'step_s_{m}']:>13.4f} {ratio:>11}  {rounds}", file=out)
    print(
        f"goal: kd_step_ratio <= {r['goal_kd_step_ratio']}; same documents in every mode: {r['same_documents']}",
        file=out,
    )
    print(
        f"loader: {r['loader_docs_per_s']:.1f} docs/s ({r['loader_docs']} docs, {r['loader_epochs']} epoch(s) of "
        f"{r['documents']}, top-k + embed + hidden) vs training {r['train_docs_per_s']:.2f} docs/s (ce): "
        f"loader_ratio {r['loader_ratio']:.1f} (goal >= {r['goal_loader_ratio']})\n",
        file=out,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny random models and caches built in a temp dir (smoke test; figures not meaningful)",
    )
    ap.add_argument("--config", default="config/config.yaml", help="the study (default mode)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode per round (default 4; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode before the first round")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of interleaved modes (default 3; --quick 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="documents per micro-batch (default: the run's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default=None, help="training device (default: the run's, e.g. cpu)")
    ap.add_argument(
        "--loader-docs",
        type=int,
        default=200,
        help="the loader reads one epoch and at least this many documents (default 200)",
    )
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 4)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if min(args.steps, args.rounds, args.threads) < 1 or args.warmup < 0:
        ap.error("--steps, --rounds and --threads must be >= 1, --warmup >= 0")
    quiet_logs()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="kdflow-bench-train-"))
    try:
        study = quick_study(tmp / "study") if args.quick else default_study(args.config)
        result = measure(study, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(result)
    bad = [
        k
        for k in ("kd_step_ratio_rb", "kd_step_ratio_fb", "kd_step_ratio_relb", "loader_ratio")
        if not (isinstance(result[k], float) and math.isfinite(result[k]) and result[k] > 0)
    ]
    if bad:
        print(f"{ME}: not positive and finite: {bad}", file=sys.stderr)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
