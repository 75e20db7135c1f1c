"""Drives keyward-sandbox with the official ngrok Python client (PyPI ngrok-api==0.19.0).

Reads KEYWARD_SANDBOX_URL and NGROK_API_KEY from the environment. Run by tests/sandbox_conformance.rs.

Every check goes through check(), never a bare `assert` (asserts vanish under PYTHONOPTIMIZE). A
failed check is reported and counted and the script goes on; it exits non-zero if any check failed,
or on an unexpected exception, and the last line printed is "N passed, M failed".
KEYWARD_CONFORMANCE_SELF_TEST=1 adds one check that must fail, to prove checks cannot be optimized away.
"""

import json
import os
import sys
import traceback
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


PASSED = 0
FAILURES = []
CURRENT_STEP = "start"


def check(cond, message):
    """Records one check. `message` (a string, or a callable for a message that is costly or only
    valid on failure) says what was seen."""
    global PASSED
    if cond:
        PASSED += 1
        return True
    try:
        text = message() if callable(message) else message
    except Exception as e:  # the message itself could not be built; still a failure
        text = f"<message raised {e!r}>"
    FAILURES.append(f"[{CURRENT_STEP}] {text}")
    print(f"FAIL [{CURRENT_STEP}] {text}", flush=True)
    return False


def summary():
    print(f"{PASSED} passed, {len(FAILURES)} failed", flush=True)


def excepthook(kind, value, tb):
    """An unexpected exception ends the run: it counts as a failure, and the summary still prints."""
    traceback.print_exception(kind, value, tb)
    FAILURES.append(f"[{CURRENT_STEP}] unexpected {kind.__name__}: {value}")
    print(f"FAIL [{CURRENT_STEP}] unexpected {kind.__name__}: {value}", flush=True)
    summary()
    # Returning lets the interpreter exit with status 1, as for any uncaught exception.


sys.excepthook = excepthook


def expect_error(fn, code, status=None, cls=ngrok.Error):
    try:
        fn()
    except cls as e:
        check(e.error_code == code, lambda: f"expected {code}, got {e.error_code}: {e}")
        if status is not None:
            check(e.http_status_code == status, lambda: f"expected HTTP {status}, got {e.http_status_code}")
        check(e.operation_id and e.operation_id.startswith("op_"), lambda: e.operation_id)
        return e
    check(False, f"expected {cls.__name__} {code}, got no error")
    return None


def step(name):
    global CURRENT_STEP
    CURRENT_STEP = name
    print(f"== {name}", flush=True)


if os.environ.get("KEYWARD_CONFORMANCE_SELF_TEST") == "1":
    step("self-test: a deliberately broken expectation")
    check(1 + 1 == 3, "self_test.must_fail: deliberate failure requested by KEYWARD_CONFORMANCE_SELF_TEST=1")


c = ngrok.Client(ADMIN, base_url=URL)

step("service users: create, get, defaults")
su = c.service_users.create(name="conformance-ci")
check(su.id.startswith("bot_") and len(su.id) == 4 + 27, lambda: su.id)
check(su.active is True, 'su.active is True')
check(su.name == "conformance-ci", 'su.name == "conformance-ci"')
check(su.uri == f"{URL}/service_users/{su.id}", lambda: su.uri)
check(su.created_at.endswith("Z"), lambda: su.created_at)
got = c.service_users.get(su.id)
check(got.id == su.id and got.name == su.name and got.active is True, 'got.id == su.id and got.name == su.name and got.active is True')
inactive = c.service_users.create(name="conformance-inactive", active=False)
check(inactive.active is False, 'inactive.active is False')

step("service users: validation errors")
expect_error(lambda: c.service_users.create(name="conformance-ci"), "ERR_NGROK_4112", 400)
expect_error(lambda: c.bot_users.create(name="conformance-ci"), "ERR_NGROK_4112", 400)
expect_error(lambda: c.service_users.create(), "ERR_NGROK_4109", 400)

