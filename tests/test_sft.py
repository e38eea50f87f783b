"""Supervised fine-tuning: prompt tokens carry zero weight; a run trains and generates."""

import json

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import infer, train
from jaxlm.config import DataConfig, ModelConfig, SftConfig
from jaxlm.data import packing, prompts
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.tasks.sft import SftTask

WORDS = tokenizer_lib.placeholder(64)  # one token a word: w4, w5, ...
EXAMPLES = [{"prompt": "w4 w5 w6", "response": "w7 w8"}, {"prompt": "w9", "response": "w10 w11 w12 w13"}]


def test_rows_mark_only_the_response_and_its_eos():
    rows = prompts.PromptRows(EXAMPLES, WORDS, 8, "{prompt}")
    row = rows[0]  # [BOS] w4 w5 w6 | w7 w8 [EOS]: targets w4 w5 w6 w7 w8 EOS
    assert row["inputs"][:6].tolist() == [WORDS.bos_id, 4, 5, 6, 7, 8]
    assert row["targets"][:6].tolist() == [4, 5, 6, 7, 8, WORDS.eos_id]
    assert row["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert rows[1]["loss_mask"].tolist() == [0, 1, 1, 1, 1, 1, 0, 0] and rows.tokens == 8
    short = prompts.PromptRows(EXAMPLES[1:], WORDS, 4, "{prompt}")  # too long: the response's end is cut
    assert short[0]["targets"].tolist() == [9, 10, 11, 12] and short[0]["loss_mask"].tolist() == [0, 1, 1, 1]


def test_conversations_learn_only_the_assistant_turns():
    """A conversation rendered by the default template: every assistant turn and its end token
    are learned, the system and user turns and the template's markers are not."""
    from jaxlm.data import chat
    messages = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w5 w6"},
                {"role": "assistant", "content": "w7"}, {"role": "user", "content": "w8"},
                {"role": "assistant", "content": "w9 w10"}]
    rows = prompts.PromptRows([{"messages": messages}], WORDS, 40, "{prompt}")
    text = chat.render("", messages, WORDS)
    assert text.startswith("<s><|system|>\nw4\n<|user|>\nw5 w6\n<|assistant|>\nw7</s>\n")
    n = int(rows.lengths[0])
    ids = [*rows.inputs[0, :n], rows.targets[0, n - 1]]
    assert ids == WORDS.encode(text)
    learned = [WORDS.tokenizer.id_to_token(int(t)) for t, m in zip(rows.targets[0], rows.mask[0]) if m]
    assert learned == ["w7", "</s>", "w9", "w10", "</s>"]
    with pytest.raises(UserError, match="x.jsonl:3: the conversation has no assistant message"):
        chat.check_messages(messages[:2], "x.jsonl:3")
    with pytest.raises(UserError, match="message 1 must be"):
        chat.check_messages([messages[0], {"role": "bot", "content": "w4"}], "x.jsonl:3")
    with pytest.raises(UserError, match="renders a conversation's prefix differently"):  # not append-only
        chat.pieces("{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}", messages, WORDS)


def test_prompt_tokens_carry_zero_weight():
    """The loss is the mean cross-entropy of the response targets: changing a prompt target
    changes nothing, changing a response target changes it."""
    task = SftTask(ModelConfig(num_layers=1, embed_dim=32, num_heads=4, vocab_size=64, max_len=16), np.ones(64, np.int32))
    rows = prompts.PromptRows(EXAMPLES, WORDS, 8, "{prompt}")
    batch = {k: np.stack([rows[i][k] for i in range(2)]) for k in task.batch_keys}
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), task.init(jax.random.key(0), batch)["params"],
                                    is_leaf=lambda x: hasattr(x, "value"))

    def loss(b):
        value, sums = task.loss(params, b, jax.random.key(0), train=False)
        return float(value), float(sums["tokens"])

    base, tokens = loss(batch)
    assert tokens == 8  # 3 + 5 response targets (with EOS), not the 11 real tokens
    prompt_changed = {**batch, "targets": batch["targets"].copy()}
    prompt_changed["targets"][0, 1] = 40  # a prompt target
    assert loss(prompt_changed)[0] == base
    response_changed = {**batch, "targets": batch["targets"].copy()}
    response_changed["targets"][0, 4] = 40  # a response target
    assert loss(response_changed)[0] != base


