"""A pytest fixture giving (base URL, admin password) of a drplane cluster.

With DRPLANE_URL and DRPLANE_ADMIN_PASSWORD set (scripts/compat.sh does), that cluster is
used. Otherwise a one-node cluster is started from DRPLANE_BIN (default
$CARGO_TARGET_DIR/debug/drplane, or ~/.cache/drplane-target/debug/drplane), initialized,
and stopped after the session.
"""

import os
import secrets
import socket
import subprocess
import tempfile
import time

import pytest
import requests


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary():
    if os.environ.get("DRPLANE_BIN"):
        return os.environ["DRPLANE_BIN"]
    target = os.environ.get(
        "CARGO_TARGET_DIR", os.path.expanduser("~/.cache/drplane-target")
    )
    return os.path.join(target, "debug", "drplane")


@pytest.fixture(scope="session")
def cluster():
    url = os.environ.get("DRPLANE_URL")
    if url:
        yield url.rstrip("/"), os.environ["DRPLANE_ADMIN_PASSWORD"]
        return
    password = secrets.token_hex(12)
    http, raft = _free_port(), _free_port()
    with tempfile.TemporaryDirectory(prefix="drplane-compat-") as d:
        env = dict(os.environ, DRPLANE_ADMIN_PASSWORD=password)
        log = open(os.path.join(d, "node.log"), "wb")
        proc = subprocess.Popen(
            [
                _binary(), "server", "--id", "1", "--site", "compat",
                "--http", f"127.0.0.1:{http}", "--raft", f"127.0.0.1:{raft}",
                "--data", os.path.join(d, "data"),
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{http}"
        try:
            deadline = time.time() + 30
            while True:
                try:
                    if requests.get(f"{url}/livez", timeout=1).ok:
                        break
                except requests.RequestException:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"drplane did not start; see {d}/node.log")
                time.sleep(0.1)
            r = requests.post(f"{url}/drplane/v1/cluster/init", timeout=30)
            r.raise_for_status()
            yield url, password
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
