"""The world of the cross-family identity suite (compat/test_identity_matrix.py).

`make_world` builds, on the cluster scripts/compat.sh starts, everything the suite needs
and nothing another suite sees:

- two projects of its own, A (`<tag>a`) and B (`<tag>b`);
- in A a `reader`, a `member` and an `admin` user (admin on any project is a cloud
  administrator, as in Keystone's default policy), in B a `member`; each with a password,
  a Huawei AK/SK pair and a Danube ES-API-KEY;
- two `fs` agents of its own (`<tag>-h1` in site `<tag>-s1`, `<tag>-h2` in `<tag>-s2`, sites
  no other suite uses) declaring A's Danube VM, ECS server, Manila share and Trove database
  instance and B's Danube VM, all on `<tag>-h1`;
- through the vendors' clients as A's member: an SDRS protection group and a Danube replica
  of A's VM on `<tag>-h2`; as admin, the share's replication type (`dr`), so the share has
  its active replica.

`World.close` deletes the pairs first (no periodic sync may outlive the agents), the group
and the share's replication type, stops the agents, then deletes the inventory and the
hosts (if a host cannot be deleted it is marked offline at once), so no later suite places
work on them or sees them.
"""

import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field

import requests
from esdc_api import Client as DanubeClient
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint
from keystoneauth1.identity import v3
from manilaclient import client as manila_client
from troveclient import client as trove_client

# huawei_env points HOME at a temporary folder before importing the Huawei SDK.
from huawei_env import BasicCredentials, EcsClient, SdrsClient, sm  # noqa: F401
from danube_env import Native, admin_token
from drplane_cluster import _binary

MIB = 1 << 20
MANILA_VERSION = "2.95"


def wait_for(what, check, timeout=60.0, every=0.2):
    """Polls `check()` until it returns a truthy value; fails naming `what`."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
        except (requests.RequestException, AssertionError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@dataclass
class Cred:
    """One user's credentials for every family."""

    name: str
    password: str
    project: str  # project id the credentials are scoped to
    project_name: str
    ak: str = ""
    sk: str = ""
    api_key: str = ""
    api_key_id: str = ""


