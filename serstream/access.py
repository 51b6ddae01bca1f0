"""Who may connect: tokens, origins and connection caps, as pure decisions.

The server (:mod:`serstream.server`) asks these functions and classes what to
do with a request; nothing here touches a socket, a clock or a thread, so
every rule is testable with plain values (``tests/test_access.py``).

The rules (docs/security.md explains the why):

* **Token.** With a token set, every endpoint but ``/healthz`` needs it.
  Programs send ``Authorization: Bearer <token>``. A browser cannot set
  headers on a WebSocket, so the dashboard offers the subprotocol
  ``serstream.bearer.<base64url(token)>`` (plus ``serstream``, which the
  server selects), and the static pages are unlocked by an ``HttpOnly;
  SameSite=Strict`` cookie whose value is derived from the token
  (:func:`dashboard_cookie_value`), set by ``GET /auth`` with the bearer
  header. The token reaches the page in the URL *fragment*
  (``http://host:port/#token=...``), which browsers never send to a server
  and never put in a ``Referer``. Tokens are compared with
  :func:`hmac.compare_digest`.
* **Origin.** A request with an ``Origin`` header (a browser) is accepted
  only from the server's own origin (http or https of the ``Host`` it was
  addressed to; on a loopback bind only loopback host names, which defeats
  DNS rebinding) or an explicitly allowed origin.
* **Caps.** Concurrent ``/events`` subscribers and ``/ingest`` clients are
  capped overall and per remote address (:class:`ConnectionLimits`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = [
    "BEARER_SUBPROTOCOL_PREFIX",
    "COOKIE_NAME",
    "REFUSAL_CAUSES",
    "SUBPROTOCOL",
    "ConnectionLimits",
    "Credentials",
    "LimitsConfig",
    "TokenDecision",
    "bearer_from_header",
    "bearer_subprotocol",
    "cookie_from_header",
    "cookie_name",
    "credentials_ok",
    "dashboard_cookie_value",
    "decide_token",
    "is_loopback_host",
    "is_wildcard_host",
    "normalise_origin",
    "origin_allowed",
    "token_from_subprotocols",
    "token_ok",
]

#: The subprotocol the server selects for browser clients that authenticate with one.
SUBPROTOCOL = "serstream"
#: A browser's token rides in a subprotocol entry: this prefix + base64url(token) without padding.
BEARER_SUBPROTOCOL_PREFIX = "serstream.bearer."
#: The dashboard's cookie (HttpOnly, SameSite=Strict): unlocks the static pages and /events for a browser.
COOKIE_NAME = "serstream_session"

#: Every cause a connection can be refused for (the keys of ``stats.drops`` are ``refused_<cause>``).
REFUSAL_CAUSES: tuple[str, ...] = (
    "unauthorized",
    "forbidden_origin",
    "too_many_subscribers",
    "too_many_subscribers_per_address",
    "too_many_ingest",
    "too_many_ingest_per_address",
    "too_many_handshakes_per_address",
    "handshake_timeout",
)

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})


# --------------------------------------------------------------------------- tokens


def token_ok(expected: str, given: str | None) -> bool:
    """``given`` equals ``expected``, compared in constant time (no timing oracle)."""
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def bearer_from_header(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; ``""`` for another scheme, None when absent.

    ``""`` (present but not a bearer token) never matches a token, so a client
    that sends, say, Basic credentials is refused rather than treated as anonymous.
    """
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else ""


def bearer_subprotocol(token: str) -> str:
    """The subprotocol entry that carries ``token`` (what the dashboard's JavaScript offers)."""
    encoded = base64.urlsafe_b64encode(token.encode("utf-8")).decode("ascii").rstrip("=")
    return BEARER_SUBPROTOCOL_PREFIX + encoded


def token_from_subprotocols(offered: Iterable[str]) -> str | None:
    """The token of the first ``serstream.bearer.*`` entry; ``""`` when it does not decode; None when none."""
    for entry in offered:
        entry = entry.strip()
        if not entry.startswith(BEARER_SUBPROTOCOL_PREFIX):
            continue
        encoded = entry[len(BEARER_SUBPROTOCOL_PREFIX):]
        try:
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
        except (binascii.Error, ValueError):
            return ""
    return None


