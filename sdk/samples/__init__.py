"""Real photos shipped with dynseg (see README.md here for their sources and licences)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checks import one_of

NAMES = ("coffee", "chelsea", "astronaut")


def path(name: str) -> Path:
    """The PNG file of sample `name` (one of NAMES)."""
    one_of("name", name, NAMES)
    return Path(__file__).parent / f"{name}.png"


def load(name: str) -> np.ndarray:
    """Sample `name` as a uint8 (H, W, 3) RGB array."""
    from PIL import Image

    with Image.open(path(name)) as image:
        return np.array(image.convert("RGB"))
