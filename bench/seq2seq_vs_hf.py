"""Train the Bible English -> Spanish encoder-decoder with jaxlm and the same architecture and
budget with Hugging Face transformers (PyTorch), side by side on this machine; prints test BLEU
(greedy and beam 4), chrF and wall times of both.

    pip install torch==2.13.0 transformers        # for the reference side only
    python bench/seq2seq_vs_hf.py [--workdir DIR] [--steps N] [--only jaxlm|hf] [--layout preset|t5]
                                  [--hf-init library|xavier|jaxlm] [--seed N]

jaxlm runs the README's commands: `train --config configs/translate_bible_en_es.yaml`, then
`evaluate --split test` (beam 4) and `evaluate --split test --beam-size 1`; its time covers
everything those commands do (tokenizer training, data encoding, compilation, training and both
decodes of the test books). The Hugging Face side builds the preset's architecture from a config
of its shapes, read from the YAML: `MarianMTModel` for the 2017 layout the preset uses
(post-norm, sinusoidal positions, embeddings scaled by sqrt(width), ReLU, biases, one tied
table), or `T5ForConditionalGeneration` for the T5 layout (`--layout t5` sets it on both sides:
relative buckets, gated GELU, T5 v1.0's scaled tied output, T5's initialisation); layers,
width, heads, feed-forward width and dropout as the YAML says. Each library initialises its
model its own way (the preset draws as transformers draws Marian: `model.init=normal_flat`);
`--hf-init xavier` draws the Hugging Face side as jaxlm's `model.init=xavier` instead (its
result goes to `hf-xavier.json`), to compare initialisations within one library. `--hf-init
jaxlm` starts it from the jaxlm run's own initial parameters (T5's layout exported as `python -m
jaxlm.hf export` exports it, with jaxlm's norm epsilon; the 2017 layout into `MarianMTModel`, with
jaxlm's sinusoids) and feeds it jaxlm's batches in jaxlm's order (`hf-jaxlm.json`): the two
sides then differ only in their arithmetic. It uses the
same tokenizer (the BPE the jaxlm run trained, so run the jaxlm side first), and trains on the
preset's budget: its steps and pairs a step (padded to the longest of the batch, as
transformers' seq2seq collator does; jaxlm packs them), its source and target lengths, label
smoothing, AdamW settings (weight decay off norms, biases and position tables), clipping 1.0,
and warmup then cosine decay to 10% of the peak learning rate. Its time
covers training and both decodes (`generate`, beam 4 with its length penalty 0.6, and greedy),
whose outputs it writes to `<workdir>/hf-test-beam4.txt` and `hf-test-beam1.txt`, one a line, as
jaxlm's `evaluate` writes its hypotheses; it saves its trained model to `<workdir>/hf-model`.
Both sides also report the test split's teacher-forced loss (label-smoothed), perplexity and
token accuracy, over every test pair (the table prints the perplexity): a measure of the trained
models that does not go through a search.

`--seed N` (default 0) seeds both sides: jaxlm's `seed` (its initialisation and data order) and
the Hugging Face side's initialisation and batch order; a seed other than 0 runs in
`<workdir>/jaxlm-seedN` and writes `<side>-seedN.json`. Each side writes `<workdir>/<side>.json`;
the table prints every side and seed found there, and each side's mean over its seeds, so runs
may happen at different times.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/translate_bible_en_es.yaml"
DATA = ROOT.parent / "shared/data/translation/bible_en_es"
# --layout t5: the preset's shapes in T5's layout on both sides (v1.1's gated GELU, v1.0's tied
# and scaled output, T5's initialisation); transformers builds T5ForConditionalGeneration
T5_LAYOUT = {"positions": "relative", "relative_buckets": 32, "relative_max_distance": 128, "norm": "rmsnorm",
             "prenorm": True, "use_bias": False, "scale_attention": False, "scale_embeddings": False,
             "mlp": "geglu", "tie_embeddings": True, "tied_output_scale": True, "init": "fan_in"}


T5_NO_DECAY = ("layer_norm", "relative_attention_bias")  # T5's parameter names that jaxlm does not decay


def layout_overrides(layout: str) -> dict:
    return T5_LAYOUT if layout == "t5" else {}


def suffix(seed: int) -> str:
    """What a seed adds to a side's run and result names (nothing for seed 0)."""
    return f"-seed{seed}" if seed else ""


