import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.metrics import add_sums, token_losses
from jaxlm.writers import format_line, truncate_jsonl


def test_truncate_keeps_history_up_to_the_restored_step_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 6, "loss": 0.4}\n{"step": 8, "lo')
    truncate_jsonl(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]


def test_sums_accumulate_in_float64():
    total = add_sums(None, {"loss_sum": 1e8, "tokens": 1.0})
    total = add_sums(total, {"loss_sum": 1.0, "tokens": 1.0})
    assert total == {"loss_sum": 100000001.0, "tokens": 2.0}


def test_console_line():
    line = format_line(100, 800, "train", {"loss": 3.14159, "learning_rate": 0.003, "tokens_per_s": 14800.4,
                                           "eta_s": 3725.0})
    assert line == "step 100/800 train loss 3.142 lr 3.00e-03 tok/s 14,800 eta 1:02:05"


@pytest.mark.parametrize("smoothing, vocab", [(0.0, 11), (0.1, 11), (0.2, 9)])
def test_token_losses_and_their_gradient_equal_the_textbook_formula(smoothing, vocab):
    """The fused cross-entropy (its own gradient, targets found by comparing ids) against autodiff
    of log_softmax over the first `vocab` ids, a gather and the smoothing's mean over them; the
    padded ids (vocab < 11) take no probability and get no gradient."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(3, 5)), jnp.int32)
    weights = jnp.asarray(rng.random((3, 5)) < 0.7, jnp.float32)
    scale = jnp.asarray(rng.random((3, 5)), jnp.float32)  # a different weight on the perplexity term

    def textbook(x):
        logp = jax.nn.log_softmax(x[..., :vocab], -1)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        loss = (1 - smoothing) * nll - smoothing * logp.mean(-1)
        correct = (-nll >= logp.max(-1)).astype(jnp.float32)
        return (loss * weights).sum() + (nll * scale).sum(), (loss, nll, correct)

    def fused(x):
        loss, nll, correct = token_losses(x, targets, smoothing, vocab)
        return (loss * weights).sum() + (nll * scale).sum(), (loss, nll, correct)

    (want, want_parts), want_grad = jax.value_and_grad(textbook, has_aux=True)(logits)
    (got, got_parts), got_grad = jax.value_and_grad(fused, has_aux=True)(logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_parts, want_parts):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(want_grad).max()) > 0.1
    assert not np.asarray(got_grad)[..., vocab:].any()
