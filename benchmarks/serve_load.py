"""``mlflow-edge serve`` under concurrent load against llama-cpp-python's own server, on the same GGUF file.

For the offline demo GGUF (SmolLM2-135M Q4_1, ``demo_gguf_path()``) saved as a local MLflow model folder (the ``gguf``
flavor, ``n_ctx`` = ``--ctx``), two servers are started on loopback one after the other, never both at once, each in
its own process group (killed whole at the end, also on error or interruption):

- **mlflow-edge**: ``mlflow-edge serve <folder>``; its ``llama_cpp.Llama`` takes llama-cpp-python's defaults for
  everything but ``n_ctx`` (``serve`` has no thread option);
- **llama_cpp.server**: ``python -m llama_cpp.server --model <folder>/model.gguf`` with those same ``Llama`` settings
  passed explicitly where the server's defaults differ: ``n_threads`` (``cpu_count // 2``), ``n_threads_batch``
  (``cpu_count``), ``logits_all`` false, ``use_mlock`` false, ``verbose`` false; ``interrupt_requests`` false, so that
  a waiting request does not cut a stream short.

Each server, once ``/health`` (llama_cpp.server: ``/v1/models``) answers 200, gets one warm-up request, then
``--clients`` closed-loop clients (asyncio, one ``httpx.AsyncClient``) send ``/v1/completions`` requests for
``--duration`` seconds: the same prompts in the same order, ``max_tokens`` = ``--max-tokens``, ``temperature`` 0, and
llama.cpp's repetition penalty off on both (``repeat_penalty`` 1.0 for llama_cpp.server, whose default is 1.1; the
contract's default for mlflow-edge). No request starts after the deadline; those in flight finish (each bounded by
``--request-timeout``). A request is ok on HTTP 200 with a parseable answer; anything else (status, exception,
timeout) is a failure. Tokens are ``usage.completion_tokens`` (streamed without usage: the text chunks). tokens/s =
completion tokens / wall seconds from the first request to the last answer. Server RSS (the process and its children)
is read after the warm-up, sampled during the load (peak) and read again at its end.

With ``--rounds R`` both servers run R times (alternating which goes first); the verdict takes medians over rounds.
Bounded: a server not ready within 180 s is an error; a hung one ends its part within ``--duration`` +
``--request-timeout`` + ~45 s (status reads with 10 s timeouts, SIGTERM, then SIGKILL to its group after 10 s).

Output: JSON lines on stdout (progress on stderr), the last one the verdict. Run::

    python benchmarks/serve_load.py [--clients 8] [--duration 30] [--max-tokens 32] [--ctx 2048] [--stream]
                                    [--rounds 1] [--skip-native]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EDGE, NATIVE = "mlflow-edge", "llama_cpp.server"
GOALS = {"failed": 0, "tokens_per_s_ratio": 0.9, "rss_growth": 0.05}
PROMPTS = (
    "The history of the Roman Empire began when",
    "Write a short note about why the sky is blue.",
    "def fibonacci(n):",
    "The three most important things to know about photosynthesis are",
    "Once upon a time, in a small village by the sea,",
    "A good way to learn a new programming language is",
    "The capital of France is",
    "Here is a list of fruits: apple, banana,",
)
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
RSS_SAMPLE_S = 0.5


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def progress(message: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the servers ----------------------------------------------------------------------------------------------------
def llama_defaults() -> dict[str, int]:
    """The thread counts ``llama_cpp.Llama`` picks when none is given (what ``mlflow-edge serve`` runs with)."""
    cpus = multiprocessing.cpu_count()
    return {"n_threads": max(cpus // 2, 1), "n_threads_batch": cpus}


def edge_command(folder: Path, port: int | str, args: argparse.Namespace) -> list[str]:
    script = Path(sys.executable).with_name("mlflow-edge")
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "mlflow_edge.cli"]
    return [*program, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
            "--max-queue", str(max(16, 2 * args.clients)), "--max-tokens", str(max(512, args.max_tokens))]


def native_command(gguf: Path, port: int | str, args: argparse.Namespace) -> list[str]:
    threads = llama_defaults()
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(args.ctx), "--n_threads", str(threads["n_threads"]),
            "--n_threads_batch", str(threads["n_threads_batch"]), "--logits_all", "false", "--use_mlock", "false",
            "--verbose", "false", "--interrupt_requests", "false"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> Any:
    """A ``preexec_fn``: the kernel kills the server if this process dies without its cleanup (Linux only; libc's
    ``prctl`` is looked up here, not in the forked child)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None).prctl
    return lambda: prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class Server:
    """One server in its own process group, its output in a log file; :meth:`stop` kills the whole group."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log: Path) -> None:
        import psutil

        self.name, self.url, self.log = name, f"http://127.0.0.1:{port}", log
        env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}  # llama_cpp.server reads them
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent(), env=env)
        self.psutil_proc = psutil.Process(self.proc.pid)
        self.ready_path = ready_path

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ``ready_path`` answered 200; a server that exits or stays silent is an error."""
        import httpx

        start = time.perf_counter()
        while time.perf_counter() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:g} s: {self.log_tail()}")

    def rss_mb(self) -> float:
        """Resident memory of the server and its children, in MB."""
        return self._tree_sum(lambda proc: proc.memory_info().rss) / 1e6

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server and its children have used."""
        return self._tree_sum(lambda proc: sum(proc.cpu_times()[:2]))

    def _tree_sum(self, figure: Any) -> float:
        import psutil

        total = 0.0
        try:
            for proc in [self.psutil_proc, *self.psutil_proc.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += figure(proc)
        except psutil.NoSuchProcess:
            return float("nan")
        return total

    def log_tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines() if self.log.is_file() else []
        return " | ".join(text[-lines:]) or "no output"

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback") if self.log.is_file() else 0

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL it (a hung leader, and whatever it left in its group); reaps the server."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass


# -- the load -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """One request: ok, or what went wrong (an HTTP status or an exception name), with its timings and tokens."""

    prompt: int
    ok: bool
    error: str | None
    latency_s: float
    ended: float
    tokens: int = 0
    ttft_s: float | None = None
    text: str = ""


def request_body(server: str, model: str, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0,
                            "stream": args.stream}
    if server == NATIVE:
        body["repeat_penalty"] = 1.0  # llama_cpp.server's default is 1.1; the request contract's is 1.0 (off)
    elif args.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def one_request(client: Any, url: str, body: dict[str, Any], prompt: int) -> Outcome:
    start = time.perf_counter()
    if not body["stream"]:
        response = await client.post(url, json=body)
        ended = time.perf_counter()
        if response.status_code != 200:
            return Outcome(prompt, False, f"HTTP {response.status_code}", ended - start, ended)
        answer = response.json()
        return Outcome(prompt, True, None, ended - start, ended, int(answer["usage"]["completion_tokens"]),
                       text=answer["choices"][0]["text"])
    pieces: list[str] = []
    ttft, usage_tokens, done = None, None, False
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            ended = time.perf_counter()
            return Outcome(prompt, False, f"HTTP {response.status_code}", ended - start, ended)
        async for line in response.aiter_lines():
            data = line[len("data:"):].strip() if line.startswith("data:") else ""
            done = done or data == "[DONE]"
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                ended = time.perf_counter()
                return Outcome(prompt, False, "error event", ended - start, ended)
            if chunk.get("usage"):
                usage_tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    pieces.append(choice["text"])
    ended = time.perf_counter()
    if not done:
        return Outcome(prompt, False, "stream ended without [DONE]", ended - start, ended)
    tokens = usage_tokens if usage_tokens is not None else len(pieces)
    return Outcome(prompt, True, None, ended - start, ended, tokens, ttft, "".join(pieces))


async def client_loop(client: Any, server: Server, model: str, first_prompt: int, deadline: float,
                      args: argparse.Namespace, outcomes: list[Outcome]) -> None:
    url, prompt = server.url + "/v1/completions", first_prompt
    while time.perf_counter() < deadline:
        body = request_body(server.name, model, PROMPTS[prompt], args)
        start = time.perf_counter()
        try:
            outcomes.append(await asyncio.wait_for(one_request(client, url, body, prompt), args.request_timeout))
        except Exception as exc:  # timeouts, refused or dropped connections, malformed answers
            ended = time.perf_counter()
            outcomes.append(Outcome(prompt, False, type(exc).__name__, ended - start, ended))
        except asyncio.CancelledError:  # the join's bound passed: the request counts as failed
            ended = time.perf_counter()
            outcomes.append(Outcome(prompt, False, "cancelled at the bound", ended - start, ended))
            raise
        prompt = (prompt + 1) % len(PROMPTS)


async def sample_rss(server: Server, peak: list[float]) -> None:
    while True:
        peak[0] = max(peak[0], server.rss_mb())
        await asyncio.sleep(RSS_SAMPLE_S)


async def load(server: Server, model: str, args: argparse.Namespace) -> tuple[list[Outcome], float, float]:
    """``(outcomes, wall seconds from the start to the last answer, peak RSS in MB)`` of the clients' run."""
    import httpx

    outcomes: list[Outcome] = []
    peak = [server.rss_mb()]
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        sampler = asyncio.create_task(sample_rss(server, peak))
        start = time.perf_counter()
        deadline = start + args.duration
        clients = [client_loop(client, server, model, i % len(PROMPTS), deadline, args, outcomes)
                   for i in range(args.clients)]
        try:  # a request ends within --request-timeout: this bound is only a second guard
            await asyncio.wait_for(asyncio.gather(*clients), args.duration + args.request_timeout + 5.0)
        except asyncio.TimeoutError:
            progress(f"{server.name}: clients still busy {args.request_timeout:g} s after the deadline; cancelled")
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    last = max((o.ended for o in outcomes), default=time.perf_counter())
    return outcomes, last - start, peak[0]


