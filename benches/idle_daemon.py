#!/usr/bin/env python3
"""Measures keyward's idle daemon: CPU seconds, wake-ups and resident memory over a quiet
window between reconciles, for a daemon managing 1,000 users (1,000 keys) side by side with a
baseline daemon managing none, both against the bundled sandbox on loopback.

Usage: python3 benches/idle_daemon.py [--users 1000] [--seconds 60]
(builds the release binaries first). Prints figures; asserts nothing."""

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def switches(pid):
    """Context switches summed over every thread: each is a wake-up (or a preemption)."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as f:
                text = f.read()
        except FileNotFoundError:
            continue  # a thread exited
        for key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
            total += int(m.group(1)) if m else 0
    return total


def threads(pid):
    return len(glob.glob(f"/proc/{pid}/task/*"))


def memory_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def config(path, state, users, port):
    lines = [
        "version: 1",
        "settings:",
        f"  state_dir: {state}",
        "  interval: 10m",
        "  concurrency: 16",
        f"  metrics: 127.0.0.1:{port}",
        "providers:",
        "  ng:",
        "    type: ngrok",
        "    api_key: ${NGROK_API_KEY}",
        "    base_url: ${KEYWARD_SANDBOX_URL}",
        "    rate_limit: 100000/1s",
        "sinks:",
        "  local:",
        "    type: file",
        f"    path: {state}/secrets/{{user}}/{{slot}}.json",
        "defaults:",
        "  sink: local",
        "  rotate_every: 30d",
        "users:" if users else "users: []",
    ]
    for i in range(users):
        lines += [f"  - provider: ng", f"    name: fleet-{i:04}", "    keys:", "      main: {}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="keyward-idle-")
    sandbox = subprocess.Popen(
        [os.path.join(BIN, "keyward-sandbox"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    env = dict(os.environ, NO_COLOR="1")
    for line in sandbox.stdout:
        if "=" in line and not line.startswith("#"):
            k, v = line.strip().split("=", 1)
            env[k] = v
        if "NGROK_API_KEY" in env and "KEYWARD_SANDBOX_URL" in env:
            break
    url = env["KEYWARD_SANDBOX_URL"]
    daemons = {}
    try:
        runs = {"baseline (0 users)": 0, f"managed ({args.users} users)": args.users}
        for name, users in runs.items():
            d = os.path.join(work, str(users))
            os.makedirs(d)
            port = free_port()
            cfg = os.path.join(d, "keyward.yaml")
            config(cfg, os.path.join(d, "state"), users, port)
            if users:
                t = time.time()
                subprocess.run([os.path.join(BIN, "keyward"), "apply", "--auto-approve", "-q", "-c", cfg],
                               env=env, check=True, stdout=subprocess.DEVNULL)
                print(f"setup: applied {users} users with one key each in {time.time() - t:.1f}s", file=sys.stderr)
            log = open(os.path.join(d, "daemon.log"), "w")
            p = subprocess.Popen([os.path.join(BIN, "keyward"), "daemon", "-c", cfg], env=env,
                                 stdout=subprocess.DEVNULL, stderr=log)
            daemons[name] = (p, port)
        # Wait for each daemon's first reconcile, then for any follow-up to finish.
        for name, (p, port) in daemons.items():
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if "keyward_reconcile_total" in get(f"http://127.0.0.1:{port}/metrics"):
                        break
                except OSError:
                    pass
                time.sleep(0.2)
        time.sleep(5)
        get(f"{url}/_sandbox/stats")
        urllib.request.urlopen(urllib.request.Request(f"{url}/_sandbox/stats/reset", method="POST"), timeout=10)

        before = {n: (cpu_seconds(p.pid), switches(p.pid)) for n, (p, _) in daemons.items()}
        time.sleep(args.seconds)
        after = {n: (cpu_seconds(p.pid), switches(p.pid)) for n, (p, _) in daemons.items()}
        import json

        requests = json.loads(get(f"{url}/_sandbox/stats"))["requests"]

        print(f"idle window: {args.seconds:.0f}s between reconciles (interval 10m); "
              f"requests to the sandbox in the window, all daemons: {requests}")
        print(f"{'daemon':<26} {'CPU s/window':>12} {'CPU s/min':>10} {'wake-ups':>9} {'threads':>8} {'RSS MiB':>8} {'peak MiB':>9}")
        for n, (p, _) in daemons.items():
            cpu = after[n][0] - before[n][0]
            wakes = after[n][1] - before[n][1]
            rss = memory_kib(p.pid, "VmRSS") / 1024
            hwm = memory_kib(p.pid, "VmHWM") / 1024
            print(f"{n:<26} {cpu:>12.3f} {cpu * 60 / args.seconds:>10.3f} {wakes:>9} {threads(p.pid):>8} {rss:>8.1f} {hwm:>9.1f}")
        print("(CPU from /proc/PID/stat utime+stime at 1/%d s resolution; wake-ups = context switches of all threads)" % TICKS)
    finally:
        for p, _ in daemons.values():
            p.send_signal(signal.SIGTERM)
        for p, _ in daemons.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        sandbox.terminate()
        sandbox.wait()


if __name__ == "__main__":
    main()
