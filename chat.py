#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "python-socketio>=5.18,<5.19",
#     "python-engineio>=4.15,<4.16",
#     "aiohttp>=3.14,<3.15",
# ]
# ///
"""chat.py: a real-time chat server with a chat bot, in one file.

Run ``python chat.py`` and open http://127.0.0.1:3000. The page, its CSS and
its JavaScript are embedded below; python-socketio runs the chat hub on top of
aiohttp. ``python chat.py --help`` lists every option.

Sections, in order, each under a ``# ----`` banner:

1. errors and small helpers;
2. settings and command line -- ``Settings`` holds every default once;
3. message model and validation -- ``Message`` and the ``clean_*`` checks;
4. the chat hub: Socket.IO event handlers -- ``ChatHub.on_newmessage``,
   ``on_join`` and the rest are the protocol (see the README's table), with
   ``Refusals``, ``HistoryBrowser`` (history pages, search) and ``BotReplies``;
5. admission: rates, caps and passwords;
6. people: names held and private messages;
7. moderation: a host who can act -- ``Sanctions`` (bans, mutes, locks) and ``Moderation``;
8. rooms: presence, typing and private (end-to-end encrypted) rooms;
9. stores (history): memory, SQLite (``--db``) or Redis (``--redis``);
10. bots: keyword rules, Rasa, any OpenAI-compatible server;
11. first run: a private environment (stdlib only) -- on a machine that lacks
    the two packages, installs them and re-runs this file; everything above it
    only defines, with the standard library, so it runs before the first line
    that needs the packages;
12. web: aiohttp routes, headers and connection guards;
13. embedded assets: the page's HTML, CSS and JavaScript;
14. library internals -- every use of a library's private names, with why
    (the broadcast fast path and the lean WebSocket sessions live here);
15. main() -- start-up, shutdown and the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import contextvars
import dataclasses
import errno
import functools
import gc
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import string
import sys
import time
import unicodedata
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Protocol

MIN_PYTHON = (3, 10)
if sys.version_info < MIN_PYTHON:  # before the first line that needs 3.10
    _TOO_OLD = (f"chat.py: needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; {sys.executable} is "
                + ".".join(map(str, sys.version_info[:3])))
    if __name__ == "__main__":
        sys.exit(_TOO_OLD)
    raise ImportError(_TOO_OLD)

_IMPORT_ERROR: ImportError | None = None
try:  # the packages chat.py is built on; where they are missing, section 11 installs them and re-runs this file
    import aiohttp
    import engineio
    import socketio
    from aiohttp import web
    from engineio import exceptions as eio_exceptions
    from engineio import packet as eio_packet
    from engineio import payload as eio_payload
    from engineio.async_drivers import aiohttp as eio_aiohttp
    from socketio import packet as sio_packet
except ImportError as _exc:
    _IMPORT_ERROR = _exc

__version__ = "1.1.0"
log = logging.getLogger("chat")

# ---------------------------------------------------------------- errors and small helpers


class InvalidInput(Exception):
    """An inbound payload was refused; `message` is safe to show the sender."""

    def __init__(self, code: str, message: str, quiet: bool = False, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.quiet = quiet  # already logged (e.g. the rest of a flood)
        self.details = details  # extra fields for the refusal, e.g. retry_after_ms


class StoreError(Exception):
    """The history store failed (disk full, I/O error, a damaged file); the message was not stored."""


class StartupError(Exception):
    """A problem that stops start-up with one clear line and exit code 1."""


class ProblemLog:
    """Warnings about what clients sent, at most one line per address and kind a minute,
    so that junk cannot flood the log."""

    def __init__(self) -> None:
        self.last: dict[Any, float] = {}

    def due(self, key: Any) -> bool:
        """True at most once a minute for each key (the map is bounded: a flood of keys resets it)."""
        now = time.monotonic()
        if now - self.last.get(key, -60.0) < 60:
            return False
        if len(self.last) > 10_000:
            self.last.clear()
        self.last[key] = now
        return True

    def warn(self, template: str, address: str) -> None:
        if self.due((template, address)):
            log.warning(template + " (logged once a minute)", address)


class ClientWarnings:
    """Warnings about what one client sent: at most one line every 10 s for each of its keys (its
    connection and its address), the next one saying how many were held back in between, so that
    neither one connection nor many from one address can flood the log."""

    EVERY = 10.0

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.held: collections.Counter[str] = collections.Counter()

    def warn(self, keys: tuple[str, ...], template: str, *args: Any) -> None:
        now = time.monotonic()
        if any(now - self.last.get(key, -self.EVERY) < self.EVERY for key in keys):
            for key in keys:
                self.held[key] += 1
            return
        if len(self.last) > 20_000:  # bounded: a flood of keys starts the count over
            self.last.clear()
            self.held.clear()
        held = max((self.held.pop(key, 0) for key in keys), default=0)
        for key in keys:
            self.last[key] = now
        log.warning(template + (f" (and {held} more like it in the last 10 s)" if held else ""), *args)


class Tasks:
    """Background tasks, referenced until they finish (the event loop keeps only weak references to
    them), and cancelled together at shutdown."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    def cancel(self) -> None:
        for task in list(self._running):
            task.cancel()


class TokenBucket:
    """Allows `rate` events per second with bursts of up to `burst`; rate 0 allows everything."""

    __slots__ = ("burst", "rate", "stamp", "tokens")  # three per connection

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def ready(self) -> bool:
        """Whether take() would succeed now (without taking)."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= 1

    def take(self) -> bool:
        if not self.ready():
            return False
        if self.rate > 0:
            self.tokens -= 1
        return True

    def wait_ms(self) -> int:
        """Milliseconds until the next event will be allowed."""
        return 0 if self.rate <= 0 else int((1 - self.tokens) / self.rate * 1000) + 1


def text_of(value: bytes | str) -> str:
    """A Redis reply as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def describe_error(exc: BaseException) -> str:
    """A short human reason for a failed HTTP call."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return str(exc) or type(exc).__name__


def now_ms() -> int:
    """Server time as integer milliseconds since the Unix epoch (the wire `ts`)."""
    return time.time_ns() // 1_000_000


def new_epoch() -> str:
    """A fresh name for an id sequence (see Store.epoch)."""
    return os.urandom(6).hex()


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- settings and command line

DEFAULT_ROOM = "lobby"
CLIENT_JS_VERSION = "4.8.3"
CLIENT_JS_ORIGIN = "https://cdn.socket.io"
CLIENT_JS_CDN = f"{CLIENT_JS_ORIGIN}/{CLIENT_JS_VERSION}/socket.io.min.js"
DEFAULT_NPM_REGISTRY = "https://registry.npmjs.org/"  # where the client's package is fetched from, once

# sha384 of dist/socket.io.min.js in the socket.io-client 4.8.3 package.
CLIENT_JS_SRI = "sha384-kzavj5fiMwLKzzD1f8S7TeoVIEi7uKHvbTA3ueZkrzYq75pNQUiUi6Dy98Q3fxb0"
BOT_MODES = ("keyword", "rasa", "openai", "off")
FRAME_LIMIT_FLOOR = 64 * 1024  # bytes per frame or POST, at least (see Settings.frame_limit)
DEFAULT_BOT_URLS = {"rasa": "http://localhost:5005", "openai": "http://localhost:11434/v1"}  # without --bot-url


@dataclass(frozen=True)
class Settings:
    """Everything chat.py can be told, built once from the command line."""

    host: str = "127.0.0.1"
    port: int = 3000
    bot: str = "keyword"
    bot_name: str = "ChatFriend"
    bot_rules: Path | None = None
    bot_url: str | None = None
    bot_model: str = "llama3.2"
    bot_prompt: str | None = None
    bot_context: int = 10
    bot_timeout: float = 20.0
    log_level: str = "info"
    client_js: Path | None = None
    static: Path | None = None
    history: int = 100
    db: Path | None = None
    max_length: int = 2000
    rate: float = 5.0
    burst: int = 10
    flood_timeout: float = 10.0
    max_per_ip: int = 100
    max_queue: int = 1000
    allow_origins: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    password: str | None = field(default=None, repr=False)
    admin_password: str | None = field(default=None, repr=False)  # CHAT_ADMIN_PASSWORD: moderators
    trust_proxy: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    transports: tuple[str, ...] = ("polling", "websocket")
    presence_grace: float = 3.0
    typing_timeout: float = 5.0
    name_grace: float = 60.0
    bot_replies: str = "all"
    redis: str | None = None
    presence_ttl: float = 15.0
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    compress: bool = False
    loop: str = "auto"
    gc: str = "tuned"

    @property
    def frame_limit(self) -> int:
        """Bytes a WebSocket frame or long-polling POST may have: a message of --max-length characters
        always fits (a Python client escapes a character outside the BMP as 12 bytes of JSON)."""
        return max(FRAME_LIMIT_FLOOR, 12 * self.max_length + 4096)


def _number(kind: type, what: str, bound: str, lowest: float, highest: float = math.inf,
            above: bool = False) -> Callable[[str], Any]:
    """An argparse converter to `kind`, from `lowest` (excluded when `above`) to `highest`, finite;
    it refuses with "not WHAT: TEXT" or "BOUND, got TEXT"."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        low_ok = value > lowest if above else value >= lowest
        if not (low_ok and value <= highest and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{bound}, got {text}")
        return value

    return convert


_positive_int = _number(int, "a whole number", "must be at least 1", 1)
_port = _number(int, "a port number", "port must be 0-65535", 0, 65535)
_positive_float = _number(float, "a number", "must be a number above 0", 0, above=True)
_non_negative_float = _number(float, "a number", "must be 0 or more", 0)


def _whole_seconds(text: str) -> float:
    value = _positive_float(text)
    if value != int(value):  # python-engineio advertises the interval in whole seconds
        raise argparse.ArgumentTypeError(f"must be whole seconds (clients are told whole seconds), got {text}")
    return value


def _origin(text: str) -> str:
    if text == "*" or re.fullmatch(r"https?://[^/\s?#]+", text):
        return text
    hint = f"; without the trailing slash: {text.rstrip('/')}" if re.fullmatch(r"https?://[^/\s?#]+/+", text) else \
        " (an origin is scheme://host[:port], e.g. https://chat.example.org)"
    raise argparse.ArgumentTypeError(f"not an origin: {text!r}{hint}")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag sets the Settings field of the same name, whose default it shows."""
    d = Settings()
    p = OneLineParser(
        prog="chat.py",
        description="A real-time chat server with a chat bot, in one file.",
        epilog="Open the printed URL in a browser. Room: /?room=NAME.",
    )
    p.add_argument("--version", action="version", version=f"chat.py {__version__}")
    p.add_argument("--host", default=d.host,
                   help="address to listen on (default %(default)s; use 0.0.0.0 to share on a LAN or server)")
    p.add_argument("--port", type=_port, default=None,
                   help=f"port to listen on (default {d.port}, or the PORT environment variable)")
    p.add_argument("--bot", choices=BOT_MODES, default=d.bot,
                   help="bot backend: keyword rules (default), rasa, openai (any OpenAI-compatible server) or off")
    p.add_argument("--bot-name", default=d.bot_name, metavar="NAME",
                   help="the bot's display name, reserved for the bot (default %(default)s)")
    p.add_argument("--bot-rules", type=Path, metavar="FILE",
                   help="keyword mode: load the rules from this JSON file (format in the README)")
    p.add_argument("--bot-url", metavar="URL",
                   help=f"rasa: the Rasa server (default {DEFAULT_BOT_URLS['rasa']}); openai: the API base "
                        f"(default {DEFAULT_BOT_URLS['openai']}, Ollama). The key comes from OPENAI_API_KEY")
    p.add_argument("--bot-model", default=d.bot_model, metavar="NAME", help="openai: the model name (default %(default)s)")
    p.add_argument("--bot-prompt", metavar="TEXT", help="openai: the system prompt (default: a friendly assistant)")
    p.add_argument("--bot-context", type=_positive_int, default=d.bot_context, metavar="K",
                   help="openai: how many recent messages of the room to send as context (default %(default)s)")
    p.add_argument("--bot-replies", choices=("auto", "all", "mentions"), default=d.bot_replies,
                   help="which messages the bot answers: all (the tutorial's, the default), mentions (those "
                        "that address it, and private messages), or auto (all while one person is in the room, "
                        "mentions when more are)")
    p.add_argument("--name-grace", type=_non_negative_float, default=d.name_grace, metavar="SECONDS",
                   help="a name stays held for its browser this long after its last connection leaves "
                        "(default %(default)s)")
    p.add_argument("--bot-timeout", type=_positive_float, default=d.bot_timeout, metavar="SECONDS",
                   help="give up on a bot answer after this long (default %(default)s)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=d.log_level,
                   help="server log verbosity (default %(default)s)")
    p.add_argument("--client-js", type=Path, metavar="PATH",
                   help="serve this socket.io.min.js to the page (by default chat.py fetches the pinned client "
                        "once into its cache and serves that)")
    p.add_argument("--static", type=Path, metavar="DIR",
                   help="serve the files of DIR at / instead of the built-in page, like the tutorial's "
                        "express.static('public')")
    p.add_argument("--history", type=_positive_int, default=d.history, metavar="N",
                   help="messages kept per room and sent to people who join (default %(default)s)")
    p.add_argument("--db", type=Path, metavar="PATH",
                   help="store messages in this SQLite file so history survives restarts (default: memory)")
    p.add_argument("--max-length", type=_positive_int, default=d.max_length, metavar="N",
                   help="longest message body in characters (default %(default)s)")
    p.add_argument("--rate", type=_non_negative_float, default=d.rate, metavar="N",
                   help="messages per second each connection may send (default %(default)s; 0 turns limiting off)")
    p.add_argument("--burst", type=_positive_int, default=d.burst, metavar="N",
                   help="messages a connection may send at once before --rate applies (default %(default)s)")
    p.add_argument("--flood-timeout", type=_non_negative_float, default=d.flood_timeout, metavar="SECONDS",
                   help="disconnect a connection that keeps hitting the rate limit this long (default %(default)s)")
    p.add_argument("--max-per-ip", type=_positive_int, default=d.max_per_ip, metavar="N",
                   help="concurrent connections allowed per address; loopback is exempt unless --trust-proxy "
                        "(default %(default)s)")
    p.add_argument("--max-queue", type=_positive_int, default=d.max_queue, metavar="N",
                   help="a client with more than N KB waiting to be sent to it is disconnected (default %(default)s)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN", type=_origin,
                   dest="allow_origins",
                   help="also accept Socket.IO connections from pages on ORIGIN (repeatable; * for any)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", dest="allow_hosts",
                   help="when listening on loopback, also answer requests for this host name, e.g. the domain "
                        "a reverse proxy on this machine forwards (repeatable; guards against DNS rebinding)")
    p.add_argument("--password", metavar="PW",
                   help="shared password people must enter (prefer the CHAT_PASSWORD environment variable)")
    p.add_argument("--trust-proxy", action="store_true",
                   help="take the client address from X-Forwarded-For, and the page's scheme and host from "
                        "X-Forwarded-Proto/-Host (only behind your own reverse proxy)")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="TLS certificate chain (PEM) to serve https/wss")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="TLS private key (PEM) for --tls-cert")
    p.add_argument("--transports", choices=("polling,websocket", "websocket", "polling"),
                   default=",".join(d.transports), metavar="LIST",
                   help="Socket.IO transports to accept: polling,websocket (the default), websocket or polling; "
                        "websocket alone needs no sticky sessions behind a load balancer")
    p.add_argument("--redis", metavar="URL",
                   help="run as one node of several sharing this Redis (redis://HOST:6379/0): messages, "
                        "history, ids, presence and typing are shared (prefer CHAT_REDIS_URL when the URL has a "
                        "password)")
    p.add_argument("--compress", action="store_true",
                   help="compress WebSocket frames (permessage-deflate) when browsers offer it; costs CPU and "
                        "memory per connection (default off)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default=d.loop,
                   help="event loop: uvloop when installed (auto, the default), or force one")
    p.add_argument("--gc", choices=("tuned", "default"), default=d.gc,
                   help="garbage collector: tuned for many connections (the default), or Python's defaults")
    p.add_argument("--presence-ttl", type=_positive_float, default=d.presence_ttl, metavar="SECONDS",
                   help="with --redis: a node that stops heartbeating loses its users after this long "
                        "(default %(default)s)")
    p.add_argument("--ping-interval", type=_whole_seconds, default=d.ping_interval, metavar="SECONDS",
                   help="ping each client this often; keep it below your proxy's idle timeout (default %(default)s)")
    p.add_argument("--ping-timeout", type=_positive_float, default=d.ping_timeout, metavar="SECONDS",
                   help="a client that does not answer a ping within this long is gone (default %(default)s)")
    return p


class OneLineParser(argparse.ArgumentParser):
    """argparse, saying what is wrong in one line and where to look, without the usage text."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message} (chat.py --help lists the options)\n")


MAX_LENGTH_LIMIT = 100_000  # characters: a message of them still fits one frame (see Settings.frame_limit)


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse the command line (and CHAT_* environment variables) into Settings; exits 2 on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port is None:
        env_port = os.environ.get("PORT")
        try:
            args.port = _port(env_port) if env_port else Settings.port
        except argparse.ArgumentTypeError as exc:
            parser.error(f"the PORT environment variable: {exc}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key must be given together")
    for flag, variable in (("--password", "CHAT_PASSWORD"), ("--redis", "CHAT_REDIS_URL")):
        dest = flag[2:]
        if getattr(args, dest) is None and variable in os.environ:
            setattr(args, dest, os.environ[variable])
            flag = f"the {variable} environment variable"
        if getattr(args, dest) is not None and not getattr(args, dest).strip():
            parser.error(f"{flag} is empty; leave it unset for {'no password' if dest == 'password' else 'no Redis'}")
    if args.max_length > MAX_LENGTH_LIMIT:
        parser.error(f"argument --max-length: at most {MAX_LENGTH_LIMIT} characters, got {args.max_length}")
    if args.static and not args.static.is_dir():
        parser.error(f"--static {args.static}: {'no such directory' if not args.static.exists() else 'not a directory'}")
    if args.redis and args.db:
        parser.error("--db and --redis cannot be combined: with --redis, history lives in Redis")
    if args.redis and not re.match(r"(rediss?|unix)://", args.redis):
        parser.error(f"--redis must be a redis://, rediss:// or unix:// URL, got {args.redis!r}")
    if args.bot_rules and args.bot != "keyword":
        parser.error("--bot-rules applies to --bot keyword only")
    if args.bot_url and not re.match(r"https?://[^/\s]+", args.bot_url):
        parser.error(f"--bot-url must be an http:// or https:// URL, got {args.bot_url!r}")
    try:
        args.bot_name = clean_user(args.bot_name, bot_name="", who="the bot's name")
    except InvalidInput as exc:
        parser.error(f"--bot-name: {'must not be empty' if not args.bot_name.strip() else exc.message}")
    args.allow_origins = tuple(args.allow_origins)
    args.allow_hosts = tuple(h.lower().strip("[]") for h in args.allow_hosts)
    args.transports = tuple(args.transports.split(","))
    admin_password = os.environ.get("CHAT_ADMIN_PASSWORD")  # never on the command line, where ps shows it
    if admin_password is not None and not admin_password.strip():
        parser.error("the CHAT_ADMIN_PASSWORD environment variable is empty; leave it unset for no moderators")
    given = {**vars(args), "admin_password": admin_password}
    return Settings(**{f.name: given[f.name] for f in dataclasses.fields(Settings) if f.name in given})


# ---------------------------------------------------------------- message model and validation

MAX_NAME = 32
ROOM_RE = re.compile(r"[a-z0-9_-]{1,32}")
CID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True, slots=True)
class Message:
    """One stored chat line: a person's message or a bot reply."""

    id: int
    room: str
    user: str
    body: str
    ts: int
    kind: str = "user"  # "user" or "bot"
    cid: str | None = None

    @property
    def event(self) -> str:
        return "botmessage" if self.kind == "bot" else "newmessage"

    def wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "room": self.room, "user": self.user,
                                "body": self.body, "ts": self.ts, "kind": self.kind}
        if self.cid:
            data["cid"] = self.cid
        return data


MAX_ID = 2**53 - 1  # the largest integer a browser's JSON keeps exactly

# Latin look-alikes in other scripts (after casefold), so that "СhatFriend" with a Cyrillic С
# is the bot's name too: a small skeleton map in the spirit of Unicode's confusables.txt.
CONFUSABLES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "һ": "h", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "ӏ": "i", "ɑ": "a", "α": "a", "β": "b", "ε": "e", "ζ": "z", "η": "n", "ι": "i",
    "κ": "k", "μ": "m", "ν": "n", "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j",
    "0": "o", "1": "i", "l": "i", "|": "i", "ı": "i",  # i, l, 1 and | look alike in many fonts
    # small capitals and IPA letters
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j",
    "ᴋ": "k", "ʟ": "i", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u",
    "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ɦ": "h", "ɧ": "h", "ɡ": "g", "ɩ": "i", "ɛ": "e", "ɵ": "o",
    "ɾ": "r", "ʋ": "u", "ʂ": "s",
    # Armenian (case-folded to these lowercase letters)
    "հ": "h", "ո": "n", "ռ": "n", "ս": "u", "օ": "o", "ց": "g", "զ": "q", "ա": "w", "ք": "p", "լ": "i",
    "ծ": "d",
    # Cherokee (case-folded to these capitals)
    "Ꭺ": "a", "Ᏼ": "b", "Ꮯ": "c", "Ꭰ": "d", "Ꭼ": "e", "Ꮐ": "g", "Ꮋ": "h", "Ꭵ": "i", "Ꭻ": "j", "Ꮶ": "k",
    "Ꮮ": "i", "Ꮇ": "m", "Ꮑ": "n", "Ꮎ": "o", "Ꮲ": "p", "Ꭱ": "r", "Ꮪ": "s", "Ꭲ": "t", "Ꮩ": "v", "Ꮃ": "w",
    "Ꮓ": "z",
})
# Characters that show nothing: Unicode's Default_Ignorable_Code_Point ranges (which Python's
# unicodedata does not name) and the blanks that are letters or symbols (Hangul fillers, braille blank).
INVISIBLE_RANGES = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
                    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800),
                    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
                    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
INVISIBLE_RE = re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in INVISIBLE_RANGES) + "]")


def _check_encodable(value: str, code: str, what: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate), before it reaches JSON or SQLite."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(code, f"{what} contains characters that are not valid text.") from None


def _strip_invisible(text: str) -> str:
    """`text` without format characters and characters that show nothing (INVISIBLE_RANGES)."""
    if text.isascii():  # neither kind is ASCII: the common case costs one scan in C
        return text
    return INVISIBLE_RE.sub("", "".join(ch for ch in text if unicodedata.category(ch) != "Cf"))


ASCII_CONTROLS = dict.fromkeys([*range(0x0A), *range(0x0B, 0x20), 0x7F])  # str.translate: removed


@functools.lru_cache(maxsize=4096)  # names and the words that may be names repeat, message after message
def name_key(name: str) -> str:
    """A comparison key under which look-alike spellings of a name collide."""
    folded = _strip_invisible(unicodedata.normalize("NFKC", name)).casefold().translate(CONFUSABLES)
    return "".join(ch for ch in folded if not ch.isspace())


def display_name(value: str) -> str:
    """A name as it is shown and compared: NFKC, invisible characters removed, runs of spaces one."""
    return " ".join(_strip_invisible(unicodedata.normalize("NFKC", value)).split())


def clean_user(value: Any, bot_name: str, who: str = "Your name") -> str:
    """Validate a display name: string, 1-32 characters after NFKC, no control characters.

    `who` starts the refusal's text (the command line checks the bot's name with it).
    """
    if not isinstance(value, str):
        raise InvalidInput("bad_user", f"{who} must be text.")
    if len(value) > MAX_NAME * 4:  # before NFKC, which can cost milliseconds on a long hostile string
        raise InvalidInput("bad_user", f"{who} is too long (at most {MAX_NAME} characters).")
    _check_encodable(value, "bad_user", who)
    name = display_name(value)
    if not name:
        raise InvalidInput("bad_user", "Please enter your name.")
    if all(unicodedata.category(ch)[0] in "MZC" for ch in name):  # marks alone show nothing either
        raise InvalidInput("bad_user", f"{who} must have a letter, digit or symbol in it.")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidInput("bad_user", f"{who} contains control characters.")
    if len(name) > MAX_NAME:
        raise InvalidInput("bad_user", f"{who} is too long (at most {MAX_NAME} characters).")
    if bot_name and name_key(name) == name_key(bot_name):
        raise InvalidInput("reserved_name", f"The name {bot_name} is reserved for the bot.")
    return name


MENTION_START_RE = re.compile(r"\s*([^\s,.:;!?]+(?:\s[^\s,.:;!?]+)?)")
MENTION_TAG_RE = re.compile(r"(?:^|(?<=\s))@([^\s@,.:;!?]+(?:\s[^\s@,.:;!?]+)?)")  # not in an address


def mentions(body: str, name: str) -> bool:
    """Whether `body` addresses `name`: an @name in it, or the name at its start ("ChatFriend, …").

    A candidate is one or two words (names may have a space); either the two or the first one may
    be the name."""
    key = name_key(name)
    start = MENTION_START_RE.match(body)
    tagged = MENTION_TAG_RE.findall(body) if "@" in body else []
    candidates = [*tagged, *([start.group(1)] if start else [])]
    return any(key in (name_key(words), name_key(words.split()[0])) for words in candidates)


def clean_body(value: Any, max_length: int) -> str:
    """Validate a message body: string, 1..max_length characters, newlines kept, other controls removed;
    or an end-to-end encrypted envelope (clean_envelope)."""
    if not isinstance(value, str):
        raise InvalidInput("bad_body", "Your message must be text.")
    if is_envelope(value):
        return clean_envelope(value, max_length)
    if len(value) > max_length * 4:
        raise InvalidInput("too_long", f"Your message is too long (at most {max_length} characters).")
    _check_encodable(value, "bad_body", "Your message")
    text = value.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():  # the same, in C: ASCII's controls (Cc) are 0-31 and 127
        text = text.translate(ASCII_CONTROLS).strip()
    else:
        text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) != "Cc").strip()
    if not text:
        raise InvalidInput("bad_body", "Please type a message.")
    if len(text) > max_length:
        raise InvalidInput("too_long", f"Your message is too long (at most {max_length} characters).")
    return text


ENVELOPE_PREFIX = "e2e:v1:"  # an end-to-end encrypted body: this, then base64 of IV (12 bytes) + AES-GCM output
ENVELOPE_RE = re.compile(r"e2e:v1:[A-Za-z0-9+/]+={0,2}")


def envelope_limit(max_length: int) -> int:
    """The longest envelope: a message of max_length characters (4 bytes each in UTF-8 at most), its
    IV and tag, in base64, after the prefix."""
    return len(ENVELOPE_PREFIX) + 4 * math.ceil((4 * max_length + 12 + 16) / 3)


def is_envelope(body: str) -> bool:
    return body.startswith("e2e:")


def clean_envelope(value: str, max_length: int) -> str:
    """Validate an encrypted body's form and size; its words are not the server's to read."""
    limit = envelope_limit(max_length)
    if len(value) > limit:
        raise InvalidInput("too_long", f"That encrypted message is too long (at most {limit} characters).")
    if not ENVELOPE_RE.fullmatch(value) or (len(value) - len(ENVELOPE_PREFIX)) % 4:
        raise InvalidInput("bad_envelope", "That encrypted message is not in the e2e:v1 form this server knows.")
    return value


def clean_room(value: Any) -> str:
    """Validate a room name: 1-32 of lowercase letters, digits, '-' and '_'."""
    if value is None:
        return DEFAULT_ROOM
    if not isinstance(value, str) or not ROOM_RE.fullmatch(value):
        raise InvalidInput("bad_room", "Room names are 1-32 lowercase letters, digits, '-' or '_'.")
    return value


def clean_cid(value: Any) -> str | None:
    """Validate an optional client message id used for de-duplication."""
    if value is None:
        return None
    if not isinstance(value, str) or not CID_RE.fullmatch(value):
        raise InvalidInput("bad_cid", "The message id (cid) must be 1-64 letters, digits or -_.:")
    return value


def clean_since(value: Any) -> int | None:
    """Validate an optional last-seen message id."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise InvalidInput("bad_since", f"'since' must be a message id (a whole number from 0 to {MAX_ID}).")
    return value


def expect_object(args: tuple[Any, ...], what: str) -> dict[str, Any]:
    """The single object argument of an event, or a clear refusal."""
    if len(args) != 1 or not isinstance(args[0], dict):
        raise InvalidInput("bad_payload", f"'{what}' expects one object, like {{\"user\": ..., \"body\": ...}}."
                           if what == "newmessage" else f"'{what}' expects one object.")
    return args[0]


# ---------------------------------------------------------------- the chat hub: Socket.IO event handlers

RECENT_PAGE = 50  # messages a join without `since` starts with (a replay after `since` sends up to --history)
HISTORY_PAGE = 50  # messages per `history` page, at most
SEARCH_RESULTS = 50  # messages a `search` returns, at most
MAX_QUERY, MAX_QUERY_WORDS = 100, 8

_ack_wanted: contextvars.ContextVar[bool] = contextvars.ContextVar("ack_wanted", default=False)

# Names python-socketio treats specially: its lifecycle events, and "*", which it would hand to
# the catch-all handler without the event name (so the sender's sid would be lost).
RESERVED_EVENTS = frozenset({"connect", "disconnect", "connect_error", "message", "*"})


@dataclass(slots=True)
class Session:
    """What the hub knows about one connected socket."""

    sid: str
    ip: str
    exempt: bool
    room: str = DEFAULT_ROOM
    user: str | None = None
    browser: str = ""  # see clean_browser
    held: str | None = None  # the name key this connection holds
    bucket: TokenBucket | None = None
    joins: TokenBucket = field(default_factory=lambda: TokenBucket(JOIN_RATE, JOIN_BURST))
    typings: TokenBucket = field(default_factory=lambda: TokenBucket(TYPING_RATE, TYPING_BURST))
    flood_started: float | None = None
    last_refusal: float = 0.0
    kicked: bool = False
    typing_timer: asyncio.TimerHandle | None = None
    moderator: bool = False
    connected_at: float = field(default_factory=time.time)
    commands: TokenBucket = field(default_factory=lambda: TokenBucket(COMMAND_RATE, COMMAND_BURST))


class ChatHub:
    """The chat's Socket.IO events: the protocol, one handler per event (the README's table).

    It owns the sessions. Admission decides who may connect and how fast each may talk, Presence
    tells rooms who is there and who is typing, the Store keeps history, PrivateMessages,
    Moderation and HistoryBrowser do what their events ask, BotReplies gives the bot its turn, and
    Refusals turns bad input into a reply to its sender.
    """

    def __init__(self, settings: Settings, store: Store, bot: Bot, board: Board | None = None,
                 manager: socketio.AsyncManager | None = None, holds: NameHolds | None = None,
                 sanctions: Sanctions | None = None, problems: ProblemLog | None = None,
                 tasks: Tasks | None = None) -> None:
        self.settings = settings
        self.store = store
        self.problems = problems or ProblemLog()
        self.tasks = tasks or Tasks()
        self.warnings = ClientWarnings()
        self.admission = Admission(settings, self.warnings)
        self.sio = ChatServer.for_settings(settings, self.admission, self.warnings, self.problems,
                                           manager or FanoutManager())
        self.sessions: dict[str, Session] = {}
        self.presence = Presence(self.sio, board or Board(), settings, self.tasks)
        self.holds = holds or NameHolds(settings.name_grace)
        self.private = PrivateMessages(self.sio, self.holds, settings)
        self.sanctions = sanctions or Sanctions()
        self.moderation = Moderation(settings, self.sanctions, self.sio, store, self.presence, self.sessions,
                                     self.tasks)
        self.reading = HistoryBrowser(store)
        self.private_rooms = PrivateRooms(self.sanctions, store)
        self.bot = BotReplies(BotRunner(bot, settings), settings, store, self.presence, self.private,
                              self.sio, self.problems, self.tasks)
        self.refusals = Refusals(self.sio, self.sessions, self.warnings, self.problems)
        self.started = time.monotonic()
        self.messages_sent = 0
        self.sio.on("connect", self.on_connect)
        self.sio.on("disconnect", self.on_disconnect)
        for event, handler in (("newmessage", self.on_newmessage), ("join", self.on_join),
                               ("typing", self.on_typing), ("private", self.on_private),
                               ("history", self.on_history), ("search", self.on_search),
                               ("login", self.on_login), ("moderate", self.on_moderate)):
            self.sio.on(event, self.refusals.guard(event, handler))
        self.sio.on("*", self.on_unknown)

    # -- the protocol (the README's event table)

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        """A new connection: admitted (password, address cap, bans), then in the lobby until it joins a room."""
        session = self.admission.admit(sid, environ, auth)
        try:
            self.moderation.check_ban(session)
        except socketio.exceptions.ConnectionRefusedError:
            self.admission.release(session)
            raise
        self.sessions[sid] = session
        await self.sio.enter_room(sid, DEFAULT_ROOM)
        self.presence.count(session, True)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        self.sio.release_long_poll(sid)
        self.admission.release(session)
        if session.held is not None:
            await self.holds.release(session.held, sid)
        await self.presence.set_typing(session, False)
        self.presence.count(session, False)
        await self.presence.leave(session.room, session.user)

    async def on_join(self, sid: str, *args: Any) -> dict[str, Any]:
        """`join` {room, user?, since?, epoch?}: move to a room; the ack carries history and members."""
        session = self.sessions[sid]
        self.admission.check_join_rate(session)
        data = expect_object(args, "join")
        room = clean_room(data.get("room"))
        user = data.get("user")
        user = clean_user(user, self.settings.bot_name) if user not in (None, "") else None
        since = clean_since(data.get("since"))
        if room != session.room:
            await self.presence.move(session, room)
        await self.speak_as(session, user)
        history, complete = await self.reading.on_joining(room, since, data.get("epoch"), self.settings.history)
        return {"ok": True, "room": room, "user": user, "history": [m.wire() for m in history],
                "complete": complete, "epoch": self.store.epoch, **(await self.presence.board.roster(room)).wire(),
                "typing": await self.presence.board.typing_users(room), **await self.reading.removed(room),
                **self.moderation.room_state(session), "private": self.private_rooms.private(room)}

    async def on_newmessage(self, sid: str, *args: Any) -> dict[str, Any] | None:
        """`newmessage` {user, body, cid?, room?}: store, broadcast to the room, ack, then ask the bot;
        `room`, if given, must be this connection's (a message never lands in another room)."""
        session = self.sessions[sid]
        data = expect_object(args, "newmessage")
        user = clean_user(data.get("user"), self.settings.bot_name)
        body = clean_body(data.get("body"), self.settings.max_length)
        cid = clean_cid(data.get("cid"))
        if "room" in data and clean_room(data.get("room")) != session.room:
            raise InvalidInput("not_in_room", "That message was written in another room; join it to send it.")
        self.admission.check_message_rate(session, self.disconnect)
        await self.speak_as(session, user)
        self.moderation.check_post(session)
        await self.private_rooms.check(session.room, body)
        msg, created = await self.store.append(session.room, user, body, "user", cid)
        if not created:  # a resend of a message already delivered: ack it again, show it once
            return {"ok": True, "id": msg.id, "ts": msg.ts, "duplicate": True}
        if not self.store.delivered(msg):
            await self.sio.emit("newmessage", msg.wire(), room=session.room)
        self.messages_sent += 1
        await self.presence.set_typing(session, False)
        await self.bot.consider(msg)
        return {"ok": True, "id": msg.id, "ts": msg.ts}

    async def on_private(self, sid: str, *args: Any) -> dict[str, Any]:
        """`private` {to, body}: to one person's connections and the sender's own, nowhere else;
        to the bot, its answer comes back the same way."""
        session = self.sessions[sid]
        if not session.user:
            raise InvalidInput("bad_user", "Join with a name before sending a private message.")
        data = expect_object(args, "private")
        self.admission.check_message_rate(session, self.disconnect)
        self.moderation.check_muted(session)
        to, body, ts = await self.private.send(session.user, data)
        self.bot.consider_private(session.user, to, body, session.room)
        return {"ok": True, "ts": ts}

    async def on_history(self, sid: str, *args: Any) -> dict[str, Any]:
        """`history` {before, limit?}: a page of older messages in this room, for scrolling back."""
        self.admission.check_command_rate(self.sessions[sid])
        return await self.reading.page(self.sessions[sid].room, expect_object(args, "history"))

    async def on_search(self, sid: str, *args: Any) -> dict[str, Any]:
        """`search` {q}: the newest messages in this room with every word of `q` in them."""
        self.admission.check_command_rate(self.sessions[sid])
        return await self.reading.search(self.sessions[sid].room, expect_object(args, "search"))

    async def on_login(self, sid: str, *args: Any) -> dict[str, Any]:
        """`login` {password}: this connection becomes a moderator (CHAT_ADMIN_PASSWORD)."""
        self.admission.check_command_rate(self.sessions[sid])
        return await self.moderation.login(self.sessions[sid], expect_object(args, "login").get("password"))

    async def on_moderate(self, sid: str, *args: Any) -> dict[str, Any]:
        """`moderate` {action, name?, minutes?, reason?, seconds?, id?}: see Moderation."""
        self.admission.check_command_rate(self.sessions[sid])
        return await self.moderation.run(self.sessions[sid], expect_object(args, "moderate"))

    async def on_typing(self, sid: str, *args: Any) -> None:
        """`typing` {typing: bool}: show or clear this person's typing indicator."""
        session = self.sessions[sid]
        typing = expect_object(args, "typing").get("typing")
        if not isinstance(typing, bool):
            raise InvalidInput("bad_typing", "'typing' must be true or false.")
        if session.typings.take():  # else more changes than anyone can read: dropped (it expires by itself)
            await self.presence.set_typing(session, typing)

    async def on_unknown(self, event: str, sid: str, *args: Any) -> Any:
        """Any other event name: refused with a reason, never an exception."""
        if event == "*invalid*":
            return await self.refusals.refuse(sid, event, "bad_event", "That is not a valid event.")
        return await self.refusals.refuse(sid, event[:40], "unknown_event", f"Unknown event '{event[:40]}'.")

    # -- names

    async def speak_as(self, session: Session, user: str | None) -> None:
        """The connection now uses `user` (or no name): it must hold the name (see NameHolds)."""
        key = name_key(user) if user else None
        if key != session.held:
            if key is not None:
                self.moderation.check_name(user or "", key)
                refused = await self.holds.claim(key, session.browser, session.sid,
                                                 None if session.exempt else session.ip)
                if refused == "name_taken":
                    raise InvalidInput("name_taken", f"The name {user} is in use by someone else; please pick "
                                                     "another.")
                if refused:
                    raise InvalidInput("too_many_names", "Too many names in use from your address.")
                await self.sio.enter_room(session.sid, PrivateMessages.room_of(key))
            if session.held is not None:
                await self.holds.release(session.held, session.sid)
                await self.sio.leave_room(session.sid, PrivateMessages.room_of(session.held))
            session.held = key
        await self.presence.rename(session, user)

    # -- background work and shutdown

    def disconnect(self, session: Session) -> None:
        """Close a connection from the server's side (the client does not reconnect by itself)."""
        self.tasks.spawn(self.sio.disconnect(session.sid))

    def rooms_in_use(self) -> set[str]:
        return {s.room for s in self.sessions.values()}

    async def close(self) -> None:
        """Close every connection, as a lost one, so that browsers reconnect by themselves when the
        server comes back (no Socket.IO disconnect), and stop background work."""
        self.presence.close()
        self.tasks.cancel()
        await self.sio.close_for_restart()
        await self.sio.shutdown()


