"""Soak: many connections, many requests in flight each, checked against a shadow.

Run with a python3 that has libnbd's bindings::

    python3 soak.py URI SECONDS SERVER_PID [CONNECTIONS] [DEPTH]

In the style of libnbd's aio-parallel test: every connection owns a disjoint
region of the export, split into DEPTH blocks; each request in flight owns one
block (so requests never overlap and their order does not matter), reads and
writes of random size and alignment.  A read must return exactly the shadow
copy; at the end every region is read back whole.  The server's RSS is sampled
every two seconds.  Prints one JSON line: counts, mismatches, RSS samples.
"""

import json
import random
import select
import sys
import time

import nbd

BLOCK = 32 * 1024


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def payload(rng, length):
    if rng.random() < 0.5:  # compressible: lands in the RAM tier
        unit = rng.randbytes(64)
        return bytearray((unit * (length // 64 + 1))[:length])
    return bytearray(rng.randbytes(length))  # incompressible: straight to the image


class Conn:
    def __init__(self, uri, index, depth):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.depth = depth
        self.base = index * depth * BLOCK
        self.shadow = bytearray(depth * BLOCK)
        self.free = list(range(depth))
        self.pending = {}  # cookie -> (kind, block, pos, buffer)
        self.rng = random.Random(index)

    def fileno(self):
        return self.h.aio_get_fd()

    def issue(self, stats):
        rng = self.rng
        block = self.free.pop(rng.randrange(len(self.free)))
        start = rng.randrange(BLOCK)
        length = rng.randint(1, BLOCK - start)
        pos = block * BLOCK + start
        if rng.random() < 0.5:
            data = payload(rng, length)
            cookie = self.h.aio_pwrite(nbd.Buffer.from_bytearray(data), self.base + pos)
            self.pending[cookie] = ("w", block, pos, data)
            stats["writes"] += 1
        else:
            buf = nbd.Buffer(length)
            cookie = self.h.aio_pread(buf, self.base + pos)
            self.pending[cookie] = ("r", block, pos, buf)
            stats["reads"] += 1

    def reap(self, stats):
        while self.pending:
            cookie = self.h.aio_peek_command_completed()
            if not cookie:
                return
            kind, block, pos, item = self.pending.pop(cookie)
            try:
                self.h.aio_command_completed(cookie)
            except nbd.Error as e:
                stats["errors"] += 1
                stats.setdefault("first_error", str(e))
                self.free.append(block)
                continue
            if kind == "w":
                self.shadow[pos : pos + len(item)] = item
            elif item.to_bytearray() != self.shadow[pos : pos + len(item)]:
                stats["mismatches"] += 1
            self.free.append(block)


def main():
    uri, seconds, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    nconn = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    depth = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    conns = [Conn(uri, i, depth) for i in range(nconn)]
    stats = {"reads": 0, "writes": 0, "errors": 0, "mismatches": 0}
    samples = []
    start = time.monotonic()
    next_sample = start
    running = True
    while True:
        now = time.monotonic()
        if now >= next_sample:
            samples.append((round(now - start, 1), rss(pid)))
            next_sample += 2.0
        if running and now - start >= seconds:
            running = False
        if running:
            for c in conns:
                while c.free:
                    c.issue(stats)
        elif not any(c.pending for c in conns):
            break
        rl, wl = [], []
        for c in conns:
            direction = c.h.aio_get_direction()
            if direction & nbd.AIO_DIRECTION_READ:
                rl.append(c)
            if direction & nbd.AIO_DIRECTION_WRITE:
                wl.append(c)
        r, w, _ = select.select(rl, wl, [], 5.0)
        for c in r:
            c.h.aio_notify_read()
        for c in w:
            c.h.aio_notify_write()
        for c in conns:
            c.reap(stats)
    for c in conns:  # every region read back whole
        if c.h.pread(len(c.shadow), c.base) != c.shadow:
            stats["mismatches"] += 1
            stats.setdefault("final_mismatch", c.base)
        c.h.shutdown()
    samples.append((round(time.monotonic() - start, 1), rss(pid)))
    stats["requests"] = stats["reads"] + stats["writes"]
    stats["rss"] = samples
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
