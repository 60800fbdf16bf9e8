"""FID Inception weights on disk: where they are cached, fetching them, checking their SHA-256.

Integrity policy (`verify_sha256`), applied to every file before it is read:
* `config.eval.inception_sha256` set: the file's SHA-256 must equal it (full 64 hex digits).
* otherwise, a file named `<stem>-<hex>.<ext>` (the torch.hub convention that pytorch-fid's
  file follows: `6726825d` is the first 8 hex digits of its SHA-256) must have a digest that
  starts with `<hex>`. Eight hex digits are 32 bits: enough to catch truncated or swapped
  files, not a defence against a deliberately forged one; set the full digest for that.
* neither: the file is refused.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ddpm_jax.errors import DataError, DataNotFoundError
from ddpm_jax.files import atomic_path, sha256_file

PYTORCH_FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ddpm_jax/fid`, or `~/.cache/ddpm_jax/fid`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "ddpm_jax" / "fid"


# --------------------------------------------------------------------------- integrity


def hash_prefix_from_name(name: str) -> str | None:
    """The SHA-256 prefix in a torch.hub-style name `<stem>-<hex>.<ext>`, or None."""
    match = _HASH_IN_NAME.search(os.path.basename(name))
    return match.group(1) if match else None


def _check_sha256_arg(sha256: str | None) -> str | None:
    if sha256 is None or sha256 == "":
        return None
    sha256 = sha256.strip().lower()
    if not _SHA256_HEX.match(sha256):
        raise DataError(
            f"config.eval.inception_sha256 must be 64 hex digits (the output of `sha256sum "
            f"FILE`), got {sha256!r}."
        )
    return sha256


def verify_sha256(
    path: str | os.PathLike, sha256: str | None = None, name: str | None = None
) -> str:
    """Checks a file against a full SHA-256, or else the hash prefix in its name.

    Args:
        path: the file to check.
        sha256: expected full digest (64 hex digits), or None.
        name: the name whose `-<hex>.` prefix applies when `sha256` is None (default: the
            basename of `path`; a download passes the URL's file name).

    Returns:
        A one-line description of what was verified.

    Raises:
        ValueError: on a mismatch, a malformed `sha256`, or when there is nothing to verify
            against.
    """
    expected = _check_sha256_arg(sha256)
    name = os.path.basename(name if name is not None else os.fspath(path))
    actual = sha256_file(path)
    if expected is not None:
        if actual != expected:
            raise DataError(
                f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is "
                "corrupt or not the expected weights; delete it (or fix "
                "config.eval.inception_sha256)."
            )
        return f"SHA-256 {actual} verified"
    prefix = hash_prefix_from_name(name)
    if prefix is None:
        raise DataError(
            f"cannot verify {path}: set config.eval.inception_sha256 to its SHA-256 ({actual} "
            "if you trust this copy), or name the file <stem>-<first 8+ hex of its SHA-256>.<ext>."
        )
    if not actual.startswith(prefix):
        raise DataError(
            f"SHA-256 mismatch for {path}: its name promises a digest starting {prefix}, got "
            f"{actual}. The file is corrupt or tampered with; delete it."
        )
    return (
        f"SHA-256 prefix {prefix} from the file name verified ({4 * len(prefix)} bits); set "
        "config.eval.inception_sha256 for a full check"
    )


def fetch(
    source: str, cache_dir: str | os.PathLike | None = None, sha256: str | None = None
) -> Path:
    """Returns a verified local copy of `source` (a path, or an http(s)/file URL).

    A URL is downloaded once into `cache_dir` (written to a temporary file, verified, then
    renamed, so a partial or unverified download never sits under the final name); a cached
    copy is re-verified on every call.

    Raises:
        DataNotFoundError (a FileNotFoundError): a local path that does not exist, or a
            download that failed.
        DataError (a ValueError): the file fails `verify_sha256`.
    """
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https", "file"):
        name = os.path.basename(urllib.parse.unquote(parsed.path))
        if not name:
            raise DataError(f"config.eval.inception_weights URL {source!r} names no file.")
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        target = cache / name
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                try:
                    with open(tmp, "wb") as out, urllib.request.urlopen(source, timeout=60) as r:
                        while chunk := r.read(_CHUNK):
                            out.write(chunk)
                except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                    reason = getattr(e, "reason", None) or e
                    raise DataNotFoundError(
                        f"could not download {source}: {reason}; fetch it where there is "
                        "network and give its path"
                    ) from e
                verify_sha256(tmp, sha256, name=name)
        else:
            verify_sha256(target, sha256)
        return target
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"config.eval.inception_weights: no file at {path}.")
    verify_sha256(path, sha256)
    return path
