"""Identity and access across the five families (issue 4, "Tests that must exist"), through
the vendors' real clients: huaweicloudsdk{core,sdrs,ecs}, esdc-api, python-troveclient,
python-manilaclient, keystoneauth1.

Everything runs in a world of its own (identity_helpers.make_world): projects A and B,
A's reader, member and admin, B's member, two agents in sites no other suite uses.

1. Credentials, per family: valid, missing, expired, revoked, wrong signature / password /
   key, wrong project; each refusal in the family's own error shape.
   Expiry: the native tokens API issues a token with `expires_in_secs: 1` (the only short
   lifetime there is: Keystone and Danube logins last `token_ttl` / `danube_token_ttl`,
   one hour, with no server setting); Huawei: a request signed 16 minutes ago (the SDK's
   signer clock patched).

2. The role matrix (ROLE_MATRIX below): reader, member and admin of project A against a
   read, a write and an admin operation of every family.

3. Tenant isolation: B's member, on B's own paths, against A's resources gets exactly the
   answer a missing id gets (status and body, the id aside), and changes nothing; the
   same for the native jobs every family's operations are.

Also: Keystone's `token` method keeps the presented token's expiry; role changes and a
disabled user take effect at the next request in every family; failed logins are rate
limited per user name in each login's shape; no secret reaches the nodes' logs.
"""

import datetime as dt
import hashlib
import json
import os
import secrets
import time
import uuid

import pytest
import requests
from esdc_api import Client as DanubeClient
from esdc_api.exceptions import ClientError
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import noauth
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3
from manilaclient import exceptions as mexc
from troveclient import client as trove_client
from troveclient.apiclient import exceptions as texc

from drplane_cluster import cluster  # noqa: F401  (the fixture)
from huawei_env import em, sm
from identity_helpers import (
    MANILA_VERSION,
    create_group,
    make_world,
    new_user,
    password_session,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    not os.environ.get("DRPLANE_DEV_DIR"), reason="needs scripts/compat.sh (drplane dev)"
)

# What each role may do, per family (issue 4 "Authorization"; the operations are documented
# in the tests below). "ok" = allowed; otherwise (status, error shape).
ROLE_MATRIX = {
    # family: {role: (read, write, admin)}
    "sdrs": {  # list groups / create, rename, delete a group / another project's path
        "reader": ("ok", (403, "SDRS.0005"), (403, "SDRS.0005")),
        "member": ("ok", "ok", (403, "SDRS.0005")),
        "admin": ("ok", "ok", "ok"),
    },
    "ecs": {  # show server / batch stop (os-stop) / another project's path
        "reader": ("ok", (403, "Ecs.0003"), (403, "Ecs.0003")),
        "member": ("ok", "ok", (403, "Ecs.0003")),
        "admin": ("ok", "ok", "ok"),
    },
    "trove": {  # list + show / rename (PATCH) / mgmt list + show (spec decision 8: 401)
        "reader": ("ok", (403, "forbidden"), (401, "unauthorized")),
        "member": ("ok", "ok", (401, "unauthorized")),
        "admin": ("ok", "ok", "ok"),
    },
    "manila": {  # list replicas + show share / create + delete a replica / reset_status
        "reader": ("ok", (403, "forbidden"), (403, "forbidden")),
        "member": ("ok", "ok", (403, "forbidden")),
        "admin": ("ok", "ok", "ok"),
    },
    "danube": {  # list + show replicas / update a replica / another project's VM
        "reader": ("ok", (403, "You do not have permission to perform this action."),
                   (404, "VM not found")),
        "member": ("ok", "ok", (404, "VM not found")),
        "admin": ("ok", "ok", "ok"),
    },
}
ROLES = ["reader", "member", "admin"]


@pytest.fixture(scope="module")
def w(cluster, tmp_path_factory):  # noqa: F811
    root = os.environ.get("DRPLANE_DEV_DIR") or str(tmp_path_factory.mktemp("identity"))
    world = make_world(cluster, root)
    yield world
    world.close()


# ---- error shapes ----------------------------------------------------------------------


def hw_fault(r, status, code):
    """A Huawei error: `{"error": {"code", "message"}}` with `status`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


def apigw_401(r):
    """ECS's 401: the API gateway's `{"error_code": "APIGW.0301", "error_msg"}`."""
    assert r.status_code == 401, r.text
    body = r.json()
    assert sorted(body) == ["error_code", "error_msg"] and body["error_code"] == "APIGW.0301", body


def os_fault(r, status, name):
    """An OpenStack fault (Trove, Manila): `{"<name>": {"code": status, "message"}}`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == [name], body
    assert body[name]["code"] == status and body[name]["message"], body


def keystone_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["title"] and err["message"], err


def detail(r, status, text=None):
    """A Danube exception answer: `{"detail": …}`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["detail"], body
    if text is not None:
        assert body["detail"] == text, body


def hw_raises(fn, status, code):
    with pytest.raises(ClientRequestException) as e:
        fn()
    assert (e.value.status_code, e.value.error_code) == (status, code), e.value
    return e.value


def dn_raises(fn, status, text=None):
    with pytest.raises(ClientError) as e:
        fn()
    assert e.value.status_code == status, (e.value.status_code, e.value.detail)
    if text is not None:
        assert e.value.detail == text, e.value.detail
    return e.value


def _fill(body, value):
    """`body` with every "{}" replaced by `value` (None stays None)."""
    if body is None:
        return None
    return json.loads(json.dumps(body).replace('"{}"', json.dumps(value)))


def same_answer(mine, my_id, gone, gone_id):
    """A's resource and a missing one answer alike: status, content type and body (each
    with its own id replaced)."""
    assert mine.status_code == gone.status_code, (mine.status_code, mine.text, gone.text)
    assert mine.headers.get("content-type") == gone.headers.get("content-type")
    assert mine.text.replace(my_id, "<ID>") == gone.text.replace(gone_id, "<ID>"), (
        mine.text, gone.text)
    return mine


# ---- Huawei SDRS / ECS: credentials ----------------------------------------------------


class _Skewed(dt.datetime):
    """`datetime` for the SDK's signer module: its `utcnow()` is off by `offset`."""

    offset = dt.timedelta(0)

    @classmethod
    def utcnow(cls):
        return dt.datetime.utcnow() + cls.offset


