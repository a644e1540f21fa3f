"""The CLIP text encoder that conditions the UNet: ``transformers.CLIPTextModel`` plus its tokenizer.

This is a thin wrapper, not a re-implementation: the weights, the architecture and the tokenizer are
exactly those of ``transformers``, so Stable Diffusion's text encoders load unchanged
(``openai/clip-vit-large-patch14`` for SD 1.x, a diffusers folder's ``text_encoder/`` and
``tokenizer/`` for any SD version). The wrapper adds what the diffusion model needs: fixed-length
tokenization with a warning when a prompt is cut, the choice of the last or the penultimate hidden
layer (SD 2.x), freezing, and saving in the diffusers layout.

Example:
    >>> encoder = TextEncoder.from_pretrained("openai/clip-vit-large-patch14").freeze()
    >>> context = encoder.encode(["a red circle above a blue square", ""])  # (2, 77, 768)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Self

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

LAYERS = ("last", "penultimate")
MODEL_SUBFOLDER = "text_encoder"
TOKENIZER_SUBFOLDER = "tokenizer"
# Keys recorded in the text encoder's config.json by ``save_pretrained`` so that loading restores them.
_LAYER_KEY = "ldm_text_layer"
_MAX_LENGTH_KEY = "ldm_max_length"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _check_layer(layer: str) -> str:
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}.")
    return layer


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_local(name_or_path: str) -> bool:
    """Whether a string can only be a filesystem path (not a Hugging Face ``owner/name`` id)."""
    path = Path(name_or_path)
    return (
        path.is_absolute()
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


def _final_layer_norm(model: CLIPTextModel) -> nn.LayerNorm:
    """The final layer norm (``model.final_layer_norm`` in transformers v5, ``model.text_model.*`` in v4)."""
    norm = getattr(model, "final_layer_norm", None)
    if norm is None:
        norm = model.text_model.final_layer_norm
    return norm


class TextEncoder(nn.Module):
    """A CLIP text encoder with its tokenizer, turning prompts into cross-attention context.

    Args:
        model: The ``CLIPTextModel``.
        tokenizer: The matching ``CLIPTokenizer``.
        layer: ``"last"`` for the final hidden states (SD 1.x), or ``"penultimate"`` for the
            second-to-last hidden states passed through the final layer norm (SD 2.x).
        max_length: Token sequence length, bos and eos included; prompts are padded to it and
            cut at it. At most the model's ``max_position_embeddings``.

    Raises:
        ValueError: For an unknown ``layer`` or a ``max_length`` the model cannot take.
    """

    def __init__(
        self,
        model: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        layer: str = "last",
        max_length: int = 77,
    ) -> None:
        super().__init__()
        self.layer = _check_layer(layer)
        max_positions = model.config.max_position_embeddings
        if not 2 <= max_length <= max_positions:
            raise ValueError(
                f"max_length={max_length} must be between 2 and the model's max_position_embeddings={max_positions}."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._frozen = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        layer: str | None = None,
        max_length: int | None = None,
        subfolder_model: str | None = None,
        subfolder_tokenizer: str | None = None,
    ) -> TextEncoder:
        """Load a CLIP text model and tokenizer with ``from_pretrained``.

        Accepts a Hugging Face id (``"openai/clip-vit-large-patch14"``, needs network), a local
        folder holding both the model and the tokenizer files, or a diffusers-style folder with
        ``text_encoder/`` and ``tokenizer/`` subfolders (detected automatically, e.g. one written
        by :meth:`save_pretrained`). For a hub id of a diffusers repository, pass
        ``subfolder_model="text_encoder", subfolder_tokenizer="tokenizer"``.

        Args:
            name_or_path: Hub id or local folder.
            layer: ``"last"`` or ``"penultimate"``; ``None`` uses the value recorded by
                :meth:`save_pretrained`, else ``"last"``.
            max_length: Sequence length; ``None`` uses the recorded value, else the tokenizer's
                ``model_max_length`` capped at the model's position embeddings (77 for CLIP).
            subfolder_model: Subfolder of the model files, if any.
            subfolder_tokenizer: Subfolder of the tokenizer files, if any.

        Returns:
            The loaded encoder, in eval mode, not frozen.

        Raises:
            FileNotFoundError: If a local path does not exist or lacks the model or tokenizer files.
            OSError: If the model or tokenizer cannot be loaded from ``name_or_path``.
        """
        name = str(name_or_path)
        root = Path(name).expanduser()
        local = root.is_dir()
        if not local and _looks_local(name):
            raise FileNotFoundError(
                f"Text encoder path {name!r} does not exist. Give a local folder with a CLIP text model "
                f"and tokenizer (or diffusers-style '{MODEL_SUBFOLDER}/' and '{TOKENIZER_SUBFOLDER}/' subfolders), "
                "or a Hugging Face id such as 'openai/clip-vit-large-patch14'."
            )
        if local:
            if subfolder_model is None and (root / MODEL_SUBFOLDER / "config.json").is_file():
                subfolder_model = MODEL_SUBFOLDER
            if subfolder_tokenizer is None and (root / TOKENIZER_SUBFOLDER).is_dir():
                subfolder_tokenizer = TOKENIZER_SUBFOLDER
            cls._check_local_files(root, subfolder_model, subfolder_tokenizer)
            model_candidates: list[str | None] = [subfolder_model]
            tokenizer_candidates: list[str | None] = [subfolder_tokenizer]
        else:
            # A hub id: try the repository root, then the diffusers layout.
            model_candidates = [subfolder_model] if subfolder_model is not None else [None, MODEL_SUBFOLDER]
            tokenizer_candidates = (
                [subfolder_tokenizer] if subfolder_tokenizer is not None else [None, TOKENIZER_SUBFOLDER]
            )
        options = {"local_files_only": True} if local else {}
        model = cls._load_first(CLIPTextModel, name, model_candidates, "text model", options)
        tokenizer = cls._load_first(CLIPTokenizer, name, tokenizer_candidates, "tokenizer", options)

        if layer is None:
            layer = getattr(model.config, _LAYER_KEY, None) or "last"
        if max_length is None:
            max_length = getattr(model.config, _MAX_LENGTH_KEY, None) or min(
                int(tokenizer.model_max_length), model.config.max_position_embeddings
            )
        return cls(model, tokenizer, layer=layer, max_length=max_length).eval()

    @staticmethod
    def load_tokenizer(name_or_path: str | Path) -> CLIPTokenizer:
        """A CLIP tokenizer from a local folder (its root or a ``tokenizer/`` subfolder) or a hub id.

        Raises:
            FileNotFoundError: If a local path does not exist or holds no tokenizer files.
            OSError: If a hub id cannot be loaded (e.g. offline).
        """
        name = str(name_or_path)
        root = Path(name).expanduser()
        if root.is_dir():
            sub = TOKENIZER_SUBFOLDER if (root / TOKENIZER_SUBFOLDER).is_dir() else None
            folder = root / sub if sub else root
            if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
                raise FileNotFoundError(f"no CLIP tokenizer files (tokenizer.json or vocab.json) in {str(folder)!r}")
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        if _looks_local(name):
            raise FileNotFoundError(f"tokenizer path {name!r} does not exist; give a folder with a CLIP tokenizer")
        return TextEncoder._load_first(CLIPTokenizer, name, [None, TOKENIZER_SUBFOLDER], "tokenizer", {})

    @staticmethod
    def _check_local_files(root: Path, subfolder_model: str | None, subfolder_tokenizer: str | None) -> None:
        model_dir = root / subfolder_model if subfolder_model else root
        tokenizer_dir = root / subfolder_tokenizer if subfolder_tokenizer else root
        problems = []
        if not (model_dir / "config.json").is_file():
            problems.append(f"no config.json in {str(model_dir)!r}")
        # CLIPTokenizer.from_pretrained on a folder without tokenizer files silently builds a
        # useless 2-token tokenizer (transformers v5), so check before loading.
        if not any((tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES):
            problems.append(f"no tokenizer.json or vocab.json in {str(tokenizer_dir)!r}")
        if problems:
            raise FileNotFoundError(
                f"Cannot load a CLIP text encoder from {str(root)!r}: {'; '.join(problems)}. Expected a folder "
                f"with a CLIPTextModel and its tokenizer, or '{MODEL_SUBFOLDER}/' and '{TOKENIZER_SUBFOLDER}/' "
                "subfolders (the diffusers layout written by TextEncoder.save_pretrained)."
            )

    @staticmethod
    def _load_first(loader: type, name: str, subfolders: list[str | None], what: str, options: dict) -> object:
        errors = []
        for subfolder in subfolders:
            kwargs = dict(options, subfolder=subfolder) if subfolder else dict(options)
            try:
                return loader.from_pretrained(name, **kwargs)
            except (OSError, ValueError) as error:
                errors.append(f"{subfolder or '.'}: {error}")
        raise OSError(
            f"Could not load the CLIP {what} from {name!r} (tried subfolders "
            f"{[s or '.' for s in subfolders]}). Give a Hugging Face id such as 'openai/clip-vit-large-patch14' "
            f"(needs network), a local folder, or a diffusers folder with '{MODEL_SUBFOLDER}/' and "
            f"'{TOKENIZER_SUBFOLDER}/'. Errors: {' | '.join(errors)}"
        )

    @classmethod
    def from_config(
        cls,
        tokenizer_path: str | Path | CLIPTokenizer,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int | None = None,
        max_length: int = 77,
        layer: str = "last",
    ) -> TextEncoder:
        """A small, randomly initialised CLIP text model sized to a tokenizer (for training from scratch).

        Args:
            tokenizer_path: Folder that ``CLIPTokenizer.from_pretrained`` loads (e.g. one written by
                :func:`ldm.data.tokenizer.train_clip_tokenizer`), or a tokenizer instance.
            hidden_size: Width of the model, which is the cross-attention context dimension.
            num_layers: Transformer layers.
            num_heads: Attention heads; must divide ``hidden_size``.
            intermediate_size: MLP width; ``4 * hidden_size`` when ``None``.
            max_length: Sequence length, also the number of position embeddings.
            layer: ``"last"`` or ``"penultimate"`` (needs ``num_layers >= 2`` to differ from the
                embeddings).

        Returns:
            The encoder, in train mode, with the model's vocabulary matching the tokenizer.

        Raises:
            ValueError: For sizes that do not fit together.
            FileNotFoundError: If ``tokenizer_path`` is not a folder with tokenizer files.
        """
        _check_layer(layer)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        if num_layers < 1 or (layer == "penultimate" and num_layers < 2):
            raise ValueError(f"num_layers={num_layers} is too few for layer={layer!r}.")
        if isinstance(tokenizer_path, CLIPTokenizer):
            tokenizer = tokenizer_path
        else:
            folder = Path(tokenizer_path).expanduser()
            if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
                raise FileNotFoundError(
                    f"No CLIP tokenizer in {str(tokenizer_path)!r} (expected tokenizer.json or vocab.json + "
                    "merges.txt). Build one with ldm.data.tokenizer.train_clip_tokenizer(captions, path)."
                )
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return cls(CLIPTextModel(config), tokenizer, layer=layer, max_length=max_length)

    # ------------------------------------------------------------------ properties and state
    @property
    def hidden_size(self) -> int:
        """Width of the embeddings (the UNet's cross-attention ``context_dim``)."""
        return int(self.model.config.hidden_size)

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
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
        if self.layer == "last":
            return self.model(input_ids=input_ids).last_hidden_state
        hidden_states = self.model(input_ids=input_ids, output_hidden_states=True).hidden_states
        return _final_layer_norm(self.model)(hidden_states[-2])

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Tokenize prompts, move the ids to the model's device and embed them.

        Args:
            prompts: One prompt or a list.

        Returns:
            ``(batch, max_length, hidden_size)`` context for cross-attention.
        """
        return self(self.tokenize(prompts).to(self.device))

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``path/text_encoder/`` (config + safetensors) and ``path/tokenizer/``, the diffusers layout.

        ``layer`` and ``max_length`` are recorded in the text encoder's ``config.json`` so that
        :meth:`from_pretrained` restores them.

        Args:
            path: Output folder, created if missing.

        Returns:
            ``path`` as a ``Path``.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        setattr(self.model.config, _LAYER_KEY, self.layer)
        setattr(self.model.config, _MAX_LENGTH_KEY, self.max_length)
        self.model.save_pretrained(out / MODEL_SUBFOLDER)
        # The fast tokenizer keeps the padding/truncation of its last call in its state, and
        # transformers v5 writes that state into tokenizer.json (and re-applies it on load).
        backend = self.tokenizer.backend_tokenizer
        backend.no_padding()
        backend.no_truncation()
        self.tokenizer.save_pretrained(out / TOKENIZER_SUBFOLDER)
        return out

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, max_length={self.max_length}, hidden_size={self.hidden_size}"
