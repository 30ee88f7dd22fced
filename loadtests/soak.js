// Soak: a moderate constant arrival rate for a long time (default 30 min) to surface leaks,
// slow drift in latency and stuck jobs. Run it below the sustained rate of the steady test.
import exec from 'k6/execution';
import { allow429, customize, summaryFiles, summaryTrendStats, thresholds } from './lib/customize.js';

const RATE = parseFloat(__ENV.RATE || '0.5');

// Every request must be served: a 429 fails the run (ALLOW_429=1 for overload runs).
allow429(false);

export const options = {
  summaryTrendStats,
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: 1,
      timeUnit: `${Math.round(1000 / RATE)}ms`,
      duration: __ENV.DURATION || '30m',
      preAllocatedVUs: parseInt(__ENV.VUS || '8', 10),
      maxVUs: parseInt(__ENV.MAX_VUS || '32', 10),
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
