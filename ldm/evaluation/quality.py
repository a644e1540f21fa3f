"""Sample quality of a text-to-image model against a dataset: FD/KID (+ IS) on a feature network, and CLIP score.

``ldm evaluate quality`` and the :class:`ldm.models.QualityMetrics` callback both come here:

1. :func:`choose_real_sets`: a seeded choice of N images of the dataset (the *reference*) and, disjoint from them,
   up to N more (the *floor* set).
2. The model draws one sample for the first caption of each reference image (seed ``seed + i`` for sample ``i``).
3. :func:`quality_metrics`: the Frechet distance and KID between the samples' and the reference's features, and the
   same between the floor set and the reference: the **real-vs-real floor**, what a perfect model would score at
   this sample size (both figures are biased by small N; FD upwards, so it never reaches 0). With Inception
   weights also IS (of the samples, and of the reference for scale); with a CLIP model the CLIP score of the
   samples with their prompts, and of the reference images with the same captions.

Figure names follow the feature network (:mod:`ldm.evaluation.feature_networks`): FID/KID/IS only with FID's
Inception-v3, FD_data/KID_data with the network trained on the dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm.evaluation.feature_networks import FeatureNetwork
from ldm.evaluation.statistics import frechet_distance, inception_score, kernel_distance

__all__ = ["CLIP_MISSING", "IS_MISSING", "ScoredSet", "choose_real_sets", "evaluate_model_quality", "evaluate_quality",
           "first_captions", "format_quality_table", "load_images", "quality_metrics", "set_statistics"]

IS_MISSING = "needs --inception-weights"
CLIP_MISSING = "needs --clip-model (the model's own text encoder has no image tower)"


def choose_real_sets(num_images: int, num_samples: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded indices of the reference set (``num_samples`` images) and the disjoint floor set (up to as many of the
    rest; empty when fewer than 2 are left)."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2 (FD and KID compare sets), got {num_samples}")
    if num_samples > num_images:
        raise ValueError(f"num_samples {num_samples} is more than the dataset's {num_images} images: use "
                         f"--num-samples {num_images} or fewer (the samples are compared with as many real images)")
    order = np.random.default_rng(seed).permutation(num_images).tolist()
    floor = order[num_samples : 2 * num_samples]
    return order[:num_samples], floor if len(floor) >= 2 else []


def load_images(dataset, indices: list[int]) -> torch.Tensor:
    """Images ``indices`` of an :class:`~ldm.data.ImageCaptionDataset` as one (N, 3, H, W) tensor in [-1, 1]."""
    return torch.stack([dataset.image(i) for i in indices])


def first_captions(dataset, indices: list[int]) -> list[str]:
    """The first caption of each image (``""``, unconditional, for an image without captions)."""
    return [dataset.records[i].captions[0] if dataset.records[i].captions else "" for i in indices]


def _inception_splits(n: int) -> int:
    return 10 if n >= 1000 else max(1, n // 100)


class ScoredSet:
    """An image set's features (and class probabilities and CLIP scores), accumulated batch by batch so that large
    sets never sit in memory as images; the first ``keep`` images are kept (for a grid).

    Args:
        network: The feature network.
        clip: A :class:`~ldm.evaluation.clip_score.ClipScorer`, or None.
        keep: Images to keep.
    """

    def __init__(self, network: FeatureNetwork, clip=None, keep: int = 0):
        self.network, self.clip, self.keep = network, clip, keep
        self._features: list[np.ndarray] = []
        self._probabilities: list[np.ndarray] = []
        self._clip: list[np.ndarray] = []
        self.kept: list[torch.Tensor] = []

    def add(self, images: torch.Tensor, prompts: list[str] | None = None) -> None:
        features, probabilities = self.network.features_and_probabilities(images)
        self._features.append(features)
        if probabilities is not None:
            self._probabilities.append(probabilities)
        if self.clip is not None and prompts is not None:
            self._clip.append(self.clip.per_image(images, prompts))
        missing = self.keep - sum(len(k) for k in self.kept)
        if missing > 0:
            self.kept.append(images[:missing].detach().float().cpu())

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self._features)

    @property
    def probabilities(self) -> np.ndarray | None:
        return np.concatenate(self._probabilities) if self._probabilities else None

    @property
    def clip_score(self) -> float | None:
        return float(np.concatenate(self._clip).mean()) if self._clip else None

    def __len__(self) -> int:
        return sum(len(f) for f in self._features)


def set_statistics(network: FeatureNetwork, generated: ScoredSet, reference: ScoredSet, floor: ScoredSet | None = None,
                   seed: int = 0, kid_subsets: int = 100) -> dict[str, float | int | None]:
    """The figures of :func:`quality_metrics` from sets already scored."""
    fd, kid = network.keys["fd"], network.keys["kid"]
    gen_f, ref_f = generated.features, reference.features
    subset = min(1000, len(gen_f), len(ref_f))
    kid_mean, kid_std = kernel_distance(gen_f, ref_f, subset_size=subset, subsets=kid_subsets, seed=seed)
    out: dict[str, float | int | None] = {fd: frechet_distance(gen_f, ref_f), kid: kid_mean, f"{kid}_std": kid_std,
                                          f"{fd}_floor": None, f"{kid}_floor": None, "floor_images": 0}
    if floor is not None and len(floor) >= 2:
        floor_f = floor.features
        out[f"{fd}_floor"] = frechet_distance(floor_f, ref_f)
        out[f"{kid}_floor"] = kernel_distance(floor_f, ref_f, subset_size=min(subset, len(floor_f)), subsets=kid_subsets,
                                              seed=seed)[0]
        out["floor_images"] = len(floor_f)
    if generated.probabilities is not None:
        out["is"], out["is_std"] = inception_score(generated.probabilities, _inception_splits(len(gen_f)))
        out["is_real"] = inception_score(reference.probabilities, _inception_splits(len(ref_f)))[0]
    if generated.clip_score is not None:
        out["clip_score"], out["clip_score_real"] = generated.clip_score, reference.clip_score
    return out


def quality_metrics(network: FeatureNetwork, generated: torch.Tensor, reference: torch.Tensor,
                    floor: torch.Tensor | None = None, prompts: list[str] | None = None, clip=None, seed: int = 0,
                    kid_subsets: int = 100, batch_size: int = 64) -> dict[str, float | int | None]:
    """FD and KID of ``generated`` against ``reference`` (images in [-1, 1]) on ``network``, with the real-vs-real
    floor when ``floor`` images are given; IS when the network has classes; CLIP score with ``clip`` and ``prompts``.

    Keys are the network's (``fd_data``/``kid_data`` or ``fid``/``kid``/``is``): ``<fd>``, ``<kid>``, ``<kid>_std``,
    ``<fd>_floor``, ``<kid>_floor`` (None without a floor set), ``floor_images``, ``is``, ``is_std``, ``is_real``,
    ``clip_score``, ``clip_score_real``.
    """
    sets = []
    for images, with_clip in ((generated, True), (reference, True), (floor, False)):
        if images is None:
            sets.append(None)
            continue
        scored = ScoredSet(network, clip if with_clip and prompts is not None else None)
        for i in range(0, len(images), batch_size):
            scored.add(images[i : i + batch_size], prompts[i : i + batch_size] if prompts is not None else None)
        sets.append(scored)
    return set_statistics(network, *sets, seed=seed, kid_subsets=kid_subsets)


def evaluate_quality(pipe, dataset, network: FeatureNetwork, num_samples: int, steps: int = 20, guidance: float = 5.0,
                     sampler: str = "dpmpp_2m", seed: int = 0, batch_size: int = 50, clip=None,
                     image_size: int | None = None, grid_path: str | Path | None = None) -> dict:
    """Generate ``num_samples`` images from captions of ``dataset`` with ``pipe`` and score them (see the module
    docstring), batch by batch. Returns the figures of :func:`quality_metrics` under ``metrics``, with ``labels``
    (printed names), ``missing`` (figures not computed, and why), the prompts and the feature network's description."""
    reference_idx, floor_idx = choose_real_sets(len(dataset), num_samples, seed)
    prompts = first_captions(dataset, reference_idx)
    size = image_size or dataset.image_size
    keep = 32 if grid_path is not None else 0
    generated, reference = ScoredSet(network, clip, keep), ScoredSet(network, clip, keep)
    floor = ScoredSet(network) if floor_idx else None
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        images = pipe(batch, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
                      seed=[seed + j for j in range(i, i + len(batch))], height=size, width=size, output_type="pt",
                      progress=False).images
        generated.add(images.float(), batch)
        reference.add(load_images(dataset, reference_idx[i : i + batch_size]), batch)
    for i in range(0, len(floor_idx), batch_size):
        floor.add(load_images(dataset, floor_idx[i : i + batch_size]))
    metrics = set_statistics(network, generated, reference, floor, seed)
    if grid_path is not None:
        _save_grid(torch.cat(generated.kept), torch.cat(reference.kept), grid_path)
    labels = {network.keys["fd"]: network.labels["fd"], network.keys["kid"]: network.labels["kid"]}
    missing = {}
    if "is" in network.keys:
        labels["is"] = "IS"
    else:
        missing["is"] = IS_MISSING
    if clip is not None:
        labels["clip_score"] = "CLIP score"
    else:
        missing["clip_score"] = CLIP_MISSING
    return {"num_samples": num_samples, "dataset_images": len(dataset), "image_size": size, "steps": steps,
            "guidance": guidance, "sampler": sampler, "seed": seed, "clip_model": getattr(clip, "name", None),
            "feature_network": network.info, "keys": dict(network.keys), "metrics": metrics, "labels": labels,
            "missing": missing, "prompts": prompts}


