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


def test_generate_stops_at_any_of_several_end_tokens():
    """A chat model ends its turn with one token and its text with another: either stops a row."""
    vocab = 6

    def counter(tokens, segment_ids, positions, cache):
        logits = jax.nn.one_hot((tokens + 1) % vocab, vocab) * 10.0
        return logits, cache

    prompt = jnp.asarray([[1], [3]])
    out = generate(counter, jnp.zeros(()), prompt, jnp.ones_like(prompt), jax.random.key(0), max_new_tokens=4,
                   eos_id=(3, 5), pad_id=0, temperature=0.0)
    assert out.tolist() == [[2, 3, 0, 0], [4, 5, 0, 0]]


def test_tokenizer_end_ids_include_end_of_turn_tokens():
    from tokenizers import Tokenizer, models

    from jaxlm.data.tokenizer import TextTokenizer
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2, "hi": 3}
    tok = TextTokenizer(Tokenizer(models.WordLevel(vocab, unk_token="hi")), 1, 0, 1)
    assert tok.end_ids == (1, 2)
