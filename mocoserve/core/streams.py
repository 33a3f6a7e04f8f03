"""Reading a shard front to back: a local file, or the output of a `pipe:` command that must
not hang a run for ever.

`open_stream("pipe:aws s3 cp s3://b/shard-000001.tar -")` runs the command in its own
process group with its stdout as the stream. A watchdog stops the command when a read waits
`stall_s` seconds for its bytes (a dead mount, a stalled download; a reader that does not ask,
a data worker waiting for its turn, is not a stall), and the read then fails
with the reason; a command that ends with a non-zero status fails the read that reaches its
end, with the last line it wrote to stderr. Reads never succeed silently on a cut-short
stream. (WebDataset's gopen pipes have no stall limit, and report a failed status only when
the stream is closed, after the samples before it were used.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from typing import BinaryIO

PIPE = "pipe:"
STALL_SECONDS = 300.0  # no byte from a pipe: command for this long stops it
READ_CHUNK = 1 << 20


class StreamError(OSError):
    """A stream that could not be read to its end (its command failed or stalled); the
    message says why, and the caller names the stream."""


_running: weakref.WeakSet[PipeStream] = weakref.WeakSet()  # started here, not yet closed
_running_lock = threading.Lock()


def stop_all() -> None:
    """Stop every pipe: command this process is reading (a run that is stopped by a signal):
    the reads waiting on them end, failing; the commands do not outlive the process."""
    with _running_lock:
        running = list(_running)
    for stream in running:
        stream._kill()


def finish(stream: BinaryIO) -> None:
    """After a reader is done with `stream`: a pipe: command's failure or stall is raised."""
    if isinstance(stream, PipeStream):
        stream.finish()


def open_stream(url: str, stall_s: float = STALL_SECONDS) -> BinaryIO:
    """A binary stream of `url`: a local file, or a pipe: command's stdout (see module doc)."""
    if url.startswith(PIPE):
        return PipeStream(url[len(PIPE) :], url, stall_s)  # type: ignore[return-value]
    return open(url, "rb")


class PipeStream:
    """A pipe: command's stdout as a read-only binary stream, with a stall watchdog."""

    def __init__(self, command: str, url: str, stall_s: float) -> None:
        if not command.strip():
            raise StreamError("no command after pipe:")  # the caller names the stream
        self.url, self.stall_s = url, stall_s
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (its tail names what went wrong; closed in close)
        self._proc = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,  # killed as a group: `sh -c` and what it started
        )
        self._waiting_since: float | None = None  # a read waiting for the command's bytes
        self._stalled = False
        self._closed = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="pipe-watchdog", daemon=True)
        self._watchdog.start()
        with _running_lock:
            _running.add(self)

    # the stream interface tarfile's stream mode uses
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert self._proc.stdout is not None
        self._waiting_since = time.monotonic()
        try:
            # read1: what the pipe has (at least a byte), so a slow stream is not a stall
            data = self._proc.stdout.read1(size) if size and size > 0 else self._proc.stdout.read()
        finally:
            self._waiting_since = None
        if not data and size != 0:
            self._at_end()
        return data

    def finish(self) -> None:
        """Read to the end (a tar reader stops at its end-of-archive blocks): the command's
        status, or its stall, is known only there."""
        while self.read(READ_CHUNK):
            pass

    def _at_end(self) -> None:
        rc = self._proc.wait()
        if self._stalled:
            raise StreamError(f"no data for {self.stall_s:g} s; the command was stopped")
        if rc != 0:
            raise StreamError(f"the command failed (status {rc}){self._why()}")

    def _why(self) -> str:
        try:
            self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, self._stderr.tell() - 4096))
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1].strip()}" if lines else ""

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.stall_s / 4)):
            if self._proc.poll() is not None:
                return
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.stall_s:
                self._stalled = True
                self._kill()
                return

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop the command if it is still running (a reader that stopped early)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with _running_lock:
            _running.discard(self)
        if self._proc.poll() is None:
            self._kill()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> PipeStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: nothing to report to
            self.close()
