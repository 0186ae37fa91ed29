"""A small HTTP/1.1 load generator for the paywall bench, run as its own process.

asyncio streams over keep-alive connections (no HTTP library on the hot path, so the generator
costs little CPU next to the server it measures). Reads a JSON job on stdin:
``{"url", "concurrency", "duration_s" | null, "headers": [ {name: value}, ... ] | null,
"count": int | null}`` — with ``headers``, request *i* carries ``headers[i]`` (one pre-signed
payment each) and the run ends when all are sent; otherwise it runs for ``duration_s``.
Prints ``{"count", "elapsed_s", "statuses": {code: n}, "latencies_ms": [...], "unexpected":
[the first few answers that were not 200 to a paid request (or neither 200 nor 402), whole]}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def one_connection(
    host: str, port: int, path: str, jobs: asyncio.Queue[dict[str, str] | None],
    stop_at: float | None, out: list[tuple[int, float]], odd: list[str],
) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection(host, port)
    base = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    try:
        while True:
            if stop_at is not None and time.perf_counter() >= stop_at:
                return
            extra = jobs.get_nowait() if not jobs.empty() else None
            if stop_at is None and extra is None:
                return
            lines = "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
            t0 = time.perf_counter()
            writer.write((base + lines + "\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            out.append((status, (time.perf_counter() - t0) * 1000))
            expected = (200,) if extra else (200, 402)  # a paid request must be served
            if status not in expected and len(odd) < 5:
                odd.append((head + body).decode("latin-1")[:1500])
    finally:
        writer.close()


async def run(job: dict) -> dict:  # type: ignore[type-arg]
    url = urlsplit(job["url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    assert host in ("127.0.0.1", "localhost", "::1"), "benchmarks stay on loopback"
    jobs: asyncio.Queue[dict[str, str] | None] = asyncio.Queue()
    for h in job.get("headers") or []:
        jobs.put_nowait(h)
    out: list[tuple[int, float]] = []
    odd: list[str] = []  # the first few unexpected answers, whole, for the bench to report
    start = time.perf_counter()
    stop_at = start + job["duration_s"] if job.get("duration_s") else None
    await asyncio.gather(
        *(
            one_connection(host, port, url.path, jobs, stop_at, out, odd)
            for _ in range(job["concurrency"])
        )
    )
    elapsed = time.perf_counter() - start
    statuses: dict[str, int] = {}
    for status, _ in out:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "count": len(out),
        "elapsed_s": elapsed,
        "statuses": statuses,
        "latencies_ms": [round(ms, 3) for _, ms in out],
        "unexpected": odd,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.load(sys.stdin)))))
