#!/usr/bin/env bash
# Packs the Python binding for the GPU machine: the wheel (sm_90 kernels only, for a small, fast
# build; `PAGEDATTN_ARCHS=` for all) into gpu-py/, plus a run script. The tests and the benchmark
# travel with the working tree (python/tests, python/bench); FlashInfer's wheels, if downloaded into
# .whl/ (see python/bench/bench_ops.py), are carried separately.
#
#   scripts/gpu-py.sh && run: `bash gpu-py/run.sh test` (carry gpu-py, and .whl for the benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu-py && rm -f gpu-py/*.whl
(cd python && PAGEDATTN_ARCHS="${PAGEDATTN_ARCHS-sm_90}" maturin build --release --out ../gpu-py)
cat > gpu-py/run.sh <<'RUN'
#!/usr/bin/env bash
# On the GPU machine, from the repository root: install the wheel (and FlashInfer's, if carried) into
# /tmp/site, then `test` (pytest), `bench` (python/bench/bench_ops.py; extra arguments pass through).
set -uo pipefail
what="${1:-test}"; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu-py/*.whl || exit 1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p "${OUT:-/tmp/out}"
case "$what" in
  test) python3 -m pytest -q -rs python/tests "$@" 2>&1 | tee "${OUT:-/tmp/out}/pytest.log" ;;
  bench) python3 python/bench/bench_ops.py --out "${OUT:-/tmp/out}/bench.json" "$@" 2>&1 | tee "${OUT:-/tmp/out}/bench.log" ;;
  *) echo "usage: run.sh test|bench [args]"; exit 2 ;;
esac
RUN
ls -la gpu-py