def _groups(c):
    return c.list_protection_groups(sm.ListProtectionGroupsRequest())


def _show_server(e, sid):
    return e.show_server(em.ShowServerRequest(server_id=sid)).server


def test_huawei_credentials(w, monkeypatch):
    a, b = w.a["id"], w.b["id"]
    m = w.users["member"]

    # Valid: BasicCredentials(AK, SK, project) + with_endpoint, no IAM.
    assert w.group in [g.id for g in _groups(w.sdrs("member")).server_groups]
    assert _show_server(w.ecs("member"), w.ecs_server).id == w.ecs_server

    # Missing: no Authorization, no X-Auth-Token.
    hw_fault(w.get(f"/v1/{a}/server-groups"), 401, "SDRS.0002")
    apigw_401(w.get(f"/v1/{a}/cloudservers/{w.ecs_server}"))

    # Wrong signature: the right AK signed with a wrong SK; an AK nobody issued.
    wrong_sk = secrets.token_hex(20)
    hw_raises(lambda: _groups(w.sdrs(ak=m.ak, sk=wrong_sk)), 401, "SDRS.0002")
    hw_raises(lambda: _show_server(w.ecs(ak=m.ak, sk=wrong_sk), w.ecs_server), 401, "APIGW.0301")
    hw_fault(w.hw_raw("member", "GET", f"/v1/{a}/server-groups", sk=wrong_sk), 401, "SDRS.0002")
    hw_raises(lambda: _groups(w.sdrs(ak="ZZ" + m.ak[2:], sk=m.sk)), 401, "SDRS.0002")

    # Revoked: an AK deleted through the identity API stops working at once.
    k = w.admin.call("POST", "/drplane/v1/identity/access-keys", {"user": m.name})
    w.seen.add(k["secret_key"])
    c = w.sdrs(ak=k["access_key"], sk=k["secret_key"])
    e = w.ecs(ak=k["access_key"], sk=k["secret_key"])
    assert w.group in [g.id for g in _groups(c).server_groups]
    w.admin.call("DELETE", f"/drplane/v1/identity/access-keys/{k['access_key']}")
    hw_raises(lambda: _groups(c), 401, "SDRS.0002")
    hw_raises(lambda: _show_server(e, w.ecs_server), 401, "APIGW.0301")

    # Expired: X-Sdk-Date outside the 15-minute window, through the SDK (its signer's
    # clock is patched), both ways; 14 minutes off is still inside.
    import huaweicloudsdkcore.signer.signer as signer_module

    monkeypatch.setattr(signer_module, "datetime", _Skewed)
    for minutes, ok in ((-16, False), (16, False), (-14, True), (14, True)):
        _Skewed.offset = dt.timedelta(minutes=minutes)
        if ok:
            assert w.group in [g.id for g in _groups(w.sdrs("member")).server_groups]
        else:
            hw_raises(lambda: _groups(w.sdrs("member")), 401, "SDRS.0002")
            hw_raises(lambda: _show_server(w.ecs("member"), w.ecs_server), 401, "APIGW.0301")
    monkeypatch.undo()
    old = (dt.datetime.utcnow() - dt.timedelta(minutes=16)).strftime("%Y%m%dT%H%M%SZ")
    hw_fault(w.hw_raw("member", "GET", f"/v1/{a}/server-groups", sdk_date=old), 401, "SDRS.0002")

    # Wrong project. A's AK/SK with project B in the credentials (path and X-Project-Id B):
    # the signature is right, the project is not the key's: 403.
    hw_raises(lambda: _groups(w.sdrs("member", project=b)), 403, "SDRS.0005")
    hw_raises(lambda: _show_server(w.ecs("member", project=b), w.ecs_server), 403, "Ecs.0003")
    hw_fault(w.hw_raw("member", "GET", f"/v1/{b}/server-groups", project=b), 403, "SDRS.0005")
    # B's AK/SK on A's path (and X-Project-Id A): 403 too, as on a project that does not
    # exist (B learns nothing about A).
    hw_raises(lambda: _groups(w.sdrs("b", project=a)), 403, "SDRS.0005")
    nowhere = uuid.uuid4().hex
    same_answer(w.hw_raw("b", "GET", f"/v1/{a}/server-groups", project=a), a,
                w.hw_raw("b", "GET", f"/v1/{nowhere}/server-groups", project=nowhere), nowhere)
    # X-Project-Id differing from the path's project: 401 (clients.md §1.3 step 9).
    hw_fault(w.hw_raw("member", "GET", f"/v1/{a}/server-groups", x_project_id=b), 401, "SDRS.0002")

    # X-Auth-Token (also accepted by the Huawei families): valid, expired, revoked, and
    # another project's.
    tok = w.native_token("member")["token"]
    assert w.get(f"/v1/{a}/server-groups", token=tok).status_code == 200
    hw_fault(w.get(f"/v1/{a}/server-groups", token=w.wait_expired()), 401, "SDRS.0002")
    apigw_401(w.get(f"/v1/{a}/cloudservers/{w.ecs_server}", token=w.expiring))
    hw_fault(w.get(f"/v1/{b}/server-groups", token=tok), 403, "SDRS.0005")
    w.admin.call("DELETE", f"/drplane/v1/identity/tokens/{_sha256(tok)}")
    hw_fault(w.get(f"/v1/{a}/server-groups", token=tok), 401, "SDRS.0002")


def _sha256(s):
    return hashlib.sha256(s.encode()).hexdigest()


# ---- Keystone (Trove, Manila): credentials ---------------------------------------------


def _revoked_login(w, who):
    """A fresh password login of `who` whose token is then revoked with DELETE
    /v3/auth/tokens sent through the same keystoneauth session; (session, token)."""
    c = w.users[who]
    sess = password_session(w.url, c.name, c.password, c.project_name)
    tok = sess.get_token()
    w.seen.add(tok)
    r = sess.delete(f"{w.url}/v3/auth/tokens", headers={"X-Subject-Token": tok})
    assert r.status_code == 204, r.text
    return sess, tok


