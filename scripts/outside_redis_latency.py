#!/usr/bin/env python3
"""Times the Redis command a campaign create sends first, `SET key pending NX PX 30000`, paced.

Used by scripts/outside_create_during_push.sh to see what one part of a create waits for on a
busy machine. One plain socket (no client library), one command at a time at `--rate`
commands/s, `--count` in all; prints p50, p99 and max as one JSON line and deletes its keys.

    python3 scripts/outside_redis_latency.py --rate 200 --count 1000
"""

import argparse
import json
import socket
import time
import uuid

from outside_create import latency_summary


def command(*args):
    out = f"*{len(args)}\r\n"
    for a in args:
        out += f"${len(a.encode())}\r\n{a}\r\n"
    return out.encode()


def reply(sock):
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(256)
        if not chunk:
            raise SystemExit("redis closed the connection")
        data += chunk
    if data.startswith(b"-"):
        raise SystemExit(f"redis: {data.decode().strip()}")
    return data


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--count", type=int, default=1000)
    args = p.parse_args()

    sock = socket.create_connection((args.host, args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    prefix = f"herald-latency-probe:{uuid.uuid4().hex[:12]}"
    took = []
    start = time.monotonic()
    for i in range(args.count):
        wait = start + i / args.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sent = time.monotonic()
        sock.sendall(command("SET", f"{prefix}:{i}", "pending", "NX", "PX", "30000"))
        reply(sock)
        took.append(time.monotonic() - sent)
    for i in range(0, args.count, 500):
        keys = [f"{prefix}:{k}" for k in range(i, min(i + 500, args.count))]
        sock.sendall(command("DEL", *keys))
        reply(sock)
    sock.close()
    print(json.dumps({"command": "SET NX", **latency_summary(took)}))


if __name__ == "__main__":
    main()
