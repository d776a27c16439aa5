"""Running a function in a long-lived child process, with a wall-clock limit per call.

Why a process: the work it guards (GIF decoding) is CPU-bound Python, numpy and Pillow C code. A thread that runs
past its limit cannot be stopped, and `signal.alarm` only works on the main thread (Beam runs DoFns on worker
threads) and cannot interrupt C code that holds the GIL. A child process can always be killed, and it also turns a
crash in native code (a segfault, the kernel's OOM killer) into one failed element instead of a lost worker.

Why long-lived: starting Python and importing numpy/Pillow costs about half a second, so the child serves call after
call and is only replaced after it was killed or died. `TimeLimitedPool` holds several such children for callers on
several threads: the preprocessing job keeps one pool per worker process, one child per core, so a worker decodes on
every core at once, outside its own GIL, however many harness threads it has.

Why batches: one call is one round trip, and on the 2-core development machine the round trip (waking the child,
then waking the caller) cost about a fifth of a small GIF's decode and kept the children idle in between. `map`
sends many calls in one message and the child answers each as it finishes, so the child never waits for the caller,
while every call keeps a limit of its own: the wait for each answer is `timeout_s`, counted from the previous answer.

The child is started with `subprocess` and `python -c`, not `multiprocessing`: multiprocessing's spawn would
re-import the launcher's `__main__` module (all of Beam) in every child.
"""

from __future__ import annotations

import importlib
import os
import queue
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

_START_TIMEOUT_S = 120.0


class TimeLimitExceeded(Exception):
    """A call ran past its limit; the child was killed (the next call starts a fresh one)."""


class ChildDied(Exception):
    """The child process exited during a call (a crash in native code, or killed for memory)."""


class TimeLimitedFunction:
    """Calls `module:function` in a child process; a call that takes longer than `timeout_s` is killed.

    Arguments and results travel pickled over a pipe. An exception raised by the function is re-raised in the caller
    (exceptions that cannot be pickled arrive as RuntimeError with their text).
    """

    def __init__(self, target: str, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout must be positive, got {timeout_s}")
        self.target = target
        self.timeout_s = timeout_s
        self._process: subprocess.Popen | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None

    def __call__(self, *args: Any) -> Any:
        ((ok, value),) = self._exchange([args])
        if ok:
            return value
        raise value

    def map(self, calls: Sequence[tuple]) -> list[Any]:
        """Calls the function once per argument tuple in `calls`, all sent to the child at once; returns, per call in
        order, its result or the exception it raised, returned rather than raised (TimeLimitExceeded or ChildDied
        when it ran past its limit or the child died; the calls after it then go to a fresh child).

        Each call is limited to `timeout_s` of its own, counted from the answer to the call before it.
        """
        return [value for _, value in self._exchange(calls)]

    def _exchange(self, calls: Sequence[tuple]) -> list[tuple[bool, Any]]:
        """(ok, result or exception) per call: the calls go to the child in one message and the answers come back one
        by one; an overrun or a death costs the call it happened in, and the rest go to a fresh child."""
        answers: list[tuple[bool, Any]] = []
        while len(answers) < len(calls):
            rest = calls[len(answers) :]
            if self._process is None or self._process.poll() is not None:
                try:
                    self._start()
                except ChildDied as e:  # no child to run them: every remaining call fails with the reason
                    return answers + [(False, e)] * len(rest)
            self._to_child.send(_Batch(rest))
            for _ in rest:
                if not self._from_child.poll(self.timeout_s):
                    self.close()
                    answers.append((False, TimeLimitExceeded(f"{self.target} took longer than {self.timeout_s:g} s")))
                    break
                try:
                    answers.append(self._from_child.recv())
                except EOFError:
                    code = self._process.wait()
                    self.close()
                    answers.append((False, ChildDied(f"{self.target}: child process exited with code {code}")))
                    break
        return answers

    def _start(self) -> None:
        self.close()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        code = f"from pipeline.timelimit import serve; serve({to_child_r}, {from_child_w}, {self.target!r})"
        # The child sees the same import path as this process (an editable install, a Dataflow worker's packages).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._to_child = Connection(to_child_w, readable=False)
        self._from_child = Connection(from_child_r, writable=False)
        if not self._from_child.poll(_START_TIMEOUT_S):
            self.close()
            raise ChildDied(f"{self.target}: child process did not start within {_START_TIMEOUT_S:g} s")
        try:
            ready = self._from_child.recv()
        except EOFError:
            code = self._process.wait()
            self.close()
            raise ChildDied(f"{self.target}: child process exited with code {code} while starting") from None
        assert ready == "ready", ready

    def close(self) -> None:
        """Stops the child (if any); the next call starts a new one."""
        for connection in (self._to_child, self._from_child):
            if connection is not None:
                connection.close()
        self._to_child = self._from_child = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None


class TimeLimitedPool:
    """Up to `size` children of one target for callers on several threads: a call runs on a free child, waiting for
    one while all are busy. A child starts on its first call; the most recently used idle child serves next, so a
    pool that is never busy starts only one."""

    def __init__(self, target: str, timeout_s: float, size: int) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one child, got {size}")
        self._children = [TimeLimitedFunction(target, timeout_s) for _ in range(size)]
        self._idle: queue.LifoQueue[TimeLimitedFunction] = queue.LifoQueue()
        for child in self._children:
            self._idle.put(child)

    def __call__(self, *args: Any) -> Any:
        child = self._idle.get()
        try:
            return child(*args)
        finally:
            self._idle.put(child)

    def map(self, calls: Sequence[tuple]) -> list[Any]:
        """`TimeLimitedFunction.map` on a free child: every call of `calls` runs there, one after another."""
        child = self._idle.get()
        try:
            return child.map(calls)
        finally:
            self._idle.put(child)

    def close(self) -> None:
        """Stops every child; calls made afterwards start them again."""
        for child in self._children:
            child.close()


class _Batch(list):
    """The argument tuples of one or more calls, sent as one message; the child answers each in turn."""


def serve(read_fd: int, write_fd: int, target: str) -> None:
    """The child's loop: call the target on each argument tuple of each _Batch received and send back one answer per
    call, until the parent closes the pipe."""
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    requests = Connection(read_fd, writable=False)
    replies = Connection(write_fd, readable=False)
    replies.send("ready")
    while True:
        try:
            batch = requests.recv()
        except EOFError:
            return
        for args in batch:
            try:
                reply = (True, function(*args))
            except Exception as e:
                reply = (False, e)
            try:
                replies.send(reply)
            except Exception as e:  # an unpicklable exception or result
                replies.send((False, RuntimeError(f"{type(e).__name__}: {e} (while returning from {target})")))
