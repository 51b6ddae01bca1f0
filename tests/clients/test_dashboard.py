"""The dashboard (clients/dashboard) in headless Chromium against a real monitor replaying speech.

``serstream listen --file speech.wav --file speech-44k.wav --loop`` with the
factory model; the page is opened from the monitor itself (the bad-input test
opens the checkout's file with ``?monitor=ws://127.0.0.1:PORT``, the same page
and script). Assertions read the state
the page exposes (``window.serstreamDashboard`` and data-* attributes), not
pixels. A screenshot is kept in test-artifacts/.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from serstream.contract import LABELS
from tests.clients.helpers import start_monitor
from tests.conftest import REPO
from tests.e2e.helpers import Background

pytestmark = pytest.mark.slow

DASHBOARD = REPO / "clients" / "dashboard"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
]
STREAM = "file:speech.wav"
OTHER = "file:speech-44k.wav"


#: The monitors of these tests have a token, as one reachable from a network would.
TOKEN = "dash-token/with+odd=chars"


def _start_monitor(model: Path, wav: Path, port: int, *more: Path) -> Background:
    files = [arg for path in (wav, *more) for arg in ("--file", str(path))]
    return start_monitor(["listen", "--model", str(model), *files, "--loop", "--port", str(port),
                          "--token", TOKEN])


def _served_page(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode("utf-8", "replace")


def _dashboard_url(monitor: Background) -> str:
    """The dashboard URL the monitor printed (with the token in its fragment)."""
    for line in monitor.stderr:
        if "dashboard http://" in line:
            return line.split("dashboard ", 1)[1].split()[0]
    raise AssertionError("the monitor printed no dashboard URL")


def _is_this_dashboard(html: str) -> bool:
    return '<script src="app.js"></script>' in html and 'id="timeline"' in html


@pytest.fixture()
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium (Debian package chromium)")
    with sync_api.sync_playwright() as playwright:
        # executable_path: Playwright must never download a browser of its own.
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


def _state(page: Any, expression: str) -> Any:
    return page.evaluate(f"() => {expression}")


def _bars(page: Any) -> dict[str, float]:
    return page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('#bars .bar')]"
        ".map(el => [el.dataset.label, parseFloat(el.dataset.value)]))"
    )


def _plane(page: Any) -> dict[str, str]:
    return page.evaluate("() => ({...document.getElementById('plane').dataset})")


def test_dashboard_live_view_and_recovery_after_monitor_restart(
    browser: Any, factory_model: Path, speech_wav: Path, speech_wav_44k_stereo: Path, free_port: int
) -> None:
    monitor = _start_monitor(factory_model, speech_wav, free_port, speech_wav_44k_stereo)
    try:
        # The page the monitor serves itself (test_monitor_serves_this_dashboard checks it is this one).
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        # Without the token a browser gets only a page saying one is needed (nothing about streams) ...
        page.goto(f"http://127.0.0.1:{free_port}/")
        assert "needs its token" in page.inner_text("body")
        assert page.evaluate("() => window.serstreamDashboard === undefined")
        # ... and with a wrong one, that page says so.
        page.goto(f"http://127.0.0.1:{free_port}/#token=wrong")
        page.wait_for_selector("body[data-token-refused='true']", timeout=10_000)
        # The URL the monitor printed works: its fragment (never sent to a server) holds the token.
        url = _dashboard_url(monitor)
        assert url.startswith(f"http://127.0.0.1:{free_port}/#token=")
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(url)

        # The token page reloads into the dashboard: until app.js runs there is no serstreamDashboard.
        page.wait_for_function("() => window.serstreamDashboard && window.serstreamDashboard.connected === true",
                               timeout=20_000)
        # The token left the address bar; no request carried it in its URL.
        assert page.evaluate("() => location.hash") == ""
        assert page.evaluate("() => window.serstreamDashboard.hasToken") is True
        assert not [u for u in requests if "token" in u], requests
        assert page.get_attribute("body", "data-connected") == "true"
        page.wait_for_function(
            f"() => (window.serstreamDashboard.streams[{json.dumps(STREAM)}] || {{}}).emotions >= 2",
            timeout=30_000,
        )
        # Both streams are listed, each with a small multiple; the first one heard is selected.
        page.wait_for_function(
            f"() => (window.serstreamDashboard.streams[{json.dumps(OTHER)}] || {{}}).emotions >= 1", timeout=30_000)
        for stream in (STREAM, OTHER):
            assert page.locator(f'#stream-list li[data-stream="{stream}"]').count() == 1
            assert page.locator(f'#multiples .card[data-stream="{stream}"]').count() == 1
        assert page.locator("#multiples .card").count() == 2
        first = _state(page, "window.serstreamDashboard.selected")
        assert first in (STREAM, OTHER)
        # Picking the other stream from the list switches the detail view to it.
        second = OTHER if first == STREAM else STREAM
        page.locator(f'#stream-list li[data-stream="{second}"] button').click()
        page.wait_for_function(f"() => document.getElementById('detail').dataset.stream === {json.dumps(second)}",
                               timeout=5_000)
        assert page.get_attribute(f'#stream-list li[data-stream="{second}"]', "aria-selected") == "true"
        page.locator(f'#stream-list li[data-stream="{STREAM}"] button').click()
        page.wait_for_function(f"() => document.getElementById('detail').dataset.stream === {json.dumps(STREAM)}",
                               timeout=5_000)
        # Bars: one per label the events carry (nothing hard-coded), in the model's order.
        assert list(_bars(page)) == list(LABELS)
        assert _state(page, "window.serstreamDashboard.labels") == list(LABELS)
        mood = page.get_attribute("#mood-label", "data-label")
        assert mood in LABELS

        # Bars and plane move as estimates come in.
        bars_before, plane_before = _bars(page), _plane(page)
        page.wait_for_function(
            "([updates, bars]) => {"
            " const plane = document.getElementById('plane').dataset;"
            " const now = [...document.querySelectorAll('#bars .bar')].map(el => el.dataset.value);"
            " return Number(plane.updates) >= updates + 3 && now.join() !== bars; }",
            arg=[int(plane_before["updates"]), ",".join(f"{v:.4f}" for v in bars_before.values())],
            timeout=30_000,
        )
        plane_after = _plane(page)
        assert int(plane_after["trail"]) >= 3
        assert -1.0 <= float(plane_after["valence"]) <= 1.0 and -1.0 <= float(plane_after["arousal"]) <= 1.0
        assert sum(_bars(page).values()) == pytest.approx(1.0, abs=0.02)

        # The timeline has estimates and shaded speech; stats arrive (every 5 s).
        page.wait_for_function("() => Number(document.getElementById('timeline').dataset.speech) >= 1",
                               timeout=10_000)
        timeline = page.evaluate("() => ({...document.getElementById('timeline').dataset})")
        assert int(timeline["points"]) >= 3
        page.wait_for_function("() => window.serstreamDashboard.stats !== null", timeout=15_000)
        stats = _state(page, "window.serstreamDashboard.stats")
        assert stats["streams"] == 2 and stats["device"] == "cpu" and stats["dropTotal"] >= 0
        assert page.locator('[data-stat="p95"]').inner_text().endswith("ms")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # A reload (the fragment is gone) still works: the HttpOnly cookie /auth set unlocks page and socket.
        page.reload()
        # The token page reloads into the dashboard: until app.js runs there is no serstreamDashboard.
        page.wait_for_function("() => window.serstreamDashboard && window.serstreamDashboard.connected === true",
                               timeout=20_000)
        assert page.evaluate("() => window.serstreamDashboard.hasToken") is False
        assert page.evaluate("() => document.cookie") == ""  # HttpOnly: scripts cannot read it
        page.wait_for_function(
            f"() => (window.serstreamDashboard.streams[{json.dumps(STREAM)}] || {{}}).emotions >= 1", timeout=30_000)

        # The monitor dies: the page says so and keeps retrying.
        emotions_before = _state(page, f"window.serstreamDashboard.streams[{json.dumps(STREAM)}].emotions")
        monitor.kill()
        page.wait_for_function("() => window.serstreamDashboard.connected === false", timeout=15_000)
        page.wait_for_selector("#banner:not([hidden])", timeout=5_000)
        banner = page.locator("#banner").inner_text()
        assert "Disconnected" in banner and "retrying" in banner
        assert page.get_attribute("#banner", "data-state") == "disconnected"
        page.screenshot(path=str(ARTIFACTS / "dashboard-disconnected.png"))

        # It comes back on the same port: the page reconnects and receives events again.
        monitor = _start_monitor(factory_model, speech_wav, free_port, speech_wav_44k_stereo)
        page.wait_for_function("() => window.serstreamDashboard.connects >= 2 && window.serstreamDashboard.connected",
                               timeout=30_000)
        page.wait_for_selector("#banner[hidden]", state="attached", timeout=5_000)
        page.wait_for_function(
            f"() => window.serstreamDashboard.streams[{json.dumps(STREAM)}].emotions >= {emotions_before + 2}",
            timeout=30_000,
        )
        assert _state(page, "window.serstreamDashboard.malformed") == 0
        assert page_errors == []
    finally:
        monitor.kill()


def test_dashboard_survives_bad_and_newer_messages(browser: Any) -> None:
    """Messages fed through the page's own handler (no monitor needed: the page is retrying meanwhile)."""
    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    # Port 9 (discard) has no WebSocket server: the page keeps retrying while we feed it.
    page.goto((DASHBOARD / "index.html").as_uri() + "?monitor=ws://127.0.0.1:9")
    page.wait_for_selector("#banner:not([hidden])", timeout=10_000)
    assert "retrying" in page.locator("#banner").inner_text()

    probs = {label: (0.65 if label == "sad" else 0.05) for label in LABELS}
    good = {"type": "emotion", "v": 1, "stream": "a", "ts": 1.0, "seq": 0, "kind": "final", "utterance": 0,
            "t0": 0.5, "t1": 2.0, "label": "sad", "confidence": 0.65, "probs": probs, "arousal": -0.4,
            "valence": -0.5, "dominance": -0.2, "latency_ms": 12.0, "a_field_from_the_future": [1, 2],
            "smoothed": {"label": "sad", "confidence": 0.6, "probs": probs, "arousal": -0.4, "valence": -0.5,
                         "dominance": -0.2}}
    newer = {**good, "v": 2, "stream": "b"}
    for message in [
        "this is not JSON",
        "[1, 2, 3]",
        json.dumps({"type": "emotion", "v": 1, "stream": "a", "probs": "broken"}),
        json.dumps(good),
        json.dumps({"type": "gossip", "v": 1, "stream": "a", "ts": 2.0}),
        json.dumps(newer),
    ]:
        page.evaluate("(m) => window.serstreamDashboard.inject(m)", message)
    page.wait_for_function("() => document.body.dataset.malformed === '3'", timeout=5_000)
    state = page.evaluate("() => ({m: window.serstreamDashboard.malformed,"
                          " u: window.serstreamDashboard.unknownTypes, v: window.serstreamDashboard.newerSchema,"
                          " s: window.serstreamDashboard.streams})")
    assert state["m"] == 3 and state["u"] == 1 and state["v"] == 2
    assert state["s"]["a"]["label"] == "sad" and state["s"]["b"]["label"] == "sad"
    assert "3 malformed" in page.locator("#status-line").inner_text()
    notice = page.locator("#notice")
    assert notice.is_visible() and "v2" in notice.inner_text()
    page.wait_for_function("() => document.getElementById('mood-label').dataset.label === 'sad'", timeout=5_000)
    assert page_errors == []


