#!/usr/bin/env python3
"""Benchmark chat.py against two baselines it contains, in one run, on this machine.

Servers under test (each started here on a loopback port):
  chat   - chat.py as shipped (keyword bot on, validation and history on), except
           --rate 0 so that ten senders can saturate it;
  node   - the tutorial's own server: Express + Socket.IO 4.8 with its keyword bot
           (npm-installed into a cache directory on first use; skipped without node/npm);
  uws    - the same hub and bot on Socket.IO 4.8 attached to uWebSockets.js (io.attachApp), what
           a Node user picks for speed (installed and skipped the same way);
  floor  - a plain python-socketio + aiohttp broadcast server: the library floor;
  limit  - a raw aiohttp WebSocket broadcast server (plain text frames, no
           Engine.IO framing, no compression): the practical limit of the stack.

The load generator is one process with a hand-written WebSocket client per
connection (an asyncio Protocol speaking Engine.IO v4 / Socket.IO v5, no task per
connection), offering permessage-deflate as browsers do. In fan-out, one client in
50 parses every frame and samples latency, the others only count deliveries (a
search of the raw bytes, in C) and answer pings, so that one process can read
over a million frames a second. Its own CPU share is printed for every
measurement, so that it can be seen whether it is the bottleneck.
With two or more cores, servers are pinned to core 0 and the generator to core 1.

Workloads: fan-out (C clients, 10 senders, offered rate ramped to the highest that
keeps >= 95 % delivery and p99 <= 250 ms), idle capacity, start-up time, a slow
consumer in a flooded room, (with redis-server available) one node vs two nodes
sharing Redis, and (--workloads attacks) the hostile-input attacks, each against a
fresh chat.py.

    python bench_chat.py                  # the full run (several minutes)
    python bench_chat.py --quick          # under a minute
    python bench_chat.py --runs 3         # every fan-out and idle point three times: median and range
    python bench_chat.py --memory-profile # where chat.py's memory per idle connection goes (tracemalloc)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1
PIN = CORES >= 2 and shutil.which("taskset") is not None
CHAT_ARGS: list[str] = []

LOOP_HELPER = '''
def new_loop():
    """The same event loop chat.py uses: uvloop when it is installed."""
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        import asyncio
        return asyncio.new_event_loop()
'''

FLOOR_SERVER = '''
import sys
import socketio
from aiohttp import web

sio = socketio.AsyncServer(async_mode="aiohttp")
app = web.Application()
sio.attach(app)

@sio.on("newmessage")
async def newmessage(sid, data):
    await sio.emit("newmessage", data)

async def index(request):
    return web.Response(text="floor")

app.router.add_get("/", index)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=new_loop())
'''

LIMIT_SERVER = '''
import asyncio
import sys
from aiohttp import web, WSMsgType

clients = {}  # ws -> its transport
unwritten = {}  # transport -> frames for the next flush: one write per peer per loop iteration, as chat.py

def frame(payload):
    n = len(payload)
    head = bytes((0x81, n)) if n < 126 else bytes((0x81, 126)) + n.to_bytes(2, "big") if n < 65536 \\
        else bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload

def flush():
    global unwritten
    pending, unwritten = unwritten, {}
    for transport, frames in pending.items():
        if not transport.is_closing():
            transport.write(b"".join(frames))

async def ws_handler(request):
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    clients[ws] = request.transport
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                data = frame(msg.data.encode())
                if not unwritten:
                    asyncio.get_running_loop().call_soon(flush)
                for peer, transport in list(clients.items()):
                    if not peer.closed and transport is not None:
                        unwritten.setdefault(transport, []).append(data)
    finally:
        clients.pop(ws, None)
    return ws

async def index(request):
    return web.Response(text="limit")

app = web.Application()
app.router.add_get("/", index)
app.router.add_get("/ws", ws_handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=new_loop())
'''


TUTORIAL_HUB = r"""
io.on('connection', (socket) => {
  socket.on('newmessage', (data) => {
    io.emit('newmessage', data);
    const text = String((data && data.body) || '');
    let reply = 'Did you have a question for us today?';
    if (/\b(hello|hi|hey)\b/i.test(text)) reply = `Hello, ${data.user}!`;
    else if (text.includes('?')) reply = 'We will be right with you to answer your question.';
    io.emit('botmessage', { user: 'ChatFriend', body: reply });
  });
});
"""
NODE_SERVER = r"""
// The tutorial's server: Express serves the page, Socket.IO 4.8 broadcasts every 'newmessage'
// to everyone, and a keyword bot answers each one with one 'botmessage' through io.emit.
const express = require('express');
const http = require('http');
const { Server } = require('socket.io');
const app = express();
const server = http.createServer(app);
const io = new Server(server);
app.get('/', (req, res) => res.send('<!doctype html><title>tutorial</title>'));
""" + TUTORIAL_HUB + """
server.listen(Number(process.argv[2]), '127.0.0.1');
"""
UWS_SERVER = r"""
// The tutorial's hub and bot on Socket.IO 4.8 attached to uWebSockets.js (io.attachApp), the
// setup Socket.IO's documentation gives for speed.
const { App } = require('@trufflesuite/uws-js-unofficial');
const { Server } = require('socket.io');
const app = App();
const io = new Server();
io.attachApp(app);
app.get('/', (res) => res.end('<!doctype html><title>tutorial</title>'));
""" + TUTORIAL_HUB + """
app.listen('127.0.0.1', Number(process.argv[2]), (token) => { if (!token) process.exit(1); });
"""
TRACING_WRAPPER = '''
# Runs chat.py under tracemalloc; a snapshot is dumped to CONTROL.snap whenever CONTROL.want appears.
import os, runpy, sys, threading, time, tracemalloc

tracemalloc.start(25)
control, script = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
sys.argv[0] = script


def serve_snapshots():
    while True:
        time.sleep(0.05)
        if os.path.exists(control + ".want"):
            os.remove(control + ".want")
            tracemalloc.take_snapshot().dump(control + ".tmp")
            os.replace(control + ".tmp", control + ".snap")


threading.Thread(target=serve_snapshots, daemon=True).start()
runpy.run_path(script, run_name="__main__")
'''

# The npm packages of each Node server, installed into its own cache directory on first use.
NODE_PACKAGES = {"node": ("express@4.21.2", "socket.io@4.8.3"),
                 "uws": ("socket.io@4.8.3", "@trufflesuite/uws-js-unofficial@20.30.0-unofficial.0")}
NODE_SERVERS = {"node": NODE_SERVER, "uws": UWS_SERVER}
BENCH_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chat.py-bench"
# Seconds for a baseline's npm install; a registry that does not answer skips the baseline.
NPM_TIMEOUT = float(os.environ.get("CHAT_BENCH_NPM_TIMEOUT", "300"))


def node_modules(kind: str) -> Path | None:
    """The Node baseline's packages, npm-installed into its cache directory on first use; None, with
    a line saying why, when they cannot be installed or loaded."""
    if not (shutil.which("node") and shutil.which("npm")):
        print(f"bench_chat.py: skipping the {kind} baseline: node and npm are needed")
        return None
    cache = BENCH_CACHE / kind
    modules = cache / "node_modules"
    names = [spec.rsplit("@", 1)[0] for spec in NODE_PACKAGES[kind]]
    if not all((modules / name).is_dir() for name in names):
        cache.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(["npm", "install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund",
                                     "--prefix", str(cache), *NODE_PACKAGES[kind]], capture_output=True, text=True,
                                     timeout=NPM_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            print(f"bench_chat.py: skipping the {kind} baseline: npm install did not finish in {NPM_TIMEOUT:g} s "
                  "(is the npm registry reachable?)")
            return None
        if result.returncode != 0:
            print(f"bench_chat.py: skipping the {kind} baseline: npm install failed: {result.stderr.strip()[-300:]}")
            return None
    loads = subprocess.run(["node", "-e", ";".join(f"require({json.dumps(n)})" for n in names)],
                           env={**os.environ, "NODE_PATH": str(modules)}, capture_output=True, text=True, timeout=60)
    if loads.returncode != 0:
        print(f"bench_chat.py: skipping the {kind} baseline: its packages do not load here: "
              f"{loads.stderr.strip().splitlines()[-1:]}")
        return None
    return modules


def versions(kinds: list[str]) -> dict[str, str]:
    """The versions behind the numbers: the Python packages, and Node's when it runs."""
    from importlib import metadata

    found = {"python": sys.version.split()[0]}
    for package in ("python-socketio", "python-engineio", "aiohttp", "uvloop"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    for kind in NODE_PACKAGES.keys() & set(kinds):
        found["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
        for spec in NODE_PACKAGES[kind]:
            package = spec.rsplit("@", 1)[0]
            manifest = BENCH_CACHE / kind / "node_modules" / package / "package.json"
            found[package] = json.loads(manifest.read_text())["version"] if manifest.exists() else "?"
    return found


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """One server under test, as a process pinned to core 0."""

    def __init__(self, kind: str, workdir: Path, extra: tuple[str, ...] = (), log: Path | None = None,
                 traced: Path | None = None) -> None:
        self.kind = kind
        self.traced = traced  # chat.py under tracemalloc: snapshots through this control path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = None
        if kind == "chat":
            # Loopback only: chat.py never fetches its browser client here (the page is not loaded).
            env = {**os.environ, "CHAT_ENV_DIR": str(workdir / "chat-cache"),
                   "npm_config_registry": f"http://127.0.0.1:{free_port()}/"}
            cmd = [sys.executable, str(HERE / "chat.py"), "--port", str(self.port), "--rate", "0",
                   "--log-level", "error", *CHAT_ARGS, *extra]
            if traced is not None:
                wrapper = workdir / "traced_chat.py"
                wrapper.write_text(TRACING_WRAPPER)
                cmd[1:2] = [str(wrapper), str(traced), str(HERE / "chat.py")]
        elif kind in NODE_SERVERS:
            script = workdir / f"{kind}_server.js"
            script.write_text(NODE_SERVERS[kind])
            cmd = ["node", str(script), str(self.port)]
            env = {**os.environ, "NODE_PATH": str(BENCH_CACHE / kind / "node_modules")}
        else:
            script = workdir / f"{kind}_server.py"
            script.write_text(LOOP_HELPER + (FLOOR_SERVER if kind == "floor" else LIMIT_SERVER))
            cmd = [sys.executable, str(script), str(self.port)]
        if PIN:
            cmd = ["taskset", "-c", "0", *cmd]
        self.started = time.perf_counter()
        self.log = log  # chat.py's log goes to this file (a pipe nobody reads would block a chatty server)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env,
                                     stderr=log.open("wb") if log else subprocess.PIPE)

    async def ready(self, timeout: float = 20.0) -> float:
        """Seconds from process start to the first 200 on GET /."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                status = await reader.readline()
                writer.close()
                if b" 200 " in status:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            if self.proc.poll() is not None:
                err = self.log.read_text() if self.log else self.proc.stderr.read().decode()
                raise RuntimeError(f"{self.kind} server exited: {err[-2000:]}")
            await asyncio.sleep(0.005)
        raise RuntimeError(f"{self.kind} server did not start")

    async def snapshot(self, timeout: float = 60.0) -> Any:
        """A tracemalloc snapshot of the traced server, as it is now."""
        import tracemalloc

        assert self.traced is not None
        done = Path(f"{self.traced}.snap")
        done.unlink(missing_ok=True)
        Path(f"{self.traced}.want").touch()
        deadline = time.perf_counter() + timeout
        while not done.exists():
            if time.perf_counter() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the traced server did not write its snapshot")
            await asyncio.sleep(0.05)
        return tracemalloc.Snapshot.load(str(done))

    @property
    def pid(self) -> int:
        # under taskset the child replaces taskset through exec, so the pid is the server's
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None and self.kind != "chat":
            self.proc.kill()  # the baselines keep no state; aiohttp's run_app would wait for open sockets
            self.proc.wait()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:  # aiohttp's run_app waits up to a minute for open sockets
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- load generator


@dataclass
class Stats:
    """Counters shared by every client of the generator."""

    new: int = 0
    bot: int = 0
    latencies: list[float] = field(default_factory=list)
    sample_every: int = 1
    seen: int = 0
    frames: int = 0
    acks_ok: int = 0
    typing: int = 0

    def reset(self) -> None:
        self.new = self.bot = self.seen = self.frames = self.acks_ok = self.typing = 0
        self.latencies = []


TAIL = b"\x00\x00\xff\xff"
NEW_EVENT, BOT_EVENT = b'42["newmessage"', b'42["botmessage"'
RAW_MESSAGE = b'{"user": '  # how every frame of the limit server starts (json.dumps of message())
PING_FRAME = b"\x81\x012"  # an unmasked text frame of one byte, "2": Engine.IO's PING


class WSClient(asyncio.Protocol):
    """A minimal WebSocket client speaking Engine.IO v4 / Socket.IO v5 (or raw text for `limit`)."""

    def __init__(self, stats: Stats, raw: bool, read: bool = True) -> None:
        self.stats = stats
        self.raw = raw
        self.read = read
        self.buf = bytearray()
        self.handshaken = False
        self.inflater: Any = None
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.counting_only = False
        self.carry = b""

    def count_only(self) -> None:
        """From now on only count deliveries and answer pings, without parsing frames: one
        generator process can then read many more frames. Latency is sampled by the others.

        Counting searches the raw bytes for how each kind of frame starts; the messages and
        replies the benchmark exchanges are ASCII, so no byte of a payload can look like a
        frame header. A match split between two reads is found through the carried tail.
        """
        self.counting_only = self.inflater is None  # compressed frames (the floor server's) must be parsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def handshake(self, path: str, headers: str = "") -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        assert self.transport is not None
        self.transport.write((
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n").encode())
        if not self.read:
            return

    def send(self, text: str, opcode: int = 1) -> None:
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        n = len(data)
        first = 0x80 | opcode
        if n < 126:
            header = bytes((first, 0x80 | n))
        elif n < 65536:
            header = bytes((first, 0xFE)) + n.to_bytes(2, "big")
        else:
            header = bytes((first, 0xFF)) + n.to_bytes(8, "big")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(header + b"\x00\x00\x00\x00" + data)  # an all-zero mask leaves data as is

    def data_received(self, data: bytes) -> None:
        if self.counting_only:
            joined = self.carry + data  # a match can only end in `data`: the carry is shorter than any pattern
            stats = self.stats
            if self.raw:
                new, bot = joined.count(RAW_MESSAGE), 0
            else:
                new, bot = joined.count(NEW_EVENT), joined.count(BOT_EVENT)
                for _ in range(joined.count(PING_FRAME)):
                    self.send("3")
            stats.new += new
            stats.seen += new
            stats.bot += bot
            stats.frames += new + bot
            self.carry = joined[-(len(NEW_EVENT) - 1):]
            return
        buf = self.buf
        buf += data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if not head.startswith(b"http/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(head[:80].decode()))
                return
            self.handshaken = True
            if b"permessage-deflate" in head:
                self.inflater = zlib.decompressobj(-15)
            if self.raw and not self.ready.done():
                self.ready.set_result(None)
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                start = pos + 10
            if size - start < length:
                break
            pos = start + length
            opcode = b0 & 0x0F
            if opcode == 1:
                payload = bytes(buf[start:pos])
                if b0 & 0x40 and self.inflater is not None:
                    payload = self.inflater.decompress(payload + TAIL)
                self.on_text(payload)
            elif opcode == 9 and self.transport is not None:
                self.transport.write(bytes((0x8A, 0x80)) + b"\x00\x00\x00\x00")
            elif opcode == 8:
                self.closed = True
        del buf[:pos]

    def on_text(self, text: bytes) -> None:
        stats = self.stats
        stats.frames += 1
        if text.startswith(b"43") and b'"ok":true' in text[:40]:
            stats.acks_ok += 1
        elif text.startswith(b'42["typing"'):
            stats.typing += 1
        if self.raw or text.startswith(NEW_EVENT):
            stats.new += 1
            stats.seen += 1
            if stats.seen % stats.sample_every == 0:
                mark = text.find(b"t=")
                if mark >= 0:
                    end = text.find(b" ", mark)
                    stats.latencies.append(time.perf_counter() - int(text[mark + 2:end]) / 1e9)
        elif text.startswith(BOT_EVENT):
            stats.bot += 1
        elif text == b"2":
            self.send("3")
        elif text.startswith(b"0{"):
            self.send("40")
        elif text.startswith(b"40") and not self.ready.done():
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_client(server: Server, stats: Stats, read: bool = True, rcvbuf: int | None = None,
                      headers: str = "", sio: bool = True) -> WSClient:
    loop = asyncio.get_running_loop()
    raw = server.kind == "limit"
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    _, client = await loop.create_connection(lambda: WSClient(stats, raw, read), sock=sock)
    client.handshake("/ws" if raw else "/socket.io/?EIO=4&transport=websocket", headers)
    if not sio:  # the WebSocket is open (the Engine.IO open packet may follow); no Socket.IO connect
        client.raw = True
    await asyncio.wait_for(client.ready, 30)
    if not read and client.transport is not None:
        client.transport.pause_reading()
    return client


async def open_clients(server: Server, stats: Stats, count: int, batch: int = 100) -> list[WSClient]:
    clients: list[WSClient] = []
    for first in range(0, count, batch):
        clients += await asyncio.gather(*(open_client(server, stats) for _ in range(min(batch, count - first))))
    return clients


def message(server: Server, sender: int, seq: int) -> str:
    body = f"t={time.perf_counter_ns()} from sender {sender}, message {seq}"
    payload = {"user": f"sender{sender}", "body": body}
    return json.dumps(payload) if server.kind == "limit" else "42" + json.dumps(["newmessage", payload])


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def offer(server: Server, senders: list[WSClient], rate: float, seconds: float) -> int:
    """Send `rate` messages a second, spread over the senders, for `seconds`; returns how many were sent."""
    start = time.perf_counter()
    sent = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return sent
        due = int(elapsed * rate) + 1
        while sent < due:
            sender = senders[sent % len(senders)]
            sender.send(message(server, sent % len(senders), sent))
            sent += 1
        await asyncio.sleep(0.002)


# Before a measurement, what the previous (perhaps overloaded) step left queued is delivered first, or
# its backlog is counted as the next step's latency (seen: p50 1.9 s at half the highest rate).
BACKLOG_DRAIN = 30.0


async def settle(stats: Stats, quiet: float = 0.3, limit: float = 5.0) -> None:
    """Wait until deliveries stop arriving (bounded)."""
    deadline = time.perf_counter() + limit
    last = -1
    while time.perf_counter() < deadline:
        total = stats.new + stats.bot
        if total == last:
            return
        last = total
        await asyncio.sleep(quiet)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Step:
    rate: float
    new_per_s: float
    bot_per_s: float
    delivered: float
    p50_ms: float
    p99_ms: float
    gen_cpu: float
    server_cpu: float

    @property
    def ok(self) -> bool:
        return not self.failed_gate

    @property
    def failed_gate(self) -> str:
        """Which gate this step failed ("delivery", "p99", both), or "" when it passed."""
        gates = [name for name, passed in (("delivery", self.delivered >= 0.95), ("p99", self.p99_ms <= 250))
                 if not passed]
        return " and ".join(gates)


async def measure(server: Server, clients: list[WSClient], stats: Stats, rate: float, seconds: float,
                  pids: list[int] | None = None) -> Step:
    senders = clients[:10]
    pids = pids or [server.pid]
    await settle(stats, limit=BACKLOG_DRAIN)
    stats.reset()
    # with counting-only clients, the others sample every frame they read; else every n-th frame is a sample
    stats.sample_every = 1 if any(c.counting_only for c in clients) else max(1, len(clients) // 50)
    cpu0, scpu0, t0 = own_cpu(), sum(map(cpu_seconds, pids)), time.perf_counter()
    sent = await offer(server, senders, rate, seconds)
    wall = time.perf_counter() - t0
    cpu1, scpu1 = own_cpu(), sum(map(cpu_seconds, pids))
    await settle(stats, quiet=0.25, limit=3)
    expected = sent * len(clients)
    return Step(rate=rate, new_per_s=stats.new / wall, bot_per_s=stats.bot / wall,
                delivered=stats.new / expected if expected else 0,
                p50_ms=percentile(stats.latencies, 0.50) * 1000, p99_ms=percentile(stats.latencies, 0.99) * 1000,
                gen_cpu=(cpu1 - cpu0) / wall, server_cpu=(scpu1 - scpu0) / wall)


async def fanout(server: Server, clients_n: int, seconds: float, steps: int,
                 cluster: list[Server] | None = None) -> dict[str, Any]:
    """Ramp the offered rate until delivery or latency fails; then latency at half that rate.

    With a cluster, clients are spread over its nodes round-robin (senders too).
    """
    stats = Stats()
    nodes = cluster or [server]
    clients = []
    for i in range(len(nodes)):
        clients += await open_clients(nodes[i], stats, clients_n // len(nodes))
    # interleave the nodes' clients (a0, b0, a1, b1, ...): the first ten are the senders, so they are
    # spread over the nodes, and so are the one-in-50 latency samplers
    per_node = clients_n // len(nodes)
    clients = [clients[(i % len(nodes)) * per_node + i // len(nodes)] for i in range(len(clients))]
    for i, client in enumerate(clients):
        if i % 50:  # one client in 50 reads every frame and samples latency; the others only count
            client.count_only()
    pids = [n.pid for n in nodes]
    await asyncio.sleep(0.3)
    rate = max(2.0, 2000.0 / clients_n)
    best: Step | None = None
    failed: float | None = None
    tried = []
    for _ in range(steps):  # double until it fails, then bisect between the last good and the failed rate
        step = await measure(server, clients, stats, rate, seconds, pids)
        tried.append(step)
        if step.ok:
            best = step
        else:
            failed = rate
        if failed is None:
            rate *= 2
        elif best is None:
            rate /= 2
        else:
            rate = (best.rate * failed) ** 0.5
            if failed / best.rate < 1.15:
                break
    if best is None:
        best = min(tried, key=lambda s: s.rate)
    # what ended the ramp: the gate the lowest failing rate missed, and how busy the generator was there
    failing = min((s for s in tried if not s.ok), key=lambda s: s.rate, default=None)
    ended_by = (f"{failing.failed_gate} (generator {failing.gen_cpu * 100:.0f} %)" if failing
                else "no failure within the steps")
    half = await measure(server, clients, stats, best.rate / 2, seconds, pids)
    for client in clients:
        client.close()
    return {"clients": clients_n, "best": best.__dict__, "half": half.__dict__, "ended_by": ended_by,
            "steps": [s.__dict__ for s in tried]}


async def idle(server: Server, count: int) -> dict[str, Any]:
    """Connect `count` idle clients: RSS per connection, connect rate, one broadcast to all."""
    stats = Stats()
    await asyncio.sleep(0.2)
    before = rss_kb(server.pid)
    started = time.perf_counter()
    clients = await open_clients(server, stats, count)
    connect_s = time.perf_counter() - started
    await asyncio.sleep(0.5)
    after = rss_kb(server.pid)
    clients[0].send(message(server, 0, 0))  # the sender's first message also announces it: not timed
    await settle(stats, quiet=0.3, limit=30)
    stats.reset()
    started = time.perf_counter()
    clients[0].send(message(server, 0, 1))
    while stats.new < count and time.perf_counter() - started < 30:
        await asyncio.sleep(0.001)
    broadcast_ms = (time.perf_counter() - started) * 1000
    for client in clients:
        client.close()
    return {"connections": count, "rss_kb_per_conn": (after - before) / count, "connects_per_s": count / connect_s,
            "broadcast_ms": broadcast_ms, "received": stats.new}


async def slow_consumer(server: Server, messages: int, readers: int = 20) -> dict[str, Any]:
    """One client that never reads, in a room flooded with `messages` by others."""
    stats = Stats()
    clients = await open_clients(server, stats, readers)
    stalled = await open_client(server, Stats(), read=False, rcvbuf=4096)
    base_rss = rss_kb(server.pid)
    peak = base_rss
    samples = []
    started = time.perf_counter()
    sent = 0
    senders = clients[:5]
    while sent < messages:
        for _ in range(50):
            senders[sent % 5].send(message(server, sent % 5, sent))
            sent += 1
        await asyncio.sleep(0.002)
        now = rss_kb(server.pid)
        peak = max(peak, now)
        if not samples or time.perf_counter() - samples[-1][0] - started > 0.5:
            samples.append((time.perf_counter() - started, now))
    await settle(stats, quiet=0.3, limit=20)
    wall = time.perf_counter() - started
    peak = max(peak, rss_kb(server.pid))
    stalled.close()
    for client in clients:
        client.close()
    return {"messages": messages, "rss_base_mb": base_rss / 1024, "rss_peak_mb": peak / 1024,
            "rss_growth_mb": (peak - base_rss) / 1024, "others_delivered": stats.new / (sent * readers),
            "others_rate": stats.new / wall, "rss_samples_mb": [(round(t, 1), round(r / 1024, 1)) for t, r in samples]}


PACKAGES = ("socketio", "engineio", "aiohttp", "multidict", "yarl", "uvloop")


def allocation_owner(traceback: Any) -> tuple[str, str]:
    """(package, file:line) of the innermost frame outside the standard library that caused an allocation:
    a Task made by asyncio.ensure_future counts for the line that called it."""
    frames = list(reversed(traceback))  # innermost first
    for frame in frames:
        path = Path(frame.filename)
        if path.name == "chat.py":
            return "chat.py", f"chat.py:{frame.lineno}"
        for package in PACKAGES:
            if f"/{package}/" in frame.filename:
                return package, f"{package}/{frame.filename.rsplit(f'/{package}/', 1)[1]}:{frame.lineno}"
    first = frames[0] if frames else None
    return "stdlib", f"{Path(first.filename).name}:{first.lineno}" if first else "?"


def source_file(name: str) -> Path:
    """chat.py or a package's file, from "package/file.py" as allocation_owner names it."""
    import importlib.util

    if name == "chat.py":
        return HERE / "chat.py"
    package, _, rest = name.partition("/")
    spec = importlib.util.find_spec(package) if package in PACKAGES else None
    if spec is None or not spec.submodule_search_locations:
        return Path(name)
    return Path(next(iter(spec.submodule_search_locations))) / rest


async def memory_profile(workdir: Path, count: int) -> dict[str, Any]:
    """Where chat.py's memory per idle connection goes: tracemalloc before and after `count` idle clients."""
    import linecache

    server = Server("chat", workdir, traced=workdir / "trace")
    try:
        await server.ready(timeout=120)  # every allocation of the imports is traced: slow to start
        await asyncio.sleep(0.5)
        before, rss_before = await server.snapshot(), rss_kb(server.pid)
        clients = await open_clients(server, Stats(), count)
        await asyncio.sleep(1.0)
        after, rss_after = await server.snapshot(), rss_kb(server.pid)
        for client in clients:
            client.close()
    finally:
        server.stop()
    by_line: dict[str, list[float]] = {}
    by_package: dict[str, float] = {}
    for diff in after.compare_to(before, "traceback"):
        package, where = allocation_owner(diff.traceback)
        entry = by_line.setdefault(where, [0.0, 0.0])
        entry[0] += diff.size_diff
        entry[1] += diff.count_diff
        by_package[package] = by_package.get(package, 0.0) + diff.size_diff
    lines = []
    for where, (size, objects) in sorted(by_line.items(), key=lambda item: -item[1][0])[:20]:
        name, _, lineno = where.rpartition(":")
        source = linecache.getline(str(source_file(name)), int(lineno)).strip()
        lines.append({"where": where, "bytes_per_conn": size / count, "objects_per_conn": objects / count,
                      "source": source[:90]})
    return {"connections": count, "traced_bytes_per_conn": sum(by_package.values()) / count,
            "rss_kb_per_conn_traced": (rss_after - rss_before) / count,
            "by_package": {k: v / count for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])},
            "top_lines": lines}


