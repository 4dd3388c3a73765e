/**
 * coopkit in the browser: run a classifier exported by `coopkit export` with onnxruntime-web.
 *
 *   import { loadClassifier } from './coopkit.js';          // resolves 'onnxruntime-web'
 *   const clf = await loadClassifier('model.onnx');          // reads model.json beside it
 *   const [p] = await clf.predict(file, { topK: 5 });        // File, Blob, URL, ImageData...
 *   p.labels, p.probs                                        // best first
 *   p.labelProbs                                             // multi-label files: every label's probability
 *
 * An ES module with no build step: a bundler resolves the bare 'onnxruntime-web' import from
 * package.json (pinned), a plain page maps it with an import map (see examples/web/index.html).
 *
 * Data flow, the same as the Python runtime's (coopkit/runtime/image.py):
 *   model.json (the sidecar: onnxruntime-web cannot read ONNX metadata) -> class names, input
 *   size, the resize plan the exporter resolved (derived as the Python runtime does for files
 *   written before it was recorded); model.onnx bytes -> sha256 checked against the sidecar ->
 *   session (WebAssembly; WebGPU when present and when it gives the same answers);
 *   image -> decode (EXIF orientation applied, no colour management) -> RGB -> resize and crop by
 *   that plan exactly as coopkit/runtime/preprocess.py does with Pillow (a port of Pillow's
 *   ImagingResample, fixed-point rounding included) -> uint8 (n, H, W, 3) -> probs. A raw-input
 *   file (metadata input_kind 'raw') resizes and crops inside its graph: it gets the decoded
 *   RGB image instead, one run per image size, as the Python runtime feeds it.
 *
 * A multi-label file (metadata task 'multilabel', sidecar_version 2: DualCoOp and the multi-label
 * baselines) gives each label's own probability (a sigmoid, not a softmax): predict() returns every
 * label at or above its threshold (metadata.thresholds), most probable first, and every label's
 * probability in `labelProbs`, as the Python runtime's Prediction does.
 *
 * Every failure a person can cause (a non-image file, a huge image, a sidecar that does not
 * match the file, a missing file) is a CoopkitError with a one-line message and a `kind`.
 */

import * as ort from 'onnxruntime-web';

/** Sidecar `format` and the newest `sidecar_version` this module reads (runtime/contract.py): 1 for
 * single-label files, 2 for multi-label ones (older readers refuse those instead of misreading them). */
export const SIDECAR_FORMAT = 'coopkit-sidecar';
export const SIDECAR_VERSION = 2;
/** Images with more pixels are refused before decoding (the Python runtime's MAX_PIXELS). */
export const MAX_PIXELS = 89_478_485;
/** Largest |difference| of a probability for WebGPU to count as giving the same answers as WebAssembly. */
export const WEBGPU_TOLERANCE = 1e-3;

/** An error a person can act on: `kind` is one of sidecar, checksum, fetch, image, too_large, session, input. */
export class CoopkitError extends Error {
  constructor(kind, message) {
    super(message);
    this.name = 'CoopkitError';
    this.kind = kind;
  }
}

// --- fetching and checking the files ------------------------------------------------------------

/** `model.onnx` -> `model.json`, as contract.sidecar_name (the sidecar beside a graph). */
export function sidecarUrl(modelUrl) {
  const url = new URL(modelUrl, globalThis.location?.href);
  const name = url.pathname.split('/').pop();
  const stem = name.endsWith('.onnx') ? name.slice(0, -'.onnx'.length) : name;
  url.pathname = url.pathname.slice(0, url.pathname.length - name.length) + `${stem}.json`;
  url.search = '';
  url.hash = '';
  return url.href;
}

async function fetchOk(url, what) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new CoopkitError('fetch', `cannot fetch ${what} ${url}: ${e.message}`);
  }
  if (!response.ok) {
    throw new CoopkitError('fetch', `cannot fetch ${what} ${url}: HTTP ${response.status} ${response.statusText}`.trim());
  }
  return response;
}

/** Check a parsed sidecar's shape; returns it. */
export function checkSidecar(sidecar, where = 'the sidecar') {
  if (!sidecar || typeof sidecar !== 'object' || sidecar.format !== SIDECAR_FORMAT) {
    throw new CoopkitError('sidecar', `${where} is not a coopkit sidecar (no "format": "${SIDECAR_FORMAT}"); ` +
      'use the model.json that `coopkit export` wrote beside the .onnx file');
  }
  if (!Number.isInteger(sidecar.sidecar_version) || sidecar.sidecar_version > SIDECAR_VERSION) {
    throw new CoopkitError('sidecar', `${where} has sidecar_version ${sidecar.sidecar_version}; this coopkit.js ` +
      `reads up to ${SIDECAR_VERSION}: update coopkit.js`);
  }
  const m = sidecar.metadata || {};
  const files = sidecar.files;
  const ok = Array.isArray(m.classnames) && m.classnames.length > 0 && Array.isArray(m.image_size) &&
    m.image_size.length === 2 && typeof m.resize_mode === 'string' && typeof m.interpolation === 'string' &&
    Array.isArray(files) && files.length > 0 && files[0].role === 'model' && sidecar.input && sidecar.outputs;
  if (!ok) {
    throw new CoopkitError('sidecar', `${where} is incomplete (needs metadata.classnames, image_size, resize_mode, ` +
      'interpolation, files, input and outputs); re-export with `coopkit export`');
  }
  const task = m.task ?? 'classify';
  if (!['classify', 'multilabel'].includes(task)) {
    throw new CoopkitError('sidecar', `${where} has task '${task}', not one of classify, multilabel: update coopkit.js`);
  }
  const t = m.thresholds;
  if (task === 'multilabel' && !(Array.isArray(t) && t.length === m.classnames.length &&
      t.every((v) => Number.isFinite(v)))) {
    throw new CoopkitError('sidecar', `${where} is a multi-label file without one threshold (a number) per label; ` +
      're-export with `coopkit export`');
  }
  return sidecar;
}

