"""Opens N keep-alive connections to a proxy, each sending one request, and
reports the proxy's RSS before and after (KiB), then checks that idle
connections still answer. Usage: idle.py PORT PID N"""
import asyncio
import resource
import sys

port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))
REQ = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def rss_kb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


async def ask(r, w):
    w.write(REQ)
    await w.drain()
    data = b""
    while b"hello, world\n" not in data:
        chunk = await asyncio.wait_for(r.read(4096), 10)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk


async def main():
    gate = asyncio.Semaphore(200)

    async def one():
        async with gate:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await ask(r, w)
            return r, w

    await asyncio.sleep(0.5)
    before = rss_kb()
    conns = await asyncio.gather(*[one() for _ in range(n)])
    await asyncio.sleep(2)
    after = rss_kb()
    answering = 0
    for r, w in conns[:: max(1, n // 50)]:
        try:
            await ask(r, w)
            answering += 1
        except Exception:
            pass
    for _, w in conns:
        w.close()
    print(before, after, answering, len(conns[:: max(1, n // 50)]))


asyncio.run(main())
