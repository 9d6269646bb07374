"""llama.cpp as a benchmark peer: build its own programs outside the repo, run them, parse what they print.

The llama.cpp source comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp), so a pinned
package version pins the llama.cpp commit. Everything is built under $KILN_BENCH_DIR (default
~/.cache/kiln-bench); nothing here is a kiln dependency. Comparing the numbers is left to the bench scripts.
Bench on an idle machine: llama.cpp's OpenMP threads spin-wait, and on 2 cores shared with one busy process its
decode fell to 0.4 tokens/s (57 with OMP_WAIT_POLICY=PASSIVE, which the environment passes through).

    .venv/bin/python bench/peers/llamacpp.py build [--python]
    .venv/bin/python bench/peers/llamacpp.py perplexity [--model X.gguf] [--ctx 512] [--chunks N]
    .venv/bin/python bench/peers/llamacpp.py bench [--model X.gguf] [-p 512] [-n 128]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

DEFAULT_VERSION = "0.3.36"  # llama-cpp-python; its CHANGELOG names the vendored llama.cpp commit
REQUIRED_TARGETS = ("llama-perplexity", "llama-bench", "llama-server")
OPTIONAL_TARGETS = ("llama-quantize", "llama-tokenize")
BUILT_STAMP = ".kiln-built"  # in the build folder, written after every wanted target linked
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",  # deprecated in this llama.cpp (warns), kept so older pins build offline too
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS downloads from the tools
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # otherwise the server build downloads its web UI
)
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# Some VMs list AMX in cpuinfo (so -march=native enables it) yet fault on its first instruction.
AMX_PROBE_C = """
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 2; /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
    unsigned char cfg[64] = {1}; /* palette 1; tile 0 below: 16 rows of 64 bytes */
    cfg[16] = 64; cfg[48] = 16;
    _tile_loadconfig(cfg); _tile_zero(0); _tile_release();
    return 0;
}
"""
_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_PM = r"\s*(?:±|\+/-)\s*"


class PeerSetupError(RuntimeError):
    """Building or installing the peer failed; the message says what and how to fix it."""


class PeerRunError(RuntimeError):
    """A llama.cpp program exited non-zero or printed nothing we could parse."""


@dataclass(frozen=True)
class LlamaTools:
    """The built llama.cpp programs and what they were built from."""

    bin_dir: Path
    perplexity: Path
    bench: Path
    server: Path
    quantize: Path | None  # None when this llama.cpp has no such target
    tokenize: Path | None
    version: str  # llama-cpp-python version whose vendored llama.cpp was built
    commit: str  # llama.cpp commit the programs report (taken from the sdist's CHANGELOG at build time)
    build_info: str  # what `llama-perplexity --version` prints


class Estimate(NamedTuple):
    value: float
    stderr: float


@dataclass(frozen=True)
class KLStats:
    """llama-perplexity --kl-divergence summary: the model under test (Q) against saved base logits."""

    ppl_base: Estimate | None
    ln_ppl_ratio: Estimate | None  # mean ln(PPL(Q)/PPL(base))
    ppl_ratio: Estimate | None  # PPL(Q)/PPL(base)
    ppl_diff: Estimate | None  # PPL(Q)-PPL(base)
    kld: Estimate | None  # mean KL divergence per token, nats
    kld_median: float | None
    same_top_p_pct: Estimate | None  # % of tokens whose argmax agrees with the base


@dataclass(frozen=True)
class PerplexityResult:
    """One llama-perplexity run. ppl is "Final estimate", or "Mean PPL(Q)" in KL mode.

    llama-perplexity cuts the file's tokens into num_chunks chunks of ctx tokens (the tail is dropped) and
    scores the last ctx - 1 - ctx // 2 tokens of each chunk, so earlier tokens give every score some context.
    """

    ppl: float
    ppl_stderr: float
    num_chunks: int | None
    ctx: int
    num_scored_tokens: int | None  # num_chunks * (ctx - 1 - ctx // 2)
    wall_s: float  # whole process: model load, tokenization and evaluation
    eval_s: float | None  # from llama.cpp's log timestamps: "calculating perplexity" to "Final estimate"
    eval_tokens_per_s: float | None  # num_chunks * ctx / eval_s: tokens fed through the model per second
    seconds_per_pass: float | None  # llama.cpp's timing of its first batch of chunks
    num_file_tokens: int | None  # only printed by llama.cpp when the file is too short; see count_tokens
    kl: KLStats | None
    command: list[str]
    log: str = field(repr=False)


def scratch_dir() -> Path:
    """KILN_BENCH_DIR, the only setting this module reads: where peers are downloaded and built."""
    return Path(os.environ.get("KILN_BENCH_DIR") or Path.home() / ".cache" / "kiln-bench").expanduser()


def ensure_tools(version: str = DEFAULT_VERSION) -> LlamaTools:
    """Build llama.cpp's perplexity, bench, server, quantize and tokenize programs; return at once if built."""
    bin_dir = scratch_dir() / "build" / f"llama.cpp-{version}" / "bin"
    if not (bin_dir.parent / BUILT_STAMP).is_file() or not _has_required(bin_dir):
        _build_tools(version, bin_dir.parent)
    perplexity = bin_dir / "llama-perplexity"
    version_out = subprocess.run([str(perplexity), "--version"], capture_output=True, text=True, check=False)
    # "version: 0.5.0-dev (build 1, commit 0c1e57098) built with ..." (older: "version: 4567 (0c1e57098) ...")
    build_info = " ".join((version_out.stdout + version_out.stderr).split())
    commit = re.search(r"version: [^(]*\((?:build \d+, commit )?(\w+)\)", build_info)

    def optional(name: str) -> Path | None:
        return bin_dir / name if (bin_dir / name).is_file() else None

    return LlamaTools(bin_dir, perplexity, bin_dir / "llama-bench", bin_dir / "llama-server",
                      optional("llama-quantize"), optional("llama-tokenize"), version,
                      commit.group(1) if commit else "unknown", build_info)


