"""Steps a learned router temperature needs to reach a target under the paper's schedule.

    python benchmarks/tau_reach.py

AdamW, 3% linear warm-up, cosine over 3000 steps (configs/med.yaml), the adapters at lr 5e-5
and the routing group (routers, log tau) at each ``router_learning_rate`` of the sweep. A
synthetic loss ``(log tau - log target)^2`` asks for the target; printed: the first step at
which tau is within 5% of it (``never`` = not within 3000 steps), for targets inside the range
and for the way back from the upper bound (tau started at 10 - 1e-6, target 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medmoe.adapters import MoELoRA
from medmoe.adapters.moe_lora import MoELoRALinear, raw_log_tau_for
from medmoe.optimization import parameter_groups, warmup_cosine_schedule

TOTAL, WARMUP, LR = 3000, 90, 5e-5


def steps_to_target(router_lr: float, start: float, target: float) -> int | None:
    layer = MoELoRALinear(nn.Linear(8, 8), (2, 2), tau_init=1.0, tau_range=(0.1, 10.0))
    with torch.no_grad():
        layer.log_tau.fill_(raw_log_tau_for(start, layer.tau_range))
    optimizer = torch.optim.AdamW(
        parameter_groups(
            MoELoRA(), nn.Sequential(layer), 0.0, learning_rate=LR, router_learning_rate=router_lr
        )
    )
    schedule = warmup_cosine_schedule(optimizer, WARMUP, TOTAL)
    for step in range(1, TOTAL + 1):
        loss = (layer.tau.log() - math.log(target)) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if abs(float(layer.tau.log()) - math.log(target)) < math.log(1.05):
            return step
    return None


def main() -> None:
    cases = [(1.0, 0.5), (1.0, 2.0), (1.0, 0.2), (1.0, 5.0), (10.0 - 1e-6, 1.0)]
    header = "router_lr | " + " | ".join(f"{a:g}->{b:g}" for a, b in cases)
    print(header)
    print("|".join(["---"] * (len(cases) + 1)))
    for router_lr in (5e-5, 5e-4, 1e-3, 2e-3, 5e-3):
        cells = []
        for start, target in cases:
            steps = steps_to_target(router_lr, start, target)
            cells.append("never" if steps is None else str(steps))
        print(f"{router_lr:g} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
