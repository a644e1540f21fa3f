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

from pathlib import Path
from typing import Any

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.nn.configs import TextEncoderConfig
from ldm.nn.text_encoder import LAYER_CONFIG_KEY, MAX_LENGTH_CONFIG_KEY, MODEL_SUBFOLDER, TOKENIZER_SUBFOLDER, TextEncoder, check_layer

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


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
        model_candidates: list[str | None] = [subfolder_model]
        tokenizer_candidates: list[str | None] = [subfolder_tokenizer]
    else:
        # A hub id: try the repository root, then the diffusers layout.
        model_candidates = [subfolder_model] if subfolder_model is not None else [None, MODEL_SUBFOLDER]
        tokenizer_candidates = (
            [subfolder_tokenizer] if subfolder_tokenizer is not None else [None, TOKENIZER_SUBFOLDER]
        )
    options = {"local_files_only": True} if local else {}
    model = _load_first(CLIPTextModel, name, model_candidates, "text model", options)
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
        intermediate_size=config.intermediate_size or 4 * config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return TextEncoder(CLIPTextModel(clip_config), tokenizer, layer=layer, max_length=config.max_length)
