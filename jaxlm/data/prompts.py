"""Supervised fine-tuning examples: JSONL files, and their encoding into rows.

A file holds one JSON object a line: a prompt and a response (`sft.prompt_key`,
`sft.response_key`), or a conversation (`sft.messages_key`: a list of `{"role", "content"}`
messages, rendered by the chat template `sft.chat_template`, see `jaxlm.data.chat`).

A prompt/response row is `[BOS] prompt_format(prompt) response [EOS]`; a conversation's row is
the tokens of its rendered text. Rows are shifted into inputs and targets, with `loss_mask`
1 on the targets the model should learn (the response and its EOS; every assistant turn with
its end-of-turn marker) and 0 on the rest and on padding. A row longer than `data.seq_len` loses
its end. Held-out examples come from `data.eval_paths`, or a stable hashed share of the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxlm.config import DataConfig, SftConfig
from jaxlm.data import chat
from jaxlm.data.sources import (
    Splits,
    _decoded_blocks,
    example_file_splits,
    json_lines,
)
from jaxlm.data.tokenizer import TextTokenizer
from jaxlm.errors import UserError


def _examples(path: Path, data: DataConfig, cfg: SftConfig, name: str) -> list[dict[str, Any]]:
    out = []
    for number, record in json_lines(path, "".join(_decoded_blocks(path, data.encoding_errors))):
        where = f"{path}:{number}"
        if cfg.messages_key in record:
            messages = chat.check_messages(record[cfg.messages_key], where)
            out.append({"messages": messages, "text": "\n".join(m["content"] for m in messages), "key": f"{name}:{number}"})
            continue
        for key in (cfg.prompt_key, cfg.response_key):
            if not isinstance(record.get(key), str):
                raise UserError(f"{where}: no text field '{key}' (it has {', '.join(record)}); set sft.prompt_key "
                                f"and sft.response_key, or give a conversation as '{cfg.messages_key}' (sft.messages_key)")
        prompt, response = record[cfg.prompt_key], record[cfg.response_key]
        out.append({"prompt": prompt, "response": response, "text": f"{prompt}\n{response}",  # text: a tokenizer's
                    "key": f"{name}:{number}"})
    if not out:
        raise UserError(f"'{path}' holds no examples")
    return out


def load_splits(data: DataConfig, cfg: SftConfig) -> Splits:
    """Train and eval examples from JSONL files (read in full: fine-tuning sets are small)."""
    return example_file_splits(data, lambda path, name: _examples(path, data, cfg, name), "prompts",
                               [cfg.prompt_key, cfg.response_key, cfg.messages_key],
                               "no held-out prompt/response examples; give data.eval_paths or more examples")


class PromptRows:
    """Random-access encoded examples, one a row (see the module docstring)."""

    def __init__(self, examples: list[dict[str, Any]], tok: TextTokenizer, seq_len: int, prompt_format: str,
                 chat_template: str = ""):
        self.seq_len = seq_len
        n = len(examples)
        parts = [chat.pieces(chat_template, e["messages"], tok) if "messages" in e else
                 [(prompt_format.format(prompt=e["prompt"]), False), (e["response"], True)] for e in examples]
        encoded = iter(tok.encode_batch([text for p in parts for text, _ in p]))
        self.inputs = np.zeros((n, seq_len), np.int32)
        self.targets = np.zeros((n, seq_len), np.int32)
        self.mask = np.zeros((n, seq_len), np.int32)
        self.lengths = np.zeros(n, np.int32)
        for i, (example, pieces) in enumerate(zip(examples, parts)):
            ids, learned = [], []
            for _, learn in pieces:
                piece = next(encoded)
                ids += piece
                learned += [learn] * len(piece)
            if "messages" not in example:  # BOS first and EOS last (a chat template writes its own)
                ids, learned = [tok.bos_id, *ids, tok.eos_id], [False, *learned, True]
            ids, learned = ids[: seq_len + 1], learned[: seq_len + 1]
            n_in = len(ids) - 1
            self.inputs[i, :n_in], self.targets[i, :n_in] = ids[:-1], ids[1:]
            self.mask[i, :n_in] = learned[1:]  # a target is learned where its token is
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
