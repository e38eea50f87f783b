"""Hugging Face weight files: one `model.safetensors`, or shards listed by
`model.safetensors.index.json` (as `save_pretrained` writes models above its shard size).

Tensors are read one at a time, when asked for, so an import holds the checkpoint's tensors in
host memory only as they are converted and placed (`decoders.place_params`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.errors import UserError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
SHARD_BYTES = 5 * 2**30  # export: above this, shards of at most this size (transformers' default 5 GB)


def present(hf_dir: Path) -> bool:
    return (hf_dir / SINGLE).is_file() or (hf_dir / INDEX).is_file()


class Weights(Mapping):
    """name -> numpy array of a directory's safetensors file(s), read on access."""

    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        if (hf_dir / SINGLE).is_file():
            files = [hf_dir / SINGLE]
            self._where = {name: files[0] for name in self._names(files[0])}
        else:
            try:
                index = json.loads((hf_dir / INDEX).read_text(encoding="utf-8"))
                weight_map = index["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"'{hf_dir / INDEX}' is not a safetensors index ({str(e)[:120]})") from None
            self._where = {name: hf_dir / file for name, file in weight_map.items()}
            for file in sorted(set(self._where.values())):
                if not file.is_file():
                    raise UserError(f"'{file}' is named by {INDEX} but missing; copy every shard")
                listed = {n for n, f in self._where.items() if f == file}
                if missing := listed - set(self._names(file)):
                    raise UserError(f"'{file}' lacks {len(missing)} tensor(s) the index puts there, "
                                    f"e.g. {sorted(missing)[0]}")

    @staticmethod
    def _names(file: Path) -> list[str]:
        try:
            with safe_open(str(file), framework="numpy") as f:
                return list(f.keys())
        except Exception as e:  # truncated or not safetensors at all
            raise UserError(f"'{file}' is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                            "save it again") from None

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._where[name]
        try:
            with safe_open(str(file), framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise UserError(f"'{file}': tensor {name} cannot be read ({str(e).splitlines()[0][:120]}); "
                            "save the file again") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write(hf_dir: Path, tensors: dict[str, np.ndarray], shard_bytes: int | None = None) -> list[str]:
    """Saves `tensors` as `model.safetensors`, or above `shard_bytes` (default `SHARD_BYTES`) as
    shards `model-0000i-of-0000n.safetensors` with their index; returns the file names written."""
    shard_bytes = shard_bytes or SHARD_BYTES
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        save_file(tensors, str(hf_dir / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(hf_dir / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    (hf_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]
