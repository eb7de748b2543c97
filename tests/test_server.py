"""The HTTP/WebSocket server against a live uvicorn on 127.0.0.1, with real clients (httpx, websockets),
over the real batched engine (tiny preset, fp32, torch backend); tests/engine_double.py's scripted
engine stands in where the case needs audio chunks or exact timing of events."""
import concurrent.futures
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")
ws_client = pytest.importorskip("websockets.sync.client", reason="needs the serve extra")

from engine_double import ScriptedEngine  # noqa: E402

from vita_audio_runtime.cli import main  # noqa: E402
from vita_audio_runtime.config import PRESETS  # noqa: E402
from vita_audio_runtime.engine import AudioChunk, Engine, Token  # noqa: E402
from vita_audio_runtime.server import build_server  # noqa: E402
from vita_audio_runtime.tokenizer import TextTokenizer  # noqa: E402

ENGINE_FACTORY = Engine.from_pretrained
ENGINE_ARGS = dict(device="cpu", dtype="fp32", backend="torch")
TIMEOUT = 60.0


@contextlib.contextmanager
def live_server(engine, tokenizer, **kwargs):
    """uvicorn on a free loopback port in a thread; stopped (and joined) at the end."""
    server = build_server(engine, tokenizer, host="127.0.0.1", port=0, log_level="warning", **kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield "127.0.0.1:%d" % sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.from_pretrained("tiny")


@pytest.fixture(scope="module")
def reference():
    """The tiny preset alone, as Engine.from_pretrained builds it (the same weights as the server's)."""
    return Engine.from_pretrained("tiny", **ENGINE_ARGS)


@pytest.fixture(scope="module")
def server(tokenizer):
    engine = ENGINE_FACTORY("tiny", max_batch=4, max_queue=16, **ENGINE_ARGS)
    with live_server(engine, tokenizer) as (addr, srv):
        yield addr, engine
    engine.close()


def sse_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def run_http(addr, body):
    return httpx.post(f"http://{addr}/v1/generate", json=body, timeout=TIMEOUT).json()


def run_sse(addr, body):
    with httpx.stream("POST", f"http://{addr}/v1/generate", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    return _collect(events)


def run_ws(addr, body):
    events = []
    with ws_client.connect(f"ws://{addr}/v1/stream", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps(body))
        for message in ws:
            event = json.loads(message)
            events.append((event.pop("type"), event))
    return _collect(events)


def _collect(events):
    """The done event's fields plus the streamed text and audio, as the JSON response has them."""
    assert [name for name, _ in events].count("done") == 1 and events[-1][0] == "done", events
    out = dict(events[-1][1])
    out["text"] = "".join(data["text"] for name, data in events if name == "text")
    out["audio_chunks"] = [data["codes"] for name, data in events if name == "audio"]
    return out


# -- generation ---------------------------------------------------------------------------------
REQUESTS = [  # (transport, body): mixed modes, text and id prompts, greedy and seeded sampling
    ("http", dict(prompt="Hello there", mode="boost", max_new_tokens=30, ignore_eos=True)),
    ("sse", dict(prompt_ids=[5, 6, 7, 8], mode="turbo", max_new_tokens=40, ignore_eos=True)),
    ("ws", dict(prompt="How are you?", system="Be brief.", mode="vanilla", max_new_tokens=20, ignore_eos=True)),
    ("sse", dict(prompt="Numbers: one, two", mode="balance", max_new_tokens=36, ignore_eos=True)),
    ("http", dict(prompt_ids=[11, 3, 200, 7], mode=[1, 10], max_new_tokens=25, do_sample=True, temperature=0.9,
                  top_k=40, seed=3, ignore_eos=True)),
    ("ws", dict(prompt_ids=[1, 2, 3], mode="boost", max_new_tokens=33, do_sample=True, top_p=0.8, seed=11)),
    ("sse", dict(prompt="Say it again", audio=[1, 2, 3], mode="turbo", max_new_tokens=22, ignore_eos=True)),
    ("http", dict(prompt_ids=[40, 41], max_new_tokens=18, repetition_penalty=1.3, ignore_eos=True)),
    ("ws", dict(prompt="Good morning", mode="balance", max_new_tokens=28, do_sample=True, seed=5)),
]
RUN = {"http": run_http, "sse": run_sse, "ws": run_ws}


def test_concurrent_clients_each_get_the_tokens_of_their_request_alone(server, tokenizer, reference):
    addr, _ = server
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        futures = [pool.submit(RUN[transport], addr, body) for transport, body in REQUESTS]
        outputs = [f.result(timeout=TIMEOUT) for f in futures]
    for (transport, body), out in zip(REQUESTS, outputs):
        body = dict(body)
        if "prompt" in body:
            prompt = tokenizer.chat_prompt_ids(body.pop("prompt"), system=body.pop("system", None),
                                               audio_codes=body.pop("audio", None))
        else:
            prompt = body.pop("prompt_ids")
        alone = reference.generate(prompt, **body)
        assert out["tokens"] == alone.tokens, (transport, body)
        assert out["producers"] == alone.producer_names
        assert out["stop_reason"] == alone.stop_reason
        assert out["text"] == tokenizer.decode(alone.tokens)
        assert out["audio_chunks"] == [c.codes for c in alone.audio_chunks]
        assert out["timings"]["total_s"] > 0 and "audio_ttfp_s" in out["timings"]
    assert {p for out in outputs for p in out["producers"]} >= {"llm", "mtp0", "mtp9"}


def test_events_carry_text_deltas_audio_chunks_and_the_time_to_the_first_chunk(tokenizer):
    """A scripted engine: text split mid-character, a complete audio chunk, an incomplete one."""
    preset = PRESETS["tiny"]
    special = preset.special_tokens()
    text_ids = tokenizer.hf.encode("ok 🎵", add_special_tokens=False)
    events = ([Token(t, -1) for t in text_ids] + [AudioChunk([4, 5, 6], [0, 1, 2, 3, 4])]
              + [Token(text_ids[0], 5), AudioChunk([7], [6, 7], complete=False)])
    engine = ScriptedEngine(preset.config, special, events, delay_s=0.02)
    with live_server(engine, tokenizer) as (addr, _):
        for run in (run_sse, run_ws, run_http):
            out = run(addr, {"prompt_ids": [1, 2]})
            assert out["text"] == "ok 🎵o"
            assert out["audio_chunks"] == [[4, 5, 6], [7]]
            assert out["timings"]["audio_ttfp_s"] >= 0.02 * (len(text_ids) + 1)
        with httpx.stream("POST", f"http://{addr}/v1/generate", json={"prompt_ids": [1], "stream": True},
                          timeout=TIMEOUT) as r:
            events = sse_events(r)
        assert ("audio", {"codes": [7], "complete": False}) in events
        assert [n for n, d in events if n == "text" and "\ufffd" in d["text"]] == []
        done = events[-1][1]
        assert set(done) == {"tokens", "producers", "stop_reason", "timings"}
        assert done["tokens"][len(text_ids)] == special.begin_of_audio


@pytest.mark.parametrize("body,status,message", [
    (b'{"prompt_ids": [1, 2', 400, "not valid JSON"),
    (b'[1, 2]', 400, "must be a JSON object"),
    (json.dumps({"prompt_ids": [1], "max_tokens": 5}).encode(), 400, "unknown field 'max_tokens'"),
    (json.dumps({"prompt_ids": [1], "max_new_tokens": "5"}).encode(), 400, "'max_new_tokens' must be an integer"),
    (json.dumps({"prompt_ids": [1], "ignore_eos": 1}).encode(), 400, "'ignore_eos' must be a boolean"),
    (json.dumps({"prompt_ids": [1], "seed": True}).encode(), 400, "'seed' must be an integer"),
    (json.dumps({"prompt_ids": [1, 100000]}).encode(), 400, "'prompt_ids'[1] = 100000 is outside the vocabulary"),
    (json.dumps({"prompt_ids": [1, "a"]}).encode(), 400, "'prompt_ids'[1] = 'a' is not an integer"),
    (json.dumps({"prompt_ids": [1] * 100, "max_new_tokens": 100}).encode(), 400, "max_seq_len 192"),
    (json.dumps({"prompt": "hi", "prompt_ids": [1]}).encode(), 400, "exactly one of"),
    (json.dumps({"prompt": "hi", "mode": "warp"}).encode(), 400, "field 'mode': unknown mode 'warp'"),
    (json.dumps({"prompt": "hi", "top_p": 1.5}).encode(), 400, "'top_p' must be in (0, 1]"),
    (json.dumps({"prompt": "hi", "audio": [64]}).encode(), 400, "'audio'[0] = 64"),
    (json.dumps({"prompt": "hi", "seed": 2**64}).encode(), 400, "'seed' must be in [0, 2**63)"),
    (json.dumps({"prompt_ids": [1] * 400_000}).encode(), 413, "more than the limit of 1048576"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, body, status, message):
    addr, _ = server
    r = httpx.post(f"http://{addr}/v1/generate", content=body, headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status
    assert message in r.json()["error"]


def test_bad_websocket_request_gets_an_error_message_and_a_close(server):
    addr, _ = server
    with ws_client.connect(f"ws://{addr}/v1/stream", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"prompt_ids": [1], "colour": "red"}))
        event = json.loads(ws.recv(timeout=TIMEOUT))
        assert event["type"] == "error" and event["status"] == 400 and "'colour'" in event["message"]
        with pytest.raises(Exception):
            ws.recv(timeout=TIMEOUT)
        assert ws.close_code == 1008


def test_text_prompt_without_a_tokenizer_is_refused_by_name():
    preset = PRESETS["tiny"]
    engine = ScriptedEngine(preset.config, preset.special_tokens(), [])
    with live_server(engine, None, tokenizer_error="checkpoint /x has no tokenizer files") as (addr, _):
        r = httpx.post(f"http://{addr}/v1/generate", json={"prompt": "hi"}, timeout=TIMEOUT)
        assert r.status_code == 400 and "no tokenizer files" in r.json()["error"]
        ok = httpx.post(f"http://{addr}/v1/generate", json={"prompt_ids": [1]}, timeout=TIMEOUT).json()
        assert ok["text"] is None and ok["stop_reason"] == "length"


# -- capacity, disconnects, cancels, shutdown -----------------------------------------------------
def _first_event(stream_ctx):
    """Read up to the first event; the returned line iterator must stay referenced (closing it,
    as garbage collection does, closes the connection)."""
    lines = stream_ctx.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            return lines


def test_full_queue_gets_503_with_retry_after_and_a_disconnect_frees_the_slot(tokenizer):
    engine = ENGINE_FACTORY("tiny", max_batch=1, max_queue=1, max_seq_len=2048, **ENGINE_ARGS)
    # Long enough (seconds) to still run while the test checks the queue, unless it is cancelled.
    long = {"prompt_ids": [5, 6, 7], "mode": "vanilla", "max_new_tokens": 2000, "ignore_eos": True, "stream": True}
    try:
        with live_server(engine, tokenizer) as (addr, _), httpx.Client(timeout=TIMEOUT) as a, \
                httpx.Client(timeout=TIMEOUT) as b:
            with a.stream("POST", f"http://{addr}/v1/generate", json=long) as running:
                lines = _first_event(running)  # running: the one slot is taken (kept open while `lines` lives)
                with b.stream("POST", f"http://{addr}/v1/generate", json=long) as queued:
                    assert queued.status_code == 200  # waiting in the queue
                    full = httpx.post(f"http://{addr}/v1/generate", json=long, timeout=TIMEOUT)
                    assert full.status_code == 503 and full.headers["Retry-After"] == "1"
                    assert "queue is full" in full.json()["error"]
                    assert next(line for line in lines if line.startswith("data: "))  # still running
                # Both clients leave mid-stream (the with blocks close their connections).
            # Both requests are cancelled at the engine's next step boundary: slot and queue empty,
            # long before 2000 tokens (seconds) could have been made.
            deadline = time.monotonic() + 10
            while not engine.scheduler.idle and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.scheduler.idle, "the disconnected requests still hold the slot or the queue"
            # The slot and the queue are free again: a new request completes.
            short = {"prompt_ids": [9], "max_new_tokens": 12, "ignore_eos": True}
            r = httpx.post(f"http://{addr}/v1/generate", json=short, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            assert r.json()["stop_reason"] == "length" and len(r.json()["tokens"]) == 12
    finally:
        engine.close()


def test_websocket_cancel_and_disconnect_end_the_request(tokenizer):
    preset = PRESETS["tiny"]
    engine = ScriptedEngine(preset.config, preset.special_tokens(), [Token(65, -1)] * 400, delay_s=0.01)
    with live_server(engine, tokenizer) as (addr, _):
        with ws_client.connect(f"ws://{addr}/v1/stream", open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"prompt_ids": [1]}))
            assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "text"
            ws.send(json.dumps({"type": "cancel"}))
            events = [json.loads(m) for m in ws]
        assert events[-1]["type"] == "done" and events[-1]["stop_reason"] == "cancelled"
        assert len(events[-1]["tokens"]) < 400
        with ws_client.connect(f"ws://{addr}/v1/stream", open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"prompt_ids": [1]}))
            ws.recv(timeout=TIMEOUT)
        assert engine.requests[-1].cancelled.wait(TIMEOUT)  # the client left: the request is cancelled


