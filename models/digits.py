"""scikit-learn's 8x8 digits as a small, download-free image classification task.

:func:`load_digits_split` gives a fixed, stratified, normalised train/test split;
:func:`train_classifier` is the shared deterministic training loop (AdamW, linear warm-up then
cosine decay, label smoothing, gradient clipping, random small affine warps) used for every
small model in
:mod:`intq.models`; :func:`train_digits_vit` trains :func:`intq.models.vit.vit_digits` with it;
:func:`evaluate` measures top-1 accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .vit import vit_digits

__all__ = ["DigitsSplit", "load_digits_split", "train_classifier", "train_digits_vit", "evaluate"]


@dataclass(frozen=True)
class DigitsSplit:
    """A normalised train/test split of the digits data.

    Attributes:
        x_train: ``[N_train, 1, 8, 8]`` float32, ``(pixel / 16 - mean) / std``.
        y_train: ``[N_train]`` int64 labels in ``0..9``.
        x_test: ``[N_test, 1, 8, 8]`` float32, normalised with the *train* mean/std.
        y_test: ``[N_test]`` int64 labels.
        mean: mean of the train pixels after scaling to ``[0, 1]`` (a scalar, over all pixels).
        std: standard deviation of those pixels.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float

    @property
    def background(self) -> float:
        """The normalised value of a blank (0) pixel."""
        return -self.mean / self.std

    def normalize(self, images: Tensor | np.ndarray) -> Tensor:
        """Raw pixel values in ``[0, 16]`` (any shape ending in ``8, 8``) -> normalised float32
        ``[N, 1, 8, 8]``, the model's input."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8)
        return (x / 16.0 - self.mean) / self.std


def load_digits_split(seed: int = 0, test_size: float = 0.25) -> DigitsSplit:
    """Load scikit-learn's bundled digits (1797 images, no download) and split them.

    The split is stratified by label and fixed by ``seed``. Pixels are scaled to ``[0, 1]``
    (divided by 16) and then normalised by the train set's scalar mean and standard deviation.

    Args:
        seed: ``random_state`` of the stratified split.
        test_size: fraction of the data held out for testing.

    Returns:
        A :class:`DigitsSplit`; with the defaults, 1347 train and 450 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    mean = float(x_tr.mean())
    std = float(x_tr.std())
    return DigitsSplit(
        x_train=torch.from_numpy((x_tr - mean) / std),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy((x_te - mean) / std),
        y_test=torch.from_numpy(y_te),
        mean=mean,
        std=std,
    )


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads``; restore the previous count afterwards."""
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def random_affine(
    x: Tensor,
    fill: float,
    generator: torch.Generator,
    *,
    prob: float = 1.0,
    degrees: float = 10.0,
    scale: float = 0.1,
    translate: float = 1.0,
) -> Tensor:
    """Warp each image of ``x`` (``[B, C, H, W]``), with probability ``prob``, by its own random
    rotation in ``[-degrees, degrees]``, isotropic zoom in ``[1 - scale, 1 + scale]`` and
    translation of up to ``translate`` pixels per axis (bilinear; uncovered pixels get ``fill``).

    Images not picked are returned unchanged (up to float rounding). Draws from ``generator``
    only, so a seeded generator makes it deterministic.
    """
    if prob <= 0:
        return x
    b, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    apply = (torch.rand(b, generator=generator) < prob).to(x.dtype)
    angle = torch.deg2rad(uniform(-degrees, degrees)) * apply
    zoom = 1.0 + uniform(-scale, scale) * apply
    tx = uniform(-translate, translate) * apply * (2.0 / w)  # grid units: the image spans 2
    ty = uniform(-translate, translate) * apply * (2.0 / h)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = nn.functional.grid_sample(
        x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out + fill


def train_classifier(
    model: nn.Module,
    split: DigitsSplit,
    epochs: int,
    lr: float,
    seed: int = 0,
    *,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    warmup_epochs: int = 2,
    label_smoothing: float = 0.1,
    augment_prob: float = 0.5,
    clip_grad_norm: float | None = 1.0,
    threads: int | None = 2,
) -> nn.Module:
    """Train ``model`` on ``split``'s train set, deterministically, and return it in eval mode.

    The shared loop for the small models of :mod:`intq.models` (ViT, and CNNs such as ResNet
    or RepVGG): AdamW (``weight_decay`` on weights of rank >= 2 only, not on biases, norms,
    cls token or position embedding), a per-step schedule of linear warm-up over
    ``warmup_epochs`` then cosine decay to zero, cross-entropy with ``label_smoothing``,
    gradient-norm clipping, and each train image warped by :func:`random_affine` with
    probability ``augment_prob`` (rotation <= 10 degrees, zoom <= 10%, shift <= 1 pixel).

    The result depends only on the arguments, the model's initial weights and ``threads``:
    ``torch.manual_seed(seed)`` is called first (for any randomness inside the model), and
    shuffling and augmentation draw from a generator seeded with ``seed``. ``threads`` (if not
    ``None``) sets ``torch.set_num_threads`` for the call and restores it afterwards; another
    thread count can change float summation order and so the last bits of the result.

    Args:
        model: any ``nn.Module`` mapping ``[B, 1, 8, 8]`` to ``[B, 10]`` logits; trained in place.
        split: the data (see :func:`load_digits_split`).
        epochs: passes over the train set.
        lr: peak learning rate.
        seed: seeds shuffling, augmentation and ``torch.manual_seed``.
        batch_size: images per step (the last step of an epoch may be smaller).
        weight_decay: AdamW decoupled weight decay on the matrices and kernels.
        warmup_epochs: epochs of linear learning-rate warm-up.
        label_smoothing: passed to :class:`torch.nn.CrossEntropyLoss`.
        augment_prob: probability that a train image is randomly warped; 0 disables it.
        clip_grad_norm: maximum global gradient norm; ``None`` disables clipping.
        threads: ``torch.set_num_threads`` during training; ``None`` leaves it alone.

    Returns:
        ``model``, trained, in eval mode.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")):
            no_decay.append(p)
        else:
            decay.append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.999),
        fused=True,
    )
    n = split.x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(warmup_epochs * steps_per_epoch, total - 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    fill = split.background
    with _num_threads(threads):
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                xb = random_affine(split.x_train[idx], fill, gen, prob=augment_prob)
                loss = loss_fn(model(xb), split.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                opt.step()
                sched.step()
    return model.eval()


def train_digits_vit(
    split: DigitsSplit | None = None,
    *,
    epochs: int = 50,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int = 2,
) -> nn.Module:
    """Train :func:`intq.models.vit.vit_digits` on the digits and return it in eval mode.

    :func:`train_classifier` with its defaults (batch 64, label smoothing 0.1, gradient clip 1,
    random affine warps on half the images). Deterministic for a given ``seed`` and
    ``threads``. Measured on the default split, seed 0, 2-core CPU: 23 s and 98.67% test
    accuracy with ``threads=2`` (32 s, 98.89% with ``threads=1``; seeds 1 and 2 give 98.22% and
    98.00% single-threaded). With ``threads=2`` on a machine whose other core is busy, OpenMP
    slows down about 4x; pass ``threads=1`` there.

    Args:
        split: the data; :func:`load_digits_split` with its defaults when ``None``.
        epochs: passes over the train set.
        lr: peak AdamW learning rate.
        seed: seeds the weight init, shuffling and augmentation.
        threads: ``torch.set_num_threads`` during training.
    """
    if split is None:
        split = load_digits_split()
    torch.manual_seed(seed)
    model = vit_digits()
    return train_classifier(model, split, epochs, lr, seed, threads=threads)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in percent. Runs in eval mode and restores
    the model's previous train/eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / x.shape[0]
