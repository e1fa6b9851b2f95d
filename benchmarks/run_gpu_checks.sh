#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the CUDA tests, then the autogram benchmark and
# UPGradWeighting timings on the GPU. Expects torch/transformers/accelerate in `python3`; extra
# wheels (quadprog, datasets, torchjd for the comparison) may be given in .whl/. With --skip-real-sizes, the
# BERT-base and GPT-2-small runs (with and without LoRA) are left out.
set -uo pipefail
real_sizes=1
[[ "${1:-}" == "--skip-real-sizes" ]] && real_sizes=0
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/autogram/test_cuda.py tests/trainer/test_cuda_trainer.py \
  "tests/aggregation/test_common.py" -k "cuda" 2>&1 | tail -15
timeout 100 python3 benchmarks/bench_autogram.py --device cuda --repeats 20 --warmup 5
# torch's own layers and the vision closed forms on the GPU (cuDNN LSTM, nn.TransformerEncoder, Conv3d and
# ConvTranspose2d patches, padding="valid"), launch-bound at these sizes.
timeout 150 python3 benchmarks/bench_architectures.py --device cuda --clock wall --repeats 7 --warmup 3 \
  --models bert-bilstm torch-encoder siglip-pooled videomae dpt swin mixtral
# Real sizes (BERT-base, GPT-2 small): one invocation each, so that one running out of memory spares the other.
for model in bert-base gpt2-small; do
  [[ $real_sizes == 1 ]] || break
  timeout 90 python3 benchmarks/bench_autogram.py --device cuda --models "$model" --repeats 10 --warmup 3
done
# The same with LoRA adapters (PEFT) of rank 16 on the attention projections.
for model in bert-base gpt2-small; do
  [[ $real_sizes == 1 ]] || break
  timeout 60 python3 benchmarks/bench_autogram.py --device cuda --models "$model" --lora 16 --repeats 10 --warmup 3
done
timeout 40 python3 - <<'PY'
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
