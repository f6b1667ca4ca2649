#!/usr/bin/env python3
"""Benchmark the engine end to end, the way a user drives it.

    python bench.py                 # realistic latencies, default concurrency: orders per minute
    python bench.py --orders 500 --users 20 --concurrency 50

It starts a real `python engine.py` (embedded Redis in a temporary DATA_DIR, or REDIS_URL if set),
opens one WebSocket per user, posts the orders, and stops the clock when every order's terminal
event has arrived over its WebSocket. It prints a table and writes the same figures as JSON.

Realistic mode keeps the simulated venues' latencies (quotes ~200 ms, execution 2-3 s), so the
ceiling is set by concurrency, not by the machine: ideal throughput is concurrency / mean order
latency, and the figure to watch is the ratio achieved / ideal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

ENGINE_PY = str(Path(__file__).with_name("engine.py"))
START_TIMEOUT_S = 60.0


@dataclass
class Run:
    """What one run measured."""

    orders: int
    users: int
    concurrency: int
    latency_scale: float
    posted_at: dict[str, float] = field(default_factory=dict)
    routed_at: dict[str, float] = field(default_factory=dict)  # first routing event
    finished_at: dict[str, float] = field(default_factory=dict)
    outcome: dict[str, str] = field(default_factory=dict)
    post_latency_s: list[float] = field(default_factory=list)

    def report(self, elapsed_s: float) -> dict[str, Any]:
        order_latency = [self.finished_at[o] - self.posted_at[o] for o in self.finished_at]
        # A worker is busy from an order's first routing event to its terminal one (retry
        # back-offs included); with every worker always busy that is the most one engine can do.
        service = [self.finished_at[o] - self.routed_at[o] for o in self.finished_at]
        achieved = len(self.finished_at) / elapsed_s
        ideal = min(self.concurrency, self.orders) / statistics.fmean(service)
        return {
            "orders": self.orders,
            "users": self.users,
            "concurrency": self.concurrency,
            "latencyScale": self.latency_scale,
            "confirmed": sum(1 for s in self.outcome.values() if s == "confirmed"),
            "failed": sum(1 for s in self.outcome.values() if s == "failed"),
            "elapsedS": round(elapsed_s, 2),
            "ordersPerMinute": round(achieved * 60, 1),
            "idealOrdersPerMinute": round(ideal * 60, 1),
            "achievedOverIdeal": round(achieved / ideal, 3),
            "postP50Ms": round(_percentile(self.post_latency_s, 50) * 1000, 2),
            "postP99Ms": round(_percentile(self.post_latency_s, 99) * 1000, 2),
            "orderP50S": round(_percentile(order_latency, 50), 3),
            "orderP99S": round(_percentile(order_latency, 99), 3),
            "serviceMeanS": round(statistics.fmean(service), 3),
        }


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def engine_process(env: dict[str, str]) -> AsyncIterator[str]:
    """A real engine on a free port; yields its base URL once /healthz answers, then SIGTERM."""
    url = f"http://127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, ENGINE_PY,
        env={**os.environ, **env, "HOST": "127.0.0.1", "PORT": url.rsplit(":", 1)[1]},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with ClientSession() as http, asyncio.timeout(START_TIMEOUT_S):
            while proc.returncode is None:
                with contextlib.suppress(OSError):
                    async with http.get(f"{url}/healthz") as reply:
                        if reply.status == 200:
                            break
                await asyncio.sleep(0.1)
        if proc.returncode is not None:
            raise SystemExit(f"engine exited during start-up (code {proc.returncode})")
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def watch(ws: ClientWebSocketResponse, run: Run, done: asyncio.Event) -> None:
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            break
        event = orjson.loads(message.data)
        if event.get("type") != "order":
            continue
        if event["status"] == "routing":
            run.routed_at.setdefault(event["orderId"], time.perf_counter())
        elif event["status"] in {"confirmed", "failed"}:
            run.finished_at[event["orderId"]] = time.perf_counter()
            run.outcome[event["orderId"]] = event["status"]
            if len(run.finished_at) == run.orders:
                done.set()


async def post_orders(http: ClientSession, url: str, run: Run, clients: int) -> None:
    next_index = iter(range(run.orders))

    async def client() -> None:
        for index in next_index:
            body = {"userId": f"u{index % run.users}", "inputToken": "SOL", "outputToken": "USDC"}
            started = time.perf_counter()
            async with http.post(f"{url}/api/orders/execute", json=body | {"amount": 1}) as reply:
                order_id = (await reply.json())["orderId"]
            run.post_latency_s.append(time.perf_counter() - started)
            run.posted_at[order_id] = started

    await asyncio.gather(*(client() for _ in range(clients)))


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args.orders, args.users, args.concurrency, args.latency_scale)
    env = {
        "ENGINE_CONCURRENCY": str(args.concurrency),
        "ENGINE_DEX_LATENCY_SCALE": str(args.latency_scale),
        "ENGINE_DEX_FAIL_RATE": str(args.fail_rate),
        "ENGINE_SEED": "1",
        "LOG_LEVEL": "warning",
    }
    with tempfile.TemporaryDirectory(prefix="oee-bench-") as data_dir:
        env["DATA_DIR"] = data_dir
        async with engine_process(env) as url, ClientSession() as http:
            done = asyncio.Event()
            sockets = [await http.ws_connect(f"{url}/ws?userId=u{u}") for u in range(args.users)]
            watchers = [asyncio.create_task(watch(ws, run, done)) for ws in sockets]
            started = time.perf_counter()
            await post_orders(http, url, run, args.clients)
            await asyncio.wait_for(done.wait(), timeout=args.timeout)
            elapsed = time.perf_counter() - started
            for ws in sockets:
                await ws.close()
            await asyncio.gather(*watchers, return_exceptions=True)
    return run.report(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10, help="concurrent HTTP clients")
    parser.add_argument("--concurrency", type=int, default=10, help="ENGINE_CONCURRENCY")
    parser.add_argument("--latency-scale", type=float, default=1.0)
    parser.add_argument("--fail-rate", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all")
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value}")
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
