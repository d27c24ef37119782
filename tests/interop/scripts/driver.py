"""A long-lived libnbd client driven line by line from stdin.

Usage: python3 driver.py URI

Keeps one connection open for its whole life so that a test can interleave
its requests with another client's misbehaviour. Commands, one per line:

    write OFFSET LENGTH SEED   write deterministic bytes
    check OFFSET LENGTH SEED   read and compare with what ``write`` wrote
    zero OFFSET LENGTH         write-zeroes
    checkzero OFFSET LENGTH    read and compare with zeroes
    quit

Every command answers one line: ``ok``, ``mismatch ...`` or ``error ...``.
"""

import random
import sys

import nbd


def data(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def main() -> None:
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            h.shutdown()
            print("ok", flush=True)
            return
        try:
            args = [int(w) for w in words[1:]]
            if words[0] == "write":
                h.pwrite(data(args[2], args[1]), args[0])
                answer = "ok"
            elif words[0] == "check":
                got = h.pread(args[1], args[0])
                answer = "ok" if got == data(args[2], args[1]) else "mismatch"
            elif words[0] == "zero":
                h.zero(args[1], args[0])
                answer = "ok"
            elif words[0] == "checkzero":
                got = h.pread(args[1], args[0])
                answer = "ok" if got == bytes(args[1]) else "mismatch"
            else:
                answer = f"error unknown command {words[0]}"
        except nbd.Error as e:
            answer = f"error {e.string}"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
