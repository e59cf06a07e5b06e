"""Planted-fault check: does the test suite catch each of a list of semantic faults?

    python scripts/mutation_check.py                    # every fault, one at a time (several minutes)
    python scripts/mutation_check.py --list             # the faults and the tests meant to catch them
    python scripts/mutation_check.py --only guidance-halves-swapped --only top-k-keeps-k-plus-one
    python scripts/mutation_check.py --jobs 2 --json faults.json --markdown faults.md

Each fault is a small text edit (file, exact old text, new text), a sentence saying what it
breaks, and the few tests expected to catch it. The tracked files are copied to a temporary
folder once per job; each fault is applied there alone, its tests run (pytest -x), and the
file is put back. A fault is CAUGHT when its tests fail, SURVIVED when they pass, STALE
when its old text is not found exactly once (the code moved: re-target the fault), ERROR
when pytest could not run the tests (exit status other than 0 or 1), TIMEOUT past
--timeout. Before the faults, the union of their tests runs once on the unchanged copy
(--no-baseline skips it): a failing suite would make every fault look caught.

Exit status 0 only when every selected fault is caught. Runs on demand, not in CI; a
change that adds a mechanism adds its fault here.
"""
import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fault:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    breaks: str
    tests: tuple  # pytest node ids or files, relative to the repository root


GEN = "autoregressive/models/generate.py"
DPAR = "autoregressive/models/dpar.py"
MODULES = "autoregressive/models/modules.py"
ATTENTION = "autoregressive/models/attention.py"
PATCHING = "entropy_model/patching.py"
T_SEM = "tests/test_sampling_semantics.py"
T_DPAR_INC = "tests/test_dpar.py::test_incremental_matches_reference_and_teacher_forcing"
T_CAUSAL = "tests/test_dpar.py::test_causality_with_recomputed_patches"
T_RESUME = "tests/test_train.py::test_resume_after_max_steps_and_sigterm_is_bit_exact"
T_DDP = "tests/test_train_distributed.py::test_two_processes_match_one[ddp]"
T_FSDP = "tests/test_train_distributed.py::test_two_processes_match_one[fsdp]"
T_PATCH_LOOP = "tests/test_patching.py::test_patch_starts_matches_reference_loop"
T_ROPE = "tests/test_fidelity.py::test_rope_dynamic_matches_plain_formula"
T_FID_INC = "tests/test_fidelity.py::test_incremental_matches_reference_with_real_sampling"
T_STEP_RULE = "tests/test_decode.py::test_step_rule_equals_whole_sequence_rule"
T_STEP_ROUNDING = "tests/test_decode.py::test_step_rule_rounds_float32_entropies_like_the_whole_sequence_rule"
T_DECODE_INC = "tests/test_decode.py::test_incremental_matches_reference_in_every_mode"
T_BATCH_COMPOSITION = "tests/test_decode.py::test_dpar_batch_composition_invariance_with_real_sampling"
T_FRACTIONAL = "tests/test_fidelity.py::test_fractional_static_pattern_against_plain_loop"
T_PACKED_PADDED = "tests/test_attention.py::test_packed_equals_padded_logits_and_grads"
T_READ_GROUP = "tests/test_decode.py::test_read_lengths_form_a_small_set_that_covers_every_step"
T_RUN_ID = "tests/test_run_identity.py"

