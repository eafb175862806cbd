"""Training losses of a VQRAE tokenizer: pixel losses, SSIM, LPIPS, the quantizer's loss, self-distillation and a
patch-GAN, owned with their weights, schedule and the networks they need by one module, `VQRAELoss` (the pattern of
taming-transformers' `VQLPIPSWithDiscriminator`): `generator_loss(...)` for the tokenizer; the critic's loss, its
backward pass and its optimiser step (`critic_backward`, `critic_step`) for the GAN's discriminator.

All image losses compare images in [0, 1] (the normalised pixels mapped back with the image processor's mean and
std), in float32, outside any autocast region: under `--mixed_precision bf16` the model runs in bf16, its losses
(SSIM, LPIPS, the patch-GAN and the adaptive GAN weight included) do not.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from ..errors import UsageError

__all__ = [
    "LPIPS",
    "VQRAELoss",
    "VQRAEPatchDiscriminator",
    "adaptive_gan_weight",
    "discriminator_hinge_loss",
    "generator_hinge_loss",
    "reconstruction_losses",
]


class VQRAELoss(nn.Module):
    """Every term of a VQRAE tokenizer's objective, with its weight, and the networks the terms need.

    `generator_loss` = `reconstruction` (weighted L1, MSE, 1 - SSIM, image-gradient L1 and LPIPS between the images
    in [0, 1])
    + `quantizer_weight` * the quantizer's loss + `distillation_weight` * `||f(x) - f_teacher(x)||^2` (with a teacher)
    + the adaptive GAN weight times `gan_weight` times the generator's hinge loss, from step `gan_start_step` on.
    The critic (`discriminator`, a patch-GAN, with `discriminator_optimizer`) learns the hinge loss on real images and
    reconstructions from the same step on.

    Args:
        image_mean, image_std: the image processor's normalisation, undone to compare images in [0, 1].
        lpips_weights: the folder of LPIPS's local weights (with `perceptual_weight > 0`).
        teacher: stage 2's encoder to distil towards. The loss keeps a frozen copy taken now, so weights loaded
            into the model later (a resume) never reach it; it is never saved.
        discriminator_channels, discriminator_layers, discriminator_learning_rate: the critic (with `gan_weight > 0`)
            and its AdamW's learning rate.
    """

    def __init__(
        self,
        *,
        image_mean,
        image_std,
        l1_weight: float = 1.0,
        mse_weight: float = 0.0,
        ssim_weight: float = 0.0,
        gradient_weight: float = 0.0,
        perceptual_weight: float = 0.0,
        lpips_weights: str | None = None,
        quantizer_weight: float = 1.0,
        distillation_weight: float = 0.0,
        teacher: nn.Module | None = None,
        gan_weight: float = 0.0,
        gan_start_step: int = 0,
        discriminator_channels: int = 64,
        discriminator_layers: int = 3,
        discriminator_learning_rate: float = 1e-4,
    ):
        super().__init__()
        # The weights of the pixel losses, as `reconstruction_losses` takes them.
        self.pixel_weights = {
            "l1_weight": l1_weight,
            "mse_weight": mse_weight,
            "ssim_weight": ssim_weight,
            "gradient_weight": gradient_weight,
            "perceptual_weight": perceptual_weight,
        }
        self.quantizer_weight, self.distillation_weight = quantizer_weight, distillation_weight
        self.gan_weight, self.gan_start_step = gan_weight, gan_start_step
        # Built in this order (LPIPS, then the critic) so the random draws of their initialisation stay as they were.
        self.perceptual = LPIPS(lpips_weights) if perceptual_weight > 0 else None
        self.teacher = None if teacher is None else copy.deepcopy(teacher).eval().requires_grad_(False)
        self.discriminator = self.discriminator_optimizer = None
        if gan_weight > 0:
            self.discriminator = VQRAEPatchDiscriminator(discriminator_channels, discriminator_layers)
            self.discriminator_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=discriminator_learning_rate, betas=(0.5, 0.9), weight_decay=0.0
            )
        self.grad_scaler = None  # set by `prepare`
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), False)

    def prepare(self, accelerator) -> None:
        """Prepare the critic and its optimiser with `accelerator` (wrapped across processes, saved and loaded by
        `save_state`/`load_state`). Call it after preparing the model and its optimiser: accelerate checkpoints in the
        order prepared, so the critic is `model_1.safetensors` and its optimiser `optimizer_1.bin`."""
        # Under fp16 the critic shares the model's gradient scaler (None otherwise): `critic_step` and the adaptive
        # GAN weight need it.
        self.grad_scaler = accelerator.scaler
        if self.discriminator is not None:
            self.discriminator, self.discriminator_optimizer = accelerator.prepare(
                self.discriminator, self.discriminator_optimizer
            )

    def to_unit(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (the model's range) to float32 images in [0, 1] (not clamped)."""
        return pixels.float() * self.image_std + self.image_mean

    def uses_gan(self, step: int) -> bool:
        return self.gan_weight > 0 and step >= self.gan_start_step

    def generator_loss(
        self, output, pixel_values: torch.Tensor, *, step: int, last_layer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The tokenizer's loss for a `VQRAEModelOutput` of `pixel_values`, and its terms (unweighted, plus
        `reconstruction`, `gan_weight` and `loss`). `last_layer` (the decoder's output weight) is needed from
        `gan_start_step` on. Call it under the model's autocast: the teacher runs as the model it copies does, the
        terms in float32 whatever the autocast."""
        teacher_features = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_features = self.teacher(pixel_values=pixel_values).last_hidden_state
        with torch.autocast(pixel_values.device.type, enabled=False):
            target = self.to_unit(pixel_values)
            reconstruction = self.to_unit(output.reconstruction)
            terms = reconstruction_losses(reconstruction, target, **self.pixel_weights, perceptual=self.perceptual)
            terms["quantizer"] = output.quantizer_loss.float()
            loss = terms["reconstruction"] + self.quantizer_weight * terms["quantizer"]
            if teacher_features is not None:
                terms["distillation"] = F.mse_loss(output.last_hidden_state.float(), teacher_features.float())
                loss = loss + self.distillation_weight * terms["distillation"]
            if self.uses_gan(step):
                # The critic itself, not its multi-process wrapper: this pass trains the tokenizer, not the critic.
                critic = extract_model_from_parallel(self.discriminator)
                critic.requires_grad_(False)
                terms["generator"] = generator_hinge_loss(critic(reconstruction))
                critic.requires_grad_(True)
                weight = adaptive_gan_weight(
                    terms["reconstruction"], terms["generator"], last_layer, scale=self._loss_scale(loss)
                )
                terms["gan_weight"] = weight * self.gan_weight
                loss = loss + terms["gan_weight"] * terms["generator"]
            terms["loss"] = loss
        return loss, terms

    def _loss_scale(self, loss: torch.Tensor) -> torch.Tensor | None:
        """The fp16 gradient scaler's current scale as a tensor (no host sync), or None without a scaler."""
        return None if self.grad_scaler is None else self.grad_scaler.scale(torch.ones_like(loss))

    def discriminator_loss(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The critic's hinge loss on real images and (detached) reconstructions, both in the model's range."""
        with torch.autocast(pixel_values.device.type, enabled=False):
            real_logits = self.discriminator(self.to_unit(pixel_values))
            fake_logits = self.discriminator(self.to_unit(reconstruction.detach()))
            return discriminator_hinge_loss(real_logits, fake_logits)

    def no_sync(self, accelerator, step: int):
        """A context in which the critic's gradients are not reduced across processes (all micro-batches of an
        accumulated step but the last, as for the model)."""
        return accelerator.no_sync(self.discriminator) if self.uses_gan(step) else contextlib.nullcontext()

    def critic_backward(
        self, accelerator, pixel_values: torch.Tensor, reconstruction: torch.Tensor, *, step: int, accumulation: int
    ) -> dict[str, torch.Tensor]:
        """From `gan_start_step` on: the critic's loss on one micro-batch, back-propagated (divided by the
        `accumulation` micro-batches of a step), as `{"discriminator": loss}`; before, nothing (`{}`)."""
        if not self.uses_gan(step):
            return {}
        loss = self.discriminator_loss(pixel_values, reconstruction)
        accelerator.backward(loss / accumulation)
        return {"discriminator": loss}

    def critic_step(self, step: int) -> None:
        """The critic's optimiser step, from `gan_start_step` on (after the micro-batches' `critic_backward`).

        Under fp16 the critic and the model share accelerate's gradient scaler, and each optimiser's gradients must
        be unscaled exactly once: call this after clipping the model's gradients (accelerate's `clip_grad_norm_`
        unscales every prepared optimiser) and before the model's optimiser step, whose `scaler.update()` forgets
        what was unscaled. The scaler steps the critic (unscaling it only if clipping did not, skipping the step on
        inf) and leaves the update of the scale to the model's step, once for both."""
        if not self.uses_gan(step):
            return
        if self.grad_scaler is None:
            self.discriminator_optimizer.step()
        else:
            self.grad_scaler.step(getattr(self.discriminator_optimizer, "optimizer", self.discriminator_optimizer))
        self.discriminator_optimizer.zero_grad(set_to_none=True)


