"""Attention backends against a float64 reference, and DPAR's packed patch layout against the
padded one (values, gradients, compiled without recompiles)."""
import pytest
import torch
from torch._dynamo.utils import counters

from autoregressive.models import attention
from autoregressive.models.attention import (
    attend,
    attention_backend,
    available_backends,
    build_documents,
    document_block_mask,
    segment_attend,
    set_attention_backend,
)
from autoregressive.models.dpar import DPAR_models, build_patch_layout
from autoregressive.models.modules import DropPath
from entropy_model.patching import patch_lengths_from_starts, patch_starts

RAGGED = [5, 1, 17, 9, 30, 2]  # document lengths; packed into N = 80 slots (16 padding slots)
N = 80


@pytest.fixture(autouse=True)
def automatic_backend():
    set_attention_backend(None)
    yield
    set_attention_backend(None)


def reference_attention(q, k, v, allowed):
    """Plain softmax attention in float64; allowed (S, S_kv) bool."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def document_causal(lengths, total):
    doc = torch.repeat_interleave(torch.arange(len(lengths) + 1), torch.tensor(lengths + [total - sum(lengths)]))
    pos = torch.arange(total)
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


def random_qkv(B, H, S, D, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def check_against_reference(out, q, k, v, allowed, rows, grads=True, atol=1e-5):
    """Compare out (real rows only) and the gradients of a random weighting of those rows."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, allowed)
    assert torch.allclose(out[..., rows, :].double(), ref[..., rows, :], atol=atol)
    if not grads:
        return
    w = torch.randn(ref[..., rows, :].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (out[..., rows, :] * w.float()).sum().backward()
    (ref[..., rows, :] * w).sum().backward()
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert torch.allclose(ours.grad.double(), theirs.grad, atol=atol)


def test_backend_choice_and_override(monkeypatch):
    assert attention_backend("cpu") == "sdpa"  # flex has no backward on CPU, varlen needs CUDA
    assert "varlen" not in available_backends("cpu")
    set_attention_backend("flex")
    assert attention_backend("cpu") == "flex"
    set_attention_backend(None)
    monkeypatch.setenv("DPAR_ATTENTION", "flex")
    set_attention_backend(None)  # re-reads the variable
    assert attention_backend("cpu") == "flex"
    monkeypatch.setenv("DPAR_ATTENTION", "fast")
    set_attention_backend(None)
    with pytest.raises(ValueError, match="DPAR_ATTENTION"):
        attention_backend("cpu")
    with pytest.raises(ValueError, match="one of"):
        set_attention_backend("flash")


def test_sdpa_causal_matches_reference():
    q, k, v = random_qkv(2, 3, 37, 16, seed=0)
    out = attend(q, k, v)
    allowed = torch.ones(37, 37, dtype=torch.bool).tril()
    check_against_reference(out, q, k, v, allowed, rows=slice(None))


def test_sdpa_documents_match_reference():
    q, k, v = random_qkv(1, 3, N, 16, seed=1)
    docs = build_documents(torch.tensor(RAGGED), N)
    assert docs.grid_index.shape == (len(RAGGED), max(RAGGED)) and docs.num_docs == len(RAGGED) + 1
    out = attend(q, k, v, documents=docs)
    check_against_reference(out, q, k, v, document_causal(RAGGED, N), rows=slice(0, sum(RAGGED)))


def test_flex_block_mask_is_document_causal():
    """The O(blocks^2) block mask equals the dense document-causal mask (partial and full blocks)."""
    docs = build_documents(torch.tensor([150, 3, 200, 40]), 512)
    mask = document_block_mask(docs.doc_ids, block=64)
    assert mask.full_kv_num_blocks.sum() > 0  # some blocks skip the mask function entirely
    dense = mask.to_dense()[0, 0].bool()  # (q blocks, kv blocks) that are computed
    allowed = document_causal([150, 3, 200, 40], 512)
    needed = allowed.view(8, 64, 8, 64).any(3).any(1)
    assert torch.equal(dense, needed)


def test_flex_eager_with_document_mask_matches_reference():
    q, k, v = random_qkv(1, 2, N, 16, seed=2, requires_grad=False)
    docs = build_documents(torch.tensor(RAGGED), N)
    flex = attention._flex_module()
    with pytest.warns(UserWarning, match="without torch.compile"):
        out = flex.flex_attention(q, k, v, block_mask=document_block_mask(docs.doc_ids))
    check_against_reference(out, q, k, v, document_causal(RAGGED, N), rows=slice(0, sum(RAGGED)), grads=False)


@torch.no_grad()
def test_flex_backend_compiled_matches_reference():
    """attend() with the flex backend runs the compiled kernel (forward only on CPU)."""
    set_attention_backend("flex")
    q, k, v = random_qkv(1, 2, N, 16, seed=3, requires_grad=False)
    docs = build_documents(torch.tensor(RAGGED), N).prepare()
    assert docs.block_mask is not None
    out = attend(q, k, v, documents=docs)
    check_against_reference(out, q, k, v, document_causal(RAGGED, N), rows=slice(0, sum(RAGGED)), grads=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen needs CUDA (scripts/gpu_check.sh checks it)")
def test_varlen_documents_match_reference():
    set_attention_backend("varlen")
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in random_qkv(1, 4, N, 64, seed=4))
    docs = build_documents(torch.tensor(RAGGED), N).to("cuda")
    out = attend(q, k, v, documents=docs)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), document_causal(RAGGED, N))
    rows = slice(0, sum(RAGGED))
    assert torch.allclose(out[..., rows, :].cpu().double(), ref[..., rows, :], atol=2e-2)


