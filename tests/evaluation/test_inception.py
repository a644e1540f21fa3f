"""FID's Inception-v3 from a local weights file: the same outputs as torch-fidelity's, safe loading, clear errors."""

import io

import pytest
import torch
from evaluation_helpers import random_fid_inception_state

from ldm.evaluation.feature_networks import InceptionFeatureNetwork
from ldm.evaluation.inception import load_fid_inception, resize_bilinear_tf1


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_fid_inception_state(), path)
    return path


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_same_outputs_as_torch_fidelity_given_the_same_weights(weights_file):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.rand(2, 3, 37, 23) * 255
    ours = resize_bilinear_tf1(x, 299, 299)
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.allclose(ours, theirs, atol=2e-3)  # pixel values 0..255

    buffer = io.BytesIO(weights_file.read_bytes())  # torch-fidelity unpickles fully: our own file, in a test only
    reference = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=buffer)
    images = _images()
    pool, logits = load_fid_inception(weights_file)(images)
    ref_pool, ref_logits = reference(((images + 1) * 127.5).round().to(torch.uint8))
    assert pool.abs().mean() > 0.05  # a signal, not vanishing activations
    assert torch.allclose(pool, ref_pool, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_loads_pth_and_safetensors_into_the_feature_network(weights_file, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(weights_file, weights_only=True)
    safetensors_file = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors_file))
    images = _images()
    network = InceptionFeatureNetwork(weights_file)
    features = network.features(images)
    assert features.shape == (2, 2048) and network.labels == {"fd": "FID", "kid": "KID", "is": "IS"}
    assert torch.allclose(torch.from_numpy(InceptionFeatureNetwork(safetensors_file).features(images)),
                          torch.from_numpy(features))
    probabilities = network.class_probabilities(images)
    assert probabilities.shape == (2, 1008) and abs(probabilities.sum(axis=1) - 1).max() < 1e-9


def test_bad_weight_files_are_named_with_the_fix(tmp_path, weights_file):
    with pytest.raises(FileNotFoundError, match="no such file.*pt_inception-2015-12-05"):
        load_fid_inception(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="garbage.pth.*cannot be read"):
        load_fid_inception(garbage)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_file.read_bytes()[: 1 << 20])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_fid_inception(truncated)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="not the FID Inception-v3.s: missing 472.*unexpected 1"):
        load_fid_inception(other)
    code = tmp_path / "code.pth"
    torch.save({"weights": torch.zeros(1), "object": _Unpicklable()}, code)  # weights_only refuses arbitrary objects
    with pytest.raises(ValueError, match="code.pth.*cannot be read"):
        load_fid_inception(code)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_fid_inception(broken)


class _Unpicklable:
    pass