def _build_tools(version: str, build_dir: Path) -> None:
    """Configure and build the wanted targets that this llama.cpp has, with cmake, 2 jobs."""
    src = _unpacked_sdist(version)
    llama_src = src / "vendor" / "llama.cpp"
    _check_toolchain()
    targets = [t for t in REQUIRED_TARGETS + OPTIONAL_TARGETS if _has_target(llama_src, t)]
    missing = [t for t in REQUIRED_TARGETS if t not in targets]
    if missing:
        raise PeerSetupError(f"llama.cpp in llama-cpp-python {version} has no {missing[0]} target; pin another version")
    commit = _changelog_commit(src, version)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(llama_src), "-B", str(build_dir), *generator, *CMAKE_FLAGS, *_native_fixes()]
    if commit != "unknown":
        configure.append(f"-DLLAMA_BUILD_COMMIT={commit}")  # the sdist has no .git for llama.cpp to read it from
    start = time.perf_counter()
    _log(f"configuring llama.cpp {commit} in {build_dir}")
    _run_streamed(configure, "cmake configure")
    _log(f"building {' '.join(targets)} with 2 jobs (several minutes on 2 cores)")
    _run_streamed(["cmake", "--build", str(build_dir), "--config", "Release", "-j2", "--target", *targets],
                  "cmake --build")
    (build_dir / BUILT_STAMP).write_text(" ".join(targets) + "\n")  # last, so an interrupted build is resumed
    _log(f"built in {time.perf_counter() - start:.0f} s -> {build_dir / 'bin'}")


def ensure_python_binding(version: str = DEFAULT_VERSION) -> Path:
    """Install llama-cpp-python into its own --target folder (not kiln's venv); return it for sys.path.

    Use it as `sys.path.insert(0, str(path)); import llama_cpp`. The folder holds llama_cpp and diskcache
    only; numpy, jinja2 and typing-extensions come from kiln's venv. Compiling takes ~7 min on 2 cores.
    """
    target = scratch_dir() / "python" / f"llama-cpp-python-{version}"
    stamp = target / ".kiln-complete"  # written last, so a killed install is redone
    if stamp.is_file():
        return target
    _check_toolchain()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python",
           "--target", str(partial), f"llama-cpp-python=={version}", "diskcache"]
    cmake_args = " ".join(["-DGGML_NATIVE=ON", *(f"-D{flag}='{NO_AMX_FLAGS}'" for flag in _amx_fix_vars())])
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    _log(f"compiling llama-cpp-python {version} into {target} (about 7 minutes on 2 cores)")
    start = time.perf_counter()
    _run_streamed(cmd, "pip install llama-cpp-python", env=env)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    check = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import llama_cpp; "
                            "print(llama_cpp.__version__)", str(target)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerSetupError(f"llama_cpp installed in {target} but does not import: {last}")
    stamp.write_text(check.stdout)
    _log(f"llama_cpp {check.stdout.strip()} importable from {target} after {time.perf_counter() - start:.0f} s")
    return target


