"""`python -m jaxlm.infer`: use a trained model.

    python -m jaxlm.infer generate --workdir DIR [TEXT ...] [--prompt TEXT] [--input FILE]
        [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--no-repeat-ngram N]
        [--seed S] [--step N] [--chat [--system TEXT]] [--no-stream]
    python -m jaxlm.infer fill-mask --workdir DIR [TEXT ...] [--input FILE] [--top-k K]
    python -m jaxlm.infer classify --workdir DIR [TEXT ...] [--input FILE]
    python -m jaxlm.infer translate|summarize --workdir DIR [TEXT ...] [--input FILE] [--beam-size K]
        [--length-penalty A] [--no-repeat-ngram N] [--max-new-tokens N]
    python -m jaxlm.infer answer --workdir DIR --context TEXT [QUESTION ...] [--input FILE]
    python -m jaxlm.infer answer --workdir DIR --index INDEX [--retriever-workdir E] [--top-k K] [QUESTION ...]

Texts come from positional TEXT, repeated --prompt, and --input FILE (one per line) and are
run together in batches. generate decodes with a KV cache (--temperature 0 is greedy and
deterministic), stops at any of the tokenizer's end tokens and streams a single prompt's
continuation token by token; --chat makes each prompt a user's message in the run's chat
template and prints the assistant's answer; fill-mask predicts each mask token ([MASK] or <mask>) of a masked-LM run;
classify prints the label and its probability for a classification run; translate and
summarize print the output of a sequence-to-sequence run for each text (beam search, or greedy
with --beam-size 1); answer prints the span
of the context that answers each question, and its score, for a question-answering run (a
.jsonl --input gives each question its own context: {"question": ..., "context": ...}; with
--index, the contexts are the top-k passages an index retrieves, and the answer names its passage).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import decoding, encoder_infer
from jaxlm.config import DECODER_TASKS
from jaxlm.data import chat
from jaxlm.data.sources import json_lines
from jaxlm.errors import UserError, cli
from jaxlm.index import Index
from jaxlm.seq2seq_infer import Translator
from jaxlm.workdir import Run, open_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.infer", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue prompts with a causal LM",
                              description="Continue prompts with a causal LM (KV-cached sampling).")
    gen.add_argument("--workdir", required=True, help="a training run's directory")
    gen.add_argument("text", nargs="*", help="prompts")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--input", help="file with one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--no-repeat-ngram", type=int, default=0,
                     help="no N tokens in a row twice in a continuation (0: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    gen.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    gen.add_argument("--chat", action="store_true",
                     help="each prompt is a user's message, formatted by the run's chat template (sft.chat_template)")
    gen.add_argument("--system", help="with --chat: a system message before each prompt")
    gen.add_argument("--no-stream", action="store_true",
                     help="a single prompt is printed whole at the end, not token by token")
    def texts_command(name: str, what: str, workdir: str, batch_size: int) -> argparse.ArgumentParser:
        cmd = commands.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        cmd.add_argument("--workdir", required=True, help=workdir)
        cmd.add_argument("text", nargs="*", help="texts")
        cmd.add_argument("--prompt", action="append", default=[], help="a text (repeatable)")
        cmd.add_argument("--input", help="file with one text per line")
        cmd.add_argument("--batch-size", type=int, default=batch_size, help="texts run together")
        cmd.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
        return cmd

    texts_command("fill-mask", "predict the mask tokens of texts with a masked-LM run", "a training run's directory",
                  64).add_argument("--top-k", type=int, default=5, help="predictions shown per mask")
    texts_command("classify", "label texts with a classification run", "a training run's directory", 64)
    for name, what in (("translate", "translate texts with a sequence-to-sequence run"),
                       ("summarize", "summarize texts with a sequence-to-sequence run")):
        cmd = texts_command(name, what, "a sequence-to-sequence run's directory (task=seq2seq)", 32)
        cmd.add_argument("--beam-size", type=int,
                         help="hypotheses kept (1: greedy; default: the run's seq2seq.eval_beam_size)")
        cmd.add_argument("--length-penalty", type=float, help="GNMT's alpha: scores over ((5 + length) / 6) ** alpha "
                                                              "(0: none; default: the run's seq2seq.length_penalty)")
        cmd.add_argument("--no-repeat-ngram", type=int, help="no n tokens in a row twice in an output "
                                                             "(0: off; default: the run's seq2seq.no_repeat_ngram)")
        cmd.add_argument("--max-new-tokens", type=int, help="longest output (default: seq2seq.target_len)")
    ans = commands.add_parser("answer", help="answer questions from a context with a question-answering run",
                              description="Answer questions with the span of a context that a "
                                          "question-answering run scores best.")
    ans.add_argument("--workdir", required=True, help="a question-answering run's directory")
    ans.add_argument("text", nargs="*", help="questions")
    ans.add_argument("--prompt", action="append", default=[], help="a question (repeatable)")
    ans.add_argument("--context", help="the text that holds the answers (or --context-file)")
    ans.add_argument("--context-file", help="a file whose text holds the answers")
    ans.add_argument("--input", help="one question a line, or JSONL of {question, context}")
    ans.add_argument("--index", help="retrieve contexts from this index (python -m jaxlm.index build)")
    ans.add_argument("--retriever-workdir", help="the index's encoder run (default: the one that built it)")
    ans.add_argument("--top-k", type=int, default=5, help="passages retrieved and read per question")
    ans.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.text) + list(args.prompt)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise UserError(f"--input '{args.input}' not found; give a file with one prompt per line")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError("no text given; pass TEXT, --prompt TEXT or --input FILE")
    return prompts


def check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature={args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise UserError(f"--top-k={args.top_k} must be >= 0 (0 keeps all tokens)")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be at least 1")
    if args.no_repeat_ngram < 0:
        raise UserError(f"--no-repeat-ngram={args.no_repeat_ngram} must be >= 0 (0 allows repeats)")


def cached_logits(model, params, vocab: int) -> decoding.TokensToLogits:
    """A decoder's `tokens_to_logits` for `decoding.generate`, through its KV cache. Ids from
    `vocab` up (the table's padding beyond the tokenizer's vocabulary) are never chosen."""

    def tokens_to_logits(tokens, segment_ids, positions, cache):
        logits, updated = model.apply({"params": params, "cache": cache}, tokens, segment_ids, positions,
                                      decode=True, mutable=["cache"])
        real = jnp.arange(logits.shape[-1]) < vocab  # [vocab]
        return jnp.where(real, logits, jnp.finfo(logits.dtype).min), updated["cache"]

    return tokens_to_logits


class Generator:
    """Batched KV-cached generation with one compiled function per (batch, lengths) shape, or
    one prompt streamed token by token (the same tokens, drawn with the same keys).
    `no_repeat_ngram` n > 0: no n tokens in a row occur twice in a continuation (the prompt's
    tokens not counted)."""

    def __init__(self, run: Run, params, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, no_repeat_ngram: int = 0):
        self.run, self.params = run, params
        self.model = run.task.model
        self.tok = run.tokenizer
        self.max_new_tokens, self.no_repeat_ngram = max_new_tokens, no_repeat_ngram
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self._fn = jax.jit(self._generate, static_argnames=("cache_len",))
        logits = partial(cached_logits, self.model, vocab=self.tok.vocab_size)
        self._prefill = jax.jit(lambda p, *a: decoding.prefill(logits(p), *a, **self.sampling))
        self._extend = jax.jit(lambda p, *a, history, length: decoding.extend(
            logits(p), *a, **self.sampling,
            logits_filter=lambda x: decoding.block_repeated_ngrams(x, history, length, no_repeat_ngram)))
        self._cache = jax.jit(self._empty_cache, static_argnums=(0, 1))

    def _empty_cache(self, batch: int, cache_len: int):
        shape = jax.eval_shape(partial(self.model.init, decode=True), jax.random.key(0),
                               jnp.ones((batch, cache_len), jnp.int32))["cache"]
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)

    def _generate(self, params, prompt, mask, rng, cache_len: int):
        return decoding.generate(cached_logits(self.model, params, self.tok.vocab_size),
                                 self._empty_cache(prompt.shape[0], cache_len), prompt, mask, rng,
                                 max_new_tokens=self.max_new_tokens, eos_id=self.tok.end_ids, pad_id=self.tok.pad_id,
                                 no_repeat_ngram=self.no_repeat_ngram, **self.sampling)

    def _batch(self, encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray, int]:
        """Left-padded prompts [batch, length] (the batch filled to the mesh's batch axes), their
        mask, and the cache length they need."""
        length = max(len(e) for e in encoded)
        cache_len = length + self.max_new_tokens
        cfg = self.run.config.model
        if cfg.positions == "learned" and cache_len > cfg.max_len:
            raise UserError(f"prompt ({length} tokens) + --max-new-tokens exceeds model.max_len={cfg.max_len}; "
                            "shorten the prompt or ask for fewer tokens")
        rows = self.run.compiled.mesh.shape["data"] * self.run.compiled.mesh.shape["fsdp"]
        batch = -(-len(encoded) // rows) * rows
        prompt = np.full((batch, length), self.tok.pad_id, np.int32)
        mask = np.zeros((batch, length), np.int32)
        for i, ids in enumerate(encoded):  # left padding: every row's next token shares a slot
            prompt[i, length - len(ids):] = ids
            mask[i, length - len(ids):] = 1
        return prompt, mask, cache_len

    def __call__(self, encoded: list[list[int]], rng: jax.Array) -> list[str]:
        """Continuations of the prompts' token ids (without the prompts)."""
        prompt, mask, cache_len = self._batch(encoded)
        with self.run.compiled.context():
            out = np.asarray(self._fn(self.params, prompt, mask, rng, cache_len=cache_len))
        return [self.tok.generated_text(row.tolist()) for row in out[: len(encoded)]]

    def stream(self, encoded: list[int], rng: jax.Array) -> Iterator[int]:
        """The continuation of one prompt's token ids, a token at a time as it is drawn (an end
        token stops it and is not given)."""
        prompt, mask, cache_len = self._batch([encoded])
        with self.run.compiled.context():
            cache = self._cache(prompt.shape[0], cache_len)
            rng, first = jax.random.split(rng)
            token, lengths, cache = self._prefill(self.params, cache, prompt, mask, first)
            history = np.full((prompt.shape[0], self.max_new_tokens), self.tok.pad_id, np.int32)  # new tokens
            for i in range(1, self.max_new_tokens + 1):
                new = int(token[0])
                if new in self.tok.end_ids:
                    return
                yield new
                if i == self.max_new_tokens:
                    return
                history[:, i - 1] = np.asarray(token)
                rng, step = jax.random.split(rng)
                token, cache = self._extend(self.params, cache, token, lengths + i - 1, step, history=history,
                                            length=i)


def print_streamed(tok, tokens: Iterator[int]) -> str:
    """Prints the text of `tokens` as they come (holding back a character whose bytes are not
    all there yet); returns the whole text."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    text = tok.decode(ids)
    print(text[len(shown):], flush=True)
    return text


def encoder_command(args: argparse.Namespace, texts: list[str]) -> None:
    """fill-mask and classify: batches of texts through an encoder run."""
    task = {"fill-mask": "mlm", "classify": "classify"}[args.command]
    if args.batch_size < 1 or getattr(args, "top_k", 1) < 1:
        raise UserError("--batch-size and --top-k must be at least 1")
    run, ckpt = open_run(args.workdir)
    if run.config.task != task:
        raise UserError(f"{args.command} needs a task={task} run; '{args.workdir}' trains task={run.config.task}")
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, args.step)
    start = time.time()
    for first in range(0, len(texts), args.batch_size):
        chunk = texts[first:first + args.batch_size]
        if args.command == "classify":
            for text, (label, p) in zip(chunk, encoder_infer.classify(run, params, chunk)):
                print(f"{label}\t{p:.4f}\t{text}", flush=True)
            continue
        for text, masks in zip(chunk, encoder_infer.fill_mask(run, params, chunk, args.top_k)):
            print(text)
            for j, options in enumerate(masks):
                shown = "  ".join(f"{t} {p:.3f}" for t, p in options)
                print(f"  mask {j + 1}: {shown}", flush=True)
    print(f"checkpoint step {step}: {len(texts)} texts in {time.time() - start:.1f}s", file=sys.stderr)


def seq2seq_command(args: argparse.Namespace, texts: list[str]) -> None:
    """translate and summarize: batches of texts through a sequence-to-sequence run, one output a line."""
    run, ckpt = open_run(args.workdir)
    if run.config.task != "seq2seq":
        raise UserError(f"{args.command} needs a sequence-to-sequence run (task=seq2seq); "
                        f"'{args.workdir}' trains task={run.config.task}")
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, args.step)
    s = run.config.seq2seq  # the run's decoding settings, unless the command line gives others
    beam_size = s.eval_beam_size if args.beam_size is None else args.beam_size
    alpha = s.length_penalty if args.length_penalty is None else args.length_penalty
    no_repeat_ngram = s.no_repeat_ngram if args.no_repeat_ngram is None else args.no_repeat_ngram
    translator = Translator(run, params, args.max_new_tokens or s.target_len, beam_size, alpha, no_repeat_ngram)
    start = time.time()
    for output in translator(texts, args.batch_size):
        print(output, flush=True)
    print(f"checkpoint step {step}: {len(texts)} texts in {time.time() - start:.1f}s", file=sys.stderr)


def read_questions(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(question, context) pairs from the command line, --context / --context-file and --input."""
    context = args.context
    if args.context_file:
        path = Path(args.context_file)
        if not path.is_file():
            raise UserError(f"--context-file '{path}' not found")
        context = path.read_text(encoding="utf-8")
    pairs = [(q, context) for q in [*args.text, *args.prompt]]
    if args.input and args.input.endswith(".jsonl"):
        path = Path(args.input)
        if not path.is_file():
            raise UserError(f"--input '{path}' not found")
        for number, record in json_lines(path, path.read_text(encoding="utf-8")):
            if "question" not in record or not (record.get("context") or context):
                raise UserError(f"{path}:{number}: needs a \"question\" and a \"context\" (or --context)")
            pairs.append((str(record["question"]), str(record.get("context") or context)))
    elif args.input:
        args.text, args.prompt = [], []
        pairs += [(q, context) for q in read_prompts(args)]
    if not pairs:
        raise UserError("no question given; pass QUESTION, --prompt QUESTION or --input FILE")
    if args.index:
        if context is not None or any(c is not None for _, c in pairs):
            raise UserError("--index retrieves the contexts: give either --index or --context, not both")
        return pairs
    if any(c is None or not c.strip() for _, c in pairs):
        raise UserError("no context given; pass --context TEXT or --context-file FILE (or a .jsonl --input "
                        "with a context per question)")
    return pairs


def retrieve_and_read(run: Run, params, index: Index, questions: list[str], top_k: int
                      ) -> list[tuple[str, float, dict[str, str]]]:
    """For each question: (answer, score, passage) of the best span the reader finds in the
    `top_k` passages the index retrieves for it."""
    hits = index.search(questions, top_k)
    pairs = [(q, passage["text"]) for q, found in zip(questions, hits) for _, passage in found]
    read = encoder_infer.answer(run, params, pairs)
    out, first = [], 0
    for found in hits:
        answers = read[first:first + len(found)]
        first += len(found)
        best = max(range(len(found)), key=lambda j: answers[j][1])
        out.append((*answers[best], found[best][1]))
    return out


def answer_command(args: argparse.Namespace) -> None:
    pairs = read_questions(args)
    run, ckpt = open_run(args.workdir)
    if run.config.task != "qa":
        raise UserError(f"answer needs a task=qa run; '{args.workdir}' trains task={run.config.task}")
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, args.step)
    start = time.time()
    if args.index:
        if args.top_k < 1:
            raise UserError(f"--top-k={args.top_k} must be at least 1")
        results = retrieve_and_read(run, params, Index(args.index, args.retriever_workdir),
                                    [q for q, _ in pairs], args.top_k)
        for (question, _), (text, score, passage) in zip(pairs, results):
            print(f"{text or '(no answer)'}\t{score:.2f}\t[{passage['id']}]\t{question}", flush=True)
    else:
        for (question, _), (text, score) in zip(pairs, encoder_infer.answer(run, params, pairs)):
            print(f"{text or '(no answer)'}\t{score:.2f}\t{question}", flush=True)
    print(f"checkpoint step {step}: {len(pairs)} questions in {time.time() - start:.1f}s", file=sys.stderr)


