/*
 * serstream dashboard: a live view of a monitor's /events WebSocket.
 *
 * Plain browser JavaScript, no build step and no libraries. The page keeps a
 * small model of what it has heard (one record per stream, the last stats)
 * and redraws from it: DOM for the lists, bars and numbers, canvas for the
 * valence-arousal plane, the timeline and the small multiples.
 *
 * It follows the event contract of docs/events.md: unknown fields and event
 * types are ignored, an event of a newer schema version `v` raises one notice
 * and is read for the fields this page knows, and a malformed message is
 * counted and shown in the status line without stopping anything.
 *
 * URL parameters: ?monitor=ws://HOST:PORT (default: the host that served the
 * page) and ?stream=ID (only that stream, as /events?stream=ID).
 *
 * For tests, window.serstreamDashboard exposes the state (connected,
 * eventsSeen, streams, ...) and the DOM carries data-* attributes.
 */
(function () {
  "use strict";

  /** The event schema version this page was written for. */
  const SCHEMA_VERSION = 1;
  const TIMELINE_SECONDS = 60;
  /** Stream-time history kept per stream: a little more than the timeline shows. */
  const HISTORY_SECONDS = 90;
  const MAX_HISTORY_POINTS = 1200;
  const TRAIL_POINTS = 30;
  const MAX_ERRORS_SHOWN = 5;
  /** A time earlier than the last one by more than this means the stream restarted. */
  const RESTART_JUMP_SECONDS = 2;
  /** How far the timeline may run ahead of the last event while a stream is quiet. */
  const MAX_EXTRAPOLATION_SECONDS = 120;
  const BACKOFF_FIRST_S = 0.5;
  const BACKOFF_MAX_S = 5;
  /** Closed streams leave the page after this long (milliseconds). */
  const CLOSED_STREAM_TTL_MS = 5 * 60 * 1000;
  /**
   * Colours by label position (the model's label order), so labels are never
   * hard-coded: with the shipped model's order (neutral, calm, happy, sad,
   * angry, fearful, disgust, surprised) they read grey, teal, yellow, blue,
   * red, purple, green, pink.
   */
  const PALETTE = [
    "#9aa5b8", "#4fc1a6", "#f4c542", "#5b8def", "#ef5b5b", "#a879e0", "#7cc05a", "#ff8fb8",
    "#f08c3a", "#3fc5e8", "#c9a66b", "#e05ab8",
  ];

  // ------------------------------------------------------------------ state

  const params = new URLSearchParams(location.search);
  // The monitor's token comes in the URL fragment (#token=...), which browsers never send to a
  // server nor put in a Referer. It goes to the monitor only as a WebSocket subprotocol entry
  // ("serstream.bearer.<base64url>"), and leaves the address bar at once. A page served by the
  // monitor itself was unlocked by an HttpOnly cookie (set by /auth), which a reload reuses.
  const token = takeToken();
  const state = {
    url: eventsUrl(params),
    connected: false,
    connects: 0,
    disconnects: 0,
    attempt: 0,
    retryAt: null,
    lastCloseReason: "",
    eventsSeen: 0,
    lastId: null,        // the last bus event id seen: a reconnect asks for what came after it
    gaps: 0,             // gap events received, and the events they say are lost
    eventsLost: 0,
    malformed: 0,
    lastMalformed: "",
    unknownTypes: 0,
    newerSchema: null,
    labels: [],
    streams: new Map(),
    streamsMade: 0,
    selected: null,
    stats: null,
  };

  function takeToken() {
    const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (!match) return null;
    let value;
    try {
      value = decodeURIComponent(match[1]);
    } catch (err) {
      return null;
    }
    try {
      history.replaceState(null, "", location.pathname + location.search);
    } catch (err) { /* a file:// page may refuse; the token still works */ }
    return value || null;
  }

  function tokenProtocols() {
    const bytes = new TextEncoder().encode(token);
    let binary = "";
    bytes.forEach(function (b) { binary += String.fromCharCode(b); });
    const encoded = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    return ["serstream", "serstream.bearer." + encoded];
  }

  function eventsUrl(search) {
    let base = search.get("monitor");
    if (!base) {
      if (location.protocol === "http:" || location.protocol === "https:") {
        base = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
      } else {
        base = "ws://127.0.0.1:8765"; // opened from a file: the default monitor
      }
    }
    base = base.replace(/\/+$/, "");
    if (!/\/events$/.test(base)) base += "/events";
    const stream = search.get("stream");
    return stream ? base + "?stream=" + encodeURIComponent(stream) : base;
  }

  function newStream(id) {
    return {
      id: id,
      open: true,
      closedAt: null,
      closedReason: "",
      source: "",
      codec: "",
      sampleRate: null,
      detail: "",
      call: null,          // the call this stream is one party of (schema 1.2), and its role in it
      role: null,
      order: state.streamsMade++,  // first seen: a call's parties show in the order they opened
      mood: null,          // smoothed: {label, confidence, probs, arousal, valence, dominance}
      last: null,          // last estimate: {label, confidence, probs, arousal, valence, kind, t0, t1, latency}
      emotions: 0,
      trail: [],           // [{valence, arousal}] of recent estimates
      history: [],         // [{t0, t1, label, arousal, valence}] on the stream clock
      speech: [],          // [{start, end|null}]
      speaking: false,
      lastT: null,         // latest stream time heard
      lastTAt: 0,          // performance.now() when it was heard
      errors: new Map(),   // code -> {message, count}
      planeUpdates: 0,
    };
  }

  function streamFor(id) {
    let st = state.streams.get(id);
    if (!st) {
      st = newStream(id);
      state.streams.set(id, st);
      if (state.selected === null) state.selected = id;
      dirty.lists = true;
    }
    return st;
  }

  function noteLabels(probs) {
    for (const label of Object.keys(probs)) {
      if (!state.labels.includes(label)) {
        state.labels.push(label);
        dirty.legend = true;
      }
    }
  }

  function colorOf(label) {
    const index = state.labels.indexOf(label);
    return index < 0 ? "#cccccc" : PALETTE[index % PALETTE.length];
  }

  // ------------------------------------------------------------------ validation helpers

  class Malformed extends Error {}

  function num(value, name) {
    if (typeof value !== "number" || !Number.isFinite(value)) {
      throw new Malformed(name + " is not a number");
    }
    return value;
  }

  function str(value, name) {
    if (typeof value !== "string") throw new Malformed(name + " is not a string");
    return value;
  }

  function probsOf(value, name) {
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new Malformed(name + " is not an object");
    }
    const out = {};
    for (const [label, p] of Object.entries(value)) out[label] = num(p, name + "." + label);
    if (Object.keys(out).length === 0) throw new Malformed(name + " is empty");
    return out;
  }

  function moodOf(value, name) {
    if (value === null || typeof value !== "object") throw new Malformed(name + " is not an object");
    return {
      label: str(value.label, name + ".label"),
      confidence: num(value.confidence, name + ".confidence"),
      probs: probsOf(value.probs, name + ".probs"),
      arousal: num(value.arousal, name + ".arousal"),
      valence: num(value.valence, name + ".valence"),
      dominance: typeof value.dominance === "number" ? value.dominance : null,
    };
  }

  // ------------------------------------------------------------------ events in

  function handleMessage(data) {
    let event;
    try {
      if (typeof data !== "string") throw new Malformed("binary message");
      event = JSON.parse(data);
      if (event === null || typeof event !== "object" || Array.isArray(event)) {
        throw new Malformed("not a JSON object");
      }
      str(event.type, "type");
      if (event.v !== undefined && typeof event.v !== "number") throw new Malformed("v is not a number");
    } catch (err) {
      countMalformed(err instanceof SyntaxError ? "invalid JSON" : err.message);
      return;
    }
    state.eventsSeen += 1;
    if (Number.isInteger(event.id) && event.id >= 1) state.lastId = event.id;
    if (typeof event.v === "number" && event.v > SCHEMA_VERSION && state.newerSchema === null) {
      state.newerSchema = event.v;
      dirty.notice = true;
    }
    try {
      switch (event.type) {
        case "emotion": onEmotion(event); break;
        case "speech": onSpeech(event); break;
        case "stream": onStream(event); break;
        case "stats": onStats(event); break;
        case "error": onError(event); break;
        case "gap": onGap(event); break;
        default: state.unknownTypes += 1; // newer event types are ignored by contract
      }
    } catch (err) {
      // A bad event is counted, never allowed to break the page.
      countMalformed(event.type + ": " + (err instanceof Malformed ? err.message : String(err)));
    }
    dirty.status = true;
    scheduleRender();
  }

  function onGap(event) {
    // Events this page will never see (they left the monitor's history, or it read too slowly).
    state.gaps += 1;
    state.eventsLost += typeof event.lost === "number" ? event.lost : 0;
  }

  function countMalformed(reason) {
    state.malformed += 1;
    state.lastMalformed = reason;
    dirty.status = true;
    scheduleRender();
  }

  function streamId(event) {
    return str(event.stream, "stream");
  }

  /** Moves the stream clock; a big step backwards means the stream (or monitor) restarted. */
  function advanceClock(st, t) {
    if (st.lastT !== null && t < st.lastT - RESTART_JUMP_SECONDS) resetTimeline(st);
    if (st.lastT === null || t >= st.lastT) {
      st.lastT = t;
      st.lastTAt = performance.now();
    }
  }

  function resetTimeline(st) {
    st.history = [];
    st.speech = [];
    st.trail = [];
    st.speaking = false;
    st.lastT = null;
  }

  function prune(st) {
    if (st.lastT === null) return;
    const horizon = st.lastT - HISTORY_SECONDS;
    while (st.history.length && (st.history[0].t1 < horizon || st.history.length > MAX_HISTORY_POINTS)) {
      st.history.shift();
    }
    while (st.speech.length && st.speech[0].end !== null && st.speech[0].end < horizon) st.speech.shift();
  }

  function onEmotion(event) {
    const id = streamId(event);
    const t0 = num(event.t0, "t0");
    const t1 = num(event.t1, "t1");
    const probs = probsOf(event.probs, "probs");
    const last = {
      label: str(event.label, "label"),
      confidence: num(event.confidence, "confidence"),
      probs: probs,
      arousal: num(event.arousal, "arousal"),
      valence: num(event.valence, "valence"),
      kind: event.kind === "final" ? "final" : "partial",
      t0: t0,
      t1: t1,
      latency: typeof event.latency_ms === "number" ? event.latency_ms : null,
    };
    const mood = event.smoothed !== undefined ? moodOf(event.smoothed, "smoothed") : null;
    const st = streamFor(id);
    noteParty(st, event);
    noteLabels(probs);
    st.open = true;
    st.closedAt = null;
    advanceClock(st, t1);
    st.last = last;
    st.mood = mood || {
      label: last.label, confidence: last.confidence, probs: probs,
      arousal: last.arousal, valence: last.valence, dominance: null,
    };
    st.emotions += 1;
    st.trail.push({ valence: last.valence, arousal: last.arousal });
    if (st.trail.length > TRAIL_POINTS) st.trail.shift();
    st.planeUpdates += 1;
    const openSegment = st.speech.length && st.speech[st.speech.length - 1].end === null;
    if (last.kind === "partial" && !openSegment) {
      // Partials only come while someone speaks: joined mid-utterance, the start was missed.
      const previousEnd = st.speech.length ? st.speech[st.speech.length - 1].end : -Infinity;
      st.speech.push({ start: Math.max(t0, previousEnd), end: null });
      st.speaking = true;
    }
    // Each estimate colours the timeline from the previous one's end, so the
    // overlapping partial windows do not paint over each other.
    const previous = st.history.length ? st.history[st.history.length - 1].t1 : -Infinity;
    st.history.push({
      t0: Math.max(t0, Math.min(previous, t1)),
      t1: t1,
      label: last.label,
      arousal: last.arousal,
      valence: last.valence,
    });
    prune(st);
    dirty.streams.add(id);
  }

  function onSpeech(event) {
    const id = streamId(event);
    const t = num(event.t, "t");
    const speechState = str(event.state, "state");
    const st = streamFor(id);
    advanceClock(st, t);
    const open = st.speech.length ? st.speech[st.speech.length - 1] : null;
    if (speechState === "start") {
      if (open && open.end === null) open.end = t;
      st.speech.push({ start: t, end: null });
      st.speaking = true;
    } else if (speechState === "end") {
      if (open && open.end === null) {
        open.end = t;
      } else {
        // The start was missed (connected mid-utterance): rebuild it from the duration.
        const duration = typeof event.duration === "number" ? event.duration : 0;
        st.speech.push({ start: Math.max(0, t - duration), end: t });
      }
      st.speaking = false;
    }
    prune(st);
    dirty.streams.add(id);
  }

  /** A call's party: group it with the other parties of its call (a change regroups the cards). */
  function noteParty(st, event) {
    const call = typeof event.call === "string" && event.call ? event.call : null;
    const role = typeof event.role === "string" && event.role ? event.role : null;
    if (call === null) return;
    if (st.call !== call || st.role !== role) {
      st.call = call;
      st.role = role;
      dirty.lists = true;
    }
  }

  function onStream(event) {
    const id = streamId(event);
    const streamState = str(event.state, "state");
    const st = streamFor(id);
    if (typeof event.source === "string") st.source = event.source;
    if (typeof event.codec === "string") st.codec = event.codec;
    if (typeof event.sample_rate === "number") st.sampleRate = event.sample_rate;
    if (typeof event.detail === "string") st.detail = event.detail;
    noteParty(st, event);
    if (streamState === "open") {
      if (!st.open || st.lastT !== null) resetTimeline(st);
      st.open = true;
      st.closedAt = null;
      st.closedReason = "";
      st.mood = null;
      st.last = null;
    } else if (streamState === "closed") {
      st.open = false;
      st.speaking = false;
      st.closedAt = Date.now();
      st.closedReason = typeof event.reason === "string" ? event.reason : "";
    }
    dirty.lists = true;
    dirty.streams.add(id);
  }

  function onStats(event) {
    const latency = event.latency_ms || {};
    const batches = event.batches || {};
    const drops = event.drops && typeof event.drops === "object" ? event.drops : {};
    let dropTotal = 0;
    for (const value of Object.values(drops)) if (typeof value === "number") dropTotal += value;
    state.stats = {
      streams: num(event.streams, "streams"),
      windowsPerS: typeof event.windows_per_s === "number" ? event.windows_per_s : null,
      p50: typeof latency.p50 === "number" ? latency.p50 : null,
      p95: typeof latency.p95 === "number" ? latency.p95 : null,
      p99: typeof latency.p99 === "number" ? latency.p99 : null,
      batchMean: typeof batches.mean_size === "number" ? batches.mean_size : null,
      batchMax: typeof batches.max_size === "number" ? batches.max_size : null,
      batchCount: typeof batches.count === "number" ? batches.count : null,
      drops: drops,
      dropTotal: dropTotal,
      device: typeof event.device === "string" ? event.device : "",
      uptime: typeof event.uptime_s === "number" ? event.uptime_s : null,
      queues: event.queues && typeof event.queues === "object" ? event.queues : {},
    };
    dirty.stats = true;
  }

  function onError(event) {
    const id = streamId(event);
    const code = str(event.code, "code");
    const st = streamFor(id);
    st.errors.set(code, {
      message: typeof event.message === "string" ? event.message : code,
      count: typeof event.count === "number" ? event.count : 1,
    });
    dirty.streams.add(id);
  }

  // ------------------------------------------------------------------ connection

  let socket = null;

  function connect() {
    state.retryAt = null;
    let ws;
    try {
      const target = withSince(state.url, state.lastId);
      ws = token ? new WebSocket(target, tokenProtocols()) : new WebSocket(target);
    } catch (err) {
      state.lastCloseReason = "invalid monitor URL " + state.url + ": " + err.message;
      scheduleReconnect();
      return;
    }
    socket = ws;
    ws.onopen = function () {
      if (socket !== ws) return;
      state.connected = true;
      state.connects += 1;
      state.attempt = 0;
      state.lastCloseReason = "";
      dirty.connection = dirty.status = true;
      scheduleRender();
    };
    ws.onmessage = function (message) {
      if (socket === ws) handleMessage(message.data);
    };
    ws.onerror = function () {
      // onclose follows with the details; nothing to do twice.
    };
    ws.onclose = function (closeEvent) {
      if (socket !== ws) return;
      socket = null;
      if (state.connected) state.disconnects += 1;
      state.connected = false;
      // With the monitor gone nobody is known to be speaking: no "end" event will come.
      for (const [id, st] of state.streams) {
        if (st.speaking) {
          st.speaking = false;
          dirty.streams.add(id);
        }
      }
      state.lastCloseReason = closeEvent.code === 1006 || !closeEvent.code
        ? "connection lost or refused"
        : "closed (" + closeEvent.code + (closeEvent.reason ? " " + closeEvent.reason : "") + ")";
      scheduleReconnect();
    };
  }

  /** The events URL asking for the events after `lastId` (the server replays them, or says they are gone). */
  function withSince(url, lastId) {
    if (lastId === null) return url;
    return url + (url.indexOf("?") >= 0 ? "&" : "?") + "since=" + String(lastId);
  }

  function scheduleReconnect() {
    state.connected = false;
    const base = Math.min(BACKOFF_MAX_S, BACKOFF_FIRST_S * Math.pow(2, state.attempt));
    // Jitter keeps many open dashboards from reconnecting in lockstep.
    const delay = base * (0.8 + 0.4 * Math.random());
    state.attempt += 1;
    state.retryAt = performance.now() + delay * 1000;
    setTimeout(connect, delay * 1000);
    dirty.connection = dirty.status = true;
    scheduleRender();
  }

  // ------------------------------------------------------------------ rendering

  const $ = (id) => document.getElementById(id);
  const dom = {
    connection: $("connection"),
    banner: $("banner"),
    notice: $("notice"),
    list: $("stream-list"),
    noStreams: $("no-streams"),
    detail: $("detail"),
    name: $("detail-name"),
    meta: $("detail-meta"),
    moodLabel: $("mood-label"),
    moodConfidence: $("mood-confidence"),
    moodSub: $("mood-sub"),
    speaking: $("speaking"),
    bars: $("bars"),
    plane: $("plane"),
    timeline: $("timeline"),
    legend: $("legend"),
    errors: $("errors"),
    multiples: $("multiples"),
    status: $("status-line"),
  };
  const listItems = new Map();   // stream id -> {li, name, tag, swatch}
  const cards = new Map();       // stream id -> {card, name, mood, canvas}
  const callGroups = new Map();  // call id -> {group, parties}: one row per call, its parties side by side
  const barRows = new Map();     // label -> {row, fill, tick, value}
  const dirty = {
    connection: true, status: true, stats: true, notice: false, lists: true, legend: true,
    streams: new Set(),
  };
  let renderPending = false;

  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(render);
  }

  function render() {
    renderPending = false;
    try {
      expireClosedStreams();
      if (dirty.connection) renderConnection();
      if (dirty.notice) renderNotice();
      if (dirty.stats) renderStats();
      if (dirty.lists) renderLists();
      if (dirty.legend) renderLegend();
      for (const id of dirty.streams) renderStreamSummary(id);
      renderDetail();
      if (dirty.status) renderStatus();
    } catch (err) {
      // Drawing must never stop the page; the next event or tick tries again.
      state.lastMalformed = "render: " + err.message;
    }
    dirty.connection = dirty.notice = dirty.stats = dirty.lists = dirty.legend = dirty.status = false;
    dirty.streams.clear();
  }

  function renderConnection() {
    const body = document.body;
    body.dataset.connected = String(state.connected);
    dom.connection.dataset.state = state.connected ? "connected" : (state.connects ? "disconnected" : "connecting");
    dom.connection.textContent = state.connected ? "connected" : (state.connects ? "disconnected" : "connecting…");
    dom.connection.title = state.url;
    if (state.connected) {
      dom.banner.hidden = true;
      dom.banner.dataset.state = "connected";
    } else if (state.retryAt !== null) {
      const seconds = Math.max(0, Math.ceil((state.retryAt - performance.now()) / 1000));
      dom.banner.hidden = false;
      dom.banner.dataset.state = "disconnected";
      const what = state.connects ? "Disconnected" : "Cannot reach the monitor";
      dom.banner.textContent = what + " — retrying" + (seconds > 0 ? " in " + seconds + " s" : "…") +
        " (attempt " + state.attempt + ", " + state.url +
        (state.lastCloseReason ? ": " + state.lastCloseReason : "") + ")";
    }
  }

  function renderNotice() {
    if (state.newerSchema === null) return;
    dom.notice.hidden = false;
    dom.notice.dataset.schema = String(state.newerSchema);
    dom.notice.textContent = "The monitor sends event schema v" + state.newerSchema +
      "; this dashboard was written for v" + SCHEMA_VERSION +
      " and shows only the fields it knows. Update the dashboard for the rest.";
  }

  function fmt(value, digits, unit) {
    if (value === null || value === undefined) return "–";
    return value.toFixed(digits) + (unit || "");
  }

  function duration(seconds) {
    if (seconds === null) return "–";
    if (seconds < 120) return Math.round(seconds) + " s";
    if (seconds < 7200) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function setStat(name, text, warn, title) {
    const cell = document.querySelector('[data-stat="' + name + '"]');
    cell.textContent = text;
    cell.classList.toggle("warn", Boolean(warn));
    cell.title = title || "";
  }

  function renderStats() {
    const s = state.stats;
    if (!s) return;
    setStat("streams", String(s.streams));
    setStat("windows_per_s", fmt(s.windowsPerS, 1));
    setStat("p50", fmt(s.p50, 0, " ms"));
    setStat("p95", fmt(s.p95, 0, " ms"), s.p95 !== null && s.p95 > 500);
    setStat("batches", fmt(s.batchMean, 1) + " / " + (s.batchMax === null ? "–" : s.batchMax),
      false, s.batchCount === null ? "" : s.batchCount + " batches since start");
    const causes = Object.entries(s.drops).map(([k, v]) => k + ": " + v).join(", ");
    setStat("drops", String(s.dropTotal), s.dropTotal > 0, causes || "nothing dropped");
    setStat("device", s.device || "–");
    setStat("uptime", duration(s.uptime));
    const statsBox = $("stats");
    statsBox.dataset.streams = String(s.streams);
    statsBox.dataset.p50 = String(s.p50);
    statsBox.dataset.drops = String(s.dropTotal);
  }

  function sortedStreams() {
    return Array.from(state.streams.values()).sort((a, b) =>
      (a.open === b.open ? 0 : a.open ? -1 : 1) || a.id.localeCompare(b.id));
  }

  /** The call's row in "All streams": a header with the call id, then a card per party. */
  function callGroup(call) {
    let entry = callGroups.get(call);
    if (!entry) {
      const group = document.createElement("div");
      group.className = "call-group";
      group.dataset.call = call;
      const head = document.createElement("div");
      head.className = "call-name";
      head.textContent = "call " + call;
      head.title = call;
      const parties = document.createElement("div");
      parties.className = "parties";
      group.append(head, parties);
      entry = { group: group, parties: parties };
      callGroups.set(call, entry);
    }
    return entry;
  }

  function select(id) {
    state.selected = id;
    dirty.lists = true;
    dirty.legend = true;
    scheduleRender();
  }

  function renderLists() {
    const streams = sortedStreams();
    dom.noStreams.hidden = streams.length > 0;
    dom.detail.hidden = streams.length === 0;
    if (state.selected !== null && !state.streams.has(state.selected)) {
      state.selected = streams.length ? streams[0].id : null;
    }
    for (const [id, item] of listItems) {
      if (!state.streams.has(id)) { item.li.remove(); listItems.delete(id); }
    }
    for (const [id, card] of cards) {
      if (!state.streams.has(id)) { card.card.remove(); cards.delete(id); }
    }
    // A call's parties share one row, in the order they opened; the row sits where its first party sorts.
    const byCall = new Map();
    for (const st of streams) {
      if (st.call === null) continue;
      if (!byCall.has(st.call)) byCall.set(st.call, []);
      byCall.get(st.call).push(st);
    }
    for (const [call, entry] of callGroups) {
      if (!byCall.has(call)) { entry.group.remove(); callGroups.delete(call); }
    }
    for (const st of streams) {
      let item = listItems.get(st.id);
      if (!item) item = makeListItem(st.id);
      dom.list.appendChild(item.li); // re-appending keeps the sorted order
      let card = cards.get(st.id);
      if (!card) card = makeCard(st.id);
      if (st.call === null) {
        dom.multiples.appendChild(card.card);
      } else {
        const group = callGroup(st.call);
        const parties = byCall.get(st.call);
        if (parties[0] === st) {
          dom.multiples.appendChild(group.group);
          parties.slice().sort((a, b) => a.order - b.order)
            .forEach((party) => {
              const partyCard = cards.get(party.id) || makeCard(party.id);
              group.parties.appendChild(partyCard.card);
            });
        }
      }
      renderStreamSummary(st.id);
    }
  }

  function makeListItem(id) {
    const li = document.createElement("li");
    li.dataset.stream = id;
    const button = document.createElement("button");
    button.type = "button";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = id;
    name.title = id;
    const tag = document.createElement("span");
    tag.className = "tag";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    const role = document.createElement("span");
    role.className = "role";
    role.hidden = true;
    button.append(role, name, tag);
    button.addEventListener("click", () => select(id));
    li.appendChild(button);
    const item = { li: li, tag: tag, swatch: swatch, role: role };
    listItems.set(id, item);
    return item;
  }

  function makeCard(id) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.stream = id;
    const head = document.createElement("div");
    head.className = "card-head";
    const name = document.createElement("span");
    name.className = "card-name";
    name.textContent = id;
    name.title = id;
    const role = document.createElement("span");
    role.className = "card-role";
    role.hidden = true;
    const conf = document.createElement("span");
    conf.className = "muted";
    head.append(role, name, conf);
    const mood = document.createElement("div");
    mood.className = "card-mood";
    const canvas = document.createElement("canvas");
    canvas.width = 210;
    canvas.height = 56;
    card.append(head, mood, canvas);
    card.addEventListener("click", () => select(id));
    const entry = { card: card, conf: conf, mood: mood, canvas: canvas, role: role };
    cards.set(id, entry);
    return entry;
  }

  function renderStreamSummary(id) {
    const st = state.streams.get(id);
    if (!st) return;
    const item = listItems.get(id);
    const card = cards.get(id);
    const label = st.mood ? st.mood.label : "";
    const selected = id === state.selected;
    if (item) {
      item.li.dataset.open = String(st.open);
      item.li.dataset.label = label;
      item.li.setAttribute("aria-selected", String(selected));
      item.tag.textContent = "";
      if (label) {
        item.swatch.style.background = colorOf(label);
        item.tag.append(item.swatch, document.createTextNode(label));
      } else {
        item.tag.textContent = st.open ? (st.speaking ? "speaking" : "waiting") : "closed";
      }
    }
    if (item) {
      if (st.call !== null) item.li.dataset.call = st.call; else delete item.li.dataset.call;
      item.role.textContent = st.role || "";
      item.role.hidden = !st.role;
    }
    if (card) {
      if (st.role) card.card.dataset.role = st.role; else delete card.card.dataset.role;
      card.role.textContent = st.role || "";
      card.role.hidden = !st.role;
      card.card.dataset.open = String(st.open);
      card.card.dataset.label = label;
      card.card.setAttribute("aria-pressed", String(selected));
      card.mood.textContent = label || (st.open ? "waiting for speech" : "closed");
      card.mood.style.color = label ? colorOf(label) : "";
      card.conf.textContent = st.mood ? st.mood.confidence.toFixed(2) : "";
      drawCard(card.canvas, st);
    }
  }

  function renderLegend() {
    dom.legend.textContent = "";
    for (const label of state.labels) {
      const span = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colorOf(label);
      span.append(swatch, document.createTextNode(label));
      dom.legend.appendChild(span);
    }
  }

  function renderDetail() {
    const st = state.selected === null ? null : state.streams.get(state.selected);
    if (!st) return;
    dom.detail.dataset.stream = st.id;
    dom.name.textContent = st.id;
    const meta = [];
    if (st.source) meta.push(st.source);
    if (st.codec) meta.push(st.codec);
    if (st.sampleRate) meta.push(st.sampleRate + " Hz");
    if (st.detail) meta.push(st.detail);
    if (st.call !== null) meta.push("call " + st.call + (st.role ? ", " + st.role : ""));
    if (!st.open) meta.push("closed" + (st.closedReason ? ": " + st.closedReason : ""));
    dom.meta.textContent = meta.join(" · ");
    if (st.mood) {
      dom.moodLabel.textContent = st.mood.label;
      dom.moodLabel.style.color = colorOf(st.mood.label);
      dom.moodConfidence.textContent = (st.mood.confidence * 100).toFixed(0) + "%";
      dom.moodLabel.dataset.label = st.mood.label;
      dom.moodLabel.dataset.confidence = String(st.mood.confidence);
    } else {
      dom.moodLabel.textContent = "–";
      dom.moodLabel.style.color = "";
      dom.moodConfidence.textContent = "";
      dom.moodLabel.dataset.label = "";
      dom.moodLabel.dataset.confidence = "";
    }
    if (st.last) {
      dom.moodSub.textContent = "last " + st.last.kind + " estimate: " + st.last.label + " " +
        st.last.confidence.toFixed(2) + " · arousal " + signed(st.last.arousal) +
        " · valence " + signed(st.last.valence) + " · t " + st.last.t0.toFixed(1) + "–" +
        st.last.t1.toFixed(1) + " s" + (st.last.latency === null ? "" : " · " + st.last.latency.toFixed(0) + " ms") +
        " · " + st.emotions + " estimates";
    } else {
      dom.moodSub.textContent = st.open ? "no estimate yet" : "";
    }
    dom.speaking.dataset.speaking = String(st.speaking);
    dom.speaking.textContent = st.speaking ? "speaking" : "silent";
    renderBars(st);
    drawPlane(dom.plane, st);
    drawTimeline(dom.timeline, st);
    renderErrors(st);
  }

  function signed(x) {
    return (x >= 0 ? "+" : "") + x.toFixed(2);
  }

  function renderBars(st) {
    const probs = st.last ? st.last.probs : {};
    const smoothed = st.mood ? st.mood.probs : {};
    for (const label of state.labels) {
      let row = barRows.get(label);
      if (!row) {
        const el = document.createElement("div");
        el.className = "bar";
        el.dataset.label = label;
        const name = document.createElement("span");
        name.className = "bar-label";
        name.textContent = label;
        const track = document.createElement("div");
        track.className = "track";
        const fill = document.createElement("div");
        fill.className = "fill";
        fill.style.background = colorOf(label);
        const tick = document.createElement("div");
        tick.className = "tick";
        track.append(fill, tick);
        const value = document.createElement("span");
        value.className = "value";
        el.append(name, track, value);
        dom.bars.appendChild(el);
        row = { el: el, fill: fill, tick: tick, value: value };
        barRows.set(label, row);
      }
      const p = typeof probs[label] === "number" ? probs[label] : 0;
      const s = typeof smoothed[label] === "number" ? smoothed[label] : null;
      row.el.dataset.value = p.toFixed(4);
      row.fill.style.width = (Math.max(0, Math.min(1, p)) * 100).toFixed(1) + "%";
      row.tick.hidden = s === null;
      if (s !== null) row.tick.style.left = "calc(" + (Math.max(0, Math.min(1, s)) * 100).toFixed(1) + "% - 1px)";
      row.value.textContent = p.toFixed(2);
    }
  }

  function renderErrors(st) {
    dom.errors.textContent = "";
    let shown = 0;
    for (const [code, info] of st.errors) {
      if (shown++ >= MAX_ERRORS_SHOWN) break;
      const li = document.createElement("li");
      li.dataset.code = code;
      li.textContent = "⚠ " + code + ": " + info.message + " (×" + info.count + ")";
      dom.errors.appendChild(li);
    }
  }

  function renderStatus() {
    const parts = [];
    parts.push(state.connected ? "connected to " + state.url : "not connected (" + state.url + ")");
    parts.push(state.eventsSeen + " events");
    parts.push(state.streams.size + " streams");
    if (state.disconnects) parts.push(state.disconnects + " reconnects");
    if (state.gaps) parts.push(state.eventsLost + " events lost in " + state.gaps + " gaps");
    if (state.unknownTypes) parts.push(state.unknownTypes + " of unknown types ignored");
    dom.status.textContent = parts.join(" · ");
    if (state.malformed) {
      const bad = document.createElement("span");
      bad.className = "bad";
      bad.dataset.malformed = String(state.malformed);
      bad.textContent = " · " + state.malformed + " malformed (last: " + state.lastMalformed + ")";
      dom.status.appendChild(bad);
    }
    const body = document.body;
    body.dataset.eventsSeen = String(state.eventsSeen);
    body.dataset.eventsLost = String(state.eventsLost);
    body.dataset.malformed = String(state.malformed);
    body.dataset.streams = String(state.streams.size);
  }

  function expireClosedStreams() {
    const now = Date.now();
    for (const [id, st] of state.streams) {
      if (!st.open && st.closedAt !== null && now - st.closedAt > CLOSED_STREAM_TTL_MS) {
        state.streams.delete(id);
        dirty.lists = true;
      }
    }
  }

  // ------------------------------------------------------------------ canvas drawing

  /** Sizes the canvas backing store to its CSS size times the pixel ratio; returns a 2-D context in CSS pixels. */
  function context2d(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth || canvas.width));
    const height = Math.max(1, Math.round(canvas.clientHeight || canvas.height));
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    return { ctx: ctx, width: width, height: height };
  }

  function drawPlane(canvas, st) {
    const { ctx, width, height } = context2d(canvas);
    const pad = 22;
    const size = Math.min(width, height) - 2 * pad;
    const cx = width / 2;
    const cy = height / 2;
    const x = (v) => cx + v * size / 2;
    const y = (a) => cy - a * size / 2;
    ctx.strokeStyle = "#2e3848";
    ctx.lineWidth = 1;
    ctx.strokeRect(cx - size / 2, cy - size / 2, size, size);
    ctx.beginPath();
    ctx.moveTo(cx - size / 2, cy); ctx.lineTo(cx + size / 2, cy);
    ctx.moveTo(cx, cy - size / 2); ctx.lineTo(cx, cy + size / 2);
    ctx.stroke();
    ctx.fillStyle = "#8d99ab";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("arousal +", cx, pad - 8);
    ctx.fillText("arousal −", cx, height - 6);
    ctx.save();
    ctx.translate(10, cy); ctx.rotate(-Math.PI / 2); ctx.fillText("valence −", 0, 0);
    ctx.restore();
    ctx.save();
    ctx.translate(width - 8, cy); ctx.rotate(Math.PI / 2); ctx.fillText("valence +", 0, 0);
    ctx.restore();

    const trail = st.trail;
    for (let i = 1; i < trail.length; i++) {
      const alpha = 0.15 + 0.6 * i / trail.length;
      ctx.strokeStyle = "rgba(72, 219, 251, " + alpha.toFixed(3) + ")";
      ctx.beginPath();
      ctx.moveTo(x(trail[i - 1].valence), y(trail[i - 1].arousal));
      ctx.lineTo(x(trail[i].valence), y(trail[i].arousal));
      ctx.stroke();
    }
    for (let i = 0; i < trail.length; i++) {
      const alpha = 0.2 + 0.8 * (i + 1) / trail.length;
      ctx.fillStyle = "rgba(230, 235, 242, " + alpha.toFixed(3) + ")";
      ctx.beginPath();
      ctx.arc(x(trail[i].valence), y(trail[i].arousal), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    if (st.mood) {
      ctx.fillStyle = colorOf(st.mood.label);
      ctx.strokeStyle = "#e6ebf2";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.arc(x(st.mood.valence), y(st.mood.arousal), 7, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
      canvas.dataset.valence = st.mood.valence.toFixed(4);
      canvas.dataset.arousal = st.mood.arousal.toFixed(4);
    } else {
      canvas.dataset.valence = "";
      canvas.dataset.arousal = "";
    }
    canvas.dataset.trail = String(trail.length);
    canvas.dataset.updates = String(st.planeUpdates);
  }

  /** Stream time "now": the last time heard, run forward by the wall clock while the stream is open. */
  function streamNow(st) {
    if (st.lastT === null) return null;
    if (!st.open || !state.connected) return st.lastT;
    const ahead = (performance.now() - st.lastTAt) / 1000;
    return st.lastT + Math.min(Math.max(0, ahead), MAX_EXTRAPOLATION_SECONDS);
  }

  function drawTimeline(canvas, st) {
    const { ctx, width, height } = context2d(canvas);
    const left = 34;
    const right = width - 6;
    const band = { top: 4, height: 14 };
    const plot = { top: 26, bottom: height - 18 };
    const now = streamNow(st);
    canvas.dataset.points = String(st.history.length);
    canvas.dataset.speech = String(st.speech.length);
    ctx.font = "11px system-ui, sans-serif";
    if (now === null) {
      ctx.fillStyle = "#8d99ab";
      ctx.fillText("waiting for speech…", left, height / 2);
      return;
    }
    const start = now - TIMELINE_SECONDS;
    const x = (t) => left + (t - start) / TIMELINE_SECONDS * (right - left);
    const y = (v) => plot.top + (1 - (v + 1) / 2) * (plot.bottom - plot.top);

    // Speech: shaded across the whole height.
    ctx.fillStyle = "rgba(62, 207, 142, 0.13)";
    for (const seg of st.speech) {
      const end = seg.end === null ? now : seg.end;
      if (end < start) continue;
      const x0 = x(Math.max(seg.start, start));
      ctx.fillRect(x0, band.top, Math.max(1, x(end) - x0), plot.bottom - band.top);
    }
    // Axes and grid.
    ctx.strokeStyle = "#2e3848";
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (const v of [-1, 0, 1]) { ctx.moveTo(left, y(v)); ctx.lineTo(right, y(v)); }
    ctx.stroke();
    ctx.fillStyle = "#8d99ab";
    ctx.textAlign = "right";
    ctx.fillText("+1", left - 4, y(1) + 4);
    ctx.fillText("0", left - 4, y(0) + 4);
    ctx.fillText("−1", left - 4, y(-1) + 4);
    ctx.textAlign = "center";
    for (let s = 0; s <= TIMELINE_SECONDS; s += 10) {
      const tx = x(now - s);
      ctx.fillText(s === 0 ? "now" : "−" + s + " s", Math.min(right - 12, Math.max(left + 12, tx)), height - 4);
    }
    // Top category band.
    for (const point of st.history) {
      if (point.t1 < start) continue;
      const x0 = x(Math.max(point.t0, start));
      ctx.fillStyle = colorOf(point.label);
      // Half a pixel of overlap: adjacent estimates meet without anti-aliased seams.
      ctx.fillRect(x0, band.top, Math.max(1.5, x(point.t1) - x0 + 0.5), band.height);
    }
    // Arousal and valence lines, a point per estimate at its end time.
    const visible = st.history.filter((p) => p.t1 >= start);
    for (const [key, color] of [["arousal", "#ff9f43"], ["valence", "#48dbfb"]]) {
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      ctx.lineWidth = 1.6;
      ctx.beginPath();
      visible.forEach((p, i) => {
        if (i === 0) ctx.moveTo(x(p.t1), y(p[key])); else ctx.lineTo(x(p.t1), y(p[key]));
      });
      ctx.stroke();
      for (const p of visible) {
        ctx.beginPath();
        ctx.arc(x(p.t1), y(p[key]), 1.8, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  function drawCard(canvas, st) {
    const { ctx, width, height } = context2d(canvas);
    const planeSize = height;
    const barsWidth = width - planeSize - 8;
    const probs = st.last ? st.last.probs : {};
    const labels = state.labels;
    const slot = labels.length ? barsWidth / labels.length : barsWidth;
    ctx.fillStyle = "#222a37";
    ctx.fillRect(0, 0, barsWidth, height);
    labels.forEach((label, i) => {
      const p = typeof probs[label] === "number" ? Math.max(0, Math.min(1, probs[label])) : 0;
      ctx.fillStyle = colorOf(label);
      ctx.fillRect(i * slot + 1, height - p * height, Math.max(1, slot - 2), p * height);
    });
    const px = width - planeSize;
    ctx.strokeStyle = "#2e3848";
    ctx.strokeRect(px + 0.5, 0.5, planeSize - 1, planeSize - 1);
    ctx.beginPath();
    ctx.moveTo(px, height / 2); ctx.lineTo(width, height / 2);
    ctx.moveTo(px + planeSize / 2, 0); ctx.lineTo(px + planeSize / 2, height);
    ctx.stroke();
    const mx = (v) => px + (v + 1) / 2 * planeSize;
    const my = (a) => (1 - (a + 1) / 2) * height;
    st.trail.forEach((p, i) => {
      ctx.fillStyle = "rgba(230, 235, 242, " + (0.15 + 0.6 * (i + 1) / st.trail.length).toFixed(3) + ")";
      ctx.fillRect(mx(p.valence) - 1, my(p.arousal) - 1, 2, 2);
    });
    if (st.mood) {
      ctx.fillStyle = colorOf(st.mood.label);
      ctx.beginPath();
      ctx.arc(mx(st.mood.valence), my(st.mood.arousal), 4, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  // ------------------------------------------------------------------ start

  window.addEventListener("resize", () => { dirty.lists = true; scheduleRender(); });
  // The timeline scrolls and the retry countdown ticks even when no event arrives.
  setInterval(() => {
    if (!state.connected) dirty.connection = true;
    dirty.status = true;
    scheduleRender();
  }, 250);

  /** Read-only view of the state for tests and for poking at in the console. */
  window.serstreamDashboard = {
    get url() { return state.url; },
    get hasToken() { return token !== null; },
    get connected() { return state.connected; },
    get connects() { return state.connects; },
    get disconnects() { return state.disconnects; },
    get eventsSeen() { return state.eventsSeen; },
    get lastId() { return state.lastId; },
    get gaps() { return state.gaps; },
    get eventsLost() { return state.eventsLost; },
    get malformed() { return state.malformed; },
    get lastMalformed() { return state.lastMalformed; },
    get unknownTypes() { return state.unknownTypes; },
    get newerSchema() { return state.newerSchema; },
    get labels() { return state.labels.slice(); },
    get selected() { return state.selected; },
    get stats() { return state.stats ? Object.assign({}, state.stats) : null; },
    /** Call id -> its parties' stream ids, in the order the page shows them side by side. */
    get calls() {
      const out = {};
      for (const [call, entry] of callGroups) {
        out[call] = Array.from(entry.parties.querySelectorAll(".card")).map((c) => c.dataset.stream);
      }
      return out;
    },
    get streams() {
      const out = {};
      for (const [id, st] of state.streams) {
        out[id] = {
          open: st.open,
          call: st.call,
          role: st.role,
          label: st.mood ? st.mood.label : null,
          confidence: st.mood ? st.mood.confidence : null,
          arousal: st.mood ? st.mood.arousal : null,
          valence: st.mood ? st.mood.valence : null,
          probs: st.last ? Object.assign({}, st.last.probs) : null,
          emotions: st.emotions,
          speaking: st.speaking,
          speechSegments: st.speech.length,
          historyPoints: st.history.length,
          trail: st.trail.length,
          lastT: st.lastT,
          errors: Array.from(st.errors.keys()),
        };
      }
      return out;
    },
    select: select,
    /** Feeds one raw message as if it came from the socket (for tests of bad input). */
    inject: handleMessage,
  };

  connect();
  scheduleRender();
})();