def reconstruction_losses(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    *,
    l1_weight: float = 1.0,
    mse_weight: float = 0.0,
    ssim_weight: float = 0.0,
    gradient_weight: float = 0.0,
    perceptual_weight: float = 0.0,
    perceptual: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted pixel losses between two image batches in [0, 1] (`(B, 3, H, W)`); terms with weight 0 are
    not computed. Returns `{name: unweighted value}` and `"reconstruction"`, their weighted sum.

    `gradient` is the L1 distance between the images' differences of horizontally and vertically neighbouring
    pixels: it asks the reconstruction to change from pixel to pixel as the image does, across the decoder's patch
    borders too (where a per-patch decoder otherwise leaves steps: a visible grid)."""
    reconstruction, target = reconstruction.float(), target.float()
    terms, total = {}, reconstruction.new_zeros(())
    if l1_weight > 0:
        terms["l1"] = F.l1_loss(reconstruction, target)
        total = total + l1_weight * terms["l1"]
    if mse_weight > 0:
        terms["mse"] = F.mse_loss(reconstruction, target)
        total = total + mse_weight * terms["mse"]
    if ssim_weight > 0:
        terms["ssim"] = 1 - structural_similarity_index_measure(reconstruction, target, data_range=1.0)
        total = total + ssim_weight * terms["ssim"]
    if gradient_weight > 0:
        terms["gradient"] = sum(F.l1_loss(reconstruction.diff(dim=dim), target.diff(dim=dim)) for dim in (-1, -2)) / 2
        total = total + gradient_weight * terms["gradient"]
    if perceptual_weight > 0:
        if perceptual is None:
            raise ValueError("`perceptual_weight` > 0 needs the `perceptual` (LPIPS) module.")
        terms["lpips"] = perceptual(reconstruction, target).mean()
        total = total + perceptual_weight * terms["lpips"]
    terms["reconstruction"] = total
    return terms


# ---------------------------------------------------------------------------------------------------------------
# LPIPS (VGG16), from local weights only
# ---------------------------------------------------------------------------------------------------------------

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16
LPIPS_WEIGHTS_FILE = "vgg.pth"  # the LPIPS v0.1 linear heads for VGG (richzhang/PerceptualSimilarity)
# VGG16 `features` layers: channel widths, "M" for max-pooling. LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices in torchvision's vgg16().features of the ReLUs LPIPS reads


def _find_lpips_weights(folder: str | None) -> tuple[str, str]:
    candidates = [folder] if folder else [os.path.join(torch.hub.get_dir(), "checkpoints")]
    try:  # the `lpips` package ships its linear heads inside the package
        import lpips

        candidates.append(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1"))
    except ImportError:
        pass
    vgg = next(
        (
            os.path.join(c, VGG16_WEIGHTS_FILE)
            for c in candidates
            if c and os.path.isfile(os.path.join(c, VGG16_WEIGHTS_FILE))
        ),
        None,
    )
    heads = next(
        (
            os.path.join(c, LPIPS_WEIGHTS_FILE)
            for c in candidates
            if c and os.path.isfile(os.path.join(c, LPIPS_WEIGHTS_FILE))
        ),
        None,
    )
    if vgg is None or heads is None:
        missing = [name for name, found in ((VGG16_WEIGHTS_FILE, vgg), (LPIPS_WEIGHTS_FILE, heads)) if found is None]
        raise UsageError(
            f"The perceptual loss (LPIPS) needs its weights locally, and {missing} were not found in {candidates}. "
            "Nothing is downloaded during training: put torchvision's VGG16 weights "
            f"({VGG16_WEIGHTS_FILE}) and the LPIPS v0.1 VGG heads ({LPIPS_WEIGHTS_FILE}) in one folder and pass "
            "--lpips_weights FOLDER, or set --perceptual_weight 0."
        )
    return vgg, heads


class LPIPS(nn.Module):
    """LPIPS with a VGG16 backbone (Zhang et al., 2018), built in plain torch and loaded from local files.

    Args:
        weights_folder: a folder with `vgg16-397923af.pth` (torchvision's ImageNet VGG16) and `vgg.pth` (the LPIPS
            v0.1 linear heads); default: the torch hub cache and the `lpips` package, if installed.
    Inputs are images in [0, 1]; the output is the per-image distance `(B,)`.
    """

    def __init__(self, weights_folder: str | None = None):
        super().__init__()
        vgg_path, heads_path = _find_lpips_weights(weights_folder)
        layers, channels = [], 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
                channels = item
        self.features = nn.Sequential(*layers)
        widths = (64, 128, 256, 512, 512)
        self.heads = nn.ModuleList([nn.Conv2d(width, 1, 1, bias=False) for width in widths])
        vgg_state = torch.load(vgg_path, map_location="cpu", weights_only=True)
        features = {k[len("features.") :]: v for k, v in vgg_state.items() if k.startswith("features.")}
        self.features.load_state_dict(features)
        heads_state = torch.load(heads_path, map_location="cpu", weights_only=True)
        for i, head in enumerate(self.heads):
            head.weight.data.copy_(heads_state[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        hidden, taps = (images * 2 - 1 - self.shift) / self.scale, []
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in _LPIPS_TAPS:
                taps.append(hidden / (hidden.norm(dim=1, keepdim=True) + 1e-10))
        return taps

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        distance = images.new_zeros(images.shape[0])
        for a, b, head in zip(self._taps(images.float()), self._taps(target.float()), self.heads):
            distance = distance + head((a - b) ** 2).mean(dim=(1, 2, 3))
        return distance


# ---------------------------------------------------------------------------------------------------------------
# Patch-GAN
# ---------------------------------------------------------------------------------------------------------------


class VQRAEPatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al., 2017, as used by taming-transformers): strided 4x4 convolutions
    with GroupNorm and LeakyReLU, one logit per overlapping patch. Inputs are images in [0, 1]."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            next_width = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, next_width // 4), next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # In float32 whatever autocast surrounds it: accelerate's `prepare` wraps the forward in its own autocast,
        # which would otherwise switch it back on inside the loss's float32 region.
        with torch.autocast(images.device.type, enabled=False):
            return self.layers(images.float() * 2 - 1)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_gan_weight(
    reconstruction_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    maximum: float = 1e4,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """taming-transformers' balance: `||d rec / d last|| / (||d gan / d last|| + 1e-4)`, clamped and detached, so
    the GAN gradient at the decoder's last layer has the size of the reconstruction gradient. With `scale` (fp16's
    loss scale) the gradients are taken of the scaled losses and divided back, as for the backward pass: through
    fp16 activations the unscaled gradients underflow to zero."""
    scale = 1.0 if scale is None else scale
    rec_grad = torch.autograd.grad(reconstruction_loss * scale, last_layer, retain_graph=True)[0] / scale
    gan_grad = torch.autograd.grad(gan_loss * scale, last_layer, retain_graph=True)[0] / scale
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, maximum).detach()
