"""The loss module: every term computed in float32 outside autocast, with the weights it was given."""

import pytest
import torch
from transformers.utils import ModelOutput

from vqrae.training.losses import VQRAELoss, VQRAEPatchDiscriminator, reconstruction_losses


def _output(seed=0):
    generator = torch.Generator().manual_seed(seed)
    reconstruction = (torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1).requires_grad_(True)
    features = torch.randn(2, 16, 8, generator=generator).requires_grad_(True)
    return ModelOutput(reconstruction=reconstruction, last_hidden_state=features, quantizer_loss=torch.tensor(0.3))


def _loss(**weights):
    return VQRAELoss(image_mean=[0.5] * 3, image_std=[0.5] * 3, **weights)


def test_terms_are_float32_and_equal_under_bf16_autocast():
    torch.manual_seed(0)
    loss_fn = _loss(l1_weight=1.0, mse_weight=0.5, ssim_weight=0.2, distillation_weight=0.7, gan_weight=0.1)
    critic = VQRAEPatchDiscriminator(8, 2)
    last_layer = torch.randn(5, 5, requires_grad=True)
    output = _output()
    # A generator loss whose gradient reaches `last_layer`, as the decoder's does.
    output["reconstruction"] = output.reconstruction + last_layer.sum() * 1e-3
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    teacher = torch.randn(2, 16, 8)
    kwargs = dict(step=0, last_layer=last_layer, teacher_features=teacher, discriminator=critic)
    loss, terms = loss_fn.generator_loss(output, pixels, **kwargs)
    critic_loss = loss_fn.discriminator_loss(pixels, output.reconstruction, critic)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, terms_bf16 = loss_fn.generator_loss(output, pixels, **kwargs)
        critic_loss_bf16 = loss_fn.discriminator_loss(pixels, output.reconstruction, critic)
        # What the terms would be if autocast reached them: SSIM's and the critic's convolutions in bf16.
        unguarded = reconstruction_losses(
            loss_fn.to_unit(output.reconstruction), loss_fn.to_unit(pixels), ssim_weight=1
        )
        unguarded_logits = critic(loss_fn.to_unit(pixels))
    assert set(terms) >= {"l1", "mse", "ssim", "quantizer", "distillation", "generator", "gan_weight", "loss"}
    for name, value in terms.items():
        assert value.dtype == torch.float32 and terms_bf16[name].dtype == torch.float32, name
        assert torch.equal(value, terms_bf16[name]), name
    assert torch.equal(loss, loss_bf16) and torch.equal(critic_loss, critic_loss_bf16)
    assert unguarded_logits.dtype == torch.bfloat16  # the comparison above has power:
    assert not torch.equal(unguarded["ssim"], terms["ssim"])


def test_weights_and_schedule():
    loss_fn = _loss(l1_weight=2.0, mse_weight=0.0, quantizer_weight=3.0, gan_weight=0.5, gan_start_step=10)
    output, pixels = _output(), torch.rand(2, 3, 32, 32) * 2 - 1
    loss, terms = loss_fn.generator_loss(output, pixels, step=0)
    assert "mse" not in terms and "generator" not in terms and "distillation" not in terms
    expected = 2.0 * (loss_fn.to_unit(output.reconstruction) - loss_fn.to_unit(pixels)).abs().mean() + 3.0 * 0.3
    torch.testing.assert_close(loss, expected)
    assert not loss_fn.uses_gan(9) and loss_fn.uses_gan(10)
    with pytest.raises(ValueError, match="perceptual"):
        reconstruction_losses(pixels, pixels, perceptual_weight=1.0)


def test_gradient_loss_compares_neighbouring_pixel_differences():
    target = torch.zeros(1, 1, 2, 3)
    target[..., 1:] = 0.5  # a step between columns 0 and 1
    shifted = target + 0.2  # the same changes from pixel to pixel, a constant offset
    terms = reconstruction_losses(shifted, target, l1_weight=0.0, gradient_weight=1.0)
    assert terms["gradient"] == 0 and terms["reconstruction"] == 0
    flat = torch.full_like(target, 0.25)  # the step smoothed away: horizontal differences 0.5 and 0 are lost
    terms = reconstruction_losses(flat, target, l1_weight=1.0, gradient_weight=2.0)
    horizontal = (0.5 + 0.0) / 2  # mean |difference| over the 2 x 2 horizontal pairs: one column of 0.5s, one of 0s
    vertical = 0.0
    assert float(terms["gradient"]) == pytest.approx((horizontal + vertical) / 2)
    assert float(terms["reconstruction"]) == pytest.approx(0.25 + 2 * (horizontal + vertical) / 2)
