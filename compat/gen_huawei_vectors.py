#!/usr/bin/env python3
"""Generate api/tests/fixtures/huawei_sdk_vectors.json with the real Huawei Cloud SDK.

Each vector is a request that huaweicloudsdkcore's own client pipeline built and signed
(`Client.do_http_request`: path parameters, query tuples, JSON body, credentials, Signer)
and that `requests` then sent over a socket to a listener on 127.0.0.1, which recorded the
request line, every header and the body as they arrived. drplane's verifier
(api/src/auth/huawei.rs) must accept every vector, and its own signer must reproduce the
SDK's Authorization header from the SDK's inputs.

Usage (in a throwaway venv; nothing here is a runtime dependency of drplane):

    python3 -m venv /tmp/hw
    /tmp/hw/bin/pip install huaweicloudsdkcore==3.1.219
    /tmp/hw/bin/python compat/gen_huawei_vectors.py > api/tests/fixtures/huawei_sdk_vectors.json

The SDK version is pinned: the fixture records the version it was produced with.
"""

import http.server
import json
import os
import sys
import tempfile
import threading

PINNED_SDK_VERSION = "3.1.219"

# Importing the SDK stores an application id under $HOME/.huaweicloud: keep it out of the
# real home directory.
os.environ["HOME"] = tempfile.mkdtemp(prefix="hw-home-")

from importlib.metadata import version  # noqa: E402

from huaweicloudsdkcore.auth.credentials import BasicCredentials  # noqa: E402
from huaweicloudsdkcore.client import Client  # noqa: E402
from huaweicloudsdkcore.http.http_config import HttpConfig  # noqa: E402
from huaweicloudsdkcore.sdk_response import SdkResponse  # noqa: E402
from huaweicloudsdkcore.signer import signer as signer_mod  # noqa: E402

AK = "HWAK0123456789EXAMPLE"
SK = "hwSecretKey/with+odd=chars0123456789abcd"
PROJECT = "0123456789abcdef0123456789abcdef"


class EmptyResponse(SdkResponse):
    """The response model the recorder's `{}` answer is read into."""
    openapi_types = {}
    attribute_map = {}


class Models:
    EmptyResponse = EmptyResponse


# --- record what the SDK signer computed ---------------------------------------------------

captured = {}

_orig_sign = signer_mod.Signer.sign
_orig_canonical = signer_mod.Signer._process_canonical_request
_orig_sts = signer_mod.Signer._process_string_to_sign


def _sign(self, request):
    # The inputs the signer sees, before it adds Host/X-Sdk-Date/Authorization itself.
    captured["signer_input"] = {
        "resource_path": request.resource_path,
        "query": [[k, _query_str(v)] for k, v in (request.query_params or [])],
        "headers": [[k, str(v)] for k, v in request.header_params.items()],
    }
    return _orig_sign(self, request)


def _query_str(v):
    # How Signer._process_canonical_query_string renders one value.
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _canonical(self, request, signed_headers):
    out = _orig_canonical(self, request, signed_headers)
    captured["canonical_request"] = out
    return out


def _sts(self, canonical_request, t):
    out = _orig_sts(self, canonical_request, t)
    captured["string_to_sign"] = out
    return out


signer_mod.Signer.sign = _sign
signer_mod.Signer._process_canonical_request = _canonical
signer_mod.Signer._process_string_to_sign = _sts


# --- a listener that records requests as they arrive ---------------------------------------

received = []


class Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        # http.server decodes header bytes as latin-1; undo that to get the wire bytes.
        headers = [[k, v.encode("latin-1").decode("utf-8")] for k, v in self.headers.items()]
        received.append({"method": self.command, "target": self.path, "headers": headers,
                         "body": body.decode("utf-8")})
        out = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, *args):
        pass


