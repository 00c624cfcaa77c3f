"""``mlflow-edge serve`` as a real process on loopback, driven with the ``openai`` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlflow
import openai
import pytest
from mlflow import MlflowClient

from mlflow_edge import workflow
from mlflow_edge.serving.metrics import parse_scrape, window_figures
from tests.serving.conftest import Store

pytestmark = pytest.mark.slow

NAME = "tiny-edge"
ALIAS = "cpu-champion"
CHAMPION = f"models:/{NAME}@{ALIAS}"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny_gguf(tiny_source):
    return workflow.convert(tiny_source, "llamacpp", "f16")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_gguf) -> Store:
    """A store whose ``tiny-edge@cpu-champion`` is the tiny Llama as an f16 GGUF (version 1)."""
    store = Store(tmp_path_factory.mktemp("serve-store"))
    store.register(tiny_gguf, NAME, ALIAS, n_ctx=256)
    return store


@pytest.fixture(scope="module")
def server(store: Store, tmp_path_factory: pytest.TempPathFactory):
    from tests.serving.conftest import EdgeServer

    started = EdgeServer(store, CHAMPION, tmp_path_factory.mktemp("serve-log") / "serve.log", "--max-tokens", "64",
                          "--poll-interval", "600")  # other tests move the alias: this one stays on version 1
    yield started.wait_ready()
    started.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=60)


def _local_predict(store: Store, params: dict) -> str:
    version = store.client().get_model_version_by_alias(NAME, ALIAS)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store.uri)
    try:
        return mlflow.pyfunc.load_model(version.source).predict([PROMPT], params=params)[0]
    finally:
        mlflow.set_tracking_uri(previous)


def test_openai_client_lists_completes_chats_and_streams(server, store: Store) -> None:
    client = _client(server)
    assert [model.id for model in client.models.list()] == [NAME]

    completion = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    text = completion.choices[0].text
    assert text == _local_predict(store, {"max_tokens": 12})  # the same contract as the pyfunc
    assert completion.usage.completion_tokens == 12 and completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12

    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # token by token, not one piece
    assert chunks[-1].usage.completion_tokens == 12

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                          seed=3, temperature=0.7)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    again = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                           seed=3, temperature=0.7, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in again if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content  # same seed, same sample, streamed or not


def test_stop_strings_end_the_text_and_are_not_returned(server) -> None:
    client = _client(server)
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16).choices[0].text
    stop = full.strip()[len(full.strip()) // 2:][:3]
    if not stop.strip():
        pytest.skip("the tiny model generated whitespace only")
    for stream in (False, True):
        answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, stop=stop, stream=stream)
        text = "".join(c.choices[0].text for c in answer) if stream else answer.choices[0].text
        assert text == full[: full.index(stop)], (stream, full, stop)


@pytest.mark.parametrize(("body", "status", "reason"), [
    (None, 400, "malformed JSON"),
    ({"model": "nope", "prompt": PROMPT}, 404, "model 'nope' is not served here"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens must be from 1"),
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 10**9}, 400, "max_tokens must be at most 64"),
    ({"model": NAME, "prompt": PROMPT, "bogus": 1}, 400, "unknown param 'bogus'"),
    ({"model": NAME, "prompt": PROMPT, "top_p": 1.5}, 400, "top_p must be a finite number in (0, 1]"),
    ({"model": NAME, "prompt": PROMPT, "n": 2}, 400, "param 'n' is not supported"),
    ({"model": NAME, "prompt": PROMPT, "temperature": "hot"}, 400, "invalid param 'temperature'"),
    ({"model": NAME, "prompt": "word " * 400}, 400, "longer than this server's limit of 255 tokens"),
    ({"model": NAME, "messages": []}, 400, "invalid param 'messages'"),
    ({"model": NAME}, 400, "missing param 'prompt'"),
])
def test_bad_requests_get_one_line_errors_and_the_model_keeps_serving(server, body, status, reason) -> None:
    route = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    response = server.post(route, body, raw=b"{not json" if body is None else None)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert reason in message and "\n" not in message
    ok = server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_client_gone_mid_stream_cancels_its_generation(server) -> None:
    before = parse_scrape(server.metrics())
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 64, "stream": True, "stop": ["@@@never@@@"]}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # one token seen: hang up
    deadline = time.monotonic() + 30
    while (inflight := parse_scrape(server.metrics())[("mlflow_edge_inflight_requests", ())]) > 0:
        assert time.monotonic() < deadline, "the abandoned stream is still in flight"
        time.sleep(0.2)
    generated = (parse_scrape(server.metrics())[("mlflow_edge_generated_tokens_total", ())]
                 - before[("mlflow_edge_generated_tokens_total", ())])
    assert generated < 64  # stopped early: nobody was reading
    ok = server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 3})
    assert ok.status_code == 200 and inflight == 0


def test_metrics_count_what_was_sent(server) -> None:
    before = parse_scrape(server.metrics())
    for _ in range(3):
        assert server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 5}).status_code == 200
    assert server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "bogus": 1}).status_code == 400
    after = parse_scrape(server.metrics())

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("mlflow_edge_requests_total", route="/v1/completions", status="200") == 3
    assert delta("mlflow_edge_requests_total", route="/v1/completions", status="400") == 1
    assert delta("mlflow_edge_generated_tokens_total") == 15
    assert delta("mlflow_edge_ttft_seconds_count") == 3
    assert delta("mlflow_edge_request_seconds_count", route="/v1/completions") == 4
    info = [labels for (name, labels) in after if name == "mlflow_edge_model_info"]
    assert dict(info[0]) == {"name": NAME, "alias": ALIAS, "version": "1", "backend": "llamacpp",
                             "precision": "F16", "format": "gguf"}
    figures = window_figures(before, after)
    assert figures["served.requests"] == 4 and figures["served.error_rate"] == 0
    assert figures["served.decode_tok_s"] > 0 and 0 < figures["served.latency_ms_p50"] <= figures[
        "served.latency_ms_p95"]


def test_a_full_queue_answers_429_and_the_rest_succeed(store: Store, edge_server) -> None:
    server = edge_server(store, CHAMPION, "--max-queue", "1")
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 64, "stop": ["@@@never@@@"]}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: server.post("/v1/completions", body).status_code, range(6)))
    assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
    refused = server.post("/v1/completions", body)
    assert refused.status_code == 200  # the queue drained: nothing was lost


def test_the_server_follows_the_alias_across_backends_without_failing_a_request(
        store: Store, tiny_source, edge_server) -> None:
    server = edge_server(store, CHAMPION, "--poll-interval", "600")  # moves are seen on SIGHUP here
    ir_version = store.register(workflow.convert(tiny_source, "openvino", "f16"), NAME, max_context=256)
    failures: list[str] = []
    backends: list[str] = []
    done = threading.Event()

    def keep_streaming() -> None:
        client = _client(server)
        while not done.is_set():
            try:
                chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, stream=True))
                if not any(c.choices and c.choices[0].finish_reason for c in chunks):
                    failures.append("a stream ended without a finish reason")
                backends.append(server.health()["backend"])
            except Exception as exc:  # every failure counts
                failures.append(repr(exc))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(keep_streaming) for _ in range(3)]
        time.sleep(1.0)
        store.client().set_registered_model_alias(NAME, ALIAS, ir_version)
        server.hangup()
        health = server.wait_for_version(ir_version)
        time.sleep(1.0)
        done.set()
        for stream in streams:
            stream.result(timeout=120)
    assert not failures, failures
    assert health["backend"] == "openvino" and health["last_reload_error"] is None
    assert backends[0] == "llamacpp" and backends[-1] == "openvino"
    assert "serving tiny-edge version" in server.log_tail()
    store.client().set_registered_model_alias(NAME, ALIAS, "1")  # leave the champion as the other tests expect


def test_an_alias_on_missing_files_or_nowhere_keeps_the_served_model(store: Store, tiny_gguf, edge_server) -> None:
    server = edge_server(store, CHAMPION, "--poll-interval", "1")  # SIGHUP, then polling, see the moves
    broken = store.register(tiny_gguf, NAME, n_ctx=256)
    source = store.client().get_model_version(NAME, broken).source
    shutil.rmtree(_local_model_dir(store, source))  # a version whose files are gone
    client = store.client()
    client.set_registered_model_alias(NAME, ALIAS, broken)
    server.hangup()
    deadline = time.monotonic() + 60
    while not (health := server.health())["last_reload_error"]:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.3)
    assert health["version"] == "1" and "\n" not in health["last_reload_error"]
    assert server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 2}).status_code == 200

    client.delete_registered_model_alias(NAME, ALIAS)  # the alias points nowhere
    deadline = time.monotonic() + 60
    while "points nowhere" not in (server.health()["last_reload_error"] or ""):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.3)
    assert server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert 'outcome="failed"' in server.metrics()
    client.set_registered_model_alias(NAME, ALIAS, "1")


def _local_model_dir(store: Store, source: str) -> Path:
    """The folder on disk that holds the model files of a version's ``source`` (a ``models:/m-…`` URI)."""
    model_id = source.removeprefix("models:/")
    location = MlflowClient(tracking_uri=store.uri).get_logged_model(model_id).artifact_location
    return Path(location.removeprefix("file://"))


