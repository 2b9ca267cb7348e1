# Sourced by the GPU scripts (gpu_run.sh, gpu_profile.sh): $OUT, wheels, versions.
# Wheels in .whl/ are installed to /tmp/site first: ml_collections, which the GPU image
# lacks, and flax/optax as pinned in setup.py, used only if they import with the image's
# jax (on 2026-11-26 flax 0.12.8 did not with jax 0.11.2; the image's flax 0.12.10 ran).
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl flax==0.12.8 ml_collections==1.1.0 optax==0.2.8
set -u
OUT=${OUT:-/tmp/ftlib-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  if PYTHONPATH=/tmp/site python3 -c "import jax, ml_collections, optax; from flax import nnx"; then
    export PYTHONPATH=/tmp/site
  else  # the pinned flax does not import with this jax: keep the machine's, add the rest
    mkdir -p /tmp/site2 && cp -r /tmp/site/ml_collections* /tmp/site2/
    export PYTHONPATH=/tmp/site2
  fi
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, torch, transformers, peft
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
