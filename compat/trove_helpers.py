"""Helpers of the Trove compatibility suites (test_trove_*.py): python-troveclient logged
in through drplane's Keystone v3 subset, polling, the native API for what Trove does not
show, and an extra `fs` agent (host-3 in site-3) for a replication set of three hosts.

Needs the cluster of scripts/compat.sh (`drplane dev`: DRPLANE_URL, DRPLANE_DEV_DIR with
credentials.json, DRPLANE_BIN); the suites skip without it.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import requests
from keystoneauth1 import session
from keystoneauth1.identity import v3
from troveclient import client as trove_client

STEADY = ("ACTIVE", "HEALTHY")


def dev_env():
    url = os.environ.get("DRPLANE_URL")
    dev = os.environ.get("DRPLANE_DEV_DIR")
    if not url or not dev:
        pytest.skip("needs the drplane dev cluster of scripts/compat.sh")
    with open(os.path.join(dev, "credentials.json")) as f:
        creds = json.load(f)
    return url.rstrip("/"), dev, creds


def keystone_session(url, user, password, project):
    auth = v3.Password(
        auth_url=url + "/v3",
        username=user,
        password=password,
        user_domain_name="Default",
        project_name=project,
        project_domain_name="Default",
    )
    return session.Session(auth=auth)


def trove(sess, endpoint=None):
    """A python-troveclient v1.0 client; the endpoint comes from the catalog ('database')."""
    if endpoint:
        return trove_client.Client("1.0", session=sess, endpoint_override=endpoint)
    return trove_client.Client("1.0", session=sess)


def wait_for(what, check, timeout=180, interval=0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def state(tc, iid):
    i = tc.instances.get(iid)
    return i.status, getattr(i, "operating_status", None)


def wait_steady(tc, iid, timeout=240):
    return wait_for(
        f"instance {iid} to be ACTIVE/HEALTHY",
        lambda: state(tc, iid) == STEADY and tc.instances.get(iid),
        timeout,
    )


def wait_status(tc, iid, status, timeout=240):
    return wait_for(
        f"instance {iid} to be {status}",
        lambda: tc.instances.get(iid).status == status and tc.instances.get(iid),
        timeout,
    )


def wait_gone(tc, iid, timeout=240):
    from troveclient.apiclient import exceptions as exc

    def gone():
        try:
            tc.instances.get(iid)
            return False
        except exc.NotFound:
            return True

    wait_for(f"instance {iid} to be deleted", gone, timeout)


class Native:
    """The native API as admin (hosts, pairs, jobs, sites)."""

    def __init__(self, url, admin_password):
        self.url = url
        sess = keystone_session(url, "admin", admin_password, "admin")
        self.token = sess.get_token()

    def call(self, method, path, **kw):
        r = requests.request(
            method, self.url + path, headers={"X-Auth-Token": self.token}, timeout=30, **kw
        )
        return r

    def host(self, name):
        r = self.call("GET", f"/drplane/v1/hosts/{name}")
        return r.json() if r.status_code == 200 else None

    def pair(self, pid):
        r = self.call("GET", f"/drplane/v1/pairs/{pid}")
        assert r.status_code == 200, r.text
        return r.json()["pair"]

    def job(self, jid):
        r = self.call("GET", f"/drplane/v1/jobs/{jid}")
        assert r.status_code == 200, r.text
        return r.json()


def volume_file(data_dirs, volume_id):
    """The image file of a volume under any agent's data directory."""
    for d in data_dirs:
        pattern = os.path.join(d, "**", "pools", "*", volume_id, "data")
        for p in glob.glob(pattern, recursive=True):
            return p
    raise AssertionError(f"volume {volume_id} not found under {data_dirs}")


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_at(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExtraAgent:
    """`drplane agent` for one more host (own site), started and stopped by the test."""

    def __init__(self, native, urls, admin_password, host, site):
        self.native = native
        self.host = host
        self.site = site
        self.dir = tempfile.mkdtemp(prefix=f"drplane-{host}-")
        self.data = os.path.join(self.dir, "data")
        self.config = os.path.join(self.dir, "agent.toml")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.proc = None
        r = native.call("POST", "/drplane/v1/sites", json={"name": site})
        assert r.status_code in (201, 409), r.text
        with open(self.config, "w") as f:
            f.write("vcpus = 16\nram_mb = 32768\n")
        self.urls = urls
        self.admin_password = admin_password

    def start(self):
        env = dict(os.environ)
        env.pop("DRPLANE_TOKEN", None)
        env.update(
            {
                "DRPLANE_USER": "admin",
                "DRPLANE_PASSWORD": self.admin_password,
                "DRPLANE_PROJECT": "admin",
                "NO_COLOR": "1",
            }
        )
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                os.environ["DRPLANE_BIN"], "agent", "--config", self.config,
                "--cluster", ",".join(self.urls), "--host", self.host, "--site", self.site,
                "--driver", "fs", "--data", self.data,
                "--listen", f"127.0.0.1:{_free_port()}",
            ],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(
            f"host {self.host} online",
            lambda: (self.native.host(self.host) or {}).get("state") == "online",
            timeout=60,
        )

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self):
        self.kill()
        if getattr(self, "log", None):
            self.log.close()
