# Holds MIB mebibytes of touched memory (a bytearray filled with a
# pattern), prints "ready", then every 10 ms prints "t <seconds since the
# epoch>" and rewrites RATE_MIB_S/100 MiB of the array in place (0: idle).
# After TICKS ticks (0: never, until killed) it prints "sha256 <hex>" of
# the array and exits 0. The hash depends only on MIB, RATE_MIB_S and how many
# ticks ran, never on timing, so a moved job must print what an unmoved
# one prints. Used by tests/migration.rs and benches/migration.rs (the
# largest gap between two "t" lines is the freeze the job itself saw).
#
#   python3 migration_memory.py MIB [RATE_MIB_S] [TICKS]
import hashlib
import os
import sys
import time

TICK_S = 0.01
MIB = 1 << 20


def main():
    size = int(sys.argv[1]) * MIB
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    ticks = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    data = bytearray(range(256)) * (size // 256)
    chunk = int(rate * MIB * TICK_S)
    os.write(1, b"ready %d\n" % len(data))
    offset = 0
    tick = 0
    next_tick = time.monotonic()
    while ticks == 0 or tick < ticks:
        wait_s = next_tick - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        os.write(1, b"t %.6f\n" % time.time())
        if chunk:
            if offset + chunk > len(data):
                offset = 0
            # A new value for the chunk, a function of the tick only.
            data[offset : offset + chunk] = bytes([tick % 251]) * chunk
            offset += chunk
        tick += 1
        next_tick = max(next_tick + TICK_S, time.monotonic())
    os.write(1, b"sha256 %s\n" % hashlib.sha256(data).hexdigest().encode())


main()
