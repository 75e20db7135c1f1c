"""Drives keyward-sandbox with the official ngrok Python client (PyPI ngrok-api==0.19.0).

Reads KEYWARD_SANDBOX_URL and NGROK_API_KEY from the environment. Every check is an assert;
the script exits non-zero on the first failure. Run by tests/sandbox_conformance.rs.
"""

import json
import os
import sys
import urllib.error
import urllib.request

import ngrok

URL = os.environ["KEYWARD_SANDBOX_URL"]
ADMIN = os.environ["NGROK_API_KEY"]


def raw(method, path, body=None, headers=None):
    """A request outside the client: returns (status, headers, parsed JSON or None)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req) as resp:
            text = resp.read()
            return resp.status, resp.headers, json.loads(text) if text else None
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, e.headers, json.loads(text) if text else None


def expect_error(fn, code, status=None, cls=ngrok.Error):
    try:
        fn()
    except cls as e:
        assert e.error_code == code, f"expected {code}, got {e.error_code}: {e}"
        if status is not None:
            assert e.http_status_code == status, f"expected HTTP {status}, got {e.http_status_code}"
        assert e.operation_id and e.operation_id.startswith("op_"), e.operation_id
        return e
    raise AssertionError(f"expected {cls.__name__} {code}, got no error")


def step(name):
    print(f"== {name}", flush=True)


c = ngrok.Client(ADMIN, base_url=URL)

step("service users: create, get, defaults")
su = c.service_users.create(name="conformance-ci")
assert su.id.startswith("bot_") and len(su.id) == 4 + 27, su.id
assert su.active is True
assert su.name == "conformance-ci"
assert su.uri == f"{URL}/service_users/{su.id}", su.uri
assert su.created_at.endswith("Z"), su.created_at
got = c.service_users.get(su.id)
assert got.id == su.id and got.name == su.name and got.active is True
inactive = c.service_users.create(name="conformance-inactive", active=False)
assert inactive.active is False

step("service users: validation errors")
expect_error(lambda: c.service_users.create(name="conformance-ci"), "ERR_NGROK_4112", 400)
expect_error(lambda: c.bot_users.create(name="conformance-ci"), "ERR_NGROK_4112", 400)
expect_error(lambda: c.service_users.create(), "ERR_NGROK_4109", 400)

step("service users: update (deactivate, reactivate, rename, no-op)")
upd = c.service_users.update(su.id, active=False)
assert upd.active is False and upd.name == "conformance-ci"
assert c.service_users.get(su.id).active is False
upd = c.service_users.update(su.id, active=True)
assert upd.active is True
upd = c.service_users.update(su.id, name="conformance-renamed")
assert upd.name == "conformance-renamed"
noop = c.service_users.update(su.id)  # sends {}
assert noop.name == "conformance-renamed" and noop.active is True
expect_error(lambda: c.service_users.update(su.id, name=inactive.name), "ERR_NGROK_4112", 400)
# The old name is free again after a rename.
again = c.service_users.create(name="conformance-ci")
again.delete()

step("service users: pagination past one page (150 users)")
created = [c.service_users.create(name=f"conformance-page-{i:03d}").id for i in range(150)]
first = c.service_users.list()
assert len(first.service_users) == 100, len(first.service_users)
assert first.next_page_uri is not None and first.next_page_uri.startswith("http://"), first.next_page_uri
assert "limit=100" in first.next_page_uri and "before_id=" in first.next_page_uri
assert first.uri == f"{URL}/service_users"
ids = [u.id for u in first.service_users]
assert ids == sorted(ids, reverse=True), "first page not newest first"
all_ids = [u.id for u in c.service_users.list()]  # iterating follows next_page_uri
assert len(all_ids) == len(set(all_ids)), "duplicate across pages"
assert set(created) <= set(all_ids)
assert su.id in all_ids and inactive.id in all_ids
assert all_ids == sorted(all_ids, reverse=True), "iteration not newest first"
small = c.service_users.list(limit=7)
assert len(small.service_users) == 7 and "limit=7" in small.next_page_uri
assert [u.id for u in small.service_users] == all_ids[:7]
after = c.service_users.list(before_id=all_ids[6], limit=3)
assert [u.id for u in after.service_users] == all_ids[7:10]
last = c.service_users.list(before_id=all_ids[-2])
assert [u.id for u in last.service_users] == all_ids[-1:] and last.next_page_uri is None
expect_error(lambda: c.service_users.list(before_id="not-an-id"), "ERR_NGROK_223", 400)
expect_error(lambda: c.service_users.list(limit=101), "ERR_NGROK_233", 400)
filtered = c.service_users.list(filter=f'obj.id == "{su.id}"')
assert [u.id for u in filtered.service_users] == [su.id]

step("bot_users sees the same users")
bot = c.bot_users.get(su.id)
assert bot.id == su.id and bot.name == "conformance-renamed"
bot_ids = [u.id for u in c.bot_users.list()]
assert set(bot_ids) == set(all_ids)
page = c.bot_users.list(limit=1)
assert len(page.bot_users) == 1 and page.next_page_uri.startswith(f"{URL}/bot_users?")
for uid in created:
    c.service_users.delete(uid)

step("api keys: create with owner, token only at create")
key = c.api_keys.create(description="ci key", metadata='{"managed_by":"keyward"}', owner_id=su.id)
assert key.id.startswith("ak_") and key.owner_id == su.id
assert key.token and len(key.token) == 49, key.token
assert key.token.startswith(key.id[3:] + "_")
assert key.description == "ci key" and key.metadata == '{"managed_by":"keyward"}'
assert key.uri == f"{URL}/api_keys/{key.id}"
k = c.api_keys.get(key.id)
assert k.token is None and k.owner_id == su.id and k.metadata == key.metadata
listed = {x.id: x for x in c.api_keys.list()}
assert key.id in listed and listed[key.id].token is None
owned = c.api_keys.list(filter=f'obj.owner_id == "{su.id}"')
assert [x.id for x in owned.keys] == [key.id]
plain = c.api_keys.create()
assert plain.description == "" and plain.metadata == "" and plain.owner_id.startswith("usr_")
upd = c.api_keys.update(plain.id, description="now described")
assert upd.description == "now described" and upd.token is None
upd = c.api_keys.update(plain.id, description="")
assert upd.description == ""
expect_error(lambda: c.api_keys.create(description="x" * 256), "ERR_NGROK_604", 400)
expect_error(lambda: c.api_keys.create(metadata="x" * 4097), "ERR_NGROK_605", 400)
expect_error(lambda: c.api_keys.create(owner_id="bot_" + "0" * 27), "ERR_NGROK_634", 400)
c.api_keys.delete(plain.id)
expect_error(lambda: c.api_keys.get(plain.id), "ERR_NGROK_404", 404, ngrok.NotFoundError)

step("credentials: create with owner and acl, token only at create")
cred = c.credentials.create(description="tunnel", acl=["bind:*.example.com"], owner_id=su.id)
assert cred.id.startswith("cr_") and cred.owner_id == su.id
assert cred.token and len(cred.token) == 49
assert cred.acl == ["bind:*.example.com"]
got = c.credentials.get(cred.id)
assert got.token is None and got.acl == ["bind:*.example.com"] and got.metadata == ""
assert cred.id in [x.id for x in c.credentials.list()]
assert all(x.token is None for x in c.credentials.list())
cleared = c.credentials.update(cred.id, acl=[])
assert cleared.acl == []
expect_error(lambda: c.credentials.create(acl=["connect:x"]), "ERR_NGROK_600", 400)
open_cred = c.credentials.create()
assert open_cred.acl == [] and open_cred.description == ""
open_cred.delete()

step("sandbox verify: credential secret works")
status, _, body = raw("POST", "/_sandbox/verify", {"token": cred.token})
assert status == 200 and body["kind"] == "credential" and body["id"] == cred.id, (status, body)
status, _, body = raw("POST", "/_sandbox/verify", {"token": "nope_nope"})
assert status == 401, status

step("404s raise NotFoundError")
expect_error(lambda: c.service_users.get("bot_" + "0" * 27), "ERR_NGROK_404", 404, ngrok.NotFoundError)
expect_error(lambda: c.credentials.delete("cr_" + "0" * 27), "ERR_NGROK_404", 404, ngrok.NotFoundError)

step("a service user's API key authenticates, and stops when its owner is deactivated")
as_su = ngrok.Client(key.token, base_url=URL)
assert su.id in [u.id for u in as_su.service_users.list()]
c.service_users.update(su.id, active=False)
expect_error(lambda: as_su.service_users.list(), "ERR_NGROK_203", 401)
status, _, _ = raw("POST", "/_sandbox/verify", {"token": cred.token})
assert status == 401, "credential of an inactive owner must not verify"
c.service_users.update(su.id, active=True)
assert su.id in [u.id for u in as_su.service_users.list()], "reactivation restores the key"
assert key.id in [x.id for x in as_su.api_keys.list()]
bad = ngrok.Client("x" * 27 + "_" + "y" * 21, base_url=URL)
expect_error(lambda: bad.api_keys.list(), "ERR_NGROK_203", 401)

step("deleting a service user cascades to its keys and credentials")
c.service_users.delete(su.id)
expect_error(lambda: c.service_users.get(su.id), "ERR_NGROK_404", 404, ngrok.NotFoundError)
expect_error(lambda: c.api_keys.get(key.id), "ERR_NGROK_404", 404, ngrok.NotFoundError)
expect_error(lambda: c.credentials.get(cred.id), "ERR_NGROK_404", 404, ngrok.NotFoundError)
expect_error(lambda: as_su.api_keys.list(), "ERR_NGROK_203", 401)
c.service_users.delete(inactive.id)

step("protocol: missing/unsupported ngrok-version, missing auth")
auth = {"Authorization": "Bearer " + ADMIN}
status, headers, body = raw("GET", "/service_users", headers=auth)
assert status == 400 and body["error_code"] == "ERR_NGROK_218", (status, body)
assert body["details"]["operation_id"].startswith("op_") and headers["ngrok-operation-id"]
status, _, body = raw("GET", "/service_users", headers={**auth, "Ngrok-Version": "1"})
assert status == 400 and body["error_code"] == "ERR_NGROK_217", (status, body)
status, _, body = raw("GET", "/service_users", headers={"NGROK-VERSION": "2"})
assert status == 401 and body["error_code"] == "ERR_NGROK_200", (status, body)
status, _, body = raw("GET", "/service_users", headers={**auth, "NGROK-VERSION": "2"})
assert status == 200 and body["next_page_uri"] is None
made = c.service_users.create(name="conformance-delete-204")
status, _, body = raw("DELETE", f"/service_users/{made.id}", headers={**auth, "Ngrok-Version": "2"})
assert status == 204 and body is None, (status, body)
status, _, body = raw("PATCH", "/api_keys/ak_" + "0" * 27, {"owner_id": "x"}, {**auth, "Ngrok-Version": "2"})
assert status == 400 and body["error_code"] == "ERR_NGROK_214", (status, body)

step("rate limit: 429 ERR_NGROK_226 with Retry-After")
status, _, _ = raw("PUT", "/_sandbox/faults", {"rate_limit": "3/60s"})
assert status == 200
try:
    for _ in range(3):
        c.api_keys.list()
    e = expect_error(lambda: c.api_keys.list(), "ERR_NGROK_226", 429)
    assert "rate limited to 3 API requests per minute" in str(e), str(e)
    status, headers, body = raw("GET", "/api_keys", headers={**auth, "ngrok-version": "2"})
    assert status == 429 and int(headers["Retry-After"]) >= 1, (status, dict(headers))
finally:
    raw("PUT", "/_sandbox/faults", {"rate_limit": None})
c.api_keys.list()
status, _, stats = raw("GET", "/_sandbox/stats")
assert stats["rate_limited"] >= 2 and stats["requests"] > 0 and stats["by_route"]["GET /api_keys"] > 0, stats

print("ngrok conformance: all checks passed", flush=True)
sys.exit(0)
