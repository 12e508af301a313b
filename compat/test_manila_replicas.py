"""python-manilaclient against drplane: every MANILA-* endpoint of ../shared/spec/manila.md,
error paths included, and the end-to-end `dr` share with two replicas (issue 7).

Needs the cluster scripts/compat.sh starts (`drplane dev`, the demo user). The suite runs on
a world of its own, so that it passes in any order next to the other families' suites, which
add hosts to the demo sites site-1 and site-2 (Manila may place a replica on any backend of
an availability zone): three availability zones `mn-<id>-az1..3` with one `fs` backend each
(`mn-<id>-1..3`, started with `drplane agent`), the demo project's share `mn-<id>-docs` on
the first one and `mn-<id>-own` (never given a replication type) on the third. The tests run
in file order and share one share.
"""

import os

import pytest
import requests
from manilaclient import api_versions
from manilaclient import exceptions as mexc

from drplane_cluster import cluster  # noqa: F401  (the fixture)
from manila_helpers import (
    ExtraAgent,
    demo_password,
    login,
    manila,
    random_name,
    volume_dir,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("DRPLANE_DEV_DIR"), reason="needs scripts/compat.sh (drplane dev with agents)"
)

# The demo share of `drplane dev` (host-1, site-1): shown, never changed here.
DEMO_SHARE = "dev-docs"


@pytest.fixture(scope="module")
def world(cluster):  # noqa: F811
    url, admin_password = cluster
    admin = login(url, "admin", admin_password, "admin")
    demo = login(url, "demo", demo_password(), "demo")
    token = admin.get_token()
    project = demo.get_project_id()
    tag = random_name("mn")
    share, own_share = f"{tag}-docs", f"{tag}-own"
    azs = [f"{tag}-az{i}" for i in (1, 2, 3)]
    hosts = [f"{tag}-{i}" for i in (1, 2, 3)]
    workdir = os.path.join(os.environ["DRPLANE_DEV_DIR"], tag)
    os.makedirs(workdir, exist_ok=True)
    shares = {
        0: [{"id": share, "project": project, "name": "docs", "size_bytes": 8 << 20}],
        2: [{"id": own_share, "project": project, "name": "own", "size_bytes": 4 << 20}],
    }
    agents = []
    try:
        for i, (host, az) in enumerate(zip(hosts, azs)):
            agents.append(
                ExtraAgent(url, token, admin_password, workdir, host, az,
                           shares=shares.get(i, ()), wait=False)
            )
        for a in agents:
            a.wait_online()

        def reported(share_id):
            r = requests.get(f"{url}/drplane/v1/shares/{share_id}",
                             headers={"X-Auth-Token": token}, timeout=10)
            return r.status_code == 200

        wait_for("the shares reported", lambda: reported(share) and reported(own_share))
        yield {
            "url": url,
            "admin": admin,
            "demo": demo,
            "token": token,
            "demo_token": demo.get_token(),
            "project": project,
            "share": share,
            "own_share": own_share,
            "azs": azs,
            "hosts": hosts,
            "agents": agents,
            "mc": manila(demo),
            "amc": manila(admin),
            "replicas": {},
        }
    finally:
        for a in agents:
            a.stop()
        for a in agents:
            a.wait_offline()


def raw(w, method, path, token=None, version="2.95", experimental=None, **kw):
    headers = {"X-Auth-Token": token or w["demo_token"]}
    if version is not None:
        headers["X-OpenStack-Manila-API-Version"] = version
    if experimental is not None:
        headers["X-OpenStack-Manila-API-Experimental"] = experimental
    return requests.request(method, f"{w['url']}{path}", headers=headers, timeout=30, **kw)


def native(w, method, path, token=None, **kw):
    return requests.request(
        method,
        f"{w['url']}/drplane/v1{path}",
        headers={"X-Auth-Token": token or w["token"]},
        timeout=30,
        **kw,
    )


