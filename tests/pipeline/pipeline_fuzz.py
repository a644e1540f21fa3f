"""Property-based run of the pipeline's call arguments (hypothesis), meant to run in its own process under a memory
limit: ``python tests/pipeline/pipeline_fuzz.py EXAMPLES``. tests/pipeline/test_pipeline_properties.py runs it.

The property: a call either returns finite images of the asked shape, or raises a ``ValueError`` whose message names
one of the arguments that an independent oracle judges wrong; never a raw torch error, a NaN image, an allocation
past the limit (the address space is capped at what the process uses plus ``HEADROOM``), or a hang (a deadline per
call, and the parent's timeout)."""

from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from test_pipeline import tiny_pipeline  # noqa: E402

from ldm.diffusion.sampler_registry import KARRAS_SAMPLERS, SAMPLER_REGISTRY  # noqa: E402
from ldm.pipeline.checks import NonFiniteOutputError  # noqa: E402

HEADROOM = 1 << 30  # bytes of address space allowed past what the built pipeline holds
MAX_PIXELS, MAX_BATCH_PIXELS = 64 * 64, 6 * 32 * 32  # small limits, so every accepted call is quick
STEPS_LIMIT = 1000
floats = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, -1.0, 1.5, 0.0, 1.0]),
                   st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10))
# A valid call, then up to three arguments swapped for hostile values (which the oracle judges, valid or not).
VALID = {
    "prompt": st.one_of(st.sampled_from(["a red circle 1", "", "a blue square"]), st.text(max_size=30),
                        st.lists(st.sampled_from(["a red circle 2", "a green triangle", ""]), min_size=1, max_size=2)),
    "negative_prompt": st.one_of(st.none(), st.just("a blue square")),
    "num_inference_steps": st.integers(1, 3),
    "guidance_scale": st.floats(-20, 20),
    "guidance_rescale": st.floats(0, 1),
    "eta": st.just(0.0),
    "sampler": st.sampled_from(list(SAMPLER_REGISTRY)),
    "karras_sigmas": st.just(False),
    "height": st.sampled_from([None, 16, 32, 64]),
    "width": st.sampled_from([None, 16, 32, 48, 8]),
    "num_images_per_prompt": st.integers(1, 2),
    "seed": st.one_of(st.none(), st.integers(0, 2**31)),
    "output_type": st.sampled_from(["pil", "np", "pt", "latent"]),
}
HOSTILE = {
    "prompt": st.lists(st.text(max_size=5), max_size=3),
    "negative_prompt": st.lists(st.just("x"), max_size=3),
    "num_inference_steps": st.one_of(st.integers(-2, 0), st.sampled_from([STEPS_LIMIT, STEPS_LIMIT + 1, 10**9])),
    "guidance_scale": floats,
    "guidance_rescale": floats,
    "eta": floats,
    "karras_sigmas": st.booleans(),
    "sampler": st.sampled_from(["bogus", "DDIM", ""]),
    "height": st.one_of(st.sampled_from([0, -32, 30, 4096, 100_000]), st.integers(-8, 80)),
    "width": st.one_of(st.sampled_from([0, -32, 30, 4096, 100_000]), st.integers(-8, 80)),
    "num_images_per_prompt": st.one_of(st.integers(-1, 7), st.sampled_from([100_000])),
    "seed": st.one_of(st.integers(-5, 2**64), st.lists(st.integers(0, 9), max_size=4)),
    "output_type": st.sampled_from(["jpeg", "PIL", ""]),
}


@st.composite
def calls(draw) -> dict:
    kw = {name: draw(strategy) for name, strategy in VALID.items()}
    for name in draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=3, unique=True)):
        kw[name] = draw(HOSTILE[name])
    return kw


def _finite_in(value, low=None, high=None) -> bool:
    return math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)


