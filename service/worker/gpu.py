"""GPU memory gauges (workers only: this module imports torch)."""

import torch

from service import metrics


def record_gpu_memory() -> None:
    if not torch.cuda.is_available():
        return
    metrics.GPU_MEMORY_BYTES.labels("allocated").set(torch.cuda.memory_allocated())
    metrics.GPU_MEMORY_BYTES.labels("reserved").set(torch.cuda.memory_reserved())
    metrics.GPU_MEMORY_BYTES.labels("peak_allocated").set(torch.cuda.max_memory_allocated())
