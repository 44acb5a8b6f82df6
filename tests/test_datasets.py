"""Datasets: the builtin generator (determinism, splits, classes), folder readers and their errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitbits.runtime.datasets import (
    BUILTIN_CLASSES,
    BuiltinDataset,
    DatasetError,
    ImageDataset,
    _load_image,
    jpeg_size,
    mean_jpeg_bytes,
    open_dataset,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITBITS_CACHE", str(tmp_path_factory.mktemp("cache")))


def _digest(ds: ImageDataset, n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        img, label = ds[i]
        h.update(img.tobytes() + label.to_bytes(2, "little"))
    return h.hexdigest()


# -- builtin --------------------------------------------------------------------------------


def test_builtin_items_have_the_documented_shape_and_labels() -> None:
    ds = open_dataset("builtin", "val", limit=30)
    assert isinstance(ds, ImageDataset) and len(ds) == 30
    assert ds.classes == BUILTIN_CLASSES and ds.class_names == BUILTIN_CLASSES
    assert len(ds.classes) >= 10
    img, label = ds[13]
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert label == 13 % len(BUILTIN_CLASSES)
    assert list(ds.labels()) == [i % len(BUILTIN_CLASSES) for i in range(30)]
    assert ds[-1][1] == ds[29][1]
    with pytest.raises(IndexError):
        ds[30]


def test_builtin_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    a = _digest(open_dataset("builtin:seed=3", "train", limit=12), 12)
    b = _digest(BuiltinDataset(seed=3, split="train", limit=12, cache=False), 12)
    c = _digest(open_dataset("builtin:seed=4", "train", limit=12), 12)
    assert a == b
    assert a != c


def test_builtin_is_identical_in_a_fresh_process() -> None:
    code = (
        "import hashlib;from splitbits.runtime.datasets import open_dataset;"
        "ds=open_dataset('builtin:seed=5','val',limit=6);"
        "print(hashlib.sha256(b''.join(ds[i][0].tobytes() for i in range(6))).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    ds = open_dataset("builtin:seed=5", "val", limit=6)
    assert out == hashlib.sha256(b"".join(ds[i][0].tobytes() for i in range(6))).hexdigest()


def test_builtin_splits_are_disjoint() -> None:
    train = open_dataset("builtin", "train", limit=60)
    val = open_dataset("builtin", "val", limit=60)
    th = {hashlib.sha256(train[i][0].tobytes()).digest() for i in range(60)}
    vh = {hashlib.sha256(val[i][0].tobytes()).digest() for i in range(60)}
    assert len(th) == 60 and len(vh) == 60
    assert not th & vh


def test_builtin_images_carry_texture_and_all_classes_are_drawn() -> None:
    ds = open_dataset("builtin", "val", limit=24)
    imgs = np.stack([ds[i][0] for i in range(24)]).astype(np.float64)
    # natural-photo backgrounds: plenty of local variation, not flat colour fields
    grad = np.abs(np.diff(imgs, axis=2)).mean()
    assert grad > 4.0
    assert len(set(ds.labels().tolist())) == len(BUILTIN_CLASSES)


def test_builtin_full_split_is_cached_and_reloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITBITS_CACHE", str(tmp_path))
    first = open_dataset("builtin:seed=1&val=40", "val")
    files = list((tmp_path / "datasets").glob("builtin-*.npy"))
    assert len(files) == 1 and not list((tmp_path / "datasets").glob("*.tmp"))
    second = open_dataset("builtin:seed=1,val=40", "val")
    assert second._images is not None
    assert _digest(first, 40) == _digest(second, 40) == _digest(BuiltinDataset(1, "val", size=40, cache=False), 40)


def test_builtin_other_image_size() -> None:
    img, _ = open_dataset("builtin", "val", image_size=32, limit=2)[1]
    assert img.shape == (32, 32, 3)


# sha256 of the first 48 images of builtin val/train at 64×64 (seed 0), as every release so far drew
# them (the demo's published figures rest on these bytes); with the 16 background photographs.
_BUILTIN_64_SHA256 = {
    "val": "594d58113dfb609351fef244f180621bd1289b17bd7e19be10d9b2c72c6884a1",
    "train": "1ac1d08f5eb554941402f770b532584d6ba0ce8b78580ac9865eb737e62adfd2",
}


@pytest.mark.parametrize("split", ["val", "train"])
def test_builtin_64_is_byte_identical_to_earlier_releases(split: str) -> None:
    from splitbits.runtime.datasets import _PHOTOS, _load_photos

    if len(_load_photos()[0]) != len(_PHOTOS):
        pytest.skip("scikit-image is not installed: the two unshipped photographs are missing")
    ds = BuiltinDataset(split=split, image_size=64, cache=False)
    assert hashlib.sha256(b"".join(ds[i][0].tobytes() for i in range(48))).hexdigest() == _BUILTIN_64_SHA256[split]
    assert ds.fingerprint == {"val": "ae8121d3ef0864ed", "train": "bca618907644b42d"}[split]  # cache key too


def test_builtin_shipped_photographs_are_read_first_and_match_scikit_image() -> None:
    from splitbits.runtime.datasets import _SHIPPED_PHOTOS, _skimage_data_dir, photo_paths

    paths = photo_paths()
    shipped = sorted(p.name for p in _SHIPPED_PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(shipped) == 14 and {p.name for p in paths} >= set(shipped)
    assert all(p.parent == _SHIPPED_PHOTOS for p in paths if p.name in shipped)
    assert {p.name for p in paths} - set(shipped) <= {"moon.png", "motorcycle_left.png"}
    sk = _skimage_data_dir()
    for name in shipped:  # byte-identical copies, so the bytes do not depend on where they are read
        if sk is not None and (sk / name).is_file():
            assert (sk / name).read_bytes() == (_SHIPPED_PHOTOS / name).read_bytes(), name
    readme = (_SHIPPED_PHOTOS / "README.md").read_text()
    assert all(f"| {name} |" in readme for name in shipped)


@pytest.mark.parametrize("split", ["val", "train"])
def test_builtin_at_224_is_textured_and_identical_in_a_fresh_process(split: str) -> None:
    ds = BuiltinDataset(split=split, image_size=224, limit=6, cache=False)
    imgs = np.stack([ds[i][0] for i in range(6)])
    assert imgs.shape == (6, 224, 224, 3) and imgs.dtype == np.uint8
    assert np.abs(np.diff(imgs.astype(np.float64), axis=2)).mean() > 2.0  # photo detail, not flat fields
    code = (
        "import hashlib;from splitbits.runtime.datasets import BuiltinDataset;"
        f"ds=BuiltinDataset(split={split!r},image_size=224,limit=6,cache=False);"
        "print(hashlib.sha256(b''.join(ds[i][0].tobytes() for i in range(6))).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hashlib.sha256(imgs.tobytes()).hexdigest()


def test_builtin_upsampling_is_exact_bilinear() -> None:
    from splitbits.runtime.datasets import _upsample

    ramp = np.arange(4, dtype=np.float64)[None, :, None].repeat(4, 0)  # x = 0..3 along columns
    up = _upsample(ramp, 8)
    # pixel centres aligned: output x_i samples source (i + 0.5)/2 - 0.5, edges replicated
    assert up[0, :, 0].tolist() == [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]
    assert (up == up[:1]).all()
    img = np.random.default_rng(0).integers(0, 256, (37, 37, 3)).astype(np.float64)
    out = _upsample(img, 224)
    assert out.shape == (224, 224, 3) and out.min() >= img.min() and out.max() <= img.max()


def test_builtin_without_scikit_image_uses_the_shipped_photographs(tmp_path: Path) -> None:
    """A device install has no scikit-image: the builtin still opens (14 shipped photographs, its own
    fingerprint), at 64 and 224, and never imports scikit-image."""
    from support import runtime_only_env

    from splitbits.runtime.datasets import _load_photos

    env = runtime_only_env(tmp_path, dict(os.environ))
    blocked = subprocess.run([sys.executable, "-c", "import skimage"], capture_output=True, text=True, env=env)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the harness does block it
    code = (
        "import json,sys;from splitbits.runtime import datasets as d;"
        "a=d.BuiltinDataset(split='val',image_size=64,limit=3,cache=False);"
        "b=d.BuiltinDataset(split='val',image_size=224,limit=3,cache=False);"
        "print(json.dumps([sorted(p.name for p in d.photo_paths()),a.fingerprint,b[2][0].shape,"
        "[m for m in ('skimage','torch') if m in sys.modules]]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    names, fingerprint, shape, imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(names) == 14 and "moon.png" not in names and shape == [224, 224, 3] and imported == []
    if len(_load_photos()[0]) == 16:
        assert fingerprint != BuiltinDataset(split="val", image_size=64, limit=3, cache=False).fingerprint


@pytest.mark.parametrize(
    ("spec", "split", "match"),
    [
        ("builtin", "test", "splits train and val"),
        ("builtin:sead=1", "val", "unknown option 'sead'"),
        ("builtin:seed=x", "val", "seed must be an integer"),
        ("nosuch:thing", "val", "unknown dataset scheme 'nosuch'"),
        ("", "val", "empty dataset spec"),
        ("imagefolder:", "val", "give a path"),
        ("imagefolder:/definitely/not/here", "val", "path not found"),
        ("imagenet-c:/definitely/not/here", "val", "path not found"),
    ],
)
def test_bad_specs_raise_clear_errors(spec: str, split: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        open_dataset(spec, split)


def test_bad_limit_and_size() -> None:
    with pytest.raises(DatasetError, match="limit"):
        open_dataset("builtin", "val", limit=0)
    with pytest.raises(DatasetError, match="image_size"):
        open_dataset("builtin", "val", image_size=8, limit=1)


def test_runtime_datasets_do_not_import_torch() -> None:
    code = (
        "import sys, splitbits.runtime, splitbits.runtime.datasets as d;"
        "d.open_dataset('builtin','val',limit=2)[0];"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- folder datasets -----------------------------------------------------------------------


def _write(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_with_splits(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, colour in (("n01", (255, 0, 0)), ("n02", (0, 255, 0))):
            for k in range(3):
                _write(tmp_path / split / c / f"img{k}.JPEG", (40 + 10 * k, 30), colour)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01 red thing, scarlet\nn02 green thing\n")
    ds = open_dataset(f"imagefolder:{tmp_path}", "val", image_size=16)
    assert len(ds) == 6 and ds.classes == ["n01", "n02"]
    assert ds.class_names == ["red thing", "green thing"]
    assert list(ds.labels()) == [0, 1, 0, 1, 0, 1]  # round-robin over classes
    img, label = ds[0]
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and label == 0
    assert img[8, 8, 0] > 200 and img[8, 8, 1] < 50
    assert ds.meta(1)["path"].endswith("img0.JPEG")
    raw = open_dataset(f"imagefolder:{tmp_path}", "train", raw=True)
    assert raw[4][0].shape == (30, 60, 3)
    assert len(open_dataset(f"imagefolder:{tmp_path}", "train", limit=3)) == 3
    with pytest.raises(DatasetError, match="no 'test' split"):
        open_dataset(f"imagefolder:{tmp_path}", "test")
    with pytest.raises(DatasetError, match="unknown split"):
        open_dataset(f"imagefolder:{tmp_path}", "validation")


def test_imagefolder_resize_and_center_crop(tmp_path: Path) -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :50] = 255  # white band on the left is cropped away by the center crop
    Image.fromarray(img).save(tmp_path / "a.png")
    (tmp_path / "cls").mkdir()
    (tmp_path / "a.png").rename(tmp_path / "cls" / "a.png")
    out, _ = open_dataset(f"imagefolder:{tmp_path}", "val", image_size=56)[0]
    assert out.shape == (56, 56, 3) and out.max() == 0


def test_imagefolder_flat_layout_and_errors(tmp_path: Path) -> None:
    _write(tmp_path / "flat" / "cat" / "a.png", (8, 8), (1, 2, 3))
    _write(tmp_path / "flat" / "dog" / "b.png", (8, 8), (1, 2, 3))
    ds = open_dataset(f"imagefolder:{tmp_path / 'flat'}", "train", image_size=8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        open_dataset(f"imagefolder:{tmp_path / 'noclasses'}")
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot read image"):
        open_dataset(f"imagefolder:{tmp_path / 'broken'}")[0]


def _imagenet_c_tree(root: Path) -> None:
    for corruption in ("gaussian_noise", "contrast"):
        for severity in (1, 3):
            for c in ("n01", "n02"):
                for k in range(2):
                    _write(root / corruption / str(severity) / c / f"{k}.JPEG", (24, 24), (severity * 50, 0, 0))


def test_imagenet_c_selection(tmp_path: Path) -> None:
    _imagenet_c_tree(tmp_path)
    all_ = open_dataset(f"imagenet-c:{tmp_path}", image_size=24)
    assert len(all_) == 2 * 2 * 2 * 2 and all_.classes == ["n01", "n02"]
    assert all_.corruptions == ["contrast", "gaussian_noise"] and all_.severities == [1, 3]
    sel = open_dataset(f"imagenet-c:{tmp_path}?corruption=gaussian_noise&severity=3", image_size=24)
    assert len(sel) == 4
    assert {(sel.meta(i)["corruption"], sel.meta(i)["severity"]) for i in range(4)} == {("gaussian_noise", 3)}
    assert sel[0][0][0, 0, 0] == 150
    two = open_dataset(f"imagenet-c:{tmp_path}?corruption=contrast,gaussian_noise&severity=1", limit=3)
    assert len(two) == 3 and two[0][0].shape == (224, 224, 3)


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("?corruption=fog", "no corruption 'fog'"),
        ("?severity=2", "no severity 2"),
        ("?severity=9", "severities are 1..5"),
        ("?severity=high", "severity must be an integer"),
        ("?corruptions=fog", "unknown option 'corruptions'"),
        ("?corruption", "expected key=value"),
    ],
)
def test_imagenet_c_errors(tmp_path: Path, query: str, match: str) -> None:
    _imagenet_c_tree(tmp_path)
    with pytest.raises(DatasetError, match=match):
        open_dataset(f"imagenet-c:{tmp_path}{query}")


def test_imagenet_c_is_eval_only(tmp_path: Path) -> None:
    _imagenet_c_tree(tmp_path)
    with pytest.raises(DatasetError, match="only evaluation images"):
        open_dataset(f"imagenet-c:{tmp_path}", "train")


def test_jpeg_reference_sizes() -> None:
    ds = open_dataset("builtin", "val", limit=4)
    sizes = [jpeg_size(ds[i][0], 75) for i in range(4)]
    assert all(s > 200 for s in sizes)
    assert mean_jpeg_bytes(ds, 75) == pytest.approx(np.mean(sizes))
    assert jpeg_size(ds[0][0], 30) < jpeg_size(ds[0][0], 95)


# --------------------------------------------------------------------------------------------
# hostile images: pixel bounds, bounded resizing, 16-bit and float modes
# --------------------------------------------------------------------------------------------


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A ~60-byte PNG that declares w×h 8-bit greyscale pixels and holds none of them."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(15000, 15000), (9000, 9000), (70_000_000, 1)])
def test_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path: Path, size) -> None:
    _png_header_only(tmp_path / "cls" / "bomb.png", *size)
    ds = open_dataset(f"imagefolder:{tmp_path}", "val", image_size=32)
    # decoding would fail differently ("cannot read image": the pixels are not there)
    with pytest.raises(DatasetError, match=r"bomb\.png: .*(megapixels|too many pixels)"):
        ds[0]
    with pytest.raises(DatasetError, match=r"bomb\.png: .*(megapixels|too many pixels)"):
        open_dataset(f"imagefolder:{tmp_path}", "train", raw=True)[0]


def test_extreme_aspect_ratio_is_resized_without_a_large_intermediate(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (65000, 1), (200, 100, 50)).save(tmp_path / "cls" / "wide.png")
    sizes: list[tuple[int, int]] = []
    real = Image.Image.resize

    def spy(self, size, *a, **k):
        sizes.append(tuple(size))
        return real(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    img, _ = open_dataset(f"imagefolder:{tmp_path}", "val", image_size=64)[0]
    assert img.shape == (64, 64, 3) and (img == (200, 100, 50)).all()
    assert sizes and max(w * h for w, h in sizes) <= 64 * 64  # the old path resized to 4745205×73 first


def _resize_then_crop(im: Image.Image, size: int) -> np.ndarray:
    """The reference ImageNet val transform: shorter side to size·256/224 (bilinear), center crop."""
    w, h = im.size
    short = round(size * 256 / 224)
    nw, nh = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size)))


def test_center_crop_box_resize_matches_resize_then_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.open(_photo_path()).convert("RGB"))
    worst, differ, total = 0, 0, 0
    for k, (w, h) in enumerate([(500, 375), (375, 500), (301, 299), (64, 48), (1000, 17), (17, 900), (7, 5)]):
        smooth = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC))
        for kind, arr in (("photo", smooth), ("noise", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))):
            path = tmp_path / "cls" / f"{kind}{k}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(arr).save(path)
            for size in (224, 64, 32):
                ours = _load_image(path, size).astype(int)
                ref = _resize_then_crop(Image.fromarray(arr), size).astype(int)
                d = np.abs(ours - ref)
                worst, differ, total = max(worst, int(d.max())), differ + int((d > 0).sum()), total + d.size
    assert worst <= 2 and differ / total < 0.05, (worst, differ / total)


def _photo_path() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / "astronaut.png"


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "g16.png")  # mode I;16
    Image.fromarray(ramp.astype(np.int32), "I").save(tmp_path / "g32.tif")  # mode I, 16-bit values
    for name in ("g16.png", "g32.tif"):
        img = _load_image(tmp_path / name, None)
        expect = np.round(ramp / 257).astype(np.uint8)  # v/257 is never a tie (257 is odd)
        # convert("RGB") clips instead: 0..255 kept, everything above 255 white
        assert img.shape == (256, 256, 3) and (img == expect[..., None]).all(), name


def test_float_and_out_of_range_int_images_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DatasetError, match=r"f\.tif: 32-bit float pixels \(mode F\)"):
        _load_image(tmp_path / "f.tif", None)
    Image.fromarray(np.full((8, 8), -5, np.int32), "I").save(tmp_path / "neg.tif")
    with pytest.raises(DatasetError, match=r"neg\.tif: .*outside 0\.\.65535"):
        _load_image(tmp_path / "neg.tif", None)
