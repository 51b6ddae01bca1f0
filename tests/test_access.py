"""The pure access rules of serstream.access: tokens, origins, caps, the startup token decision."""

from __future__ import annotations

import pytest

from serstream.access import (
    ConnectionLimits,
    Credentials,
    LimitsConfig,
    bearer_from_header,
    bearer_subprotocol,
    cookie_from_header,
    credentials_ok,
    dashboard_cookie_value,
    decide_token,
    is_loopback_host,
    is_wildcard_host,
    normalise_origin,
    origin_allowed,
    token_from_subprotocols,
    token_ok,
)

TOKEN = "s3cret-Tök/en+="


def test_token_comparison() -> None:
    assert token_ok(TOKEN, TOKEN)
    assert not token_ok(TOKEN, TOKEN[:-1])
    assert not token_ok(TOKEN, "")
    assert not token_ok(TOKEN, None)


def test_bearer_header() -> None:
    assert bearer_from_header(None) is None
    assert bearer_from_header("Bearer abc") == "abc"
    assert bearer_from_header("  bearer   abc ") == "abc"
    assert bearer_from_header("Basic dXNlcjpwdw==") == ""  # present, not a bearer: never matches


def test_subprotocol_round_trip_and_garbage() -> None:
    entry = bearer_subprotocol(TOKEN)
    # Only RFC 7230 token characters, so a browser accepts it as a subprotocol.
    assert all(c.isalnum() or c in "-_." for c in entry)
    assert token_from_subprotocols(["serstream", entry]) == TOKEN
    assert token_from_subprotocols(["serstream"]) is None
    assert token_from_subprotocols(["serstream.bearer.%%%"]) == ""
    assert token_from_subprotocols(["serstream.bearer.//8"]) == ""  # decodes to bytes that are not UTF-8


def test_cookie_header() -> None:
    assert cookie_from_header(None) is None
    assert cookie_from_header("a=1; serstream_session=xyz; b=2") == "xyz"
    assert cookie_from_header("serstream_sessionx=1") is None


def test_credentials_rule() -> None:
    assert credentials_ok(None, Credentials())  # no token: open
    assert not credentials_ok(TOKEN, Credentials())
    assert credentials_ok(TOKEN, Credentials(bearer=TOKEN))
    assert credentials_ok(TOKEN, Credentials(subprotocol=TOKEN))
    assert credentials_ok(TOKEN, Credentials(cookie=dashboard_cookie_value(TOKEN)))
    assert not credentials_ok(TOKEN, Credentials(cookie=TOKEN))  # the cookie is derived, not the token
    assert not credentials_ok(TOKEN, Credentials(bearer="wrong"))
    # A wrong explicit credential beside a right one is refused: a stale header should be noticed.
    assert not credentials_ok(TOKEN, Credentials(bearer="wrong", subprotocol=TOKEN))
    assert not credentials_ok(TOKEN, Credentials(bearer="wrong", cookie=dashboard_cookie_value(TOKEN)))
    # A stale cookie (the monitor restarted with a new token) does not spoil the new token.
    assert credentials_ok(TOKEN, Credentials(subprotocol=TOKEN, cookie=dashboard_cookie_value("old")))
    assert credentials_ok(TOKEN, Credentials(bearer=TOKEN, cookie="garbage"))
    assert not credentials_ok(TOKEN, Credentials(cookie=dashboard_cookie_value("old")))
    assert Credentials(bearer="").presented and not Credentials().presented


def test_hosts() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost", "LOCALHOST", "app.localhost"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""):
        assert not is_loopback_host(host), host
    assert is_wildcard_host("0.0.0.0") and is_wildcard_host("::") and is_wildcard_host("")
    assert not is_wildcard_host("127.0.0.1")


def test_normalise_origin() -> None:
    assert normalise_origin("http://LocalHost:8765") == ("http", "localhost", 8765)
    assert normalise_origin("https://example.com") == ("https", "example.com", 443)
    assert normalise_origin("wss://example.com") == ("https", "example.com", 443)
    for bad in ("null", "", "file:///x", "http://", "http://a:99999", "http://a/path", "ftp://a"):
        assert normalise_origin(bad) is None, bad


