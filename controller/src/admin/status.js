// VICTOR status page: loads a snapshot (/status/api/summary, /status/api/bindings) and keeps it
// current with the server-sent events of /status/events. Events that arrive while a snapshot is
// loading are buffered and applied only if newer than the snapshot's revision.
"use strict";

const LIMIT = 200;
const MOVES_SHOWN = 100;

const S = {
  loading: false,
  buffered: [],
  summaryRevision: 0,
  bindingsRevision: 0,
  query: "",
  fes: new Map(),
  bindings: new Map(), // vm_ip -> row shown in the table
  frozen: new Map(),   // vm_ip -> row (damping alerts)
  pending: new Map(),  // vm_ip -> row (pending migration announcements)
  moves: [],
  total: 0,
  truncated: false,
};
window.victorStatus = S;

const $ = (id) => document.getElementById(id);

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// ---- search (mirrors the server's filter, so live rows appear only where they match)

function ipv4ToInt(text) {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  let n = 0;
  for (const p of parts) {
    if (!/^\d{1,3}$/.test(p) || Number(p) > 255) return null;
    n = n * 256 + Number(p);
  }
  return n;
}

// An IPv6 address (lower case; `::` and a dotted IPv4 tail allowed) as a BigInt, or null.
function ipv6ToBig(text) {
  let t = text;
  const lastColon = t.lastIndexOf(":");
  if (lastColon < 0) return null;
  const tail = t.slice(lastColon + 1);
  if (tail.includes(".")) {
    const n = ipv4ToInt(tail);
    if (n === null) return null;
    t = `${t.slice(0, lastColon + 1)}${Math.floor(n / 65536).toString(16)}:${(n % 65536).toString(16)}`;
  }
  const halves = t.split("::");
  if (halves.length > 2) return null;
  const groups = (s) => (s === "" ? [] : s.split(":"));
  const head = groups(halves[0]);
  const rest = halves.length === 2 ? groups(halves[1]) : [];
  const fill = 8 - head.length - rest.length;
  if (halves.length === 2 ? fill < 1 : fill !== 0) return null;
  let n = 0n;
  for (const g of [...head, ...Array(halves.length === 2 ? fill : 0).fill("0"), ...rest]) {
    if (!/^[0-9a-f]{1,4}$/.test(g)) return null;
    n = (n << 16n) + BigInt(parseInt(g, 16));
  }
  return n;
}

// An IP address as {bits: 32 | 128, n: BigInt}, or null.
function parseIp(text) {
  const v4 = ipv4ToInt(text);
  if (v4 !== null) return { bits: 32, n: BigInt(v4) };
  const v6 = ipv6ToBig(text);
  return v6 === null ? null : { bits: 128, n: v6 };
}

// IP order, as the server's: IPv4 before IPv6, then by value.
function compareIps(a, b) {
  const x = parseIp(a);
  const y = parseIp(b);
  if (x === null || y === null) return a.localeCompare(b);
  if (x.bits !== y.bits) return x.bits - y.bits;
  return x.n < y.n ? -1 : x.n > y.n ? 1 : 0;
}

function matcher(query) {
  const q = query.trim().toLowerCase();
  if (!q) return () => true;
  const [addr, len] = q.split("/");
  const base = parseIp(addr);
  if (base !== null && (len === undefined || /^\d+$/.test(len))) {
    const bits = len === undefined ? base.bits : Math.min(base.bits, Number(len));
    const shift = BigInt(base.bits - bits);
    const network = base.n >> shift;
    return (row) => {
      const ip = parseIp(row.vm_ip);
      return ip !== null && ip.bits === base.bits && ip.n >> shift === network;
    };
  }
  return (row) => [row.vm_ip, row.fe_id, row.site, row.mac].some((v) => String(v).toLowerCase().includes(q));
}

// ---- snapshot

async function loadSnapshot() {
  S.loading = true;
  try {
    const query = encodeURIComponent(S.query);
    const [summary, result] = await Promise.all([
      getJSON("/status/api/summary"),
      getJSON(`/status/api/bindings?limit=${LIMIT}&q=${query}`),
    ]);
    applySummary(summary);
    applyBindings(result);
    const pending = S.buffered;
    S.buffered = [];
    S.loading = false;
    for (const [name, data] of pending) apply(name, data);
    render();
  } catch (err) {
    S.loading = false;
    $("feed-state").textContent = `snapshot failed: ${err.message}`;
    $("feed-state").className = "stale";
    setTimeout(loadSnapshot, 2000);
  }
}