# -- one server, start to stop --------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def measure(name: str, cmd: list[str], port: int, ready_path: str, args: argparse.Namespace, scratch: Path,
            round_no: int) -> dict[str, Any]:
    """Start the server, warm it up, load it, stop it: the server's line (with each prompt's first answer)."""
    progress(f"round {round_no}: starting {name}")
    server = Server(name, cmd, port, ready_path, scratch / f"{name}-{round_no}.log")
    try:
        ready_s = server.wait_ready(START_TIMEOUT_S)
        model = asyncio.run(warm_up(server, args))
        rss_start, cpu_start = server.rss_mb(), server.cpu_s()
        before = edge_scrape(server) if name == EDGE else None
        progress(f"{name} ready in {ready_s:.1f} s, {rss_start:.0f} MB; {args.clients} clients for "
                 f"{args.duration:g} s")
        outcomes, wall_s, rss_peak = asyncio.run(load(server, model, args))
        rss_end, cpu_s = server.rss_mb(), server.cpu_s() - cpu_start
        record = summarize(name, round_no, outcomes, wall_s, rss_start, rss_end, rss_peak, ready_s, args)
        record.update({"server_cpu_s": cpu_s, "server_cpu_ms_per_token":
                       1000 * cpu_s / record["completion_tokens"] if record["completion_tokens"] else None})
        if name == EDGE:
            record.update(edge_view(server, before))
        record.update({"log_tracebacks": server.tracebacks(), "texts": first_texts(outcomes)})
        return record
    finally:
        server.stop()


