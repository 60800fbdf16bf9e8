"""A diffusers DDPM repository on disk: which files hold the U-Net and the scheduler.

Two layouts exist: a U-Net repository with config.json, diffusion_pytorch_model.safetensors
and scheduler_config.json at the root (google/ddpm-cifar10-32), and a pipeline with unet/ and
scheduler/ subfolders (Ho et al.'s 256² models). Weights are read from safetensors only: a
repository with only the pickled `diffusion_pytorch_model.bin` is refused, and
`convert_bin(dir)` (opt-in, needs torch) writes the safetensors file from it with
`torch.load(weights_only=True)`. Nothing is ever unpickled by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from ddpm_jax.errors import DataError, DataNotFoundError, DependencyError
from ddpm_jax.files import atomic_path

UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"
PICKLED = "diffusion_pytorch_model.bin"
CONVERT_HINT = "ddpm-jax-import convert-bin {dir}"


@dataclasses.dataclass(frozen=True)
class Repo:
    """The three files of a DDPM repository, as paths on disk.

    Attributes:
      source: what the user named (a hub id or the directory's absolute path).
      revision: the commit the files come from (a hub download, or the metadata that
        `hf download --local-dir` leaves); None if unknown.
      files: {name in the repository, e.g. "unet/config.json": path on disk} for the U-Net
        config, its weights and the scheduler config.
      unet_config, weights, scheduler_config: the names (keys of `files`) of the three.
    """

    source: str
    revision: str | None
    files: dict[str, str]
    unet_config: str
    weights: str
    scheduler_config: str

    def path(self, name: str) -> str:
        """The path on disk of repository file `name`."""
        return self.files[name]


def layout(names: set[str], where: str, *, convert_hint: str) -> tuple[str, str, str]:
    """(U-Net config, weights, scheduler config) names among a repository's file names.

    Args:
      names: every file name of the repository, relative to its root ("unet/config.json").
      where: the repository, for messages.
      convert_hint: what to do with a repository that has only pickled weights.

    Raises:
      DataNotFoundError: no U-Net config, or no scheduler config.
      DataError: the weights are only in pickled form (`.bin`).
    """
    for folder in ("unet/", ""):
        if folder + UNET_CONFIG in names:
            break
    else:
        raise DataNotFoundError(
            f"{where} has neither unet/{UNET_CONFIG} nor {UNET_CONFIG}: it is not a diffusers "
            "UNet2DModel or DDPMPipeline repository."
        )
    for weights in (folder + WEIGHTS, folder + WEIGHTS_FP16):
        if weights in names:
            break
    else:
        if folder + PICKLED in names:
            raise DataError(
                f"{where} has its weights only as {folder}{PICKLED}, a pickle, and ddpm_jax "
                f"never unpickles weights; convert it to safetensors once, where PyTorch is "
                f"installed: {convert_hint}."
            )
        raise DataNotFoundError(f"{where} has no {folder}{WEIGHTS}.")
    candidates = [f"scheduler/{SCHEDULER_CONFIG}", SCHEDULER_CONFIG]
    scheduler = next((c for c in candidates if c in names), None)
    if scheduler is None:
        raise DataNotFoundError(
            f"{where} has no scheduler/{SCHEDULER_CONFIG} or {SCHEDULER_CONFIG}: the noise "
            "schedule and what the network predicts are defined there."
        )
    return folder + UNET_CONFIG, weights, scheduler


def local(directory: str) -> Repo:
    """The repository in a local directory (either layout, or its unet/ folder itself).

    Raises:
      DataNotFoundError, DataError: see `layout`.
    """
    if not os.path.isdir(directory):
        raise DataNotFoundError(f"--source={directory}: no such directory.")
    root = directory
    if os.path.basename(os.path.normpath(directory)) == "unet" and not os.path.exists(
        os.path.join(directory, SCHEDULER_CONFIG)
    ):
        root = os.path.dirname(os.path.normpath(directory))  # the unet/ folder of a pipeline.
    names = set()
    for folder in ("", "unet/", "scheduler/"):
        d = os.path.join(root, folder)
        if os.path.isdir(d):
            names |= {folder + n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n))}
    hint = f"`{CONVERT_HINT.format(dir=directory)}`, then import again"
    unet_config, weights, scheduler = layout(names, directory, convert_hint=hint)
    files = {n: os.path.join(root, n) for n in (unet_config, weights, scheduler)}
    return Repo(directory, _local_revision(root, weights), files, unet_config, weights, scheduler)


def _local_revision(root: str, name: str) -> str | None:
    """The commit recorded by `hf download --local-dir` for file `name`, if any."""
    meta = os.path.join(root, ".cache", "huggingface", "download", f"{name}.metadata")
    try:
        with open(meta) as f:
            commit = f.readline().strip()
    except OSError:
        return None
    return commit if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit) else None


def git_blob_sha1(path: str) -> str:
    """The git object id of a file (what the hub lists for files not stored in LFS)."""
    h = hashlib.sha1()
    h.update(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_bin(directory: str) -> list[str]:
    """Writes diffusion_pytorch_model.safetensors beside each .bin of a local repository.

    The only place ddpm_jax reads a pickle, and only when asked: `torch.load(path,
    map_location="cpu", weights_only=True)`, whose unpickler builds tensors and containers
    only (no code runs), then `safetensors.numpy.save_file`. Needs PyTorch.

    Returns:
      The safetensors files written.

    Raises:
      UserError: torch is not installed, no .bin is there, a safetensors file already
        exists, or the pickle is not a plain state dict of tensors.
    """
    try:
        import torch
    except ImportError as e:
        raise DependencyError(
            "convert-bin needs PyTorch to read the pickled weights (pip install torch); "
            "nothing was converted."
        ) from e
    from safetensors.numpy import save_file

    found = [
        os.path.join(directory, folder, PICKLED)
        for folder in ("", "unet")
        if os.path.isfile(os.path.join(directory, folder, PICKLED))
    ]
    if not found:
        raise DataNotFoundError(f"{directory} has no {PICKLED} or unet/{PICKLED} to convert.")
    written = []
    for path in found:
        out = os.path.join(os.path.dirname(path), WEIGHTS)
        if os.path.exists(out):
            raise DataError(f"{out} exists already; nothing was converted.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the restricted unpickler refuses anything but tensors.
            raise DataError(
                f"{path} holds more than tensors and containers: torch.load(weights_only=True) "
                f"refused it ({type(e).__name__}); it was not converted."
            ) from e
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise DataError(f"{path} is not a state dict of named tensors.")
        arrays = {}
        for k, v in state.items():
            v = v.detach().cpu().contiguous()
            arrays[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        with atomic_path(out) as tmp:
            save_file(arrays, tmp, metadata={"format": "pt"})
        written.append(out)
    return written
