"""The GPU check: kdflow's GPU figures from one command on a machine with a GPU, in at most 8 minutes.

    python bench/gpu_check.py                     # everything (~4-8 min); last line one JSON object
    python bench/gpu_check.py --skip study --out gpu_check.json
    python bench/gpu_check.py --cpu-smoke         # no GPU: the same code paths on the CPU, tiny shapes (~1 min)

Run it in the repository root of an installed checkout (``bash install.sh`` with a CUDA build of torch); it
needs no network and no download. Each stage runs in its own process with its own timeout, the whole within
``--budget-s`` (470 s); a stage that fails or times out records its message under ``errors`` and the others
still run. Exit status: 0 when every stage that ran succeeded, 1 when any failed, 2 without a CUDA GPU (it
says so on stderr and prints the JSON object with ``gpu: null``). Put the figures in docs/benchmarks.md
("GPU check") with the GPU model, the driver and the commit.

The stages, in the order they run (names for ``--skip``):

* ``mfu_8b``: a randomly initialised model of Llama-3.1-8B's shape (``transformers.LlamaConfig``: hidden 4096,
  intermediate 14336, 32 layers, 32 heads, 8 key-value heads, vocabulary 128256, rope theta 500000 with the
  llama3 rope scaling; untied LM head; 8.03B parameters; built from the config on the GPU in bfloat16, nothing
  downloaded) over batches of 4 x 2048 random token ids, inference mode, 2 warm-up and 5 timed passes of each
  method, synchronised around every pass. ``capture_tok_s_8b``: tokens/s of what kdflow's top-k capture does
  per batch (``kdflow.teacher_pass.topk_pass``'s ``make_part`` core: the decoder forward, then
  ``kdflow.teacher_pass.topk_of_hidden(hidden, lm_head, k=16)`` over the valid positions, the pooled embedding,
  the results copied to the host in float16); ``bare_tok_s_8b``: a bare ``model(ids, mask).logits``.
  ``mfu_8b`` = capture tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s (``peak_tflops``: H100 SXM
  989, H100 PCIe 756, H100 NVL 835, H200 989, H200 NVL 835, A100 312, L40S 362 TFLOP/s, else ``--peak-tflops``).
  **FLOPs per token = 2 x the weights of every ``nn.Linear``** (the decoder's q, k, v, o, gate, up and down
  projections and the LM head: 7.505e9 weights, 15.01 GFLOP per token; embeddings and norms excluded);
  attention's own score and value products (4 x layers x hidden x (L+1)/2 per token for a causal sequence of
  L) are **not** in ``mfu_8b``; ``mfu_8b_with_attention`` adds them (0.54 GFLOP per token at L = 2048).
* NVML telemetry: ``kdflow.telemetry.Telemetry`` (the sampler every model job of a study runs) samples the
  visible GPUs every ``--nvml-interval`` seconds during the first GPU stage that runs (normally ``mfu_8b``).
  ``nvml_samples``: samples that carry NVML readings of a GPU; with the maximum utilisation, memory in use and
  power seen, and the energy counted, under ``nvml``. No NVML or no sample on a GPU machine is an error.
* ``study``: the default study end to end with ``device: cuda``: this checkout's files (tracked and untracked
  but not ignored, as they are now) copied to a temp dir, ``gpu_check_cuda.yaml`` written there (config/config.yaml
  with every ``device`` key, and teacher_cache, prepare, training.defaults and eval's, set to ``cuda``; dtypes as
  configured), then ``snakemake --cores all --configfile gpu_check_cuda.yaml``. ``default_study_s``: its wall
  seconds; ``study_nvml_samples``: the NVML samples the study's own jobs wrote (results/telemetry).
* ``capture``: ``capture_ratio_cuda``, bench/capture.py's ``capture_ratio`` on CUDA in bfloat16: the embedded
  teacher (SmolLM2-135M-Instruct) over length-sorted batches of the held-out shard (teacher_cache settings of
  the default config: k 16, batch 8, max_length 128), kdflow's capture (the real ``make_part`` of ``topk_pass``
  plus ``PartWriter.write`` of its two part files) against a bare ``model(ids, mask).logits`` forward, batch by
  batch in rotating order, ``torch.cuda.synchronize`` around each, 10 rounds; the median of the per-round
  ratios. It runs in the study's directory; what the study has not made (the prepared teacher, the held-out
  shard) is made first (``snakemake ... resources/models/smollm2-135m-instruct/kdflow_model.json
  results/shards/heldout.parquet``). bench/capture.py itself is not run: it takes its device from the config but
  times without synchronising, so a bare forward's asynchronous kernels would be counted against the next step.
* ``kd_step``: ``kd_step_ratio_cuda``: ``python bench/train_step.py --device cuda --config gpu_check_kd.yaml``
  in the study's directory (the study's student and caches, made first if missing; the study's config with
  ``training.defaults.dtype: bfloat16``, the GPU setting): median rb step seconds / median ce step seconds
  (``kd_step_ratio_rb``; fb and relb too, under ``kd_step``).
* ``tp``: with more than one visible GPU, ``mfu_8b_tp``: the same random 8B model saved once in bfloat16
  (safetensors, 16 GB, in the temp dir) and loaded by ``torchrun --standalone --nproc_per_node=N`` ranks of this
  script (``--tp-worker``) with transformers' tensor parallelism (``from_pretrained(...,
  distributed_config=DistributedConfig(tp_size=N))``, as kdflow.models.load_model does for a tensor-parallel
  teacher; ``tp_plan="auto"`` on a transformers without it); the same capture, MFU over N x peak. N = the visible
  GPUs, or the largest count dividing the 8 key-value heads. One GPU: ``mfu_8b_tp: null`` and a note.

``--cpu-smoke`` runs the same stages on the CPU (GPUs hidden) with tiny shapes: a 2-layer model for
``mfu_8b``/``tp`` (``tp``: 2 gloo ranks), a tiny teacher prepared through ``kdflow.prepare.prepare_teacher`` for
``capture``, ``bench/train_step.py --quick`` for ``kd_step``, and a dry run (``snakemake -n``) of the study; it
catches bugs in the code paths where no GPU is available. Its figures mean nothing (``cpu_smoke: true``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the cache jobs' progress bars; read when tqdm is imported

import argparse
import collections
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ME = "bench/gpu_check.py"
NO_GPU = "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); run this on a machine with one"
STAGES = ("mfu_8b", "study", "capture", "kd_step", "tp")
GPU_STAGES = ("mfu_8b", "capture", "kd_step", "tp")  # the first of these that runs is sampled by NVML
TIMEOUT_S = {"mfu_8b": 150, "study": 300, "capture": 120, "kd_step": 150, "tp": 300}
BUDGET_S = 470  # the 8 minutes, less the start-up and the margin for killing a stage
KEYS = (
    "gpu",
    "gpu_count",
    "capture_ratio_cuda",
    "mfu_8b",
    "mfu_8b_tp",
    "kd_step_ratio_cuda",
    "nvml_samples",
    "default_study_s",
    "capture_tok_s_8b",
    "peak_tflops",
)
# Peak dense (no sparsity) bf16 tensor-core FLOP/s per GPU, from NVIDIA's data sheets; matched in this order
# against torch.cuda.get_device_name (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
LLAMA_8B = {  # Llama-3.1-8B's config.json, weights aside
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}
TINY = {  # --cpu-smoke: the same architecture, tiny
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
TOPK = 16


def log(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- shared by the stages


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def flop_counts(config, seq_len: int) -> dict[str, float]:
    """FLOPs per token of a forward: 2 x the weights of every nn.Linear (counted on an empty meta-device copy),
    and attention's score and value products for a causal sequence of ``seq_len`` (reported apart)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in empty.modules() if isinstance(m, torch.nn.Linear))
    params = sum(p.numel() for p in empty.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 4.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * (seq_len + 1) / 2
    return {"params": params, "linear_weights": linear, "flops_linear": 2.0 * linear, "flops_attention": attn}


def random_llama(shape: dict, device, dtype):
    """A randomly initialised Llama of ``shape``, built in ``dtype`` directly on ``device`` (no fp32 copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
    return model.eval()


def capture_step(model, ids, mask, k: int = TOPK):
    """What kdflow's top-k capture does per batch (kdflow.teacher_pass.topk_pass's make_part, its GPU part): the
    decoder forward, top-k of the valid positions' logits, the pooled embedding, the results on the host."""
    from kdflow.teacher_pass import topk_of_hidden

    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool().to(hidden.device)
    top_ids, top_lp, rest = topk_of_hidden(hidden[valid], model.get_output_embeddings(), k)
    m = valid.unsqueeze(-1).float()
    emb = (hidden.float() * m).sum(1) / m.sum(1)
    return top_ids.cpu(), top_lp.half().cpu(), rest.half().cpu(), emb.half().cpu()


