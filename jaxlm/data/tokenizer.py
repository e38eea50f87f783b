"""Tokenizers: train a byte-level BPE on (a sample of) the train split, cached; or load a tokenizer.json."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxlm.config import DataConfig
from jaxlm.data.sources import Corpus, cache_dir
from jaxlm.errors import UserError

PAD, BOS, EOS, MASK = "<pad>", "<s>", "</s>", "<mask>"
# Names other vocabularies use for the same roles, tried in order.
_PAD_NAMES = (PAD, "[PAD]", "<|padding|>", "<|endoftext|>")
_BOS_NAMES = (BOS, "[CLS]", "<|startoftext|>", "<|begin_of_text|>", "<s>", "<|endoftext|>")
_EOS_NAMES = (EOS, "[SEP]", "<|end_of_text|>", "</s>", "<|endoftext|>")
_END_NAMES = (EOS, "<|end_of_text|>", "</s>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")
_MASK_NAMES = (MASK, "[MASK]")


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` with the special ids a language model needs."""

    tokenizer: Tokenizer
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int | None = None  # masked-LM's mask token, where the vocabulary has one

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Every token that ends a generated text: `eos_id`, and the end-of-text and end-of-turn
        tokens of the vocabulary (a chat model ends its turn with `<|eot_id|>` or `<|im_end|>`)."""
        found = (self.tokenizer.token_to_id(name) for name in _END_NAMES)
        return tuple(sorted({self.eos_id, *(i for i in found if i is not None)}))

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (in parallel), no special tokens added."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generated_text(self, ids: list[int]) -> str:
        """The text of generated ids, up to the first end token (`end_ids`)."""
        end = next((k for k, i in enumerate(ids) if i in self.end_ids), len(ids))
        return self.decode(ids[:end])

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for ([vocab] int32; 0 for special tokens).

        For bits-per-byte. Byte-level vocabularies map each character of a token to one byte;
        others are decoded token by token.
        """
        lengths = np.zeros(self.vocab_size, np.int32)
        byte_level = isinstance(self.tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)
        for token, i in self.tokenizer.get_vocab().items():
            lengths[i] = len(token) if byte_level else len(self.tokenizer.decode([i]).encode())
        lengths[self.special_ids()] = 0
        return lengths

    def special_ids(self) -> np.ndarray:
        """Ids of the special tokens (never masked, never counted as text)."""
        ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        ids |= {self.pad_id, self.bos_id, self.eos_id}
        return np.asarray(sorted(ids), np.int32)

    def continues_word(self) -> np.ndarray:
        """[vocab] bool: the token continues the word before it (for whole-word masking).

        WordPiece marks continuations with `##`; byte-level BPE marks word starts with a
        leading space (`Ġ`), so a letter or digit token without one continues a word.
        """
        out = np.zeros(self.vocab_size, bool)
        byte_level = isinstance(self.tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)
        for token, i in self.tokenizer.get_vocab().items():
            if byte_level:
                out[i] = not token.startswith("Ġ") and token[:1].isalnum()
            else:
                out[i] = token.startswith("##")
        out[self.special_ids()] = False
        return out

    def ends_sentence(self) -> np.ndarray:
        """[vocab] bool: the token ends a sentence (`.`, `!` or `?` last, or a blank line).

        Where next-sentence pairs may be cut.
        """
        out = np.zeros(self.vocab_size, bool)
        byte_level = isinstance(self.tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)
        for token, i in self.tokenizer.get_vocab().items():
            text = token.replace("Ġ", " ").replace("Ċ", "\n") if byte_level else token
            out[i] = "\n\n" in text or text.rstrip().rstrip("\"')").endswith((".", "!", "?"))
        out[self.special_ids()] = False
        return out

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))


def _find(tok: Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def from_file(path: str | Path) -> TextTokenizer:
    """Loads a tokenizer.json and finds its pad, bos and eos ids."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer '{path}' not found; give a tokenizer.json or leave data.tokenizer empty to train one")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"'{path}' is not a tokenizer.json: {str(e).splitlines()[0]}") from None
    tok.no_padding()  # jaxlm pads and cuts rows itself; a saved pipeline setting would pad every text
    tok.no_truncation()
    pad = _find(tok, _PAD_NAMES)
    bos, eos = _find(tok, _BOS_NAMES), _find(tok, _EOS_NAMES)
    bos = pad if bos is None else bos  # no begin token (T5): sequences start with padding, as T5's decoder does
    if bos is None or eos is None:
        raise UserError(f"tokenizer '{path}' has no begin/end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                        "add one or train a tokenizer")
    return TextTokenizer(tok, eos if pad is None else pad, bos, eos, _find(tok, _MASK_NAMES))


def train_bpe(texts: Iterator[str], vocab_size: int) -> TextTokenizer:
    """Trains a byte-level BPE (GPT-2 style) on texts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, MASK], show_progress=sys.stderr.isatty(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, tok.token_to_id(PAD), tok.token_to_id(BOS), tok.token_to_id(EOS),
                         tok.token_to_id(MASK))


def placeholder(vocab_size: int) -> TextTokenizer:
    """A vocabulary of `vocab_size` word tokens (`w4`, `w5`, ...) after pad, bos, eos and mask:
    the shapes of a real one, for compiling and benchmarking without data."""
    vocab = {name: i for i, name in enumerate((PAD, BOS, EOS, MASK))}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([PAD, BOS, EOS, MASK])
    return TextTokenizer(tok, 0, 1, 2, 3)


def obtain(cfg: DataConfig, splits: Corpus, workdir: Path, seed: int = 0) -> TextTokenizer:
    """The run's tokenizer: the workdir's copy if present, else loaded or trained, then saved there.

    A trained tokenizer is also cached by training text, size and sample, so new runs on the
    same data skip training. It trains on at most `data.tokenizer_sample_mb` of text, sampled
    by `seed` from the whole train split.
    """
    target = workdir / "tokenizer.json"
    if target.is_file():
        return from_file(target)
    if cfg.tokenizer:
        tok = from_file(cfg.tokenizer)
    else:
        budget = int(cfg.tokenizer_sample_mb * 1e6)
        approx = splits.approx_bytes("train")
        drawn = bool(budget) and approx is not None and approx > budget  # the seed picks the documents
        seeded = bool(budget) and (approx is None or approx > budget)  # it may (a mixture's parts)
        name = f"bpe{cfg.vocab_size}-m-{splits.fingerprint}-s{budget}" + (f"-{seed}" if seeded else "")
        cached = cache_dir(cfg) / "tokenizers" / f"{name}.json"
        if cached.is_file():
            tok = from_file(cached)
        else:
            what = "all of"
            if budget:
                what = f"{'about' if drawn else 'at most'} {budget / 1e6:,.0f}M characters {'drawn from' if drawn else 'of'}"
            print(f"training a {cfg.vocab_size}-token byte-level BPE on {what} the train split "
                  "(once; cached for later runs)", file=sys.stderr)
            tok = train_bpe(splits.sample(budget, seed), cfg.vocab_size)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp-{os.getpid()}")
            tok.save(tmp)
            tmp.replace(cached)
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer:
        shutil.copyfile(cfg.tokenizer, target)
    else:
        tok.save(target)
    return tok