def test_trove_credentials(w):
    a = w.a["id"]
    m = w.users["member"]

    # Valid: keystoneauth1 password plugin, endpoint from the catalog ('database').
    assert w.db in [i.id for i in w.trove("member").instances.list()]

    # Missing: no X-Auth-Token (plain HTTP), and the client with keystoneauth's NoAuth
    # (it sends the placeholder token 'notused').
    os_fault(w.get(f"/v1.0/{a}/instances"), 401, "unauthorized")
    ep = w.trove_ep()
    tc = trove_client.Client("1.0", session=ks_session.Session(auth=noauth.NoAuth(endpoint=ep)),
                             endpoint_override=ep)
    with pytest.raises(texc.Unauthorized):
        tc.instances.list()

    # Wrong password: the Keystone login answers 401 and the client cannot start.
    bad = password_session(w.url, m.name, "not-" + m.password, m.project_name)
    with pytest.raises(ks_exc.Unauthorized):
        trove_client.Client("1.0", session=bad).instances.list()
    keystone_error(_login_raw(w, m.name, "not-" + m.password, m.project_name), 401)

    # Expired: a token issued for one second.
    with pytest.raises(texc.Unauthorized):
        w.trove_with_token(w.wait_expired()).instances.list()
    os_fault(w.get(f"/v1.0/{a}/instances", token=w.expiring), 401, "unauthorized")

    # Revoked (DELETE /v3/auth/tokens): refused at once; a password session then simply
    # logs in again (keystoneauth re-authenticates after the 401).
    sess, tok = _revoked_login(w, "member")
    with pytest.raises(texc.Unauthorized):
        w.trove_with_token(tok).instances.list()
    os_fault(w.get(f"/v1.0/{a}/instances", token=tok), 401, "unauthorized")
    assert w.db in [i.id for i in trove_client.Client("1.0", session=sess).instances.list()]
    assert sess.get_token() != tok

    # Wrong project: B's token on A's endpoint: 403.
    with pytest.raises(texc.Forbidden):
        w.trove("b", project=a).instances.list()
    os_fault(w.get(f"/v1.0/{a}/instances", token=w.token("b")), 403, "forbidden")
    nowhere = uuid.uuid4().hex
    same_answer(w.get(f"/v1.0/{a}/instances/{w.db}", token=w.token("b")), a,
                w.get(f"/v1.0/{nowhere}/instances/{w.db}", token=w.token("b")), nowhere)
    # And B's member cannot even log in scoped to A.
    bu = w.users["b"]
    with pytest.raises(ks_exc.Unauthorized):
        password_session(w.url, bu.name, bu.password, w.a["name"]).get_token()


def test_keystone_token_method_keeps_the_expiry(w):
    """POST /v3/auth/tokens with the `token` method (keystoneauth1's v3.Token plugin):
    the new token expires when the presented one does, as in Keystone (otherwise any
    token could be renewed forever); an expired or revoked token, or a project the user
    has no role on, gets no token."""
    t = w.native_token("member", expires_in_secs=3)
    expires = dt.datetime.fromisoformat(t["expires_at"].replace("Z", "+00:00"))
    auth = v3.Token(auth_url=w.url + "/v3", token=t["token"], project_name=w.a["name"],
                    project_domain_name="Default")
    sess = ks_session.Session(auth=auth)
    new = sess.get_token()
    w.seen.add(new)
    assert new != t["token"]
    assert auth.get_access(sess).expires <= expires
    tc = w.trove_with_token(new)
    assert w.db in [i.id for i in tc.instances.list()]
    left = (expires - dt.datetime.now(dt.timezone.utc)).total_seconds()
    time.sleep(max(0.0, left) + 0.5)
    with pytest.raises(texc.Unauthorized):
        tc.instances.list()
    for token in (w.wait_expired(), _revoked_login(w, "member")[1]):
        with pytest.raises(ks_exc.Unauthorized):
            ks_session.Session(auth=v3.Token(
                auth_url=w.url + "/v3", token=token, project_name=w.a["name"],
                project_domain_name="Default")).get_token()
    with pytest.raises(ks_exc.Unauthorized):
        ks_session.Session(auth=v3.Token(
            auth_url=w.url + "/v3", token=w.token("b"), project_name=w.a["name"],
            project_domain_name="Default")).get_token()


