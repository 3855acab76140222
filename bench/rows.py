"""Rows and tables for bench/tls.sh and bench/tcp.sh.

  rows.py ab   ROUND KIND NAME CPU_BEFORE CPU_AFTER TICK < ab-output
  rows.py wrk  ROUND KIND NAME CPU_BEFORE CPU_AFTER TICK [mib] < wrk-output
      print one row: round, kind, target, rate, CPU us per operation, failed
      (`mib`: the rate is MiB/s of 1 MiB bodies, CPU per MiB)
  rows.py summary TSV KIND=TITLE=UNIT...
      medians (min-max) per target and kind, with ratios to HAProxy
"""
import csv
import re
import statistics
import sys


def cpu_per(before, after, tick, ops):
    return (int(after) - int(before)) * 1e6 / int(tick) / max(ops, 1)


def ab(round_, kind, name, before, after, tick):
    out = sys.stdin.read()
    done = re.search(r"Complete requests:\s+(\d+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    rate = re.search(r"Requests per second:\s+([\d.]+)", out)
    if not done or not rate:
        sys.exit(f"unreadable ab output for {name}:\n{out[-2000:]}")
    cpu = cpu_per(before, after, tick, int(done.group(1)))
    print(f"{round_}\t{kind}\t{name}\t{float(rate.group(1)):.0f}\t{cpu:.1f}\t{failed.group(1) if failed else 0}")


def wrk(round_, kind, name, before, after, tick, mib=None):
    out = sys.stdin.read()
    reqs = re.search(r"(\d+) requests in ([\d.]+)s", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not reqs or not rate:
        sys.exit(f"unreadable wrk output for {name}:\n{out[-2000:]}")
    n, secs = int(reqs.group(1)), float(reqs.group(2))
    failed = (int(errs.group(1)) if errs else 0) + (sum(map(int, sock.groups())) if sock else 0)
    value = n / secs if mib else float(rate.group(1))
    print(f"{round_}\t{kind}\t{name}\t{value:.0f}\t{cpu_per(before, after, tick, n):.1f}\t{failed}")


def summary(tsv, *kinds):
    rows = list(csv.DictReader(open(tsv), delimiter="\t"))
    for spec in kinds:
        kind, title, unit = spec.split("=")
        sel = [r for r in rows if r["kind"] == kind]
        vals = lambda t, k: [float(r[k]) for r in sel if r["target"] == t]
        med = lambda t, k: statistics.median(vals(t, k))
        print(f"\n{title}\n")
        print(f"| target | rate | CPU us/{unit} | failed | rate vs HAProxy | CPU vs HAProxy |")
        print("| --- | --- | --- | --- | --- | --- |")
        for t in ("halo", "haproxy", "nginx"):
            r, c = vals(t, "rate"), vals(t, "cpu_us_per_op")
            failed = sum(int(x["failed"]) for x in sel if x["target"] == t)
            print(f"| {t} | {med(t, 'rate'):.0f} ({min(r):.0f}-{max(r):.0f}) | {med(t, 'cpu_us_per_op'):.1f} "
                  f"({min(c):.1f}-{max(c):.1f}) | {failed} | {med(t, 'rate') / med('haproxy', 'rate'):.2f}x | "
                  f"{med(t, 'cpu_us_per_op') / med('haproxy', 'cpu_us_per_op'):.2f}x |")


if __name__ == "__main__":
    {"ab": ab, "wrk": wrk, "summary": summary}[sys.argv[1]](*sys.argv[2:])
