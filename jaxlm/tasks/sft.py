"""Supervised fine-tuning of a decoder: next-token cross-entropy on the response tokens only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import Config
from jaxlm.data import packing, prompts
from jaxlm.data.sources import Splits
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.microbatch import Layout
from jaxlm.tasks.base import SplitRows
from jaxlm.tasks.clm import ClmTask

Array = jax.Array


class SftTask(ClmTask):
    """`ClmTask` on prompt/response rows (`jaxlm.data.prompts`): the loss, its token count and
    every metric cover the targets `loss_mask` marks (the response and its EOS), so the prompt's
    tokens carry zero weight. Perplexity and accuracy are the response's. Batches pack several
    examples to a row, as classification does."""

    batch_keys = (*ClmTask.batch_keys, "loss_mask")

    @staticmethod
    def load_splits(config: Config) -> Splits:
        return prompts.load_splits(config.data, config.sft)

    @staticmethod
    def rows(config: Config, splits: Splits, tok: TextTokenizer) -> SplitRows:
        return SplitRows(lambda name: prompts.PromptRows(getattr(splits, name), tok, config.data.seq_len,
                                                         config.sft.prompt_format, config.sft.chat_template))

    def packer(self, rows: prompts.PromptRows, layout: Layout, host_batch: int) -> packing.Packer:
        """Packs examples several to a row (apart by segment ids), at sizes measured on `rows`."""
        return packing.packer_for(rows, layout, host_batch)

    def synthetic_batch(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random tokens, one example a row, the second half of each the response (benchmarks)."""
        batch = super().synthetic_batch(batch_size, seq_len, rng)
        batch["loss_mask"] = (np.arange(seq_len) >= seq_len // 2).astype(np.int32)[None].repeat(batch_size, 0)
        return batch

    def weights(self, batch: dict[str, Array]) -> Array:
        return batch["loss_mask"].astype(jnp.float32)
