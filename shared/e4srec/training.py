"""The optimizer side both training stages share (instruction-tune, train-e4srec).

AdamW on the trainable weights, a linear warmup then cosine decay over the run's optimizer steps, and
the gradient norm clipped to `max_grad_norm` before each step. The stages keep their own loops (what
a micro-batch is, resuming, data parallelism) and call `clip` and `step` at each accumulation boundary.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Optimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_ratio: float,
                 total_steps: int, max_grad_norm: float) -> None:
        from transformers import get_cosine_schedule_with_warmup

        self.params = list(params)
        self.adamw = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.schedule = get_cosine_schedule_with_warmup(self.adamw, int(warmup_ratio * total_steps), total_steps)
        self.max_grad_norm = max_grad_norm

    def clip(self) -> torch.Tensor:
        """Clip the accumulated gradients; their norm before clipping (not finite: do not `step`)."""
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self) -> None:
        """Apply the gradients, advance the schedule, clear the gradients."""
        self.adamw.step()
        self.schedule.step()
        self.adamw.zero_grad(set_to_none=True)

    def skip(self, steps: int) -> None:
        """Advance the schedule over steps taken before a resume (AdamW's state comes from the checkpoint)."""
        for _ in range(steps):
            self.schedule.step()

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]
