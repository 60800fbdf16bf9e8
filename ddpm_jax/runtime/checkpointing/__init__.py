"""Checkpoints in a workdir: async saves, keep-last-K plus periodic keepers, resume, preemption.

Layout: `<workdir>/checkpoints/<step>/` holds two orbax items (`items`): `"state"`, the whole
training state pytree (step, params, ema_params, opt_state, ...), restored onto the caller's
target shardings, and `"extra"`, a JSON dict of host-side state (the data position).
A subtree of `"state"` (e.g. `ema_params`) can be restored alone with `restore_subtree`
(`reading`), without building the optimizer: a sampling or evaluation job needs only the model.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
only once every file is written; old steps leave by an atomic rename into
`<workdir>/checkpoints/_deleted/` (removed from there in a background thread), never by an
in-place recursive delete. So a process killed at any moment (even `kill -9`) leaves only
complete step directories visible. Leftover tmp and `_deleted` directories are ignored when
listing steps and removed when the next `Checkpointer` opens the workdir (`dirs`).

Nothing that cannot be restored is deleted: a step directory that is incomplete (empty, or
without an item) or unreadable (a truncated file) is moved to `checkpoints/_quarantine/` with
the reason, and the run resumes from the newest checkpoint that restores.

A train loop uses this package as::

    ckpt = checkpointing.Checkpointer.from_config(workdir, config.training)
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(abstract_state)   # arrays come back in their shardings
    with preemption.catch_termination() as term:
        for step in range(first_step, num_steps + 1):
            state, metrics = train_step(state, next(batches))
            ckpt.check_for_errors()                    # a failed async save stops the run
            stop = term.is_set() or ckpt.reached_preemption(step)
            ckpt.save(step, state, {"data": iterator_state}, force=stop or step == num_steps)
            if stop:
                break
    ckpt.close()   # waits for the last async save
"""

from ddpm_jax.runtime.checkpointing.items import (
    EXTRA_ITEM,
    STATE_ITEM,
    CheckpointSaveError,
    all_finite,
    nonfinite_leaves,
)
from ddpm_jax.runtime.checkpointing.manager import Checkpointer
from ddpm_jax.runtime.checkpointing.reading import (
    complete_steps,
    latest_step,
    restore_subtree,
)

__all__ = [
    "EXTRA_ITEM",
    "STATE_ITEM",
    "CheckpointSaveError",
    "Checkpointer",
    "all_finite",
    "complete_steps",
    "latest_step",
    "nonfinite_leaves",
    "restore_subtree",
]