def wait_jobs_done(w, job_type):
    """Manila shows no job; drplane's native API does: wait until those of a type ended."""

    def check():
        jobs = native(w, "GET", f"/jobs?type={job_type}").json()["jobs"]
        return all(j["status"] in ("SUCCESS", "FAIL") for j in jobs)

    wait_for(f"{job_type} jobs to end", check)


def wait_replica(mc, rid, status="available", states=("in_sync",), timeout=120):
    def check():
        r = mc.share_replicas.get(rid)
        return r if (r.status == status and r.replica_state in states) else None

    return wait_for(f"replica {rid} {status}/{states}", check, timeout=timeout)


# ---- MANILA-VERSIONS ------------------------------------------------------------------


def test_versions_and_microversion_negotiation(world):
    url = world["url"]
    root = requests.get(url + "/", timeout=10)
    assert root.status_code == 200
    current = [v for v in root.json()["versions"] if v.get("version")]
    assert current[0]["id"] == "v2.0" and current[0]["status"] == "CURRENT"
    assert (current[0]["min_version"], current[0]["version"]) == ("2.0", "2.95")
    v2 = requests.get(url + "/v2/", timeout=10).json()
    assert v2["versions"][0]["version"] == "2.95"
    # python-manilaclient's own discovery settles on 2.95 (the client knows more).
    mc = manila(world["demo"], "2.95")
    got = api_versions.discover_version(mc, api_versions.APIVersion(api_versions.MAX_VERSION))
    assert got.get_string() == "2.95"
    # The server echoes the version, and answers 406 / 400 outside the range / malformed.
    r = raw(world, "GET", f"/v2/{world['project']}/shares/{world['share']}", version="2.47")
    assert r.status_code == 200, r.text
    assert r.headers["X-OpenStack-Manila-API-Version"] == "2.47"
    assert "X-OpenStack-Manila-API-Version" in r.headers["Vary"]
    r = raw(world, "GET", f"/v2/{world['project']}/share-replicas", version="2.96")
    assert r.status_code == 406 and "computeFault" in r.json(), r.text
    r = raw(world, "GET", f"/v2/{world['project']}/share-replicas", version="two")
    assert r.status_code == 400 and "badRequest" in r.json(), r.text
    # `latest` is the newest.
    r = raw(world, "GET", f"/v2/{world['project']}/share-replicas", version="latest")
    assert r.status_code == 200 and r.headers["X-OpenStack-Manila-API-Version"] == "2.95"


def test_microversion_gates_of_the_replica_api(world):
    p = world["project"]
    # < 2.11: no replica API (404 with the default message).
    r = raw(world, "GET", f"/v2/{p}/share-replicas/detail", version="2.10")
    assert r.status_code == 404
    assert r.json()["itemNotFound"]["message"] == "The resource could not be found."
    # 2.11–2.55: only with the experimental header.
    r = raw(world, "GET", f"/v2/{p}/share-replicas/detail", version="2.30")
    assert r.status_code == 404
    r = raw(world, "GET", f"/v2/{p}/share-replicas/detail", version="2.30", experimental="True")
    assert r.status_code == 200 and r.headers["X-OpenStack-Manila-API-Experimental"] == "True"
    # The client sends the experimental header itself at 2.11.
    assert isinstance(manila(world["demo"], "2.11").share_replicas.list(), list)
    # No project id in the URL: only from 2.60.
    r = raw(world, "GET", "/v2/share-replicas", version="2.59")
    assert r.status_code == 400 and "badRequest" in r.json()
    r = raw(world, "GET", "/v2/share-replicas", version="2.60")
    assert r.status_code == 200, r.text
    # Unknown paths and methods, in Manila's shape.
    r = raw(world, "GET", f"/v2/{p}/nowhere")
    assert r.status_code == 404 and "itemNotFound" in r.json()
    r = raw(world, "PUT", f"/v2/{p}/share-replicas")
    assert r.status_code == 405 and "badMethod" in r.json()
    # Without a token: 401 in Manila's shape.
    r = requests.get(f"{world['url']}/v2/{p}/share-replicas", timeout=10)
    assert r.status_code == 401 and "unauthorized" in r.json()
    # Export locations need 2.47.
    r = raw(world, "GET", f"/v2/{p}/share-replicas/x/export-locations", version="2.46",
            experimental="True")
    assert r.status_code == 404


