"""What every command-line entry point shares: one-line errors, readable logs, the XLA set-up.

    cli.run(main, argv=sys.argv)        # instead of absl.app.run(main)

Every command of the package goes through `run`: the console scripts `ddpm-jax`
(`train|sample|eval`, `main.py`), `ddpm-jax-import` (`pretrained`), `ddpm-jax-data`
(`data`), `ddpm-jax-fid` (`fid`), `ddpm-jax-benchmark` (`bench`) and `ddpm-jax-restart`
(`bench.restart`), and their `python -m` forms.

- A `UserError` (bad config, data or workdir), a flag that does not parse, a misspelt config
  field or a config file that does not load is printed as one line, `error: ...`, and the
  process exits with status 2. `--verbose` shows the traceback (and every library's logs);
  anything else is a bug and keeps its traceback.
- Logs: this package's INFO lines and every library's warnings, as `HH:MM:SS message`;
  orbax's and the other libraries' INFO chatter only with `--verbose`.
- Before JAX starts: the XLA CPU defaults (`runtime.xla_flags`); after flag parsing:
  `jax.distributed` when the environment asks for it, and the compilation cache.

The only module besides the entry points that imports absl.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from ddpm_jax import errors

FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "verbose", False, "Show tracebacks for expected errors, and every library's logs."
)
flags.DEFINE_string(
    "compilation_cache_dir",
    "default",
    "Directory of the persistent XLA compilation cache ('off' to disable; default: "
    "$DDPM_JAX_COMPILATION_CACHE or ~/.cache/ddpm_jax/jax_compilation_cache).",
)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def fail(message: str) -> None:
    """Prints `error: <message>` on one line and exits with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)


def _flag_error_line(argv: Sequence[str], error: BaseException) -> str:
    """One line for a command line that does not parse, naming the argument at fault."""
    if isinstance(error, SyntaxError):  # a config file that is not valid Python.
        where = f"{error.filename}, line {error.lineno}" if error.filename else "a config file"
        text = (error.text or "").strip()
        return f"{where}: {error.msg}" + (f": {text}" if text else "") + " (not valid Python)."
    if isinstance(error, flags.Error):
        return errors.one_line(error)  # absl names the flag itself.
    text = str(error)
    with contextlib.suppress(ValueError, SyntaxError):  # KeyError and kin quote their text.
        text = str(ast.literal_eval(text)) if text[:1] in "'\"" else text
    text = errors.one_line(ValueError(text))
    # ml_collections reports a misspelt field of an override as "'batch_sz'; Did you mean
    # "batch_size" instead of "batch_sz"?", without the override it came from.
    match = re.match(r"""['"]?([A-Za-z0-9_]+)['"]?(.*)""", text)
    field, rest = (match.group(1), match.group(2)) if match else ("", text)
    culprit = next(
        (a for a in argv[1:] if field and a.split("=")[0].endswith(f".{field}")),
        "",
    )
    hint = rest.lstrip("; ").replace("Did you mean", "did you mean")
    if culprit:
        return f"{culprit}: the config has no field {field!r}" + (f"; {hint}" if hint else ".")
    return text


def _parse_flags(argv: Sequence[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
        # SyntaxError and the rest: a config file (ml_collections loads it while parsing).
        if "--verbose" in argv:
            raise
        fail(_flag_error_line(argv, e))
    return []


def subcommand_as_flag(argv: Sequence[str], flag: str, choices: Sequence[str]) -> list[str]:
    """`prog WORD ...` as `prog --flag=WORD ...` when WORD is one of `choices`.

    So that `ddpm-jax train --config=...` and `python -m ddpm_jax.main --mode=train
    --config=...` are the same command. Anything else is left as it is (absl reports a
    stray argument, and the entry point names it).
    """
    argv = list(argv)
    if len(argv) > 1 and argv[1] in choices:
        if any(a.split("=")[0] in (f"--{flag}", f"-{flag}") for a in argv[2:]):
            fail(f"give {argv[1]!r} or --{flag}, not both.")
        return [argv[0], f"--{flag}={argv[1]}", *argv[2:]]
    return argv


def loaded_config(name: str = "config") -> Any:
    """The ConfigDict of the config-file flag `name` if given (else None), or one `error:` line.

    A config file is a Python file; one that raises when it is run (a missing file, an
    exception inside `get_config`) fails here, naming the file.
    """
    if not FLAGS[name].present:
        return None
    try:
        config = FLAGS[name].value
        config.keys()  # a config that failed to load raises on first use.
        return config
    except Exception as e:  # anything raised by the user's config file.
        from ml_collections import config_flags

        filename = config_flags.get_config_filename(FLAGS[name])
        fail(f"--{name}={filename}: {errors.one_line(e)}")


# Library warnings that say nothing a user of this package can act on.
_HARMLESS = ("OpenCV is not installed",)


class _QuietLibraries(logging.Filter):
    """Keeps this package's records and other libraries' warnings (orbax's: none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.pathname.startswith(_PACKAGE_DIR)
        if ours:
            return True
        if record.getMessage().startswith(_HARMLESS):
            return False
        if "orbax" in record.pathname:  # its failures reach the user as our one-line errors.
            return record.levelno >= logging.CRITICAL
        return record.levelno >= logging.WARNING


def setup_logging(verbose: bool) -> None:
    """INFO from this package and warnings from the rest, as `HH:MM:SS message` on stderr."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handler.setFormatter(formatter)
    for target in (handler, getattr(handler, "python_handler", None)):
        if target is not None:
            target.setFormatter(formatter)
            if not verbose:
                target.addFilter(_QuietLibraries())
    logging.getLogger().setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.set_stderrthreshold(absl_logging.INFO)


def prepare_jax(*, xla_cpu_defaults: bool = True) -> None:
    """The XLA CPU defaults (before JAX starts its backend), then `jax.distributed` if asked
    for, then the persistent compilation cache of `--compilation_cache_dir`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if xla_cpu_defaults:
        from ddpm_jax.runtime import xla_flags  # the backend reads XLA_FLAGS once.

        os.environ["XLA_FLAGS"] = xla_flags.with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    from ddpm_jax.runtime import compilation_cache, distributed

    compilation_cache.enable(FLAGS.compilation_cache_dir, only_if_unset=True)
    distributed.initialize_if_needed()  # turns the cache off for multi-process CPU runs.


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """`absl.app.run(main)` with one-line errors and readable logs (see the module docstring)."""
    argv = list(sys.argv if argv is None else argv)

    def wrapped(args: list[str]) -> None:
        setup_logging(FLAGS.verbose)
        try:
            main(args)
        except errors.UserError as e:
            if FLAGS.verbose:
                raise
            fail(errors.one_line(e))

    app.run(wrapped, argv=argv, flags_parser=_parse_flags)
