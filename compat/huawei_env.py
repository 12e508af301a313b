"""Fixtures of the Huawei SDRS/ECS compatibility suite (test_huawei_*.py).

`make_world` builds an isolated Huawei world on the cluster the `cluster` fixture names
(scripts/compat.sh starts `drplane dev`): a project of its own with a `member` user and
its AK/SK, a `reader` user's AK/SK, and `fs` agents of its own started with
`$DRPLANE_BIN agent --config …` (sites site-1 and site-2), so other families' tests are not
disturbed. The real Huawei SDK (BasicCredentials + with_endpoint) drives every call.
"""

import glob
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import requests

from drplane_cluster import _binary  # noqa: F401
from danube_env import Native, admin_token, _agent_toml

MIB = 1 << 20

# The SDK stores an application id under $HOME at import: keep it out of the real home.
os.environ["HOME"] = tempfile.mkdtemp(prefix="drplane-hw-home-")

from huaweicloudsdkcore.auth.credentials import BasicCredentials  # noqa: E402
from huaweicloudsdksdrs.v1 import SdrsClient  # noqa: E402
from huaweicloudsdkecs.v2 import EcsClient  # noqa: E402
from huaweicloudsdksdrs.v1 import model as sm  # noqa: E402,F401
from huaweicloudsdkecs.v2 import model as em  # noqa: E402,F401


