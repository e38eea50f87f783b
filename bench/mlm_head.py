"""Masked-LM head: vocabulary projection on the selected positions only (gather first) versus
on every position, side by side in one process.

    python bench/mlm_head.py [--config configs/bert_tiny_mlm.yaml] [--batch 32] [--vocab 30592] [--steps 10]

Both variants run the same jitted train step of `MlmTask` with the same masks; the full variant
gathers every position (predictions = seq_len), which costs what an ungathered head costs, and
gives the same loss (unselected positions have weight 0).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import optim, sharding
from jaxlm.data import pipeline
from jaxlm.steps import Compiled
from jaxlm.tasks.mlm import MlmTask


def seconds_per_step(task: MlmTask, cfg, batch_size: int, steps: int) -> tuple[float, float]:
    mesh_cfg = config_lib.MeshConfig(data=1)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    c = Compiled(task, optim.optimizer(cfg.optim, 1000), mesh, sharding.rules(mesh_cfg), batch_size,
                 cfg.data.seq_len)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(5, 1000, (batch_size, cfg.data.seq_len)).astype(np.int32),
             "segment_ids": np.ones((batch_size, cfg.data.seq_len), np.int32),
             "positions": np.tile(np.arange(cfg.data.seq_len, dtype=np.int32), (batch_size, 1)),
             "row_ids": pipeline.row_ids(np.arange(batch_size))}
    state, key = c.init_state(0), jax.random.key(0)
    with c.context():
        b = c.put_batch(batch)
        state, m = c.train_step(state, b, key)  # compile
        loss = float(m["loss_sum"] / m["predictions"])
        jax.block_until_ready(state)
        start = time.time()
        for _ in range(steps):
            state, m = c.train_step(state, b, key)
        jax.block_until_ready(state)
    return (time.time() - start) / steps, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bert_tiny_mlm.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=30592, help="vocabulary rows (BERT's, padded)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    # the masked-LM head alone: packed rows, no next-sentence pairs
    cfg = config_lib.load(args.config, [f"model.vocab_size={args.vocab}", "mlm.nsp=false"])
    specials, continues = np.arange(5), np.zeros(args.vocab, bool)
    gathered = MlmTask(cfg.model, cfg.mlm, cfg.data.seq_len, 0, specials, continues, 4)
    full = MlmTask(cfg.model, cfg.mlm, cfg.data.seq_len, 0, specials, continues, 4)
    full.predictions = cfg.data.seq_len
    t_full, loss_full = seconds_per_step(full, cfg, args.batch, args.steps)
    t_gathered, loss_gathered = seconds_per_step(gathered, cfg, args.batch, args.steps)
    print(f"{args.config}: batch {args.batch} x {cfg.data.seq_len}, vocabulary {args.vocab}")
    print(f"every position:     {t_full:.3f} s/step  (loss {loss_full:.4f})")
    print(f"selected ({gathered.predictions}/row): {t_gathered:.3f} s/step  (loss {loss_gathered:.4f})")
    print(f"speed-up: {t_full / t_gathered:.2f}x")


if __name__ == "__main__":
    main()
