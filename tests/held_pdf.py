"""A PDF reader child that a test holds (the gateway's `pdf_reader` command in tests).

    python -I held_pdf.py SOCKET READER MAX_PAGES MAX_BYTES MEMORY_BYTES

It reads the PDF from stdin, connects to the test's Unix socket, says which PDF it
has (its SHA-256) and its pid, and waits for the test's `go` (or for the gateway to
kill it); then it runs the real reader, READER (actors/adapters/rag/pdf_child.py), on the
same bytes. Standard library only: it runs isolated, as the real child does.
"""

from __future__ import annotations

import hashlib
import io
import os
import runpy
import socket
import sys


def main(argv: list[str]) -> None:
    where, reader = argv[1], argv[2]
    data = sys.stdin.buffer.read()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.connect(where)
        held.sendall(f"{hashlib.sha256(data).hexdigest()} {os.getpid()}\n".encode())
        if held.recv(2) != b"go":  # the test ended without letting it go
            sys.exit(1)
    sys.stdin = io.TextIOWrapper(io.BytesIO(data))
    sys.argv = [reader, *argv[3:]]
    runpy.run_path(reader, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