def test_a_client_leaving_a_non_streaming_request_cancels_it(tokenizer):
    preset = PRESETS["tiny"]
    engine = ScriptedEngine(preset.config, preset.special_tokens(), [Token(65, -1)] * 400, delay_s=0.01)
    with live_server(engine, tokenizer) as (addr, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://{addr}/v1/generate", json={"prompt_ids": [1]}, timeout=0.3)
        assert engine.requests[-1].cancelled.wait(TIMEOUT)
        assert engine.requests[-1].result(TIMEOUT).stop_reason == "cancelled"


def test_shutdown_ends_in_flight_streams_with_a_final_event(tokenizer):
    preset = PRESETS["tiny"]
    engine = ScriptedEngine(preset.config, preset.special_tokens(), [Token(65, -1)] * 400, delay_s=0.01)
    with live_server(engine, tokenizer) as (addr, srv):
        with httpx.stream("POST", f"http://{addr}/v1/generate", json={"prompt_ids": [1], "stream": True},
                          timeout=TIMEOUT) as r, ws_client.connect(f"ws://{addr}/v1/stream") as ws:
            ws.send(json.dumps({"prompt_ids": [1]}))
            ws.recv(timeout=TIMEOUT)
            lines = _first_event(r)
            srv.request_stop()
            rest = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
            ws_events = [json.loads(m) for m in ws]
        for done in (rest[-1], ws_events[-1]):
            assert done["stop_reason"] == "shutdown" and "shutting down" in done["message"]
            assert len(done["tokens"]) < 400
        assert srv.should_exit  # and live_server's join checks that it stopped


def test_health_and_model_info(server):
    addr, engine = server
    assert httpx.get(f"http://{addr}/health", timeout=TIMEOUT).json()["status"] == "ok"
    info = httpx.get(f"http://{addr}/v1/model", timeout=TIMEOUT).json()
    special = PRESETS["tiny"].special_tokens()
    assert info["config"]["vocab_size"] == PRESETS["tiny"].config.vocab_size
    assert info["modes"]["boost"] == [1, 10, 4, 10]
    assert info["special"] == {"eos_ids": list(special.eos_ids), "begin_of_audio": special.begin_of_audio,
                               "end_of_audio": special.end_of_audio, "audio_offset": special.audio_offset}
    assert info["max_batch"] == engine.max_batch == 4 and info["max_seq_len"] == 192 and info["text_prompts"]


def test_runtime_and_kernels_import_without_the_serve_extra():
    code = ("import sys\n"
            "for name in ('uvicorn', 'starlette', 'httpx', 'websockets'): sys.modules[name] = None\n"
            "import vita_kernels, vita_audio_runtime.engine, vita_audio_runtime.cli, vita_audio_runtime.tokenizer\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", "tiny"]) == 2
    assert 'pip install -e ".[serve]"' in capsys.readouterr().err


def test_server_benchmark_runs_on_tiny(tmp_path):
    from benchmarks import bench_server

    assert bench_server.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5 and bench_server.percentile([], 0.5) is None
    rc = bench_server.main(["--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--backend", "torch", "--concurrency", "1", "2",
                            "--requests-per-client", "1", "--new-tokens", "12", "--prompt-len", "4", "--max-batch", "2",
                            "--time-budget-s", "60", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    assert [level["completed"] for level in result["levels"]] == [1, 2]
    assert result["levels"][1]["tokens_per_s"] > 0 and "| clients |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        bench_server.main(["--url", "http://example.com:8000"])
