"""Learning-rate shapes shared by every trainer in dd (DD, DD2, the tiny teachers' and tokenizers' scripts)."""

from __future__ import annotations

import math

#: decay shapes :func:`decayed` knows
DECAY_SHAPES = ("cosine", "linear")


def decayed(progress: float, final_ratio: float = 0.0, shape: str = "cosine") -> float:
    """Multiplier of the base rate at ``progress`` in [0, 1] of the decay phase (clamped): 1 at the start,
    ``final_ratio`` at the end, along a half cosine or a straight line."""
    if shape not in DECAY_SHAPES:
        raise ValueError(f"learning-rate decay {shape!r}: expected one of {', '.join(DECAY_SHAPES)}")
    progress = min(max(progress, 0.0), 1.0)
    fall = 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress
    return final_ratio + (1.0 - final_ratio) * fall


def check_final_ratio(value: float, key: str) -> None:
    """Refuse a final learning-rate ratio outside [0, 1] (``key`` names the setting in the message)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value} must be in [0, 1] (the final learning rate as a fraction of the base rate)")
