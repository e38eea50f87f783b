"""Token-store preparation and training memory as a corpus grows, and preparation throughput
against the tokenizer alone.

    python bench/data_scale.py [--corpus DIR] [--scales 1 4 16] [--copies-per-scale 5] [--workers 2]
                               [--steps 100] [--runner DirectRunner]

The corpus at scale k is k x `--copies-per-scale` hard links of every file in `--corpus`
(default ../shared/data/corpus), so scale 1 of the shared corpus is ~100 MB, 4 is ~400 MB and
16 is ~1.6 GB, using no extra disk. For each scale it runs, as separate processes:
  * `python -m jaxlm.prepare` (the default model's config on that text, `--workers`
    processes, or an Apache Beam pipeline with `--runner`): wall time, tokens/s, and the peak
    resident memory (each process's high-water mark: of the main process, of its workers, and
    of the two together);
  * the first 100 training steps of the default model on the prepared store: peak resident
    memory, and the median time a step waited for data (from the train log);
  * opening the prepared store as `train` does (tokenizer, corpus fingerprint, store
    manifests), timed: a run's start-up before compilation.
The ceiling is `tokenizers`' own `encode_batch` over the scale-1 text with `--workers` threads
in one process, measured before and after every scale's preparation; a build's rate is given
as a share of the mean of the two. One tokenizer (trained once on the original files) serves
every scale, so only the store is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """The process ids below a process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, tuple[int, int, int], str]:
    """(seconds, peak resident bytes (of the process tree, of the process, of its descendants),
    stderr) of a command. Each process's own peak is the kernel's high-water mark (VmHWM), read
    every 0.1 s, so no short peak is missed; the tree's is the largest sum of its live
    processes' marks."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks: dict[int, int] = {}  # pid -> VmHWM
    peak = (0, 0, 0)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    reader.start()
    while proc.poll() is None:
        live = descendants(proc.pid)
        for pid in [proc.pid, *live]:
            marks[pid] = max(marks.get(pid, 0), _status(pid, "VmHWM"))
        workers = sum(marks[p] for p in live)
        peak = (max(peak[0], marks[proc.pid] + workers), marks[proc.pid], max(peak[2], workers))
        time.sleep(0.1)
    reader.join()
    proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(err)[-3000:]}")
    return time.time() - start, peak, "".join(err)


def corpus(source: Path, copies: int, where: Path) -> Path:
    """`copies` hard links of every file of `source` under `where`."""
    where.mkdir(parents=True)
    for k in range(copies):
        for f in sorted(source.glob("*.txt")):
            os.link(f, where / f"{k:04d}-{f.name}")
    return where


def ceiling(text_dir: Path, tokenizer: Path, threads: int, method: str = "encode_batch") -> float:
    """Tokens/s of `encode_batch` (or another method) alone over the files' text (read first),
    `threads` threads."""
    code = f"""
import os, sys, time
from pathlib import Path
from tokenizers import Tokenizer
from jaxlm.data import sources
tok = Tokenizer.from_file({str(tokenizer)!r})
docs = [d for f in sorted(Path({str(text_dir)!r}).glob("*.txt")) for d in sources.file_documents(f, "strict")]
start, tokens = time.time(), 0
for i in range(0, len(docs), 256):
    tokens += sum(len(e.ids) for e in tok.{method}(docs[i:i + 256], add_special_tokens=False))
print(tokens / (time.time() - start))
"""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared/data/corpus")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--copies-per-scale", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100, help="training steps measured (0: none)")
    parser.add_argument("--runner", help="prepare with Apache Beam on this runner instead of local workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, JAXLM_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT))
        env.pop("XLA_FLAGS", None)
        base = ["data.source=text", f"data.prepare_workers={args.workers}"]
        # one tokenizer for every scale, trained on the original files
        subprocess.run([sys.executable, "-m", "jaxlm.prepare", "--workdir", str(tmp / "tok"), *base,
                        f"data.paths=[{args.corpus}/*.txt]"], env=env, check=True, capture_output=True)
        tokenizer = tmp / "tok" / "tokenizer.json"
        base.append(f"data.tokenizer={tokenizer}")
        runner = ["--runner", args.runner, f"--direct_num_workers={args.workers}"] if args.runner else []
        one = corpus(args.corpus, args.copies_per_scale, tmp / "scale1")
        # the ceiling is measured before and after every scale: each build is compared with the
        # mean of the two around it, so a machine that slows down over a long run shows as such
        ceilings = [ceiling(one, tokenizer, args.workers)]
        print(f"ceiling: tokenizers encode_batch alone, {args.workers} threads: {ceilings[-1]:,.0f} tokens/s; "
              f"encode_batch_fast (no offsets, which jaxlm uses): "
              f"{ceiling(one, tokenizer, args.workers, 'encode_batch_fast'):,.0f} tokens/s", flush=True)
        for scale in args.scales:
            text = one if scale == 1 else corpus(args.corpus, scale * args.copies_per_scale, tmp / f"scale{scale}")
            size = sum(f.stat().st_size for f in text.glob("*.txt"))
            data = [*base, f"data.paths=[{text}/*.txt]"]
            took, peak, err = run_measured([sys.executable, "-m", "jaxlm.prepare", *runner, *data], env)
            built = [line for line in err.splitlines() if line.startswith("text train:")][-1]
            rate = float(built.split(" tokens/s")[0].split(", ")[-1].split()[-1].replace(",", ""))
            ceilings.append(ceiling(one, tokenizer, args.workers))
            around = (ceilings[-2] + ceilings[-1]) / 2
            print(f"scale {scale:>2} ({size / 1e6:,.0f} MB): prepare {took:,.1f} s in all, peak RSS {mib(peak[0])} "
                  f"(main process {mib(peak[1])}, workers {mib(peak[2])}); {built.strip()}; ceiling before/after "
                  f"{ceilings[-2]:,.0f} / {ceilings[-1]:,.0f} tokens/s: {100 * rate / around:.1f}%", flush=True)
            if not args.steps:
                continue
            wd = tmp / f"run{scale}"
            took, peak, err = run_measured([sys.executable, "-m", "jaxlm.train", "--workdir", str(wd), *data,
                                            f"train.steps={args.steps}", "train.log_every=10",
                                            f"train.eval_every={10 * args.steps}", f"checkpoint.every={10 * args.steps}"],
                                           env)
            logged = [json.loads(r) for r in (wd / "metrics.jsonl").read_text().splitlines()]
            waits = [r["data_wait_s"] for r in logged if r["kind"] == "train"][1:]
            print(f"scale {scale:>2}: train {args.steps} steps {took:,.1f} s, peak RSS {mib(peak[0])}, "
                  f"data wait median {statistics.median(waits) * 1e3:.2f} ms/step "
                  f"(max {max(waits) * 1e3:.2f})", flush=True)
            code = (f"import time; from pathlib import Path; t = time.time(); from jaxlm import config, train\n"
                    f"c = config.load(None, {data!r}); train.task_data(c, Path({str(wd)!r}))\n"
                    f"print(time.time() - t)")
            start = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
            print(f"scale {scale:>2}: opening the prepared data as train does: {float(start.stdout.split()[-1]):.2f} s",
                  flush=True)


if __name__ == "__main__":
    main()
