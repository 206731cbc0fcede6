#!/usr/bin/env python3
"""Drives a full-population push on a running `herald serve` from outside herald.

A plain NATS client (nats-py, no herald code) creates a promotion for every user through
`<prefix>.api.campaign.create`, polls `<prefix>.api.campaign.status` every 20 ms until the
campaign is final, and prints the elapsed time, users/s and the final counters as one JSON
line. BENCHMARKS.md ("Driven from outside herald") gives the `herald serve` settings.

    pip install nats-py
    python3 scripts/outside_push.py --prefix hout --runs 3

Exits non-zero if a campaign does not complete or does not report every user sent.
"""

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import nats


async def push_once(nc, prefix, expect, poll_s):
    now = datetime.now(timezone.utc)
    request = {
        "kind": "promotion",
        # A fresh name each run, so the create is never answered as a duplicate.
        "name": f"outside {uuid.uuid4()}",
        "created_by": "outside-driver",
        "starts_at": now.isoformat(),
        "ends_at": (now + timedelta(days=1)).isoformat(),
        "inform_type": "app",
        "title": "Double 11 is on",
        "body": "Open the app for your deal",
        "audience": {"type": "all"},
    }
    started = time.monotonic()
    reply = await nc.request(
        f"{prefix}.api.campaign.create", json.dumps(request).encode(), timeout=10
    )
    created = json.loads(reply.data)
    if not created.get("ok") or created.get("duplicate"):
        raise SystemExit(f"create failed: {created}")
    cid = created["campaign_id"]
    while True:
        reply = await nc.request(
            f"{prefix}.api.campaign.status",
            json.dumps({"campaign_id": cid}).encode(),
            timeout=10,
        )
        status = json.loads(reply.data)
        if status.get("status") in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(poll_s)
    seconds = time.monotonic() - started
    result = {
        "campaign_id": cid,
        "status": status["status"],
        "seconds": round(seconds, 3),
        "users_per_s": round(status["sent"] / seconds),
        "recipients": status["recipients"],
        "sent": status["sent"],
        "skipped": status["skipped"],
        "failed": status["failed"],
    }
    ok = status["status"] == "completed" and (expect is None or status["sent"] == expect)
    return result, ok


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="nats://127.0.0.1:4222")
    parser.add_argument("--prefix", default="herald", help="herald's nats.prefix")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--expect", type=int, help="users every run must report sent")
    parser.add_argument("--poll-ms", type=int, default=20)
    args = parser.parse_args()
    nc = await nats.connect(args.server)
    failed = False
    try:
        for _ in range(args.runs):
            result, ok = await push_once(nc, args.prefix, args.expect, args.poll_ms / 1000)
            print(json.dumps(result), flush=True)
            failed |= not ok
    finally:
        await nc.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    asyncio.run(main())
