"""FID Inception weights: fetch, verify (SHA-256), convert from PyTorch, load from `.npz`.

The weights are pytorch-fid's port of the TensorFlow FID Inception graph::

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

One-time conversion to the safe `.npz` format (needs `torch` on that machine only; the file is
read with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects)::

    ddpm-jax-fid convert --out_dir=~/.cache/ddpm_jax/fid    # source: the URL above
    ddpm-jax-fid convert ./pt_inception-2015-12-05-6726825d.pth --out_dir=DIR

It prints the path and full SHA-256 of the `.npz` it wrote, e.g.
`fid_inception_v3_from_6726825d-<first 8 hex of its SHA-256>.npz`; then set
`config.eval.inception_weights` to that path (or a URL you serve it from) and
`config.eval.inception_sha256` to the printed digest. The `.npz` is written deterministically
(sorted keys, fixed zip timestamps), so the same `.pth` gives byte-identical `.npz` files
(for a given numpy `.npy` format version).

Every file is checked before it is read (`fid.download.verify_sha256`: a full SHA-256, or
the hash prefix in its name). Nothing is unpickled: `.npz` files are read with
`allow_pickle=False`, and their keys and shapes are checked against the network before use.

The converted file also keeps pytorch-fid's logits layer (`fc/kernel` [2048, 1008], `fc/bias`
[1008]), which the Inception Score needs. Files converted before it was kept still load and
serve FID (and sFID, precision, recall); they only lack `InceptionWeights.logits_kernel`, and
`require_logits_kernel` refuses them in one line. The weights' fingerprint covers the network
alone, so cached reference statistics of the pool features keep their names whether or not a
file holds the logits layer.
"""

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from flax import traverse_util

from ddpm_jax.errors import DataError, DependencyError
from ddpm_jax.fid import inception
from ddpm_jax.fid.download import (
    default_cache_dir,
    fetch,
    hash_prefix_from_name,
    verify_sha256,
)
from ddpm_jax.files import atomic_path, sha256_file

# BatchNorm's step counters (present in checkpoints saved by newer PyTorch) are not weights.
_IGNORED_TORCH_SUFFIXES = (".num_batches_tracked",)
# The logits layer, kept beside the network's variables (not in them: the fingerprint and the
# network stay those of FID). torch `fc.weight` [1008, 2048] is stored transposed.
LOGITS_KERNEL = "fc/kernel"
LOGITS_BIAS = "fc/bias"
LOGITS_SHAPES = {
    LOGITS_KERNEL: (inception.FEATURE_DIM, inception.LOGITS_DIM),
    LOGITS_BIAS: (inception.LOGITS_DIM,),
}
_TORCH_LOGITS = {"fc.weight": LOGITS_KERNEL, "fc.bias": LOGITS_BIAS}


class InceptionWeights(NamedTuple):
    """Loaded FID Inception weights.

    Attributes:
        variables: {"params": ..., "batch_stats": ...} float32 numpy arrays for
            `FIDInceptionV3.apply`.
        fingerprint: SHA-256 hex of the variables' contents (names, shapes, values; not the
            logits layer): the key under which reference statistics are cached.
        path: the verified `.npz` file they came from.
        logits_kernel: float32 [2048, 1008], the kernel of the logits layer (TF's
            `softmax/weights`), or None for a file converted without it.
    """

    variables: dict[str, Any]
    fingerprint: str
    path: Path
    logits_kernel: np.ndarray | None = None


def require_logits_kernel(weights: InceptionWeights) -> np.ndarray:
    """The logits kernel of `weights`, or a one-line DataError saying how to get it.

    Raises:
        DataError (a ValueError): the weights file predates the logits layer (converted
            without `fc`).
    """
    if weights.logits_kernel is None:
        raise DataError(
            f"{weights.path} has no logits layer ({LOGITS_KERNEL}), which the Inception Score "
            "needs: it was converted by an older ddpm_jax; convert pytorch-fid's weights again "
            "(`ddpm-jax-fid convert --out_dir=DIR`) and point "
            "config.eval.inception_weights and inception_sha256 at the new file."
        )
    return weights.logits_kernel


# --------------------------------------------------------------------------- conversion


