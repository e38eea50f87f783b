from functools import partial

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


V, EOS, L = 4, 3, 4  # a toy model: 4 tokens, 3 ends a hypothesis, at most 4 new tokens


def toy(table: np.ndarray):
    """A history-dependent toy model: the next token's logits depend on the position, the last
    token and the sum of every token fed so far (held in the cache), so beams that share a last
    token still differ, and a cache not reordered with its beams gives wrong scores."""
    def tokens_to_logits(tokens, segment_ids, positions, cache):
        history = (cache + (tokens * segment_ids).sum(1)) % V  # [batch]
        logits = jnp.asarray(table)[positions[:, -1], tokens[:, -1], history]  # [batch, V]
        return jnp.repeat(logits[:, None], tokens.shape[1], axis=1), history
    return tokens_to_logits


def repeats(seq, n: int) -> bool:
    """Whether some n tokens in a row occur twice in `seq`."""
    grams = [tuple(seq[j:j + n]) for j in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def exhaustive(table: np.ndarray, prompt: list[int], alpha: float, limit: int = L,
               no_repeat_ngram: int = 0) -> list[tuple[list[int], float]]:
    """Every hypothesis, best first: each sequence that ends at EOS within `limit` tokens, or
    runs `limit` tokens without one (and repeats no n-gram of `no_repeat_ngram` tokens), scored
    by its log-probability over the length penalty."""
    import itertools

    from jaxlm.decoding import length_penalty
    out = []
    for n in range(1, limit + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1] or (n < limit and seq[-1] != EOS) or (no_repeat_ngram and repeats(seq, no_repeat_ngram)):
                continue
            last, position, history, total = prompt[-1], len(prompt) - 1, sum(prompt) % V, 0.0
            for token in seq:
                total += float(jax.nn.log_softmax(table[position, last, history])[token])
                last, position, history = token, position + 1, (history + token) % V
            out.append((list(seq), total / float(length_penalty(n, alpha))))
    return sorted(out, key=lambda x: -x[1])


def test_beam_search_finds_the_exhaustive_optimum():
    """With a beam wide enough to keep every hypothesis and no length penalty (where stopping
    early is exact), beam search returns the enumerated best 8 hypotheses in order, for rows of
    different prompt lengths in one batch."""
    from jaxlm.decoding import beam_search
    rng = np.random.default_rng(0)
    prompts, mask = jnp.asarray([[0, 1, 2], [2, 0, 1]]), jnp.asarray([[0, 1, 1], [1, 1, 1]])
    for seed in range(6):
        table = rng.normal(0, 2, (8, V, V, V)).astype(np.float32)
        table[..., EOS] -= 2.0  # longer hypotheses win often enough
        search = partial(beam_search, toy(table), jnp.zeros(2, jnp.int32), beam_size=27, max_new_tokens=L,
                         eos_id=EOS, pad_id=0, alpha=0.0)
        tokens, scores = jax.jit(search)(prompts, mask)
        for row, prompt in enumerate(([1, 2], [2, 0, 1])):
            for rank, (want, score) in enumerate(exhaustive(table, prompt, 0.0)[:8]):
                got = tokens[row, rank].tolist()
                assert got == want + [0] * (L - len(want)), (seed, row, rank)
                np.testing.assert_allclose(float(scores[row, rank]), score, rtol=1e-5)


def test_a_row_limit_ends_that_rows_hypotheses_where_it_says():
    """Per-row limits (e.g. from source lengths): each row's beams are the enumerated best of
    its own limit, in one batch with a row that runs the whole max_new_tokens."""
    from jaxlm.decoding import beam_search
    rng = np.random.default_rng(2)
    prompts, mask = jnp.asarray([[0, 1, 2], [2, 0, 1]]), jnp.asarray([[0, 1, 1], [1, 1, 1]])
    for seed in range(4):
        table = rng.normal(0, 2, (8, V, V, V)).astype(np.float32)
        table[..., EOS] -= 2.0
        tokens, scores = beam_search(toy(table), jnp.zeros(2, jnp.int32), prompts, mask, beam_size=27,
                                     max_new_tokens=L, eos_id=EOS, pad_id=0, alpha=0.6, limits=jnp.asarray([2, L]))
        for row, (prompt, limit) in enumerate((([1, 2], 2), ([2, 0, 1], L))):
            for rank, (want, score) in enumerate(exhaustive(table, prompt, 0.6, limit)[:5]):
                assert tokens[row, rank].tolist() == want + [0] * (L - len(want)), (seed, row, rank)
                np.testing.assert_allclose(float(scores[row, rank]), score, rtol=1e-5)


def test_beam_of_one_is_greedy():
    """Also under per-row limits, which cut greedy rows where they cut beams, and with repeated
    bigrams blocked."""
    from jaxlm.decoding import beam_search
    rng = np.random.default_rng(1)
    prompts, mask = jnp.asarray([[1, 2], [0, 3]]), jnp.asarray([[1, 1], [0, 1]])
    for i in range(10):
        limits = jnp.asarray([1 + i % L, L])
        table = rng.normal(0, 2, (8, V, V, V)).astype(np.float32)
        table[..., EOS] -= 2.0
        no_repeat_ngram = 2 * (i % 2)  # and with repeated bigrams blocked
        greedy = generate(toy(table), jnp.zeros(2, jnp.int32), prompts, mask, jax.random.key(0), max_new_tokens=L,
                          eos_id=EOS, pad_id=-1, temperature=0.0, limits=limits, no_repeat_ngram=no_repeat_ngram)
        beam, _ = beam_search(toy(table), jnp.zeros(2, jnp.int32), prompts, mask, beam_size=1, max_new_tokens=L,
                              eos_id=EOS, pad_id=-1, alpha=0.6, limits=limits, no_repeat_ngram=no_repeat_ngram)
        np.testing.assert_array_equal(np.asarray(beam[:, 0]), np.asarray(greedy))
        assert (np.asarray(greedy)[0] >= 0).sum() <= limits[0], i


def test_blocking_repeated_ngrams_bans_exactly_the_tokens_that_would_repeat_one():
    """Against a reference on random short histories: a token is banned iff the n-gram it would
    end already occurs among the first `length` tokens, for n 1 to 3."""
    from jaxlm.decoding import block_repeated_ngrams
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        for _ in range(30):
            tokens, length = rng.integers(0, 3, (4, 7)), int(rng.integers(0, 8))
            out = np.asarray(block_repeated_ngrams(jnp.zeros((4, 5)), jnp.asarray(tokens), length, n))
            for row in range(4):
                history = tokens[row, :length].tolist()
                for v in range(5):
                    would = len(history) >= n and tuple((history + [v])[-n:]) in {
                        tuple(history[j:j + n]) for j in range(len(history) - n + 1)}
                    assert (out[row, v] == -np.inf) == would, (n, history, v)


def test_beam_search_without_repeated_ngrams_finds_the_constrained_optimum():
    """With no_repeat_ngram=2, beam search returns the enumerated best hypotheses that repeat no
    two tokens in a row, with the model's own scores; without it, the best hypothesis of some
    seeds does repeat one (so the constraint is what changed them)."""
    from jaxlm.decoding import beam_search
    rng = np.random.default_rng(3)
    prompts, mask = jnp.asarray([[0, 1, 2], [2, 0, 1]]), jnp.asarray([[0, 1, 1], [1, 1, 1]])
    unconstrained_repeats = 0
    for seed in range(6):
        table = rng.normal(0, 2, (8, V, V, V)).astype(np.float32)
        table[..., EOS] -= 3.0
        search = partial(beam_search, toy(table), jnp.zeros(2, jnp.int32), beam_size=27, max_new_tokens=L,
                         eos_id=EOS, pad_id=0, alpha=0.0)
        tokens, scores = jax.jit(partial(search, no_repeat_ngram=2))(prompts, mask)
        free, _ = jax.jit(search)(prompts, mask)
        for row, prompt in enumerate(([1, 2], [2, 0, 1])):
            for rank, (want, score) in enumerate(exhaustive(table, prompt, 0.0, no_repeat_ngram=2)[:5]):
                assert tokens[row, rank].tolist() == want + [0] * (L - len(want)), (seed, row, rank)
                np.testing.assert_allclose(float(scores[row, rank]), score, rtol=1e-5)
            unconstrained_repeats += repeats(free[row, 0].tolist(), 2)
    assert unconstrained_repeats > 0


def test_greedy_without_repeated_ngrams_takes_the_next_best_token():
    """A model that always prefers token 1, then 2, then 3: greedy repeats 1; with n = 1 no
    token occurs twice (1, 2, 3, then EOS); with n = 2 the bigram (1, 1) occurs once only."""
    vocab, eos = 5, 4

    def stuck(tokens, segment_ids, positions, cache):
        return jnp.broadcast_to(jnp.asarray([0.0, 9.0, 8.0, 7.0, 6.0]), (*tokens.shape, vocab)), cache

    prompt = jnp.asarray([[0], [0]])
    run = partial(generate, stuck, jnp.zeros(()), prompt, jnp.ones_like(prompt), jax.random.key(0), max_new_tokens=6,
                  eos_id=eos, pad_id=-1, temperature=0.0)
    assert run()[0].tolist() == [1] * 6
    assert run(no_repeat_ngram=1)[0].tolist() == [1, 2, 3, 4, -1, -1]
    assert run(no_repeat_ngram=2)[0].tolist() == [1, 1, 2, 1, 3, 1]


def test_a_rows_beams_do_not_depend_on_the_rows_beside_it():
    """A row stops once its best live hypothesis cannot beat its finished ones (at its current
    length); rows beside it that search on must not change its result, although with a
    length penalty its live hypotheses would still score better later."""
    from jaxlm.decoding import beam_search
    rng = np.random.default_rng(3)
    prompts, mask = jnp.asarray([[0, 1, 2], [2, 0, 1]]), jnp.asarray([[0, 1, 1], [1, 1, 1]])
    search = jax.jit(partial(beam_search, beam_size=2, max_new_tokens=12, eos_id=EOS, pad_id=0, alpha=2.0),
                     static_argnums=0)
    for seed in range(20):
        table = rng.normal(0, 2, (16, V, V, V)).astype(np.float32)
        together, together_scores = search(toy(table), jnp.zeros(2, jnp.int32), prompts, mask)
        for row in range(2):
            alone, alone_scores = search(toy(table), jnp.zeros(1, jnp.int32), prompts[row:row + 1], mask[row:row + 1])
            assert together[row].tolist() == alone[0].tolist(), (seed, row)
            np.testing.assert_allclose(together_scores[row], alone_scores[0], rtol=1e-6)
