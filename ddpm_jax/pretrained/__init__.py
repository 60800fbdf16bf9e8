"""Ho et al.'s released DDPM checkpoints (diffusers format) as ddpm_jax workdirs.

    ddpm-jax-import --source=google/ddpm-cifar10-32 --workdir=workdirs/cifar10_ho
    ddpm-jax sample --workdir=workdirs/cifar10_ho

or from Python, `pretrained.import_diffusers(source, workdir)`. The source is a local
directory (config.json + diffusion_pytorch_model.safetensors + scheduler_config.json at the
root, or unet/ + scheduler/ subfolders) or a hub id, optionally `@revision`. Weights are read
from safetensors only; `ddpm-jax-import convert-bin DIR` (needs torch) converts
a pickled `.bin` once, with `torch.load(weights_only=True)`.

Modules: `diffusers_unet` (config fields -> config groups, and the refusals), `weights`
(tensor names and layouts -> the params tree), `repo` (files on disk, checksums, the .bin
converter), `hub` (pinned, checksummed downloads), `importer` (the workdir).
"""

from ddpm_jax.pretrained.importer import ImportResult, import_diffusers, make_config
from ddpm_jax.pretrained.repo import convert_bin

__all__ = ["ImportResult", "convert_bin", "import_diffusers", "make_config"]
