"""Downloads of a DDPM repository from the Hugging Face hub, pinned and checksummed.

    repo = hub.download("google/ddpm-cifar10-32", revision=None)   # -> repo.Repo

The revision (a branch, tag or commit; default the main branch) is first resolved to its
commit, and every file is downloaded at that commit: a branch moved on meanwhile changes
nothing. Only the three files the import reads are fetched (`huggingface_hub`'s cache, under
`$HF_HOME`), each checked against the checksum the hub lists for it (the LFS SHA-256 for the
weights, the git object id for the small JSON files). Nothing downloaded is executed. With no
network, or `HF_HUB_OFFLINE=1`, it fails at once (requests time out after `TIMEOUT_S`),
saying how to download the repository elsewhere and import the directory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from ddpm_jax.errors import DataError, DataNotFoundError
from ddpm_jax.files import sha256_file
from ddpm_jax.pretrained import repo as repo_lib

# A hub model id, optionally with @revision: "google/ddpm-cifar10-32@main".
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
TIMEOUT_S = 10.0  # seconds for the hub's metadata request and each download's first reply


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) if `source` reads as a hub id, else None."""
    m = HUB_ID.match(source)
    return (m.group("repo"), m.group("revision")) if m else None


def offline_hint(repo_id: str, revision: str | None) -> str:
    """How to fetch the repository where there is network, then import it from a directory."""
    rev = f" --revision {revision}" if revision else ""
    return (
        f"download it where the hub can be reached, e.g. `hf download {repo_id}{rev} "
        f"--local-dir DIR` (`huggingface-cli download` with huggingface_hub < 1.0), bring "
        "DIR here and import it with --source=DIR"
    )


def _field(obj: Any, name: str) -> Any:
    """An attribute of a hub object, or a key of its dict form."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _api_error(e: Exception, repo_id: str, revision: str | None) -> Exception:
    """A hub failure as one user-facing error."""
    from huggingface_hub import errors as hf_errors

    rev = revision or "main"
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return DataNotFoundError(f"The hub repository {repo_id} has no revision {rev!r}.")
    if isinstance(e, hf_errors.GatedRepoError):
        return DataNotFoundError(
            f"The hub repository {repo_id} is gated: accept its terms on its page and log in "
            "(hf auth login), or " + offline_hint(repo_id, revision) + "."
        )
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return DataNotFoundError(
            f"{repo_id} is not a model repository on the hub (or it is private: log in with "
            "hf auth login), and not a local directory either."
        )
    reason = " ".join(str(e).split())[:200] or type(e).__name__
    return DataNotFoundError(
        f"Cannot reach the Hugging Face hub for {repo_id}@{rev} ({type(e).__name__}: "
        f"{reason}); " + offline_hint(repo_id, revision) + "."
    )


def download(
    repo_id: str, revision: str | None = None, *, api: Any = None, cache_dir: str | None = None
) -> repo_lib.Repo:
    """Downloads the U-Net config, weights and scheduler config of a hub repository.

    Args:
      repo_id: e.g. "google/ddpm-cifar10-32".
      revision: a branch, tag or commit; None for the main branch.
      api: a `huggingface_hub.HfApi` (tests pass a stand-in); None: a new one.
      cache_dir: huggingface_hub's cache directory; None: its default.

    Returns:
      A `repo.Repo` whose revision is the resolved commit.

    Raises:
      DataNotFoundError: no such repository or revision, or no network (at once).
      DataError: a downloaded file does not match the hub's checksum, the hub lists none,
        or the weights exist only as a pickle.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=TIMEOUT_S)
    except Exception as e:  # offline, no network, no such repository, ...
        raise _api_error(e, repo_id, revision) from e
    commit = _field(info, "sha")
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise DataError(f"The hub did not resolve {repo_id}@{revision or 'main'} to a commit.")
    siblings = {_field(s, "rfilename"): s for s in (_field(info, "siblings") or [])}
    where = f"{repo_id}@{commit}"
    hint = (
        f"`hf download {repo_id} --revision {commit} --local-dir DIR`, then "
        f"`{repo_lib.CONVERT_HINT.format(dir='DIR')}`, then import it with --source=DIR"
    )
    names = repo_lib.layout(set(siblings), where, convert_hint=hint)
    if revision != commit:
        logging.info("%s@%s is commit %s.", repo_id, revision or "main", commit)
    files = {}
    for name in names:
        try:
            path = api.hf_hub_download(
                repo_id, name, revision=commit, cache_dir=cache_dir, etag_timeout=TIMEOUT_S
            )
        except Exception as e:
            raise _api_error(e, repo_id, commit) from e
        _verify(path, siblings[name], f"{where}/{name}")
        files[name] = str(path)
    return repo_lib.Repo(repo_id, commit, files, *names)


def _verify(path: str, sibling: Any, where: str) -> None:
    """Checks a downloaded file against the hub's SHA-256 (LFS) or git object id."""
    lfs = _field(sibling, "lfs")
    expected = _field(lfs, "sha256") if lfs is not None else None
    if expected:
        got, what = sha256_file(path), "SHA-256"
    else:
        expected = _field(sibling, "blob_id")
        if not expected:
            raise DataError(f"The hub lists no checksum for {where}; it was not imported.")
        got, what = repo_lib.git_blob_sha1(path), "git object id"
    if got != expected:
        raise DataError(
            f"{where}: the downloaded file ({path}) has {what} {got}, the hub lists {expected}; "
            "delete it from the huggingface_hub cache and import again."
        )
