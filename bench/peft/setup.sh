#!/usr/bin/env bash
# Creates the Python venv for the PyTorch + PEFT LoRA baseline (bench/peft/bench_peft.py)
# from PyPI only. torch from PyPI on Linux x86_64 is the CUDA build (a few GB of nvidia
# wheels); it runs on the CPU as is. Override TORCH_SPEC to use another build.
#   bench/peft/setup.sh      # -> $EDGE_LLM_CACHE/venv-peft (default ~/.cache/edge-llm/venv-peft)
set -euo pipefail
CACHE=${EDGE_LLM_CACHE:-$HOME/.cache/edge-llm}
VENV=${PEFT_VENV:-$CACHE/venv-peft}
TORCH_SPEC=${TORCH_SPEC:-torch==2.15.0}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch, transformers, peft, gguf, safetensors" 2>/dev/null; then
  echo "$VENV"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
"$VENV/bin/pip" install -q "$TORCH_SPEC" >&2
"$VENV/bin/pip" install -q "transformers==5.24.0" "peft==0.21.2" gguf safetensors numpy >&2
"$VENV/bin/python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >&2
echo "$VENV"
