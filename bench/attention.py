"""Attention kernels side by side: one layer's forward and backward pass, on packed rows.

    python bench/attention.py [--shape 16x12x256x32 ...] [--impl xla --impl chunked --impl torch] [--rounds 3]

A shape is batch x heads x length x head_dim; the defaults are the presets' CPU shapes (the
MiniLM reader, MiniLM sentiment, GPT-2 small and BERT-base at 8 x 128, the Bible translator's
packed rows). Each row of a batch holds two documents and some padding, so the mask is a real
one. The kernels alternate round by round (this machine's speed drifts); each round times
`--steps` calls of the compiled gradient after one warm-up call, and the table shows the median
round, in milliseconds, and each kernel's time over the first kernel's. `--impl torch` adds
PyTorch's fused `scaled_dot_product_attention` with the same mask (pip install torch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxlm.models.layers import attention, make_attention_mask  # noqa: E402

SHAPES = ["16x12x256x32", "32x12x64x32", "8x12x128x64", "30x4x128x32"]


def gradient(impl: str, shape: tuple[int, int, int, int]):
    """A function computing the gradient of one attention call (and waiting for it), and its
    arguments."""
    batch, heads, length, head_dim = shape
    rng = np.random.default_rng(0)
    q, k, v, weights = (rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32) for _ in range(4))
    segments = np.zeros((batch, length), np.int32)
    segments[:, :length // 2], segments[:, length // 2:length * 7 // 8] = 1, 2  # two documents, then padding
    index = jnp.arange(length)
    mask = make_attention_mask(jnp.asarray(segments), jnp.asarray(segments), index, index, causal=False)
    if impl == "torch":
        return torch_gradient(q, k, v, weights, np.asarray(mask))

    def loss(q, k, v):
        return (attention(q, k, v, mask, impl) * weights).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return lambda *a: jax.block_until_ready(step(*a)), tuple(map(jnp.asarray, (q, k, v)))


def torch_gradient(q, k, v, weights, mask):
    """The same gradient through PyTorch's fused attention, heads-major as it takes them."""
    import torch
    heads_major = lambda x: torch.from_numpy(x).transpose(1, 2).contiguous()  # noqa: E731
    q, k, v, weights = map(heads_major, (q, k, v, weights))
    mask = torch.from_numpy(mask | ~mask.any(-1, keepdims=True))  # a query seeing no key sees all, as in XLA's kernel

    def step(q, k, v):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        (torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask) * weights).sum().backward()
    return step, (q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="batch x heads x length x head_dim (repeatable)")
    parser.add_argument("--impl", action="append", help="kernels to compare (default: xla, chunked)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    impls = args.impl or ["xla", "chunked"]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; forward + backward of one layer, "
          f"median of {args.rounds} rounds of {args.steps} calls")
    print("| batch x heads x length x head_dim | " + " | ".join(f"{i} ms" for i in impls) + " | "
          + " | ".join(f"{i} / {impls[0]}" for i in impls[1:]) + " |")
    print("| --- " * (2 * len(impls)) + "|")
    for text in args.shape or SHAPES:
        shape = tuple(int(x) for x in text.split("x"))
        runs = {impl: gradient(impl, shape) for impl in impls}
        for step, operands in runs.values():
            step(*operands)  # compile and warm up
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl, (step, operands) in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(*operands)
                times[impl].append((time.perf_counter() - start) / args.steps * 1e3)
        med = {impl: statistics.median(t) for impl, t in times.items()}
        print(f"| {text} | " + " | ".join(f"{med[i]:.1f}" for i in impls) + " | "
              + " | ".join(f"{med[i] / med[impls[0]]:.2f}" for i in impls[1:]) + " |")


if __name__ == "__main__":
    main()
