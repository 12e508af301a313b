"""End to end on fs agents through the Huawei SDK (issue 5): a protection group with 20
protected instances; every pair synced; known data written into the production disks;
planned failover (SDRS-PG-REVERSE) and the DR copies hold exactly that data; fail back;
then the production site's agent is killed and an unplanned failover (SDRS-PG-FAILOVER)
promotes the DR copies from their last synced point, which the job reports."""

import os
import time

import pytest

from drplane_cluster import cluster  # noqa: F401  (the fixture)
from huawei_env import (
    MIB, create_group, create_instance, group_action, make_world, server_spec, sm, stop_servers,
    wait_for,
)

N = int(os.environ.get("HW_E2E_INSTANCES", "20"))


@pytest.fixture(scope="module")
def world(cluster):  # noqa: F811
    w = make_world(cluster, "hwe")
    w.specs = [server_spec(w, f"vm{i:02d}", [("root", 1 * MIB)]) for i in range(N)]
    w.prod = f"{w.tag}-prod"
    w.dr = f"{w.tag}-dr"
    w.dr_host = w.dr
    w.start_agent(w.prod, "site-1", w.specs, vcpus=64, ram_mb=65536)
    w.start_agent(w.dr, "site-2", [], vcpus=64, ram_mb=65536)
    try:
        w.wait_online(w.prod)
        w.wait_online(w.dr)
        wait_for(lambda: all(w.server(s["id"]) for s in w.specs), 60, "servers registered")
        yield w
    finally:
        w.stop_all()


def pattern(tag, i, n=64 * 1024):
    block = f"{tag}:vm{i:02d}:".encode()
    return (block * (n // len(block) + 1))[:n]


def write_at_start(path, data):
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_start(path, n):
    with open(path, "rb") as f:
        return f.read(n)


def pairs_by_instance(world, gid):
    c = world.sdrs()
    reps = c.list_replications(sm.ListReplicationsRequest(server_group_id=gid)).replications
    out = {}
    for r in reps:
        out[r.attachment[0].protected_instance] = r
    return out


def test_twenty_instances_planned_failover_failback_and_unplanned_failover(world):
    c = world.sdrs()
    gid = create_group(world, "e2e-pg")
    # 20 protected instances (their creation fully copies each disk to site-2).
    jobs = [create_instance(world, gid, s["id"], f"pi-{i:02d}", wait=False) for i, s in enumerate(world.specs)]
    pis = []
    for j in jobs:
        job = world.job(j, timeout=300)
        assert job.status == "SUCCESS", job
        pis.append(job.entities.protected_instance_id)
    job = world.job(group_action(world, gid, "start"), timeout=300)
    assert job.status == "SUCCESS" and len(job.entities.sub_jobs) == N, job
    reps = c.list_replications(sm.ListReplicationsRequest(server_group_id=gid)).replications
    assert len(reps) == N
    assert all(r.status == "protected" and r.progress == 100 for r in reps), reps

    # Known data in every production disk.
    by_pi = {pi: world.sdrs().show_protected_instance(sm.ShowProtectedInstanceRequest(
        protected_instance_id=pi)).protected_instance for pi in pis}
    disk_of = {}  # instance -> (production volume, DR volume)
    for pi, inst in by_pi.items():
        rp = c.show_replication(sm.ShowReplicationRequest(replication_id=inst.attachment[0].replication)).replication
        prod_vol, dr_vol = rp.volume_ids.split(",")
        disk_of[pi] = (prod_vol, dr_vol)
    index = {s["disks"][0][0]: i for i, s in enumerate(world.specs)}
    for pi, (prod_vol, _) in disk_of.items():
        write_at_start(world.volume_file(world.prod, prod_vol), pattern("planned", index[prod_vol]))

    # SDRS-PG-REVERSE (planned failover): stop the production servers first.
    stop_servers(world, [s["id"] for s in world.specs])
    job = world.job(group_action(world, gid, "reverse", "target"), timeout=300)
    assert job.status == "SUCCESS", job
    g = c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)).server_group
    assert (g.status, g.priority_station) == ("protected", "target")
    for pi, (prod_vol, dr_vol) in disk_of.items():
        want = pattern("planned", index[prod_vol])
        got = read_start(world.volume_file(world.dr, dr_vol), len(want))
        assert got == want, f"DR copy of {pi} differs after the planned failover"

    # Fail back (SDRS-PG-REVERSE to source): the DR servers are stopped (never started).
    job = world.job(group_action(world, gid, "reverse", "source"), timeout=300)
    assert job.status == "SUCCESS", job
    assert c.show_protection_group(sm.ShowProtectionGroupRequest(
        server_group_id=gid)).server_group.priority_station == "source"

    # New data, synced by the periodic replication, then a disaster.
    for pi, (prod_vol, _) in disk_of.items():
        write_at_start(world.volume_file(world.prod, prod_vol), pattern("synced", index[prod_vol]))
    t_written = time.time()

    wait_for(lambda: _rp_after(world, gid, t_written), 180, "every pair synced after the write")
    # A last write that is never synced: the DR copies must not hold it.
    for pi, (prod_vol, _) in disk_of.items():
        write_at_start(world.volume_file(world.prod, prod_vol), pattern("lost!!", index[prod_vol]))
    world.kill_agent(world.prod)
    job_id = group_action(world, gid, "failover")
    job = world.job(job_id, timeout=300)
    assert (job.status, job.job_type) == ("SUCCESS", "failoverProtectionGroupNoCG"), job
    raw_job = world.sdrs().show_job_status(sm.ShowJobStatusRequest(job_id=job_id)).raw_content
    assert b"recovery_point" in (raw_job if isinstance(raw_job, bytes) else raw_job.encode()), raw_job
    g = c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid)).server_group
    assert (g.status, g.priority_station) == ("failed-over", "target")
    for pi, (prod_vol, dr_vol) in disk_of.items():
        want = pattern("synced", index[prod_vol])
        got = read_start(world.volume_file(world.dr, dr_vol), len(want))
        assert got == want, f"DR copy of {pi} does not hold the last synced data"
        inst = c.show_protected_instance(sm.ShowProtectedInstanceRequest(protected_instance_id=pi)).protected_instance
        assert inst.status == "failed-over"


def _rp_after(world, gid, t):
    """Every pair's recovery point (a drplane addition to the pair view) is after t."""
    from huawei_env import raw

    r = raw(world, "GET", f"/v1/{world.project}/replications", query={"server_group_id": gid})
    reps = r.json()["replications"]
    for p in reps:
        rp = p.get("recovery_point")
        if not rp:
            return False
        ts = time.mktime(time.strptime(rp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        if ts < t:
            return False
    return bool(reps)
