"""What the server serves: deployments (a loaded model version with its engine thread) and the router that
picks one per request: the live version of a name, or its canary for a set share of the traffic.

A new live version is loaded and warmed up next to the old one and swapped in by replacing one
reference, so no request sees a gap; the old deployment stops once its in-flight requests are done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kiln.engine.drafting import load_drafter
from kiln.engine.engine import Engine, EngineConfig
from kiln.engine.sampler import SamplingParams
from kiln.engine.threads import use_threads_for
from kiln.errors import KilnError, ModelFormatError
from kiln.model.load import LoadedModel, load
from kiln.model.spec import ModelSpec
from kiln.serve.registry import Registry, Version
from kiln.serve.worker import EngineWorker
from kiln.types import Precision

T = TypeVar("T")


@dataclass
class Deployment:
    name: str  # what clients send as "model"
    version: str
    loaded: LoadedModel
    worker: EngineWorker
    runtime: str = "torch"  # the runtime it runs on (--runtime auto resolved)
    in_flight: int = 0
    retired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def try_enter(self) -> bool:
        """Count a request in, unless this deployment is being retired (then route again)."""
        with self.lock:
            if self.retired:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1
            done = self.retired and self.in_flight == 0
        if done:
            self.worker.stop()

    def retire(self) -> None:
        with self.lock:
            self.retired = True
            done = self.in_flight == 0
        if done:
            self.worker.stop()


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn's result, computed on a new thread that ends when fn returns.

    GNU OpenMP keeps a thread team for every live thread that has run a parallel region. While the
    thread that loaded the model (a long-lived executor thread) kept its team, the engine thread's
    decode ran 1.5x slower on 2 cores (19 against 29 tokens/s); a thread that ends takes its team with it.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-load") as pool:  # exit joins the thread
        return pool.submit(fn).result()


def start(name: str, version: str, source: str, engine: EngineConfig, precision: Precision,
          runtime: str = "torch", draft: tuple[str | None, int] = (None, 4)) -> Deployment:
    """Load a model (and its draft: a model name and tokens per proposal), start its engine thread, and warm it
    up with one short generation."""
    from kiln.engine.onnx_runtime import pick_runtime

    draft_source, k = draft

    def build() -> tuple[LoadedModel, Engine, str]:
        use_threads_for(None)  # a new thread starts from the last count set anywhere: one, after an ORT model
        loaded = load(source, precision=precision, progress=False)
        # a server asks kiln's graph for nothing once a session runs the model (routes use the tokenizer
        # and spec), so kiln's copy goes before the session loads its own: the default fp32 model's 0.5 GB
        model, picked = pick_runtime(loaded, runtime, engine.kv_cache, keep_weights=False)
        drafter = None
        if draft_source is not None:
            drafter = load_drafter(draft_source, k, loaded.spec.vocab_size, runtime, precision)
        return loaded, Engine(model, loaded.tokenizer, engine, drafter), picked  # type: ignore[arg-type]

    loaded, built, picked = in_passing_thread(build)
    _note_short_budget(name, built, loaded.spec)
    worker = EngineWorker(built, name=f"engine-{name}-{version}")
    worker.start()
    deployment = Deployment(name, version, loaded, worker, picked)
    asyncio.run(_warm_up(deployment))
    return deployment


def _note_short_budget(name: str, engine: Engine, spec: ModelSpec) -> None:
    """Say once, at the load, when the KV cache budget holds fewer tokens than the model's context.

    A sequence that grows past the whole cache then stops with finish_reason "length" before its max_tokens
    or the context, which the response cannot tell apart from max_tokens; vLLM refuses to start in that
    case, kiln serves (shorter requests are fine) and names the flag that lifts the limit."""
    cache, context = engine.cache, spec.max_position
    if cache.capacity_tokens >= context:
        return
    blocks = -(-context // cache.block_size) + 1  # the cache keeps one block back (its scratch block)
    needed = blocks * cache.block_size * cache.bytes_per_token(spec, cache.dtype, cache.int8)
    logging.getLogger("kiln.serve").warning(
        "%s: the KV cache budget holds %d tokens, fewer than the model's context of %d: a sequence that grows "
        "past it stops with finish_reason \"length\"; --kv-budget-mb %d or more holds a whole context",
        name, cache.capacity_tokens, context, -(-needed // (1 << 20)))


async def _warm_up(deployment: Deployment) -> None:
    prompt = deployment.loaded.tokenizer.encode("Hello")
    async for _ in deployment.worker.stream(prompt, SamplingParams(temperature=0.0, max_tokens=2), "warm-up"):
        pass


@dataclass
class Route:
    live: Deployment
    canary: Deployment | None = None
    share: float = 0.0


class Router:
    """Model name -> deployments; swaps are single assignments, safe while requests are routed."""

    def __init__(self, engine: EngineConfig, precision: Precision, registry: Registry | None = None,
                 runtime: str = "torch", draft: tuple[str | None, int] = (None, 4)) -> None:
        self.routes: dict[str, Route] = {}
        self.engine_config = engine
        self.draft = draft  # (--draft, --speculate): every deployment drafts with its own copy
        self.precision = precision
        self.runtime = runtime
        self.registry = registry
        self.default: str | None = None
        # registry versions that failed to load, with their files' fingerprint then: each poll tried them again,
        # hashing (and loading) their files and logging the same error every few seconds
        self._failed: dict[tuple[str, str], Fingerprint] = {}

    def _start(self, name: str, version: str, source: str) -> Deployment:
        """start(), with --runtime auto resolved for each model on its own (engine/threads.py lets a torch
        model and an ONNX Runtime session share the process)."""
        return start(name, version, source, self.engine_config, self.precision, self.runtime, self.draft)

    def _start_registered(self, version: Version) -> Deployment:
        """start() a registry version, once its files are still those `kiln registry add` hashed: a folder replaced
        or edited since was served under the old version's name and header, unnoticed."""
        found = load_version(version.path, length=64)
        if found != version.sha256:
            raise ModelFormatError(
                f"the registry's {version.name!r} version {version.version!r} at {version.path} has changed since it "
                f"was added (sha256 {found[:16]}, registered {version.sha256[:16]}); put the registered files back, or "
                "`kiln registry add` it as a new version")
        return self._start(version.name, version.version, version.path)

    def add_static(self, name: str) -> None:
        """Serve the model `name` (any -m value) under that name, outside the registry."""
        self._set(name, Route(self._start(name, load_version(name), name)))

    def _set(self, name: str, route: Route) -> None:
        old = self.routes.get(name)
        self.routes[name] = route
        self.default = self.default or name
        if old is not None:
            keep = {id(route.live), id(route.canary)}
            for dep in (old.live, old.canary):
                if dep is not None and id(dep) not in keep:
                    dep.retire()

    def pick(self, name: str | None) -> Deployment | None:
        route = self.routes.get(name or self.default or "")
        if route is None:
            return None
        if route.canary is not None and random.random() < route.share:
            return route.canary
        return route.live

    def acquire(self, name: str | None) -> Deployment | None:
        """A deployment for `name` with this request counted in (release with leave())."""
        for _ in range(10):  # a swap retires the old one between pick and enter at most once in practice
            deployment = self.pick(name)
            if deployment is None or deployment.try_enter():
                return deployment
        return None

    def sync_registry(self, on_error: Callable[[Version, KilnError], None] | None = None) -> list[str]:
        """Load what the registry says should be served and swap it in; returns what changed.

        Without `on_error` a version that cannot be loaded raises (start-up: the server stops and says why). With it,
        the error is reported once and the rest goes on: the other names still change, and a live version that loaded
        is served without the canary that did not. A version that failed is tried again when its files change."""
        if self.registry is None:
            return []
        changes = []
        for name, (live, canary) in self.registry.serving().items():
            route = self.routes.get(name)
            current = {d.version: d for d in ((route.live, route.canary) if route else ()) if d is not None}
            live_dep = self._deployment_of(live, current, on_error)
            if live_dep is None:
                continue
            canary_dep = None if canary is None else self._deployment_of(canary, current, on_error)
            share = canary.canary_share if canary and canary_dep else 0.0
            if route is None or route.live is not live_dep or route.canary is not canary_dep or route.share != share:
                self._set(name, Route(live_dep, canary_dep, share))
                changes.append(f"{name}: live {live.version}" + (f", canary {canary.version} {share:.0%}"
                                                                 if canary and canary_dep else ""))
        return changes

    def _deployment_of(self, version: Version, current: dict[str, Deployment],
                       on_error: Callable[[Version, KilnError], None] | None) -> Deployment | None:
        """The running deployment of `version`, or a new one; None when it cannot be loaded and on_error took that."""
        if version.version in current:
            return current[version.version]
        key = (version.name, version.version)
        if on_error is not None and self._failed.get(key) == fingerprint(version.path):
            return None  # reported when it failed; tried again once its files change
        try:
            deployment = self._start_registered(version)
        except KilnError as exc:
            if on_error is None:
                raise
            self._failed[key] = fingerprint(version.path)
            on_error(version, exc)
            return None
        self._failed.pop(key, None)
        return deployment

    def deployments(self) -> list[Deployment]:
        return [d for r in self.routes.values() for d in (r.live, r.canary) if d is not None]

    def stop(self) -> None:
        for dep in self.deployments():
            dep.worker.stop()


Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(path: str) -> Fingerprint:
    """Each file's path, size and modification time under `path` (a file or a folder): cheap enough for every poll,
    where a sha256 of the weights is not."""
    root = Path(path).expanduser()
    try:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return tuple((str(p), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    except OSError:  # gone, or unreadable: as good a state as any to compare the next poll's against
        return ()


def load_version(source: str, length: int = 12) -> str:
    """The model's sha256 (its first `length` hex digits: 12 name a version)."""
    from kiln.model.source import resolve

    return resolve(source).sha256[:length]
