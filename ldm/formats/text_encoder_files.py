"""Load a CLIP text encoder (:class:`~ldm.nn.text_encoder.TextEncoder`) from a hub id or a folder, or build a new one.

:func:`load_text_encoder` reads a Hugging Face id (``"openai/clip-vit-large-patch14"``, needs network), a
local folder with the model and tokenizer files, or the diffusers layout with ``text_encoder/`` and
``tokenizer/`` subfolders (what :meth:`TextEncoder.save_pretrained` writes, with the layer and length
recorded in the model's ``config.json``). :func:`load_clip_tokenizer` reads a tokenizer alone and
:func:`new_text_encoder` builds a small, randomly initialised CLIP sized to a tokenizer.

Example:
    >>> encoder = load_text_encoder("openai/clip-vit-large-patch14").freeze()
    >>> context = encoder.encode(["a red circle above a blue square", ""])  # (2, 77, 768)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.formats.config_files import read_json_config
from ldm.formats.weights import check_config_fits, open_safetensors
from ldm.nn.configs import Config, ConfigError, TextEncoderConfig, non_negative, positive, probability
from ldm.nn.text_encoder import (LAYER_CONFIG_KEY, LAYERS, MAX_LENGTH_CONFIG_KEY, MODEL_SUBFOLDER, TOKENIZER_SUBFOLDER,
                                 TextEncoder, check_layer)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _at_least_two(value: int) -> str | None:
    return None if value >= 2 else f"got {value}; expected at least 2 (a start and an end token)"


_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


@dataclass(frozen=True)
class CLIPTextShape(Config):
    """The fields of a CLIP text model's config (``text_encoder/config.json``, transformers' ``CLIPTextConfig``) that
    shape the model, with transformers' defaults, and the two ldm records (layer, sequence length), so they are
    checked before transformers builds anything from them.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pad_token_id: int | None = 1
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    dtype: str | None = None
    torch_dtype: str | None = None
    ldm_text_layer: str | None = None
    ldm_max_length: int | None = None

    _RULES = {"attention_dropout": probability, "dropout": probability, "vocab_size": positive, "hidden_size": positive, "intermediate_size": positive,
              "num_hidden_layers": positive, "num_attention_heads": positive, "max_position_embeddings": positive,
              "layer_norm_eps": positive, "projection_dim": positive, "bos_token_id": non_negative,
              "eos_token_id": non_negative, "pad_token_id": non_negative, "ldm_max_length": _at_least_two}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("num_attention_heads", f"hidden_size={self.hidden_size} is not divisible by "
                                                     f"num_attention_heads={self.num_attention_heads}")
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ConfigError("hidden_act", f"got {self.hidden_act!r}; expected one of transformers' activations "
                                            f"({', '.join(sorted(ACT2FN)[:8])}, ...)")
        for key in ("dtype", "torch_dtype"):
            value = getattr(self, key)
            if value is not None and value not in _DTYPES:
                raise ConfigError(key, f"got {value!r}; expected one of {', '.join(_DTYPES)} or null")
        if self.ldm_text_layer is not None and self.ldm_text_layer not in LAYERS:
            raise ConfigError(LAYER_CONFIG_KEY, f"got {self.ldm_text_layer!r}; expected one of {', '.join(LAYERS)}")
        if self.ldm_max_length is not None and self.ldm_max_length > self.max_position_embeddings:
            raise ConfigError(MAX_LENGTH_CONFIG_KEY, f"got {self.ldm_max_length}; expected at most "
                                                     f"max_position_embeddings={self.max_position_embeddings}")


def check_clip_text_config(values: Any, source: str, key: str | None = None) -> CLIPTextShape:
    """``values`` (a CLIP text config dict) checked as :class:`CLIPTextShape`; errors name ``source`` and the key
    (under ``key``, where the config is one entry of a larger one).

    Raises:
        ConfigError: for a value of the wrong type or out of range.
    """
    try:
        return CLIPTextShape.from_dict(values)
    except ConfigError as error:
        raise error.located(source, prefix=key) from None


