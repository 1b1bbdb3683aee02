// What the Submit form's fields mean: sizes, seeds and prompts parsed as the API reads them, and the
// estimate's answer as the list shown under the form.

import { formatBytes, formatSeconds, h } from "./dom.js";

const SIZE = /^\s*(\d+)\s*[x×]\s*(\d+)\s*$/i;

// "1024x768" texts (blank ones skipped) as {width, height}; a malformed one throws, naming it.
export function parseSizes(texts) {
  return texts
    .filter((text) => text.trim())
    .map((text) => {
      const match = SIZE.exec(text);
      if (!match) throw new Error(`"${text.trim()}" is not a size like 640x448`);
      return { width: Number(match[1]), height: Number(match[2]) };
    });
}

export function parseSeeds(text) {
  return text
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      if (!/^\d+$/.test(s)) throw new Error(`seed "${s}" is not a whole number`);
      return Number(s);
    });
}

// One prompt a line; blank lines and # comments skipped, as the API reads a .txt file.
export function promptLines(text) {
  return text
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line && !line.startsWith("#"));
}

// About how many prompts an uploaded file holds, for the estimate (the API counts exactly on submit).
export function countFilePrompts(name, text) {
  const lines = text
    .split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
  if (name.toLowerCase().endsWith(".csv")) return Math.max(0, lines.length - 1); // the header row
  if (name.toLowerCase().endsWith(".txt")) return lines.filter((line) => !line.startsWith("#")).length;
  return lines.length;
}

export function estimateView(answer) {
  return [h("p", { class: "summary" }, answer.summary), h("ul", {}, answer.sizes.map(sizeLine))];
}

function sizeLine(s) {
  const fit = s.fits === null ? "no budget to compare with" : s.fits ? "fits" : "does not fit";
  const parts = [`${s.width}×${s.height}: ${s.images} images`, fit];
  if (s.peak_bytes) parts.push(`peak ${formatBytes(s.peak_bytes)}`);
  if (s.seconds_per_image) parts.push(`${formatSeconds(s.seconds_per_image)} per image`);
  return h("li", { class: s.fits === false ? "oom" : "" }, `${parts.join(", ")} (${s.source})`);
}