@pytest.mark.parametrize(
    ("origin", "host_header", "bind", "allow", "expected"),
    [
        ("http://127.0.0.1:8765", "127.0.0.1:8765", "127.0.0.1", (), True),
        ("http://localhost:8765", "localhost:8765", "127.0.0.1", (), True),
        ("https://127.0.0.1:8765", "127.0.0.1:8765", "127.0.0.1", (), True),
        ("https://evil.example", "127.0.0.1:8765", "127.0.0.1", (), False),  # cross-site hijacking
        ("http://127.0.0.1:9999", "127.0.0.1:8765", "127.0.0.1", (), False),  # another port, another origin
        # DNS rebinding: evil.example re-pointed at 127.0.0.1; origin and Host agree, but not loopback names.
        ("http://evil.example:8765", "evil.example:8765", "127.0.0.1", (), False),
        ("http://monitor.lan:8765", "monitor.lan:8765", "0.0.0.0", (), True),
        ("http://monitor.lan:8765", None, "0.0.0.0", (), False),
        ("https://app.example", "monitor.lan:8765", "0.0.0.0", ("https://app.example",), True),
        ("https://app.example:443", "x:1", "0.0.0.0", ("https://app.example",), True),
        ("http://app.example", "x:1", "0.0.0.0", ("https://app.example",), False),
        ("null", "127.0.0.1:8765", "127.0.0.1", (), False),
        ("null", "127.0.0.1:8765", "127.0.0.1", ("null",), True),
        ("garbage", "127.0.0.1:8765", "127.0.0.1", (), False),
    ],
)
def test_origin_rule(origin: str, host_header: str | None, bind: str, allow: tuple[str, ...],
                     expected: bool) -> None:
    assert origin_allowed(origin, host_header=host_header, bind_host=bind, allowlist=allow) is expected


def _decide(host: str, **kwargs: object) -> object:
    base: dict[str, object] = {"flag_token": None, "file_token": None, "env_token": None, "no_auth": False,
                               "generate": lambda: "GENERATED"}
    base.update(kwargs)
    return decide_token(host, **base)  # type: ignore[arg-type]


def test_token_decision() -> None:
    d = _decide("127.0.0.1")
    assert (d.token, d.generated, d.warning) == (None, False, None)  # loopback: open to this machine only
    d = _decide("0.0.0.0")
    assert (d.token, d.generated) == ("GENERATED", True)  # off loopback: never open by default
    d = _decide("0.0.0.0", flag_token="a", file_token="b", env_token="c")
    assert (d.token, d.generated) == ("a", False)
    assert _decide("0.0.0.0", file_token="b", env_token="c").token == "b"
    assert _decide("192.168.1.5", env_token="c").token == "c"
    d = _decide("0.0.0.0", no_auth=True)
    assert d.token is None and d.warning is not None and "WARNING" in d.warning
    assert _decide("127.0.0.1", no_auth=True).warning is None
    assert _decide("0.0.0.0", no_auth=True, env_token="c").token is None  # explicit opt-out wins over env
    with pytest.raises(ValueError, match="--no-auth"):
        _decide("0.0.0.0", no_auth=True, flag_token="a")


def test_limits_overall_and_per_address() -> None:
    limits = ConnectionLimits(LimitsConfig(max_subscribers=3, max_subscribers_per_address=2))
    assert limits.acquire("events", "10.0.0.1") is None
    assert limits.acquire("events", "10.0.0.1") is None
    assert limits.acquire("events", "10.0.0.1") == "too_many_subscribers_per_address"
    assert limits.acquire("events", "10.0.0.2") is None
    assert limits.acquire("events", "10.0.0.3") == "too_many_subscribers"
    assert limits.count("events") == 3 and limits.count("events", "10.0.0.1") == 2
    limits.release("events", "10.0.0.1")
    assert limits.acquire("events", "10.0.0.3") is None
    # Ingest is counted apart from subscribers.
    assert limits.acquire("ingest", "10.0.0.1") is None
    with pytest.raises(ValueError, match="release without acquire"):
        limits.release("ingest", "10.0.0.9")


def test_limits_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max-subscribers must be"):
        LimitsConfig(max_subscribers=0)
