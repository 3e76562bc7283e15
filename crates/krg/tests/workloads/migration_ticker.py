# Prints 0, 1, 2, ... one number a line every 10 ms, and echoes each line
# it reads on stdin as "echo LINE" (a line "exit N" makes it print "bye" and
# exit with status N). Each line is one write(2), so lines never interleave.
# Used by tests/migration.rs: the numbers must reach `krg run` exactly once
# and in order however often the job moves, and stdin must keep flowing.
# Optional argument: stop by itself after that many numbers, exit status 3.
import os
import select
import sys
import time

TICK_S = 0.01


def main():
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else -1
    count = 0
    pending = b""
    stdin_open = True
    next_tick = time.monotonic()
    while limit < 0 or count < limit:
        wait_s = max(0.0, next_tick - time.monotonic())
        readable = select.select([0] if stdin_open else [], [], [], wait_s)[0]
        if readable:
            data = os.read(0, 4096)
            if not data:
                stdin_open = False
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"exit "):
                    os.write(1, b"bye\n")
                    sys.exit(int(line[5:]))
                os.write(1, b"echo " + line + b"\n")
            continue
        os.write(1, b"%d\n" % count)
        count += 1
        # After a freeze, go on at the usual pace rather than catching up.
        next_tick = max(next_tick + TICK_S, time.monotonic())
    sys.exit(3)


main()