FAULTS = [
    # ---- causality -------------------------------------------------------------------
    Fault("pooling-into-own-slot", DPAR,
          "token_slot = torch.where(m < counts[:, None] - 1, base[:, None] + m + 1, n_slots)",
          "token_slot = torch.where(m < counts[:, None] - 1, base[:, None] + m, n_slots)",
          "pools each patch into the slot of the patch itself, so g_m sees the tokens it predicts",
          (T_CAUSAL,)),
    Fault("decoder-input-not-shifted", DPAR,
          "u = torch.cat([self.decoder_start.expand(B, 1, -1).to(h.dtype), h], dim=1)  # (B, T, dim)",
          "u = torch.cat([h, self.decoder_start.expand(B, 1, -1).to(h.dtype)], dim=1)  # (B, T, dim)",
          "decoder slot i holds h_i (its own token) instead of h_{i-1}",
          (T_CAUSAL,)),
    Fault("patch-slot-holds-own-geometry", DPAR,
          "held = F.pad(geometry[:, : M - 1], (0, 0, 1, 0))  # (B, M, 3): slot s holds patch s-1",
          "held = geometry  # (B, M, 3)",
          "padded layout: slot m gets the RoPE of P_m, whose end depends on tokens inside P_m",
          (T_CAUSAL, T_DPAR_INC)),
    Fault("packed-slot-holds-own-geometry", DPAR,
          "held = geometry[image, (index - 1).clamp(min=0)] * (index > 0)[:, None]  # (n_real, 3)",
          "held = geometry[image, index] * (index > 0)[:, None]  # (n_real, 3)",
          "packed layout: slot m gets the RoPE of P_m, whose end depends on tokens inside P_m",
          (T_PACKED_PADDED, "tests/test_fidelity.py::test_patch_rope_tables_follow_the_held_patch")),
    Fault("packed-documents-misassigned", DPAR,
          "documents = build_documents(counts, n_slots, max_seqlen=bound, grid_multiple=DOCUMENT_GRID_MULTIPLE)",
          "documents = build_documents(counts.flip(0), n_slots, max_seqlen=bound, grid_multiple=DOCUMENT_GRID_MULTIPLE)",
          "packed layout: document boundaries do not match the images, so patches attend across images",
          (T_PACKED_PADDED, "tests/test_fidelity.py::test_packed_layout_is_causal_with_recomputed_patches")),
    # ---- RoPE ------------------------------------------------------------------------
    Fault("rope-dynamic-columns-swapped", MODULES,
          "[row.float()[..., None] * row_freqs, cs * col_freqs, ce * col_freqs, ce * col_freqs, cs * col_freqs]",
          "[row.float()[..., None] * row_freqs, ce * col_freqs, cs * col_freqs, cs * col_freqs, ce * col_freqs]",
          "dynamic RoPE rotates the groups by col_end, col_start, col_start, col_end",
          (T_ROPE,)),
    Fault("rope-dynamic-column-base", MODULES,
          "col_freqs = rope_frequencies(head_dim // 16, head_dim // 8, base, row.device)",
          "col_freqs = rope_frequencies(head_dim // 16, head_dim // 2, base, row.device)",
          "dynamic RoPE column groups use the row frequencies (head_dim/2 instead of head_dim/8)",
          (T_ROPE,)),
    Fault("rope-2d-row-col-swapped", MODULES,
          "angles = torch.cat([row.float()[..., None] * freqs, col.float()[..., None] * freqs], dim=-1)",
          "angles = torch.cat([col.float()[..., None] * freqs, row.float()[..., None] * freqs], dim=-1)",
          "LlamaGen's 2D RoPE rotates the first half by column: released checkpoints give other logits",
          ("tests/test_gpt.py::test_fixture_logits_and_loss",)),
    Fault("encoder-step-rope-position", DPAR,
          "freqs = self.freqs_cis[input_pos + 1]  # (n, 1, head_dim/2, 2): slot j holds x_j",
          "freqs = self.freqs_cis[input_pos]  # (n, 1, head_dim/2, 2): slot j holds x_j",
          "incremental encoder gives x_j the position of x_{j-1}, unlike teacher forcing",
          (T_DPAR_INC,)),
    # ---- patching rule, whole sequence -----------------------------------------------
    Fault("gate-ge-whole-sequence", PATCHING,
          "gate = gate_scores(entropy, mode) > threshold",
          "gate = gate_scores(entropy, mode) >= threshold",
          "an entropy equal to tau opens a patch (the rule is e > tau)",
          (T_PATCH_LOOP,)),
    Fault("row-reset-whole-sequence", PATCHING,
          "opens = opens | (pos % row_width == 0)",
          "opens = opens | (pos == row_width)",
          "only the second row's first token opens a patch by the row reset",
          (T_PATCH_LOOP,)),
    Fault("cap-whole-sequence", PATCHING,
          "return torch.fmod(pos - segment_start, max_patch_length) == 0",
          "return torch.fmod(pos - segment_start, max_patch_length + 1) == 0",
          "patches grow to max_patch_length + 1 tokens",
          (T_PATCH_LOOP,)),
    Fault("relative-gate-whole-sequence", PATCHING,
          "gate = gate_scores(entropy, mode) > threshold",
          "gate = gate_scores(entropy, mode).abs() > threshold",
          "relative mode opens patches on entropy drops too",
          (T_PATCH_LOOP,)),
    Fault("fp16-rounding-skipped", PATCHING,
          "return entropy.to(torch.float16).to(torch.float32)",
          "return entropy.to(torch.float32)",
          "float32 entropies are compared unrounded, so generation and stored float16 entropies disagree",
          ("tests/test_patching.py::test_float16_rounding_decides_boundaries",)),
    Fault("static-fractional-rounding", PATCHING,
          "return (2 * x_num + num) // (2 * num)",
          "return x_num // num",
          "the fractional static pattern rounds each row's patch count down instead of to the nearest",
          (T_FRACTIONAL,)),
    Fault("static-fractional-no-reset", PATCHING,
          "return pos * den // num > (pos - 1) * den // num",
          "return pos * den // num > (pos - 2) * den // num",
          "without the row reset the fractional static pattern opens patches one token early as well",
          (T_FRACTIONAL,)),
    # ---- patching rule, one step (generation: StepRule) --------------------------------
    Fault("gate-ge-per-step", PATCHING,
          "opens = gate_scores(recent, cfg.mode)[:, -1] > cfg.threshold  # (B,)",
          "opens = gate_scores(recent, cfg.mode)[:, -1] >= cfg.threshold  # (B,)",
          "generation opens a patch at e == tau, training does not",
          (T_STEP_RULE, T_FID_INC)),
    Fault("fp16-rounding-per-step", PATCHING,
          "recent = torch.stack([quantize_entropy(e) for e in recent], dim=1)  # (B, 1) or (B, 2)\n"
          "        opens = gate_scores(recent, cfg.mode)[:, -1] > cfg.threshold  # (B,)",
          "recent = torch.stack([e.float() for e in recent], dim=1)  # (B, 1) or (B, 2)\n"
          "        opens = (recent[:, -1] - recent[:, 0] if cfg.mode == 'relative' else recent[:, -1]) > cfg.threshold",
          "generation compares float32 entropies, training their float16 rounding",
          (T_STEP_ROUNDING, T_FID_INC)),
    Fault("row-reset-per-step", PATCHING,
          "if cfg.row_reset and step % self.grid_width == 0:",
          "if cfg.row_reset and step % self.grid_width == 1:",
          "generation resets patches one token after each row start",
          (T_STEP_RULE, T_DPAR_INC)),
    Fault("cap-per-step", PATCHING,
          "opens = opens | (open_length >= cfg.max_patch_length)",
          "opens = opens | (open_length > cfg.max_patch_length)",
          "generation lets patches grow to max_patch_length + 1 tokens",
          (T_STEP_RULE, T_DPAR_INC)),
    Fault("relative-gate-per-step", PATCHING,
          "recent = [entropy] if cfg.mode == \"entropy\" else [prev_entropy, entropy]",
          "recent = [entropy] if cfg.mode == \"entropy\" else [entropy, prev_entropy]",
          "generation's relative mode opens patches on entropy drops instead of rises",
          (T_STEP_RULE, T_FID_INC)),
    Fault("static-pattern-per-step", PATCHING,
          "return self.fixed[step].expand(open_length.shape[0])",
          "return self.fixed[step - 1].expand(open_length.shape[0])",
          "generation applies the gate-free (token, static) pattern one token late",
          (T_STEP_RULE, T_FID_INC)),
    # ---- incremental generation ------------------------------------------------------
    Fault("generation-null-half-mask", DPAR,
          "advance = opening.repeat(copies)  # (g * copies,)",
          "advance = opening.repeat_interleave(copies)  # (g * copies,)",
          "with guidance the patch step updates the injections of rows of other images",
          (T_DPAR_INC,)),
    Fault("generation-masked-rows-update", DPAR,
          "injections.index_copy_(0, rows, torch.where(advance[:, None, None], self.injections(g), kept))",
          "injections.index_copy_(0, rows, self.injections(g))",
          "rows that do not open a patch take the injections of their unfinished patch",
          (T_DPAR_INC, T_BATCH_COMPOSITION)),
    Fault("generation-masked-rows-overwrite", DPAR,
          "g = self.patch_step(p.repeat(copies, 1), slot[images].repeat(copies), geometry, length, advance, rows)",
          "g = self.patch_step(p.repeat(copies, 1), (slot[images] - (~opening).long()).repeat(copies), geometry, length, advance, rows)",
          "rows that do not open a patch write their patch caches over their last real slot",
          (T_DPAR_INC,)),
    Fault("generation-group-order", DPAR,
          "images = torch.argsort((~opens).to(torch.int8), stable=True)[:group]",
          "images = torch.argsort(opens.to(torch.int8), stable=True)[:group]",
          "the patch step's group takes the images that do not open a patch first",
          (T_DPAR_INC,)),
    Fault("generation-patch-step-skipped", GEN,
          "            if n:",
          "            if n > 1:",
          "a step where a single image opens a patch skips the patch step",
          (T_DPAR_INC,)),
    Fault("generation-patch-geometry", DPAR,
          "geometry = (first // W, first % W, ((step - 1) % W).expand_as(first))",
          "geometry = (first // W, first % W, first % W)",
          "generated patches get col_end = col_start in their dynamic RoPE",
          (T_DPAR_INC,)),
    Fault("generation-slot-per-row", GEN,
          "close_patches(opens, patch_start, num_patches, torch.full",
          "close_patches(opens, patch_start, num_patches.max().expand_as(num_patches), torch.full",
          "every advancing row writes the patch cache at the furthest row's slot",
          (T_DPAR_INC,)),
    Fault("generation-pooling-window", DPAR,
          "valid = index < step  # the patch's tokens first..step-1",
          "valid = (index < step) & (index > first[:, None])  # the patch's tokens first..step-1",
          "generation pools a finished patch without its first token",
          (T_DPAR_INC,)),
    Fault("decode-read-length-short", MODULES,
          "while blocks * block < needed:",
          "while blocks * block < needed - 1:",
          "decode steps read one slot fewer than they need when that slot opens a longer read",
          (T_DECODE_INC, T_READ_GROUP)),
    Fault("patch-read-length-short", GEN,
          "read_length(top + 1, capacity, block), patch_group",
          "read_length(top, capacity, block), patch_group",
          "the patch step reads the patch caches up to the highest slot so far, not including the slot it writes",
          (T_DECODE_INC,)),
    # ---- KV cache --------------------------------------------------------------------
    Fault("gpt-decode-position", "autoregressive/models/gpt.py",
          "slot = self.config.cls_token_num + step - 1",
          "slot = self.config.cls_token_num + step",
          "GPT decoding writes and rotates each token one cache position late",
          ("tests/test_gpt.py::test_cached_decoding_matches_recomputation",)),
    Fault("kv-cache-mask", ATTENTION,
          "mask = slots[None, None, :] <= input_pos[:, :, None]  # (n, S, L)",
          "mask = slots[None, None, :] < input_pos[:, :, None]  # (n, S, L)",
          "cached attention skips the key just written (its own position)",
          ("tests/test_gpt.py::test_cached_decoding_matches_recomputation",)),
    # ---- guidance and sampling --------------------------------------------------------
    Fault("guidance-halves-swapped", GEN,
          "cond, uncond = logits.chunk(2, dim=0)",
          "uncond, cond = logits.chunk(2, dim=0)",
          "guidance takes the null half as the conditional one",
          (T_SEM,)),
    Fault("guidance-wrong-base", GEN,
          "return uncond + cfg_scale * (cond - uncond)",
          "return cond + cfg_scale * (cond - uncond)",
          "guidance computes cond + s (cond - uncond)",
          (T_SEM,)),
    Fault("guidance-interval-off-by-one", GEN,
          "step - 1 > self.cfg_interval",
          "step > self.cfg_interval",
          "cfg_interval stops guidance one decoding step early",
          (T_SEM,)),
    Fault("guidance-at-scale-one", GEN,
          "return self.cfg_scale > 1.0",
          "return self.cfg_scale >= 1.0",
          "scale 1 doubles the batch (guidance is only for s > 1)",
          (T_SEM,)),
    Fault("top-k-keeps-k-plus-one", GEN,
          "k = min(top_k, logits.shape[-1])",
          "k = min(top_k + 1, logits.shape[-1])",
          "top-k keeps k + 1 tokens",
          (T_SEM,)),
    Fault("top-p-drops-crossing-token", GEN,
          "remove[..., 1:] = remove[..., :-1].clone()",
          "remove[..., 1:] = remove[..., 1:].clone()",
          "top-p removes the token whose probability crosses p",
          (T_SEM,)),
    Fault("temperature-on-probabilities", GEN,
          "cdf = logits.softmax(-1).cumsum(-1)  # (B, V)",
          "cdf = (logits * max(temperature, 1e-5)).softmax(-1).div(max(temperature, 1e-5)).cumsum(-1)  # (B, V)",
          "temperature divides the probabilities, not the logits (sampling ignores it)",
          (T_SEM,)),
    # ---- training ----------------------------------------------------------------------
    Fault("label-dropout-ignored", "autoregressive/train/data.py",
          "return drop_labels(labels, self.class_dropout_prob, self.num_classes, generator)",
          "return labels",
          "training never drops labels to the null class, so guidance has no unconditional model",
          ("tests/test_train.py::test_label_dropout_rate_in_training_batches",)),
    Fault("resume-data-position", "autoregressive/train/data.py",
          "self.sampler.start = self.samples // self.info.world_size",
          "self.sampler.start = 0",
          "a resumed run replays the epoch from its first batch",
          (T_RESUME,)),
    Fault("resume-rng", "utils/checkpoint.py",
          "torch.set_rng_state(state[\"torch\"])",
          "torch.get_rng_state()",
          "a resumed run does not restore the dropout RNG",
          (T_RESUME,)),
    Fault("loss-divided-by-world-size", "autoregressive/train/loop.py",
          "scaled = loss / n",
          "scaled = loss / n / t.info.world_size",
          "gradients are divided by the world size on top of DDP's/FSDP's averaging",
          (T_DDP,)),
    Fault("gradient-accumulation-scale", "autoregressive/train/loop.py",
          "scaled = loss / n",
          "scaled = loss",
          "accumulated micro-batch gradients are summed, not averaged",
          ("tests/test_train.py::test_gradient_accumulation_matches_the_full_batch",)),
    Fault("ddp-never-syncs", "autoregressive/train/model.py",
          "if isinstance(module, DDP) and not sync:",
          "if isinstance(module, DDP):",
          "DDP skips the gradient all-reduce on every micro-batch; ranks drift apart",
          (T_DDP,)),
    Fault("fsdp-never-syncs", "autoregressive/train/model.py",
          "module.set_requires_gradient_sync(sync)",
          "module.set_requires_gradient_sync(False)",
          "FSDP2 never reduce-scatters gradients",
          (T_FSDP,)),
    Fault("chunked-ce-drops-chunk-row", "autoregressive/models/loss.py",
          "rows = slice(start, min(start + chunk_rows, N))",
          "rows = slice(start, min(start + chunk_rows - 1, N))",
          "the chunked cross-entropy drops the last row of every chunk (a chunk boundary lost)",
          ("tests/test_loss.py::test_chunked_loss_matches_the_float64_reference",)),
    Fault("z-loss-gradient-halved", "autoregressive/models/loss.py",
          "grad = grad + 2 * config.z_loss * lse * probs",
          "grad = grad + config.z_loss * lse * probs",
          "the z-loss term's gradient is half its value's: training follows another loss than the one logged",
          ("tests/test_loss.py::test_chunked_loss_matches_the_float64_reference",)),
    Fault("trainer-drops-loss-flags", "autoregressive/train/loop.py",
          "_, loss = t.module(**batch.inputs, loss_config=t.run.loss)",
          "_, loss = t.module(**batch.inputs)",
          "the training step uses the default loss whatever the loss flags (--z-loss) say",
          ("tests/test_train.py::test_loss_flags_reach_the_training_step",)),
    Fault("ema-decay-reversed", "autoregressive/train/ema.py",
          "torch._foreach_lerp_(ema, current, 1.0 - self.decay)",
          "torch._foreach_lerp_(ema, current, self.decay)",
          "the EMA moves by decay instead of 1 - decay towards the weights (ema = (1 - d) ema + d param)",
          ("tests/test_llamagen_compat.py::test_ema_update_matches_a_float64_reference",)),
    Fault("resume-fallback-ignores-damage", "utils/checkpoint.py",
          "problem = checkpoint_problem(path)",
          "problem = None",
          "the newest checkpoint counts as readable even when damaged: resume and rotation do not fall back",
          ("tests/test_run_folder.py::test_rotation_keeps_the_newest_readable_checkpoint",
           "tests/test_run_folder.py::test_truncated_newest_checkpoint_falls_back_and_resumes_exactly")),
    Fault("run-lock-shared", "utils/run_lock.py",
          "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
          "fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
          "the run folder's lock is a shared one: a second trainer writes the same folder",
          (T_RUN_ID + "::test_second_trainer_is_refused_and_a_killed_holder_leaves_no_lock",)),
    Fault("run-identity-not-compared", "autoregressive/train/settings.py",
          "return {k: [theirs[k], ours.get(k)] for k in sorted(theirs) if theirs[k] != ours.get(k)}",
          "return {}",
          "a command with another seed, lr or patching rule silently continues the run",
          (T_RUN_ID + "::test_other_settings_are_refused_unless_continued_explicitly",
           T_RUN_ID + "::test_patching_rule_is_part_of_the_run")),
    Fault("entropy-watch-size-only", "utils/identity.py",
          "return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns",
          "return st.st_dev, st.st_size",
          "the entropies' watch compares only the size: a new file of the same shape switched in goes unseen",
          (T_RUN_ID + "::test_file_watch_tells_a_switch_from_an_in_place_rewrite",
           T_RUN_ID + "::test_entropies_switched_under_a_run_stop_it")),
    Fault("input-rewrite-taken-for-a-switch", "utils/identity.py",
          "replaced = self.seen is None or now[:2] != self.seen[:2]",
          "replaced = True",
          "an input rewritten in place (the run's mapping read the new bytes) is saved as if it trained on the old",
          (T_RUN_ID + "::test_codes_rewritten_in_place_stop_the_run_without_saving",)),
    Fault("entropies-of-another-model-accepted", "utils/identity.py",
          "if value is not None and record.get(key) != value:",
          "if value is not None and key == \"code_store_hash\" and record.get(key) != value:",
          "entropies scored by another entropy model train or sample a DPAR model whose patches they do not fit",
          ("tests/test_entropy_scoring.py::test_load_entropies_refuses_other_model_or_changed_codes",)),
    Fault("store-identity-skips-the-codes-check", "utils/identity.py",
          "new_stat = check_recorded_file(path / CODES, recorded, verify, remedy)",
          "new_stat = None",
          "codes.npy rewritten after extraction keeps the store's identity: entropies of the old codes still fit",
          ("tests/test_dataset.py::test_code_store_identity_is_cheap_and_refuses_changed_codes",)),
    Fault("release-vq-of-another-store-accepted", "autoregressive/export.py",
          "sha = check_weights_identity(args.vq_ckpt, recorded, \"--vq-ckpt\",",
          "sha = check_weights_identity(args.vq_ckpt, None, \"--vq-ckpt\",",
          "a release records a VQ other than the one its training codes came from: its samples decode wrongly",
          ("tests/test_release.py::test_export_refuses_a_vq_other_than_the_code_stores",)),
    Fault("paper-tau-silent-default", "autoregressive/train/data.py",
          "if args.patching_mode not in GATED_MODES or args.threshold is not None or args.target_compression is not None:",
          "if True:",
          "a DPAR run on a user's entropies silently takes the paper's tau, chosen for another entropy model",
          (T_RUN_ID + "::test_gated_patching_needs_a_named_threshold",)),
    Fault("disk-full-unrecognised", "utils/checkpoint.py",
          "if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):",
          "if isinstance(e, OSError) and e.errno == errno.EDQUOT:",
          "a full disk during a checkpoint save ends in a traceback that does not say so",
          (T_RUN_ID + "::test_full_disk_during_a_save_says_so_and_the_run_resumes",
           T_RUN_ID + "::test_full_disk_during_a_distributed_checkpoint_save")),
    Fault("prune-vanished-file", "utils/checkpoint.py",
          "    except FileNotFoundError:\n        pass",
          "    except NotADirectoryError:\n        pass",
          "pruning crashes on a checkpoint that is already gone",
          (T_RUN_ID + "::test_pruning_tolerates_a_checkpoint_that_vanished",)),
    # ---- data, compute and metrics ----------------------------------------------------
    Fault("code-store-dtype", "dataset/code_store.py",
          "self.codes[indices] = codes.astype(np.uint16)",
          "self.codes[indices] = codes.astype(np.uint8)",
          "codes above 255 wrap when written",
          ("tests/test_dataset.py::test_code_store_round_trip_and_hash",)),
    Fault("code-store-labels", "dataset/code_store.py",
          "self.labels[indices] = np.asarray(labels, dtype=np.int64)",
          "self.labels[indices] = np.asarray(labels, dtype=np.int64)[::-1]",
          "labels are written to the wrong rows",
          ("tests/test_dataset.py::test_code_store_round_trip_and_hash",)),
    Fault("code-outside-codebook-off-by-one", "dataset/code_store.py",
          "bad = (block >= codebook_size) | (block < 0)  # (b, views * T)",
          "bad = (block > codebook_size) | (block < 0)  # (b, views * T)",
          "a code equal to the codebook size passes the store's check (codes are 0..size-1)",
          ("tests/test_dataset.py::test_code_store_refuses_codes_outside_the_codebook_at_write_and_open",)),
    Fault("sixteen-bit-truncated", "dataset/imagefolder.py",
          "gray = np.clip((wide + SIXTEEN_BIT_SCALE // 2) // SIXTEEN_BIT_SCALE, 0, 255).astype(np.uint8)",
          "gray = np.clip(wide // SIXTEEN_BIT_SCALE, 0, 255).astype(np.uint8)",
          "16-bit pixels are truncated to 8 bits instead of rounded",
          ("tests/test_dataset.py::test_sixteen_bit_png_is_scaled_not_clipped",)),
    Fault("non-finite-misses-inf", "entropy_model/calibrate.py",
          "FLOAT16_EXPONENT = 0x7C00  # float16 bits of an all-ones exponent: inf or NaN",
          "FLOAT16_EXPONENT = 0x7E00  # float16 bits of an all-ones exponent: inf or NaN",
          "the finite-entropy scan sees quiet NaNs only: infinite entropies pass",
          ("tests/test_entropy_scoring.py::test_readers_and_calibration_refuse_non_finite_entropies",)),
    Fault("entropies-rewritten-in-place", "entropy_tools/score.py",
          "os.replace(out / PARTIAL_FILE, out / ENTROPY_FILE)",
          "(out / ENTROPY_FILE).write_bytes((out / PARTIAL_FILE).read_bytes())",
          "finished entropies are copied into the existing entropy.npy, under the processes that mapped it",
          ("tests/test_entropy_scoring.py::test_rescoring_switches_files_so_a_mapped_reader_keeps_its_entropies",)),
    Fault("flops-linear-count", "evaluations/flops.py",
          "macs = args[0].numel() // module.in_features * module.in_features * module.out_features",
          "macs = args[0].numel() // module.in_features * module.out_features",
          "a linear layer's MACs leave out the input width",
          ("tests/test_flops.py::test_gpt_matches_hand_count",)),
    Fault("loader-buffer-offset", "autoregressive/train/data.py",
          "return buffers[x.dtype][x.offset:x.offset + n].view(x.shape)",
          "return buffers[x.dtype][x.offset + 1:x.offset + n + 1].view(x.shape)",
          "a batch from a loader worker reads each tensor one element late in its buffer",
          ("tests/test_train.py::test_dpar_batches_from_workers_equal_the_in_process_ones",)),
    Fault("loader-prefetch-pages", "dataset/code_store.py",
          "return [(start, min(item_bytes + page, size - start))",
          "return [(start, min(page, size - start))",
          "the batch prefetch asks for one page per item, missing the second page of items that straddle two",
          ("tests/test_dataset.py::test_item_pages_cover_the_items",)),
    Fault("frechet-trace-factor", "evaluations/c2i/metrics.py",
          "return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))",
          "return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - np.trace(covmean))",
          "the Fréchet distance subtracts Tr(sqrtm(sigma1 sigma2)) once instead of twice",
          ("tests/test_evaluations.py::test_frechet_distance_diagonal_closed_form",)),
    # ---- the sampler's compile default -----------------------------------------------
    Fault("grid-compiled-by-default", "autoregressive/sample/compiling.py",
          "else fid and device.type == \"cuda\"",
          "else device.type == \"cuda\"",
          "sample_c2i.py compiles a grid on CUDA by default; the default compiles only an FID run",
          ("tests/test_sample.py::test_compile_default_is_one_sentence",)),
    # ---- release folders --------------------------------------------------------------
    Fault("release-entropy-hash-dropped", "autoregressive/sample/loading.py",
          "\"entropy_model_hash\": entropy.get(\"sha256\"),",
          "\"entropy_model_hash\": None,",
          "sampling from a DPAR release accepts any entropy model: the recorded hash is not checked",
          ("tests/test_release.py::test_sampling_refuses_another_entropy_model_or_vq",)),
    Fault("release-exports-raw-by-default", "autoregressive/export.py",
          "return has_ema and choice != \"raw\"",
          "return has_ema and choice == \"ema\"",
          "export_release.py's default (auto) writes the raw weights of a run that has EMA weights",
          ("tests/test_release.py::test_gpt_release_gives_the_checkpoints_logits_and_samples",)),
]

