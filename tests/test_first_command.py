"""The first command on a new machine: no ~/.ray, no token, no Ray running. The whole first run
from an empty HOME is CI's (``.ci/run`` runs ``./quickstart.sh --smoke`` as a new user); these
check its parts: telling "nothing listens" from "a cluster refuses us", and the token."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from retrieval_platform.cluster import ClusterConfig, cluster_address, connect, ensure_auth_token
from retrieval_platform.cluster import listening as is_listening
from retrieval_platform.errors import PlatformError
from tests.helpers import free_port

VENV_BIN = Path(sys.executable).parent


def _new_user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    return env | {"HOME": str(home), "RAY_AUTH_MODE": "token"}


def test_nothing_listening_is_told_apart_from_a_refusal():
    port = free_port()
    assert not is_listening(f"http://127.0.0.1:{port}")
    with pytest.raises(PlatformError, match="no Ray cluster answers"):
        cluster_address(ClusterConfig(address=f"http://127.0.0.1:{port}", start_local=False))
    with pytest.raises(PlatformError, match="no Ray cluster answers"):
        connect(f"http://127.0.0.1:{port}")


def test_a_server_that_is_not_ray_is_named_as_such():
    class NotRay(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"http://127.0.0.1:{server.server_port}"
        assert is_listening(address)
        with pytest.raises(PlatformError, match=r"something listens .* but no Ray job API"):
            connect(address, wait_s=0)
    finally:
        server.shutdown()


def test_ensure_auth_token_writes_one_for_a_new_user_and_keeps_it(tmp_path, monkeypatch):
    """``ray start`` in token mode refuses to start without a token; a new HOME has none."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    ensure_auth_token(str(VENV_BIN / "ray"))
    token = (tmp_path / ".ray" / "auth_token").read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    ensure_auth_token(str(VENV_BIN / "ray"))  # a second run keeps the first token
    assert (tmp_path / ".ray" / "auth_token").read_text() == token


def test_ensure_auth_token_leaves_a_disabled_mode_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ensure_auth_token(str(VENV_BIN / "ray"))
    assert not (tmp_path / ".ray").exists()


@pytest.mark.timeout(120)
def test_cli_from_a_new_home(ray_local, tmp_path):
    """From a HOME that has never run Ray: `status` with no cluster at the address says so in
    one line; against a cluster in token mode it says the cluster wants its token (and is not
    started again); `search` with no endpoint names the problem."""
    cli = str(VENV_BIN / "retrieval-platform")
    env = _new_user_env(tmp_path)
    nothing = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run([cli, "status", "--dashboard", nothing], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no Ray cluster answers" in out.stderr, out.stderr
    out = subprocess.run([cli, "search", "drill", "--url", nothing], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is the Serve application running" in out.stderr, out.stderr

    from ray._raylet import AuthenticationMode, get_authentication_mode  # the session's mode

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        pytest.skip("the test session's Ray runs without token authentication")
    webui = ray_local._private.worker.global_worker.node.address_info["webui_url"]
    out = subprocess.run([cli, "status", "--dashboard", f"http://{webui}"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "wants its auth token" in out.stderr, out.stderr
