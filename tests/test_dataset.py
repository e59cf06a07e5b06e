"""Synthetic ImageFolder, augmentations, ImageFolder loading, code store and CodeDataset."""
import hashlib
import mmap
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset.code_store as code_store_module
import utils.identity as identity
from dataset.augmentation import center_crop_arr, random_crop_arr, ten_crops
from dataset.code_store import CodeDataset, CodeStoreWriter, check_code_store, item_pages, open_code_store
from dataset.imagefolder import (CheckedImageFolderDataset, ImageFolderDataset, image_problem, list_image_folder,
                                 load_rgb, min_image_side, to_tensor)
from dataset.synthetic import FAMILIES, class_names, generate_dataset, mask_dir
from utils.identity import code_store_hash


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "toy"
    generate_dataset(out, classes=len(FAMILIES), per_class=3, size=32, seed=0, masks=True)
    return out


# ---------------------------------------------------------------- synthetic data

def test_synthetic_is_deterministic(toy, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, classes=len(FAMILIES), per_class=3, size=32, seed=0, masks=True)
    assert _files(again) == _files(toy)
    assert _files(mask_dir(again)) == _files(mask_dir(toy))
    other = tmp_path / "other"
    generate_dataset(other, classes=len(FAMILIES), per_class=3, size=32, seed=1, masks=False)
    a, b = _files(toy), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_synthetic_classes_seen_by_torchvision(toy, tmp_path):
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(str(toy))
    assert tv.classes == class_names(len(FAMILIES)) and len(tv) == 3 * len(FAMILIES)
    assert class_names(2) == ["00_disc", "01_square"]
    generate_dataset(tmp_path / "ten", classes=10, per_class=1, size=16, masks=True)
    assert len(ImageFolder(str(tmp_path / "ten")).classes) == 10
    # our listing follows torchvision's rules exactly
    classes, samples = list_image_folder(toy)
    assert classes == tv.classes and samples == tv.samples
    with pytest.raises(ValueError):
        class_names(len(FAMILIES) + 1)


def test_synthetic_masks_separate_flat_from_detail(toy):
    masks = mask_dir(toy)
    for name in class_names(len(FAMILIES)):
        for i in range(3):
            img = np.asarray(Image.open(toy / name / f"{i}.png"), dtype=np.float64) / 255  # (S, S, 3)
            mask = np.asarray(Image.open(masks / name / f"{i}.png"))
            assert mask.shape == img.shape[:2] and set(np.unique(mask)) == {0, 255}, (name, i)
            detail = mask == 255
            # every strong colour step touches a detailed pixel; flat pixels have only small steps
            step = np.abs(np.diff(img, axis=1)).max(-1)  # (S, S-1)
            strong = step > 0.2
            assert (detail[:, :-1] | detail[:, 1:])[strong].all(), (name, i)
            flat_pair = ~detail[:, :-1] & ~detail[:, 1:]
            assert flat_pair.any() and step[flat_pair].max() < 0.1, (name, i)


