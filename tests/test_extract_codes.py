"""extract_codes.py: ImageFolder -> code store with a tiny random VQ."""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.augmentation import center_crop_arr
from dataset.code_store import check_code_store, open_code_store
from dataset.synthetic import generate_dataset
from extract_codes import ExtractConfig, extract_codes, main
from tokenizer.vq_model import VQ_models, load_vq_checkpoint
from utils.identity import code_store_hash, file_sha256

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # tiny VQ below downsamples by 4: 8x8 grid


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("extract")
    data = tmp / "data"
    generate_dataset(data, classes=2, per_class=3, size=SIZE, seed=0)
    (data / "00_disc" / "x.png").write_bytes(b"\x89PNG garbage, not an image")
    torch.manual_seed(0)
    vq = VQ_models["VQ-16"](ch=16, ch_mult=[1, 2, 2], z_channels=16, codebook_size=64, codebook_embed_dim=8,
                            norm_groups=8)
    ckpt = tmp / "vq.pt"
    torch.save({"model": vq.state_dict(),
                "args": {"vq_model": "VQ-16", "model_config": dataclasses.asdict(vq.config)}}, ckpt)
    return {"tmp": tmp, "data": data, "ckpt": ckpt}


def _config(setup, code_path: Path, **kwargs) -> ExtractConfig:
    return ExtractConfig(data_path=str(setup["data"]), code_path=str(code_path), vq_ckpt=str(setup["ckpt"]),
                         vq_model="VQ-16", image_size=SIZE, batch_size=16, num_workers=0, **kwargs)


def _good_images(data: Path) -> list[tuple[Path, int]]:
    """Readable images in ImageFolder order with their labels (x.png is the corrupt one)."""
    return [(data / c / f"{i}.png", k) for k, c in enumerate(["00_disc", "01_square"]) for i in range(3)]


def _pixels(pil_image: Image.Image) -> torch.Tensor:
    """Reference preprocessing: uint8 HWC -> (3, H, W) in [-1, 1] via Normalize(0.5, 0.5)."""
    x = torch.tensor(np.asarray(pil_image), dtype=torch.float32).permute(2, 0, 1) / 255.0
    return (x - 0.5) / 0.5


def test_extract_center_and_flip(setup):
    cfg = _config(setup, setup["tmp"] / "codes", flip=True)
    vq = load_vq_checkpoint(cfg.vq_ckpt, cfg.vq_model)
    manifest = extract_codes(cfg, vq, file_sha256(cfg.vq_ckpt))
    store = open_code_store(cfg.code_path)
    assert manifest == store.manifest
    assert (manifest["count"], manifest["source_count"], manifest["num_views"]) == (6, 7, 2)
    assert manifest["views"] == ["center", "flip_center"]
    assert [s["path"] for s in manifest["skipped"]] == ["00_disc/x.png"] and manifest["skipped"][0]["index"] == 3
    assert manifest["tokenizer_hash"] == file_sha256(setup["ckpt"])
    codes_file = Path(cfg.code_path) / "codes.npy"  # hashed once, after the skipped rows were dropped
    assert manifest["codes_sha256"] == file_sha256(codes_file)
    assert manifest["codes_stat"] == {"size": codes_file.stat().st_size, "mtime_ns": codes_file.stat().st_mtime_ns}
    assert code_store_hash(cfg.code_path, verify=True) == code_store_hash(cfg.code_path)
    assert manifest["tokenizer"] == "VQ-16 layout, downsample 4" and manifest["downsample_factor"] == 4
    check_code_store(store, codebook_size=64, grid=8)

    good = _good_images(setup["data"])
    x = torch.stack([_pixels(center_crop_arr(Image.open(p).convert("RGB"), SIZE)) for p, _ in good])  # (6, 3, S, S)
    views = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # (12, 3, S, S) in the store's order
    expected = vq.encode_to_indices(views).reshape(6, 2, 64).numpy()
    np.testing.assert_array_equal(store.codes, expected)
    np.testing.assert_array_equal(store.labels, [k for _, k in good])
    assert not np.array_equal(store.codes[:, 0], store.codes[:, 1])  # the flip view is a different view
    assert len(np.unique(store.codes)) > 4


def test_extract_ten_crop_matches_torchvision(setup):
    import torchvision.transforms.functional as TF
    cfg = _config(setup, setup["tmp"] / "ten", ten_crop=True, crop_range=1.25)
    vq = load_vq_checkpoint(cfg.vq_ckpt, cfg.vq_model)
    manifest = extract_codes(cfg, vq, "h")
    store = open_code_store(cfg.code_path)
    assert manifest["num_views"] == 10 and manifest["views"][4] == "center" and manifest["views"][9] == "flip_center"
    crops = [TF.ten_crop(center_crop_arr(Image.open(p).convert("RGB"), 40), [SIZE, SIZE])
             for p, _ in _good_images(setup["data"])]
    x = torch.stack([_pixels(c) for cs in crops for c in cs])  # (60, 3, S, S)
    np.testing.assert_array_equal(store.codes, vq.encode_to_indices(x).reshape(6, 10, 64).numpy())