/** Hex sha256 of bytes: WebCrypto where the page is a secure context, else a plain-JS digest. */
export async function sha256Hex(bytes, { subtle = true } = {}) {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  if (subtle && globalThis.crypto?.subtle) {
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', data));
    return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
  }
  return sha256Plain(data);
}

const K256 = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
  0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
  0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
  0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
  0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
  0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
  0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
  0xc67178f2,
]);

/** FIPS 180-4 SHA-256 for pages without WebCrypto (plain http on a LAN address). */
function sha256Plain(data) {
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
    0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  const tailLength = ((data.length + 9 + 63) & ~63) - data.length;  // padding: 0x80, zeros, 64-bit length
  const tail = new Uint8Array(tailLength);
  tail[0] = 0x80;
  const bits = data.length * 8;
  new DataView(tail.buffer).setUint32(tailLength - 8, Math.floor(bits / 2 ** 32));
  new DataView(tail.buffer).setUint32(tailLength - 4, bits >>> 0);
  const total = data.length + tailLength;
  const byte = (i) => (i < data.length ? data[i] : tail[i - data.length]);
  for (let off = 0; off < total; off += 64) {
    for (let t = 0; t < 16; t++) {
      const i = off + 4 * t;
      w[t] = (byte(i) << 24) | (byte(i + 1) << 16) | (byte(i + 2) << 8) | byte(i + 3);
    }
    for (let t = 16; t < 64; t++) {
      const s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >>> 3);
      const s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >>> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let t = 0; t < 64; t++) {
      const t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K256[t] + w[t];
      const t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  return Array.from(h, (x) => x.toString(16).padStart(8, '0')).join('');
}

/** Fetch a file listed in the sidecar and check its size and sha256; returns its bytes. */
async function fetchChecked(base, entry, sidecarName, checksum) {
  const url = new URL(entry.name, base).href;
  const bytes = new Uint8Array(await (await fetchOk(url, 'model file')).arrayBuffer());
  const fix = 're-export, or serve the files that one `coopkit export` wrote together';
  if (bytes.length !== entry.bytes) {
    throw new CoopkitError('checksum', `${entry.name} does not match its sidecar ${sidecarName}: ` +
      `${bytes.length} bytes, the sidecar says ${entry.bytes}; ${fix}`);
  }
  if (checksum) {
    const digest = await sha256Hex(bytes);
    if (digest !== entry.sha256) {
      throw new CoopkitError('checksum', `${entry.name} does not match its sidecar ${sidecarName}: sha256 ` +
        `${digest.slice(0, 12)}..., the sidecar says ${String(entry.sha256).slice(0, 12)}...; ${fix}`);
    }
  }
  return bytes;
}

// --- decoding -------------------------------------------------------------------------------------

/** `{type, width, height}` from an image file's header (PNG, JPEG, GIF, WebP, BMP), or null. */
export function imageInfo(bytes) {
  const b = bytes;
  const n = b.length;
  const be16 = (i) => (b[i] << 8) | b[i + 1];
  const le16 = (i) => b[i] | (b[i + 1] << 8);
  const be32 = (i) => ((b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]) >>> 0;
  const le32 = (i) => (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)) >>> 0;
  const ascii = (i, len) => String.fromCharCode(...b.subarray(i, i + len));
  if (n >= 24 && be32(0) === 0x89504e47 && be32(4) === 0x0d0a1a0a) {
    return { type: 'png', width: be32(16), height: be32(20) };
  }
  if (n >= 10 && ascii(0, 4) === 'GIF8') return { type: 'gif', width: le16(6), height: le16(8) };
  if (n >= 30 && ascii(0, 4) === 'RIFF' && ascii(8, 4) === 'WEBP') {
    const chunk = ascii(12, 4);
    if (chunk === 'VP8 ') return { type: 'webp', width: le16(26) & 0x3fff, height: le16(28) & 0x3fff };
    if (chunk === 'VP8L') {
      const v = le32(21);
      return { type: 'webp', width: (v & 0x3fff) + 1, height: ((v >>> 14) & 0x3fff) + 1 };
    }
    if (chunk === 'VP8X') {
      return { type: 'webp', width: 1 + (b[24] | (b[25] << 8) | (b[26] << 16)), height: 1 + (b[27] | (b[28] << 8) | (b[29] << 16)) };
    }
    return null;
  }
  if (n >= 26 && ascii(0, 2) === 'BM') {
    return { type: 'bmp', width: Math.abs(le32(18) | 0), height: Math.abs(le32(22) | 0) };
  }
  if (n >= 4 && b[0] === 0xff && b[1] === 0xd8) {
    let i = 2;
    while (i + 9 < n) {
      if (b[i] !== 0xff) return null;
      const marker = b[i + 1];
      if (marker === 0xff) { i += 1; continue; }  // fill byte
      if (marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) { i += 2; continue; }
      const isSof = marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc;
      if (isSof) return { type: 'jpeg', width: be16(i + 7), height: be16(i + 5) };
      i += 2 + be16(i + 2);
    }
    return null;
  }
  return null;
}

