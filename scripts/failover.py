#!/usr/bin/env python3
"""Failover test for a Stratum V1 proxy (stdlib only).

Opens N miner connections to the proxy (subscribe + authorize), waits until every one got its first
mining.notify, records T0 and SIGKILLs the primary pool (by PID), then measures for each connection
the time to the first mining.notify with clean_jobs=true received after T0, and whether it was closed.

Optional failback phase (--restart-cmd): after the failover phase, start the command (a new pool A on
the same port, which must bound itself, e.g. with --exit-after), record T1, and measure the first
clean notify after T1 per connection within --failback-wait seconds. The started process is killed
by its PID at the end.

Prints one JSON line on stdout; progress on stderr.
"""
import argparse
import asyncio
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def pct(v, q):
    if not v:
        return None
    v = sorted(v)
    i = min(len(v) - 1, max(0, int(round(q / 100.0 * len(v) + 0.5)) - 1))
    return v[i]


def stats(v):
    if not v:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(pct(v, 50), 1), "p99": round(pct(v, 99), 1), "max": round(max(v), 1)}


class Conn:
    __slots__ = ("i", "connected", "first_notify", "closed_at", "clean_notifies", "notifies", "writer", "errors")

    def __init__(self, i):
        self.i = i
        self.connected = False
        self.first_notify = None      # time of the first mining.notify
        self.closed_at = None         # time of EOF/reset
        self.clean_notifies = []      # times of notifies with clean_jobs true
        self.notifies = 0
        self.writer = None
        self.errors = 0

    def first_clean_after(self, t):
        for x in self.clean_notifies:
            if x >= t:
                return x
        return None


async def reader_loop(c, reader, first_ev_cb):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            now = time.monotonic()
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if m.get("method") == "mining.notify":
                c.notifies += 1
                p = m.get("params") or []
                if c.first_notify is None:
                    c.first_notify = now
                    first_ev_cb()
                if len(p) > 8 and p[8] is True:
                    c.clean_notifies.append(now)
            elif m.get("error") not in (None, False) and m.get("id") is not None:
                c.errors += 1
    except (ConnectionError, OSError):
        pass
    c.closed_at = time.monotonic()


async def open_conn(c, host, port, sem, tasks, first_ev_cb, timeout):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
        except (OSError, asyncio.TimeoutError):
            return
        c.connected = True
        c.writer = w
        tasks.append(asyncio.ensure_future(reader_loop(c, r, first_ev_cb)))
        msg = (json.dumps({"id": 1, "method": "mining.subscribe", "params": ["failover-py/1.0"]}) + "\n" +
               json.dumps({"id": 2, "method": "mining.authorize", "params": [f"w.{c.i}", "x"]}) + "\n")
        try:
            w.write(msg.encode())
            await w.drain()
        except (ConnectionError, OSError):
            pass