def _save_grid(generated: torch.Tensor, reference: torch.Tensor, path: str | Path) -> None:
    """The kept samples, then the real images of the same captions, 8 per row."""
    from torchvision.utils import make_grid, save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images = torch.cat([generated, reference.to(generated)])
    save_image(make_grid((images + 1) / 2, nrow=8, padding=1), str(path))


def format_quality_table(result: dict) -> str:
    """The figures of :func:`evaluate_quality` as a small table (figure, samples, real-vs-real floor)."""
    m, labels, net = result["metrics"], result["labels"], result["feature_network"]
    fd, kid = result["keys"]["fd"], result["keys"]["kid"]
    floor_note = f"({m['floor_images']} other real images)" if m.get("floor_images") else "(dataset too small for one)"
    lines = [f"{'figure':<12} {'samples':>18} {'real-vs-real floor':>20}"]

    def floor_of(key: str, fmt: str) -> str:
        return "n/a" if m.get(f"{key}_floor") is None else format(m[f"{key}_floor"], fmt)

    def spread(value: float, std: float, fmt: str) -> str:
        return format(value, fmt) + (f" ± {format(std, fmt)}" if std > 0 else "")

    lines.append(f"{labels[fd]:<12} {m[fd]:>18.4f} {floor_of(fd, '.4f'):>20}")
    lines.append(f"{labels[kid]:<12} {spread(m[kid], m[kid + '_std'], '.5f'):>18} {floor_of(kid, '.5f'):>20}")
    if "is" in labels:
        lines.append(f"{'IS':<12} {spread(m['is'], m['is_std'], '.3f'):>18} {'real: ' + format(m['is_real'], '.3f'):>20}")
    if "clip_score" in labels:
        lines.append(f"{'CLIP score':<12} {m['clip_score']:>18.3f} {'real: ' + format(m['clip_score_real'], '.3f'):>20}")
    for key, why in result["missing"].items():
        lines.append(f"{'IS' if key == 'is' else 'CLIP score':<12} {why}")
    if net["kind"] == "data":
        what = (f"a CNN trained on this dataset to predict {len(net['vocabulary'])} caption words" if net["objective"] == "words"
                else "a CNN trained on this dataset to tell rotations and mirrorings apart (its captions have too few "
                     "usable words)")
        where = f"; cached in {net['cache_file']}" if net.get("cache_file") else ""
        lines.append(f"features: {what}{where}. FD_data/KID_data are comparable only with each other, never with FID.")
    else:
        lines.append(f"features: FID's Inception-v3 ({net['weights']})")
    lines.append(f"floor: the same figures between the {result['num_samples']} reference images and {floor_note}; "
                 "a perfect model scores about the floor")
    return "\n".join(lines)