@dataclass
class World:
    url: str
    admin: Native
    admin_password: str
    tag: str
    a: dict  # {"id", "name"}
    b: dict
    users: dict  # "reader" | "member" | "admin" (project A), "b" (member of B) -> Cred
    hosts: list  # [h1, h2]
    sites: list  # [s1, s2]
    vm: dict  # A's Danube VM {"id", "hostname"}
    b_vm: dict  # B's Danube VM
    ecs_server: str  # A's ECS server id
    share: str  # A's Manila share id
    db: str  # A's Trove instance (database) id
    root: str
    procs: list = field(default_factory=list)
    sessions: dict = field(default_factory=dict)
    group: str = ""  # A's SDRS protection group
    group_job: str = ""  # the job that created it
    repname: str = ""  # A's Danube replica of `vm`
    rep_task: str = ""  # the task that created it
    active_replica: str = ""  # A's share's active Manila replica
    expiring: str = ""  # a native token of A's member that expires one second after issue
    expiring_at: float = 0.0
    seen: set = field(default_factory=set)  # every secret the suite handled (log check)

    def all_secrets(self):
        out = set(self.seen) | {self.expiring}
        for c in self.users.values():
            out |= {c.password, c.sk, c.api_key}
        for sess in self.sessions.values():
            out.add(sess.get_token())
        return {x for x in out if x}

    # ---- Keystone (Trove, Manila) ----

    def session(self, who):
        """A keystoneauth1 password session of user `who`, scoped to its project (one
        login per user for the whole module: logins cost an argon2 verification)."""
        if who not in self.sessions:
            c = self.users[who]
            self.sessions[who] = password_session(self.url, c.name, c.password, c.project_name)
        return self.sessions[who]

    def token(self, who):
        t = self.session(who).get_token()
        self.seen.add(t)
        return t

    def trove_ep(self, project=None):
        return f"{self.url}/v1.0/{project or self.a['id']}"

    def manila_ep(self, project=None):
        return f"{self.url}/v2/{project or self.a['id']}"

    def trove(self, who, project=None):
        """python-troveclient through the catalog (`database`), or at another project's
        endpoint with `project`."""
        sess = self.session(who)
        if project:
            return trove_client.Client("1.0", session=sess, endpoint_override=self.trove_ep(project))
        return trove_client.Client("1.0", session=sess)

    def trove_with_token(self, token, project=None):
        """python-troveclient holding a pre-issued token (keystoneauth's Token plugin)."""
        ep = self.trove_ep(project)
        sess = ks_session.Session(auth=token_endpoint.Token(ep, token))
        return trove_client.Client("1.0", session=sess, endpoint_override=ep)

    def manila(self, who, project=None):
        sess = self.session(who)
        if project:
            return manila_client.Client(
                MANILA_VERSION, session=sess, service_catalog_url=self.manila_ep(project)
            )
        return manila_client.Client(MANILA_VERSION, session=sess)

    def manila_with_token(self, token, project=None):
        """python-manilaclient's own token path (`input_auth_token` + endpoint)."""
        return manila_client.Client(
            MANILA_VERSION, input_auth_token=token, service_catalog_url=self.manila_ep(project)
        )

    # ---- Huawei (SDRS, ECS) ----

    def sdrs(self, who=None, ak=None, sk=None, project=None):
        c = self.users.get(who) if who else None
        creds = BasicCredentials(ak or c.ak, sk or c.sk, project or (c.project if c else self.a["id"]))
        return SdrsClient.new_builder().with_credentials(creds).with_endpoint(self.url).build()

    def ecs(self, who=None, ak=None, sk=None, project=None):
        c = self.users.get(who) if who else None
        creds = BasicCredentials(ak or c.ak, sk or c.sk, project or (c.project if c else self.a["id"]))
        return EcsClient.new_builder().with_credentials(creds).with_endpoint(self.url).build()

    def hw_raw(self, who, method, path, body=None, project=None, x_project_id=None,
               sdk_date=None, sk=None, ak=None):
        """A request signed by the SDK's own signer, for what its models cannot send: a
        chosen `X-Sdk-Date`, an `X-Project-Id` other than the path's. Answers the raw
        `requests` response (to check the exact error body)."""
        from huaweicloudsdkcore.sdk_request import SdkRequest
        from huaweicloudsdkcore.signer.signer import Signer

        c = self.users[who]
        project = project or c.project
        data = b"" if body is None else json.dumps(body).encode()
        headers = {
            "Content-Type": "application/json;charset=UTF-8" if body is not None else "application/json",
            "X-Project-Id": x_project_id or project,
        }
        if sdk_date:
            headers["X-Sdk-Date"] = sdk_date
        host = self.url.split("://", 1)[1]
        req = SdkRequest(method=method, schema="http", host=host, resource_path=path,
                         query_params=[], header_params=headers, body=data)
        signed = Signer(BasicCredentials(ak or c.ak, sk or c.sk, project)).sign(req)
        return requests.request(method, self.url + path, headers=signed.header_params,
                                data=data, timeout=30)

    # ---- Danube ----

    @property
    def api(self):
        return self.url + "/api"

    def danube(self, who=None, api_key=None):
        key = api_key or self.users[who].api_key
        return DanubeClient(api_url=self.api, api_key=key)

    # ---- plain HTTP (exact bodies) ----

    def get(self, path, token=None, headers=None, **kw):
        return self.call("GET", path, token=token, headers=headers, **kw)

    def call(self, method, path, token=None, headers=None, **kw):
        h = dict(headers or {})
        if token is not None:
            h["X-Auth-Token"] = token
        return requests.request(method, self.url + path, headers=h, timeout=30, **kw)

    def native_token(self, who, expires_in_secs=None, project=None):
        """A token issued by the native identity API (`POST /drplane/v1/identity/tokens`)."""
        body = {"user": self.users[who].name, "project": project or self.users[who].project}
        if expires_in_secs is not None:
            body["expires_in_secs"] = expires_in_secs
        t = self.admin.call("POST", "/drplane/v1/identity/tokens", body)
        self.seen.add(t["token"])
        return t

    def wait_expired(self):
        """Waits until the `expiring` token's second has passed (by the local clock, plus
        a margin for a node's clock)."""
        left = self.expiring_at + 0.5 - time.time()
        if left > 0:
            time.sleep(left)
        return self.expiring

    def close(self):
        """Leaves nothing behind: the pairs (no periodic sync may outlive the agents), the
        group, the share's replication type, the agents, the inventory and the hosts (or,
        failing that, hosts marked offline at once, so no later suite places work on them)."""
        a = self.admin
        try:
            self._delete_replicas()
            if self.group:
                try:
                    self.sdrs("member").delete_protection_group(
                        sm.DeleteProtectionGroupRequest(server_group_id=self.group))
                except Exception:  # noqa: BLE001 (best effort at teardown)
                    pass
            a.call("PUT", f"/drplane/v1/manila/shares/{self.share}", {"replication_type": None},
                   ok=(200, 404, 409))
        finally:
            for p in self.procs:
                p.terminate()
            for p in self.procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            for kind, ids in (("databases", [self.db]), ("shares", [self.share]),
                              ("servers", [self.vm["id"], self.b_vm["id"], self.ecs_server])):
                for i in ids:
                    a.call("DELETE", f"/drplane/v1/{kind}/{i}", ok=(204, 404, 409))
            for h in self.hosts:
                if a.call("DELETE", f"/drplane/v1/hosts/{h}", ok=(204, 404, 409)) is None:
                    continue
                try:
                    host = a.get(f"/drplane/v1/hosts/{h}")
                    a.call("PUT", f"/drplane/v1/hosts/{h}", {
                        "site": host["site"],
                        "driver": host["driver"],
                        "agent_address": host["agent_address"],
                        "capacity": host["capacity"],
                        "state": "offline",
                    })
                except AssertionError:
                    pass

    def _delete_replicas(self):
        """Deletes the pairs this world made, so no periodic sync outlives its agents."""
        jobs = []
        c = self.danube("member")
        for vm in (self.vm["hostname"],):
            names = c.get(f"/vm/{vm}/replica", stream=False).content.result or []
            for rep in names:
                r = c.delete(f"/vm/{vm}/replica/{rep}", stream=False)
                if r.status_code == 201:
                    jobs.append(r.content.task_id)
        admin = self.manila("admin")
        for r in admin.share_replicas.list(share=self.share):
            if r.replica_state != "active":
                try:
                    admin.share_replicas.delete(r.id, force=True)
                except Exception:  # noqa: BLE001 (best effort at teardown)
                    pass

        def settled():
            for j in jobs:
                if self.admin.get(f"/drplane/v1/jobs/{j}")["status"] not in ("SUCCESS", "FAIL"):
                    return False
            left = [r for r in admin.share_replicas.list(share=self.share)
                    if r.replica_state != "active"]
            return not left

        try:
            wait_for("this world's replicas deleted", settled, timeout=30)
        except AssertionError:
            pass


