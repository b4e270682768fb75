"""medmoe: Med-MoE-LoRA, a mixture of LoRA experts for multi-task domain adaptation of causal LMs."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``medmoe.load_adapted`` (imported on first use: ``import medmoe`` stays light)."""
    if name == "load_adapted":
        from medmoe.predict import load_adapted

        return load_adapted
    raise AttributeError(f"module 'medmoe' has no attribute {name!r}")
