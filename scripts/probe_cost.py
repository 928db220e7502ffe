#!/usr/bin/env python3
"""Server CPU spent on a JPEG upload whose header never comes: a start marker then N MiB of
0xFF fill bytes, against the same number of bytes in ordinary segments (comments of 65,533
bytes), both sent in small pieces. The probe must be linear in both: the ratio should be near 1.

    midas-serve serve --port 8080 &
    python3 scripts/probe_cost.py --url http://127.0.0.1:8080 --pid $! --mib 31 --piece 512

Reads the server's CPU time from /proc/PID/stat (user + system), so run it on the same machine.
"""

import argparse
import os
import socket
import statistics
import time
import urllib.parse


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def fill_body(size):
    return b"\xff\xd8" + b"\xff" * (size - 2)


def segment_body(size):
    body = bytearray(b"\xff\xd8")
    while len(body) + 65_537 <= size:
        body += b"\xff\xfe\xff\xff" + b"x" * 65_533
    body += b"\xff" * (size - len(body))
    return bytes(body)


def upload(url, content, piece):
    parts = urllib.parse.urlsplit(url)
    boundary = "probeCostBoundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + content + tail
    with socket.create_connection((parts.hostname, parts.port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(
            (
                f"POST /predict HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        for start in range(0, len(body), piece):
            try:
                conn.sendall(body[start : start + piece])
            except OSError:
                break
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--mib", type=int, default=31)
    parser.add_argument("--piece", type=int, default=512, help="bytes per write")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.mib << 20
    bodies = {"0xFF fill": fill_body(size), "segments": segment_body(size)}
    seconds = {name: [] for name in bodies}
    for _ in range(args.rounds):
        for name, content in bodies.items():
            before = cpu_seconds(args.pid)
            status = upload(args.url, content, args.piece)
            time.sleep(0.2)
            seconds[name].append(cpu_seconds(args.pid) - before)
            print(f"{name}: {status}, server CPU {seconds[name][-1]:.2f} s")
    fill = statistics.median(seconds["0xFF fill"])
    segments = statistics.median(seconds["segments"])
    print(f"median server CPU: fill {fill:.2f} s, segments {segments:.2f} s, ratio {fill / segments:.2f}")


if __name__ == "__main__":
    main()
