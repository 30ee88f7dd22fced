// Shared by every scenario: builds POST /customize and POST /jobs requests from the DreamBench
// photos and checks each answer. Configuration comes from the environment (-e NAME=value or exported):
//   BASE_URL      service root (default http://127.0.0.1:8000): a loopback address, or, with
//                 IN_CLUSTER=1, a Kubernetes Service name (*.svc[.cluster.local]): the k6 Operator's
//                 TestRun (k8s/loadtest) runs the scripts inside the cluster against the Service
//   FIXTURES_DIR  directory with the DreamBench photos (default: the repository's examples/dreambench)
//   API_KEY       bearer token, when the service has API_KEYS set
//   WIDTH HEIGHT STEPS   request size (default 128x128, 8 steps: the tiny model on CPU)
//   ALLOW_429     "1": 429 is an expected answer (overload runs), "0": it is an error; unset: the
//                 scenario's own expectation (spike expects 429s, the others do not)
import http from 'k6/http';
import { check } from 'k6';
import encoding from 'k6/encoding';
import { Counter, Rate, Trend } from 'k6/metrics';

export const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8000';
// open() resolves a relative path against this module's folder (loadtests/lib/), in k6 1.1.
const FIXTURES_DIR = __ENV.FIXTURES_DIR || '../../examples/dreambench';
const WIDTH = parseInt(__ENV.WIDTH || '128', 10);
const HEIGHT = parseInt(__ENV.HEIGHT || '128', 10);
const STEPS = parseInt(__ENV.STEPS || '8', 10);
// The official setting reuses the mask from step 12 of 50; keep that proportion.
const MASK_REUSED_STEP = Math.max(1, Math.round((STEPS * 12) / 50));