# ---------------------------------------------------------------- hostile clients


def sio_event(name: str, data: Any, ack: int | None = None) -> str:
    """A Socket.IO EVENT packet as text, with an ack id when given."""
    return f"42{'' if ack is None else ack}" + json.dumps([name, data], ensure_ascii=False)


async def fresh_pair_chats(server: Server) -> bool:
    """After an attack: can two new clients still exchange a message?"""
    stats = Stats()
    try:
        first, second = await open_client(server, Stats()), await open_client(server, stats)
    except (OSError, ConnectionError, asyncio.TimeoutError):
        return False
    first.send('42["newmessage",{"user":"Checker","body":"still alive?"}]')
    deadline = time.perf_counter() + 5
    while stats.new < 1 and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    first.close()
    second.close()
    return stats.new >= 1


async def http_get_many(port: int, path: str, count: int, headers: str = "", body: bytes | None = None) -> dict[int, int]:
    """`count` requests over one keep-alive connection; how many got each status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: dict[int, int] = {}
    method = "POST" if body is not None else "GET"
    extra = f"Content-Length: {len(body)}\r\n" if body is not None else ""
    for _ in range(count):
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}{extra}\r\n".encode() + (body or b""))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split()[1])
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        await reader.readexactly(length)
        statuses[status] = statuses.get(status, 0) + 1
        if b"connection: close" in head.lower():
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    return statuses


async def attack_binary(server: Server) -> str:
    client = await open_client(server, Stats())
    client.send('451-["newmessage",{"_placeholder":true,"num":0}]')
    for _ in range(100):  # 6 MB of attachments that python-socketio would keep until the last one came
        client.send(os.urandom(60_000), opcode=2)
    await asyncio.sleep(1)
    return "closed at the first binary packet" if client.closed else "still open"


async def attack_unread_acks(server: Server) -> str:
    writer = await open_client(server, Stats())
    writer.send('420["join",{"room":"evil","user":"Writer"}]')
    for i in range(1000):
        writer.send(sio_event("newmessage", {"user": "Writer", "body": f"{i} {'x' * 1900}", "room": "evil"}))
    await asyncio.sleep(1)
    stalled = await open_client(server, Stats(), read=False, rcvbuf=4096)
    for _ in range(3000):  # every join's ack carries the room's 1,000 long messages (or a refusal)
        stalled.send('421["join",{"room":"evil","since":0}]')
    deadline = time.perf_counter() + 10
    assert server.log is not None
    while "behind" not in server.log.read_text() and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)  # (a client that does not read cannot see its own disconnection)
    writer.close()
    stalled.close()
    return "disconnected at the bound" if "behind" in server.log.read_text() else "still connected"


async def attack_rooms(server: Server) -> str:
    stats = Stats()
    client = await open_client(server, stats)
    for i in range(3000):  # a new room and a new name each time
        client.send(sio_event("join", {"room": f"r{i}", "user": f"N{i}"}, ack=i))
    await asyncio.sleep(1.5)
    client.close()
    return f"{stats.acks_ok:,} of 3,000 joins accepted"


async def attack_typing(server: Server) -> str:
    listener_stats = Stats()
    listener = await open_client(server, listener_stats)
    typist = await open_client(server, Stats())
    typist.send('420["join",{"room":"lobby","user":"Typist"}]')
    listener.send('421["join",{"room":"lobby","user":"Listener"}]')
    await asyncio.sleep(0.3)
    listener_stats.reset()
    for i in range(20_000):
        typist.send('42["typing",{"typing":%s}]' % ("true" if i % 2 == 0 else "false"))
        if i % 500 == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(1.5)
    typist.close()
    listener.close()
    return f"20,000 toggles -> {listener_stats.typing:,} typing frames to a listener"


async def attack_sessions(server: Server) -> str:
    statuses = await http_get_many(server.port, "/socket.io/?EIO=4&transport=polling", 5000,
                                   "X-Forwarded-For: 203.0.113.7\r\n")
    return f"{statuses.get(200, 0):,} of 5,000 sessions accepted ({statuses.get(429, 0):,} refused with 429)"


async def attack_slowloris(server: Server) -> str:
    async def one() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.perf_counter()
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        while not reader.at_eof() and time.perf_counter() - started < 40:
            writer.write(b"a")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), 1.0)
        writer.close()
        return time.perf_counter() - started

    times = await asyncio.gather(*(one() for _ in range(200)))
    return f"200 connections dribbling headers closed after {min(times):.1f}-{max(times):.1f} s"


async def attack_nfkc(server: Server) -> str:
    stats = Stats()
    bystander = await open_client(server, stats)
    attackers = [await open_client(server, Stats()) for _ in range(20)]
    name = "\ufdfa" * 21_000  # 63 KB; NFKC makes each one 18 characters
    started = time.perf_counter()
    seq = 0
    while time.perf_counter() - started < 5:
        for attacker in attackers:
            attacker.send(sio_event("join", {"room": "lobby", "user": name}))
        bystander.send(message(server, 0, seq))
        seq += 1
        await asyncio.sleep(0.4)
    await settle(stats)
    for client in (bystander, *attackers):
        client.close()
    return (f"a bystander's message round trip p99 {percentile(stats.latencies, 0.99) * 1000:.0f} ms "
            f"({stats.new} of {seq} delivered)")


async def attack_reconnect(server: Server) -> str:
    stats = Stats()
    listener = await open_client(server, stats, headers="X-Forwarded-For: 198.51.100.1\r\n")
    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < 5:  # a fresh connection (a fresh per-connection bucket) every 10 messages
        client = await open_client(server, Stats(), headers="X-Forwarded-For: 203.0.113.9\r\n")
        for i in range(10):
            client.send(sio_event("newmessage", {"user": "Rex", "body": f"m{i}"}))
        sent += 10
        await asyncio.sleep(0.01)
        client.close()
    wall = time.perf_counter() - started
    await settle(stats)
    listener.close()
    return (f"{stats.new:,} of {sent:,} messages in {wall:.1f} s got through ({stats.new / wall:,.0f}/s; "
            "the address may send 20/s after a burst of 40)")


async def attack_junk(server: Server) -> str:
    for i in range(1000):
        client = await open_client(server, Stats(), sio=False)
        client.send(["", "9x", "hello", "\x00"][i % 4])
        await asyncio.sleep(0.002)
        client.close()
    statuses = await http_get_many(server.port, "/socket.io/?EIO=4&transport=polling&sid=nope", 1000,
                                   body=b"\xff\xfe not utf-8")
    return f"1,000 junk frames and 1,000 junk polling POSTs ({', '.join(f'{n:,}x {c}' for c, n in statuses.items())})"


ATTACKS = [  # (name, chat.py flags, attack)
    ("binary attachments", (), attack_binary),
    ("acks never read", ("--history", "1000", "--bot", "off"), attack_unread_acks),
    ("3,000 rooms with new names", (), attack_rooms),
    ("typing toggles", (), attack_typing),
    ("Engine.IO sessions from one address", ("--trust-proxy", "--max-per-ip", "5"), attack_sessions),
    ("slowloris", (), attack_slowloris),
    ("names that NFKC expands", (), attack_nfkc),
    ("reconnecting to reset the rate", ("--trust-proxy", "--rate", "5"), attack_reconnect),
    ("junk with a password set", ("--password", "s3cret"), attack_junk),
]


async def attacks(workdir: Path, only: str | None = None) -> list[dict[str, Any]]:
    """Each attack against a fresh chat.py: RSS growth, what happened, the log, and a fresh pair after."""
    rows = []
    for name, flags, attack in ATTACKS:
        if only and only not in name:
            continue
        progress(f"attack: {name}")
        log = workdir / "attack.log"
        server = Server("chat", workdir, ("--log-level", "info", *flags), log=log)
        await server.ready()
        await asyncio.sleep(0.3)
        before = rss_kb(server.pid)
        outcome = await attack(server)
        after = rss_kb(server.pid)
        pair = await fresh_pair_chats(server) if "--password" not in flags else True
        server.stop()
        text = log.read_text(errors="replace")
        rows.append({"attack": name, "outcome": outcome, "rss_growth_mb": (after - before) / 1024,
                     "fresh_pair": pair, "traceback": "Traceback" in text, "log_lines": len(text.splitlines()),
                     "log_kb": len(text.encode()) / 1024})
    return rows


async def redis_scaling(workdir: Path, clients_n: int, seconds: float, steps: int) -> dict[str, Any]:
    """chat.py alone, one node with --redis, and two nodes sharing Redis: fan-out at `clients_n`."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen((["taskset", "-c", "0"] if PIN else []) + cmd, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    out: dict[str, Any] = {}
    try:
        await asyncio.sleep(0.3)
        for label, count in (("one node, no Redis", 0), ("one node + Redis", 1), ("two nodes + Redis", 2)):
            progress(f"scale-out: {label}")
            # each setup starts from an empty Redis: names the last setup's senders used are still held
            # there (for chat.py's --name-grace), and a new connection may not take them
            subprocess.run(["redis-cli", "-p", str(port), "flushall"], stdout=subprocess.DEVNULL, timeout=10, check=False)
            nodes = [Server("chat", workdir, ("--redis", url) if count else ()) for _ in range(max(count, 1))]
            for node in nodes:
                await node.ready()
            out[label] = await fanout(nodes[0], clients_n, seconds, steps, cluster=nodes)
            for node in nodes:
                node.stop()
    finally:
        redis.kill()
        redis.wait()
    return out


