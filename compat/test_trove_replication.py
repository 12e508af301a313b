"""End to end (issue #7): a Trove replication set of one source and two replicas on three
hosts, driven by python-troveclient: promote a replica (TROVE-ACT-PROMOTE), then kill the
new source's agent and eject it (TROVE-ACT-EJECT): the most up-to-date replica becomes
the source, and at no moment does the set have two sources. The data written into the
source's volume is checked in the replicas' image files.

host-1 and host-2 are `drplane dev`'s agents; host-3 (site-3) is an agent this test
starts, so that it can kill it.
"""

import os
import threading
import time

import pytest
from troveclient.apiclient import exceptions as exc

from trove_helpers import (
    STEADY,
    ExtraAgent,
    Native,
    dev_env,
    keystone_session,
    read_at,
    trove,
    volume_file,
    wait_for,
    wait_gone,
    wait_steady,
    write_at,
)


@pytest.fixture(scope="module")
def world():
    url, dev, creds = dev_env()
    native = Native(url, creds["admin_password"])
    urls = os.environ.get("DRPLANE_URLS", url).split(",")
    agent = ExtraAgent(native, urls, creds["admin_password"], "host-3", "site-3")
    agent.start()
    demo = keystone_session(url, "demo", creds["demo_password"], "demo")
    admin = keystone_session(url, "admin", creds["admin_password"], "admin")
    project = demo.get_project_id()
    w = {
        "tc": trove(demo),
        "admin_tc": trove(admin, f"{url}/v1.0/{project}"),
        "native": native,
        "agent": agent,
        "data_dirs": [os.path.join(dev, "agent-1"), os.path.join(dev, "agent-2"), agent.data],
    }
    yield w
    agent.stop()


class SourceWatch:
    """Polls the set in the background and records any moment with two sources."""

    def __init__(self, tc, ids):
        self.tc, self.ids = tc, ids
        self.violations = []
        self.seen_status = set()
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sources(self):
        views = [self.tc.instances.get(i) for i in self.ids]
        self.seen_status.update(v.status for v in views)
        return [v.id for v in views
                if getattr(v, "replicas", None) and not getattr(v, "replica_of", None)]

    def run(self):
        while not self.stop_flag.is_set():
            try:
                sources = self.sources()
                # Each GET is linearizable at its own instant, and the switch is one atomic
                # command: reading the old source before it and the new one after it shows
                # two sources that never coexisted. A real double source stays: re-read.
                if len(sources) > 1:
                    sources = self.sources()
            except Exception:  # noqa: BLE001  (a transient read error is not a violation)
                time.sleep(0.2)
                continue
            if len(sources) > 1:
                self.violations.append(sources)
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.stop_flag.set()
        self.thread.join(timeout=10)


def replica_of(i):
    r = getattr(i, "replica_of", None)
    return r["id"] if r else None


def replica_ids(i):
    return sorted(r["id"] for r in getattr(i, "replicas", []) or [])


