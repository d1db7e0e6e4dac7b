#!/usr/bin/env bash
# Every GPU measurement of issues 16 and 17 in one go (about 7 minutes on one H100):
#   1. framework tax with the shipped configuration: LSTM/GRU 2x650 at 20x35, char GPT 4x256 at 64x128
#   2. where an LSTM step's host time goes (per-hook profile, device syncs)
#   3. GPT-2 small, lmlab against nanoGPT's bench.py at batch 12 and 32 (two lmlab variants at 12,
#      the faster one at 32), with MFU
#   4. cached generation tokens/s of the 124M model at batch 1 and 16 against plain loops
# Results: $OUT if set (the device tool's output folder), else bench/results. Usage, from the repo root:
#   NANOGPT=../shared/anchors/nanoGPT LMLAB_COMMIT=$(git rev-parse HEAD) bash bench/gpu_suite.sh
# On the device machine (no ../shared, no .git): copy the checkout into an ignored folder and carry it
# with the wheels of ../shared/DEVICE.md:
#   cp -r ../shared/anchors/nanoGPT .nanogpt && echo /.nanogpt/ >> .git/info/exclude
#   NANOGPT=$PWD/.nanogpt LMLAB_COMMIT=<commit> bash bench/gpu_suite.sh          (carry: .whl, .nanogpt)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NANOGPT:?set NANOGPT to a nanoGPT checkout (the folder holding bench.py)}"
export LMLAB_RESULTS_DIR="${OUT:-$PWD/bench/results}" PYTHONUNBUFFERED=1
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then  # the device's python lacks them: ../shared/DEVICE.md
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
start=$SECONDS
stage() { echo; echo "=== $1 (at $((SECONDS - start)) s)"; }

stage "issue 17: recurrent 2x650, batch 20x35, shipped configuration vs plain loop"
python3 bench/throughput.py --preset lstm-medium --preset gru-medium --steps 200 --warmup 20 --repeats 3 \
  --name gpu_recurrent_shipped
stage "issue 17: char GPT 4x256, batch 64x128, shipped configuration vs plain loop"
python3 bench/throughput.py --preset char-gpt --steps 200 --warmup 20 --repeats 3 --name gpu_char_gpt_shipped
stage "issue 17: the same three with the eager step (perf.cuda_graphs=false), for comparison"
python3 bench/throughput.py --preset lstm-medium --preset gru-medium --preset char-gpt --steps 200 --warmup 20 \
  --repeats 3 --cuda-graphs false --name gpu_throughput_graphs_off
stage "issue 17: where an LSTM step's host time goes"
python3 bench/overhead_profile.py --preset lstm-medium --steps 100 --warmup 20 --top 20 \
  --name gpu_overhead_profile_lstm

stage "issue 16: GPT-2 small, lmlab vs nanoGPT's bench.py, same card"
python3 bench/nanogpt_side_by_side.py --nanogpt "$NANOGPT" --batch 12 --batch 32 --winner-only --timeout 240 \
  --variant "compiled=" \
  --variant "eager-step=--cuda-graphs false" \
  --variant "compiled+cudnn+chunked=--attention cudnn --loss-chunk-rows 8192" \
  --name gpu_gpt2_vs_nanogpt

stage "issue 16: generation tokens/s, GPT-2 small, batch 1 and 16"
python3 bench/generation.py --gpt2 --batch 1 --batch 16 --new-tokens 256 --repeats 2 --name gpu_generation_gpt2

stage "done"
ls -l "$LMLAB_RESULTS_DIR"
