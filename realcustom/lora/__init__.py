"""Per-row LoRA adapters: canonical adapters from safetensors files (`files`, `formats`, `adapter`),
the slots on the UNet's layers (`bank`, `layers`) and the torch-free request rules (`requests`).

This package's __init__ imports nothing, so the API process can import `realcustom.lora.requests`
without torch.
"""
