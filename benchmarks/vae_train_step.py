"""Autoencoder training-step time: ldm's KLAutoencoder vs diffusers' AutoencoderKL, same architecture.

Both models get identical shapes (checked by parameter count), the same batch and the same loss
(L1 + 1e-6 KL, summed as SD does); forward + backward + Adam step are timed, alternating the two
models so both see the same machine state. Prints median milliseconds per step and the ratio.

    .venv/bin/python benchmarks/vae_train_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_pair(ch: int, ch_mult: tuple[int, ...], blocks: int):
    from diffusers import AutoencoderKL as DiffusersVAE

    from ldm.nn import KLAutoencoder

    ours = KLAutoencoder(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, resolution=32, z_channels=4, mid_attention=True)
    theirs = DiffusersVAE(
        down_block_types=("DownEncoderBlock2D",) * len(ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(ch_mult),
        block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=blocks,
        latent_channels=4,
        norm_num_groups=32,
    )
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs, (n_ours, n_theirs)
    return ours, theirs, n_ours


def step_fn(model, x: torch.Tensor, ours: bool):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        if ours:
            rec, post = model(x)
            kl = post.kl().mean()
        else:
            post = model.encode(x).latent_dist
            rec = model.decode(post.sample()).sample
            kl = post.kl().mean()
        loss = (x - rec).abs().sum() / x.shape[0] + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [
        ("demo f=4 (ch 32, [1,2,2]), 32x32, batch 16", 32, (1, 2, 2), 1, 16, 32),
        ("demo f=4 (ch 32, [1,2,2]), 32x32, batch 64", 32, (1, 2, 2), 1, 64, 32),
        ("SD VAE (ch 128, [1,2,4,4]), 128x128, batch 1", 128, (1, 2, 4, 4), 2, 1, 128),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"{'case':48s} {'params':>8s} {'ldm ms':>9s} {'diffusers ms':>13s} {'diffusers/ldm':>14s}")
    for name, ch, mult, blocks, batch, size in cases:
        ours, theirs, n = build_pair(ch, mult, blocks)
        x = torch.rand(batch, 3, size, size) * 2 - 1
        steps = {"ldm": step_fn(ours, x, True), "diffusers": step_fn(theirs, x, False)}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(2):  # warm-up
            for fn in steps.values():
                fn()
        for _ in range(args.steps):
            for key, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        print(f"{name:48s} {n / 1e6:7.2f}M {ms['ldm']:9.1f} {ms['diffusers']:13.1f} {ms['diffusers'] / ms['ldm']:13.2f}x")


if __name__ == "__main__":
    main()
