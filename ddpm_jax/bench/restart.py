r"""Restart cost: time to first step with an empty and a warm compilation cache.

    ddpm-jax-restart --config=configs/digits.py --dir=/tmp/restart \
        [--caches=on,off] [--parts=train,sampler,eval] [--json=restart.json]

(also `python -m ddpm_jax.bench.restart`; `--config.group.field=value` flags pass on to the
training command).

Each measurement is a new process, run the way a user runs it, in order:

- `train`: `ddpm-jax train --config=... --workdir=...` for one step, then the same
  command resumed for a second step; the time from launching the command to the step's row in
  `metrics.jsonl` (start-up, restore, compiling the train step and the metrics' estimate, one
  step), and the command's whole wall time (with the checkpoint and the final sample grid);
- `sampler`: `load_sampler(workdir)` then `sample(n)` in a new Python process, twice;
- `eval`: `ddpm-jax eval --workdir=...` on a few examples (one batch),
  twice.

With `on` every process shares one cache directory that starts empty (`<dir>/cache`); with `off`
none has a cache (`--compilation_cache_dir=off`), so the second run shows what the cache saves.
The training commands' output goes to `<dir>/train_*.log`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ddpm_jax.errors import ConfigError, WorkdirError
from ddpm_jax.runtime.workdir import METRICS_FILE

CACHES = ("on", "off")
PARTS = ("train", "sampler", "eval")

_SAMPLE_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import ddpm_jax
s = ddpm_jax.load_sampler(sys.argv[1], compilation_cache_dir=sys.argv[2])
loaded = time.perf_counter()
s.sample(int(sys.argv[3]), seed=0)
print(json.dumps({"load_s": loaded - start, "first_images_s": time.perf_counter() - start}))
"""


def _first_row_time(
    cmd: list[str], metrics: str, step: int, env: dict, log: str
) -> dict[str, float]:
    """Runs `cmd` (output to `log`); seconds until `metrics` has a row of `step`, and wall time."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        first = None
        while proc.poll() is None:
            if first is None and _has_step(metrics, step):
                first = time.perf_counter() - start
            time.sleep(0.05)
        wall = time.perf_counter() - start
    if proc.returncode:
        with open(log, errors="replace") as f:
            output = f.read()
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    if first is None and _has_step(metrics, step):
        first = wall  # the row appeared between the last poll and the exit.
    return {"first_step_s": first, "wall_s": wall}


def _has_step(metrics: str, step: int) -> bool:
    try:
        with open(metrics) as f:
            return any(json.loads(line).get("step") == step for line in f if line.strip())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return wall, result.stdout


def measure(
    config: str,
    directory: str,
    *,
    caches: Sequence[str] = CACHES,
    parts: Sequence[str] = PARTS,
    num_images: int = 8,
    eval_examples: int = 8,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs the restart measurements; returns {cache: {measurement: seconds}}.

    Args:
      config: the experiment config file to train (e.g. configs/digits.py).
      directory: a new or empty directory (a non-empty one is refused, so nothing is lost);
        it then holds the workdirs, the cache and the training logs.
      caches: "on" (one shared cache, empty at first) and/or "off".
      parts: of PARTS; `sampler` and `eval` use the workdir `train` made (so need it).
      num_images: images the `sampler` part draws.
      eval_examples: examples of the `eval` part's bound, in one batch (a multiple of the
        device count).
      overrides: more `--config.group.field=value` flags for the training command.
    """
    unknown = set(caches) - set(CACHES) | set(parts) - set(PARTS)
    if unknown:
        raise ConfigError(
            f"unknown caches/parts {sorted(unknown)}: caches {CACHES}, parts {PARTS}."
        )
    if {"sampler", "eval"} & set(parts) and "train" not in parts:
        raise ConfigError("the sampler and eval parts sample and evaluate the workdir of train.")
    if os.path.isdir(directory) and os.listdir(directory):
        raise WorkdirError(f"--dir={directory} is not empty: give a new or empty directory.")
    os.makedirs(directory, exist_ok=True)
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the flag below decides.
    py = sys.executable
    results: dict[str, Any] = {}
    for cache in caches:
        cache_dir = os.path.join(directory, "cache") if cache == "on" else "off"
        workdir = os.path.join(directory, f"run_cache_{cache}")
        out: dict[str, Any] = {}
        train = [py, "-m", "ddpm_jax.main", f"--config={config}", f"--workdir={workdir}",
                 f"--compilation_cache_dir={cache_dir}", "--config.training.log_every_steps=1",
                 *overrides]  # fmt: skip
        metrics = os.path.join(workdir, METRICS_FILE)
        if "train" in parts:
            for run, steps in (("first", 1), ("resumed", 2)):
                cmd = [*train, f"--config.training.num_train_steps={steps}"]
                log = os.path.join(directory, f"train_{run}_cache_{cache}.log")
                out[f"train_{run}"] = _first_row_time(cmd, metrics, steps, env, log)
        if "sampler" in parts:
            for run in ("first", "second"):
                cmd = [py, "-c", _SAMPLE_SCRIPT, workdir, cache_dir, str(num_images)]
                wall, stdout = _run(cmd, env)
                out[f"sampler_{run}"] = {**json.loads(stdout.strip().splitlines()[-1]),
                                         "wall_s": wall}  # fmt: skip
        if "eval" in parts:
            for run in ("first", "second"):
                cmd = [py, "-m", "ddpm_jax.main", f"--workdir={workdir}", "--mode=eval",
                       f"--compilation_cache_dir={cache_dir}",
                       f"--config.eval.num_examples={eval_examples}",
                       f"--config.eval.batch_size={eval_examples}"]  # fmt: skip
                out[f"eval_{run}"] = {"wall_s": _run(cmd, env)[0]}
        results[cache] = out
    return results