# ---- MANILA-SHARE-SHOW and the replication type ----------------------------------------


def test_share_show_and_replication_type(world):
    mc, sid, az1 = world["mc"], world["share"], world["azs"][0]
    share = mc.shares.get(sid)
    assert share.replication_type is None and share.has_replicas is False
    with pytest.raises(mexc.NotFound):
        mc.shares.get("no-such-share")
    # MANILA-SR-CREATE on a share without a replication type: 400.
    with pytest.raises(mexc.BadRequest) as e:
        mc.share_replicas.create(world["own_share"], availability_zone=az1)
    assert "replication type" in str(e.value)
    # Only an administrator sets the type (drplane's stand-in for the share type).
    r = native(world, "PUT", f"/manila/shares/{sid}", token=world["demo_token"],
               json={"replication_type": "dr"})
    assert r.status_code == 403, r.text
    r = native(world, "PUT", f"/manila/shares/{sid}", json={"replication_type": "bogus"})
    assert r.status_code == 400, r.text
    r = native(world, "PUT", f"/manila/shares/{sid}", json={"replication_type": "dr"})
    assert r.status_code == 200, r.text
    assert r.json()["replicas"][0]["active"] is True
    share = mc.shares.get(sid)
    assert (share.replication_type, share.has_replicas) == ("dr", False)
    assert share.availability_zone == az1
    # The demo share of `drplane dev` is a Manila share too (in host-1's site).
    demo_share = mc.shares.get(DEMO_SHARE)
    assert (demo_share.id, demo_share.availability_zone) == (DEMO_SHARE, "site-1")
    # Before 2.11 the share shows no replication fields.
    old = manila(world["demo"], "2.10").shares.get(sid)
    assert not hasattr(old, "replication_type")


# ---- MANILA-SR-CREATE and its errors ---------------------------------------------------


def test_create_errors(world):
    mc, p, sid = world["mc"], world["project"], world["share"]
    az1, az2, _ = world["azs"]
    with pytest.raises(mexc.NotFound):
        mc.share_replicas.create("no-such-share", availability_zone=az2)
    with pytest.raises(mexc.BadRequest) as e:
        mc.share_replicas.create(sid, availability_zone="no-such-az")
    assert "no-such-az" in str(e.value)
    # The AZ of the active replica has no other backend.
    with pytest.raises(mexc.BadRequest) as e:
        mc.share_replicas.create(sid, availability_zone=az1)
    assert "No valid host" in str(e.value)
    # Bodies: no share_id (400), no share_replica (422), not JSON (400).
    r = raw(world, "POST", f"/v2/{p}/share-replicas", json={"share_replica": {}})
    assert r.status_code == 400
    assert r.json()["badRequest"]["message"] == "Must provide Share ID to add replica."
    r = raw(world, "POST", f"/v2/{p}/share-replicas", json={"replica": {}})
    assert r.status_code == 422 and "computeFault" in r.json()
    r = raw(world, "POST", f"/v2/{p}/share-replicas", data=b"{not json")
    assert r.status_code == 400 and "badRequest" in r.json()
    # share_network_id between 2.51 and 2.71: 400.
    r = raw(world, "POST", f"/v2/{p}/share-replicas", version="2.60",
            json={"share_replica": {"share_id": sid, "share_network_id": "n1"}})
    assert r.status_code == 400 and "2.72" in r.json()["badRequest"]["message"]
    # The only_host scheduler hint is for administrators.
    with pytest.raises(mexc.Forbidden):
        mc.share_replicas.create(
            sid, scheduler_hints={"only_host": f"{world['hosts'][1]}@drplane#x"}
        )
    # Metadata limits (2.95).
    with pytest.raises(mexc.BadRequest):
        mc.share_replicas.create(sid, availability_zone=az2, metadata={"k": ""})