STATUSES = ("CAUGHT", "SURVIVED", "STALE", "ERROR", "TIMEOUT")


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    tests: list
    detail: str = ""


def tree_files(root: Path) -> list:
    """Tracked files plus untracked, not ignored ones (so uncommitted work is checked too)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_tree(root: Path, files: Sequence[str], dest: Path) -> Path:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return dest


def run_pytest(tree: Path, tests: Sequence[str], timeout: float) -> tuple:
    """(exit status or None on timeout, seconds, output tail) of pytest -x on `tests` in `tree`."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.time()
    # own process group, so a timeout also ends the workers torchrun started
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, time.time() - start, ""
    return proc.returncode, time.time() - start, output[-2000:]


def present_tests(tree: Path, tests: Sequence[str]) -> tuple:
    """(tests whose file exists in tree, the missing ones)."""
    present = [t for t in tests if (tree / t.split("::")[0]).is_file()]
    return present, [t for t in tests if t not in present]


def check_fault(fault: Fault, tree: Path, timeout: float) -> Result:
    path = tree / fault.path
    original = path.read_text() if path.is_file() else None
    count = original.count(fault.old) if original is not None else 0
    if count != 1:
        where = "file missing" if original is None else f"old text found {count} times"
        return Result(fault.name, "STALE", 0.0, list(fault.tests), where)
    tests, missing = present_tests(tree, fault.tests)
    note = f"missing: {', '.join(missing)}" if missing else ""
    if not tests:
        return Result(fault.name, "ERROR", 0.0, list(fault.tests), note)
    path.write_text(original.replace(fault.old, fault.new))
    try:
        code, seconds, tail = run_pytest(tree, tests, timeout)
    finally:
        path.write_text(original)
    if code is None:
        return Result(fault.name, "TIMEOUT", seconds, tests, f"over {timeout:.0f} s")
    status = {0: "SURVIVED", 1: "CAUGHT"}.get(code, "ERROR")
    lines = tail.strip().splitlines()
    if status == "CAUGHT":  # name the test that failed (pytest's summary line "FAILED node - reason")
        failed = [line[len("FAILED "):].split(" - ")[0] for line in lines if line.startswith("FAILED ")]
        note = "; ".join(filter(None, [note, f"by {failed[0]}" if failed else ""]))
    elif status == "ERROR":
        note = "; ".join(filter(None, [note, lines[-1] if lines else f"exit {code}"]))
    return Result(fault.name, status, seconds, tests, note)


