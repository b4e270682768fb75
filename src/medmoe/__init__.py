"""medmoe: Med-MoE-LoRA, a mixture of LoRA experts for multi-task domain adaptation of causal LMs."""

__version__ = "0.1.0"

# public name -> module, imported on first use: ``import medmoe`` stays light
_LAZY = {
    "load_adapted": "medmoe.predict",
    "AdaptedModel": "medmoe.adapted_model",
    "AdaptedCausalLMOutput": "medmoe.adapted_model",
    "get_adapted_model": "medmoe.adapted_model",
}


def __getattr__(name: str):
    """``medmoe.load_adapted``, ``medmoe.get_adapted_model``, ``medmoe.AdaptedModel``."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medmoe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