class Refusals:
    """Bad input and failures in an event handler become a reply to the sender: never a crash, never
    a broadcast, and a log line limited per connection and per address (ClientWarnings)."""

    def __init__(self, sio: socketio.AsyncServer, sessions: dict[str, Session], warnings: ClientWarnings,
                 problems: ProblemLog) -> None:
        self.sio = sio
        self.sessions = sessions
        self.warnings = warnings
        self.problems = problems

    def guard(self, event: str, handler: Any) -> Any:
        """Wrap an event handler so bad input and bugs become a reply, never a crash."""

        async def guarded(sid: str, *args: Any) -> Any:
            try:
                return await handler(sid, *args)
            except InvalidInput as exc:
                return await self.refuse(sid, event, exc.code, exc.message, quiet=exc.quiet, **exc.details)
            except StoreError as exc:  # disk full, I/O error: nothing was stored, nothing acked
                self.problems.warn(f"history store failed: {exc}; refusing %s", event)
                text = ("The server could not store your message; please retry." if event == "newmessage"
                        else "The server could not read the room's history; please retry.")
                return await self.refuse(sid, event, "store_failed", text, quiet=True)
            except Exception:
                log.exception("error while handling %r from %s", event, sid)
                return await self.refuse(sid, event, "internal", "Something went wrong on the server; please retry.")

        return guarded

    async def refuse(self, sid: str, event: str, code: str, message: str, quiet: bool = False,
                     **details: Any) -> Any:
        """The refusal, as the ack when the client asked for one, else as a `chat_error` to it alone."""
        session = self.sessions.get(sid)
        if not quiet:
            where = session.ip if session else sid
            self.warnings.warn((sid, where), "refused %s from %s (%s): %s", event[:40], where, code, message)
        reply = {"ok": False, "error": message, "code": code, **details}
        if _ack_wanted.get():
            return reply
        if session is None:  # never a broadcast: emit(to=None) would reach everyone
            return None
        await self.sio.emit("chat_error", {"error": message, "code": code, "event": event, **details}, to=sid)
        return None


class HistoryBrowser:
    """Reading back through a room: the history a join starts with, `history` pages, `search`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def on_joining(self, room: str, since: int | None, epoch: Any, replay: int) -> tuple[list[Message], bool]:
        """The messages a join's ack carries, and whether they are all that was missed: the newest
        RECENT_PAGE for a new page, everything after `since` (up to `replay`) for a page coming back."""
        page = min(replay, RECENT_PAGE)
        if since is None:
            return await self.store.recent(room, page), True
        if epoch is not None and epoch != self.store.epoch:
            # `since` counts in another id sequence (the server restarted without --db): start afresh
            return await self.store.recent(room, page), False
        return await self.store.since(room, since, replay)

    async def removed(self, room: str) -> dict[str, Any]:
        """What a page coming back takes away: ids deleted lately, and where the room was cleared."""
        deleted, cleared = await self.store.removed(room)
        return {"deleted": deleted, "cleared": cleared}

    async def page(self, room: str, data: dict[str, Any]) -> dict[str, Any]:
        before = clean_since(data.get("before"))
        if before is None:
            raise InvalidInput("bad_before", "'before' must be a message id.")
        limit = data.get("limit", HISTORY_PAGE)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= HISTORY_PAGE:
            raise InvalidInput("bad_limit", f"'limit' must be a whole number from 1 to {HISTORY_PAGE}.")
        older = await self.store.before(room, before, limit + 1)
        return {"ok": True, "room": room, "history": [m.wire() for m in older[-limit:]], "more": len(older) > limit}

    async def search(self, room: str, data: dict[str, Any]) -> dict[str, Any]:
        query = data.get("q")
        if not isinstance(query, str) or not query.strip():
            raise InvalidInput("bad_query", "Type the words to search for.")
        if len(query) > MAX_QUERY or len(query.split()) > MAX_QUERY_WORDS:
            raise InvalidInput("bad_query", f"Search for at most {MAX_QUERY_WORDS} words ({MAX_QUERY} characters).")
        _check_encodable(query, "bad_query", "The search")
        found = await self.store.search(room, search_words(query), SEARCH_RESULTS)
        return {"ok": True, "room": room, "results": [m.wire() for m in found]}


class BotReplies:
    """The bot's turn: whether it answers a message (--bot-replies), then, in the background so that
    the chat never waits, its answer in the room (or one "unavailable" line), or privately to whoever
    wrote to it privately."""

    def __init__(self, runner: BotRunner, settings: Settings, store: Store, presence: Presence,
                 private: PrivateMessages, sio: socketio.AsyncServer, problems: ProblemLog, tasks: Tasks) -> None:
        self.runner = runner
        self.settings = settings
        self.store = store
        self.presence = presence
        self.private = private
        self.sio = sio
        self.problems = problems
        self.tasks = tasks

    async def consider(self, msg: Message) -> None:
        if self.runner.enabled and await self.addressed(msg):
            self.tasks.spawn(self.answer(msg))

    def consider_private(self, user: str, to: str, body: str, room: str) -> None:
        if self.runner.enabled and name_key(to) == name_key(self.settings.bot_name):
            self.tasks.spawn(self.answer_privately(user, body, room))

    async def addressed(self, msg: Message) -> bool:
        """Whether the bot answers this message (--bot-replies): always, when it is addressed
        (`@ChatFriend …`, or a message starting with its name), or, with auto, also while the
        sender is the only person in the room."""
        mode = self.settings.bot_replies
        if is_envelope(msg.body):  # encrypted: the bot cannot read it, and the room knows
            return False
        if mentions(msg.body, self.settings.bot_name):
            return True
        if msg.body.startswith("/me "):  # an action ("/me waves") is not said to anyone
            return False
        if mode == "all":
            return True
        return mode == "auto" and len(await self.presence.board.members(msg.room)) <= 1

    async def answer(self, msg: Message) -> None:
        """Ask the bot about one message and post its replies (or one "unavailable" line)."""
        room, remote = msg.room, self.runner.remote
        try:
            context: tuple[Message, ...] = ()
            if self.runner.wants_context:
                context = tuple(await self.store.recent(room, self.settings.bot_context))
            sender_id = "chatpy-" + hashlib.sha256(f"{room}\0{msg.user}".encode()).hexdigest()[:16] if remote else ""
            if remote:
                await self.presence.set_bot_typing(room, True)
            try:
                replies = await self.runner.answer(BotTurn(msg.user, msg.body, room, sender_id, context))
            finally:
                if remote:
                    await self.presence.set_bot_typing(room, False)
            if replies is None:
                if self.runner.should_announce(room):
                    await self.presence.announce(room, f"{self.settings.bot_name} is unavailable right now.",
                                                 "unavailable", self.settings.bot_name)
                return
            for text in replies:
                reply, _ = await self.store.append(room, self.settings.bot_name, text, "bot", None)
                if not self.store.delivered(reply):
                    await self.sio.emit("botmessage", reply.wire(), room=room)
        except asyncio.CancelledError:
            raise
        except StoreError as exc:
            self.problems.warn(f"history store failed: {exc}; the bot's reply was not posted %s", "")
        except Exception:
            log.exception("the bot failed to answer message %d", msg.id)

    async def answer_privately(self, user: str, body: str, room: str) -> None:
        """The bot's answer to a private message, as private messages to the sender."""
        try:
            replies = await self.runner.answer(BotTurn(user, body, room, "", ()))
            for text in replies or [f"{self.settings.bot_name} is unavailable right now."]:
                await self.private.deliver(self.settings.bot_name, user, text, kind="bot")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the bot failed to answer a private message")


# ---------------------------------------------------------------- admission: rates, caps and passwords

EXTRA_HANDSHAKES = 5  # Engine.IO sessions per address allowed beyond --max-per-ip

# One address (all its connections together) may send this many times one connection's rate.
PER_ADDRESS_FACTOR = 4
JOIN_RATE, JOIN_BURST = 2.0, 5        # joins per second per connection (a page joins on connect and room switch)
TYPING_RATE, TYPING_BURST = 2.0, 4    # typing changes relayed per second per connection; the rest are dropped
COMMAND_RATE, COMMAND_BURST = 2.0, 10  # logins, moderator commands, history pages and searches per connection


class AddressBuckets:
    """Token buckets per client address that outlive connections: reconnecting does not refill them.

    A bucket is forgotten once it has refilled, so the map holds only addresses active lately.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, address: str) -> TokenBucket | None:
        """None when allowed; otherwise the empty bucket (its wait_ms says how long to wait)."""
        if self.rate <= 0:
            return None
        bucket = self.buckets.get(address)
        if bucket is None:
            if len(self.buckets) >= 10_000:
                self.prune()
            bucket = self.buckets[address] = TokenBucket(self.rate, self.burst)
        return None if bucket.take() else bucket

    def prune(self) -> None:
        now = time.monotonic()
        full = [a for a, b in self.buckets.items() if b.tokens + (now - b.stamp) * b.rate >= b.burst]
        for address in full:
            del self.buckets[address]


class PasswordGuard:
    """Limits password guesses: 5 a minute per address (IPv6 per /64, where one host has many
    addresses); loopback, shared by everyone who comes through an SSH tunnel, is never locked
    out but slowed down together (10 guesses, then one every 2 seconds)."""

    PER_MINUTE = 5

    def __init__(self) -> None:
        self.failures: dict[str, collections.deque[float]] = {}
        self.loopback = TokenBucket(0.5, 10)

    @staticmethod
    def group(ip: str, trust_proxy: bool) -> str:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if address.is_loopback and not trust_proxy:
            return "loopback"
        if address.version == 6 and not (address.ipv4_mapped and address.ipv4_mapped.is_loopback):
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return ip

    def _recent(self, group: str) -> collections.deque[float] | None:
        failures = self.failures.get(group)
        if failures is not None:
            now = time.monotonic()
            while failures and now - failures[0] > 60:
                failures.popleft()
            if not failures:
                del self.failures[group]
                return None
        return failures

    def may_try(self, group: str) -> bool:
        if group == "loopback":
            return self.loopback.ready()
        failures = self._recent(group)
        return failures is None or len(failures) < self.PER_MINUTE

    def failed(self, group: str) -> None:
        if group == "loopback":
            self.loopback.take()
            return
        if len(self.failures) >= 10_000:
            for stale in list(self.failures):
                self._recent(stale)
        self.failures.setdefault(group, collections.deque()).append(time.monotonic())


class Admission:
    """Who may connect (origin, password, connections per address) and how fast each connection,
    and each address over all its connections, may send messages and join rooms."""

    def __init__(self, settings: Settings, warnings: ClientWarnings) -> None:
        self.settings = settings
        self.warnings = warnings
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.passwords = PasswordGuard()
        self.address_messages = AddressBuckets(settings.rate * PER_ADDRESS_FACTOR, settings.burst * PER_ADDRESS_FACTOR)
        self.address_joins = AddressBuckets(JOIN_RATE * PER_ADDRESS_FACTOR, JOIN_BURST * PER_ADDRESS_FACTOR)

    def origin_allowed(self, origin: str, request: web.Request) -> bool:
        """Whether a page on `origin` may connect: the same origin as this server, or --allow-origin."""
        if "*" in self.settings.allow_origins or origin in self.settings.allow_origins:
            return True
        schemes = {request.scheme}
        hosts = {request.headers.get("Host", "")}
        # Behind your own TLS-terminating proxy (--trust-proxy) the page's origin is the proxy's.
        if self.settings.trust_proxy and "X-Forwarded-Proto" in request.headers:
            schemes.add(request.headers["X-Forwarded-Proto"].split(",")[0].strip())
        if self.settings.trust_proxy and "X-Forwarded-Host" in request.headers:
            hosts.add(request.headers["X-Forwarded-Host"].split(",")[0].strip())
        return origin in {f"{s}://{h}" for s in schemes for h in hosts if h}

    def engine_origin_allowed(self, origin: str, environ: dict[str, Any]) -> bool:
        """origin_allowed() in the form python-engineio calls (a second line behind guard_requests)."""
        request: web.Request | None = environ.get("aiohttp.request")
        return request is not None and self.origin_allowed(origin, request)

    def client_address(self, environ: dict[str, Any]) -> str:
        """The peer's real address (X-Forwarded-For is honoured only with --trust-proxy)."""
        request: web.Request | None = environ.get("aiohttp.request")
        address = (request.remote if request is not None else None) or "unknown"
        if self.settings.trust_proxy:
            forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
            hops = [h.strip() for h in forwarded.split(",") if h.strip()]
            if hops:
                address = hops[-1]
        return address

    def capped_address(self, environ: dict[str, Any]) -> str | None:
        """The address a new Engine.IO session counts against, or None when it is exempt (loopback)."""
        address = self.client_address(environ)
        return None if self.is_exempt(address) else address

    def is_exempt(self, address: str) -> bool:
        """Loopback is exempt from per-address limits (an SSH tunnel's users all come from it),
        unless --trust-proxy says the real addresses are in X-Forwarded-For."""
        if self.settings.trust_proxy:
            return False
        try:
            return ipaddress.ip_address(address).is_loopback
        except ValueError:
            return False

    def admit(self, sid: str, environ: dict[str, Any], auth: Any) -> Session:
        """A new Socket.IO connection's session, or ConnectionRefusedError with a `code` the page reads."""
        ip = self.client_address(environ)
        if not self._password_ok(ip, auth):
            self.warnings.warn((ip,), "refused connection from %s: wrong or missing password", ip)
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized", {"code": "wrong_password" if isinstance(auth, dict) and auth.get("password")
                                 else "password_needed"})
        exempt = self.is_exempt(ip)
        if not exempt and self.per_ip[ip] >= self.settings.max_per_ip:
            self.warnings.warn((ip,), "refused connection from %s: over %d connections", ip, self.settings.max_per_ip)
            raise socketio.exceptions.ConnectionRefusedError("too many connections from your address",
                                                             {"code": "too_many_connections"})
        self.per_ip[ip] += 1
        return Session(sid=sid, ip=ip, exempt=exempt, bucket=TokenBucket(self.settings.rate, self.settings.burst),
                       browser=clean_browser(auth, sid))

    def release(self, session: Session) -> None:
        """The connection has gone: it no longer counts against its address."""
        self.per_ip[session.ip] -= 1
        if self.per_ip[session.ip] <= 0:
            del self.per_ip[session.ip]

    def over_message_rate(self, session: Session) -> TokenBucket | None:
        """None if this connection, and its address, may send a message now; else the empty bucket."""
        assert session.bucket is not None
        empty = None if session.bucket.take() else session.bucket
        if empty is None and not session.exempt:
            empty = self.address_messages.take(session.ip)
        if empty is None:
            return None
        now = time.monotonic()
        if session.flood_started is None or now - session.last_refusal > 2.0:
            session.flood_started = now
        session.last_refusal = now
        return empty

    def over_join_rate(self, session: Session) -> TokenBucket | None:
        """None if this connection, and its address, may join a room now; else the empty bucket."""
        empty = None if session.joins.take() else session.joins
        if empty is None and not session.exempt:
            empty = self.address_joins.take(session.ip)
        return empty

    def check_join_rate(self, session: Session) -> None:
        empty = self.over_join_rate(session)
        if empty is not None:
            raise InvalidInput("rate_limited", "You are joining rooms too fast; wait a moment.",
                               retry_after_ms=empty.wait_ms())

    def check_message_rate(self, session: Session, disconnect: Callable[[Session], None]) -> None:
        """Refuse a room or private message over the rate limit (with the wait); a connection still
        over it after --flood-timeout is disconnected."""
        empty = self.over_message_rate(session)
        if empty is None:
            return
        assert session.flood_started is not None
        flooding_for = time.monotonic() - session.flood_started
        if flooding_for >= self.settings.flood_timeout and not session.kicked:
            session.kicked = True
            log.warning("disconnecting %s (%s): over the rate limit for %.0f s", session.sid, session.ip,
                        flooding_for)
            disconnect(session)
        raise InvalidInput("rate_limited", "You are sending messages too fast; slow down.",
                           quiet=session.last_refusal != session.flood_started,  # the flood's first is logged
                           retry_after_ms=empty.wait_ms())

    def check_command_rate(self, session: Session) -> None:
        """Logins, moderator commands, history pages and searches: COMMAND_RATE a second per connection."""
        if not session.commands.take():
            raise InvalidInput("rate_limited", "Too many commands; wait a moment.",
                               retry_after_ms=session.commands.wait_ms())

    def _password_ok(self, ip: str, auth: Any) -> bool:
        if self.settings.password is None:
            return True
        given = auth.get("password") if isinstance(auth, dict) else None
        if not given:  # a page that has not asked for the password yet is not an attempt
            return False
        group = self.passwords.group(ip, self.settings.trust_proxy)
        if not self.passwords.may_try(group):
            raise socketio.exceptions.ConnectionRefusedError("too many attempts; wait a minute",
                                                             {"code": "too_many_attempts"})
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self.settings.password.encode()):
            return True
        self.passwords.failed(group)
        return False


# ---------------------------------------------------------------- people: names held and private messages


BROWSER_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
HOLDS_PER_ADDRESS = 20  # names one address may hold at once (its browsers' names, in use or in their grace)


def clean_browser(auth: Any, sid: str) -> str:
    """The browser a connection belongs to: the random key the page keeps in localStorage and sends
    in the Socket.IO auth payload; a script that sends none is a browser of its own per connection."""
    given = auth.get("browser") if isinstance(auth, dict) else None
    return f"b:{given}" if isinstance(given, str) and BROWSER_RE.fullmatch(given) else f"c:{sid}"


class NameHolds:
    """Who may use which name. A name (by name_key) is held by the browser that uses it, while any
    of that browser's connections does and for `grace` seconds after the last one leaves, so a
    reload or a network blip does not hand it to someone else. This process's holds; RedisNameHolds
    shares them between nodes."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.holder: dict[str, str] = {}  # name key -> browser
        self.live: dict[str, set[str]] = {}  # name key -> sids using it here
        self.until: dict[str, float] = {}  # name key -> when its grace ends (nobody using it)
        self.by_address: dict[str, set[str]] = {}

    def _expire(self, key: str) -> None:
        if key in self.until and self.until[key] <= time.monotonic():
            del self.until[key]
            self.holder.pop(key, None)

    def _free_for(self, key: str, browser: str) -> bool:
        self._expire(key)
        return self.holder.get(key, browser) == browser

    async def claim(self, key: str, browser: str, sid: str, address: str | None) -> str | None:
        """Start using a name: None, or why not ("name_taken": another browser holds it;
        "too_many_names": this address holds HOLDS_PER_ADDRESS already)."""
        if not self._free_for(key, browser):
            return "name_taken"
        if address is not None and key not in self.holder:
            mine = self.by_address.setdefault(address, set())
            for other in list(mine):
                self._expire(other)
                if other not in self.holder:
                    mine.discard(other)
            if len(mine) >= HOLDS_PER_ADDRESS:
                return "too_many_names"
            mine.add(key)
        if len(self.until) > 10_000:  # bounded: forget holds whose grace is over
            for other in list(self.until):
                self._expire(other)
        self.holder[key] = browser
        self.live.setdefault(key, set()).add(sid)
        self.until.pop(key, None)
        return None

    async def release(self, key: str, sid: str) -> None:
        """A connection stops using a name; the last one starts its grace period."""
        users = self.live.get(key)
        if users is None:
            return
        users.discard(sid)
        if not users:
            del self.live[key]
            self.until[key] = time.monotonic() + self.grace

    async def online(self, key: str) -> bool:
        """Whether some connection uses the name now."""
        return bool(self.live.get(key))

    async def save(self, sanctions: Sanctions) -> None:
        """At shutdown: keep every held name, for its grace period, across the restart (with --db)."""
        if not isinstance(sanctions, SqliteSanctions):
            return  # in memory nothing outlasts the process; with Redis the holds live there already
        for key, browser in list(self.holder.items()):
            self._expire(key)
            if key in self.holder:
                await sanctions.put("hold", key, browser, self.grace)

    def restore(self, held: list[tuple[str, str, float]]) -> None:
        """At start: the names held when the server stopped, each until its grace period ends."""
        now_wall, now = time.time(), time.monotonic()
        for key, browser, until in held:
            self.holder[key] = browser
            self.until[key] = now + (until - now_wall)

    async def refresh(self) -> None:
        """Heartbeat (shared holds only)."""
        return None

    async def keep(self, every: float) -> None:
        """Refresh the shared holds of the names used here, while this node runs."""
        while True:
            await asyncio.sleep(every)
            await self.refresh()


REDIS_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


class RedisNameHolds(NameHolds):
    """Names held across nodes: `chat:hold:KEY` names the browser (expiring unless refreshed by a
    node that uses it), `chat:online:KEY` the nodes using it now (scored by when that expires)."""

    def __init__(self, client: Any, health: RedisHealth, node: str, grace: float, ttl: float) -> None:
        super().__init__(grace)
        self.client = client
        self.health = health
        self.node = node
        self.ttl = ttl
        self._claim = client.register_script(REDIS_CLAIM)

    async def _shared_claim(self, key: str, browser: str) -> bool:
        keep = int(max(self.ttl, self.grace) * 1000)
        expires = int((time.time() + self.ttl) * 1000)
        return bool(await self.health.call(self._claim, [f"chat:hold:{key}", f"chat:online:{key}"],
                                           [browser, keep, expires, self.node]))

    async def claim(self, key: str, browser: str, sid: str, address: str | None) -> str | None:
        try:
            if not await self._shared_claim(key, browser):
                return "name_taken"
        except RedisDown:
            pass  # this node's own holds decide until Redis is back
        return await super().claim(key, browser, sid, address)

    async def release(self, key: str, sid: str) -> None:
        await super().release(key, sid)
        if key in self.live:
            return

        async def let_go() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(f"chat:online:{key}", self.node)
                pipe.pexpire(f"chat:hold:{key}", int(self.grace * 1000))
                await pipe.execute()

        with contextlib.suppress(RedisDown):
            await self.health.call(let_go)

    async def online(self, key: str) -> bool:
        if await super().online(key):
            return True
        try:
            return bool(await self.health.call(self.client.zcount, f"chat:online:{key}",
                                               int(time.time() * 1000), "+inf"))
        except RedisDown:
            return False

    async def refresh(self) -> None:
        for key in list(self.live):
            browser = self.holder.get(key)
            if browser is not None:
                with contextlib.suppress(RedisDown):
                    await self._shared_claim(key, browser)


class PrivateMessages:
    """`private` {to, body}: a message to one person, wherever they are: it reaches only the
    connections using that name and the sender's own, never a room, history or replay."""

    def __init__(self, sio: socketio.AsyncServer, holds: NameHolds, settings: Settings) -> None:
        self.sio = sio
        self.holds = holds
        self.settings = settings

    @staticmethod
    def room_of(key: str) -> str:
        """The Socket.IO room of every connection using the name with this key."""
        return f"name:{key}"

    async def deliver(self, sender: str, to: str, body: str, kind: str = "user") -> int:
        """Send to both people's connections; returns the time stamp."""
        ts = now_ms()
        payload = {"from": sender, "to": to, "body": body, "ts": ts, "kind": kind}
        await self.sio.emit("private", payload, room=self.room_of(name_key(to)))
        if name_key(sender) != name_key(to):
            await self.sio.emit("private", payload, room=self.room_of(name_key(sender)))
        return ts

    async def send(self, sender: str, data: dict[str, Any]) -> tuple[str, str, int]:
        """Check and deliver one private message from `sender`; returns (to, body, ts)."""
        to = data.get("to")
        if not isinstance(to, str) or not to.strip():
            raise InvalidInput("bad_user", "Say who the message is for.")
        to = display_name(to[: MAX_NAME * 4])
        body = clean_body(data.get("body"), self.settings.max_length)
        to_bot = name_key(to) == name_key(self.settings.bot_name)
        if not to_bot and not await self.holds.online(name_key(to)):
            raise InvalidInput("not_online", f"{to[:MAX_NAME]} is not online.")
        ts = await self.deliver(sender, self.settings.bot_name if to_bot else to, body)
        return to, body, ts


# ---------------------------------------------------------------- moderation: a host who can act

FOREVER = 253402300799.0  # "until lifted": the last second of the year 9999, in epoch seconds
SANCTIONS_KEPT = 10_000  # entries at most (bans, mutes, rooms, names held); expired ones are dropped first
SANCTIONS_CHANNEL = "chat.py:sanctions"  # with --redis: a node that changed one tells the others


class Sanctions:
    """What outlasts a connection, as (kind, key) -> (value, until): bans, mutes, locked and slow rooms,
    recent kicks and the names held over a restart. Checked from memory, so a check costs no round
    trip; kept in the --db file (SqliteSanctions) or shared by every node (RedisSanctions).
    `on_change` callbacks run whenever the entries change (here, or on another node)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], tuple[str, float]] = {}
        self.on_change: list[Callable[[], Any]] = []

    def get(self, kind: str, key: str) -> str | None:
        """The value of a sanction in force, or None."""
        entry = self.entries.get((kind, key))
        if entry is None or entry[1] > time.time():
            return entry[0] if entry else None
        del self.entries[(kind, key)]
        return None

    def until(self, kind: str, key: str) -> float | None:
        return self.entries[(kind, key)][1] if self.get(kind, key) is not None else None

    def of_kind(self, kind: str) -> list[tuple[str, str, float]]:
        """(key, value, until) of every entry of `kind` in force."""
        now = time.time()
        return [(k, v, u) for (kd, k), (v, u) in list(self.entries.items()) if kd == kind and u > now]

    async def put(self, kind: str, key: str, value: str, seconds: float | None = None) -> None:
        """Record a sanction, for `seconds` or (None) until it is lifted."""
        if len(self.entries) >= SANCTIONS_KEPT:
            self._prune()
            if len(self.entries) >= SANCTIONS_KEPT:
                raise InvalidInput("too_many", "Too many bans and mutes are in force; lift some first.")
        until = min(time.time() + seconds, FOREVER) if seconds else FOREVER
        self.entries[(kind, key)] = (value, until)
        await self._saved(kind, key, value, until)
        await self.changed()

    async def remove(self, kind: str, key: str) -> bool:
        """Lift a sanction; False if none was in force."""
        found = self.get(kind, key) is not None
        self.entries.pop((kind, key), None)
        await self._removed(kind, key)
        await self.changed()
        return found

    def _prune(self) -> None:
        now = time.time()
        for entry, (_, until) in list(self.entries.items()):
            if until <= now:
                del self.entries[entry]

    async def changed(self) -> None:
        for callback in self.on_change:
            await callback()

    async def open(self) -> None:
        return None

    async def watch(self) -> None:
        """Follow other nodes' changes (shared sanctions only)."""
        return None

    async def _saved(self, kind: str, key: str, value: str, until: float) -> None:
        return None

    async def _removed(self, kind: str, key: str) -> None:
        return None

    async def close(self) -> None:
        return None


class SqliteSanctions(Sanctions):
    """Sanctions kept in the --db file (its `sanctions` table), so that bans and held names survive a
    restart. Writes are rare (a moderator's command), on a connection of their own."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def _run(self, sql: str, *params: Any) -> list[Any]:
        def run() -> list[Any]:
            assert self._db is not None
            return self._db.execute(sql, params).fetchall()

        async with self._lock:
            try:
                return await asyncio.to_thread(run)
            except sqlite3.Error as exc:
                raise StoreError(f"the database {self.path}: {exc}") from None

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
            db.executescript(SQLITE_SCHEMA)  # the store has made it already; harmless when it has
            return db

        self._db = await asyncio.to_thread(connect)
        await self._run("DELETE FROM sanctions WHERE until <= ?", time.time())
        for kind, key, value, until in await self._run("SELECT kind, key, value, until FROM sanctions"):
            self.entries[(kind, key)] = (value, until)

    async def _saved(self, kind: str, key: str, value: str, until: float) -> None:
        await self._run("INSERT OR REPLACE INTO sanctions (kind, key, value, until) VALUES (?, ?, ?, ?)",
                        kind, key, value, until)

    async def _removed(self, kind: str, key: str) -> None:
        await self._run("DELETE FROM sanctions WHERE kind = ? AND key = ?", kind, key)

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.to_thread(self._db.close)
            self._db = None


class RedisSanctions(Sanctions):
    """Sanctions shared by every node: the hash `chat:sanctions` (field "KIND\\0KEY", value
    [value, until] in JSON). A node that changes one publishes on SANCTIONS_CHANNEL; every node
    re-reads the hash then, and every few seconds in case it missed a word."""

    RELOAD_EVERY = 5.0

    def __init__(self, client: Any, health: RedisHealth) -> None:
        super().__init__()
        self.client = client
        self.health = health

    async def open(self) -> None:
        await self.reload()

    async def reload(self) -> None:
        raw = await self.health.call(self.client.hgetall, "chat:sanctions")
        now, fresh, stale = time.time(), {}, []
        for field_name, data in raw.items():
            kind, _, key = text_of(field_name).partition("\0")
            value, until = json.loads(data)
            if until > now:
                fresh[(kind, key)] = (value, until)
            else:
                stale.append(field_name)
        if stale:
            await self.health.call(self.client.hdel, "chat:sanctions", *stale)
        if fresh != self.entries:
            self.entries = fresh
            await self.changed()

    async def watch(self) -> None:
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(SANCTIONS_CHANNEL)
                while True:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.RELOAD_EVERY)
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis is away: this node keeps what it knows, and tries again
                log.debug("following sanctions: %s", describe_error(exc))
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _shared(self, write: Callable[[Any], None]) -> None:
        async def run() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                write(pipe)
                pipe.publish(SANCTIONS_CHANNEL, "changed")
                await pipe.execute()

        try:
            await self.health.call(run)
        except RedisDown:
            raise StoreError("Redis is unreachable") from None

    async def _saved(self, kind: str, key: str, value: str, until: float) -> None:
        await self._shared(lambda pipe: pipe.hset("chat:sanctions", f"{kind}\0{key}", json.dumps([value, until])))

    async def _removed(self, kind: str, key: str) -> None:
        await self._shared(lambda pipe: pipe.hdel("chat:sanctions", f"{kind}\0{key}"))


MODERATOR_ACTIONS = ("kick", "ban", "unban", "mute", "unmute", "delete", "clear", "lock", "unlock", "slow")
MAX_MINUTES = 525_600  # a year: the longest ban or mute that can be given in minutes
MAX_SLOW = 3600  # seconds: the longest interval /slow can set
MAX_REASON = 200  # characters


def minutes_text(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:g} minute{'' if minutes == 1 else 's'}"


def clean_minutes(value: Any) -> float | None:
    """Optional minutes for a ban or mute: None (until lifted) or 1 to MAX_MINUTES."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_MINUTES:
        raise InvalidInput("bad_minutes", f"Minutes must be a number from 1 to {MAX_MINUTES}.")
    return float(value) * 60


