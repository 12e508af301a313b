"""python-troveclient 8.11.0, unchanged, against drplane's Trove family (TROVE-* of
../shared/spec/trove.md): every endpoint and its error paths, logged in through the
Keystone v3 subset (password plugin; the client finds `database` in the catalog).

Runs against the `drplane dev` cluster of scripts/compat.sh (agents host-1, host-2).
"""

import uuid

import pytest
import requests
from troveclient.apiclient import exceptions as exc

from trove_helpers import (
    STEADY,
    Native,
    dev_env,
    keystone_session,
    state,
    trove,
    wait_for,
    wait_gone,
    wait_status,
    wait_steady,
)


@pytest.fixture(scope="module")
def env():
    url, dev, creds = dev_env()
    demo = keystone_session(url, "demo", creds["demo_password"], "demo")
    admin = keystone_session(url, "admin", creds["admin_password"], "admin")
    demo_project = demo.get_project_id()
    return {
        "url": url,
        "demo": demo,
        "demo_project": demo_project,
        "tc": trove(demo),
        # The admin acting on the demo project's paths (mgmt paths take any project).
        "admin_tc": trove(admin, f"{url}/v1.0/{demo_project}"),
        "admin_own": trove(admin),
        "native": Native(url, creds["admin_password"]),
        "demo_token": demo.get_token(),
    }


@pytest.fixture(scope="module")
def inst(env):
    """TROVE-INST-CREATE: one instance for the action tests, deleted at the end."""
    tc = env["tc"]
    i = tc.instances.create("compat-db", flavor_id="2", volume={"size": 1})
    assert i.status == "BUILD"
    assert i.flavor["id"] == "2"
    assert i.volume["size"] == 1
    wait_steady(tc, i.id)
    yield i.id
    try:
        tc.instances.delete(i.id)
        wait_gone(tc, i.id)
    except exc.NotFound:
        pass


def raw(env, method, path, body=None, token=None):
    headers = {"X-Auth-Token": token or env["demo_token"]}
    url = f"{env['url']}/v1.0/{env['demo_project']}{path}"
    return requests.request(method, url, json=body, headers=headers, timeout=30)


def fault(r, status, name):
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == [name], body
    assert body[name]["code"] == status
    assert body[name]["message"]
    return body[name]["message"]


def test_versions_and_catalog(env):
    # TROVE-VERSIONS
    r = requests.get(f"{env['url']}/v1.0", timeout=10)
    assert r.status_code == 200
    v = r.json()["versions"][0]
    assert (v["id"], v["status"]) == ("v1.0", "CURRENT")
    # The root document (shared with MANILA-VERSIONS) lists Trove's v1.0 too.
    root = requests.get(f"{env['url']}/", timeout=10).json()["versions"]
    assert any(x["id"] == "v1.0" and x["links"][0]["href"].endswith("/v1.0/") for x in root)
    # The catalog's `database` endpoint is this node's /v1.0/{project_id}.
    ep = env["demo"].get_endpoint(service_type="database", interface="public")
    assert ep == f"{env['url']}/v1.0/{env['demo_project']}"


def test_list_show_and_paging(env, inst):
    tc = env["tc"]
    # TROVE-INST-LIST (the client sends include_clustered=False)
    ids = [i.id for i in tc.instances.list()]
    assert inst in ids
    # The demo inventory's database, declared by host-2's agent, is an instance too.
    assert "dev-orders-2" in ids
    # TROVE-INST-LIST-DETAIL
    detail = {i.id: i for i in tc.instances.list(detailed=True)}
    assert detail[inst].datastore["type"] == "mysql"
    assert "created" in detail[inst]._info
    # Paging: limit and the marker of the next link.
    page = tc.instances.list(limit=1)
    assert len(page) == 1 and page.next
    rest = tc.instances.list(marker=page.next)
    assert page[0].id not in [i.id for i in rest]
    # TROVE-INST-SHOW
    i = tc.instances.get(inst)
    assert (i.status, i.operating_status) == STEADY
    assert not hasattr(i, "replica_of")
    assert i.links[0]["rel"] == "self"
    # Unknown instance: 404; bad limit: 400.
    with pytest.raises(exc.NotFound):
        tc.instances.get(str(uuid.uuid4()))
    fault(raw(env, "GET", "/instances?limit=x"), 400, "badRequest")


def test_another_projects_instance_is_missing(env):
    # An instance of the admin project cannot be told from a missing one by demo.
    admin_own = env["admin_own"]
    other = admin_own.instances.create("admin-db", flavor_id="1", volume={"size": 1})
    try:
        r = raw(env, "GET", f"/instances/{other.id}")
        fault(r, 404, "itemNotFound")
        r = raw(env, "POST", f"/instances/{other.id}/action", {"restart": {}})
        fault(r, 404, "itemNotFound")
        assert other.id not in [i.id for i in env["tc"].instances.list()]
    finally:
        wait_steady(admin_own, other.id)
        admin_own.instances.delete(other.id)
        wait_gone(admin_own, other.id)


