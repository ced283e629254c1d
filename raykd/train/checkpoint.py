"""Model checkpoints as safetensors: no pickle, loadable anywhere, self-describing.

The file's metadata carries the model spec (registry name + args) and the dataset shape it was
built for, so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"


def _metadata(spec: dict, info) -> dict[str, str]:
    return {"raykd.model": json.dumps({"name": spec["name"], "args": spec.get("args", {})}),
            "raykd.input_shape": json.dumps(list(info.input_shape)),
            "raykd.num_classes": str(info.num_classes)}


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights (a language model's input embedding and output head) are one tensor under
    # two names; safetensors refuses shared memory, so each storage is written once, under its
    # first name, and load_weights re-ties it.
    out, seen = {}, set()
    for k, v in state.items():
        ptr = (v.device, v.data_ptr(), v.shape) if v.numel() else None
        if ptr is not None and ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().cpu().contiguous()
    return out


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that share their tensor with an earlier name (tied weights)."""
    seen, aliases = set(), set()
    for k, v in model.state_dict().items():
        ptr = (v.device, v.data_ptr(), v.shape) if v.numel() else None
        if ptr is not None and ptr in seen:
            aliases.add(k)
        seen.add(ptr)
    return aliases


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list, list]:
    """``model.load_state_dict(state, strict=False)`` → (missing, unexpected), not counting the
    tied aliases :func:`_cpu_state` leaves out."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = tied_aliases(model)
    return [k for k in missing if k not in aliases], list(unexpected)


def save_checkpoint(model: nn.Module | dict, spec: dict, info, path: str | Path) -> Path:
    """Write ``model``'s state dict (or a state dict) to ``path`` (a file, or a folder that
    gets model.safetensors)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / WEIGHTS
    state = _cpu_state(model if isinstance(model, dict) else model.state_dict())
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=_metadata(spec, info))
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    return path


def checkpoint_bytes(state: dict[str, torch.Tensor], spec: dict, info) -> bytes:
    """The same self-describing safetensors file, in memory: how a fit's weights travel from a
    worker to the driver through the object store (no shared disk needed)."""
    from safetensors.torch import save

    return save(_cpu_state(state), metadata=_metadata(spec, info))


def write_bytes(data: bytes, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / WEIGHTS, folder / (WEIGHTS + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def find_weights(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*.safetensors")) or sorted(path.rglob("*.pt"))
        if not found:
            raise FileNotFoundError(f"no .safetensors or .pt checkpoint under {path}")
        return found[0]
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, object]:
    """(state_dict, model spec or None, shape info or None). ``.pt`` files are read with
    ``weights_only=True`` so a checkpoint can never run code."""
    path = find_weights(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
        spec = json.loads(meta["raykd.model"]) if "raykd.model" in meta else None
        info = None
        if "raykd.input_shape" in meta:
            info = SimpleNamespace(input_shape=tuple(json.loads(meta["raykd.input_shape"])),
                                   num_classes=int(meta["raykd.num_classes"]))
        return state, spec, info
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    return state, None, None


def load_model(path: str | Path, fallback_spec, info, field: str = "teacher") -> nn.Module:
    """Rebuild the model a checkpoint describes (or ``fallback_spec`` for bare state dicts)."""
    from raykd.config import ConfigError, ModelConfig
    from raykd.models import build_model
    from raykd.models.hf import find_hf_folder

    hf_folder = find_hf_folder(path)
    if hf_folder is not None:  # a save_pretrained folder (or an MLflow artifact holding one)
        return _load_hf(hf_folder, fallback_spec, field)
    state, spec, _ = read_checkpoint(path)
    model_cfg = ModelConfig(**spec) if spec else fallback_spec
    model = build_model(model_cfg, info, field=field)
    missing, unexpected = load_weights(model, state)
    if missing or unexpected:
        raise ConfigError(f"{field}.checkpoint: {path} does not fit model {model_cfg.name} "
                          f"{model_cfg.args}: missing {list(missing)[:3]}, unexpected "
                          f"{list(unexpected)[:3]}; give the matching {field}.name/args")
    return model.eval()


def _load_hf(folder: Path, fallback_spec, field: str) -> nn.Module:
    from raykd.config import ConfigError
    from raykd.models.args import BadArgs
    from raykd.models.hf import load_hf_folder

    args = getattr(fallback_spec, "args", {}) or {}
    try:
        return load_hf_folder(folder, attn_implementation=args.get("attn_implementation",
                                                                   "eager")).eval()
    except BadArgs as err:
        raise ConfigError(f"{field}.checkpoint: {err}") from None