def clean_reason(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise InvalidInput("bad_reason", "The reason must be text.")
    _check_encodable(value, "bad_reason", "The reason")
    return " ".join("".join(ch for ch in value if unicodedata.category(ch) != "Cc").split())[:MAX_REASON]


def clean_target(value: Any) -> str:
    """The name a moderator's command is about (any spelling its name key folds)."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME * 4:
        raise InvalidInput("bad_user", "Say whose name the command is for.")
    return display_name(value)[:MAX_NAME]


class Moderation:
    """The host's powers. CHAT_ADMIN_PASSWORD, given with `login`, makes a connection a moderator while
    it is connected. Moderators kick, ban and mute people, delete messages (anyone may delete their
    own), clear, lock and slow rooms (`moderate` {action, ...}); each is announced in the room and
    logged. What outlasts a connection is kept in Sanctions; the hub enforces it (ChatHub.enforce)."""

    def __init__(self, settings: Settings, sanctions: Sanctions, sio: socketio.AsyncServer, store: Store,
                 presence: Presence, sessions: dict[str, Session], tasks: Tasks) -> None:
        self.settings = settings
        self.sessions = sessions  # this node's connections (the hub's), read only
        self.tasks = tasks
        self.sanctions = sanctions
        self.sio = sio
        self.store = store
        self.presence = presence
        self.passwords = PasswordGuard()
        self.last_post: dict[tuple[str, str], float] = {}  # (room, name key) -> when, in slow rooms
        sanctions.on_change.append(self.enforce)

    async def login(self, session: Session, password: Any) -> dict[str, Any]:
        """Make the connection a moderator, or refuse: no password set, too many attempts, wrong."""
        if self.settings.admin_password is None:
            raise InvalidInput("no_moderators", "This chat has no moderators (CHAT_ADMIN_PASSWORD is not set).")
        group = self.passwords.group(session.ip, self.settings.trust_proxy)
        if not self.passwords.may_try(group):
            raise InvalidInput("too_many_attempts", "Too many wrong moderator passwords from here; wait a minute.")
        if not isinstance(password, str) or not hmac.compare_digest(
                password.encode("utf-8", "replace"), self.settings.admin_password.encode()):
            self.passwords.failed(group)
            raise InvalidInput("wrong_password", "That moderator password is not right.")
        log.info("moderation: %s (%s) logged in as a moderator", session.user or "someone", session.ip)
        await self.presence.set_moderator(session)
        return {"ok": True, "moderator": True}

    def check_ban(self, session: Session) -> None:
        """Refuse a new connection whose browser or address is banned (ConnectionRefusedError)."""
        for key in (f"browser:{session.browser}", None if session.exempt else f"address:{session.ip}"):
            until = self.sanctions.until("ban", key) if key else None
            if until is not None:
                raise socketio.exceptions.ConnectionRefusedError(
                    "banned", {"code": "banned", "until": None if until >= FOREVER else int(until * 1000)})

    def check_name(self, user: str, key: str) -> None:
        if self.sanctions.get("ban", f"name:{key}") is not None:
            raise InvalidInput("banned", f"The name {user} is banned here.")

    def check_muted(self, session: Session) -> None:
        if session.held and not session.moderator and self.sanctions.get("mute", session.held) is not None:
            raise InvalidInput("muted", "A moderator has muted you: your messages are not sent for now.")

    def room_state(self, session: Session) -> dict[str, Any]:
        """For a join's ack: whether this connection moderates, and the room's lock and slow mode."""
        return {"moderator": session.moderator, "locked": self.sanctions.get("lock", session.room) is not None,
                "slow": int(self.sanctions.get("slow", session.room) or 0)}

    async def enforce(self) -> None:
        """Apply what moderators decided (here or on another node) to this node's connections:
        a kicked name's connections close, and a banned name's browser and address are banned too."""
        for session in list(self.sessions.values()):
            if session.kicked or session.held is None:
                continue
            kick = self.sanctions.get("kick", session.held)
            until = self.sanctions.until("ban", f"name:{session.held}")
            if until is not None:
                await self.remove(session, "banned", "A moderator has banned you from this chat.")
                for key in (f"browser:{session.browser}", None if session.exempt else f"address:{session.ip}"):
                    if key and self.sanctions.get("ban", key) is None:
                        await self.sanctions.put("ban", key, session.held,
                                                 None if until >= FOREVER else until - time.time())
            elif kick is not None:
                kicked_at, by, reason = json.loads(kick)
                if kicked_at >= session.connected_at:
                    await self.remove(session, "kicked", f"{by} removed you from the chat"
                                      + (f": {reason.rstrip('.!?')}." if reason else "."))

    async def remove(self, session: Session, code: str, text: str) -> None:
        """Tell a connection why, then close it."""
        session.kicked = True
        await self.sio.emit("removed", {"code": code, "error": text}, to=session.sid)
        self.tasks.spawn(self.sio.disconnect(session.sid))

    def check_post(self, session: Session) -> None:
        """Refuse a message from a muted person, into a locked room, or too soon in a slow room."""
        if session.moderator:
            return
        self.check_muted(session)
        if self.sanctions.get("lock", session.room) is not None:
            raise InvalidInput("room_locked", f"#{session.room} is locked: only moderators may post for now.")
        slow = self.sanctions.get("slow", session.room)
        if slow is not None and session.held:
            now, key = time.monotonic(), (session.room, session.held)
            wait = self.last_post.get(key, -math.inf) + float(slow) - now
            if wait > 0:
                raise InvalidInput("slow_mode", f"#{session.room} is in slow mode: one message every {slow} "
                                   "seconds.", retry_after_ms=math.ceil(wait * 1000))
            if len(self.last_post) >= 10_000:
                self.last_post.clear()
            self.last_post[key] = now

    async def run(self, session: Session, data: dict[str, Any]) -> dict[str, Any]:
        """One `moderate` command: checked, done, announced and logged; returns the ack."""
        action = data.get("action")
        if action not in MODERATOR_ACTIONS:
            raise InvalidInput("bad_action", f"Unknown action; one of: {', '.join(MODERATOR_ACTIONS)}.")
        if action == "delete":
            return await self.delete(session, data.get("id"))
        if not session.moderator:
            raise InvalidInput("not_allowed", "Only moderators can do that (/login first).")
        room, by = session.room, session.user or "A moderator"
        if action in ("clear", "lock", "unlock", "slow"):
            text = await getattr(self, action)(room, data)
            what = room
        else:
            target = clean_target(data.get("name"))
            key = name_key(target)
            target = next((s.user for s in self.sessions.values() if s.held == key and s.user), target)
            text = await getattr(self, action)(key, target, by, data)
            what = target
        log.info("moderation: %s (%s) %s %s", by, session.ip, action, what)
        await self.presence.announce(room, f"{by} {text}", "moderation", by)
        return {"ok": True}

    async def kick(self, key: str, target: str, by: str, data: dict[str, Any]) -> str:
        reason = clean_reason(data.get("reason"))
        await self.sanctions.put("kick", key, json.dumps([time.time(), by, reason]), 60)
        return f"removed {target}" + (f": {reason}" if reason else "")

    async def ban(self, key: str, target: str, by: str, data: dict[str, Any]) -> str:
        seconds = clean_minutes(data.get("minutes"))
        await self.sanctions.put("ban", f"name:{key}", key, seconds)
        return f"banned {target}" + (f" for {minutes_text(seconds)}" if seconds else "")

    async def unban(self, key: str, target: str, by: str, data: dict[str, Any]) -> str:
        lifted = [k for k, v, _ in self.sanctions.of_kind("ban") if v == key]
        if not lifted:
            raise InvalidInput("not_found", f"{target} is not banned.")
        for entry in lifted:
            await self.sanctions.remove("ban", entry)
        return f"lifted the ban on {target}"

    async def mute(self, key: str, target: str, by: str, data: dict[str, Any]) -> str:
        seconds = clean_minutes(data.get("minutes"))
        await self.sanctions.put("mute", key, by, seconds)
        return f"muted {target}" + (f" for {minutes_text(seconds)}" if seconds else "")

    async def unmute(self, key: str, target: str, by: str, data: dict[str, Any]) -> str:
        if not await self.sanctions.remove("mute", key):
            raise InvalidInput("not_found", f"{target} is not muted.")
        return f"unmuted {target}"

    async def clear(self, room: str, data: dict[str, Any]) -> str:
        upto = await self.store.clear(room)
        await self.sio.emit("cleared", {"room": room, "upto": upto}, room=room)
        return "cleared the room's history"

    async def lock(self, room: str, data: dict[str, Any]) -> str:
        await self.sanctions.put("lock", room, "locked")
        return "locked the room: only moderators may post"

    async def unlock(self, room: str, data: dict[str, Any]) -> str:
        await self.sanctions.remove("lock", room)
        return "unlocked the room"

    async def slow(self, room: str, data: dict[str, Any]) -> str:
        seconds = data.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= MAX_SLOW:
            raise InvalidInput("bad_seconds", f"Seconds must be a whole number from 0 (off) to {MAX_SLOW}.")
        if seconds == 0:
            await self.sanctions.remove("slow", room)
            return "turned slow mode off"
        await self.sanctions.put("slow", room, str(seconds))
        return f"set slow mode: one message every {seconds} seconds"

    async def delete(self, session: Session, message_id: Any) -> dict[str, Any]:
        """Delete a message in this room: a moderator any, anyone their own."""
        if isinstance(message_id, bool) or not isinstance(message_id, int) or not 0 < message_id <= MAX_ID:
            raise InvalidInput("bad_id", "Say which message: its id, a whole number.")
        room = session.room
        message = await self.store.get(room, message_id)
        if message is None:
            raise InvalidInput("not_found", "There is no such message in this room (it may be gone already).")
        own = message.kind == "user" and session.held is not None and name_key(message.user) == session.held
        if not (own or session.moderator):
            raise InvalidInput("not_allowed", "You can delete only your own messages.")
        await self.store.delete(room, message_id)
        await self.sio.emit("deleted", {"room": room, "id": message_id}, room=room)
        if not own:
            by = session.user or "A moderator"
            log.info("moderation: %s (%s) delete message %d by %s", by, session.ip, message_id, message.user)
            await self.presence.announce(room, f"{by} deleted a message by {message.user}", "moderation", by)
        return {"ok": True}


# ---------------------------------------------------------------- rooms: presence, typing and private rooms


PRESENCE_DEBOUNCE = 0.25  # seconds: watchers coming and going are told to the room at most this often


class Presence:
    """Tells each room who is in it and who is typing, and posts its notices ("X joined").

    Members are counted per name across a person's tabs; a reconnect within the grace period
    announces nothing. The Board holds the state (this process's, or shared through Redis).
    """

    def __init__(self, sio: socketio.AsyncServer, board: Board, settings: Settings, tasks: Tasks) -> None:
        self.sio = sio
        self.board = board
        self.settings = settings
        self.tasks = tasks
        self._last_roster: dict[str, Roster] = {}
        self._pending_leaves: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._soon: dict[str, asyncio.TimerHandle] = {}

    async def announce(self, room: str, text: str, kind: str, user: str) -> None:
        """A line for the room: `kind` ("joined", "left", "unavailable") and `user` let clients decide about it."""
        await self.sio.emit("system", {"room": room, "text": text, "kind": kind, "user": user, "ts": now_ms()},
                            room=room)

    async def emit(self, room: str, roster: Roster | None = None, local_only: bool = False) -> None:
        roster = await self.board.roster(room) if roster is None else roster
        if roster.members or roster.watching:
            self._last_roster[room] = roster
        else:
            self._last_roster.pop(room, None)  # an empty room costs nothing
        await self.sio.emit("presence", {"room": room, **roster.wire()}, room=room, ignore_queue=local_only)

    @staticmethod
    def badges(session: Session) -> list[str]:
        """What a connection adds to its room's roster besides its name: WATCHING without a name,
        a MODERATOR_BADGE for a moderator's name."""
        if not session.user:
            return [WATCHING]
        return [MODERATOR_BADGE + session.user] if session.moderator else []

    def count(self, session: Session, present: bool) -> None:
        """Add (or take away) the connection's badges in its room; the room hears of it shortly."""
        for badge in self.badges(session):
            if present:
                self.board.add(session.room, badge)
            elif self.board.remove(session.room, badge) <= 0:
                self.board.forget(session.room, badge)
        if session.room not in self._soon:
            self._soon[session.room] = asyncio.get_running_loop().call_later(
                PRESENCE_DEBOUNCE, lambda room=session.room: self.tasks.spawn(self._emit_soon(room)))

    async def _emit_soon(self, room: str) -> None:
        self._soon.pop(room, None)
        await self.board.publish(room)
        await self.emit(room)

    async def set_moderator(self, session: Session) -> None:
        """The connection's person is a moderator now: their name gets the badge."""
        self.count(session, False)
        session.moderator = True
        self.count(session, True)

    async def move(self, session: Session, room: str) -> None:
        """The connection leaves its room (and its name there) for `room`, where it has no name yet."""
        await self.set_typing(session, False)
        self.count(session, False)
        await self.leave(session.room, session.user)
        await self.sio.leave_room(session.sid, session.room)
        await self.sio.enter_room(session.sid, room)
        session.room, session.user = room, None
        self.count(session, True)

    async def enter(self, room: str, user: str | None) -> None:
        if not user:
            return
        known = await self.board.members(room) if self.board.local_count(room, user) == 0 else [user]
        self.board.add(room, user)
        await self.board.publish(room)
        pending = self._pending_leaves.pop((room, user), None)
        if pending is not None:
            pending.cancel()  # a quick reconnect: no leave and no join line
        elif user not in known:
            await self.announce(room, f"{user} joined", "joined", user)
        await self.emit(room)

    async def leave(self, room: str, user: str | None) -> None:
        if not user or self.board.local_count(room, user) <= 0:
            return
        if self.board.remove(room, user) > 0:
            return  # another tab of this person is still here
        loop = asyncio.get_running_loop()
        self._pending_leaves[(room, user)] = loop.call_later(
            self.settings.presence_grace, lambda: self.tasks.spawn(self._finish_leave(room, user)))

    async def _finish_leave(self, room: str, user: str) -> None:
        self._pending_leaves.pop((room, user), None)
        if self.board.local_count(room, user) > 0:
            return
        self.board.forget(room, user)
        await self.board.publish(room)
        roster = await self.board.roster(room)
        if user not in roster.members:  # not still here through another node
            await self.announce(room, f"{user} left", "left", user)
        await self.emit(room, roster)

    async def rename(self, session: Session, user: str | None) -> None:
        """The connection now speaks as `user` (or as nobody) in its room. A person changing their name
        is one line ("Bob is now Bobby") and one list update, never both names at once."""
        if user == session.user:
            return
        old, room = session.user, session.room
        await self.set_typing(session, False)
        self.count(session, False)
        session.user = user
        self.count(session, True)
        if not (old and user) or self.board.local_count(room, old) > 1:
            await self.enter(room, user)
            await self.leave(room, old)
            return
        known = await self.board.members(room)
        self.board.remove(room, old)
        self.board.forget(room, old)
        self.board.add(room, user)
        pending = self._pending_leaves.pop((room, user), None)
        if pending is not None:
            pending.cancel()
        await self.board.publish(room)
        if user not in known:
            await self.announce(room, f"{old} is now {user}", "renamed", user)
        await self.emit(room)

    async def set_typing(self, session: Session, typing: bool) -> None:
        """Show or clear a person's indicator; it clears itself after --typing-timeout of silence."""
        was_typing = session.typing_timer is not None
        if was_typing:
            session.typing_timer.cancel()
            session.typing_timer = None
        if not session.user or not (typing or was_typing):  # a message from someone who was not typing
            return
        if typing:
            loop = asyncio.get_running_loop()
            session.typing_timer = loop.call_later(
                self.settings.typing_timeout, lambda: self.tasks.spawn(self.set_typing(session, False)))
        await self._update_typing(session.room, session.user, typing, self.settings.typing_timeout)

    async def set_bot_typing(self, room: str, typing: bool) -> None:
        await self._update_typing(room, self.settings.bot_name, typing, self.settings.bot_timeout + 5)

    async def _update_typing(self, room: str, user: str, typing: bool, ttl: float) -> None:
        """Record one person (or the bot) typing or not, and tell the room when the list changed."""
        users = await self.board.set_typing(room, user, typing, ttl)
        if users is not None:
            await self.sio.emit("typing", {"room": room, "users": users}, room=room)

    async def heartbeat(self, rooms: Callable[[], set[str]], every: float) -> None:
        """With Redis: keep this node's presence alive and heal lists when another node dies."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.board.refresh()
                for room in rooms():
                    roster = await self.board.roster(room)
                    if roster != self._last_roster.get(room, Roster([], 0, [])):
                        await self.emit(room, roster, local_only=True)
            except Exception:
                log.exception("presence heartbeat failed")

    def close(self) -> None:
        for handle in [*self._pending_leaves.values(), *self._soon.values()]:
            handle.cancel()


class PrivateRooms:
    """Which rooms are end-to-end encrypted: the first envelope makes a room private (for good, kept
    with the Sanctions, so on disk with --db and shared with --redis); a private room refuses plain
    messages and a room that has plain ones refuses envelopes, so that one misconfigured page cannot
    leak words into a private room."""

    def __init__(self, sanctions: Sanctions, store: Store) -> None:
        self.sanctions = sanctions
        self.store = store

    def private(self, room: str) -> bool:
        return self.sanctions.get("e2e", room) is not None

    async def check(self, room: str, body: str) -> None:
        """Refuse a body that does not fit its room; an envelope in a room without messages makes it private."""
        if not is_envelope(body):
            if self.private(room):
                raise InvalidInput("room_private", f"#{room} is a private room: its messages are end-to-end "
                                   "encrypted. Open it with its invite link to write here.")
            return
        if self.private(room):
            return
        if await self.store.recent(room, 1):
            raise InvalidInput("room_not_private", f"#{room} has unencrypted messages: it cannot become a "
                               "private room. Make a new private room instead.")
        await self.sanctions.put("e2e", room, "private")


WATCHING = "\0watching"  # roster entry: connections in the room without a name
MODERATOR_BADGE = "\0moderator:"  # roster entry prefix: a name used by a moderator


@dataclass(frozen=True)
class Roster:
    """Who is in a room: the names, how many watch without a name, which names are moderators'."""

    members: list[str]
    watching: int
    moderators: list[str]

    @classmethod
    def of(cls, counts: Any) -> Roster:
        """From (entry, count) pairs: names, and the WATCHING and MODERATOR_BADGE entries."""
        names, moderators, watching = set(), set(), 0
        for entry, count in counts:
            if entry == WATCHING:
                watching += max(count, 0)
            elif entry.startswith(MODERATOR_BADGE):
                if count > 0:
                    moderators.add(entry[len(MODERATOR_BADGE):])
            else:
                names.add(entry)  # still listed at 0, while its grace period runs (Presence.leave)
        return cls(sorted(names, key=str.casefold), watching, sorted(moderators & names, key=str.casefold))

    def wire(self) -> dict[str, Any]:
        return {"members": self.members, "count": len(self.members), "watching": self.watching,
                "moderators": self.moderators}


class Board:
    """Who is online and who is typing in each room, as this process sees it.

    Presence is counted per name across a person's tabs (connections).
    """

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter[str]] = {}
        self.typists: dict[str, dict[str, float]] = {}

    def add(self, room: str, user: str) -> int:
        counts = self.counts.setdefault(room, collections.Counter())
        counts[user] += 1
        return counts[user]

    def remove(self, room: str, user: str) -> int:
        """One tab fewer; returns how many this name still has here."""
        counts = self.counts.get(room)
        if not counts or counts[user] <= 0:
            return 0
        counts[user] -= 1
        return counts[user]

    def forget(self, room: str, user: str) -> None:
        counts = self.counts.get(room)
        if counts is not None and counts[user] <= 0:
            del counts[user]
            if not counts:
                del self.counts[room]

    def local_count(self, room: str, user: str) -> int:
        return self.counts.get(room, collections.Counter())[user]

    async def members(self, room: str) -> list[str]:
        return (await self.roster(room)).members

    async def roster(self, room: str) -> Roster:
        return Roster.of(self.counts.get(room, {}).items())

    async def publish(self, room: str) -> None:
        """Share this process's members of the room (nothing to do without Redis)."""
        return None

    async def set_typing(self, room: str, user: str, typing: bool, ttl: float) -> list[str] | None:
        """Record typing on or off; returns the room's typists when that changed, else None."""
        room_typing = self.typists.setdefault(room, {})
        was = user in room_typing
        if typing:
            room_typing[user] = time.time() + ttl
        else:
            room_typing.pop(user, None)
        users = sorted(room_typing)
        if not room_typing:
            del self.typists[room]
        return users if was != typing else None

    async def typing_users(self, room: str) -> list[str]:
        return sorted(self.typists.get(room, {}))


class RedisHealth:
    """Tracks whether Redis answers, logs an outage once and its end once, and probes with backoff."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.down = False
        self._probe: asyncio.Task[None] | None = None
        self.on_recovery: list[Any] = []

    def failed(self, exc: BaseException) -> None:
        if self.down:
            return
        self.down = True
        log.warning("Redis is unreachable (%s): each node keeps chatting on its own; retrying",
                    describe_error(exc))
        self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        delay = 0.25
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(self.client.ping(), 2)
                await self.client.connection_pool.disconnect()  # sockets from before the outage are dead
            except Exception:
                delay = min(delay * 2, 5.0)
                continue
            for callback in self.on_recovery:
                try:
                    await callback()
                except Exception as exc:  # still flapping: try again later
                    log.debug("recovery step failed: %s", exc)
            self.down = False
            log.warning("Redis is back: messages reach every node again")
            return

    async def call(self, coro_fn: Any, *args: Any) -> Any:
        """Run a Redis call, raising RedisDown (after logging once) when Redis does not answer."""
        if self.down:
            raise RedisDown()
        try:
            return await asyncio.wait_for(coro_fn(*args), 2)
        except (OSError, asyncio.TimeoutError) as exc:
            self.failed(exc)
            raise RedisDown() from None
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):
                self.failed(exc)
                raise RedisDown() from None
            raise

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


class RedisDown(Exception):
    """Redis is unreachable right now; the caller falls back to this process's own state."""


class RedisBoard(Board):
    """Presence and typing shared through Redis: each node keeps its own members under a key
    that expires unless the node's heartbeat refreshes it, so a dead node's users vanish."""

    def __init__(self, client: Any, health: RedisHealth, node: str, ttl: float) -> None:
        super().__init__()
        self.client = client
        self.health = health
        self.node = node
        self.ttl = ttl

    def _key(self, room: str, node: str | None = None) -> str:
        return f"chat:presence:{room}:{node or self.node}"

    async def publish(self, room: str) -> None:
        names = {name: n for name, n in self.counts.get(room, {}).items() if n > 0}

        async def write() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(room))
                if names:
                    pipe.hset(self._key(room), mapping=names)
                    pipe.pexpire(self._key(room), int(self.ttl * 1000))
                    pipe.sadd(f"chat:presence-nodes:{room}", self.node)
                await pipe.execute()

        with contextlib.suppress(RedisDown):
            await self.health.call(write)

    async def roster(self, room: str) -> Roster:
        async def read() -> Roster:
            nodes = await self.client.smembers(f"chat:presence-nodes:{room}")
            counts: list[tuple[str, int]] = []
            for node in nodes:
                node = text_of(node)
                found = await self.client.hgetall(self._key(room, node))
                if not found and node != self.node:
                    await self.client.srem(f"chat:presence-nodes:{room}", node)  # expired: that node died
                counts.extend((text_of(k), int(v)) for k, v in found.items())
            return Roster.of(counts)

        try:
            return await self.health.call(read)
        except RedisDown:
            return await super().roster(room)

    async def set_typing(self, room: str, user: str, typing: bool, ttl: float) -> list[str] | None:
        key = f"chat:typing:{room}"

        async def write() -> list[str] | None:
            if typing:
                changed = await self.client.hset(key, user, int((time.time() + ttl) * 1000))
                await self.client.pexpire(key, int((ttl + 5) * 1000))
            else:
                changed = await self.client.hdel(key, user)
            return await self._typists(key) if changed else None

        try:
            return await self.health.call(write)
        except RedisDown:
            return await super().set_typing(room, user, typing, ttl)

    async def _typists(self, key: str) -> list[str]:
        now = time.time() * 1000
        entries = await self.client.hgetall(key)
        return sorted(text_of(k) for k, v in entries.items() if float(v) > now)

    async def typing_users(self, room: str) -> list[str]:
        try:
            return await self.health.call(self._typists, f"chat:typing:{room}")
        except RedisDown:
            return await super().typing_users(room)

    async def refresh(self) -> None:
        """Heartbeat: re-publish this node's members of every room so they do not expire."""
        for room in list(self.counts):
            await self.publish(room)


# ---------------------------------------------------------------- stores (history)


class Store(Protocol):
    """Where messages live: assigns ids, keeps the last N per room, replays since an id.

    `epoch` names the sequence the ids come from: it changes when ids may start
    over (a restart without --db, a new database file), so a client that
    remembers ids from another epoch knows to forget them.
    """

    epoch: str

    async def open(self) -> None: ...

    async def append(self, room: str, user: str, body: str, kind: str, cid: str | None) -> tuple[Message, bool]:
        """Store and number a message; if `cid` was already stored in the room, return that one and False."""
        ...

    async def recent(self, room: str, limit: int) -> list[Message]: ...

    async def since(self, room: str, after_id: int, limit: int) -> tuple[list[Message], bool]: ...

    def delivered(self, message: Message) -> bool:
        """Whether appending `message` already delivered it to its room (with --redis, on every node);
        if not, the hub broadcasts it."""
        ...

    async def get(self, room: str, message_id: int) -> Message | None: ...

    async def before(self, room: str, before_id: int, limit: int) -> list[Message]:
        """Up to `limit` messages older than `before_id`, oldest first (walking back through history)."""
        ...

    async def search(self, room: str, words: list[str], limit: int) -> list[Message]:
        """The newest `limit` messages of the room that contain every one of `words`, newest first."""
        ...

    async def delete(self, room: str, message_id: int) -> bool:
        """Remove one message for good; False if the room has no such message."""
        ...

    async def clear(self, room: str) -> int:
        """Remove the room's whole history; returns the id up to which it was cleared."""
        ...

    async def removed(self, room: str) -> tuple[list[int], int]:
        """What was taken out of the room: the ids deleted lately (newest REMOVED_KEPT), and the id up to
        which it was cleared, so that a page coming back removes them too."""
        ...

    async def close(self) -> None: ...


REMOVED_KEPT = 500  # deleted ids remembered per room, for pages that were away when it happened
SEARCH_SCAN = 10_000  # messages a search without an index reads at most


def search_words(text: str) -> list[str]:
    """The words a search looks for, as compared (case-folded)."""
    return [w.casefold() for w in text.split()]


def matches(message: Message, words: list[str]) -> bool:
    if is_envelope(message.body):  # encrypted: only the pages with the key can search it
        return False
    body = message.body.casefold()
    return all(w in body for w in words)


def replay_from_window(window: Any, after_id: int, evicted_upto: int,
                       limit: int) -> tuple[list[Message], bool]:
    """The messages after `after_id` in a room's window of recent messages, and whether that is all of them
    (nothing newer than `after_id` was evicted from the window, and no more than `limit` were missed)."""
    missed = [m for m in window if m.id > after_id]
    return missed[-limit:], after_id >= evicted_upto and len(missed) <= limit


MAX_ROOMS_KEPT = 10_000  # rooms whose history the in-memory store keeps (least recently used dropped first)


class MemoryStore:
    """History in memory: a bounded deque per room, for at most MAX_ROOMS_KEPT rooms;
    ids increase across the whole server."""

    def __init__(self, history: int, max_rooms: int = MAX_ROOMS_KEPT) -> None:
        self.history = history
        self.max_rooms = max_rooms
        self.epoch = new_epoch()
        self._next_id = 1
        self._rooms: collections.OrderedDict[str, collections.deque[Message]] = collections.OrderedDict()
        self._cids: dict[str, dict[str, Message]] = {}
        self._evicted_upto: dict[str, int] = {}
        self._forgotten_upto = 0  # the newest id in any room whose history was dropped
        self._deleted: dict[str, collections.deque[int]] = {}
        self._cleared: dict[str, int] = {}

    async def open(self) -> None:
        return None

    async def append(self, room: str, user: str, body: str, kind: str, cid: str | None) -> tuple[Message, bool]:
        earlier = self._cids.get(room, {}).get(cid) if cid else None
        if earlier is not None:
            return earlier, False
        msg = Message(self._next_id, room, user, body, now_ms(), kind, cid)
        self._next_id += 1
        self.remember(msg)
        return msg, True

    def delivered(self, message: Message) -> bool:
        return False  # the hub broadcasts what this store keeps

    def continue_after(self, highest_id: int) -> None:
        """Number new messages after `highest_id` (ids another store handed out)."""
        self._next_id = max(self._next_id, highest_id + 1)

    def remember(self, msg: Message) -> None:
        """Add an already numbered message to the room's window."""
        window = self._rooms.get(msg.room)
        if window is None:
            if len(self._rooms) >= self.max_rooms:
                self._forget_oldest_room()
            window = self._rooms[msg.room] = collections.deque()
        else:
            self._rooms.move_to_end(msg.room)
        cids = self._cids.setdefault(msg.room, {})
        if len(window) >= self.history:
            old = window.popleft()
            self._evicted_upto[msg.room] = old.id
            if old.cid and cids.get(old.cid) is old:
                del cids[old.cid]
        window.append(msg)
        if msg.cid:
            cids[msg.cid] = msg

    def _forget_oldest_room(self) -> None:
        room, window = self._rooms.popitem(last=False)
        self._cids.pop(room, None)
        self._evicted_upto.pop(room, None)
        self._deleted.pop(room, None)
        self._cleared.pop(room, None)
        if window:
            self._forgotten_upto = max(self._forgotten_upto, window[-1].id)

    async def recent(self, room: str, limit: int) -> list[Message]:
        window = self._rooms.get(room, ())
        return list(window)[-limit:] if limit else []

    async def since(self, room: str, after_id: int, limit: int) -> tuple[list[Message], bool]:
        window = self._rooms.get(room)
        # A room not kept here may have had its history dropped: replay cannot promise completeness.
        evicted = self._evicted_upto.get(room, 0) if window is not None else self._forgotten_upto
        return replay_from_window(window or (), after_id, evicted, limit)

    async def get(self, room: str, message_id: int) -> Message | None:
        return next((m for m in self._rooms.get(room, ()) if m.id == message_id), None)

    async def before(self, room: str, before_id: int, limit: int) -> list[Message]:
        return [m for m in self._rooms.get(room, ()) if m.id < before_id][-limit:]

    async def search(self, room: str, words: list[str], limit: int) -> list[Message]:
        return [m for m in reversed(self._rooms.get(room, ())) if matches(m, words)][:limit]

    async def delete(self, room: str, message_id: int) -> bool:
        message = await self.get(room, message_id)
        if message is None:
            return False
        self._rooms[room].remove(message)
        self._remember_removed(room, message_id)
        return True

    def _remember_removed(self, room: str, message_id: int) -> None:
        self._deleted.setdefault(room, collections.deque(maxlen=REMOVED_KEPT)).append(message_id)

    async def clear(self, room: str) -> int:
        upto = self._next_id - 1
        if room in self._rooms:
            self._rooms[room].clear()
        self._cleared[room] = upto
        return upto

    async def removed(self, room: str) -> tuple[list[int], int]:
        return list(self._deleted.get(room, ())), self._cleared.get(room, 0)

    async def close(self) -> None:
        return None


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, also after deletes
    room  TEXT    NOT NULL,
    user  TEXT    NOT NULL,
    body  TEXT    NOT NULL,
    kind  TEXT    NOT NULL CHECK (kind IN ('user', 'bot')),
    ts    INTEGER NOT NULL,                    -- epoch milliseconds
    cid   TEXT                                 -- client id for de-duplication
);
CREATE INDEX IF NOT EXISTS messages_room_id ON messages (room, id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_room_cid ON messages (room, cid) WHERE cid IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- 'epoch': this file's id sequence
CREATE TABLE IF NOT EXISTS removed (room TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (room, id));  -- deleted
CREATE TABLE IF NOT EXISTS sanctions (  -- bans, mutes, locked and slow rooms, names held (see Sanctions)
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    until REAL NOT NULL,                 -- epoch seconds
    PRIMARY KEY (kind, key)
);
"""
# Full-text search over bodies, kept in step with `messages` by triggers (where SQLite has FTS5).
SQLITE_SEARCH_SCHEMA = """
CREATE VIRTUAL TABLE messages_fts USING fts5(body, content='messages', content_rowid='id');
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, body) VALUES (new.id, new.body);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, body) VALUES ('delete', old.id, old.body);
END;
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
"""


class SqliteStore:
    """History in a SQLite file (WAL); all database work runs on one background thread.

    The file is checked at start (PRAGMA quick_check) and locked (flock) for as long as
    this process runs, so that a second chat.py cannot write to it too.
    """

    COLUMNS = "SELECT id, room, user, body, kind, ts, cid FROM messages"

    def __init__(self, path: Path, history: int) -> None:
        self.path = path
        self.history = history
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.epoch = ""
        self.indexed = False  # whether search has SQLite's FTS5 index

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"the database {self.path}: {exc}") from None

    def _lock(self) -> None:
        import fcntl  # POSIX: chat.py's signal handling needs it too

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"{self.path} is in use by another chat.py (one process per database file)") from None
        self._lock_fd = fd  # held open, and so locked, until close()

    def _open(self) -> None:
        self._lock()
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        problems = [" ".join(str(row[0]).split()) for row in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            db.close()
            raise StoreError(f"{self.path} is damaged ({'; '.join(problems)[:200]}); restore a backup "
                             "or move it aside to start a new one")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SQLITE_SCHEMA)
        self.indexed = bool(db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone())
        if not self.indexed:
            try:
                db.executescript(f"BEGIN; {SQLITE_SEARCH_SCHEMA} COMMIT;")
                self.indexed = True
            except sqlite3.OperationalError:  # this SQLite has no FTS5: search reads the recent messages
                if db.in_transaction:
                    db.execute("ROLLBACK")
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (new_epoch(),))
        self.epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        self._db = db

    async def open(self) -> None:
        await self._run(self._open)

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Message:
        return Message(id=row[0], room=row[1], user=row[2], body=row[3], kind=row[4], ts=row[5], cid=row[6])

    def _append(self, room: str, user: str, body: str, kind: str, cid: str | None) -> tuple[Message, bool]:
        assert self._db is not None
        ts = now_ms()
        try:
            cur = self._db.execute(
                "INSERT INTO messages (room, user, body, kind, ts, cid) VALUES (?, ?, ?, ?, ?, ?)",
                (room, user, body, kind, ts, cid))
        except sqlite3.IntegrityError:  # this cid is already stored in this room
            return self._select(f"{self.COLUMNS} WHERE room = ? AND cid = ?", room, cid)[0], False
        return Message(int(cur.lastrowid or 0), room, user, body, ts, kind, cid), True

    async def append(self, room: str, user: str, body: str, kind: str, cid: str | None) -> tuple[Message, bool]:
        return await self._run(self._append, room, user, body, kind, cid)

    def _select(self, sql: str, *params: Any) -> list[Message]:
        assert self._db is not None
        return [self._row(r) for r in self._db.execute(sql, params).fetchall()]

    async def recent(self, room: str, limit: int) -> list[Message]:
        rows = await self._run(self._select, f"{self.COLUMNS} WHERE room = ? ORDER BY id DESC LIMIT ?", room, limit)
        return rows[::-1]

    async def since(self, room: str, after_id: int, limit: int) -> tuple[list[Message], bool]:
        rows = await self._run(self._select, f"{self.COLUMNS} WHERE room = ? AND id > ? ORDER BY id DESC LIMIT ?",
                               room, after_id, limit + 1)
        complete = len(rows) <= limit
        return rows[:limit][::-1], complete

    def delivered(self, message: Message) -> bool:
        return False  # the hub broadcasts what this store keeps

    async def get(self, room: str, message_id: int) -> Message | None:
        rows = await self._run(self._select, f"{self.COLUMNS} WHERE room = ? AND id = ?", room, message_id)
        return rows[0] if rows else None

    async def before(self, room: str, before_id: int, limit: int) -> list[Message]:
        rows = await self._run(self._select, f"{self.COLUMNS} WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?",
                               room, before_id, limit)
        return rows[::-1]

    def _search(self, room: str, words: list[str], limit: int) -> list[Message]:
        if self.indexed:
            query = " ".join('"' + w.replace('"', '""') + '"*' for w in words)  # every word, as a prefix
            try:
                found = self._select(f"{self.COLUMNS} WHERE room = ? AND id IN (SELECT rowid FROM messages_fts "
                                     "WHERE messages_fts MATCH ?) ORDER BY id DESC LIMIT ?", room, query, limit * 4)
                # the index matches whole words; the words must also be in the text as typed
                return [m for m in found if matches(m, words)][:limit]
            except sqlite3.OperationalError:  # a query the index cannot read (say, only punctuation)
                pass
        recent = self._select(f"{self.COLUMNS} WHERE room = ? ORDER BY id DESC LIMIT ?", room, SEARCH_SCAN)
        return [m for m in recent if matches(m, words)][:limit]

    async def search(self, room: str, words: list[str], limit: int) -> list[Message]:
        return await self._run(self._search, room, words, limit)

    def _delete(self, room: str, message_id: int) -> bool:
        assert self._db is not None
        with self._db:  # one transaction: BEGIN here, COMMIT (or ROLLBACK) on leaving
            self._db.execute("BEGIN")
            gone = self._db.execute("DELETE FROM messages WHERE room = ? AND id = ?", (room, message_id)).rowcount
            if gone:
                self._db.execute("INSERT OR IGNORE INTO removed (room, id) VALUES (?, ?)", (room, message_id))
                self._db.execute("DELETE FROM removed WHERE room = ? AND id NOT IN (SELECT id FROM removed "
                                 "WHERE room = ? ORDER BY id DESC LIMIT ?)", (room, room, REMOVED_KEPT))
        return bool(gone)

    async def delete(self, room: str, message_id: int) -> bool:
        return await self._run(self._delete, room, message_id)

    def _clear(self, room: str) -> int:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            upto = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'messages'"
                                    ).fetchone()[0]
            self._db.execute("DELETE FROM messages WHERE room = ?", (room,))
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"cleared:{room}", upto))
        return int(upto)

    async def clear(self, room: str) -> int:
        return await self._run(self._clear, room)

    def _removed(self, room: str) -> tuple[list[int], int]:
        assert self._db is not None
        ids = [r[0] for r in self._db.execute("SELECT id FROM removed WHERE room = ? ORDER BY id", (room,))]
        cleared = self._db.execute("SELECT value FROM meta WHERE key = ?", (f"cleared:{room}",)).fetchone()
        return ids, int(cleared[0]) if cleared else 0

    async def removed(self, room: str) -> tuple[list[int], int]:
        return await self._run(self._removed, room)

    async def close(self) -> None:
        if self._db is not None:
            try:
                await self._run(self._db.close)
            except StoreError as exc:  # say, the final checkpoint on a full disk: what was acked is committed
                log.warning("closing the history store: %s", exc)
            self._db = None
        self._pool.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


REDIS_APPEND = """
-- A batch of messages, in the order this node handled them: KEYS[1] the id counter, then four keys
-- per message (the room's history, cid map, cid order, evicted-up-to); ARGV[1..5] the settings, then
-- three values per message (cid, its fields as JSON without the id, the head of its batch entry).
local limit, floor, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local results, published = {}, {}
for i = 0, (#ARGV - 5) / 3 - 1 do
  local cid, fields, head = ARGV[6 + i * 3], ARGV[7 + i * 3], ARGV[8 + i * 3]
  local history, cids, order, evicted = KEYS[2 + i * 4], KEYS[3 + i * 4], KEYS[4 + i * 4], KEYS[5 + i * 4]
  local found = cid ~= '' and redis.call('HGET', cids, cid)
  if found then
    table.insert(results, 0)
    table.insert(results, found)
  else
    -- Ids from Redis are multiples of NODE_SLOTS; a node cut off from Redis uses the other residues.
    local id = redis.call('INCRBY', KEYS[1], step)
    if id <= floor then id = floor end  -- the highest id this node has seen: Redis may have lost its counter
    if id % step ~= 0 or id <= floor then
      id = id - id % step + step
      redis.call('SET', KEYS[1], id)
    end
    local msg = '{"id":' .. id .. ',' .. string.sub(fields, 2)
    table.insert(published, head .. msg .. '}')
    redis.call('RPUSH', history, msg)
    local excess = redis.call('LLEN', history) - limit
    if excess > 0 then
      redis.call('SET', evicted, cjson.decode(redis.call('LINDEX', history, excess - 1))['id'])
      redis.call('LTRIM', history, excess, -1)
    end
    if cid ~= '' then
      redis.call('HSET', cids, cid, msg)
      redis.call('ZADD', order, id, cid)
      local over = redis.call('ZCARD', order) - limit * 2
      if over > 0 then
        local old = redis.call('ZRANGE', order, 0, over - 1)
        redis.call('HDEL', cids, unpack(old))
        redis.call('ZREMRANGEBYRANK', order, 0, over - 1)
      end
    end
    table.insert(results, 1)
    table.insert(results, id)
  end
end
if #published > 0 then  -- numbered and sent in one step: every node sees them in id order, as one batch
  redis.call('PUBLISH', ARGV[4], ARGV[5] .. table.concat(published, ',') .. ']}')
end
return results
"""
REDIS_CHANNEL = "chat.py"  # the pub/sub channel of every node's Socket.IO manager
REDIS_STORE_HOST = "chat.py-store"  # the host_id of messages the store publishes: every node delivers them
REDIS_BATCH_HEAD = json.dumps({"method": "emit", "host_id": REDIS_STORE_HOST})[:-1] + ', "batch": ['
APPEND_BATCH = 200  # messages numbered and published by one script call at most
NODE_SLOTS = 64  # Redis hands out multiples of 64; during an outage a node uses its own residue (1-63)
REDIS_DELETE = """
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if cjson.decode(raw)['id'] == tonumber(ARGV[1]) then
    redis.call('LREM', KEYS[1], 1, raw)
    redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[2]) + 1))
    return 1
  end
end
return 0
"""
REDIS_CLEAR = """
local upto = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1]))
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], upto)
return upto
"""
REDIS_RAISE_IDS = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
"""


