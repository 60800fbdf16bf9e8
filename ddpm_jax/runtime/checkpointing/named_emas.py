"""Named EMAs: parameters averaged after training (post-hoc EMA), `<workdir>/emas/<name>/`.

    emas/<name>/params/          the parameters, an orbax pytree laid out like `ema_params`
    emas/<name>/metadata.json    what made them: {"name", "sigma_rel", "step", "coefficients",
                                 "weight_error", "snapshots", ...} (`ddpm-jax ema` writes it)

A named EMA is written into `<name>.tmp/` and renamed whole onto `<name>/`
(`files.atomic_path`), so that a reader never sees a partial one. Sampling and evaluation
select one with `config.eval.ema = NAME` (`load_sampler(workdir, ema=NAME)`); without it they
use the checkpoint's own exponential EMA, `DEFAULT_EMA`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp

from ddpm_jax import fields, files
from ddpm_jax.errors import WorkdirError, WorkdirNotFoundError
from ddpm_jax.runtime import workdir as wd
from ddpm_jax.runtime.checkpointing.items import check_structure, first_line

PyTree = Any

# What sampling and evaluation use without `config.eval.ema`: the checkpoint's `ema_params`.
DEFAULT_EMA = "ema_params"
PARAMS_ITEM = "params"
METADATA_FILE = "metadata.json"


def named_ema_dir(workdir: str | os.PathLike, name: str | None = None) -> str:
    """`<workdir>/emas`, or `<workdir>/emas/<name>`."""
    root = os.path.join(os.fspath(workdir), wd.NAMED_EMA_SUBDIR)
    return root if name is None else os.path.join(root, name)


def check_name(name: str) -> str:
    """`name` if it can name a post-hoc EMA (a plain file name, not `DEFAULT_EMA`)."""
    fields.file_name("eval.ema", name)
    if name == DEFAULT_EMA:
        raise fields.fail("eval.ema", name, "is the checkpoint's own EMA, not a post-hoc one.")
    return name


def list_named_emas(workdir: str | os.PathLike) -> list[str]:
    """Names of the complete named EMAs of `workdir`, sorted (reads only)."""
    root = named_ema_dir(workdir)
    if not os.path.isdir(root):
        return []
    return sorted(
        n
        for n in os.listdir(root)
        if not n.endswith(".tmp") and os.path.isfile(os.path.join(root, n, METADATA_FILE))
    )


def read_metadata(workdir: str | os.PathLike, name: str) -> dict[str, Any]:
    """The metadata.json of the named EMA `name`.

    Raises:
      WorkdirNotFoundError: there is no such named EMA (the message lists those there are).
      WorkdirError: its metadata cannot be read.
    """
    path = os.path.join(named_ema_dir(workdir, check_name(name)), METADATA_FILE)
    if not os.path.isfile(path):
        names = list_named_emas(workdir)
        raise WorkdirNotFoundError(
            f"No post-hoc EMA {name!r} in {named_ema_dir(workdir)} (there are: "
            f"{', '.join(names) if names else 'none'}); `ddpm-jax ema --workdir=... "
            "--sigma_rel=...` writes them and prints their names."
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} cannot be read ({e}); write it again with ddpm-jax ema.") from e


def write_named_ema(
    workdir: str | os.PathLike, name: str, params: PyTree, metadata: dict[str, Any]
) -> str:
    """Writes `params` (numpy or `jax.Array` leaves) and `metadata` as the named EMA `name`.

    An existing named EMA of that name is replaced. Process 0 only (the caller's business in a
    multi-process run).

    Returns:
      The directory written, `<workdir>/emas/<name>`.
    """
    path = named_ema_dir(workdir, check_name(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.atomic_path(path, replace_dir=True) as tmp:
        os.makedirs(tmp)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_ITEM), args=ocp.args.PyTreeSave(params))
        files.write_json(os.path.join(tmp, METADATA_FILE), {**metadata, "name": name})
    return path


def restore_named_ema(
    workdir: str | os.PathLike, name: str, abstract: PyTree
) -> tuple[PyTree, dict[str, Any]]:
    """The parameters of the named EMA `name`, restored onto `abstract`'s shardings.

    Args:
      workdir: the training run's workdir.
      name: the named EMA (`list_named_emas`).
      abstract: the parameters as `jax.ShapeDtypeStruct`s with shardings
        (`Experiment.abstract_params(mesh)`).

    Returns:
      (params, metadata): a pytree of `jax.Array`s like `abstract`, and its metadata.json.

    Raises:
      WorkdirNotFoundError: no such named EMA.
      WorkdirError: it holds another model than `abstract`, or cannot be read.
    """
    metadata = read_metadata(workdir, name)
    directory = os.path.join(named_ema_dir(workdir, name), PARAMS_ITEM)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        try:
            saved = ckptr.metadata(directory).item_metadata.tree
        except Exception as e:
            raise WorkdirError(f"{directory} cannot be read: {first_line(e)}") from e
        check_structure(abstract, saved, int(metadata.get("step", 0)), directory)
        try:
            params = ckptr.restore(
                directory,
                args=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                ),
            )
        except Exception as e:
            raise WorkdirError(f"{directory} cannot be restored: {first_line(e)}") from e
    return params, metadata
