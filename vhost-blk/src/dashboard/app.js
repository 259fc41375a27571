// The dashboard's code: it reads /v1/health, /v1/disks and /v1/history with the caller's
// credentials (a bearer token over TCP, kept in this tab's sessionStorage; none on the
// unix socket, where the kernel names the caller) and draws SVG charts. No libraries: the
// daemon runs on hosts without internet, and its page must not load anything from elsewhere.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const COLORS = ['#2f6fde', '#e0762b', '#2a9d5c', '#c43d5a', '#7d56c2', '#8c8c8c'];
let token = null;
let selected = null;
let timer = null;

function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem('strata-token', decodeURIComponent(m[1]));
    // Out of the address bar and this tab's history (the browser may still keep the
    // address it was opened with: typing the token into the page avoids that).
    history.replaceState(null, '', location.pathname + location.search);
  }
  token = sessionStorage.getItem('strata-token');
}

async function api(path) {
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  const r = await fetch(path, { headers, cache: 'no-store' });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error(`${path}: ${r.status} ${body.error || r.statusText}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

function el(tag, attrs, ...children) {
  const e = tag.startsWith('svg:') ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function bytes(n) {
  if (n == null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

function number(n) {
  if (n == null) return '–';
  if (n === 0) return '0';
  if (n >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (n >= 1e4) return (n / 1e3).toFixed(0) + 'k';
  return n >= 100 ? n.toFixed(0) : n.toFixed(n >= 10 ? 1 : 2);
}

function micros(us) {
  if (us == null) return '–';
  return us >= 1000 ? (us / 1000).toFixed(us >= 10000 ? 0 : 1) + ' ms' : us.toFixed(0) + ' µs';
}

function clock(t, long) {
  const d = new Date(t * 1000);
  const two = (n) => String(n).padStart(2, '0');
  const hm = `${two(d.getHours())}:${two(d.getMinutes())}`;
  return long ? `${two(d.getMonth() + 1)}-${two(d.getDate())} ${hm}` : `${hm}:${two(d.getSeconds())}`;
}

function errorsOf(p) {
  return Object.values(p.errors || {}).reduce((a, b) => a + b, 0);
}

// One line chart: series are {name, points: [[t, v], ...]}; the element records how many
// points it drew (data-points) for whoever checks the page.
function chart(id, title, series, format, empty) {
  const box = document.getElementById(id);
  const n = series.reduce((a, s) => a + s.points.length, 0);
  box.dataset.points = String(n);
  box.dataset.series = series.map((s) => `${s.name}=${s.points.length}`).join(';');
  box.replaceChildren(el('h3', {}, title));
  if (n === 0) {
    box.append(el('p', { class: 'empty' }, empty || 'no data yet'));
    return;
  }
  const W = 560, H = 200, L = 64, R = 10, T = 8, B = 24;
  // Loops, not Math.min(...points): a long trend would overflow the argument list.
  let t0 = Infinity, t1 = -Infinity, top = 0;
  for (const s of series) {
    for (const [t, v] of s.points) {
      t0 = Math.min(t0, t); t1 = Math.max(t1, t); top = Math.max(top, v);
    }
  }
  if (t1 === t0) { t0 -= 1; t1 += 1; }
  if (!(top > 0)) top = 1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const svg = el('svg:svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title });
  for (const f of [0, 0.5, 1]) {
    const yy = y(top * f);
    svg.append(el('svg:line', { class: 'grid', x1: L, x2: W - R, y1: yy, y2: yy }));
    svg.append(el('svg:text', { class: 'axis', x: L - 6, y: yy + 3, 'text-anchor': 'end' }, format(top * f)));
  }
  const long = t1 - t0 > 86400;
  svg.append(el('svg:text', { class: 'axis', x: L, y: H - 6 }, clock(t0, long)));
  svg.append(el('svg:text', { class: 'axis', x: W - R, y: H - 6, 'text-anchor': 'end' }, clock(t1, long)));
  const legend = el('div', { class: 'legend' });
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length];
    if (s.points.length === 1) {
      const [t, v] = s.points[0];
      svg.append(el('svg:circle', { cx: x(t), cy: y(v), r: 3, fill: c }));
    } else if (s.points.length > 1) {
      const d = s.points.map(([t, v], j) => `${j ? 'L' : 'M'}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join('');
      svg.append(el('svg:path', { d, fill: 'none', stroke: c, 'stroke-width': 1.6 }));
    }
    const last = s.points.length ? format(s.points[s.points.length - 1][1]) : '–';
    const key = el('span', {}, `${s.name} ${last}`);
    // Through the CSS object model: the page's policy refuses style attributes.
    key.style.setProperty('--c', c);
    legend.append(key);
  });
  box.append(svg, legend);
}

function series(points, name, value) {
  return { name, points: points.filter((p) => value(p) != null).map((p) => [p.t, value(p)]) };
}

