// The status page's script: signs in from a link's fragment, then draws the
// overview or one batch from the JSON routes, again every two seconds.
// Text from the farm (prompts, labels, names) only ever goes in through
// textContent and attributes, never as HTML.
"use strict";

const STATES = ["queued", "dispatched", "running", "succeeded", "failed", "cancelled", "dead"];
const REFRESH_MS = 2000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function number(n) { return Number(n).toLocaleString("en"); }

function seconds(s) {
  if (s < 90) return `${s.toFixed(0)} s`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function bar(counts, wide) {
  const node = el("div", { class: wide ? "bar wide" : "bar", title: STATES.map((s) => `${s} ${counts[s]}`).join(", ") });
  for (const state of ["succeeded", "failed", "dead", "cancelled", "running", "dispatched"]) {
    if (counts[state] > 0 && counts.total > 0) {
      // Through the CSSOM: the page's CSP refuses style attributes.
      const part = el("span", { class: `s-${state}` });
      part.style.width = `${(100 * counts[state]) / counts.total}%`;
      node.append(part);
    }
  }
  return node;
}

function finished(c) { return c.succeeded + c.failed + c.cancelled + c.dead; }

async function get(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.status === 401) {
    location.href = `/login#next=${encodeURIComponent(location.pathname)}`;
    throw new Error("not signed in");
  }
  if (!response.ok) throw new Error(`${path}: ${(await response.text()).trim()}`);
  return response.json();
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function drawOverview(status) {
  document.getElementById("viewer").textContent = `${status.viewer.name} (${status.viewer.role})`;
  // The fleet is the operators' view: a submit token gets no queues or workers.
  for (const id of ["queues", "workers"]) {
    const table = document.getElementById(id);
    table.hidden = status.viewer.role !== "admin";
    table.previousElementSibling.hidden = table.hidden;
  }
  fill(document.querySelector("#queues tbody"), status.queues.map((q) => el("tr", {},
    el("td", {}, q.model, q.paused ? " (paused)" : ""),
    ...STATES.map((s) => el("td", { class: "n" }, number(q.counts[s]))),
    el("td", { class: "n" }, q.counts.queued > 0 ? seconds(q.oldest_queued_seconds) : "–"))));
  fill(document.querySelector("#workers tbody"), status.workers.map((w) => el("tr", {},
    el("td", {}, w.name, w.hostname ? el("div", { class: "muted" }, w.hostname) : ""),
    el("td", {}, w.state),
    el("td", {}, (w.devices || []).map((d) => d.memory_bytes ? `${d.name} (${(d.memory_bytes / 2 ** 30).toFixed(0)} GiB)` : d.name).join(", ")),
    el("td", {}, w.models.join(", ")),
    el("td", { class: "n" }, `${w.busy} / ${w.capacity}`),
    el("td", {}, ...(w.current_jobs || []).map((id) => el("div", {}, el("code", {}, id)))),
    el("td", { class: "n" }, number(w.images_done)),
    el("td", { class: "n" }, `${seconds(w.heartbeat_seconds_ago)} ago`))));
  fill(document.querySelector("#batches tbody"), status.batches.map((b) => el("tr", {},
    el("td", {}, el("a", { href: `/batches/${b.id}` }, el("code", {}, b.id))),
    el("td", {}, b.submitter),
    el("td", {}, Object.entries(b.labels).map(([k, v]) => `${k}=${v}`).join(" ")),
    el("td", {}, bar(b.counts, false)),
    el("td", { class: "n" }, `${number(finished(b.counts))} / ${number(b.counts.total)}`),
    el("td", {}, new Date(b.created_at).toLocaleString()))));
}

// One cell per job, kept across refreshes so loaded thumbnails stay put.
const cells = new Map();

function cellFor(job) {
  let cell = cells.get(job.id);
  const key = `${job.state}/${job.progress_step}/${job.image}`;
  if (cell && cell.dataset.key === key) return cell;
  const hover = `#${job.index}: ${job.prompt}\nseed ${job.seed}, ${job.steps} steps, guidance ${job.guidance}, ${job.width}×${job.height}`;
  const content = job.image
    ? el("a", { href: `/api/jobs/${job.id}/image`, target: "_blank", rel: "noopener" },
        el("img", { src: `/api/jobs/${job.id}/thumbnail`, alt: job.prompt, title: hover, loading: "lazy" }))
    : el("span", { title: job.error ? `${hover}\n${job.error}` : hover },
        job.state === "running" ? `running ${job.progress_step} / ${job.steps}` : job.state);
  const fresh = el("div", { class: `cell ${job.state}`, "data-job": job.id, "data-key": key }, content);
  if (cell) cell.replaceWith(fresh);
  cells.set(job.id, fresh);
  return fresh;
}

function drawBatch(batch) {
  document.getElementById("batch-id").textContent = batch.id;
  const c = batch.counts;
  document.getElementById("batch-summary").textContent =
    `${batch.submitter} · ${number(finished(c))} of ${number(c.total)} done (${number(c.succeeded)} succeeded, ${number(c.failed + c.dead)} failed, ` +
    `${number(c.cancelled)} cancelled) · ${number(c.running)} running · ${number(c.queued + c.dispatched)} waiting · ${batch.gpu_seconds.toFixed(1)} GPU-seconds`;
  document.getElementById("batch-progress").replaceChildren(...bar(c, true).childNodes);
  document.getElementById("batch-note").textContent =
    batch.shown_jobs < c.total ? `Showing the first ${number(batch.shown_jobs)} jobs.` : "";
  const sheet = document.getElementById("sheet");
  const wanted = batch.jobs.map(cellFor);
  if (sheet.childNodes.length !== wanted.length || wanted.some((cell, i) => sheet.childNodes[i] !== cell)) {
    sheet.replaceChildren(...wanted);
  }
}

async function refresh() {
  const problem = document.getElementById("problem");
  const batchPath = location.pathname.match(/^\/batches\/([0-9a-fA-F-]+)$/);
  try {
    if (batchPath) {
      document.getElementById("batch").hidden = false;
      drawBatch(await get(`/api/batches/${batchPath[1]}`));
      document.getElementById("viewer").textContent = "";
    } else {
      document.getElementById("overview").hidden = false;
      drawOverview(await get("/api/status"));
    }
    problem.hidden = true;
    document.getElementById("freshness").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    problem.textContent = String(e.message || e);
    problem.hidden = false;
  }
  setTimeout(refresh, REFRESH_MS);
}

function signInFromFragment() {
  // /login#token=…&next=/batches/… : the fragment never reaches a server log.
  // The server checks `next` again and goes nowhere but its own pages.
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("next")) document.getElementById("next").value = params.get("next");
  const token = params.get("token");
  if (!token) return;
  history.replaceState(null, "", location.pathname);
  document.getElementById("token").value = token;
  document.getElementById("login").submit();
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.getElementById("login")) signInFromFragment();
  else refresh();
});