def test_synthetic_palette_and_flat_share(tmp_path):
    from dataset.synthetic import PALETTE

    colours = 4
    out = tmp_path / "few"
    generate_dataset(out, classes=6, per_class=4, size=32, seed=3, colours=colours, flat_share=1.0)
    allowed = {tuple(c) for c in np.round(PALETTE[:colours] * 255).astype(int)}
    others = {tuple(c) for c in np.round(PALETTE[colours:] * 255).astype(int)}
    for path in sorted(out.rglob("*.png")):
        img = np.asarray(Image.open(path)).reshape(-1, 3)
        values, counts = np.unique(img, axis=0, return_counts=True)
        background = tuple(int(v) for v in values[counts.argmax()])
        assert background in allowed, path  # flat backgrounds in the first `colours` palette colours
        assert not {tuple(int(v) for v in c) for c in values} & others, path
    # a disc of radius 0.3 x 32 pixels on a flat background covers pi r^2 pixels
    disc = tmp_path / "disc"
    generate_dataset(disc, classes=1, per_class=3, size=32, seed=3, colours=colours, flat_share=1.0, radius=(0.3, 0.3))
    for path in sorted(disc.rglob("*.png")):
        img = np.asarray(Image.open(path)).reshape(-1, 3).astype(int)
        values, counts = np.unique(img, axis=0, return_counts=True)
        off_background = np.abs(img - values[counts.argmax()]).max(1) > 127  # (S*S,) mostly inside the disc
        assert abs(off_background.sum() - np.pi * (0.3 * 32) ** 2) < 2 * np.pi * 0.3 * 32, path  # within the rim
    # the default settings keep the full palette and gradient backgrounds
    full = tmp_path / "full"
    generate_dataset(full, classes=6, per_class=4, size=32, seed=3)
    distinct = [len(np.unique(np.asarray(Image.open(p)).reshape(-1, 3), axis=0)) for p in full.rglob("*.png")]
    assert max(distinct) > 100  # a gradient: many colours
    for bad in ({"colours": 1}, {"colours": len(PALETTE) + 1}, {"flat_share": 1.5},
                {"radius": (0.3, 0.2)}, {"radius": (0.0, 0.2)}, {"radius": (0.3, 0.6)}):
        with pytest.raises(ValueError):
            generate_dataset(tmp_path / "bad", classes=2, per_class=1, size=16, **bad)


# ---------------------------------------------------------------- augmentations

def test_center_crop_arr():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)  # H=64, W=96: no resize, crop columns 16..79
    out = center_crop_arr(Image.fromarray(wide), 64)
    assert out.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(out), wide[:, 16:80])
    blocks = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(blocks, 2, 0), 2, 1)  # (128, 128, 3): BOX halving is exact
    np.testing.assert_array_equal(np.asarray(center_crop_arr(Image.fromarray(big), 64)), blocks)
    for w, h in [(300, 200), (50, 81), (640, 480)]:
        assert center_crop_arr(Image.new("RGB", (w, h)), 48).size == (48, 48)


def test_random_crop_arr():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(random_crop_arr(img, 40, 1.0, 1.0)), np.asarray(img))
    a = [np.asarray(random_crop_arr(img, 32, rng=random.Random(s))) for s in range(6)]
    b = [np.asarray(random_crop_arr(img, 32, rng=random.Random(s))) for s in range(6)]
    assert all(x.shape == (32, 32, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(a[0], x) for x in a[1:])


def test_ten_crop_matches_torchvision():
    import torchvision.transforms.functional as TF
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, size=(37, 37, 3), dtype=np.uint8))  # odd margin: rounding
    ours = ten_crops(to_tensor(img), 32)  # (10, 3, 32, 32)
    ref = torch.stack([to_tensor(c) for c in TF.ten_crop(img, [32, 32])])
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


# ---------------------------------------------------------------- ImageFolder loading