def wait_for(pred, timeout=60, what="a condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 (a transient error while polling)
            last = e
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


@dataclass
class HwWorld:
    url: str
    admin: Native
    admin_password: str
    tag: str
    project: str
    ak: str
    sk: str
    reader_ak: str
    reader_sk: str
    root: str
    hosts: dict = field(default_factory=dict)  # host -> (site, data dir)
    procs: dict = field(default_factory=dict)  # host -> Popen

    def sdrs(self, ak=None, sk=None, project=None):
        creds = BasicCredentials(ak or self.ak, sk or self.sk, project or self.project)
        return SdrsClient.new_builder().with_credentials(creds).with_endpoint(self.url).build()

    def ecs(self, ak=None, sk=None, project=None):
        creds = BasicCredentials(ak or self.ak, sk or self.sk, project or self.project)
        return EcsClient.new_builder().with_credentials(creds).with_endpoint(self.url).build()

    def start_agent(self, host, site, servers, vcpus=8, ram_mb=16384):
        data = os.path.join(self.root, host)
        self.hosts[host] = (site, data)
        cfg = os.path.join(self.root, f"{host}.toml")
        urls = (os.environ.get("DRPLANE_URLS") or self.url).split(",")
        toml = _agent_toml(urls, host, site, data, servers)
        toml = toml.replace("vcpus = 8\nram_mb = 16384", f"vcpus = {vcpus}\nram_mb = {ram_mb}", 1)
        with open(cfg, "w") as f:
            f.write(toml)
        env = dict(os.environ, DRPLANE_USER="admin", DRPLANE_PASSWORD=self.admin_password)
        log = open(os.path.join(self.root, f"{host}.log"), "ab")
        self.procs[host] = subprocess.Popen(
            [_binary(), "agent", "--config", cfg], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        return data

    def wait_online(self, host, timeout=120):
        wait_for(lambda: self.admin.get(f"/drplane/v1/hosts/{host}")["state"] == "online",
                 timeout, f"host {host} online")

    def kill_agent(self, host):
        p = self.procs.pop(host)
        p.kill()
        p.wait(timeout=10)

    def stop_all(self):
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        # The control plane marks a host offline once it has been silent for
        # `host_offline_after_ms` (10 s in `drplane dev`). Until then the stopped hosts look
        # online (and these are big ones): wait, so that no later test (of any family) has
        # its work placed on a host whose agent is gone.
        for host in self.hosts:
            wait_for(lambda h=host: self.admin.get(f"/drplane/v1/hosts/{h}")["state"] == "offline",
                     60, f"host {host} offline")

    def server(self, sid):
        return self.admin.get(f"/drplane/v1/servers/{sid}")

    def volume_file(self, host, volume_id):
        """The image file of a volume on one of this world's agents."""
        data = self.hosts[host][1]
        found = glob.glob(os.path.join(data, "**", volume_id, "data"), recursive=True)
        assert found, f"no image of volume {volume_id} under {data}"
        return found[0]

    def job(self, job_id, timeout=180):
        """Polls SDRS-JOB-SHOW through the SDK until the job ends; returns the response."""
        c = self.sdrs()

        def done():
            r = c.show_job_status(sm.ShowJobStatusRequest(job_id=job_id))
            return r if r.status in ("SUCCESS", "FAIL") else None

        return wait_for(done, timeout, f"job {job_id} to end")


def make_world(cluster, prefix):
    url, admin_password = cluster
    admin = Native(url, admin_token(url, admin_password))
    tag = prefix + secrets.token_hex(3)
    project = admin.call("POST", "/drplane/v1/identity/projects", {"name": tag})
    project_id = project.get("id") or project["project"]["id"]
    for name, role in ((f"{tag}-op", "member"), (f"{tag}-ro", "reader")):
        admin.call(
            "POST", "/drplane/v1/identity/users",
            {"name": name, "password": secrets.token_urlsafe(16), "project": tag, "role": role},
        )
    k = admin.call("POST", "/drplane/v1/identity/access-keys", {"user": f"{tag}-op"})
    r = admin.call("POST", "/drplane/v1/identity/access-keys", {"user": f"{tag}-ro"})
    for site in ("site-1", "site-2"):
        admin.call("POST", "/drplane/v1/sites", {"name": site}, ok=(200, 201, 409))
    base = os.environ.get("DRPLANE_DEV_DIR") or tempfile.mkdtemp(prefix="drplane-hw-")
    root = os.path.join(base, tag)
    os.makedirs(root, exist_ok=True)
    return HwWorld(
        url=url, admin=admin, admin_password=admin_password, tag=tag, project=project_id,
        ak=k["access_key"], sk=k["secret_key"], reader_ak=r["access_key"],
        reader_sk=r["secret_key"], root=root,
    )


def server_spec(world, name, disks, status="ACTIVE", vcpus=1, ram_mb=256):
    return dict(
        id=f"{world.tag}-{name}", name=f"{world.tag}-{name}", project=world.project,
        vcpus=vcpus, ram_mb=ram_mb, status=status,
        disks=[(f"{world.tag}-{name}-{d}", n) for d, n in disks],
    )


def domain_for(world, a="site-1", b="site-2"):
    c = world.sdrs()
    for d in c.list_active_active_domains(sm.ListActiveActiveDomainsRequest()).domains:
        zones = {d.local_replication_cluster.availability_zone,
                 d.remote_replication_cluster.availability_zone}
        if zones == {a, b}:
            return d.id
    raise AssertionError(f"no domain joins {a} and {b}")


def create_group(world, name, source="site-1", target="site-2"):
    c = world.sdrs()
    body = sm.CreateProtectionGroupRequestBody(server_group=sm.CreateProtectionGroupRequestParams(
        name=name, source_availability_zone=source, target_availability_zone=target,
        domain_id=domain_for(world, source, target), source_vpc_id="vpc-1", dr_type="migration",
    ))
    job = world.job(c.create_protection_group(sm.CreateProtectionGroupRequest(body=body)).job_id)
    assert job.status == "SUCCESS", job
    return job.entities.server_group_id


def create_instance(world, group_id, server_id, name, wait=True, **extra):
    """SDRS-PI-CREATE; the DR server goes on `world.dr_host` when set (tenancy dedicated),
    so a host another test left behind is never picked."""
    c = world.sdrs()
    if getattr(world, "dr_host", None) and "tenancy" not in extra:
        extra.update(tenancy="dedicated", dedicated_host_id=world.dr_host)
    body = sm.CreateProtectedInstanceRequestBody(protected_instance=sm.CreateProtectedInstanceRequestParams(
        server_group_id=group_id, server_id=server_id, name=name, **extra,
    ))
    job_id = c.create_protected_instance(sm.CreateProtectedInstanceRequest(body=body)).job_id
    if not wait:
        return job_id
    job = world.job(job_id)
    assert job.status == "SUCCESS", job
    return job.entities.protected_instance_id


def group_action(world, group_id, action, station=None):
    c = world.sdrs()
    if action == "start":
        return c.start_protection_group(sm.StartProtectionGroupRequest(
            server_group_id=group_id,
            body=sm.StartProtectionGroupRequestBody(start_server_group={}))).job_id
    if action == "stop":
        return c.stop_protection_group(sm.StopProtectionGroupRequest(
            server_group_id=group_id,
            body=sm.StopProtectionGroupRequestBody(stop_server_group={}))).job_id
    if action == "failover":
        return c.start_failover_protection_group(sm.StartFailoverProtectionGroupRequest(
            server_group_id=group_id,
            body=sm.FailoverProtectionGroupRequestBody(failover_server_group={}))).job_id
    return c.start_reverse_protection_group(sm.StartReverseProtectionGroupRequest(
        server_group_id=group_id,
        body=sm.ReverseProtectionGroupRequestBody(
            reverse_server_group=sm.ReverseProtectionGroupRequestParams(priority_station=station)))).job_id


def stop_servers(world, ids):
    e = world.ecs()
    body = em.BatchStopServersRequestBody(os_stop=em.BatchStopServersOption(
        servers=[em.ServerId(id=i) for i in ids], type="SOFT"))
    job_id = e.batch_stop_servers(em.BatchStopServersRequest(body=body)).job_id
    job = e.show_job(em.ShowJobRequest(job_id=job_id))
    wait_for(lambda: e.show_job(em.ShowJobRequest(job_id=job_id)).status == "SUCCESS", 60,
             "servers stopped")
    return job


def raw(world, method, path, body=None, ak=None, sk=None, query=None):
    """A signed request through the SDK's own signer, for bodies the models cannot express."""
    from huaweicloudsdkcore.signer.signer import Signer
    from huaweicloudsdkcore.sdk_request import SdkRequest
    import json as _json

    host = world.url.split("://", 1)[1]
    data = b"" if body is None else (body if isinstance(body, (bytes, str)) else _json.dumps(body))
    if isinstance(data, str):
        data = data.encode()
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Project-Id": world.project}
    req = SdkRequest(method=method, schema="http", host=host, resource_path=path,
                     query_params=sorted((query or {}).items()),
                     header_params=headers, body=data)
    signed = Signer(BasicCredentials(ak or world.ak, sk or world.sk, world.project)).sign(req)
    return requests.request(method, world.url + path, headers=signed.header_params, data=data,
                            params=query, timeout=60)