def test_packed_rows_give_the_loss_of_one_example_a_row():
    """Several examples share a row apart by segment ids, positions restarting: the loss sums
    are those of one example a row (a mask crossing examples, or positions running on, would
    change them)."""
    task = SftTask(ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=64, max_len=16), np.ones(64, np.int32))
    examples = [{"prompt": " ".join(f"w{4 + (i * 7 + j) % 50}" for j in range(1 + i % 3)),
                 "response": " ".join(f"w{4 + (i * 5 + j) % 50}" for j in range(1 + i % 4))} for i in range(8)]
    rows = prompts.PromptRows(examples, WORDS, 16, "{prompt}")
    batch = {k: np.stack([rows[i][k] for i in range(8)]) for k in task.batch_keys}
    packed = packing.Packer(packing.packed_sizes(rows.lengths, rows.seq_len, 8))(batch)
    assert packed["inputs"].shape[0] < 8 and packed["segment_ids"].max() > 1
    params = task.init(jax.random.key(0), batch)["params"]
    _, alone = task.loss(params, batch, jax.random.key(0), train=False)
    _, together = task.loss(params, packed, jax.random.key(0), train=False)
    assert float(together["tokens"]) == float(alone["tokens"]) == rows.tokens
    np.testing.assert_allclose(float(together["loss_sum"]), float(alone["loss_sum"]), rtol=1e-5)
    assert float(together["correct"]) == float(alone["correct"])


def test_files_and_their_errors(tmp_path):
    data = DataConfig(source="prompts", paths=[str(tmp_path / "train.jsonl")], eval_paths=[str(tmp_path / "dev.jsonl")])
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps(EXAMPLES[0]) + "\n")
    splits = prompts.load_splits(data, SftConfig())
    assert [e["response"] for e in splits.train] == ["w7 w8", "w10 w11 w12 w13"] and len(splits.eval) == 1
    (tmp_path / "train.jsonl").write_text('{"prompt": "w4"}\n')
    with pytest.raises(UserError, match="train.jsonl:1: no text field 'response'.*sft.response_key"):
        prompts.load_splits(data, SftConfig())
    with pytest.raises(UserError, match="task=sft reads JSONL prompt/response files"):
        config_lib.load(None, ["task=sft", "data.source=text", "data.paths=[x.txt]"])


def test_a_tiny_sft_run_learns_its_responses_and_generates_them(tmp_path, capsys):
    """Prompt/response pairs and conversations, each with its own fixed response, packed
    several to a row: after training, greedy generation gives the responses back, for a plain
    prompt and for a chat message (--chat, the default template)."""
    words = ("alpha", "beta", "gamma", "delta", "omega", "sigma")
    pairs = [{"prompt": f"say {w}", "response": f"{w} {w} done"} for w in words[:3]]
    pairs += [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} done"}]}
              for w in words[3:]]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    overrides = ["task=sft", "data.source=prompts", f"data.paths=[{tmp_path}/train.jsonl]",
                 f"data.eval_paths=[{tmp_path}/train.jsonl]", f"data.cache_dir={tmp_path}/cache", "data.vocab_size=300",
                 "data.seq_len=32", "model.num_layers=2", "model.embed_dim=64", "model.num_heads=4", "model.max_len=48",
                 "train.batch_size=8", "train.steps=80", "train.log_every=20", "train.eval_every=80",
                 "optim.learning_rate=3e-3", "optim.warmup_steps=5", "checkpoint.every=80"]
    final = train.train(config_lib.load(None, overrides), tmp_path / "w")
    assert final["loss"] < 0.3, final
    capsys.readouterr()
    generate = ["generate", "--workdir", str(tmp_path / "w"), "--temperature", "0", "--max-new-tokens", "8"]
    infer.main([*generate, "say gamma\n"])
    assert "gamma gamma done" in capsys.readouterr().out
    infer.main([*generate, "--chat", "say omega"])
    assert capsys.readouterr().out.strip() == "omega omega done"  # the answer alone, ended by its end token


def test_lora_sft_from_a_pretrained_decoder_keeps_its_weights(tiny, tmp_path):
    """init.from_workdir with init.subtree=all takes the whole base decoder (its tokenizer and
    shapes too); with model.lora_rank only the adapters train, so after fine-tuning every base
    weight is still the base run's, bit for bit."""
    from jaxlm.workdir import open_run
    train.train(config_lib.load(None, tiny + ["train.steps=4"]), tmp_path / "base")
    pairs = [{"prompt": "Return the", "response": f"value {i}"} for i in range(12)]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    sft = ["task=sft", "data.source=prompts", f"data.paths=[{tmp_path}/sft.jsonl]", f"data.eval_paths=[{tmp_path}/sft.jsonl]", "data.seq_len=16",
           "train.batch_size=8", "train.steps=6", "train.eval_every=6", "checkpoint.every=6",
           f"init.from_workdir={tmp_path / 'base'}", "init.subtree=all", "model.lora_rank=4"]
    train.train(config_lib.load(None, sft), tmp_path / "sft")

    def params(workdir):
        run, ckpt = open_run(workdir)
        return jax.device_get(ckpt.restore_params(run.compiled.abstract_state.params)[0])
    base, tuned = params(tmp_path / "base"), params(tmp_path / "sft")
    moved = []
    for path, value in jax.tree_util.tree_leaves_with_path(tuned):
        if path[-1].key in ("lora_a", "lora_b"):
            moved.append(path[-1].key)
            continue
        want = base
        for key in path:
            want = want[key.key]
        np.testing.assert_array_equal(value, want)
    assert "lora_b" in moved
