"""The evaluation protocol's fields of `config.eval`: checks and what they resolve to.

- `check(eval_view)`: the sample metrics' seeds and reference, the likelihood and the ODE
  settings (called by `EvalConfig.__post_init__`; defaults and meanings in `defaults.py`).
- `seeds(eval_view, sampling_seed)`: the seeds of the sample sets (`fid_seeds`, None: the
  sampling seed).
- `likelihoods(eval_view, formulation)`: "bound", "ode" or both, by the model's formulation.
"""

from __future__ import annotations

from typing import Any

from ddpm_jax import fields, likelihood

# config.eval.likelihood's values (None: by the formulation) and config.eval.fid_reference's.
LIKELIHOODS = ("bound", "ode", "both")
FID_REFERENCES = ("train", "test", "file")
# The formulation of a model whose config predates config.diffusion.formulation.
DEFAULT_FORMULATION = "ddpm"


def check(ev: Any) -> None:
    """Checks the protocol's fields of an `EvalConfig` (normalising `fid_seeds` to a tuple and
    `reference_sha256` to lower case).

    Raises:
      ConfigError: naming the first bad field.
    """
    if ev.fid_seeds is not None:
        seeds = fields.int_tuple("eval.fid_seeds", ev.fid_seeds, 0)
        if max(seeds) > 2**31 - 1 or len(set(seeds)) != len(seeds):
            raise fields.fail(
                "eval.fid_seeds", ev.fid_seeds, "must be distinct seeds in [0, 2^31 - 1], or None."
            )
        object.__setattr__(ev, "fid_seeds", seeds)
    fields.choice("eval.fid_reference", ev.fid_reference, FID_REFERENCES)
    fields.string("eval.reference_file", ev.reference_file, none_ok=True)
    object.__setattr__(
        ev, "reference_sha256", fields.sha256("eval.reference_sha256", ev.reference_sha256)
    )
    if (ev.fid_reference == "file") != (ev.reference_file is not None):
        raise fields.fail(
            "eval.reference_file",
            ev.reference_file,
            "a reference file is used with config.eval.fid_reference = 'file', and only then "
            f"(fid_reference is {ev.fid_reference!r}): set both, or neither.",
        )
    fields.choice("eval.likelihood", ev.likelihood, (None, *LIKELIHOODS))
    fields.choice("eval.ode_trace", ev.ode_trace, likelihood.TRACES)
    fields.integer("eval.ode_num_probes", ev.ode_num_probes, 1)
    fields.choice("eval.ode_solver", ev.ode_solver, likelihood.SOLVERS)
    fields.number("eval.ode_rtol", ev.ode_rtol, 0.0, low_open=True)
    fields.number("eval.ode_atol", ev.ode_atol, 0.0, low_open=True)
    fields.choice(
        "eval.ode_dequantization",
        ev.ode_dequantization,
        likelihood.BINS,
        hint=" Both are uniform dequantization (likelihood.dequantize).",
    )


def seeds(ev: Any, sampling_seed: int) -> tuple[int, ...]:
    """The seeds of the sample sets: `fid_seeds`, or `(sampling_seed,)` when None."""
    return (int(sampling_seed),) if ev.fid_seeds is None else tuple(ev.fid_seeds)


def formulation(config: Any) -> str:
    """The model's formulation, "ddpm" or "edm", of an `ExperimentConfig`.

    `config.diffusion.formulation` where the config has it, else "ddpm" (every model before
    the EDM formulation).
    """
    return getattr(config.diffusion, "formulation", DEFAULT_FORMULATION)


def likelihoods(ev: Any, formulation: str = DEFAULT_FORMULATION) -> tuple[str, ...]:
    """Which likelihoods `--mode=eval` computes: ("bound",), ("ode",) or ("bound", "ode").

    `eval.likelihood` None resolves by the formulation: "bound" for a DDPM model, "ode" for an
    EDM one, which has no discrete chain to bound.

    Raises:
      ConfigError: "bound" or "both" for a model that is not a DDPM one.
    """
    kind = ev.likelihood or ("bound" if formulation == "ddpm" else "ode")
    if formulation != "ddpm" and kind != "ode":
        raise fields.fail(
            "eval.likelihood",
            kind,
            "the DDPM bound needs a DDPM model, and this one's config.diffusion.formulation is "
            f"{formulation!r}: use 'ode' (or None).",
        )
    return ("bound", "ode") if kind == "both" else (kind,)
