// Horde status page: polls /api/v1/status and redraws the cards, tables and loss chart
// in place (no reload). No dependencies; the chart is plain SVG drawn here.
(function () {
  "use strict";
  var root = document.getElementById("horde-status");
  if (!root) { return; }
  var SVG = "http://www.w3.org/2000/svg";
  var api = root.getAttribute("data-api");
  var evictApi = root.getAttribute("data-evict-api");
  var job = root.getAttribute("data-job");
  var refreshMs = Math.max(250, parseFloat(root.getAttribute("data-refresh") || "2") * 1000);
  var state = { updates: 0, last: null, rendezvous: false };
  window.hordeStatus = state;

  function $(id) { return document.getElementById(id); }
  function text(id, value) { var el = $(id); if (el) { el.textContent = value; } }
  function num(value, digits) {
    if (value === null || value === undefined) { return "-"; }
    if (Number.isInteger(value) && digits === undefined) { return value.toLocaleString("en-US"); }
    return Number(value).toLocaleString("en-US", {
      minimumFractionDigits: digits === undefined ? 1 : digits,
      maximumFractionDigits: digits === undefined ? 1 : digits });
  }
  function clock(t) {
    if (t === null || t === undefined) { return "-"; }
    var d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }
  function cell(tr, value, cls) {
    var td = document.createElement("td");
    if (cls) { td.className = cls; }
    if (value instanceof Node) { td.appendChild(value); } else { td.textContent = value; }
    tr.appendChild(td);
    return td;
  }
  function span(cls, value) {
    var s = document.createElement("span");
    s.className = cls;
    s.textContent = value;
    return s;
  }
  function replaceRows(tbody, rows) {
    while (tbody.firstChild) { tbody.removeChild(tbody.firstChild); }
    rows.forEach(function (tr) { tbody.appendChild(tr); });
  }

  function renderNodes(nodes, canEvict) {
    var rows = nodes.map(function (n) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-node", n.node_id);
      var name = document.createElement("span");
      name.textContent = n.node_id;
      if (n.display_name) { name.appendChild(span("muted", " (" + n.display_name + ")")); }
      cell(tr, name);
      cell(tr, span("state state-" + n.state, n.state));
      var hw = Object.keys(n.hardware || {}).map(function (k) { return k + "=" + n.hardware[k]; });
      cell(tr, hw.join(", "), "small");
      cell(tr, num(n.throughput), "num");
      cell(tr, num(n.mean_staleness, 2), "num");
      cell(tr, String(n.strikes), "num");
      cell(tr, num(n.credit), "num credit");
      cell(tr, num(n.rac), "num");
      var action = cell(tr, "");
      if (canEvict && n.state !== "evicted") {
        var b = document.createElement("button");
        b.type = "button";
        b.textContent = "evict";
        b.setAttribute("data-evict", n.node_id);
        action.appendChild(b);
      }
      return tr;
    });
    replaceRows($("nodes").tBodies[0], rows);
    text("nodes-count", String(nodes.length));
  }

  function renderLeaderboard(entries) {
    var rows = entries.map(function (e) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-node", e.node_id);
      cell(tr, String(e.rank), "num");
      cell(tr, e.display_name || e.node_id);
      cell(tr, num(e.credit), "num credit");
      cell(tr, num(e.rac), "num");
      return tr;
    });
    replaceRows($("leaderboard").tBodies[0], rows);
  }

  function renderTimeline(events) {
    var list = $("timeline");
    while (list.firstChild) { list.removeChild(list.firstChild); }
    events.forEach(function (e) {
      var li = document.createElement("li");
      li.appendChild(span("muted", clock(e.time)));
      li.appendChild(document.createTextNode(" "));
      var b = document.createElement("b");
      b.textContent = e.kind;
      li.appendChild(b);
      li.appendChild(document.createTextNode(" " + (e.node_id || "")));
      if (e.generation !== null) { li.appendChild(span("muted", " gen " + e.generation)); }
      li.appendChild(span("muted", " " + e.detail));
      list.appendChild(li);
    });
  }

  function svg(name, attrs, parent) {
    var el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { el.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(el); }
    return el;
  }
  function label(parent, x, y, value, anchor) {
    var t = svg("text", { x: x, y: y, "text-anchor": anchor || "start" }, parent);
    t.textContent = value;
    return t;
  }
  function fmt(v) {
    var a = Math.abs(v);
    return (a !== 0 && (a < 0.01 || a >= 10000)) ? v.toExponential(2) : v.toFixed(3);
  }

  function renderChart(points) {
    var chart = $("loss-chart");
    while (chart.firstChild) { chart.removeChild(chart.firstChild); }
    chart.setAttribute("data-points", String(points.length));
    text("loss-caption", points.length + " round(s) with a reported loss");
    var W = Math.max(320, Math.round(chart.getBoundingClientRect().width || 720));
    var H = 220, L = 56, R = 12, T = 12, B = 28;
    chart.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "axis" }, chart);
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, "class": "axis" }, chart);
    if (points.length === 0) {
      label(chart, W / 2, H / 2, "no loss reported yet", "middle");
      return;
    }
    var t0 = points[0].time, t1 = points[points.length - 1].time;
    var lo = Infinity, hi = -Infinity;
    points.forEach(function (p) { lo = Math.min(lo, p.loss); hi = Math.max(hi, p.loss); });
    if (hi === lo) { hi = lo + 1; }
    if (t1 === t0) { t1 = t0 + 1; }
    function x(t) { return L + (W - L - R) * (t - t0) / (t1 - t0); }
    function y(v) { return T + (H - T - B) * (1 - (v - lo) / (hi - lo)); }
    var d = points.map(function (p, i) {
      return (i === 0 ? "M" : "L") + x(p.time).toFixed(1) + "," + y(p.loss).toFixed(1);
    }).join(" ");
    svg("path", { d: d, "class": "line" }, chart);
    if (points.length === 1) {
      svg("circle", { cx: x(points[0].time), cy: y(points[0].loss), r: 3, fill: "#2f6fdb" }, chart);
    }
    label(chart, L - 6, T + 10, fmt(hi), "end");
    label(chart, L - 6, H - B, fmt(lo), "end");
    label(chart, L, H - 8, clock(t0));
    label(chart, W - R, H - 8, clock(points[points.length - 1].time), "end");
    label(chart, (L + W) / 2, H - 8, "round " + points[points.length - 1].round, "middle");
  }

  function render(s) {
    var j = s.job;
    state.rendezvous = s.rendezvous.configured;
    text("job-name", j.job || "—");
    text("job-state", j.state);
    text("job-generation", j.generation === null ? "—" : String(j.generation));
    text("job-world", String(j.world_size));
    text("job-rounds", num(j.rounds));
    text("job-rate", num(j.samples_per_second));
    text("job-leader", j.leader || "—");
    text("rendezvous", !s.rendezvous.configured ? "not configured"
      : (s.rendezvous.reachable ? "reachable" : "unreachable"));
    text("updated", clock(s.now));
    renderNodes(s.nodes, s.rendezvous.configured);
    renderLeaderboard(s.leaderboard);
    renderTimeline(s.timeline);
    renderChart(s.loss);
  }

  function setConn(ok) {
    var badge = $("conn");
    badge.textContent = ok ? "live" : "offline";
    badge.className = ok ? "badge" : "badge offline";
  }

  function poll() {
    var url = api + (job ? "?job=" + encodeURIComponent(job) : "");
    fetch(url, { cache: "no-store", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (s) {
        render(s);
        state.updates += 1;
        state.last = s;
        setConn(true);
      })
      .catch(function () { setConn(false); })
      .then(function () { window.setTimeout(poll, refreshMs); });
  }

  function evict(nodeId) {
    var token = window.sessionStorage.getItem("hordeAdminToken");
    if (!token) {
      token = window.prompt("Admin token (kept for this tab only):");
      if (!token) { return; }
    }
    var reason = window.prompt("Evict " + nodeId + ": reason?", "evicted by the operator");
    if (reason === null) { return; }
    var body = { node_id: nodeId, reason: reason || "evicted by the operator" };
    if (job) { body.job = job; }
    fetch(evictApi, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (payload) { return { ok: r.ok, status: r.status, payload: payload }; });
    }).then(function (res) {
      if (res.ok) {
        window.sessionStorage.setItem("hordeAdminToken", token);
        text("evict-message", nodeId + " evicted: the leader drops it at the next generation.");
      } else {
        if (res.status === 401 || res.status === 403) { window.sessionStorage.removeItem("hordeAdminToken"); }
        text("evict-message", "eviction refused: " + res.payload.error.message);
      }
    }).catch(function (e) { text("evict-message", "eviction failed: " + e); });
  }

  document.addEventListener("click", function (ev) {
    var target = ev.target;
    if (target && target.getAttribute && target.getAttribute("data-evict")) {
      evict(target.getAttribute("data-evict"));
    }
  });

  if (state.last === null) {
    // Draw the chart from the first poll; the server rendered the tables already.
    window.setTimeout(poll, 0);
  }
}());
