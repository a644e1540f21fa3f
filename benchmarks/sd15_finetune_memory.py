"""Estimate (no GPU needed) the peak GPU memory of fine-tuning Stable Diffusion 1.5 at 512x512, batch 1 (``--sdxl``:
SDXL 1.0 base at 1024x1024, batch 1, its 2.6 B-parameter UNet with the 2816-wide vector conditioning).

Setups: full fine-tune (fp32 UNet + fp32 grads + AdamW, bf16-mixed autocast) and LoRA rank 4 / 16 on
the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) through ``ldm.nn.lora.add_lora``
(base UNet frozen in bf16, LoRA fp32 + AdamW), each with gradient checkpointing off and on.

Nothing runs on a GPU and nothing is allocated: the SD 1.5 UNet (published diffusers config) is built on
the ``meta`` device and its parameters are turned into ``FakeTensor``s (meta-backed tensors that carry
a device, a dtype and a storage identity but no data), so a forward + backward + AdamW step costs
seconds on a CPU (the whole script: ~35 s on 2 cores). Storages are told apart by identity; views
share their base's storage as real tensors do, so the once-per-storage dedupe is exact, not the
approximation plain meta tensors would need. Two measurements per setup:

* **saved-tensor count** (the activation column): every tensor autograd saves for backward is seen by
  ``torch.autograd.graph.saved_tensors_hooks`` and summed once per storage (parameters excluded). The
  bf16 copies autocast makes of fp32 weights (kept in autocast's cache until the forward ends, and
  saved for backward) are counted too. With checkpointing the block inputs (kept by
  ``torch.utils.checkpoint``) are added, and the backward worst case is "checkpointed saved bytes + the
  largest single block's activations" (one block is recomputed at a time); the per-block figures come
  from the non-checkpointed run, attributing each saved tensor to the ResBlock/BasicTransformerBlock
  running when it was saved. Estimated total = weights + grads + optimizer + activations (grads and all
  activations assumed alive together: an upper-side estimate).
* **simulated step peak**: ``torch.distributed._tools.mem_tracker.MemTracker`` follows every storage
  alive through one optimizer-state initialisation and one full training step (forward, backward with
  recompute, AdamW ``foreach`` step, ``zero_grad``) and reports the peak and its make-up.

bf16-mixed on a GPU means ``torch.autocast("cuda", torch.bfloat16)``, whose op policy differs from CPU
autocast: GroupNorm and LayerNorm run in fp32 on CUDA (bf16 on CPU), and SDPA is a fused (flash)
kernel. CUDA autocast cannot run without a GPU (and fake CUDA tensors cannot run a backward), so the
runs use CPU autocast with CUDA's rules swapped into ``torch.nn.functional`` (norms in fp32, SDPA
through the fused flash kernel). ``--check`` verifies that this emulation saves exactly the bytes that
real CUDA autocast saves on fake CUDA tensors (forward only; they differ by the 24-byte RNG-state tensors
of CUDA flash attention), and that fake and real CPU tensors give the same counts on a tiny UNet.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sd15_finetune_memory.py [--check] [--sdxl]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ldm.formats.unet_keys import unet_config_from_diffusers
from ldm.nn.lora import add_lora
from ldm.nn.unet import UNetModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, however this file is run
from memory_instruments import (  # noqa: E402
    NO_HOOK, ParamCasts, PeakTracker, SavedTensorCounter, autocast_bf16, cuda_autocast_rules, storage_key,
)

GIB = 2**30
# Published runwayml/stable-diffusion-v1-5 unet/config.json (the fields that shape the network).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# Published stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the network).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
TINY_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
)
VAE_PARAMS_FALLBACK, CLIP_L_PARAMS_FALLBACK = 83_653_863, 123_060_480


@dataclass(frozen=True)
class Setup:
    lora_rank: int  # 0: full fine-tune
    checkpointing: bool

    @property
    def name(self) -> str:
        kind = "full FT" if not self.lora_rank else f"LoRA r{self.lora_rank}"
        return f"{kind}, ckpt {'on' if self.checkpointing else 'off'}"


@dataclass
class Result:
    setup: Setup
    trainable: int = 0
    weights: int = 0  # bytes of all UNet parameters as stored
    grads: int = 0
    optimizer: int = 0
    saved: int = 0  # distinct storages saved for backward (+ checkpoint inputs), parameters excluded
    weight_copies_saved: int = 0  # of which: bf16 autocast copies of parameters
    casts_cached: int = 0  # all bf16 parameter copies autocast made (cache, alive until the forward ends)
    fwd_end: int = 0  # activation bytes alive at the end of the forward
    block_bytes: dict[str, int] = field(default_factory=dict)  # per checkpointable block (ckpt off runs)
    largest_block: tuple[str, int] = ("-", 0)
    peak_fwd_bwd: int = 0  # MemTracker peak over forward + backward
    peak_parts: dict[str, int] = field(default_factory=dict)  # its make-up
    peak: int = 0  # MemTracker peak over the whole step (forward, backward, AdamW step)

    @property
    def activations(self) -> int:
        if not self.setup.checkpointing:
            return self.fwd_end
        # forward end: checkpoint inputs + unchecked-region saves + autocast cache; backward: one block recomputed
        return max(self.fwd_end, self.saved + self.largest_block[1])

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


# ------------------------------------------------------------------------------------------ helpers


def build_unet(config: dict, lora_rank: int, device: str, fake: FakeTensorMode | None) -> UNetModel:
    """The UNet built on meta (LoRA injected and frozen base cast to bf16 there), then given fake (or real
    empty) parameters on ``device``."""
    with torch.device("meta"):
        unet = UNetModel(**unet_config_from_diffusers(config))
    if lora_rank:
        add_lora(unet, rank=lora_rank)
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)  # LatentDiffusion(frozen_dtype="bf16"): LoRA stays fp32
    with fake if fake is not None else contextlib.nullcontext():
        for module in unet.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    data = torch.empty(p.shape, dtype=p.dtype, device=device)
                    if fake is None:  # real run (--check): deterministic values
                        with torch.no_grad():
                            data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
                                       .mul_(0.05).to(p.dtype))
                    module._parameters[name] = nn.Parameter(data, requires_grad=p.requires_grad)
    return unet


def run_setup(setup: Setup, config: dict, latent: int, device: str = "cpu", fake: bool = True,
              autocast: bool = True, cuda_rules: bool = True, track: bool = True) -> Result:
    """Forward (+ backward + AdamW step when ``track``) of one setup; fills a :class:`Result`."""
    fake_mode = FakeTensorMode() if fake else None
    unet = build_unet(config, setup.lora_rank, device, fake_mode)
    unet.set_gradient_checkpointing(setup.checkpointing)
    res = Result(setup)
    params = list(unet.parameters())
    trainable = [p for p in params if p.requires_grad]
    param_keys = {storage_key(p) for p in params}
    res.trainable = sum(p.numel() for p in trainable)
    res.weights = sum(p.numel() * p.element_size() for p in params)
    res.grads = sum(p.numel() * p.element_size() for p in trainable)
    ctx_dim = config["cross_attention_dim"]
    counter = SavedTensorCounter(unet, param_keys)
    rules = cuda_autocast_rules(cuda=device == "cuda") if cuda_rules else contextlib.nullcontext()
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        g = None if fake else torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, latent, latent, generator=g, device=device)
        context = torch.randn(1, 77, ctx_dim, generator=g, device=device)
        vector = config.get("projection_class_embeddings_input_dim")  # SDXL: pooled text + size ids
        extra = {"y": torch.randn(1, vector, generator=g, device=device)} if vector else {}
        timesteps = torch.tensor([500], device=device)
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2, foreach=True)  # CUDA's default impl
        if track:  # AdamW's states exist from the first step on: create them (a zero-gradient step)
            for p in trainable:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)  # Lightning's default
        tracker = PeakTracker() if track else None
        if tracker is not None:
            tracker.track_external(unet, opt, latents, context)
            for p in params:  # MemTracker would register grad hooks on frozen parameters too (and fail)
                if not p.requires_grad:
                    tracker._param_to_grad_hook_handles[p] = (NO_HOOK, NO_HOOK)
        with tracker if tracker is not None else contextlib.nullcontext(), rules:
            casts = ParamCasts(param_keys)
            with casts, autocast_bf16(device, autocast), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                pred = unet(latents, timesteps, context, **extra)
                loss = F.mse_loss(pred.float(), latents)  # loss in fp32, as SD trainers do
            if tracker is not None:
                loss.backward()
                snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
                res.peak_fwd_bwd = snap.pop("Total")
                res.peak_parts = {getattr(k, "value", str(k)): v for k, v in snap.items()}
                opt.step()
                opt.zero_grad(set_to_none=True)
                res.peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    counter.close()
    everything = {**counter.saved, **counter.ckpt_inputs}
    res.saved = sum(everything.values())
    res.weight_copies_saved = sum(b for k, b in everything.items() if k in casts.casts)
    res.casts_cached = sum(casts.casts.values())
    res.fwd_end = sum({**everything, **casts.casts}.values())
    res.optimizer = 2 * res.grads  # exp_avg + exp_avg_sq, fp32 like the trainable params
    if not setup.checkpointing:
        res.block_bytes = counter.block_bytes()
    return res


def frozen_part_params(sdxl: bool = False) -> tuple[int, int, str]:
    """Parameter counts of the SD VAE and the text encoder(s): CLIP ViT-L/14, and for SDXL also OpenCLIP bigG with its
    projection (built on meta when possible)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from ldm.nn import KLAutoencoder

        with torch.device("meta"):
            vae = KLAutoencoder(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, mid_attention=True)
            texts = [CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                  num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))]
            if sdxl:
                texts.append(CLIPTextModelWithProjection(CLIPTextConfig(
                    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")))
        count = sum(p.numel() for t in texts for p in t.parameters())
        return sum(p.numel() for p in vae.parameters()), count, "counted on meta"
    except Exception as err:  # noqa: BLE001 - fall back to the published counts
        if sdxl:
            raise
        return VAE_PARAMS_FALLBACK, CLIP_L_PARAMS_FALLBACK, f"published counts ({type(err).__name__})"


# --------------------------------------------------------------------------------------------- output


def gib(b: float) -> str:
    return f"{b / GIB:6.2f}"


def print_tables(results: list[Result], frozen_bytes: int, title: str = "SD 1.5 UNet, 512x512 -> latents 1x4x64x64, "
                 "context 1x77x768") -> None:
    full = next(r for r in results if not r.setup.lora_rank)
    head = (f"{'setup':<18} | {'trainable':>11} | {'weights':>7} | {'grads':>6} | {'optim':>6} | {'activ.':>6} | "
            f"{'est. total':>10} | {'+VAE/CLIP':>9} | {'simulated':>9}")
    print(f"\nEstimated peak GPU memory, GiB ({title}, bf16-mixed)")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.setup.name:<18} | {r.trainable:>11,} | {gib(r.weights):>7} | {gib(r.grads):>6} | {gib(r.optimizer):>6} | "
              f"{gib(r.activations):>6} | {gib(r.total):>10} | {gib(r.total + frozen_bytes):>9} | {gib(r.peak):>9}")
    n = full.trainable
    print(f"{'formula W+G+O':<18} | {n:>11,} | {gib(4 * n):>7} | {gib(4 * n):>6} | {gib(8 * n):>6} | {'-':>6} | "
          f"{gib(16 * n):>10} | {gib(16 * n + frozen_bytes):>9} | {'-':>9}   (full FT: 16 bytes/param)")
    print("  weights = all UNet params as stored (full: fp32; LoRA: bf16 base + fp32 adapters); grads/optim(AdamW, 2 states) fp32.")
    print("  activ. = saved-for-backward tensors + autocast's bf16 weight copies (ckpt: max(forward end,"
          " checkpointed saves + largest block recomputed)).")
    print("  est. total = weights + grads + optim + activ. (all at once); simulated = MemTracker peak of a whole step (below).")
    print(f"  +VAE/CLIP adds their frozen bf16 weights ({frozen_bytes / GIB:.2f} GiB); with cached latents and text embeddings they"
          " are not needed on the GPU during training steps.")

    print("\nActivation detail, GiB")
    head2 = (f"{'setup':<18} | {'saved(+ckpt in)':>15} | {'bf16 w-copies':>13} | {'autocast cache':>14} | {'fwd end':>7} | "
             f"largest block recomputed")
    print(head2)
    print("-" * len(head2))
    block_of = {r.setup.lora_rank: r.largest_block for r in results if not r.setup.checkpointing}
    for r in results:
        name, b = block_of[r.setup.lora_rank]
        blk = f"{gib(b).strip()} ({name})" if r.setup.checkpointing else "-"
        print(f"{r.setup.name:<18} | {gib(r.saved):>15} | {gib(r.weight_copies_saved):>13} | {gib(r.casts_cached):>14} | "
              f"{gib(r.fwd_end):>7} | {blk}")

    print("\nSimulated training step (fake tensors, torch MemTracker; AdamW states present, grads set_to_none), GiB")
    cats = [c for c in ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Other")
            if any(r.peak_parts.get(c) for r in results)]
    head3 = (f"{'setup':<18} | {'fwd+bwd peak':>12} | " + " | ".join(f"{c[:10]:>10}" for c in cats)
             + f" | {'step peak (incl. AdamW.step)':>28}")
    print(head3)
    print("-" * len(head3))
    for r in results:
        print(f"{r.setup.name:<18} | {gib(r.peak_fwd_bwd):>12} | " + " | ".join(f"{gib(r.peak_parts.get(c, 0)):>10}" for c in cats)
              + f" | {gib(r.peak):>28}")
    print("  (columns between: make-up at the fwd+bwd peak. AdamW(foreach=True), CUDA's default, allocates one fp32 temporary"
          " as large as the trainable params in step(); fused=True would not.)")


def main_estimate(sdxl: bool = False) -> None:
    t0 = time.perf_counter()
    print("NO GPU: every figure below is an ESTIMATE computed on CPU with fake (meta-backed) tensors; nothing was"
          " measured on a GPU.")
    config, latent = (SDXL_UNET, 128) if sdxl else (SD15_UNET, 64)
    results: list[Result] = []
    for rank in (0, 16) if sdxl else (0, 4, 16):
        off = run_setup(Setup(rank, False), config, latent)
        big = max(off.block_bytes.items(), key=lambda kv: kv[1])
        off.largest_block = big
        on = run_setup(Setup(rank, True), config, latent)
        on.largest_block = big
        results += [off, on]
    vae, clip, how = frozen_part_params(sdxl)
    frozen = 2 * (vae + clip)
    name = "SDXL 1.0 base UNet" if sdxl else "SD 1.5 UNet"
    texts = "CLIP ViT-L + OpenCLIP bigG text" if sdxl else "CLIP ViT-L text"
    print(f"{name}: {results[0].weights // 4:,} parameters; VAE {vae:,} + {texts} {clip:,} ({how}).")
    title = ("SDXL base UNet, 1024x1024 -> latents 1x4x128x128, context 1x77x2048, vector 1x2816" if sdxl else
             "SD 1.5 UNet, 512x512 -> latents 1x4x64x64, context 1x77x768")
    print_tables(results, frozen, title)
    print("\nldm's LatentDiffusion keeps the VAE and text encoder as submodules, so Lightning puts them on the GPU even"
          " with caches (use the +VAE/CLIP column); the bf16 frozen weights assume --model.frozen_dtype bf16 (default"
          f" None keeps them fp32: LoRA rows about +{results[0].weights / 2 / GIB:.1f} GiB for the UNet base,"
          f" +{frozen / GIB:.2f} GiB for VAE/text encoders).")
    print("On top of these: CUDA caching-allocator overhead/fragmentation and cuDNN/cuBLAS workspaces (~0.5-1.5 GiB)"
          " and the CUDA context (~0.5 GiB, not in torch.cuda.max_memory_allocated).")
    print(f"(run time {time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------- check


def main_check() -> None:
    """Fake vs real CPU tensors on a tiny UNet; emulated vs real CUDA autocast rules on SD 1.5 (forward)."""
    t0 = time.perf_counter()
    ok = True
    print("1) tiny UNet (32/64 channels, 16x16 latents): fake tensors vs real CPU tensors, bytes")
    print(f"   {'setup':<18} {'autocast':<9} {'saved fake':>11} {'saved real':>11} {'peak fake':>10} {'peak real':>10}"
          "  (saved: exact; peak: within 4 KiB, real CPU mse_loss keeps its scalar in a 4 KiB storage)")
    for setup in (Setup(0, False), Setup(0, True), Setup(4, False), Setup(4, True)):
        for ac in (False, True) if not setup.lora_rank else (True,):  # a bf16 base needs autocast
            f = run_setup(setup, TINY_UNET, 16, fake=True, autocast=ac)
            r = run_setup(setup, TINY_UNET, 16, fake=False, autocast=ac)
            # Saved bytes must agree exactly; peaks up to 4 KiB: CPU's real mse_loss puts its 0-d result in a
            # 4096-byte storage (a fake tensor: 4 bytes).
            same = (f.saved, f.fwd_end) == (r.saved, r.fwd_end) and abs(f.peak - r.peak) <= 4096
            ok &= same
            print(f"   {setup.name:<18} {'bf16' if ac else 'off':<9} {f.saved:>11,} {r.saved:>11,} {f.peak:>10,} {r.peak:>10,}"
                  f"  {'ok' if same else 'DIFFERENT'}")
    print("2) SD 1.5 forward, saved-for-backward bytes: CPU autocast + CUDA rules (what the estimate uses) vs real"
          " CUDA autocast on fake CUDA tensors")
    for rank in (0, 4):
        for ckpt in (False, True):
            s = Setup(rank, ckpt)
            emu = run_setup(s, SD15_UNET, 64, track=False)
            cuda = run_setup(s, SD15_UNET, 64, device="cuda", track=False)
            rel = abs(emu.fwd_end - cuda.fwd_end) / cuda.fwd_end
            ok &= rel < 1e-3
            print(f"   {s.name:<18} emulated {emu.fwd_end:>14,}  cuda {cuda.fwd_end:>14,}  rel. diff {rel:.1e}")
    plain = run_setup(Setup(0, False), SD15_UNET, 64, track=False, cuda_rules=False)
    print(f"   (plain CPU autocast rules would give {plain.fwd_end / GIB:.2f} GiB for full FT ckpt off: norms in bf16)")
    print(f"check {'PASSED' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)")
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="cross-check the counting method (fake vs real tensors)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL 1.0 base at 1024x1024 instead of SD 1.5 at 512x512")
    args = parser.parse_args()
    main_check() if args.check else main_estimate(args.sdxl)


if __name__ == "__main__":
    main()
