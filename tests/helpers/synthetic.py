"""Photo-like test images, written as PNG files: deterministic, smooth, with shapes and texture."""

import os
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_images(
    folder: str | os.PathLike, count: int, size: tuple[int, int] = (256, 256), seed: int = 0
) -> list[Path]:
    """Write ``count`` photo-like PNGs (gradient, soft shaded shapes, mild texture and noise).

    Image ``i`` depends only on ``(seed, i)``, so the files are identical across runs. Returns
    the written paths.
    """
    height, width = size
    if count < 0 or height < 1 or width < 1:
        raise ValueError(f"synthetic_images needs count >= 0 and a positive size, got {count} and {size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = _synthetic_picture(np.random.default_rng([seed, index]), height, width)
        path = folder / f"synthetic_{index:05d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _synthetic_picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An HxWx3 uint8 picture: smooth background, a few soft-edged shaded shapes, fine noise."""
    scale = max(height, width)
    y, x = np.mgrid[0:height, 0:width] / scale
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x + np.sin(angle) * y
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    start, end = rng.uniform(0, 1, (2, 3))
    picture = start + ramp[..., None] * (end - start)
    for _ in range(3):  # low-frequency texture
        frequency = rng.uniform(2, 12, 2)
        wave = np.sin(2 * np.pi * (frequency[0] * x + frequency[1] * y) + rng.uniform(0, 2 * np.pi))
        picture += 0.04 * wave[..., None]
    for _ in range(rng.integers(3, 9)):
        picture = _paint_shape(rng, picture, x, y, scale)
    picture += rng.normal(0, 0.01, picture.shape)
    return np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8)


def _paint_shape(rng: np.random.Generator, picture: np.ndarray, x: np.ndarray, y: np.ndarray, scale: int):
    """Blend a rotated ellipse or rectangle with a shading gradient and a 1-3 pixel soft edge."""
    center = rng.uniform(0, 1, 2) * (x.max(), y.max())
    radii = rng.uniform(0.05, 0.35, 2)
    rotation = rng.uniform(0, np.pi)
    u = (np.cos(rotation) * (x - center[0]) + np.sin(rotation) * (y - center[1])) / radii[0]
    v = (-np.sin(rotation) * (x - center[0]) + np.cos(rotation) * (y - center[1])) / radii[1]
    distance = np.hypot(u, v) if rng.random() < 0.5 else np.maximum(np.abs(u), np.abs(v))
    edge_pixels = rng.uniform(1, 3)
    coverage = np.clip((1 - distance) * radii.min() * scale / edge_pixels, 0, 1)[..., None]
    color = rng.uniform(0, 1, 3) * (0.8 + 0.3 * u[..., None])  # light from one side
    return picture * (1 - coverage) + color * coverage
