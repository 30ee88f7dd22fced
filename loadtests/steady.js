// Steady: a constant arrival rate (RATE requests/s for DURATION), independent of how fast the
// service answers, so queueing shows up as latency, 429s or dropped iterations.
import exec from 'k6/execution';
import { allow429, customize, summaryFiles, summaryTrendStats, thresholds } from './lib/customize.js';

const RATE = parseFloat(__ENV.RATE || '1');
const DURATION = __ENV.DURATION || '60s';
// Fractional rates become N iterations per N/RATE seconds (k6 takes integer rates).
const TIME_UNIT_MS = Math.round(1000 / RATE);

// Every request must be served: a 429 fails the run (ALLOW_429=1 for overload runs).
allow429(false);

export const options = {
  summaryTrendStats,
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      rate: 1,
      timeUnit: `${TIME_UNIT_MS}ms`,
      duration: DURATION,
      preAllocatedVUs: parseInt(__ENV.VUS || '16', 10),
      maxVUs: parseInt(__ENV.MAX_VUS || '64', 10),
      gracefulStop: '60s',
    },
  },
  thresholds: {
    ...thresholds({ p95: __ENV.P95_MS || 10000, p99: __ENV.P99_MS || 20000 }),
    dropped_iterations: ['count==0'],
  },
};

export default function () {
  customize(exec.scenario.iterationInTest);
}

export function handleSummary(data) {
  return summaryFiles(data);
}
