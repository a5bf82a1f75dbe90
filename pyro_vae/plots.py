"""Figures people would rather look at than read: image grids and training curves.

Every function returns a matplotlib ``Figure`` and draws nothing on screen; save it
with :func:`save`. matplotlib is imported when a function is called, not when
pyro_vae is imported, and uses the file-only Agg backend unless one was chosen.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images: torch.Tensor, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Arrange ``(N, C, H, W)`` images with values in [0, 1] into one ``(rows*H, cols*W[, 3])``
    array, ``ncol`` to a row (about square by default), with ``pad`` pixels of white between."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = np.ones((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i, image in enumerate(images.numpy()):
        r, k = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[:, top : top + h, left : left + w] = image
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def _show(ax, array: np.ndarray, title: str | None = None) -> None:
    ax.imshow(
        array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def image_grid(images: torch.Tensor, title: str | None = None, ncol: int | None = None):
    """One grid of images, e.g. decoder means of prior samples."""
    plt = _plt()
    array = tile(images, ncol)
    height, width = array.shape[:2]
    fig, ax = plt.subplots(figsize=(6, 6 * height / width + (0.4 if title else 0)))
    _show(ax, array, title)
    fig.tight_layout()
    return fig


def reconstructions(originals: torch.Tensor, reconstructed: torch.Tensor, ncol: int = 16):
    """Originals (top panel) above their reconstructions (bottom panel), image for image."""
    plt = _plt()
    top, bottom = tile(originals, ncol), tile(reconstructed, ncol)
    ratio = (top.shape[0] + bottom.shape[0]) / top.shape[1]
    fig, axes = plt.subplots(2, 1, figsize=(8, 8 * ratio + 0.8))
    _show(axes[0], top, "originals")
    _show(axes[1], bottom, "reconstructions")
    fig.tight_layout()
    return fig


def _token_colours(tokens: torch.Tensor, codebook_size: int, ncol: int) -> np.ndarray:
    """Tile integer token grids ``(N, h, w)`` as RGB, one colour per code, white between."""
    plt = _plt()
    scaled = tokens.float().unsqueeze(1) / max(codebook_size - 1, 1)
    # padding between tiles, and cells marked -1 (no code), are drawn white
    inside = tile((tokens < 0).float().unsqueeze(1), ncol) == 0
    rgb = plt.get_cmap("viridis")(tile(scaled, ncol))[..., :3]
    rgb[~inside] = 1.0
    return rgb


def tokenizer(
    originals: torch.Tensor,
    tokens: torch.Tensor,
    decoded: torch.Tensor,
    codebook_size: int,
    ncol: int = 16,
):
    """Originals, their tokens (one colour per code; the groups of an MLP wrapped into a block,
    a grid for a conv tokenizer) and the images decoded from those tokens alone."""
    plt = _plt()
    grids = tokens
    if tokens.dim() == 2:  # groups have no layout: wrap them into a near-square block
        groups = tokens.shape[1]
        width = math.ceil(math.sqrt(groups))
        rows = math.ceil(groups / width)
        grids = F.pad(tokens, (0, rows * width - groups), value=-1).reshape(-1, rows, width)
    # blow the grid up to the images' size so the panels align
    scale = max(originals.shape[-2] // grids.shape[-2], 1)
    grids = grids.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    panels = [
        (tile(originals, ncol), "originals"),
        (_token_colours(grids.cpu(), codebook_size, ncol), f"tokens (codebook of {codebook_size})"),
        (tile(decoded, ncol), "decoded from the tokens"),
    ]
    heights = [panel.shape[0] for panel, _ in panels]
    width = panels[0][0].shape[1]
    fig, axes = plt.subplots(
        3, 1, figsize=(8, 8 * sum(heights) / width + 1.2), height_ratios=heights
    )
    for ax, (panel, title) in zip(axes, panels, strict=True):
        _show(ax, panel, title)
    fig.tight_layout()
    return fig


def loss_curves(history):
    """Training loss and held-out negative ELBO (nats per image) against epoch."""
    plt = _plt()
    epochs = history.column("epoch")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        epochs, history.column("train_loss"), marker="o", label="train loss (KL-weighted -ELBO)"
    )
    test = history.column("test_elbo")
    if any(t is not None for t in test):
        ax.plot(
            epochs, [-t if t is not None else np.nan for t in test], marker="s", label="test -ELBO"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.set_title("training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure to ``path`` (format from the suffix) and free its memory."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
