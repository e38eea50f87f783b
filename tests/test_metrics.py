import json

from jaxlm.metrics import add_sums
from jaxlm.writers import format_line, truncate_jsonl


def test_truncate_keeps_history_up_to_the_restored_step_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 6, "loss": 0.4}\n{"step": 8, "lo')
    truncate_jsonl(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]


def test_sums_accumulate_in_float64():
    total = add_sums(None, {"loss_sum": 1e8, "tokens": 1.0})
    total = add_sums(total, {"loss_sum": 1.0, "tokens": 1.0})
    assert total == {"loss_sum": 100000001.0, "tokens": 2.0}


def test_console_line():
    line = format_line(100, 800, "train", {"loss": 3.14159, "learning_rate": 0.003, "tokens_per_s": 14800.4,
                                           "eta_s": 3725.0})
    assert line == "step 100/800 train loss 3.142 lr 3.00e-03 tok/s 14,800 eta 1:02:05"