def table(results: dict[str, Any]) -> str:
    """A Markdown table of `measure`'s results: one row per measurement, a column per cache."""
    caches = list(results)
    rows = list(dict.fromkeys(k for r in results.values() for k in r))
    lines = ["| | " + " | ".join(f"cache {c}" for c in caches) + " |",
             "| --- |" + " --- |" * len(caches)]  # fmt: skip
    for row in rows:
        cells = []
        for c in caches:
            m = results[c].get(row, {})
            cells.append(", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in m.items()))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    from ddpm_jax import cli, files

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}.")
    if cli.loaded_config("config") is None or not FLAGS.dir:
        cli.fail("--config and --dir are required, e.g. --config=configs/digits.py "
                 "--dir=/tmp/restart.")  # fmt: skip
    # The --config.group.field=value flags, as given, for the training command.
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    results = measure(
        files.resolve_path(config_flags.get_config_filename(FLAGS["config"])),
        files.resolve_path(FLAGS.dir),
        caches=FLAGS.caches,
        parts=FLAGS.parts,
        num_images=FLAGS.num_images,
        eval_examples=FLAGS.eval_examples,
        overrides=overrides,
    )
    print(table(results))
    if FLAGS.json:
        files.write_json(files.resolve_path(FLAGS.json), results, sort_keys=False)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    # A config file flag, so that --config.group.field=value parses (and is checked) here.
    config_flags.DEFINE_config_file("config", None, "The experiment config file to train.")
    flags.DEFINE_string("dir", None, "New or empty; holds the workdirs, the cache and logs.")
    flags.DEFINE_list("caches", list(CACHES), "Cache settings to measure: on, off.")
    flags.DEFINE_list("parts", list(PARTS), "What to measure: train, sampler, eval.")
    flags.DEFINE_integer("num_images", 8, "Images the sampler part draws.")
    flags.DEFINE_integer("eval_examples", 8, "Examples of the eval part's bound.")
    flags.DEFINE_string("json", None, "Write the results to this JSON file.")


def run() -> None:
    """The `ddpm-jax-restart` console script (also `python -m ddpm_jax.bench.restart`)."""
    from ddpm_jax import cli

    _define_flags()
    cli.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