def test_monitor_serves_this_dashboard(factory_model: Path, speech_wav: Path, free_port: int) -> None:
    monitor = _start_monitor(factory_model, speech_wav, free_port)
    try:
        html = _served_page(free_port)
    finally:
        monitor.kill()
    assert _is_this_dashboard(html), "the monitor serves the placeholder, not clients/dashboard"
    assert "serstream dashboard" in html


def test_a_lost_connection_ends_the_speaking_badge(browser: Any) -> None:
    """A speech start with no end before the socket closes: the page must not show "speaking" forever."""
    page = browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.goto((DASHBOARD / "index.html").as_uri() + "?monitor=ws://127.0.0.1:9")  # nothing listens: retries
    page.wait_for_selector("#banner:not([hidden])", timeout=10_000)
    start = {"type": "speech", "v": 1, "stream": "a", "ts": 1.0, "seq": 0, "state": "start", "t": 0.5}
    page.evaluate("(m) => window.serstreamDashboard.inject(m)", json.dumps(start))
    assert page.evaluate("() => window.serstreamDashboard.streams.a.speaking") is True
    # The next failed connection attempt (backoff at most 5 s) clears it.
    page.wait_for_function("() => window.serstreamDashboard.streams.a.speaking === false", timeout=15_000)
    assert page_errors == []