function describe(input, index) {
  if (typeof input === 'string') return input.split('/').pop() || input;
  if (input instanceof URL) return input.pathname.split('/').pop() || input.href;
  if (typeof File !== 'undefined' && input instanceof File) return input.name;
  if (typeof Blob !== 'undefined' && input instanceof Blob) return `<blob ${input.size} bytes>`;
  if (typeof ImageData !== 'undefined' && input instanceof ImageData) return `<ImageData ${input.width}x${input.height}>`;
  return `<image ${index}>`;
}

function tooLarge(name, width, height, maxPixels) {
  return new CoopkitError('too_large', `${name}: ${width}x${height} image has ${(width * height).toLocaleString('en')} ` +
    `pixels, more than the limit of ${maxPixels.toLocaleString('en')} (possible decompression bomb)`);
}

function pixelsOf(source, width, height) {
  const canvas = typeof OffscreenCanvas !== 'undefined'
    ? new OffscreenCanvas(width, height)
    : Object.assign(document.createElement('canvas'), { width, height });
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(source, 0, 0);
  return ctx.getImageData(0, 0, width, height).data;
}

/**
 * Decode one image to RGBA pixels `{data, width, height}`.
 *
 * Accepts a File or Blob, a URL (string or URL; same origin or CORS-enabled), an ImageData, or
 * an already decoded ImageBitmap / HTMLImageElement / canvas. Encoded files are decoded without
 * colour management (as Pillow) with their EXIF orientation applied (as the runtime's
 * load_image); images over `maxPixels` are refused from their header, before decoding.
 */
export async function decodeImage(input, { maxPixels = MAX_PIXELS, name } = {}) {
  const label = name ?? describe(input, 0);
  if (typeof ImageData !== 'undefined' && input instanceof ImageData) {
    if (input.width * input.height > maxPixels) throw tooLarge(label, input.width, input.height, maxPixels);
    return { data: input.data, width: input.width, height: input.height };
  }
  let blob;
  if (typeof input === 'string' || input instanceof URL) {
    blob = await (await fetchOk(input, 'image')).blob();
  } else if (typeof Blob !== 'undefined' && input instanceof Blob) {
    blob = input;
  } else if (input && typeof input === 'object' && 'width' in input && 'height' in input &&
             (typeof ImageBitmap !== 'undefined' && input instanceof ImageBitmap ||
              typeof HTMLImageElement !== 'undefined' && input instanceof HTMLImageElement ||
              typeof HTMLCanvasElement !== 'undefined' && input instanceof HTMLCanvasElement ||
              typeof OffscreenCanvas !== 'undefined' && input instanceof OffscreenCanvas)) {
    const width = input.naturalWidth || input.width;
    const height = input.naturalHeight || input.height;
    if (width * height > maxPixels) throw tooLarge(label, width, height, maxPixels);
    return { data: pixelsOf(input, width, height), width, height };
  } else {
    throw new CoopkitError('input', `unsupported image input ${label}: expected a File, Blob, URL, ImageData, ` +
      'ImageBitmap, <img> or canvas');
  }
  const head = new Uint8Array(await blob.slice(0, 1 << 20).arrayBuffer());
  const info = imageInfo(head);
  if (info && info.width * info.height > maxPixels) throw tooLarge(label, info.width, info.height, maxPixels);
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {
      imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none',
    });
  } catch (e) {
    const kind = blob.type ? ` (${blob.type})` : '';
    throw new CoopkitError('image', `${label}${kind} is not an image this browser can decode; ` +
      'use PNG, JPEG, GIF, WebP or BMP');
  }
  try {
    if (bitmap.width * bitmap.height > maxPixels) throw tooLarge(label, bitmap.width, bitmap.height, maxPixels);
    return { data: pixelsOf(bitmap, bitmap.width, bitmap.height), width: bitmap.width, height: bitmap.height };
  } finally {
    bitmap.close();
  }
}

