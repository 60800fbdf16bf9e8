"""The training loop: `train(config, workdir)`, resumable, kill-safe, one way down.

Start-up, in this order, so that nothing is written before every check has passed:

1. the config is parsed and checked (`ExperimentConfig`), then against the devices and the
   data (which is opened, never downloaded);
2. the workdir is locked for this run (a second trainer on it stops at once, naming this one);
3. a resumed run's config is compared with the workdir's config.json (`resume_changes`);
4. the newest checkpoint that restores (or `training.resume_step`) is restored;
5. only then are config.json, its change history and the metrics file updated.

Then every step: one jitted, sharded update; the previous step's finiteness is checked while
this one runs; a failed asynchronous save stops the run at once; and the periodic actions
(`LogMetrics`, `SaveCheckpoint`, `WriteSampleGrid`) run when they are due. SIGTERM or Ctrl-C
saves the current step and returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from ddpm_jax import files
from ddpm_jax.data import pipeline, sources
from ddpm_jax.errors import ConfigError, WorkdirError
from ddpm_jax.experiment import ExperimentConfig, Stream, changes, stream_key
from ddpm_jax.experiment.chain_program import ChainProgram
from ddpm_jax.experiment.programs import config_key
from ddpm_jax.images import to_uint8
from ddpm_jax.runtime import checkpointing, executables, metrics, preemption
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.runtime.checkpointing import snapshots
from ddpm_jax.runtime.progress import Progress
from ddpm_jax.runtime.startup import StartupTimer, TimedFirst
from ddpm_jax.train.state import TrainSetup, TrainState, build
from ddpm_jax.train.step import (
    check_finite,
    make_bpd_estimate_fn,
    make_edm_monitor_fn,
    make_train_step,
)


def resume_changes(
    config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool
) -> list[changes.FieldChange]:
    """Checks a resumed run's config against `<workdir>/config.json`; returns the changes.

    Raises:
      ConfigError: a field in `experiment.changes.RESUME_REFUSED` changed (each one named
        with its old and new value), unless `allow_config_change`.
      WorkdirError: config.json is missing although checkpoints exist, unless
        `allow_config_change`.
    """
    if not wd.has_config(workdir):
        if allow_config_change:
            logging.warning("%s has checkpoints but no config.json: resuming with this config "
                            "(training.allow_config_change).", workdir)  # fmt: skip
            return []
        raise WorkdirError(
            f"{workdir} has checkpoints but no config.json, so this config cannot be checked "
            "against the one they were trained with; restore config.json, or resume anyway "
            "with --config.training.allow_config_change=True (a different network still "
            "fails, naming the parameters that differ)."
        )
    found = changes.config_changes(changes.read_config(workdir), config)
    refused, warned, _ = changes.classify_resume_changes(found)
    if refused and not allow_config_change:
        raise ConfigError(
            f"Refusing to resume {workdir}: {', '.join(map(str, refused))} differ(s) from its "
            "config.json, which defines the network, its data, the data order and random "
            "streams or the power EMAs tracked in the run. Use the config it was trained "
            "with (the README lists what may change on resume), another --workdir, or "
            "--config.training.allow_config_change=True to resume anyway."
        )
    for change in refused + warned:
        logging.warning("Resuming with a changed config: %s.", change)
    return found


@dataclasses.dataclass
class Throughput:
    """Steps/s and images/s between two log points (host wall clock, after a device sync)."""

    batch_size: int
    last_step: int
    last_time: float = dataclasses.field(default_factory=time.perf_counter)

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return {"steps_per_sec": steps_per_s, "images_per_sec": steps_per_s * self.batch_size}

    def restart(self, step: int) -> None:
        """Leaves time spent on something else (sampling) out of the next rate."""
        self.last_step, self.last_time = step, time.perf_counter()


@dataclasses.dataclass
class Context:
    """What the periodic actions of one run share."""

    cfg: ExperimentConfig
    setup: TrainSetup
    mesh: jax.sharding.Mesh
    ckpt: checkpointing.Checkpointer
    writer: metrics.MetricWriter
    progress: Progress
    throughput: Throughput
    num_steps: int
    # Compiled programs kept on disk (None: compiled each run), and the start's phases.
    executable_cache: executables.ExecutableCache | None = None
    timer: StartupTimer = dataclasses.field(default_factory=StartupTimer)


class LogMetrics:
    """Every `training.log_every_steps`: scalars, the EMA model's bound estimate, throughput.

    An EDM model has no bound estimate: it logs `make_edm_monitor_fn`'s EMA loss and
    denoising error in σ bands instead.
    """

    def __init__(self, ctx: Context):
        self.ctx, self.every = ctx, ctx.cfg.training.log_every_steps
        state_sh = shd.shardings_of(ctx.setup.abstract)
        batch_sh, replicated = shd.batch_sharding(ctx.mesh), shd.replicated(ctx.mesh)
        self.edm = ctx.setup.experiment.is_edm
        monitor = make_edm_monitor_fn if self.edm else make_bpd_estimate_fn
        self._bpd = jax.jit(
            monitor(ctx.setup.experiment),
            in_shardings=(state_sh.ema_params, batch_sh, batch_sh, replicated),
            out_shardings=replicated,
        )
        self._bpd = executables.cached_jit(self._bpd, "bpd_estimate", {"config": config_key(
            ctx.cfg)}, ctx.executable_cache, ctx.timer)  # fmt: skip
        self._key = stream_key(ctx.cfg.training.seed, Stream.BPD_ESTIMATE)

    def due(self, step: int, final: bool) -> bool:
        return step % self.every == 0 or final

    def __call__(self, step: int, state: TrainState, batch, host: Mapping[str, Any]) -> None:
        scalars = {k: float(v) for k, v in host.items() if k != "finite"}
        key = jax.random.fold_in(self._key, step)
        monitored = self._bpd(state.ema_params, batch["image"], batch["label"], key)
        if self.edm:
            scalars.update({k: float(v) for k, v in monitored.items()})
        else:
            scalars["bpd_estimate"] = float(monitored)
        check_finite(scalars, step, self.ctx.ckpt.all_steps())
        scalars.update(self.ctx.throughput.rates(step))
        self.ctx.writer.write_scalars(step, scalars)
        if "first_row" not in self.ctx.timer.events:  # the start ends at the first row.
            self.ctx.timer.event("first_row")
            self.ctx.timer.write()
        last = ("ema_loss", "ema_loss", ".4g") if self.edm else ("bpd_est", "bpd_estimate", ".3f")
        self.ctx.progress.set_postfix(
            loss=f"{scalars['loss']:.4g}", **{last[0]: f"{scalars[last[1]]:{last[2]}}"}
        )


class SaveCheckpoint:
    """Every `training.checkpoint_every_steps`, at the last step and when asked to stop."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def due(self, step: int, final: bool) -> bool:
        return final or self.ctx.ckpt.should_save(step)

    def __call__(self, step: int, state: TrainState, batch, host) -> None:
        self.ctx.ckpt.save(step, state, {"data_step": step}, force=True)


