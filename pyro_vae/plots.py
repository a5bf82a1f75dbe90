"""Figures people would rather look at than read: image grids and training curves.

Every function returns a matplotlib ``Figure`` and draws nothing on screen; save it
with :func:`save`. matplotlib is imported when a function is called, not when
pyro_vae is imported, and uses the file-only Agg backend unless one was chosen.

Data of a VAE of vectors (``(N, D)``, from ``VAE(image_shape=(D,))``) have no rows and
columns of pixels. :func:`image_grid` and :func:`reconstructions` draw them as rows of a
heat map (one row per vector, one column per dimension, with a colour bar of the values),
:func:`replicate_grid` as one line plot per vector with its replicates around it, and
:func:`p_value_map` as one bar per dimension. :func:`tile`, the image layout of the
figures that only images have, refuses vectors with a :class:`UsageError` naming those.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError


def pyplot():
    """``matplotlib.pyplot``, imported on first use, on a non-interactive backend unless a
    notebook's inline one is active (figures are saved, never shown in a window)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images: torch.Tensor, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Arrange ``(N, C, H, W)`` images with values in [0, 1] into one ``(rows*H, cols*W[, 3])``
    array, ``ncol`` to a row (about square by default), with ``pad`` pixels of white between."""
    if images.dim() != 4:
        raise UsageError(
            f"tile arranges (N, C, H, W) images, got shape {tuple(images.shape)}; vectors "
            "(N, D) have no pixel layout: plots.image_grid and plots.reconstructions draw "
            "them as rows of a heat map"
        )
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


def _value_range(*arrays: np.ndarray) -> tuple[float, float]:
    """The colour range of vector heat maps: [0, 1] for values inside it (the scale images
    have, so that binary or [0, 1] data read alike everywhere), else the values' own."""
    low = min(float(np.nanmin(a)) for a in arrays)
    high = max(float(np.nanmax(a)) for a in arrays)
    if 0.0 <= low and high <= 1.0:
        return 0.0, 1.0
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _vector_rows(ax, array: np.ndarray, limits: tuple[float, float], title: str | None):
    """Draw ``(N, D)`` vectors on ``ax`` as a heat map, one row per vector; the image."""
    shown = ax.imshow(
        array,
        cmap="viridis",
        vmin=limits[0],
        vmax=limits[1],
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel("dimension")
    ax.set_ylabel("vector")
    # integer ticks only: a dimension or a vector has no halves
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    if title:
        ax.set_title(title)
    return shown


def _vectors(data: torch.Tensor) -> np.ndarray:
    return data.detach().float().cpu().numpy()


def image_grid(images: torch.Tensor, title: str | None = None, ncol: int | None = None):
    """One grid of images, e.g. decoder means of prior samples.

    ``(N, D)`` vectors are drawn as a heat map instead, one row per vector and one column
    per dimension, coloured on [0, 1] when every value lies there (like images) and on the
    values' range otherwise; ``ncol`` does not apply to them.
    """
    plt = pyplot()
    if images.dim() == 2:
        array = _vectors(images)
        n, d = array.shape
        fig, ax = plt.subplots(
            figsize=(min(max(4.0, 0.3 * d + 2), 12), min(max(3.0, 0.15 * n + 1.5), 12))
        )
        shown = _vector_rows(ax, array, _value_range(array), title)
        fig.colorbar(shown, ax=ax, label="value")
        fig.tight_layout()
        return fig
    array = tile(images, ncol)
    height, width = array.shape[:2]
    fig, ax = plt.subplots(figsize=(6, 6 * height / width + (0.4 if title else 0)))
    _show(ax, array, title)
    fig.tight_layout()
    return fig


def reconstructions(originals: torch.Tensor, reconstructed: torch.Tensor, ncol: int = 16):
    """Originals (top panel) above their reconstructions (bottom panel), image for image.

    ``(N, D)`` vectors are two heat maps (one row per vector, one column per dimension)
    on one colour scale, with one colour bar, so that equal colours are equal values;
    ``ncol`` does not apply to them.
    """
    plt = pyplot()
    if originals.dim() == 2:
        top, bottom = _vectors(originals), _vectors(reconstructed)
        limits = _value_range(top, bottom)
        n, d = top.shape
        height = min(max(2.5, 0.15 * n + 1.2), 6)
        fig, axes = plt.subplots(
            2,
            1,
            figsize=(min(max(5.0, 0.3 * d + 2), 12), 2 * height),
            sharex=True,
            layout="constrained",  # keeps the titles, labels and shared colour bar apart
        )
        _vector_rows(axes[0], top, limits, "originals")
        axes[0].set_xlabel("")  # the panels share their dimension axis
        shown = _vector_rows(axes[1], bottom, limits, "reconstructions")
        fig.colorbar(shown, ax=list(axes), label="value")
        return fig
    top, bottom = tile(originals, ncol), tile(reconstructed, ncol)
    ratio = (top.shape[0] + bottom.shape[0]) / top.shape[1]
    fig, axes = plt.subplots(2, 1, figsize=(8, 8 * ratio + 0.8))
    _show(axes[0], top, "originals")
    _show(axes[1], bottom, "reconstructions")
    fig.tight_layout()
    return fig


def _token_colours(tokens: torch.Tensor, codebook_size: int, ncol: int) -> np.ndarray:
    """Tile integer token grids ``(N, h, w)`` as RGB, one colour per code, white between."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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


def _observed_rgb(observed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Observed images as RGB in [0, 1], hidden pixels painted light blue."""
    observed = observed.detach().float().cpu().clamp(0, 1)
    rgb = observed.expand(-1, 3, -1, -1) if observed.shape[1] == 1 else observed
    if mask is None:
        return rgb
    known = mask.cpu().bool().expand(observed.shape).all(1, keepdim=True)
    return torch.where(known, rgb, torch.tensor([0.55, 0.7, 1.0]).view(1, 3, 1, 1))


def _restoration_figure(columns: list, std: torch.Tensor, title: str | None = None):
    """One row per image and one column per ``(images, title)`` in ``columns``, each
    ``images`` a ``(N, C, H, W)`` batch; the column whose images are ``None`` shows
    ``std`` (averaged over colour channels) as a heat map, its colour bar beside it."""
    plt = pyplot()
    spread = std.detach().float().cpu().mean(1).numpy()
    top = max(spread.max().item(), 1e-8)
    rows = spread.shape[0]
    where = next(i for i, (images, _) in enumerate(columns) if images is None)
    # after the heat map: a thin column for its colour bar, and room for the bar's labels
    ratios = [1.0] * len(columns)
    ratios[where + 1 : where + 1] = [0.07, 0.8 if where + 1 < len(columns) else 0.0]
    cell, header = 1.0, 0.55 + (0.55 if title else 0.0)
    width, height = cell * sum(ratios) + 0.7, cell * rows * 1.06 + header
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(
        rows, len(ratios), width_ratios=ratios, wspace=0.06, hspace=0.06,
        left=0.01, right=1 - 0.6 / width, bottom=0.01, top=1 - header / height,
    )  # fmt: skip
    for k, (images, name) in enumerate(columns):
        column = k if k <= where else k + 2
        for i in range(rows):
            ax = fig.add_subplot(grid[i, column])
            if images is None:
                heat = ax.imshow(spread[i], cmap="magma", vmin=0, vmax=top, interpolation="nearest")
                ax.set_axis_off()
            else:
                _show(ax, tile(images[i : i + 1], 1, pad=0))
            if i == 0:
                ax.set_title(name, fontsize=9)
    bar = fig.colorbar(heat, cax=fig.add_subplot(grid[:, where + 1]))
    bar.set_label("std of the draws (grey level, 0 to 1)", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, y=1 - 0.12 / height, va="top", fontsize=11)
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
    columns = [(originals, "original"), (_observed_rgb(observed, mask), "observed\n(blue: hidden)")]
    columns += [(draw, f"draw {i + 1}") for i, draw in enumerate(draws)]
    return _restoration_figure([*columns, (None, "uncertainty")], std)


def super_resolution(
    low_res: torch.Tensor,
    draws: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    originals: torch.Tensor,
    bilinear: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    noise: float | None = None,
):
    """One row per image: the low-resolution input (enlarged, so each of its pixels is a
    visible block), optionally its bilinear upsampling for comparison, a few posterior
    draws, the posterior mean, the draws' per-pixel spread, and the original.

    :param low_res: ``(N, C, h, w)`` observed images; ``mask`` (True: known) marks
        hidden low-resolution pixels, painted blue.
    :param draws: ``(S, N, C, H, W)`` posterior draws, shown side by side.
    :param mean: ``(N, C, H, W)`` posterior mean; ``std`` its per-pixel spread.
    :param originals: ``(N, C, H, W)`` the images the input was made from.
    :param noise: the std of the noise added to the input, named in the title.
    """
    (height, width), (h, w) = originals.shape[-2:], low_res.shape[-2:]
    factor = height // h
    blocks = _observed_rgb(low_res, mask).repeat_interleave(factor, -2)
    blocks = blocks.repeat_interleave(factor, -1)
    hidden = "" if mask is None else "\nblue: hidden"
    columns = [(blocks, f"input {h}×{w}\n(enlarged){hidden}")]
    if bilinear is not None:
        columns.append((bilinear, "bilinear\nupsampling"))
    columns += [(draw, f"posterior\ndraw {i + 1}") for i, draw in enumerate(draws)]
    columns += [
        (mean, "posterior\nmean"),
        (None, "uncertainty\n(per pixel)"),
        (originals, f"original {height}×{width}\n(not seen)"),
    ]
    noisy = "" if noise is None else f" plus noise (std {noise:g})"
    title = (
        f"Super-resolution ×{factor}: {height}×{width} images inferred from {h}×{w} block "
        f"averages{noisy},\nwith the VAE's decoder as the prior over images (one row per image)"
    )
    return _restoration_figure(columns, std, title)


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure to ``path`` (format from the suffix) and free its memory."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- latent space
def latent_traversals(decode, z: torch.Tensor, dims: list[int], span: float = 3.0, steps: int = 9):
    """One row per latent coordinate in ``dims``: that coordinate of the code ``z`` swept
    over ``[-span, span]`` (prior standard deviations), all others held fixed.

    :param decode: code(s) -> mean image(s), e.g. ``vae.decode``.
    """
    values = torch.linspace(-span, span, steps, dtype=z.dtype, device=z.device)
    codes = z.expand(len(dims), steps, *z.shape).clone()
    for row, dim in enumerate(dims):
        codes[row, :, dim] = values
    images = decode(codes).flatten(0, 1)
    plt = pyplot()
    array = tile(images, steps)
    fig, ax = plt.subplots(figsize=(steps * 0.8 + 1, len(dims) * 0.8 + 0.8))
    ax.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=1)
    height = images.shape[-2] + 1
    ax.set_yticks([1 + height * (r + 0.5) for r in range(len(dims))], [f"z[{d}]" for d in dims])
    width = images.shape[-1] + 1
    ax.set_xticks([1 + width * (c + 0.5) for c in range(steps)], [f"{v:+.1f}" for v in values])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("latent traversals: one coordinate varied, the others fixed")
    fig.tight_layout()
    return fig