def summary(results: Sequence[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    return ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) + f" of {len(results)} faults"


def markdown_table(results: Sequence[Result], footer: str = "") -> str:
    by_name = {f.name: f for f in FAULTS}
    lines = ["| fault | where | what it breaks | status | seconds | tests |", "|---|---|---|---|---|---|"]
    for r in results:
        f = by_name[r.name]
        tests = ", ".join(f"`{t}`" for t in r.tests)
        status = r.status + (f" ({r.detail})" if r.detail else "")
        lines.append(f"| {r.name} | `{f.path}` | {f.breaks} | {status} | {r.seconds:.1f} | {tests} |")
    return "\n".join(lines + ([f"\n{footer}"] if footer else [])) + "\n"


def text_table(results: Sequence[Result]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'fault':<{width}}  {'status':<8}  {'seconds':>7}  tests"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.status:<8}  {r.seconds:7.1f}  {', '.join(r.tests)}"
                     + (f"  [{r.detail}]" if r.detail else ""))
    lines.append(summary(results))
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=None, metavar="NAME", help="run only this fault (repeatable)")
    p.add_argument("--list", action="store_true", help="print the faults and exit")
    p.add_argument("--jobs", type=int, default=1, help="faults checked at once, each in its own copy (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per fault's tests (default 600)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unchanged tree")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="also write the table as markdown")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def select(only: Optional[Sequence[str]]) -> list:
    if not only:
        return list(FAULTS)
    names = {f.name for f in FAULTS}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SystemExit(f"mutation_check: error: unknown fault {unknown[0]!r} (see --list)")
    return [f for f in FAULTS if f.name in only]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    faults = select(args.only)
    if args.list:
        for f in faults:
            print(f"{f.name}: {f.breaks}\n    {f.path}; tests: {', '.join(f.tests)}")
        return 0
    files = tree_files(REPO)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        trees = queue.Queue()
        for j in range(min(args.jobs, len(faults))):
            trees.put(copy_tree(REPO, files, Path(tmp) / f"tree{j}"))
        if not args.no_baseline:
            tree = trees.get()
            union, _ = present_tests(tree, list(dict.fromkeys(t for f in faults for t in f.tests)))
            code, seconds, tail = run_pytest(tree, union, args.timeout * len(faults))
            trees.put(tree)
            if code != 0:
                print(f"baseline: the tests fail on the unchanged tree (exit {code}, {seconds:.0f} s); "
                      f"fix them first:\n{tail}", file=sys.stderr)
                return 2
            print(f"baseline: {len(union)} test selections pass on the unchanged tree ({seconds:.0f} s)", flush=True)

        def work(fault: Fault) -> Result:
            tree = trees.get()
            try:
                result = check_fault(fault, tree, args.timeout)
            finally:
                trees.put(tree)
            print(f"{result.status:<8} {result.seconds:6.1f} s  {fault.name}", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(work, faults))
    print()
    print(text_table(results))
    run = (f"{summary(results)}; {time.time() - start:.0f} s with {args.jobs} job(s) on {os.cpu_count()} CPU "
           f"core(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(run)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown_table(results, run))
    return 0 if all(r.status == "CAUGHT" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
