"""README.md as a user reads it: its Quick start commands and Python blocks, run as written.

The commands are read from README.md itself, so the two cannot drift. They run in a fresh
directory (holding only a copy of `configs/`, as a clone would) with the README's relative
workdir; the test venv stands in for the README's `.venv` (same package, same install).
Training is shortened only by `--config.training.*` overrides appended to command 1.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md")).read()
SHORT = [
    "--config.training.num_train_steps=4",
    "--config.training.checkpoint_every_steps=2",
    "--config.training.log_every_steps=2",
    "--config.training.sample_every_steps=4",
    "--config.training.num_sample_images=4",
]


def section(title):
    """The text of the README section headed `## title`."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def quick_start_commands():
    (script,) = blocks(section("Quick start"), "bash")
    return [line for line in script.splitlines() if line.strip() and not line.startswith("#")]


# The test venv's console scripts stand in for the README's .venv/bin/ ones.
BIN = os.path.dirname(sys.executable)


def main_args(command):
    """The arguments of the `.venv/bin/ddpm-jax` part of a command line (mode first)."""
    part = command.split("&&")[-1]
    words = shlex.split(part)
    assert words[0] == ".venv/bin/ddpm-jax" and words[1] in ("train", "sample", "eval"), command
    return words[1:]


def run_main(args, cwd):
    out = subprocess.run(
        [os.path.join(BIN, "ddpm-jax"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stderr + out.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh directory holding what a clone's commands read: configs/."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(os.path.join(REPO, "configs"), root / "configs")
    return root


def test_the_test_command_is_the_one_ci_runs():
    commands = quick_start_commands()
    tests = [c for c in commands if "-m pytest" in c]
    assert len(tests) == 1
    ci = open(os.path.join(REPO, ".ci", "run")).read().strip().splitlines()[-1]
    assert ci == tests[0]


def test_quick_start_train_resume_sample_evaluate(clone):
    train, sample, evaluate = [c for c in quick_start_commands() if "bin/ddpm-jax " in c]
    assert "pip install -e ." in train
    args = main_args(train)
    workdir_arg = next(a for a in args if a.startswith("--workdir="))
    workdir = clone / workdir_arg.split("=", 1)[1]
    assert not os.path.isabs(workdir_arg.split("=", 1)[1])  # the README's relative workdir.

    log = run_main(args + SHORT, clone)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["bpd_estimate"]) for r in rows)
    assert (workdir / "samples_00000004.png").exists()
    assert "\r" not in log  # progress lines, not a bar rewriting itself, in a log file.
    assert "train: 4/4 steps" in log and "sample grid at step 4" in log

    resumed = run_main([*args, *SHORT[1:], "--config.training.num_train_steps=6"], clone)
    assert "Resumed from step 4 of" in resumed
    assert "6" in os.listdir(workdir / "checkpoints")
    assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [2, 4, 6]
    history = json.load(open(workdir / "config.json"))["training"]
    assert history["num_train_steps"] == 6

    run_main(main_args(sample), clone)
    samples = np.load(workdir / "samples" / "samples.npz")["images"]
    assert samples.shape == (64, 16, 16, 1) and samples.dtype == np.uint8
    assert len([f for f in os.listdir(workdir / "samples") if f.endswith(".png")]) == 1

    run_main(main_args(evaluate), clone)
    result = json.load(open(workdir / "eval" / "bpd_step6.json"))
    assert result["num_examples"] == 32 and np.isfinite(result["bpd"]) and result["step"] == 6
    assert "fid_skipped" in result  # no Inception weights configured.

    # The Python block of "Sampling" runs as written against the same workdir.
    (code,) = blocks(section("Sampling"), "python")
    code += "\nprint(images.shape, fast.shape, x0_hat.shape)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=clone, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "(8, 16, 16, 1) (16, 16, 16, 1) (2, 16, 16, 1)"


def test_the_mathematics_block_runs_as_written():
    (code,) = blocks(section("The mathematics, as a library"), "python")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["samples"].shape == (16, 8, 8, 1)
    assert np.all(np.isfinite(np.asarray(namespace["bpd"].total)))
    assert namespace["loss"].shape == (4,) and namespace["x_t"].shape == (4, 8, 8, 1)