def wrong_arguments(kw: dict) -> dict[str, tuple[str, ...]]:
    """The oracle: each argument it judges wrong, with the words one of which the error must contain."""
    bad: dict[str, tuple[str, ...]] = {}
    n_prompts = 1 if isinstance(kw["prompt"], str) else len(kw["prompt"])
    if n_prompts == 0:
        bad["prompt"] = ("prompt",)
    neg = kw["negative_prompt"]
    if isinstance(neg, list) and n_prompts and len(neg) != n_prompts:
        bad["negative_prompt"] = ("negative_prompt",)
    if not 1 <= kw["num_inference_steps"] <= STEPS_LIMIT:
        bad["num_inference_steps"] = ("num_inference_steps",)
    if kw["sampler"] not in SAMPLER_REGISTRY:
        bad["sampler"] = ("sampler",)
    if kw["output_type"] not in ("pil", "np", "pt", "latent"):
        bad["output_type"] = ("output_type",)
    if kw["num_images_per_prompt"] < 1:
        bad["num_images_per_prompt"] = ("num_images_per_prompt",)
    if not _finite_in(kw["guidance_scale"]):
        bad["guidance_scale"] = ("guidance_scale",)
    if not _finite_in(kw["guidance_rescale"], 0, 1):
        bad["guidance_rescale"] = ("guidance_rescale",)
    if not _finite_in(kw["eta"], 0, 1) or (kw["eta"] != 0 and kw["sampler"] in SAMPLER_REGISTRY and kw["sampler"] != "ddim"):
        bad["eta"] = ("eta",)
    if kw["karras_sigmas"] and kw["sampler"] in SAMPLER_REGISTRY and kw["sampler"] not in KARRAS_SAMPLERS:
        bad["karras_sigmas"] = ("Karras",)
    h, w = (32 if kw[k] is None else kw[k] for k in ("height", "width"))
    for name, side in (("height", h), ("width", w)):
        if side <= 0 or side % 8:  # the tiny VAE's factor 4 times the tiny UNet's 2
            bad[name] = (name,)
    if "height" not in bad and "width" not in bad:
        if h * w > MAX_PIXELS:
            bad["height"] = bad["width"] = ("max_pixels",)
        elif max(n_prompts, 1) * max(kw["num_images_per_prompt"], 1) * h * w > MAX_BATCH_PIXELS:
            bad["num_images_per_prompt"] = ("max_batch_pixels",)
    n = n_prompts * kw["num_images_per_prompt"]
    seed = kw["seed"]
    if isinstance(seed, list) and n > 0 and len(seed) != n:
        bad["seed"] = ("seed",)
    elif isinstance(seed, int) and not 0 <= seed < 2**63 - 100:
        bad["seed"] = ("seed",)
    return bad


def main(examples: int) -> None:
    pipe = tiny_pipeline(tempfile.mkdtemp())
    pipe.max_pixels, pipe.max_batch_pixels = MAX_PIXELS, MAX_BATCH_PIXELS
    used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + HEADROOM, used + HEADROOM))
    try:  # the cap is real: an allocation past it fails (so a missing size check would fail the run, not swap)
        torch.empty(2 * HEADROOM, dtype=torch.uint8)
        raise AssertionError("the address-space limit does not hold")
    except RuntimeError:
        pass
    outcomes: Counter = Counter()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(calls())
    def call(kw):
        bad = wrong_arguments(kw)
        started = time.perf_counter()
        try:
            out = pipe(**kw, progress=False)
        except NonFiniteOutputError as exc:  # a huge but finite guidance can overflow: named, never returned
            assert not bad and abs(kw["guidance_scale"]) > 1e3, (kw, exc)
            outcomes["overflow refused"] += 1
            return
        except ValueError as exc:
            message = str(exc)
            if kw["num_inference_steps"] == STEPS_LIMIT and not bad:  # some samplers' layouts repeat steps at T
                bad = {"num_inference_steps": ("num_inference_steps",)}
            assert bad, f"refused a call the oracle accepts: {kw}: {message}"
            assert any(word in message for words in bad.values() for word in words), (kw, bad, message)
            outcomes["refused, naming " + next(a for a, words in bad.items() if any(w in message for w in words))] += 1
            return
        finally:
            assert time.perf_counter() - started < 60, f"a call took over a minute: {kw}"
        assert not bad, f"accepted a call the oracle refuses ({sorted(bad)}): {kw}"
        n = (1 if isinstance(kw["prompt"], str) else len(kw["prompt"])) * kw["num_images_per_prompt"]
        h, w = (32 if kw[k] is None else kw[k] for k in ("height", "width"))
        images = out.images
        if kw["output_type"] == "pil":
            assert [im.size for im in images] == [(w, h)] * n
        else:
            tensor = torch.as_tensor(images)
            expected = {"np": (n, h, w, 3), "pt": (n, 3, h, w), "latent": (n, 4, h // 4, w // 4)}[kw["output_type"]]
            assert tuple(tensor.shape) == expected and bool(torch.isfinite(tensor).all()), (kw, tensor.shape)
        outcomes["returned images"] += 1

    call()
    print("outcomes:", dict(sorted(outcomes.items())))
    print(f"calls: {sum(outcomes.values())}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
