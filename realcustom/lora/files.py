"""Where adapters come from: local safetensors files (a path, or a name in a LoRA directory) or the
Hugging Face hub through huggingface_hub. Never a URL, never a pickle: adapters are code-like
artefacts, so only safetensors (plain tensors, no code) are read, and every tensor is checked
against the UNet before it is used (realcustom/lora/adapter.py).

A source is one of:

* a path to a `.safetensors` file, or a directory holding exactly one (or diffusers'
  `pytorch_lora_weights.safetensors`);
* a bare name (letters, digits, `.`, `_`, `-`) looked up as `<lora_dir>/<name>.safetensors` or
  `<lora_dir>/<name>/`;
* a hub id `owner/repo` (its one safetensors file, or `pytorch_lora_weights.safetensors`) or
  `owner/repo/path/in/repo.safetensors`, downloaded into the hub cache.

A service (`load_adapter(..., hub_ids=...)`) takes only the last two, and hub ids only from its
allow-list (realcustom/lora/requests.py `check_source`): never a path, never the working directory.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from safetensors import safe_open
from torch import nn

from realcustom.lora.adapter import LoRAAdapter, LoRAError, check_adapter
from realcustom.lora.formats import parse_state_dict
from realcustom.lora.requests import HUB_ID, SourceNotAllowed, check_source, is_name

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def check_name(name: str) -> str:
    if not is_name(name):
        raise LoRAError(f"bad adapter name {name!r}: use 1-100 letters, digits, '.', '_' or '-'")
    return name


def resolve_source(source: str, lora_dir: str | Path | None = None) -> Path:
    """The local safetensors file of `source` (downloading a hub id when needed)."""
    if "://" in source:
        raise LoRAError(f"{source!r}: adapters are not downloaded from URLs; use a file, a name or a hub id")
    path = Path(source)
    if path.exists():
        return _weights_in(path)
    return _named_or_hub(source, lora_dir)


def resolve_served(source: str, lora_dir: str | Path | None, hub_ids: Collection[str]) -> Path:
    """A service's adapter file: a name in `lora_dir`, or an allowed hub id (nothing else)."""
    try:
        check_source(source, hub_ids)
    except SourceNotAllowed as error:
        raise LoRAError(str(error)) from None
    return _named_or_hub(source, lora_dir)


def _named_or_hub(source: str, lora_dir: str | Path | None) -> Path:
    if lora_dir is not None and is_name(source):
        for candidate in (Path(lora_dir) / f"{source}.safetensors", Path(lora_dir) / source):
            if candidate.exists():
                return _weights_in(candidate)
    if HUB_ID.match(source):
        return _download(source)
    where = f" or in {lora_dir}" if lora_dir is not None else ""
    raise LoRAError(f"no adapter {source!r}: not a file{where}, nor a hub id (owner/repo[/file.safetensors])")


def _weights_in(path: Path) -> Path:
    if path.is_dir():
        preferred = path / DIFFUSERS_WEIGHT_NAME
        if preferred.is_file():
            return preferred
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LoRAError(f"{path} holds {len(files)} safetensors files; name the adapter's file")
        return files[0]
    if path.suffix != ".safetensors":
        raise LoRAError(f"{path}: adapters are read from .safetensors files only (no pickles)")
    return path


def _download(hub_id: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    owner, repo, *rest = hub_id.split("/")
    repo_id = f"{owner}/{repo}"
    try:
        if rest:
            filename = "/".join(rest)
        else:
            files = [name for name in list_repo_files(repo_id) if name.endswith(".safetensors")]
            filename = DIFFUSERS_WEIGHT_NAME if DIFFUSERS_WEIGHT_NAME in files else None
            if filename is None and len(files) != 1:
                raise LoRAError(f"hub repo {repo_id} holds {len(files)} safetensors files; name one")
            filename = filename or files[0]
        return Path(hf_hub_download(repo_id, filename))
    except LoRAError:
        raise
    except Exception as error:  # any hub or network failure ends in the same advice
        raise LoRAError(
            f"could not fetch adapter {hub_id!r} from the hub ({type(error).__name__}: {error}); without "
            "network access, copy the file into the LoRA directory and name it instead"
        ) from error


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; a clear error for anything else."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for a damaged file
        raise LoRAError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error})"
        ) from error


def load_adapter(
    source: str | Path,
    unet: nn.Module,
    *,
    name: str | None = None,
    lora_dir: str | Path | None = None,
    max_rank: int | None = None,
    text_encoder: str = "reject",
    hub_ids: Collection[str] | None = None,
) -> LoRAAdapter:
    """Read, map and check one adapter for `unet` (the diffusers UNet2DConditionModel). Its name is
    `name`, else the source's file stem. With `hub_ids` (a service), `source` must be a name in
    `lora_dir` or one of those hub ids."""
    if hub_ids is None:
        path = resolve_source(str(source), lora_dir)
    else:
        path = resolve_served(str(source), lora_dir, hub_ids)
    name = check_name(name or path.stem)
    tensors, metadata = read_safetensors(path)
    adapter = parse_state_dict(
        tensors, unet, name=name, metadata=metadata, source=str(path), text_encoder=text_encoder
    )
    check_adapter(adapter, unet, max_rank)
    return adapter