def test_promote_then_eject_the_dead_source(world):
    tc, admin, native = world["tc"], world["admin_tc"], world["native"]
    # The source on host-1 (site-1) with data at two offsets.
    m = tc.instances.create("e2e-source", flavor_id="2", volume={"size": 1},
                            availability_zone="site-1")
    m = wait_steady(tc, m.id)
    assert admin.mgmt_instances.show(m.id).server["host"] == "host-1"
    m_file = volume_file(world["data_dirs"], f"{m.id}-data")
    write_at(m_file, 0, b"first write")
    # TROVE-INST-CREATE with replica_of: R1 on host-3, R2 on host-2.
    r1 = tc.instances.create("e2e-r1", replica_of=m.id, availability_zone="site-3")
    assert replica_of(r1) == m.id
    r2 = tc.instances.create("e2e-r2", replica_of=m.id, availability_zone="site-2")
    r1 = wait_steady(tc, r1.id)
    r2 = wait_steady(tc, r2.id)
    assert admin.mgmt_instances.show(r1.id).server["host"] == "host-3"
    assert admin.mgmt_instances.show(r2.id).server["host"] == "host-2"
    m = tc.instances.get(m.id)
    assert replica_ids(m) == sorted([r1.id, r2.id])
    assert replica_of(r1) == m.id and replica_of(r2) == m.id
    for r in (r1, r2):
        f = volume_file(world["data_dirs"], f"{r.id}-data")
        assert read_at(f, 0, 11) == b"first write"
    # A replica of a replica: refused (Trove's Forbidden is a 401).
    with pytest.raises(exc.Unauthorized):
        tc.instances.create("e2e-bad", replica_of=r1.id)
    # Deleting a source with replicas: 403.
    with pytest.raises(exc.Forbidden):
        tc.instances.delete(m.id)

    ids = [m.id, r1.id, r2.id]
    # TROVE-ACT-PROMOTE: R1 becomes the source; M and R2 its replicas.
    with SourceWatch(tc, ids) as watch:
        tc.instances.promote_to_replica_source(r1.id)
        assert tc.instances.get(r1.id).status in ("PROMOTE", "ACTIVE")
        for i in ids:
            wait_steady(tc, i)
    assert watch.violations == []
    r1, m, r2 = (tc.instances.get(i) for i in (r1.id, m.id, r2.id))
    assert replica_of(r1) is None
    assert replica_ids(r1) == sorted([m.id, r2.id])
    assert replica_of(m) == r1.id and replica_of(r2) == r1.id
    for i in (r1, m, r2):
        assert (i.status, i.operating_status) == STEADY

    # New data on the new source; only R2's link syncs it (M's periodic syncs paused),
    # so R2 becomes the most up-to-date replica.
    r1_file = volume_file(world["data_dirs"], f"{r1.id}-data")
    write_at(r1_file, 4096, b"after promote")
    m_pair = admin.mgmt_instances.show(m.id).replication["pair_id"]
    r2_pair = admin.mgmt_instances.show(r2.id).replication["pair_id"]
    r = native.call("PATCH", f"/drplane/v1/pairs/{m_pair}", json={"enabled": False})
    assert r.status_code == 200, r.text
    before = native.pair(r2_pair).get("recovery_point")
    r = native.call("POST", f"/drplane/v1/pairs/{r2_pair}/actions", json={"sync": {"full": False}})
    assert r.status_code == 202, r.text
    wait_for("R2's sync", lambda: native.pair(r2_pair).get("recovery_point") != before
             and not native.pair(r2_pair).get("busy_job"))
    assert read_at(volume_file(world["data_dirs"], f"{r2.id}-data"), 4096, 13) == b"after promote"

    # The source's host dies.
    world["agent"].kill()
    # Still heartbeating (not yet marked offline): eject is refused.
    try:
        tc.instances.eject_replica_source(r1.id)
        refused = False
    except exc.BadRequest:
        refused = True
    wait_for("host-3 offline",
             lambda: (native.host("host-3") or {}).get("state") == "offline", timeout=60)
    # TROVE-ACT-EJECT of the dead source.
    with SourceWatch(tc, ids) as watch:
        if refused:
            tc.instances.eject_replica_source(r1.id)
        for i in (m.id, r2.id):
            wait_steady(tc, i)
        wait_for("R1 out of the set", lambda: not replica_ids(tc.instances.get(r1.id)))
    assert watch.violations == []
    r1, m, r2 = (tc.instances.get(i) for i in (r1.id, m.id, r2.id))
    # The most up-to-date replica (R2) is the source; M replicates from it.
    assert replica_of(r2) is None
    assert replica_ids(r2) == [m.id]
    assert replica_of(m) == r2.id
    # The ejected source is standalone.
    assert replica_of(r1) is None and not replica_ids(r1)
    # M caught up from R2 by the eject's re-pointing sync.
    assert read_at(volume_file(world["data_dirs"], f"{m.id}-data"), 4096, 13) == b"after promote"

    # Clean up: the dead host's instance goes without its host; then replica, source.
    tc.instances.delete(r1.id)
    wait_gone(tc, r1.id)
    tc.instances.delete(m.id)
    wait_gone(tc, m.id)
    assert not replica_ids(tc.instances.get(r2.id))
    tc.instances.delete(r2.id)
    wait_gone(tc, r2.id)


def test_detach_and_resize_volume_of_a_set(world):
    tc, admin = world["tc"], world["admin_tc"]
    m = tc.instances.create("e2e2-source", flavor_id="1", volume={"size": 1},
                            availability_zone="site-1")
    wait_steady(tc, m.id)
    r = tc.instances.create("e2e2-replica", replica_of=m.id, availability_zone="site-2")
    wait_steady(tc, r.id)
    # TROVE-ACT-RESIZE-VOLUME of a source grows its replica too.
    tc.instances.resize_volume(m.id, 2)
    for i in (m.id, r.id):
        assert wait_steady(tc, i).volume["size"] == 2
    # TROVE-INST-UPDATE detach: the replica becomes standalone and writable.
    tc.instances.update(r.id, detach_replica_source=True)
    wait_for("detached", lambda: replica_of(tc.instances.get(r.id)) is None
             and tc.instances.get(r.id).status == "ACTIVE")
    assert not replica_ids(tc.instances.get(m.id))
    assert admin.mgmt_instances.show(r.id)._info.get("replication") is None
    for i in (r.id, m.id):
        tc.instances.delete(i)
        wait_gone(tc, i)