@cli
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "answer":
        answer_command(args)
        return
    prompts = read_prompts(args)
    if args.command in ("translate", "summarize"):
        seq2seq_command(args, prompts)
        return
    if args.command != "generate":
        encoder_command(args, prompts)
        return
    check_sampling(args)
    run, ckpt = open_run(args.workdir)
    if run.config.task not in DECODER_TASKS:
        raise UserError(f"generate needs a decoder run (task=clm or sft); '{args.workdir}' trains task={run.config.task}")
    params, step = ckpt.restore_params(run.compiled.abstract_state.params, args.step)
    gen = Generator(run, params, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                    args.no_repeat_ngram)
    tok, template = gen.tok, run.config.sft.chat_template
    if args.chat:  # each prompt is the user's turn; what is printed is the assistant's answer
        system = [{"role": "system", "content": args.system}] if args.system else []
        encoded = [chat.prompt_ids(template, [*system, {"role": "user", "content": p}], tok) for p in prompts]
    else:
        encoded = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    rng = jax.random.key(args.seed)
    start, produced = time.time(), 0
    if len(prompts) == 1 and not args.no_stream:
        _, key = jax.random.split(rng)  # the key a batch of one gets: streamed or not, the same tokens
        if not args.chat:
            print(prompts[0], end="", flush=True)
        produced = len(tok.encode(print_streamed(tok, gen.stream(encoded[0], key))))
    else:
        for first in range(0, len(prompts), args.batch_size):
            rng, key = jax.random.split(rng)
            for i, text in enumerate(gen(encoded[first:first + args.batch_size], key), start=first):
                if len(prompts) > 1:
                    print(f"--- {i + 1} ---")
                print(text if args.chat else prompts[i] + text, flush=True)
                produced += len(tok.encode(text))
    print(f"checkpoint step {step}: {produced} tokens in {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
