#!/usr/bin/env python3
"""A daemon managing a fleet: requests per hour, CPU and memory of `keyward daemon` managing
100,000 service users (each with 2 API keys and 1 credential: 300,000 slots) against the bundled
sandbox (20 ms per request), in two windows side by side:

- nothing due: no key comes due in the window, and no interval listing falls in it;
- 1 % of slots due per day: the keys' creation times are spread evenly over the last
  `rotate_every` (100 days), so 1 % of the slots come due each day, evenly (3,000 a day).

For each: requests the sandbox counted, of them the pages of full listings (the daemon's
`keyward_listing_pages_total`), rotations and revocations done, CPU seconds, resident memory
at the end. Requests per hour are the window's figures scaled to an hour, plus one full
listing per `interval` (its pages measured at start-up), set against the account budget
(`rate_limit: 100/60s` = 6,000 requests an hour). The baseline is the idle daemon of the same
binary managing no user, measured in the same window.

Usage: python3 benches/fleet_daemon.py [--users 100000] [--window-min 10] [--interval-h 2]
(builds the release binaries first). Prints figures; asserts nothing."""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet import BIN, ROOT, call, start_sandbox  # noqa: E402
from idle_daemon import cpu_seconds  # noqa: E402

DAY = 86_400


def status_mib(pid, field):
    """A memory figure of /proc/PID/status in MiB: VmRSS (resident now), VmHWM (its peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def seed(url, users, rotate_days, now):
    """`users` service users, each with 2 API keys and 1 credential created evenly over the last
    `rotate_days` days (never older: nothing is overdue at the start)."""
    rng = random.Random(1)
    batch = 10_000
    for start in range(0, users, batch):
        names = [f"fleet-{i:06d}" for i in range(start, min(users, start + batch))]
        age = lambda: rng.uniform(600, rotate_days * DAY - 600)  # noqa: E731
        call(f"{url}/_sandbox/ngrok/seed", "POST", {
            "service_users": [{"name": n} for n in names],
            "api_keys": [{"owner_name": n, "description": d, "created_at": iso(now - age())}
                         for n in names for d in ("deploy", "ci")],
            "credentials": [{"owner_name": n, "description": "agent",
                             "created_at": iso(now - age())} for n in names],
        })


def metric(port, name):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = 0.0
    seen = False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def run_daemon(d, env, cfg, port, window_s, label):
    """Starts the daemon, waits for its start-up listing and runs, then measures a window."""
    log = open(os.path.join(d, f"daemon-{label}.log"), "w")
    p = subprocess.Popen([os.path.join(BIN, "keyward"), "daemon", "-c", cfg], env=env, cwd=d,
                         stdout=subprocess.DEVNULL, stderr=log)
    try:
        t0 = time.monotonic()
        while metric(port, "keyward_reconcile_total") in (None, 0.0):
            if p.poll() is not None:
                sys.exit(f"the {label} daemon exited: see {log.name}")
            time.sleep(1)
        # The start-up run and its look-again.
        time.sleep(10)
        started = time.monotonic() - t0
        return p, log, started
    except BaseException:
        p.kill()
        raise


def measure(p, port, url, window_s):
    call(f"{url}/_sandbox/stats/reset", "POST", {})
    pages0 = metric(port, "keyward_listing_pages_total") or 0.0
    cpu0 = cpu_seconds(p.pid)
    time.sleep(window_s)
    stats = call(f"{url}/_sandbox/stats")
    pages = (metric(port, "keyward_listing_pages_total") or 0.0) - pages0
    return {
        "requests": stats["requests"], "listing": int(pages), "by_route": stats["by_route"],
        "rate_limited": stats["rate_limited"], "cpu": cpu_seconds(p.pid) - cpu0,
        "rss": status_mib(p.pid, "VmRSS"), "hwm": status_mib(p.pid, "VmHWM"),
    }


def config(header, port, interval_h, rotate_days):
    return header.replace("SETTINGS", (
        f"  interval: {interval_h}h\n  resync_share: 50\n  metrics: 127.0.0.1:{port}\n"
        "  metrics_per_key: false\n")).replace("DEFAULTS", f"  rotate_every: {rotate_days}d\n  overlap: 5m\n")


HEADER = ("version: 1\nsettings:\n  state_dir: state\n  concurrency: 8\nSETTINGS"
          "providers:\n  ng:\n    type: ngrok\n    api_key: ${NGROK_API_KEY}\n"
          "    base_url: ${KEYWARD_SANDBOX_URL}\n    rate_limit: 100000/60s\n"
          "sinks:\n  local:\n    type: file\n    path: secrets/{provider}/{user}/{slot}.json\n"
          "    format: json\ndefaults:\n  sink: local\nDEFAULTS")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--window-min", type=float, default=10)
    ap.add_argument("--interval-h", type=int, default=2)
    ap.add_argument("--latency-ms", type=int, default=20)
    ap.add_argument("--scenarios", default="baseline,idle,due",
                    help="which of baseline, idle (nothing due) and due (1 %% a day) to run")
    a = ap.parse_args()
    wanted = set(a.scenarios.split(","))
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bins"], cwd=ROOT, check=True)
    window_s = a.window_min * 60
    rows = {}
    for key, label, users, rotate_days in (("baseline", "baseline: no user", 0, 3650),
                                           ("idle", "nothing due", a.users, 3650),
                                           ("due", "1 % due per day", a.users, 100)):
        if key not in wanted:
            continue
        sb, sbenv = start_sandbox(a.latency_ms)
        url = sbenv["KEYWARD_SANDBOX_URL"]
        port = 19_000 + len(rows)
        try:
            with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "target")) as d:
                now = time.time()
                seed(url, users, min(rotate_days, 100), now)
                cfg = os.path.join(d, "keyward.yaml")
                env = dict(os.environ, NO_COLOR="1", **sbenv)
                with open(cfg, "w") as f:
                    f.write(config(HEADER, port, a.interval_h, rotate_days))
                if users:
                    # Take the account over: the config and state the daemon manages.
                    doc = subprocess.run([os.path.join(BIN, "keyward"), "-c", cfg, "import", "-q"],
                                         env=env, cwd=d, capture_output=True, text=True, check=True).stdout
                    with open(cfg, "a") as f:
                        f.write(doc)
                else:
                    with open(cfg, "a") as f:
                        f.write("users: []\n")
                call(f"{url}/_sandbox/stats/reset", "POST", {})
                p, log, started = run_daemon(d, env, cfg, port, window_s, label.split(":")[0].replace(" ", "-"))
                try:
                    start_pages = metric(port, "keyward_listing_pages_total") or 0.0
                    r = measure(p, port, url, window_s)
                    r["start_pages"] = int(start_pages)
                    r["started_s"] = started
                    log.flush()
                    with open(log.name) as lf:
                        text = lf.read()
                    r["rotated"] = len(re.findall(r"rotate key \S+: done", text))
                    r["revoked"] = len(re.findall(r"revoke key \S+: done", text))
                finally:
                    p.terminate()
                    p.wait()
                rows[label] = r
        finally:
            sb.terminate()
            sb.wait()
    scale = 3600 / window_s
    budget = 6000
    print(f"\nkeyward daemon managing {a.users:,} users (x 2 api keys + 1 credential), "
          f"{a.latency_ms} ms per request, interval {a.interval_h}h, window {a.window_min:g} min")
    print(f"  {'':20}{'requests':>9}{'listing':>9}{'other':>7}{'rot':>6}{'rev':>6}"
          f"{'req/hour':>10}{'budget %':>9}{'CPU s':>8}{'RSS MiB':>9}{'peak MiB':>9}")
    for label, r in rows.items():
        listing_per_hour = r["start_pages"] / a.interval_h
        other = r["requests"] - r["listing"]
        per_hour = other * scale + listing_per_hour
        print(f"  {label:20}{r['requests']:>9}{r['listing']:>9}{other:>7}{r['rotated']:>6}"
              f"{r['revoked']:>6}{per_hour:>10.0f}{per_hour / budget * 100:>9.1f}"
              f"{r['cpu']:>8.2f}{r['rss']:>9.1f}{r['hwm']:>9.1f}")
    print(f"  req/hour = the window's requests besides listings x {scale:g} + one full listing "
          f"per interval ({max(r['start_pages'] for r in rows.values()):,} pages at start-up / "
          f"{a.interval_h} h); budget = rate_limit 100/60s = {budget:,} requests an hour")
    for label, r in rows.items():
        print(f"  {label}: start-up (listing and first runs) {r['started_s']:.0f} s; "
              f"429s {r['rate_limited']}; routes {json.dumps(r['by_route'])}")


if __name__ == "__main__":
    main()
