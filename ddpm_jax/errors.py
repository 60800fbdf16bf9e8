"""What the user got wrong: the exception types that the command line prints as one line.

Every expected failure of a run that the user can fix (a bad config value, missing or bad
data, a workdir that cannot be used as asked) raises a `UserError`. The entry points
(`ddpm-jax`, `ddpm-jax-import`, `ddpm-jax-data`, `ddpm-jax-fid`, `ddpm-jax-benchmark`,
`ddpm-jax-restart`, through `ddpm_jax.cli.run`) print it as
`error: <message>` and exit with status 2, with no traceback unless `--verbose`; anything else
is a bug and keeps its traceback. Each type also derives from the built-in exception a caller
would expect (`ValueError`, `FileNotFoundError`), so `except ValueError` still catches it.
"""

from __future__ import annotations

# Exit status of a run stopped by a UserError (the convention for a usage error).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An expected error the user can fix; its message names the field or file and the fix."""


class ConfigError(UserError, ValueError):
    """A config field holds a value that is not allowed (or fields that do not fit together)."""


class DataError(UserError, ValueError):
    """The data a config names cannot be read or does not match the config."""


class DataNotFoundError(UserError, FileNotFoundError):
    """The data a config names is not where the config says."""


class WorkdirError(UserError, ValueError):
    """A workdir cannot be used as asked: another run owns it, its config changed, ..."""


class WorkdirNotFoundError(UserError, FileNotFoundError):
    """A workdir (or what a mode needs in it: config.json, a checkpoint) does not exist."""


class DependencyError(UserError, ImportError):
    """An optional package that this command needs (torch for a conversion) is not installed."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced NaN/Inf (the loss, the gradient, a logged metric, or a state about to
    be checkpointed); the run stopped without saving that state."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (the lines of a multi-line message joined by '; ')."""
    text = str(error).strip() or type(error).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
