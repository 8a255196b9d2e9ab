"""Bulk TCP throughput: a receiver and a sender, run inside lab namespaces by overhead.py.

``python bulk.py serve --address A --port P`` accepts one connection at a time, reads until EOF
and answers with the number of bytes it read; it prints "listening" once it accepts, and runs
until it is killed (the lab kills what is left in its namespaces). ``python bulk.py send --dst A
--port P --seconds S`` writes 256 KiB chunks for S seconds, half-closes, waits for that answer
and prints JSON: bytes the receiver got and the seconds from connect to its answer.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

CHUNK = 256 * 1024


def serve(address: str, port: int) -> None:
    server = socket.create_server((address, port))
    print("listening", flush=True)
    buffer = bytearray(1 << 20)
    while True:
        conn, _ = server.accept()
        with conn:
            total = 0
            while n := conn.recv_into(buffer):
                total += n
            conn.sendall(f"{total}\n".encode())


def send(dst: str, port: int, seconds: float) -> dict[str, float]:
    payload = memoryview(bytes(CHUNK))
    begin = time.monotonic()
    with socket.create_connection((dst, port), timeout=30) as conn:
        deadline = begin + seconds
        while time.monotonic() < deadline:
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = int(conn.makefile().readline())
    elapsed = time.monotonic() - begin
    return {"bytes": received, "seconds": elapsed, "bits_per_second": received * 8 / elapsed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--address", required=True)
    s.add_argument("--port", type=int, default=5201)
    c = sub.add_parser("send")
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, default=5201)
    c.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args.address, args.port)
    else:
        print(json.dumps(send(args.dst, args.port, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
