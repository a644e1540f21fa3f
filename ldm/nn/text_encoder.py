"""The CLIP text encoder that conditions the UNet: ``transformers.CLIPTextModel`` plus its tokenizer.

This is a thin wrapper, not a re-implementation: the weights, the architecture and the tokenizer are
exactly those of ``transformers``, so Stable Diffusion's text encoders load unchanged
(``openai/clip-vit-large-patch14`` for SD 1.x, a diffusers folder's ``text_encoder/`` and
``tokenizer/`` for any SD version). The wrapper adds what the diffusion model needs: fixed-length
tokenization with a warning when a prompt is cut, the choice of the last or the penultimate hidden
layer (SD 2.x), freezing, and saving in the diffusers layout. Loading (hub ids, folders, tokenizers)
and building a new small CLIP are :mod:`ldm.formats.text_encoder_files`' job.

Example:
    >>> encoder = load_text_encoder("openai/clip-vit-large-patch14").freeze()  # ldm.formats.text_encoder_files
    >>> context = encoder.encode(["a red circle above a blue square", ""])  # (2, 77, 768)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Self

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

LAYERS = ("last", "penultimate", "penultimate_raw")
MODEL_SUBFOLDER = "text_encoder"
TOKENIZER_SUBFOLDER = "tokenizer"
# Keys recorded in the text encoder's config.json by ``save_pretrained`` so that loading restores them.
LAYER_CONFIG_KEY = "ldm_text_layer"
MAX_LENGTH_CONFIG_KEY = "ldm_max_length"


def check_layer(layer: str) -> str:
    """``layer`` if it is one of :data:`LAYERS`, else ``ValueError``."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}.")
    return layer


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _final_layer_norm(model: CLIPTextModel) -> nn.LayerNorm:
    """The final layer norm (``model.final_layer_norm`` in transformers v5, ``model.text_model.*`` in v4)."""
    norm = getattr(model, "final_layer_norm", None)
    if norm is None:
        norm = model.text_model.final_layer_norm
    return norm


