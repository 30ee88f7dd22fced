"""RealCustom++ customisation service: HTTP API, job queue, GPU workers, metrics."""
