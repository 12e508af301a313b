"""Danube Cloud's own client library `esdc-api` (what the `es` tool uses) against drplane:
every DANUBE-* endpoint of ../shared/spec/danube.md, with and without ES-STREAM, and the
error paths, on VMs of agents this suite starts (see danube_env.py).
"""

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from esdc_api import Client
from esdc_api.exceptions import ClientError, TaskRevoked

from danube_env import danube, wait_for  # noqa: F401  (fixtures)
from drplane_cluster import cluster  # noqa: F401


def waited(r):
    """An ES-STREAM answer's status is the status line of its body: read it first."""
    r.raw_content
    return r


def client(world, key=None):
    return Client(api_url=world.api, api_key=key or world.api_key)


def poll(c, task_id, timeout=120):
    """DANUBE-TASK-STATUS until the task leaves PENDING/STARTED (no ES-STREAM)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = c.get(f"/task/{task_id}/status", stream=False)
        if r.status_code != 201:
            return r
        assert r.content.task_status in ("PENDING", "STARTED")
        time.sleep(0.3)
    raise AssertionError(f"task {task_id} still pending after {timeout} s")


# ---- DANUBE-AUTH-LOGIN / DANUBE-AUTH-LOGOUT ----

def test_login_token_and_logout(danube):
    c = Client(api_url=danube.api)
    r = c.login(danube.user, danube.password)
    assert r.ok and r.status_code == 200
    assert len(r.content.result["token"]) == 40
    assert c.is_authenticated()
    # The token works on a VM call (DANUBE-REP-LIST).
    assert c.get(f"/vm/{danube.vms['db'].hostname}/replica").content.result == []
    assert c.logout().ok
    assert not c.is_authenticated()
    bad = Client(api_url=danube.api).login(danube.user, "wrong")
    assert bad.status_code == 400
    assert bad.version and bad.version != "???"
    with pytest.raises(ClientError) as e:
        Client(api_url=danube.api).get(f"/vm/{danube.vms['db'].hostname}/replica").content
    assert e.value.status_code in (401, 403)
    assert "credentials" in str(e.value.detail)


# ---- DANUBE-REP-LIST, DANUBE-REP-SHOW, DANUBE-VM-STATUS ----

def test_list_show_and_vm_status_by_hostname_and_uuid(danube):
    c = client(danube)
    vm = danube.vms["db"]
    for key in (vm.hostname, vm.id):
        r = c.get(f"/vm/{key}/replica")
        assert r.status_code == 200 and r.content.result == []
        assert r.content.task_status == "SUCCESS"
        assert r.version and r.dc == "main"
        assert c.get(f"/vm/{key}/replica", full=True).content.result == []
    st = c.get(f"/vm/{vm.hostname}/status").content.result
    assert st["hostname"] == vm.hostname and st["uuid"] == vm.id
    assert st["status"] == "running" and st["node_status"] == "online"
    app = c.get(f"/vm/{danube.vms['app'].hostname}/status").content.result
    assert app["status"] == "stopped"
    with pytest.raises(ClientError) as e:
        c.get("/vm/no-such-vm/replica").content
    assert e.value.status_code == 404 and e.value.detail == "VM not found"
    with pytest.raises(ClientError) as e:
        c.get(f"/vm/{vm.hostname}/replica/nope").content
    assert e.value.status_code == 404 and e.value.detail == "Slave VM not found"
    with pytest.raises(ClientError) as e:
        c.get("/vm/no-such-vm/status").content
    assert e.value.status_code == 404


def test_another_projects_vm_is_missing(danube):
    # The cluster's demo VMs belong to another project: not found, as a missing one.
    with pytest.raises(ClientError) as e:
        client(danube).get("/vm/dev-web-1/replica").content
    assert e.value.status_code == 404 and e.value.detail == "VM not found"


# ---- DANUBE-REP-CREATE refusals ----

def test_create_validation_errors(danube):
    c = client(danube)
    vm = danube.vms["db"]
    cases = [
        ({}, "node", "This field is required."),
        ({"node": danube.nodes[1], "sleep_time": 86401}, "sleep_time", None),
        ({"node": danube.nodes[1], "sleep_time": "x"}, "sleep_time", "A valid integer is required."),
        ({"node": danube.nodes[1], "bwlimit": -1}, "bwlimit", None),
        ({"node": danube.nodes[1], "enabled": "maybe"}, "enabled", "Must be a valid boolean."),
        ({"node": "no-such-node"}, "node", None),
        ({"node": danube.nodes[0]}, "node", None),  # the master's own node
        ({"node": danube.nodes[1], "root_zpool": "nopool"}, "root_zpool", None),
        ({"node": danube.nodes[1], "disk_zpools": {"7": "default"}}, "disk_zpools", None),
    ]
    for body, field, msg in cases:
        with pytest.raises(ClientError) as e:
            c.post(f"/vm/{vm.hostname}/replica/r1", **body).content
        assert e.value.status_code == 400, body
        assert e.value.task_status == "FAILURE", body
        assert field in e.value.detail, (body, e.value.detail)
        if msg:
            assert e.value.detail[field] == [msg]
    with pytest.raises(ClientError) as e:
        c.post(f"/vm/{vm.hostname}/replica/-bad", node=danube.nodes[1]).content
    assert e.value.status_code == 400 and "repname" in e.value.detail
    # A reader may look but not change (DANUBE admin-only operations).
    ro = client(danube, danube.reader_key)
    assert ro.get(f"/vm/{vm.hostname}/replica").ok
    with pytest.raises(ClientError) as e:
        ro.post(f"/vm/{vm.hostname}/replica/r1", node=danube.nodes[1]).content
    assert e.value.status_code == 403
    assert e.value.detail == "You do not have permission to perform this action."
    assert c.get(f"/vm/{vm.hostname}/replica").content.result == []


# ---- the whole protocol on VM "db": create (ES-STREAM), update (205 / task), failover
# ---- and reinit without ES-STREAM, task API, delete ----

def test_replica_lifecycle_and_task_api(danube):
    c = client(danube)
    vm = danube.vms["db"]
    path = f"/vm/{vm.hostname}/replica/rep1"

    # DANUBE-REP-CREATE with ES-STREAM (the library's default): one streamed answer.
    r = waited(c.post(path, node=danube.nodes[1], sleep_time=30, reserve_resources=True))
    assert r.stream is not None, "ES-STREAM answers are streamed"
    assert r.status_code == 200, r.raw_content
    res = r.content.result
    assert r.content.task_status == "SUCCESS"
    assert res["message"] == "Server replica was successfully initialized"
    assert res["repname"] == "rep1" and res["node"] == danube.nodes[1]
    assert res["last_sync"] and res["reinit_required"] is False
    create_task = r.content.task_id
    assert create_task and create_task.startswith("1e1d1-")

    # DANUBE-REP-CREATE again: 406.
    with pytest.raises(ClientError) as e:
        c.post(path, node=danube.nodes[1]).content
    assert e.value.status_code == 406 and e.value.detail == "Slave VM already exists"
    # The limit of one replica per master.
    with pytest.raises(ClientError) as e:
        c.post(f"/vm/{vm.hostname}/replica/rep2", node=danube.nodes[1]).content
    assert e.value.status_code == 400
    assert e.value.detail == {"non_field_errors": ["Maximum number of server replicas reached."]}

    # DANUBE-REP-SHOW and -LIST.
    shown = c.get(path).content.result
    for k in ("hostname", "repname", "node", "root_zpool", "disk_zpools", "reserve_resources",
              "sleep_time", "enabled", "bwlimit", "last_sync", "reinit_required",
              "node_status", "created"):
        assert k in shown, k
    assert shown["enabled"] is True and shown["sleep_time"] == 30
    assert shown["node_status"] == "online" and shown["hostname"] == vm.hostname
    assert c.get(f"/vm/{vm.hostname}/replica").content.result == ["rep1"]
    full = c.get(f"/vm/{vm.hostname}/replica", full=True).content.result
    assert [x["repname"] for x in full] == ["rep1"]

    # The task API on the finished creation.
    st = c.get(f"/task/{create_task}/status", stream=False)
    assert st.status_code == 200 and st.content.task_status == "SUCCESS"
    done = c.get(f"/task/{create_task}/done").content.result
    assert done == {"task_id": create_task, "done": True}
    with pytest.raises(ClientError) as e:
        c.get(f"/task/{create_task}").content  # DANUBE-TASK-DETAIL: pending only
    assert e.value.status_code == 404
    with pytest.raises(ClientError) as e:
        c.put(f"/task/{create_task}/cancel").content  # finished: not cancellable
    assert e.value.status_code == 406 and e.value.detail == "Task cannot be canceled"
    with pytest.raises(ClientError) as e:
        c.get("/task/1e1d1-00000000-0000-0000-0000/status").content
    assert e.value.status_code == 404 and e.value.detail == "Task does not exist (anymore)"
    assert isinstance(c.get("/task").content.result, list)

    # DANUBE-REP-UPDATE: reserve_resources alone is synchronous (205).
    r = c.put(path, reserve_resources=False)
    assert r.status_code == 205 and r.content.result["reserve_resources"] is False
    host2 = danube.host(danube.nodes[1])
    assert not [x for x in host2["reservations"] if x["holder"].startswith("danube:")]
    r = c.put(path, reserve_resources=True)
    assert r.status_code == 205
    # Other parameters: a task; without ES-STREAM 201 PENDING, then the status.
    r = c.put(path, stream=False, sleep_time=5, bwlimit=10_000_000)
    assert r.status_code == 201 and r.content.task_status == "PENDING"
    assert r.content.result is None
    final = poll(c, r.content.task_id)
    assert final.status_code == 200
    assert final.content.result["message"] == "Server replication service was successfully updated"
    shown = c.get(path).content.result
    assert shown["sleep_time"] == 5 and shown["bwlimit"] == 10_000_000

    # DANUBE-REP-REINIT before a failover: 428.
    with pytest.raises(ClientError) as e:
        c.put(path + "/reinit").content
    assert e.value.status_code == 428 and e.value.detail == "Reinitialization is not required"

    # DANUBE-REP-FAILOVER without ES-STREAM; VM status while it runs, then the result.
    r = c.put(path + "/failover", stream=False, force=False)
    assert r.status_code == 201
    fo_task = r.content.task_id
    pending = c.get("/task").content.result
    st = c.get(f"/vm/{vm.hostname}/status").content.result
    if fo_task in pending:
        assert fo_task in st["tasks"] or st["status"] in ("running", "running-")
    final = poll(c, fo_task)
    assert final.status_code == 200, final.raw_content
    res = final.content.result
    assert res["message"] == "Server replica was successfully promoted to master"
    assert res["reinit_required"] is True and res["node"] == danube.nodes[0]
    st = c.get(f"/vm/{vm.hostname}/status").content.result
    assert st["status"] == "running" and st["node"] == danube.nodes[1]
    shown = c.get(path).content.result
    assert shown["reinit_required"] is True and shown["enabled"] is False
    assert shown["node"] == danube.nodes[0]
    # Failover or update again: 428 until reinit.
    with pytest.raises(ClientError) as e:
        c.put(path + "/failover").content
    assert e.value.status_code == 428 and e.value.detail == "Reinitialization is required"
    with pytest.raises(ClientError) as e:
        c.put(path, sleep_time=10).content
    assert e.value.status_code == 428

    # DANUBE-REP-REINIT with ES-STREAM.
    r = waited(c.put(path + "/reinit"))
    assert r.status_code == 200, r.raw_content
    assert r.content.result["message"] == "Server replica was successfully reinitialized"
    shown = c.get(path).content.result
    assert shown["reinit_required"] is False and shown["enabled"] is True

    # DANUBE-REP-DELETE with ES-STREAM.
    r = waited(c.delete(path))
    assert r.status_code == 200, r.raw_content
    res = r.content.result
    assert res["message"] == "Server replica was successfully destroyed"
    assert res["enabled"] is None and res["last_sync"] is None
    with pytest.raises(ClientError):
        c.get(path).content
    host2 = danube.host(danube.nodes[1])
    assert not [x for x in host2["reservations"] if x["holder"].startswith("danube:")]
    with pytest.raises(ClientError) as e:
        c.delete(path).content
    assert e.value.status_code == 404 and e.value.detail == "Slave VM not found"


def test_cancel_a_pending_creation(danube):
    """DANUBE-TASK-CANCEL: a revoked creation leaves no replica (410 REVOKED)."""
    c = client(danube)
    vm = danube.vms["app"]
    path = f"/vm/{vm.hostname}/replica/tmp1"
    # A slow creation (64 KiB/s for a 2 MiB disk): still running when cancelled.
    r = c.post(path, stream=False, node=danube.nodes[1], bwlimit=65536)
    assert r.status_code == 201
    task_id = r.content.task_id
    detail = c.get(f"/task/{task_id}")
    if detail.ok:
        d = detail.content.result
        assert d["view"] == "vm_replica" and d["method"] == "POST"
    cancel = c.put(f"/task/{task_id}/cancel", stream=False, force=True)
    if cancel.status_code == 406:
        pytest.skip("the creation finished before it could be cancelled")
    with pytest.raises(TaskRevoked) as e:
        cancel.content
    assert e.value.status_code == 410 and e.value.task_status == "REVOKED"
    wait_for(lambda: c.get(f"/vm/{vm.hostname}/replica").content.result == [], 30,
             "the revoked replica to disappear")


# ---- raw HTTP: paths, shapes and headers the library does not exercise ----

def test_paths_with_dc_and_without_trailing_slash(danube):
    h = {"ES-API-KEY": danube.api_key}
    vm = danube.vms["db"].hostname
    for p in (f"/api/vm/{vm}/replica", f"/api/vm/{vm}/replica/", f"/api/dc/main/vm/{vm}/replica",
              f"/api/dc/main/vm/{vm}/replica/"):
        r = requests.get(danube.url + p, headers=h, timeout=30)
        assert r.status_code == 200, (p, r.text)
        body = r.json()
        assert body["status"] == "SUCCESS" and body["result"] == []
        assert r.headers["es_version"] and r.headers["es_dc"] == "main"
        assert r.headers["es_username"] == danube.user
        assert "es_stream" not in r.headers
    r = requests.get(f"{danube.url}/api/dc/nodc/vm/{vm}/replica/", headers=h, timeout=30)
    assert r.status_code == 404 and "detail" in r.json()
    r = requests.get(f"{danube.url}/api/no/such/thing/", headers=h, timeout=30)
    assert r.status_code == 404 and r.json() == {"detail": "Not found."}
    r = requests.patch(f"{danube.url}/api/vm/{vm}/replica/r1/", headers=h, timeout=30)
    assert r.status_code == 405 and "detail" in r.json()
    r = requests.post(f"{danube.url}/api/vm/{vm}/replica/r1/", headers=h, data=b"{nope", timeout=30)
    assert r.status_code == 400 and "detail" in r.json()
    r = requests.get(f"{danube.url}/api/vm/{vm}/replica/", timeout=30)
    assert r.status_code == 401 and "detail" in r.json()


def test_es_stream_without_status_line(danube):
    """Any ES-STREAM value but `es` streams the final JSON only."""
    h = {"ES-API-KEY": danube.api_key, "ES-STREAM": "1", "Content-Type": "application/json"}
    vm = danube.vms["db"].hostname
    r = requests.put(f"{danube.url}/api/vm/{vm}/replica/nope/reinit/", headers=h, json={}, timeout=60)
    assert r.status_code == 404  # refused synchronously: no stream
    assert "es_stream" not in r.headers


# ---- DANUBE-AUTH-LOGIN / -LOGOUT headers, `dc` in the data, task visibility, cb_url, and
# ---- the reservations after a failover (these use VM "app", after the tests above) ----

def test_login_and_logout_carry_the_danube_headers(danube):
    """Every Danube reply carries es_version, es_username and es_dc (spec §1.4)."""
    c = Client(api_url=danube.api)
    r = c.login(danube.user, danube.password)
    assert r.status_code == 200
    assert r.version and r.version != "???"
    assert r.dc == "main"
    assert r._response.headers["es_username"] == danube.user
    out = c.logout()
    assert out.ok and out.content.result == {"detail": "Bye."}
    assert out.version != "???" and out.dc == "main"
    assert out._response.headers["es_username"] == danube.user
    bad = Client(api_url=danube.api).login(danube.user, "wrong")
    assert bad.status_code == 400 and bad.dc == "main" and bad.version != "???"


def test_dc_in_the_request_data(danube):
    """A `dc` parameter selects the virtual DC (upstream request_data): `main` works, an
    unknown one is 404 "Datacenter not found" and changes nothing."""
    c = client(danube)
    vm = danube.vms["app"].hostname
    assert c.get(f"/vm/{vm}/replica", dc="main").content.result == []
    with pytest.raises(ClientError) as e:
        c.get(f"/vm/{vm}/replica", dc="nodc").content
    assert e.value.status_code == 404 and e.value.detail == "Datacenter not found"
    with pytest.raises(ClientError) as e:
        c.post(f"/vm/{vm}/replica/r1", node=danube.nodes[1], dc="nodc").content
    assert e.value.status_code == 404 and e.value.detail == "Datacenter not found"
    with pytest.raises(ClientError) as e:
        c.get("/task", dc="nodc").content
    assert e.value.status_code == 404
    assert c.get(f"/vm/{vm}/replica").content.result == []
    assert isinstance(c.get("/task", dc="main").content.result, list)


def _second_member(danube):
    """Another `member` of the world's project, with its ES-API-KEY."""
    tag = danube.user[: -len("-op")]
    name = f"{tag}-op2-{secrets.token_hex(2)}"
    danube.admin.call(
        "POST", "/drplane/v1/identity/users",
        {"name": name, "password": secrets.token_urlsafe(16), "project": tag, "role": "member"},
    )
    return danube.admin.call("POST", "/drplane/v1/identity/api-keys", {"user": name})["key"]