def test_restart_and_resizes(env, inst):
    tc = env["tc"]
    # TROVE-ACT-RESTART
    tc.instances.restart(inst)
    wait_steady(tc, inst)
    # TROVE-ACT-RESIZE-FLAVOR
    tc.instances.resize_instance(inst, "3")
    assert tc.instances.get(inst).status in ("RESIZE", "ACTIVE")
    i = wait_steady(tc, inst)
    assert i.flavor["id"] == "3"
    with pytest.raises(exc.BadRequest):
        tc.instances.resize_instance(inst, "3")  # same flavor
    with pytest.raises(exc.BadRequest):
        tc.instances.resize_instance(inst, "999")  # unknown flavor
    # TROVE-ACT-RESIZE-VOLUME
    tc.instances.resize_volume(inst, 2)
    i = wait_steady(tc, inst)
    assert i.volume["size"] == 2
    with pytest.raises(exc.BadRequest):
        tc.instances.resize_volume(inst, 1)  # shrink
    with pytest.raises(exc.RequestEntityTooLarge):
        tc.instances.resize_volume(inst, 11)  # above max_accepted_volume_size
    # resize with both keys: 400 (spec decision 8)
    r = raw(env, "POST", f"/instances/{inst}/action",
            {"resize": {"flavorRef": "2", "volume": {"size": 3}}})
    fault(r, 400, "badRequest")


def test_action_body_errors(env, inst):
    tc = env["tc"]
    # TROVE-ACT-PROMOTE of a non-replica, TROVE-ACT-EJECT of a non-source: 400.
    with pytest.raises(exc.BadRequest):
        tc.instances.promote_to_replica_source(inst)
    with pytest.raises(exc.BadRequest):
        tc.instances.eject_replica_source(inst)
    # TROVE-ACT-RESET-STATUS is admin-only by policy.
    with pytest.raises(exc.Forbidden):
        tc.instances.reset_status(inst)
    msg = fault(raw(env, "POST", f"/instances/{inst}/action", {"explode": {}}), 400, "badRequest")
    assert "explode" in msg
    fault(raw(env, "POST", f"/instances/{inst}/action", {"restart": {}, "reset_status": {}}),
          400, "badRequest")
    fault(raw(env, "POST", f"/instances/{inst}/action", {}), 400, "badRequest")
    r = requests.post(
        f"{env['url']}/v1.0/{env['demo_project']}/instances/{inst}/action",
        data="{not json", headers={"X-Auth-Token": env["demo_token"]}, timeout=10,
    )
    fault(r, 400, "badRequest")
    fault(raw(env, "POST", f"/instances/{inst}/action", {"restart": 3}), 400, "badRequest")
    fault(raw(env, "GET", "/no-such-collection"), 404, "itemNotFound")
    fault(raw(env, "PATCH", f"/instances/{inst}/action"), 405, "badMethod")
    # No token: 401 in Trove's shape.
    r = requests.get(f"{env['url']}/v1.0/{env['demo_project']}/instances", timeout=10)
    fault(r, 401, "unauthorized")


def test_update_rename_and_errors(env, inst):
    tc = env["tc"]
    # TROVE-INST-UPDATE: rename applies at once.
    tc.instances.update(inst, name="compat-db-renamed")
    assert tc.instances.get(inst).name == "compat-db-renamed"
    # detach of a non-replica: 400
    with pytest.raises(exc.BadRequest):
        tc.instances.update(inst, detach_replica_source=True)
    fault(raw(env, "PUT", f"/instances/{inst}", {"instance": {"flavor": "x"}}), 400, "badRequest")
    fault(raw(env, "PUT", f"/instances/{inst}",
              {"instance": {"replica_of": None, "configuration": None}}), 400, "badRequest")
    fault(raw(env, "PATCH", f"/instances/{inst}", {"instance": {"configuration": "c1"}}),
          404, "itemNotFound")
    # access is stored and shown
    tc.instances.update(inst, is_public=True, allowed_cidrs=["10.0.0.0/24"])
    assert tc.instances.get(inst).access == {"is_public": True, "allowed_cidrs": ["10.0.0.0/24"]}


def test_create_errors(env):
    tc = env["tc"]
    with pytest.raises(exc.BadRequest):
        tc.instances.create("x", flavor_id="999", volume={"size": 1})
    with pytest.raises(exc.BadRequest):
        tc.instances.create("x", flavor_id="2")  # no volume
    with pytest.raises(exc.RequestEntityTooLarge):
        tc.instances.create("x", flavor_id="2", volume={"size": 50})
    with pytest.raises(exc.NotFound):
        tc.instances.create("r", replica_of=str(uuid.uuid4()))
    with pytest.raises(exc.BadRequest):
        tc.instances.create("r", flavor_id="2", replica_of="dev-orders-2")
    fault(raw(env, "POST", "/instances", {"instance": {"flavorRef": "2"}}), 400, "badRequest")
    fault(raw(env, "POST", "/instances", {"instance": {"name": "a", "flavorRef": "2",
                                                       "volume": {"size": 1},
                                                       "replica_count": 2}}), 400, "badRequest")