def _login_raw(w, user, password, project_name):
    body = {"auth": {
        "identity": {"methods": ["password"], "password": {
            "user": {"name": user, "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": project_name, "domain": {"name": "Default"}}},
    }}
    return requests.post(f"{w.url}/v3/auth/tokens", json=body, timeout=30)


def _mv():
    return {"X-OpenStack-Manila-API-Version": MANILA_VERSION}


def test_manila_credentials(w):
    a = w.a["id"]
    m = w.users["reader"]
    path = f"/v2/{a}/share-replicas/detail?share_id={w.share}"

    # Valid: keystoneauth1 password plugin, endpoint from the catalog ('sharev2').
    assert w.active_replica in [r.id for r in w.manila("member").share_replicas.list(share=w.share)]

    # Missing.
    os_fault(w.get(path, headers=_mv()), 401, "unauthorized")

    # Wrong password.
    bad = password_session(w.url, m.name, "not-" + m.password, m.project_name)
    with pytest.raises(ks_exc.Unauthorized):
        from manilaclient import client as manila_client

        manila_client.Client(MANILA_VERSION, session=bad).share_replicas.list(share=w.share)

    # Expired (manila's own token path: input_auth_token + service_catalog_url).
    with pytest.raises(mexc.Unauthorized):
        w.manila_with_token(w.wait_expired()).share_replicas.list(share=w.share)
    os_fault(w.get(path, token=w.expiring, headers=_mv()), 401, "unauthorized")

    # Revoked.
    _, tok = _revoked_login(w, "reader")
    with pytest.raises(mexc.Unauthorized):
        w.manila_with_token(tok).share_replicas.list(share=w.share)
    os_fault(w.get(path, token=tok, headers=_mv()), 401, "unauthorized")

    # Wrong project: B's token on A's endpoint.
    with pytest.raises(mexc.Forbidden):
        w.manila("b", project=a).share_replicas.list(share=w.share)
    os_fault(w.get(path, token=w.token("b"), headers=_mv()), 403, "forbidden")
    nowhere = uuid.uuid4().hex
    same_answer(w.get(path, token=w.token("b"), headers=_mv()), a,
                w.get(path.replace(a, nowhere), token=w.token("b"), headers=_mv()), nowhere)


# ---- Danube: credentials ---------------------------------------------------------------


def test_danube_credentials(w):
    vm, rep = w.vm["hostname"], w.repname
    m = w.users["member"]
    replicas = f"/vm/{vm}/replica"

    # Valid: ES-API-KEY, and Authorization: Token after login().
    assert w.danube("member").get(replicas).content.result == [rep]
    c = DanubeClient(api_url=w.api)
    r = c.login(m.name, m.password)
    assert r.ok, r.content
    assert c.get(replicas).content.result == [rep]

    # Missing.
    dn_raises(lambda: DanubeClient(api_url=w.api).get(replicas).content, 401,
              "Authentication credentials were not provided.")
    detail(w.get(f"/api{replicas}/"), 401, "Authentication credentials were not provided.")

    # Wrong key / wrong password.
    dn_raises(lambda: w.danube(api_key=secrets.token_hex(20)).get(replicas).content, 401,
              "Invalid API key.")
    detail(w.get(f"/api{replicas}/", headers={"ES-API-KEY": secrets.token_hex(20)}), 401)
    failed = DanubeClient(api_url=w.api)
    r = failed.login(m.name, "not-" + m.password)
    assert r.status_code == 400 and not failed.is_authenticated()
    detail(requests.post(f"{w.api}/accounts/login/", json={"username": m.name, "password": "x"},
                         timeout=30), 400)

    # Revoked: an API key deleted through the identity API; a token after logout().
    k = w.admin.call("POST", "/drplane/v1/identity/api-keys", {"user": m.name})
    w.seen.add(k["key"])
    kc = w.danube(api_key=k["key"])
    assert kc.get(replicas).content.result == [rep]
    w.admin.call("DELETE", f"/drplane/v1/identity/api-keys/{k['id']}")
    dn_raises(lambda: kc.get(replicas).content, 401, "Invalid API key.")
    saved = c.headers["Authorization"]
    w.seen.add(saved.split()[-1])
    assert c.logout().ok and not c.is_authenticated()
    c.headers["Authorization"] = saved  # a client that kept the token
    dn_raises(lambda: c.get(replicas).content, 401, "Invalid token.")
    detail(w.get(f"/api{replicas}/", headers={"Authorization": saved}), 401, "Invalid token.")

    # Expired: Authorization: Token with a token issued for one second.
    c.headers["Authorization"] = f"Token {w.wait_expired()}"
    dn_raises(lambda: c.get(replicas).content, 401, "Invalid token.")

    # Wrong project: B's key on A's VM answers as for a missing VM; a DC named after A's
    # project is not B's DC.
    dn_raises(lambda: w.danube("b").get(replicas).content, 404, "VM not found")
    bk = {"ES-API-KEY": w.users["b"].api_key}
    same_answer(w.get(f"/api/dc/{w.a['name']}{replicas}/", headers=bk), w.a["name"],
                w.get(f"/api/dc/{w.tag}-nodc{replicas}/", headers=bk), f"{w.tag}-nodc")
    detail(w.get(f"/api/dc/{w.a['name']}{replicas}/", headers=bk), 404, "Datacenter not found")
    # ... while A's member may use A's DC name.
    assert w.danube("member").get(f"/dc/{w.a['name']}{replicas}").content.result == [rep]


# ---- the role matrix -------------------------------------------------------------------


def _expect(family, role):
    return dict(zip(("read", "write", "admin"), ROLE_MATRIX[family][role]))


@pytest.mark.parametrize("role", ROLES)
def test_roles_sdrs_ecs(w, role):
    """SDRS read: list groups; write: create (job), rename, delete (job) a group; admin:
    list the groups on project B's path (only a cloud administrator crosses projects: the
    Huawei families have no admin-only operation of their own, IAM policies aside).
    ECS read: show a server; write: batch stop it (os-stop); admin: show on B's path."""
    a, b = w.a["id"], w.b["id"]
    x, y = _expect("sdrs", role), _expect("ecs", role)
    c, e = w.sdrs(role), w.ecs(role)
    # read
    assert w.group in [g.id for g in _groups(c).server_groups]
    assert _show_server(e, w.ecs_server).id == w.ecs_server
    # write
    stop = em.BatchStopServersRequest(body=em.BatchStopServersRequestBody(
        os_stop=em.BatchStopServersOption(servers=[em.ServerId(id=w.ecs_server)], type="SOFT")))
    rename = sm.UpdateProtectionGroupNameRequest(
        server_group_id=w.group,
        body=sm.UpdateProtectionGroupNameRequestBody(
            server_group=sm.UpdateProtectionGroupNameRequestParams(name=f"{w.tag}-g")))
    if x["write"] == "ok":
        gid, _ = create_group(w, role, f"{w.tag}-{role}")
        c.update_protection_group_name(sm.UpdateProtectionGroupNameRequest(
            server_group_id=gid,
            body=sm.UpdateProtectionGroupNameRequestBody(
                server_group=sm.UpdateProtectionGroupNameRequestParams(name=f"{w.tag}-{role}2"))))
        shown = c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=gid))
        assert shown.server_group.name == f"{w.tag}-{role}2"
        c.update_protection_group_name(rename)
        job = c.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=gid)).job_id
        wait_for(f"job {job}", lambda: c.show_job_status(
            sm.ShowJobStatusRequest(job_id=job)).status == "SUCCESS", 30)
    else:
        status, code = x["write"]
        body = sm.CreateProtectionGroupRequestBody(server_group=sm.CreateProtectionGroupRequestParams(
            name=f"{w.tag}-ro", source_availability_zone=w.sites[0],
            target_availability_zone=w.sites[1], domain_id="d", source_vpc_id="vpc-1"))
        hw_raises(lambda: c.create_protection_group(sm.CreateProtectionGroupRequest(body=body)),
                  status, code)
        hw_raises(lambda: c.update_protection_group_name(rename), status, code)
        hw_raises(lambda: c.delete_protection_group(
            sm.DeleteProtectionGroupRequest(server_group_id=w.group)), status, code)
        hw_fault(w.hw_raw(role, "DELETE", f"/v1/{a}/server-groups/{w.group}"), status, code)
        assert w.group in [g.id for g in _groups(c).server_groups]  # still there
    if y["write"] == "ok":
        job = e.batch_stop_servers(stop).job_id
        wait_for(f"job {job}", lambda: e.show_job(em.ShowJobRequest(job_id=job)).status == "SUCCESS", 30)
        assert _show_server(e, w.ecs_server).status == "SHUTOFF"
    else:
        status, code = y["write"]
        hw_raises(lambda: e.batch_stop_servers(stop), status, code)
        hw_fault(w.hw_raw(role, "POST", f"/v1/{a}/cloudservers/action",
                          {"os-stop": {"servers": [{"id": w.ecs_server}]}}), status, code)
    # admin: project B's paths
    if x["admin"] == "ok":
        assert _groups(w.sdrs(role, project=b)).count == 0
        hw_raises(lambda: _show_server(w.ecs(role, project=b), w.ecs_server), 404, "Ecs.0114")
    else:
        hw_raises(lambda: _groups(w.sdrs(role, project=b)), *x["admin"])
        hw_raises(lambda: _show_server(w.ecs(role, project=b), w.ecs_server), *y["admin"])