def test_serve_refuses_what_it_cannot_serve_in_one_line(store: Store, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": store.uri}
    cases = [(f"models:/{NAME}@nowhere", "alias tiny-edge@nowhere points nowhere"),
             (str(tmp_path), "is neither a model URI")]
    for uri, reason in cases:
        proc = subprocess.run([sys.executable, "-m", "mlflow_edge.cli", "serve", uri, "--port", "1"],
                              capture_output=True, text=True, timeout=120, env={**store.env(), **env})
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("mlflow-edge: error: ")
        assert reason in proc.stderr and "Traceback" not in proc.stderr


def test_monitor_logs_served_figures_and_tags_a_breach(server, store: Store) -> None:
    client = store.client()
    client.set_model_version_tag(NAME, "1", "mlflow_edge.gates", "latency_ms_p95<=0.001")  # nobody meets this
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 4})

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "mlflow_edge.cli", "monitor", "--url", server.base,
                               "--interval", "1.5", "--windows", "2"], capture_output=True, text=True, timeout=120,
                              cwd=store.root, env=store.env())
    finally:
        stop.set()
        worker.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "breaches its gates: latency_ms_p95<=0.001" in proc.stdout
    run_id = proc.stdout.strip().splitlines()[-1].split()[-1]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow_edge.role"] == "monitor" and run.data.tags["mlflow_edge.served.version"] == "1"
    assert {"served.latency_ms_p50", "served.latency_ms_p95", "served.ttft_ms_p50", "served.decode_tok_s",
            "served.error_rate"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run_id, "served.decode_tok_s")) == 2
    assert "latency_ms_p95" in client.get_model_version(NAME, "1").tags["mlflow_edge.monitor.breach"]