def _check_clip_weights(values: dict[str, Any], folder: Path, source: str, model_class: type = CLIPTextModel) -> None:
    """Build the CLIP text model ``values`` describe on the meta device and compare it with the shapes in
    ``folder/model.safetensors`` (read from its header), before transformers allocates anything."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return
    try:
        config = CLIPTextConfig(**values)
        with torch.device("meta"):
            CLIPTextModel(config)
    except Exception as error:  # noqa: BLE001  (transformers' checks of its config raise several types)
        raise ConfigError(getattr(error, "field", None) or _culprit(values),
                          f"transformers refuses this CLIP config ({type(error).__name__}: {error})", source) from error
    with open_safetensors(weights) as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    defaulted = [k for k in CLIPTextShape.__dataclass_fields__ if k not in values]
    check_config_fits(lambda: model_class(config), shapes, source, defaulted)


def _culprit(values: dict[str, Any]) -> str | None:
    """The key of a CLIP config without which transformers builds the model (on the meta device), if one is."""
    for key in values:
        try:
            config = CLIPTextConfig(**{k: v for k, v in values.items() if k != key})
            with torch.device("meta"):
                CLIPTextModel(config)
        except Exception:  # noqa: BLE001  (still refused without this key: not the culprit)
            continue
        return key
    return None


def _looks_local(name_or_path: str) -> bool:
    """Whether a string can only be a filesystem path (not a Hugging Face ``owner/name`` id)."""
    path = Path(name_or_path)
    return (
        path.is_absolute()
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


def _has_tokenizer_files(folder: Path) -> bool:
    # CLIPTokenizer.from_pretrained on a folder without tokenizer files silently builds a
    # useless 2-token tokenizer (transformers v5), so check before loading.
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def load_text_encoder(
    name_or_path: str | Path,
    layer: str | None = None,
    max_length: int | None = None,
    subfolder_model: str | None = None,
    subfolder_tokenizer: str | None = None,
    with_projection: bool = False,
) -> TextEncoder:
    """Load a CLIP text model and tokenizer with ``from_pretrained``.

    Accepts a Hugging Face id (``"openai/clip-vit-large-patch14"``, needs network), a local
    folder holding both the model and the tokenizer files, or a diffusers-style folder with
    ``text_encoder/`` and ``tokenizer/`` subfolders (detected automatically, e.g. one written
    by :meth:`TextEncoder.save_pretrained`). For a hub id of a diffusers repository, pass
    ``subfolder_model="text_encoder", subfolder_tokenizer="tokenizer"``.

    Args:
        name_or_path: Hub id or local folder.
        layer: ``"last"`` or ``"penultimate"``; ``None`` uses the value recorded by
            :meth:`TextEncoder.save_pretrained`, else ``"last"``.
        max_length: Sequence length; ``None`` uses the recorded value, else the tokenizer's
            ``model_max_length`` capped at the model's position embeddings (77 for CLIP).
        subfolder_model: Subfolder of the model files, if any.
        subfolder_tokenizer: Subfolder of the tokenizer files, if any.
        with_projection: Load a ``CLIPTextModelWithProjection`` (SDXL's ``text_encoder_2``), whose pooled output
            is projected.

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
        _check_local_files(root, subfolder_model, subfolder_tokenizer)
        config_path = (root / subfolder_model if subfolder_model else root) / "config.json"
        values = read_json_config(config_path)
        check_clip_text_config(values, str(config_path))
        _check_clip_weights(values, config_path.parent, str(config_path),
                            CLIPTextModelWithProjection if with_projection else CLIPTextModel)
        model_candidates: list[str | None] = [subfolder_model]
        tokenizer_candidates: list[str | None] = [subfolder_tokenizer]
    else:
        # A hub id: try the repository root, then the diffusers layout.
        model_candidates = [subfolder_model] if subfolder_model is not None else [None, MODEL_SUBFOLDER]
        tokenizer_candidates = (
            [subfolder_tokenizer] if subfolder_tokenizer is not None else [None, TOKENIZER_SUBFOLDER]
        )
    options = {"local_files_only": True} if local else {}
    try:
        model = _load_first(CLIPTextModelWithProjection if with_projection else CLIPTextModel, name, model_candidates,
                            "text model", options)
    except Exception as error:  # noqa: BLE001  (transformers' checks of its config raise several types)
        if not local or isinstance(error, OSError):
            raise
        key = getattr(error, "field", None) or _culprit(read_json_config(config_path))
        raise ConfigError(key, f"transformers refuses this CLIP config ({type(error).__name__}: {error})",
                          str(config_path)) from error
    tokenizer = _load_first(CLIPTokenizer, name, tokenizer_candidates, "tokenizer", options)

    if layer is None:
        layer = getattr(model.config, LAYER_CONFIG_KEY, None) or "last"
    if max_length is None:
        max_length = getattr(model.config, MAX_LENGTH_CONFIG_KEY, None) or min(
            int(tokenizer.model_max_length), model.config.max_position_embeddings
        )
    return TextEncoder(model, tokenizer, layer=layer, max_length=max_length).eval()


def load_clip_tokenizer(name_or_path: str | Path) -> CLIPTokenizer:
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
        if not _has_tokenizer_files(folder):
            raise FileNotFoundError(f"no CLIP tokenizer files (tokenizer.json or vocab.json) in {str(folder)!r}")
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if _looks_local(name):
        raise FileNotFoundError(f"tokenizer path {name!r} does not exist; give a folder with a CLIP tokenizer")
    return _load_first(CLIPTokenizer, name, [None, TOKENIZER_SUBFOLDER], "tokenizer", {})


def _check_local_files(root: Path, subfolder_model: str | None, subfolder_tokenizer: str | None) -> None:
    model_dir = root / subfolder_model if subfolder_model else root
    tokenizer_dir = root / subfolder_tokenizer if subfolder_tokenizer else root
    problems = []
    if not (model_dir / "config.json").is_file():
        problems.append(f"no config.json in {str(model_dir)!r}")
    if not _has_tokenizer_files(tokenizer_dir):
        problems.append(f"no tokenizer.json or vocab.json in {str(tokenizer_dir)!r}")
    if problems:
        raise FileNotFoundError(
            f"Cannot load a CLIP text encoder from {str(root)!r}: {'; '.join(problems)}. Expected a folder "
            f"with a CLIPTextModel and its tokenizer, or '{MODEL_SUBFOLDER}/' and '{TOKENIZER_SUBFOLDER}/' "
            "subfolders (the diffusers layout written by TextEncoder.save_pretrained)."
        )


def _load_first(loader: type, name: str, subfolders: list[str | None], what: str, options: dict[str, Any]) -> Any:
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


def new_text_encoder(
    tokenizer: str | Path | CLIPTokenizer,
    config: TextEncoderConfig = TextEncoderConfig(),  # noqa: B008 (frozen)
    layer: str = "last",
) -> TextEncoder:
    """A small, randomly initialised CLIP text model sized to a tokenizer (for training from scratch).

    Args:
        tokenizer: Folder that ``CLIPTokenizer.from_pretrained`` loads (e.g. one written by
            :func:`ldm.data.tokenizer.train_clip_tokenizer`), or a tokenizer instance.
        config: Its size (:class:`~ldm.nn.configs.TextEncoderConfig`: ``hidden_size``, ``num_layers``,
            ``num_heads``, ``intermediate_size``, ``max_length``).
        layer: ``"last"`` or ``"penultimate"`` (needs ``num_layers >= 2`` to differ from the
            embeddings).

    Returns:
        The encoder, in train mode, with the model's vocabulary matching the tokenizer.

    Raises:
        ValueError: For sizes that do not fit together.
        FileNotFoundError: If ``tokenizer`` is not a folder with tokenizer files.
    """
    check_layer(layer)
    if config.num_layers < 1 or (layer == "penultimate" and config.num_layers < 2):
        raise ValueError(f"num_layers={config.num_layers} is too few for layer={layer!r}.")
    if not isinstance(tokenizer, CLIPTokenizer):
        folder = Path(tokenizer).expanduser()
        if not _has_tokenizer_files(folder):
            raise FileNotFoundError(
                f"No CLIP tokenizer in {str(tokenizer)!r} (expected tokenizer.json or vocab.json + "
                "merges.txt). Build one with ldm.data.tokenizer.train_clip_tokenizer(captions, path)."
            )
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size if config.intermediate_size is None else config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return TextEncoder(CLIPTextModel(clip_config), tokenizer, layer=layer, max_length=config.max_length)
