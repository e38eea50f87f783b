#!/usr/bin/env bash
# Benchmarks the large presets on one GPU at realistic batch and sequence lengths and writes a
# table: gpt2_small, gpt_350m, bert_large_mlm and t5_base in bfloat16 (float32 master weights),
# with cuDNN's fused attention (model.attention_impl=auto), and gpt2_small once more with XLA's
# attention to show what the fused kernel is worth. Target: at least 50% MFU on an H100/H200.
#
#   bash bench/gpu.sh [OUT_DIR]            # on a machine with a GPU and a CUDA build of jax (jax[cuda12] or jax[cuda13])
#   bash bench/gpu.sh --dry-run [OUT_DIR]  # anywhere: the same commands on tiny shapes on CPU
#
# Checks the attention kernels first (tests/test_attention.py, cuDNN's included on a GPU). Writes
# OUT_DIR/gpu.jsonl (one `python -m jaxlm.bench --json` line a model), OUT_DIR/gpu.md
# (the table) and OUT_DIR/gpu.log (everything printed). OUT_DIR defaults to bench-out/. A model
# that fails is reported and the others still run; the exit status is then 1.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
out=${1:-bench-out}
mkdir -p "$out"
: > "$out/gpu.jsonl"
python=${PYTHON:-python}

if [[ $dry == 0 ]] && ! "$python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
    echo "no GPU backend in jax here: install jax[cuda12] or jax[cuda13], or pass --dry-run" >&2
    exit 2
fi

# first, the attention kernels against the reference math on packed and padded batches
# (cuDNN's on a GPU; XLA's everywhere)
platform=$([[ $dry == 1 ]] && echo cpu || echo cuda)
JAX_PLATFORMS=$platform "$python" -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tee "$out/gpu.log"

# name | preset | overrides: batch and length that keep one GPU busy (microbatches of 16 x 1024,
# 4 x 2048, 128 x 128 and 64 x (512 + 128) rows x tokens)
models=(
    "gpt2_small|configs/gpt2_small.yaml|train.batch_size=32 train.grad_accum_steps=2 data.seq_len=1024"
    "gpt_350m|configs/gpt_350m.yaml|train.batch_size=8 train.grad_accum_steps=2 data.seq_len=2048"
    "bert_large_mlm|configs/bert_large_mlm.yaml|train.batch_size=128 data.seq_len=128 model.remat=none"
    "t5_base|configs/t5_base.yaml|train.batch_size=64 data.seq_len=512 seq2seq.target_len=128"
    "gpt2_small|configs/gpt2_small.yaml|train.batch_size=32 train.grad_accum_steps=2 data.seq_len=1024 model.attention_impl=xla"
)
common="mesh.data=1 mesh.fsdp=1 mesh.tensor=1 model.dtype=bfloat16"
args=(--steps 10 --warmup 3 --matmul-size 8192)
if [[ $dry == 1 ]]; then
    common="mesh.data=-1 mesh.fsdp=1 mesh.tensor=1 model.num_layers=1 model.embed_dim=64 model.num_heads=2 model.mlp_dim=128 data.vocab_size=512"
    args=(--steps 1 --warmup 0 --matmul-size 128)
fi

failed=()
for entry in "${models[@]}"; do
    IFS='|' read -r name preset overrides <<< "$entry"
    if [[ $dry == 1 ]]; then
        attention=$([[ $overrides == *attention_impl=xla* ]] && echo model.attention_impl=xla || true)
        overrides="train.batch_size=8 train.grad_accum_steps=1 data.seq_len=32 seq2seq.target_len=16 model.logits_chunk=0 $attention"
    fi
    echo "== $name $overrides" | tee -a "$out/gpu.log"
    # shellcheck disable=SC2086
    if "$python" -m jaxlm.bench --config "$preset" "${args[@]}" --json $overrides $common > "$out/bench.out" 2>&1; then
        tail -n 1 "$out/bench.out" >> "$out/gpu.jsonl"
    else
        echo "$name failed:" >&2
        tail -n 20 "$out/bench.out" >&2
        failed+=("$name")
    fi
    cat "$out/bench.out" >> "$out/gpu.log"
    rm "$out/bench.out"
done

"$python" - "$out" <<'EOF'
import json
import sys

out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/gpu.jsonl")]
pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
gib = lambda x: "n/a" if x is None else f"{x:.1f}"
lines = ["| model | device | attention | batch x length | step (s) | tokens/s | model TFLOP/s | MFU (datasheet) "
         "| MFU (measured matmul) | peak memory (GiB) |", "| --- " * 10 + "|"]
for r in rows:
    lines.append(f"| {r['config']} | {r['device']} | {r['attention']} | {r['batch']} x {r['seq_len']} | {r['step_s_median']:.4f} "
                 f"| {r['tokens_per_s']:,.0f} | {r['model_tflops_per_device']:.1f} | {pct(r['mfu_datasheet'])} "
                 f"| {pct(r['mfu_matmul'])} | {gib(r['peak_memory_gib'])} |")
open(f"{out}/gpu.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
if (( ${#failed[@]} )); then
    echo "failed: ${failed[*]} (see $out/gpu.log)" >&2
    exit 1
fi
