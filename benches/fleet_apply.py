#!/usr/bin/env python3
"""A long apply under the account's rate limit: keyward creating a fleet against the bundled
sandbox enforcing ngrok's 120 requests per rolling minute (`--rate-limit 120/60s`, 20 ms per
request), with keyward's own budget (`rate_limit`) just under it. Prints, side by side, the
apply's wall time against the fastest the client budget allows for the requests it sent (the
baseline: requests / budget rate), the requests the sandbox counted, the answers 429, the
failed operations, the share of the client budget used, and the progress keyward showed on
its terminal (stderr is a pseudo-terminal here, as for a person running it).

Usage: python3 benches/fleet_apply.py [--creates 10000] [--budget 118/60s]
(builds the release binaries first; 10,000 creates take about an hour and a half at 118/60s).
Prints figures; asserts nothing."""

import argparse
import os
import pty
import re
import select
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet import BIN, ROOT, call, start_sandbox  # noqa: E402


def parse_budget(text):
    m = re.fullmatch(r"(\d+)/(\d+)s", text)
    if not m:
        sys.exit(f"--budget: expected N/Ss, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def run_on_terminal(cmd, env, cwd):
    """Runs `cmd` with stderr on a pseudo-terminal; returns (code, stdout, terminal text)."""
    leader, follower = pty.openpty()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=follower,
                         stdin=subprocess.DEVNULL)
    os.close(follower)
    term = bytearray()
    out = bytearray()
    fds = [leader, p.stdout.fileno()]
    while fds:
        ready, _, _ = select.select(fds, [], [], 1.0)
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                fds.remove(fd)
            elif fd == leader:
                term += chunk
            else:
                out += chunk
    code = p.wait()
    os.close(leader)
    return code, out.decode(errors="replace"), term.decode(errors="replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--creates", type=int, default=10_000,
                    help="create operations: half service users, half their credentials")
    ap.add_argument("--budget", default="118/60s", help="keyward's rate_limit")
    ap.add_argument("--latency-ms", type=int, default=20)
    a = ap.parse_args()
    n, window = parse_budget(a.budget)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bins"], cwd=ROOT, check=True)
    users = a.creates // 2
    sb, sbenv = start_sandbox(a.latency_ms, ["--rate-limit", "120/60s"])
    url = sbenv["KEYWARD_SANDBOX_URL"]
    try:
        with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "target")) as d:
            cfg = os.path.join(d, "keyward.yaml")
            names = ", ".join(f"edge-{i:05d}" for i in range(users))
            with open(cfg, "w") as f:
                f.write(
                    "version: 1\nsettings:\n  state_dir: state\n  concurrency: 8\n"
                    "providers:\n  ng:\n    type: ngrok\n    api_key: ${NGROK_API_KEY}\n"
                    f"    base_url: ${{KEYWARD_SANDBOX_URL}}\n    rate_limit: {a.budget}\n"
                    "sinks:\n  local:\n    type: file\n"
                    "    path: secrets/{provider}/{user}/{slot}.json\n    format: json\n"
                    "defaults:\n  sink: local\n"
                    f"users:\n  - provider: ng\n    names: [{names}]\n"
                    "    keys:\n      agent: {kind: credential}\n")
            env = dict(os.environ, **sbenv)
            env.pop("NO_COLOR", None)
            call(f"{url}/_sandbox/stats/reset", "POST", {})
            t = time.monotonic()
            code, out, term = run_on_terminal(
                [os.path.join(BIN, "keyward"), "-c", cfg, "apply", "--auto-approve"], env, d)
            wall = time.monotonic() - t
            stats = call(f"{url}/_sandbox/stats")
            sinks = sum(len(fs) for _, _, fs in os.walk(os.path.join(d, "secrets")))
    finally:
        sb.terminate()
        sb.wait()
    requests = stats["requests"]
    baseline = requests / (n / window)
    summary = re.search(r"Apply complete: (.*)", out)
    failed = re.search(r"(\d+) failed", out)
    frames = [f for f in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term)) if f.strip()]
    progress = [f for f in frames if " changes · " in f]
    print(f"\napply of {a.creates:,} creates ({users:,} service users + {users:,} credentials), "
          f"sandbox --rate-limit 120/60s, keyward rate_limit {a.budget}, {a.latency_ms} ms per request")
    print(f"  {'':34}{'wall s':>9}{'requests':>10}{'429s':>7}")
    print(f"  {'keyward apply':34}{wall:>9.1f}{requests:>10}{stats['rate_limited']:>7}")
    print(f"  {'baseline: requests at the budget':34}{baseline:>9.1f}{requests:>10}{0:>7}")
    print(f"  exit {code}; {summary.group(1) if summary else 'no summary line'}; "
          f"failed operations: {failed.group(1) if failed else 0}; sink files written: {sinks:,}")
    print(f"  client budget used: {baseline / wall * 100:.1f} % "
          f"({requests / wall * 60:.1f} requests/minute of {n * 60 / window:.0f})")
    if progress:
        print(f"  progress on the terminal: {len(frames)} frames; first {progress[0].strip()!r}")
        mid = progress[len(progress) // 2].strip()
        print(f"    midway {mid!r}; last {progress[-1].strip()!r}")
    else:
        print("  progress on the terminal: none seen")


if __name__ == "__main__":
    main()
