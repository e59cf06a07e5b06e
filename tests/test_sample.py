"""sample_c2i.py: grids from tiny random GPT / DPAR models, the resumable, rank-independent
FID mode (torchrun, gloo) and its .npz, and one-line errors."""
import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive.models.gpt import GPT_models
from autoregressive.sample import main, parse_args
from autoregressive.sample.cli import fid_cfg_scale
from autoregressive.sample.fid import plan_chunks
from autoregressive.sample.loading import PatchingOverrides, sampling_patching
from autoregressive.sample.sampler import image_seed, to_uint8
from dpar_helpers import CLASSES, GRID, T, VOCAB, quantile_patching, random_dpar, random_entropy_model
from entropy_model.patching import PatchingConfig
from tokenizer.vq_model import VQ_models
from utils.identity import file_sha256

ROOT = Path(__file__).resolve().parents[1]
VQ_OVERRIDES = dict(ch=16, norm_groups=8, z_channels=32, num_res_blocks=1, codebook_size=VOCAB, codebook_embed_dim=8)
IMAGE = GRID * 16  # VQ-16 on a 6x6 grid


@pytest.fixture(autouse=True)
def one_thread():
    """Same arithmetic as the torchrun workers (OMP_NUM_THREADS=1), so runs compare byte for byte."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(obj: dict, path: Path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny random checkpoints in the project's formats: VQ, GPT-T, entropy model, DPAR-T."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    vq = VQ_models["VQ-16"](**VQ_OVERRIDES)
    vq_path = save({"model": vq.state_dict(),
                    "args": {"vq_model": "VQ-16", "model_config": dataclasses.asdict(vq.config)}}, d / "vq.pt")
    gpt = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES)
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    gpt_path = save({"model": gpt.state_dict(), "args": {"gpt_model": "GPT-T", "model_config": dataclasses.asdict(
        gpt.config), "image_size": IMAGE}}, d / "gpt.pt")
    ent = random_entropy_model()
    ent_path = save({"model": ent.state_dict(), "args": {"gpt_model": "GPT-T", "model_config": dataclasses.asdict(
        ent.config)}}, d / "entropy.pt")
    other_ent = random_entropy_model(seed=7)
    other_ent_path = save({"model": other_ent.state_dict(), "args": {
        "gpt_model": "GPT-T", "model_config": dataclasses.asdict(other_ent.config)}}, d / "entropy_other.pt")
    dpar = random_dpar()
    patching = quantile_patching(ent)
    dpar_path = save({"model": dpar.state_dict(), "args": {
        "gpt_model": "DPAR-T", "model_config": dataclasses.asdict(dpar.config), "patching": patching.to_dict(),
        "entropy_model_hash": file_sha256(ent_path), "image_size": IMAGE}}, d / "dpar.pt")
    return {"vq": vq_path, "gpt": gpt_path, "entropy": ent_path, "entropy_other": other_ent_path, "dpar": dpar_path}


def common(ckpts, model: str) -> list:
    args = ["--gpt-ckpt", ckpts[model], "--vq-ckpt", ckpts["vq"], "--device", "cpu"]
    return args + (["--entropy-ckpt", ckpts["entropy"]] if model == "dpar" else [])


@pytest.mark.parametrize("model", ["gpt", "dpar"])
def test_grid_png(ckpts, model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(common(ckpts, model) + ["--class-labels", "0", "1", "4", "2", "--nrow", "2", "--out", str(out),
                                 "--per-proc-batch-size", "3"])
    printed = capsys.readouterr().out
    assert "images/s" in printed and "tokens/s" in printed
    assert ("patches/image" in printed) == (model == "dpar")
    grid = np.asarray(Image.open(out))
    # torchvision grid: 2 x 2 images of IMAGE px with 2 px padding
    assert grid.shape == (2 * IMAGE + 6, 2 * IMAGE + 6, 3)
    assert grid.std() > 1.0  # real decoded images, not a blank canvas


def test_seeds_and_pixels():
    assert image_seed(0, 5) == image_seed(0, 5)
    assert len({image_seed(s, i) for s in range(3) for i in range(100)}) == 300
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 6, 6)
    px = to_uint8(x, 6)
    assert px.shape == (1, 6, 6, 3) and px.dtype == np.uint8
    assert px[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]  # clamp(127.5 x + 128) truncated
    # chunks are fixed by index, dealt to ranks in turn; together the ranks cover each index once
    missing = [i for i in range(40) if i not in (3, 17)]
    plans = [plan_chunks(missing, 8, r, 2) for r in range(2)]
    assert plans[0][0] == [0, 1, 2, 4, 5, 6, 7] and plans[1][0] == list(range(8, 16))
    assert sorted(i for p in plans for c in p for i in c) == missing


def test_defaults_and_patching_overrides():
    assert [fid_cfg_scale(m) for m in ("GPT-B", "GPT-L", "GPT-XL", "DPAR-XL", "DPAR-XXL", "GPT-3B", "DPAR-T")] == \
        [2.0, 2.0, 1.75, 1.75, 1.75, 1.65, 1.5]
    stored = {"patching": PatchingConfig("entropy", 7.8, 4, True).to_dict()}
    assert sampling_patching(stored, PatchingOverrides()) == PatchingConfig("entropy", 7.8, 4, True)
    changed = sampling_patching(stored, PatchingOverrides(threshold=6.5, max_patch_length=0, row_reset=False))
    assert changed == PatchingConfig("entropy", 6.5, None, False)
    args = parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v", "--max-patch-length", "none"])
    assert args.max_patch_length == 0 and args.cfg_scale is None and args.top_k is None


def fid_args(ckpts, sample_dir: Path, n: int = 40) -> list:
    return common(ckpts, "dpar") + ["--num-fid-samples", str(n), "--sample-dir", str(sample_dir),
                                    "--per-proc-batch-size", "8", "--image-size-eval", "64", "--cfg-scale", "1.5"]


def torchrun(args: list, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "sample_c2i.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_fid_mode_ranks_resume_and_npz(ckpts, tmp_path, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(fid_args(ckpts, two), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    main(fid_args(ckpts, one))
    capsys.readouterr()

    with np.load(f"{one}.npz") as f1, np.load(f"{two}.npz") as f2:
        images, labels = f1["arr_0"], f1["arr_1"]
        assert images.shape == (40, 64, 64, 3) and images.dtype == np.uint8
        assert labels.tolist() == [i % CLASSES for i in range(40)]
        assert np.bincount(labels).tolist() == [8] * CLASSES
        assert np.array_equal(images, f2["arr_0"]) and np.array_equal(labels, f2["arr_1"])
    assert len({images[i].tobytes() for i in range(40)}) == 40  # distinct images
    for i in range(40):
        assert (one / f"{i:06d}.png").read_bytes() == (two / f"{i:06d}.png").read_bytes()

    # interrupt: delete a few images (and leave a stale temporary file); a rerun regenerates exactly those
    deleted = [3, 17, 18, 39]
    before = {i: (one / f"{i:06d}.png").read_bytes() for i in deleted}
    for i in deleted:
        (one / f"{i:06d}.png").unlink()
    (one / ".000003.png.tmp999").write_bytes(b"partial")
    mtimes = {i: (one / f"{i:06d}.png").stat().st_mtime_ns for i in range(40) if i not in deleted}
    main(fid_args(ckpts, one))
    printed = capsys.readouterr().out
    assert "36 of 40 images present, generating 4" in printed
    assert "decoding eagerly, the default for a grid and on CPU" in printed  # an FID run on CPU decodes eagerly
    assert sorted(p.name for p in one.iterdir()) == sorted([f"{i:06d}.png" for i in range(40)] + ["sampling.json"])
    assert {i: (one / f"{i:06d}.png").stat().st_mtime_ns for i in mtimes} == mtimes
    for i in deleted:  # same seed and class; only the batch shape differs from the first run
        again = np.asarray(Image.open(one / f"{i:06d}.png"))
        assert np.abs(again.astype(int) - np.asarray(Image.open(two / f"{i:06d}.png")).astype(int)).max() <= 1
        assert Image.open(one / f"{i:06d}.png").text["class"] == str(i % CLASSES)
    with np.load(f"{one}.npz") as f1:
        assert f1["arr_0"].shape == (40, 64, 64, 3)

    # a folder made with other settings is refused
    with pytest.raises(SystemExit):
        main(fid_args(ckpts, one)[:-1] + ["2.0"])
    assert "cfg_scale" in capsys.readouterr().err


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def test_one_line_errors(ckpts, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x.png")]
    wrong = common(ckpts, "gpt")[:-4] + ["--gpt-ckpt", ckpts["dpar"], "--vq-ckpt", ckpts["vq"],
                                         "--entropy-ckpt", ckpts["entropy_other"]]
    assert "is not the entropy model" in one_line_error(capsys, wrong + out)
    gpt = common(ckpts, "gpt") + out
    assert "class 5 is out of range" in one_line_error(capsys, gpt + ["--class-labels", "1", "5"])
    assert "--image-size 128 does not match" in one_line_error(capsys, gpt + ["--image-size", "128"])
    assert "apply to DPAR" in one_line_error(capsys, gpt + ["--threshold", "3"])
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------
# The fast path as the sampler runs it: the compile default, its line, and one-line failures
# --------------------------------------------------------------------------------------
@pytest.fixture
def compile_cache(tmp_path, monkeypatch):
    path = tmp_path / "inductor-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(path))
    return path


def test_compile_cache_folder(tmp_path, monkeypatch):
    from autoregressive.sample.compiling import compile_cache_dir, use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "dpar" / "inductor"  # not torch's /tmp default
    assert use_compile_cache() == tmp_path / "xdg" / "dpar" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "dpar" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == tmp_path / "mine"  # a user's choice wins


def test_compile_default_is_one_sentence(compile_cache):
    """An FID run (--num-fid-samples) on CUDA compiles its decode steps, a grid or a run on CPU
    decodes eagerly, and --compile / --no-compile override both; the line printed before the
    first generation says which, and names the flag that changes it."""
    from autoregressive.sample.compiling import compile_decode, compile_notice

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_decode(None, cuda, fid=True) is True  # an FID run on CUDA compiles
    assert compile_decode(None, cuda, fid=False) is False  # a grid decodes eagerly
    assert compile_decode(None, cpu, fid=True) is False and compile_decode(None, cpu, fid=False) is False  # so does CPU
    for device in (cuda, cpu):  # the flags win
        for fid in (True, False):
            assert compile_decode(True, device, fid) is True and compile_decode(False, device, fid) is False
    fast = compile_notice(True, None, compile_cache)
    assert fast.startswith("compiling the decode steps") and str(compile_cache) in fast and "--no-compile" in fast
    assert compile_notice(True, True, compile_cache) == fast
    assert compile_notice(False, False, compile_cache) == "decoding eagerly (--no-compile)"
    assert "--compile compiles" in compile_notice(False, None, compile_cache)


def test_sampler_decodes_as_the_default_and_the_flags_say(ckpts, tmp_path, monkeypatch):
    """build_sampler asks compile_decode with the run's flag, device and mode, and its answer
    picks the decode steps."""
    from autoregressive.sample import cli, compiling

    asked = []
    monkeypatch.setattr(cli, "compile_decode", lambda *a: asked.append(a) or compiling.compile_decode(*a))
    grid = cli.build_sampler(parse_args(common(ckpts, "gpt") + ["--class-labels", "0"]), torch.device("cpu"))[0]
    fid = cli.build_sampler(parse_args(fid_args(ckpts, tmp_path / "s") + ["--compile"]), torch.device("cpu"))[0]
    assert asked == [(None, torch.device("cpu"), False), (True, torch.device("cpu"), True)]
    assert not grid.decoding.compile and fid.decoding.compile and fid.decoding.keep_caches


def test_grid_prints_how_it_decodes(ckpts, tmp_path, capsys, compile_cache):
    out = ["--class-labels", "0", "1", "--out", str(tmp_path / "g.png")]
    main(common(ckpts, "gpt") + out)
    assert "decoding eagerly, the default for a grid and on CPU" in capsys.readouterr().out
    main(common(ckpts, "dpar") + out + ["--no-compile"])
    assert "decoding eagerly (--no-compile)" in capsys.readouterr().out


def raising_backend(gm, example_inputs):
    raise RuntimeError("no code generator here\nsecond line of the compiler's report")


def capture_failing_backend(gm, example_inputs):
    def run(*args):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    return run


@pytest.mark.parametrize("model,backend,shown", [("gpt", raising_backend, "BackendCompilerFailed, RuntimeError: no code"),
                                                 ("dpar", capture_failing_backend, "stream is capturing")])
def test_failed_compile_stops_with_one_line_naming_no_compile(ckpts, tmp_path, capsys, monkeypatch, compile_cache,
                                                              backend, shown, model):
    """A compile (or, on CUDA, a capture) that fails at run time ends the run with one line that
    names the failure and --no-compile; nothing falls back to eager, no grid is written."""
    from autoregressive.models.generate import Decoding
    from autoregressive.sample import cli

    monkeypatch.setattr(cli, "fast_decoding", lambda device: Decoding(compile=True, backend=backend, keep_caches=True))
    torch._dynamo.reset()
    out = tmp_path / "g.png"
    err = one_line_error(capsys, common(ckpts, model) + ["--compile", "--class-labels", "0", "1", "--out", str(out)])
    assert "the compiled decode path failed" in err and shown in err and "--no-compile" in err, err
    assert not out.exists()
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Refusals, the FID folder's identity, interrupts and a full disk
# --------------------------------------------------------------------------------------
def parse_error(capsys, extra: list) -> str:
    """The error line of a refused command line (argparse: usage lines, then one error line)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v", *extra])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], lines
    return lines[-1]