# ---------------------------------------------------------------- running it all


T0 = time.perf_counter()


def progress(text: str) -> None:
    print(f"  [{time.perf_counter() - T0:6.1f} s] {text}", file=sys.stderr, flush=True)


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


@dataclass(frozen=True)
class Plan:
    """What one run of the benchmark measures, and how long each measurement takes."""

    kinds: list[str]          # servers: chat, node, floor, limit
    workloads: list[str]      # startup, fanout, idle, slow, redis, attacks
    sizes: list[int]          # fan-out client counts
    seconds: float            # per offered-rate step
    steps: int                # rate steps per ramp (doubling, then bisecting)
    idle_n: int               # idle connections
    flood: int                # messages for the slow consumer
    runs: int                 # each fan-out and idle point measured this many times (the median is kept)
    startup_tries: int


def parse_plan() -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    parser.add_argument("--smoke", action="store_true", help="with --quick: seconds, just to check it works")
    parser.add_argument("--servers", default="chat,node,uws,floor,limit", help="which servers to run (default all)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--workloads", default="startup,fanout,idle,slow,redis", help="which workloads to run")
    parser.add_argument("--sizes", help="fan-out client counts, comma-separated (default by mode)")
    parser.add_argument("--chat-args", default="", help="extra chat.py flags, e.g. '--gc default' to measure a lever")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="measure every fan-out and idle point N times: the median, with the range")
    parser.add_argument("--memory-profile", type=int, nargs="?", const=2000, metavar="CONNECTIONS",
                        help="only profile where chat.py's memory per idle connection goes (tracemalloc; "
                             "default 2,000 connections)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be 1 or more")
    if args.smoke:
        sizes, seconds, steps, idle_n, flood = [20], 0.5, 2, 100, 500
    elif args.quick:
        sizes, seconds, steps, idle_n, flood = [100, 1000], 1.0, 8, 1000, 10000
    else:
        sizes, seconds, steps, idle_n, flood = [100, 500, 1000], 2.0, 12, 5000, 50000
    kinds = args.servers.split(",")
    if args.memory_profile:  # chat.py alone: the baselines are never started, so never installed
        kinds = ["chat"]
    kinds = [k for k in kinds if k not in NODE_PACKAGES or node_modules(k) is not None]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
    CHAT_ARGS.extend(args.chat_args.split())
    plan = Plan(kinds, args.workloads.split(","), sizes, seconds, steps, idle_n, flood, args.runs,
                1 if args.smoke else 3)
    return plan, args


