// Submit: pasted prompts or an uploaded .txt/.csv/.jsonl, sizes, seeds, steps and priority, with a budget hint
// from POST /v1/estimate that follows the form as it changes (nothing is queued until the button is pressed).

import { getJson, postForm, postJson } from "./api.js";
import { h, notify, setText } from "./dom.js";
import { countFilePrompts, estimateView, parseSeeds, parseSizes, promptLines } from "./submit-values.js";

const PRESETS = [
  ["512x512", "512×512 square"],
  ["768x768", "768×768 square"],
  ["1024x1024", "1024×1024 square"],
  ["832x1216", "832×1216 portrait (2:3)"],
  ["1216x832", "1216×832 landscape (3:2)"],
  ["896x1152", "896×1152 portrait (7:9)"],
  ["1152x896", "1152×896 landscape (9:7)"],
  ["768x1344", "768×1344 portrait (9:16)"],
  ["1344x768", "1344×768 landscape (16:9)"],
];
const ESTIMATE_DELAY_MS = 300;

export function submitPage(main) {
  let estimateTimer = null;
  let asked = 0;
  let filePrompts = 0;
  const field = (id, label, control, hint) =>
    h(
      "div",
      { class: "field" },
      h("label", { for: id }, label),
      hint ? h("span", { class: "hint", id: `${id}-hint` }, hint) : null,
      control,
    );
  const prompts = h("textarea", {
    id: "prompts",
    name: "prompts",
    rows: 8,
    placeholder: "a lighthouse at dusk\na red fox in the snow",
  });
  const file = h("input", { id: "prompt-file", name: "file", type: "file", accept: ".txt,.csv,.jsonl" });
  const clearFile = h(
    "button",
    { type: "button", id: "clear-file", hidden: true, onclick: () => ((file.value = ""), fileChanged()) },
    "Remove the file",
  );
  const negative = h("input", { id: "negative", name: "negative_prompt", type: "text" });
  const presets = PRESETS.map(([value, label]) =>
    h(
      "label",
      { class: "check" },
      h("input", { type: "checkbox", name: "size", value, checked: value === "1024x1024" }),
      ` ${label}`,
    ),
  );
  const custom = h("input", {
    id: "custom-sizes",
    name: "custom_sizes",
    type: "text",
    placeholder: "640x448, 960x544",
    "aria-describedby": "custom-sizes-hint",
  });
  const seeds = h("input", {
    id: "seeds",
    name: "seeds",
    type: "text",
    inputmode: "numeric",
    placeholder: "1, 2, 3",
    "aria-describedby": "seeds-hint",
  });
  const steps = h("input", {
    id: "steps",
    name: "steps",
    type: "number",
    min: "1",
    max: "100",
    value: "9",
    required: true,
  });
  const priority = h("input", {
    id: "priority",
    name: "priority",
    type: "number",
    min: "0",
    max: "9",
    value: "0",
    required: true,
    "aria-describedby": "priority-hint",
  });
  const model = h("input", {
    id: "model",
    name: "model",
    type: "text",
    placeholder: "the server's default",
    "aria-describedby": "model-hint",
  });
  const estimate = h(
    "div",
    { id: "estimate", class: "estimate", role: "status", "aria-live": "polite" },
    "…",
  );
  const problem = h("p", { id: "submit-problem", class: "error", role: "alert" });
  const send = h("button", { type: "submit", id: "submit-batch" }, "Submit batch");
  const form = h(
    "form",
    { id: "submit-form", onsubmit: submit, oninput: scheduleEstimate, onchange: scheduleEstimate },
    h(
      "fieldset",
      {},
      h("legend", {}, "Prompts"),
      field("prompts", "Prompts, one a line (lines starting with # are skipped)", prompts),
      field(
        "prompt-file",
        "Or upload a .txt, .csv or .jsonl file (it replaces the pasted prompts)",
        h("span", {}, file, " ", clearFile),
      ),
      field("negative", "Negative prompt (optional)", negative),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Resolution"),
      h("div", { class: "checks" }, presets),
      field(
        "custom-sizes",
        "Custom sizes",
        custom,
        "width×height, comma-separated; sides are multiples of 16 from 64 to 2048",
      ),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Sampling and order"),
      field(
        "seeds",
        "Seeds",
        seeds,
        "comma-separated; each prompt renders once per seed; empty = one random seed",
      ),
      field("steps", "Steps", steps),
      field("priority", "Priority", priority, "0 to 9; a higher priority runs sooner"),
      field(
        "model",
        "Model",
        model,
        "filled in with the model the live worker has loaded; empty = the server's default",
      ),
    ),
    h("h2", {}, "Before you submit"),
    estimate,
    problem,
    send,
  );
  main.append(h("h1", {}, "Submit a batch"), form);
  file.addEventListener("change", fileChanged);

  async function fileChanged() {
    clearFile.hidden = !file.files.length;
    prompts.disabled = Boolean(file.files.length);
    filePrompts = file.files.length ? countFilePrompts(file.files[0].name, await file.files[0].text()) : 0;
    scheduleEstimate();
  }

  function sizes() {
    const chosen = presets.map((label) => label.querySelector("input")).filter((box) => box.checked);
    return parseSizes([...chosen.map((box) => box.value), ...custom.value.split(",")]);
  }

  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(askEstimate, ESTIMATE_DELAY_MS);
  }

  async function askEstimate() {
    const ask = ++asked;
    try {
      const count = file.files.length ? filePrompts : promptLines(prompts.value).length;
      const chosen = sizes();
      if (!count || !chosen.length) {
        showEstimate(
          ask,
          null,
          !count
            ? "Add prompts to see whether they fit and how long they take."
            : "Choose at least one size.",
        );
        return;
      }
      const body = {
        model: model.value.trim() || null,
        steps: Number(steps.value),
        sizes: chosen,
        jobs_per_size: count * Math.max(1, parseSeeds(seeds.value).length),
      };
      showEstimate(ask, await postJson("v1/estimate", body), null);
    } catch (error) {
      showEstimate(ask, null, error.message);
    }
  }

  function showEstimate(ask, answer, message) {
    if (ask !== asked) return; // a newer question is on its way
    estimate.classList.toggle("error", Boolean(message) && !answer);
    if (!answer) {
      setText(estimate, message);
      return;
    }
    estimate.replaceChildren(...estimateView(answer));
  }

  async function submit(event) {
    event.preventDefault();
    setText(problem, "");
    send.disabled = true;
    try {
      const created = file.files.length
        ? await postForm("v1/batches", formBody())
        : await postJson("v1/batches", jsonBody());
      // A model no running worker serves is a warning, not a refusal: the jobs wait for one to start.
      const queued = `Batch ${created.id.slice(0, 8)} queued: ${created.job_ids.length} jobs.`;
      notify([queued, ...(created.warnings || [])].join(" "));
      location.hash = `#/batch/${created.id}`;
    } catch (error) {
      setText(problem, error.message);
    } finally {
      send.disabled = false;
    }
  }

  function shared() {
    const body = {
      sizes: sizes().map((s) => `${s.width}x${s.height}`),
      steps: Number(steps.value),
      priority: Number(priority.value),
    };
    const chosenSeeds = parseSeeds(seeds.value);
    if (chosenSeeds.length) body.seeds = chosenSeeds;
    if (negative.value.trim()) body.negative_prompt = negative.value.trim();
    if (model.value.trim()) body.model = model.value.trim();
    return body;
  }

  function jsonBody() {
    const lines = promptLines(prompts.value);
    if (!lines.length) throw new Error("Add at least one prompt, or upload a file.");
    return { prompts: lines, ...shared() };
  }

  function formBody() {
    const form = new FormData();
    form.append("file", file.files[0]);
    for (const [name, value] of Object.entries(shared()))
      form.append(name, Array.isArray(value) ? value.join(",") : String(value));
    return form;
  }

  // The server's default model may be one this machine cannot run (a real model on a CPU): offer the one
  // the live worker has loaded instead.
  async function suggestModel() {
    const { workers } = await getJson("v1/workers");
    const live = workers.find((w) => w.live);
    if (live && !model.value) model.value = live.model;
    scheduleEstimate();
  }

  scheduleEstimate();
  suggestModel().catch(() => {});
  return { refresh: async () => {}, destroy: () => clearTimeout(estimateTimer) };
}
