# The CPU a proxy spends on a request head sent a byte at a time (a slow
# client's head is scanned as it arrives, not parsed again on every read):
#   halo proxy -c p.toml &   # one listener on PORT, workers = 1, max_header_bytes = 131072
#   python3 bench/slow_head.py PID PORT
# Sends a 60 KB head one byte per send() and prints the CPU time
# (user+sys, from /proc/PID/stat) the proxy spent meanwhile.
import os, socket, sys, time
pid, port = int(sys.argv[1]), int(sys.argv[2])
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60000 + b"\r\n\r\n"
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c0, t0 = cpu(), time.time()
for i in range(len(head)):
    s.send(head[i:i+1])
    if i % 64 == 0:
        time.sleep(0.0005)
s.settimeout(10)
try:
    print("answer:", s.recv(100).split(b"\r\n")[0])
except Exception as e:
    print("answer: none", e)
print(f"proxy cpu {cpu()-c0:.3f}s over {time.time()-t0:.1f}s")