def test_segment_attention_matches_reference():
    n, H, D = 5, 2, 8
    segment = torch.tensor([0, 0, 0, 2, 2, 3, 5, 5, 0, 3])  # segment 1 and 4 are empty, 5 = no segment
    g = torch.Generator().manual_seed(5)
    q = torch.randn(n, H, D, generator=g, requires_grad=True)
    k, v = (torch.randn(10, H, D, generator=g, requires_grad=True) for _ in range(2))
    out = segment_attend(q, k, v, segment)
    allowed = segment[None, :] == torch.arange(n)[:, None]  # (n, K)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("nhd,khd->hnk", q64, k64) / D**0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
    ref = torch.einsum("hnk,khd->nhd", weights, v64)
    assert torch.allclose(out.double(), ref, atol=1e-6)
    assert torch.equal(out[[1, 4]], torch.zeros(2, H, D))
    w = torch.randn(n, H, D, dtype=torch.float64, generator=g)
    (out * w.float()).sum().backward()
    (ref * w).sum().backward()
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert torch.allclose(ours.grad.double(), theirs.grad, atol=1e-6)


def test_drop_path_drops_whole_documents():
    docs = build_documents(torch.tensor(RAGGED), N)
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    out = drop(torch.ones(1, N, 4), docs)[0, :, 0]  # (N,) 0 or 2
    kept = [out[a:b] for a, b in zip(docs.cu_seqlens[:-1].tolist(), docs.cu_seqlens[1:].tolist())]
    assert all(bool((seg == seg[0]).all()) for seg in kept)
    assert {0.0, 2.0} == {float(seg[0]) for seg in kept}


# --------------------------------------------------------------------------------------
# DPAR: packed patch transformer == padded patch transformer
# --------------------------------------------------------------------------------------
T, W, V = 64, 8, 40


def dpar_batch(seed, B=5, threshold=6.0):
    g = torch.Generator().manual_seed(seed)
    lengths = patch_lengths_from_starts(patch_starts(torch.rand(B, T, generator=g) * 10, threshold, 4, W))
    codes = torch.randint(0, V, (B, T), generator=g)
    return codes, torch.randint(0, 5, (B,), generator=g), lengths


def tiny_dpar(**kwargs):
    torch.manual_seed(0)
    model = DPAR_models["DPAR-T"](vocab_size=V, block_size=T, num_classes=5, **kwargs)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()  # dropout off: both layouts see the same computation


