"""Autoregressive decoding over a `tokens_to_logits` callable (imports no model): greedy and
sampled generation, and beam search.

The callable has the signature

    tokens_to_logits(tokens, segment_ids, positions, cache) -> (logits, cache)

with tokens/segment_ids/positions [batch, q] and logits [batch, q, vocab]; it appends the q
new positions to the KV cache. Prompts are left-padded (segment id 0 on padding) so that every
row's next token goes to the same cache slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
TokensToLogits = Callable[[Array, Array, Array, Any], tuple[Array, Any]]


def sample_logits(logits: Array, rng: Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """Draws one token per row from logits [batch, vocab].

    temperature 0 is greedy (argmax, deterministic). top_k > 0 keeps the k most likely tokens;
    top_p < 1 keeps the smallest set whose probability reaches p (nucleus sampling).
    """
    if temperature == 0.0:
        return logits.argmax(-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [batch, vocab], descending
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # the smallest logit still needed to reach top_p (the most likely token always stays)
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def prefill(tokens_to_logits: TokensToLogits, cache: Any, prompt: Array, prompt_mask: Array, rng: Array,
            temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> tuple[Array, Array, Any]:
    """Reads left-padded prompts into the cache and draws each row's first new token.

    Returns (token [batch], prompt lengths [batch], cache).
    """
    mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = tokens_to_logits(prompt, mask, positions, cache)
    return sample_logits(logits[:, -1], rng, temperature, top_k, top_p), mask.sum(axis=1), cache


def extend(tokens_to_logits: TokensToLogits, cache: Any, token: Array, positions: Array, rng: Array,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           logits_filter: Callable[[Array], Array] | None = None) -> tuple[Array, Any]:
    """Feeds each row's last token [batch] at its position [batch]; returns the next token
    [batch] (drawn from `logits_filter(logits)` where given) and the cache."""
    ones = jnp.ones((token.shape[0], 1), jnp.int32)
    logits, cache = tokens_to_logits(token[:, None], ones, positions[:, None], cache)
    logits = logits[:, -1] if logits_filter is None else logits_filter(logits[:, -1])
    return sample_logits(logits, rng, temperature, top_k, top_p), cache


def block_repeated_ngrams(logits: Array, tokens: Array, length: Array | int, n: int) -> Array:
    """`logits` [batch, vocab] at -inf for each token that would repeat an n-gram: one that,
    appended to `tokens[:, :length]` [batch, max_len], ends an n-gram already in them (n 1: any
    token in them). n 0: `logits` unchanged."""
    if n == 0:
        return logits
    (batch, max_len), vocab = tokens.shape, logits.shape[-1]
    padded = jnp.pad(tokens, ((0, 0), (0, n)))
    # the n-gram starting at each j < length - n + 1: do its first n - 1 tokens equal the last
    # n - 1, and which token follows them
    match = jnp.broadcast_to(jnp.arange(max_len) <= length - n, (batch, max_len))
    last = jax.lax.dynamic_slice_in_dim(padded, jnp.maximum(length - (n - 1), 0), n - 1, axis=1)  # [batch, n - 1]
    for m in range(n - 1):
        match &= padded[:, m:m + max_len] == last[:, m:m + 1]
    follows = padded[:, n - 1:n - 1 + max_len]
    rows = jnp.arange(batch)[:, None]
    banned = jnp.zeros((batch, vocab), bool).at[rows, jnp.where(match, follows, vocab)].set(True, mode="drop")
    return jnp.where(banned, -jnp.inf, logits)


def generate(tokens_to_logits: TokensToLogits, cache: Any, prompt: Array, prompt_mask: Array,
             rng: Array, max_new_tokens: int, eos_id: int | tuple[int, ...], pad_id: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, limits: Array | None = None, no_repeat_ngram: int = 0) -> Array:
    """Continues left-padded prompts; returns the new tokens [batch, max_new_tokens].

    Rows stop at EOS (which is kept) and are padded with `pad_id` after it; the loop ends
    early once every row has stopped. The first token's key is `split(rng)[1]`, and each later
    token's the second half of splitting the key left over, so a caller stepping `prefill` and
    `extend` with the same keys draws the same tokens (`jaxlm.infer` streams that way).

    Args:
      cache: an empty KV cache with room for prompt length + max_new_tokens positions.
      prompt: [batch, P] token ids, left-padded.
      prompt_mask: [batch, P], 1 on real prompt tokens.
      limits: [batch], each row's most new tokens (at most max_new_tokens), e.g. from its
        source's length; None: max_new_tokens for every row.
      no_repeat_ngram: n > 0: no n tokens in a row occur twice among a row's new tokens.
    """
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    batch = prompt.shape[0]
    rng, first_rng = jax.random.split(rng)
    token, lengths, cache = prefill(tokens_to_logits, cache, prompt, prompt_mask, first_rng, **sampling)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    ends = jnp.asarray(eos_id, jnp.int32).reshape(-1)  # any of these ends a row
    limits = jnp.full((batch,), max_new_tokens) if limits is None else limits
    done = jnp.isin(token, ends) | (limits <= 1)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, token, done, out, rng = carry
        rng, step_rng = jax.random.split(rng)
        new, cache = extend(tokens_to_logits, cache, token, lengths + i - 1, step_rng, **sampling,
                            logits_filter=lambda logits: block_repeated_ngrams(logits, out, i, no_repeat_ngram))
        new = jnp.where(done, pad_id, new)
        out = out.at[:, i].set(new)
        return i + 1, cache, new, done | jnp.isin(new, ends) | (limits <= i + 1), out, rng

    carry = (jnp.asarray(1), cache, token, done, out, rng)
    return jax.lax.while_loop(cond, body, carry)[4]


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT's length normalisation ((5 + length) / 6) ** alpha, as T5 uses it; alpha 0 is none."""
    return ((5.0 + length) / 6.0) ** alpha