class SaveEMASnapshot:
    """Every `optim.ema_snapshot_every` steps, at the last step and when asked to stop: the
    power EMAs, to `<workdir>/ema_snapshots/<step>/` (`checkpointing.snapshots`)."""

    def __init__(self, writer: snapshots.SnapshotWriter):
        self.writer = writer

    def due(self, step: int, final: bool) -> bool:
        return self.writer.due(step, final)

    def __call__(self, step: int, state: TrainState, batch, host) -> None:
        self.writer.save(step, state.power_emas)


class WriteSampleGrid:
    """Every `training.sample_every_steps` (and at the last step): a grid of EMA samples."""

    def __init__(self, ctx: Context):
        self.ctx, self.every = ctx, ctx.cfg.training.sample_every_steps
        cfg, n_dev = ctx.cfg, ctx.mesh.devices.size
        self.num_images = cfg.training.num_sample_images
        padded = -(-self.num_images // n_dev) * n_dev
        self._program = ChainProgram(
            ctx.setup.experiment, ctx.mesh, padded, cfg.sampling.options,
            executable_cache=ctx.executable_cache, timer=ctx.timer,
        )  # fmt: skip
        self._labels = np.full((padded,), -1, np.int32)
        self._key = stream_key(cfg.training.seed, Stream.SAMPLE_GRID)

    def due(self, step: int, final: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.ctx.num_steps)

    def __call__(self, step: int, state: TrainState, batch, host) -> None:
        program = self._program
        key = np.asarray(jax.random.fold_in(self._key, step))
        with Progress(program.num_steps, desc=f"sample grid at step {step}",
                      unit=program.options.progress_unit) as bar:  # fmt: skip
            images, _ = program(state.ema_params, key, 0, self._labels, bar)
        images = shd.global_to_host(images)[: self.num_images]
        path = self.ctx.writer.write_images(step, "samples", to_uint8(images))
        if path:
            logging.info("Step %d: samples written to %s", step, path)
        self.ctx.throughput.restart(step)  # sampling time is not training throughput.


def _restore(
    ckpt: checkpointing.Checkpointer, setup: TrainSetup, resume_step: int | None, key: jax.Array
) -> TrainState:
    if resume_step is not None:
        ckpt.roll_back_to(resume_step)
    if ckpt.latest_step() is None:
        return shd.init_sharded(setup.init_fn, setup.abstract, key)
    _refuse_imported(ckpt.directory, ckpt.latest_step() if resume_step is None else resume_step)
    state, extra = ckpt.restore(setup.abstract, resume_step)
    step = int(state.step)
    if int(extra.get("data_step", step)) != step:
        raise WorkdirError(
            f"The checkpoint at step {step} records data position {extra}, which does not "
            "match its state; it was not written by this training loop."
        )
    logging.info("Resumed from step %d of %s.", step, ckpt.directory)
    return state


def _refuse_imported(directory: str, step: int) -> None:
    """Weights imported by `ddpm_jax.pretrained` have no optimizer state to resume from."""
    path = os.path.join(directory, str(step), checkpointing.EXTRA_ITEM, "metadata")
    try:  # the checkpoint's JSON extra, as orbax writes it.
        with open(path) as f:
            source = json.load(f).get("imported_from")
    except (OSError, ValueError, AttributeError):
        return  # not there, or not an import: restoring says what is wrong, if anything.
    if source:
        raise WorkdirError(
            f"{os.path.dirname(directory)} holds weights imported from {source}; fine-tuning "
            "from imported weights is not supported; train in a new workdir."
        )


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    timer: StartupTimer | None = None,
    executable_cache: executables.ExecutableCache | str | None = executables.DEFAULT,
) -> TrainState:
    """Trains from `config`, resuming from the newest checkpoint in `workdir` if there is one.

    Writes `<workdir>/config.json`, checkpoints under `<workdir>/checkpoints`, metrics to
    `<workdir>/metrics.jsonl` and TensorBoard, and sample grids `<workdir>/samples_<step>.png`
    (the layout is `ddpm_jax.runtime.workdir`'s). Stops cleanly (final checkpoint, return) on
    SIGTERM, Ctrl-C or a multi-host preemption notice.

    Args:
      config: the experiment config (an ml_collections ConfigDict).
      workdir: the run's directory; relative paths and `~` are resolved here.
      timer: times the phases of the start (`runtime.startup`) and writes them once the
        first step's metrics row is written; default: a timer that writes nothing.
      executable_cache: where the train step, the bound estimate and the sample grid's
        programs are kept compiled (`runtime.executables`); default: beside JAX's
        persistent compilation cache (off when it is off); None: compile them every run.

    Returns:
      The final `TrainState`.

    Raises:
      ConfigError, DataError, WorkdirError (`ddpm_jax.errors.UserError`s): a bad config, data
        that cannot be read, a workdir in use or whose config.json the config contradicts.
      NonFiniteError: the loss, the gradient or a logged metric became NaN/Inf.
      CheckpointSaveError: an asynchronous save failed.
    """
    timer = StartupTimer() if timer is None else timer
    workdir = files.resolve_path(workdir)
    config = changes.resolve_config_paths(config)
    cfg = ExperimentConfig.from_config(config)
    mesh = shd.make_mesh()
    cfg.check_devices(mesh.devices.size, jax.process_count())
    cache, key = executables.resolve(executable_cache), {"config": config_key(cfg)}
    if cache is not None:  # loaded in a thread while the data and the state are set up.
        cache.prefetch("train_step", key)
        cache.prefetch("bpd_estimate", key)
    info = timer.call(
        "data",
        sources.get_dataset_info,
        cfg.data,
        num_classes=cfg.model.num_classes,
        global_batch_size=cfg.training.batch_size,
    )
    is_main = jax.process_index() == 0
    # Locked before the network is traced, so that a second trainer stops in seconds.
    lock = wd.WorkdirLock(workdir).acquire() if is_main else None
    try:
        shapes = executables.cached_eval_shape(cache, "train_state_shapes", key)
        setup = timer.call("init", build, cfg, mesh, eval_shape=shapes)
        return _train(config, cfg, workdir, mesh, setup, info, is_main, timer, cache)
    finally:
        if lock is not None:
            lock.release()