def interpolation(
    decode,
    z_start: torch.Tensor,
    z_end: torch.Tensor,
    start_image: torch.Tensor | None = None,
    end_image: torch.Tensor | None = None,
    steps: int = 10,
):
    """Decoded codes on the straight line from ``z_start`` to ``z_end``, flanked by the two
    encoded images when they are given."""
    weights = torch.linspace(0, 1, steps, dtype=z_start.dtype, device=z_start.device)
    shape = (steps, *[1] * z_start.dim())
    codes = z_start + weights.reshape(shape) * (z_end - z_start)
    images = decode(codes)
    if start_image is not None and end_image is not None:
        images = torch.cat([start_image[None], images, end_image[None]])
    title = "interpolation between two encoded images"
    if start_image is not None:
        title += " (originals at the ends)"
    return image_grid(images, title, ncol=images.shape[0])


def latent_manifold(decode, n: int = 20, device: torch.device | str = "cpu"):
    """The learned 2-D manifold: decoded codes on an ``n x n`` grid of the prior's
    quantiles (5% to 95% in each coordinate), as in Kingma & Welling (2014, Fig. 4)."""
    quantiles = torch.linspace(0.05, 0.95, n, device=device)
    values = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
    # rows go down the image, so the second coordinate runs from high to low
    grid = torch.stack(torch.meshgrid(values, values.flip(0), indexing="xy"), -1)
    return image_grid(decode(grid.reshape(n * n, 2)), "2-D latent manifold (prior quantiles)", n)