def test_imagefolder_reports_unreadable(toy, tmp_path):
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    good = (toy / "00_disc" / "0.png").read_bytes()
    (root / "a" / "0.png").write_bytes(good)
    (root / "a" / "1.png").write_bytes(b"not a png")
    (root / "b" / "0.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "b" / "notes.txt").write_text("ignored")
    transform = lambda im: to_tensor(center_crop_arr(im, 16))  # noqa: E731
    ds = CheckedImageFolderDataset(root, transform)
    assert len(ds) == 3 and ds.classes == ["a", "b"]
    x, label, index, err = ds[0]
    assert err == "" and (label, index) == (0, 0) and x.shape == (3, 16, 16)
    assert -1 <= x.min() < x.max() <= 1
    for i in (1, 2):
        x, label, index, err = ds[i]
        assert err and x.shape == (3, 16, 16) and index == i
    assert ds.relative_path(2) == "b/0.png"
    with pytest.raises(OSError):
        ImageFolderDataset(root, transform)[1]
    with pytest.raises(ValueError, match="not found"):
        list_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        list_image_folder(tmp_path / "empty")


# ---------------------------------------------------------------- code store

def _write_store(path: Path, codes: np.ndarray, labels: np.ndarray, keep: np.ndarray | None = None,
                 codebook_size: int = 1024) -> dict:
    n, views, t = codes.shape
    side = int(t ** 0.5)
    rank0 = CodeStoreWriter.create(path, n, views, t)
    rank1 = CodeStoreWriter.open(path)  # a second "rank" writing its own slice
    half = n // 2
    rank0.write(np.arange(half), codes[:half], labels[:half])
    rank1.write(np.arange(half, n), codes[half:], labels[half:])
    rank1.flush()
    manifest = {"image_size": side * 16, "grid_height": side, "grid_width": side, "codebook_size": codebook_size,
                "num_views": views, "count": n, "tokenizer_hash": "abc"}
    return rank0.finalize(manifest, keep)


def test_code_store_round_trip_and_hash(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1024, size=(7, 2, 16))
    labels = rng.integers(0, 10, size=7)
    _write_store(tmp_path / "s", codes, labels)
    store = open_code_store(tmp_path / "s")
    assert store.codes.dtype == np.uint16 and isinstance(store.codes, np.memmap)
    np.testing.assert_array_equal(store.codes, codes)
    np.testing.assert_array_equal(store.labels, labels)
    assert (len(store), store.num_views, store.seq_len, store.grid, store.codebook_size) == (7, 2, 16, (4, 4), 1024)
    check_code_store(store, codebook_size=1024, grid=4)
    h = code_store_hash(tmp_path / "s")
    assert h == code_store_hash(tmp_path / "s") and len(h) == 64


def _counting_hashes(monkeypatch) -> list:
    """Record every file that utils.identity reads in full for a hash."""
    read = []
    real = identity.update_sha256

    def counting(digest, path, *args):
        read.append(Path(path).name)
        return real(digest, path, *args)

    monkeypatch.setattr(identity, "update_sha256", counting)
    return read


def _rewrite_same_size(path: Path, keep_mtime: bool) -> None:
    """Change one code of codes.npy in place (same size); a later mtime, or the old one restored."""
    before = os.stat(path)
    mm = np.load(path, mmap_mode="r+")
    mm[3, 1, 5] = (int(mm[3, 1, 5]) + 1) % 1024
    mm.flush()
    del mm
    mtime = before.st_mtime_ns if keep_mtime else max(os.stat(path).st_mtime_ns, before.st_mtime_ns + 10 ** 9)
    os.utime(path, ns=(before.st_atime_ns, mtime))
    after = os.stat(path)
    assert after.st_size == before.st_size and (after.st_mtime_ns == before.st_mtime_ns) == keep_mtime


def test_code_store_identity_is_cheap_and_refuses_changed_codes(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    codes = rng.integers(0, 1024, size=(9, 2, 16))
    manifest = _write_store(tmp_path / "s", codes, rng.integers(0, 10, size=9))
    path = tmp_path / "s" / "codes.npy"
    assert manifest["codes_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    read = _counting_hashes(monkeypatch)
    h = code_store_hash(tmp_path / "s")
    assert read == [] and len(h) == 64  # a stat, no read of the codes
    assert code_store_hash(tmp_path / "s", verify=True) == h and read == ["codes.npy"]  # full re-hash agrees

    st = os.stat(path)  # a copy without -p: same bytes, new mtime -> re-hashed once, the new stat recorded
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    read.clear()
    assert code_store_hash(tmp_path / "s") == h and read == ["codes.npy"]
    read.clear()
    assert code_store_hash(tmp_path / "s") == h and read == []

    _rewrite_same_size(path, keep_mtime=False)
    with pytest.raises(ValueError, match="changed after its hash was recorded.*re-extract") as e:
        code_store_hash(tmp_path / "s")
    assert "\n" not in str(e.value)


def test_code_store_full_rehash_catches_a_tamper_with_restored_mtime(tmp_path):
    rng = np.random.default_rng(11)
    _write_store(tmp_path / "s", rng.integers(0, 1024, size=(9, 2, 16)), rng.integers(0, 10, size=9))
    h = code_store_hash(tmp_path / "s")
    _rewrite_same_size(tmp_path / "s" / "codes.npy", keep_mtime=True)
    assert code_store_hash(tmp_path / "s") == h  # the cheap check's documented blind spot
    with pytest.raises(ValueError, match="changed after its hash was recorded"):
        code_store_hash(tmp_path / "s", verify=True)
    with open(tmp_path / "s" / "codes.npy", "ab") as f:  # a different size needs no hash to be refused
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="bytes, recorded"):
        code_store_hash(tmp_path / "s")


def test_code_store_identity_refuses_a_manifest_without_a_codes_hash(tmp_path):
    rng = np.random.default_rng(12)
    manifest = _write_store(tmp_path / "s", rng.integers(0, 1024, size=(5, 2, 16)), rng.integers(0, 10, size=5))
    assert len(code_store_hash(tmp_path / "s")) == 64  # precondition: the finalized store has an identity
    unhashed = {k: v for k, v in manifest.items() if k not in ("codes_sha256", "codes_stat")}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(unhashed, indent=2) + "\n")
    open_code_store(tmp_path / "s")  # still opens
    with pytest.raises(ValueError, match="records no codes_sha256; re-extract the code store") as e:
        code_store_hash(tmp_path / "s")
    assert "\n" not in str(e.value) and str(tmp_path / "s") in str(e.value)


def test_code_store_compacts_skipped_rows(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 1024, size=(6, 1, 4))
    labels = np.arange(6)
    keep = np.array([True, False, True, True, False, True])
    manifest = _write_store(tmp_path / "s", codes, labels, keep)
    store = open_code_store(tmp_path / "s")
    assert manifest["count"] == 4 == len(store)
    np.testing.assert_array_equal(store.codes, codes[keep])
    np.testing.assert_array_equal(store.labels, labels[keep])
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_code_store_errors(tmp_path):
    rng = np.random.default_rng(2)
    _write_store(tmp_path / "s", rng.integers(0, 1024, size=(3, 1, 16)), np.zeros(3, dtype=int))
    store = open_code_store(tmp_path / "s")
    for kwargs, pattern in [({"codebook_size": 16384}, "codebook size 1024"), ({"grid": (8, 8)}, "4x4 token grid")]:
        with pytest.raises(ValueError, match=pattern) as e:
            check_code_store(store, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="codebook size 1024, not 512"):
        open_code_store(tmp_path / "s", codebook_size=512)
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        open_code_store(tmp_path / "s")
    with pytest.raises(ValueError, match="uint16"):
        _write_store(tmp_path / "big", rng.integers(0, 9, size=(2, 1, 4)), np.zeros(2, dtype=int),
                     codebook_size=70000)
    writer = CodeStoreWriter.create(tmp_path / "w", 2, 1, 4)
    with pytest.raises(ValueError, match="uint16"):
        writer.write(np.arange(2), np.full((2, 1, 4), 70000), np.zeros(2))
    with pytest.raises(ValueError, match="not a code store"):
        open_code_store(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        open_code_store(tmp_path / "nope")


def _write_llamagen(root: Path, codes: np.ndarray, labels: np.ndarray, name: str = "imagenet256") -> None:
    (root / f"{name}_codes").mkdir(parents=True)
    (root / f"{name}_labels").mkdir()
    for i in range(len(codes)):
        np.save(root / f"{name}_codes" / f"{i}.npy", codes[i:i + 1])  # (1, views, T) int64
        np.save(root / f"{name}_labels" / f"{i}.npy", labels[i:i + 1])  # (1,)


def test_llamagen_identity_samples_files(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(13)
    count = 3 * identity.LLAMAGEN_SAMPLE
    codes = rng.integers(0, 64, size=(count, 1, 4))
    _write_llamagen(tmp_path / "lg", codes, rng.integers(0, 10, size=count))
    read = _counting_hashes(monkeypatch)
    h = code_store_hash(tmp_path / "lg")
    sampled = sorted(int(name[:-4]) for name in read)
    assert len(sampled) == identity.LLAMAGEN_SAMPLE and sampled[0] == 0 and sampled[-1] == count - 1
    assert code_store_hash(tmp_path / "lg", verify=True) == h and "records no hash" in capsys.readouterr().err
    folder = tmp_path / "lg" / "imagenet256_codes"
    unsampled = next(i for i in range(count) if i not in sampled)
    np.save(folder / f"{unsampled}.npy", (codes[unsampled:unsampled + 1] + 1) % 64)
    assert code_store_hash(tmp_path / "lg") == h  # the documented limit: unsampled files are not read
    np.save(folder / f"{sampled[1]}.npy", (codes[sampled[1]:sampled[1] + 1] + 1) % 64)
    changed = code_store_hash(tmp_path / "lg")
    assert changed != h
    np.save(folder / f"{count}.npy", codes[:1])  # one more image
    assert code_store_hash(tmp_path / "lg") not in (h, changed)


def test_llamagen_layout(tmp_path):
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 64, size=(5, 2, 16))
    labels = rng.integers(0, 10, size=5)
    _write_llamagen(tmp_path / "lg", codes, labels)
    store = open_code_store(tmp_path / "lg", codebook_size=64)
    assert store.layout == "llamagen" and store.codes.shape == (5, 2, 16) and len(store) == 5
    assert (store.grid, store.codebook_size, store.num_views, store.image_size) == ((4, 4), 64, 2, 256)
    np.testing.assert_array_equal(np.asarray(store.codes), codes)
    np.testing.assert_array_equal(np.asarray(store.labels), labels)
    np.testing.assert_array_equal(store.codes[3, 1], codes[3, 1])
    np.testing.assert_array_equal(store.codes[1:4], codes[1:4])
    assert int(store.labels[-1]) == labels[-1]
    check_code_store(store, codebook_size=64, grid=(4, 4))
    h = code_store_hash(tmp_path / "lg")
    codes[2, 0, 0] = (codes[2, 0, 0] + 1) % 64
    np.save(tmp_path / "lg" / "imagenet256_codes" / "2.npy", codes[2:3])
    assert code_store_hash(tmp_path / "lg") != h
    np.testing.assert_array_equal(CodeDataset(store)[2][0], codes[2, CodeDataset(store).view_index(2)])

    with pytest.raises(ValueError, match="codebook size"):
        open_code_store(tmp_path / "lg")
    with pytest.raises(ValueError, match="outside"):
        open_code_store(tmp_path / "lg", codebook_size=8)
    _write_llamagen(tmp_path / "rect", rng.integers(0, 64, size=(2, 1, 12)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="square"):
        open_code_store(tmp_path / "rect", codebook_size=64)
    _write_llamagen(tmp_path / "gap", codes, labels)
    (tmp_path / "gap" / "imagenet256_codes" / "3.npy").unlink()
    with pytest.raises(ValueError, match="numbered"):
        open_code_store(tmp_path / "gap", codebook_size=64)


# ---------------------------------------------------------------- CodeDataset

def test_code_dataset_views(tmp_path):
    rng = np.random.default_rng(4)
    n, views, t = 40, 4, 16
    codes = rng.integers(0, 1024, size=(n, views, t))
    labels = rng.integers(0, 10, size=n)
    _write_store(tmp_path / "s", codes, labels)
    store = open_code_store(tmp_path / "s")
    entropies = (codes / 100).astype(np.float16)  # tied to the codes, so the view can be checked

    a, b = CodeDataset(store, seed=3, entropies=entropies), CodeDataset(open_code_store(tmp_path / "s"), seed=3)
    views_a = [a.view_index(i) for i in range(n)]
    assert views_a == [b.view_index(i) for i in range(n)]
    assert len(set(views_a)) > 1
    for i in range(n):
        c, y, e = a[i]
        v = views_a[i]
        assert c.dtype == torch.int64 and c.shape == (t,) and y.dtype == torch.int64 and e.dtype == torch.float32
        np.testing.assert_array_equal(c.numpy(), codes[i, v])
        assert int(y) == labels[i]
        np.testing.assert_array_equal(e.numpy(), entropies[i, v].astype(np.float32))
        c2, y2 = b[i]
        assert torch.equal(c, c2) and torch.equal(y, y2)
    a.set_epoch(1)
    assert [a.view_index(i) for i in range(n)] != views_a
    a.set_epoch(0)
    assert [a.view_index(i) for i in range(n)] == views_a
    assert [CodeDataset(store, seed=4).view_index(i) for i in range(n)] != views_a
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=8)))
    assert [x.shape for x in batch] == [(8, t), (8,), (8, t)]
    with pytest.raises(ValueError, match="entropies"):
        CodeDataset(store, entropies=entropies[:, :1])

    batched = a.__getitems__([5, 0, 39, 5])  # the DataLoader's batched fetch (prefetched reads)
    for i, item in zip([5, 0, 39, 5], batched):
        assert all(torch.equal(x, y) for x, y in zip(item, a[i]))

    _write_store(tmp_path / "one", codes[:, :1], labels)
    one = CodeDataset(open_code_store(tmp_path / "one"), seed=3)
    one.set_epoch(5)
    assert all(one.view_index(i) == 0 for i in range(n))
    np.testing.assert_array_equal(one[7][0].numpy(), codes[7, 0])


