"""Huawei SDRS and ECS through the real SDK (huaweicloudsdksdrs, huaweicloudsdkecs): every
SDRS-*/ECS-* endpoint of ../shared/spec, with their error paths, against fs agents."""

import pytest
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException

from drplane_cluster import cluster  # noqa: F401  (the fixture)
from huawei_env import (
    MIB, create_group, create_instance, em, group_action, make_world, raw, server_spec, sm,
    stop_servers, wait_for,
)


@pytest.fixture(scope="module")
def hw(cluster):  # noqa: F811
    w = make_world(cluster, "hw")
    w.servers = {
        "web": server_spec(w, "web", [("root", 2 * MIB), ("data", 1 * MIB)]),
        "app": server_spec(w, "app", [("root", 1 * MIB)]),
        "bare": server_spec(w, "bare", []),
        "mig": server_spec(w, "mig", [("root", 1 * MIB)]),
        "sh1": server_spec(w, "sh1", [("root", 1 * MIB)]),
        "vol": server_spec(w, "vol", [("root", 1 * MIB), ("extra", 1 * MIB)]),
    }
    sh2 = server_spec(w, "sh2", [("root", 1 * MIB)])
    sh2["disks"].append(w.servers["sh1"]["disks"][0])  # a shared (multi-attach) disk
    w.servers["sh2"] = sh2
    w.start_agent(f"{w.tag}-p", "site-1", list(w.servers.values()))
    w.start_agent(f"{w.tag}-d", "site-2", [])
    w.dr_host = f"{w.tag}-d"
    w.start_agent(f"{w.tag}-deh", "site-1", [])
    try:
        for h in w.hosts:
            w.wait_online(h)
        wait_for(lambda: w.server(w.servers["web"]["id"]), 60, "servers registered")
        yield w
    finally:
        w.stop_all()


def refused(fn, code, status=400):
    with pytest.raises(ClientRequestException) as e:
        fn()
    assert (e.value.error_code, e.value.status_code) == (code, status), e.value.error_msg
    return e.value


