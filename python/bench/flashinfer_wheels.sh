#!/usr/bin/env bash
# FlashInfer for the GPU machine (no network there): fetches the wheels into .whl/ and, with --aot,
# builds a `flashinfer_jit_cache` wheel holding FlashInfer's own JIT modules compiled here for
# sm_90a with nvcc 13.0 (from PyPI), so the benchmark needs no nvcc/ninja run on the GPU machine.
#
#   python/bench/flashinfer_wheels.sh          # flashinfer-python + apache-tvm-ffi (17.5 MB)
#   python/bench/flashinfer_wheels.sh --aot    # + flashinfer_jit_cache-0.6.13+sm90a.cu130 (3.3 MB);
#                                              #   needs Python 3.12 here (PY312=...) and ~5 GB
#                                              #   for a scratch venv (torch 2.11 cu130 + nvcc 13.0)
#
# Why this set: flashinfer-python 0.6.13 (14 MB; 0.7.x is 34-62 MB) imports only torch, tvm_ffi,
# jinja2, filelock, packaging, pynvml, requests, tqdm at `import flashinfer`; all but tvm_ffi are
# on the GPU machine. nvidia-cutlass-dsl, nvidia-cudnn-frontend, cuda-tile, nccl4py are imported
# lazily (CuTe-DSL / cuDNN / Blackwell paths), not by BatchDecodeWithPagedKVCacheWrapper.
# flashinfer-cubin (458 MB) holds trtllm-gen/xqa cubins, not the FA2 decode kernels: not needed.
# On the GPU machine: pip install --target /tmp/site .whl/*.whl, PYTHONPATH=/tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."
FI_VER=0.6.13
TVM_FFI_VER=0.1.15.post2
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d .whl "flashinfer-python==$FI_VER" "apache-tvm-ffi==$TVM_FFI_VER"

if [[ "${1:-}" == "--aot" ]]; then
  PY312="${PY312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python3)}"
  WORK="${WORK:-/tmp/fi-aot}"
  VENV="${VENV:-$WORK/venv}"
  mkdir -p "$WORK"
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY312" -m venv "$VENV"
  fi
  # torch as on the GPU machine; nvcc/crt/nvvm pinned together (a newer nvvm emits PTX that
  # ptxas 13.0 rejects); the rest are flashinfer's import-time deps that the GPU machine has.
  "$VENV/bin/python" -m pip install -q torch==2.11.0 "nvidia-cuda-nvcc==13.0.88" \
    "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" ninja requests tqdm nvidia-ml-py \
    packaging einops click tabulate
  SITE="$WORK/site"
  rm -rf "$SITE"
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    ".whl/flashinfer_python-$FI_VER-py3-none-any.whl" .whl/apache_tvm_ffi-"$TVM_FFI_VER"-*.whl
  # A CUDA_HOME from the pip pieces: lib64 (flashinfer links -L$cuda_home/lib64 -lcudart) and a
  # symbol-less libcuda stub (SONAME libcuda.so.1) for -lcuda.
  CU="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
  mkdir -p "$CU/lib64/stubs"
  for f in "$CU"/lib/*; do ln -sf "../lib/$(basename "$f")" "$CU/lib64/"; done
  ln -sf libcudart.so.13 "$CU/lib64/libcudart.so"
  echo 'void __pagedattn_cuda_stub(void){}' > "$WORK/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib64/stubs/libcuda.so" "$WORK/stub.c"
  rm -rf "$WORK/ws"
  # Compile (not load: no GPU here) exactly the modules BatchDecodeWithPagedKVCacheWrapper.plan()
  # asks for: decode (use_tensor_cores=False) and fa2 prefill (use_tensor_cores=True), f16 and bf16,
  # int32 indptr, head 128, no RoPE / window / soft-cap.
  env PATH="$CU/bin:$VENV/bin:$PATH" CUDA_HOME="$CU" PYTHONPATH="$SITE" \
      FLASHINFER_WORKSPACE_BASE="$WORK/ws" FLASHINFER_CUDA_ARCH_LIST=9.0 \
      "$VENV/bin/python" - <<'PY'
import time, torch
from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module
for dt in (torch.float16, torch.bfloat16):
    for spec in (gen_batch_decode_module(dt, dt, dt, torch.int32, 128, 128, 0, False, False),
                 gen_batch_prefill_module("fa2", dt, dt, dt, torch.int32, 128, 128, 0,
                                          False, False, False)):
        t = time.time()
        spec.build(verbose=False)
        print(f"built {spec.name} in {time.time() - t:.0f} s", flush=True)
PY
  "$VENV/bin/python" - "$WORK/ws/.cache/flashinfer/$FI_VER/90a/cached_ops" "$FI_VER" sm90a.cu130 .whl <<'PY'
# Package the built modules as `flashinfer_jit_cache` (the package flashinfer's jit/env.py looks up:
# it needs __version__ starting with flashinfer's version and get_jit_cache_dir(); a module found
# there at <dir>/<uri>/<uri>.so is loaded instead of compiled).
import base64, hashlib, pathlib, sys, zipfile
src, fi_ver, tag, out = sys.argv[1:5]
version, name, wheel_tag = f"{fi_ver}+{tag}", "flashinfer_jit_cache", "py3-none-linux_x86_64"
files = {f"{name}/__init__.py": (
    '"""FlashInfer modules compiled locally by flashinfer\'s own JIT (nvcc 13.0, sm_90a) for\n'
    f'flashinfer-python {fi_ver}. Not the upstream flashinfer-jit-cache: only the modules in\n'
    'jit_cache/ are here; flashinfer still JIT-compiles any other."""\nimport pathlib\n\n'
    f"__version__ = {version!r}\n\n\ndef get_jit_cache_dir() -> str:\n"
    "    return str(pathlib.Path(__file__).resolve().parent / 'jit_cache')\n").encode()}
for d in sorted(pathlib.Path(src).iterdir()):
    so = d / f"{d.name}.so"
    if so.is_file():
        files[f"{name}/jit_cache/{d.name}/{d.name}.so"] = so.read_bytes()
di = f"{name}-{version}.dist-info"
files[f"{di}/METADATA"] = (f"Metadata-Version: 2.1\nName: flashinfer-jit-cache\nVersion: {version}\n"
                           "Summary: locally built FlashInfer modules (sm_90a, CUDA 13.0)\n").encode()
files[f"{di}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: flashinfer_wheels.sh\n"
                        f"Root-Is-Purelib: false\nTag: {wheel_tag}\n").encode()
files[f"{di}/top_level.txt"] = f"{name}\n".encode()
rec = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
       for p, b in files.items()] + [f"{di}/RECORD,,"]
files[f"{di}/RECORD"] = ("\n".join(rec) + "\n").encode()
whl = pathlib.Path(out) / f"{name}-{version}-{wheel_tag}.whl"
with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
    for p, b in files.items():
        zi = zipfile.ZipInfo(p, date_time=(2026, 1, 1, 0, 0, 0))
        zi.compress_type = zipfile.ZIP_DEFLATED
        zi.external_attr = (0o755 if p.endswith(".so") else 0o644) << 16
        z.writestr(zi, b)
print(whl, whl.stat().st_size, "bytes,", sum(p.endswith(".so") for p in files), "modules")
PY
fi
ls -la .whl
