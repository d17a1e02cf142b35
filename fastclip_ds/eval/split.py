"""Eval splits as an index of samples, in either layout, and the sharded encoding every rank runs.

Layouts, detected by what ``ROOT`` holds (both at once is an error):

- CLIP_benchmark wds: ``ROOT/test/nshards.txt`` and ``ROOT/test/0.tar ...`` (``KEY.png|jpg|jpeg|webp`` plus
  ``KEY.cls`` or ``KEY.txt``); the index holds each image's byte range in its shard (tar headers are scanned, only
  the small ``.cls``/``.txt`` members are read).
- ImageNet-style folder (classification only): ``ROOT/val/<class>/<image>``, class ``i`` being the ``i``-th class
  folder in sorted order (torchvision's ``ImageFolder``), images in sorted order within their folder.

:func:`shard_map` runs fixed units of work (batches of samples, groups of texts) round-robin over the ranks,
gathers the outputs and returns them in sample order on every rank. A unit's content does not depend on the
world size, so each sample's features are the same computation on 1 or K ranks and the metrics are identical.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fastclip_kernels.openclip_import import import_torchvision
from PIL import Image

from .. import comm

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # wds members, in order of preference
FOLDER_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")  # ImageFolder's
_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # webdataset's KEY.EXT split of a member name


@dataclass
class Split:
    """The samples of an eval split: where each image lies, and its label (classification) or captions
    (retrieval)."""

    images: list[tuple[str, int, int]] = field(default_factory=list)  # (file, byte offset, size; -1: whole file)
    labels: list[int] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty stripped lines of ``path``; a clear error naming ``what`` when missing or empty."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: missing {path}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what}: {path} is empty")
    return lines


def layout(root: Path, what: str) -> str:
    """``wds`` (``ROOT/test/nshards.txt``) or ``folder`` (``ROOT/val/``), see the module docstring."""
    wds, folder = (Path(root) / "test" / "nshards.txt").is_file(), (Path(root) / "val").is_dir()
    if wds and folder:
        raise ValueError(f"{what}: {root} holds both test/nshards.txt (wds layout) and val/ (folder layout)")
    if not (wds or folder):
        raise FileNotFoundError(f"{what}: {root} holds neither test/nshards.txt (wds layout) nor val/ (folder layout)")
    return "wds" if wds else "folder"


def split_shards(root: Path, what: str) -> list[str]:
    """``root/test/{0..n-1}.tar`` as listed by ``root/test/nshards.txt`` (CLIP_benchmark's wds layout)."""
    nshards_file = Path(root) / "test" / "nshards.txt"
    try:
        nshards = int(read_lines(nshards_file, what)[0])
    except ValueError:
        raise ValueError(f"{what}: {nshards_file} must hold an integer") from None
    shards = [str(Path(root) / "test" / f"{i}.tar") for i in range(nshards)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {nshards_file} lists {nshards} shards but {missing[0]} is missing")
    return shards


def _read_shard(shard: str, target: str, split: Split, what: str) -> None:
    """Append ``shard``'s samples to ``split``: image byte ranges, and the ``target`` member (cls or txt) read."""
    with tarfile.open(shard, "r:") as tar:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        for member in tar:
            match = _KEY_EXT.match(member.name) if member.isfile() else None
            if match:
                samples.setdefault(match[1], {})[match[2].lower()] = member
        for key, members in samples.items():
            image = next((members[e] for e in IMAGE_EXTS if e in members), None)
            if image is None or target not in members:
                need = f"an image ({'/'.join(IMAGE_EXTS)})" if image is None else f"a .{target}"
                raise ValueError(f"{what}: {shard}: sample {key!r} has no {need}")
            split.images.append((shard, image.offset_data, image.size))
            text = tar.extractfile(members[target]).read().decode()
            if target == "cls":
                if not text.strip().lstrip("-").isdigit():
                    raise ValueError(f"{what}: {shard}: sample {key!r}: label {text!r} is not an integer")
                split.labels.append(int(text))
            else:
                split.captions.append([c.strip() for c in text.splitlines() if c.strip()])


def read_wds(root: Path, target: str, what: str) -> Split:
    """The wds split at ``root``; ``target`` is ``cls`` (classification) or ``txt`` (retrieval)."""
    split = Split()
    for shard in split_shards(root, what):
        _read_shard(shard, target, split, what)
    return split


def read_folder(root: Path, num_classes: int, what: str) -> Split:
    """The folder split at ``root`` (``val/<class>/<image>``), which must have ``num_classes`` class folders."""
    val = Path(root) / "val"
    classes = sorted(p for p in val.iterdir() if p.is_dir())
    if len(classes) != num_classes:
        raise ValueError(f"{what}: {val} has {len(classes)} class folders but classnames.txt names {num_classes}")
    split = Split()
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FOLDER_EXTS and p.is_file())
        split.images += [(str(p), 0, -1) for p in files]
        split.labels += [label] * len(files)
    return split


class SplitImages(torch.utils.data.Dataset):
    """Sample ``i``'s image of ``split``, decoded to RGB and passed through ``transform`` (DataLoader workers read
    their byte ranges on their own). Pickled with the transform as bytes: a spawned worker applies the torchvision
    shim (:mod:`fastclip_kernels.openclip_import`) before it unpickles the transform."""

    def __init__(self, split: Split, transform: Callable) -> None:
        self.images, self.transform = split.images, transform

    def __getstate__(self) -> dict[str, Any]:
        return {"images": self.images, "transform": pickle.dumps(self.transform)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import_torchvision()
        self.images, self.transform = state["images"], pickle.loads(state["transform"])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        path, offset, size = self.images[i]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        with Image.open(io.BytesIO(data)) as image:
            return self.transform(image.convert("RGB"))


def chunks(n: int, size: int) -> list[list[int]]:
    """``[0, n)`` in consecutive chunks of ``size`` (the last one shorter)."""
    return [list(range(start, min(n, start + size))) for start in range(0, n, size)]


def shard_map(
    units: Sequence[list[int]],
    run: Callable[[list[list[int]]], Iterable[Sequence[torch.Tensor]]],
    lockstep: bool,
    op: str,
) -> list[torch.Tensor]:
    """Every unit's outputs in item order, on every rank: ``units`` partition the items ``0..n-1``; rank ``r`` runs
    units ``r, r+K, ...`` through ``run`` (one tuple of tensors per unit, one row per item) and the rows are
    gathered. A rank with no unit runs unit 0 and drops it (the gather needs its shapes); ``lockstep`` pads every
    rank to the same number of units with unit 0, dropped (ZeRO-3's forwards gather parameters collectively)."""
    k, rank = comm.world_size(), comm.rank()
    mine = list(units[rank::k])
    runs = max(len(mine), 1, -(-len(units) // k) if lockstep else 0)
    outputs = list(run(mine + [units[0]] * (runs - len(mine))))
    kept = outputs[: len(mine)] or [tuple(t[:0] for t in outputs[0])]
    local = [torch.cat(parts) for parts in zip(*kept, strict=True)]
    gathered = comm.all_gather_ragged(local, op)
    order = torch.tensor([i for r in range(k) for unit in units[r::k] for i in unit], device=gathered[0].device)
    return [torch.empty_like(g).index_copy_(0, order, g) for g in gathered]


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; the model's previous mode restored after. Under ZeRO-3 (a collective:
    every rank enters) the parameters no submodule hook fetches are gathered inside: the model's own (open_clip's
    ``text_projection``, ``positional_embedding``: ``encode_text`` / ``encode_image`` bypass the root forward) and
    the persistent ones, which DeepSpeed fetches once in its first forward (e.g. attention ``out_proj``, read
    without calling its module) and which a step-0 evaluation precedes."""
    was_training = model.training
    model.eval()
    unhooked = [*model.parameters(recurse=False), *(p for p in model.parameters() if getattr(p, "ds_persist", False))]
    try:
        with torch.no_grad(), comm.gathered_parameters(unhooked):
            yield
    finally:
        model.train(was_training)


def encode_images(model: torch.nn.Module, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """L2-normalised float32 image features; the images are cast to the model's parameter dtype."""
    images = images.to(device=device, dtype=_param_dtype(model) if images.is_floating_point() else images.dtype)
    return F.normalize(model.encode_image(images).float(), dim=-1)


def encode_split(
    model: torch.nn.Module,
    split: Split,
    transform: Callable,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
    lockstep: bool,
    digests: bool = False,
) -> list[torch.Tensor]:
    """``[features]`` (or ``[features, digests]``) of every image of ``split`` in sample order, on every rank: each
    rank encodes its share of the fixed batches ``chunks(len(split), batch_size)`` (:func:`shard_map`), its images
    loaded by ``num_workers`` DataLoader workers."""

    def run(units: list[list[int]]) -> Iterator[tuple[torch.Tensor, ...]]:
        for images in torch.utils.data.DataLoader(
            SplitImages(split, transform), batch_sampler=units, num_workers=num_workers
        ):
            features = encode_images(model, images, device)
            yield (features, torch.stack([digest(i) for i in images]).to(features.device)) if digests else (features,)

    return shard_map(chunks(len(split), batch_size), run, lockstep, "eval_images")


def digest(image: torch.Tensor) -> torch.Tensor:
    """Identity of a preprocessed image (its shape, dtype and pixel bytes) as 16 uint8."""
    pixels = image.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    key = hashlib.blake2b(f"{tuple(image.shape)}{image.dtype}".encode() + pixels.tobytes(), digest_size=16).digest()
    return torch.frombuffer(bytearray(key), dtype=torch.uint8)
