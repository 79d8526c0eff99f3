"""What the benchmarks share: mean ± sd cells, printing + saving a report, and worker processes that fail loudly.

A benchmark that measures in worker processes (:class:`Worker`, :func:`run_in_process`) stops as soon as
one fails: the worker's error (its traceback), or how it died (killed, crashed), comes back as a
:class:`WorkerError` instead of the coordinator waiting forever for a reply; :func:`exit_on_worker_error`
turns that into a printed message and exit status 1.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

#: The key of the message a worker sends instead of a reply when it fails.
_FAILED = "__worker_failed__"


def mean_sd(values: list[float]) -> str:
    """``0.123 ± 0.010`` over seeds (one value alone as it is)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def emit(text: str, out: str | None, payload: dict) -> None:
    """Print the Markdown report; with ``out``, also write ``payload`` + the text there as JSON."""
    sys.stdout.write(text + "\n")
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**payload, "markdown": text}, ensure_ascii=False, indent=1, default=str),
                        encoding="utf-8")


class WorkerError(RuntimeError):
    """A worker process failed: the error it raised (with its traceback), or how it ended without replying."""


def _serve(target: Callable, conn, args: tuple) -> None:
    """Run ``target(conn, *args)`` in the worker; if it raises, send the traceback back, then exit with 1."""
    try:
        target(conn, *args)
    except BaseException:
        try:
            conn.send({_FAILED: traceback.format_exc()})
        except Exception:  # the coordinator is gone: leave the error on stderr
            raise
        sys.exit(1)


def _call(conn, fn: Callable, *args) -> None:
    conn.send(fn(*args))


class Worker:
    """``target(conn, *args)`` in a spawned process of its own, talking over a pipe.

    Every reply is read through :meth:`recv`, which raises :class:`WorkerError` as soon as the worker
    fails or dies, so the coordinator never waits for a reply that cannot come.

    Args:
        name: Names the worker in errors.
        target: A module-level function ``target(conn, *args)``: it receives requests with ``conn.recv()``
            and answers with ``conn.send()``; raising ends the worker and reaches the coordinator.
        *args: Its other arguments (picklable).
        stop_message: What :meth:`stop` sends to ask it to finish (it should answer once, then return).
    """

    def __init__(self, name: str, target: Callable, *args: Any, stop_message: Any = ("stop", None)):
        ctx = mp.get_context("spawn")
        self.name = name
        self.stop_message = stop_message
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(target, child, args), daemon=True)
        self.proc.start()
        child.close()  # the child's end now lives in the worker alone: its exit ends any wait here

    def recv(self, poll_s: float = 0.5) -> Any:
        """The worker's next reply.

        Raises:
            WorkerError: The worker raised (its traceback is in the message) or ended without a reply.
        """
        try:
            while not self.conn.poll(poll_s):
                if not self.proc.is_alive() and not self.conn.poll(0):
                    raise EOFError
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise WorkerError(f"{self.name}: the worker process ended (exit code {self.proc.exitcode}) "
                              "without replying") from None
        if isinstance(msg, dict) and _FAILED in msg:
            self.proc.join(5)
            raise WorkerError(f"{self.name}: the worker failed:\n{msg[_FAILED].rstrip()}")
        return msg

    def ask(self, message: Any) -> Any:
        """Send ``message`` and return the reply (see :meth:`recv`)."""
        try:
            self.conn.send(message)
        except OSError:  # a broken pipe: the worker is gone; recv() says how it ended
            pass
        return self.recv()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the worker to finish and wait for it (terminated if it does not); never raises."""
        if self.proc.is_alive():
            try:
                self.ask(self.stop_message)
            except WorkerError:
                pass
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout)
        self.conn.close()


def run_in_process(name: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a spawned process of its own (its own memory, its own peak RSS); returns its result.

    Raises:
        WorkerError: ``fn`` raised (its traceback is in the message), or the process died (e.g. killed for
            memory) before returning.
    """
    worker = Worker(name, _call, fn, *args)
    try:
        return worker.recv()
    finally:
        worker.proc.join(30)
        if worker.proc.is_alive():
            worker.proc.terminate()
            worker.proc.join(30)
        worker.conn.close()


def exit_on_worker_error(main: Callable[[], int]) -> int:
    """``main()``; a :class:`WorkerError` is printed (with the worker's own error) and gives exit status 1."""
    try:
        return main()
    except WorkerError as err:
        sys.stderr.flush()
        sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {err}\n")
        return 1
