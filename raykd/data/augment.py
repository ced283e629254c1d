"""Deterministic, vectorised data augmentation keyed by per-sample seeds.

Each (base seed, train index, view) pair hashes to one 63-bit seed, and the augmentation of a
sample depends on nothing but that seed. So view ``v`` of item ``i`` is the same image whether it
is drawn by the teacher when its soft labels are cached (replay mode) or by any student worker
later, on any device, in any batch composition.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    # Logical (unsigned) right shift: torch's >> on int64 is arithmetic and copies the sign bit.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Vectorised splitmix64 finaliser on int64 tensors (two's-complement wraparound = mod 2^64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def view_seeds(indices: torch.Tensor, views: torch.Tensor | int, base_seed: int) -> torch.Tensor:
    """A non-negative 63-bit seed per (base_seed, index, view); broadcasts indices with views."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    views = torch.as_tensor(views, dtype=torch.int64, device=indices.device)
    base = splitmix64(torch.tensor(_signed(base_seed), dtype=torch.int64, device=indices.device))
    # Chained, not summed: (index, view) pairs cannot collide by trading one for the other.
    return splitmix64(splitmix64(base ^ indices) ^ views) & _MASK63


def _shifts(seeds: torch.Tensor, jitter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (dx, dy, flip) from the seeds. Seeds are re-mixed first so that even small
    consecutive seeds (0, 1, 2, ...) give unrelated shifts; dx, dy and flip use disjoint bits."""
    mixed = splitmix64(torch.as_tensor(seeds, dtype=torch.int64)) & _MASK63
    span = 2 * jitter + 1
    dx = (mixed & 0xFFFFF) % span - jitter
    dy = ((mixed >> 20) & 0xFFFFF) % span - jitter
    flip = ((mixed >> 40) & 1).bool()
    return dx, dy, flip


def augment(x: torch.Tensor, seeds: torch.Tensor, jitter: int, flip: bool = False
            ) -> torch.Tensor:
    """Translate each image of ``x`` [B, C, H, W] by its own (dx, dy) in [-jitter, jitter]²
    (content moves right/down for positive values; vacated pixels are 0, as in Hinton et al.'s
    ±2-pixel jitter) and, with ``flip``, mirror it horizontally when its seed says so (first).
    Same seed ⇒ same output; jitter=0 and flip=False return ``x`` itself."""
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if jitter == 0 and not flip:
        return x
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=x.device)
    if seeds.shape != (x.shape[0],):
        raise ValueError(f"need one seed per image: {x.shape[0]} images, "
                         f"seeds of shape {tuple(seeds.shape)}")
    dx, dy, do_flip = _shifts(seeds, jitter)
    if flip:
        x = torch.where(do_flip[:, None, None, None], x.flip(-1), x)
    if jitter == 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (jitter, jitter, jitter, jitter))  # zeros outside
    # out[y, x] = in[y - dy, x - dx] = padded[y - dy + jitter, x - dx + jitter]: one gather with
    # per-sample row/column index grids, no Python loop over samples.
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None] + jitter  # [B, H]
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None] + jitter  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    channels_last = padded.permute(0, 2, 3, 1)  # [B, H', W', C] so advanced indexing keeps C last
    out = channels_last[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


# -- torchvision transforms v2 (train.augment, Noisy Student's input noise) ---------------------
def build_transform(specs) -> torch.nn.Module | None:
    """``v2.Compose`` of ``specs`` (objects with ``name`` and ``args``); None when empty. Raises
    ValueError with a one-line reason for an unknown name or arguments the class refuses."""
    if not specs:
        return None
    from torchvision.transforms import v2

    steps = []
    for spec in specs:
        cls = getattr(v2, spec.name, None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)) or spec.name in (
                "Transform", "Compose"):
            known = sorted(n for n in dir(v2) if n[0].isupper() and isinstance(
                getattr(v2, n), type) and issubclass(getattr(v2, n), v2.Transform))
            raise ValueError(f"name: {spec.name!r} is not a torchvision transforms.v2 class; "
                             f"e.g. {', '.join(k for k in known if k.startswith('Random'))[:200]}")
        try:
            steps.append(cls(**spec.args))
        except (TypeError, ValueError) as err:
            raise ValueError(f"args: {spec.name}({spec.args}) fails: "
                             f"{str(err).splitlines()[0]}") from None
    return v2.Compose(steps)


def apply_transform(x: torch.Tensor, seeds: torch.Tensor, transform) -> torch.Tensor:
    """``transform`` on each image of ``x`` [B, C, H, W] separately (a v2 transform on a batch
    tensor would draw one set of random parameters for the whole batch), with torch's RNG seeded
    from the sample's seed: same seed ⇒ same output, and the caller's RNG state is untouched."""
    if transform is None:
        return x
    out = torch.empty_like(x)
    with torch.random.fork_rng(devices=[]):
        for i, seed in enumerate(torch.as_tensor(seeds, dtype=torch.int64).tolist()):
            # the CPU generator only: torch.manual_seed also visits every accelerator backend
            # (190 µs a call, measured; this is under 1 µs)
            torch.default_generator.manual_seed(seed)
            out[i] = transform(x[i])
    return out
