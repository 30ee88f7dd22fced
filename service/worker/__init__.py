"""GPU worker: loads the model once, takes batches of compatible jobs, stores their results."""
