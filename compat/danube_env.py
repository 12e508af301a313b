"""Fixtures of the Danube compatibility suite (test_danube_*.py).

`danube` (session scope) gives an isolated Danube world on the cluster the `cluster` fixture
names (scripts/compat.sh starts `drplane dev`): a project of its own with a `member` user
(password and ES-API-KEY) and a `reader` user, and two `fs` agents of its own
(`dn<id>-1` in site-1 holding the VMs below, `dn<id>-2` in site-2), started with
`$DRPLANE_BIN agent --config …`, so other families' tests on the demo inventory are not
disturbed. The agents are stopped at the end of the session.
"""

import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest
import requests

from drplane_cluster import _binary, cluster  # noqa: F401  (the fixture)

MIB = 1 << 20


def admin_token(url, password):
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": "admin", "domain": {"name": "Default"}, "password": password}
                },
            },
            "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}},
        }
    }
    r = requests.post(f"{url}/v3/auth/tokens", json=body, timeout=30)
    r.raise_for_status()
    return r.headers["X-Subject-Token"]


class Native:
    """The native API as admin."""

    def __init__(self, url, token):
        self.url = url
        self.h = {"X-Auth-Token": token}

    def call(self, method, path, body=None, ok=(200, 201, 204)):
        r = requests.request(method, self.url + path, json=body, headers=self.h, timeout=60)
        if r.status_code not in ok:
            raise AssertionError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json() if r.content else None

    def get(self, path):
        return self.call("GET", path)


@dataclass
class Vm:
    id: str
    hostname: str
    disks: list  # [(disk id, size)]


@dataclass
class DanubeWorld:
    url: str
    admin: Native
    project: str
    user: str
    password: str
    api_key: str
    reader_key: str
    nodes: list  # [host name]
    data_dirs: dict  # host name -> agent data dir
    vms: dict = field(default_factory=dict)  # name -> Vm
    procs: list = field(default_factory=list)

    @property
    def api(self):
        return self.url + "/api"

    def disk_file(self, host, volume_id, pool="default"):
        return os.path.join(self.data_dirs[host], "volumes", "pools", pool, volume_id, "data")

    def host(self, name):
        return self.admin.get(f"/drplane/v1/hosts/{name}")

    def job(self, job_id):
        return self.admin.get(f"/drplane/v1/jobs/{job_id}")


def _wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except (requests.RequestException, AssertionError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _agent_toml(cluster_urls, host, site, data, servers):
    lines = [
        "cluster = [" + ", ".join(f'"{u}"' for u in cluster_urls) + "]",
        f'host = "{host}"',
        f'site = "{site}"',
        'driver = "fs"',
        f'data = "{data}"',
        'listen = "127.0.0.1:0"',
        "vcpus = 8",
        "ram_mb = 16384",
    ]
    for s in servers:
        disks = ", ".join(f'{{ id = "{d}", size_bytes = {n} }}' for d, n in s["disks"])
        lines += [
            "",
            "[[servers]]",
            f'id = "{s["id"]}"',
            f'project = "{s["project"]}"',
            f'name = "{s["name"]}"',
            f'status = "{s.get("status", "ACTIVE")}"',
            f"vcpus = {s['vcpus']}",
            f"ram_mb = {s['ram_mb']}",
            f"disks = [{disks}]",
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def danube(cluster):  # noqa: F811
    url, admin_password = cluster
    admin = Native(url, admin_token(url, admin_password))
    tag = "dn" + secrets.token_hex(3)
    project = admin.call("POST", "/drplane/v1/identity/projects", {"name": tag})
    project_id = project.get("id") or project["project"]["id"]
    password = secrets.token_urlsafe(16)
    admin.call(
        "POST",
        "/drplane/v1/identity/users",
        {"name": f"{tag}-op", "password": password, "project": tag, "role": "member"},
    )
    admin.call(
        "POST",
        "/drplane/v1/identity/users",
        {"name": f"{tag}-ro", "password": secrets.token_urlsafe(16), "project": tag, "role": "reader"},
    )
    api_key = admin.call("POST", "/drplane/v1/identity/api-keys", {"user": f"{tag}-op"})["key"]
    reader_key = admin.call("POST", "/drplane/v1/identity/api-keys", {"user": f"{tag}-ro"})["key"]
    for site in ("site-1", "site-2"):
        admin.call("POST", "/drplane/v1/sites", {"name": site}, ok=(200, 201, 409))

    base = os.environ.get("DRPLANE_DEV_DIR") or tempfile.mkdtemp(prefix="drplane-danube-")
    root = os.path.join(base, tag)
    os.makedirs(root, exist_ok=True)
    urls = (os.environ.get("DRPLANE_URLS") or url).split(",")
    vms = {
        "web": dict(id=f"{tag}-web", name=f"{tag}-web", vcpus=2, ram_mb=2048,
                    disks=[(f"{tag}-web-root", 4 * MIB), (f"{tag}-web-data", 2 * MIB)]),
        "db": dict(id=f"{tag}-db", name=f"{tag}-db", vcpus=2, ram_mb=2048,
                   disks=[(f"{tag}-db-root", 2 * MIB)]),
        "app": dict(id=f"{tag}-app", name=f"{tag}-app", vcpus=1, ram_mb=1024, status="SHUTOFF",
                    disks=[(f"{tag}-app-root", 2 * MIB)]),
    }
    for v in vms.values():
        v["project"] = project_id
    nodes = [f"{tag}-1", f"{tag}-2"]
    placement = {nodes[0]: [vms["web"], vms["db"], vms["app"]], nodes[1]: []}
    world = DanubeWorld(
        url=url, admin=admin, project=project_id, user=f"{tag}-op", password=password,
        api_key=api_key, reader_key=reader_key, nodes=nodes, data_dirs={},
        vms={k: Vm(v["id"], v["name"], v["disks"]) for k, v in vms.items()},
    )
    env = dict(os.environ, DRPLANE_USER="admin", DRPLANE_PASSWORD=admin_password)
    for i, host in enumerate(nodes):
        data = os.path.join(root, host)
        world.data_dirs[host] = data
        cfg = os.path.join(root, f"{host}.toml")
        with open(cfg, "w") as f:
            f.write(_agent_toml(urls, host, f"site-{i + 1}", data, placement[host]))
        log = open(os.path.join(root, f"{host}.log"), "wb")
        world.procs.append(
            subprocess.Popen([_binary(), "agent", "--config", cfg], env=env,
                             stdout=log, stderr=subprocess.STDOUT)
        )
    try:
        for host in nodes:
            _wait(lambda h=host: world.host(h)["state"] == "online", 120, f"host {host} online")
        _wait(lambda: admin.get(f"/drplane/v1/servers/{vms['web']['id']}") is not None, 60,
              "the VMs registered")
        yield world
    finally:
        for p in world.procs:
            p.terminate()
        for p in world.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_for(pred, timeout=60, what="a condition"):
    _wait(pred, timeout, what)
