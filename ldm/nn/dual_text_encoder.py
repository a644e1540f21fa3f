"""SDXL's two text encoders as one conditioning module: CLIP ViT-L and OpenCLIP ViT-bigG.

Both read the penultimate hidden states without the final layer norm (``layer="penultimate_raw"``); their tokens are
concatenated along the channels (768 + 1280 = 2048 for SDXL), and the second, a
``transformers.CLIPTextModelWithProjection``, also gives the pooled, projected text embedding (1280) that goes into
the UNet's vector conditioning. Each encoder keeps its own tokenizer (SDXL's second pads with ``!``); ``prompts_2``
may give the second encoder other prompts, as diffusers' ``prompt_2`` does.

Example:
    >>> context, pooled = encoder.encode_with_pooled(["a photo of a cat"])  # (1, 77, 2048), (1, 1280)
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn

from ldm.nn.text_encoder import TextEncoder

__all__ = ["DualTextEncoder"]


class DualTextEncoder(nn.Module):
    """Two :class:`TextEncoder` s whose token embeddings are concatenated; the second's pooled output is the pooled one.

    Args:
        first: SDXL's CLIP ViT-L (``text_encoder/``).
        second: SDXL's OpenCLIP bigG as ``CLIPTextModelWithProjection`` (``text_encoder_2/``).

    Raises:
        ValueError: when the two encoders' sequence lengths differ (their tokens are concatenated).
    """

    def __init__(self, first: TextEncoder, second: TextEncoder) -> None:
        super().__init__()
        if first.max_length != second.max_length:
            raise ValueError(f"the two text encoders must take the same sequence length to be concatenated, got "
                             f"{first.max_length} and {second.max_length}")
        self.first, self.second = first, second

    @property
    def encoders(self) -> tuple[TextEncoder, TextEncoder]:
        return self.first, self.second

    @property
    def hidden_size(self) -> int:
        """Width of the concatenated token embeddings (the UNet's ``context_dim``)."""
        return self.first.hidden_size + self.second.hidden_size

    @property
    def pooled_size(self) -> int:
        """Width of the pooled embedding (the second encoder's projection)."""
        return self.second.pooled_size

    @property
    def max_length(self) -> int:
        return self.first.max_length

    @property
    def device(self) -> torch.device:
        return self.first.device

    @property
    def trainable(self) -> bool:
        return self.first.trainable or self.second.trainable

    @property
    def frozen(self) -> bool:
        return self.first.frozen and self.second.frozen

    def freeze(self) -> Self:
        """Freeze both encoders (eval mode, no gradients)."""
        self.first.freeze()
        self.second.freeze()
        return self.eval()

    def unfreeze(self) -> Self:
        self.first.unfreeze()
        self.second.unfreeze()
        return self

    def tokenize(self, prompts: str | list[str], prompts_2: str | list[str] | None = None) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Token ids of each encoder's tokenizer; ``prompts_2`` (None: ``prompts``) for the second."""
        return self.first.tokenize(prompts), self.second.tokenize(prompts if prompts_2 is None else prompts_2)

    def forward_with_pooled(self, input_ids: torch.LongTensor, input_ids_2: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, hidden_size)`` concatenated token embeddings and ``(B, pooled_size)`` pooled embedding."""
        tokens_1, _ = self.first.forward_with_pooled(input_ids)
        tokens_2, pooled = self.second.forward_with_pooled(input_ids_2)
        return torch.cat([tokens_1, tokens_2], dim=-1), pooled

    def forward(self, input_ids: torch.LongTensor, input_ids_2: torch.LongTensor) -> torch.Tensor:
        return self.forward_with_pooled(input_ids, input_ids_2)[0]

    def encode_with_pooled(self, prompts: str | list[str], prompts_2: str | list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and embed: the context (B, L, hidden_size) and the pooled embedding (B, pooled_size)."""
        if prompts_2 is not None:
            n_1 = 1 if isinstance(prompts, str) else len(prompts)
            n_2 = 1 if isinstance(prompts_2, str) else len(prompts_2)
            if n_1 != n_2:
                raise ValueError(f"prompt_2 has {n_2} entries for {n_1} prompts; give one per prompt")
        ids_1, ids_2 = self.tokenize(prompts, prompts_2)
        return self.forward_with_pooled(ids_1.to(self.first.device), ids_2.to(self.second.device))

    def encode(self, prompts: str | list[str], prompts_2: str | list[str] | None = None) -> torch.Tensor:
        return self.encode_with_pooled(prompts, prompts_2)[0]

    def save_pretrained(self, path) -> None:
        """``text_encoder/``, ``tokenizer/``, ``text_encoder_2/`` and ``tokenizer_2/`` under ``path`` (diffusers' SDXL layout)."""
        self.first.save_pretrained(path)
        self.second.save_pretrained(path, "text_encoder_2", "tokenizer_2")

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, pooled_size={self.pooled_size}"