def test_sdrs_domain_list_and_pg_crud(hw):
    c = hw.sdrs()
    # SDRS-DOMAIN-LIST
    domains = c.list_active_active_domains(sm.ListActiveActiveDomainsRequest()).domains
    assert any({d.local_replication_cluster.availability_zone,
                d.remote_replication_cluster.availability_zone} == {"site-1", "site-2"}
               for d in domains)
    # SDRS-PG-CREATE
    gid = create_group(hw, "crud-pg")
    # SDRS-PG-SHOW
    g = c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)).server_group
    assert (g.status, g.priority_station, g.source_availability_zone) == ("available", "source", "site-1")
    assert g.protected_instance_num == 0 and g.server_type == "ECS"
    # SDRS-PG-RENAME
    body = sm.UpdateProtectionGroupNameRequestBody(
        server_group=sm.UpdateProtectionGroupNameRequestParams(name="crud-renamed"))
    g = c.update_protection_group_name(
        sm.UpdateProtectionGroupNameRequest(server_group_id=gid, body=body)).server_group
    assert g.name == "crud-renamed"
    # SDRS-PG-LIST with filters and paging
    r = c.list_protection_groups(sm.ListProtectionGroupsRequest(name="crud-ren", limit=10))
    assert r.count == 1 and r.server_groups[0].id == gid
    r = c.list_protection_groups(sm.ListProtectionGroupsRequest(status="protected"))
    assert all(x.status == "protected" for x in r.server_groups)
    refused(lambda: c.list_protection_groups(sm.ListProtectionGroupsRequest(limit=5000)), "SDRS.0221")
    refused(lambda: c.list_protection_groups(sm.ListProtectionGroupsRequest(status="bogus")), "SDRS.0209")
    # Errors of SDRS-PG-CREATE
    def create(**kw):
        p = dict(name="x", source_availability_zone="site-1", target_availability_zone="site-2",
                 domain_id=domains[0].id, source_vpc_id="v")
        p.update(kw)
        body = sm.CreateProtectionGroupRequestBody(server_group=sm.CreateProtectionGroupRequestParams(**p))
        return c.create_protection_group(sm.CreateProtectionGroupRequest(body=body))
    refused(lambda: create(name="bad name!"), "SDRS.0202")
    refused(lambda: create(description="<b>"), "SDRS.0212")
    refused(lambda: create(domain_id="00000000-0000-0000-0000-000000000000"), "SDRS.0205")
    refused(lambda: create(target_availability_zone="site-1"), "SDRS.0203")
    refused(lambda: create(source_vpc_id=None), "SDRS.0204")
    assert raw(hw, "POST", f"/v1/{hw.project}/server-groups", b"{not json").json()["error"]["code"] == "SDRS.0201"
    assert raw(hw, "POST", f"/v1/{hw.project}/server-groups", {"x": 1}).json()["error"]["code"] == "SDRS.0201"
    # SDRS-PG-SHOW of a missing group; an unknown action; a wrong method; an unknown path
    refused(lambda: c.show_protection_group(sm.ShowProtectionGroupRequest(
        server_group_id="11111111-1111-1111-1111-111111111111")), "SDRS.1013")
    r = raw(hw, "POST", f"/v1/{hw.project}/server-groups/{gid}/action", {"explode-server-group": {}})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "SDRS.0206")
    r = raw(hw, "POST", f"/v1/{hw.project}/server-groups/{gid}/action", {"start-server-group": {}, "stop-server-group": {}})
    assert r.json()["error"]["code"] == "SDRS.0206"
    r = raw(hw, "POST", f"/v1/{hw.project}/server-groups/{gid}/action", {"reverse-server-group": {"priority_station": "moon"}})
    assert r.json()["error"]["code"] == "SDRS.0216"
    # Nothing to protect yet: start is refused in the group's state (no pairs).
    refused(lambda: group_action(hw, gid, "start"), "SDRS.1002")
    refused(lambda: group_action(hw, gid, "failover"), "SDRS.1002")
    r = raw(hw, "PATCH", f"/v1/{hw.project}/server-groups/{gid}")
    assert (r.status_code, r.json()["error"]["code"]) == (405, "SDRS.0000")
    r = raw(hw, "GET", f"/v1/{hw.project}/no-such-thing")
    assert r.status_code == 404 and "error" in r.json()
    # Another project's path (403) and a reader (403).
    other = hw.sdrs(project="0" * 32)
    refused(lambda: other.list_protection_groups(sm.ListProtectionGroupsRequest()), "SDRS.0005", 403)
    reader = hw.sdrs(ak=hw.reader_ak, sk=hw.reader_sk)
    assert reader.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)).server_group.id == gid
    refused(lambda: reader.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=gid)), "SDRS.0005", 403)
    # A wrong secret key: 401.
    bad = hw.sdrs(sk="x" * 40)
    refused(lambda: bad.list_protection_groups(sm.ListProtectionGroupsRequest()), "SDRS.0002", 401)
    # SDRS-PG-DELETE
    job = hw.job(c.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=gid)).job_id)
    assert job.status == "SUCCESS" and job.job_type == "deleteProtectionGroupNoCG"
    refused(lambda: c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)), "SDRS.1013")


def test_sdrs_pi_create_refusals(hw):
    c = hw.sdrs()
    gid = create_group(hw, "refusals-pg")
    s = hw.servers

    def create(**kw):
        p = dict(server_group_id=gid, server_id=s["app"]["id"], name="pi")
        p.update(kw)
        body = sm.CreateProtectedInstanceRequestBody(protected_instance=sm.CreateProtectedInstanceRequestParams(**p))
        return c.create_protected_instance(sm.CreateProtectedInstanceRequest(body=body))

    refused(lambda: create(name="no spaces"), "SDRS.0202")
    refused(lambda: create(name="x" * 65), "SDRS.0202")
    refused(lambda: create(description="a>b"), "SDRS.0212")
    refused(lambda: create(server_group_id="22222222-2222-2222-2222-222222222222"), "SDRS.1013")
    refused(lambda: create(server_id="33333333-3333-3333-3333-333333333333"), "SDRS.1326")
    refused(lambda: create(primary_ip_address="10.0.0.9"), "SDRS.1380")
    refused(lambda: create(primary_subnet_id="net", primary_ip_address="10.0.0.999"), "SDRS.0219")
    refused(lambda: create(tenancy="private"), "SDRS.0228")
    refused(lambda: create(dedicated_host_id=f"{hw.tag}-d"), "SDRS.1371")
    refused(lambda: create(tenancy="dedicated", dedicated_host_id=f"{hw.tag}-deh"), "SDRS.1372")
    refused(lambda: create(server_id=s["bare"]["id"]), "SDRS.1339")
    e = refused(lambda: create(server_id=s["sh1"]["id"]), "SDRS.0201")
    assert "shared" in e.error_msg
    r = raw(hw, "POST", f"/v1/{hw.project}/protected-instances", {"protected_instance": {
        "server_group_id": gid, "server_id": s["app"]["id"], "name": "pi",
        "tags": [{"key": "a/b", "value": "v"}]}})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "SDRS.0201")
    # A server in the other zone (a group whose production zone is site-2).
    g2 = create_group(hw, "other-way", source="site-2", target="site-1")
    refused(lambda: create(server_group_id=g2), "SDRS.1303")
    # A protected server cannot be protected twice; neither can its DR server.
    pi = create_instance(hw, gid, s["app"]["id"], "pi-app")
    refused(lambda: create(), "SDRS.1305")
    dr = c.show_protected_instance(sm.ShowProtectedInstanceRequest(protected_instance_id=pi)).protected_instance.target_server
    refused(lambda: create(server_id=dr), "SDRS.1305")
    # The group cannot be deleted while it has instances.
    refused(lambda: c.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=gid)), "SDRS.1001")
    job = hw.job(c.delete_protected_instance(sm.DeleteProtectedInstanceRequest(
        protected_instance_id=pi, body=sm.DeleteProtectedInstanceRequestBody(delete_target_server=True))).job_id)
    assert job.status == "SUCCESS"
    assert hw.job(c.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=gid)).job_id).status == "SUCCESS"
    assert hw.job(c.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=g2)).job_id).status == "SUCCESS"


