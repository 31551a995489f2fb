#!/usr/bin/env bash
# The GPU runs of the open issues, in stages, for the device machine (an H100/H200 reached through
# the session's device tool; see benchmarks/results/*.json for what each produced). One call runs
# one or more stages within the tool's 10-minute limit:
#
#     bash benchmarks/device_stages.sh PREFLIGHT T2 M2        # each stage bounded by <STAGE>_S seconds
#
# Carry `.whl` (wheels the device image lacks: gguf, expecttest) and `.devcache` (Triton and fusecc
# caches of an earlier call, restored to skip kernel compiles; the refreshed archive comes back as
# $OUT/devcache.tar.xz). SmolLM2's 94 MiB GGUF is over what one call carries: split it in halves
# (`split -n 2 FILE .smol_a/part_` puts both in .smol_a; move part_ab to .smol_b), carry .smol_a in
# one call and .smol_b in the next on the same warm machine (a path a call does not carry is removed
# there, so the script keeps each half under /tmp). The machine goes back after 30 s idle: have the
# second call ready. backend="fusecc" needs the package installed there (done below, --no-deps).
# Results land in $OUT/results/<name>.json and logs in $OUT/<stage>.log; the last lines are a table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TRITON_CACHE_DIR=/tmp/cache/triton FUSECC_CACHE_DIR=/tmp/cache/fusecc
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
# the torch_dynamo_backends entry point (backend="fusecc") exists only once the package is installed
python3 -c "import fusecc" 2>/dev/null && python3 -m pip show -q fusecc >/dev/null 2>&1 \
    || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
    || echo "could not install fusecc: backend='fusecc' is unknown there"
[ -f .devcache/devcache.tar.xz ] && [ ! -d /tmp/cache ] && tar xJf .devcache/devcache.tar.xz -C /
SMOL=/tmp/smollm2.gguf
# a path not carried is removed there before the next call: keep each half under /tmp
for half in .smol_a/part_aa .smol_b/part_ab; do [ -f $half ] && cp $half /tmp/; done
if [ ! -f $SMOL ] && [ -f /tmp/part_aa ] && [ -f /tmp/part_ab ]; then
    cat /tmp/part_aa /tmp/part_ab > $SMOL
fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# run NAME SECONDS CMD...: one bounded step; its log under $OUT, its exit status in the summary
run() {
    local name=$1 seconds=$2; shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$SUMMARY"
    tail -n 4 "$OUT/$name.log" | sed "s/^/    /"
    return $rc
}



for stage in "$@"; do
    case $stage in
    PREFLIGHT)  # kernels whose GPU tests never ran: stop everything if one fails
        run preflight "${PREFLIGHT_S:-240}" python3 -m pytest -q -p no:cacheprovider -x -m gpu tests/kernels/test_qk_rope.py tests/kernels/test_moe_routing.py \
            "tests/kernels/test_quant_matmul.py::test_gpu_int4_tile_forms_real_sizes" "tests/kernels/test_quant_matmul.py::test_gpu_int4_gemv_forms_real_sizes" \
            "tests/kernels/test_fused_moe.py::test_gpu_real_shapes_bf16" \
            "tests/kernels/test_fused_moe.py::test_gpu_decode_step_captures_in_a_cuda_graph" \
            "tests/quantization/test_quantized_moe.py::test_gpu_real_shapes_bf16" || break ;;
    T2)  # issue 19: the NCCL path at world size 1 against the plain engine, then the int4 TP test
        run tp "${T2_S:-300}" python3 benchmarks/tp.py --tp 1 --shapes "${T2_SHAPES:-1b,8b}" --max-num-seqs 8 \
            --num-requests 16 --profile --out "$OUT/results/tp.json"
        run tp_gpu_test "${T2_TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider -x -m gpu ${T2_TEST_K:+-k "$T2_TEST_K"} tests/distributed/test_tp_gpu.py ;;
    M2)  # issue 21: kernel rows, Qwen3-30B-A3B-shape decode roofline (all layers that fit: fewer layers
         # leave the fixed host time of a step a larger share), throughput against HF + inductor
        run moe "${M2_S:-400}" python3 benchmarks/moe.py --tokens "${M2_TOKENS:-1,64}" --quant-tokens '' \
            ${M2_LAYERS:+--layers "$M2_LAYERS"} --throughput-layers "${M2_TP_LAYERS:-8}" --profile --out "$OUT/results/moe.json" ;;
    C2)  # issue 18: 8B compile-time rows the last run did not reach, and the engine start-up
        run compile_time "${C2_S:-400}" python3 -m benchmarks.compile_time --shapes 8b \
            --rows dynamo_only,aot_eager,inductor,fusecc_aot --serve --profile-rows fusecc_aot \
            --out "$OUT/results/compile_time.json" ;;
    S2)  # issue 20 batch 1 and issue 16's GPU perplexity, on SmolLM2
        [ -f $SMOL ] || { echo "S2: no SmolLM2 (carry .smol_a then .smol_b)" | tee -a "$SUMMARY"; continue; }
        run spec_bs1 "${S2_S:-240}" python3 benchmarks/spec.py --model $SMOL --batches 1 --profile --out "$OUT/results/spec_bs1.json"
        run perplexity "${PPL_S:-200}" python3 benchmarks/perplexity.py --model $SMOL --device cuda --dtype bfloat16 \
            --out "$OUT/results/perplexity_gpu.json" ;;
    S3)  # issue 20 batch 32
        [ -f $SMOL ] || { echo "S3: no SmolLM2" | tee -a "$SUMMARY"; continue; }
        run spec_bs32 "${S3_S:-240}" python3 benchmarks/spec.py --model $SMOL --batches 32 --out "$OUT/results/spec_bs32.json" ;;
    Q1)  # issue 17 engine rows
        run quant_engine "${Q1_S:-500}" python3 benchmarks/quant.py --skip-linears --methods "${Q1_METHODS:-bf16,int4,int8,fp8}" \
            --out "$OUT/results/quant.json" ;;
    K)  # issue 17 fp8 KV cache throughput
        run kv_fp8 "${K_S:-300}" python3 benchmarks/kv_cache_fp8.py --out "$OUT/results/kv_cache_fp8.json" ;;
    TB)  # issue 16: transformers-backed against native throughput
        run throughput_tb "${TB_S:-400}" python3 benchmarks/throughput.py --configs "${TB_CONFIGS:-8b}" --skip-hf \
            --model-impl fusecc,transformers --out "$OUT/results/throughput_transformers.json" ;;
    AS)  # async scheduling against synchronous steps (the host-time lever of every batch-1 target), and its GPU test
        run async_scheduling "${AS_S:-300}" python3 benchmarks/async_scheduling.py --shapes "${AS_SHAPES:-1b,8b}" \
            --num-requests 64 --out "$OUT/results/async_scheduling.json"
        run async_gpu_test "${AS_TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider -m gpu \
            tests/runtime/test_async_scheduling.py ;;
    A2)  # every other GPU test
        run gpu_tests "${A2_S:-500}" python3 -m pytest -q -p no:cacheprovider -m gpu tests ;;
    *) echo "unknown stage $stage" | tee -a "$SUMMARY" ;;
    esac
done
if [ -d /tmp/cache ] && [ -z "${NO_DEVCACHE:-}" ]; then tar -I "xz -T0 -3" -cf "$OUT/devcache.tar.xz" -C / tmp/cache 2>/dev/null; fi
echo "== summary"; cat "$SUMMARY"; nvidia-smi --query-gpu=name --format=csv,noheader