def test_dashboard_resumes_with_since_after_a_lost_connection(browser: Any) -> None:
    """A real MonitorServer on a thread: the page's connection is cut while events keep coming."""
    import asyncio
    import threading

    from serstream import events as ev
    from serstream.server import EventBus, MonitorServer

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        bus = EventBus()
        server = MonitorServer(bus, "127.0.0.1", 0, health=dict, metrics=str, dashboard_dir=DASHBOARD)
        await server.start()
        holder.update(bus=bus, server=server, stop=asyncio.Event())
        ready.set()
        await holder["stop"].wait()
        await server.close()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert ready.wait(10)
    bus, server = holder["bus"], holder["server"]

    def on_loop(fn: Any) -> Any:
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), loop).result(10)

    def publish(first: int, count: int) -> None:
        for i in range(first, first + count):
            bus.publish(ev.speech_start("a", t=float(i), ts=1.0))

    def cut_and_publish() -> int:
        conns = list(server._server.connections)
        for conn in conns:
            conn.transport.abort()
        publish(5, 5)  # in the same loop step: the cut connection never sends them
        return len(conns)

    try:
        page = browser.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function("() => window.serstreamDashboard.connected === true", timeout=20_000)
        on_loop(lambda: publish(0, 5))
        page.wait_for_function("() => window.serstreamDashboard.lastId === 5", timeout=10_000)
        assert on_loop(cut_and_publish) == 1
        page.wait_for_function("() => window.serstreamDashboard.disconnects >= 1", timeout=10_000)
        page.wait_for_function("() => window.serstreamDashboard.connected === true", timeout=20_000)
        on_loop(lambda: publish(10, 1))
        page.wait_for_function("() => window.serstreamDashboard.lastId === 11", timeout=10_000)
        state = page.evaluate(
            "() => ({seen: window.serstreamDashboard.eventsSeen, gaps: window.serstreamDashboard.gaps})")
        assert state == {"seen": 11, "gaps": 0}  # every id once: the outage replayed, nothing twice
        # A gap event is counted and shown, never treated as malformed.
        gap = ev.gap_event("*", reason="history", lost=7, since=11, resume_from=19, ts=1.0)
        page.evaluate("(m) => window.serstreamDashboard.inject(m)", json.dumps(gap))
        page.wait_for_function("() => document.body.dataset.eventsLost === '7'", timeout=5_000)
        assert "7 events lost in 1 gaps" in page.locator("#status-line").inner_text()
        assert page.evaluate("() => window.serstreamDashboard.malformed") == 0
        assert page_errors == []
    finally:
        loop.call_soon_threadsafe(lambda: holder["stop"].set())
        thread.join(10)


