"""Batched, on-device augmentation: random crop with zero padding and random horizontal flip.

No Python loop over images: per-image offsets and flip flags are drawn as tensors and the crop is a
single ``gather`` into the zero-padded batch. Works for uint8 and floating batches, keeps dtype,
device and memory format (``channels_last`` in, ``channels_last`` out), and is deterministic for a
given ``torch.Generator``.

Random draws, in this order (so a run can be replayed): row offsets ``randint(0, 2p+1, (N,))`` and
column offsets ``randint(0, 2p+1, (N,))`` (only when ``padding > 0``), then flip flags
``rand(N) < 0.5`` (only when ``flip``). The generator may live on the CPU while the batch is on an
accelerator; draws happen on the generator's device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graftkd.errors import GraftkdError

__all__ = ["random_crop_flip", "crop_flip_params", "apply_crop_flip", "random_resized_crop", "color_jitter", "Augment",
           "default_augment", "resolve_augment"]


def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise GraftkdError(f"augmentation expects a (N, C, H, W) batch (got {shape})")


def _check_padding(padding: int) -> int:
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise GraftkdError(f"augmentation padding must be an integer >= 0 (got {padding!r})")
    return padding


def crop_flip_params(
    n: int,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``(row_offsets, col_offsets, flip_flags)`` for ``n`` images, returned on ``device``.

    Offsets are in ``[0, 2 * padding]`` (position of the crop's top-left corner in the padded image).
    """
    padding = _check_padding(padding)
    device = torch.device(device)
    draw_device = generator.device if generator is not None else device
    if padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=draw_device)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=draw_device)
    else:
        oy = torch.zeros(n, dtype=torch.int64, device=draw_device)
        ox = torch.zeros(n, dtype=torch.int64, device=draw_device)
    if flip:
        flips = torch.rand(n, generator=generator, device=draw_device) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=draw_device)
    return oy.to(device), ox.to(device), flips.to(device)


