// Smoke: two virtual users for 20 s. Every request must succeed with a decodable image.
// CI runs this against the real service (tiny model, Redis, 2 workers) on loopback.
import exec from 'k6/execution';
import { allow429, customize, summaryFiles, summaryTrendStats, thresholds } from './lib/customize.js';

// Every request must be served: a 429 fails the run (ALLOW_429=1 for overload runs).
allow429(false);

export const options = {
  summaryTrendStats,
  scenarios: {
    smoke: {
      executor: 'constant-vus',
      vus: 2,
      duration: __ENV.DURATION || '20s',
      gracefulStop: '30s',
    },
  },
  thresholds: {
    ...thresholds({ p95: __ENV.P95_MS || 10000, p99: __ENV.P99_MS || 15000 }),
    // A smoke run that sent almost nothing proves nothing.
    accepted_jobs: ['count>=4'],
  },
};

export default function () {
  customize(exec.scenario.iterationInTest);
}

export function handleSummary(data) {
  return summaryFiles(data);
}
