// The pages' behaviour, without a build step: countdowns, the upload form (checks in the
// browser, a progress bar, the server's answer in words, the queued state at once) and live
// status polling.
"use strict";

(function () {
  const POLL_FAST_MS = 2000;
  const POLL_SLOW_MS = 5000;
  const POLL_FAST_FOR_MS = 60000;
  const POLL_RETRY_MS = 10000;

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function mebibytes(bytes) {
    if (bytes < 1024 * 1024) {
      return Math.max(1, Math.round(bytes / 1024)) + " KiB";
    }
    return (bytes / 1048576).toFixed(1) + " MiB";
  }

  // --- Countdowns ------------------------------------------------------------------------

  function plural(n, unit) {
    return n + " " + unit + (n === 1 ? "" : "s");
  }

  function remainingText(ms) {
    let seconds = Math.floor(ms / 1000);
    const days = Math.floor(seconds / 86400);
    seconds -= days * 86400;
    const hours = Math.floor(seconds / 3600);
    seconds -= hours * 3600;
    const minutes = Math.floor(seconds / 60);
    seconds -= minutes * 60;
    if (days > 0) {
      return "in " + plural(days, "day") + " " + plural(hours, "hour");
    }
    if (hours > 0) {
      return "in " + plural(hours, "hour") + " " + plural(minutes, "minute");
    }
    return "in " + plural(minutes, "minute") + " " + plural(seconds, "second");
  }

  function updateCountdowns() {
    const now = Date.now();
    document.querySelectorAll("time[data-countdown]").forEach(function (element) {
      const target = Date.parse(element.getAttribute("datetime"));
      if (Number.isNaN(target)) {
        return;
      }
      const text = target > now ? remainingText(target - now) : element.dataset.past || "passed";
      if (element.textContent !== text) {
        element.textContent = text;
      }
    });
  }

  // --- Live status -----------------------------------------------------------------------

  function pollStatus(region, url, firstDelay) {
    const started = Date.now();
    let last = region.innerHTML;

    function schedule(delay) {
      window.setTimeout(tick, delay);
    }

    function tick() {
      if (region.dataset.poll !== url) {
        return; // a newer submission took over this region
      }
      fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (response) {
          if (response.status === 401 || response.redirected) {
            region.textContent = "Your login has expired; reload the page to log in again.";
            return null;
          }
          if (!response.ok) {
            throw new Error("HTTP " + response.status);
          }
          return response.text();
        })
        .then(function (html) {
          if (html === null) {
            return;
          }
          if (html !== last) {
            region.innerHTML = html;
            last = html;
          }
          const status = region.querySelector("[data-final]");
          if (status && status.dataset.final === "true") {
            delete region.dataset.poll;
            if (region.hasAttribute("data-reload-when-final")) {
              window.location.reload();
            }
            return;
          }
          schedule(Date.now() - started < POLL_FAST_FOR_MS ? POLL_FAST_MS : POLL_SLOW_MS);
        })
        .catch(function () {
          schedule(POLL_RETRY_MS);
        });
    }

    schedule(firstDelay);
  }

  function startPolling(region, url, firstDelay) {
    region.dataset.poll = url;
    pollStatus(region, url, firstDelay);
  }

  // A queued submission as the upload's answer reports it, in the words of _status.html, shown
  // at once; the first poll then brings the server's own rendering.
  function showQueued(region, submission) {
    const box = document.createElement("div");
    box.className = "status status-queued";
    box.dataset.submission = submission.id;
    box.dataset.final = "false";
    const headline = document.createElement("p");
    headline.className = "status-headline";
    const strong = document.createElement("strong");
    strong.textContent = "Queued";
    headline.appendChild(strong);
    const detail = document.createElement("p");
    detail.className = "status-detail";
    detail.textContent =
      submission.queue_position === null || submission.queue_position === undefined
        ? "Waiting for a worker."
        : "Position " + submission.queue_position + " in the queue. Scoring starts when a " +
          "worker is free; this status updates by itself.";
    const linkLine = document.createElement("p");
    linkLine.className = "status-link";
    const link = document.createElement("a");
    link.href = "/submissions/" + encodeURIComponent(submission.id);
    link.textContent = "Details of submission " + String(submission.id).slice(0, 8);
    linkLine.appendChild(link);
    box.append(headline, detail, linkLine);
    region.replaceChildren(box);
  }

  // --- Upload ----------------------------------------------------------------------------

  function extensionOf(name) {
    const dot = name.lastIndexOf(".");
    return dot < 0 ? "" : name.slice(dot).toLowerCase();
  }

  function showError(box, message, items) {
    box.textContent = "";
    const paragraph = document.createElement("p");
    paragraph.textContent = message;
    box.appendChild(paragraph);
    if (items && items.length) {
      const list = document.createElement("ul");
      items.forEach(function (item) {
        const entry = document.createElement("li");
        entry.textContent = item;
        list.appendChild(entry);
      });
      box.appendChild(list);
    }
  }

  function markInvalid(field, invalid) {
    if (invalid) {
      field.setAttribute("aria-invalid", "true");
    } else {
      field.removeAttribute("aria-invalid");
    }
  }

  const RGB = /^\s*[-+]?\d*\.?\d+(e[-+]?\d+)?\s*,\s*[-+]?\d*\.?\d+(e[-+]?\d+)?\s*,\s*[-+]?\d*\.?\d+(e[-+]?\d+)?\s*$/i;

  // Returns [message, field] for the first problem, or null when the form can be sent.
  function checkForm(form) {
    const fileInput = form.querySelector("#upload-file");
    const maxBytes = Number(form.dataset.maxBytes);
    const extensions = form.dataset.extensions.split(",");
    const file = fileInput.files[0];
    if (!file) {
      return ["Choose a file to upload.", fileInput];
    }
    if (extensions.indexOf(extensionOf(file.name)) < 0) {
      return [
        "“" + file.name + "” is not a file this phase accepts. Upload one of: " +
          extensions.join(", ") + ".",
        fileInput,
      ];
    }
    if (file.size === 0) {
      return ["“" + file.name + "” is empty.", fileInput];
    }
    if (file.size > maxBytes) {
      return [
        "“" + file.name + "” is " + mebibytes(file.size) + "; this phase accepts at most " +
          mebibytes(maxBytes) + ". Save it in a compact format (an .npy of uint8 is the smallest).",
        fileInput,
      ];
    }
    const manifest = form.querySelector("#manifest");
    if (!form.querySelector("#architecture") || (manifest && manifest.files[0])) {
      return null;
    }
    const architecture = form.querySelector("#architecture");
    const normalization = form.querySelector("#normalization");
    if (!architecture.value) {
      return ["Choose the architecture of your checkpoint.", architecture];
    }
    if (!normalization.value) {
      return ["Choose the input normalization your model expects.", normalization];
    }
    if (normalization.value === "custom") {
      const mean = form.querySelector("#norm-mean");
      const std = form.querySelector("#norm-std");
      if (!RGB.test(mean.value)) {
        return ["Give the mean as three numbers separated by commas, e.g. 0.49,0.48,0.45.", mean];
      }
      if (!RGB.test(std.value)) {
        return ["Give the standard deviation as three numbers, e.g. 0.25,0.24,0.26.", std];
      }
    }
    return null;
  }

  function formData(form) {
    const data = new FormData();
    data.append("file", form.querySelector("#upload-file").files[0]);
    const architecture = form.querySelector("#architecture");
    if (!architecture) {
      return data;
    }
    const manifest = form.querySelector("#manifest");
    if (manifest && manifest.files[0]) {
      data.append("manifest", manifest.files[0]);
      return data;
    }
    data.append("architecture", architecture.value);
    const normalization = form.querySelector("#normalization").value;
    if (normalization === "custom") {
      data.append("mean", form.querySelector("#norm-mean").value.trim());
      data.append("std", form.querySelector("#norm-std").value.trim());
    } else {
      data.append("normalization", normalization);
    }
    return data;
  }

  // The server's refusal in words: its message, and the images or fields it names.
  function describeRefusal(status, body) {
    const error = body && body.error;
    if (status === 401) {
      return ["Your login has expired. Reload the page, log in again and upload once more.", []];
    }
    if (status === 403 && error && error.code === "csrf_failed") {
      return ["This page is older than your login. Reload it and upload again.", []];
    }
    if (!error) {
      if (status === 413) {
        return ["The file is larger than the server accepts.", []];
      }
      return ["The server refused the upload (HTTP " + status + "). Try again in a moment.", []];
    }
    const details = error.details || {};
    const items = [];
    (details.violations || []).forEach(function (v) {
      items.push(v.image + ": distance " + v.distance);
    });
    (details.problems || []).forEach(function (p) {
      items.push(p.field + ": " + p.message);
    });
    return [error.message, items];
  }

  function refreshQuota(form) {
    fetch(form.dataset.quotaUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (quota) {
        if (!quota) {
          return;
        }
        const today = document.querySelector(".quota-today strong");
        const total = document.querySelector(".quota-total strong");
        if (today && quota.max_per_day !== null) {
          today.textContent = String(Math.max(0, quota.max_per_day - quota.used_today));
        }
        if (total && quota.max_total !== null) {
          total.textContent = String(Math.max(0, quota.max_total - quota.used_total));
        }
      })
      .catch(function () {});
  }

  function setUpUpload(form) {
    const button = form.querySelector("#upload-button");
    const progressBox = form.querySelector(".upload-progress");
    const progress = form.querySelector("#upload-progress");
    const errorBox = form.querySelector("#upload-message");
    const noteBox = form.querySelector("#upload-note");
    const region = document.getElementById(form.dataset.statusTarget);
    const normalization = form.querySelector("#normalization");

    if (normalization) {
      normalization.addEventListener("change", function () {
        const custom = normalization.value === "custom";
        form.querySelectorAll(".custom-normalization").forEach(function (field) {
          field.hidden = !custom;
        });
      });
    }
    form.hidden = false;

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      form.querySelectorAll("[aria-invalid]").forEach(function (field) {
        markInvalid(field, false);
      });
      errorBox.textContent = "";
      noteBox.textContent = "";
      const problem = checkForm(form);
      if (problem) {
        showError(errorBox, problem[0]);
        markInvalid(problem[1], true);
        problem[1].focus();
        return;
      }
      const request = new XMLHttpRequest();
      request.open("POST", form.dataset.uploadUrl);
      request.setRequestHeader("X-CSRF-Token", csrfToken());
      request.setRequestHeader("Accept", "application/json");
      request.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) {
          progress.value = Math.round((e.loaded / e.total) * 100);
          progress.textContent = progress.value + " %";
        }
      });
      request.addEventListener("load", function () {
        button.disabled = false;
        button.textContent = "Upload and submit";
        let body = null;
        try {
          body = JSON.parse(request.responseText);
        } catch (ignored) {
          body = null;
        }
        if ((request.status === 200 || request.status === 202) && body && body.id) {
          progress.value = 100;
          noteBox.textContent = body.reused
            ? "You had already submitted this exact file; its earlier result is shown below and nothing was counted."
            : "Uploaded and accepted. The status below updates by itself.";
          form.querySelector("#upload-file").value = "";
          refreshQuota(form);
          if (region) {
            const url = "/submissions/" + encodeURIComponent(body.id) + "/status";
            if (body.status === "queued") {
              showQueued(region, body);
              startPolling(region, url, POLL_FAST_MS);
            } else {
              startPolling(region, url, 0);
            }
          }
          return;
        }
        progressBox.hidden = true;
        const refusal = describeRefusal(request.status, body);
        showError(errorBox, refusal[0], refusal[1]);
      });
      request.addEventListener("error", function () {
        button.disabled = false;
        button.textContent = "Upload and submit";
        progressBox.hidden = true;
        showError(
          errorBox,
          "The upload did not reach the server (network error). Check your connection and try again."
        );
      });
      button.disabled = true;
      button.textContent = "Uploading…";
      progress.value = 0;
      progress.textContent = "0 %";
      progressBox.hidden = false;
      request.send(formData(form));
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    updateCountdowns();
    window.setInterval(updateCountdowns, 1000);
    document.querySelectorAll("[data-poll]").forEach(function (region) {
      pollStatus(region, region.dataset.poll, POLL_FAST_MS);
    });
    const form = document.getElementById("upload-form");
    if (form) {
      setUpUpload(form);
    }
  });
})();