def new_user(admin, name, project, role):
    """A user with `role` on `project` ({"id", "name"}), a password, an AK/SK pair and an
    ES-API-KEY (all scoped to that project)."""
    c = Cred(name=name, password=secrets.token_urlsafe(16), project=project["id"],
             project_name=project["name"])
    admin.call("POST", "/drplane/v1/identity/users",
               {"name": c.name, "password": c.password, "project": project["name"], "role": role})
    k = admin.call("POST", "/drplane/v1/identity/access-keys", {"user": c.name})
    c.ak, c.sk = k["access_key"], k["secret_key"]
    ak = admin.call("POST", "/drplane/v1/identity/api-keys", {"user": c.name})
    c.api_key, c.api_key_id = ak["key"], ak["id"]
    return c


def password_session(url, user, password, project_name):
    auth = v3.Password(
        auth_url=url + "/v3",
        username=user,
        password=password,
        user_domain_name="Default",
        project_name=project_name,
        project_domain_name="Default",
    )
    return ks_session.Session(auth=auth)


def _agent_toml(urls, host, site, data, servers=(), shares=(), databases=()):
    lines = [
        f"cluster = {json.dumps(urls)}",
        f'host = "{host}"',
        f'site = "{site}"',
        'driver = "fs"',
        f"data = {json.dumps(data)}",
        'listen = "127.0.0.1:0"',
        "vcpus = 4",
        "ram_mb = 4096",
    ]
    for s in servers:
        disks = ", ".join(f'{{ id = "{d}", size_bytes = {n} }}' for d, n in s["disks"])
        lines += ["", "[[servers]]", f'id = "{s["id"]}"', f'project = "{s["project"]}"',
                  f'name = "{s["name"]}"', 'status = "ACTIVE"', "vcpus = 1", "ram_mb = 256",
                  f"disks = [{disks}]"]
    for s in shares:
        lines += ["", "[[shares]]", f'id = "{s["id"]}"', f'project = "{s["project"]}"',
                  f'name = "{s["name"]}"', f"size_bytes = {s['size_bytes']}"]
    for d in databases:
        lines += ["", "[[databases]]", f'id = "{d["id"]}"', f'project = "{d["project"]}"',
                  f'name = "{d["name"]}"', "vcpus = 1", "ram_mb = 256",
                  'datastore = { type = "mysql", version = "8.0" }',
                  f'volume = {{ id = "{d["id"]}-data", size_bytes = {MIB} }}']
    return "\n".join(lines) + "\n"