def test_extract_config_errors(setup, tmp_path):
    def message(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert isinstance(e.value.code, str) and "\n" not in e.value.code
        return e.value.code

    base = ["--data-path", str(setup["data"]), "--vq-ckpt", str(setup["ckpt"]), "--image-size", str(SIZE),
            "--num-workers", "0"]
    assert "VQ-16 tokenizer but VQ-8" in message(base + ["--code-path", str(tmp_path / "a"), "--vq-model", "VQ-8"])
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.load(setup["ckpt"], weights_only=True)["model"]}, bare)  # no config: default VQ-16
    assert "checkpoint" in message(["--data-path", str(setup["data"]), "--vq-ckpt", str(bare),
                                    "--code-path", str(tmp_path / "b")])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "cannot read" in message(base[:2] + ["--vq-ckpt", str(tmp_path / "junk.pt"), "--code-path",
                                                str(tmp_path / "c")])
    assert "drop --flip" in message(base + ["--code-path", str(tmp_path / "d"), "--ten-crop", "--flip"])
    (tmp_path / "empty").mkdir()
    assert "no class folders" in message(["--data-path", str(tmp_path / "empty"), "--vq-ckpt", str(setup["ckpt"]),
                                          "--code-path", str(tmp_path / "e")])
    done = tmp_path / "done"
    main(base + ["--code-path", str(done)])
    assert "already exists" in message(base + ["--code-path", str(done)])
    assert not (tmp_path / "a").exists()


def test_cli_errors_are_one_line(setup, tmp_path):
    """Run the script: a missing folder and an image size the VQ cannot tile stop with one line."""
    cases = {
        "not found": ["--data-path", str(tmp_path / "missing"), "--image-size", str(SIZE)],
        "not divisible": ["--data-path", str(setup["data"]), "--image-size", "30"],
    }
    procs = {key: subprocess.Popen([sys.executable, "extract_codes.py", *argv, "--vq-ckpt", str(setup["ckpt"]),
                                    "--code-path", str(tmp_path / key)],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, argv in cases.items()}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err and key in lines[0], err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_match_single_process(setup):
    single = setup["tmp"] / "single"
    args = ["--data-path", str(setup["data"]), "--vq-ckpt", str(setup["ckpt"]), "--image-size", str(SIZE),
            "--flip", "--num-workers", "0", "--batch-size", "2"]
    main(args + ["--code-path", str(single)])
    multi = setup["tmp"] / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                           "extract_codes.py", *args, "--code-path", str(multi)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = open_code_store(single), open_code_store(multi)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert {k: v for k, v in json.loads((multi / "manifest.json").read_text()).items() if k != "codes_stat"} == \
        {k: v for k, v in {**a.manifest, "data_path": str(setup["data"])}.items() if k != "codes_stat"}
    assert code_store_hash(single) == code_store_hash(multi)
    assert a.manifest["skipped"][0]["path"] == "00_disc/x.png"


# ---------------------------------------------------------------- refusals, full disk, interrupts

def _argv(setup, code_path: Path, data: Path | None = None) -> list[str]:
    return ["--data-path", str(data or setup["data"]), "--vq-ckpt", str(setup["ckpt"]), "--image-size", str(SIZE),
            "--num-workers", "0", "--code-path", str(code_path)]


def _one_line_exit(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code and "Traceback" not in e.value.code
    return e.value.code


def test_images_the_crop_cannot_represent_stop_extraction_before_it_starts(setup, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(1, 1, 3), dtype=np.uint8)).save(data / "01_square" / "tiny.png")
    Image.fromarray(rng.integers(0, 256, size=(3, 9, 3), dtype=np.uint8)).save(data / "00_disc" / "small.png")
    message = _one_line_exit(_argv(setup, tmp_path / "codes", data))
    assert f"{data / '00_disc' / 'small.png'} is 9x3: too small for a {SIZE} px crop" in message
    assert "(1 more image refused)" in message
    assert not (tmp_path / "codes" / "codes.npy").exists()  # refused before the store was created
    (data / "00_disc" / "small.png").unlink()
    (data / "01_square" / "tiny.png").unlink()
    (data / "02_empty").mkdir()
    assert f"class folder {data / '02_empty'} holds no images" in _one_line_exit(_argv(setup, tmp_path / "c2", data))


def test_tokenizer_codes_outside_its_codebook_name_the_image(setup, tmp_path, monkeypatch):
    cfg = _config(setup, tmp_path / "codes")
    vq = load_vq_checkpoint(cfg.vq_ckpt, cfg.vq_model)
    encode = vq.encode_to_indices

    def broken(images):  # the third image of the folder gets a code one past the codebook
        codes = encode(images)
        codes[2 if len(codes) > 2 else 0, 1, 1] = vq.config.codebook_size
        return codes

    monkeypatch.setattr(vq, "encode_to_indices", broken)
    with pytest.raises(ValueError) as e:
        extract_codes(cfg, vq, "h")
    assert "\n" not in str(e.value) and "code 64 for image 00_disc/2.png, outside its codebook 0..63" in str(e.value)
    assert not (tmp_path / "codes" / "manifest.json").exists()


def test_full_disk_is_one_line_at_store_creation(setup, tmp_path, monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    message = _one_line_exit(_argv(setup, tmp_path / "codes"))
    codes = tmp_path / "codes" / "codes.npy"
    assert message.startswith(f"extract_codes.py: error: no space left on device for {codes}")
    # 7 images x 1 view x 64 uint16 codes (896 bytes) after the .npy header (128 bytes)
    assert message.endswith("(needs 1.02 kB): free space and rerun")
    assert not (tmp_path / "codes" / "codes.npy").exists()


def test_interrupted_extraction_says_a_rerun_starts_over(setup, tmp_path, monkeypatch, capsys):
    import extract_codes as module
    encode_block = module._encode_block

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_encode_block", interrupted)
    with pytest.raises(SystemExit) as e:
        main(_argv(setup, tmp_path / "codes"))
    assert e.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "rerun the same command" in lines[0]
    with pytest.raises(ValueError, match="incomplete"):
        open_code_store(tmp_path / "codes")
    monkeypatch.setattr(module, "_encode_block", encode_block)
    main(_argv(setup, tmp_path / "codes"))
    reference = tmp_path / "reference"
    main(_argv(setup, reference))
    np.testing.assert_array_equal(open_code_store(tmp_path / "codes").codes, open_code_store(reference).codes)