function drawDisk(disk, range, days) {
  const pts = range === 'trend' ? disk.trend.concat(disk.recent.slice(-1)) : disk.recent;
  const usage = disk.trend.concat(disk.recent.slice(-1));
  chart('chart-usage', `Usage (${plural(days, 'day')})`, [
    series(usage, 'used on host', (p) => p.used),
    series(usage, 'size', (p) => p.size),
  ], bytes);
  chart('chart-iops', 'Requests per second', [
    series(pts, 'reads', (p) => p.reads / p.seconds),
    series(pts, 'writes', (p) => p.writes / p.seconds),
    series(pts, 'other', (p) => p.other / p.seconds),
  ], number);
  chart('chart-latency', 'Latency', [
    series(pts, 'p50', (p) => p.latency_us && p.latency_us.p50),
    series(pts, 'p90', (p) => p.latency_us && p.latency_us.p90),
    series(pts, 'p99', (p) => p.latency_us && p.latency_us.p99),
  ], micros, 'no requests completed in this range');
  // The kinds that happened in the range.
  const kinds = Object.keys((pts[0] || {}).errors || {}).filter((k) => pts.some((p) => p.errors[k] > 0));
  chart('chart-errors', 'Errors by kind (per period)', kinds.map((k) => series(pts, k, (p) => p.errors[k])),
    (v) => String(Math.round(v)), 'no errors in this range');
  const cached = pts.filter((p) => p.cache);
  chart('chart-cache', 'Cache read hit ratio', [
    series(cached, 'hits', (p) => {
      const c = p.cache, all = c.read_hits + c.read_misses;
      return all ? (100 * c.read_hits) / all : null;
    }),
  ], (v) => v.toFixed(0) + ' %', cached.length ? 'no reads in this range' : 'this disk has no cache tier');
}

function ago(now, t) {
  const s = Math.max(0, now - t);
  if (s < 120) return `${Math.round(s)} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

// Snapshot activity: how many, and the last one's age and pause (qcow2 disks).
function snapshotCells(served, now) {
  const s = served && served.snapshots;
  if (!s) return ['–', '–'];
  const last = s.last_unix == null ? 'none since start'
    : `${ago(now, s.last_unix)} (paused ${s.last_pause_ms.toFixed(1)} ms)`;
  return [String(s.count), last];
}

function row(disk, served, now) {
  const last = disk.recent[disk.recent.length - 1] || disk.trend[disk.trend.length - 1];
  const errors = last ? errorsOf(last) : 0;
  const cells = [disk.id];
  if (!last) return cells.concat(['', '', '', '', '', '', '', '', ''], snapshotCells(served, now));
  const c = last.cache, reads = c ? c.read_hits + c.read_misses : 0;
  return cells.concat([
    served ? (served.frontend_connected ? 'connected' : 'waiting') : 'removed',
    bytes(last.size), bytes(last.used), bytes(last.host_free),
    number((last.reads + last.writes + last.other) / last.seconds),
    number((last.read_bytes + last.write_bytes) / last.seconds / 1e6),
    micros(last.latency_us && last.latency_us.p99),
    String(errors),
    c ? (reads ? ((100 * c.read_hits) / reads).toFixed(0) + ' %' : '–') : 'no cache',
  ], snapshotCells(served, now));
}

function plural(n, what) {
  return `${n} ${what}${n === 1 ? '' : 's'}`;
}

function span(seconds) {
  if (seconds >= 2 * 86400) return `${Math.round(seconds / 86400)} days`;
  if (seconds >= 2 * 3600) return `${Math.round(seconds / 3600)} hours`;
  return `${Math.round(seconds / 60)} min`;
}

async function refresh() {
  const status = document.getElementById('status');
  try {
    // Every disk's latest point for the table; the whole history of the one on show.
    const [health, list, hist] = await Promise.all([api('/v1/health'), api('/v1/disks'), api('/v1/history?last=1')]);
    status.textContent = '';
    status.className = '';
    document.getElementById('health').textContent =
      `${health.status} · version ${health.version} · up ${Math.round(health.uptime_seconds / 60)} min · ` +
      `${health.disks} disks · ${health.frontends_connected} frontends connected`;
    const recent = span(hist.sample_seconds * hist.recent_points);
    document.getElementById('range-recent').textContent = `last ${recent}`;
    document.getElementById('range-trend').textContent = plural(hist.retention_days, 'day');
    document.getElementById('errors-range').textContent = 'errors (last sample)';
    document.getElementById('sample').textContent = hist.sample_seconds;
    document.getElementById('trend').textContent = hist.trend_seconds;
    document.getElementById('retention').textContent = plural(hist.retention_days, 'day');
    document.getElementById('persistent').textContent = hist.persistent ? ' across restarts' : ' in memory only (no history-file)';
    const byId = new Map(list.disks.map((d) => [d.id, d]));
    const disks = hist.disks;
    if (!disks.some((d) => d.id === selected)) selected = disks.length ? disks[0].id : null;
    const body = document.querySelector('#disks tbody');
    body.replaceChildren(...disks.map((d) => {
      const served = byId.get(d.id);
      const tr = el('tr', { 'data-disk': d.id, id: 'disk-' + d.id }, ...row(d, served, hist.now).map((c) => el('td', {}, c)));
      if (served && served.snapshots) tr.dataset.snapshots = String(served.snapshots.count);
      if (d.id === selected) tr.className = 'selected';
      tr.addEventListener('click', () => { selected = d.id; refresh(); });
      return tr;
    }));
    document.getElementById('selected').textContent = selected || '(none)';
    if (selected) {
      const one = await api('/v1/history?disk=' + encodeURIComponent(selected));
      if (one.disks.length) drawDisk(one.disks[0], document.getElementById('range').value, hist.retention_days);
    }
    clearTimeout(timer);
    timer = setTimeout(refresh, Math.min(Math.max(hist.sample_seconds, 2), 30) * 1000);
  } catch (e) {
    status.textContent = e.message;
    status.className = 'error';
    if (e.status === 401) document.getElementById('login').hidden = false;
    clearTimeout(timer);
    timer = setTimeout(refresh, 10000);
  }
}

document.addEventListener('DOMContentLoaded', () => {
  takeToken();
  // /dashboard?disk=ID opens on that disk.
  selected = new URLSearchParams(location.search).get('disk');
  document.getElementById('login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sessionStorage.setItem('strata-token', document.getElementById('token').value.trim());
    token = sessionStorage.getItem('strata-token');
    document.getElementById('login').hidden = true;
    refresh();
  });
  document.getElementById('range').addEventListener('change', refresh);
  refresh();
});
