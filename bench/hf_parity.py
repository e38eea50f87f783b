"""Parity of imported Hugging Face decoders with transformers, on the golden fixtures.

    python bench/hf_parity.py

Imports each small random model of `tests/golden/` (made by `make_hf_golden.py` with
transformers) and prints one row each: the largest absolute difference between jaxlm's logits
and transformers' on a 2 x 12 batch, and how many of transformers' greedy tokens (3 prompts x
32, from its `generate`) jaxlm's KV-cached greedy decoding gives back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import decoding, hf, infer  # noqa: E402
from jaxlm.workdir import open_run  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
MODELS = ("tiny_gpt2", "tiny_llama", "tiny_mistral", "tiny_qwen2")


def parity(name: str, workdir: Path) -> tuple[str, float, int, int]:
    hf.main(["import", "--hf-dir", str(GOLDEN / name), "--workdir", str(workdir)])
    run, ckpt = open_run(workdir)
    params, _ = ckpt.restore_params(run.compiled.abstract_state.params)
    golden = np.load(GOLDEN / name / "logits.npz")
    model, vocab = run.task.model, golden["logits"].shape[-1]
    logits = jax.jit(lambda p, ids: model.apply({"params": p}, ids))(params, jnp.asarray(golden["input_ids"]))
    prompts = jnp.asarray(golden["prompts"], jnp.int32)
    length = prompts.shape[1] + golden["greedy"].shape[1]
    shape = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((len(prompts), length), jnp.int32),
                                              decode=True))["cache"]
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    greedy = jax.jit(lambda p, c: decoding.generate(
        infer.cached_logits(model, p, vocab), c, prompts, jnp.ones_like(prompts), jax.random.key(0),
        max_new_tokens=golden["greedy"].shape[1], eos_id=-1, pad_id=0, temperature=0.0))(params, cache)
    diff = float(np.abs(np.asarray(logits)[..., :vocab] - golden["logits"]).max())
    return name, diff, int((np.asarray(greedy) == golden["greedy"]).sum()), golden["greedy"].size


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            rows.append(parity(name, Path(tmp) / name))
    print("| model | max abs logit difference | greedy tokens equal |")
    print("| --- | --- | --- |")
    for name, diff, equal, total in rows:
        print(f"| {name} | {diff:.2g} | {equal} / {total} |")


if __name__ == "__main__":
    main()
