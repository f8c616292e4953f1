"""Stop requests: the first SIGINT/SIGTERM stops a run at the next step boundary, a second at once."""

from __future__ import annotations

import os
import signal
import threading
import time

# A launcher forwards a terminal's Ctrl-C as a second signal within milliseconds, so signals in
# the first second count as one.
GRACE_S = 1.0


class StopRequest:
    """Installs the handlers on enter (main thread only) and restores the old ones on exit."""

    def __init__(self) -> None:
        self.signal = 0
        self.at = 0.0
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signal and time.time() - self.at > GRACE_S:
            os._exit(128 + signum)  # every file is written atomically: nothing is left half-done
        if not self.signal:
            self.signal, self.at = signum, time.time()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