async def started(kind: str, workdir: Path, extra: tuple[str, ...] = ()) -> Server:
    server = Server(kind, workdir, extra)
    await server.ready()
    return server


def run_label(run: int, plan: Plan) -> str:
    return f", run {run + 1} of {plan.runs}" if plan.runs > 1 else ""


async def measure_startup(plan: Plan, workdir: Path) -> dict[str, float]:
    """Seconds from start to a served page, the median of a few starts, per server."""
    progress("start-up")
    out = {}
    for kind in plan.kinds:
        times = []
        for _ in range(plan.startup_tries * plan.runs):
            server = Server(kind, workdir)
            times.append(await server.ready())
            server.stop()
        out[kind] = statistics.median(times)
    return out


async def measure_fanout(plan: Plan, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each (server, size) point measured plan.runs times, the runs of one point interleaved across
    servers (so that a slow moment of the machine does not fall on one server only); the median kept."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in range(plan.runs):
        for size in plan.sizes:
            for kind in plan.kinds:
                progress(f"fan-out: {kind}, {size} clients" + run_label(run, plan))
                server = await started(kind, workdir)
                runs.setdefault((kind, size), []).append(await fanout(server, size, plan.seconds, plan.steps))
                server.stop()
    return {kind: [median_run(runs[kind, size], lambda r: r["best"]["new_per_s"],
                              {"new_per_s": lambda r: r["best"]["new_per_s"],
                               "p99_half_ms": lambda r: r["half"]["p99_ms"]})
                   for size in plan.sizes] for kind in plan.kinds}


async def measure_idle(plan: Plan, workdir: Path, kind: str) -> dict[str, Any]:
    idle_runs = []
    for run in range(plan.runs):
        progress(f"idle capacity: {kind}, {plan.idle_n} connections" + run_label(run, plan))
        server = await started(kind, workdir)
        idle_runs.append(await idle(server, plan.idle_n))
        server.stop()
    return median_run(idle_runs, lambda r: r["rss_kb_per_conn"],
                      {"rss_kb_per_conn": lambda r: r["rss_kb_per_conn"], "broadcast_ms": lambda r: r["broadcast_ms"]})


async def measure_slow(plan: Plan, workdir: Path, kind: str) -> dict[str, Any]:
    progress(f"slow consumer: {kind}, {plan.flood} messages")
    server = await started(kind, workdir, ("--bot", "off") if kind == "chat" else ())
    result = await slow_consumer(server, plan.flood)
    server.stop()
    return result


async def main() -> int:
    plan, args = parse_plan()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if PIN:
        os.sched_setaffinity(0, {1})
    print(f"bench_chat.py: Python {sys.version.split()[0]}, {CORES} cores; "
          + ("servers pinned to core 0, load generator to core 1" if PIN else
             "NOT pinned (one core, or no taskset): server and load generator share the CPU"))
    print("chat.py runs as shipped (keyword bot on, validation, history) except --rate 0 so ten senders can "
          "saturate it; clients offer permessage-deflate like browsers.")
    results: dict[str, Any] = {"python": sys.version.split()[0], "cores": CORES, "pinned": PIN,
                               "versions": versions(plan.kinds), "runs": plan.runs}
    work = plan.workloads
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.memory_profile:
            progress(f"memory profile: chat, {args.memory_profile} idle connections under tracemalloc")
            results["memory_profile"] = await memory_profile(workdir, args.memory_profile)
            report_memory_profile(results["memory_profile"])
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
            return 0
        results["startup"] = await measure_startup(plan, workdir) if "startup" in work else {}
        results["fanout"] = await measure_fanout(plan, workdir) if "fanout" in work else {k: [] for k in plan.kinds}
        results["idle"] = {k: await measure_idle(plan, workdir, k) for k in plan.kinds} if "idle" in work else {}
        results["slow"] = {k: await measure_slow(plan, workdir, k) for k in plan.kinds
                           if k != "limit"} if "slow" in work else {}
        if "redis" in work and shutil.which("redis-server"):
            results["redis"] = await redis_scaling(workdir, max(plan.sizes), plan.seconds, plan.steps)
        if "attacks" in work:
            results["attacks"] = await attacks(workdir)
    report(results, plan.kinds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def median_run(runs: list[dict[str, Any]], rank: Callable[[dict[str, Any]], float],
               measures: dict[str, Callable[[dict[str, Any]], float]]) -> dict[str, Any]:
    """One measured point over several runs: the run ranked median by `rank` (a real run, so that its
    columns belong together), plus, for each of `measures`, the median and range over all runs."""
    ordered = sorted(runs, key=rank)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["over_runs"] = {}
    for name, measure in measures.items():
        values = [measure(r) for r in runs]
        chosen["over_runs"][name] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                                     "values": values}
    chosen["runs"] = len(runs)
    return chosen


def spread(point: dict[str, Any], name: str, digits: int = 0, unit: str = "") -> str:
    """A measure as "median (min to max)" when it was measured more than once, else the value."""
    over = point["over_runs"][name]
    text = f"{fmt(over['median'], digits)}{unit}"
    if point["runs"] > 1:
        text += f" ({fmt(over['min'], digits)}–{fmt(over['max'], digits)}{unit})"
    return text


def report(results: dict[str, Any], kinds: list[str]) -> None:
    if any(results["fanout"].values()):
        report_fanout(results, kinds)
    report_rest(results, kinds)


def report_fanout(results: dict[str, Any], kinds: list[str]) -> None:
    print("\n## Fan-out: highest offered rate with >= 95 % delivered and p99 <= 250 ms")
    print("| server | clients | msgs/s | newmessage frames/s | botmessage frames/s | all frames/s "
          "| server CPU | generator CPU | server µs/frame | frames/s per server core | vs limit | vs Node "
          "| vs uws | p50 / p99 ms at half rate | the ramp ended by |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")

    def capacity(best: dict[str, Any]) -> float:
        return (best["new_per_s"] + best["bot_per_s"]) / max(best["server_cpu"], 1e-9)

    def new_by_size(kind: str) -> dict[int, float]:
        return {r["clients"]: r["over_runs"]["new_per_s"]["median"] for r in results["fanout"].get(kind, [])}

    limit_by_size = {r["clients"]: capacity(r["best"]) for r in results["fanout"].get("limit", [])}
    node_by_size, uws_by_size = new_by_size("node"), new_by_size("uws")
    for kind in kinds:
        for r in results["fanout"][kind]:
            best, half = r["best"], r["half"]
            total = best["new_per_s"] + best["bot_per_s"]
            ratio = capacity(best) / limit_by_size[r["clients"]] if r["clients"] in limit_by_size else float("nan")
            flag = "" if best["delivered"] >= 0.95 and best["p99_ms"] <= 250 else " (never met)"
            new_median = r["over_runs"]["new_per_s"]["median"]
            vs_node, vs_uws = (new_median / by[r["clients"]] if by.get(r["clients"]) else float("nan")
                               for by in (node_by_size, uws_by_size))
            print(f"| {kind} | {r['clients']:,} | {fmt(best['rate'])}{flag} | {spread(r, 'new_per_s')} "
                  f"| {fmt(best['bot_per_s'])} | {fmt(total)} | {best['server_cpu'] * 100:.0f} % "
                  f"| {best['gen_cpu'] * 100:.0f} % | {1e6 * best['server_cpu'] / max(total, 1):.1f} "
                  f"| {fmt(capacity(best))} | {ratio:.2f}x | {vs_node:.2f}x | {vs_uws:.2f}x "
                  f"| {half['p50_ms']:.1f} / {spread(r, 'p99_half_ms', 1)} | {r.get('ended_by', '?')} |")
    print("(frames/s per server core = delivered frames/s ÷ the server's CPU share: what one core sustains "
          "when the generator, not the server, is the limit; 'vs limit' compares that. 'vs Node' and 'vs uws' "
          "compare newmessage deliveries/s at the highest rate each server sustains, each sending one bot reply "
          "per message, on the same pinned core. 'The ramp ended by' names the gate the first failing rate "
          "missed and the generator's CPU there: below 100 % of its core, the server was the limit.)")
    runs = results.get("runs", 1)
    if runs > 1:
        print(f"(Each point measured {runs} times: newmessage frames/s and p99 are the median (min–max) of the "
              "runs, 'vs Node' and 'vs uws' divide the medians, and the other columns come from the run with "
              "the median newmessage rate.)")


def report_rest(results: dict[str, Any], kinds: list[str]) -> None:
    if results.get("redis"):
        print("\n## Scale-out through Redis (chat.py, all nodes and redis-server on the server core)")
        print("| setup | clients | msgs/s | all frames/s | server CPU (all nodes) | frames/s per server core "
              "| p50 / p99 ms at half rate |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for label, r in results["redis"].items():
            best, half = r["best"], r["half"]
            total = best["new_per_s"] + best["bot_per_s"]
            print(f"| {label} | {r['clients']:,} | {fmt(best['rate'])} | {fmt(total)} | "
                  f"{best['server_cpu'] * 100:.0f} % | {fmt(total / max(best['server_cpu'], 1e-9))} "
                  f"| {half['p50_ms']:.1f} / {half['p99_ms']:.1f} |")
        common = common_rate_cpu(results["redis"])
        if common:
            rate, per_frame = common
            print(f"\nServer CPU per delivered frame at the same offered rate ({fmt(rate)} msgs/s, the highest "
                  "step of the ramp every setup passed): " + "; ".join(
                      f"{label} {us:.2f} µs" for label, us in per_frame.items()))
    if results["idle"]:
        report_idle(results, kinds)
    if results.get("attacks"):
        print("\n## Hostile clients: each attack against a fresh chat.py")
        print("| attack | what happened | server RSS growth | log | traceback | a fresh pair chats after |")
        print("| --- | --- | ---: | ---: | --- | --- |")
        for a in results["attacks"]:
            print(f"| {a['attack']} | {a['outcome']} | {a['rss_growth_mb']:+.1f} MB | {a['log_lines']} line{'' if a['log_lines'] == 1 else 's'} "
                  f"({a['log_kb']:.1f} KB) | {'yes' if a['traceback'] else 'none'} | {'yes' if a['fresh_pair'] else 'NO'} |")
    if results["slow"]:
        print("\n## A slow consumer: one client that stops reading, in a flooded room")
        print("| server | flood | server RSS before -> peak | others delivered | others' rate |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for kind, s in results["slow"].items():
            print(f"| {kind} | {s['messages']:,} msgs, 1 stalled reader | {s['rss_base_mb']:.0f} -> "
                  f"{s['rss_peak_mb']:.0f} MB (+{s['rss_growth_mb']:.0f}) | {s['others_delivered'] * 100:.1f} % "
                  f"| {fmt(s['others_rate'])} frames/s |")


def common_rate_cpu(setups: dict[str, Any]) -> tuple[float, dict[str, float]] | None:
    """The highest ramp rate that every setup passed, and each setup's server µs per frame there:
    at the highest rate each sustains, the busier setup also batches more, which hides its cost."""
    passed = [{round(s["rate"], 3): s for s in r["steps"] if s["delivered"] >= 0.95 and s["p99_ms"] <= 250}
              for r in setups.values()]
    rates = set.intersection(*(set(p) for p in passed)) if passed else set()
    if not rates:
        return None
    rate = max(rates)
    return rate, {label: 1e6 * p[rate]["server_cpu"] / max(p[rate]["new_per_s"] + p[rate]["bot_per_s"], 1)
                  for label, p in zip(setups, passed, strict=True)}


def report_idle(results: dict[str, Any], kinds: list[str]) -> None:
    print("\n## Idle capacity and start-up")
    print("| server | connections | RSS per connection | connects/s | one broadcast to all | start-up to first 200 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        i = results["idle"][kind]
        print(f"| {kind} | {i['connections']:,} | {spread(i, 'rss_kb_per_conn', 1, ' KB')} "
              f"| {fmt(i['connects_per_s'])} | {spread(i, 'broadcast_ms', 0, ' ms')} ({i['received']:,} got it) "
              f"| {results['startup'].get(kind, float('nan')) * 1000:.0f} ms |")
    if results.get("runs", 1) > 1:
        print(f"(RSS and the broadcast: median (min–max) of {results['runs']} runs; start-up: median of "
              f"{3 * results['runs']} starts.)")


def report_memory_profile(profile: dict[str, Any]) -> None:
    count = profile["connections"]
    print(f"\n## Where chat.py's memory per idle connection goes ({count:,} idle WebSocket clients, tracemalloc)")
    print(f"Traced Python allocations: {profile['traced_bytes_per_conn'] / 1024:.2f} KB per connection; "
          f"RSS growth in the same (traced) run: {profile['rss_kb_per_conn_traced']:.1f} KB per connection "
          "(tracemalloc adds its own bookkeeping to RSS; kernel socket buffers are not in RSS).")
    print("\n| package that made the allocation | KB per connection |")
    print("| --- | ---: |")
    for package, size in profile["by_package"].items():
        print(f"| {package} | {size / 1024:.2f} |")
    print("\n| where (innermost frame outside the standard library) | KB per connection | objects per connection "
          "| source line |")
    print("| --- | ---: | ---: | --- |")
    for line in profile["top_lines"]:
        source = line["source"].replace("|", "\\|")
        print(f"| {line['where']} | {line['bytes_per_conn'] / 1024:.2f} | {line['objects_per_conn']:.1f} "
              f"| `{source}` |")


if __name__ == "__main__":
    try:  # the generator's per-frame cost is mostly the event loop's: uvloop makes it cheaper
        import uvloop

        sys.exit(uvloop.run(main()))
    except ImportError:
        sys.exit(asyncio.run(main()))
