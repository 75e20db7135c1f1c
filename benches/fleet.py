#!/usr/bin/env python3
"""Observing a fleet account: keyward's no-op plan side by side with ngrok's official Python
client (ngrok-api 0.19.0) listing the same account, at 2,000, 10,000 and 100,000 service users
(each with 2 API keys and 1 credential), against the bundled sandbox answering every request
after 20 ms. For each: wall time, requests (counted by the sandbox), CPU seconds, peak RSS, the
request lower bound (one request per list page), and the parallel-lists bound (the three lists
listed at once, each page after the one before it: the longest list's pages x 20 ms). keyward's
plan runs twice: first without page marks (as the first listing of an account), then with the
marks that listing left, which let it read each list in stretches side by side. Also
keyward's planner and renderer time (from its -v log) and what `keyward import` cost to take
the account over (it is how the config and state for the no-op plan are made).

Usage: python3 benches/fleet.py [--sizes 2000,10000,100000] [--latency-ms 20]
(builds the release binaries first). Prints figures; asserts nothing."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
PAGE = 100

PEER = r"""
import os, ngrok
c = ngrok.Client(os.environ["NGROK_API_KEY"], base_url=os.environ["KEYWARD_SANDBOX_URL"])
n = [sum(1 for _ in c.service_users.list()), sum(1 for _ in c.api_keys.list()),
     sum(1 for _ in c.credentials.list())]