@pytest.mark.parametrize("role", ROLES)
def test_roles_trove(w, role):
    """Read: list and show; write: rename (PATCH, TROVE-INST-UPDATE); admin: mgmt list and
    show (TROVE-MGMT-LIST/-SHOW: a non-admin gets 401, spec decision 8)."""
    a = w.a["id"]
    x = _expect("trove", role)
    tc = w.trove(role)
    assert w.db in [i.id for i in tc.instances.list()]
    assert tc.instances.get(w.db).id == w.db
    if x["write"] == "ok":
        tc.instances.update(w.db, name=f"orders-{role}")
        assert tc.instances.get(w.db).name == f"orders-{role}"
    else:
        before = tc.instances.get(w.db).name
        with pytest.raises(texc.Forbidden):
            tc.instances.update(w.db, name=f"orders-{role}")
        os_fault(w.call("PATCH", f"/v1.0/{a}/instances/{w.db}", token=w.token(role),
                        json={"instance": {"name": "x"}}), *x["write"])
        assert tc.instances.get(w.db).name == before
    if x["admin"] == "ok":
        assert w.db in [i.id for i in tc.mgmt_instances.list(project_id=a)]
        assert tc.mgmt_instances.show(w.db).id == w.db
    else:
        with pytest.raises(texc.Unauthorized):
            tc.mgmt_instances.list()
        with pytest.raises(texc.Unauthorized):
            tc.mgmt_instances.show(w.db)
        os_fault(w.get(f"/v1.0/{a}/mgmt/instances", token=w.token(role)), *x["admin"])


@pytest.mark.parametrize("role", ROLES)
def test_roles_manila(w, role):
    """Read: list the share's replicas and show the share; write: create a replica in the
    other AZ (then delete it); admin: reset_status of the active replica
    (MANILA-SR-RESET-STATUS; resync, reset_replica_state and force_delete share the rule)."""
    a = w.a["id"]
    x = _expect("manila", role)
    mc = w.manila(role)
    assert w.active_replica in [r.id for r in mc.share_replicas.list(share=w.share)]
    assert mc.shares.get(w.share).replication_type == "dr"
    if x["write"] == "ok":
        r = mc.share_replicas.create(w.share, availability_zone=w.sites[1])
        wait_for(f"replica {r.id} in sync", lambda: (
            lambda x: x.status == "available" and x.replica_state == "in_sync"
        )(mc.share_replicas.get(r.id)), 60)
        mc.share_replicas.delete(r.id)

        def gone():
            try:
                mc.share_replicas.get(r.id)
                return False
            except mexc.NotFound:
                return True

        wait_for(f"replica {r.id} deleted", gone, 60)
    else:
        with pytest.raises(mexc.Forbidden):
            mc.share_replicas.create(w.share, availability_zone=w.sites[1])
        os_fault(w.call("POST", f"/v2/{a}/share-replicas", token=w.token(role), headers=_mv(),
                        json={"share_replica": {"share_id": w.share}}), *x["write"])
        assert [r.id for r in mc.share_replicas.list(share=w.share)] == [w.active_replica]
    if x["admin"] == "ok":
        mc.share_replicas.reset_state(w.active_replica, "available")
        assert mc.share_replicas.get(w.active_replica).status == "available"
    else:
        with pytest.raises(mexc.Forbidden):
            mc.share_replicas.reset_state(w.active_replica, "error")
        os_fault(w.call("POST", f"/v2/{a}/share-replicas/{w.active_replica}/action",
                        token=w.token(role), headers=_mv(),
                        json={"reset_status": {"status": "error"}}), *x["admin"])
        assert mc.share_replicas.get(w.active_replica).status == "available"


@pytest.mark.parametrize("role", ROLES)
def test_roles_danube(w, role):
    """Read: list and show the replicas; write: update a replica (DANUBE-REP-UPDATE);
    admin: B's VM (Danube's own admin-only replica operations need only a role that may
    change the project; what an administrator alone can do is see every project's VMs)."""
    x = _expect("danube", role)
    c = w.danube(role)
    vm, rep = w.vm["hostname"], w.repname
    assert c.get(f"/vm/{vm}/replica").content.result == [rep]
    assert c.get(f"/vm/{vm}/replica/{rep}").content.result["repname"] == rep
    sleep = {"reader": 86000, "member": 86100, "admin": 86200}[role]
    if x["write"] == "ok":
        r = c.put(f"/vm/{vm}/replica/{rep}", sleep_time=sleep)
        assert r.content.task_status == "SUCCESS", r.content
        assert c.get(f"/vm/{vm}/replica/{rep}").content.result["sleep_time"] == sleep
    else:
        before = c.get(f"/vm/{vm}/replica/{rep}").content.result["sleep_time"]
        dn_raises(lambda: c.put(f"/vm/{vm}/replica/{rep}", sleep_time=sleep).content, *x["write"])
        detail(w.call("PUT", f"/api/vm/{vm}/replica/{rep}/", json={"sleep_time": sleep},
                      headers={"ES-API-KEY": w.users[role].api_key}), *x["write"])
        assert c.get(f"/vm/{vm}/replica/{rep}").content.result["sleep_time"] == before
    bvm = w.b_vm["hostname"]
    if x["admin"] == "ok":
        assert c.get(f"/vm/{bvm}/replica").content.result == []
        assert c.get(f"/vm/{w.b_vm['id']}/status").content.result["hostname"] == bvm
    else:
        dn_raises(lambda: c.get(f"/vm/{bvm}/replica").content, *x["admin"])
        dn_raises(lambda: c.get(f"/vm/{w.b_vm['id']}/status").content, *x["admin"])


