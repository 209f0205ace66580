#!/usr/bin/env python3
"""Opens COUNT TCP connections that never send a line and holds them until the proxy closes
them (its handshake deadline), sampling the proxy's RSS. Prints one JSON line.

    scripts/silent-sockets.py HOST:PORT COUNT PROXY_PID [MAX_WAIT_S]

Talks only to the address given; every wait is bounded.
"""
import json
import resource
import selectors
import socket
import sys
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    count, pid = int(sys.argv[2]), int(sys.argv[3])
    max_wait = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    before = rss_kb(pid)
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    opened = 0
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        if s.connect_ex((host, int(port))) not in (0, 115):  # 115: EINPROGRESS
            s.close()
            continue
        sel.register(s, selectors.EVENT_READ)
        opened += 1
    connect_s = time.monotonic() - start
    time.sleep(1)
    held = rss_kb(pid)
    closed, first_close, last_close = 0, None, None
    deadline = start + max_wait
    while closed < opened and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                now = time.monotonic() - start
                first_close = first_close if first_close is not None else now
                last_close = now
                closed += 1
                sel.unregister(key.fileobj)
                key.fileobj.close()
    time.sleep(2)
    print(json.dumps({
        "opened": opened, "closed_by_proxy": closed, "connect_phase_s": round(connect_s, 3),
        "first_close_s": first_close, "last_close_s": last_close,
        "rss_before_kb": before, "rss_held_kb": held, "rss_after_kb": rss_kb(pid),
        "rss_per_conn_bytes": round((held - before) * 1024 / max(opened, 1)),
    }))


if __name__ == "__main__":
    main()
