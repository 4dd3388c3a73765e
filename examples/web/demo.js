// The demo page: drop images, see the top 5 of an exported coopkit classifier with bars.
//
// Query parameters: model (URL of the .onnx file; its sidecar model.json must sit beside it;
// default model.onnx next to this page), threads (WebAssembly threads), backend (auto, wasm,
// webgpu). Every failure is shown on the page, never only in the console.

import { loadClassifier } from '../../web/coopkit.js';

const params = new URLSearchParams(location.search);
const modelUrl = params.get('model') || 'model.onnx';
const threads = params.has('threads') ? Number(params.get('threads')) : undefined;
const backend = params.get('backend') || 'auto';

const $ = (id) => document.getElementById(id);
const drop = $('drop');
const input = $('files');
const results = $('results');

function showError(message) {
  $('error').hidden = false;
  $('error').textContent = message;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'style') node.style.cssText = v;
    else if (k in node && k !== 'dataset') node[k] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function card(file, result) {
  if (result.error) {
    return el('article', { className: 'card error', 'data-source': result.source, 'data-error': result.error },
      el('div', {}, el('h2', {}, result.source), el('p', {}, result.error)));
  }
  const rows = result.labels.map((label, i) => {
    const pct = 100 * result.probs[i];
    return el('li', {},
      el('span', { className: 'label' }, label),
      el('span', { className: 'bar' }, el('span', { style: `width:${pct.toFixed(2)}%` })),
      el('span', { className: 'pct' }, `${pct.toFixed(1)}%`));
  });
  const thumb = el('img', { src: URL.createObjectURL(file), alt: result.source });
  thumb.onload = () => URL.revokeObjectURL(thumb.src);
  return el('article', {
    className: 'card', 'data-source': result.source, 'data-labels': JSON.stringify(result.labels),
    'data-probs': JSON.stringify(result.probs),
  }, thumb, el('div', {}, el('h2', {}, result.source), el('ol', {}, ...rows)));
}

let classifier = null;
let busy = Promise.resolve();

async function classify(files) {
  const list = [...files];
  if (!list.length || !classifier) return;
  $('status').textContent = `Classifying ${list.length} image${list.length > 1 ? 's' : ''}…`;
  const t0 = performance.now();
  let out;
  try {
    out = await classifier.predict(list, { topK: 5, errors: 'skip' });
  } catch (e) {
    showError(`Classification failed: ${e.message}`);
    $('status').textContent = '';
    return;
  }
  const ms = performance.now() - t0;
  const done = performance.now();
  const frag = document.createDocumentFragment();
  out.forEach((r, i) => frag.append(card(list[i], r)));
  results.prepend(frag);
  const ok = out.filter((r) => !r.error).length;
  const bad = out.length - ok;
  $('status').textContent = `Classified ${ok} image${ok === 1 ? '' : 's'} in ${ms.toFixed(0)} ms` +
    (bad ? `; ${bad} could not be read (see below)` : '') + '.';
  $('status').dataset.ms = String(ms);
  $('status').dataset.doneMs = String(done);
  $('status').dataset.batches = String(Number($('status').dataset.batches || 0) + 1);
}

function enqueue(files) {
  const list = [...files];  // FileLists empty when the input is reset or the drop event ends
  busy = busy.then(() => classify(list));
}

drop.addEventListener('click', (e) => { if (e.target !== input) input.click(); });
input.addEventListener('change', () => { enqueue(input.files); input.value = ''; });
for (const type of ['dragenter', 'dragover']) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add('over'); });
}
for (const type of ['dragleave', 'drop']) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove('over'); });
}
drop.addEventListener('drop', (e) => enqueue(e.dataTransfer.files));
window.addEventListener('unhandledrejection', (e) => showError(`Unexpected error: ${e.reason?.message ?? e.reason}`));

try {
  classifier = await loadClassifier(modelUrl, { threads, backend });
  const m = classifier.metadata;
  const where = classifier.backend === 'webgpu' ? 'WebGPU'
    : `WebAssembly, ${classifier.threads} thread${classifier.threads === 1 ? '' : 's'}`;
  $('model-line').textContent = `${modelUrl.split('/').pop()}: ${m.model} ${m.method}, ${m.classnames.length} classes, ` +
    `${m.precision}, ${m.image_size[0]}×${m.image_size[1]} ${m.resize_mode}/${m.interpolation} · ${where}` +
    (classifier.backendNote ? ` (${classifier.backendNote})` : '');
  $('status').textContent = `Ready in ${(performance.now() / 1000).toFixed(2)} s. Drop images to classify them.`;
  $('status').dataset.readyMs = String(performance.now());
  $('status').dataset.timings = JSON.stringify(classifier.timings);  // sidecar, files (fetch + sha256), session
  drop.classList.remove('disabled');
  document.body.dataset.state = 'ready';
} catch (e) {
  showError(`Could not load the model ${modelUrl}: ${e.message}`);
  $('status').textContent = '';
  document.body.dataset.state = 'failed';
}