def test_manifest_is_json_and_written_last(tmp_path):
    rng = np.random.default_rng(5)
    writer = CodeStoreWriter.create(tmp_path / "s", 2, 1, 4)
    writer.write(np.arange(2), rng.integers(0, 16, size=(2, 1, 4)), np.zeros(2))
    writer.flush()
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(ValueError, match="lacks"):
        writer.finalize({"image_size": 32})
    assert not (tmp_path / "s" / "manifest.json").exists()
    writer.finalize({"image_size": 32, "grid_height": 2, "grid_width": 2, "codebook_size": 16,
                     "num_views": 1, "tokenizer_hash": "x", "count": 99})
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["format_version"] == 1


def _vm_flags(path: Path) -> list[str]:
    """VmFlags of this process's mappings of path (Linux /proc/self/smaps)."""
    flags, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            current = fields[-1] if len(fields) >= 6 else None
        elif line.startswith("VmFlags:") and current == str(path):
            flags.append(line)
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
def test_code_dataset_advises_random_reads(tmp_path):
    rng = np.random.default_rng(14)
    codes = rng.integers(0, 1024, size=(6, 2, 16))
    _write_store(tmp_path / "s", codes, rng.integers(0, 10, size=6))
    np.save(tmp_path / "entropy.npy", rng.random((6, 2, 16)).astype(np.float16))
    store = open_code_store(tmp_path / "s")
    entropies = np.load(tmp_path / "entropy.npy", mmap_mode="r")
    codes_file, entropy_file = (tmp_path / "s" / "codes.npy").resolve(), (tmp_path / "entropy.npy").resolve()
    assert _vm_flags(codes_file) and not any(" rr" in f for f in _vm_flags(codes_file))  # precondition
    dataset = CodeDataset(store, seed=0, entropies=entropies)
    assert all(" rr" in f for f in _vm_flags(codes_file) + _vm_flags(entropy_file)) and _vm_flags(entropy_file)
    np.testing.assert_array_equal(dataset[4][0], codes[4, dataset.view_index(4)])