step("service users: update (deactivate, reactivate, rename, no-op)")
upd = c.service_users.update(su.id, active=False)
check(upd.active is False and upd.name == "conformance-ci", 'upd.active is False and upd.name == "conformance-ci"')
check(c.service_users.get(su.id).active is False, 'c.service_users.get(su.id).active is False')
upd = c.service_users.update(su.id, active=True)
check(upd.active is True, 'upd.active is True')
upd = c.service_users.update(su.id, name="conformance-renamed")
check(upd.name == "conformance-renamed", 'upd.name == "conformance-renamed"')
noop = c.service_users.update(su.id)  # sends {}
check(noop.name == "conformance-renamed" and noop.active is True, 'noop.name == "conformance-renamed" and noop.active is True')
expect_error(lambda: c.service_users.update(su.id, name=inactive.name), "ERR_NGROK_4112", 400)
# The old name is free again after a rename.
again = c.service_users.create(name="conformance-ci")
again.delete()

step("service users: pagination past one page (150 users)")
created = [c.service_users.create(name=f"conformance-page-{i:03d}").id for i in range(150)]
first = c.service_users.list()
check(len(first.service_users) == 100, lambda: len(first.service_users))
check(first.next_page_uri is not None and first.next_page_uri.startswith("http://"), lambda: first.next_page_uri)
check("limit=100" in first.next_page_uri and "before_id=" in first.next_page_uri, '"limit=100" in first.next_page_uri and "before_id=" in first.next_page_uri')
check(first.uri == f"{URL}/service_users", 'first.uri == f"{URL}/service_users"')
ids = [u.id for u in first.service_users]
check(ids == sorted(ids, reverse=True), lambda: "first page not newest first")
all_ids = [u.id for u in c.service_users.list()]  # iterating follows next_page_uri
check(len(all_ids) == len(set(all_ids)), lambda: "duplicate across pages")
check(set(created) <= set(all_ids), 'set(created) <= set(all_ids)')
check(su.id in all_ids and inactive.id in all_ids, 'su.id in all_ids and inactive.id in all_ids')
check(all_ids == sorted(all_ids, reverse=True), lambda: "iteration not newest first")
small = c.service_users.list(limit=7)
check(len(small.service_users) == 7 and "limit=7" in small.next_page_uri, 'len(small.service_users) == 7 and "limit=7" in small.next_page_uri')
check([u.id for u in small.service_users] == all_ids[:7], '[u.id for u in small.service_users] == all_ids[:7]')
after = c.service_users.list(before_id=all_ids[6], limit=3)
check([u.id for u in after.service_users] == all_ids[7:10], '[u.id for u in after.service_users] == all_ids[7:10]')
last = c.service_users.list(before_id=all_ids[-2])
check([u.id for u in last.service_users] == all_ids[-1:] and last.next_page_uri is None, '[u.id for u in last.service_users] == all_ids[-1:] and last.next_page_uri is None')
expect_error(lambda: c.service_users.list(before_id="not-an-id"), "ERR_NGROK_223", 400)
expect_error(lambda: c.service_users.list(limit=101), "ERR_NGROK_233", 400)
filtered = c.service_users.list(filter=f'obj.id == "{su.id}"')
check([u.id for u in filtered.service_users] == [su.id], '[u.id for u in filtered.service_users] == [su.id]')

step("bot_users sees the same users")
bot = c.bot_users.get(su.id)
check(bot.id == su.id and bot.name == "conformance-renamed", 'bot.id == su.id and bot.name == "conformance-renamed"')
bot_ids = [u.id for u in c.bot_users.list()]
check(set(bot_ids) == set(all_ids), 'set(bot_ids) == set(all_ids)')
page = c.bot_users.list(limit=1)
check(len(page.bot_users) == 1 and page.next_page_uri.startswith(f"{URL}/bot_users?"), 'len(page.bot_users) == 1 and page.next_page_uri.startswith(f"{URL}/bot_users?")')
for uid in created:
    c.service_users.delete(uid)