async def warm_up(server: Server, args: argparse.Namespace) -> str:
    """The served model's id, after one request (first-inference allocations) that must succeed."""
    import httpx

    async with httpx.AsyncClient(timeout=args.request_timeout) as client:
        model = (await client.get(server.url + "/v1/models")).json()["data"][0]["id"]
        body = request_body(server.name, model, PROMPTS[0], args)
        warm = await asyncio.wait_for(one_request(client, server.url + "/v1/completions", body, 0),
                                      args.request_timeout)
    if not warm.ok:
        raise RuntimeError(f"{server.name}: the warm-up request failed ({warm.error}): {server.log_tail()}")
    return model


def edge_scrape(server: Server) -> Any:
    from mlflow_edge.serving.monitor import scrape

    return scrape(server.url)


def edge_view(server: Server, before: Any) -> dict[str, Any]:
    """What mlflow-edge itself says of the load: ``/health``'s ``pending`` (expect 0 once the clients are done) and
    the figures ``mlflow-edge monitor`` would log for the window (from ``/metrics``; histogram quantiles)."""
    import httpx

    from mlflow_edge.errors import first_line
    from mlflow_edge.serving.metrics import window_figures

    try:
        pending = httpx.get(server.url + "/health", timeout=10.0).json().get("pending")
        figures = window_figures(before, edge_scrape(server))
    except Exception as exc:  # a server that died under load: say so, keep the client-side figures
        return {"pending_after_load": None, "server_side": {"error": first_line(exc)}}
    return {"pending_after_load": pending,
            "server_side": {key.removeprefix("served."): value for key, value in figures.items()}}