async def wait_until(pred, deadline, step=0.02):
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", "-n", type=int, default=1000)
    ap.add_argument("--pid", type=int, required=True, help="PID of pool A (primary), SIGKILLed at T0")
    ap.add_argument("--concurrency", type=int, default=500, help="connects in flight at once")
    ap.add_argument("--notify-wait", type=float, default=60, help="max s to wait for every first notify")
    ap.add_argument("--wait", type=float, default=30, help="max s to wait for the post-kill clean notify")
    ap.add_argument("--settle", type=float, default=1.0, help="s to wait after all first notifies before the kill")
    ap.add_argument("--restart-cmd", default="", help="command that restarts pool A (failback phase)")
    ap.add_argument("--restart-delay", type=float, default=2.0, help="s after the failover phase before restart")
    ap.add_argument("--metrics-url", default="", help="Prometheus URL dumped (filtered) to stderr before closing")
    ap.add_argument("--failback-wait", type=float, default=20, help="max s to wait for a clean notify after restart")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log(f"RLIMIT_NOFILE {soft} -> {hard}")

    conns = [Conn(i) for i in range(a.count)]
    tasks = []
    n_first = [0]

    def on_first():
        n_first[0] += 1

    sem = asyncio.Semaphore(a.concurrency)
    tc = time.monotonic()
    await asyncio.gather(*(open_conn(c, a.host, a.port, sem, tasks, on_first, 10) for c in conns))
    connected = sum(c.connected for c in conns)
    log(f"connected {connected}/{a.count} in {time.monotonic() - tc:.2f}s")
    await wait_until(lambda: n_first[0] >= connected, time.monotonic() + a.notify_wait)
    first_notify_s = time.monotonic() - tc
    log(f"first notify on {n_first[0]}/{connected} after {first_notify_s:.2f}s")
    await asyncio.sleep(a.settle)
    disc_before_kill = sum(c.closed_at is not None for c in conns)

    t0 = time.monotonic()
    try:
        os.kill(a.pid, signal.SIGKILL)
        killed = True
    except ProcessLookupError:
        killed = False
    log(f"T0: SIGKILL pool A pid {a.pid} (ok={killed})")

    live = [c for c in conns if c.connected and c.first_notify is not None]
    await wait_until(lambda: all(c.first_clean_after(t0) is not None or c.closed_at is not None for c in live),
                     t0 + a.wait, 0.05)
    fo_lat = []
    missing = 0
    for c in live:
        x = c.first_clean_after(t0)
        if x is None:
            missing += 1
        else:
            fo_lat.append((x - t0) * 1000.0)
    disc_failover = sum(c.closed_at is not None for c in conns if c.connected)
    log(f"failover: got {len(fo_lat)}, missing {missing}, disconnects {disc_failover}")

    out = {
        "mode": "failover", "count": a.count, "connected": connected, "first_notify": n_first[0],
        "time_to_all_first_notify_s": round(first_notify_s, 3), "killed": killed,
        "disconnects_before_kill": disc_before_kill, "disconnects": disc_failover,
        "got_notify": len(fo_lat), "notify_after_kill_ms": stats(fo_lat), "missing": missing,
        "within_3s": sum(1 for x in fo_lat if x <= 3000.0),
    }

    proc = None
    if a.restart_cmd:
        await asyncio.sleep(a.restart_delay)
        proc = subprocess.Popen(shlex.split(a.restart_cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t1 = time.monotonic()
        log(f"T1: restarted pool A, pid {proc.pid}")
        await wait_until(lambda: all(c.first_clean_after(t1) is not None or c.closed_at is not None for c in live),
                         t1 + a.failback_wait, 0.05)
        fb = [(c.first_clean_after(t1) - t1) * 1000.0 for c in live if c.first_clean_after(t1) is not None]
        out["failback"] = {
            "restart_pid": proc.pid, "got_notify": len(fb), "missing": len(live) - len(fb),
            "notify_after_restart_ms": stats(fb),
            "disconnects_total": sum(c.closed_at is not None for c in conns if c.connected),
        }
        log(f"failback: got {len(fb)}/{len(live)}")

    if a.metrics_url:
        import re
        import urllib.request
        try:
            body = await asyncio.get_running_loop().run_in_executor(
                None, lambda: urllib.request.urlopen(a.metrics_url, timeout=5).read().decode())
            pat = re.compile(r"loka_failovers_total|loka_connections_closed_total|loka_pool_miners|loka_aggregate")
            log("metrics while connected:\n" + "\n".join(l for l in body.splitlines() if pat.search(l) and not l.startswith("#")))
        except Exception as e:  # noqa: BLE001
            log(f"metrics fetch failed: {e}")
    out["notifies_total"] = sum(c.notifies for c in conns)
    out["error_replies"] = sum(c.errors for c in conns)
    for c in conns:
        if c.writer is not None:
            c.writer.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if proc is not None:
        # keep it running briefly? no: the caller passes --keep-restarted if it wants to inspect metrics.
        out["restart_pid_alive"] = proc.poll() is None
        if os.environ.get("FAILOVER_KEEP_RESTARTED") != "1":
            proc.kill()
            proc.wait()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
