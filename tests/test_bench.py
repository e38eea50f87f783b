"""The benchmark command, analytic model FLOPs and device peaks."""

import json
from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm import bench, perf
from jaxlm import config as config_lib
from jaxlm.models import flops
from jaxlm.workdir import shapes_run

# Shapes where matrix multiplies are nearly all the work, so XLA's count (which also counts
# elementwise operations) and the analytic one must agree closely.
SHAPES = ["model.num_layers=2", "model.embed_dim=128", "model.num_heads=2", "model.max_len=256",
          "data.seq_len=256", "data.vocab_size=4096", "train.batch_size=8"]


def xla_forward_flops(run) -> float:
    """XLA's FLOP count of the task's loss (a forward pass) of the whole batch on one device."""
    cfg, task = run.config, run.task
    batch = task.synthetic_batch(cfg.train.batch_size, cfg.data.seq_len, np.random.default_rng(0))
    params = jax.eval_shape(lambda: nn.meta.unbox(task.init(jax.random.key(0), batch))["params"])
    compiled = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(0), train=False)[0]).lower(
        params, batch).compile()
    return perf.xla_flops(compiled)


@pytest.mark.parametrize("task", ["clm", "llama", "mlm", "mlm_nsp", "classify", "qa"])
def test_analytic_forward_flops_match_xlas_count(task, corpus_dir):
    extra = {"clm": ["task=clm"], "mlm": ["task=mlm"],
             "llama": ["task=clm", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp=swiglu",
                       "model.norm=rmsnorm", "model.use_bias=false", "model.tie_embeddings=false"], "mlm_nsp": ["task=mlm", "mlm.nsp=true"],
             "classify": ["task=classify", "data.source=labeled", f"data.paths=[{corpus_dir}/x.tsv]"],
             "qa": ["task=qa", "data.source=squad", f"data.paths=[{corpus_dir}/x.json]"]}[task]
    run = shapes_run(config_lib.load(None, SHAPES + extra))
    analytic = run.task.forward_flops(run.config.train.batch_size, run.config.data.seq_len)
    # (the masked-LM head on every token instead of the gathered 15% would add 85% here)
    assert analytic == pytest.approx(xla_forward_flops(run), rel=0.05)


def test_causal_attention_counts_half_only_for_cudnns_causal_kernel():
    cfg = config_lib.load(None, SHAPES + ["model.dtype=bfloat16"]).model
    xla = flops.blocks(cfg, 8, 256, causal=True)
    assert xla == flops.blocks(cfg, 8, 256, causal=False)  # XLA computes every score
    cudnn = flops.blocks(config_lib.load(None, SHAPES + ["model.attention_impl=cudnn"]).model, 8, 256, causal=True)
    scores = 2 * 2.0 * 8 * 256 * 256 * cfg.embed_dim * cfg.num_layers
    assert xla - cudnn == pytest.approx(scores / 2)


@pytest.mark.parametrize("kind,dtype,want", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "float32", 494.7), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("TPU v5 lite", "bfloat16", 197.0), ("TPU v5", "bfloat16", 459.0), ("TPU v4", "float32", 275.0),
    ("cpu", "float32", None)])
def test_datasheet_peak_by_device_kind(kind, dtype, want):
    peak = perf.datasheet_peak(SimpleNamespace(device_kind=kind), dtype)
    assert peak == (None if want is None else pytest.approx(want * 1e12))


def test_bench_times_the_step_and_reports_flops_and_mfu(tiny, capsys):
    bench.main(["--steps", "2", "--warmup", "1", "--matmul-size", "256", "--json", *tiny])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU (measured matmul peak)" in out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["task"] == "clm" and r["devices"] == 8 and r["batch"] == 16 and r["seq_len"] == 32
    assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
    assert r["tokens_per_s"] == pytest.approx(16 * 32 / r["step_s_median"])
    assert r["model_flops_per_step"] > 0 and r["xla_flops_per_step"] > 0
    assert r["mfu_matmul"] == pytest.approx(r["model_tflops_per_device"] / r["matmul_peak_tflops"])
    assert r["mfu_datasheet"] is None  # no datasheet for a CPU


def test_bench_data_only_reads_the_configs_data(tiny, tmp_path, capsys):
    # a cache of its own: the session's stores are built with the shard sizes their tests expect
    bench.main(["--data-only", "--batches", "3", "--json", *tiny, f"data.cache_dir={tmp_path}"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["batches"] == 3 and r["batch_tokens_per_s"] > 0 and r["tokenize_tokens_per_s"] > 0


def test_bench_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        bench.main(["--steps", "0"])
    assert info.value.code == 2
    assert "--steps=0 must be at least 1" in capsys.readouterr().err


@pytest.mark.slow  # a whole benchmark run of four presets, shrunk
def test_gpu_script_dry_run_writes_its_table(tmp_path):
    """bench/gpu.sh runs the same commands on tiny shapes on CPU with --dry-run."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["bash", str(root / "bench/gpu.sh"), "--dry-run", str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert [r["config"] for r in rows] == ["gpt2_small", "gpt_350m", "bert_large_mlm", "t5_base", "gpt2_small"]
    assert [r["attention"] for r in rows][-1] == "xla"
    table = (tmp_path / "gpu.md").read_text().splitlines()
    assert table[0].startswith("| model | device | attention |") and len(table) == 2 + 5


@pytest.mark.parametrize("task,source", [("clm", "builtin"), ("seq2seq", "parallel"), ("span_corruption", "builtin")])
def test_synthetic_batches_predict_only_the_tokenizers_ids(task, source):
    """The table has padding rows past the tokenizer's ids; a synthetic target there would have no
    probability, and a benchmark would time a step with an infinite loss."""
    run = shapes_run(config_lib.load(None, [f"task={task}", f"data.source={source}", "model.num_layers=1", "model.embed_dim=32",
                                            "model.num_heads=2", "model.max_len=64", "data.seq_len=32",
                                            "data.vocab_size=1000", "model.vocab_multiple=512"]))
    assert run.config.model.vocab_size % 512 == 0 and run.config.model.vocab_size > run.task.vocab
    batch = run.task.synthetic_batch(4, 32, np.random.default_rng(0))
    assert batch["targets"].max() < run.task.vocab and batch["targets"].max() > 900
    params = nn.meta.unbox(run.task.init(jax.random.key(0), batch))["params"]
    loss, _ = run.task.loss(params, batch, jax.random.key(0), train=False)
    assert np.isfinite(float(loss))