step("api keys: create with owner, token only at create")
key = c.api_keys.create(description="ci key", metadata='{"managed_by":"keyward"}', owner_id=su.id)
check(key.id.startswith("ak_") and key.owner_id == su.id, 'key.id.startswith("ak_") and key.owner_id == su.id')
check(key.token and len(key.token) == 49, lambda: key.token)
check(key.token.startswith(key.id[3:] + "_"), 'key.token.startswith(key.id[3:] + "_")')
check(key.description == "ci key" and key.metadata == '{"managed_by":"keyward"}', 'key.description == "ci key" and key.metadata == \'{"managed_by":"keyward"}\'')
check(key.uri == f"{URL}/api_keys/{key.id}", 'key.uri == f"{URL}/api_keys/{key.id}"')
k = c.api_keys.get(key.id)
check(k.token is None and k.owner_id == su.id and k.metadata == key.metadata, 'k.token is None and k.owner_id == su.id and k.metadata == key.metadata')
listed = {x.id: x for x in c.api_keys.list()}
check(key.id in listed and listed[key.id].token is None, 'key.id in listed and listed[key.id].token is None')
owned = c.api_keys.list(filter=f'obj.owner_id == "{su.id}"')
check([x.id for x in owned.keys] == [key.id], '[x.id for x in owned.keys] == [key.id]')
plain = c.api_keys.create()
check(plain.description == "" and plain.metadata == "" and plain.owner_id.startswith("usr_"), 'plain.description == "" and plain.metadata == "" and plain.owner_id.startswith("usr_")')
upd = c.api_keys.update(plain.id, description="now described")
check(upd.description == "now described" and upd.token is None, 'upd.description == "now described" and upd.token is None')
upd = c.api_keys.update(plain.id, description="")
check(upd.description == "", 'upd.description == ""')
expect_error(lambda: c.api_keys.create(description="x" * 256), "ERR_NGROK_604", 400)
expect_error(lambda: c.api_keys.create(metadata="x" * 4097), "ERR_NGROK_605", 400)
expect_error(lambda: c.api_keys.create(owner_id="bot_" + "0" * 27), "ERR_NGROK_634", 400)
c.api_keys.delete(plain.id)
expect_error(lambda: c.api_keys.get(plain.id), "ERR_NGROK_404", 404, ngrok.NotFoundError)

step("credentials: create with owner and acl, token only at create")
cred = c.credentials.create(description="tunnel", acl=["bind:*.example.com"], owner_id=su.id)
check(cred.id.startswith("cr_") and cred.owner_id == su.id, 'cred.id.startswith("cr_") and cred.owner_id == su.id')
check(cred.token and len(cred.token) == 49, 'cred.token and len(cred.token) == 49')
check(cred.acl == ["bind:*.example.com"], 'cred.acl == ["bind:*.example.com"]')
got = c.credentials.get(cred.id)
check(got.token is None and got.acl == ["bind:*.example.com"] and got.metadata == "", 'got.token is None and got.acl == ["bind:*.example.com"] and got.metadata == ""')
check(cred.id in [x.id for x in c.credentials.list()], 'cred.id in [x.id for x in c.credentials.list()]')
check(all(x.token is None for x in c.credentials.list()), 'all(x.token is None for x in c.credentials.list())')
cleared = c.credentials.update(cred.id, acl=[])
check(cleared.acl == [], 'cleared.acl == []')
expect_error(lambda: c.credentials.create(acl=["connect:x"]), "ERR_NGROK_600", 400)
open_cred = c.credentials.create()
check(open_cred.acl == [] and open_cred.description == "", 'open_cred.acl == [] and open_cred.description == ""')
open_cred.delete()

