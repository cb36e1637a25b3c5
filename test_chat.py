"""Specification of chat.py, as tests.

Every test starts a real chat server on a free loopback port and talks to it with
real Socket.IO clients: python-socketio's AsyncClient, the JavaScript
socket.io-client in Node, and Chromium driven by Playwright. Tests that need Node,
the npm package or Chromium skip when those are missing, and fail instead when
CHAT_TEST_STRICT=1 (as in CI).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import http.server
import importlib.util
import inspect
import json
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
import unicodedata
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
import yarl
from aiohttp import web
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import chat

HERE = Path(__file__).resolve().parent
STRICT = os.environ.get("CHAT_TEST_STRICT") == "1"
NODE_MODULES = Path(os.environ.get("CHAT_NODE_MODULES", HERE / "node_modules"))
CLIENT_JS = NODE_MODULES / "socket.io-client" / "dist" / "socket.io.min.js"
AXE_JS = NODE_MODULES / "axe-core" / "axe.min.js"
CHROMIUM = os.environ.get("CHAT_CHROMIUM", "/usr/bin/chromium")


def require(available: bool, what: str) -> None:
    """Skip when a tool is missing on a laptop; fail in CI (CHAT_TEST_STRICT=1)."""
    if available:
        return
    if STRICT:
        pytest.fail(f"{what} is required when CHAT_TEST_STRICT=1")
    pytest.skip(f"{what} is not installed")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """chat.py processes started by the tests use a private cache, holding the pinned browser client
    when this checkout's node_modules has it, and never fetch anything: the npm registry they are
    given is a closed loopback port."""
    cache = tmp_path_factory.mktemp("chat-cache")
    if CLIENT_JS.is_file():
        shutil.copy(CLIENT_JS, cache / f"socket.io-{chat.CLIENT_JS_VERSION}.min.js")
    saved = {name: os.environ.get(name) for name in ("CHAT_ENV_DIR", "npm_config_registry")}
    os.environ.update(CHAT_ENV_DIR=str(cache), npm_config_registry=f"http://127.0.0.1:{free_port()}/")
    yield cache
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class Peer:
    """A python-socketio client that records every event it receives, per event name."""

    def __init__(self, sio: socketio.AsyncClient) -> None:
        self.sio = sio
        self.inbox: dict[str, asyncio.Queue[Any]] = collections.defaultdict(asyncio.Queue)

        @sio.on("*")
        async def _any(event: str, *args: Any) -> None:
            self.inbox[event].put_nowait(args[0] if len(args) == 1 else args)

    async def next(self, event: str, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.inbox[event].get(), timeout)

    async def take(self, event: str, count: int, timeout: float = 10.0) -> list[Any]:
        return [await self.next(event, timeout) for _ in range(count)]

    def pending(self, event: str) -> list[Any]:
        queue = self.inbox[event]
        return [queue.get_nowait() for _ in range(queue.qsize())]

    async def say(self, body: str, user: str = "Alice", **extra: Any) -> dict[str, Any]:
        return await self.sio.call("newmessage", {"user": user, "body": body, **extra}, timeout=10)

    async def join(self, room: str, user: str | None = None, **extra: Any) -> dict[str, Any]:
        payload = {"room": room, **extra}
        if user is not None:
            payload["user"] = user
        return await self.sio.call("join", payload, timeout=10)


StartChat = Callable[..., Awaitable[str]]
ONE_BROWSER = "test-browser-0123456789"  # the browser key the connect fixture's clients share
Connect = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def start_chat() -> AsyncIterator[StartChat]:
    """Start chat.py's real server in this event loop on a free port; returns its URL."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(client_note: str = "", **overrides: Any) -> str:
        settings = chat.Settings(**{"port": 0, **overrides})
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        task = asyncio.create_task(chat.serve(settings, ready=ready, stop=stop, client_note=client_note))
        running.append((stop, task))
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED, timeout=10)
        if task.done():  # it did not start: its error is the test's
            running.pop()
            task.result()
        return ready.result()

    yield start
    for stop, _ in running:
        stop.set()
    for _, task in running:
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def url(start_chat: StartChat) -> str:
    """A chat server with the shipped defaults, except no rate limit."""
    return await start_chat(rate=0)


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Connect python-socketio clients; all are disconnected at the end of the test."""
    peers: list[Peer] = []

    async def make(server_url: str, transports: list[str] | None = None, **kwargs: Any) -> Peer:
        # One browser, as far as names go, unless a test says otherwise: tests about other things
        # let several clients speak as "Alice".
        auth = kwargs.get("auth")
        if auth is None or isinstance(auth, dict):
            kwargs["auth"] = {"browser": ONE_BROWSER, **(auth or {})}
        peer = Peer(socketio.AsyncClient(reconnection=False))
        refusal: list[Any] = []
        peer.sio.on("connect_error", refusal.append)
        try:
            await peer.sio.connect(server_url, transports=transports or ["websocket"], wait_timeout=10, **kwargs)
        except socketio.exceptions.ConnectionError as exc:
            raise socketio.exceptions.ConnectionError(f"{exc}: {refusal}") from None
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        if peer.sio.connected:
            await peer.sio.disconnect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """chat.py's main() in this process, for a command line that ends before it serves (a bad file,
    a start-up error): its exit status and what it wrote to stderr. The stop signals main() sets
    aside on its way out, and the aiohttp logging it sets up, are put back for the next test."""
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    server_log, aiohttp_log = logging.getLogger("aiohttp.server"), logging.getLogger("aiohttp")
    filters, level = list(server_log.filters), aiohttp_log.level
    capsys.readouterr()
    try:
        code = chat.main(argv)
    finally:
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        server_log.filters[:] = filters
        aiohttp_log.setLevel(level)
    return code, capsys.readouterr().err


class LineReader:
    """Lines from a child process's pipe, read by a thread so that every wait has a deadline."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: Any) -> None:
        for line in pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first new line matching `pattern` within `timeout` seconds, or AssertionError."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got:\n{''.join(self.lines)[-3000:]}")

    def rest(self, timeout: float = 10.0) -> str:
        """Everything the process writes until it closes the pipe (or the deadline)."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


class ChatProcess:
    """chat.py run as a real process, as a user runs it; every read has a deadline."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None,
                 clean_env: bool = False, cwd: Path | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        base = {} if clean_env else dict(os.environ)
        self.proc = subprocess.Popen(
            command or [sys.executable, str(HERE / "chat.py"), *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**base, **(env or {})}, cwd=cwd, preexec_fn=preexec)
        self.stdout = LineReader(self.proc.stdout)
        self.stderr = LineReader(self.proc.stderr)
        self.banner = ""

    def wait_ready(self, timeout: float = 10.0) -> str:
        try:
            match = self.stdout.wait_for(r"(https?://\S+)", timeout)
        except AssertionError as exc:
            raise AssertionError(f"chat.py did not start: {exc}\nstderr: {self.stderr.rest(1)}") from None
        self.banner = match.string
        return match.group(1)

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.returncode, self.stdout.rest(), self.stderr.rest()


# ---------------------------------------------------------------- the tutorial's protocol


async def test_a_message_is_broadcast_to_every_client_including_the_sender(url: str, connect: Connect) -> None:
    alice, bob, carol = [await connect(url) for _ in range(3)]
    await alice.say("Good morning", user="Alice")
    for peer in (alice, bob, carol):
        msg = await peer.next("newmessage")
        assert msg["user"] == "Alice"
        assert msg["body"] == "Good morning"
        assert isinstance(msg["id"], int)
        assert isinstance(msg["ts"], int)


async def test_the_tutorial_client_payload_without_ack_or_join_works(url: str, connect: Connect) -> None:
    tutorial, other = await connect(url), await connect(url)
    await tutorial.sio.emit("newmessage", {"user": "Tut", "body": "plain emit"})
    msg = await other.next("newmessage")
    assert (msg["user"], msg["body"]) == ("Tut", "plain emit")
    assert msg["room"] == "lobby"


async def test_the_sender_gets_an_ack_with_id_and_server_time(url: str, connect: Connect) -> None:
    peer = await connect(url)
    before = int(time.time() * 1000)
    ack = await peer.say("hello?")
    assert ack["ok"] is True
    assert isinstance(ack["id"], int)
    assert before - 1000 <= ack["ts"] <= int(time.time() * 1000) + 1000
    msg = await peer.next("newmessage")
    assert (msg["id"], msg["ts"]) == (ack["id"], ack["ts"])


