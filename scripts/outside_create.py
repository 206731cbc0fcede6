#!/usr/bin/env python3
"""Measures `campaign.create` latency on a running `herald serve` from outside herald.

A plain NATS client (nats-py, no herald code) runs 100 concurrent requesters over one
connection, as the bench does, and prints p50, p99 and max as one JSON line per load:

- paced (an open loop, `--rate` creates/s in all): requester r sends its i-th request at
  start + (i * requesters + r) / rate. A request whose requester was still waiting for its
  previous reply at that time is charged from that time; a requester that was free but woke
  late is not (that delay is this client's own);
- back to back (`--rate 0`, a closed loop): each requester sends its next request as soon as
  it has its reply.

Every campaign targets an empty segment, so the fan-out is trivial. BENCHMARKS.md ("Create
latency driven from outside herald") gives the `herald serve` settings.

    pip install nats-py
    python3 scripts/outside_create.py --prefix hout --rate 2000
    python3 scripts/outside_create.py --prefix hout --rate 0

This client's own floor: `--serve-noop hout.noop` in another process answers every request
with a fixed create reply and nothing else, and `--subject hout.noop` sends the same load
to it instead.

Exits non-zero if a create fails or is answered as a repeat.
"""

import argparse
import asyncio
import json
import sys
import time
import uuid

import nats


def body(tag, r, i):
    return json.dumps(
        {
            "kind": "promotion",
            "name": f"outside latency {tag} {r} {i}",
            "created_by": "outside-driver",
            "starts_at": "2026-11-21T00:00:00Z",
            "ends_at": "2026-11-28T00:00:00Z",
            "inform_type": "app",
            "title": "t",
            "body": "b",
            "audience": {"type": "segment", "min_points": 1_000_000_000},
        }
    ).encode()


async def requester(nc, subject, tag, r, args, start, out):
    gap = 1.0 / args.rate if args.rate > 0 else None
    free_at = time.monotonic()
    for i in range(args.requests_each):
        late = 0.0
        if gap is not None:
            at = start + (i * args.requesters + r) * gap
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if free_at > at:
                late = time.monotonic() - at
        sent = time.monotonic()
        reply = await nc.request(subject, body(tag, r, i), timeout=10)
        free_at = time.monotonic()
        out.append(free_at - sent + late)
        created = json.loads(reply.data)
        if not created.get("ok") or created.get("duplicate"):
            raise SystemExit(f"create failed: {created}")


def quantile(sorted_values, q):
    return sorted_values[round((len(sorted_values) - 1) * q)]


def latency_summary(seconds):
    """Count, p50, p99 and max in ms of latencies in seconds; shared by the other outside_
    scripts so that every figure of one table is the same quantile."""
    v = sorted(seconds)
    ms = lambda q: round(quantile(v, q) * 1e3, 2)
    return {"requests": len(v), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0)}


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="nats://127.0.0.1:4222")
    p.add_argument("--prefix", default="herald")
    p.add_argument("--requesters", type=int, default=100)
    p.add_argument("--requests-each", type=int, default=20)
    p.add_argument("--rate", type=float, default=2000.0, help="creates/s in all; 0 = back to back")
    p.add_argument("--subject", help="send to this subject instead of <prefix>.api.campaign.create")
    p.add_argument("--serve-noop", metavar="SUBJECT", help="only answer requests on SUBJECT")
    args = p.parse_args()

    nc = await nats.connect(args.url)
    if args.serve_noop:
        reply = b'{"ok":true,"campaign_id":0,"duplicate":false}'

        async def answer(msg):
            await msg.respond(reply)

        await nc.subscribe(args.serve_noop, cb=answer)
        await nc.flush()
        print(f"answering on {args.serve_noop}", file=sys.stderr)
        await asyncio.Event().wait()
    subject = args.subject or f"{args.prefix}.api.campaign.create"
    tag = uuid.uuid4().hex[:12]
    out = []
    start = time.monotonic() + 0.01
    await asyncio.gather(
        *(requester(nc, subject, tag, r, args, start, out) for r in range(args.requesters))
    )
    await nc.close()
    load = f"paced {args.rate:.0f}/s" if args.rate > 0 else "back to back"
    print(json.dumps({"load": load, **latency_summary(out)}))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(1)