def hf_name(init: str) -> str:
    """The Hugging Face side's name in result files: `hf`, or `hf-<init>` under `--hf-init xavier|jaxlm`."""
    return "hf" if init == "library" else f"hf-{init}"


def run_jaxlm(work: Path, steps: int | None, layout: str, seed: int) -> dict:
    run = work / f"jaxlm{suffix(seed)}"
    extra = [f"seed={seed}"]
    extra += [f"train.steps={steps}", f"train.eval_every={steps}", f"checkpoint.every={steps}"] if steps else []
    extra += [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in layout_overrides(layout).items()]
    start = time.time()
    subprocess.run([sys.executable, "-m", "jaxlm.train", "--config", str(CONFIG), "--workdir", str(run), *extra],
                   check=True)
    trained = time.time() - start
    scores = {}
    for beam in (4, 1):
        out = subprocess.run([sys.executable, "-m", "jaxlm.evaluate", "--workdir", str(run), "--split", "test",
                              "--beam-size", str(beam), "--json"], check=True, capture_output=True, text=True)
        scores[beam] = json.loads(out.stdout.strip().splitlines()[-1])
    return {"bleu_beam4": scores[4]["bleu"], "chrf_beam4": scores[4]["chrf"], "bleu_greedy": scores[1]["bleu"],
            "chrf_greedy": scores[1]["chrf"], "test_loss": scores[4]["loss"], "test_perplexity": scores[4]["perplexity"],
            "test_accuracy": scores[4]["accuracy"], "train_s": trained, "seconds": time.time() - start}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(r["en"], r["es"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def hf_model(transformers, cfg: dict, vocab: int, ids: dict) -> tuple:
    """The preset's architecture in transformers, and the parameter-name parts that take no weight
    decay (as jaxlm's decay mask: norms, biases, position tables): `T5ForConditionalGeneration`
    for the T5 layout, `MarianMTModel` (post-norm, sinusoidal positions, embeddings times
    sqrt(width), ReLU, biases: the 2017 Transformer) for the 2017 layout."""
    m, s = cfg["model"], cfg["seq2seq"]
    if m.get("prenorm", True):
        config = transformers.T5Config(
            vocab_size=vocab, d_model=m["embed_dim"], d_kv=m["embed_dim"] // m["num_heads"],
            d_ff=m["mlp_dim"], num_layers=m["num_layers"], num_decoder_layers=m["decoder_layers"],
            num_heads=m["num_heads"], relative_attention_num_buckets=m["relative_buckets"],
            relative_attention_max_distance=m["relative_max_distance"], dropout_rate=m["dropout"],
            feed_forward_proj="gated-gelu", pad_token_id=ids["<pad>"], eos_token_id=ids["</s>"],
            decoder_start_token_id=ids["<s>"], tie_word_embeddings=True)
        return transformers.T5ForConditionalGeneration(config), T5_NO_DECAY
    config = transformers.MarianConfig(
        vocab_size=vocab, d_model=m["embed_dim"], encoder_layers=m["num_layers"],
        decoder_layers=m["decoder_layers"], encoder_attention_heads=m["num_heads"],
        decoder_attention_heads=m["num_heads"], encoder_ffn_dim=m["mlp_dim"], decoder_ffn_dim=m["mlp_dim"],
        activation_function=m["activation"], dropout=m["dropout"], attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=max(cfg["data"]["seq_len"], s["target_len"]), scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=ids["<pad>"],
        eos_token_id=ids["</s>"], decoder_start_token_id=ids["<s>"], forced_eos_token_id=None)
    return transformers.MarianMTModel(config), ("layer_norm", "bias", "embed_positions")


def glorot(torch, model, width: int) -> None:
    """Draws `model` as jaxlm's `model.init=xavier` draws the 2017 layout: Glorot-uniform kernels,
    zero biases, the (tied) token table at N(0, 1 / width)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight is not model.get_input_embeddings().weight:
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
        model.get_input_embeddings().weight.normal_(0.0, width ** -0.5)


def marian_tensors(params: dict, m: dict, vocab: int, positions: int) -> dict:
    """jaxlm's 2017-layout parameters as `MarianMTModel`'s state dict: the table's rows for the
    tokenizer's ids, and jaxlm's sinusoids in both position tables (Marian's own space their
    frequencies as the paper does, jaxlm's as tensor2tensor)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxlm.models.positions import sinusoidal
    d = m["embed_dim"]
    sines = np.asarray(sinusoidal(jnp.arange(positions), d))
    out = {"model.shared.weight": params["token_embed"]["embedding"][:vocab],
           "model.encoder.embed_positions.weight": sines, "model.decoder.embed_positions.weight": sines}
    for side, layers, attentions in (("encoder", m["num_layers"], (("attention", "self_attn"),)),
                                     ("decoder", m["decoder_layers"], (("attention", "self_attn"),
                                                                       ("cross_attention", "encoder_attn")))):
        for i in range(layers):
            block, at = params[side][f"block_{i}"], f"model.{side}.layers.{i}."
            for ours, theirs in attentions:
                for q, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                    out[f"{at}{theirs}.{proj}.weight"] = block[ours][q]["kernel"].reshape(d, -1).T
                    out[f"{at}{theirs}.{proj}.bias"] = block[ours][q]["bias"].reshape(-1)
                out[f"{at}{theirs}.out_proj.weight"] = block[ours]["out"]["kernel"].reshape(-1, d).T
                out[f"{at}{theirs}.out_proj.bias"] = block[ours]["out"]["bias"]
                norm = block[f"ln_{ours}"]["LayerNorm_0"]
                out[f"{at}{theirs}_layer_norm.weight"], out[f"{at}{theirs}_layer_norm.bias"] = norm["scale"], norm["bias"]
            for ours, theirs in (("wi", "fc1"), ("wo", "fc2")):
                out[f"{at}{theirs}.weight"] = block["mlp"][ours]["kernel"].T
                out[f"{at}{theirs}.bias"] = block["mlp"][ours]["bias"]
            norm = block["ln_mlp"]["LayerNorm_0"]
            out[f"{at}final_layer_norm.weight"], out[f"{at}final_layer_norm.bias"] = norm["scale"], norm["bias"]
    return out


def jaxlm_start(transformers, torch, run_dir: Path, cfg: dict, ids: dict):
    """The Hugging Face model holding the jaxlm run's initial parameters (the rows of its table
    for the tokenizer's ids: the padding rows take no part in jaxlm's softmax), with the
    parameter-name parts that take no weight decay, and the run's training batches as lists of
    source and target ids, read through jaxlm's own pipeline in its order (before packing, one
    pair a row). T5's layout becomes `T5ForConditionalGeneration` (with jaxlm's norm epsilon),
    the 2017 layout `MarianMTModel`."""
    import jax

    from jaxlm import config as config_lib
    from jaxlm import tasks
    from jaxlm.data import pipeline
    from jaxlm.data import tokenizer as tokenizer_lib
    from jaxlm.hf import t5
    from jaxlm.workdir import build
    run_cfg, tok = config_lib.load_workdir(run_dir), tokenizer_lib.from_file(run_dir / "tokenizer.json")
    run = build(run_cfg, tok, mode="jit")
    vocab = tok.vocab_size
    params = jax.device_get(run.compiled.init_state(run_cfg.seed).params)
    if run_cfg.model.prenorm:
        t5.check_layout(run_cfg.model)
        config = {k: v for k, v in t5.hf_config(run_cfg.model, vocab, tok.pad_id, tok.eos_id, tok.bos_id).items()
                  if k not in ("architectures", "model_type")}
        model, no_decay = transformers.T5ForConditionalGeneration(transformers.T5Config(**config)), T5_NO_DECAY
        tensors = t5.from_params(params, run_cfg.model, vocab)
        tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}  # views of `shared`
    else:
        model, no_decay = hf_model(transformers, cfg, vocab, ids)
        tensors = marian_tensors(params, cfg["model"], vocab, model.config.max_position_embeddings)
        tied = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight",
                "final_logits_bias"}  # views of `model.shared`, and a bias of zeros jaxlm does not have
    missing, unexpected = model.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
    if unexpected or set(missing) - tied:
        sys.exit(f"jaxlm's parameters do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    rows = tasks.task_class(run_cfg).rows(run_cfg, tasks.load_splits(run_cfg), tok)["train"]

    def batches():
        for b in pipeline.TrainBatches(rows, run_cfg.train.batch_size, run_cfg.seed):
            yield ([x[:n].tolist() for x, n in zip(b["inputs"], b["input_segments"].sum(1))],
                   [x[:n].tolist() for x, n in zip(b["targets"], b["target_segments"].sum(1))])
    return model, no_decay, batches()


def run_hf(work: Path, steps: int | None, layout: str, seed: int, init: str = "library") -> dict:
    import sacrebleu
    import torch
    import transformers
    import yaml
    from tokenizers import Tokenizer
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["model"].update(layout_overrides(layout))
    o, t, s = cfg["optim"], cfg["train"], cfg["seq2seq"]
    steps = steps or t["steps"]
    tokenizer_file = work / f"jaxlm{suffix(seed)}" / "tokenizer.json"
    if not tokenizer_file.exists():
        sys.exit(f"{tokenizer_file} is missing: run the jaxlm side of seed {seed} first (--only jaxlm), "
                 "whose tokenizer both use")
    tok = Tokenizer.from_file(str(tokenizer_file))
    ids = {name: tok.token_to_id(name) for name in ("<pad>", "<s>", "</s>")}  # jaxlm's special tokens
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    if init == "jaxlm":
        model, no_decay, batches = jaxlm_start(transformers, torch, work / f"jaxlm{suffix(seed)}", cfg, ids)
    else:
        model, no_decay = hf_model(transformers, cfg, tok.get_vocab_size(), ids)
        if init == "xavier":
            glorot(torch, model, cfg["model"]["embed_dim"])

    def encode(texts: list[str], cap: int) -> list[list[int]]:
        return [e.ids[:cap - 1] + [ids["</s>"]] for e in tok.encode_batch(texts, add_special_tokens=False)]

    def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, longest] ids and their mask (1 on tokens)."""
        width = max(map(len, seqs))
        x = torch.full((len(seqs), width), ids["<pad>"], dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            x[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
        return x, mask

    if init != "jaxlm":
        train = read_pairs(DATA / "train.tsv")
        sources = encode([p[0] for p in train], cfg["data"]["seq_len"])
        targets = encode([p[1] for p in train], s["target_len"])

        def own_batches():  # a fresh permutation of the pairs each epoch
            gen, order = torch.Generator().manual_seed(seed), []
            while True:
                if len(order) < t["batch_size"]:
                    order += torch.randperm(len(train), generator=gen).tolist()
                batch, order = order[:t["batch_size"]], order[t["batch_size"]:]
                yield [sources[i] for i in batch], [targets[i] for i in batch]
        batches = own_batches()
    test = read_pairs(DATA / "test.tsv")
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)]
    rest = [p for n, p in model.named_parameters() if any(k in n for k in no_decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                            lr=o["learning_rate"], betas=(0.9, 0.95), eps=1e-8)
    warmup, end = o["warmup_steps"], 0.1

    def lr_factor(step: int) -> float:  # optax: linear warmup, then cosine decay to `end` of the peak
        if step < warmup:
            return step / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=s["label_smoothing"])

    def teacher_forced(src_ids: list[list[int]], tgt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [tokens, vocab] for a batch of pairs, the decoder reading each target shifted
        right behind the start token, and their labels [tokens] (-100 on padding)."""
        src, src_mask = padded(src_ids)
        labels, label_mask = padded(tgt_ids)
        decoder_in = torch.cat([torch.full((len(tgt_ids), 1), ids["<s>"]), labels[:, :-1]], 1)
        logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=decoder_in,
                       decoder_attention_mask=torch.cat([torch.ones(len(tgt_ids), 1, dtype=torch.long),
                                                         label_mask[:, :-1]], 1)).logits
        return logits.reshape(-1, logits.shape[-1]), labels.masked_fill(label_mask == 0, -100).reshape(-1)
    start = time.time()
    model.train()
    for step, (batch_sources, batch_targets) in zip(range(steps), batches):
        logits, labels = teacher_forced(batch_sources, batch_targets)
        loss = loss_fn(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % t["log_every"] == 0:  # that step's batch, as jaxlm logs
            print(f"hf step {step + 1}/{steps} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    trained = time.time() - start
    model.eval()
    model.save_pretrained(work / f"{hf_name(init)}{suffix(seed)}-model")
    test_sources = encode([p[0] for p in test], cfg["data"]["seq_len"])
    test_targets = encode([p[1] for p in test], s["target_len"])
    test_loss = test_nll = correct = tokens = 0.0  # sums over the test tokens, as jaxlm's evaluate
    smoothed = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=s["label_smoothing"], reduction="sum")
    plain = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="sum")
    with torch.no_grad():
        for i in range(0, len(test_sources), 32):
            logits, labels = teacher_forced(test_sources[i:i + 32], test_targets[i:i + 32])
            test_loss += smoothed(logits, labels).item()
            test_nll += plain(logits, labels).item()
            correct += (logits.argmax(-1) == labels).sum().item()  # (padding's -100 never matches)
            tokens += (labels != -100).sum().item()
    references = [p[1] for p in test]
    scores = {}
    for beam in (4, 1):
        hypotheses = []
        with torch.no_grad():
            for i in range(0, len(test_sources), 32):
                src, src_mask = padded(test_sources[i:i + 32])
                out = model.generate(input_ids=src, attention_mask=src_mask, num_beams=beam,
                                     length_penalty=s["length_penalty"], max_new_tokens=s["target_len"],
                                     do_sample=False)
                hypotheses += tok.decode_batch(out.tolist(), skip_special_tokens=True)
        (work / f"{hf_name(init)}{suffix(seed)}-test-beam{beam}.txt").write_text("".join(h + "\n" for h in hypotheses))
        scores[beam] = (sacrebleu.corpus_bleu(hypotheses, [references]).score,
                        sacrebleu.corpus_chrf(hypotheses, [references]).score)
    return {"bleu_beam4": scores[4][0], "chrf_beam4": scores[4][1], "bleu_greedy": scores[1][0],
            "chrf_greedy": scores[1][1], "test_loss": test_loss / tokens, "test_perplexity": math.exp(test_nll / tokens),
            "test_accuracy": correct / tokens, "train_s": trained, "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/seq2seq_vs_hf"))
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    parser.add_argument("--only", choices=("jaxlm", "hf"), help="run one side")
    parser.add_argument("--layout", choices=("preset", "t5"), default="preset",
                        help="the preset's layout (2017: MarianMTModel on the other side), or T5's on both sides")
    parser.add_argument("--hf-init", choices=("library", "xavier", "jaxlm"), default="library",
                        help="the Hugging Face side's initialisation: transformers' own, jaxlm's model.init=xavier, "
                             "or the jaxlm run's initial parameters and batch order")
    parser.add_argument("--seed", type=int, default=0, help="both sides' seed (initialisation and data order)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for side, name, fn in (("jaxlm", "jaxlm", run_jaxlm), ("hf", hf_name(args.hf_init), functools.partial(run_hf, init=args.hf_init))):
        if args.only in (None, side):
            result = fn(args.workdir, args.steps, args.layout, args.seed)
            (args.workdir / f"{name}{suffix(args.seed)}.json").write_text(json.dumps(result))
    print_table(args.workdir)


def print_table(work: Path) -> None:
    """Every result in `work`, by side and seed, then each side's mean over its seeds."""
    columns = ("bleu_beam4", "bleu_greedy", "chrf_beam4", "train_s", "seconds")
    sides: dict[str, dict[str, dict]] = {}
    for name in ("jaxlm", "hf", "hf-xavier", "hf-jaxlm"):
        for path in sorted(work.glob(f"{name}.json")) + sorted(work.glob(f"{name}-seed*.json")):
            sides.setdefault(name, {})[path.stem] = json.loads(path.read_text())
    print(f"{'':15s} {'BLEU beam 4':>11s} {'BLEU greedy':>11s} {'chrF beam 4':>11s} {'test ppl':>8s} "
          f"{'train s':>8s} {'total s':>8s}")
    means = {}
    for name, runs in sides.items():
        rows = list(runs.items())
        means[name] = {c: sum(r[c] for r in runs.values()) / len(runs) for c in columns}
        measured = [r["test_perplexity"] for r in runs.values() if "test_perplexity" in r]  # (older results lack it)
        if len(measured) == len(runs):
            means[name]["test_perplexity"] = sum(measured) / len(measured)
        if len(runs) > 1:
            rows.append((f"{name} mean of {len(runs)}", means[name]))
        for label, r in rows:
            ppl = f"{r['test_perplexity']:8.2f}" if "test_perplexity" in r else f"{'-':>8s}"
            print(f"{label:15s} {r['bleu_beam4']:11.1f} {r['bleu_greedy']:11.1f} {r['chrf_beam4']:11.1f} {ppl} "
                  f"{r['train_s']:8.0f} {r['seconds']:8.0f}")
    if "jaxlm" in means and "hf" in means:
        print(f"jaxlm / hf total time (means): {means['jaxlm']['seconds'] / means['hf']['seconds']:.2f}")


if __name__ == "__main__":
    main()
