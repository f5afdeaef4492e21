"""Ctrl-C during training: the first one stops the run at the end of the step under way, with a checkpoint."""

from __future__ import annotations

import signal
from typing import Any


class CtrlC:
    """Ctrl-C (SIGINT) during training: a request to stop at the end of the current step.

    Python's own handler raises KeyboardInterrupt wherever the signal lands: after ``optimizer.step()`` but before
    the step counter moves, after LLR's ``begin_step`` moved its ramp, after a forward that counted down PRepBN's
    schedule. A checkpoint taken there holds parts of two steps, and the resumed run diverges. So the first
    Ctrl-C only sets ``requested``; the loop finishes the step, saves it and stops. A second one raises
    KeyboardInterrupt at once, for a user who will not wait: the loop then saves only a state that is wholly one
    step's. Once the final save has begun (``saving``), Ctrl-C is ignored: it takes moments and is atomic.
    Outside the main thread no handler can be installed; KeyboardInterrupt then meets the same rule.
    """

    def __init__(self, echo):
        self.echo = echo
        self.requested = False
        self.saving = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        except ValueError:  # not the main thread of the main interpreter
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handle(self, signum, frame) -> None:
        if self.saving:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.echo("Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again stops at once, keeping the "
                  "last complete checkpoint)")