def logits_and_grads(model, codes, cond, layout):
    model.zero_grad()
    logits, _ = model(codes[:, :-1], cond, layout)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_packed_equals_padded_logits_and_grads():
    model = tiny_dpar(pack_multiple=32)
    codes, cond, lengths = dpar_batch(0)
    counts = (lengths > 0).sum(-1)
    assert counts.min() < counts.max()  # precondition: images have different patch counts
    packed = build_patch_layout(lengths, model.config, packed=True)
    padded = build_patch_layout(lengths, model.config, packed=False)
    assert packed.n_slots == -(-(int(counts.sum()) + 1) // 32) * 32 < padded.n_slots == lengths.numel()
    lp, gp = logits_and_grads(model, codes, cond, packed)
    ld, gd = logits_and_grads(model, codes, cond, padded)
    assert torch.allclose(lp, ld, atol=1e-5)
    for name in gd:
        assert torch.allclose(gp[name], gd[name], atol=1e-5), name
    assert gp["patch_layers.0.attention.wqkv.weight"].abs().sum() > 0


def test_activation_checkpointing_with_packed_patches():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tiny_dpar(pack_multiple=16)
    codes, cond, lengths = dpar_batch(1)
    layout = build_patch_layout(lengths, model.config, packed=True)
    plain = logits_and_grads(model, codes, cond, layout)
    model.patch_layers[0] = checkpoint_wrapper(model.patch_layers[0])
    model.encoder_layers[0] = checkpoint_wrapper(model.encoder_layers[0])
    wrapped = logits_and_grads(model, codes, cond, layout)
    assert torch.equal(plain[0], wrapped[0])
    for name, grad in plain[1].items():
        for prefix in ("patch_layers.0.", "encoder_layers.0."):
            name = name.replace(prefix, prefix + "_checkpoint_wrapped_module.")
        assert torch.allclose(grad, wrapped[1][name], atol=1e-6), name


def test_compiled_patch_layers_do_not_recompile_for_new_patch_counts():
    """Packed lengths are padded to a multiple (nothing is marked dynamic inside forward): the
    first packed length compiles a static graph, the second one graph with that length dynamic,
    which serves every later length. (aot_eager on CPU keeps this fast; the GPU check compiles
    with inductor.)"""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny_dpar(pack_multiple=16), tiny_dpar(pack_multiple=16)
    compiled.patch_layers[0].compile(backend="aot_eager")
    slots = set()
    for seed, threshold in ((2, 6.0), (3, 3.0), (4, 8.0), (5, 5.0)):
        with torch._dynamo.config.patch(error_on_recompile=len(slots) >= 2):
            codes, cond, lengths = dpar_batch(seed, threshold=threshold)
            layout = build_patch_layout(lengths, eager.config, packed=True)
            slots.add(layout.n_slots)
            logits, grads = logits_and_grads(compiled, codes, cond, layout)
            ref_logits, ref_grads = logits_and_grads(eager, codes, cond, layout)
            assert torch.allclose(logits, ref_logits, atol=1e-5)
            for name in ("output.weight", "patch_layers.0.attention.wqkv.weight", "patch_cross_attn.0.wkv.weight"):
                assert torch.allclose(grads[name], ref_grads[name], atol=1e-5), name
    assert len(slots) >= 3  # at least three different packed lengths
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_marked_layouts_compile_one_whole_model_graph():
    """PatchLayout.mark_dynamic: the first compiled forward is already the graph that serves
    every packed length (unmarked, the first batch compiles a throw-away static graph)."""
    model = tiny_dpar(pack_multiple=16)
    batches = [dpar_batch(seed, threshold=threshold) for seed, threshold in ((2, 6.0), (3, 3.0))]
    slots = {build_patch_layout(lengths, model.config, packed=True).n_slots for _, _, lengths in batches}
    assert len(slots) == 2  # precondition: two packed lengths
    graphs = {}
    for marked in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            for (codes, cond, lengths) in batches:
                layout = build_patch_layout(lengths, model.config, packed=True)  # fresh tensors, as each batch
                layout = layout.mark_dynamic() if marked else layout
                logits, _ = compiled(codes[:, :-1], cond, layout)
                assert torch.allclose(logits, model(codes[:, :-1], cond, layout)[0], atol=1e-5)
        graphs[marked] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == {False: 2, True: 1}


def test_packed_documents_bound_covers_the_padding_document():
    """varlen kernels only write rows of documents up to max_seqlen long: the bound must cover
    the padding document, which holds up to pack_multiple slots, more than T on small grids."""
    model = DPAR_models["DPAR-T"](vocab_size=V, block_size=36, num_classes=5)  # 6 x 6 tokens < 128
    g = torch.Generator().manual_seed(8)
    lengths = patch_lengths_from_starts(patch_starts(torch.rand(3, 36, generator=g) * 10, 6.0, 4, 6))
    documents = build_patch_layout(lengths, model.config, packed=True).documents
    sizes = documents.cu_seqlens.diff()
    assert sizes[-1] > 36 and sizes[:-1].max() <= 36  # precondition: the padding document is longer than T
    assert int(sizes.max()) <= documents.max_seqlen


# --------------------------------------------------------------------------------------
# KV-cached decoding: each row reads its own cache prefix
# --------------------------------------------------------------------------------------
def test_decode_block_mask_reads_only_each_rows_own_blocks():
    """A row reads ceil(limit / block) blocks of its cache and a row of limit 0 reads none (the old
    masked step read every row up to the read length)."""
    limit = torch.tensor([0, 1, 32, 33, 70, 0, 96])
    mask = attention.decode_block_mask(limit, 96, block=32)
    assert mask.kv_num_blocks[:, 0, 0].tolist() == [0, 1, 1, 2, 3, 0, 3]
    dense = mask.to_dense()[:, 0, 0].bool()  # (rows, kv blocks) computed
    assert torch.equal(dense, torch.arange(3)[None] < torch.tensor([0, 1, 1, 2, 3, 0, 3])[:, None])


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cached_attend_reads_each_rows_prefix(backend, monkeypatch):
    """cached_attend against float64 attention over each row's own prefix; rows that do not read
    may hold anything in their cache (NaN here) without reaching the rows that do."""
    monkeypatch.setattr(attention, "_decode_override", backend)
    n, H, L, D = 6, 2, 64, 16
    q, k, v = random_qkv(n, H, L, D, seed=4, requires_grad=False)
    q = q[:, :, :1]  # (n, H, 1, D): one query per row
    pos = torch.tensor([[0], [5], [31], [32], [50], [63]])
    reads = torch.tensor([True, True, False, True, True, False])
    k[~reads], v[~reads] = float("nan"), float("nan")
    out = attention.cached_attend(q, k, v, pos, reads)
    assert out.shape == (n, H, 1, D)
    for r in torch.nonzero(reads)[:, 0].tolist():
        allowed = torch.arange(L)[None] <= pos[r]  # (1, L)
        ref = reference_attention(q[r], k[r], v[r], allowed)
        torch.testing.assert_close(out[r].double(), ref, atol=2e-6, rtol=1e-5)
    assert attention.decode_attention_backend("cpu") == backend


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cached_attend_rows_reads_each_gathered_rows_prefix(backend, monkeypatch):
    """Queries of some cache rows (in any order) read their own rows' prefixes where they lie in
    the cache: against float64 attention per row. Rows outside the group hold large values
    (finite, as every cache slot is: a flat block may hold a neighbour's slots, masked out)."""
    monkeypatch.setattr(attention, "_decode_override", backend)
    R, C, H, D = 7, 45, 2, 16  # 45 slots per row: rows straddle the 32-slot blocks of the flat cache
    g = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(R, C, H, D, generator=g), torch.randn(R, C, H, D, generator=g)
    rows = torch.tensor([5, 1, 3, 6])
    outside = torch.ones(R, dtype=torch.bool)
    outside[rows] = False
    k_cache[outside], v_cache[outside] = 1e3, 1e3
    pos = torch.tensor([[40], [0], [17], [33]])
    reads = torch.tensor([True, True, True, False])
    q = torch.randn(4, H, 1, D, generator=g)
    out = attention.cached_attend_rows(q, k_cache, v_cache, rows, pos, 44, reads)
    assert out.shape == (4, H, 1, D)
    for j in range(3):
        allowed = torch.arange(44)[None] <= pos[j]  # (1, L)
        k, v = (c[rows[j], :44].transpose(0, 1) for c in (k_cache, v_cache))  # (H, L, D)
        ref = reference_attention(q[j], k, v, allowed)
        torch.testing.assert_close(out[j].double(), ref, atol=2e-6, rtol=1e-5)
    mask = attention.gathered_block_mask(rows * C, torch.tensor([41, 1, 18, 0]), R * C, 44)
    assert mask.kv_num_blocks[0, 0].tolist() == [2, 1, 1, 0]  # 225..265 spans blocks 7-8; 45 in 1; 135..152 in 4
