// sidetune dashboard: renders the fleet snapshot (side_server/fleet.py's fleet_snapshot) and
// follows /api/events (server-sent events, read with fetch so the bearer token can be sent).
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const q = new URLSearchParams(location.search);
  if (q.has("token")) {                       // given once in the address: kept for this tab only
    sessionStorage.setItem("sidetune-token", q.get("token"));
    q.delete("token");
    history.replaceState(null, "", location.pathname + (q.toString() ? "?" + q : ""));
  }
  const token = sessionStorage.getItem("sidetune-token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const $ = (id) => document.getElementById(id);
  let selected = null, last = null;

  function h(tag, attrs, ...kids) {
    const svg = ["svg", "g", "line", "polyline", "circle", "rect", "text", "title"].includes(tag);
    const el = svg ? document.createElementNS(SVG, tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, v);
    for (const k of kids.flat()) if (k !== null && k !== undefined) el.append(k instanceof Node ? k : String(k));
    return el;
  }
  const fmtBytes = (n) => {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
    while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + u[i];
  };
  const fmtAgo = (t, now) => {
    if (!t) return "–";
    const s = Math.max(0, now - t);
    return s < 60 ? Math.round(s) + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago"
      : s < 86400 ? (s / 3600).toFixed(1) + " h ago" : (s / 86400).toFixed(1) + " d ago";
  };
  const fmtNum = (x, d) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
  const short = (s, n) => (s ? (s.length > n ? s.slice(0, n) + "…" : s) : "–");
  const td = (label, ...kids) => h("td", { "data-label": label }, ...kids);

  // ------------------------------------------------------------------ charts (inline SVG)

  function scale(lo, hi, a, b) {
    if (!(hi > lo)) { hi = lo + 1; lo = lo - (lo ? 0 : 0); }
    return (v) => a + (v - lo) * (b - a) / (hi - lo);
  }
  function frame(W, H, P, ylo, yhi, yfmt, xs, xlabel) {
    const g = h("g", {});
    g.append(h("line", { class: "axis", x1: P.l, y1: H - P.b, x2: W - P.r, y2: H - P.b }),
             h("line", { class: "axis", x1: P.l, y1: P.t, x2: P.l, y2: H - P.b }),
             h("text", { x: P.l - 4, y: P.t + 8, "text-anchor": "end" }, yfmt(yhi)),
             h("text", { x: P.l - 4, y: H - P.b, "text-anchor": "end" }, yfmt(ylo)));
    if (xs.length) g.append(h("text", { x: P.l, y: H - 4 }, xs[0]));
    if (xs.length > 1 && xs[xs.length - 1] !== xs[0]) {
      g.append(h("text", { x: W - P.r, y: H - 4, "text-anchor": "end" }, xs[xs.length - 1]));
    }
    g.append(h("text", { x: (W + P.l) / 2, y: H - 4, "text-anchor": "middle" }, xlabel));
    return g;
  }
  // series: [{cls, pts: [[x, y], ...]}]; one circle per point (class "pt <cls>")
  function lineChart(series, opts) {
    const W = 320, H = opts.h || 150, P = { l: 40, r: 8, t: 8, b: 18 };
    const all = series.flatMap((s) => s.pts);
    const xsAll = [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b);
    let ylo = opts.ylo !== undefined ? opts.ylo : Math.min(...all.map((p) => p[1]));
    let yhi = opts.yhi !== undefined ? opts.yhi : Math.max(...all.map((p) => p[1]));
    if (!all.length) { ylo = 0; yhi = 1; }
    if (yhi - ylo < 1e-9) { yhi += 0.05; ylo -= 0.05; }
    const X = scale(xsAll[0] || 0, xsAll[xsAll.length - 1] || 1, P.l + 6, W - P.r - 6);
    const Y = scale(ylo, yhi, H - P.b, P.t);
    const svg = h("svg", { class: "chart " + (opts.cls || ""), viewBox: `0 0 ${W} ${H}`, role: "img",
                           "aria-label": opts.label || "" });
    svg.append(frame(W, H, P, ylo, yhi, opts.yfmt, xsAll.length ? [xsAll[0], xsAll[xsAll.length - 1]] : [], opts.xlabel));
    for (const s of series) {
      if (!s.pts.length) continue;
      svg.append(h("polyline", { class: s.cls, points: s.pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ") }));
      for (const p of s.pts) {
        svg.append(h("circle", { class: "pt " + s.cls, cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 2.5,
                                 "data-x": p[0], "data-y": p[1] },
                     h("title", {}, `${opts.xlabel} ${p[0]}: ${opts.yfmt(p[1], true)}`)));
      }
    }
    return svg;
  }
  // groups: [{x, bars: [{cls, v}]}] side by side (stacked=false) or stacked
  function barChart(groups, opts) {
    const W = 320, H = opts.h || 130, P = { l: 48, r: 8, t: 8, b: 18 };
    const tot = (g) => opts.stacked ? g.bars.reduce((a, b) => a + b.v, 0) : Math.max(0, ...g.bars.map((b) => b.v));
    const yhi = Math.max(1, ...groups.map(tot));
    const Y = scale(0, yhi, H - P.b, P.t);
    const slot = (W - P.l - P.r) / Math.max(groups.length, 1);
    const svg = h("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.label || "" });
    svg.append(frame(W, H, P, 0, yhi, opts.yfmt, groups.length ? [groups[0].xl, groups[groups.length - 1].xl] : [], opts.xlabel));
    groups.forEach((g, i) => {
      const x0 = P.l + i * slot + slot * 0.1, w = slot * 0.8;
      let base = 0;
      g.bars.forEach((b, j) => {
        const bw = opts.stacked ? w : w / g.bars.length;
        const x = opts.stacked ? x0 : x0 + j * bw;
        const y1 = Y(base + b.v), y0 = Y(base);
        svg.append(h("rect", { class: "col " + b.cls, x: x.toFixed(1), y: y1.toFixed(1), width: Math.max(bw, 1).toFixed(1),
                               height: Math.max(y0 - y1, 0).toFixed(1), style: b.color ? `fill:${b.color}` : null },
                     h("title", {}, `${g.xl}: ${b.name || b.cls} ${opts.yfmt(b.v, true)}`)));
        if (opts.stacked) base += b.v;
      });
    });
    return svg;
  }
  const legend = (items) => h("div", { class: "legend" }, items.map(([name, color]) => h("span", {}, h("i", { style: `background:${color}` }), name)));

  // ------------------------------------------------------------------ views

  function renderFleet(snap) {
    const now = snap.generated_at;
    const body = $("fleet").tBodies[0];
    body.replaceChildren(...snap.devices.map((d) => {
      const r = d.last_round, q = (d.quota && d.quota.cache_bytes) || {};
      const rej = Object.entries(d.rejections || {});
      const nrej = rej.reduce((a, [, n]) => a + n, 0);
      const used = q.used !== undefined ? q.used : d.cache_bytes, limit = q.limit;
      const frac = limit ? Math.min(1, used / limit) : 0;
      const tr = h("tr", { "data-device": d.device, class: d.device === selected ? "sel" : null },
        td("device", h("b", { class: "nowrap" }, d.device)),
        td("state", h("span", { class: "state " + (d.online ? "online" : "offline") }, d.online ? "online" : "offline"),
           h("div", { class: "muted small" }, fmtAgo(d.last_seen, now))),
        td("agent", d.agent_version || "–"),
        td("backbone", h("span", { class: "mono", title: d.backbone_fingerprint || "" }, short(d.backbone_fingerprint, 12))),
        td("adapter", "v" + (d.adapter_version || 0)),
        td("last round", r ? h("span", {}, `#${r.round} · ${r.samples} samples · ${r.forward_passes} fwd · ${fmtBytes(r.bytes_up)}↑ ${fmtBytes(r.bytes_down)}↓`,
                                h("div", { class: "muted small" }, `${fmtNum(r.seconds, 0)} s · ${fmtAgo(r.at, now)}`)) : "–"),
        td("accuracy", h("span", { class: "acc" }, r ? fmtNum(r.holdout_accuracy, 3) : "–")),
        td("cache / quota", h("span", {}, `${fmtBytes(used)}${limit ? " / " + fmtBytes(limit) : ""}`,
                                 limit ? h("div", { class: "bar" }, h("i", { class: frac > 0.9 ? "hot" : null, style: `width:${(frac * 100).toFixed(1)}%` })) : null)),
        td("rejections", h("span", { title: rej.map(([c, n]) => `${c}: ${n}`).join("\n") || "none" }, String(nrej),
                           rej.length ? h("div", { class: "muted small" }, rej.map(([c, n]) => `${c} ${n}`).join(", ")) : null)));
      tr.addEventListener("click", () => { selected = selected === d.device ? null : d.device; render(last); });
      return tr;
    }));
    $("no-devices").hidden = snap.devices.length > 0;
  }

  function renderJobs(snap) {
    const jobs = snap.jobs.filter((j) => !selected || j.device === selected).slice(0, 12);
    $("jobs").replaceChildren(...jobs.map((j) => {
      const losses = j.losses || [];
      // an epoch whose loss is recorded is finished (the record and the count are two writes)
      const done = Math.max(j.epochs_done || 0, losses.length), total = j.epochs || 0;
      const pct = total ? Math.min(100, 100 * done / total) : (j.state === "done" ? 100 : 0);
      const series = [{ cls: "train", pts: losses.filter((l) => l.train_loss !== null).map((l) => [l.epoch, l.train_loss]) },
                      { cls: "val", pts: losses.filter((l) => l.val_loss !== null && l.val_loss !== undefined).map((l) => [l.epoch, l.val_loss]) }];
      return h("div", { class: "card job", "data-job": j.job_id, "data-device": j.device, "data-state": j.state,
                        "data-epochs-done": done },
        h("h3", {}, h("span", {}, j.device), h("span", { class: "mono muted", title: j.job_id }, short(j.job_id, 14)),
          h("span", { class: "badge " + j.state }, j.state)),
        h("div", { class: "small muted" }, `${done}${total ? " / " + total : ""} epochs · ${j.samples} samples`
          + (j.finished_at && j.created_at ? ` · ${fmtNum(j.finished_at - j.created_at, 0)} s` : "")),
        h("div", { class: "bar" }, h("i", { style: `width:${pct.toFixed(1)}%` })),
        losses.length ? lineChart(series, { xlabel: "epoch", yfmt: (v) => fmtNum(v, 3), label: `loss of job ${j.job_id}`, cls: "loss" })
                      : h("p", { class: "muted small" }, "no epoch finished yet"),
        legend([["train", "var(--train)"], ["validation", "var(--val)"]]));
    }));
    $("no-jobs").hidden = jobs.length > 0;
  }

  // accuracy on a range of whole tenths around the values: small changes stay small
  const accRange = (v) => ({ ylo: Math.max(0, Math.floor((Math.min(...v) - 0.02) * 10) / 10),
                             yhi: Math.min(1, Math.ceil((Math.max(...v) + 0.02) * 10) / 10) });
  function renderDevices(snap) {
    const devs = snap.devices.filter((d) => !selected || d.device === selected);
    $("devices").replaceChildren(...devs.map((d) => {
      const rounds = d.rounds || [];
      const acc = rounds.filter((r) => r.holdout_accuracy !== null && r.holdout_accuracy !== undefined);
      return h("div", { class: "card device", "data-device": d.device },
        h("h3", {}, d.device, h("span", { class: "state " + (d.online ? "online" : "offline") }, d.online ? "online" : "offline")),
        acc.length ? lineChart([{ cls: "acc", pts: acc.map((r) => [r.round, r.holdout_accuracy]) }],
                               { xlabel: "round", yfmt: (v) => fmtNum(v, 2), label: `accuracy of ${d.device}`, h: 110,
                                 ...accRange(acc.map((r) => r.holdout_accuracy)) })
                   : h("p", { class: "muted small" }, "no held-out accuracy reported yet"),
        rounds.length ? barChart(rounds.map((r) => ({ xl: r.round, bars: [{ cls: "up", name: "up", v: r.bytes_up }, { cls: "down", name: "down", v: r.bytes_down }] })),
                                 { xlabel: "round", yfmt: fmtBytes, label: `bytes per round of ${d.device}`, h: 110 }) : null,
        rounds.length ? legend([["bytes up", "var(--up)"], ["bytes down", "var(--down)"]]) : null);
    }));
  }

  const PALETTE = ["#b91c1c", "#d97706", "#7c3aed", "#0d9488", "#2563eb", "#db2777", "#65a30d", "#475569"];
  function renderRejections(snap) {
    const rows = (snap.rejections_over_time || []);
    const codes = [...new Set(rows.map((r) => r.code))].sort();
    const color = (c) => PALETTE[codes.indexOf(c) % PALETTE.length];
    const minutes = [...new Set(rows.map((r) => r.at))].sort((a, b) => a - b);
    const hhmm = (t) => new Date(t * 1000).toTimeString().slice(0, 5);
    const groups = minutes.map((m) => ({ xl: hhmm(m), bars: codes.map((c) => ({ cls: "rej", name: c, color: color(c),
      v: rows.filter((r) => r.at === m && r.code === c).reduce((a, r) => a + r.count, 0) })) }));
    $("rejections").replaceChildren(rows.length
      ? h("div", { class: "card" }, barChart(groups, { stacked: true, xlabel: "minute", yfmt: (v) => String(Math.round(v)), label: "rejections per minute by code" }),
          legend(codes.map((c) => [c, color(c)])))
      : h("p", { class: "muted" }, "No rejection in the last 24 h."));
    const recent = snap.devices.flatMap((d) => (d.last_rejections || []).map((x) => ({ ...x, device: d.device })))
      .sort((a, b) => b.at - a.at).slice(0, 20);
    $("last-rejections").tBodies[0].replaceChildren(...recent.map((x) => h("tr", {},
      td("when", fmtAgo(x.at, snap.generated_at)), td("device", x.device), td("code", h("span", { class: "mono" }, x.code)),
      td("reason", x.reason))));
    $("last-rejections").hidden = recent.length === 0;
  }

  function render(snap) {
    if (!snap) return;
    last = snap;
    const online = snap.devices.filter((d) => d.online).length;
    const running = snap.jobs.filter((j) => !["done", "failed", "abandoned"].includes(j.state)).length;
    $("summary").textContent = `${snap.devices.length} devices · ${online} online · ${running} jobs open`;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    renderFleet(snap); renderJobs(snap); renderDevices(snap); renderRejections(snap);
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
  }

  function show(data) {
    if (data.error) { $("error").textContent = data.error; $("error").hidden = false; return; }
    $("error").hidden = true;
    render(data);
  }
  function status(cls, text) { const s = $("live"); s.className = "pill " + cls; s.textContent = text; }

  async function poll() {                      // once at start, and whenever the stream is down
    try {
      const r = await fetch("api/fleet", { headers, cache: "no-store" });
      show(await r.json());
    } catch (e) { /* the stream's status says it */ }
  }

  async function follow() {
    for (;;) {
      try {
        const r = await fetch("api/events", { headers, cache: "no-store" });
        if (r.status === 401) { status("bad", "token required"); show({ error: "401: open this page as /?token=TOKEN" }); return; }
        if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
        status("live", "live");
        const reader = r.body.getReader(), dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
            const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
            if (data) show(JSON.parse(data));
          }
        }
      } catch (e) { /* fall through: reconnect */ }
      status("wait", "reconnecting…");
      await new Promise((res) => setTimeout(res, 2000));
      await poll();
    }
  }
  poll().then(follow);
})();