def rollback_step(config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """The step to roll back to: `training.resume_step`, unless config.json already has it.

    A rollback happens once: the run that rolls back records `resume_step` in config.json,
    so running the same command again (after a crash, say) resumes from its newest
    checkpoint instead of rolling back again.
    """
    wanted = config.training.get("resume_step")
    if wanted is None or not wd.has_config(workdir):
        return wanted
    saved = changes.read_config(workdir)
    return None if saved.training.get("resume_step") == wanted else wanted


def _train(
    config, cfg: ExperimentConfig, workdir, mesh, setup: TrainSetup, info, is_main, timer, cache
):
    tc = cfg.training
    has_checkpoints = bool(checkpointing.complete_steps(workdir))
    accepted = resume_changes(config, workdir, tc.allow_config_change) if has_checkpoints else []
    resume_step = rollback_step(config, workdir) if has_checkpoints else tc.resume_step
    ckpt = checkpointing.Checkpointer(
        workdir,
        save_every_steps=tc.checkpoint_every_steps,
        keep_last=tc.keep_checkpoints,
        keep_period=tc.keep_period,
    )
    snapshot_writer = None
    try:
        init_key = stream_key(tc.seed, Stream.INIT)
        state = timer.call("restore", _restore, ckpt, setup, resume_step, init_key)
        start_step = int(state.step)
        snapshots.set_aside_after(workdir, start_step)
        if cfg.optim.ema_snapshot_every:
            snapshot_writer = snapshots.SnapshotWriter(
                workdir, every=cfg.optim.ema_snapshot_every, sigma_rels=cfg.optim.ema_profiles
            )
        if is_main:
            dropped = metrics.drop_rows_after(f"{workdir}/{wd.METRICS_FILE}", start_step)
            if dropped:
                logging.info("Dropped %d metrics rows past step %d.", dropped, start_step)
            if accepted:
                wd.append_config_history(workdir, start_step, accepted)
            wd.write_config(config, workdir)
        return _loop(cfg, workdir, mesh, setup, info, ckpt, state, is_main, snapshot_writer,
                     timer, cache)  # fmt: skip
    finally:
        ckpt.close()
        if snapshot_writer is not None:
            snapshot_writer.close()


def _loop(
    cfg,
    workdir,
    mesh,
    setup,
    info,
    ckpt,
    state,
    is_main,
    snapshot_writer=None,
    timer=None,
    cache=None,
) -> TrainState:
    timer = StartupTimer() if timer is None else timer
    tc = cfg.training
    start_step, num_steps = int(state.step), tc.num_train_steps
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "Model: %s parameters; dataset %s with %d examples; step %d of %d.",
        f"{num_params:,}", info.name, info.num_examples, start_step, num_steps,
    )  # fmt: skip
    state_sh = shd.shardings_of(setup.abstract)
    batch_sh = shd.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(setup.experiment, setup.optimizer),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    train_step = executables.cached_jit(train_step, "train_step", {"config": config_key(cfg)},
                                        cache, timer)  # fmt: skip
    data = timer.call(
        "data",
        pipeline.make_train_data,
        cfg.data,
        num_classes=cfg.model.num_classes,
        global_batch_size=tc.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=tc.seed,
    )
    writer = metrics.MetricWriter(workdir, enabled=is_main)
    progress = Progress(num_steps, desc="train", unit="steps", initial=start_step)
    ctx = Context(cfg, setup, mesh, ckpt, writer, progress, Throughput(tc.batch_size, start_step),
                  num_steps, cache, timer)  # fmt: skip
    actions = [LogMetrics(ctx), SaveCheckpoint(ctx), WriteSampleGrid(ctx)]
    if snapshot_writer is not None:
        actions.append(SaveEMASnapshot(snapshot_writer))
    batches = TimedFirst(data.iterator(start_step), timer, "data")  # the first batch's wait.
    pending: tuple[int, dict] | None = None  # the previous step's metrics, checked one late.
    step = start_step
    try:
        with preemption.catch_termination() as terminate:
            while step < num_steps:
                batch = shd.host_to_global(next(batches), mesh)
                state, step_metrics = train_step(state, batch)
                timer.event("first_step")  # (its first run is waited for: `CachedJit`)
                step += 1
                # Checking the previous step's flag lets this step run while the host waits.
                if pending is not None:
                    check_finite(jax.device_get(pending[1]), pending[0], ckpt.all_steps())
                pending = (step, step_metrics)
                ckpt.check_for_errors()
                if snapshot_writer is not None:
                    snapshot_writer.check_for_errors()
                progress.update(1)
                stop = terminate.is_set() or ckpt.reached_preemption(step)
                final = stop or step == num_steps
                due = [a for a in actions if a.due(step, final)]
                if due:  # this step's state is logged or saved: check it now.
                    host = jax.device_get(step_metrics)
                    check_finite(host, step, ckpt.all_steps())
                    pending = None
                    for action in due:
                        action(step, state, batch, host)
                if stop:
                    logging.warning("Termination requested: saved step %d and stopping.", step)
                    break
        ckpt.wait_until_finished()
        if snapshot_writer is not None:
            snapshot_writer.wait_until_finished()
    finally:
        batches.close()
        progress.close()
        writer.close()
        timer.write()
    return state
