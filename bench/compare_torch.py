"""jaxlm and Hugging Face transformers (PyTorch) training steps of the same shapes, side by side.

    pip install torch==2.13.0 transformers        # the reference side only
    python bench/compare_torch.py [--model gpt2_small] [--model bert_base_mlm] [--model minilm_sentiment]
                                  [--model minilm_qa]
                                  [--dtype float32|bfloat16] [--steps 8] [--rounds 3]

Both sides train the same architecture and shapes from random weights with AdamW (float32
master weights, the preset's betas, epsilon and weight decay) and gradient clipping at 1.0, on
random tokens, in one process: the two alternate round by round, so a change in the machine's
load hits both. Each side runs the whole batch in one pass (no microbatches). tokens/s is batch x
length over the wall time of `--steps` steps after warm-up (jaxlm's steps dispatched back to
back and waited for at the end, as its training loop runs). jaxlm's attention is its default
kernel for the machine (`model.attention_impl=auto`: the chunked kernel on one CPU device).

What is compared, model by model:
  gpt2_small        configs/gpt2_small.yaml vs GPT2LMHeadModel (no dropout on either side),
                    vocabulary 50,304 on both sides, whole logits as Hugging Face computes them.
  bert_base_mlm     configs/bert_base_mlm.yaml without next-sentence prediction (mlm.nsp=false)
                    vs BertForMaskedLM: jaxlm computes the output layer on the 15% of positions it
                    predicts, Hugging Face's BertForMaskedLM on every token (its loss ignores the
                    rest). Dropout 0.1 on both sides; vocabulary 30,592.
  minilm_sentiment  configs/minilm_sentiment.yaml's shapes (all-MiniLM-L6-v2: 6 layers, width
                    384, 12 heads; batch 32 x 64) vs BertForSequenceClassification, dropout 0.1.
  minilm_qa         configs/minilm_qa.yaml's shapes (the same model; batch 16 x 256) vs
                    BertForQuestionAnswering, dropout 0.1.

MFU on both sides is the same analytic model FLOP count (`jaxlm.models.flops`; for
BertForMaskedLM the output layer on every token, as it computes) over a float32 (or bfloat16)
matmul peak measured by JAX in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxlm import config as config_lib  # noqa: E402
from jaxlm import perf  # noqa: E402
from jaxlm.models import flops  # noqa: E402
from jaxlm.workdir import shapes_run  # noqa: E402


@dataclasses.dataclass
class Shape:
    config: str
    overrides: list[str]
    batch: int
    seq_len: int


SHAPES = {
    "gpt2_small": Shape("gpt2_small.yaml", ["model.vocab_size=50304", "model.dropout=0.0",
                                            "model.logits_chunk=0"], 8, 128),
    "bert_base_mlm": Shape("bert_base_mlm.yaml", ["model.vocab_size=30592", "mlm.nsp=false"], 8, 128),
    "minilm_sentiment": Shape("minilm_sentiment.yaml", [
        'init.from_workdir=""', "model.num_layers=6", "model.embed_dim=384", "model.num_heads=12",
        "model.mlp_dim=1536", "model.max_len=512", "model.positions=learned", "model.activation=gelu",
        "model.norm_eps=1e-12", "model.vocab_size=30592", "data.vocab_size=30522"], 32, 64),
    "minilm_qa": Shape("minilm_qa.yaml", [
        'init.from_workdir=""', "model.num_layers=6", "model.embed_dim=384", "model.num_heads=12",
        "model.mlp_dim=1536", "model.max_len=512", "model.positions=learned", "model.activation=gelu",
        "model.norm_eps=1e-12", "model.vocab_size=30592", "data.vocab_size=30522"], 16, 256),
}


def jaxlm_side(name: str, dtype: str, steps: int):
    """(run, a function that runs `steps` train steps and waits for them, model FLOPs a step)."""
    shape = SHAPES[name]
    config = config_lib.load(str(ROOT / "configs" / shape.config), shape.overrides + [
        f"train.batch_size={shape.batch}", f"data.seq_len={shape.seq_len}", f"model.dtype={dtype}",
        "model.attention_impl=auto", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "optim.clip_norm=1.0",
        "train.grad_accum_steps=1"])
    run = shapes_run(config, mode="jit")
    c = run.compiled
    with c.context():
        batch = c.put_batch(run.task.synthetic_batch(shape.batch, shape.seq_len, np.random.default_rng(0)))
        state = c.init_state(0)
    rng = jax.random.key(0)
    holder = {"state": state}

    def run_steps() -> None:
        with c.context():
            s = holder["state"]
            for _ in range(steps):
                s, metrics = c.train_step(s, batch, rng)
            jax.block_until_ready((s, metrics))
            holder["state"] = s

    return run, run_steps, flops.train_step(run.task.forward_flops(shape.batch, shape.seq_len))


def hf_side(name: str, run, dtype: str, steps: int):
    """(a function that runs `steps` Hugging Face train steps, model FLOPs a step as it computes)."""
    import torch
    import transformers

    torch.manual_seed(0)
    m, o, shape = run.config.model, run.config.optim, SHAPES[name]
    rows, length = shape.batch, shape.seq_len
    ids = torch.randint(5, m.vocab_size, (rows, length))
    if name == "gpt2_small":
        cfg = transformers.GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.embed_dim,
                                      n_layer=m.num_layers, n_head=m.num_heads, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
        inputs = {"input_ids": ids, "labels": ids}
        head = flops.dense(rows * length, m.embed_dim, m.vocab_size)
        forward = flops.blocks(m, rows, length, causal=True) + head
    else:
        cfg = transformers.BertConfig(vocab_size=m.vocab_size, hidden_size=m.embed_dim, num_hidden_layers=m.num_layers,
                                      num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim or 4 * m.embed_dim,
                                      max_position_embeddings=m.max_len, hidden_dropout_prob=m.dropout,
                                      attention_probs_dropout_prob=m.dropout)
        if name == "bert_base_mlm":
            model = transformers.BertForMaskedLM(cfg)
            labels = torch.where(torch.rand(rows, length) < 0.15, ids, torch.full_like(ids, -100))
            inputs = {"input_ids": ids, "labels": labels}
            every = rows * length  # BertForMaskedLM's head runs on every token
            forward = (flops.blocks(m, rows, length, causal=False) + flops.dense(every, m.embed_dim, m.embed_dim)
                       + flops.dense(every, m.embed_dim, m.vocab_size) + flops.dense(rows, m.embed_dim, m.embed_dim))
        elif name == "minilm_qa":
            model = transformers.BertForQuestionAnswering(cfg)
            first = torch.randint(length // 4, length - 4, (rows,))
            inputs = {"input_ids": ids, "start_positions": first, "end_positions": first + 3}
            forward = run.task.forward_flops(rows, length)
        else:
            model = transformers.BertForSequenceClassification(cfg)
            inputs = {"input_ids": ids, "labels": torch.randint(0, 2, (rows,))}
            forward = run.task.forward_flops(rows, length)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run_steps() -> None:
        for _ in range(steps):
            with autocast:
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run_steps, flops.train_step(forward)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(SHAPES), help="repeatable (default: all)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps a side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--matmul-size", type=int, default=2048, help="0: skip the matmul peak (no MFU)")
    args = parser.parse_args()
    import torch
    peak = perf.matmul_peak(args.dtype, args.matmul_size) if args.matmul_size else float("nan")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for name in args.model or list(SHAPES):
        run, jax_steps, jax_flops = jaxlm_side(name, args.dtype, args.steps)
        hf_steps, hf_flops = hf_side(name, run, args.dtype, args.steps)
        shape = SHAPES[name]
        tokens = args.steps * shape.batch * shape.seq_len
        start = time.perf_counter()
        jax_steps()  # compile and warm up
        compile_s = time.perf_counter() - start
        hf_steps()
        times = {"jaxlm": [], "hf": []}
        for r in range(args.rounds):
            for side, fn in (("jaxlm", jax_steps), ("hf", hf_steps)) if r % 2 == 0 else (("hf", hf_steps), ("jaxlm", jax_steps)):
                times[side].append(timed(fn))
            print(f"  {name} round {r + 1}: jaxlm {tokens / times['jaxlm'][-1]:.1f} tokens/s, "
                  f"hf {tokens / times['hf'][-1]:.1f} tokens/s", flush=True)
        jax_tps = tokens / statistics.median(times["jaxlm"])
        hf_tps = tokens / statistics.median(times["hf"])
        row = {"model": name, "dtype": args.dtype, "batch": shape.batch, "seq_len": shape.seq_len,
               "jaxlm_tokens_per_s": jax_tps, "hf_tokens_per_s": hf_tps, "ratio": jax_tps / hf_tps,
               "jaxlm_mfu": jax_flops * jax_tps / (shape.batch * shape.seq_len) / peak,
               "hf_mfu": hf_flops * hf_tps / (shape.batch * shape.seq_len) / peak,
               "round_ratios": [h / j for j, h in zip(times["jaxlm"], times["hf"])],
               "jaxlm_compile_s": compile_s, "matmul_peak_gflops": peak / 1e9}
        results.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | dtype | batch x length | jaxlm tokens/s | HF tokens/s | ratio | jaxlm MFU | HF MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} x {r['seq_len']} | {r['jaxlm_tokens_per_s']:.1f} | "
              f"{r['hf_tokens_per_s']:.1f} | {r['ratio']:.2f}x | {100 * r['jaxlm_mfu']:.0f}% | {100 * r['hf_mfu']:.0f}% |")


if __name__ == "__main__":
    main()
