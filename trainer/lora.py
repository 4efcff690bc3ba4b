"""LoRA adapters (peft) on the trained model: `[model].lora` in `gradmix-train`.

With adapters only their parameters are trainable, so the sketch manifest
(trainable parameters matching `[sketching].parameters`) covers exactly the
adapters' A/B factors, the setting of the method's paper. Each factor is a
linear layer (`lora_A.<adapter>`, `lora_B.<adapter>`), which the structured
projector sketches from its input and output gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradmix.trainer.errors import ConfigError
from torch import nn


def apply_lora(model: nn.Module, settings: Mapping[str, Any]) -> nn.Module:
    """`model` wrapped with LoRA adapters built from peft `LoraConfig` fields.

    Raises:
        ConfigError: peft is not installed, or the settings are not a valid LoraConfig
            for this model (the message names the problem).
    """
    try:
        import peft
    except ImportError as exc:
        raise ConfigError('[model].lora needs peft: pip install "gradmix[hf]"') from exc
    try:
        config = peft.LoraConfig(**dict(settings))
        return peft.get_peft_model(model, config)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[model].lora: {exc}") from exc