def test_a_calls_parties_share_one_row_side_by_side(
    browser: Any, factory_model: Path, speech_wav: Path, speech_wav_44k_stereo: Path, free_port: int
) -> None:
    """A real monitor replaying a stereo file as a call (--split-channels) beside a lone mono stream."""
    call = "file:speech-44k.wav"
    caller, callee = f"{call}:caller", f"{call}:callee"
    monitor = start_monitor(["listen", "--model", str(factory_model), "--file", str(speech_wav), "--file",
                             str(speech_wav_44k_stereo), "--split-channels", "--roles", "caller,callee", "--loop",
                             "--port", str(free_port), "--token", TOKEN])
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.goto(_dashboard_url(monitor))
        page.wait_for_function("() => window.serstreamDashboard && window.serstreamDashboard.connected === true",
                               timeout=20_000)
        for stream in (caller, callee, STREAM):
            page.wait_for_function(
                f"() => (window.serstreamDashboard.streams[{json.dumps(stream)}] || {{}}).emotions >= 1",
                timeout=30_000)
        streams = _state(page, "window.serstreamDashboard.streams")
        assert (streams[caller]["call"], streams[caller]["role"]) == (call, "caller")
        assert (streams[callee]["call"], streams[callee]["role"]) == (call, "callee")
        assert streams[STREAM]["call"] is None and streams[STREAM]["role"] is None
        # One row for the call, its parties in the order they opened; the lone stream is a card of its own.
        assert _state(page, "window.serstreamDashboard.calls") == {call: [caller, callee]}
        group = page.locator(f'#multiples .call-group[data-call="{call}"]')
        assert group.count() == 1 and call in group.locator(".call-name").inner_text()
        assert page.locator(f'#multiples > .card[data-stream="{STREAM}"]').count() == 1
        assert page.locator("#multiples .call-group .card").count() == 2
        # Side by side: the same top, the caller left of the callee, both labelled with their roles.
        boxes = {s: page.locator(f'.call-group .card[data-stream="{s}"]').bounding_box() for s in (caller, callee)}
        assert abs(boxes[caller]["y"] - boxes[callee]["y"]) < 1
        assert boxes[caller]["x"] + boxes[caller]["width"] <= boxes[callee]["x"]
        for stream, role in ((caller, "caller"), (callee, "callee")):
            card = page.locator(f'.call-group .card[data-stream="{stream}"]')
            assert card.get_attribute("data-role") == role
            assert card.locator(".card-role").inner_text().lower() == role
        # The detail view names the call and the party.
        page.locator(f'#stream-list li[data-stream="{callee}"] button').click()
        page.wait_for_function(f"() => document.getElementById('detail').dataset.stream === {json.dumps(callee)}",
                               timeout=5_000)
        assert f"call {call}, callee" in page.locator("#detail-meta").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-call.png"), full_page=True)
        assert page_errors == []
    finally:
        monitor.kill()