class DeliveryLedger:
    """The message ids this node has delivered to its clients lately, and the appends waiting for theirs.

    With --redis every new message reaches every node, the one that stored it included, through
    Redis, in the order Redis numbered them; the storing node acknowledges a message only once it
    has been delivered here, so an ack never overtakes a message with a lower id, and the highest
    id a client has seen is an exact point to resume from.
    """

    KEEP = 10_000  # ids (and client ids) remembered

    def __init__(self) -> None:
        self.ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.cids: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.waiting: dict[int, asyncio.Future[None]] = {}

    def claim(self, message_id: int, cid: str | None) -> bool:
        """True the first time a message is to be delivered here; False for a copy already delivered
        (under its id, or under another id after an append that timed out and was run by Redis late)."""
        if message_id in self.ids or (cid and self.cids.get(cid, message_id) != message_id):
            return False
        self.ids[message_id] = None
        if cid:
            self.cids[cid] = message_id
        for kept in (self.ids, self.cids):
            while len(kept) > self.KEEP:
                kept.popitem(last=False)
        waiter = self.waiting.pop(message_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def has(self, message_id: int) -> bool:
        return message_id in self.ids

    async def wait(self, message_id: int, timeout: float) -> None:
        """Until the message has been delivered here, or `timeout` seconds have passed."""
        if message_id in self.ids:
            return
        waiter = self.waiting.setdefault(message_id, asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            self.waiting.pop(message_id, None)


class AppendBatches:
    """The appends of one event-loop iteration, sent to Redis as one call of REDIS_APPEND.

    Messages handled in the same iteration are numbered, kept and published together (one round
    trip, one pub/sub message), so every node delivers them in one iteration and each recipient
    gets them in one write. One call is in flight at a time: what arrives meanwhile is the next
    batch, and a node's messages reach Redis in the order it handled them.
    """

    def __init__(self, script: Any, health: RedisHealth, history: int, highest_id: Callable[[], int]) -> None:
        self.script = script
        self.health = health
        self.history = history
        self.highest_id = highest_id
        self.waiting: list[tuple[str, str, str, str, asyncio.Future[tuple[int, Any]]]] = []
        self.sender: asyncio.Task[None] | None = None

    def add(self, room: str, fields: str, cid: str | None, kind: str) -> asyncio.Future[tuple[int, Any]]:
        """(1, the new id) or (0, the message stored earlier under this cid); RedisDown when Redis is away."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((room, fields, cid or "", kind, future))
        if self.sender is None:
            self.sender = asyncio.get_running_loop().create_task(self._send())
        return future

    async def _send(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:APPEND_BATCH], self.waiting[APPEND_BATCH:]
                try:
                    results = await self.health.call(self.script, *self._call(batch))
                except Exception as exc:  # RedisDown, or a bug: never leave an append waiting for ever
                    outcome: list[Any] = [exc] * len(batch)
                else:
                    outcome = [(results[2 * i], results[2 * i + 1]) for i in range(len(batch))]
                for (*_, future), result in zip(batch, outcome, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self.sender = None

    def _call(self, batch: list[tuple[str, str, str, str, Any]]) -> tuple[list[str], list[Any]]:
        """REDIS_APPEND's keys and arguments for these messages."""
        keys, args = ["chat:ids"], [self.history, self.highest_id(), NODE_SLOTS, REDIS_CHANNEL, REDIS_BATCH_HEAD]
        for room, fields, cid, kind, _ in batch:
            keys += [f"chat:history:{room}", f"chat:cids:{room}", f"chat:cid-order:{room}", f"chat:evicted:{room}"]
            event = "botmessage" if kind == "bot" else "newmessage"
            args += [cid, fields, json.dumps({"event": event, "room": room})[:-1] + ', "data": ']
        return keys, args


class RedisStore:
    """History and ids shared by every node through Redis.

    One Lua script numbers each message of a batch (the next multiple of NODE_SLOTS), keeps it in
    the room's capped list and a window of client ids (twice the history length) for de-duplication,
    and publishes the batch to every node, all in one step, so that concurrent nodes cannot interleave and
    every node sees the messages in id order. The counter never goes back below an id this node
    has seen (a Redis restarted without persistence starts it over). While Redis is down, this node
    numbers and keeps messages in memory, after the highest id it has seen, using only ids whose
    remainder by NODE_SLOTS is its own slot (1-63, claimed in Redis): two nodes in an outage never
    hand out the same id, and neither collides with an id Redis hands out, even for a call that
    Redis runs late after a pause. When Redis is back the shared counter is raised past them.
    """

    DELIVERY_WAIT = 2.0  # seconds an append waits for its message to come back through Redis

    def __init__(self, client: Any, health: RedisHealth, history: int, node: str) -> None:
        self.client = client
        self.health = health
        self.history = history
        self.node = node
        self.slot = 0
        self.local = MemoryStore(history)
        self.ledger = DeliveryLedger()
        self.highest_id = 0
        self.epoch = ""
        self.batches = AppendBatches(client.register_script(REDIS_APPEND), health, history, lambda: self.highest_id)
        self._raise_ids = client.register_script(REDIS_RAISE_IDS)
        self._delete = client.register_script(REDIS_DELETE)
        self._clear = client.register_script(REDIS_CLEAR)
        health.on_recovery.append(self._after_outage)

    async def open(self) -> None:
        await self.client.set("chat:epoch", new_epoch(), nx=True)
        epoch = await self.client.get("chat:epoch")
        self.epoch = text_of(epoch)
        await self.claim_slot()

    async def claim_slot(self) -> None:
        """Hold a numbering slot no other live node holds (refreshed by the heartbeat)."""
        for slot in [self.slot, *range(1, NODE_SLOTS)] if self.slot else range(1, NODE_SLOTS):
            key = f"chat:node-slot:{slot}"
            if await self.client.set(key, self.node, nx=True, ex=60) or \
                    (await self.client.get(key) or b"").decode() == self.node:
                await self.client.expire(key, 60)
                self.slot = slot
                return
        log.warning("more than %d chat.py nodes share this Redis: during an outage two of them may "
                    "number messages alike", NODE_SLOTS - 1)

    async def hold_slot(self, every: float = 20.0) -> None:
        """Keep this node's numbering slot while it runs."""
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(RedisDown):
                await self.health.call(self.claim_slot)

    async def close(self) -> None:
        return None

    def claim(self, message_id: int, cid: str | None) -> bool:
        """For the manager: a message about to be delivered here (see DeliveryLedger.claim)."""
        self.highest_id = max(self.highest_id, message_id)
        return self.ledger.claim(message_id, cid)

    def delivered(self, message: Message) -> bool:
        return self.ledger.has(message.id)

    def _message(self, raw: bytes | str) -> Message:
        data = json.loads(raw)
        self.highest_id = max(self.highest_id, data["id"])
        return Message(data["id"], data["room"], data["user"], data["body"], data["ts"], data["kind"],
                       data.get("cid"))

    async def _after_outage(self) -> None:
        await self._raise_ids(keys=["chat:ids"], args=[self.highest_id])
        await self.claim_slot()

    def next_outage_id(self) -> int:
        """The id for a message numbered here during an outage: the next one in this node's slot."""
        candidate = self.highest_id + 1
        return candidate + (self.slot - candidate) % NODE_SLOTS

    async def append(self, room: str, user: str, body: str, kind: str, cid: str | None) -> tuple[Message, bool]:
        fields = {"room": room, "user": user, "body": body, "ts": now_ms(), "kind": kind}
        if cid:
            fields["cid"] = cid
        try:
            created, value = await self.batches.add(room, json.dumps(fields), cid, kind)
        except RedisDown:
            self.local.continue_after(self.next_outage_id() - 1)
            message, created = await self.local.append(room, user, body, kind, cid)
            self.highest_id = max(self.highest_id, message.id)
            return message, created
        if not created:
            return self._message(value), False
        message = Message(int(value), room, user, body, fields["ts"], kind, cid)
        self.highest_id = max(self.highest_id, message.id)
        await self.ledger.wait(message.id, self.DELIVERY_WAIT)
        return message, True

    async def _read(self, *commands: tuple[str, tuple[Any, ...]]) -> list[Any]:
        """Several reads in one round trip (a pipeline, no transaction); RedisDown when Redis is away."""
        async def read() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for name, args in commands:
                    getattr(pipe, name)(*args)
                return await pipe.execute()

        return await self.health.call(read)  # type: ignore[no-any-return]

    async def _window(self, room: str) -> tuple[list[Message], int]:
        raws, evicted = await self._read(("lrange", (f"chat:history:{room}", 0, -1)),
                                         ("get", (f"chat:evicted:{room}",)))
        return [self._message(r) for r in raws], int(evicted or 0)

    async def recent(self, room: str, limit: int) -> list[Message]:
        try:
            window, _ = await self._window(room)
        except RedisDown:
            return await self.local.recent(room, limit)
        return window[-limit:] if limit else []

    async def since(self, room: str, after_id: int, limit: int) -> tuple[list[Message], bool]:
        try:
            window, evicted = await self._window(room)
        except RedisDown:
            return await self.local.since(room, after_id, limit)
        return replay_from_window(window, after_id, evicted, limit)

    async def _kept(self, room: str) -> list[Message]:
        try:
            return (await self._window(room))[0]
        except RedisDown:
            return await self.local.recent(room, self.history)

    async def get(self, room: str, message_id: int) -> Message | None:
        return next((m for m in await self._kept(room) if m.id == message_id), None)

    async def before(self, room: str, before_id: int, limit: int) -> list[Message]:
        return [m for m in await self._kept(room) if m.id < before_id][-limit:]

    async def search(self, room: str, words: list[str], limit: int) -> list[Message]:
        return [m for m in reversed(await self._kept(room)) if matches(m, words)][:limit]

    async def _changing(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.health.call(script, keys, args)
        except RedisDown:
            raise StoreError("Redis is unreachable") from None

    async def delete(self, room: str, message_id: int) -> bool:
        gone = await self._changing(self._delete, [f"chat:history:{room}", f"chat:removed:{room}"],
                                    [message_id, REMOVED_KEPT])
        return bool(gone) or await self.local.delete(room, message_id)

    async def clear(self, room: str) -> int:
        await self.local.clear(room)
        return int(await self._changing(self._clear, ["chat:ids", f"chat:history:{room}", f"chat:cleared:{room}"],
                                        [self.highest_id]))

    async def removed(self, room: str) -> tuple[list[int], int]:
        try:
            ids, cleared = await self._read(("zrange", (f"chat:removed:{room}", 0, -1)),
                                            ("get", (f"chat:cleared:{room}",)))
        except RedisDown:
            return await self.local.removed(room)
        return [int(i) for i in ids], int(cleared or 0)


# ---------------------------------------------------------------- bots


@dataclass(frozen=True)
class BotTurn:
    """What a bot is asked: one person's message, who sent it, and the room's recent messages."""

    user: str
    text: str
    room: str
    sender_id: str  # stable per person and room, for backends that keep conversation state
    context: tuple[Message, ...] = ()  # oldest first, ending with this message


class Bot(Protocol):
    """A chat bot backend: a person's message in, zero or more replies out."""

    remote: bool  # calls a service: limited, timed out, and shown typing while it works
    wants_context: bool  # gets the room's recent messages with each turn
    answers: bool  # False for --bot off: no turn is started at all

    async def open(self) -> None: ...

    async def reply(self, turn: BotTurn) -> list[str]: ...

    async def check(self) -> str | None:
        """None when the backend answers, else why not (checked once at start-up)."""
        ...

    async def close(self) -> None: ...


class BotUnavailable(Exception):
    """The backend failed; the message says why, for one log line."""


class RulesError(Exception):
    """A --bot-rules file is not valid; the message names the rule and the problem."""


DEFAULT_RULES: dict[str, Any] = {
    "rules": [
        {"name": "greeting", "words": ["hello", "hi", "hey"], "replies": ["Hello, {user}!"]},
        {"name": "question", "pattern": r"\?", "replies": ["We will be right with you to answer your question."]},
        {"name": "no question", "pattern": r"^[^?]*$", "replies": ["Did you have a question for us today?"]},
    ],
    "fallback": [],
}


@dataclass(frozen=True)
class KeywordRule:
    """One rule: a pattern to look for and the reply templates to choose from."""

    name: str
    pattern: re.Pattern[str]
    replies: tuple[str, ...]
    stop: bool = False


def _check_templates(where: str, templates: Any) -> tuple[str, ...]:
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t for t in templates):
        raise RulesError(f"{where}: 'replies' must be a non-empty list of non-empty strings")
    for template in templates:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as exc:
            raise RulesError(f"{where}: bad template {template!r}: {exc}") from None
        if fields - {"user"}:
            raise RulesError(f"{where}: template {template!r} may only use {{user}}, not {sorted(fields - {'user'})}")
    return tuple(templates)


def parse_rules(data: Any) -> tuple[tuple[KeywordRule, ...], tuple[str, ...]]:
    """Validate a rules document (see README, "Bots"); raises RulesError naming the rule."""
    if not isinstance(data, dict):
        raise RulesError("the file must hold a JSON object with \"rules\" and optionally \"fallback\"")
    unknown = set(data) - {"rules", "fallback"}
    if unknown:
        raise RulesError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    raw_rules = data.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError("\"rules\" must be a non-empty list")
    rules = []
    for index, raw in enumerate(raw_rules, 1):
        where = f"rule {index}"
        if not isinstance(raw, dict):
            raise RulesError(f"{where}: must be an object")
        if isinstance(raw.get("name"), str):
            where += f" ({raw['name']!r})"
        unknown = set(raw) - {"name", "words", "pattern", "replies", "stop"}
        if unknown:
            raise RulesError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
        if ("words" in raw) == ("pattern" in raw):
            raise RulesError(f"{where}: give exactly one of 'words' or 'pattern'")
        if "words" in raw:
            words = raw["words"]
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
                raise RulesError(f"{where}: 'words' must be a non-empty list of non-empty strings")
            pattern = re.compile(r"\b(?:" + "|".join(re.escape(w.strip()) for w in words) + r")\b", re.IGNORECASE)
        else:
            if not isinstance(raw["pattern"], str) or not raw["pattern"]:
                raise RulesError(f"{where}: 'pattern' must be a non-empty string")
            try:
                pattern = re.compile(raw["pattern"], re.IGNORECASE)
            except re.error as exc:
                raise RulesError(f"{where}: 'pattern' is not a valid regular expression: {exc}") from None
        if not isinstance(raw.get("stop", False), bool):
            raise RulesError(f"{where}: 'stop' must be true or false")
        rules.append(KeywordRule(str(raw.get("name", index)), pattern, _check_templates(where, raw.get("replies")),
                                 raw.get("stop", False)))
    fallback = data.get("fallback", [])
    if fallback != []:
        fallback = _check_templates("fallback", fallback)
    return tuple(rules), tuple(fallback)


def load_rules(path: Path) -> tuple[tuple[KeywordRule, ...], tuple[str, ...]]:
    """Read and validate a --bot-rules JSON file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"cannot read the file: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RulesError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    return parse_rules(data)


class KeywordBot:
    """Ordered keyword rules: every matching rule adds one reply; a rule with stop ends the search.

    The default rules are the tutorial's, with its bug fixed: greet only on the
    words hello/hi/hey, then answer a question or ask for one.
    """

    remote = False
    wants_context = False
    answers = True

    def __init__(self, rules: tuple[tuple[KeywordRule, ...], tuple[str, ...]] | None = None) -> None:
        self.rules, self.fallback = rules or parse_rules(DEFAULT_RULES)
        self._random = random.Random()

    async def open(self) -> None:
        return None

    async def check(self) -> str | None:
        return None

    async def close(self) -> None:
        return None

    def _fill(self, templates: tuple[str, ...], user: str) -> str:
        return self._random.choice(templates).format(user=user)

    async def reply(self, turn: BotTurn) -> list[str]:
        replies = []
        for rule in self.rules:
            if rule.pattern.search(turn.text):
                replies.append(self._fill(rule.replies, turn.user))
                if rule.stop:
                    break
        if not replies and self.fallback:
            replies.append(self._fill(self.fallback, turn.user))
        return replies


class SilentBot:
    """--bot off: never asked, never replies."""

    remote = False
    wants_context = False
    answers = False

    async def open(self) -> None:
        return None

    async def reply(self, turn: BotTurn) -> list[str]:
        return []

    async def check(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


class HttpBot:
    """Shared plumbing for bots behind an HTTP API: one client session, clear failure reasons."""

    remote = True
    wants_context = False
    answers = True

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _probe(self, url: str, headers: dict[str, str] | None = None) -> str | None:
        assert self.session is not None
        try:
            async with self.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=3)) as resp:
                return None if resp.status < 400 else f"HTTP {resp.status} from {url}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return f"{url}: {describe_error(exc)}"


def _json_error(body: Any) -> str | None:
    if isinstance(body, dict) and "error" in body:
        error = body["error"]
        message = error.get("message") if isinstance(error, dict) else error
        return f"error from the backend: {str(message)[:200]}"
    return None


class RasaBot(HttpBot):
    """Rasa's REST channel: POST {url}/webhooks/rest/webhook {sender, message} -> [{text|image|buttons}]."""

    async def check(self) -> str | None:
        return await self._probe(self.url + "/")

    async def reply(self, turn: BotTurn) -> list[str]:
        assert self.session is not None
        url = self.url + "/webhooks/rest/webhook"
        async with self.session.post(url, json={"sender": turn.sender_id, "message": turn.text}) as resp:
            try:
                body = await resp.json(content_type=None)
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                raise BotUnavailable(f"HTTP {resp.status}, malformed JSON from {url}") from None
            if resp.status >= 400:
                raise BotUnavailable(_json_error(body) or f"HTTP {resp.status} from {url}")
        if not isinstance(body, list):
            raise BotUnavailable(_json_error(body) or f"expected a JSON list from {url}")
        replies = []
        for item in body:  # Rasa answers errors with 200 and []: no reply, not a failure
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("text"), str) and item["text"].strip():
                replies.append(item["text"])
            if isinstance(item.get("image"), str) and item["image"].strip():
                replies.append(item["image"])
            buttons = item.get("buttons")
            if isinstance(buttons, list):
                titles = [str(b.get("title") or b.get("payload")) for b in buttons
                          if isinstance(b, dict) and (b.get("title") or b.get("payload"))]
                if titles:
                    replies.append("Options: " + " | ".join(titles))
        return replies


class OpenAIBot(HttpBot):
    """Any OpenAI-compatible chat completions server (Ollama, llama.cpp, vLLM, ...), streamed."""

    wants_context = True

    def __init__(self, url: str, timeout: float, model: str, prompt: str, bot_name: str) -> None:
        super().__init__(url, timeout)
        self.model = model
        self.prompt = prompt
        self.bot_name = bot_name

    @staticmethod
    def auth_headers() -> dict[str, str]:
        """The API key from OPENAI_API_KEY, for every request (the start-up check included)."""
        key = os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def check(self) -> str | None:
        return await self._probe(self.url + "/models", self.auth_headers())

    def request_body(self, turn: BotTurn) -> dict[str, Any]:
        """The chat completions request: system prompt, then the room's recent messages with roles."""
        messages = [{"role": "system", "content": self.prompt}]
        for msg in turn.context:
            if msg.kind == "bot":
                messages.append({"role": "assistant", "content": msg.body})
            else:
                messages.append({"role": "user", "content": f"{msg.user}: {msg.body}"})
        return {"model": self.model, "messages": messages, "stream": True}

    async def reply(self, turn: BotTurn) -> list[str]:
        assert self.session is not None
        url = self.url + "/chat/completions"
        headers = {"Accept": "text/event-stream", **self.auth_headers()}
        async with self.session.post(url, json=self.request_body(turn), headers=headers) as resp:
            if resp.status >= 400 or resp.content_type != "text/event-stream":
                raw = await resp.read()
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise BotUnavailable(f"HTTP {resp.status}, malformed JSON from {url}") from None
                if resp.status >= 400 or _json_error(body):
                    raise BotUnavailable(_json_error(body) or f"HTTP {resp.status} from {url}")
                return self._whole_answer(body, url)
            text = await self._read_stream(resp, url)
        return [text] if text.strip() else []

    @staticmethod
    def _whole_answer(body: Any, url: str) -> list[str]:
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BotUnavailable(f"no choices[0].message.content in the answer from {url}") from None
        return [content] if isinstance(content, str) and content.strip() else []

    @staticmethod
    async def _read_stream(resp: aiohttp.ClientResponse, url: str) -> str:
        parts: list[str] = []
        async for raw_line in resp.content:
            line = raw_line.decode("utf-8", "replace").strip()
            if not line or line.startswith(":"):
                continue  # blank separators and keep-alive comments
            if not line.startswith("data:"):
                continue  # event:, id:, retry: fields carry nothing we need
            data = line[5:].strip()
            if data == "[DONE]":
                return "".join(parts)
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise BotUnavailable(f"malformed JSON in the stream from {url}") from None
            if _json_error(chunk):
                raise BotUnavailable(_json_error(chunk) or "")
            try:
                delta = chunk["choices"][0].get("delta") or {}
            except (KeyError, IndexError, TypeError, AttributeError):
                continue
            if isinstance(delta.get("content"), str):
                parts.append(delta["content"])
        raise BotUnavailable(f"the stream from {url} ended before [DONE]")


def default_prompt(bot_name: str) -> str:
    """The system prompt used when --bot-prompt is not given."""
    return (f"You are {bot_name}, a friendly assistant in a group chat. Answer briefly and helpfully, "
            "in plain text. People's messages are prefixed with their names.")


def make_bot(settings: Settings) -> Bot:
    """The bot backend the settings ask for."""
    if settings.bot == "off":
        return SilentBot()
    if settings.bot == "rasa":
        return RasaBot(settings.bot_url or DEFAULT_BOT_URLS["rasa"], settings.bot_timeout)
    if settings.bot == "openai":
        return OpenAIBot(settings.bot_url or DEFAULT_BOT_URLS["openai"], settings.bot_timeout,
                         settings.bot_model, settings.bot_prompt or default_prompt(settings.bot_name),
                         settings.bot_name)
    return KeywordBot(load_rules(settings.bot_rules) if settings.bot_rules else None)


class BotRunner:
    """Runs a bot off the receive path, so that the bot can never hurt the chat.

    At most `limit` calls run at once; a call waiting longer than the timeout for a
    slot is dropped; each call has the timeout; any failure logs one warning and
    the room sees at most one "unavailable" line a minute; replies are capped.
    """

    UNAVAILABLE_EVERY = 60.0

    def __init__(self, bot: Bot, settings: Settings) -> None:
        self.bot = bot
        self.name = settings.bot_name
        self.timeout = settings.bot_timeout
        self.max_length = settings.max_length
        self.slots = asyncio.Semaphore(4)
        self._last_unavailable: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.bot.answers

    @property
    def remote(self) -> bool:
        return self.bot.remote

    @property
    def wants_context(self) -> bool:
        return self.bot.wants_context

    async def answer(self, turn: BotTurn) -> list[str] | None:
        """The capped replies, or None when the backend failed (already logged)."""
        if not self.bot.remote:  # in-process rules: microseconds, no I/O, nothing to limit
            return [self._cap(r) for r in await self.bot.reply(turn)]
        try:
            await asyncio.wait_for(self.slots.acquire(), self.timeout)
        except asyncio.TimeoutError:
            log.warning("bot busy: dropped a message in #%s after waiting %.0f s", turn.room, self.timeout)
            return []
        try:
            replies = await asyncio.wait_for(self.bot.reply(turn), self.timeout)
        except asyncio.TimeoutError:
            log.warning("%s is unavailable: no answer within %.0f s", self.name, self.timeout)
            return None
        except BotUnavailable as exc:
            log.warning("%s is unavailable: %s", self.name, exc)
            return None
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("%s is unavailable: %s", self.name, describe_error(exc))
            return None
        finally:
            self.slots.release()
        return [self._cap(str(r).strip()) for r in replies if str(r).strip()][:10]

    def _cap(self, text: str) -> str:
        return text if len(text) <= self.max_length else text[: self.max_length - 1] + "…"

    def should_announce(self, room: str) -> bool:
        """True at most once a minute per room: time to say the bot is unavailable."""
        now = time.monotonic()
        if now - self._last_unavailable.get(room, -self.UNAVAILABLE_EVERY) < self.UNAVAILABLE_EVERY:
            return False
        self._last_unavailable[room] = now
        return True


# ---------------------------------------------------------------- first run: a private environment (stdlib only)
# `python3 chat.py` on a machine without the dependencies (a fresh Debian or Ubuntu, whose
# system Python refuses `pip install`, PEP 668) installs them once into a per-user cache
# directory and re-runs itself there. Everything above this section is stdlib-only definitions;
# the check at its end runs before the first line that needs python-socketio or aiohttp.

IMPORT_NAMES = {"python-socketio": "socketio", "python-engineio": "engineio", "aiohttp": "aiohttp"}
PIP_NETWORK_HINTS = ("NewConnectionError", "Failed to establish a new connection", "Max retries exceeded",
                     "ConnectTimeoutError", "ReadTimeoutError", "Temporary failure in name resolution",
                     "Network is unreachable", "Connection refused", "ProxyError", "SSLError",
                     "(from versions: none)")
DEFAULT_PACKAGE_INDEX = "https://pypi.org/simple/"  # unless PIP_INDEX_URL or pip's configuration names another
# pip for a python3 without ensurepip, fetched from the package index: version and the wheel's sha256.
PIP_WHEEL = ("26.3", "f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13")
REDIS_REQUIREMENT = "redis>=8.1,<8.2"  # installed for --redis only; the minor release the tests run
ENV_COMPLETE = ".chat-py-complete"  # written last: an environment without it is an interrupted install


def read_own_header() -> str:
    """The start of this file, where the PEP 723 header is."""
    with open(__file__, encoding="utf-8") as own:
        return own.read(4096)


def script_requirements(source: str) -> list[str]:
    """The `dependencies` of this file's PEP 723 header: the one list of what chat.py needs."""
    header = re.search(r"^# /// script\n(.*?)^# ///$", source, re.M | re.S)
    block = re.search(r"dependencies\s*=\s*\[(.*?)\]", header.group(1) if header else "", re.S)
    return re.findall(r'"([^"]+)"', block.group(1)) if block else []


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in text.split("."))  # type: ignore[union-attr]


def version_satisfies(version: str, specifiers: str) -> bool:
    """Whether `version` meets comma-separated specifiers such as ">=5.18,<5.19"."""
    have = _version_tuple(version)
    checks = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
              "!=": lambda a, b: a != b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    for spec in filter(None, (s.strip() for s in specifiers.split(","))):
        op = re.match(r"[<>=!]=?", spec)
        want = _version_tuple(spec[op.end():]) if op else ()
        width = max(len(have), len(want))
        if op and not checks[op.group()](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
            return False
    return True


def split_requirement(requirement: str) -> tuple[str, str]:
    """("python-socketio", ">=5.18,<5.19") from "python-socketio>=5.18,<5.19"."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group()  # type: ignore[union-attr]
    return name, requirement[len(name):].strip()


def installed_version(distribution: str, module: Any) -> str | None:
    """The installed version of `distribution`, read from its dist-info next to `module` (cheap)."""
    prefix = re.sub(r"[-_.]+", "_", distribution).lower() + "-"
    site = os.path.dirname(os.path.dirname(module.__file__ or ""))
    with contextlib.suppress(OSError), os.scandir(site) as entries:
        for entry in entries:
            if entry.name.lower().startswith(prefix) and entry.name.endswith(".dist-info"):
                return entry.name[len(prefix):-len(".dist-info")]
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def dependency_problem(requirements: list[str], import_error: ImportError | None) -> str | None:
    """Why the pinned dependencies cannot be used here, or None when they can."""
    if import_error is not None:
        return f"{import_error.name or 'a dependency'} is not installed"
    for requirement in requirements:
        name, specifiers = split_requirement(requirement)
        module = sys.modules.get(IMPORT_NAMES.get(name, name))
        version = installed_version(name, module) if module else None
        if version and not version_satisfies(version, specifiers):
            return f"{name} {version} is installed, chat.py needs {name}{specifiers}"
    return None


def cache_root() -> Path:
    """The per-user directory for chat.py's private environment and cached browser client."""
    chosen = os.environ.get("CHAT_ENV_DIR")
    if chosen:
        return Path(chosen).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "chat.py"


def private_env_dir(requirements: list[str]) -> Path:
    """Where the private environment for these pins and this Python lives (never next to chat.py)."""
    key = "\n".join([*requirements, PIP_WHEEL[0], sys.version, os.path.realpath(sys.executable)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_root() / f"env-py{sys.version_info[0]}.{sys.version_info[1]}-{digest}"


def env_python(env: Path) -> Path:
    """The interpreter inside a virtual environment."""
    return env / "bin" / "python"


def manual_install_hint(requirements: list[str]) -> str:
    """The commands that install the dependencies by hand."""
    quoted = " ".join(f"'{r}'" for r in requirements)
    return (f"python3 -m venv ~/chat-env && ~/chat-env/bin/pip install {quoted} && "
            f"~/chat-env/bin/python {sys.argv[0] or 'chat.py'}")


class FirstRunError(Exception):
    """A first-run set-up step failed; the message is the one line the user sees."""


def untrusted(path: Path) -> str | None:
    """Why chat.py must not run code from `path` (another user could change it), or None.

    The path must belong to this user and be writable by nobody else; a directory that others
    may write into (and that has no sticky bit) above it would let them swap it.
    """
    import stat

    try:
        info = path.stat()
        parent = path.resolve().parent.stat()
    except OSError as exc:
        return f"cannot check {path}: {exc.strerror or exc}"
    if info.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {info.st_uid})"
    if info.st_mode & 0o002 or (info.st_mode & 0o020 and not _own_group(info.st_gid)):
        return f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}; chmod go-w it)"
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        return f"the directory above {path} is writable by everyone, so others could replace it"
    return None


def _own_group(gid: int) -> bool:
    """Whether a group is this user's personal group (Debian's user groups: same name, no other
    members), so that its write bit lets nobody else in."""
    import grp
    import pwd

    try:
        group = grp.getgrgid(gid)
        return group.gr_name == pwd.getpwuid(os.getuid()).pw_name and not set(group.gr_mem) - {group.gr_name}
    except KeyError:
        return False


def own_directory(path: Path) -> Path:
    """`path`, created mode 700 if missing, after checking that only this user can change it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FirstRunError(f"cannot create {path}: {exc.strerror or exc}; set CHAT_ENV_DIR to a directory "
                            "of your own") from None
    problem = untrusted(path)
    if problem:
        raise FirstRunError(f"will not use {problem}; set CHAT_ENV_DIR to a directory of your own") from None
    return path


ENV_SIZE = 64 << 20  # bytes, about, that the private environment takes


def no_space(text: str, where: Path) -> bool:
    """Whether a failed step failed for lack of disk space (said in its output, or plain to see)."""
    import shutil

    if "No space left on device" in text or "[Errno 28]" in text:
        return True
    with contextlib.suppress(OSError):
        return shutil.disk_usage(where).free < ENV_SIZE
    return False


def pip_install(python: str, requirements: list[str], pip: str | None = None) -> tuple[int, str, str]:
    """Run pip (`python -m pip`, or the pip at `pip`, e.g. inside its wheel), copying its output to stderr.

    Returns pip's exit status, its last non-empty line and its whole output.
    """
    import subprocess

    command = [python, *([pip] if pip else ["-m", "pip"]), "install", "--disable-pip-version-check", "--no-input",
               "--progress-bar", "off", *requirements]
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", stdin=subprocess.DEVNULL) as process:
        try:
            for line in process.stdout or ():
                sys.stderr.write(line)
                sys.stderr.flush()
                lines.append(line.rstrip())
            status = process.wait()
        except BaseException:
            process.terminate()
            process.wait()
            raise
    last = next((line for line in reversed(lines) if line.strip()), f"exit status {status}")
    return status, last, "\n".join(lines)


def pip_settings() -> tuple[str, str | None]:
    """The package index and CA bundle pip would use here: PIP_INDEX_URL / PIP_CERT, else pip's
    configuration files, else the public index."""
    import configparser

    found: dict[str, str] = {}
    files = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), Path.home() / ".pip/pip.conf",
             Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "pip/pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    for path in files:
        config = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(OSError, configparser.Error):
            config.read(path, encoding="utf-8")
        for section in ("global", "install"):
            for key in ("index-url", "cert"):
                if config.has_option(section, key):
                    found[key] = config.get(section, key).strip()
    index = os.environ.get("PIP_INDEX_URL") or found.get("index-url") or DEFAULT_PACKAGE_INDEX
    return index.rstrip("/") + "/", os.environ.get("PIP_CERT") or found.get("cert")


def download(url: str, limit: int, accept: str = "*/*", timeout: float = 30.0,
             context: ssl.SSLContext | None = None) -> bytes:
    """GET `url` (stdlib only), refusing a body over `limit` bytes with a FirstRunError."""
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": f"chat.py/{__version__}"})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        body: bytes = response.read(limit + 1)
    if len(body) > limit:
        raise FirstRunError(f"{url} is larger than expected; not using it")
    return body


def fetch_pip_wheel(into: Path) -> Path:
    """Download the pinned pip wheel from the package index into `into`, checked against its sha256.

    For a python3 without ensurepip (Debian's and Ubuntu's, without python3-venv): pip runs from
    its own wheel to install itself into the new environment, so no root is needed.
    """
    import urllib.parse

    version, digest = PIP_WHEEL
    filename = f"pip-{version}-py3-none-any.whl"
    index, cert = pip_settings()
    context = ssl.create_default_context(cafile=cert) if cert and os.path.isfile(cert) else None
    page_url = urllib.parse.urljoin(index, "pip/")
    try:
        page = download(page_url, 16 << 20, "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
                        context=context).decode("utf-8")
        try:
            links = {f["filename"]: (f["url"], f.get("hashes", {}).get("sha256")) for f in json.loads(page)["files"]}
        except (ValueError, KeyError, TypeError):  # the HTML form of the simple index
            links = {urllib.parse.unquote(href.split("#")[0].rsplit("/", 1)[-1]): (href, re.search(
                r"#sha256=([0-9a-f]{64})", href).group(1) if "#sha256=" in href else None)  # type: ignore[union-attr]
                for href in re.findall(r'href="([^"]+)"', html.unescape(page))}
        if filename not in links:
            raise FirstRunError(f"the package index {index} has no {filename}")
        href, published = links[filename]
        if published and published != digest:
            raise FirstRunError(f"the package index {index} publishes sha256 {published} for {filename}, "
                                f"but chat.py pins {digest}; not installing it")
        wheel = download(urllib.parse.urljoin(page_url, href.split("#")[0]), 64 << 20, context=context)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FirstRunError(f"cannot download pip {version} from the package index {index} ({reason}); check the "
                            "network or proxy, or, as root, `apt install python3-venv` and run chat.py again") from None
    if hashlib.sha256(wheel).hexdigest() != digest:
        raise FirstRunError(f"{filename} from {index} does not match the sha256 chat.py pins; not installing it")
    path = into / filename
    path.write_bytes(wheel)
    return path


def _has_ensurepip() -> bool:
    try:
        import ensurepip  # noqa: F401  (Debian and Ubuntu ship it separately, in python3-venv)
    except ImportError:
        return False
    return True


def install_private_env(env: Path, requirements: list[str]) -> None:
    """Create `env` with the requirements, in place; the completion mark is written last."""
    import shutil
    import subprocess

    try:
        import venv  # noqa: F401
    except ImportError:
        raise FirstRunError("this python3 has no venv module; as root, `apt install python3-venv`, then run "
                            "chat.py again") from None
    with_pip = _has_ensurepip()
    wanted = ", ".join(f"{name} {re.sub(r'^[<>=!~]=?', '', spec.split(',')[0])}".strip()
                       for name, spec in map(split_requirement, requirements))
    how = "" if with_pip else f"; this python3 has no ensurepip, so pip {PIP_WHEEL[0]} comes from the package index"
    print(f"chat.py: first run: installing {wanted} into {env} (about 10 s, once{how})", file=sys.stderr, flush=True)
    try:
        if env.exists():  # a leftover of an install that was killed: ours (checked), so replace it
            shutil.rmtree(env)
        made = subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(env)],
                              capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
        output = (made.stdout + made.stderr).strip()
        if made.returncode != 0:
            if no_space(output, env.parent):
                raise OSError(errno.ENOSPC, "No space left on device")
            raise FirstRunError(f"python3 -m venv failed: {output.splitlines()[-1] if output else made.returncode}")
        if not with_pip:
            wheel = fetch_pip_wheel(env)
            status, last, output = pip_install(str(env_python(env)), ["--no-index", str(wheel)], f"{wheel}/pip")
            wheel.unlink()
            if status != 0:
                raise FirstRunError(f"pip could not install itself from its wheel: {last}")
        status, last, output = pip_install(str(env_python(env)), requirements)
        if status != 0:
            if no_space(output, env.parent):
                raise OSError(errno.ENOSPC, "No space left on device")
            if any(hint in output for hint in PIP_NETWORK_HINTS):
                raise FirstRunError(f"cannot reach the package index to install the dependencies ({last}); "
                                    f"check the network or proxy, or install by hand: "
                                    f"{manual_install_hint(requirements)}")
            raise FirstRunError(f"pip could not install the dependencies: {last}")
        (env / ENV_COMPLETE).write_text(f"{sys.executable}\n")
    except BaseException as exc:
        shutil.rmtree(env, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            raise FirstRunError("first-run install interrupted; nothing was kept (run chat.py again to "
                                "retry)") from None
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise FirstRunError(f"no space left on the disk of {env.parent} (the environment needs about "
                                f"{ENV_SIZE >> 20} MB); free some space, or set CHAT_ENV_DIR to a directory on another "
                                "disk") from None
        if isinstance(exc, OSError):
            raise FirstRunError(f"cannot set up {env}: {exc.strerror or exc}; delete it and run chat.py "
                                "again") from None
        raise


def ready_private_env(requirements: list[str]) -> Path:
    """The private environment, installed first if it is missing or incomplete, and checked to be
    this user's own before anything in it runs."""
    import fcntl

    env = private_env_dir(requirements)
    own_directory(env.parent)
    with open(env.parent / ".install-lock", "a") as lock:  # one first run at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / ENV_COMPLETE).is_file() or not env_python(env).exists():
            install_private_env(env, requirements)
    for path in (env, env / "bin"):
        problem = untrusted(path)
        if problem:
            raise FirstRunError(f"will not run {env_python(env)}: {problem}; delete {env} and run chat.py again")
    return env