def test_sdrs_instance_lifecycle_pairs_and_group_actions(hw):
    c = hw.sdrs()
    s = hw.servers
    gid = create_group(hw, "life-pg")
    # SDRS-PI-CREATE: the DR server has the production server's name and a new id.
    job_id = create_instance(hw, gid, s["web"]["id"], "pi-web", wait=False, description="web tier",
                             flavor_ref="s3.large.2")
    job = hw.job(job_id)
    assert (job.status, job.job_type) == ("SUCCESS", "createProtectedInstanceNoCG"), job
    pi_id = job.entities.protected_instance_id
    dr_id = job.entities.native_server_id
    dr = hw.server(dr_id)
    assert dr["name"] == s["web"]["name"] and dr["id"] != s["web"]["id"]
    assert dr["host"] == hw.dr_host
    # SDRS-PI-SHOW / SDRS-PI-LIST / SDRS-PI-RENAME
    pi = c.show_protected_instance(sm.ShowProtectedInstanceRequest(protected_instance_id=pi_id)).protected_instance
    assert (pi.status, pi.source_server, pi.target_server) == ("available", s["web"]["id"], dr_id)
    assert [a.device for a in pi.attachment] == ["/dev/vda", "/dev/vdb"]
    r = c.list_protected_instances(sm.ListProtectedInstancesRequest(server_group_id=gid))
    assert r.count == 1 and r.protected_instances[0].id == pi_id
    r = c.list_protected_instances(sm.ListProtectedInstancesRequest(server_group_ids=f"['{gid}']", name="pi-w"))
    assert r.count == 1
    r = c.list_protected_instances(sm.ListProtectedInstancesRequest(protected_instance_ids=f'["{pi_id}"]'))
    assert r.count == 1
    many = "[" + ",".join(f"'{i}'" for i in range(31)) + "]"
    refused(lambda: c.list_protected_instances(sm.ListProtectedInstancesRequest(protected_instance_ids=many)), "SDRS.0226")
    body = sm.UpdateProtectedInstanceNameRequestBody(
        protected_instance=sm.UpdateProtectedInstanceNameRequestParams(name="pi-web-2"))
    pi = c.update_protected_instance_name(sm.UpdateProtectedInstanceNameRequest(
        protected_instance_id=pi_id, body=body)).protected_instance
    assert pi.name == "pi-web-2"
    refused(lambda: c.show_protected_instance(sm.ShowProtectedInstanceRequest(
        protected_instance_id="44444444-4444-4444-4444-444444444444")), "SDRS.1320")
    # SDRS-RP-LIST / SDRS-RP-SHOW: one pair per disk, synced.
    reps = c.list_replications(sm.ListReplicationsRequest(protected_instance_id=pi_id)).replications
    assert len(reps) == 2 and all(r.status == "available" for r in reps)
    rp = c.show_replication(sm.ShowReplicationRequest(replication_id=reps[0].id)).replication
    assert rp.progress == 100 and rp.volume_ids.split(",")[0] in [d for d, _ in s["web"]["disks"]]
    refused(lambda: c.show_replication(sm.ShowReplicationRequest(
        replication_id="55555555-5555-5555-5555-555555555555")), "SDRS.1608")
    # SDRS-RP-CREATE on another server's disk, SDRS-PI-ATTACH-RP, SDRS-PI-DETACH-RP, SDRS-RP-DELETE
    def create_rp(vol, name="rp-extra"):
        body = sm.CreateReplicationRequestBody(replication=sm.CreateReplicationRequestParams(
            server_group_id=gid, volume_id=vol, name=name))
        return c.create_replication(sm.CreateReplicationRequest(body=body))
    refused(lambda: create_rp(s["web"]["disks"][0][0]), "SDRS.1811")
    refused(lambda: create_rp("66666666-6666-6666-6666-666666666666"), "SDRS.0211")
    refused(lambda: create_rp(s["vol"]["disks"][1][0], name="bad name"), "SDRS.0202")
    job = hw.job(create_rp(s["vol"]["disks"][1][0]).job_id)
    assert job.status == "SUCCESS" and job.job_type == "createReplicationPairNoCG", job
    rid = job.entities.replication_pair_id
    assert job.entities.volume_ids.startswith(s["vol"]["disks"][1][0] + ",")

    def attach(dev):
        body = sm.ProtectedInstanceAttachReplicationRequestBody(
            replication_attachment=sm.ProtectedInstanceAttachReplicationRequestParams(replication_id=rid, device=dev))
        return c.attach_protected_instance_replication(sm.AttachProtectedInstanceReplicationRequest(
            protected_instance_id=pi_id, body=body))
    refused(lambda: attach("/dev/vda"), "SDRS.1603")
    assert hw.job(attach("/dev/vdc").job_id).status == "SUCCESS"
    refused(lambda: attach("/dev/vdd"), "SDRS.1603")
    rp = c.show_replication(sm.ShowReplicationRequest(replication_id=rid)).replication
    assert rp.attachment[0].protected_instance == pi_id
    refused(lambda: c.delete_replication(sm.DeleteReplicationRequest(replication_id=rid)), "SDRS.1605")
    job = hw.job(c.detach_protected_instance_replication(sm.DetachProtectedInstanceReplicationRequest(
        protected_instance_id=pi_id, replication_id=rid)).job_id)
    assert job.status == "SUCCESS" and job.job_type == "detachReplicationPairNew"
    refused(lambda: c.detach_protected_instance_replication(sm.DetachProtectedInstanceReplicationRequest(
        protected_instance_id=pi_id, replication_id=rid)), "SDRS.1604")
    body = sm.DeleteReplicationRequestBody(replication=sm.DeleteReplicationRequestParams(
        server_group_id=gid, delete_target_volume=True))
    assert hw.job(c.delete_replication(sm.DeleteReplicationRequest(replication_id=rid, body=body)).job_id).status == "SUCCESS"
    # SDRS-PG-START: protected; SDRS-PG-REVERSE needs stopped servers; SDRS-PG-STOP.
    job = hw.job(group_action(hw, gid, "start"))
    assert (job.status, job.job_type) == ("SUCCESS", "startProtectionGroupNoCG"), job
    assert len(job.entities.sub_jobs) == 1
    g = c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)).server_group
    assert (g.status, g.protected_instance_num, g.replication_num) == ("protected", 1, 2)
    reps = c.list_replications(sm.ListReplicationsRequest(server_group_id=gid)).replications
    assert all(r.status == "protected" for r in reps)
    refused(lambda: group_action(hw, gid, "reverse", "target"), "SDRS.1319")
    refused(lambda: group_action(hw, gid, "reverse", "source"), "SDRS.1002")
    refused(lambda: group_action(hw, gid, "start"), "SDRS.1002")
    stop_servers(hw, [s["web"]["id"]])
    job = hw.job(group_action(hw, gid, "reverse", "target"))
    assert (job.status, job.job_type) == ("SUCCESS", "reverseProtectionGroupNoCG"), job
    g = c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)).server_group
    assert (g.status, g.priority_station) == ("protected", "target")
    job = hw.job(group_action(hw, gid, "reverse", "source"))
    assert job.status == "SUCCESS", job
    job = hw.job(group_action(hw, gid, "stop"))
    assert (job.status, job.job_type) == ("SUCCESS", "stopProtectionGroupNoCG")
    assert c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)).server_group.status == "available"
    # SDRS-PI-DELETE (body optional) then the empty group goes.
    r = raw(hw, "DELETE", f"/v1/{hw.project}/protected-instances/{pi_id}", {"delete_target_server": "yes"})
    assert r.json()["error"]["code"] == "SDRS.0201"
    job = hw.job(c.delete_protected_instance(sm.DeleteProtectedInstanceRequest(
        protected_instance_id=pi_id, body=sm.DeleteProtectedInstanceRequestBody(delete_target_server=True))).job_id)
    assert job.status == "SUCCESS" and job.job_type == "deleteProtectedInstanceNoCG"
    hw.admin.call("GET", f"/drplane/v1/servers/{dr_id}", ok=(404,))
    assert hw.job(c.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=gid)).job_id).status == "SUCCESS"