class _Hook:
    """A local HTTP server recording the callbacks it receives."""

    def __init__(self):
        got = self.got = []

        class H(BaseHTTPRequestHandler):
            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                got.append((self.command, self.path, json.loads(body or b"null")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_GET = do_DELETE = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n, timeout=60):
        wait_for(lambda: len(self.got) >= n, timeout, f"{n} callback(s)")
        return self.got[n - 1]

    def close(self):
        self.server.shutdown()


def test_tasks_callbacks_and_reservations_after_failover_then_delete(danube, cluster):  # noqa: F811
    """DANUBE-TASK-*: a task is its user's and the admins' only (403 for another member,
    406 to cancel). cb_url: the task-status body arrives when the task ends. Reservations:
    after a failover the VM is counted on the node where it runs, the replica's reservation
    follows the replica, and a delete right after the failover releases only that."""
    c = client(danube)
    other = client(danube, _second_member(danube))
    _, admin_password = cluster
    admin = Client(api_url=danube.api)
    assert admin.login("admin", admin_password).status_code == 200
    vm = danube.vms["app"]
    path = f"/vm/{vm.hostname}/replica/dr2"
    master_node, slave_node = danube.nodes
    hook = _Hook()
    try:
        # DANUBE-REP-CREATE with a callback (default cb_method POST).
        r = waited(c.post(path, node=slave_node, reserve_resources=True, cb_url=hook.url + "/created"))
        assert r.status_code == 200, r.raw_content
        task = r.content.task_id
        method, where, body = hook.wait(1)
        assert (method, where) == ("POST", "/created")
        assert body["task_id"] == task and body["status"] == "SUCCESS"
        assert body["result"]["message"] == "Server replica was successfully initialized"
        assert len(body["random_token"]) == 32 and len(body["security_token"]) == 32

        # Task visibility: the creator and an admin see it; another member gets 403.
        assert c.get(f"/task/{task}/status", stream=False).status_code == 200
        assert admin.get(f"/task/{task}/status", stream=False).status_code == 200
        for p in (f"/task/{task}/status", f"/task/{task}/done"):
            with pytest.raises(ClientError) as e:
                other.get(p, stream=False).content
            assert e.value.status_code == 403, p
            assert e.value.detail == "You do not have permission to perform this action."
        with pytest.raises(ClientError) as e:
            other.put(f"/task/{task}/cancel", stream=False).content
        assert e.value.status_code == 406
        assert task not in other.get("/task").content.result

        def danube_holds():
            """This VM's Danube reservations: (node, holder, vcpus, ram_mb)."""
            mine = (f"danube:{task}", f"danube-vm:{vm.id}")
            out = []
            for n in danube.nodes:
                for x in danube.host(n)["reservations"]:
                    if x["holder"] in mine:
                        out.append((n, x["holder"], x["vcpus"], x["ram_mb"]))
            return sorted(out)

        assert danube_holds() == [(slave_node, f"danube:{task}", 1, 1024)]

        # DANUBE-REP-FAILOVER: the VM is now on the slave node, counted there; the replica
        # (the old master) is on the VM's registered node, counted by the inventory.
        r = waited(c.put(path + "/failover", force=True))
        assert r.status_code == 200, r.raw_content
        assert c.get(f"/vm/{vm.hostname}/status").content.result["node"] == slave_node
        assert danube_holds() == [(slave_node, f"danube-vm:{vm.id}", 1, 1024)]

        # DANUBE-REP-DELETE right after the failover (no reinit), with a PUT callback.
        r = waited(c.delete(path, cb_url=hook.url + "/deleted", cb_method="PUT"))
        assert r.status_code == 200, r.raw_content
        method, where, body = hook.wait(2)
        assert (method, where) == ("PUT", "/deleted")
        assert body["status"] == "SUCCESS"
        assert body["result"]["message"] == "Server replica was successfully destroyed"
        assert c.get(f"/vm/{vm.hostname}/replica").content.result == []
        # The VM still runs where it failed over to: its charge stays, nothing else.
        assert danube_holds() == [(slave_node, f"danube-vm:{vm.id}", 1, 1024)]
        assert master_node != slave_node
    finally:
        hook.close()