def conv_kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O].

    Both frameworks cross-correlate, so this is a pure transpose (no spatial flip).
    """
    if weight.ndim != 4:
        raise DataError(f"a Conv2d weight must be 4-d [O, I, kh, kw], got {weight.shape}.")
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


_TORCH_TO_FLAX = {  # torch "layer.leaf" -> (flax collection, flax "layer/leaf", converter)
    "conv.weight": ("params", "conv/kernel", conv_kernel_from_torch),
    "bn.weight": ("params", "bn/scale", np.asarray),
    "bn.bias": ("params", "bn/bias", np.asarray),
    "bn.running_mean": ("batch_stats", "bn/mean", np.asarray),
    "bn.running_var": ("batch_stats", "bn/var", np.asarray),
}


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Renames and transposes a pytorch-fid Inception state dict to flat flax variables.

    `Mixed_5b.branch1x1.conv.weight` becomes `params/Mixed_5b/branch1x1/conv/kernel`
    (transposed), `*.bn.weight/bias` become `params/*/bn/scale|bias`, and
    `*.bn.running_mean/var` become `batch_stats/*/bn/mean|var`. The logits layer is kept:
    `fc.weight` [1008, 2048] becomes `fc/kernel` [2048, 1008] (transposed) and `fc.bias`
    `fc/bias`. `*.num_batches_tracked` are dropped. The result is checked with
    `check_variables`.

    Args:
        state_dict: torch-style name -> array-like (numpy arrays, or CPU tensors via
            `np.asarray`).

    Returns:
        Flat {"params/.../kernel": float32 array, ...}.

    Raises:
        ValueError: a key that is neither mapped nor ignored, or a missing/mis-shaped variable.
    """
    expected = inception.variable_shapes()
    flat: dict[str, np.ndarray] = {}
    unknown, wrong = [], []
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_TORCH_SUFFIXES):
            continue
        if key in _TORCH_LOGITS:
            array = np.asarray(value, dtype=np.float32)
            flat[_TORCH_LOGITS[key]] = np.ascontiguousarray(array.T if array.ndim == 2 else array)
            continue
        module, _, leaf = key.rpartition(".")
        module, _, layer = module.rpartition(".")
        rule = _TORCH_TO_FLAX.get(f"{layer}.{leaf}")
        name = f"{rule[0]}/{module.replace('.', '/')}/{rule[1]}" if rule else None
        if rule is None or not module or name not in expected:
            unknown.append(key)
            continue
        array = np.asarray(value, dtype=np.float32)
        if rule[1] == "conv/kernel" and array.ndim != 4:
            wrong.append(f"{key}: {array.shape}")
            continue
        flat[name] = rule[2](array)
    if unknown or wrong:
        problems = [f"unexpected keys: {_preview(unknown)}"] if unknown else []
        problems += [f"non-4-d conv weights: {_preview(wrong)}"] if wrong else []
        raise DataError("the state dict is not pytorch-fid's FID Inception; " + "; ".join(problems))
    check_variables(flat)
    return flat


def convert_torch_checkpoint(pth_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Converts a (verified) pytorch-fid `.pth` to `.npz`; needs `torch`.

    The checkpoint is read with `torch.load(..., weights_only=True)`: tensors and plain
    containers only, no arbitrary objects. The output is named
    `fid_inception_v3_from_<source hash prefix>-<first 8 hex of its own SHA-256>.npz`.

    Returns:
        The path of the written `.npz`.

    Raises:
        DependencyError (an ImportError): torch is not installed.
        DataError: the file is not pytorch-fid's state dict.
    """
    try:
        import torch  # optional dependency, needed for this one-time step only
    except ImportError as e:
        raise DependencyError(
            f"converting {pth_path} needs PyTorch (pip install torch); run it where torch is "
            "installed, or point config.eval.inception_weights at a converted .npz"
        ) from e

    state_dict = torch.load(os.fspath(pth_path), map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise DataError(f"{pth_path} holds a {type(state_dict).__name__}, not a state dict.")
    flat = convert_state_dict({k: v.detach().cpu().numpy() for k, v in state_dict.items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_tag = hash_prefix_from_name(os.fspath(pth_path)) or sha256_file(pth_path)[:8]
    # The name holds the file's own hash: written under a fixed name first, then renamed.
    staged = out_dir / f".fid_inception_v3_from_{source_tag}.npz"
    with atomic_path(staged) as tmp:
        save_variables_npz(tmp, flat)
        final = out_dir / f"fid_inception_v3_from_{source_tag}-{sha256_file(tmp)[:8]}.npz"
    os.replace(staged, final)
    return final


# --------------------------------------------------------------------------- npz I/O


def save_variables_npz(path: str | os.PathLike, flat: Mapping[str, np.ndarray]) -> None:
    """Writes flat variables to an uncompressed `.npz`, byte-for-byte deterministically.

    Same arrays -> same bytes (sorted keys, fixed zip timestamps), so the file's SHA-256
    identifies the weights. Readable with `np.load(path, allow_pickle=False)`.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(flat):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(flat[key]), allow_pickle=False)


