"""One augmentation spec shared by every data path: tensors in memory, torchvision folders, and
Parquet shards streamed through Ray Data.

Randomness is a function of (seed, epoch, sample id) — a counter-based hash, not a generator's
position — so the same image gets the same tensor whichever path, process or rank produces it, and
a view can be named by a number (what the teacher-output cache stores).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def hash_u64(*parts) -> np.ndarray:
    """splitmix64 over the parts (ints or int arrays, broadcast): uniform 64-bit values, vectorised."""
    h = np.zeros(np.broadcast(*[np.asarray(p) for p in parts]).shape, np.uint64)
    with np.errstate(over="ignore"):
        for p in parts:
            h = h ^ (np.asarray(p).astype(np.int64).astype(np.uint64) + _GOLD)
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return h


def uniform01(*parts) -> np.ndarray:
    return (hash_u64(*parts) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class CropFlip:
    """The CIFAR / Fashion-MNIST recipe: pad by ``pad`` (with the background value), crop back at a
    random offset, flip horizontally with probability ½. There are (2·pad+1)²·2 distinct views,
    numbered ``(oy·(2·pad+1) + ox)·2 + flip``."""

    pad: int = 2
    pad_value: float = 0.0

    @property
    def num_views(self) -> int:
        return (2 * self.pad + 1) ** 2 * 2

    def views(self, ids, seed: int, epoch: int) -> np.ndarray:
        """The view each sample gets in an epoch: uniform over all views, as a live random crop+flip."""
        return (hash_u64(seed, epoch, np.asarray(ids)) % np.uint64(self.num_views)).astype(np.int64)

    def apply(self, x: torch.Tensor, views) -> torch.Tensor:
        """Batched: x is N×C×H×W (normalised), views a length-N array of view numbers."""
        v = torch.as_tensor(np.asarray(views), dtype=torch.long)
        flip, off = v % 2, v // 2
        side = 2 * self.pad + 1
        oy, ox = off // side, off % side
        n, c, h, w = x.shape
        if self.pad:
            xp = torch.nn.functional.pad(x, (self.pad,) * 4, value=self.pad_value)
            iy = (oy[:, None] + torch.arange(h))[:, None, :, None]
            ix = (ox[:, None] + torch.arange(w))[:, None, None, :]
            x = xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], iy, ix]
        return torch.where(flip.bool()[:, None, None, None], x.flip(3), x)


@dataclass(frozen=True)
class ResizedCropFlip:
    """The ImageNet recipe: torchvision's RandomResizedCrop(size, scale, ratio) + horizontal flip, with
    its parameters drawn from (seed, epoch, id). Applied to PIL images (decoding happens first)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def params(self, width: int, height: int, seed: int, epoch: int, sid: int) -> tuple[int, int, int, int, bool]:
        """(left, top, crop width, crop height, flip) — torchvision's sampler: 10 tries, then a centre crop."""
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for t in range(10):
            u = uniform01(seed, epoch, sid, t, np.arange(4))
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            ar = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
            w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < w <= width and 0 < h <= height:
                return int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1)), w, h, self._flip(seed, epoch, sid)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h, self._flip(seed, epoch, sid)

    @staticmethod
    def _flip(seed, epoch, sid) -> bool:
        return bool(uniform01(seed, epoch, sid, 99)[()] < 0.5)

    def apply_pil(self, img, seed: int, epoch: int, sid: int):
        from PIL import Image

        left, top, w, h, flip = self.params(img.width, img.height, seed, epoch, sid)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


@dataclass(frozen=True)
class ResizeCenterCrop:
    """The ImageNet evaluation transform: shorter side to ``resize``, centre crop ``size``."""

    size: int = 224
    resize: int = 256

    def apply_pil(self, img, seed: int = 0, epoch: int = 0, sid: int = 0):
        from PIL import Image

        s = self.resize / min(img.width, img.height)
        img = img.resize((max(self.size, round(img.width * s)), max(self.size, round(img.height * s))), Image.BILINEAR)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


def pil_to_tensor(img, channels: int, mean, std) -> np.ndarray:
    """PIL image → normalised float32 C×H×W (channels converted as asked)."""
    img = img.convert("RGB" if channels == 3 else "L")
    a = np.asarray(img, np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)[:channels]
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)[:channels]
    return (a - m) / s