def latent_scatter(codes: torch.Tensor, labels: torch.Tensor | None = None):
    """Codes of encoded images as points coloured by label: the codes themselves when
    they are 2-D, otherwise their first two principal components."""
    plt = pyplot()
    points = codes.detach().float().cpu().flatten(1)
    if points.shape[1] == 2:
        axis_names = ("z[0]", "z[1]")
    else:
        centred = points - points.mean(0)
        _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ basis[:2].T
        share = singular.square() / singular.square().sum()
        axis_names = tuple(f"PC{i + 1} ({share[i]:.0%} of variance)" for i in range(2))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
    else:
        labels = labels.cpu()
        for label in labels.unique().tolist():
            chosen = labels == label
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, label=str(label))
        ax.legend(title="label", markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title("encoded test images")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- checks
def replicate_grid(observed: torch.Tensor, replicated: torch.Tensor, title: str | None = None):
    """Held-out images (top row) above draws replicated for each of them (one row per
    draw): ``observed`` is ``(N, C, H, W)``, ``replicated`` ``(S, N, C, H, W)``.

    Vectors (``observed`` ``(N, D)``, ``replicated`` ``(S, N, D)``) get one panel per
    held-out vector: its values against the dimension (black, labelled "held-out") and
    each of its replicates as a thin line (labelled "replicate"), so a vector outside its
    replicates' band is one the model does not reproduce.
    """
    if observed.dim() == 2:
        return _vector_replicates(observed, replicated, title)
    n = observed.shape[0]
    images = torch.cat([observed[None], replicated]).flatten(0, 1)
    title = title or "top row: held-out images; rows below: replicates drawn for each"
    return image_grid(images, title, ncol=n)


def _vector_replicates(observed: torch.Tensor, replicated: torch.Tensor, title: str | None):
    """:func:`replicate_grid` for vectors: one line plot per held-out vector."""
    plt = pyplot()
    data, draws = _vectors(observed), _vectors(replicated)
    n, d = data.shape
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow + 0.6), squeeze=False, sharex=True
    )
    dims = np.arange(d)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        for draw in draws[:, i]:
            ax.plot(dims, draw, color="tab:blue", alpha=0.35, linewidth=0.8, label="replicate")
        ax.plot(dims, data[i], color="black", marker="o", markersize=3, label="held-out")
        ax.set_title(f"vector {i}", fontsize="medium")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if i == 0:
            handles, labels = ax.get_legend_handles_labels()
            # one legend entry per kind of line, not one per replicate
            unique = dict(zip(labels, handles, strict=True))
            ax.legend(unique.values(), unique.keys(), fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("dimension")
    for ax in axes[:, 0]:
        ax.set_ylabel("value")
    fig.suptitle(title or "held-out vectors (black) and the replicates drawn for each (blue)")
    fig.tight_layout()
    return fig


def discrepancy_scatter(observed: torch.Tensor, replicated: torch.Tensor, p_value: float):
    """Realized against replicated discrepancy, one point per (draw, image): the
    log-likelihood ``log p(x | z)`` of the real image (x axis) and of its replicate
    (y axis) under the same z. Points above the diagonal: the replicate fits better.
    ``observed`` and ``replicated`` are ``(S, N)``, for images and vectors alike."""
    plt = pyplot()
    obs = observed.detach().cpu().flatten().numpy()
    rep = replicated.detach().cpu().flatten().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(obs, rep, s=4, alpha=0.3)
    low, high = min(obs.min(), rep.min()), max(obs.max(), rep.max())
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
    ax.set_xlabel("log p(x | z), held-out image (nats)")
    ax.set_ylabel("log p(x_rep | z), replicate (nats)")
    ax.set_title(f"log-likelihood discrepancy, p = {p_value:.3f}")
    ax.legend()
    fig.tight_layout()
    return fig


def p_value_map(p_values: torch.Tensor, title: str | None = None):
    """Posterior predictive p-values of a per-pixel statistic as an image: white is 0.5
    (the data are typical of the model); red: the replicates are darker than the data
    there (the model under-predicts the pixel), blue: brighter (it over-predicts).

    ``p_values`` is ``(C, H, W)`` for images (channels averaged), or ``(D,)`` for a
    per-dimension statistic of vectors, drawn as one bar per dimension from 0.5 to its
    p-value in the same colours (red, down: the model under-predicts that dimension;
    blue, up: it over-predicts), with dashed lines at 0.025 and 0.975.
    """
    plt = pyplot()
    values = p_values.detach().float().cpu()
    if values.dim() == 1:
        return _p_value_bars(values, title or "per-dimension p-values of the mean")
    if values.dim() != 3:
        raise UsageError(
            "p_value_map takes per-pixel p-values (C, H, W) or per-dimension ones (D,), "
            f"got shape {tuple(values.shape)}"
        )
    title = title or "per-pixel p-values of the mean image"
    array = values[0] if values.shape[0] == 1 else values.mean(0)
    fig, ax = plt.subplots(figsize=(5, 4.3))
    shown = ax.imshow(array.numpy(), cmap="RdBu", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, label="P(T(x_rep) > T(x))")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _p_value_bars(values: torch.Tensor, title: str):
    """:func:`p_value_map` for vectors: one bar per dimension, coloured by its p-value and
    drawn from 0.5 to it, so the dimensions that matter (p near 0 or 1) have the longest
    bars rather than none."""
    plt = pyplot()
    p = values.numpy()
    dims = np.arange(p.shape[0])
    fig, ax = plt.subplots(figsize=(min(max(5.0, 0.25 * len(p) + 2), 14), 4))
    ax.bar(
        dims,
        p - 0.5,
        bottom=0.5,
        color=plt.get_cmap("RdBu")(p),
        edgecolor="grey",
        linewidth=0.5,
    )
    for level, style in ((0.025, "--"), (0.5, ":"), (0.975, "--")):
        ax.axhline(level, color="grey", linestyle=style, linewidth=0.8)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("dimension")
    ax.set_ylabel("P(T(x_rep) > T(x))")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    fig.tight_layout()
    return fig