class TextEncoder(nn.Module):
    """A CLIP text encoder with its tokenizer, turning prompts into cross-attention context.

    Args:
        model: The ``CLIPTextModel``, or a ``CLIPTextModelWithProjection`` (SDXL's second encoder,
            whose projected pooled output :meth:`encode_with_pooled` returns).
        tokenizer: The matching ``CLIPTokenizer``.
        layer: ``"last"`` for the final hidden states (SD 1.x), ``"penultimate"`` for the
            second-to-last hidden states passed through the final layer norm (SD 2.x), or
            ``"penultimate_raw"`` for them without that norm (both SDXL encoders).
        max_length: Token sequence length, bos and eos included; prompts are padded to it and
            cut at it. At most the model's ``max_position_embeddings``.

    Raises:
        ValueError: For an unknown ``layer`` or a ``max_length`` the model cannot take.
    """

    def __init__(
        self,
        model: CLIPTextModel | CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        layer: str = "last",
        max_length: int = 77,
    ) -> None:
        super().__init__()
        self.layer = check_layer(layer)
        max_positions = model.config.max_position_embeddings
        if not 2 <= max_length <= max_positions:
            raise ValueError(
                f"max_length={max_length} must be between 2 and the model's max_position_embeddings={max_positions}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._frozen = False

    # ------------------------------------------------------------------ properties and state
    @property
    def hidden_size(self) -> int:
        """Width of the embeddings (the UNet's cross-attention ``context_dim``)."""
        return int(self.model.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        """Width of the pooled output: the projection's for a ``CLIPTextModelWithProjection``, else ``hidden_size``."""
        if isinstance(self.model, CLIPTextModelWithProjection):
            return int(self.model.config.projection_dim)
        return self.hidden_size

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def trainable(self) -> bool:
        """Whether any parameter requires gradients (``False`` after :meth:`freeze`)."""
        return any(p.requires_grad for p in self.model.parameters())

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` was called (and not undone by :meth:`unfreeze`)."""
        return self._frozen

    def freeze(self) -> Self:
        """Put the model in eval mode and stop its gradients; it stays in eval mode under ``.train()``.

        Returns:
            ``self``, for chaining.
        """
        self._frozen = True
        self.model.requires_grad_(False)
        return self.eval()

    def unfreeze(self) -> Self:
        """Undo :meth:`freeze`: parameters require gradients again and ``.train()`` applies.

        Returns:
            ``self``, for chaining.
        """
        self._frozen = False
        self.model.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> Self:
        """Set train mode, except that a frozen encoder always stays in eval mode."""
        return super().train(mode and not self._frozen)

    # ------------------------------------------------------------------ encoding
    def tokenize(self, prompts: str | list[str]) -> torch.LongTensor:
        """Token ids padded and cut to ``max_length``; warns for each prompt that gets cut.

        Args:
            prompts: One prompt or a list; ``""`` gives bos, eos and padding (the unconditional prompt).

        Returns:
            ``LongTensor`` of shape ``(batch, max_length)`` on the CPU.

        Raises:
            TypeError: If a prompt is not a string.
            ValueError: For an empty list.
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise ValueError("tokenize() needs at least one prompt (use '' for the unconditional prompt).")
        for prompt in batch:
            if not isinstance(prompt, str):
                raise TypeError(f"Prompts must be strings, got {type(prompt).__name__}: {prompt!r}.")
        full_lengths = [len(ids) for ids in self.tokenizer(batch, verbose=False)["input_ids"]]
        for prompt, length in zip(batch, full_lengths):
            if length > self.max_length:
                warnings.warn(
                    f"Prompt {_shorten(prompt)!r} is {length} tokens long; truncated to max_length="
                    f"{self.max_length}, dropping {length - self.max_length} tokens.",
                    stacklevel=2,
                )
        encoded = self.tokenizer(
            batch, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return encoded["input_ids"]

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Embed token ids.

        Args:
            input_ids: ``(batch, seq_len)`` token ids, usually from :meth:`tokenize`.

        Returns:
            ``(batch, seq_len, hidden_size)`` hidden states of the configured layer.
        """
        return self.forward_with_pooled(input_ids)[0]

    def forward_with_pooled(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the configured layer and the pooled output: the final layer-normed state of the
        end-of-text token, projected by a ``CLIPTextModelWithProjection`` (``text_embeds``, SDXL's pooled text
        embedding), as it is for a ``CLIPTextModel`` (``pooler_output``).

        Returns:
            ``(batch, seq_len, hidden_size)`` and ``(batch, pooled_size)``.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
        out = self.model(input_ids=input_ids, output_hidden_states=self.layer != "last")
        pooled = out.text_embeds if isinstance(self.model, CLIPTextModelWithProjection) else out.pooler_output
        if self.layer == "last":
            return out.last_hidden_state, pooled
        if self.layer == "penultimate_raw":
            return out.hidden_states[-2], pooled
        return _final_layer_norm(self.model)(out.hidden_states[-2]), pooled

    def encode_with_pooled(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` and the pooled output (:meth:`forward_with_pooled`)."""
        return self.forward_with_pooled(self.tokenize(prompts).to(self.device))

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Tokenize prompts, move the ids to the model's device and embed them.

        Args:
            prompts: One prompt or a list.

        Returns:
            ``(batch, max_length, hidden_size)`` context for cross-attention.
        """
        return self(self.tokenize(prompts).to(self.device))

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | Path, model_subfolder: str = MODEL_SUBFOLDER,
                        tokenizer_subfolder: str = TOKENIZER_SUBFOLDER) -> Path:
        """Write ``path/text_encoder/`` (config + safetensors) and ``path/tokenizer/``, the diffusers layout (SDXL's
        second encoder: ``text_encoder_2/`` and ``tokenizer_2/``).

        ``layer`` and ``max_length`` are recorded in the text encoder's ``config.json`` so that
        :func:`ldm.formats.text_encoder_files.load_text_encoder` restores them.

        Args:
            path: Output folder, created if missing.

        Returns:
            ``path`` as a ``Path``.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        setattr(self.model.config, LAYER_CONFIG_KEY, self.layer)
        setattr(self.model.config, MAX_LENGTH_CONFIG_KEY, self.max_length)
        self.model.save_pretrained(out / model_subfolder)
        # The fast tokenizer keeps the padding/truncation of its last call in its state, and
        # transformers v5 writes that state into tokenizer.json (and re-applies it on load).
        backend = self.tokenizer.backend_tokenizer
        backend.no_padding()
        backend.no_truncation()
        self.tokenizer.save_pretrained(out / tokenizer_subfolder)
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, max_length={self.max_length}, hidden_size={self.hidden_size}"