def summarize(name: str, round_no: int, outcomes: list[Outcome], wall_s: float, rss_start: float, rss_end: float,
              rss_peak: float, ready_s: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if not outcome.ok:
            errors[str(outcome.error)] = errors.get(str(outcome.error), 0) + 1
    latencies = [o.latency_s * 1000 for o in ok]
    tokens = sum(o.tokens for o in ok)
    ttfts = [o.ttft_s * 1000 for o in ok if o.ttft_s is not None]
    return {
        "server": name, "round": round_no,
        "requests_ok": len(ok), "requests_failed": len(outcomes) - len(ok), "errors": errors,
        "latency_ms_p50": percentile(latencies, 0.5), "latency_ms_p95": percentile(latencies, 0.95),
        "latency_ms_max": max(latencies, default=None),
        "ttft_ms_p50": percentile(ttfts, 0.5) if args.stream else None,
        "ttft_ms_p95": percentile(ttfts, 0.95) if args.stream else None,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None, "completion_tokens": tokens,
        "tokens_per_request": tokens / len(ok) if ok else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None, "wall_s": wall_s,
        "rss_mb_start": rss_start, "rss_mb_end": rss_end, "rss_mb_peak": rss_peak,
        "rss_growth": (rss_end - rss_start) / rss_start, "ready_s": ready_s,
    }


def first_texts(outcomes: list[Outcome]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for outcome in outcomes:
        if outcome.ok:
            texts.setdefault(outcome.prompt, outcome.text)
    return texts


# -- verdict --------------------------------------------------------------------------------------------------------
def verdict(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    edge = [r for r in records if r["server"] == EDGE]
    native = {r["round"]: r for r in records if r["server"] == NATIVE}
    failed = sum(r["requests_failed"] for r in edge)
    growth = statistics.median(r["rss_growth"] for r in edge)
    ratios = [r["tokens_per_s"] / native[r["round"]]["tokens_per_s"] for r in edge
              if r["round"] in native and r["tokens_per_s"] and native[r["round"]]["tokens_per_s"]]
    ratio = statistics.median(ratios) if ratios else None
    meets = {"failed": failed <= GOALS["failed"], "rss_growth": growth <= GOALS["rss_growth"],
             "tokens_per_s_ratio": None if ratio is None else ratio >= GOALS["tokens_per_s_ratio"]}
    same_text = None
    if native:
        pairs = [(text, native[r["round"]]["texts"].get(prompt)) for r in edge if r["round"] in native
                 for prompt, text in r["texts"].items()]
        same_text = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return {
        "benchmark": "serve_load", f"failed_at_{args.clients}_clients": failed,
        "tokens_per_s_ratio": ratio, "rss_growth": growth, "rss_growth_max": max(r["rss_growth"] for r in edge),
        "latency_ms_p50_ratio": _median_ratio(edge, native, "latency_ms_p50"),
        "latency_ms_p95_ratio": _median_ratio(edge, native, "latency_ms_p95"),
        "same_text": same_text, "goals": GOALS, "meets": meets,
        "meets_goals": False if False in meets.values() else None if None in meets.values() else True,
        "rounds": args.rounds, "stream": args.stream,
        "note": "ratios are mlflow-edge / llama_cpp.server, medians over rounds; same_text: the share of prompts "
                "whose first answer was the same text on both servers",
    }


def _median_ratio(edge: list[dict[str, Any]], native: dict[int, dict[str, Any]], key: str) -> float | None:
    ratios = [r[key] / native[r["round"]][key] for r in edge
              if r["round"] in native and r[key] and native[r["round"]][key]]
    return statistics.median(ratios) if ratios else None


# -- driver ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per server")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--ctx", type=int, default=2048, help="context size of both servers")
    parser.add_argument("--stream", action="store_true", help="stream the answers (SSE) and measure TTFT")
    parser.add_argument("--rounds", type=int, default=1, help="runs of both servers, alternating which goes first")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a request has failed")
    parser.add_argument("--skip-native", action="store_true", help="only mlflow-edge (no tokens/s ratio)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1 or args.ctx < 64 or args.rounds < 1:
        parser.error("need at least one client, round and token, a positive duration and a context of 64 or more")
    if args.request_timeout <= 0:
        parser.error("--request-timeout must be positive")
    return args


def prepare_model(scratch: Path, ctx: int) -> Path:
    from mlflow_edge.flavors import gguf
    from mlflow_edge.sources import demo_gguf_path

    folder = scratch / "smollm2-135m-q4_1"
    gguf.save_model(demo_gguf_path(), folder, n_ctx=ctx,
                    metadata={"mlflow_edge": {"backend": "llamacpp", "format": "gguf", "precision": "Q4_1"}})
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup (the servers' groups die)
    import llama_cpp

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        scratch = Path(tmp)
        progress("saving the demo GGUF as a local MLflow model folder")
        folder = prepare_model(scratch, args.ctx)
        emit({"setup": {"model": "SmolLM2-135M Q4_1 (demo GGUF)", "folder": folder.name, "ctx": args.ctx,
                        "threads": llama_defaults(), "threads_source": "llama_cpp.Llama defaults (mlflow-edge), "
                        "passed to llama_cpp.server", "clients": args.clients, "duration_s": args.duration,
                        "max_tokens": args.max_tokens, "stream": args.stream, "rounds": args.rounds,
                        "request_timeout_s": args.request_timeout, "prompts": len(PROMPTS),
                        "llama_cpp_python": llama_cpp.__version__, "cpu_count": os.cpu_count(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # llama.cpp's OpenMP threads read it
                        "edge_command": " ".join(["mlflow-edge", *edge_command(folder, "PORT", args)[-10:]]),
                        "native_command": " ".join(native_command(folder / "model.gguf", "PORT", args)[2:])}})
        records = []
        for round_no in range(1, args.rounds + 1):
            order = [EDGE] if args.skip_native else [EDGE, NATIVE] if round_no % 2 else [NATIVE, EDGE]
            for name in order:
                port = free_port()
                cmd = (edge_command(folder, port, args) if name == EDGE
                       else native_command(folder / "model.gguf", port, args))
                record = measure(name, cmd, port, "/health" if name == EDGE else "/v1/models", args, scratch,
                                 round_no)
                emit({k: v for k, v in record.items() if k != "texts"})
                records.append(record)
    line = verdict(records, args)
    emit(line)
    return 1 if line["meets_goals"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
