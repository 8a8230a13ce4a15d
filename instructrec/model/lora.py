"""LoRA adapters (peft) for large checkpoints: injected in place, so the reranker's code is the same with or
without them, and saved as a small adapter folder beside the base checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_DIR = "adapter"
# Attention projections by architecture family: T5/Flan-T5, BERT-style (the MiniLM default), BART.
_TARGETS = {"t5": ["q", "v"], "mt5": ["q", "v"], "bert": ["query", "value"], "bart": ["q_proj", "v_proj"]}


def target_modules(model: nn.Module) -> list[str]:
    config = model.config
    family = getattr(config, "model_type", "")
    if family == "encoder-decoder":
        family = config.encoder.model_type
    if family not in _TARGETS:
        raise ValueError(f"no LoRA target modules known for model type {family!r}; pass them explicitly")
    return _TARGETS[family]


def add_lora(
    model: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.05, targets=None
) -> LoraConfig:
    """Freezes the model and injects trainable LoRA matrices into its attention projections."""
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or target_modules(model)
    )
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model)
    return config


def merge_into_base(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer's weights and put the plain layer back (in place):
    the model then saves and serves as full weights, with no base checkpoint to keep around. Returns how
    many layers were merged. (peft's `merge_and_unload` does this for a `PeftModel`; adapters injected in
    place need it done layer by layer.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged


def save_adapter(model: nn.Module, config: LoraConfig, path: str | Path) -> None:
    path = Path(path) / ADAPTER_DIR
    path.mkdir(parents=True, exist_ok=True)
    save_file(get_peft_model_state_dict(model), str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))


def load_adapter(model: nn.Module, path: str | Path) -> LoraConfig:
    """Injects and loads the adapter saved under `path`."""
    path = Path(path) / ADAPTER_DIR
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path}: no adapter_config.json, but the reranker names a base checkpoint")
    raw = json.loads((path / "adapter_config.json").read_text())
    config = LoraConfig(**{k: raw[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")})
    inject_adapter_in_model(config, model)
    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    return config