print(n)
"""


def call(url, method="GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read().decode() or "null")


def measured(cmd, env, cwd):
    """Runs `cmd` and returns (code, out, err, wall, cpu, peak RSS MiB) of that process alone.
    The peak comes from GNU time, whose child starts small: a child forked from this process
    would report this process's own peak when its own is lower (Linux keeps the high-water mark
    across fork and exec)."""
    rss_file = tempfile.NamedTemporaryFile(prefix="rss-", delete=False)
    rss_file.close()
    cmd = ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *cmd]
    t = time.monotonic()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_chunks, err_chunks = [], []
    import threading

    def pump(src, sink):
        for chunk in iter(lambda: src.read(65536), b""):
            sink.append(chunk)

    threads = [threading.Thread(target=pump, args=(p.stdout, out_chunks)),
               threading.Thread(target=pump, args=(p.stderr, err_chunks))]
    for th in threads:
        th.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
    for th in threads:
        th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    with open(rss_file.name) as f:
        peak_kib = int(f.read().strip().splitlines()[-1])
    os.unlink(rss_file.name)
    return (p.returncode, b"".join(out_chunks).decode(), b"".join(err_chunks).decode(), wall,
            ru.ru_utime + ru.ru_stime, peak_kib / 1024)


def start_sandbox(latency_ms, extra=()):
    p = subprocess.Popen([os.path.join(BIN, "keyward-sandbox"), "--listen", "127.0.0.1:0",
                          "--latency", f"{latency_ms}ms", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    env = {}
    for line in p.stdout:
        m = re.match(r"^([A-Z_]+)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
        if "ASA_KEY_SECRET" in env:
            break
    return p, env


def seed(url, users):
    """Seeds `users` service users with 2 API keys and 1 credential each, in batches."""
    batch = 10_000
    for start in range(0, users, batch):
        names = [f"fleet-{i:06d}" for i in range(start, min(users, start + batch))]
        call(f"{url}/_sandbox/ngrok/seed", "POST", {
            "service_users": [{"name": n} for n in names],
            "api_keys": [{"owner_name": n, "description": d} for n in names for d in ("deploy", "ci")],
            "credentials": [{"owner_name": n, "description": "agent"} for n in names],
        })


def one_size(users, latency_ms, python):
    sb, sbenv = start_sandbox(latency_ms)
    url = sbenv["KEYWARD_SANDBOX_URL"]
    try:
        t = time.monotonic()
        seed(url, users)
        seeded = time.monotonic() - t
        stats = call(f"{url}/_sandbox/stats")
        with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "target")) as d:
            env = dict(os.environ, NO_COLOR="1", **sbenv)
            header = (
                "version: 1\nsettings:\n  state_dir: state\n  concurrency: 8\n"
                "  metrics_per_key: false\nproviders:\n  ng:\n    type: ngrok\n"
                "    api_key: ${NGROK_API_KEY}\n    base_url: ${KEYWARD_SANDBOX_URL}\n"
                "    rate_limit: 1000000/1s\nsinks:\n  local:\n    type: file\n"
                "    path: secrets/{provider}/{user}/{slot}.json\n    format: json\n"
                "defaults:\n  sink: local\n")
            cfg = os.path.join(d, "keyward.yaml")
            with open(cfg, "w") as f:
                f.write(header)
            kw = os.path.join(BIN, "keyward")
            code, doc, err, imp_wall, imp_cpu, imp_rss = measured(
                [kw, "-c", cfg, "import", "-q"], env, d)
            if code != 0:
                sys.exit(f"import failed at {users}: {err[-2000:]}")
            with open(cfg, "a") as f:
                f.write(doc)
            # keyward's no-op plan: first without page marks (as the first listing of an
            # account), which leaves them; then with them.
            marks = os.path.join(d, "state", "listing-marks.json")
            if os.path.exists(marks):
                os.unlink(marks)
            runs = []
            for _ in range(2):
                call(f"{url}/_sandbox/stats/reset", "POST", {})
                code, out, err, kw_wall, kw_cpu, kw_rss = measured(
                    [kw, "-c", cfg, "plan", "--detailed-exitcode", "-v"], env, d)
                kw_req = call(f"{url}/_sandbox/stats")["requests"]
                if code != 0:
                    sys.exit(f"the plan at {users} was not a no-op (exit {code}): {err[-2000:]}")
                runs.append((kw_wall, kw_req, kw_cpu, kw_rss))
            planned = re.search(r"planned \d+ change\(s\) and \d+ warning\(s\) in ([\d.]+) ms", err)
            rendered = re.search(r"plan rendered in ([\d.]+) ms", err)
            # The peer: the official client lists the same three collections.
            call(f"{url}/_sandbox/stats/reset", "POST", {})
            code, out, err, py_wall, py_cpu, py_rss = measured([python, "-c", PEER], env, d)
            py_req = call(f"{url}/_sandbox/stats")["requests"]
            if code != 0:
                sys.exit(f"the Python client failed: {err[-2000:]}")
        pages = [math.ceil(max(users, 1) / PAGE), math.ceil((2 * users + 1) / PAGE),
                 math.ceil(users / PAGE)]
        lower = sum(pages)
        parallel = max(pages) * latency_ms / 1000
        return {
            "users": users, "seeded_s": seeded, "lower": lower, "parallel_s": parallel,
            "kw": runs[1],
            "kw_unmarked": runs[0],
            "py": (py_wall, py_req, py_cpu, py_rss),
            "plan_ms": float(planned.group(1)) if planned else None,
            "render_ms": float(rendered.group(1)) if rendered else None,
            "import": (imp_wall, imp_cpu, imp_rss),
        }
    finally:
        sb.terminate()
        sb.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,10000,100000")
    ap.add_argument("--latency-ms", type=int, default=20)
    ap.add_argument("--python", default=sys.executable)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bins"], cwd=ROOT, check=True)
    sizes = [int(s) for s in a.sizes.split(",") if s]
    rows = []
    for n in sizes:
        r = one_size(n, a.latency_ms, a.python)
        rows.append(r)
        kw, kw0, py = r["kw"], r["kw_unmarked"], r["py"]
        print(f"\n{n:,} users x (2 api keys + 1 credential), {a.latency_ms} ms per request")
        print(f"  {'':30}{'wall s':>9}{'requests':>10}{'CPU s':>8}{'peak RSS MiB':>14}")
        for label, row in (("keyward plan, no page marks", kw0), ("keyward plan (no-op)", kw),
                           ("ngrok-api 0.19.0 lists", py)):
            print(f"  {label:30}{row[0]:>9.2f}{row[1]:>10}{row[2]:>8.2f}{row[3]:>14.1f}")
        print(f"  request lower bound {r['lower']}; parallel-lists bound {r['parallel_s']:.2f} s; "
              f"keyward wall / bound = {kw[0] / r['parallel_s']:.2f} "
              f"({kw0[0] / r['parallel_s']:.2f} without page marks)")
        if r["plan_ms"] is not None:
            print(f"  keyward planner {r['plan_ms']:.1f} ms, renderer {r['render_ms']:.1f} ms")
        imp = r["import"]
        print(f"  (keyward import of the account: {imp[0]:.2f} s wall, {imp[1]:.2f} s CPU, "
              f"{imp[2]:.1f} MiB; seeding the sandbox took {r['seeded_s']:.1f} s)")
    if len(rows) >= 2:
        a0, a1 = rows[-2], rows[-1]
        print(f"\nCPU growth {a0['users']:,} -> {a1['users']:,} users: keyward "
              f"{a1['kw'][2] / max(a0['kw'][2], 1e-9):.1f}x, peer {a1['py'][2] / max(a0['py'][2], 1e-9):.1f}x "
              f"(for {a1['users'] / a0['users']:.0f}x the users)")


if __name__ == "__main__":
    main()