def bare_step(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def time_methods(model, ids, mask, device, warmup: int, rounds: int, barrier=None) -> dict[str, list[float]]:
    """Seconds of each timed pass of ``bare`` and ``capture``, alternating (order rotating) after warm-up."""
    import torch

    methods = {"bare": lambda: bare_step(model, ids, mask), "capture": lambda: capture_step(model, ids, mask)}
    names = list(methods)
    seconds: dict[str, list[float]] = {m: [] for m in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in names:
                methods[m]()
        for r in range(rounds):
            for m in names[r % 2 :] + names[: r % 2]:
                if barrier:
                    barrier()
                seconds[m].append(timed(methods[m], device))
    return seconds


def peak_tflops(gpu_name: str | None, given: float | None, smoke: bool) -> tuple[float | None, str]:
    if given:
        return float(given), "--peak-tflops"
    if smoke:
        return 1.0, "--cpu-smoke: a nominal 1 TFLOP/s (the figure means nothing)"
    for key, tflops in PEAK_BF16_TFLOPS:
        if gpu_name and key.lower() in gpu_name.lower():
            return tflops, f"table ({key})"
    return None, f"no peak bf16 FLOP/s known for {gpu_name!r}; pass --peak-tflops"


def throughput(seconds: dict[str, list[float]], tokens: int, flops: dict[str, float], peak: float | None, n_gpus=1):
    med = statistics.median
    cap_tok_s = tokens / med(seconds["capture"])
    bare_tok_s = tokens / med(seconds["bare"])
    out: dict[str, Any] = {
        "capture_tok_s": round(cap_tok_s, 1),
        "bare_tok_s": round(bare_tok_s, 1),
        "capture_ratio": round(cap_tok_s / bare_tok_s, 4),
        "capture_s": [round(x, 5) for x in seconds["capture"]],
        "bare_s": [round(x, 5) for x in seconds["bare"]],
        "mfu": None,
        "mfu_with_attention": None,
        "mfu_bare": None,
    }
    if peak:
        denom = n_gpus * peak * 1e12
        out["mfu"] = round(cap_tok_s * flops["flops_linear"] / denom, 4)
        out["mfu_with_attention"] = round(cap_tok_s * (flops["flops_linear"] + flops["flops_attention"]) / denom, 4)
        out["mfu_bare"] = round(bare_tok_s * flops["flops_linear"] / denom, 4)
    return out


def run_logged_cmd(cmd: list[str], cwd: Path, log_path: Path, env: dict | None = None) -> tuple[int, float, str]:
    """Run ``cmd`` with its output in ``log_path``; (exit status, wall seconds, the log's last lines)."""
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    dt = time.monotonic() - t0
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-8:]
    return rc, dt, " | ".join(line.strip() for line in tail if line.strip())


def study_env(study: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(study / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def ensure_targets(ctx: dict, targets: list[str], what: str) -> float:
    """Make the study's files a stage needs that the study stage has not (skipped, failed, timed out): snakemake
    for just those targets, with the study's config. Returns the seconds it took (0 when all were there)."""
    study = Path(ctx["study_dir"])
    missing = [t for t in targets if not (study / t).is_file()]
    if not missing:
        return 0.0
    log(f"{what}: making {len(missing)} missing input(s) first, e.g. {missing[0]}")
    snake = [sys.executable, "-m", "snakemake", "--configfile", ctx["config_cuda"]]
    log_path = Path(ctx["work"]) / f"prepare_{what}.log"
    run_logged_cmd([*snake, "--unlock"], study, log_path, study_env(study))
    rc, dt, tail = run_logged_cmd(
        [*snake, "--cores", "all", "--rerun-incomplete", *missing], study, log_path, study_env(study)
    )
    if rc != 0:
        raise RuntimeError(f"snakemake for the {what} inputs exited {rc} after {dt:.0f} s (log {log_path}): {tail}")
    return dt


# --------------------------------------------------------------------------- stage: mfu_8b


def stage_mfu_8b(ctx: dict) -> dict:
    import torch

    smoke = ctx["smoke"]
    device = torch.device("cpu" if smoke else "cuda:0")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = TINY if smoke else LLAMA_8B
    batch, seq = (2, 64) if smoke else (4, 2048)
    warmup, rounds = (1, 2) if smoke else (2, 5)
    t0 = time.monotonic()
    model = random_llama(shape, device, dtype)
    build_s = time.monotonic() - t0
    flops = flop_counts(model.config, seq)
    log(f"mfu_8b: {flops['params'] / 1e9:.3f}B parameters on {device} in {dtype} ({build_s:.1f} s); {batch} x {seq}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    seconds = time_methods(model, ids, mask, device, warmup, rounds)
    peak, peak_source = peak_tflops(ctx["gpu"], ctx["peak_tflops"], smoke)
    t = throughput(seconds, batch * seq, flops, peak)
    log(f"mfu_8b: capture {t['capture_tok_s']:.0f} tok/s, bare {t['bare_tok_s']:.0f} tok/s, MFU {t['mfu']}")
    details = {
        **t,
        "batch": batch,
        "seq_len": seq,
        "warmup": warmup,
        "rounds": rounds,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "build_s": round(build_s, 1),
        "peak_tflops_source": peak_source,
        "flops_per_token_linear": flops["flops_linear"],
        "flops_per_token_attention": round(flops["flops_attention"]),
        "params": flops["params"],
        "linear_weights": flops["linear_weights"],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "max_memory_allocated_gb": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        ),
    }
    out = {
        "result": {
            "mfu_8b": t["mfu"],
            "capture_tok_s_8b": t["capture_tok_s"],
            "bare_tok_s_8b": t["bare_tok_s"],
            "mfu_8b_with_attention": t["mfu_with_attention"],
            "peak_tflops": peak,
        },
        "details": details,
    }
    if peak is None:
        out["error"] = peak_source
    return out


# --------------------------------------------------------------------------- stage: tp


def tp_size_for(n_gpus: int, shape: dict) -> int:
    """The most ranks, at most ``n_gpus``, that divide the attention and key-value heads."""
    heads = math.gcd(shape["num_attention_heads"], shape["num_key_value_heads"])
    return max(n for n in range(1, n_gpus + 1) if heads % n == 0)


def stage_tp(ctx: dict) -> dict:
    import torch

    smoke = ctx["smoke"]
    shape = TINY if smoke else LLAMA_8B
    n_gpus = 2 if smoke else torch.cuda.device_count()
    ranks = tp_size_for(n_gpus, shape)
    notes = []
    if ranks < 2:
        return {"result": {"mfu_8b_tp": None}, "notes": [f"tp: {n_gpus} GPU(s) visible; no tensor parallelism"]}
    if ranks < n_gpus:
        notes.append(f"tp: {ranks} of the {n_gpus} GPUs (the largest count dividing the model's heads)")
    work = Path(ctx["work"])
    model_dir = work / "llama-random"
    t0 = time.monotonic()
    model = random_llama(shape, "cpu" if smoke else "cuda:0", torch.float32 if smoke else torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    if not smoke:
        torch.cuda.empty_cache()
    save_s = time.monotonic() - t0
    log(f"tp: random model saved to {model_dir} ({save_s:.1f} s); {ranks} tensor-parallel ranks")
    result_file = work / "tp_rank0.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        str(Path(__file__).resolve()),
        "--tp-worker",
        "--work",
        str(work),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr).returncode
    if rc != 0 or not result_file.is_file():
        raise RuntimeError(f"torchrun with {ranks} ranks exited {rc} (its ranks' output is above)")
    r = json.loads(result_file.read_text(encoding="utf-8"))
    r["save_s"] = round(save_s, 1)
    r["ranks"] = ranks
    out = {
        "result": {"mfu_8b_tp": r["mfu"], "capture_tok_s_8b_tp": r["capture_tok_s"], "tp_size": ranks},
        "details": r,
        "notes": notes,
    }
    if r["mfu"] is None:
        out["error"] = r["peak_tflops_source"]
    return out


def tp_worker(work: Path) -> None:
    """One torchrun rank: load the saved random model with transformers' tensor parallelism, time the capture."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    ctx = json.loads((work / "ctx.json").read_text(encoding="utf-8"))
    smoke = ctx["smoke"]
    local, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if smoke:
        device, backend = torch.device("cpu"), "gloo"
    else:
        device, backend = torch.device(f"cuda:{local}"), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank = dist.get_rank()
    try:
        try:
            from transformers.distributed import DistributedConfig

            kwargs: dict[str, Any] = {"distributed_config": DistributedConfig(tp_size=world)}
            how = "distributed_config=DistributedConfig(tp_size)"
        except ImportError:
            kwargs, how = {"tp_plan": "auto"}, 'tp_plan="auto"'
        dtype = torch.float32 if smoke else torch.bfloat16
        t0 = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(str(work / "llama-random"), dtype=dtype, **kwargs).eval()
        load_s = time.monotonic() - t0
        shape = TINY if smoke else LLAMA_8B
        batch, seq = (2, 64) if smoke else (4, 2048)
        warmup, rounds = (1, 2) if smoke else (2, 5)
        gen = torch.Generator().manual_seed(0)  # the same ids on every rank
        ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(device)
        mask = torch.ones_like(ids)
        seconds = time_methods(model, ids, mask, device, warmup, rounds, barrier=dist.barrier)
        # a rank's time is the collective's: take the slowest rank's per pass
        for m in seconds:
            t = torch.tensor(seconds[m], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds[m] = t.tolist()
        if rank == 0:
            flops = flop_counts(llama_config(shape), seq)
            peak, peak_source = peak_tflops(ctx["gpu"], ctx["peak_tflops"], smoke)
            r = throughput(seconds, batch * seq, flops, peak, n_gpus=world)
            weight = model.get_decoder().layers[0].mlp.up_proj.weight
            local_shape = list(getattr(weight, "to_local", lambda: weight)().shape)
            r.update(
                {
                    "load_s": round(load_s, 1),
                    "loaded_with": how,
                    "peak_tflops": peak,
                    "peak_tflops_source": peak_source,
                    "world_size": world,
                    "up_proj_local_shape": local_shape,
                    "batch": batch,
                    "seq_len": seq,
                    "rounds": rounds,
                    "device": str(device),
                }
            )
            if local_shape[0] * world != shape["intermediate_size"]:
                r["mfu"] = None
                r["peak_tflops_source"] = f"the model was not split: up_proj is {local_shape} on rank 0"
            (work / "tp_rank0.json").write_text(json.dumps(r, sort_keys=True), encoding="utf-8")
            log(f"tp: {world} ranks, capture {r['capture_tok_s']:.0f} tok/s, MFU {r['mfu']}")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- stage: study


def count_study_telemetry(study: Path) -> dict[str, Any]:
    files = sorted((study / "results" / "telemetry").glob("*/*.jsonl"))
    samples = nvml_files = 0
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "start" and rec.get("nvml"):
                nvml_files += 1
            if rec.get("kind") == "sample" and any(g.get("mem_used_mb") is not None for g in rec.get("gpus") or []):
                samples += 1
    return {"telemetry_files": len(files), "telemetry_files_nvml": nvml_files, "nvml_samples": samples}


def stage_study(ctx: dict) -> dict:
    study = Path(ctx["study_dir"])
    cmd = [sys.executable, "-m", "snakemake", "--cores", "all", "--configfile", ctx["config_cuda"]]
    if ctx["smoke"]:
        cmd.append("-n")  # --cpu-smoke: plan the study with the cuda config, run nothing
    log_path = Path(ctx["work"]) / "study.log"
    log(f"study: {' '.join(cmd[2:])} in {study} (log {log_path})")
    rc, dt, tail = run_logged_cmd(cmd, study, log_path, study_env(study))
    if rc != 0:
        raise RuntimeError(f"snakemake exited {rc} after {dt:.0f} s (log {log_path}): {tail}")
    if ctx["smoke"]:
        return {
            "result": {"default_study_s": None},
            "details": {"dry_run_s": round(dt, 1)},
            "notes": ["study: --cpu-smoke ran a dry run (snakemake -n) of the study with device cuda only"],
        }
    if not (study / "results" / "summary.csv").is_file():
        raise RuntimeError(f"snakemake exited 0 after {dt:.0f} s but left no results/summary.csv (log {log_path})")
    tel = count_study_telemetry(study)
    out: dict[str, Any] = {
        "result": {"default_study_s": round(dt, 1), "study_nvml_samples": tel["nvml_samples"]},
        "details": tel,
    }
    if tel["nvml_samples"] == 0:
        out["error"] = f"the study's jobs wrote no NVML sample ({tel['telemetry_files']} telemetry files)"
    return out


# --------------------------------------------------------------------------- stage: capture


def _tiny_teacher(root: Path) -> tuple[Path, Path, dict]:
    """--cpu-smoke: a random 4-layer Llama with a byte-level BPE tokenizer prepared as a teacher through
    kdflow.prepare.prepare_teacher, a 24-document shard, and validated teacher_cache settings."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdflow.config import validate_config
    from kdflow.prepare import prepare_teacher
    from tiny import byte_bpe_tokenizer

    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}  # piece {i}\n" * (1 + i % 4) for i in range(24)]
    tokenizer = byte_bpe_tokenizer(texts)
    torch.manual_seed(0)
    hf = root / "hf"
    shape = {**TINY, "vocab_size": len(tokenizer) + 3, "num_hidden_layers": 4}
    LlamaForCausalLM(LlamaConfig(**shape)).eval().save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    config = validate_config(
        {
            "teacher": {"name": "tiny-teacher", "source": {"kind": "hf", "path": str(hf)}},
            "students": [{"name": "tiny-student", "source": {"kind": "prune_from_teacher", "keep_layers": [0, 3]}}],
            "data": {"sources": [{"name": "s", "kind": "python_stdlib"}], "n_shards": 1},
            "prepare": {"device": "cpu", "dtype": "float32", "max_length": 32, "batch_size": 4, "ppl_max_docs": 0},
            "teacher_cache": {
                "k": 4,
                "max_length": 48,
                "batch_size": 8,
                "rows_per_part": 8,
                "device": "cpu",
                "dtype": "float32",
                "hidden_layers": [2],
            },
            "training": {"experiments": [{"modes": ["ce"]}]},
        }
    )
    manifest = root / "models/tiny-teacher/kdflow_model.json"
    prepare_teacher(config["teacher"], config["prepare"], manifest)
    shard = root / "shards" / "heldout.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(n)], "source": ["code"] * n, "text": texts}), shard)
    return manifest, shard, dict(config["teacher_cache"])


def stage_capture(ctx: dict) -> dict:
    import numpy as np
    import torch

    from kdflow.cache_format import PartWriter
    from kdflow.cache_job import CacheJob, length_order, pad_batch
    from kdflow.config import load_config
    from kdflow.models import input_device
    from kdflow.teacher_pass import setup_cache_job, topk_pass

    work = Path(ctx["work"])
    prep_s = 0.0
    if ctx["smoke"]:
        manifest, shard, settings = _tiny_teacher(work / "tiny_teacher")
        rounds = 2
    else:
        config = load_config(Path(ctx["study_dir"]) / ctx["config_cuda"])
        manifest = Path("resources/models") / config["teacher"]["name"] / "kdflow_model.json"
        shard = Path("results/shards/heldout.parquet")
        prep_s = ensure_targets(ctx, [str(manifest), str(shard)], "capture")
        os.chdir(ctx["study_dir"])  # the manifest's paths are relative to where the study runs
        settings = {**config["teacher_cache"], "device": "cuda", "dtype": "bfloat16"}
        rounds = 10
    out_dir = work / "capture"
    job = CacheJob(
        kind="topk",
        shard=shard,
        outputs={"topk": out_dir / "unused_topk.parquet", "embed": out_dir / "unused_embed.parquet"},
        partial_dir=out_dir / ".partial",
        teacher_manifest=manifest,
        settings=settings,
    )
    t0 = time.monotonic()
    setup = setup_cache_job(job)
    load_s = time.monotonic() - t0
    model, tok, pad_id = setup.model, setup.tok, setup.pad_id  # by name: TeacherSetup grows fields
    device = input_device(model)
    plan = topk_pass(job, setup)
    writers = {name: PartWriter(schema) for name, schema in plan.schemas.items()}
    bs = settings["batch_size"]
    order = length_order(tok)
    batches = [order[s : s + bs] for s in range(0, len(order), bs)]
    if len(batches) > 1 and len(batches[-1]) < bs:
        batches.pop()  # as bench/capture.py: a last, partial batch would weigh its few documents too much
    tokens = int(sum(len(tok.ids[i]) for b in batches for i in b))
    log(
        f"capture: {model.config.num_hidden_layers}-layer teacher on {device} in {settings['dtype']}, "
        f"{len(batches)} batches x <= {bs} documents x <= {settings['max_length']} tokens ({tokens} tokens), "
        f"{rounds} rounds"
    )
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)

    def run(method: str, index: np.ndarray, tag: str) -> float:
        if method == "capture":  # the per-batch work of capture_topk: make_part + writing its part files

            def work_fn():
                cols = plan.make_part(index)
                for name, c in cols.items():
                    writers[name].write(parts / f"{name}_{tag}.parquet", c, plan.metas[name])

            return timed(work_fn, device)
        ids, mask = pad_batch(tok, index, pad_id, device)
        return timed(lambda: model(input_ids=ids, attention_mask=mask).logits, device)

    methods = ("bare", "capture")
    seconds = {m: [0.0] * rounds for m in methods}
    with torch.inference_mode():
        for m in methods:  # warm-up, untimed
            for j, b in enumerate(batches):
                run(m, b, f"w{j}")
        for r in range(rounds):
            for j, index in enumerate(batches):
                shift = (r * len(batches) + j) % 2
                for m in methods[shift:] + methods[:shift]:
                    seconds[m][r] += run(m, index, f"r{r}b{j}")
    shutil.rmtree(out_dir, ignore_errors=True)
    ratios = [b / c for b, c in zip(seconds["bare"], seconds["capture"], strict=True)]
    med = statistics.median
    ratio = round(med(ratios), 4)
    log(f"capture: capture_ratio {ratio} (rounds {', '.join(f'{x:.3f}' for x in ratios)})")
    return {
        "result": {"capture_ratio_cuda": ratio},
        "details": {
            "capture_ratio_rounds": [round(x, 4) for x in ratios],
            "capture_tokens_per_s": round(tokens / med(seconds["capture"]), 1),
            "bare_tokens_per_s": round(tokens / med(seconds["bare"]), 1),
            "tokens": tokens,
            "batches": len(batches),
            "batch_size": bs,
            "max_length": settings["max_length"],
            "k": settings["k"],
            "rounds": rounds,
            "device": str(device),
            "dtype": settings["dtype"],
            "teacher_load_s": round(load_s, 1),
            "prepare_s": round(prep_s, 1),
        },
    }


# --------------------------------------------------------------------------- stage: kd_step


def stage_kd_step(ctx: dict) -> dict:
    prep_s = 0.0
    if ctx["smoke"]:
        script, cwd, env = REPO / "bench" / "train_step.py", REPO, None
        flags = ["--quick", "--steps", "1", "--rounds", "1", "--warmup", "0", "--loader-docs", "8", "--threads", "1"]
    else:
        from train_step import study_inputs

        study = Path(ctx["study_dir"])
        # the student and the caches bench/train_step.py reads: the study's, and the logit cache of its rb run
        prep_s = ensure_targets(ctx, study_inputs(study / ctx["config_cuda"], study), "kd_step")
        script, cwd, env = study / "bench" / "train_step.py", study, study_env(study)
        threads = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        flags = ["--config", ctx["config_kd"], "--device", "cuda", "--threads", threads]
    cmd = [sys.executable, str(script), *flags]
    log(f"kd_step: {' '.join(cmd[1:])} in {cwd}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench/train_step.py exited {proc.returncode}: {' | '.join(lines[-3:])}")
    r = json.loads(lines[-1])
    keep = (
        "kd_step_ratio_rb",
        "kd_step_ratio_fb",
        "kd_step_ratio_relb",
        "kd_step_ratio_rb_rounds",
        "step_s_ce",
        "step_s_rb",
        "loader_ratio",
        "train_tokens_per_step",
        "batch_size",
        "device",
        "dtype",
        "student",
        "timed_steps_per_mode",
        "same_documents",
        "quick",
    )
    return {
        "result": {"kd_step_ratio_cuda": r["kd_step_ratio_rb"]},
        "details": {**{k: r.get(k) for k in keep}, "prepare_s": round(prep_s, 1)},
    }


STAGE_FUNCS = {
    "mfu_8b": stage_mfu_8b,
    "study": stage_study,
    "capture": stage_capture,
    "kd_step": stage_kd_step,
    "tp": stage_tp,
}


def stage_worker(stage: str, work: Path) -> int:
    """One stage in this process (started by the orchestrator): its outcome goes to ``<work>/<stage>.json``."""
    import logging
    import traceback

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    ctx = json.loads((work / "ctx.json").read_text(encoding="utf-8"))
    try:
        out = STAGE_FUNCS[stage](ctx)
    except BaseException as e:  # the stage's error, whatever it is, is the outcome
        traceback.print_exc()
        out = {"result": {}, "error": f"{type(e).__name__}: {e}"}
    (work / f"{stage}.json").write_text(json.dumps(out, sort_keys=True, default=str), encoding="utf-8")
    return 1 if out.get("error") else 0


# --------------------------------------------------------------------------- the orchestrator


def copy_checkout(dest: Path) -> int:
    """This checkout's files as they are now (tracked and untracked-but-not-ignored) under ``dest``; without git
    (a copy with no .git), the tree less what a study writes (results/, resources/models/) and caches."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ).stdout.split(b"\0")
        names = [os.fsdecode(raw) for raw in listed if raw]
    except (OSError, subprocess.CalledProcessError):
        skip_top = {".git", ".snakemake", ".pytest_cache", ".ruff_cache", "results", "study_cpu", "build"}
        names = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file()
            and p.relative_to(REPO).parts[0] not in skip_top
            and "__pycache__" not in p.parts
            and p.relative_to(REPO).parts[:2] != ("resources", "models")
        ]
    n = 0
    for rel in names:
        src = REPO / rel
        if src.is_file():  # deleted files are still listed
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
            n += 1
    return n


def cuda_configs(study: Path) -> tuple[str, str, list[str]]:
    """Write the study's two configs: the default with every device cuda, and that with bf16 training."""
    import yaml

    config = yaml.safe_load((study / "config" / "config.yaml").read_text(encoding="utf-8"))
    changed: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "device" and not isinstance(v, (dict, list)):
                    node[k] = "cuda"
                    changed.append(f"{where}{k}")
                else:
                    walk(v, f"{where}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}{i}.")

    walk(config, "")
    for section in ("teacher_cache", "prepare", "training.defaults", "eval"):
        node = config
        for part in section.split("."):
            node = node.setdefault(part, {})
        if node.get("device") != "cuda":
            node["device"] = "cuda"
            changed.append(f"{section}.device")
    head = "# written by bench/gpu_check.py: config/config.yaml with every device key set to cuda\n"
    (study / "gpu_check_cuda.yaml").write_text(head + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    config["training"]["defaults"]["dtype"] = "bfloat16"
    head = "# written by bench/gpu_check.py: gpu_check_cuda.yaml with bf16 training (bench/train_step.py)\n"
    (study / "gpu_check_kd.yaml").write_text(head + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return "gpu_check_cuda.yaml", "gpu_check_kd.yaml", sorted(set(changed))


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: str, work: Path, timeout: float, smoke: bool) -> dict:
    """Run one stage as a child process (its own process group, killed whole at ``timeout``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --cpu-smoke: the CPU even where there is a GPU
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--work", str(work)]
    (work / f"{stage}.json").unlink(missing_ok=True)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    tail: collections.deque[str] = collections.deque(maxlen=6)

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            tail.append(line)
            print(f"  [{stage}] {line}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        reader.join(timeout=5)
        return {"result": {}, "error": f"timed out after {timeout:.0f} s (killed)"}
    reader.join(timeout=5)
    try:
        return json.loads((work / f"{stage}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"result": {}, "error": f"exited {rc} without an outcome: {' | '.join(tail)}"}


def nvml_summary(path: Path) -> dict[str, Any]:
    """What the Telemetry file of the sampled stage holds: NVML or not, and the samples with GPU readings."""
    start, end, samples = {}, {}, []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        rec = json.loads(line)
        if rec["kind"] == "start":
            start = rec
        elif rec["kind"] == "end":
            end = rec
        else:
            samples.append(rec)
    gpu = [g for s in samples for g in s.get("gpus") or [] if g.get("mem_used_mb") is not None]

    def top(field: str) -> float | None:
        values = [g[field] for g in gpu if g.get(field) is not None]
        return round(max(values), 1) if values else None

    return {
        "nvml": bool(start.get("nvml")),
        "nvml_error": start.get("nvml_error"),
        "gpus": [g.get("name") for g in start.get("gpus") or []],
        "samples": len(samples),
        "gpu_readings": len(gpu),
        "nvml_samples": sum(1 for s in samples if any(g.get("mem_used_mb") is not None for g in s.get("gpus") or [])),
        "max_util_gpu": top("util_gpu"),
        "max_mem_used_mb": top("mem_used_mb"),
        "max_power_w": top("power_w"),
        "energy_j": None if end.get("energy_j") is None else round(end["energy_j"], 1),
        "elapsed_s": None if end.get("elapsed_s") is None else round(end["elapsed_s"], 1),
        "interval_s": start.get("interval_s"),
    }


def sampled_stage(stage, work: Path, timeout: float, smoke: bool, interval_s: float, result, errors, notes) -> dict:
    """``run_stage`` inside kdflow's telemetry sampler (NVML sees every process's use of the GPUs)."""
    from kdflow.telemetry import Telemetry

    tel_path = work / "telemetry.jsonl"
    with Telemetry(tel_path, rule="gpu_check", job=stage, interval_s=interval_s):
        out = run_stage(stage, work, timeout, smoke)
    nvml = nvml_summary(tel_path)
    nvml["stage"] = stage
    result["nvml_samples"] = nvml["nvml_samples"]
    result["stages"]["nvml"] = nvml
    if smoke:
        notes.append(f"nvml: --cpu-smoke: {nvml['samples']} samples, NVML {nvml['nvml_error'] or 'on'}")
    elif not nvml["nvml"]:
        errors["nvml"] = f"no NVML on a GPU machine: {nvml['nvml_error']}"
    elif nvml["nvml_samples"] == 0:
        errors["nvml"] = f"NVML opened but no sample carries a GPU reading ({nvml['samples']} samples)"
    return out


def emit(result: dict, out: str | None) -> None:
    line = json.dumps(result, sort_keys=True, default=str)
    if out:
        Path(out).write_text(line + "\n", encoding="utf-8")
    print(line, flush=True)


def orchestrate(args) -> int:
    t_start = time.monotonic()
    smoke = args.cpu_smoke
    result: dict[str, Any] = {k: None for k in KEYS}
    errors: dict[str, str] = {}
    notes: list[str] = []
    stages_out: dict[str, Any] = {}
    result.update({"errors": errors, "notes": notes, "stages": stages_out, "cpu_smoke": smoke})

    import torch

    result["torch"] = torch.__version__
    if not smoke and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        result["error"] = NO_GPU
        result["gpu_count"] = 0
        emit(result, args.out)
        return 2
    if torch.cuda.is_available() and not smoke:
        result["gpu"] = torch.cuda.get_device_name(0)
        result["gpu_count"] = torch.cuda.device_count()
        result["cuda"] = torch.version.cuda
    else:
        result["gpu_count"] = 0
        result["warning"] = "--cpu-smoke: tiny shapes on the CPU; every figure is meaningless (the code paths ran)"
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        result["commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass

    work = Path(tempfile.mkdtemp(prefix="kdflow-gpu-check-", dir=args.work_dir))
    study = work / "study"
    log(f"{result['gpu'] or 'CPU (--cpu-smoke)'} x {result['gpu_count']}; work dir {work}; budget {args.budget_s} s")
    to_run = [s for s in STAGES if s not in args.skip]
    notes.extend(f"{s}: skipped (--skip)" for s in STAGES if s in args.skip)
    try:
        config_cuda = config_kd = None
        try:
            n_files = copy_checkout(study)
            config_cuda, config_kd, changed = cuda_configs(study)
            notes.append(f"study config {config_cuda}: {', '.join(changed)} set to cuda")
            log(f"copied {n_files} files of this checkout to {study}; {config_cuda}: {', '.join(changed)} = cuda")
        except Exception as e:  # the stages that need the study's copy cannot run; the others can
            errors["setup"] = f"copying the checkout or writing the cuda config: {type(e).__name__}: {e}"
            log(errors["setup"])
            to_run = [s for s in to_run if s not in ("study", "capture", "kd_step")]
        ctx = {
            "repo": str(REPO),
            "work": str(work),
            "study_dir": str(study),
            "config_cuda": config_cuda,
            "config_kd": config_kd,
            "smoke": smoke,
            "gpu": result["gpu"],
            "gpu_count": result["gpu_count"],
            "peak_tflops": args.peak_tflops,
        }
        (work / "ctx.json").write_text(json.dumps(ctx, sort_keys=True), encoding="utf-8")
        sampled = next((s for s in to_run if s in GPU_STAGES and not (s == "tp" and not smoke)), None)
        if "tp" in to_run and not smoke and result["gpu_count"] < 2:
            to_run.remove("tp")
            notes.append(f"mfu_8b_tp: null: {result['gpu_count']} GPU visible, tensor parallelism needs at least two")
        for i, stage in enumerate(to_run, 1):
            left = args.budget_s - (time.monotonic() - t_start)
            timeout = min(args.timeout_per_stage or TIMEOUT_S[stage], left - 10)
            if timeout < 20:
                errors[stage] = f"not run: the {args.budget_s} s budget was spent ({left:.0f} s left)"
                log(f"[{i}/{len(to_run)}] {stage}: {errors[stage]}")
                continue
            log(f"[{i}/{len(to_run)}] {stage}: running (timeout {timeout:.0f} s)")
            t0 = time.monotonic()
            try:
                if stage == sampled:
                    out = sampled_stage(stage, work, timeout, smoke, args.nvml_interval, result, errors, notes)
                else:
                    out = run_stage(stage, work, timeout, smoke)
            except Exception as e:  # a bug here, not in the stage: still report the others
                out = {"result": {}, "error": f"{ME} itself failed running the stage: {type(e).__name__}: {e}"}
            dt = time.monotonic() - t0
            result.update(out.get("result") or {})
            stages_out[stage] = {**(out.get("details") or {}), "wall_s": round(dt, 1)}
            notes.extend(out.get("notes") or [])
            if out.get("error"):
                errors[stage] = out["error"]
                log(f"[{i}/{len(to_run)}] {stage}: FAILED after {dt:.1f} s: {out['error']}")
            else:
                log(f"[{i}/{len(to_run)}] {stage}: done in {dt:.1f} s")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.monotonic() - t_start, 1)
    result["budget_s"] = args.budget_s
    log(f"{len(errors)} stage(s) failed: {', '.join(errors)}" if errors else "every stage that ran succeeded")
    emit(result, args.out)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", action="append", default=[], choices=STAGES, help="a stage not to run (repeatable)")
    ap.add_argument(
        "--timeout-per-stage",
        type=float,
        default=None,
        help=f"seconds each stage may take (default per stage: {TIMEOUT_S}); the budget still bounds the whole",
    )
    ap.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help=f"seconds for all stages together (default {BUDGET_S})"
    )
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of one GPU (MFU)")
    ap.add_argument("--nvml-interval", type=float, default=0.5, help="telemetry sampling interval, seconds")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="the stages' code paths on the CPU, tiny shapes (figures meaningless)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp work dir (the study copy, logs)")
    ap.add_argument("--work-dir", default=None, help="where the temp work dir goes (default: the system's temp dir)")
    ap.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)  # internal: one stage
    ap.add_argument("--tp-worker", action="store_true", help=argparse.SUPPRESS)  # internal: one torchrun rank
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))  # this checkout's package, whichever kdflow is installed
    if args.tp_worker:
        tp_worker(Path(args.work))
        return 0
    if args.stage:
        return stage_worker(args.stage, Path(args.work))
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