def evaluate_model_quality(pipe, data: str, data_dir: str = "data", num_samples: int = 200, steps: int = 20,
                           guidance: float = 5.0, sampler: str = "dpmpp_2m", seed: int = 0, batch_size: int = 50,
                           image_size: int | None = None, inception_weights: str | None = None,
                           clip_model: str | None = None, feature_cache: str | None = None,
                           grid_path: str | Path | None = None, feature_steps: int | None = None) -> dict:
    """``ldm evaluate quality``: read ``data`` (all its images, at ``image_size``, default the model's sample size),
    check ``num_samples`` against it, build the feature network (Inception from ``inception_weights``, else the
    dataset's own, trained for ``feature_steps`` (default: see :class:`~ldm.evaluation.data_features.DataFeatureSettings`)
    and cached in ``feature_cache``, default ``{data_dir}/cache/feature-nets``) and the CLIP scorer, then
    :func:`evaluate_quality`. Bad inputs fail before anything is generated."""
    from ldm.evaluation.data_features import DataFeatureSettings
    from ldm.evaluation.eval_data import DEFAULT_FEATURE_CACHE, evaluation_dataset
    from ldm.evaluation.feature_networks import build_feature_network

    size = image_size or pipe.sample_size
    dataset = evaluation_dataset(data, data_dir, size)
    choose_real_sets(len(dataset), num_samples, seed)  # too many samples for the data: fail now
    cache = feature_cache if feature_cache is not None else str(Path(data_dir) / DEFAULT_FEATURE_CACHE)
    settings = DataFeatureSettings.for_image_size(size, steps=feature_steps)
    network = build_feature_network(dataset, inception_weights, cache, pipe.device, settings)
    clip = None
    if clip_model is not None:
        from ldm.evaluation.clip_score import ClipScorer

        clip = ClipScorer(clip_model, pipe.device)
    result = evaluate_quality(pipe, dataset, network, num_samples, steps, guidance, sampler, seed, batch_size, clip,
                              size, grid_path)
    return {"data": str(dataset.root), **result}