def test_mgmt_actions(env, inst):
    tc, admin = env["tc"], env["admin_tc"]
    # Non-admins get 401 on /mgmt (spec decision 8).
    with pytest.raises(exc.Unauthorized):
        tc.mgmt_instances.show(inst)
    with pytest.raises(exc.Unauthorized):
        tc.mgmt_instances.stop(inst)
    # TROVE-MGMT-SHOW
    m = admin.mgmt_instances.show(inst)
    assert m.server["host"] in ("host-1", "host-2")
    assert m.task_description == "No tasks for the instance."
    assert m.tenant_id == env["demo_project"]
    first_host = m.server["host"]
    # TROVE-MGMT-LIST
    assert inst in [i.id for i in admin.mgmt_instances.list()]
    # TROVE-MGMT-STOP answers after the guest confirmed.
    admin.mgmt_instances.stop(inst)
    assert state(tc, inst) == ("ACTIVE", "SHUTDOWN")
    # TROVE-MGMT-REBOOT
    admin.mgmt_instances.reboot(inst)
    wait_steady(tc, inst)
    # TROVE-MGMT-MIGRATE without a host: another host; with a host: that host.
    admin.mgmt_instances.migrate(inst)
    wait_steady(tc, inst)
    second = admin.mgmt_instances.show(inst).server["host"]
    assert second != first_host
    admin.mgmt_instances.migrate(inst, host=first_host)
    wait_steady(tc, inst)
    assert admin.mgmt_instances.show(inst).server["host"] == first_host
    with pytest.raises(exc.BadRequest):
        admin.mgmt_instances.migrate(inst, host="no-such-host")
    # TROVE-MGMT-REBUILD
    with pytest.raises(exc.BadRequest):
        admin.mgmt_instances.rebuild(inst, "not-a-uuid")
    admin.mgmt_instances.rebuild(inst, str(uuid.uuid4()))
    wait_steady(tc, inst)
    # TROVE-ACT-RESET-STATUS (admin): operating_status ERROR; a restart is refused (422).
    admin.instances.reset_status(inst)
    assert tc.instances.get(inst).operating_status == "ERROR"
    with pytest.raises(exc.UnprocessableEntity):
        tc.instances.restart(inst)
    # TROVE-MGMT-RESET-TASK, then a reboot recovers.
    admin.mgmt_instances.reset_task_status(inst)
    admin.mgmt_instances.reboot(inst)
    wait_steady(tc, inst)
    # Unknown and double mgmt actions: 400.
    r = raw(env, "POST", f"/mgmt/instances/{inst}/action", {"explode": {}},
            token=env["native"].token)
    fault(r, 400, "badRequest")
    r = raw(env, "POST", f"/mgmt/instances/{inst}/action", {"stop": {}, "reboot": {}},
            token=env["native"].token)
    fault(r, 400, "badRequest")
    r = raw(env, "POST", f"/mgmt/instances/{inst}/action",
            {"rebuild": {"image_id": str(uuid.uuid4()), "x": 1}}, token=env["native"].token)
    fault(r, 400, "badRequest")


def test_delete_and_deleted_views(env):
    tc, admin = env["tc"], env["admin_tc"]
    i = tc.instances.create("compat-doomed", flavor_id="1", volume={"size": 1})
    # TROVE-INST-DELETE while BUILD: 422
    with pytest.raises(exc.UnprocessableEntity):
        tc.instances.delete(i.id)
    wait_steady(tc, i.id)
    tc.instances.delete(i.id)
    wait_gone(tc, i.id)
    # The admin still sees it as deleted.
    assert i.id in [x.id for x in admin.mgmt_instances.list(deleted=True)]
    assert i.id not in [x.id for x in admin.mgmt_instances.list()]
    r = raw(env, "GET", f"/mgmt/instances/{i.id}?deleted=true", token=env["native"].token)
    assert r.status_code == 200 and r.json()["instance"]["deleted"] is True
    with pytest.raises(exc.NotFound):
        tc.instances.delete(i.id)


def test_actions_are_native_jobs(env, inst):
    # Every Trove action runs as a job visible natively.
    tc = env["tc"]
    tc.instances.restart(inst)
    wait_steady(tc, inst)
    r = env["native"].call("GET", "/drplane/v1/jobs?type=troveRestart")
    assert r.status_code == 200
    jobs = [j for j in r.json()["jobs"] if j["entities"].get("instance_id") == inst]
    assert jobs and jobs[0]["status"] == "SUCCESS"
    wait_for("no transient status", lambda: tc.instances.get(inst).status == "ACTIVE")
    assert wait_status(tc, inst, "ACTIVE")
