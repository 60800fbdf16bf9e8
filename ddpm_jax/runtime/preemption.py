"""Stopping cleanly: SIGTERM and Ctrl-C become a flag the train loop polls to save and exit.

    with preemption.catch_termination() as term:
        while step < num_steps:
            ...
            if term.is_set() or ckpt.reached_preemption(step):
                ckpt.save(step, state, force=True)
                break

The first SIGTERM or SIGINT (Ctrl-C) sets the flag: the loop finishes the step it is in,
saves it and returns, so nothing is lost. A second signal while that is under way (an
impatient second Ctrl-C) ends the process at once with status 128 + signum, as an unhandled
signal would; the checkpoint being written then stays a temporary directory, which the next
run ignores and removes. No KeyboardInterrupt is raised, so none can be swallowed by a
library callback mid-step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

import jax

# What a termination request looks like to a single-process run.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TerminationFlag:
    """Set by `catch_termination`'s signal handler; read by the train loop."""

    def __init__(self):
        self._event = threading.Event()
        self.signum: int | None = None

    def set(self, signum: int | None = None) -> None:
        """Marks termination as requested (the signal handler's action; also for tests)."""
        self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        """True once a watched signal has arrived."""
        return self._event.is_set()


@contextlib.contextmanager
def catch_termination(signals: Sequence[int] = SIGNALS) -> Iterator[TerminationFlag]:
    """Turns termination signals into a flag the train loop polls, for a clean save-and-exit.

    Inside the context, the first watched signal no longer stops the process: it sets the
    yielded `TerminationFlag`, and the loop saves a final checkpoint and returns. A second
    watched signal exits immediately (`os._exit(128 + signum)`). On exit the previous
    handlers are restored. The only global state touched is the process's signal
    disposition, which the context owns while it is open; the flag lives in the handler's
    closure.

    In a multi-process run (`jax.process_count() > 1`) nothing is installed and the flag never
    sets: processes must stop at the same step, and JAX's preemption service (which owns
    SIGTERM under `jax.distributed`) provides that step through
    `Checkpointer.reached_preemption`.

    Must be entered from the main thread (a Python rule for signal handlers).
    """
    flag = TerminationFlag()
    if jax.process_count() > 1:
        yield flag
        return
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("catch_termination must be entered from the main thread.")

    def handler(signum, frame):
        del frame
        name = signal.Signals(signum).name
        if flag.is_set():
            print(f"Second {name}: exiting now without saving.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        logging.warning(
            "Caught %s: saving a checkpoint at the end of this step, then stopping "
            "(send it again to exit at once).",
            name,
        )
        flag.set(signum)

    previous = {}
    try:
        for s in signals:
            previous[s] = signal.signal(s, handler)
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
