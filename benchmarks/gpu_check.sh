#!/usr/bin/env bash
# One-shot GPU check of the routing kernels (issue 6), for a lent H100/H200 with no network.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Steps (each under `timeout`, < 8 minutes in all):
#   1. find a Python with CUDA torch + triton (nothing can be installed without a network: report, exit 2)
#   2. tests/test_kernels.py on CUDA tensors, compiled (no TRITON_INTERPRET), incl. the autotuned kernel
#   3. benchmarks/routing_scale.py from 16K up to 100M tokens (as far as device memory allows)
# Everything lands in $OUT: env.txt, nvidia-smi.txt, test_kernels.log, routing_scale.log/.json, summary.txt.
set -u
OUT=${OUT:-$(pwd)/gpu_check_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
REPO=$(pwd)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

PY=""
for cand in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if timeout 60 "$cand" -c "import torch, triton; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        PY=$cand; break
    fi
done
if [ -z "$PY" ]; then
    summary "FAIL: no Python with CUDA torch + triton found (tried \$PYTHON, .venv, python3, python); nothing can be installed offline"
    { for c in python3 python; do command -v $c && timeout 30 $c -c "import sys; print(sys.version)
try:
    import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())
except Exception as e: print('torch:', e)
try:
    import triton; print('triton', triton.__version__)
except Exception as e: print('triton:', e)"; done; } > "$OUT/env.txt" 2>&1
    exit 2
fi

# msa_plugins/__init__ pulls in the whole engine (transformers, ...); the kernels need only torch + triton.
# A shim package that maps msa_plugins.kernels to kernels/ keeps this check independent of those.
SHIM=$(mktemp -d)
mkdir -p "$SHIM/msa_plugins"
: > "$SHIM/msa_plugins/__init__.py"
ln -s "$REPO/kernels" "$SHIM/msa_plugins/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

{ echo "python: $PY"; timeout 60 "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
timeout 20 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
summary "env: $(tail -n 1 "$OUT/env.txt")"

# 2. kernel tests on CUDA. --noconftest / no addopts: only this file, none of the engine's fixtures.
if timeout 30 "$PY" -c "import pytest" >/dev/null 2>&1; then
    # Run from the shim: the repo root on sys.path would import the real msa_plugins package first.
    (cd "$SHIM" && timeout 200 "$PY" -m pytest "$REPO/tests/test_kernels.py" -q -p no:cacheprovider \
        --noconftest --import-mode=importlib -o addopts="" -rs) > "$OUT/test_kernels.log" 2>&1
    rc=$?
    summary "test_kernels (CUDA): rc=$rc: $(tail -n 1 "$OUT/test_kernels.log")"
else
    # No pytest: the same comparison inline (Triton vs PyTorch on CUDA, all key dtypes).
    (cd "$SHIM" && timeout 200 "$PY" -) > "$OUT/test_kernels.log" 2>&1 <<'EOF'
import torch
from msa_plugins.kernels import doc_scores_torch, fold_queries, quantize_keys_int8, topk_docs
from msa_plugins.kernels.routing_triton import doc_scores_triton
g = torch.Generator(device="cuda").manual_seed(0)
L, G, D, T, n_docs, C = 3, 8, 128, 64, 200, 3125
chunk_doc = torch.sort(torch.randint(0, n_docs + 20, (C,), device="cuda", generator=g)).values.clamp_max(n_docs - 1)
q = fold_queries(torch.randn(L, T, 32, D, device="cuda", generator=g), G)
k = torch.nn.functional.normalize(torch.randn(L, C, G, D, device="cuda", generator=g), dim=-1).flatten(2)
ok = True
for name in ["float32", "bfloat16", "float16", "int8"]:
    if name == "int8":
        kk, sc = quantize_keys_int8(k, n_kv_heads=G)
    else:
        kk, sc = k.to(getattr(torch, name)), None
    ref = doc_scores_torch(q, k, chunk_doc, n_docs) if sc is None else doc_scores_torch(q, kk, chunk_doc, n_docs, keys_scale=sc)
    for block_c in (None, 64):
        got = doc_scores_triton(q, kk, chunk_doc, n_docs, keys_scale=sc, block_c=block_c)
        fin = torch.isfinite(ref)
        err = float((got[fin] - ref[fin]).abs().max())
        same_inf = bool(torch.equal(torch.isinf(got), torch.isinf(ref)))
        good = same_inf and err < (1e-4 if name == "float32" else 1.5e-2)
        ok &= good
        print(name, block_c, "max abs diff", err, "inf pattern ok", same_inf, "OK" if good else "FAIL")
print("ALL OK" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
EOF
    rc=$?
    summary "inline kernel check (no pytest): rc=$rc: $(tail -n 1 "$OUT/test_kernels.log")"
fi

# 3. scale benchmark up to 100M tokens.
timeout 330 "$PY" "$REPO/benchmarks/routing_scale.py" --max-tokens 1e8 --out "$OUT/routing_scale_gpu.json" \
    > "$OUT/routing_scale.log" 2>&1
rc=$?
summary "routing_scale: rc=$rc"
cat "$OUT/routing_scale.log" >> "$OUT/summary.txt"
rm -rf "$SHIM"
cat "$OUT/summary.txt"