def run_perplexity(
    tools: LlamaTools,
    model_gguf: Path,
    text_file: Path,
    ctx: int = 512,
    threads: int = 2,
    chunks: int | None = None,
    kl_base_out: Path | None = None,
    kl_base_in: Path | None = None,
    batch: int | None = None,
) -> PerplexityResult:
    """Run llama-perplexity over text_file; kl_base_out saves base logits, kl_base_in compares against them.

    A base-logits file takes 2 bytes x vocab per scored token: ~100 KB for SmolLM2, so 14 GB for all of
    WikiText-2 test at ctx 512; pass chunks to keep it small. KL mode reads its tokens from that file.

    batch None passes -b ctx (one chunk per pass): on 2 cores 2.3x faster than llama.cpp's default -b 2048,
    which packs 2048 // ctx chunks into a pass. The perplexity does not depend on it.
    """
    if kl_base_out is not None and kl_base_in is not None:
        raise ValueError("pass kl_base_out (save base logits) or kl_base_in (compare to them), not both")
    cmd = [str(tools.perplexity), "-m", str(model_gguf), "-f", str(text_file), "-c", str(ctx), "-t", str(threads),
           "-b", str(batch or ctx)]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if kl_base_out is not None:
        cmd += ["--kl-divergence-base", str(kl_base_out)]
    if kl_base_in is not None:
        cmd += ["--kl-divergence-base", str(kl_base_in), "--kl-divergence"]
    log, wall_s = _run_captured(cmd)
    return parse_perplexity_log(log, ctx, wall_s, cmd)


