"""The node's background loops: one daemon thread each, that does its work now and then
every ``poll_seconds``, or at once when woken (a study completed, a job ended).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class PollingLoop:
    """A daemon thread that calls :meth:`tick` every ``poll_seconds`` and whenever
    :meth:`wake` is called. An exception in :meth:`tick` is logged and the loop goes on
    (a database hiccup must not stop the node). Subclasses implement :meth:`tick`.
    """

    #: Name of the thread (in logs and thread dumps).
    thread_name = "musclenode-loop"
    #: How long :meth:`stop` waits for a tick in progress.
    stop_timeout_seconds = 10.0

    def __init__(self, poll_seconds: float = 0.5):
        self.poll = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def tick(self) -> None:
        """One round of work."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def wake(self) -> None:
        """Tick now, not at the next poll."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop the thread, waiting up to :attr:`stop_timeout_seconds` for a tick in progress."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.stop_timeout_seconds)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # logged; the loop goes on
                log.exception("%s: error in loop", self.thread_name)
            self._wake.wait(self.poll)
            self._wake.clear()