def test_create_two_replicas(world):
    """MANILA-SR-CREATE (+ SHOW, LIST, LIST-DETAIL): one replica in the second AZ, one in
    the third, each on a distinct backend, after files were written into the active replica."""
    sid = world["share"]
    _, az2, az3 = world["azs"]
    share = native(world, "GET", f"/shares/{sid}").json()
    active_dir = share["path"]
    assert os.path.isdir(active_dir), share
    with open(os.path.join(active_dir, "before.txt"), "w") as f:
        f.write("written before the replicas existed\n")
    os.makedirs(os.path.join(active_dir, "sub"), exist_ok=True)
    with open(os.path.join(active_dir, "sub", "nested.bin"), "wb") as f:
        f.write(os.urandom(300_000))
    world["active_dir"] = active_dir

    mc = world["mc"]
    r2 = mc.share_replicas.create(sid, availability_zone=az2, metadata={"tier": "dr"})
    assert r2.status == "creating" and r2.replica_state == "out_of_sync"
    assert r2.share_id == sid and r2.availability_zone == az2
    assert r2.metadata == {"tier": "dr"}
    assert not hasattr(r2, "host") or r2.host is None  # admin-only field
    r3 = mc.share_replicas.create(sid, availability_zone=az3)
    world["replicas"] = {"r2": r2.id, "r3": r3.id}
    wait_replica(mc, r2.id)
    wait_replica(mc, r3.id)
    # The admin sees the backends; they are distinct.
    amc = world["amc"]
    hosts = {amc.share_replicas.get(i).host.split("@")[0] for i in (r2.id, r3.id)}
    assert hosts == set(world["hosts"][1:])
    assert amc.share_replicas.get(r2.id).cast_rules_to_readonly is False
    # MANILA-SR-LIST-DETAIL (what the client calls) with and without share_id.
    listed = mc.share_replicas.list(share=sid)
    assert len(listed) == 3
    states = sorted(x.replica_state for x in listed)
    assert states == ["active", "in_sync", "in_sync"]
    assert {x.id for x in mc.share_replicas.list()} >= {r2.id, r3.id}
    # MANILA-SR-LIST (summary) through the manager's raw list.
    summary = mc.share_replicas._list(
        f"/share-replicas?share_id={sid}", "share_replicas"
    )
    assert len(summary) == 3
    assert set(summary[0]._info) == {"id", "share_id", "status", "replica_state"}
    # Paging: limit 1 gives a next link.
    r = raw(world, "GET", f"/v2/{world['project']}/share-replicas?share_id={sid}&limit=1")
    body = r.json()
    assert len(body["share_replicas"]) == 1 and body["share_replica_links"][0]["rel"] == "next"
    r = raw(world, "GET", f"/v2/{world['project']}/share-replicas?limit=x")
    assert r.status_code == 400
    with pytest.raises(mexc.NotFound):
        mc.share_replicas.list(share="no-such-share")
    # MANILA-SR-SHOW of an unknown replica.
    with pytest.raises(mexc.NotFound):
        mc.share_replicas.get("00000000-0000-0000-0000-000000000000")
    # The share now has replicas.
    assert mc.shares.get(sid).has_replicas is True
    # The replicas' data reached the new backends.
    r2_dir = volume_dir(world["agents"][1].data, r2.id)
    assert r2_dir and os.path.isfile(os.path.join(r2_dir, "before.txt")), r2_dir


# ---- MANILA-SR-EXPORT-LIST -------------------------------------------------------------


def test_export_locations(world):
    mc = world["mc"]
    rid = world["replicas"]["r3"]
    locations = mc.share_replica_export_locations.list(rid)
    assert len(locations) == 1
    el = locations[0]
    assert el.share_instance_id == rid and el.availability_zone == world["azs"][2]
    assert el.path.startswith(f"{world['hosts'][2]}:") and el.preferred is True
    one = mc.share_replica_export_locations.get(rid, el.id)
    assert one.path == el.path
    with pytest.raises(mexc.NotFound):
        mc.share_replica_export_locations.get(rid, "nope")


# ---- admin actions and their policies --------------------------------------------------


