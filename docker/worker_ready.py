"""Exit 0 when the worker in this container says it is warm and serving.

The worker publishes `realcustom_worker_ready 1.0` on its metrics port once its model is loaded
and warmed up, and 0 again when it starts stopping. Used by the worker image's HEALTHCHECK and
the Kubernetes startup/readiness probes: an exec probe needs no ingress into the pod.
"""

import os
import sys
import urllib.request

port = os.environ.get("WORKER_METRICS_PORT", "9101")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
        body = response.read().decode()
except OSError as error:
    print(f"worker metrics unreachable on port {port}: {error}")
    sys.exit(1)
ready = any(line.split() == ["realcustom_worker_ready", "1.0"] for line in body.splitlines())
if not ready:
    print("worker not ready (loading, warming up or stopping)")
sys.exit(0 if ready else 1)
