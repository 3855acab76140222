#!/usr/bin/env python3
"""An open-loop HTTP/1.1 load generator that follows a schedule of rates
and reports each second: requests start when due whatever the answers do
(a closed loop slows down with the server and hides the queue), each over
an idle keep-alive connection or a new one, and a request's latency counts
from when it was due. Prints one JSON line per second (requests due in it,
answered 2xx, failed, p50 and p99 in ms), then a summary line.

Usage: steps.py PORT HOST SCHEDULE [TIMEOUT_S]
SCHEDULE: comma-separated SECONDS:RATE segments; RATE may be A~B for a
square wave between A and B that switches every PERIOD/2 (A~B/PERIOD),
as in 20:100,30:500 or 600:80~120/30.
"""
import asyncio
import json
import sys
import time

from http1 import exchange, pct

PORT, HOST = int(sys.argv[1]), sys.argv[2]
SCHEDULE = sys.argv[3]
TIMEOUT = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
REQUEST = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
MAX_CONNS = 4000

idle = []
open_conns = 0
# second -> [latencies of 2xx], failures; failures and resends by kind
ok, failed = {}, {}
kinds, retried = {}, {}


def segments():
    out = []
    for seg in SCHEDULE.split(","):
        secs, rate = seg.split(":")
        if "~" in rate:
            lo, rest = rate.split("~")
            hi, period = rest.split("/")
            out.append((float(secs), float(lo), float(hi), float(period)))
        else:
            out.append((float(secs), float(rate), float(rate), 1.0))
    return out


def rate_at(t, segs):
    start = 0.0
    for secs, lo, hi, period in segs:
        if t < start + secs:
            into = t - start
            return hi if (into % period) < period / 2 else lo
        start += secs
    return None


async def one(due, second, fresh=False):
    global open_conns
    conn = None if fresh or not idle else idle.pop()
    reused = conn is not None
    if conn is None:
        if open_conns >= MAX_CONNS:
            failed[second] = failed.get(second, 0) + 1
            return
        open_conns += 1
    try:
        if conn is None:
            conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT), TIMEOUT)
        status, close = await asyncio.wait_for(exchange(*conn, REQUEST), TIMEOUT)
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        close_conn(conn)
        # A kept-alive connection the server closed as the request went
        # out: sent again on a new one, as HTTP clients do.
        if reused:
            retried[type(e).__name__] = retried.get(type(e).__name__, 0) + 1
            return await one(due, second, fresh=True)
        failed[second] = failed.get(second, 0) + 1
        kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
        return
    except asyncio.TimeoutError:
        failed[second] = failed.get(second, 0) + 1
        kinds["timeout"] = kinds.get("timeout", 0) + 1
        close_conn(conn)
        return
    took = (time.monotonic() - due) * 1000
    if 200 <= status < 300:
        ok.setdefault(second, []).append(took)
    else:
        failed[second] = failed.get(second, 0) + 1
        kinds[f"status_{status}"] = kinds.get(f"status_{status}", 0) + 1
    if close:
        close_conn(conn)
    else:
        idle.append(conn)


def close_conn(conn):
    global open_conns
    open_conns -= 1
    if conn is not None:
        conn[1].close()


async def main():
    segs = segments()
    start = time.monotonic()
    tasks = []
    t = 0.0
    while True:
        rate = rate_at(t, segs)
        if rate is None:
            break
        due = start + t
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due, int(t))))
        t += 1.0 / rate
    await asyncio.gather(*tasks)
    for s in range(int(t) + 1):
        lat = ok.get(s, [])
        print(json.dumps({"second": s, "rate": rate_at(s + 0.5, segs), "ok": len(lat), "failed": failed.get(s, 0),
                          "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}))
    every = [x for v in ok.values() for x in v]
    print(json.dumps({"summary": True, "ok": len(every), "failed": sum(failed.values()), "failures": kinds,
                      "resent_on_a_new_connection": retried,
                      "p99_ms": pct(every, 0.99), "elapsed_s": round(time.monotonic() - start, 2)}))


asyncio.run(main())