# ---- tenant isolation ------------------------------------------------------------------


def test_isolation_sdrs_ecs(w):
    """B's member (AK/SK of B, B's paths) against A's group, job and server."""
    a, b = w.a["id"], w.b["id"]
    cb, eb = w.sdrs("b"), w.ecs("b")
    # list: nothing of A's
    assert _groups(cb).count == 0
    # show / change / act: the not-found of a missing group (SDRS.1013, 400)
    hw_raises(lambda: cb.show_protection_group(
        sm.ShowProtectionGroupRequest(server_group_id=w.group)), 400, "SDRS.1013")
    missing = str(uuid.uuid4())
    cases = [
        ("GET", "/server-groups/{}", None),
        ("PUT", "/server-groups/{}", {"server_group": {"name": "stolen"}}),
        ("DELETE", "/server-groups/{}", None),
        ("POST", "/server-groups/{}/action", {"start-server-group": {}}),
        ("POST", "/server-groups/{}/action", {"failover-server-group": {}}),
        ("GET", "/protected-instances?server_group_id={}", None),
    ]
    for method, path, body in cases:
        mine = w.hw_raw("b", method, f"/v1/{b}" + path.format(w.group), body)
        gone = w.hw_raw("b", method, f"/v1/{b}" + path.format(missing), body)
        same_answer(mine, w.group, gone, missing)
    # a protected instance of A's server in A's group
    pi = lambda g, s: {"protected_instance": {"server_group_id": g, "server_id": s, "name": "x"}}  # noqa: E731
    same_answer(w.hw_raw("b", "POST", f"/v1/{b}/protected-instances", pi(w.group, w.ecs_server)),
                w.group, w.hw_raw("b", "POST", f"/v1/{b}/protected-instances", pi(missing, missing)),
                missing)
    # In a group of B's own: A's servers and volumes are as missing as unknown ones
    # (SDRS-PI-CREATE, SDRS-RP-CREATE).
    bg, _ = create_group(w, "b", f"{w.tag}-bg")
    try:
        for server in (w.ecs_server, w.vm["id"]):
            same_answer(
                w.hw_raw("b", "POST", f"/v1/{b}/protected-instances", pi(bg, server)), server,
                w.hw_raw("b", "POST", f"/v1/{b}/protected-instances", pi(bg, missing)), missing)
        rp = lambda v: {"replication": {"server_group_id": bg, "volume_id": v, "name": "x"}}  # noqa: E731
        vol = f"{w.ecs_server}-root"
        mine = w.hw_raw("b", "POST", f"/v1/{b}/replications", rp(vol))
        same_answer(mine, vol, w.hw_raw("b", "POST", f"/v1/{b}/replications", rp(missing)), missing)
        hw_fault(mine, 400, "SDRS.0211")
        assert _groups(cb).count == 1
    finally:
        job = cb.delete_protection_group(sm.DeleteProtectionGroupRequest(server_group_id=bg)).job_id
        wait_for(f"job {job}", lambda: cb.show_job_status(
            sm.ShowJobStatusRequest(job_id=job)).status == "SUCCESS", 30)
    # A's job (SDRS-JOB-SHOW = ECS-JOB-SHOW): 404 as a missing job
    hw_raises(lambda: cb.show_job_status(sm.ShowJobStatusRequest(job_id=w.group_job)), 404,
              "SDRS.0408")
    nojob = uuid.uuid4().hex
    same_answer(w.hw_raw("b", "GET", f"/v1/{b}/jobs/{w.group_job}"), w.group_job,
                w.hw_raw("b", "GET", f"/v1/{b}/jobs/{nojob}"), nojob)
    # ECS: A's server is missing for B (show, stop, migrate): Ecs.0114, 404
    hw_raises(lambda: _show_server(eb, w.ecs_server), 404, "Ecs.0114")
    hw_raises(lambda: eb.migrate_server(em.MigrateServerRequest(
        server_id=w.ecs_server, body=em.MigrateServerRequestBody(migrate=em.MigrateServerOption()))),
        404, "Ecs.0114")
    noserver = f"{w.tag}-noserver"
    for method, path, body in [
        ("GET", "/cloudservers/{}", None),
        ("POST", "/cloudservers/{}/migrate", {"migrate": {}}),
        ("POST", "/cloudservers/action", {"os-stop": {"servers": [{"id": "{}"}]}}),
    ]:
        mine = w.hw_raw("b", method, f"/v1/{b}" + path.format(w.ecs_server), _fill(body, w.ecs_server))
        gone = w.hw_raw("b", method, f"/v1/{b}" + path.format(noserver), _fill(body, noserver))
        same_answer(mine, w.ecs_server, gone, noserver)
    # Nothing of A's changed.
    c = w.sdrs("member")
    g = c.show_protection_group(sm.ShowProtectionGroupRequest(server_group_id=w.group)).server_group
    assert g.name == f"{w.tag}-g" and g.status == "available"
    assert a != b


def test_isolation_trove(w):
    """B's member (B's token, B's endpoint) against A's instance."""
    b = w.b["id"]
    tb = w.trove("b")
    tok = w.token("b")
    assert w.db not in [i.id for i in tb.instances.list()]
    with pytest.raises(texc.NotFound):
        tb.instances.get(w.db)
    with pytest.raises(texc.NotFound):
        tb.instances.update(w.db, name="stolen")
    with pytest.raises(texc.NotFound):
        tb.instances.restart(w.db)
    with pytest.raises(texc.NotFound):
        tb.instances.delete(w.db)
    missing = f"{w.tag}-nodb"
    cases = [
        ("GET", "/instances/{}", None),
        ("PATCH", "/instances/{}", {"instance": {"name": "stolen"}}),
        ("PUT", "/instances/{}", {"instance": {"name": "stolen"}}),
        ("DELETE", "/instances/{}", None),
        ("POST", "/instances/{}/action", {"restart": {}}),
        ("POST", "/instances/{}/action", {"resize": {"volume": {"size": 2}}}),
        ("POST", "/instances/{}/action", {"promote_to_replica_source": {}}),
        ("POST", "/instances", {"instance": {"name": "r", "replica_of": "{}"}}),
    ]
    for method, path, body in cases:
        mine = w.call(method, f"/v1.0/{b}" + path.format(w.db), token=tok, json=_fill(body, w.db))
        gone = w.call(method, f"/v1.0/{b}" + path.format(missing), token=tok, json=_fill(body, missing))
        same_answer(mine, w.db, gone, missing)
        if mine.status_code == 404:
            os_fault(mine, 404, "itemNotFound")
    # Nothing of A's changed: still there, ACTIVE, not renamed by B.
    i = w.trove("member").instances.get(w.db)
    assert i.status == "ACTIVE" and i.name != "stolen"


