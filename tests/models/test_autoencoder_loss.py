import pytest
import torch

from ldm.models.autoencoder_loss import AutoencoderLoss, adaptive_weight, hinge_discriminator_loss
from ldm.models.perceptual import build_lpips, lpips_backbone_path
from ldm.nn.distributions import DiagonalGaussianDistribution


def test_hinge_loss_is_zero_only_beyond_the_margins():
    assert hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert torch.isclose(hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)), torch.tensor(1.0))
    assert torch.isclose(hinge_discriminator_loss(torch.full((4,), 0.5), torch.full((4,), 1.0)), torch.tensor(1.25))


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (3.0 * w).sum()  # gradient (3, 3), norm 3*sqrt(2)
    g = (w**2).sum()  # gradient 2w = (2, 4), norm sqrt(20)
    expected = (3 * 2**0.5) / (20**0.5 + 1e-4)
    assert torch.isclose(adaptive_weight(nll, g, w), torch.tensor(expected))


def test_loss_terms_follow_sd_reductions():
    loss = AutoencoderLoss(kl_weight=0.5, disc_weight=0.0)
    x = torch.zeros(2, 3, 4, 4)
    rec = torch.full_like(x, 0.5)
    post = DiagonalGaussianDistribution(torch.cat([torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)], dim=1))
    total, logs = loss.autoencoder_loss(x, rec, post, last_layer=rec, use_discriminator=False)
    assert torch.isclose(logs["nll_loss"], torch.tensor(0.5 * 48))  # summed over pixels, mean over batch
    assert torch.isclose(logs["kl_loss"], torch.tensor(2.0))  # 0.5 * mean^2 summed over 4 latents
    assert torch.isclose(total, torch.tensor(24.0 + 0.5 * 2.0))
    l2 = AutoencoderLoss(reconstruction_loss="l2", disc_weight=0.0)
    assert torch.isclose(l2.pixel_loss(x, rec).mean(), torch.tensor(0.25))
    with pytest.raises(ValueError, match="reconstruction_loss"):
        AutoencoderLoss(reconstruction_loss="huber")


def test_perceptual_loss_without_local_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="perceptual_weight: 0") as info:
        AutoencoderLoss(perceptual_weight=1.0, lpips_net="vgg")
    assert str(lpips_backbone_path("vgg")) in str(info.value)
    with pytest.raises(ValueError, match="lpips_net"):
        lpips_backbone_path("resnet")


def test_perceptual_loss_is_used_when_weights_are_present(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = lpips_backbone_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)  # stands in for the ImageNet weights a user would copy there
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    lpips = build_lpips("squeeze")
    assert not any(p.requires_grad for p in lpips.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x).flatten(), torch.zeros(2), atol=1e-6)
    assert (lpips(x, -x).flatten() > 0).all()

    with_lpips = AutoencoderLoss(perceptual_weight=1.0, lpips_net="squeeze", disc_weight=0.0)
    plain = AutoencoderLoss(disc_weight=0.0)
    rec = x.flip(-1).requires_grad_(True)
    assert (with_lpips.pixel_loss(x, rec) > plain.pixel_loss(x, rec) + 1e-6).all()
    with_lpips.pixel_loss(x, rec).sum().backward()
    assert rec.grad is not None
    assert not any("lpips" in key or "net." in key for key in with_lpips.state_dict())  # never saved with the model
