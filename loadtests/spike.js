// Spike: the base rate, then a sudden jump to SPIKE_FACTOR times it, then back. The service must
// shed the excess with 429 + Retry-After (never 5xx) and recover at the base rate.
import exec from 'k6/execution';
import { allow429, customize, summaryFiles, summaryTrendStats, thresholds } from './lib/customize.js';

const RATE = parseFloat(__ENV.RATE || '1');
const SPIKE = RATE * parseFloat(__ENV.SPIKE_FACTOR || '5');
// Rates are per minute so that fractional requests/s stay integers.
const perMinute = (rate) => Math.max(1, Math.round(rate * 60));

// 429 + Retry-After is the expected answer to the spike (ALLOW_429=0 makes it an error).
allow429(true);

export const options = {
  summaryTrendStats,
  scenarios: {
    spike: {
      executor: 'ramping-arrival-rate',
      startRate: perMinute(RATE),
      timeUnit: '1m',
      preAllocatedVUs: parseInt(__ENV.VUS || '32', 10),
      maxVUs: parseInt(__ENV.MAX_VUS || '128', 10),
      stages: [
        { target: perMinute(RATE), duration: '20s' },
        { target: perMinute(SPIKE), duration: '5s' },
        { target: perMinute(SPIKE), duration: '20s' },
        { target: perMinute(RATE), duration: '5s' },
        { target: perMinute(RATE), duration: '30s' },
      ],
      gracefulStop: '60s',
    },
  },
  // 429s are the expected answer to the spike; errors, bad images and slow successes are not.
  thresholds: thresholds({ p95: __ENV.P95_MS || 30000, p99: __ENV.P99_MS || 60000 }),
};

export default function () {
  customize(exec.scenario.iterationInTest);
}

export function handleSummary(data) {
  return summaryFiles(data);
}