def main():
    sdk_version = version("huaweicloudsdkcore")
    if sdk_version != PINNED_SDK_VERSION:
        sys.exit(f"huaweicloudsdkcore {sdk_version} installed, the fixture pins {PINNED_SDK_VERSION}")

    # A fixed port keeps the fixture stable when it is regenerated (Host is signed).
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 38417), Recorder)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def client(creds):
        c = Client()
        c.with_config(HttpConfig.get_default_config())
        c.with_credentials(creds)
        c.with_endpoints([f"http://127.0.0.1:{port}"])
        c.init_http_client()
        c.model_package = Models
        return c

    basic = client(BasicCredentials(AK, SK, PROJECT))
    temp_creds = BasicCredentials(AK, SK, PROJECT)
    temp_creds.security_token = "temporary-security-token/xyz=="
    temporary = client(temp_creds)

    cases = [
        dict(name="get_list_query_special_chars",
             note="query values needing percent-encoding (space, &, =, +, /, ?, %, ~, *), a bool and ints",
             method="GET", path="/v1/{project_id}/server-groups",
             query=[("name", "a b&c=d+e/f?g%h~i*j"), ("limit", 10), ("offset", 0),
                    ("query_type", True), ("status", "protected")],
             date="20240315T101112Z"),
        dict(name="get_repeated_keys",
             note="repeated keys (collection format multi), values given unsorted",
             method="GET", path="/v1/{project_id}/protected-instances",
             query=[("protected_instance_ids", ["id-c", "id-a", "id-b"]), ("availability_zone", "az1.dc1"),
                    ("limit", 5)],
             formats={"protected_instance_ids": "multi"},
             date="20240315T101113Z"),
        dict(name="get_repeated_int_keys_numeric_order",
             note="an int list is sorted numerically by the SDK (9 before 10): not byte order",
             method="GET", path="/v1/{project_id}/protected-instances",
             query=[("offset", [10, 9, 100])],
             formats={"offset": "multi"},
             date="20240315T101114Z"),
        dict(name="get_unicode_query",
             note="non-ASCII query key and values (UTF-8 percent-encoded)",
             method="GET", path="/v1/{project_id}/server-groups",
             query=[("name", "données-数据"), ("ñame", "é ü"), ("empty", "")],
             date="20240315T101115Z"),
        dict(name="post_json_body",
             note="create_protection_group body with unicode, as the SDK serialises it",
             method="POST", path="/v1/{project_id}/server-groups",
             body={"server_group": {"name": "pg-1", "description": "données 数据 \"quoted\"",
                                    "source_availability_zone": "az-a", "target_availability_zone": "az-b",
                                    "domain_id": "dom-1", "source_vpc_id": "vpc-1", "dr_type": "migration"}},
             headers={"Content-Type": "application/json;charset=UTF-8"},
             date="20240315T101116Z"),
        dict(name="post_raw_utf8_body",
             note="a body given as a str is sent as raw UTF-8 bytes, hashed as sent",
             method="POST", path="/v1/{project_id}/server-groups",
             body='{"server_group": {"name": "数据", "description": "ü"}}',
             headers={"Content-Type": "application/json;charset=UTF-8"},
             date="20240315T101124Z"),
        dict(name="post_empty_json_object",
             note="a body of {} is not empty: its hash is signed",
             method="POST", path="/v1/{project_id}/server-groups/{id}/action",
             path_params={"id": "group-1"}, body={"start-server-group": {}},
             headers={"Content-Type": "application/json;charset=UTF-8"},
             date="20240315T101117Z"),
        dict(name="put_path_with_trailing_slash",
             note="a resource path that already ends with / gets no second one",
             method="PUT", path="/v1/{project_id}/server-groups/{id}/",
             path_params={"id": "group-2"}, body={"server_group": {"name": "renamed"}},
             headers={"Content-Type": "application/json;charset=UTF-8"},
             date="20240315T101118Z"),
        dict(name="delete_with_json_body",
             note="DELETE carrying a JSON body (delete_protected_instance)",
             method="DELETE", path="/v1/{project_id}/protected-instances/{id}",
             path_params={"id": "pi-1"}, body={"delete_target_server": True, "delete_target_eip": False},
             headers={"Content-Type": "application/json;charset=UTF-8"},
             date="20240315T101119Z"),
        dict(name="path_param_with_slash_and_unicode",
             note="a path parameter with / (sent as %2F, a real separator in the canonical URI) and ü",
             method="GET", path="/v1/{project_id}/jobs/{job_id}",
             path_params={"job_id": "a/b ü~x"},
             date="20240315T101120Z"),
        dict(name="non_json_unsigned_payload",
             note="a non-JSON content type makes the SDK sign X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD",
             method="POST", path="/v1/{project_id}/uploads",
             body="plain text body, not hashed", headers={"Content-Type": "text/plain"},
             date="20240315T101121Z"),
        dict(name="extra_headers_underscore_and_unicode",
             note="a header with _ is sent but not signed; a non-ASCII header value is signed as UTF-8",
             method="GET", path="/v1/{project_id}/server-groups/{id}",
             path_params={"id": "group-3"},
             headers={"X_Custom_Unsigned": "not signed", "X-Trace-Label": "  café ✓  "},
             date="20240315T101122Z"),
        dict(name="temporary_credentials_security_token",
             note="temporary credentials add a signed X-Security-Token",
             method="GET", path="/v1/{project_id}/jobs/{job_id}",
             path_params={"job_id": "ff80808288d41e1b018990260955686a"},
             client="temporary", date="20240315T101123Z"),
    ]

    vectors = []
    for case in cases:
        captured.clear()
        before = len(received)
        c = temporary if case.get("client") == "temporary" else basic
        headers = dict(case.get("headers", {}))
        headers["X-Sdk-Date"] = case["date"]
        formats = case.get("formats", {})
        c.do_http_request(
            method=case["method"], resource_path=case["path"],
            path_params=dict(case.get("path_params", {})),
            query_params=list(case.get("query", [])),
            header_params=headers, body=case.get("body"),
            response_type="EmptyResponse", response_headers=[], collection_formats=formats)
        if len(received) != before + 1:
            sys.exit(f"{case['name']}: the listener saw {len(received) - before} requests")
        wire = received[-1]
        vectors.append({
            "name": case["name"],
            "note": case["note"],
            "method": wire["method"],
            "target": wire["target"],
            "headers": wire["headers"],
            "body": wire["body"],
            "date": case["date"],
            "sdk": {
                "signer_input": captured["signer_input"],
                "canonical_request": captured["canonical_request"],
                "string_to_sign": captured["string_to_sign"],
            },
        })
    server.shutdown()

    json.dump({
        "generator": "compat/gen_huawei_vectors.py",
        "sdk": "huaweicloudsdkcore",
        "sdk_version": sdk_version,
        "python": sys.version.split()[0],
        "access_key": AK,
        "secret_key": SK,
        "project_id": PROJECT,
        "vectors": vectors,
    }, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
