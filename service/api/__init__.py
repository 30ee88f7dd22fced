"""HTTP API process: validates at the edge, enqueues, waits. Never imports torch."""
