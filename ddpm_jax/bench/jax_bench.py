"""ddpm_jax's own figures: the real sharded train step, the forward pass and the compiled sampler.

Every program is jitted exactly as `train.loop.train` jits it (same in/out shardings,
the train state donated), lowered and compiled explicitly so that tracing+lowering and XLA
compilation are timed apart, then warmed up and timed with `jax.block_until_ready`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import models, train
from ddpm_jax.bench.common import (
    BenchSettings,
    flop_rates,
    host_max_rss_bytes,
    rates,
    sampling_figures,
    time_steps,
)
from ddpm_jax.experiment import ExperimentConfig
from ddpm_jax.experiment.chain_program import ChainProgram, raw_key
from ddpm_jax.runtime import sharding as shd


def bench_config(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
    """A copy of `config` with `training.batch_size = batch_size` (the benchmark's batch)."""
    cfg = config.copy_and_resolve_references()
    cfg.training.batch_size = int(batch_size)
    return cfg


def compile_timed(jitted, *args) -> tuple[Any, dict[str, float]]:
    """`jitted` lowered and compiled for `args`, with {"lower_s", "compile_s"}."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return compiled, {"lower_s": lowered_at - start, "compile_s": done - lowered_at}


def cost_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program, per device, from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it.
        return None
    if isinstance(cost, list | tuple):  # older jax: one dict per computation.
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def xla_memory(compiled) -> dict[str, int] | None:
    """Buffer sizes XLA planned for a compiled program (per device), in bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    # Donated inputs alias outputs, so they are counted once.
    out["total_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    )
    return out


def device_memory() -> dict[str, Any]:
    """Peak device memory where the backend reports it, else this process's peak host RSS."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return {"kind": "device peak_bytes_in_use (max over local devices)", "bytes": max(peaks)}
    return {"kind": "host max RSS (whole process so far)", "bytes": host_max_rss_bytes()}


def _sync(x):
    return jax.block_until_ready(x)


def _warm(fn, n: int) -> None:
    out = None
    for _ in range(n):
        out = fn()
    _sync(out)


def measure(
    config: ml_collections.ConfigDict, settings: BenchSettings, peak_tflops: float | None
) -> dict[str, Any]:
    """Measures ddpm_jax on the default devices.

    Args:
      config: an experiment config (e.g. configs/cifar10.py); `training.batch_size` is
        replaced by `settings.batch_size`, and `config.model.dtype` is the compute dtype.
      settings: what to measure and how often.
      peak_tflops: peak TFLOP/s per device for MFU, or None.

    Returns:
      A JSON-ready dict with "params", "devices" and one entry per measured part: "train",
      "forward", "sampling" (times in seconds, FLOPs per image, achieved TFLOP/s, MFU),
      and "memory".
    """
    B = settings.batch_size
    cfg = bench_config(config, B)
    mesh = shd.make_mesh()
    n_dev = int(mesh.devices.size)
    parsed = ExperimentConfig.from_config(cfg)
    parsed.check_devices(n_dev, jax.process_count())
    setup = train.build(parsed, mesh)
    experiment = setup.experiment
    sched = experiment.schedule
    key = jax.random.PRNGKey(settings.seed)
    state = shd.init_sharded(setup.init_fn, setup.abstract, jax.random.fold_in(key, 0))
    state_sh = shd.shardings_of(setup.abstract)
    batch_sh, replicated = shd.batch_sharding(mesh), shd.replicated(mesh)
    size, ch = int(cfg.data.image_size), int(cfg.data.channels)
    images = jax.random.uniform(jax.random.fold_in(key, 1), (B, size, size, ch), jnp.float32, -1, 1)
    labels = jax.random.randint(jax.random.fold_in(key, 2), (B,), 0, max(1, cfg.model.num_classes))
    batch = jax.device_put({"image": images, "label": labels}, batch_sh)
    T = sched.num_timesteps
    result: dict[str, Any] = {
        "params": models.count_params(state.params),
        "devices": n_dev,
        "dtype": str(cfg.model.dtype),
    }

    if "train" in settings.parts:
        logging.info("ddpm_jax: compiling and timing the train step.")
        step_fn = jax.jit(
            train.make_train_step(experiment, setup.optimizer),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
        )
        compiled, times = compile_timed(step_fn, state, batch)
        holder = {"state": state}

        def run_train():
            holder["state"], m = compiled(holder["state"], batch)
            return holder["state"], m

        _warm(run_train, settings.warmup)
        timing = time_steps(run_train, _sync, steps=settings.steps, repeats=settings.repeats)
        state = holder["state"]
        flops = cost_flops(compiled)
        per_image = flops * n_dev / B if flops is not None else None
        r = rates(timing["median_s"], B)
        result["train"] = {
            **times,
            "step_s": timing,
            **r,
            "flops_per_image": per_image,
            **flop_rates(per_image, r["images_per_s"], peak_tflops, n_dev),
            "xla_memory_per_device": xla_memory(compiled),
        }

    t_batch = jax.device_put(
        jax.random.randint(jax.random.fold_in(key, 3), (B,), 0, T, jnp.int32), batch_sh
    )
    if "forward" in settings.parts:
        logging.info("ddpm_jax: compiling and timing the forward pass.")

        def forward(params, x, t):
            return experiment.model_fn(params)(x, t)

        fwd = jax.jit(
            forward, in_shardings=(state_sh.ema_params, batch_sh, batch_sh), out_shardings=batch_sh
        )
        compiled, times = compile_timed(fwd, state.ema_params, batch["image"], t_batch)

        def run_forward():
            return compiled(state.ema_params, batch["image"], t_batch)

        _warm(run_forward, settings.warmup)
        timing = time_steps(run_forward, _sync, steps=settings.steps, repeats=settings.repeats)
        flops = cost_flops(compiled)
        per_image = flops * n_dev / B if flops is not None else None
        r = rates(timing["median_s"], B)
        result["forward"] = {
            **times,
            "step_s": timing,
            **r,
            "flops_per_image": per_image,
            **flop_rates(per_image, r["images_per_s"], peak_tflops, n_dev),
        }

    if "sampling" in settings.parts:
        logging.info("ddpm_jax: compiling and timing the sampler.")
        result["sampling"] = _measure_sampling(experiment, mesh, settings, state, key, result)
    result["memory"] = device_memory()
    return result


class _TimedChain:
    """The chain of `load_sampler` and the training grids (`ChainProgram`)."""

    def __init__(self, experiment, mesh, batch: int, num_steps: int, params, key, settings):
        T = experiment.schedule.num_timesteps
        options = dataclasses.replace(
            experiment.config.sampling.options,
            sampler=settings.sampler,
            num_steps=0 if num_steps == T else int(num_steps),
            eta=0.0,
            order=2,
            timestep_spacing=settings.sample_spacing,
        )
        self.program = ChainProgram(experiment, mesh, batch, options)
        self.args = (params, raw_key(key, 0), 0, np.full((batch,), -1, np.int32))

    def __call__(self):
        return self.program(*self.args)[0]


def _measure_sampling(experiment, mesh, settings, state, key, result) -> dict[str, Any]:
    B, K, T = settings.batch_size, settings.sample_steps, experiment.schedule.num_timesteps
    if K > T:
        raise ValueError(f"sample_steps = {K} exceeds the schedule's T = {T}; lower it.")
    sample_key = np.asarray(jax.random.fold_in(key, 4))
    chain = _TimedChain(experiment, mesh, B, K, state.ema_params, sample_key, settings)
    times = _compile_only(chain)
    _warm(chain, 1)
    timing = time_steps(chain, _sync, steps=1, repeats=settings.repeats)
    lengths = settings.compile_sample_steps or (K, T)
    compile_by_length = {}
    for length in dict.fromkeys(lengths):  # unique, in order.
        if length > T:
            raise ValueError(f"compile_sample_steps has {length} > T = {T}.")
        if length == K:
            compile_by_length[str(length)] = times
        else:
            other = _TimedChain(experiment, mesh, B, length, state.ema_params, sample_key, settings)
            compile_by_length[str(length)] = _compile_only(other)
    figures = sampling_figures(timing, K, T, B, result.get("forward"), settings.sampler)
    figures["compile_by_chain_steps"] = compile_by_length
    return figures


def _compile_only(chain: _TimedChain) -> dict[str, float]:
    """Lower and compile times of the program that runs the chain's steps (one segment)."""
    program = chain.program
    params = chain.args[0]
    keys, labels = program._prepare(*shd.global_replicated(chain.args[1:], program.mesh))
    state = program._init(program._sub, program._ts, keys)
    args = (params, program._sub, program._ts, state, keys, labels, np.int32(0))
    return compile_timed(program._run, *args)[1]
