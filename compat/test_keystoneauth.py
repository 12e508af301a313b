"""keystoneauth1 — the library python-troveclient and python-manilaclient log in with —
obtains a token from drplane's Keystone v3 subset with the password plugin, finds the
Trove (`database`) and Manila (`sharev2`) endpoints in the catalog, and uses the token.

Runs against the cluster named by DRPLANE_URL (scripts/compat.sh starts one), or starts a
one-node cluster itself from DRPLANE_BIN (default: $CARGO_TARGET_DIR/debug/drplane).
"""

import os

import pytest
import requests
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import session
from keystoneauth1.identity import v3

from drplane_cluster import cluster  # noqa: F401  (the fixture)


def password_auth(url, suffix="/v3", user="admin", password=None, **scope):
    return v3.Password(
        auth_url=url + suffix,
        username=user,
        password=password,
        user_domain_name="Default",
        **scope,
    )


@pytest.mark.parametrize("suffix", ["/v3", "/identity/v3"])
def test_password_plugin_gets_a_token_and_the_catalog(cluster, suffix):
    url, admin_password = cluster
    auth = password_auth(
        url,
        suffix,
        password=admin_password,
        project_name="admin",
        project_domain_name="Default",
    )
    sess = session.Session(auth=auth)
    token = sess.get_token()
    assert token and len(token) == 64

    access = sess.auth.get_access(sess)
    assert access.username == "admin"
    assert access.project_name == "admin"
    assert "admin" in access.role_names
    project_id = access.project_id
    assert access.expires is not None

    # The catalog points Trove and Manila at this cluster (python-troveclient asks for
    # service type 'database', python-manilaclient for 'sharev2', interface public).
    assert sess.get_endpoint(service_type="database", interface="public") == (
        f"{url}/v1.0/{project_id}"
    )
    assert sess.get_endpoint(service_type="sharev2", interface="public") == (
        f"{url}/v2/{project_id}"
    )

    # The session sends the token as X-Auth-Token: the native API accepts it.
    r = sess.get(f"{url}/drplane/v1/auth/whoami")
    assert r.status_code == 200, r.text
    assert r.json()["user_name"] == "admin"


def test_scope_by_project_id_and_token_validation(cluster):
    url, admin_password = cluster
    first = session.Session(
        auth=password_auth(
            url, password=admin_password, project_name="admin", project_domain_name="Default"
        )
    )
    project_id = first.get_project_id()
    sess = session.Session(
        auth=password_auth(url, password=admin_password, project_id=project_id)
    )
    token = sess.get_token()
    # GET /v3/auth/tokens validates a token (X-Subject-Token) for its owner.
    r = requests.get(
        f"{url}/v3/auth/tokens",
        headers={"X-Auth-Token": token, "X-Subject-Token": token},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Subject-Token"] == token
    assert r.json()["token"]["project"]["id"] == project_id


def test_wrong_password_is_unauthorized(cluster):
    url, _ = cluster
    sess = session.Session(
        auth=password_auth(
            url,
            user="admin",
            password="certainly-not-the-password",
            project_name="admin",
            project_domain_name="Default",
        )
    )
    with pytest.raises(ks_exc.Unauthorized):
        sess.get_token()


def test_a_revoked_token_is_refused(cluster):
    url, admin_password = cluster
    sess = session.Session(
        auth=password_auth(
            url, password=admin_password, project_name="admin", project_domain_name="Default"
        )
    )
    token = sess.get_token()
    r = requests.delete(
        f"{url}/v3/auth/tokens",
        headers={"X-Auth-Token": token, "X-Subject-Token": token},
        timeout=10,
    )
    assert r.status_code == 204, r.text
    r = requests.get(
        f"{url}/drplane/v1/sites", headers={"X-Auth-Token": token}, timeout=10
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "DRP-6001"
