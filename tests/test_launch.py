"""Launch scripts: help, dry runs that print exactly what would run, argument errors, shellcheck."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ("local_multiprocess.sh", "tpu_vm.sh", "gpu_slurm.sbatch")


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {"PATH": "/usr/bin:/bin", **env}
    return subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True, env=environ,
                          timeout=30)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_the_script(script):
    done = run(script, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage:") and "example:" in done.stdout


def test_local_dry_run_prints_one_command_per_process():
    done = run("local_multiprocess.sh", "--dry-run", "--port", "4000", "--devices-per-process", "2", "3",
               "--workdir", "runs/a b", "train.steps=5")
    lines = [shlex.split(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and len(lines) == 3
    for i, words in enumerate(lines):
        assert words[:5] == ["env", "JAXLM_COORDINATOR=localhost:4000", "JAXLM_NUM_PROCESSES=3",
                             f"JAXLM_PROCESS_ID={i}", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
        assert words[5:] == ["python", "-m", "jaxlm.train", "--workdir", "runs/a b", "train.steps=5"]
    assert run("local_multiprocess.sh", "two").returncode == 2


def test_tpu_dry_run_runs_train_on_every_worker_with_arguments_quoted():
    done = run("tpu_vm.sh", "--dry-run", "--zone", "us-central2-b", "--env", "A=1", "my-tpu",
               "--workdir", "/mnt/runs/a b", "train.steps=5", PYTHON="python3")
    words = shlex.split(done.stdout)
    assert done.returncode == 0
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--zone=us-central2-b" in words and "--worker=all" in words
    remote = shlex.split(next(w for w in words if w.startswith("--command=")).removeprefix("--command="))
    assert remote == ["cd", "jaxlm", "&&", "env", "JAXLM_DISTRIBUTED=auto", "A=1", "python3", "-m",
                      "jaxlm.train", "--workdir", "/mnt/runs/a b", "train.steps=5"]
    assert run("tpu_vm.sh").returncode == 2


def test_slurm_dry_run_and_refusal_outside_a_job():
    done = run("gpu_slurm.sbatch", "--dry-run", "--workdir", "w", "train.steps=5")
    assert done.returncode == 0
    assert shlex.split(done.stdout) == ["srun", "--kill-on-bad-exit=1", "python", "-m", "jaxlm.train",
                                        "--workdir", "w", "train.steps=5"]
    outside = run("gpu_slurm.sbatch", "--workdir", "w")
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", *(str(LAUNCH / s) for s in SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
