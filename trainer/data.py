"""torch wrappers over :mod:`splitbits.runtime.datasets`: tensors in [0, 1], augmentation, (distributed) loaders.

* builtin (in memory): batches are uint8 NCHW tensors fetched in one indexing operation; the
  ``light`` augmentation (random flips, quarter turns and ±4 px shifts — the builtin classes are
  invariant to all of them) runs batch-wise on the training device (:func:`prepare_batch`).
* folder datasets: ``imagenet`` augmentation = RandomResizedCrop + horizontal flip per sample
  (torchvision, in DataLoader workers); evaluation uses the dataset's resize/center-crop.

Under ``torchrun`` the train loader uses a :class:`DistributedSampler` and evaluation shards the
validation set across ranks (:class:`ShardSampler`, no padding, so counts stay exact).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from splitbits.runtime.datasets import BuiltinDataset, ImageDataset, open_dataset


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


class InMemoryDataset(Dataset):
    """All images of an :class:`ImageDataset` as one uint8 N×3×H×W tensor (for small datasets)."""

    def __init__(self, ds: ImageDataset) -> None:
        if isinstance(ds, BuiltinDataset):
            arr = np.asarray(ds.as_array())
        else:
            arr = np.stack([ds[i][0] for i in range(len(ds))])
        self.images = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(ds.labels())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(list(idx), dtype=torch.long)
        return self.images[t], self.labels[t]


def _identity(batch: Any) -> Any:
    return batch


class FolderTorchDataset(Dataset):
    """Per-sample decoding of a folder dataset; ``train`` adds RandomResizedCrop + flip."""

    def __init__(self, ds: ImageDataset, image_size: int, train: bool) -> None:
        self.ds, self.image_size, self.train = ds, image_size, train
        self._tf = None
        if train:
            from torchvision import transforms

            self._tf = transforms.Compose([
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, label = self.ds[i]
        if self._tf is not None:
            from PIL import Image

            return self._tf(Image.fromarray(img)), label
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), label


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every item exactly once across ranks (evaluation)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


@dataclass
class Loaders:
    """Train/val loaders plus what the training loop needs to know about them."""

    train: DataLoader
    val: DataLoader
    train_set: ImageDataset
    val_set: ImageDataset
    augment: str  # batch-level augmentation applied by prepare_batch ("light" or "none")
    image_size: int
    classes: list[str]
    class_names: list[str]
    world: int = 1
    train_kwargs: dict[str, Any] | None = None

    def with_batch_size(self, batch_size: int | None) -> Loaders:
        """The same loaders with another training batch size (same dataset, sampler and shuffling)."""
        if not batch_size or batch_size == self.train.batch_size or self.train_kwargs is None:
            return self
        ds = self.train.dataset
        train = DataLoader(ds, batch_size=batch_size, drop_last=len(ds) // self.world >= batch_size,  # type: ignore[arg-type]
                           **self.train_kwargs)
        return replace(self, train=train)

    def set_epoch(self, epoch: int) -> None:
        sampler = self.train.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


def resolve_image_size(data_cfg: dict[str, Any]) -> int:
    if data_cfg.get("image_size"):
        return int(data_cfg["image_size"])
    return 64 if str(data_cfg["dataset"]).startswith("builtin") else 224


def build_loaders(data_cfg: dict[str, Any], seed: int = 0, rank: int = 0, world: int = 1,
                  pin_memory: bool = False) -> Loaders:
    """Train and val loaders for a validated ``data`` config section."""
    spec = data_cfg["dataset"]
    size = resolve_image_size(data_cfg)
    builtin = spec.startswith("builtin")
    augment = data_cfg["augment"]
    if augment == "auto":
        augment = "light" if builtin else "imagenet"
    workers = data_cfg["workers"]
    if workers is None:
        workers = 0 if builtin else min(8, os.cpu_count() or 1)
    raw_train = augment == "imagenet" and not builtin
    train_ds = open_dataset(spec, "train", size, data_cfg["train_limit"], raw=raw_train) if not builtin \
        else open_dataset(spec, "train", size, data_cfg["train_limit"])
    val_ds = open_dataset(spec, "val", size, data_cfg["val_limit"])
    if train_ds.classes != val_ds.classes:
        raise ValueError(f"{spec}: train and val have different classes "
                         f"({len(train_ds.classes)} vs {len(val_ds.classes)})")

    g = torch.Generator()
    g.manual_seed(seed)
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory,
                              "persistent_workers": workers > 0}
    if builtin or augment != "imagenet":
        train_t: Dataset = InMemoryDataset(train_ds) if builtin else FolderTorchDataset(train_ds, size, False)
        val_t: Dataset = InMemoryDataset(val_ds) if builtin else FolderTorchDataset(val_ds, size, False)
    else:
        train_t, val_t = FolderTorchDataset(train_ds, size, True), FolderTorchDataset(val_ds, size, False)
    in_memory = isinstance(train_t, InMemoryDataset)
    collate = {"collate_fn": _identity} if in_memory else {}
    if world > 1:
        train_sampler: Sampler[int] = DistributedSampler(train_t, num_replicas=world, rank=rank, shuffle=True,
                                                         seed=seed, drop_last=True)
    else:
        train_sampler = RandomSampler(train_t, generator=g)
    batch = data_cfg["batch_size"]
    train_kwargs = {"sampler": train_sampler, **collate, **common}
    train = DataLoader(train_t, batch_size=batch, drop_last=len(train_t) // world >= batch, **train_kwargs)
    val = DataLoader(val_t, batch_size=data_cfg["eval_batch_size"], sampler=ShardSampler(len(val_t), rank, world),
                     **({"collate_fn": _identity} if isinstance(val_t, InMemoryDataset) else {}), **common)
    return Loaders(train, val, train_ds, val_ds, augment if augment == "light" else "none", size,
                   list(train_ds.classes), list(train_ds.class_names), world, train_kwargs)


def light_augment(x: Tensor, generator: torch.Generator | None = None, shift: int = 4) -> Tensor:
    """Per-sample random horizontal flip, quarter turn and ±``shift`` px translation (reflect pad)."""
    n, _, h, w = x.shape
    dev = x.device
    r = torch.randint(0, 2 ** 20, (n, 4), generator=generator).to(dev)
    flip = (r[:, 0] % 2).bool()
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if h == w:
        k = r[:, 1] % 4
        out = x.clone()
        for q in (1, 2, 3):
            m = k == q
            if bool(m.any()):
                out[m] = torch.rot90(x[m], q, dims=(2, 3))
        x = out
    if shift > 0:
        pad = torch.nn.functional.pad(x, (shift, shift, shift, shift), mode="reflect")
        dy = (r[:, 2] % (2 * shift + 1)).tolist()
        dx = (r[:, 3] % (2 * shift + 1)).tolist()
        x = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return x


def prepare_batch(x: Tensor, device: torch.device, augment: str = "none",
                  generator: torch.Generator | None = None, channels_last: bool = False) -> Tensor:
    """Move a batch to ``device`` as float32 in [0, 1] (uint8 input is divided by 255), then augment."""
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if augment == "light":
        x = light_augment(x, generator)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
