"""LoRA through Hugging Face PEFT: config.py, peft_config.py (conversion) and model.py."""

from adapterhub.methods.lora.config import LoraConfig

__all__ = ["LoraConfig"]
