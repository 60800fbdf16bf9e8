"""The likelihood bound of a workdir's model over a split, in bits per dimension.

The full bound of `likelihood.bits_per_dim` (all T steps) for every example of
`config.eval.split`; example i of the split is evaluated alone with key
`fold_in(stream_key(seed, EVAL_BPD), i)`, so the result does not depend on the batch size, on
the padding of the last batch (masked out) or on the number of devices. Each call of the
network evaluates `eval.batch_size × eval.bpd_timestep_chunk` images: that product bounds the
memory, and the pass costs T forward passes per example whatever the two are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import likelihood
from ddpm_jax.data import pipeline, sources
from ddpm_jax.experiment import Experiment, ExperimentConfig, Stream, stream_key
from ddpm_jax.inference.trained_model import TrainedModel
from ddpm_jax.runtime import sharding as shd
from ddpm_jax.runtime.progress import Progress


def bpd_key(config: ExperimentConfig) -> jax.Array:
    """Base key of the bits/dim evaluation: `stream_key(config.training.seed, EVAL_BPD)`."""
    return stream_key(ExperimentConfig.from_config(config).training.seed, Stream.EVAL_BPD)


@dataclasses.dataclass(frozen=True)
class BitsPerDimResult:
    """The bound averaged over a split, in bits per dimension.

    Attributes:
      num_examples: examples averaged over.
      total: mean -ELBO = decoder + diffusion + prior.
      decoder: mean L_0 = -log p(x_0 | x_1).
      diffusion: mean Σ_{t>=1} L_t.
      prior: mean L_T = KL(q(x_T | x_0) || N(0, I)).
      terms: float64 [T], mean L_t for each t (terms[0] = decoder).
    """

    num_examples: int
    total: float
    decoder: float
    diffusion: float
    prior: float
    terms: np.ndarray

    def scalars(self) -> dict[str, float]:
        return {
            "bpd": self.total,
            "bpd_decoder_L0": self.decoder,
            "bpd_diffusion_sum_Lt": self.diffusion,
            "bpd_prior_LT": self.prior,
        }


# The T timesteps of a batch are evaluated in about this many jitted calls, for progress.
BLOCKS = 10


def make_bpd_block_fn(experiment: Experiment, key: jax.Array) -> Callable:
    """`(params, images, labels, index, mask, timesteps) -> (term sums, prior sum, count)`.

    For a batch: images float32 [B, H, W, C] in [-1, 1], labels int32 [B] (used by
    class-conditional models: the bound of p(x | y)), index int32 [B] (the examples'
    positions in the split, for their keys), mask bool [B] (False on padding), and a block
    of timesteps int32 [n]. Returns float32 sums over the unmasked rows: the terms L_t at
    those timesteps [n], the prior L_T, and the number of rows. Example i of the split uses
    key `fold_in(key, i)`, and its term L_t that key's `fold_in(., t)`, so that the blocks add
    up to `likelihood.bits_per_dim` of the example alone.
    """
    chunk = experiment.config.eval.bpd_timestep_chunk
    num_classes, sched = experiment.num_classes, experiment.schedule

    def one_example(params, image, label, example_key, timesteps):
        terms = likelihood.bound_terms(
            experiment.model_fn(params, label[None] if num_classes else None),
            sched,
            image[None],
            example_key,
            timesteps,
            timestep_chunk=chunk,
            **experiment.reverse.kwargs(),
        )
        return terms[0], likelihood.prior_bpd(sched, image[None])[0]

    def block(params, images, labels, index, mask, timesteps):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        terms, prior = jax.vmap(one_example, in_axes=(None, 0, 0, 0, None))(
            params, images, labels, keys, timesteps
        )
        w = mask.astype(jnp.float32)
        return w @ terms, jnp.sum(w * prior), jnp.sum(w)

    return block


def timestep_blocks(num_timesteps: int, chunk: int) -> list[np.ndarray]:
    """0..T-1 in blocks of equal length (a multiple of `chunk`), the last padded with T-1."""
    size = max(chunk, -(-num_timesteps // (BLOCKS * chunk)) * chunk)
    ts = np.arange(-(-num_timesteps // size) * size)
    return [np.minimum(b, num_timesteps - 1).astype(np.int32) for b in ts.reshape(-1, size)]


def split_bits_per_dim(model: TrainedModel) -> BitsPerDimResult:
    """The bound over `config.eval.split` (first `config.eval.num_examples`; 0: all).

    Batches of `config.eval.batch_size` (a multiple of the device count) are sharded over
    the mesh; the last one is padded and its padding masked out. Each batch's T timesteps run
    in `BLOCKS` jitted calls, so that progress is shown in forward passes as it happens.
    """
    mesh, cfg = model.mesh, model.config
    cfg.check_devices(mesh.devices.size, jax.process_count(), mode="eval")
    p, num_p = jax.process_index(), jax.process_count()
    info = sources.get_dataset_info(cfg.data, cfg.eval.split, num_classes=model.num_classes)
    n = info.num_examples if cfg.eval.num_examples <= 0 else cfg.eval.num_examples
    # Fewer examples than a batch: a smaller batch, not one mostly of padding.
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
        make_bpd_block_fn(model.experiment, bpd_key(cfg)),
        in_shardings=(shd.shardings_of(model.params), *[batch_sh] * 4, replicated),
        out_shardings=replicated,
    )
    T = model.sched.num_timesteps
    blocks = timestep_blocks(T, cfg.eval.bpd_timestep_chunk)
    local = data.local_batch_size
    terms, prior, count = np.zeros(T), 0.0, 0.0
    bar = Progress(data.num_examples * T, desc=f"bits/dim of {data.num_examples} images",
                   unit="forward passes")  # fmt: skip
    for k, batch in enumerate(data):
        index = (k * batch_size + p * local + np.arange(local)).astype(np.int32)
        host = shd.host_to_global((batch["image"], batch["label"], index, batch["mask"]), mesh)
        for ts in blocks:
            block_terms, block_prior, rows = jax.device_get(block_fn(model.params, *host, ts))
            first = np.unique(ts, return_index=True)[1]  # the padding repeats T - 1.
            terms[ts[first]] += np.asarray(block_terms, np.float64)[first]
            bar.update(int(rows) * first.size)
        prior += float(block_prior)
        count += float(rows)
    bar.close()
    if round(count) != data.num_examples:  # the mask is what makes the mean exact.
        raise RuntimeError(f"evaluated {count} examples, expected {data.num_examples}.")
    terms, prior = terms / count, prior / count
    decoder, diffusion = float(terms[0]), float(terms[1:].sum())
    return BitsPerDimResult(
        num_examples=data.num_examples,
        total=decoder + diffusion + prior,
        decoder=decoder,
        diffusion=diffusion,
        prior=prior,
        terms=terms,
    )
