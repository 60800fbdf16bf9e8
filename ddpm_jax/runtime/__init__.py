"""Where a run lives and how it runs: infrastructure shared by training, sampling and evaluation.

- `workdir`: the workdir contract (layout, config.json, atomic writes, the owner lock, paths).
- `sharding`: the device mesh, shardings, host-local <-> global arrays.
- `distributed`: multi-process detection for `jax.distributed`.
- `checkpointing`: orbax checkpoints (async saves, resume, quarantine of unreadable steps).
- `preemption`: SIGTERM / Ctrl-C as a flag the train loop polls to save and stop.
- `metrics`: JSONL + TensorBoard scalars and PNG image grids; `progress`: progress lines.
- `compilation_cache`: the persistent XLA compilation cache; `xla_flags`: XLA CPU defaults.

This file imports nothing, so that entry points can import `xla_flags` before JAX starts.
"""