def _beams(tree: Any, select: Callable[[Array], Array], axis: int | Any, skip: frozenset[str] = frozenset()) -> Any:
    """`select` applied along `axis` (the batch of beams) of every cache array that has it (not
    the scalar cache indices) and is not named in `skip`; `axis` is one int or a tree of ints, a
    prefix of the cache's."""
    def along(ax: int, subtree: Any) -> Any:
        def one(path: tuple, x: Array) -> Array:
            if x.ndim <= ax or (path and getattr(path[-1], "key", None) in skip):
                return x
            return jnp.moveaxis(select(jnp.moveaxis(x, ax, 0)), 0, ax)
        return jax.tree_util.tree_map_with_path(one, subtree)

    return jax.tree_util.tree_map(along, axis, tree)


def beam_search(tokens_to_logits: TokensToLogits, cache: Any, prompt: Array, prompt_mask: Array,
                beam_size: int, max_new_tokens: int, eos_id: int | tuple[int, ...], pad_id: int,
                alpha: float = 0.6, cache_batch_axis: int | Any = 0, limits: Array | None = None,
                no_repeat_ngram: int = 0, per_prompt: frozenset[str] = frozenset()) -> tuple[Array, Array]:
    """Batched beam search continuing left-padded prompts.

    Each step extends every live hypothesis by every token and keeps the `2 * beam_size` best
    candidates: those ending in an end token enter the finished hypotheses if they rank among
    the first `beam_size` (so a beam of 1 is greedy decoding), the best `beam_size` others live
    on. A finished hypothesis scores its summed log-probability over `length_penalty` of its
    length (end token included). A row stops once it has `beam_size` finished hypotheses and
    its best live one, normalised at its current length, scores no better than the worst of
    them (exact when alpha is 0), whatever the rows beside it do; the search stops when every
    row has, or at `max_new_tokens`, where the live hypotheses count as finished. A row with a
    shorter limit finishes its live hypotheses the same way when they reach it.

    Args:
      cache: an empty KV cache for the prompt batch, with room for prompt length +
        max_new_tokens positions; it is repeated for the beams along `cache_batch_axis` (1 when
        the layers are scanned and the cache has a leading layer axis), one int or a tree of
        ints whose structure is a prefix of the cache's (an axis for each part).
      prompt: [batch, P] token ids, left-padded; prompt_mask [batch, P], 1 on real tokens.
      limits: [batch], each row's most new tokens (at most max_new_tokens), e.g. from its
        source's length; None: max_new_tokens for every row.
      no_repeat_ngram: n > 0: no n tokens in a row occur twice among a hypothesis's new tokens
        (the other scores are the model's own, not renormalised).
      per_prompt: names of cache entries that are the same for every beam of a row (an
        encoder's keys and values for cross-attention): repeated for the beams, never reordered.

    Returns:
      tokens [batch, beam_size, max_new_tokens] (end token kept, `pad_id` after it), best first,
      and their scores [batch, beam_size].
    """
    batch, k = prompt.shape[0], beam_size
    ends = jnp.asarray(eos_id, jnp.int32).reshape(-1)
    limits = jnp.full((batch,), max_new_tokens) if limits is None else limits
    mask = prompt_mask.astype(jnp.int32)
    logits, cache = tokens_to_logits(prompt, mask, jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), cache)
    lengths = jnp.repeat(mask.sum(axis=1), k)  # [batch * k]
    cache = _beams(cache, lambda x: jnp.repeat(x, k, axis=0), cache_batch_axis)
    logp = jnp.repeat(jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)), k, axis=0)  # [batch * k, vocab]
    vocab = logp.shape[-1]
    neg = -jnp.inf
    none = jnp.full((batch, k, max_new_tokens), pad_id, jnp.int32)
    alive_score = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg), (batch, 1))  # one beam until they differ
    fin_score = jnp.full((batch, k), neg)

    def rows_done(alive_score, fin_score, i):  # [batch]
        best_alive = alive_score[:, 0] / length_penalty(i, alpha)
        return (fin_score[:, -1] > neg) & (best_alive <= fin_score[:, -1])

    def cond(carry):
        i, _, _, alive_score, _, fin_score, _ = carry
        return (i < max_new_tokens) & ~jnp.all(rows_done(alive_score, fin_score, i))

    def body(carry):
        i, cache, logp, alive_score, alive, fin_score, fin = carry
        stopped = rows_done(alive_score, fin_score, i)  # these rows' results stay as they are
        kept = fin
        logp = block_repeated_ngrams(logp, alive.reshape(batch * k, -1), i, no_repeat_ngram)
        candidates = (alive_score[:, :, None] + logp.reshape(batch, k, vocab)).reshape(batch, k * vocab)
        top_score, top = jax.lax.top_k(candidates, 2 * k)  # [batch, 2k]
        origin, token = top // vocab, (top % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive, origin[:, :, None], axis=1).at[:, :, i].set(token)  # [batch, 2k, len]
        ending = jnp.isin(token, ends)
        # finished: end tokens among the first k candidates, merged with those before
        done_score = jnp.where(ending & (jnp.arange(2 * k) < k), top_score / length_penalty(i + 1.0, alpha), neg)
        pool_score, pool = jax.lax.top_k(jnp.concatenate([fin_score, done_score], axis=1), k)
        fin = jnp.take_along_axis(jnp.concatenate([fin, seqs], axis=1), pool[:, :, None], axis=1)
        # alive: the best k candidates that did not end
        alive_score, keep = jax.lax.top_k(jnp.where(ending, neg, top_score), k)
        alive = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
        # rows at their limit: the live hypotheses (i + 1 tokens) count as finished, none live on
        stop = (i + 1 >= limits)[:, None]  # [batch, 1]
        pool_score, pool = jax.lax.top_k(jnp.concatenate(
            [pool_score, jnp.where(stop, alive_score / length_penalty(i + 1.0, alpha), neg)], axis=1), k)
        fin = jnp.take_along_axis(jnp.concatenate([fin, alive], axis=1), pool[:, :, None], axis=1)
        alive_score = jnp.where(stop | stopped[:, None], neg, alive_score)
        pool_score = jnp.where(stopped[:, None], fin_score, pool_score)
        fin = jnp.where(stopped[:, None, None], kept, fin)
        rows = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(origin, keep, axis=1)).reshape(-1)
        cache = _beams(cache, lambda x: x[rows], cache_batch_axis, per_prompt)
        token = jnp.take_along_axis(token, keep, axis=1).reshape(-1)
        ones = jnp.ones((batch * k, 1), jnp.int32)
        logits, cache = tokens_to_logits(token[:, None], ones, (lengths + i)[:, None], cache)
        logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))
        return i + 1, cache, logp, alive_score, alive, pool_score, fin

    carry = (jnp.asarray(0), cache, logp, alive_score, none, fin_score, none)
    i, _, _, alive_score, alive, fin_score, fin = jax.lax.while_loop(cond, body, carry)
    # live hypotheses at the end count as finished, at their length
    score, best = jax.lax.top_k(jnp.concatenate([fin_score, alive_score / length_penalty(i, alpha)], axis=1), k)
    return jnp.take_along_axis(jnp.concatenate([fin, alive], axis=1), best[:, :, None], axis=1), score
