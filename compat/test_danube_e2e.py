"""End to end through `esdc-api`, with real data on `fs` agents (issue 6):

create a replica of VM "web" (two disks), write into the master's disks, wait for a periodic
sync and find the data on the slave; `enabled=false` stops the syncs, `true` resumes them;
fail over: the new master holds the data; change a few blocks on the new master and
reinit: replication runs the other way and sends only the changed blocks; delete frees the
slave's reserved resources (the VM stays counted where it runs).
"""

import os
import time

from esdc_api import Client

from danube_env import MIB, danube, wait_for  # noqa: F401  (fixtures)
from drplane_cluster import cluster  # noqa: F401

SLEEP = 2


def waited(r):
    """An ES-STREAM answer's status is the status line of its body: read it first."""
    r.raw_content
    return r


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


def sync_tasks(world, task_id):
    return [t for t in world.job(task_id)["tasks"] if t["kind"]["type"] == "sync"]


def test_replicate_failover_reinit_delete_with_data(danube):
    c = Client(api_url=danube.api, api_key=danube.api_key)
    vm = danube.vms["web"]
    master_node, slave_node = danube.nodes
    path = f"/vm/{vm.hostname}/replica/dr"
    root_id, root_size = vm.disks[0]
    data_id, _ = vm.disks[1]
    master_root = danube.disk_file(master_node, root_id)
    master_data = danube.disk_file(master_node, data_id)
    pattern = os.urandom(64 * 1024)
    write_at(master_root, 0, pattern)
    write_at(master_data, 1 * MIB, pattern[::-1])

    # DANUBE-REP-CREATE (ES-STREAM): the first sync is part of the task.
    r = waited(c.post(path, node=slave_node, sleep_time=SLEEP, enabled=True, reserve_resources=True))
    assert r.status_code == 200, r.raw_content
    task = r.content.task_id
    targets = {}
    for t in danube.job(task)["tasks"]:
        if t["kind"]["type"] == "create_target":
            targets[t["kind"]["source"]["volume_id"]] = t["kind"]["target"]["volume_id"]
    slave_root = danube.disk_file(slave_node, targets[root_id])
    slave_data = danube.disk_file(slave_node, targets[data_id])
    assert read_at(slave_root, 0, len(pattern)) == pattern
    assert read_at(slave_data, 1 * MIB, len(pattern)) == pattern[::-1]
    reserved = [x for x in danube.host(slave_node)["reservations"] if x["holder"].startswith("danube:")]
    assert reserved and reserved[0]["vcpus"] == 2 and reserved[0]["ram_mb"] == 2048

    # A periodic sync carries a new write.
    fresh = os.urandom(4096)
    write_at(master_root, 2 * MIB, fresh)
    wait_for(lambda: read_at(slave_root, 2 * MIB, 4096) == fresh, 60, "a periodic sync")
    assert c.get(path).content.result["last_sync"]

    # enabled=false stops the syncs …
    r = waited(c.put(path, enabled=False))
    assert r.status_code == 200, r.raw_content
    time.sleep(1)
    paused = os.urandom(4096)
    write_at(master_root, 3 * MIB, paused)
    last = c.get(path).content.result["last_sync"]
    time.sleep(SLEEP * 4)
    assert read_at(slave_root, 3 * MIB, 4096) != paused, "no sync while disabled"
    assert c.get(path).content.result["last_sync"] == last
    # … and true resumes them.
    r = waited(c.put(path, enabled=True))
    assert r.status_code == 200
    wait_for(lambda: read_at(slave_root, 3 * MIB, 4096) == paused, 60, "syncs to resume")

    # DANUBE-REP-FAILOVER: the master is reachable, so a final sync runs first.
    last_write = os.urandom(4096)
    write_at(master_data, 0, last_write)
    r = waited(c.put(path + "/failover", force=True))
    assert r.status_code == 200, r.raw_content
    assert r.content.result["reinit_required"] is True
    assert read_at(slave_data, 0, 4096) == last_write, "the new master holds the data"
    assert read_at(slave_root, 0, len(pattern)) == pattern
    st = c.get(f"/vm/{vm.hostname}/status").content.result
    assert st["node"] == slave_node and st["status"] == "running"

    # The new master changes one block; reinit sends only that way, only the delta.
    changed = os.urandom(4096)
    write_at(slave_root, 1 * MIB, changed)
    r = waited(c.put(path + "/reinit"))
    assert r.status_code == 200, r.raw_content
    reinit_task = r.content.task_id
    syncs = sync_tasks(danube, reinit_task)
    assert len(syncs) == 2
    sent = 0
    for t in syncs:
        assert t["kind"]["source"]["host"] == slave_node
        assert t["kind"]["target"]["host"] == master_node
        assert t["kind"]["full"] is False
        sent += int(t["output"].get("bytes_sent", "0"))
        total = int(t["output"].get("bytes_total", "0"))
        assert int(t["output"].get("bytes_sent", "0")) < total
    assert sent < root_size // 2, f"reinit sent {sent} bytes: more than the changed blocks"
    assert read_at(master_root, 1 * MIB, 4096) == changed
    shown = c.get(path).content.result
    assert shown["reinit_required"] is False and shown["enabled"] is True
    assert shown["node"] == master_node

    # Replication now runs slave_node -> master_node.
    back = os.urandom(4096)
    write_at(slave_data, 1 * MIB + 8192, back)
    wait_for(lambda: read_at(master_data, 1 * MIB + 8192, 4096) == back, 60,
             "a sync in the new direction")

    # DANUBE-REP-DELETE: the slave (now the old master's disks) goes, the reservation too.
    r = waited(c.delete(path))
    assert r.status_code == 200, r.raw_content
    assert c.get(f"/vm/{vm.hostname}/replica").content.result == []
    reserved = [x for x in danube.host(slave_node)["reservations"] if x["holder"].startswith("danube:")]
    assert reserved == []
    # The VM itself still runs on slave_node (where it failed over to) and is counted there.
    running = [x for x in danube.host(slave_node)["reservations"]
               if x["holder"] == f"danube-vm:{vm.id}"]
    assert [(x["vcpus"], x["ram_mb"]) for x in running] == [(2, 2048)]
    assert not [x for x in danube.host(master_node)["reservations"]
                if x["holder"].startswith("danube")]
    assert not os.path.exists(master_root)
    assert os.path.exists(slave_root)