def dashboard_cookie_value(token: str) -> str:
    """The cookie value for ``token``: an HMAC of it, so the cookie alone is not the bearer token."""
    return hmac.new(token.encode("utf-8"), b"serstream dashboard cookie v1", hashlib.sha256).hexdigest()


def cookie_name(port: int) -> str:
    """The dashboard cookie's name for the monitor on ``port``.

    Cookies are not kept apart by port, so two monitors on one host would
    overwrite each other's cookie under one name.
    """
    return f"{COOKIE_NAME}_{int(port)}"


def cookie_from_header(value: str | None, name: str = COOKIE_NAME) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None."""
    if not value:
        return None
    for part in value.split(";"):
        key, sep, val = part.strip().partition("=")
        if sep and key == name:
            return val.strip().strip('"')
    return None


@dataclass(frozen=True)
class Credentials:
    """What a request presented: a bearer header, a subprotocol token, a dashboard cookie (None: absent)."""

    bearer: str | None = None
    subprotocol: str | None = None
    cookie: str | None = None

    @property
    def presented(self) -> bool:
        """Did the request present anything at all (a wrong thing counts)?"""
        return self.bearer is not None or self.subprotocol is not None or self.cookie is not None


def credentials_ok(expected: str | None, creds: Credentials) -> bool:
    """True when no token is required, or when the request's credentials are right.

    Explicit credentials (the bearer header, the subprotocol entry) decide
    when present, and every one of them must be right: a client with a stale
    header should hear about it, not pass by luck. Only without them does the
    cookie count, since a browser sends its cookie by itself, and a stale one
    (the monitor restarted with a new token) must not spoil the new token the
    page presents.
    """
    if expected is None:
        return True
    explicit = [given for given in (creds.bearer, creds.subprotocol) if given is not None]
    if explicit:
        return all(token_ok(expected, given) for given in explicit)
    return creds.cookie is not None and token_ok(dashboard_cookie_value(expected), creds.cookie)


# --------------------------------------------------------------------------- hosts and origins


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback_host(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` and ``localhost``: only this machine can reach it."""
    name = _strip_brackets(host.strip()).lower()
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_wildcard_host(host: str) -> bool:
    """``0.0.0.0``, ``::`` or empty: every interface."""
    name = _strip_brackets(host.strip())
    if name in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalise_origin(origin: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` -> (scheme, host, port), lower case, default port filled; None if not one.

    ``ws``/``wss`` count as ``http``/``https``. ``null`` (a file:// page, a
    sandboxed frame) and anything else that is not an origin give None.
    """
    text = origin.strip()
    if not text or text.lower() == "null":
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None:
        return None
    return scheme, parts.hostname.lower().rstrip("."), port if port is not None else _DEFAULT_PORTS[scheme]


def _host_header(value: str, default_port: int) -> tuple[str, int] | None:
    try:
        parts = urlsplit("//" + value.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower().rstrip("."), port if port is not None else default_port


def origin_allowed(
    origin: str,
    *,
    host_header: str | None,
    bind_host: str,
    allowlist: Sequence[str] = (),
) -> bool:
    """May a browser page from ``origin`` use this server?

    Allowed: an entry of ``allowlist`` (exact origins; ``null`` allows
    file:// pages), or the server's own origin: the origin's host and port
    equal those of the request's ``Host`` header, with scheme http or https.
    When the server is bound to a loopback address the host must also be a
    loopback name: a web page whose DNS name was re-pointed at 127.0.0.1 (DNS
    rebinding) has an origin that matches its own ``Host`` header and would
    otherwise pass.
    """
    wanted = origin.strip()
    for entry in allowlist:
        if entry.strip().lower() == "null" and wanted.lower() == "null":
            return True
        allowed = normalise_origin(entry)
        if allowed is not None and normalise_origin(wanted) == allowed:
            return True
    parsed = normalise_origin(wanted)
    if parsed is None or host_header is None:
        return False
    _scheme, host, port = parsed
    target = _host_header(host_header, port)
    if target is None or target != (host, port):
        return False
    # On a loopback bind only loopback names: DNS rebinding gives a foreign name our address.
    return not (is_loopback_host(bind_host) and not is_loopback_host(host))


# --------------------------------------------------------------------------- startup decision


@dataclass(frozen=True)
class TokenDecision:
    """What the server does about authentication, and the lines to tell the user."""

    token: str | None
    generated: bool = False
    #: One line to print on stderr (the warning for ``--no-auth`` off loopback), or None.
    warning: str | None = None


def decide_token(
    host: str,
    *,
    flag_token: str | None,
    file_token: str | None,
    env_token: str | None,
    no_auth: bool,
    generate: Callable[[], str],
) -> TokenDecision:
    """Pick the token from ``--token``, ``--token-file``, ``$SERSTREAM_TOKEN`` (that order); decide the default.

    * ``no_auth``: no token; a loud warning when the bind is not loopback.
    * a token given in any of the three ways: that token.
    * none given, loopback bind: no token (only this machine can connect).
    * none given, any other bind: a generated one (``generate()``), so
      ``--host 0.0.0.0`` starts in one command and is never open.

    Raises ValueError (one line) for ``--no-auth`` together with a token.
    """
    given = next((t for t in (flag_token, file_token, env_token) if t), None)
    if no_auth:
        if flag_token or file_token:
            raise ValueError("--no-auth cannot be combined with --token or --token-file")
        warning = None
        if not is_loopback_host(host):
            warning = (f"WARNING: --no-auth on {host}: anyone who can reach this port can read every "
                       "emotion reading and push audio; use a token (see docs/security.md)")
        return TokenDecision(None, False, warning)
    if given:
        return TokenDecision(given, False, None)
    if is_loopback_host(host):
        return TokenDecision(None, False, None)
    return TokenDecision(generate(), True, None)


# --------------------------------------------------------------------------- caps


@dataclass(frozen=True)
class LimitsConfig:
    """Caps on concurrent connections (each >= 1); docs/security.md gives the reasons for the defaults."""

    max_subscribers: int = 256
    max_subscribers_per_address: int = 32
    max_ingest: int = 256
    max_ingest_per_address: int = 64
    #: Connections of one address still in their opening handshake (TLS + HTTP upgrade).
    max_handshakes_per_address: int = 64

    def __post_init__(self) -> None:
        for name in ("max_subscribers", "max_subscribers_per_address", "max_ingest", "max_ingest_per_address",
                     "max_handshakes_per_address"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


@dataclass
class ConnectionLimits:
    """Counts live connections by kind and remote address; says which cap a new one would break.

    Kinds: ``"events"``, ``"ingest"``, ``"handshake"``. :meth:`acquire` either
    takes a slot (returns None) or returns the refusal cause and takes nothing;
    every successful acquire must be paired with one :meth:`release`.
    """

    config: LimitsConfig = field(default_factory=LimitsConfig)
    _total: dict[str, int] = field(default_factory=dict)
    _by_address: dict[tuple[str, str], int] = field(default_factory=dict)

    def count(self, kind: str, address: str | None = None) -> int:
        if address is None:
            return self._total.get(kind, 0)
        return self._by_address.get((kind, address), 0)

    def _caps(self, kind: str) -> tuple[int | None, int, str, str]:
        c = self.config
        if kind == "events":
            return (c.max_subscribers, c.max_subscribers_per_address,
                    "too_many_subscribers", "too_many_subscribers_per_address")
        if kind == "ingest":
            return c.max_ingest, c.max_ingest_per_address, "too_many_ingest", "too_many_ingest_per_address"
        if kind == "handshake":
            return None, c.max_handshakes_per_address, "", "too_many_handshakes_per_address"
        raise ValueError(f"unknown connection kind {kind!r}")

    def check(self, kind: str, address: str) -> str | None:
        """The cause a new ``kind`` connection from ``address`` would be refused for, or None."""
        overall, per_address, overall_cause, address_cause = self._caps(kind)
        if overall is not None and self.count(kind) >= overall:
            return overall_cause
        if self.count(kind, address) >= per_address:
            return address_cause
        return None

    def acquire(self, kind: str, address: str) -> str | None:
        """Take a slot (None) or say why not (the cause; nothing taken)."""
        cause = self.check(kind, address)
        if cause is None:
            self._total[kind] = self._total.get(kind, 0) + 1
            key = (kind, address)
            self._by_address[key] = self._by_address.get(key, 0) + 1
        return cause

    def release(self, kind: str, address: str) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        key = (kind, address)
        left = self._by_address.get(key, 0) - 1
        if left < 0:
            raise ValueError(f"release without acquire: {kind} from {address}")
        if left:
            self._by_address[key] = left
        else:
            del self._by_address[key]
        self._total[kind] = self._total.get(kind, 0) - 1