def apply_crop_flip(
    x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop each image's ``H x W`` window at ``(oy, ox)`` of the zero-padded batch, mirroring where ``flips``."""
    _check_batch(x)
    padding = _check_padding(padding)
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    hp, wp = h + 2 * padding, w + 2 * padding
    dev = x.device
    rows = oy.to(dev, torch.int64)[:, None] + torch.arange(h, device=dev)  # (N, H)
    cols = ox.to(dev, torch.int64)[:, None] + torch.arange(w, device=dev)  # (N, W)
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    lin = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, h * w)  # (N, H*W) into the padded plane
    if channels_last:
        flat = xp.permute(0, 2, 3, 1).reshape(n, hp * wp, c)  # NHWC view, no copy when channels_last
        out = flat.gather(1, lin[:, :, None].expand(n, h * w, c)).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return out  # NCHW shape, channels_last strides
    flat = xp.reshape(n, c, hp * wp)
    return flat.gather(2, lin[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero-pad by ``padding``, take a random ``H x W`` crop per image, and mirror a random half.

    ``padding=0`` and ``flip=False`` return ``x`` itself (no copy, no random draws).
    """
    _check_batch(x)
    padding = _check_padding(padding)
    if padding == 0 and not flip:
        return x
    oy, ox, flips = crop_flip_params(x.shape[0], padding, flip, generator, x.device)
    return apply_crop_flip(x, oy, ox, flips, padding)


@dataclass(frozen=True)
class Augment:
    """Augmentation settings: zero-padding for the random crop and whether to flip horizontally."""

    padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        _check_padding(self.padding)
        if not isinstance(self.flip, bool):
            raise GraftkdError(f"augmentation flip must be true or false (got {self.flip!r})")

    @property
    def is_identity(self) -> bool:
        return self.padding == 0 and not self.flip

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_crop_flip(x, self.padding, self.flip, generator)

    __call__ = apply


def default_augment(dataset_name: str | None, image_size: int | None = None) -> Augment:
    """Sensible defaults: CIFAR (32x32) pad 4 + flip; digits (8x8) pad 1, no flip (digits are not
    mirror-symmetric); other data: pad ``round(size / 8)`` + flip when the size is known, else pad 4 + flip."""
    key = (dataset_name or "").strip().lower().split("/")[0]
    if key == "digits":
        return Augment(padding=1, flip=False)
    if key in ("cifar10", "cifar100"):
        return Augment(padding=4, flip=True)
    if image_size is not None:
        return Augment(padding=max(1, round(int(image_size) / 8)), flip=True)
    return Augment(padding=4, flip=True)


def resolve_augment(dataset_name: str | None, padding: int | None = None, flip: bool | None = None,
                    image_size: int | None = None) -> Augment:
    """The crop-and-flip a run uses: what was asked for, else the dataset's default (:func:`default_augment`)."""
    defaults = default_augment(dataset_name, image_size)
    return Augment(padding=defaults.padding if padding is None else int(padding),
                   flip=defaults.flip if flip is None else bool(flip))


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A random box per image (area fraction in ``scale``, aspect ratio in ``ratio``, log-uniform), resized
    back to ``H x W`` bilinearly, mirrored for a random half. One ``grid_sample`` for the whole batch.

    uint8 input comes back as float in [0, 1] (what ``Normalizer`` expects of floats); float input keeps its
    dtype. Random draws, in this order: area fractions, log aspect ratios, box centres (y then x), flips."""
    _check_batch(x)
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise GraftkdError(f"random-resized crop scale must satisfy 0 < min <= max <= 1 (got {scale!r})")
    n = x.shape[0]
    draw = generator.device if generator is not None else x.device
    area = lo + (hi - lo) * torch.rand(n, generator=generator, device=draw)
    log_r = torch.empty(n, device=draw).uniform_(float(torch.tensor(ratio[0]).log()), float(torch.tensor(ratio[1]).log()),
                                                 generator=generator)
    r = log_r.exp()
    half_w = (area * r).sqrt().clamp(max=1.0)  # box half-sizes in [-1, 1] coordinates
    half_h = (area / r).sqrt().clamp(max=1.0)
    cy = (2 * torch.rand(n, generator=generator, device=draw) - 1) * (1 - half_h)
    cx = (2 * torch.rand(n, generator=generator, device=draw) - 1) * (1 - half_w)
    sign = torch.where(torch.rand(n, generator=generator, device=draw) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=draw)
    theta = torch.zeros(n, 2, 3, device=draw)
    theta[:, 0, 0], theta[:, 0, 2] = half_w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = half_h, cy
    src = x.float() / 255.0 if x.dtype == torch.uint8 else x
    grid = F.affine_grid(theta.to(src.device, src.dtype), list(src.shape), align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image brightness, contrast and saturation, each a factor drawn from U(1 - s, 1 + s), on a float
    batch in [0, 1] (uint8 is scaled first); the result is clamped to [0, 1] and stays float.

    Draws, in order: brightness (N,), contrast (N,), saturation (N,) on the generator's device. Saturation
    needs 3 channels; a 1-channel batch gets brightness and contrast only."""
    _check_batch(x)
    if not 0.0 <= strength < 1.0:
        raise GraftkdError(f"jitter strength must be in [0, 1) (got {strength})")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x
    if strength == 0.0:
        return x
    n = x.shape[0]
    where = generator.device if generator is not None else x.device

    def factor() -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=where)
        return (1.0 + strength * (2.0 * u - 1.0)).to(x.device, x.dtype).view(n, 1, 1, 1)

    def gray(y: torch.Tensor) -> torch.Tensor:  # ITU-R 601 luma for RGB, the channel mean otherwise
        return 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3] if y.shape[1] == 3 else y.mean(1, keepdim=True)

    brightness, contrast, saturation = factor(), factor(), factor()
    x = x * brightness
    x = torch.lerp(gray(x).mean(dim=(2, 3), keepdim=True).expand_as(x), x, contrast)
    if x.shape[1] == 3:
        x = torch.lerp(gray(x).expand_as(x), x, saturation)
    return x.clamp_(0.0, 1.0)
