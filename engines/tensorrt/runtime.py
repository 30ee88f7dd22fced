"""Run a TensorRT engine on torch tensors: bound buffers, execute_async_v3 on the current stream.

Every I/O tensor is bound by address to a torch tensor that lives as long as the binding (inputs:
the caller's static buffers; outputs: tensors allocated here once). A call is then a single
`execute_async_v3` on torch's current CUDA stream, which is what lets a torch.cuda.graph capture
the engine together with the torch operations around it (mask generation, CFG, scheduler).
TensorRT asks for one plain enqueue after any binding or shape change before capture; `bind`
does that. Never run here: no TensorRT, no GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _dtype_map(trt) -> dict:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.int8: torch.int8,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table


class TensorRTEngine:
    """One deserialized engine with one execution context."""

    def __init__(self, plan_path: Path, device: torch.device | str = "cuda"):
        import tensorrt as trt

        self.trt = trt
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {plan_path} (built for another GPU or TensorRT?)")
        self.context = self.engine.create_execution_context()
        dtypes = _dtype_map(trt)
        self.inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = dtypes[self.engine.get_tensor_dtype(name)]
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = (shape, dtype)
            else:
                self.outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
        self._bound: dict[str, torch.Tensor] = {}

    def bind(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind inputs (static tensors: their addresses must stay valid) and return the outputs."""
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"missing engine inputs: {sorted(missing)}")
        for name, (shape, dtype) in self.inputs.items():
            tensor = feeds[name]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_contiguous():
                raise ValueError(
                    f"input {name}: engine wants {shape} {dtype} contiguous, got "
                    f"{tuple(tensor.shape)} {tensor.dtype} contiguous={tensor.is_contiguous()}"
                )
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, tensor.data_ptr())
            self._bound[name] = tensor
        for name, tensor in self.outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.execute()  # the enqueue TensorRT wants before graph capture after a (re)binding
        torch.cuda.current_stream().synchronize()
        return self.outputs

    def execute(self) -> dict[str, torch.Tensor]:
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return self.outputs
