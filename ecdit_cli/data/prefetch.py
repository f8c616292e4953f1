"""Rendering the next training batches of the built-in scenes in a worker process.

A scene batch is a pure function of (spec, data seed, split, start, count) (`scenes.render_batch`),
so a worker can render the batch the training loop will ask for next while the current step runs,
and the loop gets exactly the arrays it would have rendered itself: runs stay deterministic and
resume exactly. The next request is predicted from the stride of the last two: the loop asks for
`start = step * batch + (micro * world + rank) * micro_images`, a constant stride of
`world * micro_images`. A request that was not predicted (the first one, after a resume, or any
other caller) is rendered in the calling process, so a wrong guess costs time, never correctness.

Why a process and not a thread: at 2 intra-op threads a Python thread that calls into torch starts
a second OpenMP team on the same cores (measured: the whole loop 1.90x its engine step with a
thread, 1.14x without it). The worker renders with numpy alone. It is a plain child process
(`python -m ecdit_cli.data.prefetch`) fed over pipes, not a `multiprocessing` one: spawn and
forkserver re-run the parent's `__main__` module in the child (which breaks any user script without
a main guard), and fork would copy a process that has already started DeepSpeed's threads.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from collections import deque
from typing import Any

import numpy as np

# Requests sent ahead of the one being served (the pipe holds about one rendered batch, so the
# worker renders the next batch while the current step runs).
DEPTH = 2
_HEADER = struct.Struct("<Q")


def _send(stream, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the scene-rendering worker exited")
    (n,) = _HEADER.unpack(head)
    return pickle.loads(stream.read(n))


def serve(stdin=None, stdout=None) -> None:
    """The worker: answer (spec args, split, start, count) requests with `SceneSource.batch` arrays."""
    from ecdit_cli.data.sources import SceneSource

    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
    sources: dict[tuple, SceneSource] = {}
    while True:
        try:
            args, split, start, count = _receive(stdin)
        except EOFError:
            return
        source = sources.setdefault(args, SceneSource(*args))
        _send(stdout, source.batch(split, start, count))


def wanted(setting: str) -> bool:
    """Whether `data.prefetch` (auto / on / off) asks for the worker on this machine: auto only
    when a core is free beside torch's intra-op threads (the worker otherwise takes cycles from
    them: on 2 cores at 2 threads the loop ran 1.12-1.20x slower with it)."""
    import os

    import torch

    if setting != "auto":
        return setting == "on"
    return (os.cpu_count() or 1) > torch.get_num_threads()


class PrefetchingSource:
    """A `SceneSource` whose training batches are rendered ahead in a worker process.

    Every method other than `batch` on the training split is the wrapped source's own. Call
    `close()` when done (the training loop does), or use it as a context manager."""

    def __init__(self, source: Any, depth: int = DEPTH) -> None:
        self.source, self.depth = source, depth
        spec = source.spec
        self._args = (spec.size, spec.min_objects, spec.max_objects, source.seed)
        self._proc: subprocess.Popen | None = None
        self._inflight: deque[tuple[int, int]] = deque()  # requests sent, answered in this order
        self._last_start: int | None = None
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def __enter__(self) -> PrefetchingSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batch(self, split: str, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        if split != "train":
            return self.source.batch(split, start, count)
        key = (start, count)
        result = self._take(key) if key in self._inflight else None
        stride = None if self._last_start is None else start - self._last_start
        self._last_start = start
        if stride is not None and stride > 0:
            self._request([(start + k * stride, count) for k in range(1, self.depth + 1)])
        if result is not None:
            self.hits += 1
            return result
        self.misses += 1
        return self.source.batch(split, start, count)

    def _take(self, key: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
        # Answers come in request order: skip those of predictions that were not asked for.
        while True:
            got = self._inflight.popleft()
            result = _receive(self._proc.stdout)
            if got == key:
                return result

    def _request(self, wanted: list[tuple[int, int]]) -> None:
        if self._proc is None:
            self._proc = subprocess.Popen([sys.executable, "-m", "ecdit_cli.data.prefetch"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for key in wanted:
            # Stale guesses (after a jump in the stream) stay queued until a later hit reads past
            # them; the bound keeps a caller whose requests never match from queueing without end.
            if key not in self._inflight and len(self._inflight) < 4 * self.depth:
                _send(self._proc.stdin, (self._args, "train", *key))
                self._inflight.append(key)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # it may be blocked writing an answer nobody will read
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                stream.close()
            self._proc = None
        self._inflight.clear()


if __name__ == "__main__":
    serve()
