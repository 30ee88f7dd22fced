// Async: the job API at a constant arrival rate. Each iteration submits POST /jobs (202 + the
// job's id), then follows the job to its end, by its event stream (GET /jobs/{id}/events, the
// default) or by polling (ASYNC_MODE=poll: GET /jobs/{id} every POLL_S seconds), and fetches and
// checks its image. `job_seconds` is submission to result.
import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import {
  BASE_URL,
  accepted,
  allow429,
  countErrors,
  headers,
  isPng,
  isPngBytes,
  requestBody,
  summaryFiles,
  summaryTrendStats,
  thresholds,
} from './lib/customize.js';

const RATE = parseFloat(__ENV.RATE || '1');
const MODE = __ENV.ASYNC_MODE || 'events';
const POLL_S = parseFloat(__ENV.POLL_S || '0.5');
const JOB_TIMEOUT_S = parseFloat(__ENV.JOB_TIMEOUT_S || '120');
const FINAL = new Set(['done', 'failed', 'cancelled', 'expired']);
const jobSeconds = new Trend('job_seconds', true);
// Accepted jobs that did not end done with a decodable image (failed, expired, stream cut...).
const failedJobs = new Counter('failed_jobs');

if (!['events', 'poll'].includes(MODE)) {
  throw new Error(`ASYNC_MODE must be events or poll, got ${MODE}`);
}
// Every job must be accepted and done: a 429 fails the run (ALLOW_429=1 for overload runs).
allow429(false);

export const options = {
  summaryTrendStats,
  scenarios: {
    async: {
      executor: 'constant-arrival-rate',
      rate: 1,
      timeUnit: `${Math.round(1000 / RATE)}ms`,
      duration: __ENV.DURATION || '60s',
      preAllocatedVUs: parseInt(__ENV.VUS || '16', 10),
      maxVUs: parseInt(__ENV.MAX_VUS || '64', 10),
      gracefulStop: '120s',
    },
  },
  thresholds: {
    ...thresholds({ p95: __ENV.P95_MS || 10000, p99: __ENV.P99_MS || 20000 }, 'job_seconds'),
    dropped_iterations: ['count==0'],
    failed_jobs: ['count==0'],
  },
};

/** The last event of a finished stream: {event, data}. */
function lastEvent(body) {
  let last = null;
  for (const block of body.split('\n\n')) {
    const event = /^event: (.+)$/m.exec(block);
    const data = /^data: (.+)$/m.exec(block);
    if (event && data) {
      last = { event: event[1], data: JSON.parse(data[1]) };
    }
  }
  return last;
}

function followEvents(id) {
  const response = http.get(`${BASE_URL}/jobs/${id}/events`, {
    headers: { ...headers(false), Accept: 'text/event-stream' },
    timeout: `${JOB_TIMEOUT_S + 30}s`,
    tags: { name: 'events' },
  });
  countErrors(response);
  const last = response.status === 200 ? lastEvent(response.body) : null;
  if (!check(last, { 'the stream ends with done': (e) => e !== null && e.event === 'done' })) {
    return false;
  }
  const image = http.get(`${BASE_URL}${last.data.images[0]}`, {
    headers: headers(false),
    responseType: 'binary',
    tags: { name: 'image' },
  });
  countErrors(image);
  return check(image, { 'the image decodes at the requested size': (r) => r.status === 200 && isPngBytes(r.body) });
}

function poll(id) {
  const deadline = Date.now() + JOB_TIMEOUT_S * 1000;
  while (Date.now() < deadline) {
    const response = http.get(`${BASE_URL}/jobs/${id}`, { headers: headers(false), tags: { name: 'poll' } });
    countErrors(response);
    const status = response.status === 200 ? response.json('status') : null;
    if (FINAL.has(status)) {
      const images = response.json('result.images');
      return check(response, {
        'the job is done': () => status === 'done',
        'its image decodes at the requested size': () => Array.isArray(images) && isPng(images[0]),
      });
    }
    sleep(POLL_S);
  }
  return check(null, { 'the job ends within JOB_TIMEOUT_S': () => false });
}

export default function () {
  const started = Date.now();
  const submitted = http.post(`${BASE_URL}/jobs`, requestBody(exec.scenario.iterationInTest), {
    headers: headers(),
    tags: { name: 'submit' },
  });
  if (countErrors(submitted)) {
    return;
  }
  if (!check(submitted, { 'submission accepted (202)': (r) => r.status === 202 })) {
    return;
  }
  accepted.add(1);
  const ok = MODE === 'events' ? followEvents(submitted.json('id')) : poll(submitted.json('id'));
  if (ok) {
    jobSeconds.add(Date.now() - started);
  } else {
    failedJobs.add(1);
  }
}

export function handleSummary(data) {
  return summaryFiles(data);
}
