"""The engine on its own thread, and the asyncio side that talks to it.

The HTTP handlers never touch the engine: they send commands (add, abort, score) through a queue
and receive each request's outputs on an asyncio queue. Leaving `stream()` early (a client gone,
a timeout, a cancelled task) aborts the request, so its cache blocks are freed at once, whether it
was running or still queued (llama.cpp's server-queue design: a reader that cancels on exit).

If the engine thread dies, or its steps keep failing, the worker marks itself dead, fails every waiting
request and refuses new ones at once, and /health turns 503 so a supervisor restarts the process: no
request waits forever on an engine that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kiln.engine.engine import Engine, StepOutput
from kiln.engine.sampler import SamplingParams
from kiln.engine.threads import use_threads_for
from kiln.errors import KilnError


@dataclass
class _Add:
    prompt: list[int]
    params: SamplingParams
    request_id: str
    deliver: Callable[[object], None]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    deliver: Callable[[object], None]


FAILED_STEPS_LIMIT = 3  # consecutive failed engine steps before the engine is declared broken


class EngineStopped(KilnError):
    """The engine thread is gone (a fault, or shutdown); nothing more can be served by it."""


@dataclass
class WorkerStats:
    waiting: int = 0
    running: int = 0
    kv_used_fraction: float = 0.0
    steps: int = 0
    errors: int = 0
    last_error: str | None = None
    busy_s: float = 0.0


class EngineWorker:
    """Owns one Engine and steps it on a daemon thread."""

    def __init__(self, engine: Engine, name: str = "engine") -> None:
        self.engine = engine
        # fixed for the engine's life, so handlers can refuse a prompt that never fits without asking the thread
        self.kv_capacity_tokens = engine.cache.capacity_tokens
        self.commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self.sinks: dict[str, Callable[[object], None]] = {}
        self.stats = WorkerStats()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.alive = True
        self.fault: str | None = None  # why the engine stopped, when it was not asked to
        self._gate = threading.Lock()  # orders "submit a command" against "the thread is gone"
        self._failed_steps = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.commands.put(None)
        self.thread.join(timeout)

    def abort_requests(self) -> None:
        """End every queued or running request now with finish_reason "abort" (the drain deadline): each caller
        gets a last, finished output and can answer its client with what was generated so far."""

        def abort(engine: Engine) -> None:
            for request_id, sink in list(self.sinks.items()):
                request = engine.requests.get(request_id)
                if request is not None and engine.abort(request_id):
                    sink(StepOutput(request, [], "", finished=True))
                    del self.sinks[request_id]

        with contextlib.suppress(EngineStopped):  # a stopped engine has already failed its requests
            self._submit(_Call(abort, lambda _: None))

    # --- thread side --------------------------------------------------------------------------------

    def _run(self) -> None:
        reason = "the server is shutting down"
        try:
            use_threads_for(self.engine.model)  # this thread's own torch count, whatever other engines use
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - the thread is dying: say why, and fail what waits on it
            self.fault = reason = f"the engine stopped: {type(exc).__name__}: {exc}"
        finally:
            with self._gate:
                self.alive = False
            self._abort_all(reason)
            while not self.commands.empty():  # commands sent before the gate closed
                command = self.commands.get_nowait()
                if isinstance(command, _Add | _Call):
                    command.deliver(EngineStopped(reason))

    def _loop(self) -> None:
        while True:
            commands: list[_Add | _Abort | _Call | None] = []
            with contextlib.suppress(queue.Empty):  # sleep on the queue when idle; when busy, take what is there
                commands.append(self.commands.get(timeout=0.5) if not self.engine.has_work else
                                self.commands.get_nowait())
            while not self.commands.empty():
                commands.append(self.commands.get_nowait())
            for command in commands:
                if command is None:
                    return
                self._handle(command)
            stepped = self.engine.has_work
            if stepped:
                self._step()
            if commands or stepped:  # also after the step that finished the last request: the gauges read 0 then
                self._refresh_stats()

    def _handle(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.prompt, command.params, command.request_id)
                self.sinks[command.request_id] = command.deliver
            except Exception as exc:  # noqa: BLE001 - one request that cannot be added fails alone, not the engine
                command.deliver(exc)
        elif isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self.sinks.pop(command.request_id, None)
        else:
            try:
                command.deliver(command.fn(self.engine))
            except Exception as exc:  # noqa: BLE001 - handed to the caller, which maps it to an HTTP error
                command.deliver(exc)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a failed step must not leave its requests waiting forever
            self.stats.errors += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            self._failed_steps += 1
            if self._failed_steps >= FAILED_STEPS_LIMIT:
                raise  # the engine is broken, not one request: stop the thread (see _run)
            self._abort_all(f"generation failed: {type(exc).__name__}")
            return
        self._failed_steps = 0
        self.stats.busy_s += time.perf_counter() - start
        self.stats.steps += 1
        for out in outputs:
            sink = self.sinks.get(out.request.request_id)
            if sink is not None:
                sink(out.request.error or out)  # a request the engine ended alone fails with its reason
            if out.finished:
                self.sinks.pop(out.request.request_id, None)

    def _refresh_stats(self) -> None:
        scheduler = self.engine.scheduler
        self.stats.waiting, self.stats.running = len(scheduler.waiting), len(scheduler.running)
        cache = self.engine.cache
        self.stats.kv_used_fraction = cache.used_blocks / max(1, cache.num_blocks - 1)

    def _abort_all(self, reason: str) -> None:
        for request_id, sink in list(self.sinks.items()):
            with contextlib.suppress(Exception):  # a broken engine may fail to abort; the caller must still hear
                self.engine.abort(request_id)
            sink(EngineStopped(reason) if not self.alive else RuntimeError(reason))
        self.sinks.clear()

    def _submit(self, command: _Add | _Call) -> None:
        with self._gate:
            if not self.alive:
                raise EngineStopped(self.fault or "the engine has stopped")
            self.commands.put(command)

    # --- asyncio side -------------------------------------------------------------------------------

    async def stream(self, prompt: Sequence[int], params: SamplingParams, request_id: str,
                     deadline: float | None = None) -> AsyncIterator[StepOutput]:
        """Outputs of one request as they are produced; leaving early aborts it."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[object] = asyncio.Queue()

        def deliver(item: object) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        self._submit(_Add(list(prompt), params, request_id, deliver))
        finished = False
        try:
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = await asyncio.wait_for(inbox.get(), timeout)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                assert isinstance(item, StepOutput)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.commands.put(_Abort(request_id))

    def after_end(self, request_ids: Sequence[str], fn: Callable[[], None]) -> None:
        """Call fn on the engine thread once the given requests can grow no more: any still running is aborted
        there first (its caller has left it), so fn reads their final outputs. Does not wait; when the engine has
        stopped, nothing grows any more and fn runs at once."""

        def end(engine: Engine) -> None:
            for request_id in request_ids:
                engine.abort(request_id)
                self.sinks.pop(request_id, None)
            fn()

        try:
            self._submit(_Call(end, lambda result: fn() if isinstance(result, EngineStopped) else None))
        except EngineStopped:
            fn()

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread, between steps, and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()

        def deliver(item: object) -> None:
            loop.call_soon_threadsafe(future.set_result, item)

        self._submit(_Call(fn, deliver))
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

