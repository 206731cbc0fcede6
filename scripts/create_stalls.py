"""Reads the rounds of `bench --rounds-trace` and `perf sched timehist` of the same run (see
scripts/create_stalls.sh) and prints how the machine spent each loop's slowest rounds."""
import collections
import json
import re
import sys

# The processes a create's reply waits on, by the name perf gives their threads.
PATH = ["herald-api", "bench-requester", "tokio-rt-worker", "nats-server", "postgres", "redis-server"]


def category(task):
    """A process of the create's path, <idle>, or other; `task` is perf's name[tid/pid]."""
    for name in PATH + ["<idle>"]:
        if task.startswith(name):
            return name
    return "other"


def read_timehist(path):
    """(start, end, task, cpu, wait for a CPU before it ran) of every run of a task, and
    (begin, end, task) of every sleep of a process on the path in uninterruptible state (D:
    waiting for the disk, such as PostgreSQL's WAL flush)."""
    runs, disk = [], []
    last = {}
    for line in open(path):
        f = line.split()
        if len(f) < 7 or not f[1].startswith("["):
            continue
        try:
            end, delay, run = float(f[0]), float(f[-3]) / 1e3, float(f[-2]) / 1e3
        except ValueError:
            continue
        start = end - run
        task = f[2]
        runs.append((start, end, task, f[1], delay))
        before = last.get(task)
        if before and before[1] == "D" and category(task) in PATH:
            disk.append((before[0], start - delay, task))
        last[task] = (end, f[-1])
    return runs, disk


def wait_beside_idle(runs, idle, a, b):
    """How long the path's processes waited for a CPU between a and b, and for how much of
    that wait a CPU was idle (the scheduler left the work queued beside an idle CPU)."""
    waited = beside = 0.0
    for start, _, task, _, delay in runs:
        if delay <= 0 or not (a <= start <= b) or category(task) not in PATH:
            continue
        w0, w1 = start - delay, start
        waited += delay
        # Idle periods overlapping the wait, merged so two idle CPUs count once.
        spans = sorted((max(s, w0), min(e, w1)) for s, e in idle if s < w1 and e > w0)
        end = w0
        for s, e in spans:
            s = max(s, end)
            if e > s:
                beside += e - s
                end = e
    return waited, beside


def main(rounds_path, timehist_path):
    loops = collections.OrderedDict()
    for line in open(rounds_path):
        r = json.loads(line)
        loops.setdefault(r["loop"], []).append(r)
    runs, disk = read_timehist(timehist_path)
    idle = sorted((start, end) for start, end, task, _, _ in runs if task.startswith("<idle>"))
    for name, rounds in loops.items():
        slowest = sorted(r["slowest_ms"] for r in rounds)
        if "paced" in name:
            # A paced loop's entries are its requests at or above the p99, slowest first.
            print(f"{name}: its {len(rounds)} requests at or above the p99 took {slowest[0]:.2f} to "
                  f"{slowest[-1]:.2f} ms")
        else:
            print(f"{name}: {len(rounds)} rounds, slowest reply per round "
                  f"{slowest[(len(slowest) - 1) // 2]:.2f} ms (median round) to {slowest[-1]:.2f} ms")
        a = min(r["start"] for r in rounds)
        b = max(r["end"] for r in rounds)
        waited, beside_idle = wait_beside_idle(runs, idle, a, b)
        print(f"  over {(b - a) * 1e3:.0f} ms the path's processes waited {waited * 1e3:.2f} ms in all for a "
              f"CPU; a CPU was idle during {beside_idle * 1e3:.2f} ms of it")
        flushes = sorted(e - s for s, e, _ in disk if a <= s <= b)
        if flushes:
            print(f"  waits for the disk on the path: {len(flushes)}, median {flushes[len(flushes) // 2] * 1e3:.2f} ms, "
                  f"{sum(1 for x in flushes if x > 0.002)} over 2 ms, longest {flushes[-1] * 1e3:.2f} ms")
        for r in sorted(rounds, key=lambda r: -r["slowest_ms"])[:3]:
            a, b = r["start"], r["end"]
            used = collections.Counter()
            others = collections.Counter()
            worst = (0.0, None, None)
            for start, end, task, cpu, delay in runs:
                overlap = min(end, b) - max(start, a)
                if overlap > 0:
                    used[category(task)] += overlap
                    if category(task) == "other":
                        others[re.sub(r"\[.*", "", task)] += overlap
                # The wait for a CPU that ended inside the round.
                began = start
                if a <= began <= b and category(task) in PATH and delay > worst[0]:
                    worst = (delay, task, began)
            capacity = (b - a) * 2
            parts = [f"{k} {used[k] * 1e3:.2f}" for k in ["<idle>"] + PATH + ["other"] if used[k] > 0]
            kind = "request" if "paced" in name else "round"
            print(f"  {kind} {r['round']}: slowest reply {r['slowest_ms']:.2f} ms, window {(b - a) * 1e3:.2f} ms "
                  f"(CPU ms of {capacity * 1e3:.2f}): " + ", ".join(parts))
            if others:
                print("    other processes: " + ", ".join(f"{t} {v * 1e3:.2f} ms" for t, v in others.most_common(3)))
            waits = sorted(((min(e, b) - max(s, a), t) for s, e, t in disk if s < b and e > a), reverse=True)
            if waits:
                print(f"    longest wait for the disk on the path: {waits[0][1]} {waits[0][0] * 1e3:.2f} ms")
            if worst[1]:
                delay, task, began = worst
                ran = collections.Counter()
                for start, end, t, cpu, _ in runs:
                    overlap = min(end, began) - max(start, began - delay)
                    if overlap > 0:
                        ran[f"{t} on {cpu}"] += overlap
                print(f"    longest wait for a CPU on the path: {task} {delay * 1e3:.2f} ms; meanwhile "
                      + ", ".join(f"{t} {v * 1e3:.2f}" for t, v in ran.most_common(4)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
