"""What the open-loop load generators (openloop.py, steps.py) share: one
HTTP/1.1 exchange on a kept-alive connection, and percentiles."""


async def exchange(reader, writer, request):
    """Sends `request` and reads the answer; (status, whether the server
    closes the connection)."""
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value.lower():
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


def pct(values, p):
    """The `p` quantile of `values` (nearest rank), rounded to 0.01; None
    for none."""
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(len(values) * p))], 2)