@pytest.mark.parametrize("extra,shown", [
    (["--cfg-scale", "-1"], "--cfg-scale must be >= 1"),
    (["--cfg-scale", "0.5"], "--cfg-scale must be >= 1"),
    (["--top-k", "-5"], "--top-k must be >= 0"),
    (["--cfg-interval", "-7"], "--cfg-interval must be -1"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
    (["--threshold", "nan"], "--threshold must be a finite number"),
    (["--image-size-eval", "0"], "--image-size-eval must be >= 1"),
    (["--image-size", "-256"], "--image-size must be >= 1"),
    (["--num-classes", "0"], "--num-classes must be >= 1"),
    (["--num-fid-samples", "0"], "--num-fid-samples must be >= 1"),
    (["--num-fid-samples", "8", "--per-proc-batch-size", "0"], "--per-proc-batch-size must be >= 1"),
])
def test_out_of_range_flags_are_refused_in_one_line(capsys, extra, shown):
    assert shown in parse_error(capsys, extra)


def test_flags_at_the_edge_of_their_range_are_accepted():
    args = parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v", "--cfg-scale", "1", "--top-k", "0", "--cfg-interval", "0"])
    assert (args.cfg_scale, args.top_k, args.cfg_interval) == (1.0, 0, 0)


def test_guidance_interval_must_fit_the_model():
    from autoregressive.sample.cli import check_guidance_interval

    for ok in ((-1, 1.0), (-1, 4.0), (0, 4.0), (T - 2, 4.0)):
        check_guidance_interval(*ok, T)  # T - 2: the last decoding step
    with pytest.raises(ValueError, match="past the last decoding step"):
        check_guidance_interval(T - 1, 4.0, T)
    with pytest.raises(ValueError, match="no effect without guidance"):
        check_guidance_interval(3, 1.0, T)


def test_guidance_interval_past_the_model_is_refused_before_sampling(ckpts, tmp_path, capsys):
    out = tmp_path / "g.png"
    gpt = common(ckpts, "gpt") + ["--class-labels", "0", "--out", str(out)]
    assert "--cfg-interval 40 is past the last decoding step (34" in one_line_error(capsys, gpt + ["--cfg-interval",
                                                                                                   "40"])
    assert "no effect without guidance" in one_line_error(capsys, gpt + ["--cfg-scale", "1", "--cfg-interval", "3"])
    assert not out.exists()


def test_unconditional_model_is_not_a_class_conditional_generator(ckpts, tmp_path, capsys):
    sample_dir = tmp_path / "uncond"
    argv = ["--gpt-ckpt", ckpts["entropy"], "--vq-ckpt", ckpts["vq"], "--device", "cpu", "--num-fid-samples", "2",
            "--sample-dir", str(sample_dir)]
    err = one_line_error(capsys, argv)
    assert "holds an unconditional GPT-T" in err and "not a class-conditional generator" in err, err
    assert not Path(f"{sample_dir}.npz").exists() and not sample_dir.exists()


def small_fid(ckpts, sample_dir: Path, n: int, gpt_ckpt: str = None, entropy: str = "entropy") -> list:
    args = fid_args(ckpts, sample_dir, n)
    args[args.index("--per-proc-batch-size") + 1] = "2"
    args[args.index("--entropy-ckpt") + 1] = ckpts[entropy]
    if gpt_ckpt is not None:
        args[args.index("--gpt-ckpt") + 1] = gpt_ckpt
    return args


def save_dcp_dpar(folder: Path, seed: int, patching: PatchingConfig) -> str:
    """A DPAR checkpoint as a torch.distributed.checkpoint directory (an FSDP run's format),
    written without a process group; it records no entropy model hash."""
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    dpar = random_dpar(seed=seed)
    shutil.rmtree(folder, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": dpar.state_dict()}, checkpoint_id=str(folder))
    torch.save({"args": {"gpt_model": "DPAR-T", "model_config": dataclasses.asdict(dpar.config),
                         "patching": patching.to_dict(), "image_size": IMAGE}, "step": 100}, folder / "train_state.pt")
    return str(folder)


def test_fid_folder_refuses_an_fsdp_checkpoint_retrained_at_the_same_path(ckpts, tmp_path, capsys):
    """The folder records the generator and the entropy model by content: a DCP directory
    rewritten at the same path with the same step, or another entropy model file, is refused in
    one line; the same checkpoint continues the folder."""
    import shutil

    patching = quantile_patching(random_entropy_model())
    ckpt = save_dcp_dpar(tmp_path / "ckpt", 1, patching)
    kept = tmp_path / "ckpt-first"
    shutil.copytree(ckpt, kept)
    sample_dir = tmp_path / "samples"
    main(small_fid(ckpts, sample_dir, 4, ckpt))
    capsys.readouterr()
    first = {p.name: p.read_bytes() for p in sample_dir.iterdir()}
    assert len([name for name in first if name.endswith(".png")]) == 4

    save_dcp_dpar(tmp_path / "ckpt", 2, patching)  # retrained: same path, same step, other weights
    err = one_line_error(capsys, small_fid(ckpts, sample_dir, 6, ckpt))
    assert "gpt_ckpt_sha256" in err and "use a new --sample-dir or remove the folder" in err, err
    err = one_line_error(capsys, small_fid(ckpts, sample_dir, 6, str(kept), entropy="entropy_other"))
    assert "entropy_ckpt_sha256" in err, err
    assert {p.name: p.read_bytes() for p in sample_dir.iterdir()} == first  # nothing added or changed

    shutil.rmtree(ckpt)
    shutil.copytree(kept, ckpt)  # the first checkpoint again: the folder continues
    main(small_fid(ckpts, sample_dir, 6, ckpt))
    assert "4 of 6 images present, generating 2" in capsys.readouterr().out
    assert all((sample_dir / name).read_bytes() == data for name, data in first.items())


def test_fid_folder_with_images_but_no_record_is_refused(ckpts, tmp_path, capsys):
    sample_dir = tmp_path / "samples"
    sample_dir.mkdir()
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(sample_dir / "000000.png")
    err = one_line_error(capsys, small_fid(ckpts, sample_dir, 2))
    assert "holds images but no sampling.json" in err, err
    assert sorted(p.name for p in sample_dir.iterdir()) == ["000000.png"]


def test_interrupted_fid_run_says_how_far_it_got_and_a_rerun_continues(ckpts, tmp_path, capsys, monkeypatch):
    from autoregressive.sample.sampler import Sampler

    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    main(small_fid(ckpts, whole, 8))
    sample = Sampler.sample
    calls = []

    def sample_then_interrupt(self, classes, seeds):
        calls.append(len(classes))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sample(self, classes, seeds)

    monkeypatch.setattr(Sampler, "sample", sample_then_interrupt)
    capsys.readouterr()
    try:
        main(small_fid(ckpts, interrupted, 8))
    except KeyboardInterrupt:  # escaping, it would also stop pytest
        pytest.fail("the interrupt escaped sample_c2i.py as a traceback")
    except SystemExit as e:
        assert e.code == 130
    else:
        pytest.fail("an interrupted run finished")
    err = final_line(capsys.readouterr().err)
    assert err == "interrupted after 4 of 8 images; rerun the same command to continue", err
    assert not Path(f"{interrupted}.npz").exists()

    monkeypatch.setattr(Sampler, "sample", sample)
    main(small_fid(ckpts, interrupted, 8))
    assert "4 of 8 images present, generating 4" in capsys.readouterr().out
    with np.load(f"{whole}.npz") as a, np.load(f"{interrupted}.npz") as b:  # same batches: the same bytes
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def final_line(err: str) -> str:
    """The last line of stderr, the only one besides the progress bar's."""
    lines = err.strip().replace("\r", "\n").splitlines()
    assert all(line.startswith("sampling (") for line in lines[:-1]), lines
    return lines[-1]


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_while_writing_images_says_so_and_a_rerun_continues(ckpts, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of image 2's PNG: one line naming the image and the images kept,
    no temporary file left; after space is freed the same command finishes the folder."""
    save = Image.Image.save

    def save_until_full(self, fp, *args, **kwargs):
        if ".000002.png" in str(fp):
            Path(fp).write_bytes(b"\x89PNG partial")
            raise no_space(fp)
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    sample_dir = tmp_path / "samples"
    with pytest.raises(SystemExit) as exit_info:
        main(small_fid(ckpts, sample_dir, 6))
    assert exit_info.value.code == 1
    err = final_line(capsys.readouterr().err)
    assert err == (f"error: no space left on device while writing {sample_dir / '000002.png'}: free space and rerun; "
                   f"the run continues from 2 images"), err
    assert sorted(p.name for p in sample_dir.iterdir()) == ["000000.png", "000001.png", "sampling.json"]

    monkeypatch.setattr(Image.Image, "save", save)
    main(small_fid(ckpts, sample_dir, 6))
    assert "2 of 6 images present, generating 4" in capsys.readouterr().out
    with np.load(f"{sample_dir}.npz") as f:
        assert f["arr_0"].shape == (6, 64, 64, 3)


def test_full_disk_while_packing_the_npz_says_so(ckpts, tmp_path, capsys, monkeypatch):
    write_array = np.lib.format.write_array

    def full(*args, **kwargs):
        raise no_space("")

    monkeypatch.setattr(np.lib.format, "write_array", full)
    sample_dir = tmp_path / "samples"
    with pytest.raises(SystemExit) as exit_info:
        main(small_fid(ckpts, sample_dir, 4))
    assert exit_info.value.code == 1
    err = final_line(capsys.readouterr().err)
    assert err == (f"error: no space left on device while writing {sample_dir}.npz: free space and rerun; "
                   f"the run continues from 4 images"), err
    assert not any(p.name.startswith(".samples.npz") for p in tmp_path.iterdir())  # the partial file is removed
    assert not Path(f"{sample_dir}.npz").exists()
    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    main(small_fid(ckpts, sample_dir, 4))
    assert "4 of 4 images present, generating 0" in capsys.readouterr().out
    with np.load(f"{sample_dir}.npz") as f:
        assert f["arr_0"].shape == (4, 64, 64, 3)