def import_optional(module: str, requirement: str, feature: str) -> Any:
    """Import an optional package a flag needs; in chat.py's private environment, install it first."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    if not os.environ.get("CHAT_PRIVATE_ENV"):
        raise StartupError(f"{feature} needs the {split_requirement(requirement)[0]} package: "
                           f"{sys.executable} -m pip install '{requirement}'")
    print(f"chat.py: {feature}: installing {requirement} into {sys.prefix}", file=sys.stderr, flush=True)
    _, last, _ = pip_install(sys.executable, [requirement])
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module)
    except ImportError:
        raise StartupError(f"{feature} needs {requirement}, and pip could not install it: {last}") from None


def first_run(problem: str, argv: list[str]) -> int:
    """Set up the private environment if needed and re-run chat.py in it; return an exit status on failure."""
    requirements = script_requirements(read_own_header())
    if os.environ.get("CHAT_NO_BOOTSTRAP"):
        print(f"chat.py: {problem}, and CHAT_NO_BOOTSTRAP is set; install by hand:\n"
              f"  {manual_install_hint(requirements)}\nor, in your own environment: "
              f"pip install {' '.join(repr(r) for r in requirements)}", file=sys.stderr)
        return 1
    if os.environ.get("CHAT_PRIVATE_ENV"):
        print(f"chat.py: {problem} in the private environment {sys.prefix}; delete that directory and run "
              "chat.py again", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    umask = os.umask(0o077)  # what the install creates is this user's alone
    try:
        env = ready_private_env(requirements)
    except FirstRunError as exc:
        print(f"chat.py: {exc}", file=sys.stderr)
        return 1
    finally:
        os.umask(umask)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    python = str(env_python(env))
    os.environ["CHAT_PRIVATE_ENV"] = str(env)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(python, [python, os.path.abspath(__file__), *argv])
    return 1  # not reached


_DEPENDENCY_PROBLEM = dependency_problem(script_requirements(read_own_header()),
                                         _IMPORT_ERROR)
if _DEPENDENCY_PROBLEM:
    if __name__ == "__main__":
        sys.exit(first_run(_DEPENDENCY_PROBLEM, sys.argv[1:]))
    raise ImportError(f"chat.py: {_DEPENDENCY_PROBLEM}")


# ---------------------------------------------------------------- web: aiohttp routes, headers and connection guards


class BrowserClient:
    """The pinned Socket.IO browser client, kept in chat.py's cache so the page needs no third-party host.

    Fetched once from the npm registry's socket.io-client tarball (npm_config_registry names a
    mirror) and used only if it matches the pinned SRI hash; without it the page loads the client
    from the CDN, checked by the browser against the same hash.
    """

    TIMEOUT = 10.0
    LIMIT = 8 << 20  # bytes of tarball

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / f"socket.io-{CLIENT_JS_VERSION}.min.js"

    @staticmethod
    def genuine(body: bytes) -> bool:
        """Whether `body` is the pinned client (its sha384 is the SRI hash)."""
        digest = base64.b64encode(hashlib.sha384(body).digest()).decode()
        return hmac.compare_digest(f"sha384-{digest}", CLIENT_JS_SRI)

    def cached(self) -> Path | None:
        """The cached copy, if it is there, ours and genuine."""
        if self.path.is_file() and untrusted(self.path) is None and self.genuine(self.path.read_bytes()):
            return self.path
        return None

    def tarball_url(self) -> str:
        names = ("npm_config_registry", "NPM_CONFIG_REGISTRY")  # npm reads either spelling
        registry = next((os.environ[name] for name in names if os.environ.get(name)), DEFAULT_NPM_REGISTRY)
        return f"{registry.rstrip('/')}/socket.io-client/-/socket.io-client-{CLIENT_JS_VERSION}.tgz"

    def fetch(self) -> Path:
        """Download, check and cache the client; OSError, ValueError or FirstRunError say why not."""
        import io as bytes_io
        import tarfile

        own_directory(self.root)
        tarball = download(self.tarball_url(), self.LIMIT, timeout=self.TIMEOUT)
        with tarfile.open(fileobj=bytes_io.BytesIO(tarball), mode="r:gz") as package:
            member = package.extractfile("package/dist/socket.io.min.js")  # read in memory, never extracted
            body = member.read(self.LIMIT) if member else b""
        if not self.genuine(body):
            raise ValueError(f"its dist/socket.io.min.js does not match the pinned hash {CLIENT_JS_SRI}")
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        partial.write_bytes(body)
        partial.replace(self.path)
        return self.path

    def find(self) -> tuple[Path | None, str]:
        """The local client to serve (cached, or fetched now), or None and why it cannot be had."""
        found = self.cached()
        if found:
            return found, ""
        try:
            return self.fetch(), ""
        except FirstRunError as exc:
            problem = str(exc)
        except (OSError, ValueError, KeyError, EOFError) as exc:  # tarfile: KeyError (no member), EOFError
            problem = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
        return None, f"could not fetch it from {self.tarball_url()}: {problem}; a later start tries again"


class InlineCode(HTMLParser):
    """The inline scripts and event-handler attributes of an HTML page, as a CSP hashes them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.handlers: set[str] = set()
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handlers.update(value for name, value in attrs if name.startswith("on") and value)
        self._in_script = tag == "script" and not any(name == "src" for name, _ in attrs)
        if self._in_script:
            self.scripts.append("")

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    @staticmethod
    def source(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    def allowed(self) -> str:
        """CSP sources that allow exactly this page's own inline code, and no injected code."""
        hashes = sorted({self.source(s) for s in self.scripts if s} | {self.source(h) for h in self.handlers})
        return " ".join((["'unsafe-hashes'"] if self.handlers else []) + hashes)


class StaticFiles:
    """--static DIR: the files under DIR at /, as the tutorial's `express.static('public')` serves them.

    Only regular files under DIR (after resolving links), never a listing or a dot-file; a
    directory serves its index.html. An HTML page gets a CSP that allows its own inline
    scripts and handlers by hash, so markup injected into it later cannot run.
    """

    HTML_LIMIT = 4 << 20  # bytes of an HTML page read to hash its inline code

    def __init__(self, root: Path, script_sources: str) -> None:
        self.root = root.resolve()
        self.script_sources = script_sources

    def locate(self, tail: str) -> Path | None:
        parts = [part for part in tail.split("/") if part]
        if any(part.startswith(".") or "\\" in part or "\0" in part for part in parts):
            return None
        path = Path(os.path.realpath(self.root.joinpath(*parts)))
        if path != self.root and self.root not in path.parents:
            return None
        if path.is_dir():
            path = path / "index.html"
        return path if path.is_file() else None

    def csp(self, page: bytes) -> str:
        inline = InlineCode()
        with contextlib.suppress(Exception):  # a broken page still gets the strict policy
            inline.feed(page.decode("utf-8", errors="replace"))
            inline.close()
        return (f"default-src 'self'; script-src {self.script_sources} {inline.allowed()}".rstrip() +
                "; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
                "frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        path = self.locate(tail)
        if path is None and tail == "favicon.ico":
            return web.Response(status=204)  # browsers ask for one; a site without it needs no error
        if path is None:
            raise web.HTTPNotFound(text="not found\n")
        if path.name == "index.html" and tail and not tail.endswith("/") and not tail.endswith("index.html"):
            raise web.HTTPMovedPermanently(f"/{tail}/")  # so that the page's relative links resolve
        headers = {"Cache-Control": "no-cache"}
        if path.suffix.lower() in (".html", ".htm") and path.stat().st_size <= self.HTML_LIMIT:
            page = await asyncio.to_thread(path.read_bytes)
            headers["Content-Security-Policy"] = self.csp(page)
            return web.Response(body=page, content_type="text/html", charset="utf-8", headers=headers)
        return web.FileResponse(path, headers=headers)


def script_sources(settings: Settings) -> str:
    """Where pages may load scripts from: this server, and the pinned CDN when the client is not local."""
    return "'self'" if settings.client_js else f"'self' {CLIENT_JS_ORIGIN}"


def content_security_policy(settings: Settings) -> str:
    """The page's CSP: nothing inline, scripts from here (and the pinned CDN unless the client is local)."""
    return ("default-src 'self'; "
            f"script-src {script_sources(settings)}; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'")


@functools.cache
def page_script() -> str:
    """The page's JavaScript, with name_key's look-alike table and invisible characters filled in.

    The page lower-cases, then looks each character up: the table holds, for every lower-case
    character that Python's case folding changes (Cherokee folds to capitals, ß to ss, final sigma to sigma) or
    that has a look-alike, what name_key makes of it."""
    table = {}
    for code in range(0x10000):  # every such character is in the BMP
        lower = chr(code).lower()
        if len(lower) == 1 and not 0xD800 <= code <= 0xDFFF:
            key = lower.casefold().translate(CONFUSABLES)
            if key != lower:
                table[lower] = key
    invisible = "[" + "".join(f"\\u{{{a:x}}}-\\u{{{b:x}}}" for a, b in INVISIBLE_RANGES) + "]"
    folding = json.dumps({"map": table, "invisible": invisible}, ensure_ascii=False)
    return PAGE_JS.replace("/*NAME_FOLDING*/{ map: {}, invisible: '[]' }", folding)


def bot_hint(settings: Settings) -> str:
    """What the page's empty room says about the bot, as --bot-replies has it."""
    if settings.bot == "off":
        return ""
    name = settings.bot_name
    return {"all": f" {name} will answer.", "mentions": f" Mention @{name} to ask the bot.",
            "auto": f" {name} answers while you are alone here; mention @{name} when others are."}[settings.bot_replies]


def render_page(settings: Settings) -> str:
    """The HTML page, with the Socket.IO client script tag for the chosen source."""
    if settings.client_js:
        script = '<script src="/socket.io.min.js"></script>'
    else:
        script = f'<script src="{CLIENT_JS_CDN}" integrity="{CLIENT_JS_SRI}" crossorigin="anonymous"></script>'
    return (PAGE_HTML.replace("{{CLIENT_SCRIPT}}", script)
            .replace("{{BOT_NAME}}", html.escape(settings.bot_name)).replace("{{VERSION}}", __version__)
            .replace("{{TRANSPORTS}}", ",".join(sorted(settings.transports, reverse=True)))
            .replace("{{MAX_LENGTH}}", str(settings.max_length))
            .replace("{{BOT_HINT}}", html.escape(bot_hint(settings))))


REQUEST_DEADLINE = 10.0  # seconds for a request's headers, and for a POST's body, to arrive
IDLE_KEEPALIVE = 15.0    # seconds an idle keep-alive connection stays open
STARTED_REQUESTS = web.AppKey("started_requests", weakref.WeakSet)  # transports whose request got going


def host_name(host: str) -> str:
    """The name in a Host header, without the port or IPv6 brackets, lowercased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


MAX_NESTING = 256  # arrays and objects inside each other in one packet (Python's decoder fails near 1,000)


def nesting_depth(text: str) -> int:
    """How deeply JSON arrays and objects nest in `text` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def valid_engine_packet(packet: Any) -> bool:
    """Whether a frame or a polling payload's part is an Engine.IO packet python-engineio can decode.

    python-engineio decodes a packet whose data starts with [ or { as JSON itself, outside any
    error handling: it must nest no deeper than MAX_NESTING (Python's decoder would raise
    RecursionError). Socket.IO packets ("42[...") are decoded later, where errors are handled.
    """
    if isinstance(packet, bytes):
        return True  # binary: handed to ChatServer, which refuses it
    if not (isinstance(packet, str) and packet[:1] in ("0", "1", "2", "3", "4", "5", "6")):
        return False
    if packet[1:2] not in ("[", "{"):
        return True
    opened = packet.count("[") + packet.count("{")  # counted in C; scanned only when it could be deep
    return opened <= MAX_NESTING or nesting_depth(packet) <= MAX_NESTING


def check_polling_payload(body: bytes) -> str | None:
    """Why a long-polling POST body cannot be Engine.IO packets, or None when it can."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "a polling POST that is not UTF-8"
    # "b": a binary packet in base64, handed on so that ChatServer refuses it and ends the session
    if not text or not all(part[:1] == "b" or valid_engine_packet(part) for part in text.split("\x1e")):
        return "a polling POST that is not Engine.IO packets"
    return None


CHECKED_BODY = web.RequestKey("checked_body", bytes)  # a polling POST body, read by guard_requests for EngineServer


class CheckedBody:
    """A request body already read (within the deadline) and checked, readable again by python-engineio."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self, size: int = -1) -> bytes:
        return self.body


OUT_OF_SOCKETS = ("out of sockets at the open-file limit of %s (see LimitNOFILE in the README): "
                  "new connections wait or are dropped until others close")


class ConnectionWatch:
    """Watches the open HTTP connections once a second.

    It closes those that have not sent a whole request's headers within REQUEST_DEADLINE
    (slowloris, or sockets opened and left silent: aiohttp would wait for them without end),
    and says, once a minute, when connections fill the open-file limit (uvloop then drops
    new ones silently; asyncio reports it through SocketShortage).
    """

    def __init__(self, runner: web.AppRunner, app: web.Application, problems: ProblemLog,
                 open_files: int, capacity: int) -> None:
        self.runner = runner
        self.started = app[STARTED_REQUESTS]
        self.problems = problems
        self.open_files = open_files
        self.capacity = capacity
        self.first_seen: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def run(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        connections = open_http_transports(self.runner)
        if self.open_files and len(connections) >= self.capacity:
            self.problems.warn(OUT_OF_SOCKETS, str(self.open_files))
        for transport in connections:
            if transport in self.started:
                continue
            seen = self.first_seen.setdefault(transport, now)
            if now - seen > REQUEST_DEADLINE:
                peer = transport.get_extra_info("peername")
                self.problems.warn(f"closed a connection from %s: no complete request within {REQUEST_DEADLINE:.0f} s",
                                   str(peer[0]) if peer else "?")
                transport.abort()


class RequestGuards:
    """The checks every HTTP request passes, one middleware each, in the order in_order() gives."""

    def __init__(self, settings: Settings, admission: Admission, problems: ProblemLog) -> None:
        self.settings = settings
        self.admission = admission
        self.problems = problems
        self.local_names = {"localhost", "127.0.0.1", "::1", *settings.allow_hosts} \
            if _is_loopback_host(settings.host) else None

    def in_order(self) -> list[Any]:
        return [self.note_started, self.only_local_names, self.same_origin, self.allowed_transport,
                self.checked_polling_body, self.client_gone]

    @web.middleware
    async def note_started(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """For ConnectionWatch: this connection has sent a whole request's headers."""
        if request.transport is not None:  # None once the client has gone
            request.app[STARTED_REQUESTS].add(request.transport)
        return await handler(request)

    @web.middleware
    async def only_local_names(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """DNS rebinding: on loopback, a web page whose name now points at 127.0.0.1 must not reach the chat."""
        if self.local_names is not None and host_name(request.host) not in self.local_names:
            self.problems.warn(f"refused a request for host {host_name(request.host)[:80]!r} from %s: "
                               "chat.py listens on loopback; use --allow-host NAME to answer for that name",
                               request.remote or "?")
            raise web.HTTPMisdirectedRequest(text="chat.py does not answer for this host name (see --allow-host)\n")
        return await handler(request)

    @web.middleware
    async def same_origin(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Cross-site WebSocket hijacking: only pages from this server's origin (or --allow-origin) connect."""
        origin = request.headers.get("Origin")
        if origin and request.path.startswith("/socket.io/") and not self.admission.origin_allowed(origin, request):
            self.problems.warn(f"refused a connection from a page on {origin[:100]!r} (from %s): not this "
                               "server's origin; allow it with --allow-origin, or behind a proxy pass Host "
                               "$http_host (and X-Forwarded-Proto/-Host with --trust-proxy)", request.remote or "?")
            return web.json_response({"code": "origin_refused", "error": f"{origin} is not an accepted origin"},
                                     status=403)
        return await handler(request)

    @web.middleware
    async def allowed_transport(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """--transports: a refused transport is told which to use."""
        transports = self.settings.transports
        transport = request.query.get("transport") if request.path == "/socket.io/" else None
        if transport is not None and transport not in transports:
            self.problems.warn(f"refused a {transport[:20]!r} connection from %s: this server runs with "
                               f"--transports {','.join(transports)} (clients need transports: {list(transports)})",
                               request.remote or "?")
            return web.json_response({"code": "transport_refused",
                                      "error": f"this server accepts {' and '.join(transports)} only: connect "
                                               f"with transports: [{', '.join(repr(t) for t in transports)}]"},
                                     status=400)
        return await handler(request)

    @web.middleware
    async def checked_polling_body(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """A long-polling POST: a length, at most the frame limit, read within REQUEST_DEADLINE, and
        Engine.IO packets (python-engineio would read the body first, then hang disconnecting the sender)."""
        if request.method == "POST" and request.path.startswith("/socket.io/"):
            limit = self.settings.frame_limit
            if request.content_length is None:
                raise web.HTTPLengthRequired(text="a Content-Length is required\n")
            if request.content_length > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
            try:
                body = await asyncio.wait_for(request.read(), REQUEST_DEADLINE)
            except asyncio.TimeoutError:
                self.problems.warn(f"closed a request from %s: its body took over {REQUEST_DEADLINE} s",
                                   request.remote or "?")
                raise web.HTTPRequestTimeout() from None
            problem = check_polling_payload(body)
            if problem is not None:
                self.problems.warn(f"refused {problem} from %s", request.remote or "?")
                raise web.HTTPBadRequest(text="not Engine.IO packets\n")
            request[CHECKED_BODY] = body
        return await handler(request)

    @web.middleware
    async def client_gone(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConnectionResetError:  # the client left mid-request (say, a reload during an upgrade)
            raise web.HTTPBadRequest() from None


def build_app(settings: Settings, hub: ChatHub) -> web.Application:
    """The aiohttp application: page, assets, health check and the Socket.IO endpoint."""
    page = render_page(settings).encode()
    csp = content_security_policy(settings)
    client_js = settings.client_js.read_bytes() if settings.client_js else None

    def static(body: bytes, content_type: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type, charset="utf-8",
                                headers={"Cache-Control": "no-cache"})
        return handler

    async def healthz(request: web.Request) -> web.Response:
        if settings.password is not None:  # counts are for people who are let in
            return web.json_response({"status": "ok"})
        return web.json_response({
            "status": "ok", "clients": len(hub.sessions), "rooms": len({s.room for s in hub.sessions.values()}),
            "messages": hub.messages_sent, "uptime_s": round(time.monotonic() - hub.started, 1),
            "bot": settings.bot, "version": __version__})

    guards = RequestGuards(settings, hub.admission, hub.problems)

    async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers = response.headers
        if settings.tls_cert:
            headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        if response.content_type == "text/html":
            headers.setdefault("Content-Security-Policy", csp)
            headers.setdefault("X-Frame-Options", "DENY")

    app = web.Application(client_max_size=settings.frame_limit, middlewares=guards.in_order())
    app[STARTED_REQUESTS] = weakref.WeakSet()
    if settings.static is None:
        app.router.add_get("/", static(page, "text/html"))
        app.router.add_get("/chat.css", static(PAGE_CSS.encode(), "text/css"))
        app.router.add_get("/chat.js", static(page_script().encode(), "text/javascript"))
        app.router.add_get("/favicon.svg", static(FAVICON_SVG.encode(), "image/svg+xml"))
    app.router.add_get("/healthz", healthz)
    if client_js is not None:
        app.router.add_get("/socket.io.min.js", static(client_js, "text/javascript"))
        app.router.add_get("/socket.io/socket.io.js", static(client_js, "text/javascript"))
    else:  # where the tutorial's page (and Socket.IO's own docs) load the client from
        async def client_on_cdn(request: web.Request) -> web.Response:
            raise web.HTTPFound(CLIENT_JS_CDN)

        app.router.add_get("/socket.io/socket.io.js", client_on_cdn)
    app.on_response_prepare.append(security_headers)
    hub.sio.attach(app)
    if settings.static is not None:  # last: chat.py's own paths (the client, /socket.io/) come first
        app.router.add_get("/{tail:.*}", StaticFiles(settings.static, script_sources(settings)).handle)
    return app


# ---------------------------------------------------------------- embedded assets

FAVICON_SVG = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">\
<rect width="64" height="64" rx="14" fill="#3b6df0"/>\
<path d="M16 20h32a4 4 0 0 1 4 4v14a4 4 0 0 1-4 4H30l-10 8v-8h-4a4 4 0 0 1-4-4V24a4 4 0 0 1 4-4z" fill="#fff"/>\
</svg>"""
PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <meta name="color-scheme" content="light dark">
  <meta name="chat-transports" content="{{TRANSPORTS}}">
  <meta name="chat-bot-name" content="{{BOT_NAME}}">
  <meta name="chat-max-length" content="{{MAX_LENGTH}}">
  <title>chat.py</title>
  <link rel="icon" href="/favicon.svg" type="image/svg+xml">
  <link rel="stylesheet" href="/chat.css">
</head>
<body>
  <header class="topbar">
    <div class="brand"><span class="logo" aria-hidden="true"></span><h1>chat.py</h1></div>
    <form id="room-form" class="room" aria-label="Switch room" novalidate>
      <label for="room-input">Room</label>
      <span class="hash" aria-hidden="true">#</span>
      <input id="room-input" name="room" autocomplete="off" autocapitalize="none" spellcheck="false"
             maxlength="32" title="1-32 letters, digits, - or _">
      <button type="submit" class="ghost">Go</button>
    </form>
    <form id="search-form" class="search" role="search" novalidate>
      <label for="search-input" class="sr-only">Search this room</label>
      <input id="search-input" type="search" placeholder="Search" maxlength="100" autocomplete="off">
    </form>
    <details id="alerts" class="alerts">
      <summary title="Notifications and sound"><svg class="bell" viewBox="0 0 24 24" aria-hidden="true"><path d="M12 3a6 6 0 0 0-6 6v3.6L4.3 15.4A1 1 0 0 0 5.2 17h13.6a1 1 0 0 0 .9-1.6L18 12.6V9a6 6 0 0 0-6-6Zm-2.6 15.5a2.7 2.7 0 0 0 5.2 0Z"/></svg><span class="sr-only">Notifications</span></summary>
      <fieldset class="alerts-menu">
        <legend>Notify me while away</legend>
        <label><input type="radio" name="notify" value="off" checked> never</label>
        <label><input type="radio" name="notify" value="mentions"> mentions and private messages</label>
        <label><input type="radio" name="notify" value="all"> every message</label>
        <label><input type="checkbox" id="sound"> with a sound</label>
        <p id="alerts-note" class="note"></p>
      </fieldset>
    </details>
    <p id="status" class="status" role="status" data-state="connecting">connecting…</p>
  </header>
  <div id="banner" class="banner" role="alert" hidden></div>
  <main class="layout">
    <aside class="people" aria-labelledby="people-title">
      <h2 id="people-title">Online <span id="member-count" class="count">0</span></h2>
      <ul id="members"></ul>
      <p id="no-members" class="no-members">Nobody with a name yet.</p>
      <p id="watching" class="no-members" hidden></p>
      <button id="new-private" type="button" class="ghost new-private"><svg class="lock" viewBox="0 0 24 24" aria-hidden="true"><path d="M7 10V7a5 5 0 0 1 10 0v3h1a1 1 0 0 1 1 1v9a1 1 0 0 1-1 1H6a1 1 0 0 1-1-1v-9a1 1 0 0 1 1-1Zm2 0h6V7a3 3 0 0 0-6 0Z"/></svg><span class="new-private-label">New private room</span></button>
    </aside>
    <div class="chat-column">
      <section id="invite" class="invite" aria-labelledby="invite-title" hidden>
        <h2 id="invite-title">Private room: end-to-end encrypted</h2>
        <p class="note">Whoever has this link can read and write here; the key is in the part after #,
          which your browser never sends to the server. Share it only with the people you invite.</p>
        <div class="invite-row"><label for="invite-link" class="sr-only">Invite link</label>
          <input id="invite-link" readonly><button id="copy-invite" type="button">Copy</button>
          <button id="hide-invite" type="button" class="ghost">Hide</button></div>
        <label class="remember"><input id="remember-key" type="checkbox"> Remember this room on this device</label>
      </section>
      <section id="search-results" class="search-results" aria-labelledby="search-title" hidden>
        <div class="search-head"><h2 id="search-title">Search</h2>
          <button id="search-close" type="button" class="ghost">Close</button></div>
        <ol id="search-list"></ol>
      </section>
      <section class="conversation" aria-label="Messages" tabindex="0">
        <div id="log" role="log" aria-label="Messages in this room"><ul id="messages" class="messages"></ul></div>
        <button id="jump" type="button" class="jump" hidden>New messages below ↓</button>
        <p id="empty" class="empty">No messages yet. Say hello!{{BOT_HINT}} Type /help for commands.</p>
      </section>
      <div class="composer">
        <p id="typing" class="typing" aria-live="polite"></p>
        <div id="suggest" class="suggest" aria-label="Names" hidden></div>
        <form id="message-form" aria-label="Send a message" novalidate>
          <div class="field name-field">
            <label for="messageUser">Your name</label>
            <input id="messageUser" name="user" autocomplete="nickname" maxlength="32" placeholder="e.g. Alice">
          </div>
          <div class="field body-field">
            <label for="messageBody">Your message</label>
            <textarea id="messageBody" name="body" rows="1"
                      placeholder="Type a message… (Enter sends, Shift+Enter for a new line)"></textarea>
            <span id="counter" class="counter" aria-live="polite" hidden></span>
          </div>
          <button id="send" type="submit">Send</button>
        </form>
        <p id="errorMessage" class="error" role="alert" aria-live="assertive"></p>
      </div>
    </div>
  </main>
  <dialog id="password-dialog" aria-labelledby="password-title">
    <form id="password-form" method="dialog">
      <h2 id="password-title">This chat needs a password</h2>
      <label for="password-input">Password</label>
      <input id="password-input" type="password" autocomplete="current-password" required>
      <p id="password-error" class="error" role="alert"></p>
      <button type="submit">Join</button>
    </form>
  </dialog>
  <dialog id="login-dialog" aria-labelledby="login-title">
    <form id="login-form" method="dialog">
      <h2 id="login-title">Moderator login</h2>
      <label for="login-input">Moderator password</label>
      <input id="login-input" type="password" autocomplete="current-password" required>
      <p id="login-error" class="error" role="alert"></p>
      <div class="dialog-buttons"><button id="login-cancel" type="button" class="ghost">Cancel</button>
        <button type="submit">Log in</button></div>
    </form>
  </dialog>
  <template id="message-template">
    <li class="message"><div class="meta"><strong class="author"></strong><time class="time"></time>\
<span class="state"></span></div><div class="body"></div></li>
  </template>
  {{CLIENT_SCRIPT}}
  <script src="/chat.js"></script>
</body>
</html>
"""
PAGE_CSS = """
:root {
  --bg: #f4f6fb; --panel: #ffffff; --text: #1b1f2a; --muted: #5f6b7f; --border: #dde2ec;
  --accent: #3b6df0; --accent-text: #ffffff; --mine: #e5edff; --bot: #f0e9ff; --bot-edge: #8a63d2;
  --bot-muted: #46536a;
  --system: #5f6b7f; --error: #c62828; --ok: #1e8e3e; --warn: #b26a00;
  --radius: 12px; --shadow: 0 1px 2px rgb(0 0 0 / 0.06), 0 2px 8px rgb(0 0 0 / 0.04);
  --font: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0f1218; --panel: #181c24; --text: #e7eaf0; --muted: #98a2b3; --border: #2a303c;
    --accent: #6f94ff; --accent-text: #0b0e14; --mine: #1f2a44; --bot: #2a2146; --bot-edge: #9a7cf0;
    --bot-muted: #a9b4c6;
    --system: #98a2b3; --error: #ff6b6b; --ok: #4cc27a; --warn: #f0b44c;
    --shadow: 0 1px 2px rgb(0 0 0 / 0.4);
  }
}
* { box-sizing: border-box; }
html, body { height: 100%; }
body {
  margin: 0; display: flex; flex-direction: column; height: 100vh; height: 100dvh; background: var(--bg);
  color: var(--text); font: 15px/1.45 var(--font);
}
[hidden] { display: none !important; }
.topbar {
  display: flex; align-items: center; gap: 1rem; padding: .6rem 1rem; background: var(--panel);
  border-bottom: 1px solid var(--border); flex-wrap: wrap;
}
.brand { display: flex; align-items: center; gap: .5rem; }
.logo { width: 26px; height: 26px; border-radius: 7px; background: var(--accent) url("/favicon.svg") center/cover; }
h1 { font-size: 1.1rem; margin: 0; letter-spacing: .01em; }
.room { display: flex; align-items: center; gap: .25rem; margin-left: auto; }
.room label { color: var(--muted); font-size: .85rem; margin-right: .25rem; }
.room .hash { color: var(--muted); font-weight: 600; }
.room input { width: 9rem; }
.status { margin: 0; font-size: .85rem; padding: .2rem .6rem; border-radius: 999px; border: 1px solid var(--border); }
.status::before { content: ""; display: inline-block; width: .55rem; height: .55rem; border-radius: 50%;
  margin-right: .4rem; background: var(--muted); vertical-align: .05rem; }
.status[data-state="connected"]::before { background: var(--ok); }
.status[data-state="reconnecting"]::before { background: var(--warn); }
.status[data-state="offline"]::before, .status[data-state="error"]::before { background: var(--error); }
.banner { margin: 0; padding: .6rem 1rem; background: var(--error); color: #fff; }
.banner.info { background: var(--warn); color: #1b1f2a; }
.banner-action { color: #fff; border-color: #fff; margin-left: .5rem; padding: .15rem .6rem; }
.layout { flex: 1 1 auto; display: grid; grid-template-columns: 1fr 14rem; grid-template-areas: "chat people";
  min-height: 0; }
.chat-column { grid-area: chat; display: flex; flex-direction: column; min-height: 0; min-width: 0; }
.conversation { position: relative; overflow-y: auto; padding: 1rem; min-height: 0; flex: 1 1 auto;
  display: flex; flex-direction: column; }
/* Anchored at the bottom, next to the composer: a line arriving moves older lines up, never the
   person's own pending ones (or the retry button under their pointer) down. */
#log { margin-top: auto; }
.conversation:focus-visible { outline: 2px solid var(--accent); outline-offset: -2px; }
.messages { list-style: none; margin: 0 auto; padding: 0; max-width: 52rem; display: flex; flex-direction: column; gap: .5rem; }
.message { background: var(--panel); border: 1px solid var(--border); border-radius: var(--radius);
  padding: .5rem .8rem; box-shadow: var(--shadow); max-width: 85%; align-self: flex-start; }
.message.mine { background: var(--mine); align-self: flex-end; }
.message.bot { background: var(--bot); border-left: 4px solid var(--bot-edge); }
.message.bot .meta { color: var(--bot-muted); }
.message.private { border: 2px dashed var(--warn); }
.message.private .state { color: var(--text); font-weight: 600; }
.message.action .body { font-style: italic; }
button.member { all: unset; cursor: pointer; border-radius: 4px; }
button.member:hover, button.member:focus-visible { text-decoration: underline; outline: 2px solid var(--accent); }
.message .meta { display: flex; flex-wrap: wrap; gap: 0 .5rem; align-items: baseline; font-size: .8rem; color: var(--muted); }
.message .author { color: var(--text); font-size: .9rem; overflow-wrap: anywhere; min-width: 0; }
.message .time { white-space: nowrap; }
.message .state { min-width: 0; overflow-wrap: anywhere; }
.message .body { white-space: pre-wrap; overflow-wrap: anywhere; }
.message .body a { color: var(--accent); text-decoration: underline; }
.message.mine .body a, .message.bot .body a { color: inherit; }
.message .body code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .92em;
  background: rgb(127 127 127 / 0.16); border-radius: 4px; padding: 0 .25em; }
.message .body pre { margin: .3rem 0; padding: .5rem .6rem; overflow-x: auto; white-space: pre;
  background: rgb(127 127 127 / 0.16); border-radius: 6px; max-width: 100%; }
.message .body pre code { background: none; padding: 0; }
.message .state:not(:empty) { font-style: italic; }
.message.failed { border-color: var(--error); }
.message.failed .state { color: var(--error); }
.message .meta button { font: inherit; font-size: .8rem; padding: 0 .4rem; margin-left: .3rem; }
.message.failed .body { max-height: 6.5em; overflow: auto; }  /* never covers what arrives above it */
.message.failed .meta button { color: var(--text); border-color: var(--muted); }
.message.mentions-me { outline: 2px solid var(--warn); outline-offset: 1px; }
.divider { align-self: stretch; text-align: center; color: var(--error); font-size: .75rem; font-weight: 600;
  border-top: 1px solid var(--error); background: none; box-shadow: none; padding: .1rem 0 0; list-style: none; }
.jump { position: sticky; bottom: .5rem; margin: 0 auto; display: block; box-shadow: var(--shadow); }
.jump[hidden] { display: none; }
.system { align-self: center; color: var(--system); font-size: .82rem; background: none; border: 0; box-shadow: none; padding: .1rem; }
.empty { text-align: center; color: var(--muted); margin-top: 3rem; }
.people { grid-area: people; border-left: 1px solid var(--border); background: var(--panel); padding: 1rem;
  overflow-y: auto; }
.no-members { color: var(--muted); font-size: .85rem; margin: 0; }
.people h2 { font-size: .9rem; margin: 0 0 .5rem; color: var(--muted); text-transform: uppercase; letter-spacing: .05em; }
.count { background: var(--accent); color: var(--accent-text); border-radius: 999px; padding: 0 .45rem; font-size: .8rem; }
.people ul { list-style: none; margin: 0; padding: 0; }
.people li { padding: .2rem 0; overflow-wrap: anywhere; }
.people li::before { content: ""; display: inline-block; width: .5rem; height: .5rem; border-radius: 50%;
  background: var(--ok); margin-right: .5rem; }
.composer { background: var(--panel); border-top: 1px solid var(--border); padding: .5rem 1rem .8rem; }
.composer form { display: flex; gap: .6rem; align-items: flex-end; max-width: 52rem; margin: 0 auto; }
.field { display: flex; flex-direction: column; gap: .2rem; }
.field label { font-size: .8rem; color: var(--muted); font-weight: 600; }
.name-field { flex: 0 0 11rem; }
.body-field { flex: 1 1 auto; position: relative; }
input, textarea, button { font: inherit; color: inherit; }
input, textarea { background: var(--bg); border: 1px solid var(--border); border-radius: 8px; padding: .5rem .6rem; width: 100%; }
textarea { resize: none; max-height: 8rem; min-height: 2.5rem; }
input:focus-visible, textarea:focus-visible, button:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
button { background: var(--accent); color: var(--accent-text); border: 0; border-radius: 8px; padding: .55rem 1.1rem; font-weight: 600; cursor: pointer; }
button:hover { filter: brightness(1.08); }
button:disabled, input:disabled, textarea:disabled { opacity: .5; cursor: not-allowed; filter: none; }
button.ghost { background: transparent; color: var(--accent); border: 1px solid var(--border); padding: .35rem .7rem; }
.counter { position: absolute; right: .5rem; bottom: .35rem; font-size: .75rem; color: var(--muted);
  background: var(--panel); padding: 0 .25rem; border-radius: 4px; pointer-events: none; }
.counter.over { color: var(--error); font-weight: 600; }
.error { color: var(--error); margin: .3rem auto 0; min-height: 1.2em; font-size: .85rem; max-width: 52rem; }
.typing { color: var(--muted); font-size: .8rem; margin: 0 auto .3rem; min-height: 1.1em; max-width: 52rem; font-style: italic; }
dialog { border: 1px solid var(--border); border-radius: var(--radius); background: var(--panel); color: var(--text); padding: 1.5rem; }
dialog::backdrop { background: rgb(0 0 0 / .5); }
dialog form { display: flex; flex-direction: column; gap: .5rem; min-width: 16rem; }
dialog h2 { margin: 0 0 .5rem; font-size: 1.1rem; }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); white-space: nowrap; }
.search input { width: 9rem; padding: .35rem .6rem; }
.alerts { position: relative; }
.alerts summary { list-style: none; cursor: pointer; padding: .25rem .45rem; border: 1px solid var(--border);
  border-radius: 8px; }
.alerts summary::-webkit-details-marker { display: none; }
.bell { width: 1.1rem; height: 1.1rem; fill: var(--muted); vertical-align: -.2rem; }
.alerts[open] .bell, .alerts.on .bell { fill: var(--accent); }
.alerts-menu { position: absolute; right: 0; top: 2.2rem; z-index: 5; background: var(--panel); border: 1px solid var(--border);
  border-radius: var(--radius); box-shadow: var(--shadow); padding: .6rem .8rem; margin: 0; min-width: 16rem;
  display: flex; flex-direction: column; gap: .3rem; font-size: .9rem; }
.alerts-menu legend { font-weight: 600; font-size: .85rem; padding: 0; float: left; margin-bottom: .2rem; }
.alerts-menu input { width: auto; margin-right: .4rem; }
.note { color: var(--muted); font-size: .8rem; margin: 0; }
.note:empty { display: none; }
.search-results { background: var(--panel); border-bottom: 1px solid var(--border); max-height: 45%; overflow-y: auto;
  padding: .5rem 1rem; flex: none; }
.search-head { display: flex; align-items: center; justify-content: space-between; max-width: 52rem; margin: 0 auto; }
.search-results h2 { font-size: .9rem; margin: 0; color: var(--muted); }
.search-results ol { list-style: none; margin: .3rem auto 0; padding: 0; max-width: 52rem; }
.search-results li button { all: unset; display: block; width: 100%; cursor: pointer; padding: .3rem .4rem;
  border-radius: 6px; overflow-wrap: anywhere; }
.search-results li button:hover, .search-results li button:focus-visible { background: var(--bg);
  outline: 2px solid var(--accent); }
.search-results .hit-meta { color: var(--muted); font-size: .8rem; margin-right: .5rem; }
.message.found { outline: 3px solid var(--accent); outline-offset: 1px; }
.message.deleted .body { color: var(--muted); font-style: italic; }
.badge { font-size: .7rem; font-weight: 700; text-transform: uppercase; letter-spacing: .04em; color: var(--accent-text);
  background: var(--ok); border-radius: 4px; padding: 0 .3rem; margin-left: .35rem; vertical-align: .1rem; }
@media (prefers-color-scheme: light) { .badge { background: #17692f; color: #fff; } }
.message .meta button.delete { color: var(--muted); border-color: transparent; opacity: .75; }
.message .meta button.delete:hover, .message .meta button.delete:focus-visible { opacity: 1; color: var(--error); }
.suggest { display: flex; gap: .4rem; flex-wrap: wrap; max-width: 52rem; margin: 0 auto .3rem; }
.suggest button { padding: .2rem .6rem; font-weight: 500; }
.suggest button[aria-selected="true"] { outline: 2px solid var(--text); }
.older { align-self: center; color: var(--muted); font-size: .8rem; list-style: none; }
.dialog-buttons { display: flex; gap: .5rem; justify-content: flex-end; }
.new-private { margin-top: .8rem; font-size: .85rem; display: inline-flex; align-items: center; gap: .35rem; }
.new-private .lock { width: 1em; height: 1em; fill: currentColor; flex: none; }
.invite { background: var(--panel); border-bottom: 1px solid var(--border); padding: .5rem 1rem; flex: none; }
.invite h2 { font-size: .9rem; margin: 0 auto; max-width: 52rem; }
.invite .note, .invite .remember, .invite-row { max-width: 52rem; margin: .2rem auto; display: block; }
.invite-row { display: flex; gap: .4rem; }
.invite-row input { flex: 1 1 auto; font-size: .85rem; }
.remember input { width: auto; margin-right: .4rem; }
.message.undecryptable .body { color: var(--muted); font-style: italic; }
@media (max-width: 700px) {
  .search { order: 5; flex: 1 1 60%; }  /* a second row: search and the bell */
  .search input { width: 100%; }
  .alerts { order: 6; }
  .alerts-menu { position: fixed; left: .5rem; right: .5rem; top: 5.5rem; min-width: 0; }
  .layout { grid-template-columns: 1fr; grid-template-rows: auto 1fr; grid-template-areas: "people" "chat"; }
  .people { border-left: 0; border-bottom: 1px solid var(--border); padding: .35rem .75rem; display: flex;
    align-items: center; gap: .6rem; overflow-x: auto; white-space: nowrap; }
  .people h2 { margin: 0; font-size: .75rem; flex: none; }
  .people ul { display: flex; gap: .8rem; }
  .people li { overflow-wrap: normal; font-size: .9rem; }
  .no-members { font-size: .8rem; white-space: normal; }
  #watching { white-space: nowrap; flex: none; }
  /* a lock alone (its name stays for screen readers), in sight at the strip's end; the names scroll under it */
  .people .new-private { margin-top: 0; flex: none; padding: .35rem .55rem; margin-left: auto; position: sticky;
    right: 0; z-index: 1; background: var(--panel); box-shadow: -.75rem 0 .5rem var(--panel), .8rem 0 0 var(--panel); }
  .topbar { gap: .5rem; flex-wrap: wrap; row-gap: .4rem; padding: .5rem .75rem; }
  .brand h1, .room label, .new-private-label {  /* shown to screen readers only, as .sr-only */
    position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
  .room { margin-left: auto; }
  .room input { width: 5.5rem; padding: .35rem .5rem; }
  .status { font-size: .75rem; padding: .15rem .5rem; white-space: nowrap; }
  .composer form { flex-wrap: wrap; }
  .name-field { flex: 1 1 100%; }
  .message { max-width: 92%; }
}
"""
PAGE_JS = r"""
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    status: $('status'), banner: $('banner'), log: $('log'), messages: $('messages'), empty: $('empty'),
    conversation: document.querySelector('.conversation'), members: $('members'), jump: $('jump'),
    memberCount: $('member-count'), noMembers: $('no-members'), typing: $('typing'), form: $('message-form'),
    user: $('messageUser'), body: $('messageBody'), error: $('errorMessage'), counter: $('counter'),
    roomForm: $('room-form'), roomInput: $('room-input'), template: $('message-template'),
    dialog: $('password-dialog'), passwordForm: $('password-form'),
    passwordInput: $('password-input'), passwordError: $('password-error'),
    watching: $('watching'), suggest: $('suggest'),
    searchForm: $('search-form'), searchInput: $('search-input'), searchResults: $('search-results'),
    searchTitle: $('search-title'), searchList: $('search-list'), searchClose: $('search-close'),
    alerts: $('alerts'), sound: $('sound'), alertsNote: $('alerts-note'),
    loginDialog: $('login-dialog'), loginForm: $('login-form'), loginInput: $('login-input'),
    loginError: $('login-error'), loginCancel: $('login-cancel'),
    newPrivate: $('new-private'), invite: $('invite'), inviteLink: $('invite-link'), copyInvite: $('copy-invite'),
    rememberKey: $('remember-key'), hideInvite: $('hide-invite'),
  };

  // A line across the page; `action` is an optional [label, handler] for a button in it.
  const showBanner = (text, kind = 'error', action = null) => {
    els.banner.textContent = text;
    els.banner.className = 'banner' + (kind === 'info' ? ' info' : '');
    els.banner.hidden = !text;
    if (action) {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'ghost banner-action';
      button.textContent = action[0];
      button.addEventListener('click', () => { showBanner(''); action[1](); });
      els.banner.append(' ', button);
    }
  };

  if (typeof window.io !== 'function') {
    showBanner('The chat could not load its Socket.IO client library, so it cannot connect. ' +
      'Check your internet connection and reload, or start chat.py with --client-js PATH to serve it locally.');
    els.status.textContent = 'offline';
    els.status.dataset.state = 'error';
    for (const control of document.querySelectorAll('input, textarea, button')) control.disabled = true;
    return;
  }

  const ROOM_RE = /^[a-z0-9_-]{1,32}$/;
  const MAX_LENGTH = Number(document.querySelector('meta[name="chat-max-length"]')?.content) || 2000;
  // Characters as the server counts them (code points, after trimming; \r\n is one).
  const bodyLength = (text) => [...text.replace(/\r\n?/g, '\n').trim()].length;
  const SEND_TIMEOUT_MS = 8000;
  // How long the server asked us to wait (retry_after_ms), kept sensible: 50 ms to `longest`.
  const serverWait = (ack, longest) => Math.min(Math.max(Number(ack.retry_after_ms) || 1000, 50), longest);
  const MAX_TRIES = 4;
  const store = {
    get(key) { try { return localStorage.getItem(key); } catch { return null; } },
    set(key, value) { try { localStorage.setItem(key, value); } catch { /* private mode */ } },
  };
  const tabStore = {
    get(key) { try { return sessionStorage.getItem(key); } catch { return null; } },
    set(key, value) { try { sessionStorage.setItem(key, value); } catch { /* private mode */ } },
  };

  // This browser, for the server's name holds: a random key made once and kept (never a secret
  // the person chose; another browser cannot take a name this one is using).
  const browserKey = () => {
    let key = store.get('chat.browser');
    if (!key || !/^[A-Za-z0-9_-]{16,64}$/.test(key)) {
      const bytes = crypto.getRandomValues(new Uint8Array(18));
      key = btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_');
      store.set('chat.browser', key);
    }
    return key;
  };
  const roomInUrl = () => (new URLSearchParams(location.search).get('room') || 'lobby').trim().toLowerCase();
  // ---- the page's state: everything that changes, in one place

  const state = {
    room: roomInUrl(),            // the room this page shows
    joined: false,                // the server has acked our join of state.room
    joinedAs: null,               // the name the server accepted for this page in that room
    joiningAs: null,              // the name asked for in the join awaiting its ack
    epoch: null,                  // the server's id sequence (changes when it restarts without --db)
    lastSeen: new Map(),          // room -> highest message id rendered
    rendered: new Map(),          // message id -> <li>
    pending: new Map(),           // cid -> outbox entry, until the server has it
    outbox: [],                   // entries in typing order: {cid, user, body, room, tries, li, failed, attempt}
    inFlight: null,               // the entry whose ack this room's next message waits for
    waitTimer: 0,                 // set while the server asked us to wait (rate limit)
    memberNames: [],              // who the page lists as online
    listedBeforeDrop: null,       // {room, names, until}: who was online when the connection dropped
    typingUsers: [],              // who the page shows as typing
    typingSentAt: 0,              // when we last told the server we are typing
    transportFailures: 0,         // connection attempts failed in a row (2: ask the server why)
    replaying: false,             // rendering a join's history (not news)
    unread: 0,                    // messages from others that arrived while the page was hidden
    unreadForMe: false,           // ... one of them mentioning this person
    moderator: false,             // this connection is a moderator (/login)
    removed: false,               // a moderator removed this page: it does not reconnect
    olderDone: false,             // the room has nothing older than what is shown
    loadingOlder: false,          // a `history` page is on its way
    moderatorNames: [],           // who in the room is a moderator (a badge in the list)
    completion: null,             // @name completion: {start, matches, index}
    announcedPrivate: new Set(),  // private rooms whose "encrypted" line this page has shown
  };
  if (ROOM_RE.test(state.room) && new URLSearchParams(location.search).get('room') !== state.room && location.search) {
    history.replaceState(null, '', `?room=${encodeURIComponent(state.room)}${location.hash}`);  // /?room=Team is #team
  }

  els.user.value = store.get('chat.name') || '';
  els.roomInput.value = state.room;
  // (the key from the link, or remembered on this device, is taken at the end, once everything is defined)
  document.title = `#${state.room} · chat.py`;

  // WebSocket first (one round trip, no upgrade dance), falling back to long-polling.
  const transports = (document.querySelector('meta[name="chat-transports"]')?.content || 'websocket,polling')
    .split(',');
  const socket = io({
    transports,
    tryAllTransports: true,
    auth: (cb) => cb({ password: tabStore.get('chat.password') || undefined, browser: browserKey() }),
  });

  // ---- rendering

  const atBottom = () => {
    const c = els.conversation;
    return c.scrollHeight - c.scrollTop - c.clientHeight < 40;
  };
  const scrollToEnd = () => { els.conversation.scrollTop = els.conversation.scrollHeight; };
  const timeText = (ts) => new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });

  // ---- rich text: the stored body stays the text typed; the page shows links, code and emphasis,
  // built from elements and textContent only (never markup), so nothing typed can become script.

  const element = (tag, text, attributes = {}) => {
    const node = document.createElement(tag);
    node.textContent = text;
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  };
  const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/g;
  const linkOrText = (url) => {
    const trimmed = url.replace(/[.,;:!?)\]}'"]+$/, '');  // "see https://x.org/a." ends before the dot
    try {
      const parsed = new URL(trimmed);
      if (parsed.protocol === 'http:' || parsed.protocol === 'https:') {
        return [element('a', trimmed, { href: parsed.href, rel: 'noopener noreferrer nofollow', target: '_blank' }),
          url.slice(trimmed.length)];
      }
    } catch { /* not a URL after all */ }
    return [url];
  };
  const EMPHASIS_RE = /(^|[\s(])([*_])([^*_\s](?:[^*_\n]*[^*_\s])?)\2(?=$|[\s).,!?;:])/g;
  const inlineText = (text, into) => {  // links, then *bold* and _italic_ in what is left
    let last = 0;
    for (const match of text.matchAll(URL_RE)) {
      emphasis(text.slice(last, match.index), into);
      for (const part of linkOrText(match[0])) into.append(part);
      last = match.index + match[0].length;
    }
    emphasis(text.slice(last), into);
  };
  const emphasis = (text, into) => {
    let last = 0;
    for (const match of text.matchAll(EMPHASIS_RE)) {
      into.append(text.slice(last, match.index) + match[1]);
      into.append(element(match[2] === '*' ? 'strong' : 'em', match[3]));
      last = match.index + match[0].length;
    }
    into.append(text.slice(last));
  };
  const richText = (body) => {
    const out = document.createDocumentFragment();
    const blocks = body.split(/```/);  // odd parts are fenced code (an unclosed fence stays text)
    blocks.forEach((part, index) => {
      const fenced = index % 2 === 1 && index < blocks.length - 1;
      if (fenced) {
        const code = part.replace(/^[^\n]*\n/, (first) => (/^\w*\n$/.test(first) ? '' : first));  // ```lang
        const pre = element('pre', '');
        pre.append(element('code', code.replace(/\n$/, '')));
        out.append(pre);
        return;
      }
      const text = index % 2 === 1 ? '```' + part : part;
      text.split(/(`[^`\n]+`)/).forEach((piece) => {
        if (/^`[^`\n]+`$/.test(piece)) out.append(element('code', piece.slice(1, -1)));
        else inlineText(piece, out);
      });
    });
    return out;
  };

  const makeItem = (user, body, ts, classes) => {
    const li = els.template.content.firstElementChild.cloneNode(true);
    li.classList.add(...classes);
    li.querySelector('.author').textContent = user;
    const time = li.querySelector('.time');
    time.textContent = timeText(ts);
    time.dateTime = new Date(ts).toISOString();
    showBody(li, user, body);
    return li;
  };
  const showBody = (li, user, body) => {
    li.classList.toggle('action', body.startsWith('/me '));
    if (body.startsWith('/me ')) li.querySelector('.body').textContent = `* ${user} ${body.slice(4)}`;  // "* Alice waves"
    else li.querySelector('.body').replaceChildren(richText(body));
  };

  const insertInOrder = (li, id) => {
    li.dataset.id = String(id);
    let next = null;
    for (const other of els.messages.querySelectorAll('li[data-id]')) {
      if (Number(other.dataset.id) > id) { next = other; break; }
    }
    const stick = atBottom();
    els.messages.insertBefore(li, next ? next : firstPending());
    els.empty.hidden = true;
    if (stick) scrollToEnd();
  };
  const firstPending = () => els.messages.querySelector('li.pending');

  // ---- deleting: anyone their own messages, a moderator any; gone from every page, kept as a line

  const mayDelete = (li) => li.dataset.kind === 'user' && (state.moderator ||
    (Boolean(state.joinedAs) && nameKey(li.dataset.user || '') === nameKey(state.joinedAs)));
  const offerDelete = (li) => {
    li.querySelector('.meta button.delete')?.remove();
    if (!li.dataset.id || li.classList.contains('deleted') || !mayDelete(li)) return;
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'delete ghost';
    button.textContent = 'delete';
    button.setAttribute('aria-label', `Delete message ${li.dataset.id}`);
    button.addEventListener('click', () => moderate({ action: 'delete', id: Number(li.dataset.id) }));
    li.querySelector('.meta').append(button);
  };
  const offerDeletes = () => { for (const li of els.messages.querySelectorAll('li[data-id]')) offerDelete(li); };
  const markDeleted = (id) => {
    const li = state.rendered.get(id);
    if (!li || li.classList.contains('deleted')) return;
    li.classList.add('deleted');
    li.classList.remove('mentions-me');
    li.querySelector('.body').textContent = 'message deleted';
    li.querySelector('.meta button.delete')?.remove();
  };
  const removeUpTo = (upto) => {
    for (const [id, li] of state.rendered) {
      if (id <= upto) { li.remove(); state.rendered.delete(id); }
    }
    els.empty.hidden = els.messages.childElementCount > 0;
  };

  const renderMessage = (msg) => {
    if (!msg || typeof msg.id !== 'number' || (msg.room && msg.room !== state.room)) return;
    state.lastSeen.set(state.room, Math.max(state.lastSeen.get(state.room) || 0, msg.id));
    if (state.rendered.has(msg.id)) return;
    const local = msg.cid && state.pending.get(msg.cid);
    const isBot = msg.kind === 'bot';
    const mine = !isBot && Boolean(local || (msg.cid && myCids.has(msg.cid)));
    const classes = [isBot ? 'bot' : 'user'];
    if (mine) classes.push('mine');
    const sealed = !isBot && isEnvelope(String(msg.body));
    const forMe = !mine && !sealed && mentionsMe(String(msg.body));
    if (forMe) classes.push('mentions-me');
    const li = makeItem(String(msg.user), sealed ? '' : String(msg.body), msg.ts, classes);
    li.dataset.user = String(msg.user);
    li.dataset.kind = isBot ? 'bot' : 'user';
    if (local) {
      local.li.remove();
      settle(local);
    }
    state.rendered.set(msg.id, li);
    const wasAtBottom = atBottom();
    insertInOrder(li, msg.id);
    offerDelete(li);
    const notice = !mine && !state.replaying;
    if (sealed) openSealed(li, msg, mine, notice, wasAtBottom);
    else if (notice) noticeArrival(li, forMe, wasAtBottom, `${msg.user} in #${state.room}`, String(msg.body));
  };

  // ---- private rooms: end-to-end encrypted here, in the page (WebCrypto AES-GCM, 256-bit keys).
  // The key is in the invite link's #k= fragment, which browsers never send to the server; it is
  // kept in this page's memory, and in localStorage only when the person asks.

  const ENVELOPE = 'e2e:v1:';
  const isEnvelope = (body) => body.startsWith('e2e:');
  const canEncrypt = Boolean(window.crypto && crypto.subtle);  // only in a secure context (https, localhost)
  const toBase64 = (bytes) => { let text = ''; for (const b of bytes) text += String.fromCharCode(b); return btoa(text); };
  const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const toBase64Url = (bytes) => toBase64(bytes).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  const fromBase64Url = (text) => fromBase64(text.replace(/-/g, '+').replace(/_/g, '/') + '==='.slice((text.length + 3) % 4));
  const keyInUrl = () => /(?:^#|&)k=([A-Za-z0-9_-]{43})(?:&|$)/.exec(location.hash)?.[1] || null;
  const roomKeys = new Map();  // room -> {raw, key: Promise<CryptoKey>}
  const useKey = (room, raw) => {
    if (!canEncrypt || !raw || roomKeys.get(room)?.raw === raw) return;
    roomKeys.set(room, { raw, key: crypto.subtle.importKey('raw', fromBase64Url(raw), 'AES-GCM', false, ['encrypt', 'decrypt']) });
  };
  const isPrivateHere = (room) => roomKeys.has(room);
  // The name as the server stores it (display_name): the key's additional data must match it exactly.
  const displayName = (name) => name.normalize('NFKC').replace(INVISIBLE, '').split(/\s+/).filter(Boolean).join(' ');
  // Bound into each message: it cannot be replayed into another room or under another name.
  const boundTo = (room, user) => new TextEncoder().encode(`chat.py e2e v1\n${room}\n${displayName(user)}`);
  const seal = async (room, user, text) => {
    const iv = crypto.getRandomValues(new Uint8Array(12));
    const sealed = await crypto.subtle.encrypt({ name: 'AES-GCM', iv, additionalData: boundTo(room, user) },
      await roomKeys.get(room).key, new TextEncoder().encode(text));
    const out = new Uint8Array(12 + sealed.byteLength);
    out.set(iv);
    out.set(new Uint8Array(sealed), 12);
    return ENVELOPE + toBase64(out);
  };
  const unseal = async (room, user, body) => {
    if (!body.startsWith(ENVELOPE)) throw new Error('an unknown version');
    const bytes = fromBase64(body.slice(ENVELOPE.length));
    const plain = await crypto.subtle.decrypt({ name: 'AES-GCM', iv: bytes.slice(0, 12), additionalData: boundTo(room, user) },
      await roomKeys.get(room).key, bytes.slice(12));
    return new TextDecoder().decode(plain);
  };
  const openSealed = async (li, msg, mine, notice, wasAtBottom) => {
    const room = state.room;
    const body = li.querySelector('.body');
    li.classList.add('sealed');
    if (!isPrivateHere(room)) {
      body.textContent = 'encrypted: open this room with its invite link to read it';
      li.classList.add('undecryptable');
      return;
    }
    body.textContent = 'decrypting…';
    let text;
    try {
      text = await unseal(room, String(msg.user), String(msg.body));
    } catch {
      if (!li.classList.contains('deleted')) body.textContent = 'cannot decrypt: wrong key for this room?';
      li.classList.add('undecryptable');
      return;
    }
    if (li.classList.contains('deleted')) return;
    li.dataset.plain = text;
    showBody(li, String(msg.user), text);
    const forMe = !mine && mentionsMe(text);
    li.classList.toggle('mentions-me', forMe);
    if (notice) noticeArrival(li, forMe, wasAtBottom, `${msg.user} in #${room}`, text);
  };
  // An outbox entry in a private room is sealed once, just before it is first sent.
  const sealEntry = async (entry) => {
    entry.sealing = true;
    try {
      entry.wire = await seal(entry.room, entry.user, entry.body);
    } catch {
      fail(entry, 'could not encrypt it');
    }
    entry.sealing = false;
    pump();
  };
  const newPrivateRoom = () => {
    const name = `p-${toBase64Url(crypto.getRandomValues(new Uint8Array(9))).toLowerCase().replace(/[^a-z0-9]/g, '')}`.slice(0, 14);
    useKey(name, toBase64Url(crypto.getRandomValues(new Uint8Array(32))));
    switchRoom(name);
  };
  const inviteLink = (room) => `${location.origin}${location.pathname}?room=${encodeURIComponent(room)}#k=${roomKeys.get(room).raw}`;
  const showInvite = () => {
    const room = state.room;
    els.invite.hidden = !isPrivateHere(room);
    if (els.invite.hidden) return;
    els.inviteLink.value = inviteLink(room);
    els.rememberKey.checked = store.get(`chat.key.${room}`) === roomKeys.get(room).raw;
  };

  // ---- attention: what arrived while the person was not looking

  // Whether a message calls this person by name: "@Name" (compared by the name key).
  const mentionsMe = (body) => {
    const me = state.joinedAs || els.user.value.trim();
    if (!me) return false;
    const key = nameKey(me);
    return [...body.matchAll(/(?:^|\s)@([^\s@,.:;!?]+(?:\s[^\s@,.:;!?]+)?)/g)]
      .some(([, word]) => nameKey(word) === key || nameKey(word.split(/\s/)[0]) === key);
  };

  const showTitle = () => {
    const count = state.unread ? `(${state.unread}${state.unreadForMe ? ' @' : ''}) ` : '';
    document.title = `${count}#${state.room} · chat.py`;
  };

  // A message from someone else: counted in the title while the page is hidden, the first one
  // marked by a "new messages" line, and a "new messages below" button when scrolled up.
  const noticeArrival = (li, forMe, wasAtBottom, title, body) => {
    alertIfAway(forMe, title, body);
    if (document.hidden) {
      if (!state.unread) {
        els.messages.querySelector('li.divider')?.remove();
        const divider = document.createElement('li');
        divider.className = 'divider';
        divider.textContent = 'new messages';
        els.messages.insertBefore(divider, li);
      }
      state.unread += 1;
      state.unreadForMe = state.unreadForMe || forMe;
      showTitle();
    }
    if (!wasAtBottom) els.jump.hidden = false;
  };
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) return;
    state.unread = 0;
    state.unreadForMe = false;
    showTitle();
  });

  const renderSystem = (text) => {
    const li = document.createElement('li');
    li.className = 'system';
    li.textContent = text;
    const stick = atBottom();
    els.messages.insertBefore(li, firstPending());
    if (stick) scrollToEnd();
  };

  const renderMembers = (roster) => {
    const members = roster.members || [];
    state.memberNames = members;
    state.moderatorNames = roster.moderators || [];
    els.members.replaceChildren(...members.map((name) => {
      const li = document.createElement('li');
      const button = document.createElement('button');  // a private message to this person
      button.type = 'button';
      button.className = 'member';
      button.textContent = name;
      button.title = `Message ${name} privately`;
      button.addEventListener('click', () => {
        els.body.value = msgCommand(name);
        els.body.focus();
        autosize();
      });
      li.append(button);
      if (state.moderatorNames.includes(name)) li.append(element('span', 'mod', { class: 'badge', title: 'moderator' }));
      return li;
    }));
    els.memberCount.textContent = String(members.length);
    const watching = Number(roster.watching) || 0;
    els.noMembers.hidden = members.length > 0;
    els.watching.hidden = watching === 0;
    els.watching.textContent = `${watching} watching`;  // pages open without a name, this one too
  };

  // "X joined" is news only about someone else the page did not already list: never about this
  // page's own arrival, whose notice comes just before the join's ack (a line appearing then would
  // move the list under a pointer that is clicking "retry"); nor, for a minute after a dropped
  // connection, about those who were online before it (a restarted server sees everyone come back).
  const isMe = (user) => [state.joinedAs, state.joiningAs].some((mine) => mine && nameKey(mine) === nameKey(user));
  const wasListedBeforeDrop = (user) => {
    const before = state.listedBeforeDrop;
    return Boolean(before && before.room === state.room && Date.now() < before.until && before.names.includes(user));
  };
  const renderNotice = (msg) => {
    if (!msg || msg.room !== state.room) return;
    const user = String(msg.user);
    if (msg.kind === 'joined' && (state.memberNames.includes(user) || isMe(user) || wasListedBeforeDrop(user))) return;
    renderSystem(String(msg.text));
  };

  const renderTyping = () => {
    const me = els.user.value.trim();
    const others = state.typingUsers.filter((u) => u !== me);
    let text = '';
    if (others.length === 1) text = `${others[0]} is typing…`;
    else if (others.length === 2) text = `${others[0]} and ${others[1]} are typing…`;
    else if (others.length > 2) text = `${others.length} people are typing…`;
    els.typing.textContent = text;
  };

  const setStatus = (kind, text) => {
    els.status.dataset.state = kind;
    els.status.textContent = text;
  };

  const showError = (text) => { els.error.textContent = text || ''; };

  // "Mine" means sent from this browser: the client ids it used, kept across reloads.
  const myCids = new Set((() => {
    try {
      const saved = JSON.parse(store.get('chat.cids') || '[]');
      return Array.isArray(saved) ? saved : [];
    } catch { return []; }
  })());
  const rememberCid = (cid) => {
    myCids.add(cid);
    store.set('chat.cids', JSON.stringify([...myCids].slice(-300)));
  };
  const newCid = () => (crypto.randomUUID ? crypto.randomUUID() :
    `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);

  // ---- sending: one ordered outbox; acks, rate-limit waits, retries, resends after reconnect
  //
  // Messages leave in the order they were typed, one at a time, each in the room it was typed in.
  // Every entry ends as sent or as failed with the reason and a retry button; nothing is dropped.


  const settle = (entry) => {
    const index = state.outbox.indexOf(entry);
    if (index >= 0) state.outbox.splice(index, 1);
    state.pending.delete(entry.cid);
  };

  const markPending = (entry, text) => {
    entry.li.querySelector('.state').textContent = text;
    entry.li.classList.toggle('failed', entry.failed);
    for (const old of entry.li.querySelectorAll('.meta button')) old.remove();
    if (entry.failed) {  // what to do with it: send again, take the text back to change it, or drop it
      for (const [label, action] of [['retry', retryEntry], ['edit', editEntry], ['dismiss', dismissEntry]]) {
        const button = document.createElement('button');
        button.type = 'button';
        button.className = `${label} ghost`;
        button.textContent = label;
        button.addEventListener('click', () => action(entry));
        entry.li.querySelector('.meta').append(button);
      }
    }
  };

  const dismissEntry = (entry) => {
    settle(entry);
    entry.li.remove();
    els.empty.hidden = els.messages.childElementCount > 0;
  };

  const editEntry = (entry) => {  // back into the composer, unless something is being typed there
    if (els.body.value.trim()) {
      showError('Send or clear what you are typing first, then edit the failed message.');
      return;
    }
    dismissEntry(entry);
    els.body.value = entry.body;
    autosize();
    showCount();
    els.body.focus();
  };

  const fail = (entry, reason) => {
    entry.failed = true;
    markPending(entry, `failed: ${reason}`);
    if (!entry.li.isConnected) {  // typed in a room the page has left: show it here, with its retry
      els.messages.append(entry.li);
      els.empty.hidden = true;
    }
  };

  const retryEntry = (entry) => {
    const user = checkName(els.user.value.trim());
    if (!user) return;
    Object.assign(entry, { user, room: state.room, tries: 0, failed: false, wire: null });  // sealed anew
    entry.li.querySelector('.author').textContent = user;
    markPending(entry, 'sending…');
    pump();
  };

  const delivered = (entry, ack) => {
    settle(entry);
    state.lastSeen.set(entry.room, Math.max(state.lastSeen.get(entry.room) || 0, ack.id));
    if (entry.room !== state.room || state.rendered.has(ack.id)) { entry.li.remove(); return; }
    markPending(entry, '');
    entry.li.classList.remove('pending');
    entry.li.classList.add('sent');
    Object.assign(entry.li.dataset, { user: entry.user, kind: 'user' });
    state.rendered.set(ack.id, entry.li);
    insertInOrder(entry.li, ack.id);
    offerDelete(entry.li);
  };

  const pump = () => {
    if (state.inFlight || state.waitTimer || !socket.connected || !state.joined) return;
    const entry = state.outbox.find((e) => !e.failed && e.room === state.room);
    if (!entry || entry.sealing) return;
    if (isPrivateHere(entry.room) && !entry.wire) { sealEntry(entry); return; }
    if (entry.tries >= MAX_TRIES) {
      fail(entry, 'no answer from the server');
      pump();
      return;
    }
    entry.tries += 1;
    const attempt = {};
    entry.attempt = attempt;
    state.inFlight = entry;
    markPending(entry, 'sending…');
    socket.timeout(SEND_TIMEOUT_MS).emit('newmessage',
      { user: entry.user, body: entry.wire || entry.body, cid: entry.cid, room: entry.room }, (err, ack) => {
        if (entry.attempt !== attempt) return;  // superseded by a reconnect
        if (state.inFlight === entry) state.inFlight = null;
        if (err) {  // no answer in time: send again (same cid, shown once), but only into its own room
          if (entry.room !== state.room) fail(entry, `no answer before you left #${entry.room}`);
          pump();
          return;
        }
        if (ack && ack.ok) {
          if (entry.room === state.room && state.joinedAs !== entry.user) {
            state.joinedAs = entry.user;  // the server now holds this name for this page
            offerDeletes();
          }
          delivered(entry, ack);
        } else if (ack && (ack.code === 'rate_limited' || ack.code === 'slow_mode')) {
          entry.tries -= 1;  // waiting is not failing
          markPending(entry, ack.code === 'slow_mode' ? 'slow mode: waiting…' : 'waiting…');
          const wait = serverWait(ack, 3600000);
          state.waitTimer = setTimeout(() => { state.waitTimer = 0; pump(); }, wait);
          return;
        } else if (ack && ack.code === 'not_in_room') {
          if (entry.room !== state.room) fail(entry, `not sent: you left #${entry.room}`);
          else markPending(entry, 'queued');  // the server lost our membership: sent after the next join
        } else {
          fail(entry, (ack && ack.error) || 'the server refused it');
        }
        pump();
      });
  };

  // The server's name key (name_key in chat.py): its look-alike table and invisible characters, put
  // here by the server, so the page refuses exactly what the server refuses.
  const FOLDING = /*NAME_FOLDING*/{ map: {}, invisible: '[]' };
  const INVISIBLE = new RegExp(`${FOLDING.invisible}|\\p{Cf}`, 'gu');
  const nameKey = (name) => [...name.normalize('NFKC').replace(INVISIBLE, '').toLowerCase()]
    .map((ch) => FOLDING.map[ch] ?? ch).join('').replace(/[\s\x1c-\x1f\x85]+/gu, '');  // Python's isspace()
  const BOT_KEY = nameKey(document.querySelector('meta[name="chat-bot-name"]')?.content || '');

  // The name as the server will accept it, or null after telling the person what is wrong.
  const checkName = (user) => {
    let problem = '';
    if (!user) problem = 'Please enter your name.';
    else if ([...user].length > 32) problem = 'Your name is too long (at most 32 characters).';
    else if (BOT_KEY && nameKey(user) === BOT_KEY) problem = 'That name is reserved for the bot; please pick another.';
    if (problem) {
      showError(problem);
      els.user.focus();
      return null;
    }
    return user;
  };

  // ---- slash commands: parsed here; the server checks what they send like anything else

  const COMMANDS = {
    '/help': 'this list',
    '/me ACTION': 'say what you are doing: "/me waves" shows "* Alice waves"',
    '/msg NAME TEXT': 'a private message: only NAME and you see it',
    '/nick NAME': 'change your name',
    '/search WORDS': 'find messages in this room',
    '/login': 'become a moderator (asks for the moderator password)',
  };
  const MODERATOR_COMMANDS = {
    '/kick NAME [REASON]': 'remove someone', '/ban NAME [MINUTES]': 'remove and keep out (no minutes: until /unban)',
    '/unban NAME': 'lift a ban', '/mute NAME [MINUTES]': 'stop their messages', '/unmute NAME': 'let them speak again',
    '/delete ID': 'delete a message (or its delete button)', '/clear': "remove the room's history",
    '/lock': 'only moderators may post', '/unlock': 'everyone may post again', '/slow SECONDS': 'one message per person per interval (0: off)',
  };
  const commandList = () => Object.entries({ ...COMMANDS, ...(state.moderator ? MODERATOR_COMMANDS : {}) })
    .map(([c, what]) => `${c}: ${what}`).join(' · ') + ' · Start with // to send a message that begins with a slash.';

  // `moderate` and `login`: the server checks everything again and answers with a code.
  const moderate = (command) => {
    socket.timeout(SEND_TIMEOUT_MS).emit('moderate', command, (err, ack) => {
      if (err) showError('The server did not answer; try again.');
      else if (!ack || !ack.ok) showError((ack && ack.error) || 'Refused.');
    });
  };
  const login = (password, quietly = false) => {
    socket.timeout(SEND_TIMEOUT_MS).emit('login', { password }, (err, ack) => {
      if (!err && ack && ack.ok) {
        state.moderator = true;
        tabStore.set('chat.moderator', password);  // this tab logs in again after a reconnect
        if (els.loginDialog.open) els.loginDialog.close();
        if (!quietly) renderSystem('You are a moderator now. /help lists the moderator commands.');
        offerDeletes();
        return;
      }
      if (quietly) { tabStore.set('chat.moderator', ''); return; }
      els.loginError.textContent = err ? 'The server did not answer; try again.' : (ack && ack.error) || 'Refused.';
      if (!els.loginDialog.open) els.loginDialog.showModal();
      els.loginInput.focus();
    });
  };
  // Whole minutes or seconds after a command's name, or undefined; NaN when something else is there.
  const wholeNumber = (text) => (text === '' ? undefined : /^\d+$/.test(text) ? Number(text) : NaN);

  // "/msg NAME " (the name quoted when it has a space), ready for the text.
  const msgCommand = (name, text = '') => `/msg ${name.includes(' ') ? `"${name}"` : name} ${text}`;

  // A person's name as typed after a command: a "quoted name" (names may have spaces) or one word.
  const splitName = (text) => {
    const quoted = /^"([^"]+)"\s*([\s\S]*)$/.exec(text);
    if (quoted) return [quoted[1], quoted[2]];
    const [name, ...rest] = text.split(/\s+/);
    return [name, rest.join(' ')];
  };

  const renderPrivate = (msg) => {
    if (!msg || typeof msg.from !== 'string' || typeof msg.to !== 'string') return;
    const fromMe = isMe(msg.from) || nameKey(msg.from) === nameKey(els.user.value.trim());
    const li = makeItem(String(msg.from), String(msg.body), Number(msg.ts) || Date.now(),
      ['user', 'private', ...(fromMe ? ['mine'] : []), ...(msg.kind === 'bot' ? ['bot'] : [])]);
    li.querySelector('.state').textContent = fromMe ? `private, to ${msg.to}` : 'private, to you';
    const stick = atBottom();
    els.messages.insertBefore(li, firstPending());
    els.empty.hidden = true;
    if (stick || fromMe) scrollToEnd();
    if (!fromMe) noticeArrival(li, true, stick, `${msg.from} (private)`, String(msg.body));
  };

  const sendPrivate = (user, to, text) => {
    socket.timeout(SEND_TIMEOUT_MS).emit('private', { to, body: text }, (err, ack) => {
      if (err || !ack || !ack.ok) {
        showError(err ? 'The private message got no answer; try again.' : (ack && ack.error) || 'Not sent.');
        if (!els.body.value) els.body.value = msgCommand(to, text);
      }
    });
  };

  // Returns the body to send as an ordinary message, or null when the command was handled here.
  const runCommand = (user, body) => {
    if (body.startsWith('//')) return body.slice(1);
    if (!body.startsWith('/')) return body;
    const [command] = body.split(/\s/, 1);
    const rest = body.slice(command.length).trim();
    if (command === '/me') {
      if (rest) return body;
      showError('Usage: /me ACTION');
      return null;
    }
    if (command === '/help') {
      renderSystem(commandList());
    } else if (command === '/msg') {
      const [to, text] = splitName(rest);
      if (!to || !text) { showError('Usage: /msg NAME TEXT'); return null; }
      if (!socket.connected || !state.joined) { showError('Not connected: the private message was not sent.'); return null; }
      sendPrivate(user, to, text);
    } else if (command === '/search') {
      if (!rest) { showError('Usage: /search WORDS'); return null; }
      els.searchInput.value = rest;
      search(rest);
    } else if (command === '/login') {
      if (rest) login(rest);
      else { els.loginError.textContent = ''; els.loginDialog.showModal(); els.loginInput.focus(); }
    } else if (['/kick', '/ban', '/mute', '/unban', '/unmute'].includes(command)) {
      const [name, more] = splitName(rest);
      if (!name) { showError(`Usage: ${Object.keys(MODERATOR_COMMANDS).find((c) => c.startsWith(command + ' '))}`); return null; }
      const order = { action: command.slice(1), name };
      if (command === '/kick') order.reason = more || undefined;
      if (command === '/ban' || command === '/mute') {
        order.minutes = wholeNumber(more.trim());
        if (Number.isNaN(order.minutes)) { showError(`Usage: ${command} NAME [MINUTES]`); return null; }
      }
      moderate(order);
    } else if (['/clear', '/lock', '/unlock'].includes(command)) {
      moderate({ action: command.slice(1) });
    } else if (command === '/slow' || command === '/delete') {
      const number = wholeNumber(rest);
      if (number === undefined || Number.isNaN(number)) { showError(`Usage: ${command} ${command === '/slow' ? 'SECONDS' : 'ID'}`); return null; }
      moderate(command === '/slow' ? { action: 'slow', seconds: number } : { action: 'delete', id: number });
    } else if (command === '/nick') {
      const [name] = splitName(rest);
      if (!name || !checkName(name)) { if (!name) showError('Usage: /nick NAME'); return null; }
      els.user.value = name;
      store.set('chat.name', name);
      if (socket.connected) join();
    } else {
      showError(`Unknown command ${command.slice(0, 20)}. ${commandList()}`);
      return null;
    }
    els.body.value = '';
    autosize();
    showCount();
    if (state.typingSentAt) {  // nothing was sent to the room: say the typing has stopped
      state.typingSentAt = 0;
      socket.emit('typing', { typing: false });
    }
    return null;
  };

  const send = () => {
    const typed = els.user.value.trim();
    let body = els.body.value.trim();
    if (!typed || !body) {
      showError(!typed && !body ? 'Please enter your name and a message.' :
        !typed ? 'Please enter your name.' : 'Please type a message.');
      (!typed ? els.user : els.body).focus();
      return;
    }
    const user = checkName(typed);
    if (!user) return;
    showError('');
    body = runCommand(user, body);
    if (body === null) return;
    if (bodyLength(body) > MAX_LENGTH) {  // refused here, with the text left in the box to shorten
      showError(`Your message is too long: ${bodyLength(body)} characters, at most ${MAX_LENGTH}.`);
      els.body.focus();
      return;
    }
    showError('');
    store.set('chat.name', user);
    const entry = { cid: newCid(), user, body, room: state.room, tries: 0, failed: false, attempt: null, wire: null,
      li: makeItem(user, body, Date.now(), ['user', 'mine', 'pending']) };
    state.pending.set(entry.cid, entry);
    rememberCid(entry.cid);
    state.outbox.push(entry);
    els.messages.append(entry.li);
    els.empty.hidden = true;
    markPending(entry, 'queued');  // pump() says "sending…" when it is this entry's turn
    scrollToEnd();
    els.body.value = '';
    autosize();
    showCount();
    showSuggestions();
    els.body.focus();
    state.typingSentAt = 0;
    pump();
  };

  // ---- older history and search: `history` {before} pages back; `search` {q} finds messages

  const HISTORY_PAGE = 50;
  const oldestShown = () => Math.min(...[...state.rendered.keys()].filter((id) => id > 0), Infinity);

  // One page of older messages above what is shown; resolves false when there is nothing older.
  const loadOlder = () => new Promise((resolve) => {
    const before = oldestShown();
    if (state.olderDone || state.loadingOlder || !state.joined || before === Infinity) { resolve(false); return; }
    state.loadingOlder = true;
    const room = state.room;
    socket.timeout(SEND_TIMEOUT_MS).emit('history', { before, limit: HISTORY_PAGE }, (err, ack) => {
      state.loadingOlder = false;
      if (room !== state.room) { resolve(false); return; }
      if (err || !ack || !ack.ok) {
        if (ack && ack.error) showError(ack.error);
        resolve(false);
        return;
      }
      const c = els.conversation;
      const fromBottom = c.scrollHeight - c.scrollTop;  // keep what the person is reading in place
      state.replaying = true;
      for (const msg of ack.history) renderMessage(msg);
      state.replaying = false;
      c.scrollTop = c.scrollHeight - fromBottom;
      if (!ack.more) {
        state.olderDone = true;
        if (!els.messages.querySelector('li.older')) {
          els.messages.prepend(element('li', 'This is the beginning of the history kept for this room.', { class: 'older' }));
        }
      }
      resolve(ack.history.length > 0);
    });
  });
  els.conversation.addEventListener('scroll', () => { if (els.conversation.scrollTop < 80) loadOlder(); });

  const closeSearch = () => {
    els.searchResults.hidden = true;
    els.searchList.replaceChildren();
  };

  // Shows one message in context: loads older pages until it is on the page (a bounded number).
  const showInContext = async (id) => {
    for (let pages = 0; !state.rendered.has(id) && pages < 40; pages += 1) {
      if (!(await loadOlder())) break;
    }
    const li = state.rendered.get(id);
    if (!li) { showError('That message is no longer in the history.'); return; }
    for (const old of els.messages.querySelectorAll('li.found')) old.classList.remove('found');
    li.classList.add('found');
    li.scrollIntoView({ block: 'center' });
  };

  // In a private room the server cannot search: the page searches what it has decrypted.
  const searchHere = (query) => {
    const words = query.toLowerCase().split(/\s+/).filter(Boolean);
    return [...els.messages.querySelectorAll('li[data-plain]')].reverse()
      .filter((li) => words.every((w) => li.dataset.plain.toLowerCase().includes(w)))
      .map((li) => ({ id: Number(li.dataset.id), user: li.dataset.user, body: li.dataset.plain,
        ts: Date.parse(li.querySelector('.time').dateTime) })).slice(0, 50);
  };
  const search = (query) => {
    const room = state.room;
    if (isPrivateHere(room)) { showResults(query, room, searchHere(query)); return; }
    if (!socket.connected || !state.joined) { showError('Not connected: cannot search now.'); return; }
    socket.timeout(SEND_TIMEOUT_MS).emit('search', { q: query }, (err, ack) => {
      if (room !== state.room) return;
      if (err || !ack || !ack.ok) { showError(err ? 'The search got no answer; try again.' : (ack && ack.error) || 'Refused.'); return; }
      showResults(query, room, ack.results);
    });
  };
  const showResults = (query, room, results) => {
    showError('');
    els.searchResults.hidden = false;
    els.searchTitle.textContent = results.length
      ? `${results.length === 50 ? 'The newest 50' : results.length} found for “${query}” in #${room}`
      : `Nothing found for “${query}” in #${room}`;
    els.searchList.replaceChildren(...results.map((msg) => {
      const li = document.createElement('li');
      const button = document.createElement('button');
      button.type = 'button';
      const when = new Date(msg.ts).toLocaleString([], { dateStyle: 'short', timeStyle: 'short' });
      button.append(element('span', `${msg.user} · ${when}`, { class: 'hit-meta' }), String(msg.body).slice(0, 300));
      button.addEventListener('click', () => showInContext(msg.id));
      li.append(button);
      return li;
    }));
  };
  els.searchForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const query = els.searchInput.value.trim();
    if (query) search(query); else closeSearch();
  });
  els.searchClose.addEventListener('click', closeSearch);

  // ---- notifications and sound, both opt-in; the choice is kept in this browser

  const alertChoice = () => store.get('chat.notify') || 'off';
  const notifyChoice = (value) => {
    for (const radio of els.alerts.querySelectorAll('input[name="notify"]')) radio.checked = radio.value === value;
    els.alerts.classList.toggle('on', value !== 'off');
  };
  notifyChoice(alertChoice());
  els.sound.checked = store.get('chat.sound') === 'on';
  for (const radio of els.alerts.querySelectorAll('input[name="notify"]')) {
    radio.addEventListener('change', async () => {
      els.alertsNote.textContent = '';
      if (radio.value !== 'off' && 'Notification' in window && Notification.permission !== 'granted') {
        const answer = await Notification.requestPermission();  // asked only now, after this click
        if (answer !== 'granted') {
          els.alertsNote.textContent = 'The browser did not allow notifications for this page.';
          notifyChoice('off');
          store.set('chat.notify', 'off');
          return;
        }
      }
      store.set('chat.notify', radio.value);
      notifyChoice(radio.value);
    });
  }
  els.sound.addEventListener('change', () => store.set('chat.sound', els.sound.checked ? 'on' : 'off'));
  let audio = null;
  const beep = () => {
    try {
      audio = audio || new AudioContext();
      const tone = audio.createOscillator();
      const gain = audio.createGain();
      tone.frequency.value = 880;
      gain.gain.setValueAtTime(0.08, audio.currentTime);
      gain.gain.exponentialRampToValueAtTime(0.0001, audio.currentTime + 0.25);
      tone.connect(gain).connect(audio.destination);
      tone.start();
      tone.stop(audio.currentTime + 0.25);
    } catch { /* no audio here */ }
  };
  // A message that arrived while the person is away: a notification and a sound, if they asked.
  const alertIfAway = (forMe, title, body) => {
    if (!document.hidden && document.hasFocus()) return;
    const choice = alertChoice();
    if (choice === 'off' || (choice === 'mentions' && !forMe)) return;
    if (els.sound.checked) beep();
    if ('Notification' in window && Notification.permission === 'granted') {
      const note = new Notification(title, { body: body.slice(0, 200), tag: `chat-${state.room}` });
      note.onclick = () => { window.focus(); note.close(); };
    }
  };

  // ---- @name completion: Tab, or a tap on a name in the list that opens on @

  const completing = () => {
    const upto = els.body.value.slice(0, els.body.selectionStart);
    const match = /(?:^|\s)@([^\s@]*)$/.exec(upto);
    if (!match) return null;
    const key = nameKey(match[1]);
    const names = state.memberNames.filter((n) => nameKey(n).startsWith(key) && !isMe(n));
    return names.length ? { start: upto.length - match[1].length, end: upto.length, names } : null;
  };
  const complete = (name) => {
    const found = completing();
    if (!found) return;
    const text = els.body.value;
    els.body.value = `${text.slice(0, found.start)}${name} ${text.slice(found.end)}`;
    const caret = found.start + name.length + 1;
    els.body.setSelectionRange(caret, caret);
    els.body.focus();
    showSuggestions();
  };
  const showSuggestions = () => {
    const found = completing();
    els.suggest.hidden = !found;
    els.suggest.replaceChildren(...(found ? found.names.slice(0, 8) : []).map((name) => {
      const button = element('button', `@${name}`, { type: 'button', class: 'ghost' });
      button.addEventListener('click', () => complete(name));
      return button;
    }));
  };

  // ---- joining rooms


  const join = (withName = true) => {
    const user = withName ? els.user.value.trim() : '';
    const since = state.lastSeen.get(state.room);
    const joining = state.room;
    state.joined = false;
    state.joiningAs = user || null;
    socket.emit('join', { room: state.room, user: user || undefined, since, epoch: state.epoch || undefined }, (ack) => {
      if (joining !== state.room) return;  // the person has moved on to another room meanwhile
      if (!ack || !ack.ok) {
        if (ack && ack.code === 'rate_limited') {  // joined too often (say, flapping between rooms): try again
          const wait = serverWait(ack, 10000);
          setTimeout(() => { if (joining === state.room && socket.connected && !state.joined) join(withName); }, wait);
          return;
        }
        if (user && ack && ['reserved_name', 'bad_user', 'name_taken', 'too_many_names'].includes(ack.code)) {
          showError(ack.error);  // the name is refused: still join the room, without it
          join(false);
          return;
        }
        showBanner((ack && ack.error) || 'Could not join the room.');
        for (const entry of state.outbox) {
          if (entry.room === joining && !entry.failed) fail(entry, (ack && ack.error) || 'could not join the room');
        }
        return;
      }
      showBanner('');
      state.joined = true;
      if (state.epoch && ack.epoch !== state.epoch) {
        // The server restarted without keeping history: its ids start over, so forget ours.
        state.rendered.clear();
        state.lastSeen.clear();
        for (const li of els.messages.querySelectorAll('li[data-id]')) delete li.dataset.id;
        renderSystem('The server restarted; messages above this line are not kept on it.');
      } else if (since !== undefined && !ack.complete) {
        renderSystem('Some earlier messages may be missing: you were away longer than the history keeps.');
      }
      state.epoch = ack.epoch;
      state.joinedAs = ack.user || null;  // (offerDeletes below follows it)
      // The history is not news: busy until the next frame, so screen readers take it as one update.
      els.log.setAttribute('aria-busy', 'true');
      state.replaying = true;
      for (const msg of ack.history) renderMessage(msg);
      state.replaying = false;
      requestAnimationFrame(() => els.log.setAttribute('aria-busy', 'false'));
      if (since === undefined) scrollToEnd();
      for (const id of ack.deleted || []) markDeleted(id);
      if (ack.cleared) removeUpTo(ack.cleared);
      state.moderator = Boolean(ack.moderator);
      if (!state.moderator && tabStore.get('chat.moderator')) login(tabStore.get('chat.moderator'), true);
      offerDeletes();
      renderMembers(ack);
      if (ack.private && !isPrivateHere(state.room)) {
        showBanner('This is a private room: its messages are end-to-end encrypted. Ask for the invite link to read and write here.', 'info');
      } else if (isPrivateHere(state.room) && !state.announcedPrivate.has(state.room)) {
        state.announcedPrivate.add(state.room);
        renderSystem(`Private room: messages are encrypted in your browser; the server${
          BOT_KEY ? ', and the bot,' : ''} cannot read them. Anyone with the invite link can.`);
      }
      if (ack.locked) renderSystem(`#${state.room} is locked: only moderators may post.`);
      if (ack.slow) renderSystem(`#${state.room} is in slow mode: one message every ${ack.slow} seconds.`);
      state.typingUsers = ack.typing || [];
      renderTyping();
      pump();
    });
  };

  const switchRoom = (next, push = true) => {
    if (!ROOM_RE.test(next)) {
      showError('Room names are 1-32 lowercase letters, digits, - or _.');
      return;
    }
    if (next === state.room) return;
    const left = state.room;
    state.room = next;
    if (!isPrivateHere(next)) useKey(next, store.get(`chat.key.${next}`));  // remembered on this device
    if (push) history.pushState(null, '', isPrivateHere(next) ? inviteLink(next) : `?room=${encodeURIComponent(next)}`);
    showInvite();
    state.unread = 0;
    showTitle();
    els.roomInput.value = state.room;
    els.messages.replaceChildren();
    state.rendered.clear();
    state.lastSeen.delete(state.room);  // the list starts empty: ask for the room's recent history, not a replay
    els.empty.hidden = false;
    // Unsent messages never follow the person into another room: they fail here, with a retry.
    // The one in flight is still awaited, but no longer holds up this room's messages.
    const awaited = state.inFlight;
    state.inFlight = null;
    clearTimeout(state.waitTimer);  // a wait the last room asked for (slow mode) does not hold up this one
    state.waitTimer = 0;
    state.olderDone = false;
    closeSearch();
    for (const entry of state.outbox) {
      if (entry.room === left && entry !== awaited && !entry.failed) fail(entry, `not sent: you left #${left}`);
      else if (entry.room === state.room || entry.failed) els.messages.append(entry.li);
    }
    if (els.messages.childElementCount) els.empty.hidden = true;
    renderMembers({});
    state.typingUsers = [];
    renderTyping();
    showError('');
    if (socket.connected) join();
  };

  // ---- socket events

  socket.on('connect', () => {
    state.transportFailures = 0;
    setStatus('connected', 'connected');
    showBanner('');
    join();
  });
  socket.on('disconnect', (reason, details) => {
    state.joined = false;
    state.listedBeforeDrop = {room: state.room, names: [...state.memberNames], until: Date.now() + 60_000};
    // 1009: the server closed because a frame was too big; sending it again would only do the same.
    if (details?.context?.code === 1009 && state.inFlight) fail(state.inFlight, 'too big for the server to accept');
    if (state.inFlight) state.inFlight.attempt = null;  // its ack will not come: the entry is sent again after the next join
    state.inFlight = null;
    for (const entry of state.outbox) if (!entry.failed) markPending(entry, 'queued');
    if (state.removed) return;  // said by the 'removed' handler
    if (reason === 'io client disconnect') setStatus('offline', 'offline');
    else if (reason === 'io server disconnect') {  // the client does not reconnect after this by itself
      setStatus('offline', 'disconnected');
      showBanner('The server closed this connection (sending too fast, or too many bad packets).',
        'error', ['Reconnect', () => { setStatus('reconnecting', 'connecting…'); socket.connect(); }]);
    } else setStatus('reconnecting', 'reconnecting…');
  });
  socket.io.on('reconnect_attempt', () => {
    if (navigator.onLine === false) setStatus('offline', 'offline');
    else setStatus('reconnecting', 'reconnecting…');
  });
  const PASSWORD_PROBLEMS = {
    password_needed: '',
    wrong_password: 'That password is not right. Please try again.',
    too_many_attempts: 'Too many wrong passwords from here. Wait a minute, then try again.',
  };
  socket.on('connect_error', (err) => {
    const code = err && err.data && err.data.code;
    if (code in PASSWORD_PROBLEMS) {
      setStatus('error', 'password needed');
      els.passwordError.textContent = PASSWORD_PROBLEMS[code];
      if (!els.dialog.open) els.dialog.showModal();
      els.passwordInput.focus();
    } else if (code === 'too_many_connections') {
      setStatus('error', 'refused');
      showBanner('Too many connections from your address. Close some chat tabs, then reload.');
    } else if (code === 'banned') {
      setStatus('error', 'banned');
      const until = Number(err.data.until);
      showBanner(`A moderator has banned you from this chat${until ? ` until ${new Date(until).toLocaleString()}` : ''}.`);
    } else if (socket.active) {
      setStatus('reconnecting', 'reconnecting…');
      state.transportFailures += 1;
      if (state.transportFailures === 2) diagnose();
    } else {
      setStatus('error', 'refused');
      showBanner('The server refused the connection.');
    }
  });

  // When connecting keeps failing, ask the server why: a refused origin or transport is not
  // a network problem, and waiting will not fix it.
  const diagnose = async () => {
    let answer = null;
    try {
      const response = await fetch('/socket.io/?EIO=4&transport=polling', { method: 'POST', body: '' });
      if (response.status === 400 || response.status === 403) answer = await response.json();
    } catch { return; }  // the server cannot be reached at all: a network problem, keep reconnecting
    if (answer && answer.code === 'origin_refused') {
      showBanner('The server does not accept connections from this address of the page. Behind a proxy, ' +
        'pass the Host header with its port ($http_host in nginx), or start chat.py with --allow-origin.');
    } else if (answer && answer.code === 'transport_refused') {
      showBanner(`The server refused this page's connection type: ${String(answer.error)}.`);
    }
  };
  socket.on('newmessage', renderMessage);
  socket.on('botmessage', renderMessage);
  socket.on('system', renderNotice);
  socket.on('presence', (msg) => { if (msg && msg.room === state.room) renderMembers(msg); });
  socket.on('deleted', (msg) => { if (msg && msg.room === state.room) markDeleted(msg.id); });
  socket.on('cleared', (msg) => { if (msg && msg.room === state.room) removeUpTo(Number(msg.upto) || 0); });
  // A moderator removed (or banned) this page: say so, and do not come back by ourselves.
  socket.on('removed', (msg) => {
    state.removed = true;
    setStatus('error', msg && msg.code === 'banned' ? 'banned' : 'removed');
    showBanner(`${(msg && msg.error) || 'A moderator removed you.'} Reload the page to come back${
      msg && msg.code === 'banned' ? ' once the ban is over' : ''}.`);
    for (const control of els.form.querySelectorAll('input, textarea, button')) control.disabled = true;
  });
  socket.on('typing', (msg) => {
    if (msg && msg.room === state.room) { state.typingUsers = msg.users || []; renderTyping(); }
  });
  socket.on('chat_error', (msg) => showError(msg && msg.error));
  socket.on('private', renderPrivate);
  window.addEventListener('offline', () => setStatus('offline', 'offline'));
  window.addEventListener('online', () => { if (!socket.connected) setStatus('reconnecting', 'reconnecting…'); });

  // ---- form

  const autosize = () => {
    els.body.style.height = 'auto';
    els.body.style.height = `${Math.min(els.body.scrollHeight + 2, 128)}px`;
  };
  els.form.addEventListener('submit', (event) => { event.preventDefault(); send(); });
  els.jump.addEventListener('click', () => { scrollToEnd(); els.jump.hidden = true; });
  els.conversation.addEventListener('scroll', () => { if (atBottom()) els.jump.hidden = true; });
  // On a touch screen Enter is a new line (there is no Shift key) and the Send button sends.
  const touch = window.matchMedia('(pointer: coarse)').matches;
  els.body.addEventListener('keydown', (event) => {
    if (event.key === 'Tab' && !event.shiftKey && completing()) {  // @Al + Tab: @Alice
      event.preventDefault();
      complete(completing().names[0]);
      return;
    }
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && !touch) {
      event.preventDefault();
      send();
    }
  });
  // The count appears as the text nears the limit, and turns red past it.
  const showCount = () => {
    const length = bodyLength(els.body.value);
    els.counter.hidden = length < MAX_LENGTH * 0.8;
    els.counter.textContent = `${length} / ${MAX_LENGTH}`;
    els.counter.classList.toggle('over', length > MAX_LENGTH);
  };
  els.body.addEventListener('input', () => {
    autosize();
    showCount();
    showSuggestions();
    if (!socket.connected || !els.user.value.trim()) return;
    const now = Date.now();
    if (els.body.value && now - state.typingSentAt > 2000) {
      state.typingSentAt = now;
      socket.emit('typing', { typing: true });
    } else if (!els.body.value && state.typingSentAt) {
      state.typingSentAt = 0;
      socket.emit('typing', { typing: false });
    }
  });
  els.user.addEventListener('change', () => {
    const user = els.user.value.trim();
    if (user) store.set('chat.name', user);
    if (socket.connected) join();
  });
  els.roomForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const typed = els.roomInput.value;
    const room = typed.normalize('NFKC').toLowerCase().trim().replace(/[^a-z0-9_-]+/g, '-')
      .replace(/^-+|-+$/g, '').slice(0, 32);  // "Team Room!" is #team-room
    els.roomInput.setCustomValidity(room ? '' : 'Room names are letters, digits, - or _.');
    if (!room) { els.roomInput.reportValidity(); return; }  // said next to the room box
    els.roomInput.value = room;
    switchRoom(room);
  });
  window.addEventListener('popstate', () => { useKey(roomInUrl(), keyInUrl()); switchRoom(roomInUrl(), false); });
  els.newPrivate.disabled = !canEncrypt;
  if (!canEncrypt) els.newPrivate.title = 'Private rooms need the page over https (or on localhost): browsers allow encryption only there.';
  els.newPrivate.addEventListener('click', newPrivateRoom);
  els.copyInvite.addEventListener('click', async () => {
    try { await navigator.clipboard.writeText(els.inviteLink.value); els.copyInvite.textContent = 'Copied'; } catch {
      els.inviteLink.select();  // no clipboard here: selected, to copy by hand
    }
  });
  els.rememberKey.addEventListener('change', () => {
    const key = `chat.key.${state.room}`;
    if (els.rememberKey.checked) store.set(key, roomKeys.get(state.room).raw);
    else try { localStorage.removeItem(key); } catch { /* private mode */ }
  });
  els.hideInvite.addEventListener('click', () => { els.invite.hidden = true; });
  els.dialog.addEventListener('cancel', (event) => event.preventDefault());  // Escape: no way back but a reload
  els.loginForm.addEventListener('submit', (event) => {
    event.preventDefault();
    login(els.loginInput.value);
    els.loginInput.value = '';
  });
  els.loginCancel.addEventListener('click', () => els.loginDialog.close());
  els.passwordForm.addEventListener('submit', () => {
    tabStore.set('chat.password', els.passwordInput.value);
    els.passwordInput.value = '';
    setStatus('reconnecting', 'connecting…');
    socket.connect();
  });
  useKey(state.room, keyInUrl() || store.get(`chat.key.${state.room}`));
  showInvite();
  if (touch) els.body.placeholder = 'Type a message… (Enter: new line)';
  autosize();  // tall enough for the placeholder in a narrow window, and again whenever the width changes
  window.addEventListener('resize', autosize);
  (els.user.value ? els.body : els.user).focus();
})();
"""


# ---------------------------------------------------------------- library internals
# Every use of a private name of python-socketio, python-engineio, aiohttp or asyncio is in this
# section, verified with python-socketio 5.18.1, python-engineio 4.15.1, aiohttp 3.14.5 and
# CPython 3.10-3.13 (the minor versions are pinned in the header for that reason), and guarded by
# test_every_library_internal_chat_py_relies_on_is_still_there:
#
# - engineio.AsyncServer._async["websocket"/"translate_request"]: EngineServer plugs in ChatWebSocket
#   and hands python-engineio the polling POST body that guard_requests already read and checked.
# - engineio.AsyncServer._handle_connect(environ, transport, jsonp_index), which passes its environ
#   on to _trigger_event("connect", sid, environ): SessionCap counts Engine.IO sessions per address,
#   long-polling ones included (the address travels in the request's environ).
# - engineio.AsyncServer._trigger_event("disconnect", sid) and the ping task's target name
#   AsyncSocket._send_ping (started through start_background_task by schedule_ping): a WebSocket
#   session is pinged by the SharedPinger instead of a task, and a long-polling session's ping
#   task is cancelled on close instead of holding the session for 25 s.
# - engineio.AsyncSocket.__init__ taking its queue from server.create_queue(), called in
#   _handle_connect before its first await: a session that starts as a WebSocket gets a LeanQueue
#   (CONNECTING_OVER, a context variable of that request's task, carries the transport).
# - engineio.AsyncSocket.queue / .connected / .upgraded / .closing / .closed / .last_ping /
#   receive(pkt) / close(wait, abort, reason), its send() ending in `await self.queue.put(pkt)`,
#   and _websocket_handler's loop (ChatWebSocket.serve_lean replaces it for fresh WebSockets,
#   without the writer and wait tasks); poll(), which builds a long-polling response from one
#   queue.get() and then get_nowait() until empty (PollBatchQueue).
# - engineio.async_drivers.aiohttp.WebSocket.__call__ (copied in ChatWebSocket to choose
#   compression and serve the lean session; a test checks what upstream's does, by behaviour, not
#   by its source) and wait() (junk frames end the connection).
# - asyncio.Queue.get()/put() ending in get_nowait()/put_nowait(): the queues' bounds and bookkeeping.
# - socketio.AsyncServer._engineio_server_class(), _handle_eio_message(eio_sid, data),
#   _handle_event_internal(server, sid, eio_sid, data, namespace, id), _handle_connect(eio_sid,
#   namespace, data), _handle_eio_disconnect(eio_sid, reason) and .environ[eio_sid]: ChatServer
#   (refused connects count as strikes, and warnings name the client's address).
# - the message format of socketio.AsyncPubSubManager ({"method": "emit", "host_id", ...}) and its
#   _thread() passing every emit whose host_id is not its own to _handle_emit(message): RedisStore's
#   Lua script publishes each batch of messages as one such emit with a "batch" list under
#   REDIS_STORE_HOST, and RedisFanoutManager._handle_emit delivers the list, so that every node,
#   the storing one included, delivers them from the channel in id order, a batch in one iteration.
# - socketio.AsyncRedisManager._publish(data), _redis_listen_with_retries(), _redis_connect() and
#   .pubsub: RedisFanoutManager's outage handling.
# - socketio's manager.rooms[namespace][room] (a bidict, sid -> Engine.IO sid) and the
#   basic_enter_room / basic_leave_room methods through which enter_room, leave_room, close_room
#   and disconnect all change membership: FanoutManager reads a big room's members once per flush
#   interval for its RoomSegment, and seals the open segments on any change.
# - socketio's manager.eio_sid_from_sid(sid, namespace), behind engine_sid(): which Engine.IO
#   session a connection is on (a long-poll to release when it goes).
# - aiohttp's web.Server.connections and RequestHandler.transport, behind open_http_transports():
#   ConnectionWatch closes connections that never send a whole request.
# - engineio.payload.Payload.max_decode_packets, a class attribute with no per-server option:
#   python-engineio refuses a whole long-polling POST that batches more than 16 packets, which
#   silently loses bursts; allow as many as fit chat.py's size cap (set once, here).

eio_payload.Payload.max_decode_packets = max(eio_payload.Payload.max_decode_packets, FRAME_LIMIT_FLOOR // 2)


def packet_size(item: Any) -> int:
    """Roughly how many bytes of memory a queued outgoing Engine.IO packet holds (its data, and the
    packet object, so that many tiny packets count too)."""
    data = getattr(item, "data", None)
    return 64 + (len(data) if isinstance(data, (str, bytes)) else 0)


class OutgoingQueue(asyncio.Queue):  # type: ignore[type-arg]
    """An Engine.IO socket's outgoing queue, bounded in bytes whatever the packet: broadcasts, acks
    and errors alike. Past the bound it asks `overflow` to drop the client instead of growing (one
    packet larger than the bound still goes out when the queue is empty).

    Bytes, not packets: a long-polling client takes at most 16 packets per poll, so a burst it
    is reading at its transport's pace may be many packets long without it being slow."""

    def __init__(self, max_bytes: int, overflow: Callable[[OutgoingQueue], None]) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.bytes = 0
        self.overflowed = False

    def put_nowait(self, item: Any) -> None:
        if item is not None:  # None is the writer's stop signal: always accepted
            size = packet_size(item)
            if self.qsize() and self.bytes + size > self.max_bytes:
                if not self.overflowed:
                    self.overflowed = True
                    self.overflow(self)
                return
            self.bytes += size
        super().put_nowait(item)

    def get_nowait(self) -> Any:
        item = super().get_nowait()
        if item is not None:
            self.bytes -= packet_size(item)
        return item

    def clear(self) -> None:
        """Forget everything queued (a dropped client will not read it)."""
        while not self.empty():
            OutgoingQueue.get_nowait(self)  # not a subclass's: it may refuse to hand out more
            self.task_done()


class PollBatchQueue(OutgoingQueue):
    """An Engine.IO socket's outgoing queue that hands out at most 16 packets per batch.

    python-engineio builds a long-polling response from one get() and then
    get_nowait() until the queue is empty; its client aborts the connection
    when one response carries more than 16 packets. Refusing the 17th leaves
    the rest, in order, for the next poll.
    """

    MAX_BATCH = 16

    def __init__(self, max_bytes: int, overflow: Callable[[OutgoingQueue], None]) -> None:
        super().__init__(max_bytes, overflow)
        self.batch = 0
        self.waiting = False

    async def get(self) -> Any:
        self.waiting = True
        try:
            item = await super().get()
        finally:
            self.waiting = False
        self.batch = 1
        return item

    def get_nowait(self) -> Any:
        if not self.waiting:
            if self.batch >= self.MAX_BATCH:
                raise asyncio.QueueEmpty
            self.batch += 1
        return super().get_nowait()


class LeanQueue:
    """The outgoing side of a connection that starts as a WebSocket: no queue, no writer task.

    python-engineio gives every connection an asyncio queue and a writer task that empties
    it. Here each packet put in becomes a WebSocket frame handed to the FrameFlusher at
    once, so every packet for the connection (broadcasts, acks, pings, the CLOSE packet)
    goes out in the order it was put, joined with the others of the same event-loop
    iteration. Frames put before the WebSocket is open (the Engine.IO OPEN packet) wait in
    `early`. None, python-engineio's "stop the writer", ends the WebSocket once what is
    already put has been written. The connection's bound is the FrameFlusher's.
    """

    __slots__ = ("buffered", "early", "ending", "finished", "flusher", "response", "segment", "sid",
                 "transport", "unwritten_bytes", "ws")

    def __init__(self, flusher: FrameFlusher) -> None:
        self.flusher = flusher
        self.ws: ChatWebSocket | None = None
        self.response: web.WebSocketResponse | None = None
        self.transport: asyncio.Transport | None = None
        self.sid = ""
        self.early: list[bytes] | None = None
        self.unwritten_bytes = 0  # in the frames waiting for this iteration's flush
        self.buffered = 0  # in the transport's buffer, when this iteration's first frame came
        self.ending = False
        self.finished = False
        self.segment: RoomSegment | None = None  # the room segment its next frames may share

    def attach(self, ws: ChatWebSocket, sid: str) -> None:
        """The WebSocket is open: write what waited for it."""
        self.ws, self.sid = ws, sid
        self.response, self.transport = ws.response, ws.transport
        early, self.early = self.early or [], None
        for frame in early:
            self.flusher.push(self, frame)

    def push_frame(self, frame: bytes) -> None:
        """Send one WebSocket frame (already built) after everything put before it."""
        if self.finished:
            return
        if self.ws is None:
            self.early = [*(self.early or []), frame]
        else:
            self.flusher.push(self, frame)

    def put_nowait(self, item: Any) -> None:
        if item is None:
            self.end()
            return
        encoded = item.encode()
        self.push_frame(websocket_frame(encoded.encode() if isinstance(encoded, str) else encoded,
                                        binary=isinstance(encoded, bytes)))

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def end(self) -> None:
        """Close the WebSocket after the frames already put (a no-op once it has ended)."""
        if not self.ending and not self.finished:
            self.ending = True
            if self.ws is not None:
                self.flusher.schedule(self)

    def open_transport(self) -> asyncio.Transport | None:
        """The transport, if frames may still be written to it (aiohttp has not begun closing)."""
        transport = self.transport
        if transport is None or self.response is None or self.response.closed or transport.is_closing():
            return None
        return transport

    def abort(self) -> None:
        """Drop the connection now, unwritten frames and all (a client that stopped reading)."""
        self.finished = True
        if self.ws is not None:
            self.ws.abort()

    # the rest of asyncio.Queue's interface, as python-engineio uses it: always empty
    def get_nowait(self) -> Any:
        raise asyncio.QueueEmpty

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        return None


# Under load a flush waits a little for more frames, so that each recipient gets several messages in
# one write: "under load" is a flush to COALESCE_FANOUT or more connections within COALESCE_WINDOW
# seconds; the next one then waits COALESCE_DELAY. Small rooms and a quiet server never wait.
# Measured with 1,000 clients and --redis, where messages arrive one by one from pub/sub: at 160
# messages/s all were delivered with p99 0.1 s, against 76-86 % and p99 3.5 s with no wait.
COALESCE_FANOUT = 200
COALESCE_WINDOW = 0.02
COALESCE_DELAY = 0.010
SHARED_SEGMENT_MEMBERS = 16  # rooms at least this big share one RoomSegment per flush interval


class RoomSegment:
    """The frames broadcast to one room during one flush interval, joined once for all its members.

    A member whose connection gets some other frame in between (an ack, a private message,
    another room's broadcast, or a broadcast that skips it) is `cut` there: it gets the
    segment's frames up to that point, and later ones through its own frames, in order."""

    __slots__ = ("blob", "cut", "frames", "others", "size")

    def __init__(self, others: list[Any]) -> None:
        self.frames: list[bytes] = []
        self.size = 0
        self.cut: dict[LeanQueue, int] = {}  # member -> how many of `frames` it gets
        self.others = others  # the room's other sessions (polling, not yet open): sent one by one
        self.blob: bytes | None = None

    def bytes_for(self, queue: LeanQueue) -> bytes:
        count = self.cut.get(queue)
        if count is not None:
            return b"".join(self.frames[:count])
        if self.blob is None:
            self.blob = b"".join(self.frames)
        return self.blob


class FrameFlusher:
    """Writes each WebSocket connection's frames of one event-loop iteration with one write.

    Frames pushed during an iteration are joined per connection and written by one
    callback scheduled for the start of the next iteration (a little later under load: see
    COALESCE_DELAY). A connection whose unwritten
    bytes (in the transport's buffer and here) would pass `max_bytes` is a client that
    stopped reading: it is handed to `overflow` instead of growing server memory (a single
    frame larger than the bound still goes out when nothing is waiting).

    Broadcasts to a big room share a RoomSegment: the first of the interval visits every
    member, each later one is appended once for all of them (see FanoutManager.emit).
    """

    def __init__(self, max_bytes: int, overflow: Callable[[str], None]) -> None:
        self.max_bytes = max_bytes
        self.write_early = min(max_bytes // 2, 65536)
        self.overflow = overflow
        self.unwritten: dict[LeanQueue, list[bytes | RoomSegment]] = {}
        self.segments: dict[Any, RoomSegment] = {}  # open this interval, by room
        self.scheduled = False
        self.closing: set[asyncio.Task[Any]] = set()
        self.last_flush = (0.0, 0)  # when, and to how many connections

    def push(self, queue: LeanQueue, frame: bytes) -> None:
        """Queue `frame` for the connection's write at the next flush (called once per recipient
        of every broadcast: kept short)."""
        frames = self._pending(queue)
        if frames is None:
            return  # closing: nothing more may be written
        size = queue.unwritten_bytes + len(frame)
        if size > self.write_early and frames:
            # a burst handled within one iteration (a sender's many queued messages): write what
            # waits now, so that only a client that stopped reading reaches the bound
            transport = queue.open_transport()
            if transport is None:
                return
            transport.write(self._joined(queue, frames))
            frames.clear()
            queue.buffered = transport.get_write_buffer_size()
            size = len(frame)
        if queue.buffered + size > self.max_bytes and (queue.buffered or frames):
            self.overflow(queue.sid)
            return
        frames.append(frame)
        queue.unwritten_bytes = size

    def segment(self, room: Any) -> RoomSegment | None:
        """The room's open segment, if this interval has one and it may grow."""
        segment = self.segments.get(room)
        if segment is not None and segment.size > self.write_early:
            del self.segments[room]  # a burst: its members' writes are split, as push() splits them
            return None
        return segment

    def start_segment(self, room: Any, members: list[LeanQueue], others: list[Any]) -> RoomSegment:
        """Open a segment for `room` shared by `members` (open WebSocket connections)."""
        segment = RoomSegment(others)
        self.segments[room] = segment
        for queue in members:
            frames = self._pending(queue)
            if frames is not None:
                frames.append(segment)
                queue.segment = segment
        return segment

    def _pending(self, queue: LeanQueue) -> list[bytes | RoomSegment] | None:
        """What waits for the connection's next write, to append to (after cutting the segment it
        shared so far), or None when it is closing."""
        if queue.segment is not None:
            self._cut(queue)
        frames = self.unwritten.get(queue)
        if frames is None:
            transport = queue.open_transport()
            if transport is None:
                return None
            frames = self._visit(queue, transport)
        return frames

    def extend_segment(self, segment: RoomSegment, frame: bytes, skip: LeanQueue | None) -> None:
        """Add `frame` for every member of the segment but `skip`."""
        if skip is not None and skip.segment is segment:
            self._cut(skip)
        segment.frames.append(frame)
        segment.size += len(frame)
        segment.blob = None
        for queue in list(segment.cut):
            if queue is not skip and not queue.finished:
                self.push(queue, frame)

    def seal_segments(self) -> None:
        """Room memberships changed: later broadcasts start new segments."""
        self.segments.clear()

    @staticmethod
    def _cut(queue: LeanQueue) -> None:
        segment = queue.segment
        queue.segment = None
        if segment is not None:
            segment.cut[queue] = len(segment.frames)

    @staticmethod
    def _joined(queue: LeanQueue, frames: list[bytes | RoomSegment]) -> bytes:
        if len(frames) == 1 and type(frames[0]) is bytes:
            return frames[0]
        return b"".join(f if type(f) is bytes else f.bytes_for(queue) for f in frames)  # type: ignore[union-attr]

    def schedule(self, queue: LeanQueue) -> None:
        """Make sure the next flush visits `queue` (to end it) even with nothing to write."""
        if queue not in self.unwritten:
            self._visit(queue, queue.transport)

    def _visit(self, queue: LeanQueue, transport: asyncio.Transport | None) -> list[bytes | RoomSegment]:
        """The connection's (empty) list of frames for the next flush, which is scheduled once per
        iteration; notes what the transport already buffers, for the bound."""
        queue.buffered = transport.get_write_buffer_size() if transport is not None else 0
        queue.unwritten_bytes = 0
        frames: list[bytes | RoomSegment] = []
        self.unwritten[queue] = frames
        if not self.scheduled:
            self.scheduled = True
            loop = asyncio.get_running_loop()
            when, fanned = self.last_flush
            if fanned >= COALESCE_FANOUT and loop.time() - when < COALESCE_WINDOW:
                loop.call_later(COALESCE_DELAY, self.flush)  # see COALESCE_DELAY
            else:
                loop.call_soon(self.flush)
        return frames

    def flush(self) -> None:
        self.scheduled = False
        unwritten, self.unwritten = self.unwritten, {}
        self.segments.clear()
        self.last_flush = (asyncio.get_running_loop().time(), len(unwritten))
        for queue, frames in unwritten.items():
            queue.segment = None
            if queue.finished:
                continue
            transport = queue.open_transport() if frames else None
            if transport is not None:
                data = self._joined(queue, frames)
                buffered = transport.get_write_buffer_size()
                if buffered and buffered + len(data) > self.max_bytes:
                    self.overflow(queue.sid)  # a member of a shared segment that stopped reading
                    continue
                transport.write(data)
            if queue.ending:
                queue.finished = True
                task = asyncio.get_running_loop().create_task(queue.ws.close())  # type: ignore[union-attr]
                self.closing.add(task)
                task.add_done_callback(self.closing.discard)


class SharedPinger:
    """Engine.IO's pings for every WebSocket connection from one timer, not a sleeping task each.

    python-engineio starts a task per connection that sleeps for the ping interval and
    then sends a PING. Here connections due within the same step (a second, or a fifth of
    a shorter interval) share one timer; the answer (PONG) is handled as before, and a
    client that does not answer is closed by python-engineio's own monitor task.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.step = min(1.0, interval / 5)
        self.due: dict[int, dict[str, Any]] = {}  # step number (loop time / step) -> sessions to ping then
        self.step_of: dict[str, int] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, sock: Any) -> None:
        """Ping `sock` (an engineio AsyncSocket) one interval from now."""
        self.discard(sock.sid)
        loop = asyncio.get_running_loop()
        # Rounded down: a ping may go up to one step early, never late (a client allows exactly
        # pingInterval + pingTimeout before it gives up, and the timeout may be shorter than a step).
        number = math.floor((loop.time() + self.interval) / self.step)
        self.due.setdefault(number, {})[sock.sid] = sock
        self.step_of[sock.sid] = number
        if self.timer is None or self.timer.when() > number * self.step:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(number * self.step, self.tick)

    def discard(self, sid: str) -> None:
        """Forget a session (it closed)."""
        number = self.step_of.pop(sid, None)
        if number is not None:
            bucket = self.due.get(number)
            if bucket is not None:
                bucket.pop(sid, None)
                if not bucket:
                    del self.due[number]

    def tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = None
        now = loop.time()
        for number in sorted(n for n in self.due if n * self.step <= now):
            for sid, sock in self.due.pop(number).items():
                self.step_of.pop(sid, None)
                if not sock.closing and not sock.closed:
                    sock.last_ping = time.time()
                    sock.queue.put_nowait(eio_packet.Packet(eio_packet.PING))
        if self.due:
            self.timer = loop.call_at(min(self.due) * self.step, self.tick)

    def close(self) -> None:
        """Stop pinging anyone (shutdown)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.due.clear()
        self.step_of.clear()


class ChatWebSocket(eio_aiohttp.WebSocket):
    """python-engineio's aiohttp WebSocket, with permessage-deflate only when --compress asks,
    and, for connections that start as WebSockets, a lean session: the read loop runs in
    aiohttp's own handler task and writes go through the LeanQueue, with no other task.

    Browsers offer compression, and aiohttp accepts by default: each frame is
    then compressed once per recipient, and every connection carries a zlib
    state of a few hundred KB.
    """

    compress = False

    async def __call__(self, environ: dict[str, Any]) -> web.WebSocketResponse:
        self._sock = web.WebSocketResponse(max_msg_size=self.server.max_http_buffer_size, compress=self.compress)
        await self._sock.prepare(environ["aiohttp.request"])
        self.environ = environ
        open_websockets = getattr(self.server, "open_websockets", None)
        if open_websockets is not None:
            open_websockets.add(self)
        sock = self.session
        try:
            if sock is not None and isinstance(sock.queue, LeanQueue):
                await self.serve_lean(sock)
            else:
                await self.handler(self)
        finally:
            if open_websockets is not None:
                open_websockets.discard(self)
        return self._sock

    async def serve_lean(self, sock: Any) -> None:
        """python-engineio's WebSocket loop for a fresh connection, without its writer and wait tasks.

        A client that goes silent is closed by python-engineio's monitor task when it misses a
        PONG (which ends this loop), instead of by a timeout around every read.
        """
        sock.connected = sock.upgraded = True
        sock.queue.attach(self, sock.sid)
        receive = self._sock.receive  # directly: every frame of the await chain is kept per connection
        try:
            while not sock.closed:
                data = (await receive()).data
                if not isinstance(data, (str, bytes)) or not self.is_engine_packet(data):
                    self.note_oversized(data)
                    break  # closed, or an error, or junk
                try:
                    await sock.receive(eio_packet.Packet(encoded_packet=data))
                except eio_exceptions.UnknownPacketError:
                    pass
                except eio_exceptions.SocketIsClosedError:
                    break
        finally:
            await sock.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
            sock.queue.end()

    async def wait(self) -> Any:
        message = await self._sock.receive()  # as python-engineio's wait(), which raises OSError on errors
        if not isinstance(message.data, (str, bytes)):
            self.note_oversized(message.data)
            raise OSError()
        if not self.is_engine_packet(message.data):
            self.abort()  # ends the session now: a closing handshake would wait for a client that sends junk
            return None
        return message.data

    def note_oversized(self, error: Any) -> None:
        """A frame over the size limit: aiohttp has closed with 1009 (message too big), which the page
        shows; the log says so, once a minute per address."""
        if isinstance(error, aiohttp.WebSocketError) and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
            request = self.environ.get("aiohttp.request")
            self.server.problems.warn(f"closed a WebSocket from %s: it sent a frame over the "
                                      f"{self.server.max_http_buffer_size} byte limit (see --max-length)",
                                      request.remote if request is not None else "?")

    def is_engine_packet(self, frame: str | bytes) -> bool:
        """Whether a frame is an Engine.IO packet; if not, one warning a minute.

        python-engineio would raise on junk outside its error handling: a traceback per frame,
        and a session left behind. It is treated as the client leaving instead.
        """
        if valid_engine_packet(frame):
            return True
        request = self.environ.get("aiohttp.request")
        self.server.problems.warn("closing a WebSocket from %s: it sent a frame that is not Engine.IO",
                                  request.remote if request is not None else "?")
        return False

    async def close_for_restart(self) -> None:
        """Close with 1012 (service restart): clients treat it as a lost connection and reconnect."""
        await self._sock.close(code=aiohttp.WSCloseCode.SERVICE_RESTART, message=b"server restart")

    @property
    def session(self) -> Any:
        """The Engine.IO session this WebSocket carries (python-engineio passes its bound handler)."""
        return getattr(self.handler, "__self__", None)

    @property
    def response(self) -> web.WebSocketResponse:
        """aiohttp's WebSocket: its `closed` turns true before it writes a close frame."""
        return self._sock

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport, to which frames are written directly."""
        request = self.environ.get("aiohttp.request")
        return request.transport if request is not None else None

    def abort(self) -> None:
        """Drop the TCP connection at once, without a closing handshake."""
        transport = self.transport
        if transport is not None:
            transport.abort()


class CompressingWebSocket(ChatWebSocket):
    """--compress: accept permessage-deflate when the browser offers it."""

    compress = True


SESSION_ADDRESS = "chat.session_address"  # environ key: the address a new session counts against
CONNECTING_OVER: contextvars.ContextVar[str | None] = contextvars.ContextVar("connecting_over", default=None)


class SessionCap:
    """Engine.IO sessions per address (long-polling ones too, not only Socket.IO connects), capped."""

    def __init__(self, max_per_address: int, problems: ProblemLog) -> None:
        self.max_per_address = max_per_address
        self.problems = problems
        self.by_address: dict[str, set[str]] = {}

    def refusal(self, address: str, live: dict[str, Any]) -> dict[str, Any] | None:
        """A 429 response when `address` already holds its share of the `live` sessions, else None."""
        mine = self.by_address.get(address)
        if mine:
            mine.intersection_update(live)
        if not mine or len(mine) < self.max_per_address:
            return None
        self.problems.warn(f"refused sessions from %s: over {self.max_per_address} at once", address)
        return {"status": "429 Too Many Requests", "headers": [("Content-Type", "text/plain")],
                "response": b"too many connections from your address"}

    def add(self, address: str, sid: str, live: dict[str, Any]) -> None:
        self.by_address.setdefault(address, set()).add(sid)
        if len(self.by_address) > 2 * len(live) + 1000:  # addresses whose sessions have all gone
            self.by_address = {a: mine & live.keys() for a, mine in self.by_address.items() if mine & live.keys()}


class SlowReaders:
    """Drops a client that fell `max_queue` KB behind, instead of buffering for it without end."""

    def __init__(self, server: EngineServer, max_queue: int) -> None:
        self.server = server
        self.max_queue = max_queue
        self.dropping: set[str] = set()
        self.tasks = Tasks()

    def queue_overflowed(self, queue: OutgoingQueue) -> None:
        for eio_sid, sock in self.server.sockets.items():
            if sock.queue is queue:
                self.drop(eio_sid)
                return

    def drop(self, eio_sid: str) -> None:
        """Disconnect a client that fell `max_queue` KB behind."""
        if eio_sid in self.dropping:
            return
        self.dropping.add(eio_sid)
        log.warning("disconnecting %s: it fell over %d KB behind", eio_sid, self.max_queue)
        self.tasks.spawn(self._drop(eio_sid))

    async def _drop(self, eio_sid: str) -> None:
        # abort=True: a client that stopped reading would never read a CLOSE
        # packet. Close, free what is queued for it and wake the writer so it exits.
        sock = self.server.sockets.get(eio_sid)
        try:
            if sock is not None:
                await sock.close(wait=False, abort=True, reason=self.server.reason.SERVER_DISCONNECT)
                if isinstance(sock.queue, LeanQueue):
                    sock.queue.abort()  # no writer task: drop the connection with what it has not read
                else:
                    sock.queue.clear()
                    sock.queue.put_nowait(None)
                    for websocket in list(self.server.open_websockets):  # upgraded: its TCP connection goes now
                        if websocket.session is sock:
                            websocket.abort()
        finally:
            self.dropping.discard(eio_sid)


class PingTasks:
    """Engine.IO's ping for each session: the SharedPinger's timer for a lean WebSocket session; for
    any other, python-engineio's task, cancelled when the session closes.

    Each such task sleeps 25 s holding the session, its request and, after an abrupt close, the
    exception's frames (about 20 KB): connections opened and dropped in a loop would pile them up.
    """

    def __init__(self, pinger: SharedPinger) -> None:
        self.pinger = pinger
        self.tasks: dict[str, asyncio.Task[Any]] = {}

    def shared(self, owner: Any) -> bool:
        """True when the SharedPinger pings this session, so that no task is needed."""
        if isinstance(owner.queue, LeanQueue):
            self.pinger.add(owner)
            return True
        return False

    def started(self, sid: str, task: asyncio.Task[Any]) -> None:
        self.tasks[sid] = task
        task.add_done_callback(functools.partial(self._done, sid))

    def _done(self, sid: str, task: asyncio.Task[Any]) -> None:
        if self.tasks.get(sid) is task:
            del self.tasks[sid]

    def close(self) -> None:
        self.pinger.close()

    def closed(self, sid: str) -> None:
        """The session has gone: no more pings for it."""
        self.pinger.discard(sid)
        ping = self.tasks.pop(sid, None)
        if ping is not None and ping is not asyncio.current_task():
            ping.cancel()


class EngineServer(engineio.AsyncServer):
    """python-engineio's server with chat.py's parts plugged into its hooks.

    ChatWebSocket serves the WebSocket transport; a session that starts as a WebSocket gets a
    LeanQueue (written by the FrameFlusher, pinged by the SharedPinger); SessionCap counts sessions
    per address; SlowReaders drops clients that stopped reading; PingTasks frees a closed
    session's ping at once; and disconnects never wait for the client to read (python-engineio's
    wait until the client has drained its queue, which one that stopped reading never does).
    """

    def __init__(self, *args: Any, compress: bool, max_queue: int, problems: ProblemLog,
                 address_of: Callable[[dict[str, Any]], str | None], max_per_address: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._async = {**self._async, "websocket": CompressingWebSocket if compress else ChatWebSocket,
                       "translate_request": self._translate_request}
        self.open_websockets: set[ChatWebSocket] = set()
        self.problems = problems
        self.address_of = address_of  # the client's address, or None when it is exempt from the cap
        self.cap = SessionCap(max_per_address, problems)
        self.slow_readers = SlowReaders(self, max_queue)
        self.max_queue = max_queue
        self.lean = not compress  # connections that start as WebSockets get a LeanQueue
        self.flusher = FrameFlusher(max_queue * 1024, self.slow_readers.drop)
        self.pings = PingTasks(SharedPinger(self.ping_interval))
        self.restarting = False

    # What python-engineio, python-socketio and chat.py read from a WebSocket request's environ;
    # it is kept for the connection's lifetime, so nothing else is.
    WEBSOCKET_ENVIRON = frozenset({
        "REQUEST_METHOD", "QUERY_STRING", "PATH_INFO", "REMOTE_ADDR", "wsgi.url_scheme", "aiohttp.request",
        "HTTP_HOST", "HTTP_ORIGIN", "HTTP_UPGRADE", "HTTP_CONNECTION",
        "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST"})

    @classmethod
    def _translate_request(cls, request: web.Request) -> dict[str, Any]:
        environ: dict[str, Any] = eio_aiohttp.translate_request(request)
        body = request.get(CHECKED_BODY)
        if body is not None:  # read and checked by the request guards: python-engineio reads it from here
            environ["wsgi.input"] = CheckedBody(body)
        if request.method == "GET" and environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            environ = {key: value for key, value in environ.items() if key in cls.WEBSOCKET_ENVIRON}
        return environ

    async def _handle_connect(self, environ: dict[str, Any], transport: str, jsonp_index: int | None = None) -> Any:
        address = self.address_of(environ)
        if address is not None:
            refusal = self.cap.refusal(address, self.sockets)
            if refusal is not None:
                return refusal
            environ[SESSION_ADDRESS] = address  # counted when the session exists (the "connect" event)
        CONNECTING_OVER.set(transport)  # this request's context: read by create_queue for its new session
        return await super()._handle_connect(environ, transport, jsonp_index)

    def create_queue(self, *args: Any, **kwargs: Any) -> Any:
        transport = CONNECTING_OVER.get()
        CONNECTING_OVER.set(None)
        if transport == "websocket" and self.lean:
            return LeanQueue(self.flusher)
        return PollBatchQueue(self.max_queue * 1024, self.slow_readers.queue_overflowed)

    def start_background_task(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(target, "__self__", None)
        is_ping = getattr(target, "__name__", "") == "_send_ping" and owner is not None
        if is_ping and self.pings.shared(owner):
            return None
        task = super().start_background_task(target, *args, **kwargs)
        if is_ping:
            self.pings.started(owner.sid, task)
        return task

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "connect" and len(args) >= 2 and SESSION_ADDRESS in args[1]:
            self.cap.add(args[1][SESSION_ADDRESS], args[0], self.sockets)
        result = await super()._trigger_event(event, *args, **kwargs)
        if event == "disconnect" and args:
            sock = self.sockets.get(args[0])
            if sock is not None and isinstance(sock.queue, LeanQueue) and not self.restarting:
                sock.queue.end()  # after the CLOSE packet close() may still put
            self.pings.closed(args[0])
        return result

    async def close_for_restart(self) -> None:
        """Shutdown: end every session without Engine.IO's CLOSE packet.

        A CLOSE tells python-engineio's client that the server hung up on
        purpose, and python-socketio then never reconnects; a transport that
        just goes away is a lost connection, which every official client retries.
        """
        self.restarting = True
        for sock in list(self.sockets.values()):
            await sock.close(wait=False, abort=True, reason=self.reason.TRANSPORT_CLOSE)
            if not isinstance(sock.queue, LeanQueue):
                sock.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # ends a waiting long-poll
        self.sockets.clear()
        self.pings.close()
        closing = [asyncio.ensure_future(ws.close_for_restart()) for ws in list(self.open_websockets)]
        if closing:  # a client that stopped reading never answers the close frame: do not wait for it
            await asyncio.wait(closing, timeout=0.5)

    def release_long_poll(self, eio_sid: str) -> None:
        """python-engineio leaves a long-polling GET waiting for the ping timeout (about 45 s) after
        the client says goodbye, holding a request and a socket: answer it now, with a NOOP (a valid
        Engine.IO payload; a CLOSE that python-engineio queues next still follows it)."""
        sock = self.sockets.get(eio_sid)
        if sock is not None and not sock.upgraded:
            sock.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))

    async def disconnect(self, sid: str | None = None) -> None:
        for eio_sid in [sid] if sid is not None else list(self.sockets):
            sock = self.sockets.get(eio_sid)
            if sock is not None:
                await sock.close(wait=False, reason=self.reason.SERVER_DISCONNECT)
                sock.queue.put_nowait(None)  # the writer sends the CLOSE packet, then ends the transport
                self.sockets.pop(eio_sid, None)


class ChatServer(socketio.AsyncServer):
    """AsyncServer hardened against untrusted packets.

    It records whether the client asked for an ack (so a refusal goes back the
    way the client listens), refuses events named like Socket.IO's own
    lifecycle events, and turns undecodable packets into a warning (limited per
    connection and address). A connection that sends MAX_STRIKES undecodable
    packets, or has that many connects refused (no password, say), is closed.
    """

    MAX_STRIKES = 5

    def __init__(self, *args: Any, warnings: ClientWarnings, address_of: Callable[[dict[str, Any]], str],
                 engine_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._engine_options = engine_options or {}
        self.warnings = warnings
        self.address_of = address_of
        self.strikes: collections.Counter[str] = collections.Counter()  # per Engine.IO session
        super().__init__(*args, **kwargs)

    @classmethod
    def for_settings(cls, settings: Settings, admission: Admission, warnings: ClientWarnings,
                     problems: ProblemLog, manager: socketio.AsyncManager) -> ChatServer:
        """The Socket.IO server the settings describe."""
        return cls(
            warnings=warnings, address_of=admission.client_address,
            async_mode="aiohttp",
            client_manager=manager,
            async_handlers=False,  # one client's events are handled strictly in order
            cors_allowed_origins=admission.engine_origin_allowed,
            max_http_buffer_size=settings.frame_limit,
            engine_options={"compress": settings.compress, "max_queue": settings.max_queue,
                            "address_of": admission.capped_address, "problems": problems,
                            # room for sessions still handshaking, so that the Socket.IO refusal
                            # (a readable "too many connections") is what a page normally sees
                            "max_per_address": settings.max_per_ip + EXTRA_HANDSHAKES},
            transports=list(settings.transports),
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            logger=False,
            engineio_logger=False,
        )

    def release_long_poll(self, sid: str) -> None:
        """A connection has gone: answer its waiting long-poll now (EngineServer.release_long_poll)."""
        eio_sid = engine_sid(self, sid)
        if eio_sid:
            self.eio.release_long_poll(eio_sid)

    async def close_for_restart(self) -> None:
        """Shutdown: every transport closes as if lost, so the clients reconnect (EngineServer.close_for_restart)."""
        await self.eio.close_for_restart()

    def address(self, eio_sid: str) -> str:
        environ = self.environ.get(eio_sid)
        return self.address_of(environ) if environ is not None else "?"

    async def strike(self, eio_sid: str) -> None:
        """One more bad thing from this connection; past MAX_STRIKES it is closed."""
        self.strikes[eio_sid] += 1
        if self.strikes[eio_sid] >= self.MAX_STRIKES:
            self.warnings.warn((eio_sid, self.address(eio_sid)), "closing a connection from %s: %d bad packets "
                               "or refused connects", self.address(eio_sid), self.strikes[eio_sid])
            await self.eio.disconnect(eio_sid)

    async def _handle_connect(self, eio_sid: str, namespace: str, data: Any) -> None:
        await super()._handle_connect(eio_sid, namespace, data)
        if self.manager.sid_from_eio_sid(eio_sid, namespace or "/") is None:  # refused
            await self.strike(eio_sid)

    async def _handle_eio_disconnect(self, eio_sid: str, *args: Any) -> None:
        self.strikes.pop(eio_sid, None)
        await super()._handle_eio_disconnect(eio_sid, *args)

    def _engineio_server_class(self) -> Any:
        return functools.partial(EngineServer, **self._engine_options)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if isinstance(data, bytes) or (isinstance(data, str) and data[:1] in ("5", "6")):
            # Binary events and their attachments: chat.py's protocol has none, and python-socketio
            # would keep every frame until the announced number of attachments had arrived.
            sid = self.manager.sid_from_eio_sid(eio_sid, "/")
            log.warning("disconnecting %s: it sent a binary packet, which chat.py does not accept", sid or eio_sid)
            await self.eio.disconnect(eio_sid)
            return
        try:
            await super()._handle_eio_message(eio_sid, data)
        except Exception as exc:  # a packet python-socketio could not decode
            sid = self.manager.sid_from_eio_sid(eio_sid, "/")
            address = self.address(eio_sid)
            self.warnings.warn((eio_sid, address), "dropped a malformed packet from %s (%s): %s",
                               address, sid or eio_sid, type(exc).__name__)
            if sid is not None:
                await self.emit("chat_error", {"error": "The server could not read that packet.",
                                               "code": "bad_packet", "event": None}, to=sid)
            await self.strike(eio_sid)

    async def _handle_event_internal(self, server: Any, sid: str, eio_sid: str, data: Any,
                                     namespace: str, id: int | None) -> None:
        token = _ack_wanted.set(id is not None)
        try:
            if not isinstance(data, list) or not data or not isinstance(data[0], str) \
                    or data[0] in RESERVED_EVENTS:
                data = ["*invalid*", *(data[1:] if isinstance(data, list) else [])]
            await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)
        finally:
            _ack_wanted.reset(token)


def open_http_transports(runner: web.AppRunner) -> list[asyncio.Transport]:
    """The transports of the HTTP connections the server has open (aiohttp's Server.connections,
    each a RequestHandler with its transport)."""
    server = runner.server
    if server is None:
        return []
    return [h.transport for h in server.connections if h.transport is not None]


def engine_sid(sio: socketio.AsyncServer, sid: str) -> str | None:
    """Which Engine.IO session a Socket.IO connection (sid, default namespace) is on."""
    return sio.manager.eio_sid_from_sid(sid, "/")  # type: ignore[no-any-return]


def websocket_frame(payload: bytes, binary: bool = False) -> bytes:
    """One unmasked, unfragmented WebSocket text (or binary) frame, as a server sends it."""
    size = len(payload)
    first = 0x82 if binary else 0x81
    if size < 126:
        header = bytes((first, size))
    elif size < 65536:
        header = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + size.to_bytes(8, "big")
    return header + payload


class FanoutManager(socketio.AsyncManager):
    """Room broadcasts that encode a packet once and hand it to each recipient without a Task each.

    python-socketio's stock manager starts one asyncio Task per recipient, and each
    recipient's writer task then wakes up to send it. Here a connection that started as a
    WebSocket gets the WebSocket frame (built once per broadcast) through its LeanQueue,
    which joins it with the connection's other frames of this event-loop iteration into
    one write. Any other client (long-polling, upgraded, --compress) gets it queued. Either
    way there is a bound: a client that falls `max_queue` KB behind is
    disconnected instead of growing server memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.claim_message: Callable[[int, str | None], bool] | None = None

    async def emit(self, event: str, data: Any, namespace: str, room: Any = None, skip_sid: Any = None,
                   callback: Any = None, to: Any = None, **kwargs: Any) -> None:
        room = to or room
        if (self.claim_message is not None and event in ("newmessage", "botmessage") and isinstance(data, dict)
                and type(data.get("id")) is int and not self.claim_message(data["id"], data.get("cid"))):
            return  # delivered here already
        if callback is not None or namespace not in self.rooms:
            return await super().emit(event, data, namespace, room=room, skip_sid=skip_sid,
                                      callback=callback, **kwargs)
        args = list(data) if isinstance(data, tuple) else ([] if data is None else [data])
        encoded = self.server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event, *args]).encode()
        if isinstance(encoded, list):  # binary attachments: leave them to the stock path
            return await super().emit(event, data, namespace, room=room, skip_sid=skip_sid, **kwargs)
        packet = eio_packet.Packet(eio_packet.MESSAGE, encoded)
        if isinstance(room, str) and not isinstance(skip_sid, list):
            members = self.rooms[namespace].get(room)
            if members is not None and len(members) >= SHARED_SEGMENT_MEMBERS:
                self._broadcast_shared(namespace, room, members, skip_sid, encoded, packet)
                return
        ws_frame: bytes | None = None
        skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        sockets = self.server.eio.sockets
        for sid, eio_sid in self.get_participants(namespace, room):
            if sid in skip:
                continue
            sock = sockets.get(eio_sid)
            if sock is None or sock.closing or sock.closed:
                continue
            queue = sock.queue
            if type(queue) is LeanQueue:
                if ws_frame is None:
                    ws_frame = websocket_frame(b"4" + encoded.encode())
                queue.push_frame(ws_frame)
            else:
                queue.put_nowait(packet)  # an OutgoingQueue: past its bound it drops the client instead

    def _broadcast_shared(self, namespace: str, room: str, members: Any, skip_sid: str | None, encoded: str,
                          packet: Any) -> None:
        """A broadcast to a big room: one RoomSegment per flush interval for its open WebSockets."""
        flusher: FrameFlusher = self.server.eio.flusher
        key = (namespace, room)
        segment = flusher.segment(key)
        sockets = self.server.eio.sockets
        skip: LeanQueue | None = None
        if segment is None:
            lean: list[LeanQueue] = []
            others: list[Any] = []
            for eio_sid in members.values():
                sock = sockets.get(eio_sid)
                if sock is None or sock.closing or sock.closed:
                    continue
                queue = sock.queue
                if type(queue) is LeanQueue and queue.ws is not None:
                    lean.append(queue)
                else:
                    others.append(sock)
            segment = flusher.start_segment(key, lean, others)
        skipped = None if skip_sid is None else members.get(skip_sid)  # its Engine.IO sid
        skipped_sock = sockets.get(skipped) if skipped is not None else None
        if skipped_sock is not None and type(skipped_sock.queue) is LeanQueue:
            skip = skipped_sock.queue
        flusher.extend_segment(segment, websocket_frame(b"4" + encoded.encode()), skip)
        for sock in segment.others:
            if sock.sid != skipped and not (sock.closing or sock.closed):
                sock.queue.put_nowait(packet)

    # Any change of who is in which room (python-socketio's disconnect and close_room leave through
    # basic_leave_room): broadcasts after it start new segments.
    def basic_enter_room(self, *args: Any, **kwargs: Any) -> Any:
        self.server.eio.flusher.seal_segments()
        return super().basic_enter_room(*args, **kwargs)

    def basic_leave_room(self, *args: Any, **kwargs: Any) -> Any:
        self.server.eio.flusher.seal_segments()
        return super().basic_leave_room(*args, **kwargs)


class RedisFanoutManager(socketio.AsyncRedisManager, FanoutManager):
    """python-socketio's Redis manager (broadcasts reach every node) with the local fast path.

    Each node delivers to its own clients first, then publishes for the others.
    While Redis is down, publishing is skipped (logged once, through RedisHealth)
    and the subscription retries every few seconds instead of backing off to a minute.
    """

    def __init__(self, url: str, health: RedisHealth,
                 claim_message: Callable[[int, str | None], bool] | None = None) -> None:
        quiet = logging.getLogger("chat.redis-manager")
        quiet.setLevel(logging.CRITICAL)  # outages are reported once by RedisHealth
        super().__init__(url, channel=REDIS_CHANNEL, logger=quiet, redis_options={"socket_connect_timeout": 2})
        self.health = health
        self.claim_message = claim_message  # the store learns which ids exist, and skips copies

    async def _publish(self, data: Any) -> None:
        if self.health.down:
            return
        try:
            if not self.connected:
                self._redis_connect()
            await asyncio.wait_for(self.redis.publish(self.channel, self.json.dumps(data)), 2)
        except Exception as exc:
            self.connected = False
            self.health.failed(exc)

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        """A batch the store published is delivered in one go: each recipient gets it in one write."""
        batch = message.get("batch")
        if not isinstance(batch, list):
            return await super()._handle_emit(message)
        for item in batch:
            await FanoutManager.emit(self, item["event"], item["data"], "/", room=item["room"])

    async def _redis_listen_with_retries(self) -> Any:
        delay = 0.25
        subscribed = False
        while True:
            try:
                if not subscribed:
                    self._redis_connect()
                    await self.pubsub.subscribe(self.channel)
                    subscribed, delay = True, 0.25
                async for message in self.pubsub.listen():
                    yield message
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                subscribed = False
                self.health.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)


# ---------------------------------------------------------------- main()


def make_store(settings: Settings) -> Store:
    """The history store the settings ask for."""
    if settings.db is not None:
        return SqliteStore(settings.db, settings.history)
    return MemoryStore(settings.history)


def make_sanctions(settings: Settings, shared: SharedState | None) -> Sanctions:
    """Where bans, mutes and held names are kept: Redis, the --db file, or memory."""
    if shared is not None:
        return RedisSanctions(shared.client, shared.health)
    if settings.db is not None:
        return SqliteSanctions(settings.db)
    return Sanctions()


@dataclass
class SharedState:
    """The Redis-backed parts of one node: store, presence board and Socket.IO manager."""

    client: Any
    health: RedisHealth
    store: RedisStore
    board: RedisBoard
    manager: RedisFanoutManager
    holds: RedisNameHolds

    async def close(self) -> None:
        await self.health.close()
        await self.client.aclose()


async def connect_redis(settings: Settings) -> SharedState:
    """Connect to Redis for --redis, or stop start-up with one clear line."""
    aioredis = import_optional("redis.asyncio", REDIS_REQUIREMENT, "--redis")
    assert settings.redis is not None
    client = aioredis.Redis.from_url(settings.redis, socket_connect_timeout=2)
    try:
        await asyncio.wait_for(client.ping(), 3)
    except Exception as exc:
        await client.aclose()
        raise StartupError(f"cannot reach Redis at {settings.redis}: {describe_error(exc)}") from None
    health = RedisHealth(client)
    node = os.urandom(6).hex()
    store = RedisStore(client, health, settings.history, node)
    return SharedState(client, health, store, RedisBoard(client, health, node, settings.presence_ttl),
                       RedisFanoutManager(settings.redis, health, claim_message=store.claim),
                       RedisNameHolds(client, health, node, settings.name_grace, settings.presence_ttl))


def machine_addresses() -> list[str]:
    """This machine's non-loopback addresses, as its name resolves (may be empty)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found = []
    for info in infos:
        address = str(info[4][0])
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(address).is_loopback and address not in found:
                found.append(address)
    return found


def banner(settings: Settings, url: str, client_note: str = "") -> str:
    """The one line printed at start-up: where to go, and what is in use."""
    if settings.host in ("0.0.0.0", "::", ""):
        port = url.rsplit(":", 1)[1]
        scheme = url.split("://", 1)[0]
        others = [f"{scheme}://{f'[{a}]' if ':' in a else a}:{port}" for a in machine_addresses()[:2]]
        where = f"{url} on this machine, {' or '.join(others) or f'{scheme}://ITS-ADDRESS:{port}'} from others"
        share = "listening on every address"
    else:
        where = url
        share = ("share on a LAN or server with --host 0.0.0.0" if _is_loopback_host(settings.host)
                 else f"listening on {settings.host}")
    bot = settings.bot + (f" with rules from {settings.bot_rules}" if settings.bot_rules else "")
    history = (f"history in {settings.db}" if settings.db else "history shared through Redis" if settings.redis
               else "history in memory")
    password = "password required" if settings.password else "no password"
    client = "browser client served from here" if settings.client_js else \
        f"browser client from {CLIENT_JS_ORIGIN}, checked with SRI" + (f" ({client_note})" if client_note else "")
    versions = ", ".join(f"{name} {installed_version(name, module)}"
                         for name, module in (("python-socketio", socketio), ("aiohttp", aiohttp)))
    return (f"chat.py {__version__}: {where}  (bot: {bot}; {history}; {password}; {loop_name(settings.loop)}; "
            f"{client}; {versions}; {share}; Ctrl-C stops)")


def _file_problem(flag: str, path: Path) -> str | None:
    if path.is_dir():
        return f"{flag} {path}: is a directory, not a file"
    if not path.is_file():
        return f"{flag} {path}: no such file"
    return None


@functools.cache  # checked by bad_file() before start-up, then used by serve(): built once
def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context for --tls-cert/--tls-key, or None; ValueError says what is wrong."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    for flag, path in (("--tls-cert", settings.tls_cert), ("--tls-key", settings.tls_key)):
        problem = _file_problem(flag, path)
        if problem:
            raise ValueError(problem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        cert_text = settings.tls_cert.read_text(errors="replace")
        key_text = settings.tls_key.read_text(errors="replace")
        if "PRIVATE KEY" in cert_text and "CERTIFICATE" in key_text:
            raise ValueError("--tls-cert and --tls-key look swapped: --tls-cert takes the certificate "
                             "(BEGIN CERTIFICATE), --tls-key the private key") from None
        if "CERTIFICATE" not in cert_text:
            raise ValueError(f"--tls-cert {settings.tls_cert}: no PEM certificate in it") from None
        if "PRIVATE KEY" not in key_text:
            raise ValueError(f"--tls-key {settings.tls_key}: no PEM private key in it") from None
        raise ValueError(f"--tls-key {settings.tls_key} does not match --tls-cert {settings.tls_cert} "
                         f"({getattr(exc, 'reason', None) or exc})") from None
    return context


def bad_file(settings: Settings) -> str | None:
    """What is wrong with a file or directory named on the command line, before anything starts."""
    if settings.client_js:
        problem = _file_problem("--client-js", settings.client_js)
        if problem:
            return problem
        if not re.search(rb"Socket\.IO v\d", settings.client_js.read_bytes()[:1024]):  # the dist files' banner
            return (f"--client-js {settings.client_js}: does not look like the Socket.IO client "
                    "(socket.io.min.js from the socket.io-client package)")
    if settings.bot_rules:
        problem = _file_problem("--bot-rules", settings.bot_rules)
        if problem:
            return problem
        try:
            load_rules(settings.bot_rules)
        except RulesError as exc:
            return f"--bot-rules {settings.bot_rules}: {exc}"
    if settings.db and not settings.db.parent.is_dir():
        return f"--db {settings.db}: the directory {settings.db.parent} does not exist"
    if settings.db and settings.db.is_dir():
        return f"--db {settings.db}: is a directory; give a file name, e.g. {settings.db / 'chat.db'}"
    try:
        tls_context(settings)
    except ValueError as exc:
        return str(exc)
    return None


async def serve(settings: Settings, ready: asyncio.Future[str] | None = None,
                stop: asyncio.Event | None = None, client_note: str = "") -> None:
    """Run the chat until `stop` is set; `ready` receives the URL once it is listening.

    `client_note` says, in the banner, why the browser client is not served from here.
    """
    stop = stop or asyncio.Event()
    async with contextlib.AsyncExitStack() as cleanup:  # the shutdown, written once: in reverse order of start
        await _serve(settings, ready, stop, client_note, cleanup)


async def _serve(settings: Settings, ready: asyncio.Future[str] | None, stop: asyncio.Event, client_note: str,
                 cleanup: contextlib.AsyncExitStack) -> None:
    shared = await connect_redis(settings) if settings.redis else None
    if shared:
        cleanup.push_async_callback(shared.close)
    store: Store = shared.store if shared else make_store(settings)
    cleanup.push_async_callback(store.close)
    try:
        await store.open()
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    except (sqlite3.Error, OSError) as exc:
        raise StartupError(f"cannot open the database {settings.db}: {exc}") from None
    sanctions = make_sanctions(settings, shared)
    cleanup.push_async_callback(sanctions.close)
    try:
        await sanctions.open()
    except (StoreError, RedisDown) as exc:
        raise StartupError(f"cannot read the bans and mutes: {exc or 'Redis is unreachable'}") from None
    bot = make_bot(settings)
    cleanup.push_async_callback(bot.close)
    await bot.open()
    problems = ProblemLog()  # one limit on the log for everything a client can make chat.py say
    hub = ChatHub(settings, store, bot, board=shared.board if shared else None,
                  manager=shared.manager if shared else None, holds=shared.holds if shared else None,
                  sanctions=sanctions, problems=problems, tasks=Tasks())
    hub.holds.restore(sanctions.of_kind("hold"))
    cleanup.push_async_callback(_keep_holds, hub.holds, sanctions)
    app = build_app(settings, hub)
    try:
        ssl_context = tls_context(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    open_files = raise_open_file_limit()
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5,
                           keepalive_timeout=IDLE_KEEPALIVE)
    await runner.setup()
    cleanup.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {settings.port} is in use; try --port {settings.port + 1}") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"not allowed to listen on port {settings.port}; try a port above 1023") from None
        raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    cleanup.push_async_callback(hub.close)
    addresses = runner.addresses  # the real port when --port 0
    port = addresses[0][1] if addresses else settings.port
    scheme = "https" if ssl_context else "http"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)  # one to open
    host = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{host}:{port}"
    if settings.gc == "tuned":
        tune_gc()
    print(banner(settings, url, client_note), flush=True)
    capacity = max(open_files - files_open_now() - 16, 0)  # 16 spare: the database, Redis, a bot's HTTP client
    if open_files:
        log.info("open-file limit %d: room for about %d connections", open_files, capacity)
    if settings.password is None and not _is_loopback_host(settings.host):
        log.warning("anyone who can reach %s can join: set CHAT_PASSWORD to require a password", settings.host)
    if ready is not None:
        ready.set_result(url)
    asyncio.get_running_loop().set_exception_handler(SocketShortage(problems, open_files).handle)
    background = Tasks()
    cleanup.callback(background.cancel)
    background.spawn(warn_if_bot_unreachable(bot, settings))
    background.spawn(ConnectionWatch(runner, app, problems, open_files, capacity).run())
    background.spawn(sanctions.watch())
    if shared:
        background.spawn(hub.presence.heartbeat(hub.rooms_in_use, settings.presence_ttl / 3))
        background.spawn(shared.store.hold_slot())
        background.spawn(shared.holds.keep(settings.presence_ttl / 3))
    await stop.wait()


async def _keep_holds(holds: NameHolds, sanctions: Sanctions) -> None:
    with contextlib.suppress(StoreError):
        await holds.save(sanctions)


async def warn_if_bot_unreachable(bot: Bot, settings: Settings) -> None:
    """One warning at start-up when the bot's backend does not answer; chat.py runs regardless."""
    problem = await bot.check()
    if problem:
        log.warning("%s (--bot %s) is not reachable: %s; the chat works, and each message tries again",
                    settings.bot_name, settings.bot, problem)


def files_open_now() -> int:
    """How many file descriptors this process has open (a guess where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (each connection is a file); returns the limit."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SocketShortage:
    """The event loop's exception handler: running out of file descriptors while accepting
    becomes one clear line a minute instead of a line per refused connection."""

    def __init__(self, problems: ProblemLog, limit: int) -> None:
        self.problems = problems
        self.limit = limit

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.problems.warn(OUT_OF_SOCKETS, str(self.limit))
            return
        loop.default_exception_handler(context)


class OneLineErrors(logging.Filter):
    """For aiohttp's server log: a client's malformed request is one line without a traceback,
    at most once a minute for each kind of error."""

    def __init__(self) -> None:
        super().__init__()
        self.once_a_minute = ProblemLog()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        kind = type(exc).__name__
        if not self.once_a_minute.due(kind):
            return False
        record.msg = f"{record.getMessage()}: {kind}: {str(exc).splitlines()[0][:160]} (logged once a minute)"
        record.levelno, record.levelname = logging.WARNING, "WARNING"  # the client's fault, not the server's
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


def tune_gc() -> None:
    """Fewer, cheaper collections: every full collection walks a heap that grows with the clients.

    Objects alive after start-up (modules, the app, the page) are frozen out of
    collection, and generation 0 is collected after 50,000 net allocations
    instead of 700 (chat.py's own objects rarely form reference cycles).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def loop_name(choice: str) -> str:
    """The event loop `--loop` resolves to on this machine."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401  (optional: faster when installed)
    except ImportError:
        if choice == "uvloop":
            raise StartupError("--loop uvloop needs the uvloop package: pip install uvloop") from None
        return "asyncio"
    return "uvloop"


def run_event_loop(coro: Any, choice: str) -> None:
    """Run `coro` to completion on the event loop `--loop` asks for."""
    if loop_name(choice) == "uvloop":
        import uvloop

        uvloop.run(coro)
        return
    asyncio.run(coro)


def with_browser_client(settings: Settings) -> tuple[Settings, str]:
    """The settings with the browser client to serve (the cached copy, else one fetch) unless
    --client-js names one, and the banner's note on why there is none (empty when there is)."""
    if settings.client_js is not None:
        return settings, ""
    found, note = BrowserClient(cache_root()).find()
    return dataclasses.replace(settings, client_js=found), note


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse flags, run until Ctrl-C or SIGTERM, exit 0."""
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(OneLineErrors())
    problem = bad_file(settings)
    if problem:
        print(f"chat.py: {problem}", file=sys.stderr)
        return 2
    settings, client_note = with_browser_client(settings)
    # A hang-up (the terminal or ssh session went away) stops the chat too, unless nohup ignores it.
    stop_signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stop_signals.append(signal.SIGHUP)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in stop_signals:
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop=stop, client_note=client_note)

    try:
        loop_name(settings.loop)  # before run() exists: a missing uvloop leaves no coroutine unawaited
        run_event_loop(run(), settings.loop)
    except StartupError as exc:
        print(f"chat.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        # Closing the event loop put the signals back to their defaults: a second Ctrl-C or SIGTERM
        # while the interpreter finishes (say, systemd's after ours) must not turn exit 0 into a kill.
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)
    print("chat.py: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