async def test_message_ids_increase(url: str, connect: Connect) -> None:
    peer = await connect(url)
    ids = [(await peer.say(f"m{i}"))["id"] for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5


async def test_bot_replies_follow_the_user_message_in_order(url: str, connect: Connect) -> None:
    alice, bob = await connect(url), await connect(url)
    await alice.say("hi, anyone here?", user="Alice")
    msg = await bob.next("newmessage")
    replies = await bob.take("botmessage", 2)
    assert [r["body"] for r in replies] == ["Hello, Alice!", "We will be right with you to answer your question."]
    assert all(r["user"] == "ChatFriend" for r in replies)
    assert msg["id"] < replies[0]["id"] < replies[1]["id"]


async def test_bot_asks_for_a_question_when_there_is_none(url: str, connect: Connect) -> None:
    peer = await connect(url)
    await peer.say("just saying")
    reply = await peer.next("botmessage")
    assert reply["body"] == "Did you have a question for us today?"


@pytest.mark.parametrize(("text", "greets"), [
    ("hi", True), ("Hello there", True), ("hey!", True), ("oh, HI.", True),
    ("this is it", False), ("which one", False), ("they said", False), ("shield", False), ("ohio", False),
])
async def test_keyword_bot_greets_only_on_whole_words(text: str, greets: bool) -> None:
    replies = await chat.KeywordBot().reply(chat.BotTurn("Ann", text, "lobby", "id"))
    assert (replies[0] == "Hello, Ann!") is greets
    assert len(replies) == (2 if greets else 1)


async def test_bot_off_sends_no_replies(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(bot="off", rate=0)
    peer = await connect(url)
    await peer.say("hi?")
    await peer.next("newmessage")
    await peer.say("second")  # the bot would have answered the first message before this one is stored
    await peer.next("newmessage")
    assert peer.pending("botmessage") == []


async def test_a_slow_bot_never_delays_chat_traffic(start_chat: StartChat, connect: Connect,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()

    async def slow_reply(self: Any, turn: chat.BotTurn) -> list[str]:
        await release.wait()
        return ["late"]

    monkeypatch.setattr(chat.KeywordBot, "reply", slow_reply)
    url = await start_chat(rate=0)
    peer = await connect(url)
    for body in ("one", "two", "three"):
        assert (await peer.say(body))["ok"]
    assert [m["body"] for m in await peer.take("newmessage", 3)] == ["one", "two", "three"]
    release.set()
    assert [r["body"] for r in await peer.take("botmessage", 3)] == ["late"] * 3


@pytest.mark.parametrize("transports", [["websocket"], ["polling"], ["polling", "websocket"]],
                         ids=["websocket-only", "polling-only", "polling-then-upgrade"])
async def test_every_transport_delivers(url: str, connect: Connect, transports: list[str]) -> None:
    sender = await connect(url, transports=transports)
    receiver = await connect(url, transports=transports)
    await sender.say("over " + "+".join(transports))
    assert (await receiver.next("newmessage"))["body"] == "over " + "+".join(transports)
    await wait_until(lambda: sender.sio.transport() == transports[-1])  # polling-then-upgrade: upgraded
    await sender.say("after the upgrade")
    assert (await receiver.next("newmessage"))["body"] == "after the upgrade"


@pytest.mark.parametrize("compress", [False, True])
async def test_websocket_compression_is_accepted_only_with_compress(start_chat: StartChat, compress: bool) -> None:
    url = await start_chat(compress=compress)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                  "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n").encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode().lower()
    writer.close()
    assert head.startswith("http/1.1 101")
    assert ("permessage-deflate" in head) == compress


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_event_loop_is_the_one_asked_for(loop: str) -> None:
    require(loop == "asyncio" or importlib.util.find_spec("uvloop") is not None, "uvloop")
    running: list[str] = []

    async def note_the_loop() -> None:
        running.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    chat.run_event_loop(note_the_loop(), chat.parse_settings(["--loop", loop]).loop)
    assert running == [loop]
    assert f"; {loop}; " in chat.banner(chat.Settings(loop=loop), "http://127.0.0.1:3000"), "the banner says which"


@pytest.mark.parametrize(("only", "other"), [("polling", "websocket"), ("websocket", "polling")])
async def test_one_transport_alone_refuses_the_other_and_tells_the_page(
        start_chat: StartChat, connect: Connect, only: str, other: str) -> None:
    url = await start_chat(transports=(only,), rate=0)
    peer = await connect(url, transports=[only])
    assert (await peer.say(f"over {only} only"))["ok"]
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(url, transports=[other])
    async with aiohttp.ClientSession() as http, http.get(url + "/") as resp:
        assert f'<meta name="chat-transports" content="{only}">' in await resp.text()


async def test_a_200_message_burst_over_polling_arrives_complete_and_in_order(url: str, connect: Connect) -> None:
    sender = await connect(url, transports=["polling"])
    receiver = await connect(url, transports=["polling"])
    for i in range(200):  # no awaiting acks: the client batches these into few large POSTs
        await sender.sio.emit("newmessage", {"user": "Burst", "body": f"#{i}"})
    received = await receiver.take("newmessage", 200, timeout=20)
    assert [m["body"] for m in received] == [f"#{i}" for i in range(200)]


async def test_fifty_clients_all_receive_one_broadcast(url: str, connect: Connect) -> None:
    peers = await asyncio.gather(*(connect(url) for _ in range(50)))
    await peers[0].say("to all fifty")
    bodies = await asyncio.gather(*(p.next("newmessage") for p in peers))
    assert {b["body"] for b in bodies} == {"to all fifty"}


# ---------------------------------------------------------------- HTTP


async def test_healthz_reports_status_and_client_and_room_counts(url: str, connect: Connect) -> None:
    await connect(url)
    await (await connect(url)).join("elsewhere")
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["status"] == "ok"
    assert (data["clients"], data["rooms"]) == (2, 2)


async def test_page_css_and_js_are_served(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for path, kind in (("/", "text/html"), ("/chat.css", "text/css"), ("/chat.js", "text/javascript")):
            async with http.get(url + path) as resp:
                assert resp.status == 200, path
                assert resp.content_type == kind
        async with http.get(url + "/") as resp:
            page = await resp.text()
    assert "<script>" not in page and "style=" not in page, "no inline script or style"
    assert '<label for="messageUser">Your name</label>' in page
    assert '<label for="messageBody">Your message</label>' in page


def sri_of(path: Path) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(path.read_bytes()).digest()).decode()


async def test_default_page_loads_the_pinned_client_from_the_cdn_with_integrity(url: str) -> None:
    require(CLIENT_JS.is_file(), f"the npm package socket.io-client ({CLIENT_JS})")
    async with aiohttp.ClientSession() as http, http.get(url + "/") as resp:
        page = await resp.text()
    tag = re.search(r'<script src="([^"]+)" integrity="([^"]+)" crossorigin="anonymous"></script>', page)
    assert tag, "the CDN script tag carries integrity and crossorigin"
    assert tag.group(1) == f"https://cdn.socket.io/{chat.CLIENT_JS_VERSION}/socket.io.min.js"
    package = json.loads((NODE_MODULES / "socket.io-client" / "package.json").read_text())
    assert package["version"] == chat.CLIENT_JS_VERSION
    assert tag.group(2) == sri_of(CLIENT_JS)


# ---------------------------------------------------------------- command line and process


def test_the_module_docstring_maps_the_sections_in_order() -> None:
    source = (HERE / "chat.py").read_text()
    listed = [re.split(r" --|;|,$", item)[0].strip() for item in re.findall(r"^\d+\. (.+)$", chat.__doc__ or "", re.M)]
    banners = re.findall(r"^# -{20,} (.+)$", source, re.M)
    assert len(listed) == len(banners) == 15
    for item, banner in zip(listed, banners, strict=True):
        assert banner.startswith(item.split(" (")[0].split(":")[0]), (item, banner)


def test_the_page_script_parses_and_has_no_duplicate_handlers(tmp_path: Path) -> None:
    node = shutil.which("node")
    require(node is not None, "Node.js")
    script = tmp_path / "chat.js"
    script.write_text(chat.page_script())
    checked = subprocess.run([node, "--check", str(script)], capture_output=True, text=True, timeout=20)
    assert checked.returncode == 0, checked.stderr
    handlers = re.findall(r"socket(?:\.io)?\.on\('([a-z_]+)'", chat.PAGE_JS)
    assert sorted(set(handlers)) == sorted(handlers), "one handler per socket event"
    assert "innerHTML" not in chat.PAGE_JS and "insertAdjacentHTML" not in chat.PAGE_JS


async def test_max_length_sets_the_limit_and_the_page_says_it(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off", max_length=10)
    peer = await connect(url)
    assert (await peer.say("x" * 10))["ok"]
    refused = await peer.say("x" * 11)
    assert (refused["code"], refused["error"]) == ("too_long", "Your message is too long (at most 10 characters).")
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert '<meta name="chat-max-length" content="10">' in await resp.text()


def test_help_explains_every_flag_and_the_readme_lists_each(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        chat.parse_settings(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    readme = (HERE / "README.md").read_text()
    flags = [flag for action in chat.build_parser()._actions for flag in action.option_strings
             if flag.startswith("--") and flag != "--help"]
    assert len(flags) >= 30
    for flag in flags:
        assert flag in out, f"{flag} missing from --help"
        assert f"`{flag}" in readme, f"{flag} missing from the README's table"


def readme_defaults() -> dict[str, str]:
    """The README's command-line table: flag -> its default as written there (backticks removed)."""
    section = (HERE / "README.md").read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    defaults = {}
    for row in re.findall(r"^\| (`--.*?) \| (.*?) \|", section, re.M):
        flags = re.findall(r"`(--[a-z-]+)", row[0])
        values = re.findall(r"`([^`]*)`", row[1]) or [""]  # prose ("none", "built-in page"): no value set
        for flag, value in zip(flags, values * len(flags) if len(values) == 1 else values, strict=False):
            defaults[flag] = value
    return defaults


def test_the_readme_states_each_default_as_settings_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "CHAT_PASSWORD", "CHAT_REDIS_URL", "CHAT_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    settings, parser = chat.parse_settings([]), chat.build_parser()
    dest = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    unset = {""}
    checked = 0
    for flag, written in readme_defaults().items():
        if flag in ("--version", "--tls-key", "--ping-timeout", "--burst"):
            continue  # no value; or the second of a pair, checked with the first below
        value = getattr(settings, dest[flag])
        if flag == "--bot-url":  # chosen by --bot when not given
            value = chat.DEFAULT_BOT_URLS[settings.bot if settings.bot in chat.DEFAULT_BOT_URLS else "rasa"]
        if written in unset:
            assert value in (None, (), False), f"{flag}: the README says {written!r}, Settings has {value!r}"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(written.split()[0]) == value, f"{flag}: README {written!r}, Settings {value!r}"
        else:
            shown = ",".join(value) if isinstance(value, tuple) else str(value)
            assert written.split(" (")[0].split(",") == shown.split(","), f"{flag}: README {written!r}, Settings {shown!r}"
        checked += 1
    assert checked >= 30
    assert (settings.burst, settings.ping_timeout) == (10, 20.0), "the README's `5` / `10` and `25` / `20`"


def bad_files(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Files named on the command line that chat.py refuses before starting (exit 2), and the line it prints."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    readme = HERE / "README.md"
    return {
        "client-js a directory": (["--client-js", str(tmp_path)], f"--client-js {tmp_path}: is a directory, not a file"),
        "client-js missing": (["--client-js", str(tmp_path / "nope.js")], f"--client-js {tmp_path / 'nope.js'}: no such file"),
        "client-js not the client": (["--client-js", str(readme)],
                                     f"--client-js {readme}: does not look like the Socket.IO client"),
        "tls key missing": (["--tls-cert", str(cert), "--tls-key", str(tmp_path / "nokey.pem")],
                            f"--tls-key {tmp_path / 'nokey.pem'}: no such file"),
        "tls swapped": (["--tls-cert", str(key), "--tls-key", str(cert)], "--tls-cert and --tls-key look swapped"),
        "tls not pem": (["--tls-cert", str(readme), "--tls-key", str(key)], f"--tls-cert {readme}: no PEM certificate"),
        "db is a directory": (["--db", str(tmp_path)], f"--db {tmp_path}: is a directory"),
    }


@pytest.mark.parametrize("name", ["client-js a directory", "client-js missing", "client-js not the client",
                                  "tls key missing", "tls swapped", "tls not pem", "db is a directory"])
def test_a_bad_file_is_refused_naming_the_flag_and_the_file(tmp_path: Path, name: str) -> None:
    args, expected = bad_files(tmp_path)[name]
    problem = chat.bad_file(chat.parse_settings(["--port", "0", *args]))
    assert problem is not None and problem.startswith(expected), problem


def test_a_bad_file_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--port", "0", "--db", str(tmp_path)], capsys) == (
        2, f"chat.py: --db {tmp_path}: is a directory; give a file name, e.g. {tmp_path / 'chat.db'}\n")


def test_loop_uvloop_without_uvloop_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` meets where it is not installed
    assert run_main(["--port", "0", "--loop", "uvloop"], capsys) == (
        1, "chat.py: --loop uvloop needs the uvloop package: pip install uvloop\n")


def test_a_port_in_use_prints_one_clear_line_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run_main(["--port", str(port)], capsys) == (1, f"chat.py: port {port} is in use; try --port {port + 1}\n")


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_the_banner_gives_an_address_to_open_and_says_what_is_in_use(
        start_chat: StartChat, tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str) -> None:
    db = tmp_path / "banner.db"
    url = await start_chat(host=host, db=db, password="pw")
    banner = capsys.readouterr().out
    assert url.startswith("http://127.0.0.1:") and banner.startswith(f"chat.py {chat.__version__}: {url}"), \
        "the first address in the banner can be opened here"
    async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as resp:
        assert resp.status == 200
    assert f"history in {db}" in banner and "password required" in banner
    assert "python-socketio" in banner and "bot: keyword" in banner
    if host == "0.0.0.0":
        assert "0.0.0.0" not in banner and "from others" in banner


async def test_the_port_environment_variable_is_honoured(start_chat: StartChat, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("PORT", str(port))
    settings = chat.parse_settings([])
    assert settings.port == port
    assert await start_chat(port=settings.port) == f"http://127.0.0.1:{port}"


@pytest.mark.slow
async def test_sigterm_with_clients_connected_exits_0_within_the_second_the_readme_promises(
        connect: Connect) -> None:
    proc = ChatProcess("--port", "0")
    try:
        url = proc.wait_ready()
        await connect(url)
        await connect(url, transports=["polling"])
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.proc.wait, 1.0)  # the deadline is the README's; it takes about 20 ms here
    finally:
        code, _, err = proc.stop()
    assert code == 0
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_exits_0_without_a_traceback() -> None:
    proc = ChatProcess("--port", "0")
    proc.wait_ready()
    proc.proc.send_signal(signal.SIGINT)
    proc.proc.wait(10)  # by itself: stop() would send SIGTERM to a process still shutting down
    code, _, err = proc.stop()
    assert code == 0
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_second_signal_while_stopping_still_exits_0() -> None:
    for _ in range(2):  # the window is short: twice
        proc = ChatProcess("--port", "0")
        proc.wait_ready()
        proc.proc.send_signal(signal.SIGINT)
        proc.stdout.wait_for("chat.py: stopped", 10)
        proc.proc.send_signal(signal.SIGTERM)  # systemd's, or a second Ctrl-C, as the process finishes
        code, _, err = proc.stop()
        assert code == 0 and "Traceback" not in err


def test_pep723_dependencies_equal_requirements_txt() -> None:
    header = re.search(r"^# /// script\n(.*?)^# ///$", (HERE / "chat.py").read_text(), re.S | re.M)
    assert header
    script_deps = set(re.findall(r'^#\s+"([^"]+)",?$', header.group(1), re.M))
    requirements = {line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")}
    assert script_deps == requirements


# ---------------------------------------------------------------- the browser client from this server


def client_tarball(body: bytes) -> bytes:
    """An npm package tarball of socket.io-client holding `body` as its dist/socket.io.min.js."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as package:
        info = tarfile.TarInfo("package/dist/socket.io.min.js")
        info.size = len(body)
        package.addfile(info, io.BytesIO(body))
    return out.getvalue()


class LoopbackFiles:
    """A web server on loopback answering GET with fixed bodies by path (404 otherwise), recording
    the paths asked for: a package index or npm registry for the tests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        served = self
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # close() waits one poll
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fake_registry(tarball: bytes) -> LoopbackFiles:
    """An npm registry with socket.io-client's tarball."""
    return LoopbackFiles({f"/socket.io-client/-/socket.io-client-{chat.CLIENT_JS_VERSION}.tgz": tarball})


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def start_as_main_does(start_chat: StartChat, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Find the browser client with main()'s own step (the cache, else one fetch), start the chat
    with it, and return its URL and banner."""
    settings, note = await asyncio.to_thread(chat.with_browser_client, chat.Settings())
    capsys.readouterr()
    url = await start_chat(client_js=settings.client_js, client_note=note)
    return url, capsys.readouterr().out


async def test_the_page_and_the_tutorials_path_are_served_the_cached_client_with_no_cdn_in_the_csp(
        start_chat: StartChat, capsys: pytest.CaptureFixture[str]) -> None:
    require(CLIENT_JS.is_file(), "socket.io-client in node_modules")
    url, banner = await start_as_main_does(start_chat, capsys)  # the tests' cache (offline_cache) holds the client
    status, headers, page = await asyncio.to_thread(fetch, url)
    assert status == 200
    assert b'<script src="/socket.io.min.js"></script>' in page
    assert "cdn" not in headers["Content-Security-Policy"] and "script-src 'self';" in \
        headers["Content-Security-Policy"]
    for path in ("/socket.io.min.js", "/socket.io/socket.io.js"):
        assert (await asyncio.to_thread(fetch, url + path))[2] == CLIENT_JS.read_bytes()
    assert "browser client served from here" in banner


async def test_the_client_is_fetched_once_from_the_registry_and_kept(
        start_chat: StartChat, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    require(CLIENT_JS.is_file(), "socket.io-client in node_modules")
    registry = fake_registry(client_tarball(CLIENT_JS.read_bytes()))
    monkeypatch.setenv("CHAT_ENV_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("npm_config_registry", registry.url)
    try:
        for start in ("first", "second"):
            url, banner = await start_as_main_does(start_chat, capsys)
            assert (await asyncio.to_thread(fetch, url + "/socket.io/socket.io.js"))[2] == CLIENT_JS.read_bytes(), start
            assert "browser client served from here" in banner
    finally:
        registry.close()
    assert len(registry.requests) == 1, "fetched on the first start only"
    assert (tmp_path / "cache" / f"socket.io-{chat.CLIENT_JS_VERSION}.min.js").read_bytes() == CLIENT_JS.read_bytes()


@pytest.mark.parametrize("served", ["a tampered client", "no registry"])
async def test_a_client_that_cannot_be_had_or_fails_its_hash_leaves_the_page_on_the_cdn(
        start_chat: StartChat, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, tmp_path: Path, served: str) -> None:
    registry = fake_registry(client_tarball(b"/*! Socket.IO v4.8.3 */ window.io = () => steal();"))
    monkeypatch.setenv("CHAT_ENV_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("npm_config_registry",
                       registry.url if served == "a tampered client" else f"http://127.0.0.1:{free_port()}/")
    try:
        url, banner = await start_as_main_does(start_chat, capsys)
        status, headers, page = await asyncio.to_thread(fetch, url)
    finally:
        registry.close()
    assert status == 200
    assert chat.CLIENT_JS_SRI.encode() in page and chat.CLIENT_JS_ORIGIN in headers["Content-Security-Policy"]
    assert f"browser client from {chat.CLIENT_JS_ORIGIN}, checked with SRI (could not fetch it from" \
        in banner, "the banner says where the client comes from, and why"
    if served == "a tampered client":
        assert "does not match the pinned hash" in banner
    said = capsys.readouterr().err + caplog.text
    assert "could not fetch" not in said and "Traceback" not in said, "said once, in the banner"
    assert not (tmp_path / "cache" / f"socket.io-{chat.CLIENT_JS_VERSION}.min.js").exists()


# ---------------------------------------------------------------- --static: the tutorial's own page


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory to serve with --static, with a file outside it that must never be served."""
    (tmp_path / "secret.txt").write_text("outside the site")
    root = tmp_path / "public"
    (root / "docs").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "index.html").write_text('<!doctype html><title>t</title><script>var inline = 1;</script>'
                                     '<button onclick="sendMessage()">Send</button><script src="./main.js"></script>')
    (root / "main.js").write_text("const sendMessage = () => {};\n")
    (root / "docs" / "index.html").write_text("<p>docs</p>")
    (root / ".env").write_text("SECRET=1")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    return root


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_static_serves_the_files_under_its_directory_and_nothing_else(start_chat: StartChat, site: Path) -> None:
    url = await start_chat(static=site)
    async with aiohttp.ClientSession() as http_client:
        async def get(path: str) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
            async with http_client.get(yarl.URL(url + path, encoded=True), allow_redirects=False) as response:
                return response.status, response.headers, await response.read()

        status, headers, body = await get("/")
        assert status == 200 and body == (site / "index.html").read_bytes()
        policy = headers["Content-Security-Policy"]
        assert f"'unsafe-hashes' {csp_hash('sendMessage()')}" in policy or \
            ("'unsafe-hashes'" in policy and csp_hash("sendMessage()") in policy), policy
        assert csp_hash("var inline = 1;") in policy and "'unsafe-inline'" not in policy.split("style-src")[0]
        assert headers["X-Content-Type-Options"] == "nosniff"
        status, headers, body = await get("/main.js")
        assert status == 200 and "javascript" in headers["Content-Type"]
        assert (await get("/docs"))[0] == 301 and (await get("/docs/"))[2] == b"<p>docs</p>"
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/docs/..%2f..%2fsecret.txt", "/escape", "/.env",
                     "/empty/", "/missing.html"):
            assert (await get(path))[0] == 404, path
        assert (await get("/healthz"))[0] == 200, "chat.py's own paths still answer"


def tutorial_public(into: Path) -> Path:
    """The tutorial's public/ folder, built from the tutorial's own text (the seed), unchanged."""
    seeds = sorted((HERE.parent / "shared" / "seed").glob("*.txt")) if (HERE.parent / "shared" / "seed").is_dir() \
        else []
    text = "\n".join(seed.read_text(encoding="utf-8") for seed in seeds)
    files = re.findall(r'```file \{title="socket-example/public/([^"]+)"[^}]*\}\n(.*?)\n[ \t]*```', text, re.S)
    if {name for name, _ in files} != {"index.html", "main.js", "main.css"}:
        pytest.skip("the tutorial's text (../shared/seed) is not next to this checkout")
    into.mkdir()
    for name, block in files:
        lines = block.splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        (into / name).write_text("\n".join(line[indent:] for line in lines) + "\n")
    return into


@pytest.mark.browser
async def test_the_tutorials_page_works_unchanged_with_static(start_chat: StartChat, open_page: OpenPage,
                                                              tmp_path: Path) -> None:
    require(CLIENT_JS.is_file(), "socket.io-client in node_modules")
    url = await start_chat(static=tutorial_public(tmp_path / "public"), client_js=CLIENT_JS)
    alice = await open_page(url, wait_connected=False)
    bob = await open_page(url, wait_connected=False)
    for tab in (alice, bob):
        await tab.page.wait_for_function("window.socket && socket.connected", timeout=10000)
    await alice.page.fill("#messageUser", "Alice")
    await alice.page.fill("#messageBody", "hello from the tutorial's page?")
    await alice.page.click("#send")  # its inline onclick="sendMessage()", allowed by hash
    for tab in (alice, bob):
        items = tab.page.locator("#messageField li")
        await items.filter(has_text="Alice: hello from the tutorial's page?").wait_for(timeout=10000)
        await tab.page.locator("#messageField li.botMessage").filter(has_text="ChatFriend:").first.wait_for()
        assert await alice.page.input_value("#messageBody") == ""


# ---------------------------------------------------------------- command line, checked together


async def test_a_message_of_the_longest_allowed_length_fits_in_one_frame(start_chat: StartChat,
                                                                        connect: Connect) -> None:
    url = await start_chat(rate=0, max_length=100_000, bot="off")
    sender, reader = await connect(url, transports=["websocket"]), await connect(url, transports=["websocket"])
    body = "\U0001f600" * 70_000  # 12 bytes each in python-socketio's JSON: 840 KB
    assert (await sender.say(body))["ok"]
    assert (await reader.next("newmessage"))["body"] == body


async def test_a_frame_over_the_limit_is_closed_as_too_big_and_logged_once(
        start_chat: StartChat, caplog: pytest.LogCaptureFixture) -> None:
    url = await start_chat()
    for _ in range(3):
        client = await RawClient.open(url)
        client.send('42["newmessage",{"user":"Big","body":"' + "x" * 70_000 + '"}]')
        with pytest.raises(ConnectionResetError, match="closed by the server: 1009"):
            while True:
                await client.receive()
        client.abort()
    lines = [r.getMessage() for r in caplog.records if "over the" in r.getMessage()]
    assert len(lines) == 1 and f"a frame over the {chat.Settings().frame_limit} byte limit (see --max-length)" \
        in lines[0]


def usage_error(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                env: dict[str, str] | None = None) -> str:
    """What parse_settings prints for bad usage (asserting exit status 2 and a single line)."""
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        chat.parse_settings(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(" (chat.py --help lists the options)\n"), err
    assert err.startswith("chat.py: ") and "usage:" not in err
    return err


BAD_USAGE = {  # arguments, environment -> what the one line says
    "port not a number": (["--port", "eighty"], {}, "argument --port: not a port number: 'eighty'"),
    "port out of range": (["--port", "70000"], {}, "argument --port: port must be 0-65535, got 70000"),
    "PORT not a number": ([], {"PORT": "abc"}, "the PORT environment variable: not a port number: 'abc'"),
    "unknown bot": (["--bot", "magic"], {}, "argument --bot: invalid choice: 'magic'"),
    "history 0": (["--history", "0"], {}, "argument --history: must be at least 1, got 0"),
    "context not a number": (["--bot-context", "abc"], {}, "argument --bot-context: not a whole number: 'abc'"),
    "negative rate": (["--rate", "-1"], {}, "argument --rate: must be 0 or more, got -1"),
    "negative timeout": (["--bot-timeout", "-5"], {}, "argument --bot-timeout: must be a number above 0, got -5"),
    "zero timeout": (["--bot-timeout", "0"], {}, "argument --bot-timeout: must be a number above 0, got 0"),
    "empty bot name": (["--bot-name", ""], {}, "--bot-name: must not be empty"),
    "long bot name": (["--bot-name", "B" * 33], {}, "--bot-name: the bot's name is too long (at most 32 characters)"),
    "origin with a slash": (["--allow-origin", "http://host:5742/"], {},
                            "not an origin: 'http://host:5742/'; without the trailing slash: http://host:5742"),
    "origin without scheme": (["--allow-origin", "notanorigin"], {}, "not an origin: 'notanorigin' (an origin is"),
    "unknown flag": (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    "cert without key": (["--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key must be given together"),
    "db with redis": (["--db", "x.db", "--redis", "redis://127.0.0.1:1/0"], {}, "--db and --redis cannot be combined"),
    "redis not a URL": (["--redis", "localhost:6379"], {}, "--redis must be a redis://, rediss:// or unix:// URL"),
    "CHAT_REDIS_URL not a URL": ([], {"CHAT_REDIS_URL": "localhost"}, "--redis must be a redis://"),
    "rules without keyword": (["--bot", "rasa", "--bot-rules", "r.json"], {}, "--bot-rules applies to --bot keyword"),
    "bot url not http": (["--bot-url", "ftp://x"], {}, "--bot-url must be an http:// or https:// URL"),
    "zero ping interval": (["--ping-interval", "0"], {}, "argument --ping-interval: must be a number above 0, got 0"),
    "empty password flag": (["--password", ""], {}, "--password is empty; leave it unset for no password"),
    "empty CHAT_PASSWORD": ([], {"CHAT_PASSWORD": ""},
                            "the CHAT_PASSWORD environment variable is empty; leave it unset for no password"),
    "empty CHAT_REDIS_URL": ([], {"CHAT_REDIS_URL": " "},
                             "the CHAT_REDIS_URL environment variable is empty; leave it unset for no Redis"),
    "max-length too long": (["--max-length", "100001"], {}, "argument --max-length: at most 100000 characters"),
    "static not a directory": (["--static", "/nonexistent/public"], {}, "--static /nonexistent/public: no such directory"),
}


@pytest.mark.parametrize("case", BAD_USAGE.values(), ids=BAD_USAGE.keys())
def test_bad_usage_exits_2_with_one_clear_line(case: tuple[list[str], dict[str, str], str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args, env, expected = case
    assert expected in usage_error(args, monkeypatch, capsys, env)


@pytest.mark.slow
def test_bad_usage_from_the_real_command_is_one_line_and_exit_2() -> None:
    result = subprocess.run([sys.executable, str(HERE / "chat.py"), "--port", "eighty"], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr == ("chat.py: argument --port: not a port number: 'eighty' "
                             "(chat.py --help lists the options)\n")


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        chat.parse_settings(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"chat.py {chat.__version__}\n"


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PASSWORD", "open sesame")
    monkeypatch.setenv("CHAT_REDIS_URL", "redis://:s3cret@127.0.0.1:6379/0")
    settings = chat.parse_settings([])
    assert settings.password == "open sesame" and settings.redis == "redis://:s3cret@127.0.0.1:6379/0"
    assert chat.parse_settings(["--redis", "redis://127.0.0.1:1/0"]).redis == "redis://127.0.0.1:1/0", \
        "a flag wins over the environment"


@pytest.mark.redis
async def test_two_nodes_find_redis_from_chat_redis_url_and_keep_it_out_of_ps(
        redis_server: RedisServer, chat_process: Any, connect: Connect) -> None:
    node_a, url_a = chat_process("--bot", "off", env={"CHAT_REDIS_URL": redis_server.url})
    node_b, url_b = chat_process("--bot", "off", env={"CHAT_REDIS_URL": redis_server.url})
    ann, bob = await connect(url_a), await connect(url_b)
    await ann.say("across nodes", user="Ann")
    assert (await bob.next("newmessage"))["body"] == "across nodes"
    for node in (node_a, node_b):
        assert redis_server.url.encode() not in Path(f"/proc/{node.proc.pid}/cmdline").read_bytes()
        assert "history shared through Redis" in node.banner


@pytest.mark.slow
def test_a_hang_up_stops_the_chat_like_ctrl_c() -> None:
    proc = ChatProcess("--port", "0")
    proc.wait_ready()
    proc.proc.send_signal(signal.SIGHUP)  # ssh without -t, or a closed terminal
    assert proc.proc.wait(10) == 0
    assert "chat.py: stopped" in proc.stdout.rest()


# ---------------------------------------------------------------- people: names held, private messages


def browser_auth(name: str) -> dict[str, str]:
    """The auth payload of a browser of its own (the page keeps such a key in localStorage)."""
    return {"browser": f"test-browser-of-{name}"[:64].ljust(16, "x")}


@pytest.mark.parametrize("spelling", ["Alice", "alice ", "ALICE", "Al\u200bice", "\u0410lice"])
async def test_a_name_in_use_cannot_be_taken_by_another_browser(
        start_chat: StartChat, connect: Connect, spelling: str) -> None:
    url = await start_chat(rate=0)
    alice = await connect(url, auth=browser_auth("alice"))
    assert (await alice.join("lobby", user="Alice"))["ok"]
    mallory = await connect(url, auth=browser_auth("mallory"))
    refused = await mallory.join("elsewhere", user=spelling)
    assert refused["ok"] is False and refused["code"] == "name_taken"
    said = await mallory.say("I resign, pay Mallory", user=spelling)
    assert said["code"] == "name_taken"
    second_tab = await connect(url, auth=browser_auth("alice"))
    assert (await second_tab.join("lobby", user="Alice"))["ok"], "the same browser's other tab may"


async def test_a_name_is_held_through_its_grace_period_then_free(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, name_grace=0.5)
    alice = await connect(url, auth=browser_auth("alice"))
    await alice.join("lobby", user="Alice")
    await alice.sio.disconnect()
    bob = await connect(url, auth=browser_auth("bob"))
    assert (await bob.join("lobby", user="Alice"))["code"] == "name_taken", "a reload must not lose the name"
    back = await connect(url, auth=browser_auth("alice"))
    assert (await back.join("lobby", user="Alice"))["ok"], "its own browser gets it back"
    await back.sio.disconnect()
    await asyncio.sleep(0.7)  # the grace period itself: nothing to await
    assert (await bob.join("lobby", user="Alice"))["ok"]


async def test_renaming_frees_the_old_name_after_the_grace(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, name_grace=0)
    bob = await connect(url, auth=browser_auth("bob"))
    await bob.join("lobby", user="Bob")
    await bob.join("lobby", user="Bobby")
    carol = await connect(url, auth=browser_auth("carol"))
    assert (await carol.join("lobby", user="Bob"))["ok"]
    assert (await carol.join("lobby", user="Bobby"))["code"] == "name_taken"


async def test_a_private_message_reaches_only_the_person_and_the_sender(start_chat: StartChat,
                                                                       connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off")
    alice_1, alice_2 = await connect(url, auth=browser_auth("alice")), await connect(url, auth=browser_auth("alice"))
    bob, carol = await connect(url, auth=browser_auth("bob")), await connect(url, auth=browser_auth("carol"))
    dave = await connect(url, auth=browser_auth("dave"))
    for peer, name, room in ((alice_1, "Alice", "lobby"), (alice_2, "Alice", "other"), (bob, "Bob", "lobby"),
                             (carol, "Carol", "lobby"), (dave, "Dave", "other")):
        assert (await peer.join(room, user=name))["ok"]
    ack = await bob.sio.call("private", {"to": "alice", "body": "psst, surprise party for Bob"}, timeout=10)
    assert ack["ok"] is True
    for peer in (alice_1, alice_2, bob):
        got = await peer.next("private")
        assert (got["from"], got["to"], got["body"]) == ("Bob", "alice", "psst, surprise party for Bob")
    await carol.say("marker", user="Carol")
    await dave.say("marker", user="Dave")
    await carol.next("newmessage")
    await dave.next("newmessage")
    assert carol.pending("private") == [] and dave.pending("private") == []
    assert carol.pending("newmessage") == []
    replay = await carol.join("lobby", since=0)
    assert all("surprise" not in m["body"] for m in replay["history"]), "never in history"
    missing = await bob.sio.call("private", {"to": "Zed", "body": "hello?"}, timeout=10)
    assert missing["ok"] is False and missing["code"] == "not_online"


async def test_private_messages_share_the_rate_limit_and_the_flood_timeout(start_chat: StartChat,
                                                                          connect: Connect) -> None:
    url = await start_chat(rate=1, burst=2, flood_timeout=0.3, bot="off")
    bob, ann = await connect(url, auth=browser_auth("bob")), await connect(url, auth=browser_auth("ann"))
    await bob.join("lobby", user="Bob")
    await ann.join("lobby", user="Ann")
    gone = asyncio.Event()
    bob.sio.on("disconnect", lambda *args: gone.set())
    refused = []
    async with asyncio.timeout(5):
        while not gone.is_set():
            try:
                ack = await bob.sio.call("private", {"to": "Ann", "body": "spam"}, timeout=1)
            except (socketio.exceptions.TimeoutError, socketio.exceptions.BadNamespaceError):
                break  # disconnected while this one was on its way
            refused += [ack] if not ack["ok"] else []
            await asyncio.sleep(0.02)  # faster than one a second, for longer than the flood timeout
        await gone.wait()
    assert refused and all(r["code"] == "rate_limited" and r["retry_after_ms"] > 0 for r in refused)


async def test_a_private_message_to_the_bot_gets_a_private_answer(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0)
    bob, carol = await connect(url, auth=browser_auth("bob")), await connect(url, auth=browser_auth("carol"))
    await bob.join("lobby", user="Bob")
    await carol.join("lobby", user="Carol")
    assert (await bob.sio.call("private", {"to": "ChatFriend", "body": "hello there"}, timeout=10))["ok"]
    mine = await bob.next("private")
    answer = await bob.next("private")
    assert mine["body"] == "hello there" and answer["from"] == "ChatFriend" and answer["to"] == "Bob"
    assert answer["body"] == "Hello, Bob!"
    await carol.say("marker", user="Carol")
    await carol.next("newmessage")
    assert carol.pending("private") == []


@pytest.mark.parametrize("mode", ["mentions", "auto"])
async def test_the_bot_can_speak_only_when_spoken_to(start_chat: StartChat, connect: Connect, mode: str) -> None:
    url = await start_chat(rate=0, bot_replies=mode)
    ann, bob = await connect(url, auth=browser_auth("ann")), await connect(url, auth=browser_auth("bob"))
    await ann.join("lobby", user="Ann")
    if mode == "auto":
        await ann.say("alone here, hello?", user="Ann")
        alone = await ann.take("botmessage", 2)
        assert alone[0]["body"] == "Hello, Ann!", "alone: the bot keeps you company"
    await bob.join("lobby", user="Bob")
    await ann.say("@Bob can you bring the snacks?", user="Ann")
    await ann.say("@ChatFriend hello", user="Ann")
    assert (await ann.next("botmessage"))["body"] == "Hello, Ann!", "the first reply is to the mention, not to Bob's"
    assert (await ann.next("botmessage"))["body"] == "Did you have a question for us today?"
    await ann.say("chatfriend, are you there?", user="Ann")
    assert (await ann.next("botmessage"))["body"] == "We will be right with you to answer your question."


def test_mentions_are_found_by_the_name_key() -> None:
    for body in ("@ChatFriend hi", "hi @chatfriend!", "ChatFriend: help", "chat friend, hello", "@Chat Friend yo"):
        assert chat.mentions(body, "ChatFriend"), body
    for body in ("@Bob snacks?", "my chatfriendly neighbour", "email me@chatfriend.example"):
        assert not chat.mentions(body, "ChatFriend"), body


@pytest.mark.redis
async def test_names_and_private_messages_work_across_nodes(nodes: Any, connect: Connect) -> None:
    url_a, url_b = two_nodes(nodes)
    alice, bob = await connect(url_a, auth=browser_auth("alice")), await connect(url_b, auth=browser_auth("bob"))
    assert (await alice.join("lobby", user="Alice"))["ok"]
    mallory = await connect(url_b, auth=browser_auth("mallory"))
    assert (await mallory.join("lobby", user="alice"))["code"] == "name_taken", "held on every node"
    await bob.join("lobby", user="Bob")
    assert (await bob.sio.call("private", {"to": "Alice", "body": "across nodes"}, timeout=10))["ok"]
    assert (await alice.next("private"))["body"] == "across nodes"
    assert (await bob.next("private"))["body"] == "across nodes"


# ---------------------------------------------------------------- moderation: a host who can act

ADMIN = "moderator-password-for-tests"


async def people(connect: Connect, *seats: tuple[str, str]) -> list[Peer]:
    """One person per (name, server URL), each in their own browser and in the lobby under that
    name; the first is logged in as a moderator (the server has ADMIN as its moderator password)."""
    joined = []
    for name, url in seats:
        peer = await connect(url, auth=browser_auth(name.lower()))
        assert (await peer.join("lobby", user=name))["ok"]
        joined.append(peer)
    assert (await joined[0].sio.call("login", {"password": ADMIN}, timeout=10)) == {"ok": True, "moderator": True}
    return joined


async def room_of_three(start_chat: StartChat, connect: Connect, **settings: Any) -> tuple[Peer, Peer, Peer]:
    """A moderator (Mod, logged in), Bob and Carol in the lobby of a fresh chat."""
    url = await start_chat(rate=0, bot="off", admin_password=ADMIN, **settings)
    mod, bob, carol = await people(connect, ("Mod", url), ("Bob", url), ("Carol", url))
    return mod, bob, carol


async def moderate(peer: Peer, action: str, **fields: Any) -> dict[str, Any]:
    return await peer.sio.call("moderate", {"action": action, **fields}, timeout=10)


async def until_removed(peer: Peer) -> dict[str, Any]:
    """The page's notice of removal, then the server closing the connection."""
    notice = await peer.next("removed")
    async with asyncio.timeout(5):
        while peer.sio.connected:
            await asyncio.sleep(0.02)
    return notice


async def test_a_moderator_logs_in_with_the_password_from_the_environment_and_wears_a_badge(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off", admin_password=ADMIN)
    mod, bob = await connect(url, auth=browser_auth("mod")), await connect(url, auth=browser_auth("bob"))
    await mod.join("lobby", user="Mod")
    await bob.join("lobby", user="Bob")
    wrong = await mod.sio.call("login", {"password": "guess"}, timeout=10)
    assert (wrong["ok"], wrong["code"]) == (False, "wrong_password")
    assert (await mod.sio.call("login", {"password": ADMIN}, timeout=10))["ok"]
    while (roster := await bob.next("presence"))["moderators"] != ["Mod"]:
        pass
    assert roster["members"] == ["Bob", "Mod"]
    assert (await bob.join("lobby", user="Bob"))["moderators"] == ["Mod"]
    without = await start_chat(rate=0, bot="off")
    nobody = await connect(without)
    assert (await nobody.sio.call("login", {"password": ADMIN}, timeout=10))["code"] == "no_moderators"


async def test_moderator_passwords_are_limited_like_the_chat_password(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off", admin_password=ADMIN, trust_proxy=True)
    guesser = await connect(url, headers={"X-Forwarded-For": "203.0.113.9"})
    codes = []
    for i in range(7):
        codes.append((await guesser.sio.call("login", {"password": f"guess {i}"}, timeout=10))["code"])
    assert codes == ["wrong_password"] * 5 + ["too_many_attempts"] * 2


async def test_a_non_moderator_is_refused_every_moderator_command(start_chat: StartChat, connect: Connect) -> None:
    mod, bob, carol = await room_of_three(start_chat, connect)
    sent = await mod.say("by the moderator", user="Mod")
    for action, fields in (("kick", {"name": "Carol"}), ("ban", {"name": "Carol"}), ("mute", {"name": "Carol"}),
                           ("unban", {"name": "Carol"}), ("unmute", {"name": "Carol"}), ("clear", {}),
                           ("lock", {}), ("unlock", {}), ("slow", {"seconds": 5}), ("delete", {"id": sent["id"]})):
        refused = await moderate(bob, action, **fields)
        assert (refused["ok"], refused["code"]) == (False, "not_allowed"), action
    assert carol.sio.connected and (await carol.say("still here", user="Carol"))["ok"]


async def test_kick_closes_every_connection_of_the_name_and_says_why(start_chat: StartChat, connect: Connect) -> None:
    mod, bob, carol = await room_of_three(start_chat, connect)
    url = mod.sio.connection_url
    bob_elsewhere = await connect(url, auth=browser_auth("bob"))
    await bob_elsewhere.join("other", user="Bob")
    assert (await moderate(mod, "kick", name="bob", reason="enough spam"))["ok"]
    for tab in (bob, bob_elsewhere):
        notice = await until_removed(tab)
        assert notice["code"] == "kicked" and "enough spam" in notice["error"]
    while (line := await carol.next("system"))["kind"] != "moderation":
        pass
    assert line["text"] == "Mod removed Bob: enough spam"
    assert carol.sio.connected
    back = await connect(url, auth=browser_auth("bob"))
    assert (await back.join("lobby", user="Bob"))["ok"], "a kick is not a ban: coming back is allowed"


async def test_ban_keeps_the_browser_and_the_name_out_until_it_ends(start_chat: StartChat, connect: Connect) -> None:
    mod, bob, carol = await room_of_three(start_chat, connect)
    url = mod.sio.connection_url
    assert (await moderate(mod, "ban", name="Bob", minutes=0.01))["ok"]  # 0.6 s
    assert (await until_removed(bob))["code"] == "banned"
    assert carol.sio.connected, "only the banned person is removed"
    with pytest.raises(socketio.exceptions.ConnectionError, match="banned"):
        await connect(url, auth=browser_auth("bob"))
    other_browser = await connect(url, auth=browser_auth("bob's phone"))
    assert (await other_browser.join("lobby", user="BOB"))["code"] == "banned", "nor under the banned name"
    await asyncio.sleep(0.7)  # the ban's own length: nothing to await
    assert (await (await connect(url, auth=browser_auth("bob"))).join("lobby", user="Bob"))["ok"]


async def test_a_ban_covers_the_address_the_proxy_names_and_can_be_lifted(start_chat: StartChat,
                                                                         connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off", admin_password=ADMIN, trust_proxy=True)

    async def person(name: str, address: str) -> Peer:
        return await connect(url, auth=browser_auth(name), headers={"X-Forwarded-For": address})

    mod = await person("mod", "198.51.100.1")
    await mod.join("lobby", user="Mod")
    await mod.sio.call("login", {"password": ADMIN}, timeout=10)
    spammer = await person("spammer", "203.0.113.66")
    await spammer.join("lobby", user="Spammer")
    assert (await moderate(mod, "ban", name="Spammer"))["ok"]
    await until_removed(spammer)
    with pytest.raises(socketio.exceptions.ConnectionError, match="banned"):
        await person("new browser", "203.0.113.66")
    assert (await person("neighbour", "203.0.113.67")).sio.connected, "another address is not banned"
    assert (await moderate(mod, "unban", name="spammer"))["ok"]
    assert (await person("spammer", "203.0.113.66")).sio.connected


async def test_mute_refuses_messages_with_muted_until_unmuted(start_chat: StartChat, connect: Connect) -> None:
    mod, bob, carol = await room_of_three(start_chat, connect)
    assert (await moderate(mod, "mute", name="Bob", minutes=10))["ok"]
    refused = await bob.say("let me speak", user="Bob")
    assert (refused["ok"], refused["code"]) == (False, "muted")
    assert (await bob.sio.call("private", {"to": "Carol", "body": "psst"}, timeout=10))["code"] == "muted"
    assert (await moderate(mod, "unmute", name="Bob"))["ok"]
    assert (await bob.say("thank you", user="Bob"))["ok"]
    assert (await carol.say("nobody else was muted", user="Carol"))["ok"]
    assert (await moderate(mod, "mute", name="Bob", minutes=-1))["code"] == "bad_minutes"


async def test_a_deleted_message_leaves_every_page_and_the_history(start_chat: StartChat, connect: Connect) -> None:
    mod, bob, carol = await room_of_three(start_chat, connect)
    spam = await bob.say("SPAM", user="Bob")
    mine = await carol.say("oops, wrong room", user="Carol")
    assert (await moderate(bob, "delete", id=mine["id"]))["code"] == "not_allowed", "not someone else's"
    assert (await moderate(carol, "delete", id=mine["id"]))["ok"], "one's own, yes"
    assert (await moderate(mod, "delete", id=spam["id"]))["ok"]
    for peer in (mod, bob, carol):
        assert [d["id"] for d in await peer.take("deleted", 2)] == [mine["id"], spam["id"]]
    rejoined = await (await connect(mod.sio.connection_url)).join("lobby")
    assert rejoined["history"] == [] and rejoined["deleted"] == [mine["id"], spam["id"]]
    assert (await moderate(mod, "delete", id=spam["id"]))["code"] == "not_found"


async def test_clear_lock_and_slow_mode(start_chat: StartChat, connect: Connect) -> None:
    mod, bob, carol = await room_of_three(start_chat, connect)
    await bob.say("one", user="Bob")
    last = await bob.say("two", user="Bob")
    assert (await moderate(mod, "clear"))["ok"]
    assert (await carol.next("cleared"))["upto"] >= last["id"]
    assert (await carol.join("lobby", user="Carol"))["history"] == []
    assert (await moderate(mod, "lock"))["ok"]
    assert (await bob.say("hello?", user="Bob"))["code"] == "room_locked"
    assert (await mod.say("the room is locked for a minute", user="Mod"))["ok"], "moderators may post"
    assert (await carol.join("lobby", user="Carol"))["locked"] is True
    assert (await moderate(mod, "unlock"))["ok"]
    assert (await moderate(mod, "slow", seconds=30))["ok"]
    assert (await bob.say("first", user="Bob"))["ok"]
    again = await bob.say("second", user="Bob")
    assert again["code"] == "slow_mode" and 29_000 < again["retry_after_ms"] <= 30_000
    assert (await carol.say("each person has their own interval", user="Carol"))["ok"]


@pytest.mark.slow
async def test_bans_deletions_and_held_names_survive_a_restart_with_db(tmp_path: Path, connect: Connect) -> None:
    db, port = tmp_path / "chat.db", free_port()
    env = {"CHAT_ADMIN_PASSWORD": ADMIN}
    first = ChatProcess("--port", str(port), "--db", str(db), "--rate", "0", "--bot", "off", env=env)
    try:
        url = first.wait_ready()
        mod, bob, alice = await people(connect, ("Mod", url), ("Bob", url), ("Alice", url))
        spam = await bob.say("SPAM", user="Bob")
        await alice.say("kept", user="Alice")
        assert (await moderate(mod, "delete", id=spam["id"]))["ok"]
        assert (await moderate(mod, "ban", name="Bob"))["ok"]
        await until_removed(bob)
    finally:
        assert first.stop()[0] == 0
    second = ChatProcess("--port", str(port), "--db", str(db), "--rate", "0", "--bot", "off", env=env)
    try:
        url = second.wait_ready()
        with pytest.raises(socketio.exceptions.ConnectionError, match="banned"):
            await connect(url, auth=browser_auth("bob"))
        mallory = await connect(url, auth=browser_auth("mallory"))
        assert (await mallory.join("lobby", user="Alice"))["code"] == "name_taken", "held across the restart"
        ack = await (await connect(url, auth=browser_auth("alice"))).join("lobby", user="Alice")
        assert ack["ok"] and [m["body"] for m in ack["history"]] == ["kept"] and spam["id"] in ack["deleted"]
    finally:
        assert second.stop()[0] == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE body = 'SPAM'").fetchone()[0] == 0


@pytest.mark.redis
async def test_moderation_reaches_every_node(nodes: Any, connect: Connect) -> None:
    url_a, url_b = two_nodes(nodes, env={"CHAT_ADMIN_PASSWORD": ADMIN})
    mod, bob, carol = await people(connect, ("Mod", url_a), ("Bob", url_b), ("Carol", url_b))
    spam = await bob.say("SPAM on node B", user="Bob")
    assert (await moderate(mod, "delete", id=spam["id"]))["ok"]
    assert (await carol.next("deleted"))["id"] == spam["id"]
    assert (await (await connect(url_b)).join("lobby"))["history"] == [], "gone from the shared history"
    assert (await moderate(mod, "mute", name="Carol"))["ok"]
    async with asyncio.timeout(10):  # the other node hears of it through Redis
        while (await carol.say("muted?", user="Carol"))["ok"]:
            await asyncio.sleep(0.1)
    assert (await moderate(mod, "ban", name="Bob"))["ok"]
    assert (await until_removed(bob))["code"] == "banned"
    async with asyncio.timeout(10):  # node B banned Bob's browser; node A hears of it through Redis
        while True:
            try:
                await (await connect(url_a, auth=browser_auth("bob"))).sio.disconnect()
            except socketio.exceptions.ConnectionError as exc:
                assert "banned" in str(exc)
                break
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- presence: watchers and renames


async def test_pages_without_a_name_are_counted_as_watching(url: str, connect: Connect) -> None:
    watchers = [await connect(url, auth=browser_auth(f"w{i}")) for i in range(3)]
    ann = await connect(url, auth=browser_auth("ann"))
    ack = await ann.join("lobby", user="Ann")
    assert (ack["members"], ack["watching"]) == (["Ann"], 3)
    await watchers[0].sio.disconnect()
    while (roster := await ann.next("presence"))["watching"] != 2:
        pass
    assert roster["members"] == ["Ann"]


async def test_a_rename_is_one_line_and_one_list(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off", presence_grace=30)
    bob, carol = await connect(url, auth=browser_auth("bob")), await connect(url, auth=browser_auth("carol"))
    await bob.join("lobby", user="Bob")
    await carol.join("lobby", user="Carol")
    carol.pending("presence"), carol.pending("system")
    await bob.join("lobby", user="Bobby")
    line = await carol.next("system")
    assert (line["kind"], line["text"]) == ("renamed", "Bob is now Bobby")
    while (roster := await carol.next("presence"))["members"] != ["Bobby", "Carol"]:
        assert "Bob" not in roster["members"] or "Bobby" not in roster["members"], "never both names"
    await carol.say("marker", user="Carol")
    await carol.next("newmessage")
    assert carol.pending("system") == []


# ---------------------------------------------------------------- reading: older history and search


@pytest.mark.parametrize("backend", ["memory", "db"])
async def test_older_messages_load_page_by_page_past_the_first_page(start_chat: StartChat, connect: Connect,
                                                                    tmp_path: Path, backend: str) -> None:
    db = {"db": tmp_path / "h.db"} if backend == "db" else {}
    url = await start_chat(rate=0, bot="off", history=120 if backend == "memory" else 20, **db)
    peer = await connect(url)
    ids = [(await peer.say(f"line {i}"))["id"] for i in range(110)]
    first = await (await connect(url)).join("lobby")
    assert [m["id"] for m in first["history"]] == ids[-chat.RECENT_PAGE:] if backend == "memory" else ids[-20:]
    seen, before = [m["id"] for m in first["history"]], first["history"][0]["id"]
    while True:
        page = await peer.sio.call("history", {"before": before, "limit": 30}, timeout=10)
        assert page["ok"] and len(page["history"]) <= 30
        seen = [m["id"] for m in page["history"]] + seen
        if not page["more"]:
            break
        before = page["history"][0]["id"]  # (four pages: within the request rate's burst)
    assert seen == ids, "every message, each once, in order"
    too_big = await peer.sio.call("history", {"before": before, "limit": 500}, timeout=10)
    assert too_big["code"] == "bad_limit"


@pytest.mark.parametrize("backend", ["memory", "db"])
async def test_search_finds_the_rooms_messages_with_every_word(start_chat: StartChat, connect: Connect,
                                                               tmp_path: Path, backend: str) -> None:
    db = {"db": tmp_path / "s.db"} if backend == "db" else {}
    url = await start_chat(rate=0, bot="off", **db)
    peer = await connect(url)
    await peer.say("the tickets are at https://example.org/tickets?id=42")
    await peer.say("Tickets sold out")
    await peer.say("nothing to see")
    other = await connect(url)
    await other.join("elsewhere")
    await other.say("tickets in another room")
    found = await peer.sio.call("search", {"q": "TICKETS"}, timeout=10)
    assert [m["body"] for m in found["results"]] == ["Tickets sold out",
                                                     "the tickets are at https://example.org/tickets?id=42"]
    assert [m["body"] for m in (await peer.sio.call("search", {"q": "sold tick"}, timeout=10))["results"]] == [
        "Tickets sold out"]
    assert (await peer.sio.call("search", {"q": "x" * 101}, timeout=10))["code"] == "bad_query"
    assert (await peer.sio.call("search", {"q": 42}, timeout=10))["code"] == "bad_query"
    if backend == "db":
        with sqlite3.connect(tmp_path / "s.db") as conn:
            assert conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'tickets'").fetchone()[0] == 3


async def test_searches_and_history_pages_are_rate_limited(url: str, connect: Connect) -> None:
    peer = await connect(url)
    answers = [await peer.sio.call("search", {"q": "anything"}, timeout=10) for _ in range(chat.COMMAND_BURST + 1)]
    assert [a["ok"] for a in answers] == [True] * chat.COMMAND_BURST + [False]
    assert answers[-1]["code"] == "rate_limited" and answers[-1]["retry_after_ms"] > 0


# ---------------------------------------------------------------- zero-config: the README's commands on a bare python3

SYSTEM_PYTHON = Path("/usr/bin/python3")
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def readme_blocks(section: str, language: str) -> list[str]:
    """The ```language blocks under the README heading `section` (up to the next ## heading), in order."""
    text = (HERE / "README.md").read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(rf"```{language}\n(.*?)```", text, re.S)]


def readme_quick_start() -> list[str]:
    """The shell commands of the README's Quick start, in order: start the chat, run the tests."""
    return readme_blocks("Quick start", "sh")


@functools.cache
def has_chat_dependencies(python: Path) -> bool:
    probe = [str(python), "-c", "import aiohttp, socketio, engineio"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def require_bare_system_python() -> None:
    """The distribution's own python3 without chat.py's packages: what a fresh Linode has."""
    require(SYSTEM_PYTHON.exists(), "/usr/bin/python3 (the distribution's Python)")
    require(not has_chat_dependencies(SYSTEM_PYTHON), "/usr/bin/python3 without aiohttp and python-socketio")


def bare_python() -> list[str]:
    """An interpreter that cannot import chat.py's packages, so chat.py's first-run set-up starts."""
    if SYSTEM_PYTHON.exists() and not has_chat_dependencies(SYSTEM_PYTHON):
        return [str(SYSTEM_PYTHON)]
    return [sys.executable, "-S"]  # -S: without site-packages


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A new user's environment: no virtualenv, no pip settings, an empty home."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": CLEAN_PATH, "HOME": str(home), "LANG": "C.UTF-8", **extra}


def private_envs(root: Path) -> list[str]:
    """The private environments in a cache directory (which also holds the lock and the browser client)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith("env-")) if root.exists() else []


def readme_first_run(tmp_path: Path, **extra_env: str) -> tuple[list[str], dict[str, str], Path, str]:
    """The README's first command, in an empty home on the distribution's python3, until the page and
    /healthz answer; returns the command, its environment, its directory and what it wrote to stderr."""
    require_bare_system_python()
    command = shlex.split(readme_quick_start()[0])
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(HERE / "chat.py", work)
    env = clean_env(tmp_path / "home", PORT=str(free_port()), **extra_env)
    first = ChatProcess(command=command, env=env, clean_env=True, cwd=work)
    try:
        url = first.wait_ready(timeout=300)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"<title>" in response.read()
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"
    finally:
        _, _, err = first.stop()
    assert "Traceback" not in err
    return command, env, work, err


def readme_second_run(command: list[str], env: dict[str, str], work: Path) -> str:
    """The same command again: it starts at once, installing nothing; returns its stderr."""
    second = ChatProcess(command=command, env=env, clean_env=True, cwd=work)
    try:
        url = second.wait_ready(timeout=30)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
    finally:
        _, _, err = second.stop()
    assert "first run" not in err and "Collecting" not in err
    return err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_first_command_serves_the_chat_on_the_distributions_python(tmp_path: Path) -> None:
    command, env, work, err = readme_first_run(tmp_path)
    assert "chat.py: first run: installing python-socketio 5.18, python-engineio 4.15, aiohttp 3.14" in err
    envs = private_envs(tmp_path / "home" / ".cache" / "chat.py")
    assert len(envs) == 1 and envs[0].startswith("env-py3.")
    readme_second_run(command, env, work)
    assert private_envs(tmp_path / "home" / ".cache" / "chat.py") == envs


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readme_second_command_installs_and_runs_the_tests_on_the_distributions_python(tmp_path: Path) -> None:
    require_bare_system_python()
    command = readme_quick_start()[1]
    checkout = tmp_path / "checkout"
    listed = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True, timeout=30) \
        if shutil.which("git") and (HERE / ".git").exists() else None  # a downloaded zip has neither
    names = listed.stdout.split() if listed and listed.returncode == 0 else [
        "chat.py", "test_chat.py", "bench_chat.py", "README.md", "requirements.txt", "requirements-dev.txt",
        "pytest.ini", "ruff.toml"]
    for name in names:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / name, checkout / name)
    # The literal command; the environment picks the quick tier, which excludes this test itself.
    env = clean_env(tmp_path / "home", PYTEST_ADDOPTS="-m 'not slow and not browser and not node and not redis'")
    result = subprocess.run(["/bin/sh", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert re.search(r"\d+ passed", result.stdout)


@pytest.mark.slow
def test_an_unreachable_package_index_is_one_line_and_leaves_nothing_behind(tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    env = clean_env(tmp_path / "home", CHAT_ENV_DIR=str(envs), PIP_RETRIES="0", PIP_TIMEOUT="2",
                    PIP_INDEX_URL=f"http://127.0.0.1:{free_port()}/simple/")
    result = subprocess.run([*bare_python(), str(HERE / "chat.py")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("chat.py: cannot reach the package index"), result.stderr[-2000:]
    assert "python3 -m venv ~/chat-env" in last
    assert "Traceback" not in result.stderr
    assert private_envs(envs) == []


def hide_ensurepip(tmp_path: Path) -> str:
    """A PYTHONPATH under which `import ensurepip` fails, as on Debian or Ubuntu without python3-venv."""
    fake = tmp_path / "no-ensurepip" / "ensurepip"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError('No module named ensurepip', name='ensurepip')\n")
    return str(fake.parent)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_first_command_works_on_a_python3_without_ensurepip(tmp_path: Path) -> None:
    command, env, work, err = readme_first_run(tmp_path, PYTHONPATH=hide_ensurepip(tmp_path))
    assert f"this python3 has no ensurepip, so pip {chat.PIP_WHEEL[0]} comes from the package index" in err
    root = tmp_path / "home" / ".cache" / "chat.py"
    (env_dir,) = [p for p in root.iterdir() if p.name.startswith("env-")]
    assert (env_dir / "bin" / "pip").read_text().splitlines()[0] == f"#!{env_dir}/bin/python", \
        "the environment's scripts name the environment itself, not a temporary directory"
    assert str(env_dir) in (env_dir / "pyvenv.cfg").read_text()
    assert not list(env_dir.glob("*.whl")), "the downloaded wheel is not left behind"
    readme_second_run(command, env, work)


def fake_index(wheel: bytes, published: str | None, form: str) -> LoopbackFiles:
    """A package index serving one pip wheel, its simple page in the JSON or the HTML form."""
    name = f"pip-{chat.PIP_WHEEL[0]}-py3-none-any.whl"
    fragment = f"#sha256={published}" if published else ""
    page = (json.dumps({"files": [{"filename": name, "url": f"../../files/{name}",
                                   "hashes": {"sha256": published} if published else {}}]}) if form == "json" else
            f'<html><body><a href="../../files/{name}{fragment}">{name}</a></body></html>')
    return LoopbackFiles({"/simple/pip/": page.encode(), f"/files/{name}": wheel})


@pytest.mark.parametrize("form", ["json", "html"])
def test_the_pip_wheel_is_taken_from_the_index_only_when_its_sha256_is_the_pinned_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    wheel = b"PK a pip wheel, as far as this test is concerned"
    pinned = hashlib.sha256(wheel).hexdigest()
    monkeypatch.setattr(chat, "PIP_WHEEL", (chat.PIP_WHEEL[0], pinned))
    monkeypatch.delenv("PIP_CONFIG_FILE", raising=False)
    for published, served, expected in [
            (pinned, wheel, None),  # the published hash is the pinned one, and so are the bytes
            (None, wheel, None),  # an index that publishes no hash: the pin alone decides
            ("0" * 64, wheel, "publishes sha256 " + "0" * 64),
            (pinned, b"something else", "does not match the sha256 chat.py pins")]:
        index = fake_index(served, published, form)
        monkeypatch.setenv("PIP_INDEX_URL", index.url + "simple/")
        into = tmp_path / f"{form}-{published}-{len(served)}"
        into.mkdir()
        try:
            if expected is None:
                assert chat.fetch_pip_wheel(into).read_bytes() == wheel
            else:
                with pytest.raises(chat.FirstRunError, match=expected):
                    chat.fetch_pip_wheel(into)
                assert not list(into.iterdir()), "nothing refused is written"
        finally:
            index.close()


def test_the_package_index_comes_from_pip_s_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = http://mirror.invalid/simple\ncert = /etc/ssl/mirror.pem\n")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_CERT", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert chat.pip_settings() == ("http://mirror.invalid/simple/", "/etc/ssl/mirror.pem")
    monkeypatch.setenv("PIP_INDEX_URL", "http://other.invalid/simple/")
    assert chat.pip_settings()[0] == "http://other.invalid/simple/", "the environment wins, as for pip"


def first_run(tmp_path: Path, envs: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """chat.py on a Python without its packages, with an index that refuses at once."""
    env = clean_env(tmp_path / "home", CHAT_ENV_DIR=str(envs), PIP_RETRIES="0", PIP_TIMEOUT="2",
                    PIP_INDEX_URL=f"http://127.0.0.1:{free_port()}/simple/", **extra)
    return subprocess.run([*bare_python(), str(HERE / "chat.py")], env=env, capture_output=True, text=True,
                          timeout=300)


def env_dir_of(result: subprocess.CompletedProcess[str]) -> Path:
    """The private environment a first run said it installs into."""
    return Path(re.search(r"first run: installing .* into (\S+) ", result.stderr).group(1))  # type: ignore[union-attr]


def test_a_group_writable_cache_is_trusted_only_when_the_group_is_the_users_own(tmp_path: Path) -> None:
    import grp
    import pwd

    own = tmp_path / "own"
    own.mkdir()
    own.chmod(0o775)  # Debian's user groups make 775 directories (umask 002)
    me = pwd.getpwuid(os.getuid())
    personal = grp.getgrgid(me.pw_gid)
    if personal.gr_name != me.pw_name or os.getuid() != 0:
        pytest.skip("needs root and a personal group to show both cases")
    assert chat.untrusted(own) is None
    shared = grp.getgrnam("staff") if "staff" in {g.gr_name for g in grp.getgrall()} else None
    if shared is None:
        pytest.skip("no shared group to try")
    os.chown(own, 0, shared.gr_gid)
    assert "is writable by other users" in (chat.untrusted(own) or "")


@pytest.mark.slow
def test_a_cache_directory_others_can_write_is_refused_with_the_reason(tmp_path: Path) -> None:
    envs = tmp_path / "shared"
    envs.mkdir()
    envs.chmod(0o777)
    result = first_run(tmp_path, envs)
    assert result.returncode == 1
    assert result.stderr == (f"chat.py: will not use {envs} is writable by other users (mode 777; chmod go-w it); "
                             "set CHAT_ENV_DIR to a directory of your own\n")
    assert private_envs(envs) == [], "nothing is installed into it"


@pytest.mark.slow
def test_an_interpreter_planted_in_the_cache_is_never_run(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("planting a file owned by another user needs root")
    envs = tmp_path / "envs"
    env = env_dir_of(first_run(tmp_path, envs))  # learns the environment's name (its install fails)
    marker = tmp_path / "ran"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (env / "bin" / "python").chmod(0o755)
    (env / chat.ENV_COMPLETE).write_text("planted\n")
    for path in (env, env / "bin", env / "bin" / "python", env / chat.ENV_COMPLETE):
        os.chown(path, 65534, 65534)  # nobody's
    result = first_run(tmp_path, envs)
    assert result.returncode == 1 and not marker.exists()
    assert result.stderr == (f"chat.py: will not run {env}/bin/python: {env} belongs to another user (uid 65534); "
                             f"delete {env} and run chat.py again\n")
    for path in (env, env / "bin", env / "bin" / "python", env / chat.ENV_COMPLETE):
        os.chown(path, 0, 0)
    (env / "bin").chmod(0o777)  # swapped in after a real install: a bin/ anybody can write
    result = first_run(tmp_path, envs)
    assert result.returncode == 1 and not marker.exists()
    assert f"{env}/bin is writable by other users (mode 777" in result.stderr


@pytest.mark.slow
def test_a_broken_leftover_environment_is_replaced_not_reported_as_not_empty(tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    env = env_dir_of(first_run(tmp_path, envs))
    env.mkdir()
    (env / "half-written").write_text("an install killed half-way")
    result = first_run(tmp_path, envs)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("chat.py: cannot reach the package index")
    assert "not empty" not in result.stderr and "Traceback" not in result.stderr
    assert not env.exists(), "the leftover was removed, and the failed install left nothing"


@pytest.mark.slow
def test_a_full_disk_says_no_space_instead_of_blaming_python3_venv(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = first_run(tmp_path, small / "envs")
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"chat.py: no space left on the disk of {small / 'envs'}"), result.stderr
    assert "python3-venv" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_interrupted_first_install_keeps_nothing_so_the_next_run_starts_over(tmp_path: Path) -> None:
    envs = tmp_path / "envs"
    with socket.socket() as index:  # a package index that accepts and never answers
        index.bind(("127.0.0.1", 0))
        index.listen()
        index.settimeout(120)
        env = clean_env(tmp_path / "home", CHAT_ENV_DIR=str(envs), PIP_TIMEOUT="60",
                        PIP_INDEX_URL=f"http://127.0.0.1:{index.getsockname()[1]}/simple/")
        proc = ChatProcess(command=[*bare_python(), str(HERE / "chat.py")], env=env, clean_env=True)
        try:
            proc.stderr.wait_for("first run: installing", 60)
            connection, _ = index.accept()  # pip is now half-way: asking the index
            connection.close()
            proc.proc.send_signal(signal.SIGINT)
        finally:
            code, _, err = proc.stop()
    assert code == 1
    assert "chat.py: first-run install interrupted; nothing was kept (run chat.py again to retry)" in err
    assert "Traceback" not in err
    assert private_envs(envs) == []


@pytest.mark.slow
def test_python_older_than_3_10_is_told_so_in_one_line(tmp_path: Path) -> None:
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3")), shutil.which("python3.9")]
    old = next((c for c in candidates if c and subprocess.run([str(c), "-V"], capture_output=True).returncode == 0),
               None)
    if old:
        command = [str(old), str(HERE / "chat.py")]
    else:  # this Python, told it is 3.9 before chat.py's first line runs
        command = [sys.executable, "-c", "import runpy, sys; sys.version_info = (3, 9, 18, 'final', 0); "
                   f"runpy.run_path({str(HERE / 'chat.py')!r}, run_name='__main__')"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env=clean_env(tmp_path / "home", CHAT_ENV_DIR=str(tmp_path / "envs")))
    assert result.returncode == 1
    assert re.fullmatch(r"chat\.py: needs Python 3\.10 or newer; \S+ is 3\.9\.\d+\n", result.stderr)
    assert not (tmp_path / "envs").exists(), "nothing is installed for a Python that cannot run chat.py"


@pytest.mark.slow
def test_chat_no_bootstrap_prints_the_manual_commands_instead(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home", CHAT_ENV_DIR=str(tmp_path / "envs"), CHAT_NO_BOOTSTRAP="1")
    result = subprocess.run([*bare_python(), str(HERE / "chat.py")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "CHAT_NO_BOOTSTRAP is set; install by hand" in result.stderr
    assert "pip install 'python-socketio>=5.18,<5.19' 'python-engineio>=4.15,<4.16'" in result.stderr
    assert "Traceback" not in result.stderr
    assert private_envs(tmp_path / "envs") == []


@pytest.mark.slow
def test_with_the_dependencies_installed_nothing_is_installed(tmp_path: Path) -> None:
    env = {**os.environ, "CHAT_ENV_DIR": str(tmp_path / "envs")}
    result = subprocess.run([sys.executable, str(HERE / "chat.py"), "--help"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "first run" not in result.stderr
    assert private_envs(tmp_path / "envs") == []


def test_the_private_environment_is_keyed_by_pins_and_python_and_never_next_to_chat_py(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHAT_ENV_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    pins = chat.script_requirements(chat.read_own_header())
    env = chat.private_env_dir(pins)
    assert env.parent == tmp_path / "xdg" / "chat.py"
    assert chat.private_env_dir([*pins[:-1], "aiohttp>=3.15,<3.16"]) != env
    monkeypatch.setenv("CHAT_ENV_DIR", str(tmp_path / "chosen"))
    assert chat.private_env_dir(pins).parent == tmp_path / "chosen"
    assert HERE not in chat.private_env_dir(pins).parents


def test_version_pins_are_checked_without_packaging() -> None:
    assert chat.version_satisfies("5.18.1", ">=5.18,<5.19")
    assert not chat.version_satisfies("5.19.0", ">=5.18,<5.19")
    assert not chat.version_satisfies("5.7.2", ">=5.18,<5.19")
    assert chat.version_satisfies("3.14.5", ">=3.14,<3.15")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_uv_run_reads_the_pep723_header(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None and importlib.util.find_spec("uv"):
        import uv as uv_package

        uv = uv_package.find_uv_bin()
    require(uv is not None, "uv (pip install uv)")
    env = clean_env(tmp_path / "home", UV_NATIVE_TLS="1", UV_CACHE_DIR=str(tmp_path / "uv-cache"))
    result = subprocess.run([str(uv), "run", "--no-project", str(HERE / "chat.py"), "--help"], env=env,
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: chat.py" in result.stdout


def test_the_readmes_systemd_unit_verifies_and_keeps_the_password_out_of_it(tmp_path: Path) -> None:
    unit = readme_blocks("Running on a Linode", "ini")[0]
    assert "EnvironmentFile=" in unit and "CHAT_PASSWORD" not in unit and "LimitNOFILE=" in unit
    assert "ExecStart=/usr/bin/python3 /home/chat/chat.py" in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    behind_nginx = readme_blocks("Running on a Linode", "ini")[1]  # the ExecStart= line for the nginx setup
    assert behind_nginx.startswith("ExecStart=/usr/bin/python3 /home/chat/chat.py") and "--allow-host" in behind_nginx
    for variant in (unit, re.sub(r"^ExecStart=.*$", behind_nginx, unit, flags=re.M)):
        (tmp_path / "chat.service").write_text(variant)
        result = subprocess.run([analyze, "verify", str(tmp_path / "chat.service")], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- restarts and long-polling batches


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_python_clients_reconnect_by_themselves_after_a_sigterm_restart(transport: str) -> None:
    port = free_port()
    server = ChatProcess("--port", str(port), "--rate", "0")
    url = await asyncio.to_thread(server.wait_ready)
    listener = Peer(socketio.AsyncClient(reconnection_delay=0.2, reconnection_delay_max=0.5))
    connects: asyncio.Queue[None] = asyncio.Queue()
    listener.sio.on("connect", lambda: connects.put_nowait(None))
    await listener.sio.connect(url, transports=[transport], wait_timeout=10)
    await asyncio.wait_for(connects.get(), 5)
    try:
        code, _, err = await asyncio.to_thread(server.stop)
        assert code == 0 and "Traceback" not in err
        server = ChatProcess("--port", str(port), "--rate", "0")
        await asyncio.to_thread(server.wait_ready)
        await asyncio.wait_for(connects.get(), 15)  # reconnected by itself
        sender = socketio.AsyncClient(reconnection=False)
        await sender.connect(url, transports=["websocket"], wait_timeout=10)
        await sender.call("newmessage", {"user": "Bob", "body": "after the restart"}, timeout=10)
        assert (await listener.next("newmessage", 10))["body"] == "after the restart"
        await sender.disconnect()
    finally:
        await listener.sio.disconnect()
        await asyncio.to_thread(server.stop)


async def test_a_long_poll_response_carries_at_most_16_packets_and_the_rest_follows_in_order(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
            sid = json.loads((await response.text())[1:])["sid"]
        poll = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
        async with http.post(poll, data="40") as response:
            assert response.status == 200
        async with http.get(poll) as response:
            assert (await response.text()).startswith("40")
        burst = "\x1e".join("42" + json.dumps(["newmessage", {"user": "P", "body": f"m{i}"}]) for i in range(100))
        async with http.post(poll, data=burst) as response:
            assert response.status == 200
        bodies: list[str] = []
        while len(bodies) < 100:
            async with http.get(poll) as response:
                packets = (await response.text()).split("\x1e")
            assert len(packets) <= 16
            for raw in packets:
                event, payload = json.loads(raw[2:])
                if event == "newmessage":
                    bodies.append(payload["body"])
    assert bodies == [f"m{i}" for i in range(100)]


async def test_a_python_polling_client_receives_all_100_broadcasts_of_its_own_burst(url: str,
                                                                                     connect: Connect) -> None:
    peer = await connect(url, transports=["polling"])
    await asyncio.gather(*(peer.sio.emit("newmessage", {"user": "P", "body": f"m{i}"}) for i in range(100)))
    received = await peer.take("newmessage", 100, timeout=20)
    assert [m["body"] for m in received] == [f"m{i}" for i in range(100)]
    assert peer.sio.connected


# ---------------------------------------------------------------- the official JavaScript client in Node

NODE_CLIENT = r"""
const { io } = require('socket.io-client');
const socket = io(process.argv[2], { transports: ['polling', 'websocket'] });
const seen = [];
const timer = setTimeout(() => { console.log(JSON.stringify({ timeout: seen })); process.exit(3); }, 8000);
const done = () => { console.log(JSON.stringify(seen)); clearTimeout(timer); socket.close(); };
socket.on('connect', () => {
  socket.emit('newmessage', { user: 'Node', body: 'hello from node?' }, (ack) => seen.push(['ack', ack]));
});
socket.on('newmessage', (m) => seen.push(['newmessage', m]));
socket.on('botmessage', (m) => { seen.push(['botmessage', m]); if (seen.filter((s) => s[0] === 'botmessage').length === 2) done(); });
"""


@pytest.mark.node
async def test_the_official_js_client_in_node_round_trips(url: str, tmp_path: Path) -> None:
    require(shutil.which("node") is not None, "node")
    require((NODE_MODULES / "socket.io-client").is_dir(), "the npm package socket.io-client")
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out)
    kinds = [kind for kind, _ in seen]
    assert kinds.index("newmessage") < kinds.index("botmessage")
    ack = next(data for kind, data in seen if kind == "ack")
    message = next(data for kind, data in seen if kind == "newmessage")
    assert ack["ok"] and ack["id"] == message["id"]
    assert (message["user"], message["body"]) == ("Node", "hello from node?")
    assert [d["body"] for k, d in seen if k == "botmessage"] == [
        "Hello, Node!", "We will be right with you to answer your question."]


NODE_LISTENER = r"""
const { io } = require('socket.io-client');
const socket = io(process.argv[2], { transports: [process.argv[3]], reconnectionDelay: 200, reconnectionDelayMax: 500 });
socket.on('connect', () => console.log('connected'));
socket.on('newmessage', (m) => console.log(`message ${m.body}`));
setTimeout(() => process.exit(3), 30000);
"""


@pytest.mark.node
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_the_official_js_client_in_node_reconnects_by_itself_after_a_sigterm_restart(
        tmp_path: Path, transport: str) -> None:
    require(shutil.which("node") is not None, "node")
    require((NODE_MODULES / "socket.io-client").is_dir(), "the npm package socket.io-client")
    script = tmp_path / "listener.js"
    script.write_text(NODE_LISTENER)
    port = free_port()
    server = ChatProcess("--port", str(port), "--rate", "0")
    url = await asyncio.to_thread(server.wait_ready)
    listener = ChatProcess(command=["node", str(script), url, transport], env={"NODE_PATH": str(NODE_MODULES)})
    try:
        await asyncio.to_thread(listener.stdout.wait_for, "^connected", 10)
        code, _, err = await asyncio.to_thread(server.stop)
        assert code == 0 and "Traceback" not in err
        server = ChatProcess("--port", str(port), "--rate", "0")
        await asyncio.to_thread(server.wait_ready)
        await asyncio.to_thread(listener.stdout.wait_for, "^connected", 15)
        sender = socketio.AsyncClient(reconnection=False)
        await sender.connect(url, transports=["websocket"], wait_timeout=10)
        await sender.call("newmessage", {"user": "Bob", "body": "after the restart"}, timeout=10)
        await sender.disconnect()
        await asyncio.to_thread(listener.stdout.wait_for, "^message after the restart", 10)
    finally:
        listener.stop()
        await asyncio.to_thread(server.stop)


# ---------------------------------------------------------------- rooms, history, presence, typing


async def test_a_message_in_one_room_never_reaches_another(url: str, connect: Connect) -> None:
    team, lobby = await connect(url), await connect(url)
    await team.join("team", user="Tess")
    secret = await team.say("team only", user="Tess")
    await lobby.say("lobby marker", user="Leo")
    assert (await lobby.next("newmessage"))["body"] == "lobby marker"
    assert all(m["id"] > secret["id"] for m in lobby.pending("botmessage"))
    msg = await team.next("newmessage")
    assert (msg["body"], msg["room"]) == ("team only", "team")
    assert (await team.next("botmessage"))["room"] == "team", "the bot answers in the room it was asked in"


async def test_join_ack_carries_room_history_members_and_typing(url: str, connect: Connect) -> None:
    first = await connect(url)
    await first.join("design", user="Ann")
    await first.say("hello design?", user="Ann")
    await first.take("botmessage", 2)
    second = await connect(url)
    ack = await second.join("design", user="Ben")
    assert ack["ok"] is True and ack["room"] == "design" and ack["complete"] is True
    assert [(m["user"], m["body"]) for m in ack["history"]] == [
        ("Ann", "hello design?"), ("ChatFriend", "Hello, Ann!"),
        ("ChatFriend", "We will be right with you to answer your question.")]
    assert [m["kind"] for m in ack["history"]] == ["user", "bot", "bot"]
    assert ack["members"] == ["Ann", "Ben"]
    assert ack["typing"] == []


async def test_history_keeps_the_last_n_messages_per_room(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(history=5, rate=0, bot="off")
    peer = await connect(url)
    for i in range(12):
        await peer.say(f"m{i}")
    ack = await (await connect(url)).join("lobby")
    assert [m["body"] for m in ack["history"]] == [f"m{i}" for i in range(7, 12)]


@pytest.mark.parametrize("room", ["Team", "a b", "x" * 33, "", "émoji", "../etc", 7, ["lobby"]])
async def test_bad_room_names_are_refused_with_a_reason(url: str, connect: Connect, room: Any) -> None:
    ack = await (await connect(url)).sio.call("join", {"room": room, "user": "Al"}, timeout=10)
    assert ack["ok"] is False
    assert "Room names are 1-32 lowercase letters" in ack["error"]


@pytest.mark.parametrize("store", ["memory", "db"])
@pytest.mark.parametrize("since", [-1, 1.5, "3", True, 2**53, 2**63, 2**80])
async def test_a_since_that_is_not_a_message_id_is_refused_with_a_reason(
        start_chat: StartChat, connect: Connect, tmp_path: Path, store: str, since: Any) -> None:
    url = await start_chat(rate=0, db=tmp_path / "since.db" if store == "db" else None)
    peer = await connect(url)
    ack = await peer.join("lobby", since=since)
    assert (ack["ok"], ack["code"]) == (False, "bad_since")
    assert (await peer.join("lobby", since=2**53 - 1))["ok"], "the largest id a browser keeps exactly"


async def test_replay_since_an_id_is_exact_in_order_without_gaps_or_duplicates(
        url: str, connect: Connect) -> None:
    writer = await connect(url)
    await writer.join("replay", user="Wes")
    seen = await connect(url)
    ack = await seen.join("replay", user="Sam")
    ids = [(await writer.say(f"before {i}", user="Wes"))["id"] for i in range(3)]
    last_seen = ids[-1]
    await seen.sio.disconnect()
    after = [(await writer.say(f"after {i}", user="Wes"))["id"] for i in range(4)]
    expected = [m for m in (await (await connect(url)).join("replay"))["history"] if m["id"] > last_seen]
    back = await connect(url)
    ack = await back.join("replay", user="Sam", since=last_seen)
    assert ack["complete"] is True
    assert ack["history"] == expected
    replayed = [m["id"] for m in ack["history"]]
    assert replayed == sorted(set(replayed))
    assert set(after) <= set(replayed)
    assert all(m["id"] > last_seen for m in ack["history"])


async def test_replay_older_than_history_says_it_is_incomplete(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(history=3, rate=0, bot="off")
    peer = await connect(url)
    first = await peer.say("m0")
    for i in range(1, 6):
        await peer.say(f"m{i}")
    ack = await (await connect(url)).join("lobby", since=first["id"])
    assert ack["complete"] is False
    assert [m["body"] for m in ack["history"]] == ["m3", "m4", "m5"]


async def test_a_resent_cid_is_acked_with_the_original_id_and_shown_once(url: str, connect: Connect) -> None:
    sender, watcher = await connect(url), await connect(url)
    first = await sender.say("only once", cid="c-123")
    again = await sender.say("only once", cid="c-123")
    assert again == {"ok": True, "id": first["id"], "ts": first["ts"], "duplicate": True}
    other = await connect(url)  # a resend after a reconnect, from a new connection
    assert (await other.say("only once", cid="c-123"))["id"] == first["id"]
    await watcher.say("marker", user="Watcher")
    bodies = [m["body"] for m in await watcher.take("newmessage", 2)]
    assert bodies == ["only once", "marker"]
    assert [r["body"] for r in await watcher.take("botmessage", 1)] == ["Did you have a question for us today?"]


async def test_the_same_cid_in_another_room_is_another_message(url: str, connect: Connect) -> None:
    peer = await connect(url)
    first = await peer.say("lobby copy", cid="same")
    await peer.join("other")
    assert (await peer.say("other copy", cid="same"))["id"] != first["id"]


async def test_presence_counts_tabs_so_closing_one_of_two_announces_nothing(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(presence_grace=0.2)
    watcher = await connect(url)
    await watcher.join("lobby", user="Watcher")
    assert (await watcher.next("system"))["text"] == "Watcher joined"
    assert (await watcher.next("presence"))["members"] == ["Watcher"]
    tab1, tab2 = await connect(url), await connect(url)
    await tab1.join("lobby", user="Alice")
    assert (await watcher.next("system"))["text"] == "Alice joined"
    await tab2.join("lobby", user="Alice")
    presence = [await watcher.next("presence") for _ in range(2)]
    assert presence[-1]["members"] == ["Alice", "Watcher"] and presence[-1]["count"] == 2
    await tab1.sio.disconnect()
    await watcher.say("marker after closing one tab", user="Watcher")
    await watcher.next("newmessage")
    assert watcher.pending("system") == []
    await tab2.sio.disconnect()
    assert (await watcher.next("system"))["text"] == "Alice left"
    assert (await watcher.next("presence"))["members"] == ["Watcher"]


async def test_a_quick_reconnect_makes_no_leave_or_join_lines(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(presence_grace=0.3)
    watcher = await connect(url)
    await watcher.join("lobby", user="Watcher")
    assert (await watcher.next("system"))["text"] == "Watcher joined"
    flappy = await connect(url)
    await flappy.join("lobby", user="Flappy")
    assert (await watcher.next("system"))["text"] == "Flappy joined"
    await flappy.sio.disconnect()
    again = await connect(url)  # back within the grace period
    await again.join("lobby", user="Flappy")
    # Someone else leaves for real: their leave line comes one grace period later, so a (wrong)
    # leave line for Flappy, scheduled earlier with the same grace, would arrive before it.
    other = await connect(url)
    await other.join("lobby", user="Other")
    assert (await watcher.next("system"))["text"] == "Other joined"
    await other.sio.disconnect()
    assert (await watcher.next("system"))["text"] == "Other left"
    assert "Flappy" in (await (await connect(url)).join("lobby"))["members"]


async def test_typing_is_shown_to_the_room_and_expires(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(typing_timeout=0.3)
    typist, watcher = await connect(url), await connect(url)
    await typist.join("lobby", user="Tia")
    await watcher.join("lobby", user="Wat")
    await typist.sio.emit("typing", {"typing": True})
    assert (await watcher.next("typing"))["users"] == ["Tia"]
    started = time.monotonic()
    assert (await watcher.next("typing"))["users"] == []  # nobody said stop: the server expired it
    assert time.monotonic() - started >= 0.25
    await typist.sio.emit("typing", {"typing": True})
    assert (await watcher.next("typing"))["users"] == ["Tia"]
    await typist.say("done typing", user="Tia")
    assert (await watcher.next("typing"))["users"] == [], "sending a message stops typing"


async def test_typing_with_a_bad_payload_is_refused(url: str, connect: Connect) -> None:
    peer = await connect(url)
    await peer.sio.emit("typing", {"typing": "yes"})
    assert (await peer.next("chat_error"))["code"] == "bad_typing"


@pytest.mark.slow
async def test_sqlite_history_and_ids_survive_a_restart(tmp_path: Path, connect: Connect) -> None:
    db = tmp_path / "chat.db"
    port = free_port()
    first = ChatProcess("--port", str(port), "--db", str(db), "--rate", "0")
    try:
        url = first.wait_ready()
        peer = await connect(url)
        await peer.join("keep", user="Kim")
        ids = [(await peer.say(f"persist {i}", user="Kim"))["id"] for i in range(3)]
        await peer.take("botmessage", 3)
        await peer.sio.disconnect()
    finally:
        assert first.stop()[0] == 0
    second = ChatProcess("--port", str(port), "--db", str(db), "--rate", "0")
    try:
        url = second.wait_ready()
        peer = await connect(url)
        ack = await peer.join("keep", user="Kim", since=ids[0])
        assert [m["body"] for m in ack["history"] if m["kind"] == "user"] == ["persist 1", "persist 2"]
        assert (await peer.say("after restart", user="Kim"))["id"] > max(m["id"] for m in ack["history"])
        assert (await peer.say("persist 2", user="Kim", cid="x1"))["ok"]
    finally:
        assert second.stop()[0] == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_with_a_database_the_ack_comes_only_after_the_message_is_stored(
        start_chat: StartChat, connect: Connect, tmp_path: Path) -> None:
    db = tmp_path / "acked.db"
    url = await start_chat(db=db, rate=0, bot="off")
    peer = await connect(url)
    for i in range(5):
        ack = await peer.say(f"durable {i}", cid=f"d{i}")
        with sqlite3.connect(db) as conn:  # a separate reader sees it the moment the ack arrives
            row = conn.execute("SELECT body FROM messages WHERE id = ?", (ack["id"],)).fetchone()
        assert row == (f"durable {i}",)


def test_a_bad_database_path_stops_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--port", "0", "--db", str(tmp_path / "missing-dir" / "x.db")], capsys) == (
        2, f"chat.py: --db {tmp_path / 'missing-dir' / 'x.db'}: the directory {tmp_path / 'missing-dir'} does not exist\n")


# ---------------------------------------------------------------- bots: keyword rules, Rasa, OpenAI-compatible


class FakeBackend:
    """A real HTTP server on loopback that follows Rasa's REST channel and OpenAI's chat completions contracts.

    `mode` picks the behaviour of the next answers; every request body is recorded.
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.release.set()
        self.url = ""
        self.runner: web.AppRunner | None = None
        self.api_key = ""  # when set, GET /v1/models needs it, as hosted APIs do
        self.model_checks: list[str | None] = []

    async def start(self) -> FakeBackend:
        app = web.Application()

        async def version(request: web.Request) -> web.Response:
            return web.Response(text="Hello from Rasa: 3.6.20")

        app.router.add_get("/", version)
        app.router.add_post("/webhooks/rest/webhook", self.rasa)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.completions)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def models(self, request: web.Request) -> web.Response:
        self.model_checks.append(request.headers.get("Authorization"))
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "Invalid API key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "tiny"}]})

    async def _enter(self, request: web.Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            if self.mode == "slow":
                await asyncio.sleep(5)
        finally:
            self.in_flight -= 1
        return body

    async def rasa(self, request: web.Request) -> web.StreamResponse:
        body = await self._enter(request)
        answers = {
            "ok": lambda: web.json_response([{"recipient_id": body["sender"], "text": f"You said: {body['message']}"},
                                             {"recipient_id": body["sender"], "text": "Anything else?"}]),
            "rich": lambda: web.json_response([
                {"recipient_id": body["sender"], "image": "https://example.org/cat.png"},
                {"recipient_id": body["sender"], "text": "Pick one:",
                 "buttons": [{"title": "Yes", "payload": "/affirm"}, {"title": "No", "payload": "/deny"}]}]),
            "empty": lambda: web.json_response([]),
            "status 500": lambda: web.json_response({"version": "3.6.20", "status": "failure", "message": "boom",
                                                     "reason": "ServerError", "code": 500}, status=500),
            "error body": lambda: web.json_response({"error": "agent not ready"}),
            "long": lambda: web.json_response([{"recipient_id": body["sender"], "text": "word " * 1000}]),
            "malformed JSON": lambda: web.Response(text="[{not json", content_type="application/json"),
        }
        return answers[self.mode]()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        await self._enter(request)
        if self.mode == "whole":
            return web.json_response({"id": "c1", "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "A whole answer."}, "finish_reason": "stop"}]})
        if self.mode == "status 401":
            return web.json_response({"error": {"message": "Invalid API key", "type": "invalid_request_error"}},
                                     status=401)
        if self.mode == "status 404":
            return web.json_response({"error": {"message": "model 'nope' not found"}}, status=404)
        if self.mode == "malformed JSON":
            return web.Response(text="{oops", content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any]) -> bytes:
            data = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
            return f"data: {json.dumps(data)}\n\n".encode()

        await resp.write(b": keep-alive\n\n")
        await resp.write(chunk({"role": "assistant"}))
        await resp.write(chunk({"content": ""}))
        for part in ("Hel", "lo from ", "the model."):
            await resp.write(chunk({"content": part}))
        if self.mode == "error in stream":
            await resp.write(b'data: {"error": {"message": "overloaded"}}\n\n')
        elif self.mode == "bad chunk":
            await resp.write(b"data: {broken\n\n")
        elif self.mode != "truncated":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    fake = await FakeBackend().start()
    yield fake
    fake.release.set()
    await fake.stop()


async def test_rasa_mode_posts_to_the_rest_channel_and_relays_each_text(
        start_chat: StartChat, connect: Connect, backend: FakeBackend) -> None:
    url = await start_chat(bot="rasa", bot_url=backend.url, rate=0)
    peer = await connect(url)
    await peer.say("book a table", user="Rae")
    await peer.say("for two", user="Rae")
    replies = [r["body"] for r in await peer.take("botmessage", 4)]
    assert replies == ["You said: book a table", "Anything else?", "You said: for two", "Anything else?"]
    assert backend.requests[0]["message"] == "book a table"
    assert set(backend.requests[0]) == {"sender", "message"}
    assert backend.requests[0]["sender"] == backend.requests[1]["sender"], "a stable id per person"


async def test_rasa_images_and_buttons_become_text(start_chat: StartChat, connect: Connect,
                                                   backend: FakeBackend) -> None:
    backend.mode = "rich"
    url = await start_chat(bot="rasa", bot_url=backend.url)
    peer = await connect(url)
    await peer.say("show me", user="Rae")
    assert [r["body"] for r in await peer.take("botmessage", 3)] == [
        "https://example.org/cat.png", "Pick one:", "Options: Yes | No"]


async def test_an_empty_rasa_answer_is_no_reply_not_a_failure(start_chat: StartChat, connect: Connect,
                                                              backend: FakeBackend) -> None:
    backend.mode = "empty"
    url = await start_chat(bot="rasa", bot_url=backend.url)
    peer = await connect(url)
    await peer.say("mumble", user="Rae")
    await wait_until(lambda: len(backend.requests) == 1)
    backend.mode = "ok"
    await peer.say("hello", user="Rae")
    assert (await peer.next("botmessage"))["body"] == "You said: hello"
    assert not [s for s in peer.pending("system") if "unavailable" in s["text"]]


async def test_openai_mode_streams_and_sends_one_bot_message_while_showing_the_bot_typing(
        start_chat: StartChat, connect: Connect, backend: FakeBackend) -> None:
    url = await start_chat(bot="openai", bot_url=backend.url + "/v1", bot_model="tiny")
    peer = await connect(url)
    await peer.say("hi model", user="Oli")
    assert (await peer.next("typing"))["users"] == ["ChatFriend"]
    reply = await peer.next("botmessage")
    assert (reply["user"], reply["body"]) == ("ChatFriend", "Hello from the model.")
    assert (await peer.next("typing"))["users"] == []
    request = backend.requests[0]
    assert request["model"] == "tiny" and request["stream"] is True
    assert request["messages"][0]["role"] == "system" and "ChatFriend" in request["messages"][0]["content"]


async def test_openai_mode_accepts_a_non_streamed_answer(start_chat: StartChat, connect: Connect,
                                                         backend: FakeBackend) -> None:
    backend.mode = "whole"
    url = await start_chat(bot="openai", bot_url=backend.url + "/v1")
    peer = await connect(url)
    await peer.say("hi", user="Oli")
    assert (await peer.next("botmessage"))["body"] == "A whole answer."


async def test_openai_context_is_the_rooms_last_k_messages_with_roles(
        start_chat: StartChat, connect: Connect, backend: FakeBackend) -> None:
    url = await start_chat(bot="openai", bot_url=backend.url + "/v1", bot_context=4, rate=0,
                           bot_prompt="Be terse.")
    peer, elsewhere = await connect(url), await connect(url)
    await elsewhere.join("other", user="Eve")
    await peer.say("first", user="Oli")
    await peer.next("botmessage")
    await elsewhere.say("not in this room", user="Eve")
    await elsewhere.next("botmessage")
    await peer.say("second", user="Ann")
    await peer.next("botmessage")
    await peer.say("third", user="Oli")
    await peer.next("botmessage")
    assert backend.requests[-1]["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "assistant", "content": "Hello from the model."},
        {"role": "user", "content": "Ann: second"},
        {"role": "assistant", "content": "Hello from the model."},
        {"role": "user", "content": "Oli: third"},
    ]


async def test_the_api_key_comes_from_the_environment(start_chat: StartChat, connect: Connect,
                                                      backend: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    url = await start_chat(bot="openai", bot_url=backend.url + "/v1")
    peer = await connect(url)
    await peer.say("no key", user="Oli")
    await peer.next("botmessage")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    await peer.say("with key", user="Oli")
    await peer.next("botmessage")
    assert "Authorization" not in backend.headers[0]
    assert backend.headers[1]["Authorization"] == "Bearer sk-test-123"


FAILURES = [("rasa", "status 500"), ("rasa", "error body"), ("rasa", "malformed JSON"), ("rasa", "slow"),
            ("rasa", "refused"), ("openai", "status 401"), ("openai", "status 404"), ("openai", "malformed JSON"),
            ("openai", "error in stream"), ("openai", "bad chunk"), ("openai", "truncated"), ("openai", "slow"),
            ("openai", "refused")]


@pytest.mark.slow
@pytest.mark.parametrize(("bot", "mode"), FAILURES, ids=[f"{b}-{m}" for b, m in FAILURES])
async def test_a_failing_bot_never_hurts_the_chat(start_chat: StartChat, connect: Connect, backend: FakeBackend,
                                                  caplog: pytest.LogCaptureFixture, bot: str, mode: str) -> None:
    backend.mode = mode
    base = f"http://127.0.0.1:{free_port()}" if mode == "refused" else backend.url
    url = await start_chat(bot=bot, bot_url=base + ("/v1" if bot == "openai" else ""), bot_timeout=0.5, rate=0)
    peer, other_room = await connect(url), await connect(url)
    await other_room.join("elsewhere", user="Else")
    await peer.say("are you there?", user="Una")
    assert (await peer.next("newmessage"))["body"] == "are you there?", "the message is delivered as always"
    assert (await peer.next("system"))["text"] == "Una joined"
    line = await peer.next("system", timeout=5)
    assert line["text"] == "ChatFriend is unavailable right now."
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "Traceback" not in caplog.text
    await peer.say("still there?", user="Una")  # the next message tries again, without a second line
    await wait_until(lambda: len([r for r in caplog.records if "is unavailable" in r.getMessage()]) == 2)
    await peer.say("marker", user="Una")
    await peer.take("newmessage", 2)
    assert peer.pending("system") == [], "at most one unavailable line a minute"
    assert [s["text"] for s in other_room.pending("system")] == ["Else joined"], "no other room affected"
    await other_room.say("other room fine", user="Else")
    assert (await other_room.next("newmessage"))["body"] == "other room fine"


async def test_at_most_four_bot_calls_run_at_once(start_chat: StartChat, connect: Connect,
                                                 backend: FakeBackend) -> None:
    backend.release.clear()
    url = await start_chat(bot="rasa", bot_url=backend.url, rate=0)
    peer = await connect(url)
    for i in range(7):
        assert (await peer.say(f"q{i}", user="Q"))["ok"], "chat traffic never waits for the bot"
    await wait_until(lambda: backend.in_flight == 4)
    backend.release.set()
    await peer.take("botmessage", 14)
    assert backend.most_in_flight == 4


BOT_LOOKALIKES = {  # spellings of ChatFriend that render (almost) alike, and what hides in them
    "combining grapheme joiner": "ChatFriend\u034f", "variation selector": "ChatFriend\ufe0f",
    "Mongolian free variation selector": "ChatFriend\u180b", "braille blank": "ChatFriend\u2800",
    "Hangul filler": "Chat\u3164Friend", "Cherokee C": "\u13dfhatFriend", "Cherokee small c": "\uabafhatFriend",
    "small capital C": "\u1d04hatFriend", "IPA h with hook": "C\u0266atFriend", "Armenian ho": "C\u0570atFriend",
    "soft hyphen": "Chat\u00adFriend", "tag characters": "ChatFriend\U000e0041",
}


@pytest.mark.parametrize("name", BOT_LOOKALIKES.values(), ids=BOT_LOOKALIKES.keys())
def test_look_alikes_of_the_bots_name_are_reserved(name: str) -> None:
    with pytest.raises(chat.InvalidInput) as refused:
        chat.clean_user(name, "ChatFriend")
    assert refused.value.code == "reserved_name"


@pytest.mark.parametrize("name", ["\u3164", "\u034f", "\u2800", "\u115f\u1160", "\ufe0f", "\u0301\u0301", "\u00ad"])
def test_a_name_that_shows_nothing_is_refused(name: str) -> None:
    with pytest.raises(chat.InvalidInput) as refused:
        chat.clean_user(name, "ChatFriend")
    assert refused.value.code == "bad_user"


def test_names_in_other_scripts_are_kept_as_typed() -> None:
    for name in ("Zoë", "Ꮎsage", "Հայկ", "李雷", "Ana 🙂", "ʙob"):
        assert chat.clean_user(name, "ChatFriend") == name


@settings(max_examples=1, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=("Cs", "Cn")), min_size=1, max_size=12),
                min_size=300, max_size=300))
def test_the_page_and_the_server_agree_on_every_name_key(names: list[str]) -> None:
    require(shutil.which("node") is not None, "node")
    corpus = [*names, *BOT_LOOKALIKES.values(), "ChatFriend", "Chat Friend", "straße", "STRASSE", "ꮯ", "Ꮯ"]
    script = chat.page_script()
    folding = script[script.index("const FOLDING"):script.index("const BOT_KEY")]
    program = (folding + "\nconst names = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
               "process.stdout.write(JSON.stringify(names.map(nameKey)));\n")
    result = subprocess.run(["node", "-e", program], input=json.dumps(corpus), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    page_keys = json.loads(result.stdout)
    differ = [(n, k, chat.name_key(n)) for n, k in zip(corpus, page_keys, strict=True) if k != chat.name_key(n)]
    assert differ == [], differ[:5]


async def test_the_bot_can_be_renamed_and_its_new_name_is_reserved(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(bot_name="Helper")
    peer = await connect(url)
    await peer.say("hi?", user="ChatFriend")  # the old name is free now
    assert (await peer.next("botmessage"))["user"] == "Helper"
    assert (await peer.say("x", user="helper"))["code"] == "reserved_name"


async def test_the_start_up_check_of_an_openai_backend_sends_the_api_key(
        start_chat: StartChat, backend: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    backend.api_key = "sk-test"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    await start_chat(bot="openai", bot_url=backend.url + "/v1")
    await wait_until(lambda: bool(backend.model_checks))
    assert backend.model_checks == ["Bearer sk-test"]
    assert "not reachable" not in caplog.text


async def test_a_bot_reply_longer_than_a_message_is_capped(start_chat: StartChat, connect: Connect,
                                                              backend: FakeBackend) -> None:
    backend.mode = "long"
    url = await start_chat(bot="rasa", bot_url=backend.url, rate=0)
    peer = await connect(url)
    await peer.say("tell me everything")
    reply = (await peer.next("botmessage"))["body"]
    assert len(reply) == 2000 and reply.endswith("…")


async def test_a_bot_call_that_waits_too_long_for_a_slot_is_dropped(
        start_chat: StartChat, connect: Connect, backend: FakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    backend.release.clear()  # the calls that get a slot hang until the timeout
    url = await start_chat(bot="rasa", bot_url=backend.url, rate=0, bot_timeout=0.5)
    peer = await connect(url)
    for i in range(12):  # four slots: the last four would wait two timeouts for one
        assert (await peer.say(f"q{i}", user="Q"))["ok"]

    def dropped() -> int:
        return sum("bot busy: dropped" in r.getMessage() for r in caplog.records)

    await wait_until(lambda: dropped() >= 4 and dropped() + len(backend.requests) == 12)
    backend.release.set()
    assert len(backend.requests) <= 8, "calls dropped while waiting for a slot never reached the backend"


async def test_start_up_warns_when_the_bot_backend_is_down_but_starts(
        start_chat: StartChat, connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    url = await start_chat(bot="rasa", bot_url=f"http://127.0.0.1:{free_port()}")
    await wait_until(lambda: "not reachable" in caplog.text)
    (line,) = [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]
    assert "cannot connect" in line and "the chat works" in line
    assert (await (await connect(url)).say("still here?"))["ok"]


GOOD_RULES = {
    "rules": [
        {"name": "thanks", "words": ["thanks", "thank you"], "replies": ["You're welcome, {user}!"], "stop": True},
        {"name": "price", "pattern": r"\b(price|cost)s?\b", "replies": ["It is free."]},
        {"words": ["hello"], "replies": ["Hi {user}."]},
    ],
    "fallback": ["Tell me more."],
}


async def test_a_rules_file_drives_the_keyword_bot(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(GOOD_RULES))
    bot = chat.KeywordBot(chat.load_rules(path))

    async def ask(text: str) -> list[str]:
        return await bot.reply(chat.BotTurn("Kai", text, "lobby", "id"))

    assert await ask("thank you, hello") == ["You're welcome, Kai!"]
    assert await ask("Hello, what does it cost?") == ["It is free.", "Hi Kai."]
    assert await ask("PRICES?") == ["It is free."]
    assert await ask("nothing matches") == ["Tell me more."]
    assert await ask("othello") == ["Tell me more."], "words match whole words only"


def test_the_default_rules_are_valid_rules() -> None:
    rules, fallback = chat.parse_rules(chat.DEFAULT_RULES)
    assert [r.name for r in rules] == ["greeting", "question", "no question"] and fallback == ()


BAD_RULES = {
    "not JSON": ("{rules: []", "not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    "not an object": ("[]", "must hold a JSON object"),
    "no rules": ('{"fallback": ["x"]}', '"rules" must be a non-empty list'),
    "unknown key": ('{"rules": [{"words": ["a"], "replies": ["b"]}], "extra": 1}', "unknown top-level key(s): extra"),
    "rule not an object": ('{"rules": ["hi"]}', "rule 1: must be an object"),
    "neither words nor pattern": ('{"rules": [{"name": "r", "replies": ["b"]}]}',
                                  "rule 1 ('r'): give exactly one of 'words' or 'pattern'"),
    "both": ('{"rules": [{"words": ["a"], "pattern": "b", "replies": ["c"]}]}', "give exactly one of"),
    "empty words": ('{"rules": [{"words": [], "replies": ["c"]}]}', "'words' must be a non-empty list"),
    "bad regex": ('{"rules": [{"words": ["a"], "replies": ["b"]}, {"name": "bad", "pattern": "(", "replies": ["c"]}]}',
                  "rule 2 ('bad'): 'pattern' is not a valid regular expression"),
    "no replies": ('{"rules": [{"words": ["a"]}]}', "'replies' must be a non-empty list"),
    "unknown placeholder": ('{"rules": [{"words": ["a"], "replies": ["hi {name}"]}]}', "may only use {user}"),
    "broken template": ('{"rules": [{"words": ["a"], "replies": ["hi {user"]}]}', "bad template"),
    "bad stop": ('{"rules": [{"words": ["a"], "replies": ["b"], "stop": "yes"}]}', "'stop' must be true or false"),
    "bad fallback": ('{"rules": [{"words": ["a"], "replies": ["b"]}], "fallback": "x"}', "fallback: 'replies' must"),
}


@pytest.mark.slow
@pytest.mark.parametrize(("text", "message"), BAD_RULES.values(), ids=BAD_RULES.keys())
def test_a_bad_rules_file_stops_chat_py_with_one_line_naming_the_problem(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(text)
    result = subprocess.run([sys.executable, str(HERE / "chat.py"), "--bot-rules", str(path), "--port", "0"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"chat.py: --bot-rules {path}: ")
    assert message in result.stderr


def test_a_missing_rules_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--bot-rules", str(tmp_path / "none.json")], capsys) == (
        2, f"chat.py: --bot-rules {tmp_path / 'none.json'}: no such file\n")


# ---------------------------------------------------------------- scale out: several nodes through Redis


class RedisServer:
    """A real redis-server on a free loopback port, with no persistence; can be stopped and restarted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server() -> Any:
    require(shutil.which("redis-server") is not None, "redis-server")
    require(importlib.util.find_spec("redis") is not None, "the redis Python package")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nodes(redis_server: RedisServer, chat_process: Any) -> Any:
    """Start chat.py processes that share the test's Redis; returns a function that starts one more."""

    def start(*extra: str, **kwargs: Any) -> tuple[ChatProcess, str]:
        return chat_process("--redis", redis_server.url, "--presence-ttl", "1.5", "--rate", "0", *extra, **kwargs)

    return start


def two_nodes(nodes: Any, **kwargs: Any) -> tuple[str, str]:
    """Two nodes, the bot off, sharing the test's Redis: their URLs."""
    return nodes("--bot", "off", **kwargs)[1], nodes("--bot", "off", **kwargs)[1]


@pytest.mark.redis
async def test_two_nodes_are_one_chat(nodes: Any, connect: Connect) -> None:
    url_a, url_b = two_nodes(nodes)
    ann, bob, lou = await connect(url_a), await connect(url_b), await connect(url_b)
    await ann.join("team", user="Ann")
    ack = await bob.join("team", user="Bob")
    assert ack["members"] == ["Ann", "Bob"], "presence across nodes"
    await ann.say("from A", user="Ann")
    await bob.say("from B", user="Bob")
    for peer in (ann, bob):
        assert {m["body"] for m in await peer.take("newmessage", 2)} == {"from A", "from B"}
    await lou.say("lobby marker", user="Lou")
    assert (await lou.next("newmessage"))["body"] == "lobby marker", "room isolation across nodes"
    await ann.say("team marker", user="Ann")
    assert (await bob.next("newmessage"))["body"] == "team marker"
    assert bob.pending("newmessage") == []
    members_a = (await (await connect(url_a)).join("team"))["members"]
    members_b = (await (await connect(url_b)).join("team"))["members"]
    assert members_a == members_b == ["Ann", "Bob"], "presence lists agree"


@pytest.mark.redis
async def test_exactly_one_node_answers_as_the_bot(nodes: Any, connect: Connect) -> None:
    _, url_a = nodes()
    _, url_b = nodes()
    ann, bob = await connect(url_a), await connect(url_b)
    await ann.join("r", user="Ann")
    await bob.join("r", user="Bob")
    await bob.say("first", user="Bob")
    assert (await ann.next("botmessage"))["body"] == "Did you have a question for us today?"
    await bob.say("second", user="Bob")
    await ann.take("botmessage", 1)
    history = (await (await connect(url_a)).join("r"))["history"]
    assert [(m["kind"], m["body"]) for m in history] == [
        ("user", "first"), ("bot", "Did you have a question for us today?"),
        ("user", "second"), ("bot", "Did you have a question for us today?")]


@pytest.mark.redis
async def test_reconnecting_to_another_node_replays_exactly_the_missed_messages(
        nodes: Any, connect: Connect) -> None:
    url_a, url_b = two_nodes(nodes)
    writer = await connect(url_a)
    await writer.join("replay", user="Wes")
    reader = await connect(url_a)
    await reader.join("replay", user="Rea")
    seen = (await writer.say("seen", user="Wes"))["id"]
    await reader.next("newmessage")
    await reader.sio.disconnect()
    missed = [(await writer.say(f"missed {i}", user="Wes"))["id"] for i in range(5)]
    back = await connect(url_b)
    ack = await back.join("replay", user="Rea", since=seen)
    assert [m["id"] for m in ack["history"]] == missed
    assert ack["complete"] is True
    assert (await back.say("dup", user="Rea", cid="k1"))["id"] == (await writer.say("dup", user="Wes", cid="k1"))["id"], \
        "cid de-duplication works across nodes"


@pytest.mark.redis
async def test_when_a_node_dies_its_users_leave_the_other_nodes_presence(nodes: Any, connect: Connect) -> None:
    node_a, url_a = nodes()
    _, url_b = nodes()
    ann, bob = await connect(url_a), await connect(url_b)
    await ann.join("r", user="Ann")
    assert (await bob.join("r", user="Bob"))["members"] == ["Ann", "Bob"]
    node_a.proc.kill()  # SIGKILL: no goodbye
    started = time.monotonic()
    while True:
        presence = await bob.next("presence", timeout=10)
        if presence["members"] == ["Bob"]:
            break
    assert time.monotonic() - started < 5, "the bound is --presence-ttl plus one heartbeat"
    await bob.say("B still works", user="Bob")
    assert (await bob.next("newmessage"))["body"] == "B still works"


@pytest.mark.redis
async def test_a_redis_restart_breaks_nothing_and_cross_node_delivery_resumes(
        redis_server: RedisServer, nodes: Any, connect: Connect) -> None:
    node_a, url_a = nodes("--bot", "off")
    node_b, url_b = nodes("--bot", "off")
    ann, bob = await connect(url_a), await connect(url_b)
    ann2 = await connect(url_a)
    redis_server.stop()
    assert (await ann.say("during the outage", user="Ann"))["ok"]
    assert (await ann2.next("newmessage"))["body"] == "during the outage", "local chat continues"
    redis_server.start()
    deadline = time.monotonic() + 20
    while True:  # cross-node delivery comes back once the nodes notice Redis is back
        await ann.say("probe", user="Ann")
        try:
            msg = await bob.next("newmessage", timeout=0.5)
        except asyncio.TimeoutError:
            assert time.monotonic() < deadline, "cross-node delivery did not resume"
            continue
        if msg["body"] == "probe":
            break
    while True:  # and the other way, once node B has noticed too
        await bob.say("back from B", user="Bob")
        try:
            while (await ann.next("newmessage", timeout=0.5))["body"] != "back from B":
                pass  # Ann's own probes
            break
        except asyncio.TimeoutError:
            assert time.monotonic() < deadline, "delivery from B to A did not resume"
    assert node_a.proc.poll() is None and node_b.proc.poll() is None
    _, _, err = node_a.stop()
    assert err.count("Redis is unreachable") == 1 and "Redis is back" in err
    assert "Traceback" not in err


@pytest.mark.redis
async def test_during_a_redis_outage_a_node_numbers_on_from_the_ids_it_relayed(
        redis_server: RedisServer, nodes: Any, connect: Connect) -> None:
    url_a, url_b = two_nodes(nodes)
    ann, bob = await connect(url_a), await connect(url_b)
    ids = [(await ann.say(f"from A {i}", user="Ann"))["id"] for i in range(10)]
    relayed = await bob.take("newmessage", 10)
    assert [m["id"] for m in relayed] == ids, "node B relayed A's ids"
    redis_server.stop()
    during = [await bob.say(f"from B {i}", user="Bob") for i in range(3)]
    assert all(ack["ok"] for ack in during)
    assert [ack["id"] for ack in during] == sorted(ack["id"] for ack in during)
    assert during[0]["id"] > max(ids), "ids never go backwards on a node that only relayed them"


async def send_concurrently(senders: list[Peer], count: int, tag: str) -> list[dict[str, Any]]:
    """Every sender sends `count` messages, all senders at once; returns every ack."""
    async def one(peer: Peer, n: int) -> list[dict[str, Any]]:
        return [await peer.say(f"{tag} {n}.{i}", user=f"S{n}") for i in range(count)]

    return [ack for acks in await asyncio.gather(*(one(p, n) for n, p in enumerate(senders))) for ack in acks]


@pytest.mark.redis
async def test_with_redis_every_client_receives_messages_in_id_order_across_nodes(
        nodes: Any, connect: Connect) -> None:
    url_a, url_b = two_nodes(nodes)
    watchers = [await connect(url_a), await connect(url_b), await connect(url_b, transports=["polling"])]
    senders = [await connect(url) for url in (url_a, url_a, url_b, url_b)]
    acks = await send_concurrently(senders, 100, "order")
    assert all(ack["ok"] for ack in acks)
    expected = sorted(ack["id"] for ack in acks)
    assert len(set(expected)) == 400
    for watcher in watchers:
        got = [m["id"] for m in await watcher.take("newmessage", 400)]
        assert got == expected, "delivered in id order, whichever node numbered them"


@pytest.mark.redis
@pytest.mark.slow
async def test_with_redis_the_highest_id_seen_is_an_exact_resume_point(nodes: Any, connect: Connect) -> None:
    """A client that drops at any moment and rejoins the other node with since=highest id seen
    (broadcasts and its own acks alike) misses nothing."""
    url_a, url_b = two_nodes(nodes)
    senders = [await connect(url) for url in (url_a, url_a, url_b, url_b)]
    traffic = asyncio.create_task(send_concurrently(senders, 150, "resume"))
    seen: set[int] = set()
    for round_ in range(20):
        reader = await connect(url_a if round_ % 2 else url_b)
        if seen:
            replay = await reader.join("lobby", since=max(seen))
            assert replay["ok"] and replay["complete"]
            seen.update(m["id"] for m in replay["history"])
        own = await reader.say(f"reader {round_}", user=f"Reader{round_}")
        seen.add(own["id"])
        await asyncio.sleep(0.01 * (round_ % 5))
        seen.update(m["id"] for m in reader.pending("newmessage"))
        await reader.sio.disconnect()
    acks = await traffic
    final = await connect(url_b)
    seen.update(m["id"] for m in (await final.join("lobby", since=max(seen)))["history"])
    sent = {ack["id"] for ack in acks}
    assert sent - seen == set(), f"never shown: {sorted(sent - seen)[:10]}"


async def ids_through_an_outage(redis_server: RedisServer, nodes: Any, connect: Connect,
                                outage: Callable[[], Awaitable[None]]) -> list[int]:
    """Acked ids of concurrent senders on two nodes while `outage` happens to Redis."""
    url_a, url_b = two_nodes(nodes)
    senders = [await connect(url) for url in (url_a, url_a, url_b, url_b)]
    await send_concurrently(senders, 5, "before")
    traffic = asyncio.create_task(send_concurrently(senders, 30, "during"))
    await outage()
    acks = await traffic
    acks += await send_concurrently(senders, 5, "after")
    assert all(ack["ok"] for ack in acks)
    return [ack["id"] for ack in acks]


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("outage", ["killed and restarted empty", "paused for 3 s"])
async def test_ids_stay_unique_across_nodes_when_redis_goes_away(
        redis_server: RedisServer, nodes: Any, connect: Connect, outage: str) -> None:
    async def go_away() -> None:
        await asyncio.sleep(0.1)
        assert redis_server.proc is not None
        if outage.startswith("killed"):
            redis_server.proc.kill()
            redis_server.proc.wait(10)
            await asyncio.sleep(0.3)
            redis_server.start()  # empty: no persistence
        else:
            redis_server.proc.send_signal(signal.SIGSTOP)  # calls time out, then Redis runs them late
            await asyncio.sleep(3)
            redis_server.proc.send_signal(signal.SIGCONT)

    ids = await ids_through_an_outage(redis_server, nodes, connect, go_away)
    assert len(set(ids)) == len(ids), "two messages never share an id"


@pytest.mark.redis
async def test_a_redis_restart_while_idle_does_not_start_ids_over(
        redis_server: RedisServer, nodes: Any, connect: Connect) -> None:
    url_a, url_b = two_nodes(nodes)
    ann, bob = await connect(url_a), await connect(url_b)
    before = [(await ann.say(f"before {i}", user="Ann"))["id"] for i in range(4)]
    await bob.take("newmessage", 4)
    redis_server.stop()
    redis_server.start()  # nobody talked meanwhile: no node saw it go
    after = [(await peer.say("after", user="Someone"))["id"] for peer in (bob, ann)]
    assert min(after) > max(before) and len(set(after)) == 2


@pytest.mark.redis
async def test_after_a_redis_outage_the_shared_id_counter_is_raised_past_the_ids_handed_out(
        redis_server: RedisServer, nodes: Any, connect: Connect) -> None:
    node, url = nodes("--bot", "off")
    ann = await connect(url)
    await ann.say("before", user="Ann")
    redis_server.stop()
    during = [(await ann.say(f"during {i}", user="Ann"))["id"] for i in range(5)]
    redis_server.start()  # without persistence: its counter starts again from 0
    await asyncio.to_thread(node.stderr.wait_for, "Redis is back", 20)
    after = (await ann.say("after", user="Ann"))["id"]
    assert after > max(during)


@pytest.mark.redis
async def test_appends_of_one_event_loop_iteration_are_one_redis_call_and_one_published_batch(
        redis_server: RedisServer) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    listener = aioredis.Redis.from_url(redis_server.url).pubsub()
    await listener.subscribe(chat.REDIS_CHANNEL)
    assert (await listener.get_message(timeout=5))["type"] == "subscribe"
    store = chat.RedisStore(client, chat.RedisHealth(client), 100, "test-node")
    await store.open()
    await client.script_load(chat.REDIS_APPEND)  # so that the first call is not EVALSHA, NOSCRIPT, EVALSHA
    await client.config_resetstat()

    async def deliver() -> list[dict[str, Any]]:  # what every node's manager does with a published batch
        published = await listener.get_message(ignore_subscribe_messages=True, timeout=5)
        batch = json.loads(published["data"])["batch"]
        for item in batch:
            store.claim(item["data"]["id"], item["data"].get("cid"))
        return batch

    delivering = asyncio.create_task(deliver())
    results = await asyncio.gather(*(store.append("team", f"U{i}", f"m{i}", "user", f"cid-{i % 12}")
                                     for i in range(15)))
    batch = await delivering
    assert [item["data"]["body"] for item in batch] == [f"m{i}" for i in range(12)], "in the order handled"
    assert [item["event"] for item in batch] == ["newmessage"] * 12 and {i["room"] for i in batch} == {"team"}
    ids = [message.id for message, _ in results]
    assert ids[:12] == sorted(ids[:12]) and len(set(ids[:12])) == 12, "ids rise in the order handled"
    assert [created for _, created in results] == [True] * 12 + [False] * 3
    assert ids[12:] == ids[:3], "a resent cid in the same batch gets the first copy's id"
    stats = await client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1, "one round trip for the whole batch"
    assert (await listener.get_message(timeout=0.2)) is None, "and one published message"
    assert [m.body for m in await store.recent("team", 50)] == [f"m{i}" for i in range(12)]
    await listener.aclose()
    await client.aclose()


def test_a_plain_ascii_body_loses_exactly_what_the_general_rule_removes() -> None:
    every = "".join(map(chr, range(128)))
    kept = "".join(ch for ch in f"x{every}x".replace("\r", "\n") if ch == "\n" or unicodedata.category(ch) != "Cc")
    assert chat.clean_body(f"x{every}x", 2000) == kept, "the ASCII fast path"
    assert chat.clean_body(f"x{every}xé", 2000) == kept + "é", "the general path"
    assert chat.name_key("Ann\u200b") == chat.name_key("ann") != chat.name_key("Ann B"), "names still fold"


def test_an_unreachable_redis_at_start_exits_with_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, err = run_main(["--port", "0", "--redis", f"redis://127.0.0.1:{port}/0"], capsys)
    assert code == 1
    assert err.startswith(f"chat.py: cannot reach Redis at redis://127.0.0.1:{port}/0") and err.count("\n") == 1


def test_without_the_redis_package_redis_mode_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in [name for name in sys.modules if name == "redis" or name.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what `import redis` meets where it is not installed
    assert run_main(["--port", "0", "--redis", "redis://127.0.0.1:1/0"], capsys) == (
        1, f"chat.py: --redis needs the redis package: {sys.executable} -m pip install '{chat.REDIS_REQUIREMENT}'\n")


# ---------------------------------------------------------------- safety: every input untrusted


async def assert_chat_still_works(url: str, connect: Connect) -> None:
    """After any abuse, a fresh pair of clients must still exchange a message."""
    first, second = await connect(url), await connect(url, transports=["polling"])
    await first.say("still alive?", user="Checker")
    assert (await second.next("newmessage"))["body"] == "still alive?"


async def assert_nothing_was_broadcast(watcher: Peer) -> None:
    """Neither a message nor a bot reply went out before the watcher's own marker message."""
    marker = await watcher.say("marker", user="Watcher")
    assert (await watcher.next("newmessage"))["id"] == marker["id"]
    assert all(reply["id"] > marker["id"] for reply in watcher.pending("botmessage"))


DEEP = {"user": "A", "body": "x"}
for _ in range(200):
    DEEP = {"a": DEEP}

BAD_PAYLOADS = {
    "null": None, "string": "hello", "number": 42, "boolean": True, "list": ["A", "hi"], "empty object": {},
    "no body": {"user": "A"}, "no user": {"body": "hi"}, "user not a string": {"user": 5, "body": "hi"},
    "body not a string": {"user": "A", "body": ["hi"]}, "body an object": {"user": "A", "body": {"x": 1}},
    "empty user": {"user": "", "body": "hi"}, "blank user": {"user": " \t ", "body": "hi"},
    "empty body": {"user": "A", "body": ""}, "blank body": {"user": "A", "body": " \n\t "},
    "user too long": {"user": "A" * 33, "body": "hi"}, "body too long": {"user": "A", "body": "x" * 2001},
    "control character in user": {"user": "A\x07B", "body": "hi"},
    "only control characters in body": {"user": "A", "body": "\x00\x01\x1b"},
    "deeply nested": DEEP, "large list": [0] * 20000,
    "bot name": {"user": "ChatFriend", "body": "hi"}, "bot name, other case": {"user": "chatfriend", "body": "hi"},
    "bot name, spaces": {"user": "  Chat Friend ", "body": "hi"},
    "bot name, zero-width": {"user": "Chat\u200bFriend", "body": "hi"},
    "bot name, full-width": {"user": "\uff23\uff48\uff41\uff54\uff26\uff52\uff49\uff45\uff4e\uff44", "body": "hi"},
    "bot name, Cyrillic C": {"user": "\u0421hatFriend", "body": "hi"},
    "bot name, Greek capitals": {"user": "CHATFR\u0399\u0395ND", "body": "hi"},
    "bot name, digit one": {"user": "ChatFr1end", "body": "hi"},
    "lone surrogate in user": {"user": "A\ud800", "body": "hi"},
    "lone surrogate in body": {"user": "A", "body": "hi \udfff"},
    "bad cid": {"user": "A", "body": "hi", "cid": {"x": 1}},
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
async def test_a_malformed_message_is_refused_with_a_reason_in_the_ack(
        url: str, connect: Connect, payload: Any) -> None:
    sender, watcher = await connect(url), await connect(url)
    ack = await sender.sio.call("newmessage", payload, timeout=10)
    assert ack["ok"] is False
    assert isinstance(ack["error"], str) and ack["error"]
    assert sender.sio.connected
    await assert_nothing_was_broadcast(watcher)
    await assert_chat_still_works(url, connect)


@pytest.mark.parametrize("payload", [None, "hello", {"user": "A"}, {"user": "ChatFriend", "body": "hi"}, DEEP],
                         ids=["null", "string", "no body", "bot name", "deeply nested"])
async def test_without_an_ack_the_refusal_arrives_as_a_chat_error_event(
        url: str, connect: Connect, payload: Any) -> None:
    sender = await connect(url)
    await sender.sio.emit("newmessage", payload)
    error = await sender.next("chat_error")
    assert error["error"] and error["code"]
    await assert_chat_still_works(url, connect)


async def test_extra_arguments_are_refused(url: str, connect: Connect) -> None:
    sender = await connect(url)
    ack = await sender.sio.call("newmessage", ({"user": "A", "body": "hi"}, "extra"), timeout=10)
    assert ack["ok"] is False


async def test_unknown_and_reserved_event_names_are_refused(url: str, connect: Connect) -> None:
    sender = await connect(url)
    for event in ("nonsense", "disconnect", "connect"):
        await sender.sio.emit(event, {"x": 1})
        assert (await sender.next("chat_error"))["code"] in ("unknown_event", "bad_event")
    assert (await sender.say("I am still here"))["ok"]
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
        assert (await resp.json())["clients"] == 1


@pytest.mark.parametrize("event", ["*", "*invalid*", "connect", "disconnect", "connect_error", "message",
                                   "newmessage ", "", "ping"])
@pytest.mark.parametrize("payload", [None, "team", "lobby", {"room": "team"}])
async def test_an_odd_event_name_is_refused_to_the_sender_only(url: str, connect: Connect, event: str,
                                                             payload: Any) -> None:
    same_room, other_room = await connect(url), await connect(url)
    await other_room.join("team")
    sender = await connect(url)
    if payload is None:
        await sender.sio.emit(event)
    else:
        await sender.sio.emit(event, payload)
    refusal = await sender.next("chat_error")
    assert refusal["code"] in ("unknown_event", "bad_event")
    assert (await sender.say("still here"))["ok"]
    await same_room.next("newmessage")  # everything the server sent before this has arrived
    assert same_room.pending("chat_error") == [] and other_room.pending("chat_error") == []


async def test_a_message_for_another_room_is_refused_and_never_posted_here(url: str, connect: Connect) -> None:
    sender, watcher = await connect(url), await connect(url)
    await sender.join("team")
    await watcher.join("team")
    refusal = await sender.say("typed in the lobby", room="lobby")
    assert refusal["code"] == "not_in_room"
    assert (await sender.say("typed in team", room="team"))["ok"]
    assert (await watcher.next("newmessage"))["body"] == "typed in team"


async def test_a_rate_limited_message_says_how_long_to_wait(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=5, burst=1)
    peer = await connect(url)
    assert (await peer.say("one"))["ok"]
    refusal = await peer.say("two")
    assert refusal["code"] == "rate_limited"
    assert 1 <= refusal["retry_after_ms"] <= 201
    await asyncio.sleep(refusal["retry_after_ms"] / 1000)
    assert (await peer.say("two"))["ok"]


async def test_the_join_ack_names_the_id_sequence_and_a_foreign_one_restarts_the_replay(
        start_chat: StartChat, connect: Connect) -> None:
    peer = await connect(await start_chat(rate=0, bot="off"))
    first = await peer.join("lobby")
    await peer.say("one")
    await peer.say("two")
    same = await peer.join("lobby", since=1, epoch=first["epoch"])
    assert [m["body"] for m in same["history"]] == ["two"] and same["complete"]
    foreign = await peer.join("lobby", since=1, epoch="another-server")
    assert [m["body"] for m in foreign["history"]] == ["one", "two"]
    assert not foreign["complete"] and foreign["epoch"] == first["epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "db", pytest.param("redis", marks=pytest.mark.redis)])
async def test_across_a_restart_ids_continue_or_the_epoch_changes(
        store: str, tmp_path: Path, connect: Connect, request: pytest.FixtureRequest) -> None:
    args = ["--port", str(free_port()), "--rate", "0", "--bot", "off"]
    if store == "db":
        args += ["--db", str(tmp_path / "epoch.db")]
    if store == "redis":
        args += ["--redis", request.getfixturevalue("redis_server").url]
    acks = []
    for _ in range(2):
        server = ChatProcess(*args)
        try:
            peer = await connect(await asyncio.to_thread(server.wait_ready))
            joined = await peer.join("lobby")
            acks.append((joined["epoch"], (await peer.say("hello"))["id"]))
            await peer.sio.disconnect()
        finally:
            assert (await asyncio.to_thread(server.stop))[0] == 0
    (epoch_before, id_before), (epoch_after, id_after) = acks
    if store == "memory":
        assert epoch_after != epoch_before, "a new id sequence must say so"
    else:
        assert epoch_after == epoch_before and id_after > id_before


def test_a_huge_name_is_refused_before_it_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_normalising(form: str, text: str) -> str:
        raise AssertionError(f"normalised {len(text)} characters before checking the length")

    stand_in = type("UnicodeData", (), {"normalize": staticmethod(no_normalising),
                                         "category": staticmethod(unicodedata.category)})
    monkeypatch.setattr(chat, "unicodedata", stand_in)  # chat.py's reference only
    with pytest.raises(chat.InvalidInput) as refused:
        chat.clean_user("\ufdfa" * 21_000, "ChatFriend")  # NFKC would expand it 18-fold
    assert refused.value.code == "bad_user"


async def test_bodies_keep_newlines_and_lose_other_control_characters(url: str, connect: Connect) -> None:
    peer = await connect(url)
    await peer.say("  line one\r\nline\x00 two\x1b[31m\n  ", user="  Zoë \u200b ")
    msg = await peer.next("newmessage")
    assert msg["body"] == "line one\nline two[31m"
    assert msg["user"] == "Zoë"


async def test_a_handler_bug_gives_a_generic_error_and_the_server_survives(
        start_chat: StartChat, connect: Connect, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    url = await start_chat(rate=0)
    sender = await connect(url)
    monkeypatch.setattr(chat.MemoryStore, "append", broken)
    ack = await sender.say("this will hit the bug")
    assert ack == {"ok": False, "error": "Something went wrong on the server; please retry.", "code": "internal"}
    assert "RuntimeError: boom" in caplog.text
    monkeypatch.undo()
    await assert_chat_still_works(url, connect)


def _clearly_valid(payload: Any) -> bool:
    """The README's rules for `newmessage`, written here independently of chat.py's validators:
    True only for payloads the rules plainly accept (plain ASCII names and text, a well-formed cid)."""
    if not isinstance(payload, dict) or set(payload) - {"user", "body", "cid"}:
        return False
    user, body, cid = payload.get("user"), payload.get("body"), payload.get("cid")
    return (isinstance(user, str) and isinstance(body, str) and bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9 ]{0,30}", user))
            and "chat" not in user.lower().replace(" ", "") and bool(re.fullmatch(r"[ -~]{0,2000}", body))
            and bool(body.strip()) and (cid is None or bool(isinstance(cid, str) and re.fullmatch(r"[A-Za-z0-9]{1,64}", cid))))


def _clearly_invalid(payload: Any) -> bool:
    """The README's rules for `newmessage`, written here independently of chat.py's validators:
    True only for payloads the rules plainly refuse (the property test checks those)."""
    if not isinstance(payload, dict):
        return True
    user, body, cid = payload.get("user"), payload.get("body"), payload.get("cid")
    if not isinstance(user, str) or not isinstance(body, str):
        return True
    if not user.strip() or not body.strip() or len(user) > 4 * 32 or len(body) > 4 * 2000:
        return True
    return cid is not None and not (isinstance(cid, str) and re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", cid))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
message_like = st.fixed_dictionaries(
    {}, optional={"user": json_values | st.text(max_size=40), "body": json_values, "cid": json_values})
plain_messages = st.fixed_dictionaries(
    {"user": st.from_regex(r"[A-Za-z][A-Za-z0-9 ]{0,30}", fullmatch=True),
     "body": st.from_regex(r"[ -~]{0,60}[!-~][ -~]{0,60}", fullmatch=True)},
    optional={"cid": st.from_regex(r"[A-Za-z0-9]{1,64}", fullmatch=True)})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=json_values | message_like | plain_messages, with_ack=st.booleans())
async def test_a_valid_payload_is_broadcast_and_an_invalid_one_refused_to_its_sender_only(
        url: str, connect: Connect, payload: Any, with_ack: bool) -> None:
    valid, invalid = _clearly_valid(payload), _clearly_invalid(payload)
    assume(valid or invalid)  # both halves; the payloads in between the oracle cannot call
    sender = await connect(url)
    watcher = await connect(url)
    if valid:
        if "cid" in payload:  # a cid already used in the room is a resend, acked and not shown again
            payload = {**payload, "cid": os.urandom(8).hex()}
        ack = await sender.sio.call("newmessage", payload, timeout=10)
        assert ack["ok"] is True
        shown = await watcher.next("newmessage")
        assert (shown["id"], shown["user"], shown["body"]) == (
            ack["id"], " ".join(payload["user"].split()), payload["body"].strip())
    elif with_ack:
        assert (await sender.sio.call("newmessage", payload, timeout=10))["ok"] is False
        await assert_nothing_was_broadcast(watcher)
    else:
        await sender.sio.emit("newmessage", payload)
        assert (await sender.next("chat_error"))["code"]
        await assert_nothing_was_broadcast(watcher)
    await sender.sio.disconnect()
    await watcher.sio.disconnect()


class RawClient:
    """A bare Engine.IO v4 / Socket.IO v5 client over one TCP connection (WebSocket transport)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, receive_buffer: int | None = None, headers: str = "",
                   sio_connect: bool = True) -> RawClient:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
        status = await reader.readuntil(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101"), status
        client = cls(reader, writer)
        assert (await client.receive()).startswith("0{")  # Engine.IO open
        if not sio_connect:
            return client
        client.send("40")  # Socket.IO connect to the default namespace
        assert (await client.receive()).startswith("40")
        return client

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        length = len(data)
        header = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else
                                  bytes([0x80 | 126]) + length.to_bytes(2, "big") if length < 65536 else
                                  bytes([0x80 | 127]) + length.to_bytes(8, "big"))
        self.writer.write(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    async def receive(self) -> str:
        """The next text frame; a close frame from the server raises ConnectionResetError."""
        head = await self.reader.readexactly(2)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        data = await self.reader.readexactly(length)
        if head[0] & 0x0F == 0x8:
            raise ConnectionResetError(f"closed by the server: {int.from_bytes(data[:2], 'big')}")
        return data.decode()

    def abort(self) -> None:
        self.writer.transport.abort()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_healthy_client_is_never_dropped_for_a_ping_that_came_late(
        chat_process: Any, connect: Connect, transport: str) -> None:
    _, url = chat_process("--ping-interval", "2", "--ping-timeout", "0.3")
    peer = await connect(url, transports=[transport])
    gone = asyncio.Event()
    peer.sio.on("disconnect", lambda *args: gone.set())
    with pytest.raises(asyncio.TimeoutError):  # five pings, each answered, each on time
        await asyncio.wait_for(gone.wait(), 10.5)
    assert peer.sio.connected


def test_a_fractional_ping_interval_is_refused_because_clients_are_told_whole_seconds(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert "argument --ping-interval: must be whole seconds" in usage_error(["--ping-interval", "0.3"],
                                                                           monkeypatch, capsys)


@pytest.mark.slow
async def test_websocket_clients_are_pinged_and_kept_while_they_answer(start_chat: StartChat) -> None:
    url = await start_chat(ping_interval=0.2, ping_timeout=0.4)
    client = await RawClient.open(url)
    pings = 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.5):
            while True:
                if await client.receive() == "2":
                    pings += 1
                    client.send("3")
    assert pings >= 5, "one ping per interval (0.2 s, give or take a fifth of it)"
    assert await clients_connected(url) == 1, "a client that answers stays"
    client.abort()


@pytest.mark.slow
async def test_a_websocket_client_that_stops_answering_pings_is_disconnected(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(ping_interval=0.2, ping_timeout=0.4, presence_grace=0.1)
    watcher = await connect(url)
    await watcher.join("lobby", "Watcher")
    silent = await RawClient.open(url)
    silent.send('42["join",{"room":"lobby","user":"Silent"}]')
    frames = []
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(5):
            while True:  # read, never answer
                frames.append(await silent.receive())
    assert "2" in frames, "it was pinged"
    async with asyncio.timeout(5):
        while not ((event := await watcher.next("system"))["user"] == "Silent" and event["kind"] == "left"):
            pass  # the others see it leave
    await wait_until(lambda: _equals(clients_connected(url), 1))


async def clients_connected(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
        return (await resp.json())["clients"]


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Re-check a condition that no event announces (a plain or an async callable), until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("announced", [1, 1_000_000])
async def test_a_binary_event_closes_that_connection_before_any_attachment_is_kept(
        url: str, connect: Connect, announced: int) -> None:
    raw = await RawClient.open(url)
    raw.send(f'45{announced}-["newmessage",{{"_placeholder":true,"num":0}}]')
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        while True:  # until the server closes it
            await asyncio.wait_for(raw.receive(), 5)
    raw.abort()
    await assert_chat_still_works(url, connect)


async def test_http_garbage_on_the_socketio_endpoint_gets_400s(url: str, connect: Connect) -> None:
    async with aiohttp.ClientSession() as http:
        for query in ("EIO=3&transport=polling", "EIO=4&transport=carrier-pigeon",
                      "EIO=4&transport=polling&sid=not-a-session", "EIO=4&transport=websocket"):
            async with http.get(f"{url}/socket.io/?{query}") as resp:
                assert resp.status == 400, query
        async with http.post(f"{url}/socket.io/?EIO=4&transport=polling&sid=nope", data="42[") as resp:
            assert resp.status == 400
    await assert_chat_still_works(url, connect)


@pytest.mark.parametrize("packet", [
    "42[", "4xyz", '42{"not": "a list"}', "42[1,2]", "4", "42[null]", "42[\"newmessage\"," + "[" * 30000 + "]" * 30000 + "]",
    '42["newmessage",' + '{"a":' * 10000 + "1" + "}" * 10000 + "]"], ids=[
    "unterminated", "bad type", "object", "numbers", "empty", "null event", "30000 nested lists", "10000 nested objects"])
async def test_malformed_packets_are_dropped_with_a_chat_error(url: str, connect: Connect, packet: str) -> None:
    raw = await RawClient.open(url)
    raw.send(packet)
    reply = await asyncio.wait_for(raw.receive(), 5)
    assert reply.startswith('42["chat_error"'), reply
    raw.abort()
    await assert_chat_still_works(url, connect)


def engine_payload_is_valid(body: str) -> bool:
    """Whether a long-polling response is an Engine.IO v4 payload: packets, each with its type."""
    return bool(body) and all(part[:1] in "0123456" and part for part in body.split("\x1e"))


async def polling_session(http_client: aiohttp.ClientSession, url: str) -> str:
    async with http_client.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
        sid = json.loads((await response.text())[1:])["sid"]
    async with http_client.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}", data="40") as response:
        assert response.status == 200
    async with http_client.get(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}") as response:
        assert (await response.text()).startswith("40")
    return sid


@pytest.mark.parametrize("sent", ["41", "451-[\"newmessage\",{\"_placeholder\":true,\"num\":0}]"],
                         ids=["socket.io disconnect", "binary event"])
async def test_every_polling_response_is_a_valid_engine_io_payload(url: str, sent: str) -> None:
    async with aiohttp.ClientSession() as http_client:
        sid = await polling_session(http_client, url)
        poll = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
        held = asyncio.create_task(http_client.get(poll))
        await asyncio.sleep(0.2)  # the GET is waiting on the server (no event to await from outside)
        async with http_client.post(poll, data=sent) as response:
            assert response.status == 200
        async with asyncio.timeout(5):
            response = await held
            body = await response.text()
        assert response.status == 200 and engine_payload_is_valid(body), repr(body)
        if sent.startswith("45"):
            assert "1" in body.split("\x1e"), "a refused binary packet ends the session with a CLOSE"


async def test_a_python_polling_client_that_sends_binary_is_disconnected_promptly(url: str, connect: Connect) -> None:
    peer = await connect(url, transports=["polling"])
    gone = asyncio.Event()
    peer.sio.on("disconnect", lambda *args: gone.set())
    await peer.sio.emit("newmessage", {"user": "Bin", "body": b"\x00\x01"})
    await asyncio.wait_for(gone.wait(), 5)


def test_a_refused_transport_is_logged_with_the_clients_setting_spelled_right(
        caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        stop = asyncio.Event()
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(chat.serve(chat.Settings(port=0), ready, stop))
        url = await ready
        async with aiohttp.ClientSession() as http_client, \
                http_client.get(f"{url}/socket.io/?EIO=4&transport=carrier-pigeon") as response:
            assert response.status == 400
        stop.set()
        await task

    asyncio.run(run())
    assert any("(clients need transports: ['polling', 'websocket'])" in r.getMessage() for r in caplog.records)


async def test_an_oversized_polling_post_gets_413_before_its_body_is_read(url: str, connect: Connect) -> None:
    bystander = await connect(url)
    async with aiohttp.ClientSession() as http, http.get(f"{url}/socket.io/?EIO=4&transport=polling") as resp:
        sid = json.loads((await resp.text())[1:])["sid"]
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Content-Type: text/plain\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n".encode())
    status = await asyncio.wait_for(reader.readline(), 5)  # answered without sending a byte of the body
    writer.close()
    assert status.split()[1] == b"413", status
    await bystander.say("bystander fine")
    assert (await bystander.next("newmessage"))["body"] == "bystander fine"
    await assert_chat_still_works(url, connect)


async def test_an_oversized_websocket_frame_closes_only_that_connection(url: str, connect: Connect) -> None:
    bystander = await connect(url)
    raw = await RawClient.open(url)
    raw.send("42" + json.dumps(["newmessage", {"user": "A", "body": "x" * (2 * 1024 * 1024)}]))
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        while True:  # the server closes this connection
            await asyncio.wait_for(raw.receive(), 5)
    await bystander.say("bystander fine")
    assert (await bystander.next("newmessage"))["body"] == "bystander fine"


@pytest.mark.parametrize("transport", ["polling", "websocket"])
async def test_a_cross_site_page_cannot_connect(url: str, transport: str) -> None:
    with pytest.raises(socketio.exceptions.ConnectionError):
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(url, transports=[transport], headers={"Origin": "http://evil.example"},
                             wait_timeout=5)


async def test_same_origin_and_allowed_origins_can_connect(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(allow_origins=("https://embed.example",))
    await connect(url, headers={"Origin": url}, transports=["polling"])
    await connect(url, headers={"Origin": "https://embed.example"})
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(url, headers={"Origin": "https://other.example"})


@pytest.mark.parametrize("trust_proxy", [True, False])
async def test_origin_behind_a_tls_terminating_proxy_needs_trust_proxy(
        start_chat: StartChat, connect: Connect, trust_proxy: bool) -> None:
    url = await start_chat(trust_proxy=trust_proxy)
    host = url.removeprefix("http://")
    proxied = {"Origin": "https://chat.example", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example"}
    if trust_proxy:
        await connect(url, headers=proxied)
    else:  # anyone can send X-Forwarded-* headers: they count only from your own proxy
        with pytest.raises(socketio.exceptions.ConnectionError):
            await connect(url, headers=proxied)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(url, headers={"Origin": f"https://{host}"})  # no proxy said it was https


@pytest.mark.slow
async def test_a_flood_is_refused_beyond_the_burst_and_then_disconnected(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=5, burst=10, flood_timeout=1.0)
    flooder, bystander = await connect(url), await connect(url)
    acks = [await flooder.say(f"flood {i}", user="Flood") for i in range(12)]
    assert all(a["ok"] for a in acks[:10])
    assert acks[11]["code"] == "rate_limited" and acks[11]["error"] == "You are sending messages too fast; slow down."
    assert 1 <= acks[11]["retry_after_ms"] <= 201  # one token at 5/s
    await bystander.say("I can still talk", user="Calm")
    assert "I can still talk" in [m["body"] for m in await bystander.take("newmessage", 11)]
    deadline = time.monotonic() + 5
    while flooder.sio.connected and time.monotonic() < deadline:  # keeps flooding until thrown out
        await flooder.sio.emit("newmessage", {"user": "Flood", "body": "more"})
        await asyncio.sleep(0.02)
    assert not flooder.sio.connected
    await assert_chat_still_works(url, connect)


async def test_connections_per_address_are_capped_behind_a_trusted_proxy(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(trust_proxy=True, max_per_ip=3)
    same = {"X-Forwarded-For": "203.0.113.7"}
    for _ in range(3):
        await connect(url, headers=same)
    with pytest.raises(socketio.exceptions.ConnectionError, match="too many connections"):
        await connect(url, headers=same)
    await connect(url, headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.8"})


async def test_loopback_is_exempt_from_the_address_cap_without_trust_proxy(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(max_per_ip=2)
    for _ in range(4):  # as through an SSH tunnel: everyone is 127.0.0.1
        await connect(url, headers={"X-Forwarded-For": "203.0.113.7"})


@pytest.mark.slow
async def test_two_hundred_connections_dropped_abruptly_leave_nothing_behind(url: str, connect: Connect) -> None:
    tasks_before = len(asyncio.all_tasks())  # the server runs in this event loop
    raws = await asyncio.gather(*(RawClient.open(url) for _ in range(200)))
    for raw in raws:
        raw.abort()
    await wait_until(lambda: _equals(clients_connected(url), 0))

    async def tasks_back() -> bool:  # not 200 sessions kept alive until their next ping, 25 s later
        return len(asyncio.all_tasks()) <= tasks_before + 2

    await wait_until(tasks_back, timeout=5)
    await assert_chat_still_works(url, connect)


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


@pytest.mark.slow
async def test_a_client_that_stops_reading_is_disconnected_and_others_keep_receiving(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off", max_queue=50)
    sender, watcher = await connect(url), await connect(url)
    stalled = await RawClient.open(url, receive_buffer=4096)  # connected, then never reads again
    body = "".join(chr(65 + (i * 7919) % 26) for i in range(1800))
    count, burst = 5000, 100  # about 9 MB: more than the kernel's socket buffers can hide
    received = []
    for first in range(0, count, burst):  # bursts no faster than a reading client takes them
        for i in range(first, first + burst):
            await sender.sio.emit("newmessage", {"user": "Sender", "body": f"{i} {body}"})
        received += await watcher.take("newmessage", burst, timeout=30)
    assert [int(m["body"].split()[0]) for m in received] == list(range(count))
    await wait_until(lambda: _equals(clients_connected(url), 2))
    stalled.abort()


async def test_a_refused_origin_gets_a_code_the_page_can_explain_and_one_log_line_with_the_fix(
        start_chat: StartChat, caplog: pytest.LogCaptureFixture) -> None:
    url = await start_chat()
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            async with http.post(f"{url}/socket.io/?EIO=4&transport=polling", data=b"",
                                 headers={"Origin": "http://elsewhere.example"}) as resp:
                assert resp.status == 403
                assert (await resp.json())["code"] == "origin_refused"
    assert caplog.text.count("not this server's origin; allow it with --allow-origin") == 1, caplog.text


async def test_a_client_on_a_transport_the_server_does_not_run_is_told_which_to_use(
        start_chat: StartChat) -> None:
    url = await start_chat(transports=("websocket",))
    async with aiohttp.ClientSession() as http, http.get(f"{url}/socket.io/?EIO=4&transport=polling") as resp:
        refusal = await resp.json()
    assert resp.status == 400 and refusal["code"] == "transport_refused"
    assert "transports: ['websocket']" in refusal["error"]


async def test_the_tutorials_client_path_serves_or_points_to_the_socket_io_client(start_chat: StartChat) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    local, cdn = await start_chat(client_js=CLIENT_JS), await start_chat()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{local}/socket.io/socket.io.js") as resp:
            assert resp.status == 200 and (await resp.read()) == CLIENT_JS.read_bytes()
        async with http.get(f"{cdn}/socket.io/socket.io.js", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == chat.CLIENT_JS_CDN


async def test_pages_carry_security_headers_and_other_paths_are_refused(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/") as resp:
            csp = resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
        for directive in ("default-src 'self'", "connect-src 'self'", "frame-ancestors 'none'",
                          "script-src 'self' https://cdn.socket.io", "style-src 'self'"):
            assert directive in csp
        assert "unsafe-inline" not in csp
        async with http.get(url + "/chat.js") as resp:
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(url + "/nothing-here") as resp:
            assert resp.status == 404
        async with http.post(url + "/", data="x") as resp:
            assert resp.status == 405
        async with http.head(url + "/") as resp:
            assert resp.status == 200


async def test_with_a_local_client_the_csp_allows_no_cdn(start_chat: StartChat) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS)
    async with aiohttp.ClientSession() as http, http.get(url + "/") as resp:
        assert "cdn.socket.io" not in resp.headers["Content-Security-Policy"]
        assert '<script src="/socket.io.min.js"></script>' in await resp.text()


async def test_a_password_is_required_when_set(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(password="s3cret")
    with pytest.raises(socketio.exceptions.ConnectionError, match="unauthorized"):
        await connect(url)
    with pytest.raises(socketio.exceptions.ConnectionError, match="unauthorized"):
        await connect(url, auth={"password": "wrong"})
    peer = await connect(url, auth={"password": "s3cret"})
    assert (await peer.say("let in"))["ok"]
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
        assert await resp.json() == {"status": "ok"}, "no counts for people who are not let in"


async def test_password_attempts_are_limited_per_address(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(password="s3cret", trust_proxy=True)
    attacker = {"X-Forwarded-For": "203.0.113.9"}
    for _ in range(5):
        with pytest.raises(socketio.exceptions.ConnectionError, match="unauthorized"):
            await connect(url, auth={"password": "guess"}, headers=attacker)
    with pytest.raises(socketio.exceptions.ConnectionError, match="too many attempts"):
        await connect(url, auth={"password": "s3cret"}, headers=attacker)
    await connect(url, auth={"password": "s3cret"}, headers={"X-Forwarded-For": "198.51.100.2"})


async def test_password_guesses_from_one_ipv6_network_count_together(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(password="s3cret", trust_proxy=True)
    for host in range(5):  # one machine, five addresses of its /64
        with pytest.raises(socketio.exceptions.ConnectionError, match="unauthorized"):
            await connect(url, auth={"password": "guess"}, headers={"X-Forwarded-For": f"2001:db8:1:2::{host + 1}"})
    with pytest.raises(socketio.exceptions.ConnectionError, match="too many attempts"):
        await connect(url, auth={"password": "s3cret"}, headers={"X-Forwarded-For": "2001:db8:1:2::99"})
    await connect(url, auth={"password": "s3cret"}, headers={"X-Forwarded-For": "2001:db8:1:3::1"})


@pytest.mark.slow
async def test_loopback_password_guesses_are_slowed_down_never_locked_out(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(password="s3cret")  # everyone behind an SSH tunnel is 127.0.0.1
    refusals = []
    for _ in range(12):
        with pytest.raises(socketio.exceptions.ConnectionError) as refused:
            await connect(url, auth={"password": "guess"})
        refusals.append(str(refused.value))
    assert sum("unauthorized" in r for r in refusals) == 10
    assert all("too many attempts" in r for r in refusals[10:])
    deadline = time.monotonic() + 5  # one guess every 2 s after the first 10: the right one gets in soon
    while True:
        try:
            await connect(url, auth={"password": "s3cret"})
            break
        except socketio.exceptions.ConnectionError as exc:
            assert "too many attempts" in str(exc) and time.monotonic() < deadline
            await asyncio.sleep(0.25)


def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PASSWORD", "from-env")
    assert chat.parse_settings([]).password == "from-env"
    assert "from-env" not in repr(chat.parse_settings([]))


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    require(shutil.which("openssl") is not None, "openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_tls_serves_https_and_wss(start_chat: StartChat, self_signed: tuple[Path, Path]) -> None:
    import ssl

    cert, key = self_signed
    url = await start_chat(tls_cert=cert, tls_key=key, rate=0)
    assert url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200
            assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        peers = []
        for transports in (["websocket"], ["polling"]):
            peer = Peer(socketio.AsyncClient(reconnection=False, http_session=http))
            await peer.sio.connect(url, transports=transports, headers={"Origin": url}, wait_timeout=10)
            peers.append(peer)
        await peers[0].say("over TLS")
        assert (await peers[1].next("newmessage"))["body"] == "over TLS"
        for peer in peers:
            await peer.sio.disconnect()


# ---------------------------------------------------------------- the README's nginx setups, run for real


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def nginx_conf(tmp_path: Path, servers: str) -> Path:
    """A whole nginx.conf around the README's server blocks, with every path inside tmp_path."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
    {servers}
}}
""")
    return conf


def test_the_readmes_nginx_samples_pass_nginx_t(tmp_path: Path, self_signed: tuple[Path, Path]) -> None:
    require(NGINX is not None, "nginx")
    cert, key = self_signed
    samples = readme_blocks("Running on a Linode", "nginx") + readme_blocks("Scaling out", "nginx")
    assert len(samples) == 2
    for i, sample in enumerate(samples):
        servers = sample.replace("/etc/letsencrypt/live/chat.example.org/fullchain.pem", str(cert)) \
            .replace("/etc/letsencrypt/live/chat.example.org/privkey.pem", str(key))
        result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(nginx_conf(tmp_path, servers))],
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, f"sample {i}: {result.stderr}"


@pytest.mark.browser
@pytest.mark.parametrize("host_header", ["$http_host", "$host"])
async def test_behind_the_readmes_nginx_the_page_connects_or_says_why_not(
        tmp_path: Path, self_signed: tuple[Path, Path], open_page: OpenPage, host_header: str) -> None:
    """The README's single-machine nginx site, on non-standard ports, in front of chat.py started as its unit says."""
    require(NGINX is not None, "nginx")
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    cert, key = self_signed
    chat_port, http_port, https_port = free_port(), free_port(), free_port()
    site = readme_blocks("Running on a Linode", "nginx")[0]
    servers = (site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
               .replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
               .replace("/etc/letsencrypt/live/chat.example.org/fullchain.pem", str(cert))
               .replace("/etc/letsencrypt/live/chat.example.org/privkey.pem", str(key))
               .replace("http://127.0.0.1:3000", f"http://127.0.0.1:{chat_port}")
               .replace(" $http_host;", f" {host_header};"))  # Host and X-Forwarded-Host, as a person would
    unit_line = next(line for line in readme_blocks("Running on a Linode", "ini") if "--allow-host" in line)
    flags = shlex.split(unit_line.split("chat.py", 1)[1])
    flags = [f for f in flags if not f.startswith("/home/chat")]
    flags = [f for f in flags if f != "--db"] + ["--client-js", str(CLIENT_JS)]
    server = ChatProcess(*[f if f != "3000" else str(chat_port) for f in flags])
    proxy = ChatProcess(command=[NGINX, "-p", str(tmp_path), "-c", str(nginx_conf(tmp_path, servers))])
    try:
        server.wait_ready()
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", https_port)) != 0:
            assert time.monotonic() < deadline and proxy.proc.poll() is None, proxy.stderr.rest(1)
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{http_port}/?room=x", allow_redirects=False) as resp:
            assert resp.status == 301 and resp.headers["Location"] == "https://127.0.0.1/?room=x"
        tab = await open_page(f"https://127.0.0.1:{https_port}", wait_connected=False, ignore_https_errors=True)
        tab.expected_network_errors = True
        if host_header == "$http_host":
            await tab.page.locator("#status[data-state=connected]").wait_for(timeout=15000)
            await tab.send("Alice", "through nginx")
            await tab.page.locator("#messages li.bot").first.wait_for()
        else:  # the README warns against $host: the page must say why it cannot connect
            banner = tab.page.get_by_role("alert").filter(has_text="does not accept connections from this address")
            await banner.wait_for(timeout=20000)
    finally:
        proxy.stop()
        server.stop()



@pytest.mark.redis
@pytest.mark.slow
async def test_behind_the_readmes_scale_out_nginx_polling_clients_stick_to_their_node_and_all_talk(
        tmp_path: Path, self_signed: tuple[Path, Path], nodes: Any) -> None:
    """The README's sticky nginx sample in front of two nodes sharing Redis, with long-polling
    clients (several requests per session) from eight client networks: each session stays on one
    node, both nodes get some, and everyone reads everyone."""
    require(NGINX is not None, "nginx")
    cert, key = self_signed
    node_urls = [nodes("--bot", "off", "--trust-proxy")[1] for _ in range(2)]
    https_port = free_port()
    sample = readme_blocks("Scaling out", "nginx")[0]
    upstreams = "\n".join(f"    server {url.removeprefix('http://')};" for url in node_urls)
    servers = (re.sub(r"(    server 10\.0\.0\.\d+:3000;\n)+", upstreams + "\n", sample)
               .replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
               .replace("/etc/letsencrypt/live/chat.example.org/fullchain.pem", str(cert))
               .replace("/etc/letsencrypt/live/chat.example.org/privkey.pem", str(key)))
    assert upstreams in servers
    proxy = ChatProcess(command=[NGINX, "-p", str(tmp_path), "-c", str(nginx_conf(tmp_path, servers))])
    sessions: list[aiohttp.ClientSession] = []
    people: list[Peer] = []
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", https_port)) != 0:
            assert time.monotonic() < deadline and proxy.proc.poll() is None, proxy.stderr.rest(1)
            await asyncio.sleep(0.05)
        for n in range(8):  # ip_hash keys on the first three octets of the client's address
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(f"127.0.{n + 1}.1", 0)))
            sessions.append(session)
            peer = Peer(socketio.AsyncClient(reconnection=False, http_session=session, ssl_verify=False))
            await peer.sio.connect(f"https://127.0.0.1:{https_port}", transports=["polling"],
                                   auth={"browser": f"browser-{n}"}, wait_timeout=10)
            assert (await peer.join("lobby", user=f"P{n}"))["ok"]
            people.append(peer)
        counts = [await clients_connected(url) for url in node_urls]
        assert sum(counts) == 8 and min(counts) > 0, f"clients per node: {counts}"
        for n, peer in enumerate(people):  # each a few polls long: every request must reach the same node
            assert (await peer.say(f"from P{n}", user=f"P{n}"))["ok"]
        for peer in people:
            bodies = [m["body"] for m in await peer.take("newmessage", 8)]
            assert sorted(bodies) == sorted(f"from P{n}" for n in range(8))
        assert [await clients_connected(url) for url in node_urls] == counts, "no session moved or was lost"
    finally:
        for peer in people:
            await peer.sio.disconnect()
        for session in sessions:
            await session.close()
        proxy.stop()


# ---------------------------------------------------------------- hostile clients: bounds per connection and per address


def rss_mb(pid: int) -> float:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def chat_process() -> Any:
    """Start chat.py as its own process (so its memory and log can be measured); stopped at the end."""
    started: list[ChatProcess] = []

    def start(*args: str, **kwargs: Any) -> tuple[ChatProcess, str]:
        proc = ChatProcess("--port", "0", *args, **kwargs)
        started.append(proc)
        return proc, proc.wait_ready()

    yield start
    for proc in started:
        proc.stop()


@pytest.mark.slow
async def test_a_client_that_never_reads_its_acks_is_disconnected_at_the_bound(
        chat_process: Any, connect: Connect) -> None:
    server, url = chat_process("--rate", "0", "--bot", "off", "--history", "1000")
    writer = await connect(url)
    await writer.join("evil", user="Writer")
    long_body = "x" * 1900
    for i in range(1000):  # each join's ack carries about 2 MB: more than the kernel's buffers can hide
        await writer.sio.emit("newmessage", {"user": "Writer", "body": f"{i} {long_body}"})
    await writer.say("last", user="Writer")
    before = rss_mb(server.proc.pid)
    stalled = await RawClient.open(url, receive_buffer=4096)
    for _ in range(3000):  # the first joins are acked with 1,000 long messages each, the rest with a refusal
        stalled.send('421["join",{"room":"evil","since":0}]')
    await stalled.writer.drain()
    await asyncio.to_thread(server.stderr.wait_for, "disconnecting .*: it fell over 1000 KB behind", 20)
    assert rss_mb(server.proc.pid) - before < 50
    stalled.abort()
    await assert_chat_still_works(url, connect)


@pytest.mark.slow
async def test_a_long_polling_client_reading_a_burst_at_its_own_pace_is_not_dropped(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(trust_proxy=True)  # the shipped limits: 10 at once per person, the bot on
    reader = await connect(url, transports=["polling"])  # python-socketio: at most 16 packets per poll
    senders = [await connect(url, headers={"X-Forwarded-For": f"198.51.100.{i + 1}"}) for i in range(60)]
    for n, sender in enumerate(senders):
        for i in range(10):  # each person's allowed burst
            await sender.sio.emit("newmessage", {"user": f"P{n}", "body": f"burst {n}.{i}"})
    messages = await reader.take("newmessage", 600, timeout=60)
    replies = await reader.take("botmessage", 600, timeout=60)
    assert len({m["id"] for m in messages + replies}) == 1200
    assert reader.sio.connected, "a reader that keeps polling is not slow"


async def upgraded_session(url: str, receive_buffer: int) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
    """A raw client that connects by long-polling, upgrades to a WebSocket, then reads nothing."""
    host, port = url.removeprefix("http://").split(":")
    async with aiohttp.ClientSession() as http_client:
        async with http_client.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
            sid = json.loads((await response.text())[1:])["sid"]
        async with http_client.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}", data="40") as response:
            assert response.status == 200
        async with http_client.get(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}") as response:
            assert (await response.text()).startswith("40")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    client = RawClient(reader, writer)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /socket.io/?EIO=4&transport=websocket&sid={sid} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    client.send("2probe")
    assert await client.receive() == "3probe"
    client.send("5")  # upgraded
    return writer, reader


async def test_a_junk_frame_on_an_upgraded_session_ends_its_membership_at_once(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0, bot="off", presence_grace=0.1)
    watcher = await connect(url)
    await watcher.join("lobby", user="Watcher")
    tcp_writer, tcp_reader = await upgraded_session(url, 65536)
    ghost = RawClient(tcp_reader, tcp_writer)
    ghost.send('420["join",{"room":"lobby","user":"Ghost"}]')
    while not (await ghost.receive()).startswith("430"):
        pass
    while "Ghost" not in (await watcher.next("presence"))["members"]:
        pass
    ghost.send("4" + "[" * 1100)  # Engine.IO would decode it as JSON and fail: the socket is closed
    async with asyncio.timeout(3):  # not after a ping timeout
        while "Ghost" in (await watcher.next("presence", timeout=3))["members"]:
            pass
    tcp_writer.close()


@pytest.mark.slow
async def test_stalled_upgraded_readers_are_cut_at_once_without_a_traceback(
        chat_process: Any, connect: Connect) -> None:
    server, url = chat_process("--rate", "0", "--bot", "off", "--max-queue", "100")
    stalled = [await upgraded_session(url, 4096) for _ in range(5)]
    writer = await connect(url)
    body = "x" * 1500
    for i in range(600):  # 900 KB for each of them: far past 100 KB plus what the kernel buffers
        await writer.sio.emit("newmessage", {"user": "Writer", "body": f"{i} {body}"})
    await writer.say("last", user="Writer")
    for _ in stalled:
        await asyncio.to_thread(server.stderr.wait_for, r"disconnecting .*: it fell over 100 KB behind", 20)
    for tcp_writer, tcp_reader in stalled:
        async with asyncio.timeout(5):  # closed now, not after a ping timeout
            while await tcp_reader.read(65536):
                pass
        tcp_writer.close()
    await assert_chat_still_works(url, connect)
    _, _, err = server.stop()
    assert "Traceback" not in err and "Task exception was never retrieved" not in err


def log_lines(err: str, pattern: str) -> list[str]:
    return [line for line in err.splitlines() if re.search(pattern, line)]


@pytest.mark.slow
async def test_a_connection_sending_malformed_packets_is_closed_and_logged_once(chat_process: Any,
                                                                               connect: Connect) -> None:
    server, url = chat_process()
    client = await RawClient.open(url)
    for _ in range(5000):
        client.send("42[]")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(10):
            while True:
                await client.receive()
    await assert_chat_still_works(url, connect)
    _, _, err = server.stop()
    assert len(log_lines(err, "malformed|closing a connection")) <= 2, err[-2000:]
    assert len(err) < 4000 and "Traceback" not in err


@pytest.mark.slow
async def test_connects_without_the_password_are_not_a_log_flood(chat_process: Any) -> None:
    server, url = chat_process(env={"CHAT_PASSWORD": "open sesame"})
    client = await RawClient.open(url, sio_connect=False)
    for _ in range(3000):
        client.send("40")
    refusals = 0
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(10):
            while True:
                refusals += (await client.receive()).startswith("44")
    assert refusals <= chat.ChatServer.MAX_STRIKES, "the connection is closed after a few"
    _, _, err = server.stop()
    assert len(log_lines(err, "refused connection|closing a connection")) <= 2, err[-2000:]


@pytest.mark.slow
async def test_deeply_nested_polling_posts_are_refused_with_one_line(chat_process: Any, connect: Connect) -> None:
    server, url = chat_process()
    async with aiohttp.ClientSession() as http_client:
        async with http_client.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
            sid = json.loads((await response.text())[1:])["sid"]
        for _ in range(100):
            async with http_client.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                                        data="4" + "[" * 1100) as response:
                assert response.status == 400
    await assert_chat_still_works(url, connect)
    _, _, err = server.stop()
    assert "Traceback" not in err and "RecursionError" not in err
    assert len(log_lines(err, "not Engine.IO")) == 1 and len(err) < 3000, err[-2000:]


async def test_the_first_rate_limit_refusal_of_a_connection_is_logged(
        start_chat: StartChat, connect: Connect, caplog: pytest.LogCaptureFixture) -> None:
    url = await start_chat(rate=1, burst=1)
    peer = await connect(url)
    assert (await peer.say("one"))["ok"]
    assert (await peer.say("two"))["code"] == "rate_limited"
    assert [r for r in caplog.records if "rate_limited" in r.getMessage()], "the flood's first refusal is logged"


async def test_join_is_rate_limited_per_connection_with_the_wait_in_the_refusal(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat()
    hopper, member = await connect(url), await connect(url)
    await member.join("lobby", user="Mia")
    acks = [await hopper.join(f"room-{i}", user="Hopper") for i in range(20)]
    refused = [ack for ack in acks if not ack["ok"]]
    assert len(refused) >= 14 and all(ack["code"] == "rate_limited" and ack["retry_after_ms"] > 0 for ack in refused)
    await asyncio.sleep(refused[-1]["retry_after_ms"] / 1000)
    assert (await hopper.join("lobby", user="Hopper"))["ok"], "allowed again after the wait it was told"


async def test_typing_changes_are_relayed_at_most_a_few_per_second(url: str, connect: Connect) -> None:
    typist, watcher = await connect(url), await connect(url)
    await typist.join("lobby", user="Tia")
    await watcher.join("lobby", user="Wes")
    for i in range(400):
        await typist.sio.emit("typing", {"typing": i % 2 == 0})
    await typist.say("done typing", user="Tia")
    await watcher.next("newmessage")
    assert len(watcher.pending("typing")) <= 6, "400 toggles must not become 400 frames for every listener"


async def test_reconnecting_does_not_reset_the_message_rate_of_an_address(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=5, burst=10, trust_proxy=True)
    same = {"X-Forwarded-For": "203.0.113.50"}
    accepted = 0
    for _ in range(8):  # the trick: a fresh connection (and a fresh per-connection bucket) every 10 messages
        peer = await connect(url, headers=same)
        for i in range(10):
            accepted += (await peer.say(f"m{i}", user="Rex"))["ok"]
        await peer.sio.disconnect()
    assert accepted <= 40 + 10, f"{accepted} of 80 accepted; the address's bucket holds 40 and refills at 20/s"
    other = await connect(url, headers={"X-Forwarded-For": "198.51.100.50"})
    assert (await other.say("another address is not affected"))["ok"]


async def test_engine_io_sessions_count_against_the_address_cap_on_long_polling(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(trust_proxy=True, max_per_ip=5)
    same = {"X-Forwarded-For": "203.0.113.60"}
    statuses = collections.Counter()
    async with aiohttp.ClientSession() as http:
        for _ in range(200):  # Engine.IO handshakes that never connect to Socket.IO
            async with http.get(f"{url}/socket.io/?EIO=4&transport=polling", headers=same) as resp:
                statuses[resp.status] += 1
    assert statuses[200] == 5 + chat.EXTRA_HANDSHAKES and statuses[429] == 200 - statuses[200]
    await connect(url, headers={"X-Forwarded-For": "198.51.100.60"})


@pytest.mark.slow
async def test_silent_and_slow_connections_are_closed_after_the_deadline(url: str, connect: Connect) -> None:
    host, port = url.removeprefix("http://").split(":")

    async def seconds_until_closed(dribble: bool) -> float:
        reader, writer = await asyncio.open_connection(host, int(port))
        started = time.monotonic()
        request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: " + "a" * 100
        for ch in request if dribble else "":
            writer.write(ch.encode())
            await asyncio.sleep(0.1)
            if reader.at_eof():
                break
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        return time.monotonic() - started

    silent, slow = await asyncio.gather(seconds_until_closed(False), seconds_until_closed(True))
    assert chat.REQUEST_DEADLINE <= silent < chat.REQUEST_DEADLINE + 5
    assert chat.REQUEST_DEADLINE <= slow < chat.REQUEST_DEADLINE + 5
    await assert_chat_still_works(url, connect)


async def test_a_chunked_polling_post_is_refused_not_silently_dropped(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
            sid = json.loads((await response.text())[1:])["sid"]

        async def chunks() -> AsyncIterator[bytes]:
            yield b"40"

        async with http.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}", data=chunks()) as response:
            assert response.status == 411


@pytest.mark.slow
async def test_junk_from_unauthenticated_clients_never_floods_the_log(chat_process: Any, connect: Connect) -> None:
    server, url = chat_process("--rate", "0", "--password", "s3cret")
    host, port = url.removeprefix("http://").split(":")
    closed = 0
    for frame in ["", "x", "9x", "hello"] * 50:  # 200 WebSockets, each sending one frame that is not Engine.IO
        raw = await RawClient.open(url, sio_connect=False)
        raw.send(frame)
        try:
            while True:
                await asyncio.wait_for(raw.receive(), 5)
        except (ConnectionResetError, asyncio.IncompleteReadError):
            closed += 1
        raw.abort()
    assert closed == 200, "a junk frame ends its connection at once"
    async with aiohttp.ClientSession() as http:
        for body in (b"\xff\xfe not utf-8", b"\x1e\x1e", b"9x", b""):
            async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as response:
                sid = json.loads((await response.text())[1:])["sid"]
            for _ in range(50):
                async with http.post(f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}", data=body) as response:
                    assert response.status == 400
        for _ in range(20):
            async with http.get(f"{url}/?q={'a' * 9000}") as response:
                assert response.status in (400, 414)
            async with http.get(f"{url}/", headers={"X-Big": "b" * 9000}) as response:
                assert response.status in (400, 431)
    for _ in range(50):  # a raw request line that is not HTTP at all
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"\x16\x03\x01 not http\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    peer = await connect(url, auth={"password": "s3cret"})
    await peer.say("still here")
    code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err
    assert len(err.splitlines()) < 30, err


async def test_on_loopback_only_local_host_names_are_answered(start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0)
    port = url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as http:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
            async with http.get(f"{url}/", headers={"Host": host}) as resp:
                assert resp.status == 200, host
        for path in ("/", "/healthz", "/socket.io/?EIO=4&transport=polling"):  # DNS rebinding
            async with http.get(f"{url}{path}", headers={"Host": f"rebind.example:{port}",
                                                         "Origin": f"http://rebind.example:{port}"}) as resp:
                assert resp.status == 421, path
    with pytest.raises(socketio.exceptions.ConnectionError):
        await connect(url, headers={"Host": f"rebind.example:{port}", "Origin": f"http://rebind.example:{port}"})
    proxied = await start_chat(rate=0, allow_hosts=("chat.example",))
    async with aiohttp.ClientSession() as http, http.get(f"{proxied}/", headers={"Host": "chat.example"}) as resp:
        assert resp.status == 200, "--allow-host adds a name"


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_running_out_of_sockets_is_logged_once_and_the_server_recovers(
        chat_process: Any, loop: str) -> None:
    require(importlib.util.find_spec("uvloop") is not None or loop == "asyncio", "uvloop")
    import resource

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    server, url = chat_process("--rate", "0", "--loop", loop, preexec=few_files)
    server.stderr.wait_for(r"open-file limit 64: room for about \d+ connections", 5)
    host, port = url.removeprefix("http://").split(":")
    held = []
    for _ in range(100):  # connections the kernel accepts while chat.py has no descriptor left for them
        held.append(await asyncio.open_connection(host, int(port)))
    await asyncio.to_thread(server.stderr.wait_for, "out of sockets at the open-file limit of 64", 10)
    for _, writer in held:
        writer.close()
    deadline = time.monotonic() + 20
    while True:  # the server accepts again once descriptors are free (the silent ones are closed after 10 s)
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(2)) as resp:
                assert resp.status == 200
                break
        except (aiohttp.ClientError, asyncio.TimeoutError):
            assert time.monotonic() < deadline, "the server did not recover"
    _, _, err = server.stop()
    assert err.count("out of sockets") == 1 and "Traceback" not in err


@pytest.mark.slow
async def test_a_full_disk_refuses_messages_with_a_reason_and_loses_no_acked_one(
        chat_process: Any, tmp_path: Path, connect: Connect) -> None:
    import resource

    def small_files() -> None:  # every file chat.py writes stops growing at 512 KB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))

    db = tmp_path / "full.db"
    server, url = chat_process("--db", str(db), "--rate", "0", "--bot", "off", preexec=small_files)
    peer = await connect(url)
    acked: list[int] = []
    for i in range(2000):
        ack = await peer.say(f"{i} " + "x" * 1000)
        if not ack["ok"]:
            break
        acked.append(ack["id"])
    assert (ack["ok"], ack["code"]) == (False, "store_failed") and "could not store" in ack["error"]
    for _ in range(20):
        assert (await peer.say("and again"))["code"] == "store_failed"
    assert peer.sio.connected
    code, _, err = server.stop()
    assert code == 0 and "Traceback" not in err
    assert err.count("history store failed") == 1, err
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM messages")}
    assert acked and set(acked) <= stored, "every acked message is in the file"


async def test_a_second_chat_py_on_the_same_database_is_refused_with_one_line(
        start_chat: StartChat, tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    await start_chat(db=db)
    with pytest.raises(chat.StartupError) as refused:  # main() prints it as one line, exit 1
        await start_chat(db=db)
    assert str(refused.value) == f"{db} is in use by another chat.py (one process per database file)"


def test_a_database_damaged_in_the_middle_is_refused_at_start_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "damaged.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(chat.SQLITE_SCHEMA)
        conn.executemany("INSERT INTO messages (room, user, body, kind, ts) VALUES ('r', 'u', ?, 'user', 0)",
                         [("x" * 500,) for _ in range(200)])
    data = bytearray(db.read_bytes())
    assert data.startswith(b"SQLite format 3\x00") and len(data) > 8 * 4096
    data[3 * 4096:5 * 4096] = os.urandom(2 * 4096)  # the header stays valid
    db.write_bytes(bytes(data))
    code, err = run_main(["--port", "0", "--db", str(db)], capsys)
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(db) in err and ("damaged" in err or "malformed" in err), err


def test_memory_history_keeps_a_bounded_number_of_rooms_and_says_when_replay_is_incomplete() -> None:
    async def scenario() -> None:
        store = chat.MemoryStore(history=10, max_rooms=3)
        for room in ("a", "b", "c"):
            await store.append(room, "U", f"in {room}", "user", None)
        await store.append("a", "U", "a is used again", "user", None)
        await store.append("d", "U", "a fourth room", "user", None)  # "b" is the least recently used
        assert await store.recent("b", 10) == []
        assert [m.body for m in await store.recent("a", 10)] == ["in a", "a is used again"]
        assert (await store.since("b", 0, 10)) == ([], False), "forgotten history is not passed off as complete"
        assert (await store.since("a", 0, 10))[1] is True

    asyncio.run(scenario())


# ---------------------------------------------------------------- a real browser


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium, headless, driven by Playwright."""
    require(Path(CHROMIUM).exists(), f"Chromium at {CHROMIUM}")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        require(False, "the playwright Python package")
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield instance
        await instance.close()


class BrowserPage:
    """A browser tab on the chat that fails the test on any console error or page error."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.expected_network_errors = False  # set by tests that cut the network on purpose
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _on_console(self, message: Any) -> None:
        if message.type != "error":
            return
        if self.expected_network_errors and re.search(
                r"ERR_INTERNET_DISCONNECTED|ERR_CONNECTION_REFUSED|ERR_CONNECTION_RESET|WebSocket connection"
                r"|the server responded with a status of 40[03]", message.text):
            return
        self.errors.append(message.text)

    async def user_messages(self) -> list[str]:
        return await self.page.locator("#messages li.message:not(.bot) .body").all_text_contents()

    async def wait_for_messages(self, expected: list[str], timeout: float = 20.0) -> None:
        """Until the page shows exactly these people's messages, in this order (no event to await here)."""
        deadline = time.monotonic() + timeout
        while (shown := await self.user_messages()) != expected:
            assert time.monotonic() < deadline, f"page shows {shown}, expected {expected}"
            await asyncio.sleep(0.1)

    async def send(self, user: str, body: str, via: str = "enter") -> None:
        await self.page.get_by_label("Your name").fill(user)
        await self.page.get_by_label("Your message").fill(body)
        if via == "enter" and await self.page.evaluate("matchMedia('(pointer: coarse)').matches"):
            via = "button"  # on a touch screen Enter is a new line
        if via == "enter":
            await self.page.get_by_label("Your message").press("Enter")
        else:
            await self.page.get_by_role("button", name="Send").click()

    def message(self, body: str) -> Any:
        exact = re.compile("^" + re.escape(body) + "$")
        return self.page.locator("#messages li.message:not(.bot) .body").filter(has_text=exact)


OpenPage = Callable[..., Awaitable[BrowserPage]]


@pytest.fixture
async def open_page(browser: Any) -> AsyncIterator[OpenPage]:
    """Open the chat in a fresh browser context (its own storage, like another person)."""
    pages: list[BrowserPage] = []

    async def open_(url: str, path: str = "/", wait_connected: bool = True,
                    before: Callable[[Any], Awaitable[None]] | None = None, **context_options: Any) -> BrowserPage:
        context = await browser.new_context(**context_options)
        tab = BrowserPage(await context.new_page())
        pages.append(tab)
        if before is not None:
            await before(tab.page)
        await tab.page.goto(url + path)
        if wait_connected:
            await tab.page.locator("#status[data-state=connected]").wait_for(timeout=10000)
        return tab

    yield open_
    for tab in pages:
        assert tab.errors == [], f"console errors: {tab.errors}"
        await tab.page.context.close()


@pytest.fixture
async def page_url(start_chat: StartChat) -> str:
    """A chat server whose page loads the Socket.IO client same-origin (the test browser is offline)."""
    require(CLIENT_JS.is_file(), f"the npm package socket.io-client ({CLIENT_JS})")
    return await start_chat(client_js=CLIENT_JS)


@pytest.mark.browser
async def test_two_people_chat_in_the_browser(page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    await alice.send("Alice", "Hi Bob, are you there?")
    await bob.message("Hi Bob, are you there?").wait_for()
    await bob.send("Bob", "Yes, hello Alice", via="button")
    await alice.message("Yes, hello Alice").wait_for()
    line = alice.page.locator("#messages li.message", has_text="Yes, hello Alice")
    assert await line.locator(".author").text_content() == "Bob"
    bot_line = alice.page.locator("#messages li.bot", has_text="Hello, Alice!")
    await bot_line.wait_for()
    assert await bot_line.locator(".author").text_content() == "ChatFriend"
    mine = alice.page.locator("#messages li.mine", has_text="Hi Bob, are you there?")
    await mine.wait_for()
    assert await mine.locator(".time").text_content()


@pytest.mark.browser
async def test_enter_sends_clears_the_field_and_keeps_focus(page_url: str, open_page: OpenPage) -> None:
    tab = await open_page(page_url)
    await tab.send("Dana", "sent with Enter")
    await tab.message("sent with Enter").wait_for()
    body = tab.page.get_by_label("Your message")
    assert await body.input_value() == ""
    assert await body.evaluate("el => el === document.activeElement")


@pytest.mark.browser
async def test_the_name_is_remembered(page_url: str, open_page: OpenPage) -> None:
    tab = await open_page(page_url)
    await tab.send("Remembered Name", "hello")
    await tab.message("hello").wait_for()
    await tab.page.reload()
    assert await tab.page.get_by_label("Your name").input_value() == "Remembered Name"


@pytest.mark.browser
@pytest.mark.parametrize(("user", "body", "expected"), [
    ("", "", "Please enter your name and a message."),
    ("Eve", "", "Please type a message."),
    ("", "hello", "Please enter your name."),
    ("   ", "   ", "Please enter your name and a message."),
])
async def test_an_incomplete_form_shows_an_error_and_sends_nothing(
        page_url: str, open_page: OpenPage, connect: Connect, user: str, body: str, expected: str) -> None:
    tab = await open_page(page_url)
    watcher = await connect(page_url)
    await tab.send(user, body)
    assert await tab.page.locator("#errorMessage").text_content() == expected
    await watcher.say("marker")  # anything the page sent would arrive before this
    assert (await watcher.next("newmessage"))["body"] == "marker"


XSS_NAMES = ["<img src=x onerror=__pwned=1>", "<script>__pwned=2</script>"]  # within the 32-char limit
XSS_BODIES = ['<img src=x onerror="window.__pwned=3">', "<script>window.__pwned=4</script>",
              '<a href="javascript:window.__pwned=5">click me</a>', "<svg onload=window.__pwned=6>"]


@pytest.mark.browser
async def test_html_in_names_and_messages_is_shown_as_text_and_never_runs(
        page_url: str, open_page: OpenPage) -> None:
    sender, viewer = await open_page(page_url), await open_page(page_url)
    for name in XSS_NAMES:
        for body in XSS_BODIES:
            await sender.send(name, body)
            await viewer.page.locator("#messages li.message", has_text=body).last.wait_for()
    for tab in (sender, viewer):
        items = tab.page.locator("#messages li.message:not(.bot)")
        assert await items.count() == len(XSS_NAMES) * len(XSS_BODIES)
        assert await tab.page.locator("#messages img, #messages script, #messages a, #messages svg").count() == 0
        shown = await items.locator(".body").all_text_contents()
        assert set(shown) == set(XSS_BODIES)
        authors = await items.locator(".author").all_text_contents()
        assert set(authors) == {" ".join(n.split()) for n in XSS_NAMES}
        for link in await tab.page.locator("#messages a").all():
            await link.click()
        assert await tab.page.evaluate("window.__pwned") is None


@pytest.mark.browser
async def test_the_page_says_so_when_the_client_library_cannot_load(start_chat: StartChat,
                                                                    browser: Any) -> None:
    url = await start_chat()  # default page: the CDN, unreachable from the test machine
    context = await browser.new_context()
    page = await context.new_page()
    await page.route("https://cdn.socket.io/**", lambda route: route.abort())
    await page.goto(url)
    banner = page.locator("#banner")
    await banner.wait_for()
    assert "could not load its Socket.IO client library" in (await banner.text_content() or "")
    assert await page.get_by_label("Your message").is_disabled(), "no typing into a page that cannot send"
    assert await page.get_by_role("button", name="Send").is_disabled()
    await context.close()


@pytest.mark.browser
async def test_the_page_asks_for_the_password_and_refuses_a_wrong_one(
        start_chat: StartChat, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS, password="open sesame")
    tab = await open_page(url, wait_connected=False)
    dialog = tab.page.get_by_role("dialog")
    await dialog.wait_for()
    await tab.page.keyboard.press("Escape")  # the dialog is the only way in: it stays
    assert await dialog.is_visible()
    await tab.page.get_by_label("Password", exact=True).fill("wrong")
    await tab.page.get_by_role("button", name="Join").click()
    await tab.page.locator("#password-error", has_text="That password is not right.").wait_for()
    await tab.page.get_by_label("Password", exact=True).fill("open sesame")
    await tab.page.get_by_role("button", name="Join").click()
    await tab.page.locator("#status[data-state=connected]").wait_for()
    await tab.send("Ali", "in with the password")
    await tab.message("in with the password").wait_for()
    await tab.page.reload()  # remembered for the tab
    await tab.page.locator("#status[data-state=connected]").wait_for()
    assert not await dialog.is_visible()


PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
DESKTOP = {"viewport": {"width": 1280, "height": 800}}


@pytest.mark.browser
@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", ["desktop", "phone"])
async def test_the_page_has_no_serious_accessibility_violations(
        page_url: str, open_page: OpenPage, scheme: str, size: str) -> None:
    require(AXE_JS.is_file(), "the npm package axe-core")
    other = await open_page(page_url)
    await other.send("Bob", "Hi, anyone here?")
    tab = await open_page(page_url, color_scheme=scheme, bypass_csp=True, **(PHONE if size == "phone" else DESKTOP))
    await tab.send("Alice", "Hello Bob!")
    await tab.page.locator("#messages li.bot").first.wait_for()
    await other.send("Bob", "@Alice see https://example.org/x and `code`, *bold*\n```\nblock\n```")
    await tab.send("Alice", "/msg Bob psst")
    own = tab.page.locator("#messages li.message.mine").filter(has_text="Hello Bob!")
    await own.get_by_role("button", name=re.compile("Delete")).click()
    await tab.page.locator("#messages li.deleted").wait_for()
    await tab.send("bob", "as Bob")  # refused: Bob's name; a failed message with its buttons
    for shown in ("li.mentions-me a", "li.private", "li.failed button.dismiss"):
        await tab.page.locator(f"#messages {shown}").first.wait_for()
    await tab.page.get_by_label("Search this room").fill("anyone")
    await tab.page.get_by_label("Search this room").press("Enter")
    await tab.page.locator("#search-list li").first.wait_for()
    await tab.page.locator("#alerts summary").click()
    await tab.page.add_script_tag(path=str(AXE_JS))
    result = await tab.page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    serious = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in result["violations"]
               if v["impact"] in ("serious", "critical")]
    assert serious == []


@pytest.mark.browser
@pytest.mark.parametrize("state", ["reconnecting", "password needed"])
async def test_on_a_phone_the_header_fits_and_the_online_list_shows(
        start_chat: StartChat, open_page: OpenPage, state: str) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS, rate=0, password="pw" if state == "password needed" else None)
    tab = await open_page(url, wait_connected=False, **PHONE)
    tab.expected_network_errors = True
    if state == "password needed":
        await tab.page.get_by_label("Password", exact=True).fill("pw")
        await tab.page.get_by_role("button", name="Join").click()
    await tab.page.locator("#status[data-state=connected]").wait_for()
    await tab.send("Alice", "on my phone")
    await tab.page.get_by_text("Alice", exact=True).first.wait_for()
    people = tab.page.get_by_role("complementary", name="Online")
    assert await people.is_visible() and await tab.page.locator("#member-count").text_content() == "1"
    status = tab.page.locator("#status")
    await tab.page.evaluate("""([text, state]) => {
        const status = document.getElementById('status');
        status.textContent = text; status.dataset.state = state; }""",
                            [f"{state}…" if state == "reconnecting" else state, "reconnecting"])
    box = await status.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    assert await tab.page.evaluate("document.documentElement.scrollWidth") <= 390
    assert await tab.page.get_by_label("Your message").get_attribute("placeholder") == \
        "Type a message… (Enter: new line)"


@pytest.mark.browser
async def test_on_a_phone_with_many_online_the_private_room_button_stays_in_sight_and_tappable(
        start_chat: StartChat, open_page: OpenPage, connect: Connect) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS, rate=0, bot="off")
    for name in ("Benedict", "Cleopatra", "Dmitri", "Evangeline", "Fitzgerald"):
        await (await connect(url, auth=browser_auth(name))).join("lobby", user=name)
    tab = await open_page(url, **PHONE)
    await tab.send("Ana", "hello")
    await tab.page.locator("#member-count", has_text="6").wait_for()
    button = tab.page.get_by_role("button", name="New private room")
    box = await button.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, "the names scroll, the button does not"
    on_top = await tab.page.evaluate("([x, y]) => document.elementFromPoint(x, y)?.closest('button')?.id",
                                     [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
    assert on_top == "new-private", "no name is drawn over it"


@pytest.mark.browser
async def test_on_a_desktop_the_form_sits_under_the_message_column(page_url: str, open_page: OpenPage) -> None:
    tab = await open_page(page_url, **DESKTOP)
    column = await tab.page.locator(".conversation").bounding_box()
    form = await tab.page.locator("#message-form").bounding_box()
    assert column is not None and form is not None
    assert abs((column["x"] + column["width"] / 2) - (form["x"] + form["width"] / 2)) < 2
    assert await tab.page.get_by_text("Nobody with a name yet.").is_visible(), "not a bare Online 0"


@pytest.mark.browser
async def test_shift_enter_adds_a_line_and_enter_sends(page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    await alice.page.get_by_label("Your name").fill("Alice")
    box = alice.page.get_by_label("Your message")
    await box.click()
    await box.type("first line")
    await box.press("Shift+Enter")
    await box.type("second line")
    assert await bob.page.locator("#messages li.message").count() == 0, "Shift+Enter did not send"
    await box.press("Enter")
    await bob.wait_for_messages(["first line\nsecond line"])


@pytest.mark.browser
async def test_back_and_forward_switch_rooms_and_room_names_are_lowercased(
        page_url: str, open_page: OpenPage) -> None:
    tab = await open_page(page_url, path="/?room=Team")
    await tab.page.wait_for_url("**/?room=team")
    assert await tab.page.get_by_label("Room", exact=True).input_value() == "team"
    await tab.page.get_by_label("Room", exact=True).fill("Ops")
    await tab.page.get_by_role("button", name="Go").click()
    await tab.page.wait_for_url("**/?room=ops")
    await tab.page.go_back()
    await tab.page.wait_for_url("**/?room=team")
    await tab.page.wait_for_function("document.getElementById('room-input').value === 'team'")
    await tab.page.go_forward()
    await tab.page.wait_for_url("**/?room=ops")
    await tab.page.wait_for_function("document.getElementById('room-input').value === 'ops'")
    await tab.page.locator("#status[data-state=connected]").wait_for()


@pytest.mark.browser
async def test_the_page_announces_others_arriving_but_never_the_person_themselves(
        page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    await bob.send("Bob", "here")
    await alice.send("Alice", "here too")
    await bob.page.locator("#messages li.system", has_text="Alice joined").wait_for()
    # Alice's own notice reached her page before the ack that let her message go, so it is settled.
    await alice.wait_for_messages(["here", "here too"])
    assert await alice.page.locator("#messages li.system", has_text="Alice joined").count() == 0


@pytest.mark.browser
async def test_a_reconnect_does_not_repeat_joined_lines_on_the_page(
        start_chat: StartChat, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS, rate=0, presence_grace=0.2)
    alice, bob = await open_page(url), await open_page(url)
    alice.expected_network_errors = True
    await bob.send("Bob", "here")
    await alice.send("Alice", "here too")
    joined = bob.page.locator("#messages li.system", has_text="Alice joined")
    await joined.wait_for()
    for _ in range(2):
        await alice.page.context.set_offline(True)
        await bob.page.locator("#messages li.system", has_text="Alice left").last.wait_for()
        await alice.page.context.set_offline(False)
        await alice.page.locator("#status[data-state=connected]").wait_for(timeout=15000)
    await bob.page.wait_for_function(
        "document.querySelectorAll('#messages li.system').length >= 5")  # joined, left, joined, left, joined
    assert await alice.page.locator("#messages li.system", has_text="Alice joined").count() == 0
    assert await alice.page.locator("#messages li.system", has_text="Bob joined").count() <= 1


@pytest.mark.browser
async def test_the_page_works_under_its_content_security_policy(page_url: str, open_page: OpenPage) -> None:
    tab = await open_page(page_url)
    response = await tab.page.goto(page_url)
    assert "default-src 'self'" in (await response.all_headers())["content-security-policy"]
    await tab.page.locator("#status[data-state=connected]").wait_for()
    await tab.send("Csp", "works under CSP")
    await tab.message("works under CSP").wait_for()
    # open_page fails the test on any console error, and CSP violations are console errors


@pytest.mark.browser
async def test_offline_and_back_every_message_appears_once_in_the_same_order(
        page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    bob.expected_network_errors = True
    await alice.send("Alice", "before")
    await bob.wait_for_messages(["before"])
    await bob.page.context.set_offline(True)
    await bob.page.locator("#status[data-state=offline]").wait_for()
    for i in range(3):
        await alice.send("Alice", f"alice {i}")
        await bob.send("Bob", f"bob {i}")
    await alice.message("alice 2").wait_for()
    pending = bob.page.locator("#messages li.pending .state", has_text="queued")
    assert await pending.count() == 3
    await bob.page.context.set_offline(False)
    expected = ["before", "alice 0", "alice 1", "alice 2", "bob 0", "bob 1", "bob 2"]
    await bob.wait_for_messages(expected)
    await alice.wait_for_messages(expected)
    assert await pending.count() == 0


@pytest.mark.browser
async def test_fifteen_messages_sent_with_enter_in_a_second_all_arrive_in_order_at_the_default_rate(
        start_chat: StartChat, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS)  # --rate 5 --burst 10, the defaults
    alice, bob = await open_page(url), await open_page(url)
    await alice.page.get_by_label("Your name").fill("Alice")
    expected = [f"line {i}" for i in range(1, 16)]
    # Typed and sent with Enter within one event-loop turn: faster than any person, so the rate
    # limit (burst 10, then 5/s) refuses some of them and the page must wait and resend.
    await alice.page.get_by_label("Your message").evaluate("""(box, bodies) => {
        for (const body of bodies) {
            box.value = body;
            box.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true, cancelable: true }));
        }
    }""", expected)
    await alice.page.locator("#messages li.pending .state", has_text="waiting…").first.wait_for(timeout=10000)
    await bob.wait_for_messages(expected)
    await alice.wait_for_messages(expected)
    assert await alice.page.locator("#messages li.failed").count() == 0


@pytest.mark.browser
async def test_a_refused_name_fails_the_message_with_the_reason_and_retry_sends_it_once_under_the_new_name(
        page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    too_long_after_nfkc = "\ufb00" * 20  # 20 characters here, 40 once the server normalises it
    await alice.send(too_long_after_nfkc, "hello from a bad name")
    failed = alice.page.locator("#messages li.failed")
    await failed.wait_for(timeout=10000)
    assert "too long" in (await failed.locator(".state").text_content() or "")
    await alice.page.get_by_label("Your name").fill("Alice")
    await failed.get_by_role("button", name="retry").click()
    await bob.wait_for_messages(["hello from a bad name"])
    line = bob.page.locator("#messages li.message", has_text="hello from a bad name")
    assert await line.locator(".author").text_content() == "Alice"
    await alice.wait_for_messages(["hello from a bad name"])
    assert await alice.page.locator("#messages li.failed").count() == 0


@pytest.mark.browser
async def test_lines_arriving_never_move_the_persons_unsent_message_or_its_retry_button(
        page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    await alice.send("\ufb00" * 20, "stuck here")  # refused by the server: too long once normalised
    retry = alice.page.locator("#messages li.failed").get_by_role("button", name="retry")
    await retry.wait_for()
    before = await retry.bounding_box()
    await bob.send("Bob", "a line that lands above it")
    await alice.message("a line that lands above it").wait_for()
    await alice.page.locator("#messages li.bot").last.wait_for()
    assert await retry.bounding_box() == before


@pytest.mark.browser
async def test_the_message_box_fits_its_placeholder_in_a_narrow_window_and_after_a_resize(
        page_url: str, open_page: OpenPage) -> None:
    clipped = "(box) => box.scrollHeight > box.clientHeight"
    narrow = await open_page(page_url, viewport={"width": 390, "height": 844})  # a narrow window, not a phone
    assert not await narrow.page.get_by_label("Your message").evaluate(clipped), "cut off as the page opens"
    wide = await open_page(page_url, viewport={"width": 1280, "height": 800})
    await wide.page.set_viewport_size({"width": 390, "height": 844})
    await wide.page.evaluate("() => new Promise(requestAnimationFrame)")  # after the resize event
    assert not await wide.page.get_by_label("Your message").evaluate(clipped), "cut off after narrowing the window"


@pytest.mark.browser
async def test_the_bots_name_is_refused_in_the_page_before_sending(page_url: str, open_page: OpenPage) -> None:
    alice = await open_page(page_url)
    await alice.send("chat friend", "pretending")
    assert "reserved for the bot" in (await alice.page.locator("#errorMessage").text_content() or "")
    assert await alice.page.locator("#messages li.message").count() == 0


@pytest.mark.browser
async def test_links_code_and_emphasis_render_as_elements_and_the_stored_body_stays_plain(
        page_url: str, open_page: OpenPage, connect: Connect) -> None:
    alice = await open_page(page_url)
    script = await connect(page_url)
    body = ("see https://example.org/tickets?id=42. and `x = 1`, *really* _soon_ "
            "javascript:alert(1) ftp://files.example\n```py\nfor i in range(3):\n    print(i)\n```")
    await alice.send("Alice", body)
    item = alice.page.locator("#messages li.message").filter(has_text="tickets")
    await item.locator("a").wait_for()
    link = item.locator(".body a")
    assert await link.count() == 1, "javascript: and ftp: stay text"
    assert await link.get_attribute("href") == "https://example.org/tickets?id=42"
    assert await link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert await link.get_attribute("target") == "_blank"
    assert await item.locator(".body code").first.text_content() == "x = 1"
    assert await item.locator(".body strong").text_content() == "really"
    assert await item.locator(".body em").text_content() == "soon"
    assert await item.locator(".body pre code").text_content() == "for i in range(3):\n    print(i)"
    font = await item.locator(".body pre").evaluate("e => getComputedStyle(e).fontFamily")
    assert "mono" in font.lower() or "consolas" in font.lower()
    stored = [m["body"] for m in (await script.join("lobby"))["history"] if m["kind"] == "user"]
    assert stored == [body], "scripts and the tutorial's page see exactly what was typed"


HOSTILE_BODIES = [
    '<img src=x onerror="alert(1)">', "<script>alert(1)</script>", "[x](javascript:alert(1))",
    'https://example.org/"><img src=x onerror=alert(1)>', "https://example.org/<b>x</b>",
    "javascript:alert(1)//https://example.org", "`<img src=x>`", "```<script>alert(1)</script>```",
    "*<b>bold</b>*", "_<i onmouseover=alert(1)>x</i>_", "https://exa mple.org", "HTTPS://EXAMPLE.ORG/x",
    "data:text/html,<script>alert(1)</script>", "https://example.org/?q=`code`*bold*_it_",
    "```\n```", "``` unclosed", "*", "**", "_a_b_", "http://", "https://[::1]:3000/", "&lt;b&gt;",
]


@pytest.mark.browser
async def test_hostile_bodies_render_only_the_allowed_elements_and_attributes(
        start_chat: StartChat, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS, rate=0, bot="off")
    tab = await open_page(url)
    for body in HOSTILE_BODIES:
        await tab.send("Alice", body)
    async def all_sent() -> bool:
        return await tab.page.locator("#messages li.message:not(.pending)").count() == len(HOSTILE_BODIES)

    await wait_until(all_sent, timeout=30)
    found = await tab.page.evaluate("""() => [...document.querySelectorAll('#messages li.message .body *')]
        .map((e) => ({tag: e.tagName, attrs: [...e.attributes].map((a) => [a.name, a.value])}))""")
    allowed = {"A": {"href", "rel", "target"}, "CODE": set(), "PRE": set(), "STRONG": set(), "EM": set()}
    for node in found:
        assert node["tag"] in allowed, node
        assert {name for name, _ in node["attrs"]} <= allowed[node["tag"]], node
        for name, value in node["attrs"]:
            if name == "href":
                assert re.match(r"https?://", value), value
    texts = await tab.page.locator("#messages li.message .body").all_text_contents()
    assert texts[0] == HOSTILE_BODIES[0] and texts[1] == HOSTILE_BODIES[1], "markup is shown as typed"


@pytest.mark.browser
async def test_the_composer_never_traps_text(page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    long_text = "word " * 600  # 3,000 characters: over --max-length
    await bob.page.get_by_label("Your name").fill("Bob")
    await bob.page.get_by_label("Your message").fill(long_text)
    counter = bob.page.locator("#counter")
    assert await counter.is_visible() and (await counter.text_content() or "").startswith("2999 / 2000")
    await bob.page.get_by_label("Your message").press("Enter")
    assert "too long: 2999 characters, at most 2000" in (await bob.page.locator("#errorMessage").text_content() or "")
    assert await bob.page.get_by_label("Your message").input_value() == long_text, "the text stays in the box"
    assert await bob.page.locator("#messages li.message").count() == 0
    await alice.send("Alice", "I am Alice")
    await bob.message("I am Alice").wait_for()
    await bob.send("alice", "first try")  # refused: the name is Alice's
    failed = bob.page.locator("#messages li.failed")
    await failed.wait_for()
    await failed.get_by_role("button", name="edit").click()
    assert await bob.page.get_by_label("Your message").input_value() == "first try"
    assert await failed.count() == 0
    await bob.send("alice", "second try")
    await failed.wait_for()
    await failed.get_by_role("button", name="dismiss").click()
    assert await failed.count() == 0 and await bob.page.get_by_label("Your message").input_value() == ""


@pytest.mark.browser
async def test_on_a_touch_screen_enter_is_a_new_line_and_send_sends(page_url: str, open_page: OpenPage) -> None:
    phone = await open_page(page_url, has_touch=True, is_mobile=True, viewport={"width": 390, "height": 844})
    assert "Enter: new line" in (await phone.page.get_by_label("Your message").get_attribute("placeholder") or "")
    await phone.page.get_by_label("Your name").fill("Pat")
    box = phone.page.get_by_label("Your message")
    await box.fill("line one")
    await box.press("Enter")
    await box.type("line two")
    assert await box.input_value() == "line one\nline two"
    await phone.page.get_by_role("button", name="Send").tap()
    await phone.message("line one\nline two").wait_for()


@pytest.mark.browser
async def test_a_room_name_with_capitals_and_spaces_is_normalised(page_url: str, open_page: OpenPage) -> None:
    tab = await open_page(page_url)
    await tab.page.get_by_role("textbox", name="Room").fill("Team Room!")
    await tab.page.get_by_role("button", name="Go").click()
    await tab.page.wait_for_url("**/?room=team-room")
    assert await tab.page.get_by_role("textbox", name="Room").input_value() == "team-room"


@pytest.mark.browser
async def test_what_arrives_while_away_is_counted_marked_and_reachable(
        start_chat: StartChat, open_page: OpenPage, connect: Connect) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    page_url = await start_chat(client_js=CLIENT_JS, bot="off")
    bob = await open_page(page_url)
    await bob.send("Bob", "hello, I am Bob")
    await bob.message("hello, I am Bob").wait_for()
    await bob.page.evaluate("""() => {
        Object.defineProperty(document, 'hidden', { configurable: true, get: () => true });
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    ann = await connect(page_url, auth=browser_auth("ann"))
    await ann.say("anyone around?", user="Ann")
    await ann.say("@Bob can you bring the snacks?", user="Ann")
    await bob.message("@Bob can you bring the snacks?").wait_for()
    assert await bob.page.title() == "(2 @) #lobby · chat.py"
    divider = bob.page.locator("#messages li.divider + li .body")
    assert await divider.text_content() == "anyone around?", "the line sits above the first unread"
    assert await bob.page.locator("#messages li.mentions-me").count() == 1
    await bob.page.evaluate("""() => {
        Object.defineProperty(document, 'hidden', { configurable: true, get: () => false });
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    assert await bob.page.title() == "#lobby · chat.py"
    senders = [await connect(page_url, auth=browser_auth(f"s{i}")) for i in range(3)]
    for n, sender in enumerate(senders):
        for i in range(8):
            await sender.say(f"filler {n}.{i}", user=f"Sender{n}")
    await bob.message("filler 2.7").wait_for()
    await bob.page.locator(".conversation").evaluate("e => { e.scrollTop = 0; }")
    await ann.say("the newest line", user="Ann")
    jump = bob.page.get_by_role("button", name="New messages below")
    await jump.wait_for()
    await jump.click()
    await bob.message("the newest line").wait_for()
    assert await bob.message("the newest line").is_visible() and await jump.is_hidden()


@pytest.mark.browser
async def test_in_the_page_names_are_held_and_slash_commands_work(page_url: str, open_page: OpenPage) -> None:
    alice, bob, carol = await open_page(page_url), await open_page(page_url), await open_page(page_url)
    await alice.send("Alice", "hi all")
    await bob.message("hi all").wait_for()
    await bob.send("alice", "I resign, pay Mallory")
    error = bob.page.locator("#errorMessage, #messages li.failed")
    await error.filter(has_text="in use by someone else").first.wait_for()
    assert "I resign" not in " ".join(await alice.user_messages())
    await bob.page.get_by_label("Your name").fill("Bob")
    await bob.send("Bob", "/msg Alice psst, surprise party for Bob")
    for tab in (alice, bob):
        note = tab.page.locator("#messages li.private").filter(has_text="psst, surprise party for Bob")
        await note.wait_for()
    assert "private, to you" in (await alice.page.locator("#messages li.private .state").text_content() or "")
    await bob.send("Bob", "/me waves")
    await carol.page.locator("#messages li.action .body").filter(has_text="* Bob waves").wait_for()
    assert await carol.page.locator("#messages li.private").count() == 0, "nobody else reads it"
    await bob.send("Bob", "/frobnicate now")
    assert "Unknown command /frobnicate" in (await bob.page.locator("#errorMessage").text_content() or "")
    assert await bob.page.get_by_label("Your message").input_value() == "/frobnicate now", "the text is kept"
    await bob.send("Bob", "//slash is literal")
    await alice.message("/slash is literal").wait_for()
    await alice.page.locator("#members button.member", has_text="Bob").click()
    assert await alice.page.get_by_label("Your message").input_value() == "/msg Bob "


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("history", ["memory", "db", pytest.param("redis", marks=pytest.mark.redis)])
async def test_after_a_server_restart_pages_reconnect_and_lose_nothing(
        tmp_path: Path, open_page: OpenPage, history: str, request: pytest.FixtureRequest) -> None:
    """Alice's server restarts; with --redis, Bob stays on a second node that keeps running."""
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    port = free_port()
    args = ("--port", str(port), "--client-js", str(CLIENT_JS))
    others: list[ChatProcess] = []
    if history == "db":
        args += ("--db", str(tmp_path / "restart.db"))
    if history == "redis":
        redis_url = request.getfixturevalue("redis_server").url
        args += ("--redis", redis_url)
    server = ChatProcess(*args)
    url = bob_url = server.wait_ready()
    if history == "redis":
        others.append(ChatProcess("--port", "0", "--client-js", str(CLIENT_JS), "--redis", redis_url))
        bob_url = others[0].wait_ready()
    try:
        alice, bob = await open_page(url), await open_page(bob_url)
        for tab in (alice, bob):
            tab.expected_network_errors = True
        await alice.send("Alice", "one")
        await bob.send("Bob", "two")
        await alice.wait_for_messages(["one", "two"])
        joined_lines = [await tab.page.locator("#messages li.system", has_text="joined").count() for tab in (alice, bob)]
        assert server.stop()[0] == 0
        await alice.page.locator("#status[data-state=reconnecting]").wait_for()
        await alice.send("Alice", "three, sent while the server was down")
        server = ChatProcess(*args)
        server.wait_ready()
        await alice.page.locator("#status[data-state=connected]").wait_for(timeout=15000)
        await bob.page.locator("#status[data-state=connected]").wait_for(timeout=15000)
        await bob.send("Bob", "four")
        # "three" and "four" race after the restart; both pages must show the server's one order.
        expected = {"one", "two", "three, sent while the server was down", "four"}
        deadline = time.monotonic() + 20
        while True:
            shown = [await alice.user_messages(), await bob.user_messages()]
            if shown[0] == shown[1] and len(shown[0]) == 4 and set(shown[0]) == expected:
                break
            assert time.monotonic() < deadline, f"pages show {shown}"
            await asyncio.sleep(0.1)
        assert shown[0][:2] == ["one", "two"]
        assert [await tab.page.locator("#messages li.system", has_text="joined").count() for tab in (alice, bob)] \
            == joined_lines, "people who were online before the restart do not 'join' again"
    finally:
        for proc in (server, *others):
            proc.stop()


class AckGate:
    """Sits on a page's WebSocket and holds back, or drops, the server's acks of `newmessage`."""

    def __init__(self) -> None:
        self.mode = "pass"  # "hold" keeps acks until release(); "drop" loses them
        self.gated: set[str] = set()
        self.held: list[tuple[Any, str]] = []

    async def install(self, page: Any) -> None:
        await page.route_web_socket(re.compile(r"/socket\.io/"), self._route)

    def _route(self, ws: Any) -> None:
        server = ws.connect_to_server()

        def from_page(frame: str | bytes) -> None:
            asked = re.match(r'42(\d+)\["newmessage"', frame) if isinstance(frame, str) else None
            if asked and self.mode != "pass":
                self.gated.add(asked.group(1))
            server.send(frame)

        def from_server(frame: str | bytes) -> None:
            ack = re.match(r"43(\d+)\[", frame) if isinstance(frame, str) else None
            if ack and ack.group(1) in self.gated:
                if self.mode == "hold":
                    self.held.append((ws, frame))
                return
            ws.send(frame)

        ws.on_message(from_page)
        server.on_message(from_server)

    def release(self) -> None:
        self.mode = "pass"
        for ws, frame in self.held:
            ws.send(frame)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("ack", ["late", "lost"])
async def test_a_message_whose_ack_is_delayed_past_a_room_switch_lands_in_its_own_room_only(
        start_chat: StartChat, open_page: OpenPage, connect: Connect, ack: str) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    url = await start_chat(client_js=CLIENT_JS, transports=("websocket",))
    gate = AckGate()
    alice = await open_page(url, before=gate.install)
    lobby, team = await connect(url), await connect(url)
    await team.join("team")
    gate.mode = "hold" if ack == "late" else "drop"
    await alice.send("Alice", "for the lobby")
    assert (await lobby.next("newmessage"))["body"] == "for the lobby"
    await alice.page.get_by_label("Room", exact=True).fill("team")
    await alice.page.get_by_role("button", name="Go").click()
    await alice.page.wait_for_url("**/?room=team")
    await alice.send("Alice", "for the team")
    if ack == "late":
        await team.next("newmessage")  # "for the team" went out while the lobby's ack was still awaited
        gate.release()
    else:  # the page gives up on the lost ack and says so; it never sends it into #team
        failed = alice.page.locator("#messages li.failed", has_text="for the lobby")
        await failed.wait_for(timeout=20000)
        assert "#lobby" in (await failed.locator(".state").text_content() or "")
    if ack == "lost":
        assert (await team.next("newmessage", timeout=20))["body"] == "for the team"
    await alice.wait_for_messages(["for the team"] if ack == "late" else ["for the team", "for the lobby"])
    await lobby.say("lobby is still fine", user="Lou")
    assert (await lobby.next("newmessage"))["body"] == "lobby is still fine", "for the lobby arrived once"
    assert team.pending("newmessage") == [], "nothing typed in the lobby reached the team"


@pytest.mark.browser
async def test_switching_rooms_changes_the_url_the_history_and_the_audience(
        page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    await alice.send("Alice", "in the lobby")
    await bob.wait_for_messages(["in the lobby"])
    await alice.page.get_by_label("Room", exact=True).fill("team")
    await alice.page.get_by_role("button", name="Go").click()
    await alice.page.wait_for_url("**/?room=team")
    await alice.wait_for_messages([])
    await alice.send("Alice", "in the team room")
    await alice.message("in the team room").wait_for()
    await bob.send("Bob", "still in the lobby")
    await bob.wait_for_messages(["in the lobby", "still in the lobby"])
    assert await alice.user_messages() == ["in the team room"]
    direct = await open_page(page_url, path="/?room=team")
    await direct.wait_for_messages(["in the team room"])
    assert await direct.page.get_by_label("Room", exact=True).input_value() == "team"
    await alice.page.go_back()
    await alice.wait_for_messages(["in the lobby", "still in the lobby"])


@pytest.mark.browser
async def test_the_page_shows_who_is_online_and_who_is_typing(page_url: str, open_page: OpenPage) -> None:
    alice, bob = await open_page(page_url), await open_page(page_url)
    await alice.send("Alice", "hi")
    await bob.page.get_by_label("Your name").fill("Bob")
    await bob.page.get_by_label("Your name").press("Tab")
    await alice.page.locator("#members li", has_text="Bob").wait_for()
    assert await alice.page.locator("#member-count").text_content() == "2"
    assert await alice.page.locator("#members li").all_text_contents() == ["Alice", "Bob"]
    await bob.page.get_by_label("Your message").press_sequentially("typing away", delay=10)
    await alice.page.locator("#typing", has_text="Bob is typing…").wait_for()
    assert await bob.page.locator("#typing").text_content() == "", "you do not see yourself typing"
    await bob.page.get_by_label("Your message").press("Enter")
    await alice.page.locator("#typing:empty").wait_for()
    await alice.page.locator("#messages li.system", has_text="Bob joined").wait_for()


# ---------------------------------------------------------------- the benchmark keeps working


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_benchmark_smoke_run_works() -> None:
    real_npm = {name: value for name, value in os.environ.items() if name != "npm_config_registry"}
    result = subprocess.run([sys.executable, str(HERE / "bench_chat.py"), "--quick", "--smoke",
                             "--workloads", "startup,fanout,idle,slow"],
                            capture_output=True, text=True, timeout=580, cwd=HERE, env=real_npm)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "## Fan-out" in result.stdout and "| chat | 20 |" in result.stdout
    assert "| floor |" in result.stdout and "| limit |" in result.stdout
    if shutil.which("node") and shutil.which("npm"):  # the tutorial's server, the baseline users compare with
        assert "| node | 20 |" in result.stdout and "vs Node" in result.stdout
    assert "stalled reader" in result.stdout


@pytest.mark.parametrize("baseline", ["node", "uws"])
def test_the_benchmarks_npm_install_that_hangs_skips_the_node_baselines_with_a_line(baseline: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    require(bool(shutil.which("node")), "node")
    sys.path.insert(0, str(HERE))
    try:
        import bench_chat
    finally:
        sys.path.remove(str(HERE))
    fake_npm = tmp_path / "bin" / "npm"
    fake_npm.parent.mkdir()
    fake_npm.write_text("#!/bin/sh\nexec sleep 600\n")  # a registry that never answers
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_npm.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(bench_chat, "BENCH_CACHE", tmp_path)
    monkeypatch.setattr(bench_chat, "NPM_TIMEOUT", 0.2)
    assert bench_chat.node_modules(baseline) is None
    assert capsys.readouterr().out == (f"bench_chat.py: skipping the {baseline} baseline: npm install did not "
                                       "finish in 0.2 s (is the npm registry reachable?)\n")


def test_the_benchmark_reports_a_point_measured_several_times_as_its_median_run_and_range() -> None:
    sys.path.insert(0, str(HERE))
    try:
        import bench_chat
    finally:
        sys.path.remove(str(HERE))
    runs = [{"best": {"new_per_s": rate}, "half": {"p99_ms": p99}} for rate, p99 in ((300.0, 9.0), (100.0, 30.0),
                                                                                      (200.0, 12.0))]
    point = bench_chat.median_run(runs, lambda r: r["best"]["new_per_s"],
                                  {"new_per_s": lambda r: r["best"]["new_per_s"], "p99": lambda r: r["half"]["p99_ms"]})
    assert point["best"]["new_per_s"] == 200.0 and point["half"]["p99_ms"] == 12.0, "one real run, whole"
    assert point["over_runs"]["p99"] == {"median": 12.0, "min": 9.0, "max": 30.0, "values": [9.0, 30.0, 12.0]}
    assert bench_chat.spread(point, "new_per_s") == "200 (100–300)"
    assert bench_chat.spread(bench_chat.median_run(runs[:1], lambda r: 0, {"x": lambda r: 5.0}), "x", 1, " KB") \
        == "5.0 KB", "a single run shows no range"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_benchmark_memory_profile_says_which_code_holds_each_idle_connections_memory(tmp_path: Path) -> None:
    fake_npm = tmp_path / "bin" / "npm"  # a memory profile of chat.py alone must never run npm
    fake_npm.parent.mkdir()
    fake_npm.write_text(f"#!/bin/sh\ntouch {tmp_path / 'npm-ran'}\nsleep 600\n")
    fake_npm.chmod(0o755)
    result = subprocess.run([sys.executable, str(HERE / "bench_chat.py"), "--memory-profile", "200"],
                            capture_output=True, text=True, timeout=280, cwd=HERE,
                            env={**os.environ, "PATH": f"{fake_npm.parent}:{os.environ['PATH']}"})
    assert not (tmp_path / "npm-ran").exists()
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "Where chat.py's memory per idle connection goes (200 idle WebSocket clients" in out
    per_package = dict(re.findall(r"^\| (aiohttp|engineio|chat\.py) \| ([0-9.]+) \|$", out, re.M))
    assert set(per_package) == {"aiohttp", "engineio", "chat.py"}, out
    assert 1 < float(per_package["aiohttp"]) < 100, "every connection has an aiohttp WebSocket: some KB each"
    assert re.search(r"^\| aiohttp/web_ws\.py:\d+ \| [0-9.]+ \| [0-9.]+ \| `.+` \|$", out, re.M), \
        "lines are named by package file and line, with their source"


@pytest.mark.browser
async def test_an_unacknowledged_message_is_retried_then_marked_failed_with_a_retry_button(
        page_url: str, browser: Any) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await page.clock.install()  # the page's 8 s ack timeouts run on a clock the test can move
    dropping = {"on": True}

    def route(ws: Any) -> None:  # stand between the page and chat.py, dropping the page's messages
        server = ws.connect_to_server()

        def from_page(message: Any) -> None:
            if dropping["on"] and isinstance(message, str) and message.startswith('42') and "newmessage" in message:
                dropping["sent"] = dropping.get("sent", 0) + 1
                return
            server.send(message)

        ws.on_message(from_page)
        server.on_message(lambda message: ws.send(message))

    await page.route_web_socket(re.compile(r".*/socket\.io/.*"), route)
    tab = BrowserPage(page)
    await page.goto(page_url)
    await page.locator("#status[data-state=connected]").wait_for()
    await tab.send("Ria", "will this arrive?")
    state = page.locator("#messages li.pending .state")
    assert await state.text_content() == "sending…"
    for _ in range(4):
        await page.clock.run_for(8_100)
    await page.locator("#messages li.failed .state", has_text="failed").wait_for()
    assert dropping["sent"] == 4, "sent once and retried three times"
    dropping["on"] = False
    await page.get_by_role("button", name="retry").click()
    await tab.message("will this arrive?").wait_for()
    await page.locator("#messages li.failed").wait_for(state="detached")
    assert await tab.user_messages() == ["will this arrive?"]
    assert tab.errors == []
    await context.close()


# ---------------------------------------------------------------- library internals still where chat.py expects them


def test_every_library_internal_chat_py_relies_on_is_still_there() -> None:
    """One check per hook listed in chat.py's "library internals" section: an upgrade that moves
    one fails here, by name, instead of misbehaving at run time."""
    import engineio
    from engineio import async_socket
    from engineio.async_drivers import aiohttp as eio_aiohttp

    def params(fn: Any) -> list[str]:
        return list(inspect.signature(fn).parameters)

    def source(fn: Any) -> str:
        return inspect.getsource(fn)

    server = engineio.AsyncServer(async_mode="aiohttp")
    assert {"websocket", "translate_request"} <= set(server._async), "engineio AsyncServer._async"
    assert params(engineio.AsyncServer._handle_connect) == ["self", "environ", "transport", "jsonp_index"]
    handle_connect = source(engineio.AsyncServer._handle_connect)
    assert handle_connect.index("async_socket.AsyncSocket(self, sid)") < handle_connect.index("await"), \
        "EngineServer.create_queue: the session (and its queue) is made before any await"
    assert "self._trigger_event('connect', sid, environ" in handle_connect, "SessionCap: the environ reaches connect"
    assert params(engineio.AsyncServer._trigger_event)[:2] == ["self", "event"]
    assert "_send_ping" in source(async_socket.AsyncSocket.schedule_ping)
    assert "self.server.start_background_task" in source(async_socket.AsyncSocket.schedule_ping)
    assert "self.queue.get_nowait()" in source(async_socket.AsyncSocket.poll)
    assert "self.queue = self.server.create_queue()" in source(async_socket.AsyncSocket.__init__)
    assert params(async_socket.AsyncSocket.close) == ["self", "wait", "abort", "reason"]
    assert "await self._sock.receive()" in source(eio_aiohttp.WebSocket.wait)
    assert "self.get_nowait()" in source(asyncio.Queue.get) and "self.put_nowait(" in source(asyncio.Queue.put)
    assert callable(socketio.AsyncServer._engineio_server_class)
    assert params(socketio.AsyncServer._handle_eio_message) == ["self", "eio_sid", "data"]
    assert params(socketio.AsyncServer._handle_event_internal) == [
        "self", "server", "sid", "eio_sid", "data", "namespace", "id"]
    assert params(socketio.AsyncServer._handle_connect) == ["self", "eio_sid", "namespace", "data"]
    assert params(socketio.AsyncServer._handle_eio_disconnect)[:2] == ["self", "eio_sid"]
    assert "self.environ[eio_sid] = environ" in source(socketio.AsyncServer._handle_eio_connect)
    from socketio import async_pubsub_manager
    pubsub = async_pubsub_manager.AsyncPubSubManager
    assert "data.get('host_id') != self.host_id" in source(pubsub._thread), "emits from other hosts are handled"
    assert "message['data']" in source(pubsub._handle_emit) and "message.get('room')" in source(pubsub._handle_emit)
    assert params(socketio.AsyncRedisManager._publish) == ["self", "data"]
    assert params(socketio.AsyncRedisManager._redis_listen_with_retries) == ["self"]
    assert callable(socketio.AsyncRedisManager._redis_connect)
    assert params(socketio.AsyncManager.eio_sid_from_sid) == ["self", "sid", "namespace"], "engine_sid()"
    manager = socketio.AsyncManager()  # room segments: membership changes all pass through basic_*_room
    changes: list[str] = []
    manager.basic_enter_room = lambda *a, **k: (changes.append("enter"), type(manager).basic_enter_room(manager, *a, **k))
    manager.basic_leave_room = lambda *a, **k: (changes.append("leave"), type(manager).basic_leave_room(manager, *a, **k))
    manager.set_server(types.SimpleNamespace(eio=types.SimpleNamespace(generate_id=lambda: "sid-1"),
                                             packet_class=socketio.packet.Packet))
    asyncio.run(manager.connect("eio-1", "/"))
    asyncio.run(manager.enter_room("sid-1", "/", "lobby"))
    assert dict(manager.rooms["/"]["lobby"]) == {"sid-1": "eio-1"}, "FanoutManager reads manager.rooms"
    asyncio.run(manager.close_room("lobby", "/"))
    asyncio.run(manager.disconnect("sid-1", "/"))
    assert changes == ["enter", "enter", "enter", "leave", "leave", "leave"], "connect, enter, close, disconnect"
    from aiohttp import web_protocol, web_server
    assert isinstance(web_server.Server.connections, property), "open_http_transports(): Server.connections"
    assert hasattr(web_protocol.RequestHandler, "transport"), "open_http_transports(): RequestHandler.transport"
    from engineio import payload
    assert payload.Payload.max_decode_packets >= chat.FRAME_LIMIT_FLOOR // 2, "set in chat.py's internals"
    assert "self.max_decode_packets" in source(payload.Payload.decode)


async def test_engineio_websocket_call_still_does_what_chat_websocket_call_copies() -> None:
    """ChatWebSocket.__call__ replaces python-engineio's: this checks what upstream's does, by behaviour.
    It prepares a WebSocketResponse for environ["aiohttp.request"] whose size limit is the server's
    max_http_buffer_size, sets .environ, awaits handler(itself) and returns the response."""
    from engineio.async_drivers import aiohttp as eio_aiohttp

    seen: dict[str, Any] = {}

    class Server:
        max_http_buffer_size = 1000

    async def handler(ws: Any) -> None:
        seen.update(ws=ws, prepared=ws._sock.prepared, environ=ws.environ)
        with contextlib.suppress(OSError):
            seen["first"] = await ws.wait()
            await ws.wait()  # a frame over the limit: aiohttp closes with 1009, wait() raises OSError

    async def route(request: web.Request) -> web.StreamResponse:
        wrapper = eio_aiohttp.WebSocket(handler, Server())
        environ = {"aiohttp.request": request}
        response = await wrapper(environ)
        seen.update(wrapper=wrapper, response=response, expected_environ=environ)
        return response

    app = web.Application()
    app.router.add_get("/ws", route)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await ws.send_str("x" * 900)
            await ws.send_str("x" * 1100)
            closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        assert seen["ws"] is seen["wrapper"] and seen["prepared"], "handler(itself), after prepare()"
        assert seen["environ"] is seen["expected_environ"] and seen["first"] == "x" * 900
        assert isinstance(seen["response"], web.WebSocketResponse)
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- the WebSocket output path keeps order


async def test_a_websocket_connection_gets_its_packets_in_order_with_one_write_per_loop_iteration() -> None:
    from types import SimpleNamespace

    from engineio import packet as eio_packet

    written: list[bytes] = []
    buffered = {"bytes": 0}
    transport = SimpleNamespace(write=written.append, get_write_buffer_size=lambda: buffered["bytes"],
                                is_closing=lambda: False)
    closed: list[bool] = []

    class FakeWebSocket:
        response = SimpleNamespace(closed=False)

        def __init__(self) -> None:
            self.transport = transport

        async def close(self) -> None:
            closed.append(True)

    dropped: list[str] = []
    flusher = chat.FrameFlusher(max_bytes=1024, overflow=dropped.append)
    queue = chat.LeanQueue(flusher)
    await queue.put(eio_packet.Packet(eio_packet.OPEN, {"sid": "eio-1"}))  # before the WebSocket is open
    queue.attach(FakeWebSocket(), "eio-1")  # type: ignore[arg-type]
    sock = SimpleNamespace(closing=False, closed=False, queue=queue)
    manager = chat.FanoutManager()
    eio = SimpleNamespace(sockets={"eio-1": sock}, generate_id=lambda: "sid-1", max_queue=1, flusher=flusher)
    manager.set_server(SimpleNamespace(eio=eio, packet_class=socketio.packet.Packet))
    await manager.connect("eio-1", "/")

    await manager.emit("newmessage", {"body": "first"}, "/")
    await queue.put(eio_packet.Packet(eio_packet.MESSAGE, '31[{"ok":true}]'))  # an ack, between broadcasts
    await manager.emit("newmessage", {"body": "second"}, "/")
    queue.put_nowait(eio_packet.Packet(eio_packet.PING))
    assert written == [], "frames of one iteration wait for one write"
    await asyncio.sleep(0)  # the next event-loop iteration
    assert written == [  # unmasked text frames: 0x81, the length, the Engine.IO packet
        b'\x81\x10' b'0{"sid":"eio-1"}' b'\x81\x21' b'42["newmessage",{"body":"first"}]'
        b'\x81\x10' b'431[{"ok":true}]' b'\x81\x22' b'42["newmessage",{"body":"second"}]' b'\x81\x01' b'2'
    ], "in the order put, in one write"

    buffered["bytes"] = 1000  # the client stopped reading: the transport holds nearly the bound
    await manager.emit("newmessage", {"body": "x" * 40}, "/")
    await asyncio.sleep(0)
    assert dropped == ["eio-1"] and len(written) == 1, "past the bound the client is dropped, nothing buffered"

    buffered["bytes"] = 0
    queue.put_nowait(eio_packet.Packet(eio_packet.CLOSE))
    queue.put_nowait(None)  # python-engineio's "stop the writer": end after what was put
    assert closed == []
    await asyncio.sleep(0)
    assert written[-1] == b"\x81\x011", "the CLOSE packet is written"
    await asyncio.sleep(0)
    assert closed == [True], "then the WebSocket is closed"
    queue.put_nowait(eio_packet.Packet(eio_packet.PING))
    await asyncio.sleep(0)
    assert written[-1] == b"\x81\x011", "nothing after the end"


async def test_broadcasts_to_a_big_room_share_one_joined_segment_and_keep_each_connections_order() -> None:
    from types import SimpleNamespace

    from engineio import packet as eio_packet

    flusher = chat.FrameFlusher(max_bytes=4096, overflow=lambda sid: dropped.append(sid))
    dropped: list[str] = []
    writes: dict[str, list[bytes]] = {}
    buffered: dict[str, int] = {}
    sockets: dict[str, Any] = {}

    def websocket_session(eio_sid: str) -> None:
        writes[eio_sid], buffered[eio_sid] = [], 0
        transport = SimpleNamespace(write=writes[eio_sid].append, is_closing=lambda: False,
                                    get_write_buffer_size=lambda: buffered[eio_sid])
        queue = chat.LeanQueue(flusher)
        queue.attach(SimpleNamespace(response=SimpleNamespace(closed=False), transport=transport), eio_sid)  # type: ignore[arg-type]
        sockets[eio_sid] = SimpleNamespace(sid=eio_sid, closing=False, closed=False, queue=queue)

    polled: list[Any] = []
    names = iter(f"sid-{n}" for n in range(100))
    manager = chat.FanoutManager()
    eio = SimpleNamespace(sockets=sockets, generate_id=lambda: next(names), flusher=flusher)
    manager.set_server(SimpleNamespace(eio=eio, packet_class=socketio.packet.Packet))
    members = [f"eio-{n}" for n in range(chat.SHARED_SEGMENT_MEMBERS)]
    for eio_sid in members:
        websocket_session(eio_sid)
    sockets["eio-poll"] = SimpleNamespace(sid="eio-poll", closing=False, closed=False,
                                          queue=SimpleNamespace(put_nowait=polled.append))
    sid_of = {eio_sid: await manager.connect(eio_sid, "/") for eio_sid in [*members, "eio-poll"]}
    for sid in sid_of.values():
        await manager.enter_room(sid, "/", "lobby")
    websocket_session("eio-late")
    sid_of["eio-late"] = await manager.connect("eio-late", "/")

    def frame(text: str) -> bytes:  # an unmasked text frame: 0x81, the length, the payload
        return bytes([0x81, len(text)]) + text.encode()

    a, b, c = (frame(f'42["newmessage",{{"body":"{x}"}}]') for x in "abc")
    ack, private = frame('431[{"ok":true}]'), frame('42["private",{"body":"p"}]')
    await manager.emit("newmessage", {"body": "a"}, "/", room="lobby")
    sockets["eio-0"].queue.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, '31[{"ok":true}]'))
    await manager.emit("newmessage", {"body": "b"}, "/", room="lobby", skip_sid=sid_of["eio-1"])
    await manager.emit("private", {"body": "p"}, "/", room=sid_of["eio-2"])
    await manager.enter_room(sid_of["eio-late"], "/", "lobby")
    await manager.emit("newmessage", {"body": "c"}, "/", room="lobby")
    assert all(w == [] for w in writes.values()), "nothing is written before the next iteration"
    await asyncio.sleep(0)
    assert writes["eio-0"] == [a + ack + b + c], "the ack between broadcasts stays between them"
    assert writes["eio-1"] == [a + c], "a broadcast that skips a member skips it"
    assert writes["eio-2"] == [a + b + private + c], "a private frame keeps its place"
    assert writes["eio-late"] == [c], "someone who joins gets what is broadcast after"
    rest = [writes[e] for e in members[3:]]
    assert rest == [[a + b + c]] * len(rest), "one write each"
    assert [p.data for p in polled] == [f'2["newmessage",{{"body":"{x}"}}]' for x in "abc"], \
        "a polling member gets each broadcast on its own"

    buffered["eio-3"] = 4090  # stopped reading: the transport holds nearly the bound
    await manager.emit("newmessage", {"body": "a"}, "/", room="lobby")
    await asyncio.sleep(0)
    assert dropped == ["eio-3"] and len(writes["eio-3"]) == 1, "past the bound a member is dropped, not written"
    assert writes["eio-4"][-1] == a and dropped == ["eio-3"], "the others are not"
    assert all(writes[e][-1] is writes["eio-4"][-1] for e in members[5:]), "one segment is joined once for all"

    await manager.emit("newmessage", {"body": "b"}, "/", room="lobby")
    await manager.leave_room(sid_of["eio-5"], "/", "lobby")  # kicked from the room, say
    await manager.emit("newmessage", {"body": "c"}, "/", room="lobby")
    await asyncio.sleep(0)
    assert writes["eio-5"][-1] == b and writes["eio-6"][-1] == b + c, "who leaves gets nothing sent after"


@pytest.mark.browser
async def test_in_the_page_a_moderator_logs_in_deletes_and_removes_a_spammer(
        start_chat: StartChat, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    page_url = await start_chat(client_js=CLIENT_JS, bot="off", admin_password=ADMIN)
    host, spammer, friend = await open_page(page_url), await open_page(page_url), await open_page(page_url)
    await host.send("Host", "welcome")
    await spammer.send("Spammer", "SPAM SPAM")
    await friend.send("Friend", "/kick Spammer")
    assert "Only moderators" in (await friend.page.locator("#errorMessage").text_content() or "")
    await host.send("Host", "/login")
    await host.page.get_by_label("Moderator password").fill(ADMIN)
    await host.page.get_by_role("button", name="Log in").click()
    await host.page.locator("#messages li.system").filter(has_text="You are a moderator now").wait_for()
    await friend.page.locator("#members li").filter(has_text="Host").locator(".badge").wait_for()
    spam = host.page.locator("#messages li.message").filter(has_text="SPAM SPAM")
    await spam.get_by_role("button", name=re.compile("Delete message")).click()
    placeholder = friend.page.locator("#messages li.deleted .body")
    await placeholder.wait_for()
    assert await placeholder.text_content() == "message deleted"
    assert await friend.page.locator("#messages li").filter(has_text="SPAM SPAM").count() == 0
    assert await friend.page.locator("#messages li.message").filter(has_text="welcome").get_by_role(
        "button", name=re.compile("Delete")).count() == 0, "not someone else's message"
    await host.send("Host", "/kick Spammer enough")
    banner = spammer.page.locator("#banner")
    await banner.filter(has_text="Host removed you from the chat: enough.").wait_for()
    assert await spammer.page.get_by_role("button", name="Send").is_disabled()
    await friend.page.locator("#messages li.system").filter(has_text="Host removed Spammer: enough").wait_for()


NOTIFICATIONS_RECORDED = """() => {
    window.shown = [];
    window.Notification = class { constructor(title, options) { window.shown.push([title, options.body]); }
                                  static permission = 'granted';
                                  static requestPermission() { return Promise.resolve('granted'); } };
    Object.defineProperty(document, 'hidden', { configurable: true, get: () => window.away === true });
}"""


@pytest.mark.browser
async def test_notifications_are_opt_in_and_by_default_only_for_mentions_and_private_messages(
        start_chat: StartChat, open_page: OpenPage, connect: Connect) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    page_url = await start_chat(client_js=CLIENT_JS, bot="off")
    bob = await open_page(page_url, before=lambda page: page.add_init_script(script=f"({NOTIFICATIONS_RECORDED})()"))
    await bob.send("Bob", "hello")
    ann = await connect(page_url, auth=browser_auth("ann"))
    await ann.join("lobby", user="Ann")
    await bob.page.evaluate("window.away = true")
    await ann.say("before opting in, @Bob", user="Ann")
    await bob.message("before opting in, @Bob").wait_for()
    assert await bob.page.evaluate("window.shown") == [], "nothing until the person asks"
    await bob.page.locator("#alerts summary").click()
    await bob.page.get_by_label("mentions and private messages").check()
    assert await bob.page.evaluate("localStorage.getItem('chat.notify')") == "mentions"
    await ann.say("an ordinary line", user="Ann")
    await ann.say("@Bob your turn", user="Ann")
    await ann.sio.call("private", {"to": "Bob", "body": "just for you"}, timeout=10)
    await bob.page.locator("#messages li.private").wait_for()
    assert await bob.page.evaluate("window.shown") == [["Ann in #lobby", "@Bob your turn"],
                                                       ["Ann (private)", "just for you"]]


@pytest.mark.browser
async def test_names_complete_with_tab_and_from_the_list_that_opens_on_at(
        start_chat: StartChat, open_page: OpenPage, connect: Connect) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    page_url = await start_chat(client_js=CLIENT_JS, bot="off")
    for name in ("Alexandra", "Bob"):
        await (await connect(page_url, auth=browser_auth(name))).join("lobby", user=name)
    carol = await open_page(page_url)
    await carol.send("Carol", "hi")
    box = carol.page.get_by_label("Your message")
    await box.fill("")
    await box.type("thanks @al")
    await box.press("Tab")
    assert await box.input_value() == "thanks @Alexandra "
    await box.type("and @")
    suggestion = carol.page.locator("#suggest").get_by_role("button", name="@Bob")
    await suggestion.click()
    assert await box.input_value() == "thanks @Alexandra and @Bob "
    assert await carol.page.locator("#suggest").is_hidden()


@pytest.mark.browser
async def test_scrolling_up_loads_older_messages_and_search_shows_a_hit_in_context(
        start_chat: StartChat, open_page: OpenPage, connect: Connect) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    page_url = await start_chat(client_js=CLIENT_JS, bot="off", rate=0, history=200)
    writer = await connect(page_url)
    for i in range(120):
        await writer.say(f"line {i}" + (" about the tickets" if i == 3 else ""))
    reader = await open_page(page_url)
    await reader.message("line 119").wait_for()
    assert await reader.page.locator("#messages li.message").count() == chat.RECENT_PAGE
    await reader.page.locator(".conversation").evaluate("e => { e.scrollTop = 0; }")
    await reader.message("line 69").wait_for()
    await reader.page.get_by_label("Search this room").fill("tickets")
    await reader.page.get_by_label("Search this room").press("Enter")
    hit = reader.page.locator("#search-list li button")
    await hit.filter(has_text="line 3 about the tickets").wait_for()
    assert await hit.count() == 1 and "Alice" in (await hit.text_content() or "")
    await hit.click()
    found = reader.page.locator("#messages li.found")
    await found.filter(has_text="line 3 about the tickets").wait_for()
    assert await found.is_visible()
    assert await reader.page.locator("#messages li.message").count() == 120, "every page loaded once"


@pytest.mark.browser
async def test_in_the_page_ban_mute_lock_slow_and_clear_say_what_happened(
        start_chat: StartChat, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    page_url = await start_chat(client_js=CLIENT_JS, bot="off", admin_password=ADMIN)
    host, guest, troll = await open_page(page_url), await open_page(page_url), await open_page(page_url)
    await host.send("Host", f"/login {ADMIN}")
    await host.page.locator("#messages li.system").filter(has_text="You are a moderator now").wait_for()
    await guest.send("Guest", "hello")
    await troll.send("Troll", "first")
    await host.send("Host", "/mute Guest")
    await guest.page.locator("#messages li.system").filter(has_text="Host muted Guest").wait_for()
    await guest.send("Guest", "am I muted?")
    await guest.page.locator("#messages li.failed").filter(has_text="A moderator has muted you").wait_for()
    await host.send("Host", "/unmute Guest")
    await host.send("Host", "/lock")
    await guest.page.locator("#messages li.system").filter(has_text="Host locked the room").wait_for()
    await guest.send("Guest", "locked?")
    await guest.page.locator("#messages li.failed").filter(has_text="is locked").wait_for()
    await host.send("Host", "/unlock")
    await host.send("Host", "/slow 2")
    await guest.page.locator("#messages li.system").filter(has_text="slow mode").wait_for()
    await guest.send("Guest", "slow one")
    await guest.message("slow one").wait_for()
    await guest.send("Guest", "slow two")
    await guest.page.locator("#messages li.pending .state").filter(has_text="slow mode: waiting").wait_for()
    await host.message("slow two").wait_for(timeout=10000)  # sent by the page once allowed
    await host.send("Host", "/clear")
    await guest.page.locator("#messages li.system").filter(has_text="cleared the room's history").wait_for()
    assert await guest.page.locator("#messages li.message:not(.failed)").count() == 0
    await host.send("Host", "/ban Troll 10")
    await troll.page.locator("#banner").filter(has_text="A moderator has banned you").wait_for()
    troll.expected_network_errors = True
    await troll.page.reload()
    await troll.page.locator("#banner").filter(has_text=re.compile("banned you from this chat until")).wait_for()
    assert await troll.page.locator("#status").text_content() == "banned"


@pytest.mark.browser
async def test_the_sound_plays_only_when_chosen(start_chat: StartChat, open_page: OpenPage, connect: Connect) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    page_url = await start_chat(client_js=CLIENT_JS, bot="off")
    recorded = NOTIFICATIONS_RECORDED.replace("window.shown = [];", """window.shown = []; window.beeps = 0;
        window.AudioContext = class { constructor() { this.currentTime = 0; this.destination = {}; }
          createOscillator() { return { frequency: {}, connect: (g) => g, start: () => { window.beeps += 1; },
                                        stop: () => {} }; }
          createGain() { return { gain: { setValueAtTime() {}, exponentialRampToValueAtTime() {} },
                                  connect: (d) => d }; } };""")
    bob = await open_page(page_url, before=lambda page: page.add_init_script(script=f"({recorded})()"))
    await bob.send("Bob", "hello")
    ann = await connect(page_url, auth=browser_auth("ann"))
    await ann.join("lobby", user="Ann")
    await bob.page.locator("#alerts summary").click()
    await bob.page.get_by_label("every message").check()
    await bob.page.evaluate("window.away = true")
    await ann.say("no sound asked for", user="Ann")
    await bob.message("no sound asked for").wait_for()
    assert await bob.page.evaluate("[window.beeps, window.shown.length]") == [0, 1]
    await bob.page.get_by_label("with a sound").check()
    await ann.say("now with a sound", user="Ann")
    await bob.message("now with a sound").wait_for()
    assert await bob.page.evaluate("window.beeps") == 1
    assert await bob.page.evaluate("localStorage.getItem('chat.sound')") == "on"


async def test_search_without_fts5_reads_the_recent_messages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(chat, "SQLITE_SEARCH_SCHEMA", "CREATE VIRTUAL TABLE messages_fts USING no_such_module(body);")
    store = chat.SqliteStore(tmp_path / "plain.db", history=10)
    await store.open()
    try:
        assert store.indexed is False
        await store.append("r", "Ann", "Tickets sold out", "user", None)
        await store.append("r", "Ann", "nothing here", "user", None)
        assert [m.body for m in await store.search("r", chat.search_words("tickets"), 10)] == ["Tickets sold out"]
    finally:
        await store.close()


@pytest.mark.redis
async def test_older_pages_search_and_deletes_with_redis(nodes: Any, connect: Connect) -> None:
    _, url_a = nodes("--bot", "off", "--history", "80")
    _, url_b = nodes("--bot", "off", "--history", "80")
    writer = await connect(url_a)
    ids = [(await writer.say(f"line {i}" + (" tickets" if i == 7 else "")))["id"] for i in range(70)]
    reader = await connect(url_b)
    first = await reader.join("lobby")
    assert [m["id"] for m in first["history"]] == ids[-chat.RECENT_PAGE:]
    page = await reader.sio.call("history", {"before": first["history"][0]["id"]}, timeout=10)
    assert [m["id"] for m in page["history"]] == ids[:-chat.RECENT_PAGE] and page["more"] is False
    found = await reader.sio.call("search", {"q": "tickets"}, timeout=10)
    assert [m["id"] for m in found["results"]] == [ids[7]]
    assert (await moderate(writer, "delete", id=ids[7]))["ok"], "one's own message"
    assert (await reader.next("deleted"))["id"] == ids[7]
    assert (await reader.sio.call("search", {"q": "tickets"}, timeout=10))["results"] == []


# ---------------------------------------------------------------- private rooms: end-to-end encrypted


def envelope(size: int = 40) -> str:
    """An e2e:v1 body as a page makes it (the server cannot tell it from random bytes, nor should it)."""
    return chat.ENVELOPE_PREFIX + base64.b64encode(os.urandom(size)).decode()


async def test_an_envelope_makes_a_room_private_and_each_kind_of_room_refuses_the_other(
        start_chat: StartChat, connect: Connect) -> None:
    url = await start_chat(rate=0)  # the keyword bot, answering everything
    peer = await connect(url)
    ack = await peer.join("secret", user="Ann")
    sealed = envelope()
    assert (await peer.say(sealed, user="Ann"))["ok"]
    assert (await peer.next("newmessage"))["body"] == sealed, "stored and sent as it came"
    refused = await peer.say("plain words", user="Ann")
    assert (refused["ok"], refused["code"]) == (False, "room_private")
    assert (await peer.join("secret", user="Ann"))["private"] is True and ack["private"] is False
    for bad, code in ((chat.ENVELOPE_PREFIX + "not*base64", "bad_envelope"), ("e2e:v9:AAAA", "bad_envelope"),
                      (envelope(4 * 2000 + 100), "too_long")):
        assert (await peer.say(bad, user="Ann"))["code"] == code
    assert (await peer.say(envelope(4 * 2000 + 28), user="Ann"))["ok"], "the longest message fits"
    assert (await peer.sio.call("search", {"q": sealed[10:20]}, timeout=10))["results"] == [], "not searched"
    await peer.join("lobby", user="Ann")
    await peer.say("hello, plain room", user="Ann")
    assert (await peer.next("botmessage"))["body"] == "Hello, Ann!"
    assert peer.pending("botmessage") == [], "the bot never answered an envelope"
    assert (await peer.say(envelope(), user="Ann"))["code"] == "room_not_private"


@pytest.mark.browser
async def test_two_pages_with_the_invite_link_talk_and_nobody_else_reads_a_word(
        start_chat: StartChat, open_page: OpenPage, connect: Connect, tmp_path: Path) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    db = tmp_path / "e2e.db"
    page_url = await start_chat(client_js=CLIENT_JS, rate=0, db=db)
    ann = await open_page(page_url)
    await ann.page.get_by_role("button", name="New private room").click()
    link = await ann.page.get_by_label("Invite link").input_value()
    room = re.search(r"room=([a-z0-9-]+)#k=", link).group(1)  # type: ignore[union-attr]
    observer = await connect(page_url)
    await observer.join(room)
    await ann.send("Ann", "MARKER-ann hello @Bob")
    bob = await open_page(link, path="")
    await bob.message("MARKER-ann hello @Bob").wait_for()
    await bob.send("Bob", "MARKER-bob hi Ann")
    await ann.message("MARKER-bob hi Ann").wait_for()
    await ann.send("Ann", "MARKER-ann @Bob, see this?")
    await bob.page.locator("#messages li.mentions-me").filter(has_text="see this?").wait_for()  # decrypted text
    seen = [m["body"] for m in await observer.take("newmessage", 3)]
    assert all(b.startswith("e2e:v1:") and "MARKER" not in b for b in seen), "the server sees envelopes only"
    assert observer.pending("botmessage") == [], "the bot stays silent"
    replayed = await observer.say(seen[0], user="Mallory", cid="replay-1")  # Ann's envelope under another name
    assert replayed["ok"]
    await bob.page.locator("#messages li.undecryptable").filter(has_text="cannot decrypt").wait_for()
    assert await bob.page.locator("#messages li.message").filter(has_text="MARKER-ann hello").count() == 1
    eve = await open_page(link.split("#")[0], path="")
    await eve.page.locator("#banner").filter(has_text="Ask for the invite link").wait_for()
    assert "MARKER" not in (await eve.page.locator("#messages").text_content() or "")
    await eve.send("Eve", "plain words in a private room")
    await eve.page.locator("#messages li.failed").filter(has_text="is a private room").wait_for()
    wrong = await open_page(link[:-6] + "AAAAAA", path="")
    await wrong.page.locator("#messages li.undecryptable").filter(has_text="cannot decrypt").first.wait_for()
    await wrong.send("Mal", "the page still works")
    await bob.page.reload()
    await bob.message("MARKER-ann hello @Bob").wait_for()
    own = bob.page.locator("#messages li.message.mine").filter(has_text="MARKER-bob hi Ann")
    await own.get_by_role("button", name=re.compile("Delete")).click()
    await ann.page.locator("#messages li.deleted").wait_for()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("e2e.db"))
    assert b"MARKER" not in raw and raw.count(b"e2e:v1:") >= 1, "the file holds envelopes, never the words"


@pytest.mark.browser
@pytest.mark.redis
async def test_a_private_room_reads_the_same_on_another_node_and_redis_holds_no_words(
        nodes: Any, redis_server: RedisServer, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    _, url_a = nodes("--client-js", str(CLIENT_JS))
    _, url_b = nodes("--client-js", str(CLIENT_JS))
    ann = await open_page(url_a)
    await ann.page.get_by_role("button", name="New private room").click()
    link = await ann.page.get_by_label("Invite link").input_value()
    await ann.send("Ann", "MARKER across nodes")
    await ann.message("MARKER across nodes").wait_for()
    bob = await open_page(link.replace(url_a, url_b), path="")
    await bob.message("MARKER across nodes").wait_for()
    import redis.asyncio as aioredis
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        stored = []
        async for key in client.scan_iter():
            kind = (await client.type(key)).decode()
            value = {"string": client.get, "list": lambda k: client.lrange(k, 0, -1), "hash": client.hgetall,
                     "zset": lambda k: client.zrange(k, 0, -1), "set": client.smembers}[kind](key)
            stored.append(repr(await value))
    finally:
        await client.aclose()
    assert any("e2e:v1:" in v for v in stored) and not any("MARKER" in v for v in stored)


@pytest.mark.slow
async def test_private_room_history_decrypts_after_a_restart_with_db(tmp_path: Path, open_page: OpenPage) -> None:
    require(CLIENT_JS.is_file(), "the npm package socket.io-client")
    port, db = free_port(), tmp_path / "chat.db"
    args = ("--port", str(port), "--db", str(db), "--client-js", str(CLIENT_JS))
    first = ChatProcess(*args)
    try:
        url = first.wait_ready()
        ann = await open_page(url)
        ann.expected_network_errors = True  # it reconnects through the restart
        await ann.page.get_by_role("button", name="New private room").click()
        link = await ann.page.get_by_label("Invite link").input_value()
        await ann.send("Ann", "kept, encrypted")
        await ann.message("kept, encrypted").wait_for()
    finally:
        assert first.stop()[0] == 0
    second = ChatProcess(*args)
    try:
        second.wait_ready()
        bob = await open_page(link, path="")
        await bob.message("kept, encrypted").wait_for()
        await bob.send("Bob", "plain after the restart?")
        await bob.message("plain after the restart?").wait_for()  # sealed too: the room is still private
    finally:
        assert second.stop()[0] == 0


async def test_under_load_frames_of_consecutive_iterations_share_one_write_and_a_quiet_server_never_waits() -> None:
    from types import SimpleNamespace

    class Recipient(SimpleNamespace):  # what the flusher uses of a LeanQueue
        __hash__ = object.__hash__

    def recipient() -> Any:
        writes: list[bytes] = []
        transport = SimpleNamespace(write=writes.append, get_write_buffer_size=lambda: 0)
        return Recipient(sid="s", buffered=0, unwritten_bytes=0, finished=False, ending=False, segment=None,
                         transport=transport, open_transport=lambda: transport, writes=writes)

    flusher = chat.FrameFlusher(max_bytes=1 << 20, overflow=lambda sid: None)
    few = [recipient() for _ in range(3)]
    for one in few:
        flusher.push(one, b"quiet")
    await asyncio.sleep(0)
    assert [q.writes for q in few] == [[b"quiet"]] * 3, "written at the next iteration"
    room = [recipient() for _ in range(chat.COALESCE_FANOUT)]
    for one in room:
        flusher.push(one, b"one")
    await asyncio.sleep(0)
    assert room[0].writes == [b"one"], "the first broadcast to many goes at once"
    for one in room:
        flusher.push(one, b"two")
    await asyncio.sleep(0)
    for one in room:
        flusher.push(one, b"three")  # a later iteration, within the wait
    assert room[0].writes == [b"one"], "under load the next flush waits"
    await asyncio.sleep(chat.COALESCE_DELAY * 2)
    assert room[0].writes == [b"one", b"twothree"], "two messages, one write"
