"""Device placement on CUDA, checked without a GPU: the training forward and every decode step
function run on fake CUDA tensors (FakeTensorMode), and a dispatch recorder asserts that no op
makes a tensor on the CPU and no op copies host memory to the device. (The backward pass cannot
run on fake CUDA tensors without a GPU; its ops mirror the forward's.) On a CPU every copy goes
from CPU to CPU, so the sync recorders of test_decode.py cannot see such copies; on CUDA each
one blocks the stream (and splits CUDA-graph partitions)."""
from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autoregressive.models.attention import set_attention_backend, set_decode_attention
from autoregressive.models.gpt import GPT_models
from dpar_helpers import CLASSES, GRID, T, VOCAB, random_dpar, random_entropy_model
from entropy_model.entropy import entropy_from_logits

CUDA = torch.device("cuda")


class PlacementRecorder(TorchDispatchMode):
    """Records every op that returns a tensor on the CPU, and every op that takes a CPU tensor
    and returns a CUDA one (a host-to-device copy), by op name."""

    def __init__(self):
        super().__init__()
        self.on_host, self.host_to_device, self.ops = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in outputs):
            self.on_host.append(str(func))
        if any(t.device.type == "cpu" and t.dim() > 0 for t in inputs) and any(t.is_cuda for t in outputs):
            self.host_to_device.append(str(func))
        return out

    def assert_on_device(self, min_ops: int):
        assert self.ops >= min_ops, f"only {self.ops} ops traced"  # the recorder saw the computation
        assert not self.on_host, f"ops made CPU tensors: {self.on_host}"
        assert not self.host_to_device, f"host-to-device copies: {self.host_to_device}"


@pytest.fixture
def fake():
    """A FakeTensorMode and a function moving real CPU tensors / modules onto fake CUDA. Decode
    attention on SDPA: flex attention cannot run under the recorders' dispatch modes (its block
    masks are tested in tests/test_attention.py, on the GPU by scripts/gpu_check.sh)."""
    mode = FakeTensorMode()
    set_attention_backend("sdpa")
    set_decode_attention("sdpa")

    def to_cuda(x):
        if isinstance(x, torch.nn.Module):
            for module in x.modules():
                for name, p in module._parameters.items():
                    if p is not None:
                        module._parameters[name] = torch.nn.Parameter(to_cuda(p.detach()), p.requires_grad)
                for name, b in module._buffers.items():
                    if b is not None:
                        module._buffers[name] = to_cuda(b)
            return x
        with mode:
            return mode.from_tensor(x).to(CUDA)

    try:
        yield mode, to_cuda
    finally:
        set_attention_backend(None)
        set_decode_attention(None)


def test_recorder_sees_host_tensors_and_copies(fake):
    mode, to_cuda = fake
    x = to_cuda(torch.randn(4))
    with mode, PlacementRecorder() as rec:
        y = x + torch.arange(4).to(x.device)  # a CPU arange, then a host-to-device copy
        z = x * torch.arange(4, device=x.device)  # on the device: neither
    assert y.is_cuda and z.is_cuda
    assert rec.on_host == ["aten.arange.default"] and rec.host_to_device == ["aten._to_copy.default"]


def _layout(model, packed: bool):
    g = torch.Generator().manual_seed(3)
    lengths = torch.zeros(3, T, dtype=torch.long)
    for b in range(3):
        cuts = torch.randint(1, 5, (T,), generator=g).cumsum(0)
        cuts = torch.cat([torch.zeros(1, dtype=torch.long), cuts[cuts < T], torch.tensor([T])])
        lengths[b, : cuts.numel() - 1] = cuts.diff()
    layout = model.patch_layout(lengths, packed=packed)
    assert layout.packed == packed and (lengths > 0).sum(-1).unique().numel() > 1  # images differ
    return layout


@pytest.mark.parametrize("packed", [True, False])
def test_dpar_training_forward_stays_on_the_device(fake, packed):
    mode, to_cuda = fake
    model = random_dpar()
    layout = _layout(model, packed)
    documents = layout.documents
    layout = replace(layout, documents=None)._map(to_cuda)
    if documents is not None:
        layout = replace(layout, documents=documents._map(to_cuda))
    model = to_cuda(model.train())
    codes = to_cuda(torch.randint(0, VOCAB, (3, T)))
    cond = to_cuda(torch.tensor([0, 2, 4]))
    with mode, PlacementRecorder() as rec:
        _, loss = model(codes[:, :-1], cond, layout, targets=codes)
        logits, _ = model(codes[:, :-1], cond, layout)
    assert loss.is_cuda and loss.requires_grad and logits.shape == (3, T, VOCAB)
    rec.assert_on_device(min_ops=200)


def test_gpt_training_forward_stays_on_the_device(fake):
    mode, to_cuda = fake
    torch.manual_seed(0)
    model = to_cuda(GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES).train())
    codes = to_cuda(torch.randint(0, VOCAB, (3, T)))
    cond = to_cuda(torch.tensor([0, 2, 4]))
    with mode, PlacementRecorder() as rec:
        _, loss = model(codes[:, :-1], cond, targets=codes)
    assert loss.is_cuda and loss.requires_grad
    rec.assert_on_device(min_ops=100)


def test_decode_steps_stay_on_the_device(fake):
    """Every step function generation compiles (GPT step, entropy step, DPAR encoder, patch and
    decoder steps) and DPAR's start, each traced alone after the caches are set up."""
    mode, to_cuda = fake
    B, R, i = 3, 6, 7
    gpt = to_cuda(GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=CLASSES).eval())
    ent, model = to_cuda(random_entropy_model()), to_cuda(random_dpar())
    max_length = GRID
    with mode, torch.no_grad():
        gpt.setup_caches(R, 1 + T)
        ent.setup_caches(B, 1 + T)
        model.setup_caches(R, images=B)
        tokens = torch.randint(0, VOCAB, (R,), device=CUDA)
        cond = torch.randint(0, CLASSES, (R,), device=CUDA)
        opens = torch.tensor([True, False, True], device=CUDA)
        start = torch.tensor([3, 5, 6], device=CUDA)
        slot = torch.tensor([2, 3, 4], device=CUDA)
        steps = {
            "gpt step": lambda: gpt.decode(tokens, *gpt.step_position(R, i, 8)),
            "entropy step": lambda: entropy_from_logits(ent.decode(tokens[:B], *ent.step_position(B, i, 8))),
            "start_patches": lambda: model.start_patches(cond, 16),
            "encode_step": lambda: model.encode_step(tokens[:B], torch.full((B, 1), i - 1, device=CUDA), 16),
            "patch_step": lambda: model.patch_step(torch.randn(R, model.config.dim, device=CUDA), slot.repeat(2),
                                                   (slot.repeat(2),) * 3, 16),
            "close_patches": lambda: model.close_patches(opens, start, slot, torch.full((1,), i, device=CUDA),
                                                         max_length, 16, 2),
            "decode_step": lambda: model.decode_step(torch.randn(R, model.config.dim, device=CUDA),
                                                     torch.full((R, 1), i, device=CUDA), 16),
        }
        for name, step in steps.items():
            with PlacementRecorder() as rec:
                out = step()
            assert out is None or out.is_cuda, name
            try:
                rec.assert_on_device(min_ops=20)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
