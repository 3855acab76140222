#!/usr/bin/env python3
"""An open-loop HTTP/1.1 load generator: requests start at a fixed rate
whatever the answers do (a closed-loop tool such as wrk slows down with the
server and hides the queue), each over an idle keep-alive connection or a
new one. Latency counts from when the request was due, so a late start is
charged to the server. Prints one JSON line: requests, admitted (2xx),
shed (429/502/503/504), errors and timeouts, and the admitted requests'
p50/p99/max and the shed answers' p99, in milliseconds.

Usage: openloop.py PORT RATE SECONDS [TIMEOUT_S] [MAX_CONNS]
"""
import asyncio
import json
import sys
import time

from http1 import exchange, pct

PORT, RATE, SECONDS = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
TIMEOUT = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
MAX_CONNS = int(sys.argv[5]) if len(sys.argv) > 5 else 4000
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

idle = []
open_conns = 0
admitted, shed, errors = [], [], {}


def error(kind):
    errors[kind] = errors.get(kind, 0) + 1


async def one(due):
    global open_conns
    conn = idle.pop() if idle else None
    if conn is None:
        if open_conns >= MAX_CONNS:
            error("client_conn_limit")
            return
        open_conns += 1
    try:
        if conn is None:
            conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", PORT), TIMEOUT)
        status, close = await asyncio.wait_for(exchange(*conn, REQUEST), TIMEOUT)
    except asyncio.TimeoutError:
        error("timeout")
        close_conn(conn)
        return
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        error(type(e).__name__)
        close_conn(conn)
        return
    took = (time.monotonic() - due) * 1000
    if 200 <= status < 300:
        admitted.append(took)
    elif status in (429, 502, 503, 504):
        shed.append(took)
    else:
        error(f"status_{status}")
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
    start = time.monotonic()
    n = int(RATE * SECONDS)
    tasks = []
    for i in range(n):
        due = start + i / RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    print(json.dumps({
        "requests": n,
        "admitted": len(admitted),
        "shed": len(shed),
        "errors": errors,
        "goodput_rps": round(len(admitted) / SECONDS, 1),
        "shed_share": round(len(shed) / n, 4),
        "admitted_p50_ms": pct(admitted, 0.50),
        "admitted_p99_ms": pct(admitted, 0.99),
        "admitted_max_ms": pct(admitted, 1.0),
        "shed_p99_ms": pct(shed, 0.99),
        "elapsed_s": round(elapsed, 2),
    }))


asyncio.run(main())
