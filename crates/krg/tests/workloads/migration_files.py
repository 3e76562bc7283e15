"""Files open on a file system every node shares, used across a move.

Makes an input file of 300 numbered lines and an empty output file in
DIR (argv[1]), opens both (unbuffered: every read and write moves the
kernel's file offset), prints "ready", then 300 times, 10 ms apart (about
3 s), reads one line of the input and appends it, squared, to the output.
At the end it prints both descriptors' offsets and the sha256 of what the
output file holds, read again by its path, then removes both files. The
output does not depend on timing or on the files' names, so a job moved
while it runs must print what an unmoved one prints: a move that lost or
rewound an offset would change it. Used by tests/migration.rs.
"""

import hashlib
import os
import sys
import tempfile
import time

LINES = 300

directory = sys.argv[1]
fd_in, path_in = tempfile.mkstemp(dir=directory, prefix="in-")
with os.fdopen(fd_in, "w") as f:
    for i in range(LINES):
        f.write(f"{i}\n")
fd_out, path_out = tempfile.mkstemp(dir=directory, prefix="out-")
source = open(path_in, "rb", buffering=0)
print("ready", flush=True)
for _ in range(LINES):
    line = b""
    while not line.endswith(b"\n"):
        byte = source.read(1)
        if not byte:
            break
        line += byte
    n = int(line)
    os.write(fd_out, b"%d %d\n" % (n, n * n))
    time.sleep(0.01)
print("input offset", os.lseek(source.fileno(), 0, os.SEEK_CUR))
print("output offset", os.lseek(fd_out, 0, os.SEEK_CUR))
with open(path_out, "rb") as f:
    print("output sha256", hashlib.sha256(f.read()).hexdigest())
source.close()
os.close(fd_out)
os.remove(path_in)
os.remove(path_out)