def test_sdrs_job_show_errors(hw):
    c = hw.sdrs()
    refused(lambda: c.show_job_status(sm.ShowJobStatusRequest(job_id="0" * 32)), "SDRS.0408", 404)


def test_ecs_stop_show_and_migrate(hw):
    e = hw.ecs()
    sid = hw.servers["mig"]["id"]
    # ECS-SERVER-SHOW
    srv = e.show_server(em.ShowServerRequest(server_id=sid)).server
    assert (srv.status, srv.name) == ("ACTIVE", hw.servers["mig"]["name"])
    refused(lambda: e.show_server(em.ShowServerRequest(server_id="77777777-7777-7777-7777-777777777777")), "Ecs.0114", 404)

    def migrate(deh=None, option=True):
        body = em.MigrateServerRequestBody(migrate=em.MigrateServerOption(dedicated_host_id=deh) if option else None)
        return e.migrate_server(em.MigrateServerRequest(server_id=sid, body=body))
    # ECS-MIGRATE of a running server: Ecs.0100.
    refused(lambda: migrate(f"{hw.tag}-deh"), "Ecs.0100")
    # ECS-SERVER-BATCH-STOP, then ECS-JOB-SHOW with its sub-job.
    stop_servers(hw, [sid])
    job = e.show_job(em.ShowJobRequest(job_id=stop_job(hw, sid)))
    assert job.entities.sub_jobs_total == 1 and job.entities.sub_jobs[0].entities.server_id == sid
    assert e.show_server(em.ShowServerRequest(server_id=sid)).server.status == "SHUTOFF"
    refused(lambda: migrate(None, option=False), "Ecs.0000")  # not on a DeH
    refused(lambda: migrate(f"{hw.tag}-d"), "Ecs.0000")  # a DeH in another AZ
    r = raw(hw, "POST", f"/v1/{hw.project}/cloudservers/{sid}/migrate", {"migrate": "now"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "Ecs.0005")
    # To the DeH: SUCCESS only once the disks are on the new host.
    job_id = migrate(f"{hw.tag}-deh").job_id
    wait_for(lambda: e.show_job(em.ShowJobRequest(job_id=job_id)).status in ("SUCCESS", "FAIL"), 120, "migration")
    job = e.show_job(em.ShowJobRequest(job_id=job_id))
    assert (job.status, job.job_type, job.entities.server_id) == ("SUCCESS", "migrateServer", sid), job
    assert hw.server(sid)["host"] == f"{hw.tag}-deh"
    hw.volume_file(f"{hw.tag}-deh", hw.servers["mig"]["disks"][0][0])
    srv = e.show_server(em.ShowServerRequest(server_id=sid)).server
    assert srv.status == "SHUTOFF"
    refused(lambda: migrate(f"{hw.tag}-deh"), "Ecs.0221")
    # Back to the public pool (another host of site-1).
    job_id = migrate(None).job_id
    wait_for(lambda: e.show_job(em.ShowJobRequest(job_id=job_id)).status == "SUCCESS", 120, "migration back")
    back = hw.server(sid)["host"]
    assert back != f"{hw.tag}-deh" and hw.admin.get(f"/drplane/v1/hosts/{back}")["site"] == "site-1"
    refused(lambda: e.show_job(em.ShowJobRequest(job_id="f" * 32)), "SDRS.0408", 404)


def stop_job(hw, sid):
    e = hw.ecs()
    body = em.BatchStopServersRequestBody(os_stop=em.BatchStopServersOption(servers=[em.ServerId(id=sid)]))
    return e.batch_stop_servers(em.BatchStopServersRequest(body=body)).job_id