def parse_perplexity_log(log: str, ctx: int, wall_s: float, command: list[str]) -> PerplexityResult:
    """Read llama-perplexity's output; patterns anchor on labels since lines may carry timestamp prefixes."""
    final = re.search(rf"Final estimate: PPL = {_NUM}{_PM}{_NUM}", log)
    kl = _parse_kl(log) if "KL divergence statistics" in log else None
    mean_q = _estimate(r"Mean PPL\(Q\)", log)
    if final is not None:
        ppl, ppl_stderr = float(final.group(1)), float(final.group(2))
    elif mean_q is not None:
        ppl, ppl_stderr = mean_q
    else:
        tail = " | ".join(log.strip().splitlines()[-3:])
        raise PeerRunError(f"no perplexity in llama-perplexity output; last lines: {tail}")
    chunks = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks", log)
    num_chunks = int(chunks.group(1)) if chunks else None
    per_pass = re.search(rf"{_NUM} seconds per pass", log)
    file_tokens = re.search(r"tokenizes to only (\d+) tokens", log)
    eval_start, eval_end = _log_time_s("calculating perplexity over", log), _log_time_s("Final estimate", log)
    eval_s = eval_end - eval_start if eval_start is not None and eval_end is not None else None
    return PerplexityResult(
        ppl=ppl,
        ppl_stderr=ppl_stderr,
        num_chunks=num_chunks,
        ctx=ctx,
        num_scored_tokens=num_chunks * (ctx - 1 - ctx // 2) if num_chunks else None,
        wall_s=wall_s,
        eval_s=eval_s,
        eval_tokens_per_s=num_chunks * ctx / eval_s if num_chunks and eval_s else None,
        seconds_per_pass=float(per_pass.group(1)) if per_pass else None,
        num_file_tokens=int(file_tokens.group(1)) if file_tokens else None,
        kl=kl,
        command=command,
        log=log,
    )


def _log_time_s(label: str, log: str) -> float | None:
    """Seconds since start on the first line holding label, from llama.cpp's "M.SS.mmm.uuu" line prefix."""
    found = re.search(rf"^(\d+)\.(\d\d)\.(\d{{3}})\.(\d{{3}}) .*{re.escape(label)}", log, re.MULTILINE)
    if found is None:
        return None
    minutes, seconds, ms, us = (int(g) for g in found.groups())
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


def count_tokens(tools: LlamaTools, model_gguf: Path, text_file: Path) -> int:
    """Tokens text_file encodes to with the model's tokenizer, BOS included as llama-perplexity adds it."""
    if tools.tokenize is None:
        raise PeerSetupError(f"llama-tokenize was not built in {tools.bin_dir}; this llama.cpp has no such target")
    log, _ = _run_captured([str(tools.tokenize), "-m", str(model_gguf), "-f", str(text_file), "--ids",
                            "--show-count", "--log-disable"])
    found = re.search(r"Total number of tokens: (\d+)", log)
    if found is None:
        raise PeerRunError("llama-tokenize printed no 'Total number of tokens' line")
    return int(found.group(1))


def run_bench(
    tools: LlamaTools,
    model_gguf: Path,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    threads: int = 2,
    repetitions: int = 5,
    flash_attn: bool | None = None,
) -> list[dict[str, object]]:
    """Run llama-bench; one row per test (pp then tg) with avg_ts/stddev_ts tokens/s and a `test` name."""
    cmd = [str(tools.bench), "-m", str(model_gguf), "-p", str(prompt_tokens), "-n", str(gen_tokens),
           "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    if flash_attn is not None:
        cmd += ["-fa", "1" if flash_attn else "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerRunError(f"llama-bench exited {proc.returncode}: {last}")
    rows: list[dict[str, object]] = json.loads(proc.stdout)
    for row in rows:
        row["test"] = f"pp{row['n_prompt']}" if row.get("n_gen") == 0 else f"tg{row['n_gen']}"
    return rows


def start_server(
    tools: LlamaTools, model_gguf: Path, port: int, parallel: int = 8, ctx: int = 8192, threads: int = 2
) -> subprocess.Popen[bytes]:
    """Start llama-server on 127.0.0.1:port; ctx is the total KV context, split evenly over `parallel` slots.

    Its output goes to a log file under the scratch folder. The caller owns the process: terminate() it.
    """
    log_dir = scratch_dir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"llama-server-{port}.log"
    cmd = [str(tools.server), "-m", str(model_gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(parallel), "-c", str(ctx), "-t", str(threads)]
    _log(f"starting {' '.join(cmd)} (log: {log_path})")
    with log_path.open("wb") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def wait_ready(port: int, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll http://127.0.0.1:port/health until it answers 200; fail early if proc exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PeerRunError(f"llama-server exited with code {proc.returncode} before /health answered")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.2)
    raise PeerRunError(f"llama-server on port {port} not healthy after {timeout_s:.0f} s")


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parse_kl(log: str) -> KLStats:
    median = re.search(rf"Median\s+KLD:\s*{_NUM}", log)
    return KLStats(
        ppl_base=_estimate(r"Mean PPL\(base\)", log),
        ln_ppl_ratio=_estimate(r"Mean ln\(PPL\(Q\)/PPL\(base\)\)", log),
        ppl_ratio=_estimate(r"Mean PPL\(Q\)/PPL\(base\)", log),
        ppl_diff=_estimate(r"Mean PPL\(Q\)-PPL\(base\)", log),
        kld=_estimate(r"Mean\s+KLD", log),
        kld_median=float(median.group(1)) if median else None,
        same_top_p_pct=_estimate(r"Same top p", log),
    )


def _estimate(label: str, log: str) -> Estimate | None:
    found = re.search(rf"{label}\s*:\s*{_NUM}{_PM}{_NUM}", log)
    return Estimate(float(found.group(1)), float(found.group(2))) if found else None


def _sdist_stem(version: str) -> str:
    return f"llama_cpp_python-{version}"


def _unpacked_sdist(version: str) -> Path:
    """Download (pip, no build) and unpack the llama-cpp-python sdist once; return its root folder."""
    root = scratch_dir()
    unpacked = root / "src" / _sdist_stem(version)
    if (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return unpacked
    archive = root / "sdist" / f"{_sdist_stem(version)}.tar.gz"
    if not archive.is_file():
        _log(f"downloading llama-cpp-python {version} sdist to {archive.parent}")
        _run_streamed([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       f"llama-cpp-python=={version}", "-d", str(archive.parent)], "pip download")
    if not archive.is_file():
        raise PeerSetupError(f"pip download left no {archive.name} in {archive.parent}; check the version {version!r}")
    _log(f"unpacking {archive.name}")
    partial = root / "src" / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(unpacked, ignore_errors=True)
    (partial / _sdist_stem(version)).rename(unpacked)
    shutil.rmtree(partial)
    return unpacked


def _changelog_commit(src: Path, version: str) -> str:
    """The llama.cpp commit the sdist's CHANGELOG names first under this version's heading."""
    changelog = src / "CHANGELOG.md"
    if not changelog.is_file():
        return "unknown"
    section = changelog.read_text().partition(f"## [{version}]")[2].partition("\n## [")[0]
    found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return found.group(1) if found else "unknown"


def _has_target(llama_src: Path, target: str) -> bool:
    return any(f"set(TARGET {target})" in p.read_text() for p in (llama_src / "tools").glob("*/CMakeLists.txt"))


def _has_required(bin_dir: Path) -> bool:
    return all((bin_dir / t).is_file() for t in REQUIRED_TARGETS)


def _native_fixes() -> list[str]:
    """cmake -D flags that keep -march=native but drop ISA extensions this machine lists yet cannot run."""
    return [f"-D{var}={NO_AMX_FLAGS}" for var in _amx_fix_vars()]


def _amx_fix_vars() -> list[str]:
    """["CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"] when -march=native turns on AMX and an AMX probe faults, else []."""
    cc = os.environ.get("CC") or "cc"
    macros = subprocess.run([cc, "-march=native", "-dM", "-E", "-"], input="", capture_output=True, text=True,
                            check=False)
    if "__AMX_TILE__" not in macros.stdout:
        return []
    probe_dir = scratch_dir() / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / "amx.c").write_text(AMX_PROBE_C)
    built = subprocess.run([cc, "-O1", "-mamx-tile", str(probe_dir / "amx.c"), "-o", str(probe_dir / "amx")],
                           capture_output=True, check=False)
    if built.returncode == 0 and subprocess.run([str(probe_dir / "amx")], check=False).returncode == 0:
        return []
    _log(f"this CPU lists AMX but AMX instructions fault here; building with {NO_AMX_FLAGS}")
    return ["CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"]


def _check_toolchain() -> None:
    for tool, env in (("cmake", None), ("cc", "CC"), ("c++", "CXX")):
        name = (os.environ.get(env) if env else None) or tool
        if shutil.which(name) is None:
            raise PeerSetupError(f"{name} not found on PATH; install it (apt-get install cmake g++) and retry")


def _run_streamed(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run with output passed through to stderr, so long builds show progress."""
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, check=False)
    if proc.returncode != 0:
        raise PeerSetupError(f"{what} failed with exit code {proc.returncode}; see the output above ({cmd[0]} ...)")


def _run_captured(cmd: list[str]) -> tuple[str, float]:
    """Run a llama.cpp program; return its merged stdout+stderr and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    wall_s = time.perf_counter() - start
    log = proc.stdout.decode("utf-8", errors="replace")
    if proc.returncode != 0:
        tail = " | ".join(log.strip().splitlines()[-3:])
        raise PeerRunError(f"{Path(cmd[0]).name} exited {proc.returncode}; last lines: {tail}")
    return log, wall_s


def _log(message: str) -> None:
    print(f"[llamacpp] {message}", file=sys.stderr, flush=True)


def _default_model() -> Path:
    from kiln.model.source import default_gguf_path  # deferred: only the CLI needs kiln

    return default_gguf_path()


def _default_text() -> Path:
    from kiln import settings

    return settings.data_dir() / "wikitext-2-raw" / "wiki.test.raw"


def _cli_build(args: argparse.Namespace) -> None:
    tools = ensure_tools(args.version)
    print(f"bin_dir: {tools.bin_dir}\ncommit: {tools.commit}\nbuild: {tools.build_info}")
    if args.python:
        print(f"llama_cpp path: {ensure_python_binding(args.version)}")


def _cli_perplexity(args: argparse.Namespace) -> None:
    tools = ensure_tools(args.version)
    model, text = args.model or _default_model(), args.text or _default_text()
    result = run_perplexity(tools, model, text, ctx=args.ctx, threads=args.threads, chunks=args.chunks,
                            kl_base_out=args.kl_base_out, kl_base_in=args.kl_base_in, batch=args.batch)
    mode = "-kl" if args.kl_base_in else ""
    log_path = scratch_dir() / "logs" / f"perplexity-{model.stem}-{text.stem}-c{args.ctx}{mode}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(result.command)}\n{result.log}")
    print(f"model: {model}\ntext: {text}\nllama.cpp: {tools.commit} ({tools.build_info})\nlog: {log_path}")
    speed = "eval time not printed"
    if result.eval_s is not None and result.eval_tokens_per_s is not None:
        speed = f"eval {result.eval_s:.1f} s at {result.eval_tokens_per_s:.1f} tokens/s"
    print(f"PPL = {result.ppl:.4f} +/- {result.ppl_stderr:.5f}  ctx {result.ctx}, {result.num_chunks} chunks, "
          f"{result.num_scored_tokens} tokens scored; {speed}; wall {result.wall_s:.1f} s")
    if tools.tokenize is not None and args.count_tokens:
        print(f"file tokens: {count_tokens(tools, model, text)}")
    if result.kl is not None:
        for name, value in vars(result.kl).items():
            print(f"{name}: {value}")


def _cli_bench(args: argparse.Namespace) -> None:
    tools = ensure_tools(args.version)
    rows = run_bench(tools, args.model or _default_model(), args.prompt_tokens, args.gen_tokens, args.threads,
                     args.repetitions)
    for row in rows:
        print(f"{row['test']}: {row['avg_ts']:.2f} +/- {row['stddev_ts']:.2f} tokens/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version to build")
    verbs = parser.add_subparsers(dest="verb", required=True)
    build = verbs.add_parser("build", help="build the llama.cpp programs")
    build.add_argument("--python", action="store_true", help="also compile the llama_cpp binding (~7 min)")
    build.set_defaults(run=_cli_build)
    ppl = verbs.add_parser("perplexity", help="llama-perplexity on a text file (default WikiText-2 test)")
    ppl.add_argument("--model", type=Path, help="GGUF file (default: kiln's default model)")
    ppl.add_argument("--text", type=Path, help="raw text file (default: $KILN_DATA_DIR/wikitext-2-raw/wiki.test.raw)")
    ppl.add_argument("--ctx", type=int, default=512)
    ppl.add_argument("--threads", type=int, default=2)
    ppl.add_argument("--chunks", type=int, help="first N chunks only (default: all)")
    ppl.add_argument("--batch", type=int, help="llama.cpp -b (default: ctx, one chunk per pass)")
    ppl.add_argument("--kl-base-out", type=Path, help="save base logits here for a later --kl-base-in run")
    ppl.add_argument("--kl-base-in", type=Path, help="report KL divergence against these saved base logits")
    ppl.add_argument("--count-tokens", action="store_true", help="also count the file's tokens with llama-tokenize")
    ppl.set_defaults(run=_cli_perplexity)
    bench = verbs.add_parser("bench", help="llama-bench prompt and generation tokens/s")
    bench.add_argument("--model", type=Path, help="GGUF file (default: kiln's default model)")
    bench.add_argument("-p", "--prompt-tokens", type=int, default=512)
    bench.add_argument("-n", "--gen-tokens", type=int, default=128)
    bench.add_argument("-r", "--repetitions", type=int, default=5)
    bench.add_argument("--threads", type=int, default=2)
    bench.set_defaults(run=_cli_bench)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (PeerSetupError, PeerRunError) as error:
        sys.exit(f"llamacpp.py: {error}")


if __name__ == "__main__":
    main()
