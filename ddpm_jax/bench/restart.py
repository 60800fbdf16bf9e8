r"""Restart cost: time to first step with an empty and a warm compilation cache.

    ddpm-jax-restart --config=configs/digits.py --dir=/tmp/restart \
        [--caches=on,off] [--parts=train,sampler,sample,eval] [--json=restart.json]

(also `python -m ddpm_jax.bench.restart`; `--config.group.field=value` flags pass on to the
training command).

Each measurement is a new process, run the way a user runs it, in order:

- `train`: `ddpm-jax train --config=... --workdir=...` for one step, then the same
  command resumed for a second step; the time from launching the command to the step's row in
  `metrics.jsonl` (start-up, restore, compiling the train step and the metrics' estimate, one
  step), and the command's whole wall time (with the checkpoint and the final sample grid);
- `sampler`: `load_sampler(workdir)` then `sample(n)` in a new Python process, twice;
- `sample`: the README's `ddpm-jax sample --workdir=... --config.sampling.sampler=dpm_solver++
  --config.sampling.num_steps=20` (`config.sampling.num_samples` images, 64 for the digits),
  twice, each into an empty `samples/`;
- `eval`: `ddpm-jax eval --workdir=...` on a few examples (one batch),
  twice.

Each command also writes the phases of its start (`--startup_json`, `runtime.startup`): the
interpreter and imports up to the command's `main` (measured from the launch), the config,
JAX's start, the mode's imports, data, the state's shapes (`init`), the restore, tracing,
lowering, compilation or the executables' loading (`runtime.executables`), the first runs;
`other` is the rest of the time to the first step's row (train), to the first images (sampler,
sample) or to the end (eval). `phase_table` shows them, in wall seconds (the JSON also has CPU
seconds, which grow less with the machine's load).

With `on` every process shares one cache directory that starts empty (`<dir>/cache`); with `off`
none has a cache (`--compilation_cache_dir=off`), so the second run shows what the cache saves.
The training commands' output goes to `<dir>/train_*.log`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ddpm_jax.errors import ConfigError, WorkdirError
from ddpm_jax.runtime.startup import PHASES
from ddpm_jax.runtime.workdir import METRICS_FILE, SAMPLES_SUBDIR

CACHES = ("on", "off")
PARTS = ("train", "sampler", "sample", "eval")
# The README's sampling command (`ddpm-jax sample`), as the `sample` part runs it.
SAMPLE_FLAGS = ("--config.sampling.sampler=dpm_solver++", "--config.sampling.num_steps=20")
# The event that ends a start, by part: the phases are those before it.
_END_EVENT = {"train": "first_row", "sampler": "first_images", "sample": "first_images",
              "eval": "done"}  # fmt: skip

_SAMPLE_SCRIPT = """
import json, sys, time
start = time.perf_counter()
from ddpm_jax.runtime.startup import StartupTimer
timer = StartupTimer(sys.argv[4])
import ddpm_jax
s = ddpm_jax.load_sampler(sys.argv[1], compilation_cache_dir=sys.argv[2], timer=timer)
loaded = time.perf_counter()
s.sample(int(sys.argv[3]), seed=0)
timer.event("first_images")
timer.write()
print(json.dumps({"load_s": loaded - start, "first_images_s": time.perf_counter() - start}))
"""


def phases_of(path: str, launched: float, end_event: str) -> dict[str, float] | None:
    """{phase: wall seconds} of a child's `--startup_json` file, up to `end_event`: `imports`
    from `launched` (Unix time) to the child's `main`, its phases, and `other`, the rest of the
    time to the event (or to the file's last phase). None if the file is missing."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    phases = data.get("snapshots", {}).get(end_event, data.get("phases", {}))
    out = {"imports": data["created"] - launched}
    out.update({k: v["wall_s"] for k, v in phases.items()})
    end = data.get("events", {}).get(end_event)
    if end is not None:
        out["other"] = max(0.0, end - launched - sum(out.values()))
    out["cpu_s"] = sum(v["cpu_s"] for v in phases.values())
    if "first_step" in data.get("events", {}):  # training: the first step's run returned.
        out["first_step_at"] = data["events"]["first_step"] - launched
    return out


def _first_row_time(cmd: list[str], metrics: str, step: int, env: dict, log: str) -> dict[str, Any]:
    """Runs `cmd` (output to `log`); seconds until `metrics` has a row of `step`, wall time, and
    the phases of its `--startup_json` (the flag is added here)."""
    phases_json = log.removesuffix(".log") + "_startup.json"
    cmd = [*cmd, f"--startup_json={phases_json}"]
    with open(log, "w") as out:
        launched = time.time()
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
    return {"first_step_s": first, "wall_s": wall,
            "phases": phases_of(phases_json, launched, _END_EVENT["train"])}  # fmt: skip


def _has_step(metrics: str, step: int) -> bool:
    try:
        with open(metrics) as f:
            return any(json.loads(line).get("step") == step for line in f if line.strip())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _run(cmd: list[str], env: dict) -> tuple[float, str, float]:
    """(wall seconds, stdout, Unix time of the launch) of `cmd`; RuntimeError if it fails."""
    launched = time.time()
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return wall, result.stdout, launched


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
      parts: of PARTS; `sampler`, `sample` and `eval` use the workdir `train` made (so need
        it).
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
    if {"sampler", "sample", "eval"} & set(parts) and "train" not in parts:
        raise ConfigError(
            "the sampler, sample and eval parts sample and evaluate the workdir of train."
        )
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
                phases_json = os.path.join(directory, f"sampler_{run}_cache_{cache}.json")
                cmd = [py, "-c", _SAMPLE_SCRIPT, workdir, cache_dir, str(num_images),
                       phases_json]  # fmt: skip
                wall, stdout, launched = _run(cmd, env)
                out[f"sampler_{run}"] = {**json.loads(stdout.strip().splitlines()[-1]),
                                         "wall_s": wall,
                                         "phases": phases_of(phases_json, launched,
                                                             _END_EVENT["sampler"])}  # fmt: skip
        if "sample" in parts:
            for run in ("first", "second"):
                shutil.rmtree(os.path.join(workdir, SAMPLES_SUBDIR), ignore_errors=True)
                phases_json = os.path.join(directory, f"sample_{run}_cache_{cache}.json")
                cmd = [py, "-m", "ddpm_jax.main", "sample", f"--workdir={workdir}",
                       f"--compilation_cache_dir={cache_dir}", *SAMPLE_FLAGS,
                       f"--startup_json={phases_json}"]  # fmt: skip
                wall, _, launched = _run(cmd, env)
                out[f"sample_{run}"] = {"wall_s": wall, "phases": phases_of(
                    phases_json, launched, _END_EVENT["sample"])}  # fmt: skip
        if "eval" in parts:
            for run in ("first", "second"):
                phases_json = os.path.join(directory, f"eval_{run}_cache_{cache}.json")
                cmd = [py, "-m", "ddpm_jax.main", f"--workdir={workdir}", "--mode=eval",
                       f"--compilation_cache_dir={cache_dir}",
                       f"--config.eval.num_examples={eval_examples}",
                       f"--config.eval.batch_size={eval_examples}",
                       f"--startup_json={phases_json}"]  # fmt: skip
                wall, _, launched = _run(cmd, env)
                out[f"eval_{run}"] = {"wall_s": wall, "phases": phases_of(
                    phases_json, launched, _END_EVENT["eval"])}  # fmt: skip
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
            cells.append(", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in m.items()
                                   if isinstance(v, float | int)))  # fmt: skip
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_table(results: dict[str, Any]) -> str:
    """A Markdown table of the phases of every start in `results`, in wall seconds: a row per
    (cache, measurement), a column per phase (`runtime.startup.PHASES` order), the total to
    the first step's row or images, the time at which the first train step had run (before
    its metrics, the bound estimate, were computed), and the CPU seconds of the child's own
    phases."""
    rows = [(c, name, m["phases"]) for c, runs in results.items() for name, m in runs.items()
            if isinstance(m, dict) and m.get("phases")]  # fmt: skip
    if not rows:
        return ""
    extra = ("other", "cpu_s", "first_step_at")
    seen = list(dict.fromkeys(k for _, _, p in rows for k in p if k not in extra))
    columns = [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES] + ["other"]
    lines = ["| start | " + " | ".join(columns) + " | total | first step | cpu (child) |",
             "| --- |" + " ---: |" * (len(columns) + 3)]  # fmt: skip
    for cache, name, phases in rows:
        cells = [f"{phases[c]:.2f}" if c in phases else "" for c in columns]
        total = sum(v for k, v in phases.items() if k not in ("cpu_s", "first_step_at"))
        step = f"{phases['first_step_at']:.2f}" if "first_step_at" in phases else ""
        cpu = phases.get("cpu_s", 0.0)
        lines.append(f"| {name}, cache {cache} | " + " | ".join(cells)
                     + f" | **{total:.2f}** | {step} | {cpu:.2f} |")  # fmt: skip
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
    print()
    print(phase_table(results))
    if FLAGS.json:
        files.write_json(files.resolve_path(FLAGS.json), results, sort_keys=False)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    # A config file flag, so that --config.group.field=value parses (and is checked) here.
    config_flags.DEFINE_config_file("config", None, "The experiment config file to train.")
    flags.DEFINE_string("dir", None, "New or empty; holds the workdirs, the cache and logs.")
    flags.DEFINE_list("caches", list(CACHES), "Cache settings to measure: on, off.")
    flags.DEFINE_list("parts", list(PARTS), "What to measure: train, sampler, sample, eval.")
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
