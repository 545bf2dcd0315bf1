"""SearchClient against real HTTP servers on loopback that answer as a failing deployment does:
the proxy's 500 for a replica that died mid-request, a 503 with Retry-After, a dropped
connection, a port nobody listens on (a lost node's proxy), and a 4xx that must not be retried.
The Serve path (an ingress replica killed under load) is in test_serving.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from retrieval_platform.serving.client import RetryPolicy, SearchClient, SearchError
from tests.helpers import free_port

FAST = RetryPolicy(attempts=4, backoff_s=0.01, max_backoff_s=0.05)
ANSWER = {"results": [{"product_id": "p1"}], "mode": "dense"}


class ScriptedServer:
    """Answers each POST with the next of ``script`` (a status, or "drop": close the
    connection without an answer), then 200 with ANSWER; records what it was sent."""

    def __init__(self, script: list[int | str]) -> None:
        self.script = list(script)
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body | {"_key": self.headers.get("X-API-Key")})
                step = server.script.pop(0) if server.script else 200
                if step == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                payload = json.dumps(ANSWER if step == 200 else {"detail": f"scripted {step}"})
                self.send_response(int(step))
                if step == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator:
    servers: list[ScriptedServer] = []

    def make(script: list[int | str]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.mark.parametrize("failures", [[500], [503, 502], ["drop"], [500, "drop", 504]])
def test_a_lost_replica_is_retried_until_answered(scripted, failures):
    server = scripted(failures)
    with SearchClient(server.url, api_key="k1", retry=FAST) as client:
        answer = client.search("drill", k=3, mode="hybrid", rerank=True)
    assert answer == ANSWER
    assert client.retried == len(failures)
    # every try sent the same request, with the key
    assert server.bodies == [{"query": "drill", "k": 3, "mode": "hybrid", "rerank": True,
                              "_key": "k1"}] * (len(failures) + 1)


def test_a_dead_proxy_fails_over_to_the_next_url(scripted):
    live = scripted([])
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens: a lost node's proxy
    for _ in range(5):  # whichever URL a client starts on
        with SearchClient([dead, live.url], retry=FAST) as client:
            assert client.search("drill") == ANSWER
            assert client.search("drill") == ANSWER  # the next one starts where it answered
            assert client.retried <= 1


@pytest.mark.parametrize("status", [400, 401, 413, 422])
def test_a_4xx_is_the_callers_mistake_and_is_not_retried(scripted, status):
    server = scripted([status])
    with SearchClient(server.url, retry=FAST) as client, pytest.raises(SearchError) as err:
        client.search("drill")
    assert err.value.status == status and f"HTTP {status}" in str(err.value)
    assert f"scripted {status}" in str(err.value)  # the service's message, passed on
    assert len(server.bodies) == 1 and client.retried == 0


def test_it_gives_up_after_its_attempts_and_says_what_failed_last(scripted):
    server = scripted([503] * 10)
    with SearchClient(server.url, retry=FAST) as client, pytest.raises(SearchError) as err:
        client.search("drill")
    assert len(server.bodies) == FAST.attempts and client.retried == FAST.attempts - 1
    assert "no answer after 4 tries" in str(err.value) and "HTTP 503" in str(err.value)


def test_the_backoff_is_jittered_capped_and_honours_retry_after():
    policy = RetryPolicy(attempts=5, backoff_s=0.1, max_backoff_s=0.3)
    pauses = [policy.pause_s(a, None) for a in (1, 2, 3, 4) for _ in range(200)]
    assert min(pauses) >= 0 and max(pauses) <= 0.3
    assert max(policy.pause_s(1, None) for _ in range(200)) <= 0.1
    assert policy.pause_s(1, "0.25") >= 0.25  # the service's Retry-After, within the cap
    assert policy.pause_s(1, "30") <= 0.3
    assert policy.pause_s(1, "Wed, 21 Oct 2015 07:28:00 GMT") <= 0.1
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        SearchClient([])
