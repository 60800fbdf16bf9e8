"""Settings, timing, FLOP/s peaks and memory read-outs shared by the JAX and PyTorch benchmarks."""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# Dense bfloat16 peak TFLOP/s per device (per chip for TPUs), matched against the device kind
# in this order (first match wins, case-insensitive).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v3", 123.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
)

# Parts that time the config's U-Net (and can be compared with the torch reference).
MODEL_PARTS = ("train", "forward", "sampling")
# sampler_accuracy: samplers against exact oracles (bench/sampler_accuracy.py); input: the
# input pipeline's images/s of every data source (bench/input_bench.py); formulations: the
# config's train step as DDPM and as EDM (bench/formulations.py).
PARTS = (*MODEL_PARTS, "sampler_accuracy", "formulations", "input")
# Parts that measure the config's model although they are not compared with the reference.
CONFIG_PARTS = (*MODEL_PARTS, "formulations")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to measure and how often.

    Attributes:
      batch_size: images per step (global, over all devices), the same for every part.
      steps: timed steps per repeat (train and forward); a repeat of sampling is one chain.
      repeats: timed repeats; figures are the median over repeats of the per-step time.
      warmup: untimed steps after compilation (and before timing) of every part.
      sample_steps: K, length of the timed sampling chain.
      sampler: the timed chain's sampler, one of `sampling.SAMPLERS` (default: ancestral,
        respaced when K < T); the multistep solvers run at order 2.
      sample_spacing: which K timesteps it visits, one of `timesteps.SPACINGS`.
      compile_sample_steps: chain lengths whose sampler is compiled (not run) to show that
        compile time does not grow with the number of steps; () means (sample_steps, T).
      peak_tflops: peak TFLOP/s per device for MFU; None: look the device kind up in
        `PEAK_TFLOPS` (MFU is reported as None when neither gives a peak).
      parts: which of `PARTS` to measure (default: all but "formulations" and "input").
      seed: seed of the random inputs and parameters.
    """

    batch_size: int = 8
    steps: int = 3
    repeats: int = 3
    warmup: int = 1
    sample_steps: int = 10
    sampler: str = "ancestral"
    sample_spacing: str = "endpoints"
    compile_sample_steps: tuple[int, ...] = ()
    peak_tflops: float | None = None
    # "input" (minutes of data generation) and "formulations" only by name.
    parts: tuple[str, ...] = (*MODEL_PARTS, "sampler_accuracy")
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "compile_sample_steps", tuple(self.compile_sample_steps))
        object.__setattr__(self, "parts", tuple(self.parts))
        for name in ("batch_size", "steps", "repeats", "sample_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BenchSettings.{name} must be an int >= 1, got {value!r}.")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"BenchSettings.warmup must be an int >= 0, got {self.warmup!r}.")
        if any(not isinstance(k, int) or k < 1 for k in self.compile_sample_steps):
            raise ValueError(
                "BenchSettings.compile_sample_steps must be ints >= 1, got "
                f"{self.compile_sample_steps!r}."
            )
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"BenchSettings.parts must be a non-empty subset of {PARTS}, got "
                             f"{self.parts!r}.")  # fmt: skip
        from ddpm_jax import sampling, timesteps  # the maths only: no model, no data.

        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(
                f"BenchSettings.sampler must be one of {sampling.SAMPLERS}, got {self.sampler!r}."
            )
        if self.sample_spacing not in timesteps.SPACINGS:
            raise ValueError(
                f"BenchSettings.sample_spacing must be one of {timesteps.SPACINGS}, got "
                f"{self.sample_spacing!r}."
            )
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"BenchSettings.peak_tflops must be > 0, got {self.peak_tflops!r}.")


def peak_tflops_for(device_kind: str, given: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where it came from) for MFU; (None, reason) if unknown."""
    if given is not None:
        return float(given), "given (--peak_tflops)"
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak, f"table: {name} bf16 dense"
    return None, f"unknown peak for device kind {device_kind!r}"


def time_steps(
    step: Callable[[], Any], sync: Callable[[Any], Any], *, steps: int, repeats: int
) -> dict[str, Any]:
    """Per-step wall time of `step`, median over `repeats` runs of `steps` calls each.

    `sync(out)` waits for the last call's result (device work is asynchronous), so each
    repeat's time covers all of its steps.

    Returns:
      {"median_s", "min_s", "max_s", "per_repeat_s": [...], "cpu_median_s"}, seconds per
      step; "cpu_median_s" is the process CPU time (all threads) per step.
    """
    per_repeat, cpu_per_repeat = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = None
        for _ in range(steps):
            out = step()
        sync(out)
        per_repeat.append((time.perf_counter() - start) / steps)
        cpu_per_repeat.append((time.process_time() - cpu_start) / steps)
    return {
        "median_s": statistics.median(per_repeat),
        "min_s": min(per_repeat),
        "max_s": max(per_repeat),
        "per_repeat_s": per_repeat,
        # CPU time of all this process's threads: on a shared host it moves less with other
        # processes' load than wall time does (spinning worker threads still count).
        "cpu_median_s": statistics.median(cpu_per_repeat),
    }


def rates(step_s: float, batch_size: int) -> dict[str, float]:
    """Steps/s and images/s of a step taking `step_s` seconds on `batch_size` images."""
    return {"steps_per_s": 1.0 / step_s, "images_per_s": batch_size / step_s}


def flop_rates(
    flops_per_image: float | None, images_per_s: float, peak_tflops: float | None, n_dev: int
) -> dict[str, float | None]:
    """Achieved FLOP/s of all devices together, and MFU against `peak_tflops` per device."""
    if flops_per_image is None:
        return {"achieved_tflops_per_s": None, "mfu": None}
    achieved = flops_per_image * images_per_s / 1e12
    mfu = achieved / (peak_tflops * n_dev) if peak_tflops else None
    return {"achieved_tflops_per_s": achieved, "mfu": mfu}


def sampling_figures(
    timing: dict[str, Any],
    chain_steps: int,
    num_timesteps: int,
    batch_size: int,
    forward: Any,
    sampler: str = "ancestral",
) -> dict[str, Any]:
    """Per-step sampling figures from the timing of a `chain_steps`-step chain.

    Args:
      timing: `time_steps` of one whole chain.
      chain_steps: K, the steps of the timed chain.
      num_timesteps: T, the length of the full chain the projection is for.
      batch_size: images per chain.
      forward: the forward-pass result (with `step_s`), or None if it was not measured.
      sampler: the timed chain's sampler.
    """
    per_step = timing["median_s"] / chain_steps
    if sampler == "ancestral" and chain_steps < num_timesteps:
        sampler = "ancestral (respaced)"
    return {
        "sampler": sampler,
        "chain_steps": chain_steps,
        "chain_s": timing,
        "per_step_s": per_step,
        "per_step_images_per_s": batch_size / per_step,
        "per_step_over_forward": per_step / forward["step_s"]["median_s"] if forward else None,
        "full_chain_steps": num_timesteps,
        "full_chain_s_projected": per_step * num_timesteps,
        "full_chain_images_per_s_projected": batch_size / (per_step * num_timesteps),
    }


def host_max_rss_bytes() -> int:
    """This process's peak resident set size (a high-water mark over its whole life)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def finite_or_none(x: float | None) -> float | None:
    """`x` as a float, None if it is None or not finite (JSON has no NaN)."""
    return None if x is None or not math.isfinite(float(x)) else float(x)
