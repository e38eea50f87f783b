"""End to end: train, resume after a kill, evaluate, generate (tiny model, 8 fake devices)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import records

from jaxlm import config as config_lib
from jaxlm import evaluate, infer, train
from jaxlm.checkpoint import Checkpoints
from jaxlm.errors import UserError


@pytest.fixture(scope="module")
def trained(corpus_dir, cache_dir, tmp_path_factory):
    from conftest import tiny_overrides
    overrides = tiny_overrides(corpus_dir, cache_dir) + ["train.peak_tflops=0.5", "train.profile_steps=[3,4]"]
    workdir = tmp_path_factory.mktemp("run")
    train.train(config_lib.load(None, overrides), workdir)
    return workdir, overrides


def test_a_run_keeps_its_compiled_programs_in_the_data_cache(corpus_dir, cache_dir, tmp_path):
    """With no JAX cache directory of the user's, `train` keeps the programs it compiles in
    `<data.cache_dir>/xla` (JAX's persistent cache: evaluate, infer and a restart load them from
    there); one of the user's (`JAX_COMPILATION_CACHE_DIR`, set for the tests) is used as it is;
    `train.compile_cache=false` turns it off."""
    import jax
    from conftest import tiny_overrides

    from jaxlm.workdir import use_compile_cache
    cache = cache_dir  # the session's (its tokenizer already trained); no other test writes its xla/
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    done = subprocess.run([sys.executable, "-m", "jaxlm.train", "--workdir", str(tmp_path / "run"),
                           *tiny_overrides(corpus_dir, cache), "train.steps=1", "train.eval_every=100"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(p.name.startswith("jit_train_step") for p in (cache / "xla").iterdir())
    config = config_lib.load(None, [f"data.cache_dir={cache}"])
    users = jax.config.jax_compilation_cache_dir
    assert use_compile_cache(config) == Path(users) == Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert use_compile_cache(config_lib.load(None, ["train.compile_cache=false"])) is None
        assert jax.config.jax_compilation_cache_dir is None
        assert use_compile_cache(config) == cache / "xla" == Path(jax.config.jax_compilation_cache_dir)
    finally:
        jax.config.update("jax_compilation_cache_dir", users)


def test_run_writes_a_self_describing_workdir(trained):
    workdir, overrides = trained
    assert config_lib.load_workdir(workdir).model.vocab_size == 512  # 400 padded to 128s
    assert (workdir / "tokenizer.json").is_file()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    logged = records(workdir, "train")
    assert sorted(logged) == [2, 4, 6, 8]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "data_wait_s", "eta_s"} <= set(logged[8])
    # mfu: the same model FLOPs over the configured peak (0.5 TFLOP/s)
    assert logged[8]["mfu"] == pytest.approx(logged[8]["model_tflops_per_device"] / 0.5)
    assert 0 < logged[8]["mfu"] < 1
    assert [p.name for p in (workdir / "profile").glob("plugins/profile/*/*.xplane.pb")]  # steps 3-4 traced
    evals = records(workdir, "eval")
    assert sorted(evals) == [4, 8]
    assert {"loss", "perplexity", "bits_per_byte", "accuracy"} <= set(evals[8])


def test_evaluate_reproduces_the_last_eval(trained, capsys):
    workdir, _ = trained
    evaluate.main(["--workdir", str(workdir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 8
    assert out["loss"] == pytest.approx(records(workdir, "eval")[8]["loss"], rel=1e-6)
    evaluate.main(["--workdir", str(workdir), "--step", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["loss"] == pytest.approx(records(workdir, "eval")[4]["loss"], rel=1e-6)


def test_generate_greedy_is_deterministic_and_batches_a_file(trained, capsys, tmp_path):
    workdir, _ = trained
    args = ["generate", "--workdir", str(workdir), "--temperature", "0", "--max-new-tokens", "12"]
    infer.main(args + ["The value of"])
    first = capsys.readouterr().out
    infer.main(args + ["The value of"])
    assert capsys.readouterr().out == first and first.startswith("The value of")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The value of\nReturn a\n\nA list of the\n")
    infer.main(args + ["--input", str(prompts)])
    out = capsys.readouterr().out
    assert out.count("--- ") == 3
    # batched with shorter and longer prompts, the greedy continuation is unchanged
    assert out.split("--- 2 ---")[0].split("--- 1 ---\n")[1] == first
    # one prompt is streamed token by token; sampled, it draws what the compiled loop draws
    sampled = ["generate", "--workdir", str(workdir), "--temperature", "0.8", "--top-k", "40", "--top-p", "0.95",
               "--max-new-tokens", "12", "--seed", "3", "Hello"]
    infer.main(sampled)
    streamed = capsys.readouterr().out
    infer.main([*sampled, "--no-stream"])
    assert capsys.readouterr().out == streamed and streamed.startswith("Hello") and len(streamed) > 10


def test_generate_without_repeated_ngrams_streamed_and_batched(trained):
    """--no-repeat-ngram N: no N new tokens in a row twice, the same whether one prompt is
    streamed token by token or decoded in the compiled loop; off, the tiny model repeats."""
    import jax

    from jaxlm.workdir import open_run
    workdir, _ = trained
    run, ckpt = open_run(workdir)
    params, _ = ckpt.restore_params(run.compiled.abstract_state.params)
    prompt = [run.tokenizer.bos_id, *run.tokenizer.encode("The value of")]
    key = jax.random.key(0)

    def ngrams(ids, n):
        return [tuple(ids[j:j + n]) for j in range(len(ids) - n + 1)]

    for n in (0, 1, 2):
        gen = infer.Generator(run, params, 16, temperature=0.0, top_k=0, top_p=1.0, no_repeat_ngram=n)
        ids = list(gen.stream(prompt, key))
        assert len(ids) == 16  # (no end token drawn: every step's choice is checked)
        assert gen([prompt], key) == [run.tokenizer.generated_text(ids)]
        if n:
            assert len(set(ngrams(ids, n))) == len(ngrams(ids, n)), (n, ids)
        else:
            assert len(set(ids)) < len(ids)  # without the setting, some token repeats
    with pytest.raises(SystemExit) as info:
        infer.main(["generate", "--workdir", str(workdir), "x", "--no-repeat-ngram", "-1"])
    assert info.value.code == 2


def test_infer_bad_input_exits_2(trained, capsys):
    workdir, _ = trained
    for args in (["generate", "--workdir", str(workdir)],
                 ["generate", "--workdir", str(workdir), "x", "--top-p", "0"],
                 ["generate", "--workdir", str(workdir / "nope"), "x"]):
        with pytest.raises(SystemExit) as info:
            infer.main(args)
        assert info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_rerun_with_another_model_is_refused(trained):
    workdir, overrides = trained
    with pytest.raises(UserError, match="model.num_layers differ"):
        train.train(config_lib.load(None, overrides + ["model.num_layers=3"]), workdir)


@pytest.mark.slow  # tests/test_faults.py kills a run three times (mid-step, mid-save, at start) by default
def test_killed_run_resumes_with_identical_losses(corpus_dir, cache_dir, tmp_path, capsys):
    from conftest import tiny_overrides
    overrides = tiny_overrides(corpus_dir, cache_dir) + [
        "train.steps=60", "train.log_every=1", "checkpoint.every=7", "train.eval_every=1000"]
    config = config_lib.load(None, overrides)
    train.train(config, tmp_path / "reference")
    reference = records(tmp_path / "reference", "train")

    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.train", "--workdir", str(workdir), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = workdir / "metrics.jsonl"
        if metrics.is_file() and max([0, *records(workdir, "train")]) >= 25:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(records(workdir, "train"))
    assert killed_at < 60

    capsys.readouterr()
    train.train(config, workdir)
    resumed_from = int(capsys.readouterr().err.split("resumed from step ")[1].split()[0])
    assert 0 < resumed_from <= killed_at
    def trajectory(logged):
        return {step: (r["loss"], r["grad_norm"], r["learning_rate"]) for step, r in logged.items()}

    assert trajectory(records(workdir, "train")) == trajectory(reference)  # every step, bit for bit


SLOW = ["model.embed_dim=128", "model.mlp_dim=512", "data.seq_len=64", "train.batch_size=32",
        "train.eval_every=100000", "train.eval_batches=1"]  # steps of ~0.1 s: the device is the bottleneck


def test_host_stays_within_one_step_of_the_device(tiny, tmp_path, monkeypatch):
    """Whatever train.log_every is, the host dispatches a step only once all but the newest of
    the earlier ones have finished (counted on the live arrays, at every dispatch)."""
    unfinished = []
    real_build = train.build

    def spying_build(*args, **kwargs):
        run = real_build(*args, **kwargs)
        step_fn, outputs = run.compiled.train_step, []

        def spy(state, batch, rng):
            unfinished.append(sum(not m["loss_sum"].is_ready() for m in outputs))
            state, metrics = step_fn(state, batch, rng)
            outputs.append(metrics)
            return state, metrics

        run.compiled.train_step = spy
        return run

    monkeypatch.setattr(train, "build", spying_build)
    train.train(config_lib.load(None, tiny + SLOW + ["train.steps=30", "train.log_every=1000",
                                                     "checkpoint.every=1000"]), tmp_path)
    assert len(unfinished) == 30 and max(unfinished) <= train.RUN_AHEAD, unfinished
    assert sorted(records(tmp_path, "train")) == [30]


def test_sigterm_saves_within_the_grace_and_resumes_exactly(tiny, tmp_path):
    """SIGTERM with train.log_every far away: the run stops at the next step boundary, saves and
    exits well within the default checkpoint.preemption_grace_s (30 s; a queue of dispatched steps
    would take minutes), says how long the save took (and warns, here, that it is over the 0.5 s
    this run was given); the rerun continues with the losses of an uninterrupted run."""
    # a constant schedule: the rerun's shorter train.steps leaves the learning rates unchanged
    overrides = tiny + SLOW + ["train.steps=100000", "train.log_every=100000", "checkpoint.every=100000",
                               "optim.schedule=constant"]
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm.train", "--workdir", str(workdir), *overrides,
                             "checkpoint.preemption_grace_s=0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in proc.stderr:  # training is about to begin; let the host run ahead if it could
        if line.startswith("training ") and " parameters for " in line:  # not "training a ... BPE"
            break
    time.sleep(10)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    proc.wait(timeout=300)
    took = time.time() - signalled
    assert proc.returncode == 0, err[-2000:]
    stopped = int(err.split("stopped at step ")[1].split(";")[0])
    assert stopped >= 1
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [stopped]
    saved_after = float(err.split("its checkpoint was complete ")[1].split(" s after")[0])
    assert 0 < saved_after <= took < config_lib.CheckpointConfig.preemption_grace_s, err[-2000:]
    assert "warning: that is more than checkpoint.preemption_grace_s=0.5" in err

    resume = overrides + [f"train.steps={stopped + 3}", "train.log_every=1"]
    train.train(config_lib.load(None, resume), workdir)
    train.train(config_lib.load(None, resume), tmp_path / "reference")
    want, got = records(tmp_path / "reference", "train"), records(workdir, "train")
    assert sorted(got) == [stopped + 1, stopped + 2, stopped + 3]
    for step in got:
        assert got[step]["loss"] == want[step]["loss"] and got[step]["grad_norm"] == want[step]["grad_norm"]


@pytest.mark.parametrize("metric,values,kept", [
    ("perplexity", [10.0, 5.0, 20.0], 2), ("bits_per_byte", [3.0, 2.5, 2.9], 2),
    ("nsp_loss", [0.7, 0.6, 0.65], 2), ("accuracy", [0.5, 0.7, 0.6], 2), ("loss", [3.0, 3.5, 2.0], 3)])
def test_best_checkpoint_follows_the_tasks_direction(tmp_path, metric, values, kept):
    import jax.numpy as jnp

    from jaxlm.steps import TrainState
    from jaxlm.tasks.clm import ClmTask
    from jaxlm.tasks.mlm import MlmTask
    lower = ClmTask.lower_is_better | MlmTask.lower_is_better
    best = train.Best(tmp_path / "best", metric, async_save=False, lower_is_better=lower)
    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.ones(2)}, {"m": jnp.zeros(2)})
    for step, value in enumerate(values, 1):
        best.offer(step, {metric: value}, state.replace(step=jnp.asarray(step)), {"next_row": step})
    best.close()
    assert Checkpoints(tmp_path / "best", read_only=True).all_steps() == [kept]


def test_short_run_notes_that_warmup_is_not_reached(tiny, tmp_path, capsys):
    train.train(config_lib.load(None, tiny + ["train.steps=2", "optim.warmup_steps=3",
                                              "train.eval_every=2"]), tmp_path)
    err = capsys.readouterr().err
    assert err.count("never reaches its peak") == 1


def test_pmap_over_several_processes_is_refused(tiny, tmp_path):
    log = tmp_path / "launch.log"
    launcher = _launch(tmp_path / "mp", tiny + ["mesh.mode=pmap"], log)
    assert launcher.wait(timeout=300) != 0
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    # (the launcher stops the other process once one exits, so it may not get to print)
    assert errors and set(errors) == {"error: mesh.mode=pmap runs in one process, not 2; use mesh.mode=jit, "
                                      "whose default mesh is the same data parallelism over all processes"}, \
        log.read_text()[-2000:]


def test_compile_only_reports_memory_and_flops(tiny, tmp_path, capsys):
    workdir = tmp_path / "never"
    train.main(["--compile-only", "--workdir", str(workdir), *tiny, "mesh.data=2", "mesh.fsdp=4",
                "--device-memory-gib", "64"])
    out = capsys.readouterr().out
    assert "on 8 devices {'data': 2, 'fsdp': 4, 'tensor': 1}" in out
    assert "per device: params" in out and "activations and temporaries" in out and "FLOPs per step" in out
    assert "fits a 64 GiB device" in out
    assert not workdir.exists()  # shapes only: no data prepared, nothing written


def test_compile_only_says_which_knob_makes_the_step_fit(tiny, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--compile-only", *tiny, "--device-memory-gib", "0.001"])
    assert info.value.code == 1
    out = capsys.readouterr().out
    assert "does not fit a 0.001 GiB device" in out
    assert "model.remat=" in out and "train.grad_accum_steps=2" in out and "mesh.fsdp=-1" in out


def test_mesh_that_does_not_divide_a_parameter_is_one_error(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--compile-only", "--workdir", str(tmp_path), *tiny, "mesh.data=1", "mesh.tensor=8"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: parameter block_0/attention/")  # 4 heads over 8 tensor shards
    assert "(4) does not divide over mesh axes tensor = 8" in err


def test_pmap_run_matches_jit_and_its_checkpoints_restore_in_jit_mode(trained, tmp_path, capsys):
    workdir, overrides = trained
    pmap_dir = tmp_path / "pmap"
    train.train(config_lib.load(None, overrides + ["mesh.mode=pmap"]), pmap_dir)
    want, got = records(workdir, "train"), records(pmap_dir, "train")
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
    capsys.readouterr()
    evaluate.main(["--workdir", str(pmap_dir), "--json"])  # evaluation restores it with jit
    out = json.loads(capsys.readouterr().out)
    assert out["loss"] == pytest.approx(records(pmap_dir, "eval")[8]["loss"], rel=1e-5)


def test_resume_on_another_mesh_continues_the_same_run(trained, tmp_path):
    import shutil
    workdir, overrides = trained
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "8")  # as if stopped after the step-4 checkpoint
    train.train(config_lib.load(None, overrides + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), copy)
    want, got = records(workdir, "train"), records(copy, "train")
    assert sorted(got) == [2, 4, 6, 8]
    for step in (6, 8):  # computed after the restore, on the other mesh
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4)


def _launch(workdir: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    """`launch/local_multiprocess.sh 2` (gloo, 2 fake devices a process) in the background."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
    env["PYTHON"] = sys.executable
    script = Path(__file__).resolve().parent.parent / "launch" / "local_multiprocess.sh"
    return subprocess.Popen([str(script), "--port", str(port), "--devices-per-process", "2", "--grace", "5",
                             "2", "--workdir", str(workdir), *overrides],
                            env=env, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # a process group: a failed test kills all of it


def test_two_process_run_resumes_in_one_process_on_other_devices(trained, tmp_path):
    """`launch/local_multiprocess.sh 2` (gloo, 2 devices each, each process a slice of a
    multi-slice mesh) sees the same global batches as one process on 8 devices, and its
    checkpoint resumes in one process exactly as theirs."""
    import shutil
    workdir, overrides = trained
    mp = tmp_path / "mp"
    log = tmp_path / "launch.log"
    launcher = _launch(mp, overrides + ["mesh.slices=2"], log)
    try:
        returncode = launcher.wait(timeout=400)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    assert "on 4 devices" in text
    want, got = records(workdir, "train"), records(mp, "train")
    assert sorted(got) == [2, 4, 6, 8]  # process 0 alone writes the log
    for step in want:  # same rows in the same global batches as one process on 8 devices
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
    assert Checkpoints(mp / "checkpoints", read_only=True).data_state(8) == {"next_row": 8 * 16, "format": 2}

    reference = tmp_path / "reference"
    shutil.copytree(workdir, reference)
    longer = overrides + ["train.steps=12"]
    train.train(config_lib.load(None, longer), reference)
    train.train(config_lib.load(None, longer), mp)  # 1 process, 8 devices
    want, got = records(reference, "train"), records(mp, "train")
    assert sorted(got) == [2, 4, 6, 8, 10, 12]
    for step in (10, 12):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4)


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tiny, tmp_path):
    """Only process 1 is sent SIGTERM; both save one checkpoint at the same step and exit 0
    (without agreement, process 0 would wait in the next step's collectives)."""
    workdir, log = tmp_path / "mp", tmp_path / "launch.log"
    launcher = _launch(workdir, tiny + ["train.steps=5000", "train.log_every=1", "checkpoint.every=5000",
                                                  "train.eval_every=5000"], log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and launcher.poll() is None:
            if (workdir / "metrics.jsonl").is_file() and max([0, *records(workdir, "train")]) >= 3:
                break
            time.sleep(0.1)
        assert launcher.poll() is None, log.read_text()[-3000:]
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        ids = {int(pid): Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in children}
        second = next(pid for pid, env in ids.items() if b"JAXLM_PROCESS_ID=1" in env)
        os.kill(second, signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    stops = [int(line.split("stopped at step ")[1].split(";")[0]) for line in text.splitlines()
             if "stopped at step " in line]
    assert len(stops) == 2 and stops[0] == stops[1], text[-3000:]
    assert "another process was signalled" in text
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [stops[0]]
