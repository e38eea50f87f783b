"""Where metrics go: the console (a progress bar on a terminal), metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drops records past `after_step`, so a resumed run's log reads as one history."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the process was killed
            continue
        if record.get("step", 0) <= after_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class Writers:
    """Writes each record to the console, `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: Path, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total_steps
        self._start_time = time.time()
        self._start_step = start_step
        self._bar = None
        if not enabled:
            return
        self._jsonl_path = workdir / "metrics.jsonl"
        truncate_jsonl(self._jsonl_path, start_step)
        self._jsonl = self._jsonl_path.open("a")
        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
        if sys.stdout.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def eta(self, step: int) -> float:
        """Seconds left at the pace since this run started."""
        done = step - self._start_step
        if done <= 0:
            return float("nan")
        return (time.time() - self._start_time) / done * (self.total - step)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        """Records `values` of `kind` ("train" or "eval") at `step`."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tb.add_scalar(f"{kind}/{key}", value, step)
        self._tb.flush()
        self._print(format_line(step, self.total, kind, values))

    def advance(self, step: int) -> None:
        """Moves the progress bar (terminal only)."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()


def format_line(step: int, total: int, kind: str, values: dict[str, float]) -> str:
    """One console line, e.g. `step 100/600 train loss 4.12 lr 1.0e-03 ...`."""
    parts = [f"step {step}/{total}", kind]
    for key, value in values.items():
        if key == "eta_s":
            parts.append(f"eta {_duration(value)}")
        elif key == "learning_rate":
            parts.append(f"lr {value:.2e}")
        elif key == "tokens_per_s":
            parts.append(f"tok/s {value:,.0f}")
        elif key == "examples_per_s":
            parts.append(f"ex/s {value:,.1f}")
        elif key == "model_tflops_per_device":
            parts.append(f"tflop/s/device {value:.3g}")
        elif key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif key == "data_wait_s":
            parts.append(f"data_wait {value * 1e3:.1f}ms")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