function applySummary(summary) {
  S.summaryRevision = summary.revision;
  $("replica").textContent = summary.replica_id;
  $("store").textContent = `${summary.store_kind} (${summary.store_reachable ? "reachable" : "UNREACHABLE"})`;
  $("housekeeper").textContent = summary.housekeeper_id || "(none)";
  $("revision").textContent = summary.revision;
  S.fes = new Map(summary.fes.map((fe) => [fe.fe_id, fe]));
  S.frozen = new Map(summary.frozen.map((b) => [b.vm_ip, b]));
  S.pending = new Map(summary.pending.map((b) => [b.vm_ip, b]));
  // Every move names the FE it left (the binding records it), live or from the snapshot.
  S.moves = summary.moves.slice(0, MOVES_SHOWN);
  S.total = summary.binding_count;
}

function applyBindings(result) {
  S.bindingsRevision = result.revision;
  S.bindings = new Map(result.bindings.map((b) => [b.vm_ip, b]));
  S.truncated = result.truncated;
}

// ---- live events

function apply(name, data) {
  switch (name) {
    case "binding": {
      const b = data.binding;
      if (b.revision > S.bindingsRevision) {
        if (matcher(S.query)(b) && (S.bindings.has(b.vm_ip) || S.bindings.size < LIMIT)) {
          S.bindings.set(b.vm_ip, b);
          S.flash = b.vm_ip;
        }
      }
      if (b.revision > S.summaryRevision) {
        if (b.frozen) S.frozen.set(b.vm_ip, b);
        else S.frozen.delete(b.vm_ip);
        if (b.pending_fe_id) S.pending.set(b.vm_ip, b);
        else S.pending.delete(b.vm_ip);
      }
      bumpRevision(b.revision);
      break;
    }
    case "binding_removed":
      if (data.revision > S.bindingsRevision) S.bindings.delete(data.vm_ip);
      if (data.revision > S.summaryRevision) {
        S.frozen.delete(data.vm_ip);
        S.pending.delete(data.vm_ip);
      }
      bumpRevision(data.revision);
      break;
    case "move": {
      const m = data.move;
      // Deduplicated by revision only: the feed may publish a move just after a snapshot whose
      // cache revision already covers it but whose move list did not have it yet.
      if (S.moves.some((x) => x.revision === m.revision)) break;
      S.moves.unshift(m);
      S.moves.length = Math.min(S.moves.length, MOVES_SHOWN);
      break;
    }
    case "convergence": {
      const m = S.moves.find((x) => x.revision === data.revision);
      if (m) {
        m.convergence = data.convergence;
        m.convergence_state = data.convergence_state;
      }
      break;
    }
    case "fe":
      if (data.revision > S.summaryRevision) S.fes.set(data.fe.fe_id, data.fe);
      bumpRevision(data.revision);
      break;
    case "fe_removed":
      if (data.revision > S.summaryRevision) S.fes.delete(data.fe_id);
      break;
    case "resync":
      loadSnapshot();
      break;
  }
}

function bumpRevision(revision) {
  const shown = Number($("revision").textContent) || 0;
  if (revision > shown) $("revision").textContent = revision;
}

// ---- rendering (batched: at most one redraw per 50 ms however fast events come)

let renderQueued = false;
function render() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => {
    renderQueued = false;
    renderFes();
    renderMoves();
    renderBindings();
    renderAlerts();
    renderPending();
  }, 50);
}

function renderFes() {
  const body = $("fes").tBodies[0];
  body.replaceChildren(
    ...[...S.fes.values()]
      .sort((a, b) => a.fe_id.localeCompare(b.fe_id))
      .map((fe) => {
        const tr = document.createElement("tr");
        tr.dataset.fe = fe.fe_id;
        const health = cell(fe.up ? "up" : "down", fe.up ? "up health" : "down health");
        if (!fe.up) {
          health.title = `Decommissioned? Remove it with: victorctl fe remove ${fe.fe_id}` +
            (fe.bindings ? ` --force (also removes its ${fe.bindings} binding(s))` : "");
        }
        tr.append(
          cell(fe.fe_id),
          cell(fe.site),
          cell(fe.underlay),
          health,
          cell(fe.bindings, "num"),
          cell(fe.agent_version, "muted"),
        );
        return tr;
      }),
  );
  $("fe-count").textContent = `(${S.fes.size})`;
}

function convergenceText(m) {
  switch (m.convergence_state) {
    case "measured": return [`${m.convergence.claim_to_first_send_ms.toFixed(2)} ms`, ""];
    case "not_sent": return ["not sent", "pending"];
    case "other_replica": return ["other replica", "muted"];
    default: return ["…", "pending"];
  }
}

function convergenceTitle(m) {
  const c = m.convergence;
  if (!c) return m.convergence_state === "other_replica" ? "committed through another controller replica" : "";
  const fmt = (v) => (v === null || v === undefined ? "n/a" : `${v.toFixed(3)} ms`);
  return `claim→commit ${fmt(c.claim_to_commit_ms)}; commit→cache ${fmt(c.commit_to_cache_ms)}; ` +
    `commit→first send ${fmt(c.commit_to_first_send_ms)}; sent on ${c.streams_sent} agent stream(s)`;
}