def test_isolation_manila(w):
    """B's member (B's token; B's endpoint, and the project-less paths of ≥ 2.60) against
    A's share and its active replica."""
    b = w.b["id"]
    mb = w.manila("b")
    tok = w.token("b")
    assert w.active_replica not in [r.id for r in mb.share_replicas.list()]
    with pytest.raises(mexc.NotFound):
        mb.share_replicas.list(share=w.share)
    with pytest.raises(mexc.NotFound):
        mb.share_replicas.get(w.active_replica)
    with pytest.raises(mexc.NotFound):
        mb.shares.get(w.share)
    with pytest.raises(mexc.NotFound):
        mb.share_replicas.create(w.share, availability_zone=w.sites[1])
    with pytest.raises(mexc.NotFound):
        mb.share_replicas.promote(w.active_replica)
    with pytest.raises(mexc.NotFound):
        mb.share_replicas.delete(w.active_replica)  # A's member would get 409 (active)
    noshare, norep = f"{w.tag}-noshare", str(uuid.uuid4())
    share_cases = [
        ("GET", "/share-replicas?share_id={}", None),
        ("GET", "/share-replicas/detail?share_id={}", None),
        ("GET", "/shares/{}", None),
        ("POST", "/share-replicas", {"share_replica": {"share_id": "{}"}}),
    ]
    replica_cases = [
        ("GET", "/share-replicas/{}", None),
        ("GET", "/share-replicas/{}/export-locations", None),
        ("DELETE", "/share-replicas/{}", None),
        ("POST", "/share-replicas/{}/action", {"promote": None}),
        ("POST", "/share-replicas/{}/action", {"resync": None}),
        ("POST", "/share-replicas/{}/action", {"reset_status": {"status": "error"}}),
    ]
    for prefix in (f"/v2/{b}", "/v2"):
        for cases, mine_id, gone_id in ((share_cases, w.share, noshare),
                                        (replica_cases, w.active_replica, norep)):
            for method, path, body in cases:
                mine = w.call(method, prefix + path.format(mine_id), token=tok, headers=_mv(),
                              json=_fill(body, mine_id))
                gone = w.call(method, prefix + path.format(gone_id), token=tok, headers=_mv(),
                              json=_fill(body, gone_id))
                same_answer(mine, mine_id, gone, gone_id)
                assert mine.status_code in (403, 404), (method, path, mine.text)
    # Nothing of A's changed.
    r = w.manila("member").share_replicas.get(w.active_replica)
    assert (r.status, r.replica_state) == ("available", "active")


def test_isolation_danube(w):
    """B's member (B's ES-API-KEY) against A's VM (by hostname and uuid), its replica and
    the task that made it."""
    cb = w.danube("b")
    h = {"ES-API-KEY": w.users["b"].api_key}
    rep = w.repname
    for key in (w.vm["hostname"], w.vm["id"]):
        dn_raises(lambda: cb.get(f"/vm/{key}/replica").content, 404, "VM not found")
        dn_raises(lambda: cb.put(f"/vm/{key}/replica/{rep}", sleep_time=1).content, 404, "VM not found")
        missing = f"{w.tag}-novm"
        cases = [
            ("GET", "/vm/{}/replica/", None),
            ("GET", "/vm/{}/replica/?full=true", None),
            ("GET", "/vm/{}/replica/" + rep + "/", None),
            ("POST", "/vm/{}/replica/r9/", {"node": w.hosts[1]}),
            ("PUT", "/vm/{}/replica/" + rep + "/", {"sleep_time": 1}),
            ("DELETE", "/vm/{}/replica/" + rep + "/", {}),
            ("PUT", "/vm/{}/replica/" + rep + "/failover/", {"force": True}),
            ("PUT", "/vm/{}/replica/" + rep + "/reinit/", {}),
            ("GET", "/vm/{}/status/", None),
        ]
        for method, path, body in cases:
            mine = w.call(method, "/api" + path.format(key), headers=h, json=body)
            gone = w.call(method, "/api" + path.format(missing), headers=h, json=body)
            same_answer(mine, key, gone, missing)
            detail(mine, 404, "VM not found")
    # A's task: as missing as a task that never was.
    notask = "1e1d1-" + "-".join(secrets.token_hex(n) for n in (4, 2, 2, 2))
    for method, path, body in [
        ("GET", "/task/{}/status/", None),
        ("GET", "/task/{}/done/", None),
        ("GET", "/task/{}/", None),
        ("PUT", "/task/{}/cancel/", {}),
    ]:
        mine = w.call(method, "/api" + path.format(w.rep_task), headers=h, json=body)
        gone = w.call(method, "/api" + path.format(notask), headers=h, json=body)
        same_answer(mine, w.rep_task, gone, notask)
        assert mine.status_code in (404, 406), mine.text
    assert w.rep_task not in (cb.get("/task", stream=False).content.result or [])
    # Nothing of A's changed.
    r = w.danube("member").get(f"/vm/{w.vm['hostname']}/replica/{rep}").content.result
    assert r["sleep_time"] != 1 and r["enabled"] is True


def test_isolation_native_jobs(w):
    """Every family's job or task is a native job (/drplane/v1/jobs, open to members for
    their project's jobs): B's member cannot show, cancel, list or page from A's."""
    tok = w.token("b")
    for job in (w.group_job, w.rep_task):
        nojob = uuid.uuid4().hex if "-" not in job else "1e1d1-" + "-".join(
            secrets.token_hex(n) for n in (4, 2, 2, 2))
        for method, path in (("GET", "/drplane/v1/jobs/{}"),
                             ("POST", "/drplane/v1/jobs/{}/cancel"),
                             ("GET", "/drplane/v1/jobs?marker={}")):
            mine = w.call(method, path.format(job), token=tok)
            gone = w.call(method, path.format(nojob), token=tok)
            same_answer(mine, job, gone, nojob)
            assert mine.status_code in (400, 404), mine.text
        assert w.get(f"/drplane/v1/jobs/{job}", token=w.token("member")).status_code == 200
    listed = [j["id"] for j in w.get("/drplane/v1/jobs?limit=1000", token=tok).json()["jobs"]]
    assert w.group_job not in listed and w.rep_task not in listed
    r = w.get(f"/drplane/v1/jobs?project={w.a['id']}", token=tok)
    assert r.status_code == 200 and r.json()["jobs"] == []


