"""Post-hoc EMA of a trained workdir (`ddpm-jax ema`): choose the EMA length after training.

- `reconstruct`: EDM2's least squares over the snapshots a run with `optim.ema_profiles` and
  `optim.ema_snapshot_every` left in `<workdir>/ema_snapshots/`, written as named EMAs
  (`<workdir>/emas/<name>/`) that sampling and evaluation select with
  `--config.eval.ema=NAME` (`load_sampler(workdir, ema=NAME)`);
- `sweep`: one metric (the bound estimate, the bound, FID) for many σ_rel, and its curve;
- `plot`: the curve as a PNG, drawn with PIL.

The mathematics is `ddpm_jax.posthoc_ema`. Nothing here imports `ddpm_jax.train`.
"""