def check_variables(flat: Mapping[str, np.ndarray]) -> None:
    """Checks flat variables against `inception.variable_shapes()` and `LOGITS_SHAPES`.

    Every network variable must be present; the logits layer's `fc/kernel` and `fc/bias` may
    be (files converted before it was kept lack them), with their shapes.

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped key.
    """
    required = inception.variable_shapes()
    expected = {**required, **LOGITS_SHAPES}
    missing = sorted(set(required) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(np.shape(flat[k]))} (expected {expected[k]})"
        for k in set(expected) & set(flat)
        if tuple(np.shape(flat[k])) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_preview(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shape: {_preview(wrong)}")
    if problems:
        raise DataError("FID Inception weights do not match the network; " + "; ".join(problems))


def load_variables_npz(path: str | os.PathLike) -> dict[str, Any]:
    """Loads and checks variables written by `save_variables_npz` (never unpickles).

    Returns:
        {"params": ..., "batch_stats": ...} of float32 numpy arrays (the network; a logits
        layer in the file is checked but not returned: see `load_weights_npz`).

    Raises:
        ValueError: missing, unexpected or mis-shaped keys (all named), or a non-float array.
    """
    return load_weights_npz(path)[0]


def load_weights_npz(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Loads and checks a converted `.npz`: the network's variables and the logits layer.

    Returns:
        (variables, logits): variables as `load_variables_npz`; logits is
        {"fc/kernel": float32 [2048, 1008], "fc/bias": float32 [1008]}, or {} for a file
        converted without the logits layer.

    Raises:
        ValueError: missing, unexpected or mis-shaped keys (all named), or a non-float array.
    """
    with np.load(path, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    bad_dtype = sorted(k for k, v in flat.items() if not np.issubdtype(v.dtype, np.floating))
    if bad_dtype:
        raise DataError(f"{path}: non-float arrays {_preview(bad_dtype)}.")
    check_variables(flat)
    flat = {k: v.astype(np.float32, copy=False) for k, v in flat.items()}
    logits = {k: flat.pop(k) for k in LOGITS_SHAPES if k in flat}
    return traverse_util.unflatten_dict(flat, sep="/"), logits


def has_logits_layer(path: str | os.PathLike) -> bool:
    """Whether a converted `.npz` holds the logits kernel (reads the zip directory only).

    False also for a file that is not a zip archive; loading it then fails on its own terms.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            return f"{LOGITS_KERNEL}.npy" in zf.namelist()
    except zipfile.BadZipFile:
        return False


def variables_fingerprint(variables: Mapping[str, Any]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and little-endian bytes of every array."""
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    digest = hashlib.sha256()
    for key in sorted(flat):
        arr = np.ascontiguousarray(np.asarray(flat[key]))
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}\n".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- entry point


def load_inception_weights(
    source: str, sha256: str | None = None, cache_dir: str | os.PathLike | None = None
) -> InceptionWeights:
    """Fetches, verifies and loads FID Inception weights from a `.npz` or `.pth` path/URL.

    A `.pth` is converted once (needs torch) into `cache_dir`, under a name carrying its own
    hash prefix; later calls reuse the converted file. A cached conversion that predates the
    logits layer is converted again when torch is present, and used as it is otherwise.

    Raises:
        FileNotFoundError, OSError, urllib.error.URLError: the weights cannot be obtained.
        ImportError: a `.pth` was given and torch is missing.
        ValueError: integrity or shape checks failed.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = fetch(source, cache, sha256)
    if path.suffix == ".pth":
        source_tag = hash_prefix_from_name(path.name) or sha256_file(path)[:8]
        converted = sorted(cache.glob(f"fid_inception_v3_from_{source_tag}-*.npz"))
        with_logits = [p for p in converted if has_logits_layer(p)]
        if with_logits:
            path = with_logits[-1]
        elif converted:
            try:
                path = convert_torch_checkpoint(path, cache)
            except ImportError:  # no torch here: the older file still serves FID.
                path = converted[-1]
        else:
            path = convert_torch_checkpoint(path, cache)
        verify_sha256(path)
    elif path.suffix != ".npz":
        raise DataError(
            f"config.eval.inception_weights must name a .npz (converted) or .pth file, got "
            f"{path.name!r}."
        )
    variables, logits = load_weights_npz(path)
    return InceptionWeights(
        variables, variables_fingerprint(variables), path, logits.get(LOGITS_KERNEL)
    )


def try_load_inception_weights(
    source: str | None, sha256: str | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[InceptionWeights | None, str | None]:
    """`load_inception_weights`, but unavailable weights give a one-line reason, not a raise.

    Weights that cannot be had (not configured, file absent, no network, torch needed for a
    `.pth`) return `(None, reason)` so that evaluation can log "FID skipped: <reason>" and go
    on. Weights that are present but WRONG (hash mismatch, wrong keys or shapes) still raise
    ValueError: that needs fixing, not skipping.

    Returns:
        `(weights, None)` on success, `(None, reason)` when the weights are unavailable.
    """
    if not source:
        return None, (
            "config.eval.inception_weights is not set (convert pytorch-fid's weights with "
            "`ddpm-jax-fid convert`, see ddpm_jax/fid/weights.py)"
        )
    try:
        return load_inception_weights(source, sha256, cache_dir), None
    except FileNotFoundError as e:
        return None, str(e)
    except ImportError:
        return None, (
            f"{source} is a PyTorch checkpoint and converting it needs torch; run "
            "`ddpm-jax-fid convert` where torch is installed and point "
            "config.eval.inception_weights at the .npz"
        )
    except urllib.error.URLError as e:
        return None, f"could not download {source}: {e.reason}"
    except (OSError, TimeoutError) as e:
        return None, f"could not read or download {source}: {e}"


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
