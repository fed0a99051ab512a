// The overview page: polls GET /admin/overview every POLL_MS and redraws, without reloading.
// The admin token is asked for once and kept in sessionStorage (this tab only, gone when it
// closes); it travels as the X-Admin-Token header, never in a URL. Every value from the
// server is put into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "ordermesh.adminToken";
  // A second after each answer: a breaker that opens shows within about a second.
  const POLL_MS = 1000;
  const byId = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const badge = (value) => el("span", { class: `badge ${value}` }, value);
  const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "");
  const unknown = (part) => el("span", { class: "unknown" }, `unknown: ${part.reason}`);

  // -- sagas ---------------------------------------------------------------------------------

  function stepItem(step) {
    const arrow = step.direction === "forward" ? "\u2192" : "\u21a9";
    const attempts = step.attempts === 1 ? "1 attempt" : `${step.attempts} attempts`;
    return el(
      "li",
      {
        class: `step ${step.direction} ${step.status}`,
        "data-step": step.step,
        "data-direction": step.direction,
        "data-status": step.status,
      },
      `${arrow} ${step.step} `,
      badge(step.status),
      ` ${attempts}`,
      step.last_error ? el("span", { class: "error" }, step.last_error) : null,
    );
  }

  function retryLink(saga) {
    const link = el("a", { class: "retry", href: saga.retry_url }, "retry compensation");
    link.addEventListener("click", async (event) => {
      event.preventDefault(); // the retry is a POST with the token, not a page to open
      const answer = await fetch(saga.retry_url, { method: "POST", headers: authHeaders() });
      link.textContent = answer.ok ? "retry sent" : `retry refused (${answer.status})`;
      refresh();
    });
    return link;
  }

  function sagaCard(saga) {
    const head = el(
      "div",
      { class: "head" },
      el("a", { href: `/orders/${saga.id}` }, saga.id),
      badge(saga.status),
      saga.customer_id ? el("span", {}, saga.customer_id) : null,
      el("span", { class: "muted" }, `started ${time(saga.created_at)}`),
      saga.parked ? retryLink(saga) : null,
    );
    const reason = saga.failure_reason ? el("div", { class: "error" }, saga.failure_reason) : null;
    const steps = el("ol", { class: "steps" }, ...saga.steps.map(stepItem));
    const attrs = { class: saga.parked ? "saga parked" : "saga", "data-saga-id": saga.id };
    attrs["data-status"] = saga.status;
    return el("div", attrs, head, reason, steps);
  }

  function drawSagaList(id, sagas) {
    const list = byId(id);
    list.replaceChildren(...sagas.map(sagaCard));
    if (!sagas.length) list.append(el("p", { class: "muted" }, "none"));
  }

  function drawSagas(part) {
    const unknownBox = byId("sagas-unknown");
    unknownBox.hidden = part.status === "ok";
    unknownBox.textContent = part.status === "ok" ? "" : `unknown: ${part.reason}`;
    drawSagaList("sagas-parked", part.parked);
    drawSagaList("sagas-in-flight", part.in_flight);
    drawSagaList("sagas-recent", part.recent);
  }

  // -- breakers, services, queues ------------------------------------------------------------

  function drawBreakers(part) {
    const box = byId("breakers");
    if (part.status !== "ok") return box.replaceChildren(unknown(part));
    const rows = [];
    for (const [target, instances] of Object.entries(part.targets)) {
      const entries = Object.entries(instances);
      if (!entries.length) rows.push(el("tr", {}, el("td", {}, target), el("td", { class: "muted" }, "not called yet")));
      for (const [instance, state] of entries) {
        const attrs = { "data-breaker": `${target}/${instance}`, "data-state": state };
        rows.push(el("tr", attrs, el("td", {}, target), el("td", {}, instance), el("td", {}, badge(state))));
      }
    }
    box.replaceChildren(el("table", {}, ...rows));
  }

  function instanceRow(instance) {
    return el(
      "tr",
      { "data-instance": instance.instance_id, "data-health": instance.health },
      el("td", {}, instance.instance_id),
      el("td", {}, badge(instance.health)),
      el("td", { class: "muted" }, instance.relay ? `relay ${instance.relay}` : ""),
      el("td", { class: "error" }, instance.reason || ""),
    );
  }

  function outboxText(outbox) {
    if (outbox.status !== "ok") return unknown(outbox);
    const age = outbox.oldest_pending_age_seconds;
    return `${outbox.pending} pending (oldest ${age} s), ${outbox.quarantined} quarantined`;
  }

  function serviceBlock(service) {
    const leader = service.relay_leader;
    const leaderText = leader.status !== "ok" ? unknown(leader) : leader.leader || "nobody";
    const rows = service.instances.map(instanceRow);
    const body = service.status !== "ok" ? unknown(service) : rows.length ? el("table", {}, ...rows) : el("p", { class: "muted" }, "no instance registered");
    return el(
      "div",
      { class: "service", "data-service": service.name },
      el("h3", {}, service.name),
      body,
      el("div", { "data-part": "leader" }, "relay leader: ", leaderText),
      el("div", { "data-part": "outbox" }, "outbox: ", outboxText(service.outbox)),
    );
  }

  function queueRow(queue) {
    const text = queue.status !== "ok" ? unknown(queue) : `${queue.messages} waiting, ${queue.consumers} consumer(s)`;
    return el("tr", { "data-queue": queue.name }, el("td", {}, queue.name), el("td", {}, text));
  }

  // -- polling and the token -----------------------------------------------------------------

  const authHeaders = () => ({ "X-Admin-Token": sessionStorage.getItem(TOKEN_KEY) || "" });
  let timer = null;

  function showLogin(message) {
    clearTimeout(timer);
    byId("overview").hidden = true;
    byId("forget").hidden = true;
    byId("login").hidden = false;
    byId("login-error").textContent = message || "";
    byId("state").textContent = "not connected";
  }

  function draw(data) {
    byId("login").hidden = true;
    byId("overview").hidden = false;
    byId("forget").hidden = false;
    drawSagas(data.sagas);
    drawBreakers(data.breakers);
    byId("services").replaceChildren(...data.services.map(serviceBlock));
    byId("queues").replaceChildren(el("table", {}, ...data.queues.map(queueRow)));
    const state = byId("state");
    state.className = "muted";
    state.textContent = `${data.instance}, updated ${time(data.generated_at)}`;
  }

  async function refresh() {
    clearTimeout(timer);
    if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
    let answer;
    try {
      answer = await fetch("/admin/overview", { headers: authHeaders(), cache: "no-store" });
    } catch (error) {
      return stale(`order service unreachable (${error.message})`);
    }
    if (answer.status === 401 || answer.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      const body = await answer.json().catch(() => ({}));
      return showLogin(body.detail || `refused (${answer.status})`);
    }
    if (!answer.ok) return stale(`overview answered ${answer.status}`);
    draw(await answer.json());
    timer = setTimeout(refresh, POLL_MS);
  }

  function stale(message) {
    const state = byId("state");
    state.className = "stale";
    state.textContent = `${message}; showing the last data, retrying`;
    timer = setTimeout(refresh, POLL_MS);
  }

  byId("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, byId("token").value);
    byId("token").value = "";
    refresh();
  });
  byId("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
  });
  refresh();
})();
