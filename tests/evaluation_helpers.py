"""Stand-ins for the evaluation networks nobody may download in a test: a tiny random CLIPModel, random FID Inception
weights."""

from pathlib import Path


def save_tiny_clip(folder: Path, image_size: int = 32) -> Path:
    """A tiny random ``transformers.CLIPModel`` (image and text towers) with its tokenizer, saved in ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from ldm.data.tokenizer import train_clip_tokenizer

    captions = [f"a {c} {s} number {i}" for c in ("red", "blue", "green") for s in ("circle", "square") for i in range(8)]
    train_clip_tokenizer(captions, folder, vocab_size=600)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=len(tokenizer),
                max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    return folder


def random_fid_inception_state(seed: int = 0) -> dict:
    """Random weights in the FID Inception file's layout, scaled so activations stay O(1) through the 40-odd layers
    (the default initialisation shrinks them to ~1e-8, where any wiring would agree)."""
    import torch

    from ldm.evaluation.inception import FIDInceptionV3

    net = FIDInceptionV3()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith("bn.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name == "fc.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.state_dict()