def test_item_pages_cover_the_items(tmp_path):
    """The pages a batch's prefetch asks for hold exactly the bytes its items are read from."""
    rng = np.random.default_rng(11)
    n, views, t = 300, 3, 576  # items of 1152 bytes: many straddle a page boundary
    codes = rng.integers(0, 16384, size=(n, views, t))
    _write_store(tmp_path / "s", codes, rng.integers(0, 10, size=n), codebook_size=16384)
    array = open_code_store(tmp_path / "s").codes
    items = np.stack([rng.integers(0, n, 64), rng.integers(0, views, 64)], axis=1)
    pages = item_pages(array, items)
    assert len({start for start, _ in pages}) == len(pages) and all(s % mmap.PAGESIZE == 0 for s, _ in pages)
    straddling = 0
    for i, v in items:
        data = codes[i, v].astype(np.uint16).tobytes()
        holding = [(s, l) for s, l in pages if data in array.base[s:s + l]]
        assert holding, f"item ({i}, {v}) is in none of the prefetched pages"
        first = array.offset % mmap.ALLOCATIONGRANULARITY + array.strides[0] * i + array.strides[1] * v
        straddling += first // mmap.PAGESIZE != (first + len(data) - 1) // mmap.PAGESIZE
    assert straddling > 0  # the precondition: some items cross a page boundary
    assert item_pages(array, items[:0]) == []



