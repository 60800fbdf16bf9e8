"""`ddpm-jax ema`: write post-hoc EMAs of a workdir, or sweep a metric over σ_rel.

    ddpm-jax ema --workdir=W --sigma_rel=0.05,0.10 [--step=N] [--from_profiles=0.05,0.10]
    ddpm-jax ema --workdir=W --sigma_rel=0.02,0.05,0.1,0.2 --sweep=bpd_estimate

The first writes `<workdir>/emas/<name>/` for each σ_rel and prints one line per name (the
name first, then Σ|c| and the weight error); `--config.eval.ema=NAME` then samples or
evaluates it. The second prints the curve and writes it to `<workdir>/eval/` (`sweep`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from ddpm_jax import files
from ddpm_jax.ema import reconstruct as rc


def run(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    sigma_rels: Sequence[float],
    *,
    step: int | None = None,
    from_profiles: Sequence[float] | None = None,
    sweep: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> list[str] | dict[str, Any]:
    """Writes the named EMAs of `sigma_rels` (returns their names), or with `sweep` (a metric
    of `sweep.METRICS`) evaluates them and returns the curve; prints what it did."""
    workdir = files.resolve_path(workdir)
    if sweep:
        from ddpm_jax.ema import sweep as sweep_lib

        result = sweep_lib.sweep(
            config, workdir, sigma_rels, metric=sweep, step=step,
            from_profiles=from_profiles, config_overrides=config_overrides,
        )  # fmt: skip
        print(sweep_lib.format_table(result), flush=True)
        print(f"curve: {result['json']} and {result['png']}", flush=True)
        return result
    plans = [rc.plan(workdir, s, step, from_profiles=from_profiles) for s in sigma_rels]
    for p in plans:  # every σ_rel is checked before anything is written.
        if jax.process_index() == 0:
            rc.write(workdir, p)
        print(p.summary(), flush=True)
    logging.info(
        "Sample or evaluate one with --config.eval.ema=NAME (e.g. ddpm-jax eval --workdir=%s "
        "--config.eval.ema=%s).", workdir, plans[-1].name,
    )  # fmt: skip
    return [p.name for p in plans]
