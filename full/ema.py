"""EDM-style exponential moving averages of the weights, with several half-lives kept at once (pMF §6).

A half-life is given in kimg (thousands of training images): after ``hl_kimg * 1000`` images the
old weights' share has halved. Per step of ``batch`` images

    decay = 0.5 ** (batch / hl_imgs),   hl_imgs = min(hl_kimg * 1000, EMA_RAMPUP_RATIO * images_seen)

(EDM, Karras et al. 2022: the ramp-up keeps the average from being dominated by the random
initialisation early in training). ``images_seen`` counts images *before* this step, so the very
first update has hl_imgs = 0, decay = 0 and copies the weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

EMA_RAMPUP_RATIO = 0.05
"""EDM's ramp-up: the half-life is at most 5% of the images seen so far."""


def ema_decay(batch: int, hl_kimg: float, images_seen: int, rampup_ratio: float = EMA_RAMPUP_RATIO) -> float:
    """``0.5 ** (batch / min(hl_kimg * 1000, rampup_ratio * images_seen))``; 0 when that half-life is 0.

    Args:
        batch: images in this step (global batch), >= 1.  hl_kimg: half-life in kimg, > 0.
        images_seen: images seen before this step, >= 0.
    Returns:
        decay in [0, 1).
    """
    if batch < 1 or hl_kimg <= 0 or images_seen < 0:
        raise ValueError(f"need batch >= 1, hl_kimg > 0, images_seen >= 0; got {batch}, {hl_kimg}, {images_seen}")
    hl_imgs = min(hl_kimg * 1000.0, rampup_ratio * images_seen)
    if hl_imgs <= 0.0:   # 0.5 ** (batch / 0) -> 0.5 ** inf = 0: the average restarts from the weights
        return 0.0
    return 0.5 ** (batch / hl_imgs)


class EMASet:
    """Several EMAs of one model, keyed by half-life in kimg written as a string (``"500"``).

    Each EMA is a frozen deep copy of the model in eval mode. Buffers are copied, not averaged.

    Args:
        model: the trained network (not wrapped in DDP).  half_lives_kimg: e.g. (500, 1000, 2000).
    """

    def __init__(self, model: nn.Module, half_lives_kimg: tuple[float, ...]):
        if not half_lives_kimg or any(hl <= 0 for hl in half_lives_kimg):
            raise ValueError(f"half-lives must be a non-empty tuple of positive kimg, got {half_lives_kimg}")
        self.half_lives = {format_half_life(hl): float(hl) for hl in half_lives_kimg}
        self.models: dict[str, nn.Module] = {}
        for key in self.half_lives:
            average = copy.deepcopy(model).eval()
            average.requires_grad_(False)
            self.models[key] = average

    @torch.no_grad()
    def update(self, model: nn.Module, *, batch: int, images_seen: int) -> None:
        """``ema <- decay * ema + (1 - decay) * weights`` for every half-life; buffers copied."""
        parameters = list(model.parameters())
        buffers = list(model.buffers())
        for key, average in self.models.items():
            decay = ema_decay(batch, self.half_lives[key], images_seen)
            averaged = list(average.parameters())
            torch._foreach_lerp_(averaged, [p.detach() for p in parameters], 1.0 - decay)
            for target, source in zip(average.buffers(), buffers):
                target.copy_(source)

    def state_dict(self) -> dict[str, dict]:
        return {key: average.state_dict() for key, average in self.models.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        if set(state) != set(self.models):
            raise ValueError(f"checkpoint has EMAs {sorted(state)}, this run keeps {sorted(self.models)}")
        for key, average in self.models.items():
            average.load_state_dict(state[key])


def format_half_life(hl_kimg: float) -> str:
    """Checkpoint key of a half-life: ``500 -> "500"``, ``0.5 -> "0.5"``."""
    return str(int(hl_kimg)) if float(hl_kimg).is_integer() else repr(float(hl_kimg))