# ---------------------------------------------------------------- refused inputs

def test_code_store_refuses_codes_outside_the_codebook_at_write_and_open(tmp_path, monkeypatch):
    rng = np.random.default_rng(21)
    codes = rng.integers(0, 64, size=(9, 2, 16))
    manifest = _write_store(tmp_path / "s", codes, rng.integers(0, 5, size=9), codebook_size=64)
    assert manifest["max_code"] == codes.max() and open_code_store(tmp_path / "s").manifest["max_code"] < 64
    stored = np.load(tmp_path / "s" / "codes.npy", mmap_mode="r+")
    stored[6, 1, 3] = 64  # a code >= the codebook size, as a bad tokenizer or a damaged file leaves it
    stored[8, 0, 0] = 100
    stored.flush()
    del stored
    with pytest.raises(ValueError) as e:
        open_code_store(tmp_path / "s")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "s") in message and "image 6 holds code 64" in message

    # a store too large to scan on every open trusts the recorded max_code, which the scan at finalize set
    monkeypatch.setattr(code_store_module, "SCAN_ON_OPEN_BYTES", 0)
    with pytest.raises(ValueError, match="image 3 holds code 70"):
        _write_store(tmp_path / "t", np.where(np.arange(9)[:, None, None] == 3, 70, codes), np.zeros(9, int),
                     codebook_size=64)
    manifest_path = tmp_path / "u" / "manifest.json"
    _write_store(tmp_path / "u", codes, np.zeros(9, int), codebook_size=64)
    open_code_store(tmp_path / "u")
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "max_code": 64}))
    with pytest.raises(ValueError, match="records code 64, outside the codebook 0..63"):
        open_code_store(tmp_path / "u")

    # max_code is derived from the codes (which codes_sha256 covers): the identity ignores it, so a
    # store has the identity that the manifest without it had (entropies scored before still fit)
    with_max = code_store_hash(tmp_path / "u")
    manifest_path.write_text(json.dumps({k: v for k, v in json.loads(manifest_path.read_text()).items()
                                         if k != "max_code"}))
    assert code_store_hash(tmp_path / "u") == with_max
    open_code_store(tmp_path / "u")  # without a record, the codes are scanned: they fit
    assert code_store_hash(tmp_path / "u") == with_max

    writer = CodeStoreWriter.create(tmp_path / "w", 4, 1, 4, codebook_size=32)
    with pytest.raises(ValueError, match=r"image 2 holds code 32, outside the codebook 0..31"):
        writer.write(np.array([0, 2, 3]), np.array([[[1, 2, 3, 4]], [[5, 32, 0, 0]], [[0, 0, 0, 40]]]), np.zeros(3))