step("sandbox verify: credential secret works")
status, _, body = raw("POST", "/_sandbox/verify", {"token": cred.token})
check(status == 200 and body["kind"] == "credential" and body["id"] == cred.id, lambda: (status, body))
status, _, body = raw("POST", "/_sandbox/verify", {"token": "nope_nope"})
check(status == 401, lambda: status)

step("404s raise NotFoundError")
expect_error(lambda: c.service_users.get("bot_" + "0" * 27), "ERR_NGROK_404", 404, ngrok.NotFoundError)
expect_error(lambda: c.credentials.delete("cr_" + "0" * 27), "ERR_NGROK_404", 404, ngrok.NotFoundError)

step("a service user's API key authenticates, and stops when its owner is deactivated")
as_su = ngrok.Client(key.token, base_url=URL)
check(su.id in [u.id for u in as_su.service_users.list()], 'su.id in [u.id for u in as_su.service_users.list()]')
c.service_users.update(su.id, active=False)
expect_error(lambda: as_su.service_users.list(), "ERR_NGROK_203", 401)
status, _, _ = raw("POST", "/_sandbox/verify", {"token": cred.token})
check(status == 401, lambda: "credential of an inactive owner must not verify")
c.service_users.update(su.id, active=True)
check(su.id in [u.id for u in as_su.service_users.list()], lambda: "reactivation restores the key")
check(key.id in [x.id for x in as_su.api_keys.list()], 'key.id in [x.id for x in as_su.api_keys.list()]')
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
check(status == 400 and body["error_code"] == "ERR_NGROK_218", lambda: (status, body))
check(body["details"]["operation_id"].startswith("op_") and headers["ngrok-operation-id"], 'body["details"]["operation_id"].startswith("op_") and headers["ngrok-operation-id"]')
status, _, body = raw("GET", "/service_users", headers={**auth, "Ngrok-Version": "1"})
check(status == 400 and body["error_code"] == "ERR_NGROK_217", lambda: (status, body))
status, _, body = raw("GET", "/service_users", headers={"NGROK-VERSION": "2"})
check(status == 401 and body["error_code"] == "ERR_NGROK_200", lambda: (status, body))
status, _, body = raw("GET", "/service_users", headers={**auth, "NGROK-VERSION": "2"})
check(status == 200 and body["next_page_uri"] is None, 'status == 200 and body["next_page_uri"] is None')
made = c.service_users.create(name="conformance-delete-204")
status, _, body = raw("DELETE", f"/service_users/{made.id}", headers={**auth, "Ngrok-Version": "2"})
check(status == 204 and body is None, lambda: (status, body))
status, _, body = raw("PATCH", "/api_keys/ak_" + "0" * 27, {"owner_id": "x"}, {**auth, "Ngrok-Version": "2"})
check(status == 400 and body["error_code"] == "ERR_NGROK_214", lambda: (status, body))

step("rate limit: 429 ERR_NGROK_226 with Retry-After")
status, _, _ = raw("PUT", "/_sandbox/faults", {"rate_limit": "3/60s"})
check(status == 200, 'status == 200')
try:
    for _ in range(3):
        c.api_keys.list()
    e = expect_error(lambda: c.api_keys.list(), "ERR_NGROK_226", 429)
    check("rate limited to 3 API requests per minute" in str(e), lambda: str(e))
    status, headers, body = raw("GET", "/api_keys", headers={**auth, "ngrok-version": "2"})
    check(status == 429 and int(headers["Retry-After"]) >= 1, lambda: (status, dict(headers)))
finally:
    raw("PUT", "/_sandbox/faults", {"rate_limit": None})
c.api_keys.list()
status, _, stats = raw("GET", "/_sandbox/stats")
check(stats["rate_limited"] >= 2 and stats["requests"] > 0 and stats["by_route"]["GET /api_keys"] > 0, lambda: stats)

if not FAILURES:
    print("ngrok conformance: all checks passed", flush=True)
summary()
sys.exit(1 if FAILURES else 0)

