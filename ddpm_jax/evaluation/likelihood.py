"""The exact likelihood of a workdir's model over a split, by the probability-flow ODE.

Bits/dim of the 8-bit images of `config.eval.split` (the first `config.eval.num_examples`; 0:
all), as the bound of `bpd` takes them, for any model through its denoiser
(`Experiment.denoiser`, D(x; σ)) between its noise levels (`Experiment.sigma_range`: for a
DDPM model σ_min = √((1 − ᾱ_1)/ᾱ_1), about 0.01 for Ho et al.'s linear β, and
σ_max = √((1 − ᾱ_T)/ᾱ_T); for an EDM model its own). Example i of the split is evaluated alone,
as `likelihood.ode_bits_per_dim(D, x_i[None], fold_in(stream_key(seed, EVAL_ODE), i), ...)`:
uniform dequantization with the bins of `config.eval.ode_dequantization`, log p_σmin by
`likelihood.ode_likelihood` with the prior N(0, σ_max² I), and the bins' Jacobian. Each example
has its own adaptive steps (the batch is vmapped, not one ODE state), so the result depends on
neither the batch size, nor the padding of the last batch (masked out), nor the device count.

Cost: Dopri5 and Tsit5 evaluate the vector field `6 · steps + 1` times per example (first same
as last: 6 new stages a step, accepted or rejected, plus the first evaluation); each evaluation
is one network forward pass with `ode_num_probes` Jacobian-vector products (Hutchinson) or H·W·C
of them (exact trace). Memory: `eval.batch_size` examples per call, each with the activations of
one forward pass and its probes' JVPs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import likelihood
from ddpm_jax.data import pipeline, sources
from ddpm_jax.experiment import Experiment, ExperimentConfig, Stream, stream_key
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime.progress import Progress

# Vector-field evaluations of the adaptive 5th-order solvers (7 stages, first same as last).
EVALS_PER_STEP = 6
EVALS_AT_START = 1


def ode_key(config: ExperimentConfig) -> jax.Array:
    """Base key of the ODE likelihood: `stream_key(config.training.seed, EVAL_ODE)`."""
    return stream_key(ExperimentConfig.from_config(config).training.seed, Stream.EVAL_ODE)


def ode_options(experiment: Experiment) -> dict[str, Any]:
    """The keywords of `likelihood.ode_bits_per_dim` that `config.eval` and the model fix."""
    ev = experiment.config.eval
    sigma_min, sigma_max = experiment.sigma_range
    return {
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "bins": ev.ode_dequantization,
        "trace": ev.ode_trace,
        "num_probes": ev.ode_num_probes,
        "rtol": ev.ode_rtol,
        "atol": ev.ode_atol,
        "solver": ev.ode_solver,
    }


@dataclasses.dataclass(frozen=True)
class OdeBitsPerDim:
    """The ODE likelihood over a split.

    Attributes:
      num_examples: examples averaged over.
      bpd: mean bits/dim (an upper bound on the discrete data's, in expectation over the
        dequantization noise).
      bpd_sem: standard error of that mean over examples (dequantization, probes and data).
      network_evaluations: vector-field evaluations over all examples (`6 · steps + 1` each).
      solver_steps: mean solver steps per example (accepted and rejected).
      seconds: wall time of the pass, compilation included.
      options: the `ode_options` used.
      per_example: float64 [N], each example's bits/dim, in the split's order.
      steps: int64 [N], each example's solver steps.
    """

    num_examples: int
    bpd: float
    bpd_sem: float
    network_evaluations: int
    solver_steps: float
    seconds: float
    options: dict[str, Any]
    per_example: np.ndarray
    steps: np.ndarray

    def scalars(self) -> dict[str, Any]:
        return {
            "ode_bpd": self.bpd,
            "ode_bpd_sem": self.bpd_sem,
            "ode_num_examples": self.num_examples,
            "ode_network_evaluations": self.network_evaluations,
            "ode_solver_steps_mean": self.solver_steps,
            "ode_seconds": self.seconds,
        }

    def record(self, image_shape: tuple[int, ...]) -> dict[str, Any]:
        """How the figure was made, for the evaluation JSON."""
        o = self.options
        dim = math.prod(image_shape)
        jvps = o["num_probes"] if o["trace"] == "hutchinson" else dim
        return {
            "dequantization": "uniform",
            "bins": o["bins"],
            "bin_width": likelihood.bin_width(o["bins"]),
            "sigma_min": o["sigma_min"],
            "sigma_max": o["sigma_max"],
            "prior": "N(0, sigma_max^2 I)",
            "trace": o["trace"],
            "num_probes": o["num_probes"] if o["trace"] == "hutchinson" else None,
            "jvps_per_evaluation": jvps,
            "solver": o["solver"],
            "rtol": o["rtol"],
            "atol": o["atol"],
            "evaluations_per_example": f"{EVALS_PER_STEP} * steps + {EVALS_AT_START}",
            "key": "fold_in(stream_key(training.seed, EVAL_ODE), example index)",
        }


def make_ode_block_fn(experiment: Experiment, key: jax.Array) -> Callable:
    """`(params, images, labels, index) -> (bits/dim [B], solver steps [B])`.

    images: float32 [B, H, W, C] in [-1, 1] on the 8-bit grid (as the data pipeline gives
    them), labels int32 [B] (class-conditional models: the likelihood of x given y), index
    int32 [B], the examples' positions in the split. Example i uses key `fold_in(key, i)` and
    is integrated alone (vmapped), exactly as `likelihood.ode_bits_per_dim` of x_i[None].
    """
    options, num_classes = ode_options(experiment), experiment.num_classes

    def one_example(params, image, label, index):
        denoise = experiment.denoiser(params, label[None] if num_classes else None)
        deq_key, probe_key = jax.random.split(jax.random.fold_in(key, index))
        # The same steps as ode_bits_per_dim, with the solver's step count kept.
        y = likelihood.dequantize(image[None], deq_key, bins=options["bins"])
        kwargs = {k: v for k, v in options.items() if k != "bins"}
        result = likelihood.ode_likelihood(denoise, y, probe_key, **kwargs)
        bpd = likelihood.dequantized_bits_per_dim(
            result.log_p, math.prod(y.shape[1:]), bins=options["bins"]
        )
        return bpd[0], result.num_steps

    def block(params, images, labels, index):
        uint8 = jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.int32)
        return jax.vmap(one_example, in_axes=(None, 0, 0, 0))(params, uint8, labels, index)

    return block


def split_ode_bits_per_dim(model: TrainedModel) -> OdeBitsPerDim:
    """The ODE bits/dim over `config.eval.split` (first `config.eval.num_examples`; 0: all).

    Batches of `config.eval.batch_size` (a multiple of the device count) are sharded over the
    mesh as the bound's are; the last is padded and its padding masked out.
    """
    start = time.perf_counter()
    mesh, cfg = model.mesh, model.config
    cfg.check_devices(mesh.devices.size, jax.process_count(), mode="eval")
    p, num_p = jax.process_index(), jax.process_count()
    info = sources.get_dataset_info(cfg.data, cfg.eval.split, num_classes=model.num_classes)
    n = info.num_examples if cfg.eval.num_examples <= 0 else cfg.eval.num_examples
    multiple = int(np.lcm(mesh.devices.size, num_p))
    batch_size = min(cfg.eval.batch_size, -(-min(n, info.num_examples) // multiple) * multiple)
    data = pipeline.make_eval_data(
        cfg.data,
        num_classes=model.num_classes,
        global_batch_size=batch_size,
        process_index=p,
        process_count=num_p,
        split=cfg.eval.split,
        num_examples=cfg.eval.num_examples,
    )
    batch_sh, replicated = shd.batch_sharding(mesh), shd.replicated(mesh)
    block_fn = jax.jit(
        make_ode_block_fn(model.experiment, ode_key(cfg)),
        in_shardings=(shd.shardings_of(model.params), *[batch_sh] * 3),
        out_shardings=replicated,
    )
    local = data.local_batch_size
    values, steps = [], []
    bar = Progress(data.num_examples, desc=f"ODE bits/dim of {data.num_examples} images",
                   unit="images")  # fmt: skip
    for k, batch in enumerate(data):
        index = (k * batch_size + p * local + np.arange(local)).astype(np.int32)
        host = shd.host_to_global((batch["image"], batch["label"], index), mesh)
        mask = shd.global_to_host(shd.host_to_global(batch["mask"], mesh))
        bpd, num_steps = jax.device_get(block_fn(model.params, *host))
        values.append(np.asarray(bpd, np.float64)[mask])
        steps.append(np.asarray(num_steps, np.int64)[mask])
        bar.update(int(mask.sum()))
        bar.set_postfix(bpd=f"{np.concatenate(values).mean():.4f}")
    bar.close()
    values, steps = np.concatenate(values), np.concatenate(steps)
    if values.size != data.num_examples:
        raise RuntimeError(f"evaluated {values.size} examples, expected {data.num_examples}.")
    sem = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0
    return OdeBitsPerDim(
        num_examples=int(values.size),
        bpd=float(values.mean()),
        bpd_sem=sem,
        network_evaluations=int(np.sum(EVALS_PER_STEP * steps + EVALS_AT_START)),
        solver_steps=float(steps.mean()),
        seconds=time.perf_counter() - start,
        options=ode_options(model.experiment),
        per_example=values,
        steps=steps,
    )