def make_world(cluster, root):
    url, admin_password = cluster
    admin = Native(url, admin_token(url, admin_password))
    tag = "im" + secrets.token_hex(3)
    a, b = {"name": f"{tag}a"}, {"name": f"{tag}b"}
    for p in (a, b):
        r = admin.call("POST", "/drplane/v1/identity/projects", {"name": p["name"]})
        p["id"] = r.get("id") or r["project"]["id"]
    users = {}
    for key, project, role in (("reader", a, "reader"), ("member", a, "member"),
                               ("admin", a, "admin"), ("b", b, "member")):
        users[key] = new_user(admin, f"{tag}-{key}", project, role)

    # An already expiring token of A's member (native tokens API, 1 s): expired by the time
    # the tests run.
    t = admin.call("POST", "/drplane/v1/identity/tokens",
                   {"user": users["member"].name, "expires_in_secs": 1})
    expiring, expiring_at = t["token"], time.time() + 1.0

    sites = [f"{tag}-s1", f"{tag}-s2"]
    for s in sites:
        admin.call("POST", "/drplane/v1/sites", {"name": s}, ok=(200, 201, 409))
    hosts = [f"{tag}-h1", f"{tag}-h2"]
    vm = {"id": f"{tag}-vm", "hostname": f"{tag}-web"}
    b_vm = {"id": f"{tag}-bvm", "hostname": f"{tag}-bweb"}
    world = World(
        url=url, admin=admin, admin_password=admin_password, tag=tag, a=a, b=b, users=users,
        hosts=hosts, sites=sites, vm=vm, b_vm=b_vm, ecs_server=f"{tag}-ecs",
        share=f"{tag}-share", db=f"{tag}-db", root=os.path.join(root, tag),
        expiring=expiring, expiring_at=expiring_at,
    )
    os.makedirs(world.root, exist_ok=True)
    urls = (os.environ.get("DRPLANE_URLS") or url).split(",")
    h1 = dict(
        servers=[
            dict(id=vm["id"], name=vm["hostname"], project=a["id"], disks=[(f"{vm['id']}-root", MIB)]),
            dict(id=b_vm["id"], name=b_vm["hostname"], project=b["id"],
                 disks=[(f"{b_vm['id']}-root", MIB)]),
            dict(id=world.ecs_server, name=world.ecs_server, project=a["id"],
                 disks=[(f"{world.ecs_server}-root", MIB)]),
        ],
        shares=[dict(id=world.share, name="docs", project=a["id"], size_bytes=MIB)],
        databases=[dict(id=world.db, name="orders", project=a["id"])],
    )
    env = dict(os.environ, DRPLANE_USER="admin", DRPLANE_PASSWORD=admin_password)
    try:
        for i, host in enumerate(hosts):
            data = os.path.join(world.root, host)
            cfg = os.path.join(world.root, f"{host}.toml")
            with open(cfg, "w") as f:
                f.write(_agent_toml(urls, host, sites[i], data, **(h1 if i == 0 else {})))
            log = open(os.path.join(world.root, f"{host}.log"), "wb")
            world.procs.append(subprocess.Popen([_binary(), "agent", "--config", cfg], env=env,
                                                stdout=log, stderr=subprocess.STDOUT))
        # The SDRS group needs no agent: made while the agents start.
        world.group, world.group_job = create_group(world, "member", f"{tag}-g")
        for host in hosts:
            wait_for(f"host {host} online",
                     lambda h=host: admin.get(f"/drplane/v1/hosts/{h}")["state"] == "online", 60)
        wait_for("the inventory of host 1",
                 lambda: admin.call("GET", f"/drplane/v1/databases/{world.db}", ok=(200, 404)), 30)
        # The share's replication type (the admin's stand-in for a share type): its
        # active replica.
        r = admin.call("PUT", f"/drplane/v1/manila/shares/{world.share}", {"replication_type": "dr"})
        world.active_replica = r["replicas"][0]["id"]
        # A's Danube replica, made by A's member with esdc-api (ES-STREAM waits for it).
        world.repname = "r1"
        resp = world.danube("member").post(
            f"/vm/{vm['hostname']}/replica/{world.repname}", node=hosts[1], sleep_time=86400)
        content = resp.content
        assert resp.status_code == 200 and content.task_status == "SUCCESS", content
        world.rep_task = resp.task_id
    except BaseException:
        world.close()
        raise
    return world


def create_group(world, who, name):
    """SDRS-PG-CREATE through the SDK; answers (group id, job id) once the job succeeded."""
    c = world.sdrs(who)
    domains = c.list_active_active_domains(sm.ListActiveActiveDomainsRequest()).domains
    s1, s2 = world.sites
    domain = next(d.id for d in domains
                  if {d.local_replication_cluster.availability_zone,
                      d.remote_replication_cluster.availability_zone} == {s1, s2})
    body = sm.CreateProtectionGroupRequestBody(server_group=sm.CreateProtectionGroupRequestParams(
        name=name, source_availability_zone=s1, target_availability_zone=s2,
        domain_id=domain, source_vpc_id="vpc-1", dr_type="migration"))
    job_id = c.create_protection_group(sm.CreateProtectionGroupRequest(body=body)).job_id
    job = wait_for(f"job {job_id}", lambda: (
        lambda j: j if j.status in ("SUCCESS", "FAIL") else None
    )(c.show_job_status(sm.ShowJobStatusRequest(job_id=job_id))), 30)
    assert job.status == "SUCCESS", job
    return job.entities.server_group_id, job_id
