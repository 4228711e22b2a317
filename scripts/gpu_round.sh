#!/usr/bin/env bash
# One device call: kernel benchmark (autotune + Mosaic FA3 reference) then calibration timing with the kernel;
# or the end-to-end run (e2e), or the multi-GPU scaling run (scale: data / heads / seq rows, NVLink multicast off).
# or the memory check (memory: the Mosaic kernel at FLUX 2048², then the plan sampler's peak vs its bound).
# Usage on the device: bash scripts/gpu_round.sh [kernel|mosaic|calib|all|e2e|scale|memory]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} DFA2_ARROW_TUNE_CACHE=${OUT:-/tmp}/arrow_tune.json
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
if [[ $what == kernel || $what == all ]]; then
  timeout ${KERNEL_TIMEOUT:-330} python3 scripts/bench_arrow.py --tune --mgpu ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench_arrow.log
fi
if [[ $what == mosaic ]]; then  # Triton and Mosaic GPU kernels side by side with cuDNN
  timeout ${KERNEL_TIMEOUT:-520} python3 scripts/bench_arrow.py --backends triton,mosaic \
    --mosaic-configs ${MOSAIC_CONFIGS:-64/128/2,64/64/3,64/128/3} ${BENCH_ARGS:-} 2>&1 | tee $OUT/bench_mosaic.log
fi
if [[ $what == calib || $what == all ]]; then
  DFA2_ARROW_IMPL=pallas timeout ${CALIB_TIMEOUT:-250} python3 scripts/bench_calibrate.py 2>&1 | tee $OUT/calib.log
fi
if [[ $what == e2e ]]; then  # E2E_KERNEL_CHECK=0 skips the kernel check (done by 'memory' in the same session)
  [[ ${E2E_KERNEL_CHECK:-1} == 0 ]] || timeout 100 python3 scripts/bench_arrow.py --shapes FLUX-2048 2>&1 | tee $OUT/bench_arrow_flux.log
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
  timeout ${E2E_TIMEOUT:-420} python3 scripts/bench_e2e.py --cases ${E2E_CASES:-flux-2048} --out $OUT \
    --budget-s ${E2E_BUDGET:-400} 2>&1 | tee $OUT/e2e.log
fi
if [[ $what == memory ]]; then
  timeout ${KERNEL_TIMEOUT:-150} python3 scripts/bench_arrow.py --backends triton,mosaic --shapes FLUX-2048 \
    2>&1 | tee $OUT/bench_arrow_flux.log
  timeout ${MEMORY_TIMEOUT:-330} python3 scripts/bench_memory.py --res 2048 --steps 28 2>&1 | tee $OUT/memory.log
fi
if [[ $what == scale ]]; then
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  timeout ${SCALE_TIMEOUT:-560} python3 scripts/bench_scale.py --res 2048 --steps 28 --runs 1 \
    --modes ${SCALE_MODES:-seq,heads,data} --budget-s ${SCALE_BUDGET:-540} ${SCALE_ARGS:-} --out $OUT \
    2>&1 | tee $OUT/scale.log | grep -v "^ROW\|^META"
fi
