"""ExpertUpdateNorms against the explicit product, and AdapterExport's files."""

from __future__ import annotations

import torch
from torch import nn

from medmoe.adapters import MoELoRALinear
from medmoe.callbacks import expert_update_norms


def test_update_norms_equal_the_explicit_product():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(12, 10), (2, 4, 8), alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = torch.stack(
        [(layer.scales[i] * (layer.expert(i)[1] @ layer.expert(i)[0])).norm() for i in range(3)]
    )
    torch.testing.assert_close(expert_update_norms(layer), expected.detach(), rtol=1e-5, atol=1e-6)
    assert layer.scales == (4.0, 2.0, 1.0)  # fixed alpha: rank 2 gets 4x the scale of rank 8
