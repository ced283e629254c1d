"""Seeded, stratified train/val/test splitting shared by every dataset source.

Sources carve positions (file indices, rows of a source array), never decoded data. Carved splits
keep the source's item order (ascending source position) so a split's content is a pure function
of (labels, fraction, seed) and ``data.limit`` takes a stable prefix.
"""

from __future__ import annotations

import torch

TEST_FRACTION = 0.2  # carved where a dataset ships no test split of its own


def seeded_generator(seed: int) -> torch.Generator:
    # torch seeds must fit in 64 bits; config ints are unbounded, so fold them in.
    return torch.Generator().manual_seed(seed % (1 << 64))


def stratified_take(labels: torch.Tensor, fraction: float, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions of ``labels`` into (kept, taken), ``taken`` ≈ ``fraction`` of each class.

    Exactly round(fraction·N) items are taken overall. Each item gets a within-class quantile
    (rank + 0.5) / class_size under a random within-class order, and the lowest quantiles are taken,
    so every class gives up its proportional share even when classes are tiny; ties between
    classes are broken at random. Both outputs are sorted ascending.
    """
    n = int(labels.shape[0])
    n_take = int(fraction * n + 0.5)
    if n_take <= 0:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    labels = labels.to(torch.int64)
    perm = torch.randperm(n, generator=generator)  # random within-class order
    shuffled = labels[perm]
    by_class = torch.argsort(shuffled, stable=True)
    sorted_labels = shuffled[by_class]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_labels]
    quantile = (rank.to(torch.float64) + 0.5) / counts[sorted_labels].to(torch.float64)
    tie_break = torch.randperm(n, generator=generator)  # stable sort over a random order
    order = tie_break[torch.argsort(quantile[tie_break], stable=True)]
    taken = perm[by_class[order[:n_take]]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[taken] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def carve_val(inputs: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int
              ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, val) pairs of (inputs, labels): val = ``val_fraction`` of the pool, by ``seed``."""
    keep, take = stratified_take(labels, val_fraction, seeded_generator(seed))
    return (inputs[keep], labels[keep]), (inputs[take], labels[take])


def three_way_split(inputs: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One pool → test (20%), val (``val_fraction`` of the rest), train (the rest)."""
    generator = seeded_generator(seed)
    rest, test = stratified_take(labels, TEST_FRACTION, generator)
    keep, val = stratified_take(labels[rest], val_fraction, generator)
    positions = {"train": rest[keep], "val": rest[val], "test": test}
    return ({s: inputs[p] for s, p in positions.items()},
            {s: labels[p] for s, p in positions.items()})