def test_admin_actions_and_policies(world):
    mc, amc = world["mc"], world["amc"]
    rid = world["replicas"]["r2"]
    # MANILA-SR-RESET-STATUS, MANILA-SR-RESET-REPLICA-STATE, MANILA-SR-RESYNC,
    # MANILA-SR-FORCE-DELETE: a project member is refused.
    with pytest.raises(mexc.Forbidden):
        mc.share_replicas.reset_state(rid, "error")
    with pytest.raises(mexc.Forbidden):
        mc.share_replicas.reset_replica_state(rid, "error")
    with pytest.raises(mexc.Forbidden):
        mc.share_replicas.resync(rid)
    with pytest.raises(mexc.Forbidden):
        mc.share_replicas.delete(rid, force=True)
    # Bad values.
    with pytest.raises(mexc.BadRequest):
        amc.share_replicas.reset_state(rid, "sleeping")
    with pytest.raises(mexc.BadRequest):
        amc.share_replicas.reset_replica_state(rid, "fuzzy")
    r = raw(world, "POST", f"/v2/{world['project']}/share-replicas/{rid}/action",
            token=world["token"], json={"reset_status": {}})
    assert r.status_code == 400 and "status" in r.json()["badRequest"]["message"]
    r = raw(world, "POST", f"/v2/{world['project']}/share-replicas/{rid}/action",
            json={"frobnicate": None})
    assert r.status_code == 400 and "no such action" in r.json()["badRequest"]["message"]
    # Reset status and back (the legacy os- key too).
    amc.share_replicas.reset_state(rid, "error")
    assert mc.share_replicas.get(rid).status == "error"
    r = raw(world, "POST", f"/v2/{world['project']}/share-replicas/{rid}/action",
            token=world["token"], json={"os-reset_status": {"status": "available"}})
    assert r.status_code == 202, r.text
    assert mc.share_replicas.get(rid).status == "available"
    # Reset replica_state holds until the agents report again; a member may then not
    # promote an out_of_sync replica.
    amc.share_replicas.reset_replica_state(rid, "out_of_sync")
    assert mc.share_replicas.get(rid).replica_state == "out_of_sync"
    with pytest.raises(mexc.Forbidden):
        mc.share_replicas.promote(rid)
    # The active replica's replica_state cannot be reset; resync/promote of it are no-ops.
    active = [x for x in mc.share_replicas.list(share=world["share"])
              if x.replica_state == "active"][0]
    with pytest.raises(mexc.BadRequest):
        amc.share_replicas.reset_replica_state(active.id, "error")
    r = raw(world, "POST", f"/v2/{world['project']}/share-replicas/{active.id}/action",
            json={"promote": None})
    assert r.status_code == 200, r.text
    r = raw(world, "POST", f"/v2/{world['project']}/share-replicas/{active.id}/action",
            token=world["token"], json={"resync": None})
    assert r.status_code == 200, r.text
    # MANILA-SR-DELETE of the active replica: 409 (decision 5).
    with pytest.raises(mexc.Conflict):
        mc.share_replicas.delete(active.id)
    with pytest.raises(mexc.NotFound):
        mc.share_replicas.delete("00000000-0000-0000-0000-000000000000")
    # MANILA-SR-RESYNC (admin) after new writes: back in sync, the files arrived.
    with open(os.path.join(world["active_dir"], "after-resync.txt"), "w") as f:
        f.write("written after the replicas were created\n")
    amc.share_replicas.resync(rid)
    # Manila shows no job: the replica stays in_sync; the file arrives with the sync.
    r2_dir = volume_dir(world["agents"][1].data, rid)
    wait_for("the resync", lambda: os.path.isfile(os.path.join(r2_dir, "after-resync.txt")))
    wait_jobs_done(world, "manilaResyncShareReplica")
    wait_replica(mc, rid)
    # Quiesce wait time: validated from 2.75.
    r = raw(world, "POST", f"/v2/{world['project']}/share-replicas/{rid}/action",
            json={"promote": {"quiesce_wait_time": -1}})
    assert r.status_code == 400 and "quiesce_wait_time" in r.json()["badRequest"]["message"]


