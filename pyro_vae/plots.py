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


def inpainting(
    originals: torch.Tensor,
    observed: torch.Tensor,
    mask: torch.Tensor,
    draws: torch.Tensor,
    std: torch.Tensor,
):
    """One row per image: the original, what was observed (hidden pixels in blue), a
    few posterior draws of the completed image, and the draws' per-pixel spread.

    :param draws: ``(S, N, C, H, W)`` posterior draws, shown side by side.
    :param std: ``(N, C, H, W)`` per-pixel standard deviation of all draws.
    """
    plt = _plt()
    grey = observed.detach().float().cpu().clamp(0, 1).mean(1, keepdim=True).expand(-1, 3, -1, -1)
    known = mask.cpu().bool().expand(observed.shape).all(1, keepdim=True)
    shown = torch.where(known, grey, torch.tensor([0.55, 0.7, 1.0]).view(1, 3, 1, 1))
    columns = [(tile(originals, 1), "original"), (tile(shown, 1), "observed\n(blue: hidden)")]
    columns += [(tile(draw, 1), f"draw {i + 1}") for i, draw in enumerate(draws)]
    spread = std.detach().float().cpu().mean(1, keepdim=True)
    spread_array = tile(spread / max(spread.max().item(), 1e-8), 1)
    spread_array[tile(torch.zeros_like(spread), 1) == 1] = np.nan  # padding shows as blank
    # a thin last column holds the colour bar, so every panel keeps the same height
    fig, axes = plt.subplots(
        1,
        len(columns) + 2,
        figsize=(1.2 * (len(columns) + 1) + 0.8, 1.1 * originals.shape[0] + 0.7),
        gridspec_kw={"width_ratios": [1] * (len(columns) + 1) + [0.08]},
    )
    for ax, (array, title) in zip(axes, columns, strict=False):
        _show(ax, array, title)
    image = axes[-2].imshow(spread_array, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    axes[-2].set_axis_off()
    axes[-2].set_title("uncertainty")
    bar = fig.colorbar(image, cax=axes[-1], ticks=[0, 1])
    bar.ax.set_yticklabels(["0", f"{spread.max().item():.2f}"])
    bar.set_label("std of the draws")
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
