"""torch.compile in place and channels_last on a tiny UNet: same outputs and gradients, same state-dict keys, and the
settings parser. Compilation uses the ``aot_eager`` backend (it traces forward and backward without generating
code: fast and CI-safe); inductor itself is exercised by benchmarks/unet_step.py and benchmarks/gpu.py."""

from __future__ import annotations

import pytest
import torch
from interop_helpers import randomize_

from ldm.nn.speedups import (CudaGraphSteps, channels_last_input, compile_in_place, compile_mode, is_compiled,
                             to_channels_last, uses_cuda_graphs)
from ldm.nn.unet import UNetModel

TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2), num_heads=-1,
            num_head_channels=16, context_dim=16)


def _pair() -> tuple[UNetModel, UNetModel]:
    """Two tiny UNets with the same random weights."""
    torch.manual_seed(0)
    a = randomize_(UNetModel(**TINY))
    b = UNetModel(**TINY)
    b.load_state_dict(a.state_dict())
    return a, b


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([1, 500, 999][:batch]), torch.randn(batch, 5, 16, generator=g)


def _loss_and_grads(unet: UNetModel, x, t, c) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.zero_grad()
    out = unet(x, t, c)
    out.square().mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in unet.named_parameters()}


def test_channels_last_gives_the_same_outputs_gradients_and_keys():
    reference, unet = _pair()
    to_channels_last(unet)
    conv = unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, t, c = _inputs()
    expected, expected_grads = _loss_and_grads(reference, x, t, c)
    got, grads = _loss_and_grads(unet, channels_last_input(x), t, c)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=key)
    state = unet.state_dict()
    assert state.keys() == reference.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())


def test_compiled_in_place_gives_the_same_outputs_and_keeps_the_keys():
    torch._dynamo.reset()
    reference, unet = _pair()
    keys = list(unet.state_dict())
    assert compile_in_place(unet, "default", backend="aot_eager", fullgraph=True) is unet  # fullgraph: no graph break
    assert is_compiled(unet) and not is_compiled(reference)
    x, t, c = _inputs()
    expected, expected_grads = _loss_and_grads(reference, x, t, c)
    got, grads = _loss_and_grads(unet, x, t, c)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, atol=1e-5, rtol=1e-4, msg=key)
    unet.eval(), reference.eval()
    with torch.no_grad():  # a second graph (no grad, another batch size)
        torch.testing.assert_close(unet(x[:2], t[:2], c[:2]), reference(x[:2], t[:2], c[:2]), atol=1e-5, rtol=1e-5)
    assert list(unet.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


def test_compiled_channels_last_unet_matches_eager():
    torch._dynamo.reset()
    reference, unet = _pair()
    compile_in_place(to_channels_last(unet), "reduce-overhead", backend="aot_eager")
    x, t, c = _inputs()
    with torch.no_grad():
        # CudaGraphSteps marks a CUDA-graph step per call and copies the output; on a CPU only the copy happens.
        got = CudaGraphSteps(unet)(channels_last_input(x), t, c)
        torch.testing.assert_close(got, reference(x, t, c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting,mode", [(False, None), (None, None), ("false", None), (True, "default"), ("true", "default"),
                                          ("default", "default"), ("reduce-overhead", "reduce-overhead"),
                                          ("max-autotune", "max-autotune")])
def test_compile_settings(setting, mode):
    assert compile_mode(setting) == mode
    assert uses_cuda_graphs(mode) == (mode == "reduce-overhead")


@pytest.mark.parametrize("setting", ["fast", "", 1])
def test_unknown_compile_settings_are_refused_by_name(setting):
    with pytest.raises(ValueError, match=r"compile=.*reduce-overhead"):
        compile_mode(setting)
    with pytest.raises(ValueError, match="mode="):
        compile_in_place(UNetModel(**TINY), str(setting))