# ---- the end to end: promote a secondary (MANILA-SR-PROMOTE) ---------------------------


def test_promote_secondary_holds_the_files(world):
    sid, (az1, _, az3) = world["share"], world["azs"]
    agent = world["agents"][2]
    mc = world["mc"]
    r3 = world["replicas"]["r3"]
    # Resync the third backend too so it holds the latest files, then promote it.
    world["amc"].share_replicas.resync(r3)
    r3_dir = volume_dir(agent.data, r3)
    wait_for("the resync of r3", lambda: os.path.isfile(os.path.join(r3_dir, "after-resync.txt")))
    wait_jobs_done(world, "manilaResyncShareReplica")
    wait_replica(mc, r3)
    with open(os.path.join(world["active_dir"], "final.txt"), "w") as f:
        f.write("the last write before the promotion\n")
    mc.share_replicas.promote(r3)
    assert mc.share_replicas.get(r3).status in ("replication_change", "available")
    wait_replica(mc, r3, states=("active",), timeout=180)
    listed = mc.share_replicas.list(share=sid)
    assert [x.replica_state for x in listed].count("active") == 1
    # The old active and the other secondary replicate from the new active.
    others = [x for x in listed if x.id != r3]
    for x in others:
        wait_replica(mc, x.id)
    # The promoted copy holds every file, and is writable.
    new_dir = volume_dir(agent.data, r3)
    assert new_dir, f"no volume {r3} under {agent.data}"
    for name in ("before.txt", "after-resync.txt", "final.txt", os.path.join("sub", "nested.bin")):
        assert os.path.isfile(os.path.join(new_dir, name)), name
    with open(os.path.join(new_dir, "final.txt")) as f:
        assert f.read() == "the last write before the promotion\n"
    assert os.access(new_dir, os.W_OK)
    # Its export location is where clients mount now.
    el = mc.share_replica_export_locations.list(r3)[0]
    assert el.replica_state == "active" and r3 in el.path
    assert mc.shares.get(sid).availability_zone == az3
    # Writes on the new active reach the old one.
    with open(os.path.join(new_dir, "after-promote.txt"), "w") as f:
        f.write("written on the promoted replica\n")
    old_active = [x for x in others if x.availability_zone == az1][0]
    world["amc"].share_replicas.resync(old_active.id)
    wait_for(
        "the resync of the old active replica",
        lambda: os.path.isfile(os.path.join(world["active_dir"], "after-promote.txt")),
    )
    wait_jobs_done(world, "manilaResyncShareReplica")
    wait_replica(mc, old_active.id)
    # Every operation was a job, visible natively.
    jobs = native(world, "GET", "/jobs?type=manilaPromoteShareReplica").json()["jobs"]
    assert any(j["status"] == "SUCCESS" for j in jobs), jobs


# ---- MANILA-SR-DELETE and MANILA-SR-FORCE-DELETE ---------------------------------------


def test_delete_and_force_delete(world):
    sid, az1 = world["share"], world["azs"][0]
    agent = world["agents"][2]
    mc, amc = world["mc"], world["amc"]
    # Promote the original copy back (the share ends where it started).
    listed = mc.share_replicas.list(share=sid)
    home = [x for x in listed if x.availability_zone == az1][0]
    wait_replica(mc, home.id)
    mc.share_replicas.promote(home.id)
    wait_replica(mc, home.id, states=("active",), timeout=180)
    a = world["replicas"]["r2"]
    b = world["replicas"]["r3"]
    wait_replica(mc, a)
    wait_replica(mc, b)
    mc.share_replicas.delete(a)

    def gone(rid):
        def check():
            try:
                mc.share_replicas.get(rid)
                return False
            except mexc.NotFound:
                return True

        return check

    wait_for(f"replica {a} deleted", gone(a))
    amc.share_replicas.delete(b, force=True)
    wait_for(f"replica {b} force-deleted", gone(b))
    assert [x.replica_state for x in mc.share_replicas.list(share=sid)] == ["active"]
    assert mc.shares.get(sid).has_replicas is False
    assert volume_dir(agent.data, b) is None
