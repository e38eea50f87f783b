"""Metric sums and the loss made of them (device side), and the host-side metrics made of sums.

Writers (console, metrics.jsonl, TensorBoard) live in `jaxlm.writers`."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def objective(sums: dict[str, Any], terms: tuple[tuple[str, str], ...],
              totals: dict[str, Any] | None = None) -> Any:
    """The loss to differentiate: the sum over `terms` (sum key, denominator key) of each sum
    divided by its denominator, taken from `totals` (the whole batch's) when given, else `sums`."""
    counts = sums if totals is None else totals
    return sum(sums[s] / jnp.maximum(counts[d], 1.0) for s, d in terms)


def token_losses(logits: Array, targets: Array, smoothing: float = 0.0, vocab: int | None = None
                 ) -> tuple[Array, Array, Array]:
    """Per-token (label-smoothed loss, plain cross-entropy, correct) of `logits` [..., vocab_padded]
    against `targets` [...]: each [...].

    The softmax runs over the first `vocab` ids (the tokenizer's; the rest is padding of the
    table, rounded up so it shards): padding rows take no probability and get no gradient, so a
    padded table computes what the tokenizer's alone would (as a model imported from Hugging Face
    computes there). With `smoothing` e, the target takes 1 - e of the probability and those ids
    share e evenly. A prediction is correct when the target's logit is the largest.

    Written with its own gradient, `softmax - target distribution`, computed in one pass over
    the logits with the target found by comparing ids (no gather, no scatter-add, no padded
    copy): autodiff of log_softmax and take_along_axis made four passes over a [tokens, vocab]
    array, a sixth of a small encoder-decoder's step on CPUs (`docs/benchmarks.md`).
    """
    return _token_losses(logits, targets, float(smoothing), logits.shape[-1] if vocab is None else vocab)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_losses(logits: Array, targets: Array, smoothing: float, vocab: int) -> tuple[Array, Array, Array]:
    return _token_losses_fwd(logits, targets, smoothing, vocab)[0]


def _token_losses_fwd(logits: Array, targets: Array, smoothing: float, vocab: int):
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    if vocab < logits.shape[-1]:  # padding rows of the table: out of the softmax
        logits = jnp.where(ids < vocab, logits, -jnp.inf)
    top = jax.lax.stop_gradient(logits.max(-1))  # [...]: one max serves the log-sum-exp and accuracy
    lse = jnp.log(jnp.exp(logits - top[..., None]).sum(-1)) + top  # [...]
    target = jnp.where(ids == targets[..., None], logits, 0).sum(-1)  # [...]
    nll = lse - target
    loss = nll
    if smoothing:
        real = logits if vocab == logits.shape[-1] else jnp.where(ids < vocab, logits, 0)
        loss = (1.0 - smoothing) * nll + smoothing * (lse - real.sum(-1) / vocab)
    correct = (target >= top).astype(logits.dtype)
    return (loss, nll, correct), (logits, targets, lse)


def _token_losses_bwd(smoothing: float, vocab: int, res: tuple, grads: tuple) -> tuple[Array, None]:
    logits, targets, lse = res
    g_loss, g_nll, _ = grads  # [...] each; `correct` has no gradient
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    at_target = ((1.0 - smoothing) * g_loss + g_nll)[..., None]
    d = (g_loss + g_nll)[..., None] * jnp.exp(logits - lse[..., None]) - jnp.where(ids == targets[..., None], at_target, 0)
    if smoothing:
        spread = (smoothing / vocab) * g_loss[..., None]
        d = d - (spread if vocab == logits.shape[-1] else jnp.where(ids < vocab, spread, 0))
    return d.astype(logits.dtype), None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def token_sums(logits: Array, targets: Array, weights: Array, vocab: int | None = None) -> tuple[Array, Array]:
    """(summed cross-entropy, correct predictions) of weighted tokens; logits [..., vocab_padded]
    float32, the softmax over their first `vocab` ids (None: all; see `token_losses`)."""
    losses, _, correct = token_losses(logits, targets, vocab=vocab)
    return (losses * weights).sum(), (correct * weights).sum()


def chunked_token_sums(project: Callable[[Any, Array], Array], head: Any, hidden: Array, targets: Array,
                       weights: Array, chunk: int, vocab: int | None = None) -> tuple[Array, Array]:
    """`token_sums` of `project(head, hidden)`, `chunk` positions of every row at a time.

    Only one slice's logits [batch, chunk, vocab] exist at once, in the forward and (recomputed)
    in the backward pass, instead of the whole [batch, length, vocab]: the float32 logits of a
    large vocabulary are most of a decoder's activation memory. Rows stay whole across slices, so
    the batch keeps its sharding.

    Args:
      project: (head, hidden [batch, chunk, embed]) -> logits [batch, chunk, vocab].
      head: the output layer's parameters (passed through, so gradients reach them).
      hidden: [batch, length, embed]; targets, weights: [batch, length]. `chunk` divides length.
    """
    rows, length = targets.shape
    def slices(x: Array) -> Array:  # [batch, length, ...] -> [length / chunk, batch, chunk, ...]
        return jnp.moveaxis(x.reshape(rows, length // chunk, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(head: Any, h: Array, t: Array, w: Array) -> tuple[Array, Array]:
        return token_sums(project(head, h), t, w, vocab)

    def body(carry: tuple[Array, Array], xs: tuple[Array, Array, Array]) -> tuple[tuple[Array, Array], None]:
        loss_sum, correct = one(head, *xs)
        return (carry[0] + loss_sum, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (slices(hidden), slices(targets), slices(weights)))
    return loss_sum, correct


def token_metrics(sums: dict[str, float], count_key: str) -> dict[str, float]:
    """Mean loss, perplexity and accuracy over the `count_key` predictions of summed metrics."""
    count = max(float(sums[count_key]), 1.0)
    loss = float(sums["loss_sum"]) / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": float(sums["correct"]) / count}


def add_sums(total: dict[str, Any] | None, sums: dict[str, Any]) -> dict[str, float]:
    """Accumulates metric sums on the host (float64)."""
    sums = {k: float(np.asarray(v, np.float64)) for k, v in jax.device_get(sums).items()}
    if total is None:
        return sums
    return {k: total[k] + sums[k] for k in total}


def normalize_answer(text: str) -> str:
    """SQuAD's official answer normalization: lower case, no punctuation, no articles (a, an,
    the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def span_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of normalized answers (both empty: 1; one empty: 0), as the official script."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and F1 (percent, max over each question's gold answers) of predictions keyed
    by question id; an unanswerable question's gold is [""]. Where a split has unanswerable
    questions (SQuAD 2.0), also the answerable (`has_ans_*`) and unanswerable (`no_ans_*`) parts."""
    rows = {}
    for qid, answers in golds.items():
        answers = answers or [""]
        pred = predictions.get(qid, "")
        rows[qid] = (max(exact_match(pred, a) for a in answers), max(span_f1(pred, a) for a in answers),
                     answers == [""])

    def mean(part: list[tuple[float, float, bool]]) -> tuple[float, float]:
        n = max(len(part), 1)
        return 100 * sum(r[0] for r in part) / n, 100 * sum(r[1] for r in part) / n

    out = dict(zip(("exact_match", "f1"), mean(list(rows.values()))))
    if any(r[2] for r in rows.values()):
        out.update(zip(("has_ans_exact_match", "has_ans_f1"), mean([r for r in rows.values() if not r[2]])))
        out["no_ans_exact_match"] = mean([r for r in rows.values() if r[2]])[0]
    return out


def text_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenization, one reference) and the mean
    ROUGE-1/2/L F-measures (rouge-score, stemmed) of generated texts against references, in
    percent."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    out = {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
           "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}
    for name in ("rouge1", "rouge2", "rougeL"):
        out[name] = 100.0 * float(np.mean([r[name].fmeasure for r in rouge])) if rouge else 0.0
    return out
