"""medmoe: Med-MoE-LoRA, a mixture of LoRA experts for multi-task domain adaptation of causal LMs."""

__version__ = "0.1.0"
