// The portal's web terminal and live logs (README "Web terminal"). Every request goes to the
// relay's gateway (/-/web/<cluster>/...) with the session's CSRF token; the relay checks the
// session and then treats each one like kubectl's own request. The exec session speaks the
// v5.channel.k8s.io WebSocket protocol: each message starts with its channel (0 stdin,
// 1 stdout, 2 stderr, 3 the closing Status, 4 resize).
"use strict";
(function () {
  const app = document.getElementById("terminal-app");
  if (!app) return;
  const csrf = app.dataset.csrf;
  const $ = (id) => document.getElementById(id);
  const status = (text) => { $("terminal-status").textContent = text; };
  const enc = new TextEncoder();
  let ws = null;
  let term = null;
  let fit = null;
  let pods = [];
  let logs = null;

  async function api(path) {
    const cluster = $("cluster").value;
    const r = await fetch(`/-/web/${encodeURIComponent(cluster)}/${path}`, {
      headers: { "X-CSRF-Token": csrf },
      credentials: "same-origin",
    });
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = (await r.json()).message || msg; } catch (e) { /* not a Status */ }
      throw new Error(msg);
    }
    return r;
  }

  function fill(select, names, empty) {
    select.replaceChildren();
    if (!names.length) {
      const o = document.createElement("option");
      o.value = "";
      o.textContent = empty;
      select.append(o);
      return;
    }
    for (const n of names) {
      const o = document.createElement("option");
      o.value = n;
      o.textContent = n;
      select.append(o);
    }
  }

  async function loadNamespaces() {
    fill($("namespace"), [], "loading…");
    try {
      const list = await (await api("api/v1/namespaces")).json();
      fill($("namespace"), list.items.map((i) => i.metadata.name), "no namespaces");
      const want = app.dataset.namespace;
      if (want && [...$("namespace").options].some((o) => o.value === want)) $("namespace").value = want;
    } catch (e) {
      fill($("namespace"), [], "cannot list namespaces");
      status(`Cannot list namespaces: ${e.message}`);
      return;
    }
    await loadPods();
  }

  async function loadPods() {
    const ns = $("namespace").value;
    if (!ns) { fill($("pod"), [], "no pods"); fill($("container"), [], "no containers"); return; }
    try {
      const list = await (await api(`api/v1/namespaces/${encodeURIComponent(ns)}/pods`)).json();
      pods = list.items;
      fill($("pod"), pods.map((p) => p.metadata.name), "no pods");
    } catch (e) {
      pods = [];
      fill($("pod"), [], "cannot list pods");
      status(`Cannot list pods in ${ns}: ${e.message}`);
    }
    loadContainers();
  }

  function loadContainers() {
    const pod = pods.find((p) => p.metadata.name === $("pod").value);
    fill($("container"), pod ? pod.spec.containers.map((c) => c.name) : [], "no containers");
  }

  function target() {
    const ns = $("namespace").value, pod = $("pod").value;
    if (!ns || !pod) { status("Choose a namespace and a pod first."); return null; }
    return `api/v1/namespaces/${encodeURIComponent(ns)}/pods/${encodeURIComponent(pod)}`;
  }

  function exitCode(statusJson) {
    try {
      const s = JSON.parse(statusJson);
      if (s.status === "Success") return "0";
      const cause = ((s.details || {}).causes || []).find((c) => c.reason === "ExitCode");
      return cause ? cause.message : (s.message || "unknown");
    } catch (e) { return "unknown"; }
  }

  function sendResize(cols, rows) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      const msg = enc.encode(JSON.stringify({ Width: cols, Height: rows }));
      const frame = new Uint8Array(msg.length + 1);
      frame[0] = 4;
      frame.set(msg, 1);
      ws.send(frame);
    }
  }

  function openTerminal() {
    const path = target();
    if (!path) return;
    closeTerminal();
    const q = new URLSearchParams();
    for (const part of ($("command").value.trim() || "sh").split(/\s+/)) q.append("command", part);
    if ($("container").value) q.set("container", $("container").value);
    q.set("stdin", "true");
    q.set("stdout", "true");
    q.set("tty", "true");
    q.set("csrf", csrf);
    term = new window.Terminal({ cursorBlink: true, scrollback: 5000 });
    fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open($("terminal"));
    // F6 leaves the terminal for the page's controls (Tab belongs to the shell).
    term.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.key === "F6") { $("close-terminal").focus(); return false; }
      return true;
    });
    fit.fit();
    const url = `wss://${location.host}/-/web/${encodeURIComponent($("cluster").value)}/${path}/exec?${q}`;
    const socket = new WebSocket(url, ["v5.channel.k8s.io"]);
    ws = socket;
    ws.binaryType = "arraybuffer";
    let code = null;
    status(`Connecting to ${$("pod").value}…`);
    ws.onopen = () => {
      status(`Connected to ${$("namespace").value}/${$("pod").value}. F6 leaves the terminal.`);
      app.dataset.session = "open";
      sendResize(term.cols, term.rows);
      term.focus();
    };
    ws.onmessage = (e) => {
      const d = new Uint8Array(e.data);
      if (!d.length) return;
      if (d[0] === 1 || d[0] === 2) term.write(d.subarray(1));
      else if (d[0] === 3) code = exitCode(new TextDecoder().decode(d.subarray(1)));
    };
    ws.onclose = (e) => {
      // A session closed by opening another must not speak for the new one.
      if (ws !== socket && ws !== null) return;
      app.dataset.session = "closed";
      // The closing Status is an exit code, or (a session the relay ended) a message.
      const numeric = code !== null && /^\d+$/.test(code);
      const why = numeric ? `exit code ${code}` : (code || e.reason || `connection closed (${e.code})`);
      status(`Session ended: ${why}.`);
      $("exit-code").textContent = numeric ? code : "";
    };
    term.onData((s) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) return;
      const b = enc.encode(s);
      // The relay refuses frames over 64 KiB: a large paste goes in 32 KiB pieces.
      for (let at = 0; at < b.length; at += 32768) {
        const piece = b.subarray(at, at + 32768);
        const frame = new Uint8Array(piece.length + 1);
        frame[0] = 0;
        frame.set(piece, 1);
        ws.send(frame);
      }
    });
    term.onResize(({ cols, rows }) => sendResize(cols, rows));
  }

  function closeTerminal() {
    if (ws) { ws.close(); ws = null; }
    if (term) { term.dispose(); term = null; }
  }

  async function followLogs() {
    const path = target();
    if (!path) return;
    stopLogs();
    const q = new URLSearchParams({ follow: "true", tailLines: String(Number($("tail").value) || 100) });
    if ($("container").value) q.set("container", $("container").value);
    logs = new AbortController();
    const out = $("logs");
    out.textContent = "";
    app.dataset.logs = "following";
    try {
      const r = await fetch(`/-/web/${encodeURIComponent($("cluster").value)}/${path}/log?${q}`, {
        headers: { "X-CSRF-Token": csrf }, credentials: "same-origin", signal: logs.signal,
      });
      if (!r.ok) {
        let msg = `${r.status}`;
        try { msg = (await r.json()).message || msg; } catch (e) { /* not a Status */ }
        throw new Error(msg);
      }
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // Bounded: the page keeps the last 256 KiB of text.
        out.textContent = (out.textContent + dec.decode(value, { stream: true })).slice(-262144);
        out.scrollTop = out.scrollHeight;
      }
      status("The log stream ended.");
    } catch (e) {
      if (e.name !== "AbortError") status(`Logs: ${e.message}`);
    } finally {
      app.dataset.logs = "stopped";
    }
  }

  function stopLogs() {
    if (logs) { logs.abort(); logs = null; }
  }

  $("cluster").addEventListener("change", loadNamespaces);
  $("namespace").addEventListener("change", loadPods);
  $("pod").addEventListener("change", loadContainers);
  $("open-terminal").addEventListener("click", openTerminal);
  $("close-terminal").addEventListener("click", () => { closeTerminal(); status("Session closed."); });
  $("follow-logs").addEventListener("click", followLogs);
  $("stop-logs").addEventListener("click", () => { stopLogs(); status("Stopped following logs."); });
  window.addEventListener("resize", () => { if (fit) fit.fit(); });
  loadNamespaces();
})();
