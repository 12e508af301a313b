"""Helpers for the python-manilaclient compatibility suite (compat/test_manila_*.py).

They log in through drplane's Keystone v3 subset with keystoneauth1's password plugin,
build python-manilaclient clients from the catalog's `sharev2` endpoint, start an extra
`fs` agent (a third backend in its own site) and wait on replica states.
"""

import json
import os
import secrets
import subprocess
import time

import requests
from keystoneauth1 import session
from keystoneauth1.identity import v3
from manilaclient import client as manila_client


def login(url, user, password, project):
    auth = v3.Password(
        auth_url=url + "/v3",
        username=user,
        password=password,
        user_domain_name="Default",
        project_name=project,
        project_domain_name="Default",
    )
    return session.Session(auth=auth)


def manila(sess, version="2.95"):
    """A python-manilaclient v2 client found through the catalog (service type sharev2)."""
    return manila_client.Client(version, session=sess)


def demo_password():
    with open(os.path.join(os.environ["DRPLANE_DEV_DIR"], "credentials.json")) as f:
        return json.load(f)["demo_password"]


def wait_for(what, check, timeout=90.0, every=0.3):
    """Polls `check()` until it returns a truthy value; fails with `what` and the last value."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class ExtraAgent:
    """A third `fs` agent (host `host`, site `site`) started with `drplane agent --config`."""

    def __init__(self, url, token, admin_password, workdir, host, site, shares=(), wait=True):
        self.url, self.token = url, token
        self.host, self.site, self.workdir = host, site, workdir
        self.data = os.path.join(workdir, host)
        os.makedirs(self.data, exist_ok=True)
        r = requests.post(
            f"{url}/drplane/v1/sites",
            headers={"X-Auth-Token": token},
            json={"name": site, "description": "manila compat"},
            timeout=30,
        )
        assert r.status_code in (201, 409), r.text
        cluster = os.environ.get("DRPLANE_URLS", url).split(",")
        lines = [
            f"cluster = {json.dumps(cluster)}",
            f'host = "{host}"',
            f'site = "{site}"',
            'driver = "fs"',
            f"data = {json.dumps(self.data)}",
            'listen = "127.0.0.1:0"',
            "vcpus = 4",
            "ram_mb = 4096",
        ]
        for s in shares:
            lines += [
                "[[shares]]",
                f'id = "{s["id"]}"',
                f'project = "{s["project"]}"',
                f'name = "{s["name"]}"',
                f"size_bytes = {s['size_bytes']}",
            ]
        self.config = os.path.join(workdir, f"{host}.toml")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        env = dict(os.environ, DRPLANE_USER="admin", DRPLANE_PASSWORD=admin_password)
        self.log = open(os.path.join(workdir, f"{host}.log"), "wb")
        self.proc = subprocess.Popen(
            [os.environ["DRPLANE_BIN"], "agent", "--config", self.config],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

        if wait:
            self.wait_online()

    def state(self):
        r = requests.get(
            f"{self.url}/drplane/v1/hosts/{self.host}",
            headers={"X-Auth-Token": self.token},
            timeout=10,
        )
        return r.json().get("state") if r.status_code == 200 else None

    def wait_online(self):
        def online():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {self.host} exited; see {self.workdir}/{self.host}.log")
            return self.state() == "online"

        wait_for(f"host {self.host} online", online, timeout=60)

    def stop(self):
        """Stops the agent. The control plane marks its host offline only once the host has
        been silent for `host_offline_after_ms` (10 s in `drplane dev`): `wait_offline`
        waits for that, so that no later test finds an `online` host whose agent is gone."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def wait_offline(self):
        # None: never registered (the agent did not start).
        wait_for(f"host {self.host} offline", lambda: self.state() in ("offline", None), timeout=60)


def volume_dir(root, volume_id):
    """The data directory of an fs-driver volume named `volume_id` under an agent's data."""
    for dirpath, dirnames, _ in os.walk(root):
        if os.path.basename(dirpath) == volume_id and "data" in dirnames:
            return os.path.join(dirpath, "data")
    return None


def random_name(prefix):
    return f"{prefix}-{secrets.token_hex(4)}"