def test_llamagen_layout_scans_every_file_for_codes_outside_the_codebook(tmp_path):
    rng = np.random.default_rng(22)
    codes = rng.integers(0, 64, size=(7, 1, 16))
    codes[5, 0, 9] = 64
    _write_llamagen(tmp_path / "lg", codes, rng.integers(0, 3, size=7))
    with pytest.raises(ValueError) as e:
        open_code_store(tmp_path / "lg", codebook_size=64)
    assert "\n" not in str(e.value) and "image 5 holds code 64" in str(e.value) and "5.npy" in str(e.value)
    assert open_code_store(tmp_path / "lg", codebook_size=65).codes.shape == (7, 1, 16)
    bad = codes[2:3].astype(np.int32)  # another header than file 0's: read through np.load
    bad[0, 0, 15] = 65
    np.save(tmp_path / "lg" / "imagenet256_codes" / "2.npy", bad)
    with pytest.raises(ValueError, match="image 2 holds code 65"):
        open_code_store(tmp_path / "lg", codebook_size=65)


def test_code_store_files_are_preallocated_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno
    writer = CodeStoreWriter.create(tmp_path / "s", 300, 2, 256)
    stat = os.stat(tmp_path / "s" / "codes.npy")
    assert stat.st_blocks * 512 >= stat.st_size > 300 * 2 * 256 * 2  # every block is reserved: not sparse
    del writer
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError) as e:
        CodeStoreWriter.create(tmp_path / "t", 1000, 10, 256)
    assert str(e.value) == (f"no space left on device for {tmp_path / 't' / 'codes.npy'} (needs 5.12 MB): "
                            f"free space and rerun")
    assert calls and not (tmp_path / "t" / "codes.npy").exists()  # the failed attempt holds no space


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_imagefolder_refuses_an_empty_class_folder(toy, tmp_path):
    root = tmp_path / "folder"
    good = np.random.default_rng(0).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    for name in ("a", "c"):
        _png(root / name / "0.png", good)
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError) as e:
        list_image_folder(root)
    assert "\n" not in str(e.value) and f"class folder {root / 'b'} holds no images" in str(e.value)
    (root / "b" / "0.png").write_bytes((root / "a" / "0.png").read_bytes())
    classes, samples = list_image_folder(root)
    assert classes == ["a", "b", "c"] and [label for _, label in samples] == [0, 1, 2]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(5)
    wide = rng.integers(0, 65536, size=(24, 30)).astype(np.uint16)
    wide[0, :4] = [0, 128, 129, 65535]  # the rounding edges: 128/257 < 0.5 < 129/257
    path = _png(tmp_path / "folder" / "a" / "g16.png", wide)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # the precondition: PIL reads it as 16-bit
    rgb = np.asarray(load_rgb(path))
    expected = np.floor(wide.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # float64 reference
    assert rgb.shape == (24, 30, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert rgb[0, :4, 0].tolist() == [0, 0, 1, 255] and 100 < rgb.mean() < 155  # not all white
    x, _, _, error = CheckedImageFolderDataset(tmp_path / "folder", to_tensor)[0]  # what extraction reads
    assert error == ""
    torch.testing.assert_close(x, torch.from_numpy(expected).float().div(255).mul(2).sub(1).expand(3, -1, -1))
    flat = tmp_path / "f.tif"
    Image.fromarray(rng.random((20, 20)).astype(np.float32)).save(flat)
    with pytest.raises(ValueError) as e:
        load_rgb(flat)
    assert "\n" not in str(e.value) and str(flat) in str(e.value) and "floating-point" in str(e.value)
    assert image_problem(flat, 16) and "floating-point" in image_problem(flat, 16)


def test_images_too_small_for_the_crop_are_named(tmp_path):
    rng = np.random.default_rng(6)
    tiny = _png(tmp_path / "tiny.png", rng.integers(0, 256, size=(1, 1, 3), dtype=np.uint8))
    small = _png(tmp_path / "small.png", rng.integers(0, 256, size=(31, 90, 3), dtype=np.uint8))
    enough = _png(tmp_path / "enough.png", rng.integers(0, 256, size=(90, 32, 3), dtype=np.uint8))
    assert min_image_side(256) == 32 and min_image_side(100) == 13
    message = image_problem(tiny, 256)
    assert str(tiny) in message and "1x1" in message and "\n" not in message
    assert "90x31" in image_problem(small, 256) and image_problem(small, 248) is None
    assert image_problem(enough, 256) is None
    assert image_problem(tmp_path / "missing.png", 256) is None  # unreadable: reported when decoded
