import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.decoding import generate, sample_logits


def test_greedy_is_argmax():
    logits = jnp.asarray([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    assert sample_logits(logits, jax.random.key(0), 0.0).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 4)
    top2 = sample_logits(logits, keys[0], 1.0, top_k=2)
    assert set(np.unique(top2).tolist()) == {0, 1}
    nucleus = sample_logits(logits, keys[1], 1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8
    assert set(np.unique(nucleus).tolist()) == {0, 1}
    nucleus = sample_logits(logits, keys[2], 1.0, top_p=0.81)
    assert set(np.unique(nucleus).tolist()) == {0, 1, 2}
    full = sample_logits(logits, keys[3], 1.0)
    assert set(np.unique(full).tolist()) == {0, 1, 2, 3}


def test_generate_stops_at_eos_and_pads():
    vocab, eos, pad = 5, 4, 0

    def counter(tokens, segment_ids, positions, cache):
        # next token = last token + 1: prompt [.., 1] -> 2, 3, 4 (eos), then padding
        logits = jax.nn.one_hot((tokens + 1) % vocab, vocab) * 10.0
        return logits, cache + tokens.shape[1]

    prompt = jnp.asarray([[0, 1], [1, 2]])
    mask = jnp.asarray([[0, 1], [1, 1]])
    out = generate(counter, jnp.zeros(()), prompt, mask, jax.random.key(0), max_new_tokens=5,
                   eos_id=eos, pad_id=pad, temperature=0.0)
    assert out.tolist() == [[2, 3, 4, 0, 0], [3, 4, 0, 0, 0]]
