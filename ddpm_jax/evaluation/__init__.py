"""Evaluation of a workdir's model (`--mode=eval`).

- `bpd`: the full likelihood bound in bits/dim over a split.
- `fid_score`: FID of samples against the training split (`ddpm_jax.fid` holds the metric).
- `evaluate`: the `--mode=eval` runner, which writes both to `<workdir>/eval/`.

Nothing here imports `ddpm_jax.train`.
"""
