"""VQ tokenizer: LlamaGen compatibility vectors, layout of the released VQ-16, loader, trainer."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llamagen_fixtures import rule_state_dict
from tokenizer.train_vq import learning_rate, main as train_main, restart_dead_codes
from tokenizer.vq_model import VQ_models, VQModel, load_vq_checkpoint, vq_config

FIXTURES = Path(__file__).parent / "fixtures" / "llamagen"
TINY = dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, codebook_size=32, codebook_embed_dim=4,
            norm_groups=8)


@pytest.fixture(scope="module")
def narrow():
    """(fixture dict, loaded VQ-16 at the fixture's reduced width)."""
    fx = torch.load(FIXTURES / "vq16_narrow.pt", weights_only=True)
    cfg = fx["config"]
    assert cfg["encoder_ch_mult"] == cfg["decoder_ch_mult"] == [1, 1, 2, 2, 4]
    model = VQ_models["VQ-16"](ch=cfg["ch"], z_channels=cfg["z_channels"], codebook_size=cfg["codebook_size"],
                               codebook_embed_dim=cfg["codebook_embed_dim"], num_res_blocks=cfg["num_res_blocks"])
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [(k, tuple(s)) for k, s in fx["keys"]]
    model.load_state_dict(rule_state_dict(fx["keys"]), strict=True)
    return fx, model.eval()


def test_narrow_fixture_indices_and_decoding(narrow):
    fx, model = narrow
    indices = model.encode_to_indices(fx["images"])
    assert indices.dtype == torch.int64 and indices.shape == (2, 4, 4)
    assert torch.equal(indices, fx["indices"])
    with torch.no_grad():
        quant, losses, enc_indices = model.encode(fx["images"])
        flat = model.decode_code(fx["indices"].flatten(1), shape=(2, 8, 4, 4))  # LlamaGen call style
        grid = model.decode_code(fx["indices"])
        straight_through = model.decode(quant)
    assert torch.equal(enc_indices, fx["indices"])
    torch.testing.assert_close(flat, fx["decoded_from_indices"], atol=1e-5, rtol=0)
    torch.testing.assert_close(grid, fx["decoded_from_indices"], atol=1e-5, rtol=0)
    torch.testing.assert_close(straight_through, fx["decoded_from_indices"], atol=1e-4, rtol=0)
    assert all(torch.isfinite(v) and v >= 0 for v in losses)


def test_full_width_layout_matches_released_vq16():
    lines = (FIXTURES / "vq16_full_keys.txt").read_text().splitlines()
    count, total = map(int, lines[1].split())
    with torch.device("meta"):
        model = VQ_models["VQ-16"]()
    state = model.state_dict()
    assert [f"{k} {tuple(v.shape)}" for k, v in state.items()] == lines[2:]
    assert len(state) == count and sum(v.numel() for v in state.values()) == total
    assert model.downsample_factor == 16 and model.config.codebook_size == 16384


def test_registry_downsample_and_overrides():
    assert vq_config("VQ-16").downsample_factor == 16
    assert vq_config("VQ-8").downsample_factor == 8
    assert vq_config("VQ-16", ch_mult=[1, 2, 2]).downsample_factor == 4
    assert vq_config("VQ-8", codebook_size=512, dropout=0.1).codebook_size == 512
    with pytest.raises(ValueError, match="norm_groups"):
        vq_config("VQ-16", ch=16)  # GroupNorm(32) cannot split 16 channels


def test_encode_to_indices_matches_float64_nearest_code():
    torch.manual_seed(0)
    model = VQ_models["VQ-16"](**TINY).eval()
    assert model.downsample_factor == 4
    images = torch.rand(2, 3, 32, 24) * 2 - 1
    indices = model.encode_to_indices(images)
    assert indices.dtype == torch.int64 and indices.shape == (2, 8, 6)
    with torch.no_grad():
        latent = model.quant_conv(model.encoder(images)).double()  # (2, 4, 8, 6)
    codes = F.normalize(model.quantize.embedding.weight.double(), dim=-1)
    for b in range(2):
        for r in range(8):
            for c in range(6):
                z = F.normalize(latent[b, :, r, c], dim=0)
                assert indices[b, r, c] == torch.argmin(((codes - z) ** 2).sum(1))
    assert torch.unique(indices).numel() > 1
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode_to_indices(torch.rand(1, 3, 30, 32))


def save_narrow(tmp_path: Path, fx: dict, wrap: str) -> Path:
    state = rule_state_dict(fx["keys"])
    if wrap == "bare":
        obj = state
    elif wrap == "model":
        obj = {"model": state, "steps": 10}
    else:  # LlamaGen's training script pickles its argparse.Namespace next to the weights
        obj = {"model": state, "args": argparse.Namespace(vq_model="VQ-16", codebook_size=64)}
    path = tmp_path / f"{wrap}.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["bare", "model", "llamagen_namespace"])
def test_loader_accepts_state_dict_layouts(narrow, tmp_path, wrap):
    fx, _ = narrow
    path = save_narrow(tmp_path, fx, wrap)
    model = load_vq_checkpoint(path, "VQ-16", ch=32, z_channels=32, codebook_size=64)
    assert not model.training
    assert torch.equal(model.encode_to_indices(fx["images"]), fx["indices"])


def test_loader_rejects_mismatches_in_one_line(narrow, tmp_path):
    fx, _ = narrow
    path = save_narrow(tmp_path, fx, "model")
    with pytest.raises(ValueError) as err:
        load_vq_checkpoint(path, "VQ-16", ch=32, z_channels=32, codebook_size=128)
    assert str(err.value) == "checkpoint codebook is 64x8 but VQ-16 config expects 128x8"
    with pytest.raises(ValueError) as err:
        load_vq_checkpoint(path, "VQ-8", ch=32, z_channels=32, codebook_size=64)
    assert str(err.value).startswith("checkpoint is not a VQ-8 state dict: ") and "\n" not in str(err.value)
    with pytest.raises(ValueError) as err:
        load_vq_checkpoint(path, "VQ-16", ch=64, z_channels=32, codebook_size=64)
    assert "encoder.conv_in.weight" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        load_vq_checkpoint(tmp_path / "missing.pt", "VQ-16")
    with pytest.raises(ValueError, match="unknown VQ model"):
        load_vq_checkpoint(path, "VQ-32")


def write_image_folder(root: Path, count: int, size: int, seed: int) -> Path:
    """Random blocky RGB images in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size + 8, size), Image.NEAREST).save(folder / f"{i}.png")
    return root


def train_flags(data: Path, out: Path) -> list[str]:
    return ["--data-path", str(data), "--results-dir", str(out), "--vq-model", "VQ-16", "--image-size", "32",
            "--ch", "16", "--ch-mult", "1", "2", "2", "--num-res-blocks", "1", "--z-channels", "16",
            "--codebook-size", "32", "--codebook-embed-dim", "4", "--norm-groups", "8", "--max-steps", "3",
            "--global-batch-size", "4", "--lr", "1e-3", "--seed", "3", "--log-every", "2", "--ckpt-every", "2",
            "--eval-images", "6", "--device", "cpu"]


def test_trainer_runs_saves_and_reports(tmp_path):
    data = write_image_folder(tmp_path / "images", count=8, size=32, seed=0)
    train_main(train_flags(data, tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "final.pt"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["0000002.pt", "final.pt"]  # no temporaries left
    raw = torch.load(ckpt, weights_only=True)
    assert raw["step"] == 3 and raw["args"]["vq_model"] == "VQ-16"
    assert raw["args"]["model_config"]["ch_mult"] == [1, 2, 2]
    model = load_vq_checkpoint(ckpt, "VQ-16")
    assert isinstance(model, VQModel) and model.config.codebook_size == 32 and model.downsample_factor == 4
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw["model"][name])
    recorded = model.quantize.codebook_used[-3 * 4 * 64:]  # 3 steps x 4 images x 8*8 codes, LlamaGen's history
    assert recorded.unique().numel() >= 2 and recorded.max() < 32

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["psnr"]) and metrics["psnr"] > 0
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["codes_used"] >= 1 and metrics["num_images"] == 6
    assert [h["step"] for h in metrics["train"]] == [2, 3]
    assert all(math.isfinite(h["loss"]) and 0 < h["codebook_usage"] <= 1 for h in metrics["train"])

    train_main(train_flags(data, tmp_path / "again"))  # same seed, same data -> same weights on CPU
    again = torch.load(tmp_path / "again" / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(again[k], raw["model"][k]) for k in raw["model"])


@pytest.mark.parametrize("change, message", [
    ({"--data-path": "missing"}, "is not a directory"),
    ({"--image-size": "30"}, "--image-size 30 is not divisible by the downsample factor 4"),
])
def test_trainer_one_line_errors(tmp_path, capsys, change, message):
    data = write_image_folder(tmp_path / "images", count=4, size=32, seed=1)
    flags = train_flags(data, tmp_path / "run")
    for flag, value in change.items():
        flags[flags.index(flag) + 1] = str(tmp_path / value) if flag == "--data-path" else value
    with pytest.raises(SystemExit) as exit_info:
        train_main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_vq_learning_rate_warmup_and_cosine():
    args = argparse.Namespace(lr=2e-3, min_lr=1e-4, warmup_steps=4, lr_schedule="cosine")
    total = 20
    rates = [learning_rate(step, total, args) for step in range(total)]
    assert rates[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])  # linear warmup to lr
    for step in range(4, total):  # plain-formula reference in float64
        progress = (step - 4) / (total - 4)
        assert rates[step] == pytest.approx(1e-4 + 0.5 * (2e-3 - 1e-4) * (1 + math.cos(math.pi * progress)))
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))  # monotone decay after warmup
    args.lr_schedule = "constant"
    assert [learning_rate(s, total, args) for s in range(4, total)] == [2e-3] * (total - 4)


def test_restart_dead_codes_moves_only_unused_codes_onto_batch_latents():
    torch.manual_seed(0)
    model = VQ_models["VQ-16"](ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, codebook_size=32,
                               codebook_embed_dim=4, norm_groups=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    loss = model(images).reconstruction.square().mean() + model(images).losses.vq_loss
    loss.backward()
    optimizer.step()
    weight = model.quantize.embedding.weight
    before = weight.detach().clone()
    moments = {k: v.clone() for k, v in optimizer.state[weight].items() if v.shape == weight.shape}
    assert moments and all(v.abs().sum() > 0 for v in moments.values())  # precondition: non-zero moments
    used = torch.rand(32, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < used.sum() < 32  # precondition: some live and some dead codes
    moved = restart_dead_codes(model, optimizer, images, used, torch.Generator().manual_seed(2))
    assert moved == int((~used).sum())
    assert torch.equal(weight[used], before[used])  # live codes and their moments untouched
    for k, v in optimizer.state[weight].items():
        if v.shape == weight.shape:
            assert torch.equal(v[used], moments[k][used]) and not v[~used].any()
    with torch.no_grad():
        latents = model.quantize.normalised_latent(model._latent(images)).reshape(-1, 4).double()  # (3*4*4, 4)
    distance = torch.cdist(weight[~used].detach().double(), latents).min(dim=1).values
    assert distance.max() < 1e-6  # every dead code now sits on a latent of the batch
    assert not torch.isclose(weight[~used], before[~used]).all()


def test_trainer_restarts_dead_codes_and_logs_the_schedule(tmp_path):
    data = write_image_folder(tmp_path / "images", count=8, size=32, seed=0)
    flags = train_flags(data, tmp_path / "run")
    flags[flags.index("--max-steps") + 1] = "4"
    train_main(flags + ["--lr-schedule", "cosine", "--warmup-steps", "1", "--min-lr", "1e-5",
                        "--restart-dead-every", "2"])
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["codes_restarted"] > 0  # 32 codes, few chosen in two steps of random blocks
    assert history[1]["codes_restarted"] == 0  # no restart at the last step
    assert history[1]["lr"] == pytest.approx(learning_rate(3, 4, argparse.Namespace(
        lr=1e-3, min_lr=1e-5, warmup_steps=1, lr_schedule="cosine")))


def test_trainer_reads_sixteen_bit_pngs_faithfully(tmp_path):
    from tokenizer.train_vq import image_folder
    wide = np.random.default_rng(9).integers(0, 65536, size=(40, 48)).astype(np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(wide).save(tmp_path / "a" / "g16.png")
    x, label = image_folder(str(tmp_path), 32, False, "--data-path")[0]
    assert label == 0 and x.shape == (3, 32, 32)
    assert x.max() < 1 and -0.5 < x.mean() < 0.5  # not clipped to white (torchvision's loader gives all 1.0)
    gray = Image.fromarray(np.floor(wide.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)).convert("RGB")
    reference = image_folder(str(tmp_path), 32, False, "--data-path").transform(gray)  # the rounded 8-bit image
    torch.testing.assert_close(x, reference)
