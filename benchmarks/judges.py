#!/usr/bin/env python
"""Judges for generated MNIST images (issue 17), kept apart from the models they judge.

Two judges, both built on one small CNN classifier trained here on MNIST's training split
(and cached), never on anything a generative model saw or produced:

* **caption accuracy**: for images generated for a caption (a digit), the share that the
  classifier assigns to that digit, per digit and averaged over the digits;
* **Fréchet distance** between the generated images and MNIST's 10k test images in the
  classifier's penultimate-layer features: the usual stand-in for FID on MNIST, where
  Inception features of upscaled grey digits mean little. The distance itself is
  torchmetrics' ``FrechetInceptionDistance`` with the classifier as its custom feature
  extractor (a maintained implementation, not a hand-written matrix square root).

Each input file is a dict ``{"images": uint8 (N, 1, 28, 28), "captions": int64 (N,)}``
(``"captions"`` may be missing for an unconditional model: then only the distance and
the histogram of predicted classes are reported)::

    python benchmarks/judges.py --data-dir ../shared/data \\
        --images runs/a.pt runs/b.pt --out runs/judges
    python benchmarks/judges.py --data-dir ../shared/data --reference-check

The first run trains the classifier (a few minutes on one CPU thread) and caches it at
``runs/judges/classifier.pt``; later runs load it. Needs the ``bench`` extra
(``pip install -e .[bench]``, i.e. torchmetrics).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.data import load_mnist

DEFAULT_CACHE = Path("runs/judges/classifier.pt")
#: the test accuracy the classifier must reach to be trusted as a judge.
TARGET_ACCURACY = 0.99


# ---------------------------------------------------------------------------- classifier
def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """``images`` as float32 grey levels in [0, 1]: uint8 is divided by 255, floats kept.

    Both judges accept either form, so a generator's float means and a saved uint8 file
    are judged alike.
    """
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class DigitClassifier(nn.Module):
    """A small CNN for 28x28 grey digits: two 3x3 conv layers with 2x2 max pooling, then a
    128-unit hidden layer (the features of the Fréchet distance) and 10 logits.

    Inputs are uint8 images or floats in [0, 1], ``(N, 1, 28, 28)``.
    """

    num_features = 128
    #: set by :func:`train_classifier`: accuracy on MNIST's 10k test images, and the
    #: training time in seconds of wall clock and of CPU (nan for an untrained net).
    test_accuracy: float = math.nan
    train_seconds: float = math.nan
    train_cpu_seconds: float = math.nan

    def __init__(self, channels: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.hidden = nn.Linear(2 * channels * 7 * 7, self.num_features)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(self.num_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, ``(N, 128)``: what the Fréchet distance compares."""
        x = as_float_images(x)
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"the classifier takes (N, 1, 28, 28) images, got {tuple(x.shape)}")
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 10)`` of the ten digits."""
        return self.out(self.dropout(self.features(x)))


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """The classifier's digit for every image, ``(N,)`` int64 (in eval mode, in batches)."""
    classifier.eval()
    return torch.cat(
        [classifier(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)]
    )


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` moved by its own random offset of up to ``pixels`` in x and y,
    the border filled with zeros (background): mild augmentation against overfitting the
    training set's exact centring."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    index = torch.arange(n)[:, None, None, None]
    return padded[index, torch.arange(c)[None, :, None, None], rows, cols]


def train_classifier(
    data_dir: str | Path,
    cache: str | Path | None = DEFAULT_CACHE,
    *,
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 1e-3,
    shift: int = 1,
    seed: int = 0,
    verbose: bool = True,
) -> DigitClassifier:
    """The judges' classifier: loaded from ``cache`` if it is there, else trained and saved.

    Training is Adam on the 60k training images (grey levels / 255, no binarization), each
    image shifted by up to ``shift`` pixels, for ``epochs`` epochs with the learning rate
    annealed from ``lr`` to 0 along a cosine, step by step. The schedule is fixed
    beforehand, not chosen on the test set: the test accuracy printed after each epoch is
    for the log only, and the one stored is that after the last epoch. A classifier below
    :data:`TARGET_ACCURACY` is refused (not cached), since it would misjudge good generators.

    The cache is a plain dict (``state_dict``, ``test_accuracy``, ``seconds``,
    ``cpu_seconds``, ``epochs``) that ``torch.load(weights_only=True)`` reads. The accuracy
    and training times (wall clock, and CPU time, which a shared machine inflates less;
    both without the per-epoch evaluations) are on the returned module as
    ``test_accuracy``, ``train_seconds`` and ``train_cpu_seconds``.
    """
    classifier = DigitClassifier()
    if cache is not None and Path(cache).exists():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        classifier.load_state_dict(saved["state_dict"])
        classifier.test_accuracy = float(saved["test_accuracy"])
        classifier.train_seconds = float(saved["seconds"])
        classifier.train_cpu_seconds = float(saved["cpu_seconds"])
        return classifier.eval()

    train = load_mnist(data_dir, "train")
    test = load_mnist(data_dir, "test")
    torch.manual_seed(seed)
    classifier = DigitClassifier()
    generator = torch.Generator().manual_seed(seed)
    images = as_float_images(train.images)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    seconds = cpu_seconds = 0.0
    accuracy = math.nan
    for epoch in range(1, epochs + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        classifier.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            x = random_shift(images[batch], shift, generator)
            loss = F.cross_entropy(classifier(x), train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        accuracy = (predict(classifier, test.images) == test.labels).float().mean().item()
        if verbose:
            print(
                f"classifier epoch {epoch}: train loss {total / len(images):.4f}, "
                f"test accuracy {accuracy:.4f} ({seconds:.0f} s, {cpu_seconds:.0f} s of CPU)",
                flush=True,
            )
    if accuracy < TARGET_ACCURACY:
        raise RuntimeError(
            f"the classifier reached only {accuracy:.4f} test accuracy (< {TARGET_ACCURACY}); "
            "train it for more epochs before trusting it as a judge"
        )
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        state = {
            "state_dict": classifier.state_dict(),
            "test_accuracy": accuracy,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "epochs": epochs,
        }
        torch.save(state, cache)
    classifier.test_accuracy = accuracy
    classifier.train_seconds = seconds
    classifier.train_cpu_seconds = cpu_seconds
    return classifier.eval()


# ---------------------------------------------------------------------------- judges
def caption_accuracy(classifier: nn.Module, images: torch.Tensor, captions: torch.Tensor) -> dict:
    """For each caption, the share of its images that the classifier assigns to it.

    Returns ``{"per_caption": {digit: share}, "count": {digit: images}, "mean": m}``
    where ``m`` is the unweighted mean over the captions present, so every digit weighs
    the same whatever its number of images.
    """
    captions = torch.as_tensor(captions, dtype=torch.int64)
    if captions.shape != images.shape[:1]:
        raise ValueError(f"{len(images)} images but captions of shape {tuple(captions.shape)}")
    hits = predict(classifier, images) == captions
    per_caption, count = {}, {}
    for digit in sorted(captions.unique().tolist()):
        mask = captions == digit
        per_caption[digit] = hits[mask].float().mean().item()
        count[digit] = int(mask.sum())
    mean = sum(per_caption.values()) / len(per_caption) if per_caption else math.nan
    return {"per_caption": per_caption, "count": count, "mean": mean}


def class_histogram(classifier: nn.Module, images: torch.Tensor) -> list[float]:
    """The share of ``images`` the classifier assigns to each digit 0-9: what an
    unconditional model's samples cover (MNIST's own digits are 9-11% each)."""
    counts = torch.bincount(predict(classifier, images), minlength=10)
    return (counts.float() / max(len(images), 1)).tolist()


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate layer as torchmetrics' custom FID feature extractor.

    torchmetrics hands a custom extractor the images exactly as given to ``update`` (it
    converts only for its own Inception net), and reads the feature size from
    ``num_features`` instead of probing with a random image; the classifier itself turns
    uint8 or [0, 1] floats into its input.
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, num_features)`` features of ``images``."""
        self.classifier.eval()
        return self.classifier.features(images)


def frechet_distance(
    classifier: DigitClassifier,
    generated: torch.Tensor,
    reference: torch.Tensor,
    batch: int = 1000,
) -> float:
    """Fréchet distance between ``generated`` and ``reference`` images in the classifier's
    128 penultimate features: ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)).

    Computed by torchmetrics' ``FrechetInceptionDistance`` with :class:`ClassifierFeatures`
    as the extractor (its statistics are accumulated in float64). Images are uint8 or
    floats in [0, 1], ``(N, 1, 28, 28)``; each set needs at least 2 images, and many more
    than 128 for a stable covariance. The value is biased upwards for small sets: compare
    distances computed with equally many generated images.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=True)
    for images, real in ((reference, True), (generated, False)):
        for i in range(0, len(images), batch):
            metric.update(as_float_images(images[i : i + batch]), real=real)
    return float(metric.compute())


# ---------------------------------------------------------------------------- sanity
def blurred(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """``images`` (uint8) under a Gaussian blur of ``sigma`` pixels: a mild degradation."""
    from torchvision.transforms.functional import gaussian_blur

    x = gaussian_blur(as_float_images(images), kernel_size=5, sigma=sigma)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def shuffled_pixels(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's pixels in a random order of its own: the same grey-level histogram
    as real digits and none of their shape, i.e. noise a judge must rank far away."""
    generator = torch.Generator().manual_seed(seed)
    flat = images.flatten(1)
    order = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)
    return flat.gather(1, order).reshape(images.shape)


def reference_check(classifier: DigitClassifier, data_dir: str | Path) -> dict[str, float]:
    """Distances that show the Fréchet judge ranks what it should: the test set's two
    halves (small), a half against the other half blurred (between), against its pixels
    shuffled (large); and the floor for generated sets of 1000 and 10000 images: that
    many real training images against the full test set."""
    test = load_mnist(data_dir, "test").images
    train = load_mnist(data_dir, "train").images
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(test), generator=generator)
    half_a, half_b = test[order[:5000]], test[order[5000:]]
    picks = torch.randperm(len(train), generator=generator)
    return {
        "test half A vs test half B": frechet_distance(classifier, half_b, half_a),
        "test half A vs test half B blurred (sigma 1)": frechet_distance(
            classifier, blurred(half_b), half_a
        ),
        "test half A vs test half B pixels shuffled": frechet_distance(
            classifier, shuffled_pixels(half_b), half_a
        ),
        "1000 training images vs test set": frechet_distance(classifier, train[picks[:1000]], test),
        "10000 training images vs test set": frechet_distance(
            classifier, train[picks[:10000]], test
        ),
    }


# ---------------------------------------------------------------------------- report
def judge_file(
    classifier: DigitClassifier, path: Path, reference: torch.Tensor
) -> dict[str, object]:
    """Both judges on one saved file: caption accuracy (if it has captions), the predicted
    class histogram and the Fréchet distance to ``reference``."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    images = saved["images"]
    result: dict[str, object] = {"file": str(path), "images": len(images)}
    captions = saved.get("captions")
    if captions is not None:
        result["caption_accuracy"] = caption_accuracy(classifier, images, captions)
    result["class_histogram"] = class_histogram(classifier, images)
    result["frechet_distance"] = frechet_distance(classifier, images, reference)
    return result


def markdown_table(results: list[dict]) -> str:
    """The results as two markdown tables: caption accuracy and distance, then the class
    histogram of each file."""
    head = "| file | images | mean caption accuracy | " + " | ".join(map(str, range(10)))
    lines = [head + " | FD to test |", "| --- " * 14 + "|"]
    for r in results:
        acc = r.get("caption_accuracy")
        if acc is None:
            cells = ["-"] + ["-"] * 10
        else:
            per = acc["per_caption"]
            cells = [f"{acc['mean']:.3f}"] + [
                f"{per[d]:.2f}" if d in per else "-" for d in range(10)
            ]
        name = Path(r["file"]).name
        lines.append(
            f"| {name} | {r['images']} | " + " | ".join(cells) + f" | {r['frechet_distance']:.2f} |"
        )
    lines += [
        "",
        "Share of each file's images classified as each digit:",
        "",
        "| file | " + " | ".join(map(str, range(10))) + " |",
        "| --- " * 11 + "|",
    ]
    for r in results:
        shares = " | ".join(f"{s:.2f}" for s in r["class_histogram"])
        lines.append(f"| {Path(r['file']).name} | {shares} |")
    return "\n".join(lines)


def first_images(saved: dict, per_row: int = 10) -> torch.Tensor:
    """Up to 100 images to show: with captions, row ``d`` holds the first images captioned
    ``d``; without, the file's first 100."""
    images, captions = saved["images"], saved.get("captions")
    if captions is None:
        return images[: per_row * per_row]
    rows = []
    for digit in range(10):
        chosen = images[captions == digit][:per_row]
        if len(chosen):
            pad = torch.zeros((per_row - len(chosen), *images.shape[1:]), dtype=images.dtype)
            rows.append(torch.cat([chosen, pad]))
    return torch.cat(rows) if rows else images[:0]


def picture(paths: list[Path], out: Path) -> None:
    """``out``: one panel per file, side by side, each a grid of its first images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(paths), figsize=(3.2 * len(paths), 3.6), squeeze=False)
    for ax, path in zip(axes[0], paths, strict=True):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        grid = make_grid(as_float_images(first_images(saved)), nrow=10, padding=1, pad_value=0.5)
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(path.name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder above MNIST/")
    parser.add_argument(
        "--images",
        type=Path,
        nargs="*",
        default=[],
        help="files {'images': uint8 (N,1,28,28), 'captions': int64 (N,)}",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/judges"))
    parser.add_argument(
        "--classifier", type=Path, default=None, help="classifier cache (default OUT/classifier.pt)"
    )
    parser.add_argument(
        "--reference-check",
        action="store_true",
        help="print the Fréchet distances that check the judge",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    classifier = train_classifier(args.data_dir, args.classifier or args.out / "classifier.pt")
    print(
        f"classifier: test accuracy {classifier.test_accuracy:.4f}, "
        f"trained in {classifier.train_seconds:.0f} s "
        f"({classifier.train_cpu_seconds:.0f} s of CPU time)",
        flush=True,
    )
    report: dict[str, object] = {
        "classifier_test_accuracy": classifier.test_accuracy,
        "classifier_train_seconds": classifier.train_seconds,
        "classifier_train_cpu_seconds": classifier.train_cpu_seconds,
    }
    if args.reference_check:
        sanity = reference_check(classifier, args.data_dir)
        print("\n| Fréchet distance check | FD |\n| --- | --- |")
        for name, value in sanity.items():
            print(f"| {name} | {value:.3f} |")
        report["reference_check"] = sanity
    if args.images:
        reference = load_mnist(args.data_dir, "test").images
        results = [judge_file(classifier, path, reference) for path in args.images]
        print()
        print(markdown_table(results))
        picture(args.images, args.out / "judges.png")
        report["files"] = results
    (args.out / "judges.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