// --- Pillow's resampling, ported ------------------------------------------------------------------
//
// Pillow's Image.resize on an 8-bit RGB image (src/libImaging/Resample.c, ImagingResample):
// two separable passes, each a convolution whose support is widened by the scale when
// downscaling (antialiasing), coefficients normalised to sum 1, then turned into 22-bit fixed
// point; every output of a pass is rounded and clipped to 8 bits. NEAREST goes through the
// affine "scale" transform instead (Geometry.c, ImagingScaleAffine). The double arithmetic
// below is written in the same order as the C code (Pillow 13), so results are identical.

const PRECISION_BITS = 32 - 8 - 2;
const FILTERS = {
  bicubic: {
    support: 2.0,
    f(x) {
      if (x < 0.0) x = -x;
      if (x < 1.0) return (1.5 * x - 2.5) * x * x + 1;  // ((a + 2) x - (a + 3)) x^2 + 1, a = -0.5
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * -0.5;
      return 0.0;
    },
  },
  bilinear: {
    support: 1.0,
    f(x) {
      if (x < 0.0) x = -x;
      return x < 1.0 ? 1.0 - x : 0.0;
    },
  },
};

function precomputeCoeffs(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = scale < 1.0 ? 1.0 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let ww = 0.0;
    let xmin = (center - support + 0.5) | 0;
    if (xmin < 0) xmin = 0;
    let xmax = (center + support + 0.5) | 0;
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    for (let x = 0; x < xmax; x++) {
      const w = filter.f((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) {
      const v = ww !== 0.0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = v < 0 ? (-0.5 + v * (1 << PRECISION_BITS)) | 0 : (0.5 + v * (1 << PRECISION_BITS)) | 0;
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

const clip8 = (s) => {
  const v = s >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
};

/** One output pixel: `count` taps of RGB from `p` (step `step`) weighted by kk[kb..], rounded to 8 bits. */
function convolve(src, p, step, count, kk, kb, out, o) {
  let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
  for (let i = 0; i < count; i++, p += step) {
    const w = kk[kb + i];
    s0 += src[p] * w;
    s1 += src[p + 1] * w;
    s2 += src[p + 2] * w;
  }
  out[o] = clip8(s0);
  out[o + 1] = clip8(s1);
  out[o + 2] = clip8(s2);
}

function resampleHorizontal(src, inW, yFirst, rows, outW, { ksize, bounds, kk }) {
  const out = new Uint8Array(outW * rows * 3);
  for (let yy = 0, o = 0; yy < rows; yy++) {
    const row = (yy + yFirst) * inW * 3;
    for (let xx = 0; xx < outW; xx++, o += 3) {
      convolve(src, row + bounds[xx * 2] * 3, 3, bounds[xx * 2 + 1], kk, xx * ksize, out, o);
    }
  }
  return out;
}

function resampleVertical(src, width, outH, { ksize, bounds, kk }, yShift) {
  const out = new Uint8Array(width * outH * 3);
  const stride = width * 3;
  for (let yy = 0, o = 0; yy < outH; yy++) {
    const first = (bounds[yy * 2] - yShift) * stride;
    for (let xx = 0; xx < stride; xx += 3, o += 3) {
      convolve(src, first + xx, stride, bounds[yy * 2 + 1], kk, yy * ksize, out, o);
    }
  }
  return out;
}

function resizeNearest(src, inW, inH, outW, outH) {
  const out = new Uint8Array(outW * outH * 3);  // Pillow fills rows outside the source with 0
  const a0 = inW / outW;
  const a4 = inH / outH;
  const coord = (v) => (v < 0.0 ? -1 : v | 0);
  const xintab = new Int32Array(outW);
  let xmin = outW, xmax = 0;
  let xo = a0 * 0.5;
  for (let x = 0; x < outW; x++) {
    const xin = coord(xo);
    if (xin >= 0 && xin < inW) {
      xmax = x + 1;
      if (x < xmin) xmin = x;
      xintab[x] = xin;
    }
    xo += a0;
  }
  let yo = a4 * 0.5;
  for (let y = 0; y < outH; y++) {
    const yi = coord(yo);
    if (yi >= 0 && yi < inH) {
      for (let x = xmin; x < xmax; x++) {
        const p = (yi * inW + xintab[x]) * 3;
        const q = (y * outW + x) * 3;
        out[q] = src[p];
        out[q + 1] = src[p + 1];
        out[q + 2] = src[p + 2];
      }
    }
    yo += a4;
  }
  return out;
}

/**
 * Pillow's `Image.resize((outW, outH), filter)` on RGB pixels (3 bytes per pixel, rows of `inW`).
 * `filter`: 'bicubic', 'bilinear' or 'nearest'. Returns a new Uint8Array (outH, outW, 3).
 */
export function pillowResize(src, inW, inH, outW, outH, filter = 'bicubic') {
  if (outW === inW && outH === inH) return src.slice();
  if (filter === 'nearest') return resizeNearest(src, inW, inH, outW, outH);
  const f = FILTERS[filter];
  if (!f) throw new CoopkitError('input', `interpolation '${filter}' is not one of bicubic, bilinear, nearest`);
  const needH = outW !== inW;
  const needV = outH !== inH;
  // Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as
  // many pixels as the width (Pillow 12 and older: always horizontal first). The order changes
  // where the intermediate image is rounded to 8 bits, so it is followed exactly.
  const horizontalFirst = !(inH - outH > 0 && inH - outH > (inW - outW) * 2);
  if (!horizontalFirst) {
    const pixels = needV ? resampleVertical(src, inW, outH, precomputeCoeffs(inH, outH, f), 0) : src;
    return needH ? resampleHorizontal(pixels, inW, 0, outH, outW, precomputeCoeffs(inW, outW, f)) : pixels;
  }
  const vert = precomputeCoeffs(inH, outH, f);
  let pixels = src;
  let shift = 0;
  if (needH) {
    // only the source rows the vertical pass reads go through the horizontal pass (as Pillow)
    const yFirst = vert.bounds[0];
    const yLast = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
    pixels = resampleHorizontal(src, inW, yFirst, yLast - yFirst, outW, precomputeCoeffs(inW, outW, f));
    shift = yFirst;
  }
  return needV ? resampleVertical(pixels, outW, outH, vert, shift) : pixels;
}

// --- open_clip's eval transform (coopkit/runtime/preprocess.py, resize_and_crop) ------------------

/** Python's round() on a float: halves go to the even neighbour. */
function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** torchvision Resize(int): short edge -> size, long edge truncated. Returns [w, h]. */
function shortestEdgeSize(width, height, size) {
  const [short, long] = width <= height ? [width, height] : [height, width];
  const newLong = Math.trunc((size * long) / short);
  return width <= height ? [size, newLong] : [newLong, size];
}

/** open_clip ResizeKeepRatio.get_params (no random scaling). Returns [w, h]. */
function keepRatioSize(width, height, target, longest) {
  const ratioH = height / target[0];
  const ratioW = width / target[1];
  const ratio = Math.max(ratioH, ratioW) * longest + Math.min(ratioH, ratioW) * (1.0 - longest);
  const newH = roundHalfEven((height * 1.0) / ratio);
  const newW = roundHalfEven((width * 1.0) / ratio);
  return [Math.max(1, newW), Math.max(1, newH)];
}

function resize(img, [w, h], interpolation) {
  if (img.width === w && img.height === h) return img;
  return { data: pillowResize(img.data, img.width, img.height, w, h, interpolation), width: w, height: h };
}

/** torchvision center_crop / open_clip center_crop_or_pad on RGB pixels. */
function centerCropOrPad(img, [cropH, cropW], fill) {
  let { data, width, height } = img;
  if (cropW > width || cropH > height) {
    const left = cropW > width ? Math.floor((cropW - width) / 2) : 0;
    const top = cropH > height ? Math.floor((cropH - height) / 2) : 0;
    const right = cropW > width ? Math.floor((cropW - width + 1) / 2) : 0;
    const bottom = cropH > height ? Math.floor((cropH - height + 1) / 2) : 0;
    const w2 = width + left + right;
    const h2 = height + top + bottom;
    const padded = new Uint8Array(w2 * h2 * 3).fill(fill);
    for (let y = 0; y < height; y++) {
      padded.set(data.subarray(y * width * 3, (y + 1) * width * 3), ((y + top) * w2 + left) * 3);
    }
    data = padded;
    width = w2;
    height = h2;
    if (cropW === width && cropH === height) return { data, width, height };
  }
  const top = roundHalfEven((height - cropH) / 2.0);
  const left = roundHalfEven((width - cropW) / 2.0);
  const out = new Uint8Array(cropW * cropH * 3);
  for (let y = 0; y < cropH; y++) {
    const start = ((y + top) * width + left) * 3;
    out.set(data.subarray(start, start + cropW * 3), y * cropW * 3);
  }
  return { data: out, width: cropW, height: cropH };
}

/** RGBA (4 bytes per pixel) -> RGB: alpha dropped, as Pillow's convert('RGB'). */
export function rgbaToRgb(rgba, width, height) {
  const n = width * height;
  const out = new Uint8Array(n * 3);
  for (let i = 0, j = 0; i < n; i++, j += 4) {
    out[i * 3] = rgba[j];
    out[i * 3 + 1] = rgba[j + 1];
    out[i * 3 + 2] = rgba[j + 2];
  }
  return out;
}

const RESIZE_RULES = ['exact', 'shortest_edge', 'keep_ratio_shortest', 'keep_ratio_longest'];

/**
 * The resize plan of sidecar metadata, `{rule, interpolation, size: [h, w], crop, fill}`: the one the
 * exporter resolved and recorded (`metadata.resize_plan`, coopkit/runtime/contract.py ResizeSpec),
 * applied as it is; for files written before it existed (coopkit 0.2.0), derived from image_size,
 * resize_mode, interpolation and fill_color as coopkit/runtime/preprocess.py resize_plan derives it.
 */
export function resizePlan(metadata) {
  const plan = metadata.resize_plan;
  if (plan != null) {
    const ok = plan && RESIZE_RULES.includes(plan.rule) && typeof plan.interpolation === 'string' &&
      Array.isArray(plan.size) && plan.size.length === 2 && typeof plan.crop === 'boolean' &&
      Number.isInteger(plan.fill ?? 0);
    if (!ok) {
      throw new CoopkitError('sidecar', `resize_plan ${JSON.stringify(plan)} is not a resize plan ` +
        `(rule one of ${RESIZE_RULES.join(', ')}, interpolation, size [h, w], crop, fill); re-export with \`coopkit export\``);
    }
    if (plan.size[0] !== metadata.image_size[0] || plan.size[1] !== metadata.image_size[1]) {
      throw new CoopkitError('sidecar', `resize_plan size [${plan.size}] differs from image_size [${metadata.image_size}]`);
    }
    return { rule: plan.rule, interpolation: plan.interpolation, size: [plan.size[0], plan.size[1]], crop: plan.crop,
      fill: plan.fill ?? 0 };
  }
  const size = [metadata.image_size[0], metadata.image_size[1]];
  const interpolation = metadata.interpolation ?? 'bicubic';
  if (metadata.resize_mode === 'squash') return { rule: 'exact', interpolation, size, crop: false, fill: 0 };
  if (metadata.resize_mode === 'longest') {
    return { rule: 'keep_ratio_longest', interpolation, size, crop: true, fill: metadata.fill_color ?? 0 };
  }
  if (metadata.resize_mode === 'shortest') {
    if (size[0] === size[1]) return { rule: 'shortest_edge', interpolation, size, crop: true, fill: 0 };
    // open_clip resizes non-square "shortest" models bicubic whatever the interpolation (mirrored)
    return { rule: 'keep_ratio_shortest', interpolation: 'bicubic', size, crop: true, fill: 0 };
  }
  throw new CoopkitError('sidecar', `resize_mode '${metadata.resize_mode}' is not one of shortest, longest, squash`);
}

/**
 * open_clip's eval-time resize and crop on an RGB image, as the Python runtime applies it.
 *
 * `metadata` is the sidecar's: its resize plan (see resizePlan) is applied. Returns a Uint8Array (h, w, 3).
 */
export function resizeAndCrop(rgb, width, height, metadata) {
  const plan = resizePlan(metadata);
  let img = { data: rgb, width, height };
  const resized = {
    exact: () => [plan.size[1], plan.size[0]],
    shortest_edge: () => shortestEdgeSize(width, height, plan.size[0]),
    keep_ratio_shortest: () => keepRatioSize(width, height, plan.size, 0.0),
    keep_ratio_longest: () => keepRatioSize(width, height, plan.size, 1.0),
  }[plan.rule]();
  img = resize(img, resized, plan.interpolation);
  if (plan.crop) img = centerCropOrPad(img, plan.size, plan.fill);
  return img.data;
}

// --- the classifier -------------------------------------------------------------------------------

/** A deterministic batch of two images (gradients), to compare WebGPU with WebAssembly. */
function probeBatch(h, w) {
  const data = new Uint8Array(2 * h * w * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = (y * w + x) * 3;
      data[i] = (255 * x) / w;
      data[i + 1] = (255 * y) / h;
      data[i + 2] = 128;
      const j = h * w * 3 + i;
      data[j] = 200 - (150 * y) / h;
      data[j + 1] = (x * 7 + y * 3) % 256;
      data[j + 2] = (255 * (w - x)) / w;
    }
  }
  return data;
}

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

async function createSession(bytes, external, providers) {
  const options = { executionProviders: providers, graphOptimizationLevel: 'all' };
  if (external.length) options.externalData = external;
  try {
    return await ort.InferenceSession.create(bytes, options);
  } catch (e) {
    const msg = String(e?.message ?? e).split('\n')[0];
    throw new CoopkitError('session', `onnxruntime-web (${providers.join(', ')}) cannot run this model: ${msg}`);
  }
}

/**
 * Load an exported classifier and its sidecar.
 *
 * @param {string|URL} model URL of the .onnx file written by `coopkit export`.
 * @param {object} [options]
 * @param {string|URL|object} [options.sidecar] The sidecar's URL or parsed JSON (default: model.json beside the file).
 * @param {'auto'|'wasm'|'webgpu'} [options.backend='auto'] auto: WebGPU when the browser has an adapter and
 *   the WebGPU session gives the same answers as WebAssembly on a probe batch; else WebAssembly.
 * @param {number} [options.threads] WebAssembly threads (needs a cross-origin isolated page; applies
 *   to the first session of the page, as onnxruntime-web initialises once).
 * @param {boolean} [options.checksum=true] Check every file's sha256 against the sidecar.
 * @param {number} [options.batchSize=8] Images per session run.
 * @param {number} [options.maxPixels] Larger images are refused.
 * @returns {Promise<Classifier>}
 */
export async function loadClassifier(model, options = {}) {
  const t0 = performance.now();
  const modelUrl = new URL(model, globalThis.location?.href).href;
  let sidecar = options.sidecar;
  let sidecarName = 'the sidecar';
  if (!sidecar || typeof sidecar === 'string' || sidecar instanceof URL) {
    const url = sidecar ? new URL(sidecar, globalThis.location?.href).href : sidecarUrl(modelUrl);
    sidecarName = url.split('/').pop();
    const response = await fetchOk(url, 'sidecar');
    try {
      sidecar = await response.json();
    } catch (e) {
      throw new CoopkitError('sidecar', `${sidecarName} is not valid JSON: ${e.message}`);
    }
  }
  checkSidecar(sidecar, sidecarName);
  const t1 = performance.now();
  const checksum = options.checksum ?? true;
  const [main, ...rest] = sidecar.files;
  const bytes = await fetchChecked(modelUrl, { ...main, name: modelUrl.split('/').pop() }, sidecarName, checksum);
  const external = [];
  for (const entry of rest.filter((f) => f.role === 'external_data')) {
    external.push({ path: entry.name, data: await fetchChecked(modelUrl, entry, sidecarName, checksum) });
  }
  const t2 = performance.now();
  if (options.threads !== undefined) ort.env.wasm.numThreads = options.threads;
  const backend = options.backend ?? 'auto';
  if (!['auto', 'wasm', 'webgpu'].includes(backend)) {
    throw new CoopkitError('input', `backend '${backend}' is not one of auto, wasm, webgpu`);
  }
  let session = null;
  let chosen = 'wasm';
  let note = '';
  if (backend !== 'wasm') {
    const adapter = globalThis.navigator?.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
    if (!adapter) {
      if (backend === 'webgpu') throw new CoopkitError('session', 'WebGPU is not available in this browser');
      note = 'WebGPU not available';
    } else {
      try {
        session = await createSession(bytes, external, ['webgpu']);
        chosen = 'webgpu';
      } catch (e) {
        if (backend === 'webgpu') throw e;
        note = `WebGPU failed: ${e.message}`;
      }
    }
  }
  let wasm = null;
  if (chosen === 'wasm' || backend === 'auto') wasm = await createSession(bytes, external, ['wasm']);
  if (chosen === 'webgpu' && backend === 'auto') {
    const [h, w] = sidecar.metadata.image_size;
    const probe = probeBatch(h, w);
    const [a, b] = [await runProbs(session, sidecar, probe, 2), await runProbs(wasm, sidecar, probe, 2)];
    const n = sidecar.metadata.classnames.length;
    const t = sidecar.metadata.thresholds;
    let diff = 0;
    for (let i = 0; i < a.length; i++) diff = Math.max(diff, Math.abs(a[i] - b[i]));
    // the same answers: the top class, or for a multi-label file every label's decision
    const sameTop1 = t ? [...a.keys()].every((i) => (a[i] >= t[i % n]) === (b[i] >= t[i % n]))
      : [0, 1].every((r) => argmax(a.subarray(r * n, (r + 1) * n)) === argmax(b.subarray(r * n, (r + 1) * n)));
    if (sameTop1 && diff <= WEBGPU_TOLERANCE) {
      await wasm.release();
      wasm = null;
      note = `WebGPU agrees with WebAssembly (max |dprob| ${diff.toExponential(1)})`;
    } else {
      await session.release();
      session = null;
      chosen = 'wasm';
      note = `WebGPU gives other answers than WebAssembly (max |dprob| ${diff.toExponential(1)}); using WebAssembly`;
    }
  }
  const t3 = performance.now();
  const clf = new Classifier(session ?? wasm, sidecar, {
    backend: chosen, note, batchSize: options.batchSize ?? 8, maxPixels: options.maxPixels ?? MAX_PIXELS,
    url: modelUrl,
  });
  clf.timings = { sidecarMs: t1 - t0, filesMs: t2 - t1, sessionMs: t3 - t2, totalMs: t3 - t0 };
  return clf;
}

async function runProbs(session, sidecar, batch, n, [h, w] = sidecar.metadata.image_size) {
  const input = new ort.Tensor('uint8', batch, [n, h, w, 3]);
  const out = await session.run({ [sidecar.input.name]: input }, ['probs']);
  const probs = out.probs.data;
  for (const t of Object.values(out)) t.dispose?.();
  return probs instanceof Float32Array ? probs : Float32Array.from(probs);
}

/** An exported coopkit classifier in the browser; made by loadClassifier(). */
export class Classifier {
  constructor(session, sidecar, { backend, note, batchSize, maxPixels, url }) {
    this.session = session;
    this.sidecar = sidecar;
    this.metadata = sidecar.metadata;
    this.classnames = [...sidecar.metadata.classnames];
    this.imageSize = [...sidecar.metadata.image_size];
    this.precision = sidecar.metadata.precision;
    /** A raw-input file (`coopkit export --raw-input`): the graph resizes and crops decoded images itself. */
    this.rawInput = sidecar.metadata.input_kind === 'raw';
    /** 'classify' (softmax, best labels first) or 'multilabel' (each label's own probability). */
    this.task = sidecar.metadata.task ?? 'classify';
    this.multilabel = this.task === 'multilabel';
    /** Multi-label files: each label's threshold on its probability, in class order; null otherwise. */
    this.thresholds = this.multilabel ? [...sidecar.metadata.thresholds] : null;
    this.backend = backend;
    this.backendNote = note;
    this.batchSize = batchSize;
    this.maxPixels = maxPixels;
    this.url = url;
    /** WebAssembly threads in use (onnxruntime-web writes back 1 when the page is not cross-origin isolated). */
    this.threads = ort.env.wasm.numThreads;
    const missing = [sidecar.input.name, 'probs'].filter((n) => ![...session.inputNames, ...session.outputNames].includes(n));
    if (missing.length) {
      throw new CoopkitError('sidecar', `the model has no ${missing.join(', ')} (inputs ${session.inputNames}, ` +
        `outputs ${session.outputNames}); its sidecar describes another kind of file`);
    }
  }

  /** The uint8 (h, w, 3) crop at the model's size for one image (decoded, resized, cropped). */
  async preprocess(image, name) {
    const { data, width, height } = await decodeImage(image, { maxPixels: this.maxPixels, name });
    return resizeAndCrop(rgbaToRgb(data, width, height), width, height, this.metadata);
  }

  /** What the graph receives for one image, `{data, height, width}`: the crop, or for a raw-input
   * file the decoded RGB image (the graph resizes and crops it, as the Python runtime lets it). */
  async prepare(image, name) {
    if (!this.rawInput) return { data: await this.preprocess(image, name), height: this.imageSize[0], width: this.imageSize[1] };
    const { data, width, height } = await decodeImage(image, { maxPixels: this.maxPixels, name });
    return { data: rgbaToRgb(data, width, height), height, width };
  }

  /** Probabilities for a prepared uint8 batch (n, h, w, 3), by default at the model's size: a
   * Float32Array (n * n_classes). */
  async run(batch, n, size = this.imageSize) {
    return runProbs(this.session, this.sidecar, batch, n, size);
  }

  /**
   * Label images: one result per input, in order, `{source, index, labels, probs}` best first,
   * or `{source, index, error, kind}` for an unreadable one with errors: 'skip'. A multi-label file:
   * `labels` are every label at or above its threshold (topK does not cut them; none may apply), and
   * `labelProbs` maps every label to its probability.
   * @param {Array|*} images Files, Blobs, URLs, ImageData... or one of them.
   * @param {{topK?: number, errors?: 'raise'|'skip'}} [options]
   */
  async predict(images, { topK = 5, errors = 'raise' } = {}) {
    const list = Array.isArray(images) ? images : [images];
    if (!Number.isInteger(topK) || topK < 1) throw new CoopkitError('input', `topK must be a positive integer, got ${topK}`);
    if (!['raise', 'skip'].includes(errors)) throw new CoopkitError('input', `errors '${errors}' is not one of raise, skip`);
    const rows = await this.probs(list, { errors });
    const k = Math.min(topK, this.classnames.length);
    return rows.map((row, index) => {
      const source = describe(list[index], index);
      if (!(row instanceof Float32Array)) return { source, index, error: row.message, kind: row.kind };
      const sorted = [...row.keys()].sort((a, b) => row[b] - row[a] || a - b);
      const order = this.multilabel ? sorted.filter((i) => row[i] >= this.thresholds[i]) : sorted.slice(0, k);
      const result = { source, index, labels: order.map((i) => this.classnames[i]), probs: order.map((i) => row[i]) };
      if (this.multilabel) result.labelProbs = Object.fromEntries(this.classnames.map((c, i) => [c, row[i]]));
      return result;
    });
  }

  /**
   * Class probabilities: one Float32Array (n_classes) per image (a multi-label file: each label's
   * own probability); with errors: 'skip', an unreadable image gives its CoopkitError in place of the row.
   */
  async probs(images, { errors = 'raise' } = {}) {
    const list = Array.isArray(images) ? images : [images];
    const n = this.classnames.length;
    const out = new Array(list.length);
    for (let start = 0; start < list.length; start += this.batchSize) {
      const chunk = list.slice(start, start + this.batchSize);
      const ready = [];
      for (let i = 0; i < chunk.length; i++) {
        try {
          ready.push([start + i, await this.prepare(chunk[i], describe(chunk[i], start + i))]);
        } catch (e) {
          if (errors !== 'skip' || !(e instanceof CoopkitError)) throw e;
          out[start + i] = e;
        }
      }
      // one run per stretch of same-size images (all of them, for a cropped file)
      for (let a = 0, b = 1; a < ready.length; a = b, b = a + 1) {
        const { height: h, width: w } = ready[a][1];
        while (b < ready.length && ready[b][1].height === h && ready[b][1].width === w) b++;
        const group = ready.slice(a, b);
        const batch = new Uint8Array(group.length * h * w * 3);  // (n, h, w, 3)
        group.forEach(([, img], i) => batch.set(img.data, i * h * w * 3));
        const probs = await this.run(batch, group.length, [h, w]);
        group.forEach(([index], i) => { out[index] = probs.slice(i * n, (i + 1) * n); });
      }
    }
    return out;
  }

  /** Free the session. */
  async dispose() {
    await this.session?.release();
    this.session = null;
  }
}

export { ort };