// Load generation is for this machine, or from inside a cluster to its own Service: refuse any
// other target. The in-cluster case is an explicit opt-in (IN_CLUSTER=1), and even then only a
// cluster-internal Service name is accepted, never an external or raw IP address.
const LOOPBACK = /^https?:\/\/(127\.\d+\.\d+\.\d+|\[::1\]|localhost)(:\d+)?(\/|$)/;
const CLUSTER_SERVICE = /^https?:\/\/[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\.svc(\.cluster\.local)?(:\d+)?(\/|$)/;
if (!LOOPBACK.test(BASE_URL) && !(__ENV.IN_CLUSTER === '1' && CLUSTER_SERVICE.test(BASE_URL))) {
  throw new Error(
    `BASE_URL must be a loopback address (or, with IN_CLUSTER=1, a cluster Service *.svc), got ${BASE_URL}`,
  );
}

// (photo, class word) pairs from DreamBench; the class word is the target phrase.
const SUBJECTS = [
  ['backpack.jpg', 'backpack'],
  ['berry_bowl.jpg', 'bowl'],
  ['can.jpg', 'can'],
  ['cat.jpg', 'cat'],
].map(([file, target]) => ({ target, image: encoding.b64encode(open(`${FIXTURES_DIR}/${file}`, 'b')) }));

// DreamBench prompt templates, unique token dropped (RealCustom uses the real class word).
const PROMPTS = [
  'a {} in the jungle',
  'a {} in the snow',
  'a {} on the beach',
  'a {} on a cobblestone street',
  'a {} on top of pink fabric',
  'a {} with a city in the background',
  'a {} with a mountain in the background',
  'a red {}',
];

// Whether 429 (queue full, rate limit) is an expected answer: the scenario says (allow429), the
// environment may override it (ALLOW_429=1 or 0).
let allowed429 = false;

/** Called once by each scenario at init, before its thresholds: its own expectation about 429s. */
export function allow429(scenarioDefault) {
  allowed429 = __ENV.ALLOW_429 === undefined || __ENV.ALLOW_429 === '' ? scenarioDefault : __ENV.ALLOW_429 === '1';
  const ok = allowed429 ? http.expectedStatuses({ min: 200, max: 299 }, 429) : http.expectedStatuses({ min: 200, max: 299 });
  http.setResponseCallback(ok);
  return allowed429;
}

export const serverErrors = new Rate('server_errors');
export const transportErrors = new Rate('transport_errors');
export const rejected = new Rate('rejected_429');
export const accepted = new Counter('accepted_jobs');
export const badImages = new Counter('bad_images');
export const inferenceSeconds = new Trend('inference_seconds');


/** The request body of iteration `n`: rotates through subjects and prompts, seed = n. */
export function requestBody(n) {
  const subject = SUBJECTS[n % SUBJECTS.length];
  const prompt = PROMPTS[Math.floor(n / SUBJECTS.length) % PROMPTS.length].replace('{}', subject.target);
  return JSON.stringify({
    prompt,
    subjects: [{ image: subject.image, target: subject.target }],
    width: WIDTH,
    height: HEIGHT,
    num_inference_steps: STEPS,
    mask_reused_step: MASK_REUSED_STEP,
    seed: n,
    num_images: 1,
    output_format: 'png',
  });
}

/** Request headers: JSON, and the API key when one is set. */
export function headers(json = true) {
  const result = json ? { 'Content-Type': 'application/json' } : {};
  if (__ENV.API_KEY) {
    result.Authorization = `Bearer ${__ENV.API_KEY}`;
  }
  return result;
}

/** Counts a response's error classes; true when it is a 429 (checked for its Retry-After). */
export function countErrors(response) {
  transportErrors.add(response.status === 0);
  serverErrors.add(response.status >= 500);
  rejected.add(response.status === 429);
  if (response.status === 429) {
    check(response, { '429 carries Retry-After': (r) => Boolean(r.headers['Retry-After']) });
    return true;
  }
  return false;
}

/** One POST /customize with its checks. `n` makes each request distinct. */
export function customize(n) {
  const response = http.post(`${BASE_URL}/customize`, requestBody(n), {
    headers: headers(),
    timeout: __ENV.REQUEST_TIMEOUT || '120s',
    tags: { name: 'customize' },
  });
  if (countErrors(response)) {
    return response;
  }
  const ok = check(response, {
    'status is 200': (r) => r.status === 200,
    'every image decodes at the requested size': (r) => r.status === 200 && imagesDecode(r),
  });
  if (response.status === 200) {
    accepted.add(1);
    if (!ok) {
      badImages.add(1);
    }
    const inference = response.json('timings.inference');
    if (typeof inference === 'number') {
      inferenceSeconds.add(inference);
    }
  }
  return response;
}

function imagesDecode(response) {
  const images = response.json('images');
  return Array.isArray(images) && images.length === 1 && images.every((b64) => isPng(b64, WIDTH, HEIGHT));
}

// A PNG "decodes" here when its signature, every chunk's CRC-32, the IHDR size (equal to the
// requested size), at least one IDAT and a final IEND all check out: truncation or corruption
// anywhere in the file fails a CRC.
const SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) {
      c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    }
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes, start, end) {
  let crc = 0xffffffff;
  for (let i = start; i < end; i++) {
    crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

export function isPng(b64, width = WIDTH, height = HEIGHT) {
  let bytes;
  try {
    bytes = encoding.b64decode(b64, 'std');
  } catch (error) {
    return false;
  }
  return isPngBytes(bytes, width, height);
}

/** isPng for raw bytes (an ArrayBuffer, e.g. a `responseType: 'binary'` body). */
export function isPngBytes(buffer, width = WIDTH, height = HEIGHT) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || SIGNATURE.some((value, i) => bytes[i] !== value)) {
    return false;
  }
  const view = new DataView(bytes.buffer);
  let offset = 8;
  let sawIdat = false;
  let first = true;
  while (offset + 12 <= bytes.length) {
    const length = view.getUint32(offset);
    const typeStart = offset + 4;
    const dataEnd = typeStart + 4 + length;
    if (dataEnd + 4 > bytes.length) {
      return false;
    }
    const type = String.fromCharCode(...bytes.subarray(typeStart, typeStart + 4));
    if (crc32(bytes, typeStart, dataEnd) !== view.getUint32(dataEnd)) {
      return false;
    }
    if (first) {
      if (type !== 'IHDR' || view.getUint32(typeStart + 4) !== width || view.getUint32(typeStart + 8) !== height) {
        return false;
      }
      first = false;
    }
    sawIdat = sawIdat || type === 'IDAT';
    offset = dataEnd + 4;
    if (type === 'IEND') {
      return sawIdat && offset === bytes.length;
    }
  }
  return false;
}

// Percentiles the summary reports (k6's default has no p99).
export const summaryTrendStats = ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'];

/** Thresholds shared by every scenario; `latency` = {p95, p99} in milliseconds, of `trend` (the
 * synchronous requests' durations by default). Call allow429() first. */
export function thresholds(latency, trend = 'http_req_duration{name:customize,status:200}') {
  const result = {
    server_errors: ['rate==0'],
    transport_errors: ['rate==0'],
    bad_images: ['count==0'],
    checks: ['rate==1'],
    [trend]: [`p(95)<${latency.p95}`, `p(99)<${latency.p99}`],
  };
  if (!allowed429) {
    result.rejected_429 = ['rate==0'];
    result.http_req_failed = ['rate==0'];
  }
  return result;
}

/** Writes the end-of-test summary as JSON (for the runner's report) and prints k6's text one. */
export function summaryFiles(data) {
  const files = { stdout: textSummary(data) };
  if (__ENV.SUMMARY_JSON) {
    files[__ENV.SUMMARY_JSON] = JSON.stringify(data, null, 2);
  }
  return files;
}

function textSummary(data) {
  const lines = [];
  for (const [name, metric] of Object.entries(data.metrics)) {
    const values = Object.entries(metric.values)
      .map(([key, value]) => `${key}=${typeof value === 'number' ? +value.toFixed(3) : value}`)
      .join(' ');
    const failed = metric.thresholds && Object.values(metric.thresholds).some((t) => !t.ok);
    lines.push(`${failed ? 'FAIL' : '    '} ${name}: ${values}`);
  }
  return `${lines.join('\n')}\n`;
}