def test_failed_logins_are_rate_limited(w):
    """Five failed logins for one user name within a minute (per node): then every login
    for that name, by either family's login and even with the right password, answers
    429 with Retry-After in that login's own shape."""
    u = new_user(w.admin, f"{w.tag}-rl", w.a, "reader")
    w.seen.add(u.password)
    for i in range(5):
        with pytest.raises(ks_exc.Unauthorized):
            password_session(w.url, u.name, f"wrong-{i}", u.project_name).get_token()
    with pytest.raises(ks_exc.TooManyRequests):
        password_session(w.url, u.name, u.password, u.project_name).get_token()
    r = _login_raw(w, u.name, u.password, u.project_name)
    keystone_error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1
    c = DanubeClient(api_url=w.api)
    r = c.login(u.name, u.password)
    assert r.status_code == 429 and not c.is_authenticated()
    r = requests.post(f"{w.api}/accounts/login/", json={"username": u.name, "password": u.password},
                      timeout=30)
    detail(r, 429)
    assert "throttled" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
    # Other users are not affected; credentials other than passwords neither.
    assert w.danube(api_key=u.api_key).get(f"/vm/{w.vm['hostname']}/replica").content.result


# ---- roles are current; nothing secret in the logs -------------------------------------


def test_role_and_user_changes_apply_at_once(w):
    """A user's credentials of every family follow its role assignments and its enabled
    flag at the next request (the token, the AK/SK and the API key stay the same)."""
    a = w.a["id"]
    u = new_user(w.admin, f"{w.tag}-tmp", w.a, "member")
    w.seen |= {u.password, u.sk, u.api_key}
    sess = password_session(w.url, u.name, u.password, u.project_name)
    tok = sess.get_token()
    w.seen.add(tok)
    tc = w.trove_with_token(tok)
    mc = w.manila_with_token(tok)
    sc = w.sdrs(ak=u.ak, sk=u.sk)
    dc = w.danube(api_key=u.api_key)
    replicas = f"/vm/{w.vm['hostname']}/replica"
    roles = f"/drplane/v1/identity/projects/{w.a['name']}/users/{u.name}/roles"

    def reads():
        assert w.db in [i.id for i in tc.instances.list()]
        assert w.active_replica in [r.id for r in mc.share_replicas.list(share=w.share)]
        assert w.group in [g.id for g in _groups(sc).server_groups]
        assert dc.get(replicas).content.result == [w.repname]

    def refused_everywhere(dn_status=401):
        with pytest.raises(texc.Unauthorized):
            tc.instances.list()
        with pytest.raises(mexc.Unauthorized):
            mc.share_replicas.list(share=w.share)
        hw_raises(lambda: _groups(sc), 401, "SDRS.0002")
        dn_raises(lambda: dc.get(replicas).content, dn_status)

    reads()
    # No role on A any more: 401 (the credentials no longer name a usable scope).
    w.admin.call("DELETE", f"{roles}/member")
    refused_everywhere()
    # reader: the same credentials read again, and change nothing (403).
    w.admin.call("PUT", f"{roles}/reader")
    reads()
    with pytest.raises(texc.Forbidden):
        tc.instances.update(w.db, name="by-tmp")
    with pytest.raises(mexc.Forbidden):
        mc.share_replicas.create(w.share, availability_zone=w.sites[1])
    hw_raises(lambda: sc.update_protection_group_name(sm.UpdateProtectionGroupNameRequest(
        server_group_id=w.group, body=sm.UpdateProtectionGroupNameRequestBody(
            server_group=sm.UpdateProtectionGroupNameRequestParams(name="by-tmp")))),
        403, "SDRS.0005")
    dn_raises(lambda: dc.put(f"{replicas}/{w.repname}", sleep_time=5).content, 403)
    # Disabled: 401 everywhere, and no new login (Keystone 401, Danube 400).
    w.admin.call("PATCH", f"/drplane/v1/identity/users/{u.name}", {"enabled": False})
    refused_everywhere()
    keystone_error(_login_raw(w, u.name, u.password, u.project_name), 401)
    assert DanubeClient(api_url=w.api).login(u.name, u.password).status_code == 400
    os_fault(w.get(f"/v1.0/{a}/instances", token=tok), 401, "unauthorized")


def test_no_secret_in_server_logs(w):
    """Refusals are logged with who asked, never with a secret (issue 4, item 8): after
    refusals that carry secrets (a wrong password, a revoked token, an unknown key), no
    password, SK, API key or token this suite handled appears in any node's log."""
    m = w.users["member"]
    wrong = "wrong-" + secrets.token_hex(8)
    w.seen.add(wrong)
    keystone_error(_login_raw(w, m.name, wrong, m.project_name), 401)
    _, tok = _revoked_login(w, "member")
    w.seen.add(tok)
    os_fault(w.get(f"/v1.0/{w.a['id']}/instances", token=tok), 401, "unauthorized")
    unknown = secrets.token_hex(20)
    w.seen.add(unknown)
    detail(w.get(f"/api/vm/{w.vm['hostname']}/replica/", headers={"ES-API-KEY": unknown}), 401)
    hw_fault(w.hw_raw("member", "GET", f"/v1/{w.a['id']}/server-groups", sk=wrong), 401, "SDRS.0002")
    dev = os.environ["DRPLANE_DEV_DIR"]
    logs = [os.path.join(dev, f) for f in os.listdir(dev) if f.startswith("node-") and f.endswith(".log")]
    assert logs, f"no node logs in {dev}"
    time.sleep(0.3)  # let the nodes write their lines
    text = "".join(open(p, encoding="utf-8", errors="replace").read() for p in logs)
    assert "request refused by authentication" in text
    leaked = sorted(s for s in w.all_secrets() if s in text)
    assert not leaked, f"secrets in the node logs: {[x[:6] + '…' for x in leaked]}"
