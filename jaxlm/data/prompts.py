"""Prompt/response examples for supervised fine-tuning: JSONL files, and their encoding into rows.

A file holds one JSON object a line with a prompt and a response (`sft.prompt_key`,
`sft.response_key`). A row is `[BOS] prompt_format(prompt) response [EOS]`, shifted into inputs
and targets, with `loss_mask` 1 on the targets the model should learn (the response and its
EOS) and 0 on the prompt and padding. A row longer than `data.seq_len` loses the end of its
response. Held-out examples come from `data.eval_paths`, or a stable hashed share of the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.config import DataConfig, SftConfig
from jaxlm.data.sources import (
    Splits,
    _decoded_blocks,
    _fingerprint,
    example_splits,
    file_stats,
    json_lines,
)
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError


def _examples(path: Path, data: DataConfig, cfg: SftConfig, name: str) -> list[dict[str, Any]]:
    out = []
    for number, record in json_lines(path, "".join(_decoded_blocks(path, data.encoding_errors))):
        for key in (cfg.prompt_key, cfg.response_key):
            if not isinstance(record.get(key), str):
                raise UserError(f"{path}:{number}: no text field '{key}' (it has {', '.join(record)}); "
                                "set sft.prompt_key and sft.response_key")
        prompt, response = record[cfg.prompt_key], record[cfg.response_key]
        out.append({"prompt": prompt, "response": response, "text": f"{prompt}\n{response}",  # text: a tokenizer's
                    "key": f"{name}:{number}"})
    if not out:
        raise UserError(f"'{path}' holds no examples")
    return out


def load_splits(data: DataConfig, cfg: SftConfig) -> Splits:
    """Train and eval examples from JSONL files (read in full: fine-tuning sets are small)."""
    train, held, train_files, eval_files = example_splits(data, lambda path, name: _examples(path, data, cfg, name))
    if not held:
        raise UserError("no held-out prompt/response examples; give data.eval_paths or more examples")
    fp = _fingerprint(["prompts", file_stats(train_files + eval_files), len(train_files), data.eval_fraction,
                       cfg.prompt_key, cfg.response_key])
    return Splits(train, held, "text", fp)


class PromptRows:
    """Random-access encoded examples, one a row (see the module docstring)."""

    def __init__(self, examples: list[dict[str, Any]], tok: TextTokenizer, seq_len: int, prompt_format: str):
        self.seq_len = seq_len
        n = len(examples)
        prompts = tok.encode_batch([prompt_format.format(prompt=e["prompt"]) for e in examples])
        responses = tok.encode_batch([e["response"] for e in examples])
        self.inputs = np.zeros((n, seq_len), np.int32)
        self.targets = np.zeros((n, seq_len), np.int32)
        self.mask = np.zeros((n, seq_len), np.int32)
        self.lengths = np.zeros(n, np.int32)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = [tok.bos_id, *p, *r, tok.eos_id][: seq_len + 1]
            n_in = len(ids) - 1
            self.inputs[i, :n_in], self.targets[i, :n_in] = ids[:-1], ids[1:]
            self.mask[i, len(p):n_in] = 1  # targets from the response's first token on
            self.lengths[i] = n_in
        self.tokens = int(self.mask.sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"inputs": self.inputs[i], "targets": self.targets[i], "loss_mask": self.mask[i],
                "segment_ids": (np.arange(self.seq_len) < self.lengths[i]).astype(np.int32),
                "positions": np.arange(self.seq_len, dtype=np.int32)}

    def empty(self) -> dict[str, np.ndarray]:
        """A padding row (no tokens; weight zero)."""
        zeros = np.zeros(self.seq_len, np.int32)
        return {"inputs": zeros, "targets": zeros, "loss_mask": zeros, "segment_ids": zeros, "positions": zeros}
