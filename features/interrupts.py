"""A user's first Ctrl-C stops any command, even while loader workers fork.

When a DataLoader starts its worker processes (each epoch of a fine-tune,
each extraction), `os.fork` runs the interpreter's at-fork handlers, logging's
among them. A SIGINT that lands there raises KeyboardInterrupt inside the
handler, and Python reports and drops exceptions raised in at-fork handlers:
the first Ctrl-C was lost, only the second stopped the run (fault audit,
issue 22). Recording a SIGINT while the workers start, and raising it right
after, stops the command at the first Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from torch.utils.data import DataLoader


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Note a SIGINT that arrives during the block; act on it on the way out.

    NOTE: masking SIGINT with pthread_sigmask is not enough: a Ctrl-C goes
    to the whole process, the kernel hands it to any thread that does not
    mask it (torch keeps several), and Python then runs its handler in the
    main thread at the next bytecode, still inside the at-fork handler. A
    handler that only records the signal cannot be dropped; the previous
    handler (KeyboardInterrupt by default) runs once the block is over.
    Only the main thread may set handlers, so elsewhere this does nothing,
    as it does when SIGINT is ignored or left to the system.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(
        previous
    ):
        yield
        return
    caught: list[FrameType | None] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(signal.SIGINT, caught[0])


class InterruptibleLoader(DataLoader):
    """A DataLoader whose worker start-up cannot swallow a Ctrl-C."""

    def __iter__(self) -> Any:
        with sigint_deferred():
            return super().__iter__()
