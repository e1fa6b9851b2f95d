#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the CUDA tests, then the autogram benchmark and
# UPGradWeighting timings on the GPU. Expects torch/transformers/accelerate in the Python interpreter
# named by $PYTHON (default: `python3`; e.g. `PYTHON=.venv/bin/python bash benchmarks/run_gpu_checks.sh`);
# extra wheels (quadprog, datasets, torchjd for the comparison) may be given in .whl/. With --skip-real-sizes,
# the BERT-base and GPT-2-small runs (with and without LoRA) are left out.
#
# It exits at once, with a message, when torch sees no CUDA device, and otherwise stops at the first benchmark step
# that fails, with that step's exit status. The CUDA tests and the real-size runs are the exceptions (the figures of
# the other steps are still wanted, and one real size running out of memory must spare the others): a failure there
# is reported, the script goes on, then exits with status 1 at the end.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
real_sizes=1
if [[ "${1:-}" == "--skip-real-sizes" ]]; then
  real_sizes=0
fi
"$PYTHON" - <<'PY'
import sys

try:
    import torch
except ImportError as error:
    sys.exit(f"run_gpu_checks.sh: {sys.executable} cannot import torch ({error}). Set PYTHON to choose the interpreter.")
if not torch.cuda.is_available():
    sys.exit(
        f"run_gpu_checks.sh: torch {torch.__version__} ({sys.executable}) sees no CUDA device "
        f"(built with CUDA: {torch.version.cuda or 'no'}); these checks need one. Set PYTHON to choose the interpreter."
    )
PY
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# (a test failure does not stop the benchmarks, whose figures a short GPU loan still needs: it sets the exit status)
set +e
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/autogram/test_cuda.py tests/trainer/test_cuda_trainer.py \
  "tests/aggregation/test_common.py" -k "cuda" 2>&1 | tail -15
tests_status=${PIPESTATUS[0]}
set -e
if (( tests_status != 0 )); then
  echo "run_gpu_checks.sh: the CUDA tests failed (exit status $tests_status); going on with the benchmarks" >&2
fi
timeout 100 "$PYTHON" benchmarks/bench_autogram.py --device cuda --repeats 20 --warmup 5
# torch's own layers and the vision closed forms on the GPU (cuDNN LSTM, nn.TransformerEncoder, Conv3d and
# ConvTranspose2d patches, padding="valid"), launch-bound at these sizes.
timeout 150 "$PYTHON" benchmarks/bench_architectures.py --device cuda --clock wall --repeats 7 --warmup 3 \
  --models bert-bilstm torch-encoder siglip-pooled videomae dpt swin mixtral
# Real sizes (BERT-base, GPT-2 small): one invocation each, so that one running out of memory spares the other
# (a failure is tolerated here, reported, and turned into the exit status at the end).
failed_real_sizes=()
run_real_size() {
  local label=$1
  shift
  local status=0
  "$@" || status=$?
  if (( status != 0 )); then
    echo "run_gpu_checks.sh: $label failed with exit status $status; going on with the other real sizes" >&2
    failed_real_sizes+=("$label")
  fi
}
for model in bert-base gpt2-small; do
  [[ $real_sizes == 1 ]] || break
  run_real_size "$model" timeout 90 "$PYTHON" benchmarks/bench_autogram.py --device cuda --models "$model" \
    --repeats 10 --warmup 3
done
# The same with LoRA adapters (PEFT) of rank 16 on the attention projections.
for model in bert-base gpt2-small; do
  [[ $real_sizes == 1 ]] || break
  run_real_size "$model + LoRA" timeout 60 "$PYTHON" benchmarks/bench_autogram.py --device cuda --models "$model" \
    --lora 16 --repeats 10 --warmup 3
done
timeout 40 "$PYTHON" - <<'PY'
import statistics, time, torch
from hf_jd.aggregation import UPGradWeighting
weighting = UPGradWeighting()
for m in (32, 128, 256):
    g = torch.randn(m, 4 * m, device="cuda", dtype=torch.float64)
    gramian = g @ g.T
    cpu = weighting(gramian.cpu())
    times = []
    for _ in range(7):
        torch.cuda.synchronize(); start = time.perf_counter()
        weights = weighting(gramian)
        torch.cuda.synchronize(); times.append(time.perf_counter() - start)
    error = ((weights.cpu() - cpu).norm() / cpu.norm()).item()
    print(f"UPGradWeighting m={m} on cuda: {statistics.median(times) * 1e3:.1f} ms (vs CPU answer {error:.1e})")
PY
if (( tests_status != 0 )); then
  echo "run_gpu_checks.sh: the CUDA tests failed (exit status $tests_status)" >&2
fi
if (( ${#failed_real_sizes[@]} > 0 )); then
  echo "run_gpu_checks.sh: real-size runs that failed: ${failed_real_sizes[*]}" >&2
fi
if (( tests_status != 0 || ${#failed_real_sizes[@]} > 0 )); then
  exit 1
fi