function renderMoves() {
  const body = $("moves").tBodies[0];
  body.replaceChildren(
    ...S.moves.map((m) => {
      const tr = document.createElement("tr");
      tr.dataset.revision = m.revision;
      tr.dataset.ip = m.vm_ip;
      const [text, cls] = convergenceText(m);
      const conv = cell(text, `num conv ${cls}`);
      conv.title = convergenceTitle(m);
      tr.append(
        cell(new Date(m.committed_at_ms).toLocaleTimeString()),
        cell(m.vm_ip),
        cell(`${m.from_fe_id ? `${m.from_fe_id} ` : ""}→ ${m.fe_id}${m.frozen ? " (frozen)" : ""}`, "fe"),
        cell(m.move_seq, "num"),
        conv,
      );
      return tr;
    }),
  );
}

function renderBindings() {
  const rows = [...S.bindings.values()].sort((a, b) => compareIps(a.vm_ip, b.vm_ip));
  $("bindings").tBodies[0].replaceChildren(
    ...rows.map((b) => {
      const tr = document.createElement("tr");
      tr.dataset.ip = b.vm_ip;
      if (S.flash === b.vm_ip) tr.className = "flash";
      const state = b.frozen ? "frozen" : b.pending_fe_id ? `migrating → ${b.pending_fe_id}` : "active";
      tr.append(
        cell(b.vm_ip, "ip"),
        cell(b.fe_id, "fe"),
        cell(b.site, "site"),
        cell(b.mac, "mac"),
        cell(b.move_seq, "num moves"),
        cell(state, b.frozen ? "frozen state" : "state"),
        cell(b.revision, "num"),
      );
      return tr;
    }),
  );
  S.flash = null;
  $("binding-count").textContent = `(${S.total} total)`;
  $("bindings-note").textContent = S.truncated
    ? `Showing the first ${LIMIT} matches; refine the search to see others.`
    : S.bindings.size === 0 ? "No binding matches." : "";
}

/** Fills list `id` with one item per binding of `bindings` ("none" when empty): the VM's IP in
 * bold (class `strongClass`), `text(b)`, and the victorctl command `command(b)` that acts on it;
 * element `countId` shows how many. */
function renderBindingList(id, countId, bindings, strongClass, text, command) {
  const list = $(id);
  if (bindings.size === 0) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "none";
    list.replaceChildren(li);
  } else {
    list.replaceChildren(
      ...[...bindings.values()].map((b) => {
        const li = document.createElement("li");
        li.dataset.ip = b.vm_ip;
        const strong = document.createElement("b");
        if (strongClass) strong.className = strongClass;
        strong.textContent = b.vm_ip;
        const code = document.createElement("code");
        code.textContent = command(b);
        li.append(strong, text(b), code);
        return li;
      }),
    );
  }
  $(countId).textContent = bindings.size ? `(${bindings.size})` : "";
}

function renderAlerts() {
  renderBindingList(
    "alerts",
    "alert-count",
    S.frozen,
    "frozen",
    (b) => ` frozen at ${b.fe_id} after ${b.move_seq} moves (flap damping); clear with `,
    (b) => `victorctl damping clear ${b.vm_ip}`,
  );
}

function renderPending() {
  renderBindingList(
    "pending",
    "pending-count",
    S.pending,
    "",
    (b) => ` at ${b.fe_id}, announced to migrate to ${b.pending_fe_id}; withdraw with `,
    (b) => `victorctl migrate cancel ${b.vm_ip}`,
  );
}

// ---- wiring

function connect() {
  const source = new EventSource("/status/events");
  const names = ["binding", "binding_removed", "move", "convergence", "fe", "fe_removed", "resync"];
  source.addEventListener("hello", () => {
    $("feed-state").textContent = "live";
    $("feed-state").className = "live";
    loadSnapshot(); // first connection and every reconnection: events may have been missed
  });
  for (const name of names) {
    source.addEventListener(name, (e) => {
      const data = JSON.parse(e.data);
      if (S.loading) S.buffered.push([name, data]);
      else {
        apply(name, data);
        render();
      }
    });
  }
  source.onerror = () => {
    $("feed-state").textContent = "disconnected, retrying…";
    $("feed-state").className = "stale";
  };
}

let searchTimer = null;
$("search").addEventListener("input", (e) => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    S.query = e.target.value;
    loadSnapshot();
  }, 150);
});

// Counts and health also refresh periodically (binding counts are not in the feed).
setInterval(() => { if (!S.loading) getJSON("/status/api/summary").then((s) => {
  S.fes = new Map(s.fes.map((fe) => [fe.fe_id, fe]));
  S.total = s.binding_count;
  $("store").textContent = `${s.store_kind} (${s.store_reachable ? "reachable" : "UNREACHABLE"})`;
  $("housekeeper").textContent = s.housekeeper_id || "(none)";
  render();
}).catch(() => {}); }, 5000);

connect();
