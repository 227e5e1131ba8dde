"""`make lab` starts a JupyterLab server on localhost, with token auth, and stops cleanly."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from companion.paths import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.lab_server
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_answers_on_localhost_with_a_token_then_stops(tmp_path):
    port, token = _free_port(), "lab-test-token"
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    proc = subprocess.Popen(["make", "-s", "lab", f"PORT={port}"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while _get_or_none(f"{base}/api/status?token={token}") != 200:
            assert proc.poll() is None, f"make lab exited early:\n{proc.stdout.read()}"
            assert time.time() < deadline, "JupyterLab did not answer within 120 s"
            time.sleep(0.5)
        assert _get(f"{base}/api/status") in (401, 403), "the API must refuse requests without the token"
        assert _get(f"{base}/lab?token={token}") == 200
        assert _get(f"{base}/api/contents/coupled-adam.ipynb?token={token}") == 200, "serves notebooks/"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("JupyterLab did not stop within 30 s of SIGTERM")
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _get_or_none(url):
    try:
        return _get(url)
    except (urllib.error.URLError, ConnectionError, OSError):
        return None
