"""The training loop: presets, stages, the output folder, bad options. Tiny models, a few steps, built-in photos."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from conftest import TINY_RUN_ARGS, records, run, save_model, tiny_model
from vqrae.cli.train import parse_train_args
from vqrae.training.config_files import preset_config_dir
from vqrae.training.losses import VQRAEPatchDiscriminator
from vqrae.training.trainer import latest_checkpoint

RUN_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "modeling_vqrae.py",
    "eval_results.json",
    "metrics.jsonl",
    "reconstructions.png",
    "training_curves.png",
    "codebook_usage.png",
    "training_config.yaml",
    "README.md",
)


def encoder_weights(folder):
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith("encoder.")}


def independent_psnr(output_dir, num_images=8):
    """Mean PSNR (dB) over the first `num_images` built-in validation photos, computed here with PIL and numpy
    (not with the library's evaluation): of the saved model's 8-bit reconstructions through the tokens, and of
    the bicubic baseline through a thumbnail of the token grid."""
    from PIL import Image

    from vqrae import VQRAEModel
    from vqrae.builtin_photos import builtin_photos

    model = VQRAEModel.from_pretrained(output_dir).eval()
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    mean = np.asarray(processor["image_mean"], dtype=np.float32)
    std = np.asarray(processor["image_std"], dtype=np.float32)
    size, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
    images = []
    for image in builtin_photos("validation")[:num_images]["image"]:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.convert("RGB").resize(
            (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
        )
        images.append(np.asarray(square))
    originals = np.stack(images)  # (B, H, W, 3) uint8
    pixels = (originals.astype(np.float32) / 255 - mean) / std
    with torch.no_grad():
        indices = model.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()).indices
        reconstruction = model.decode_from_indices(indices).reconstruction.permute(0, 2, 3, 1).numpy()
    reconstructed = np.round(np.clip(reconstruction * std + mean, 0, 1) * 255).astype(np.uint8)
    grid = size // patch
    bicubic = np.stack(
        [
            np.asarray(
                Image.fromarray(o)
                .resize((grid, grid), Image.Resampling.BICUBIC)
                .resize((size, size), Image.Resampling.BICUBIC)
            )
            for o in originals
        ]
    )

    def psnr(a, b):
        mse = ((a.astype(np.float64) - b.astype(np.float64)) / 255) ** 2
        return float(np.mean(10 * np.log10(1 / mse.mean(axis=(1, 2, 3)))))

    return psnr(reconstructed, originals), psnr(bicubic, originals)


@pytest.mark.parametrize("preset", ["cosmos_fsq", "standard_fsq", "vq", "tiny_cpu"])
def test_each_preset_trains(preset, tmp_path):
    metrics = run(tmp_path / preset, config=preset, max_steps=2)
    assert metrics["step"] == 2 and metrics["num_images"] == 8 and metrics["image_size"] == 32
    assert metrics["rfid"] is None
    # The reported figures are those of the saved model on the validation images, measured independently.
    psnr, bicubic_psnr = independent_psnr(tmp_path / preset)
    assert metrics["psnr"] == pytest.approx(psnr, abs=1e-4)
    assert metrics["bicubic_psnr"] == pytest.approx(bicubic_psnr, abs=1e-4)
    assert records(tmp_path / preset, "eval")[-1] == {"type": "eval", **metrics}
    config = json.loads((tmp_path / preset / "config.json").read_text())
    expected_fsq = yaml.safe_load((preset_config_dir() / f"{preset}.yaml").read_text()).get("quantizer") != "vq"
    assert config["use_fsq"] is expected_fsq
    assert [r["step"] for r in records(tmp_path / preset)] == [1, 2]
    # Each logging window's share of the codebook: at least one code, at most one per token of the window.
    tokens_per_step = int(TINY_RUN_ARGS[TINY_RUN_ARGS.index("--per_device_train_batch_size") + 1]) * 16
    codebook_size = int(np.prod(config["fsq_levels"])) if config["use_fsq"] else config["num_embeddings"]
    for record in records(tmp_path / preset):
        assert 1 <= round(record["codebook_usage"] * codebook_size) <= tokens_per_step


def test_the_log_counts_the_codes_of_its_window_and_starts_a_new_one(tmp_path):
    from accelerate import Accelerator

    from vqrae.training.metrics_log import MetricsLog
    from vqrae.training.state import StepResult

    log = MetricsLog(str(tmp_path / "metrics.jsonl"), Accelerator(cpu=True), images_per_step=4, codebook_size=10)
    log.add(StepResult(terms={"loss": 1.0}, codes=torch.tensor([1, 4, 7, 4]), unreadable=["a.png", "c.png"]))
    assert log.flush(1, 0.1)["codebook_usage"] == pytest.approx(0.3)
    assert not log.codes_chosen_in_window.any()  # the next window starts empty
    log.add(StepResult(terms={"loss": 1.0}, codes=torch.tensor([], dtype=torch.long), unreadable=["a.png", "b.png"]))
    assert log.flush(2, 0.1)["codebook_usage"] == 0.0
    assert [r["codebook_usage"] for r in records(tmp_path)] == [pytest.approx(0.3), 0.0]
    assert log.unreadable_count() == 3  # each image once, however often it was met


def test_output_folder_loads_and_its_results_match_a_fresh_evaluation(tmp_path):
    from transformers import AutoModel

    from vqrae.image_data import load_image_dataset, load_validation_images
    from vqrae.training.metrics import evaluate_model

    output = tmp_path / "out"
    run(output, "--report_to", "tensorboard", "--ema_decay", "0.9", "--eval_steps", "2", max_steps=3)
    for name in RUN_FILES:
        assert (output / name).is_file(), name
    assert list((output / "runs").rglob("events.out.tfevents.*")), "tensorboard wrote no events"
    assert [r["step"] for r in records(output, "eval")] == [2, 3]

    model = AutoModel.from_pretrained(output)
    assert type(model).__name__ == "VQRAEModel"
    saved = json.loads((output / "eval_results.json").read_text())
    dataset, column = load_image_dataset("validation")
    images = load_validation_images(dataset, column, 32, dataset_name="builtin:photos", dataset_split="validation",
                                    max_samples=8)  # fmt: skip
    assert evaluate_model(model, images, step=3).metrics == saved

    # training_config.yaml gives back every option of the run.
    again = parse_train_args(["--config", str(output / "training_config.yaml")])
    assert again[2].ema_decay == 0.9 and again[2].max_steps == 3 and again[0].hidden_size == 32
    assert again[2].resume_from_checkpoint is None


def test_stage1_keeps_the_encoder_bit_identical(tmp_path):
    start = tmp_path / "start"
    save_model(tiny_model(seed=3), start)
    output = tmp_path / "stage1"
    run(output, "--init_from", str(start), "--stage", "1", max_steps=2, sizes=False)
    before, after = encoder_weights(start), encoder_weights(output)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    decoder_before = load_file(str(start / "model.safetensors"))["decoder.out_proj.weight"]
    assert not torch.equal(decoder_before, load_file(str(output / "model.safetensors"))["decoder.out_proj.weight"])


def encoder_features(folder, pixel_values):
    from vqrae import VQRAEModel

    with torch.no_grad():
        return VQRAEModel.from_pretrained(folder).eval().encoder(pixel_values=pixel_values).last_hidden_state


def test_stage2_distillation_holds_the_encoder_to_its_start(tmp_path):
    from vqrae.image_data import load_image_dataset, load_validation_images

    start = tmp_path / "start"
    save_model(tiny_model(seed=4), start)
    common = ["--init_from", str(start), "--stage", "2", *CONSTANT_LR, "--save_steps", "1", "--save_total_limit", "3"]
    for weight in ("0", "1"):
        run(tmp_path / weight, *common, "--distillation_weight", weight, max_steps=3, sizes=False)
        reset_accelerator()
    free, distilled = tmp_path / "0", tmp_path / "1"
    before = encoder_weights(start)
    assert set(load_file(str(distilled / "model.safetensors"))) == set(load_file(str(start / "model.safetensors")))
    # Stage 2 trains the encoder. At the first step the student is its teacher, so the distillation term is 0 and so
    # is its gradient: both runs take the same first step. Then it pulls the encoder back towards its start.
    assert any(not torch.equal(before[k], encoder_weights(distilled)[k]) for k in before)
    first = [{k: v for k, v in checkpoint_weights(folder, 1).items() if k in before} for folder in (free, distilled)]
    assert same_weights(*first) and not same_weights(encoder_weights(free), encoder_weights(distilled))
    logged = {folder: [r["distillation"] for r in records(folder)] for folder in (free, distilled)}
    assert logged[free][0] == logged[distilled][0] == 0.0 and logged[free][1] == logged[distilled][1] > 0
    assert logged[distilled][2] < logged[free][2]  # the same batch, through the two encoders of step 2
    # On held-out images, the distilled encoder's features stay closer to the start encoder's.
    dataset, column = load_image_dataset("validation")
    images = load_validation_images(dataset, column, 32, dataset_name="builtin:photos", dataset_split="validation",
                                    max_samples=8)  # fmt: skip
    pixel_values = tiny_model().get_image_processor()(images=images.images, return_tensors="pt")["pixel_values"]
    teacher = encoder_features(start, pixel_values)
    drift = {
        folder: F.mse_loss(encoder_features(folder, pixel_values), teacher).item() for folder in (free, distilled)
    }
    assert drift[distilled] < 0.5 * drift[free]


def reset_accelerator():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def checkpoint_weights(output_dir, step, name="model.safetensors"):
    return load_file(str(output_dir / "checkpoints" / f"checkpoint-{step}" / name))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# A schedule that does not depend on warm-up rules: every step uses the full learning rate.
CONSTANT_LR = ["--lr_scheduler_type", "constant", "--warmup_steps", "0"]


def test_adaptive_gan_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    from vqrae.training.losses import adaptive_gan_weight

    generator = torch.Generator().manual_seed(0)
    last_layer = torch.nn.Parameter(torch.randn(3, 4, generator=generator))
    other = torch.nn.Parameter(torch.randn(3, 4, generator=generator))
    a, b = torch.randn(3, 4, generator=generator), 1e-3 * torch.randn(3, 4, generator=generator)
    # d rec / d last = 2 * a * last (and `other` does not count); d gan / d last = b. ||b|| ~ 3e-3, so the 1e-4
    # in the denominator matters.
    reconstruction = (a * last_layer**2).sum() + (other**2).sum()
    gan = (b * last_layer).sum()
    weight = adaptive_gan_weight(reconstruction, gan, last_layer)
    expected = np.linalg.norm(2 * a.numpy() * last_layer.detach().numpy()) / (np.linalg.norm(b.numpy()) + 1e-4)
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert not weight.requires_grad and last_layer.grad is None  # detached; gradients were not accumulated
    (reconstruction + gan).backward()  # the graph was kept for the loss's own backward pass
    assert torch.allclose(last_layer.grad, 2 * a * last_layer.detach() + b)
    # Clamped: with no GAN gradient at the last layer the ratio would be ||d rec / d last|| / 1e-4.
    flat = adaptive_gan_weight((a * last_layer**2).sum(), (0 * last_layer).sum(), last_layer, maximum=7.0)
    assert flat.item() == 7.0


def test_hinge_losses_on_known_logits():
    from vqrae.training.losses import discriminator_hinge_loss, generator_hinge_loss

    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.0], [1.5, -0.5]])
    # max(0, 1 - real): 0, 0.5, 2, 0 (mean 0.625); max(0, 1 + fake): 0, 1, 2.5, 0.5 (mean 1.0).
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 1.0))
    assert generator_hinge_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5 - 0.5) / 4)
    # A discriminator that separates by a margin of 1 has nothing left to learn.
    assert discriminator_hinge_loss(real.abs() + 1, -real.abs() - 1).item() == 0.0


def test_gan_trains_from_gan_start_step_only(tmp_path):
    # Without the tiny preset's FSQ noise: its draws come from torch's generator, which building the critic advances,
    # so with it the two runs would take other (equally likely) noise before gan_start_step too.
    common = [*CONSTANT_LR, "--save_steps", "1", "--save_total_limit", "3", "--fsq_noise_probability", "0"]
    run(tmp_path / "plain", *common, max_steps=3)
    reset_accelerator()
    gan = tmp_path / "gan"
    run(gan, *common, "--gan_weight", "0.5", "--gan_start_step", "2", max_steps=3)
    discriminator = [checkpoint_weights(gan, step, "model_1.safetensors") for step in (1, 2, 3)]
    assert discriminator[0].keys() == set(VQRAEPatchDiscriminator().state_dict())
    # Steps 1 and 2 (indices 0 and 1 < gan_start_step): no discriminator update, and the generator trains exactly as
    # without a GAN; step 3 updates the discriminator and adds the GAN term to the generator's loss.
    assert same_weights(discriminator[0], discriminator[1])
    assert not same_weights(discriminator[1], discriminator[2])
    assert same_weights(checkpoint_weights(gan, 2), checkpoint_weights(tmp_path / "plain", 2))
    assert not same_weights(checkpoint_weights(gan, 3), checkpoint_weights(tmp_path / "plain", 3))
    logged = records(gan)
    assert [("generator" in r, "discriminator" in r, "gan_weight" in r) for r in logged] == [(False,) * 3] * 2 + [
        (True,) * 3
    ]


@pytest.mark.parametrize("ema_decay", [None, 0.25])
def test_saved_and_evaluated_model_is_the_ema_of_the_raw_weights(ema_decay, tmp_path):
    start = tmp_path / "start"
    save_model(tiny_model(seed=5), start)
    output = tmp_path / "run"
    ema = [] if ema_decay is None else ["--ema_decay", str(ema_decay)]
    steps = 3
    common = [*CONSTANT_LR, "--save_steps", "1", "--save_total_limit", str(steps)]
    metrics = run(output, "--init_from", str(start), "--stage", "2", *common, *ema, max_steps=steps, sizes=False)
    raw = [checkpoint_weights(output, step) for step in range(1, steps + 1)]  # the trained model after each step
    saved = load_file(str(output / "model.safetensors"))
    if ema_decay is None:
        assert same_weights(saved, raw[-1])
    else:
        # The average starts at the start weights; update n moves it by 1 - min(decay, (1 + n) / (10 + n)).
        average = {name: value.double() for name, value in load_file(str(start / "model.safetensors")).items()}
        for n, weights in enumerate(raw, start=1):
            decay = min(ema_decay, (1 + n) / (10 + n))
            average = {name: decay * value + (1 - decay) * weights[name].double() for name, value in average.items()}
            kept = checkpoint_weights(output, n, "ema_model.safetensors")
            assert all(torch.allclose(kept[k].double(), average[k], rtol=0, atol=1e-6) for k in average), n
        assert saved.keys() == average.keys()
        assert all(torch.allclose(saved[k].double(), average[k], rtol=0, atol=1e-6) for k in saved)
        moved = [k for k in saved if (raw[-1][k] - saved[k]).abs().max() > 1e-4]
        assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    # The reported evaluation is that of the saved model.
    assert metrics["psnr"] == pytest.approx(independent_psnr(output)[0], abs=1e-4)


def test_defaults_are_the_tiny_cpu_preset():
    assert parse_train_args([]) == parse_train_args(["--config", "tiny_cpu"])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--config", "no_such_preset"], r"`config` must be a YAML file or the name of a preset .*'cosmos_fsq'"),
        (["--quantizer", "lfq"], r"`quantizer` must be one of \['cosmos_fsq', 'standard_fsq', 'vq'\]"),
        (["--vision_config", "huge"], r"`vision_config` must be one of"),
        (["--stage", "3"], r"`stage` must be 1"),
        (["--push_to_hub"], r"`push_to_hub` needs `hub_model_id`"),
        (["--learning_rate", "-1"], r"`learning_rate` must be a finite number >= 0"),
        (["--l1_weight", "0"], r"At least one reconstruction loss"),
    ],
)
def test_bad_options_are_refused_when_parsed(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_train_args(argv)


def test_the_stage_is_one_type_from_the_option_on():
    """`--stage 1|2` (or none) resolves to a `Stage`, which the loss and the training state compare by identity:
    a string such as "stage1" is no stage."""
    from vqrae.training.args import ModelArguments, Stage
    from vqrae.training.trainer import resolve_stage

    random, pretrained = ModelArguments(), ModelArguments(init_from="out/stage1")
    assert resolve_stage(None, random) is Stage.JOINT
    assert resolve_stage(None, pretrained) is Stage.ONE
    assert resolve_stage(1, random) is Stage.ONE
    assert resolve_stage(2, pretrained) is Stage.TWO
    assert "stage1" != Stage.ONE
    assert parse_train_args(["--stage", "2"])[2].stage == 2  # the option keeps its spelling (and its record)


def test_bad_runs_fail_early_with_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="`image_column` 'pixels' is not a column"):
        run(tmp_path / "a", "--image_column", "pixels")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images|is empty"):
        run(tmp_path / "b", "--train_dir", str(empty), "--validation_dir", str(empty))
    with pytest.raises(ValueError, match="Stage 2 .* needs a start model: pass --init_from"):
        run(tmp_path / "c", "--stage", "2")
    with pytest.raises(ValueError, match="perceptual loss \\(LPIPS\\) needs its weights locally"):
        run(tmp_path / "d", "--perceptual_weight", "0.1", "--lpips_weights", str(tmp_path))
    with pytest.raises(ValueError, match="must be 'latest' or a complete checkpoint folder"):
        run(tmp_path / "e", "--resume_from_checkpoint", str(tmp_path))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="already holds a run"):
        run(tmp_path / "f")


def test_latest_checkpoint_ignores_incomplete_saves(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "checkpoint-2").mkdir(parents=True)
    (root / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (root / ".incomplete-checkpoint-4").mkdir()  # a kill during the save of step 4
    (root / "checkpoint-6").mkdir()  # no trainer_state.json: not complete
    assert latest_checkpoint(str(tmp_path)) == str(root / "checkpoint-2")


def test_lpips_loads_local_weights_and_measures_a_distance(tmp_path):
    from torch import nn

    from vqrae.training.losses import LPIPS, LPIPS_WEIGHTS_FILE, VGG16_WEIGHTS_FILE

    torch.manual_seed(0)
    layers, channels = [], 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
    vgg = {f"features.{key}": value for key, value in nn.Sequential(*layers).state_dict().items()}
    torch.save(vgg, tmp_path / VGG16_WEIGHTS_FILE)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, width, 1, 1) for i, width in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / LPIPS_WEIGHTS_FILE)

    lpips = LPIPS(str(tmp_path))
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert torch.equal(lpips(images, images.detach()), torch.zeros(2))
    distance = lpips(images, torch.rand(2, 3, 32, 32))
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert images.grad.abs().sum() > 0 and not any(p.requires_grad for p in lpips.parameters())


def test_random_states_round_trip_through_json():
    import random

    import numpy as np

    from vqrae.training.checkpointing import rng_state, set_rng_state

    state = json.loads(json.dumps(rng_state()))
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_unreadable_images_are_skipped_and_counted_through_a_worker(tmp_path):
    import numpy as np
    from PIL import Image

    for split, count in (("train", 4), ("validation", 3)):
        folder = tmp_path / split
        folder.mkdir()
        for i in range(count):
            array = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(array).save(folder / f"{i}.png")
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    output = tmp_path / "out"
    folders = ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "validation")]
    metrics = run(output, *folders, "--dataloader_num_workers", "1", max_steps=3)
    assert metrics["num_images"] == 3 and metrics["dataset_name"] == str(tmp_path / "validation")
    (data,) = records(output, "data")
    assert data["unreadable_train"] >= 1 and data["unreadable_validation"] == 1


def test_streaming_and_gradient_accumulation_train(tmp_path):
    metrics = run(tmp_path / "stream", "--streaming", "--gradient_accumulation_steps", "2", max_steps=2)
    assert metrics["step"] == 2 and metrics["num_images"] == 8
    assert [r["step"] for r in records(tmp_path / "stream")] == [1, 2]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # Micro-batches k = 2s, 2s + 1 of 4 images are the global positions of batch s of 8 (`TrainingBatches`), and with
    # the mean L1 loss alone the mean of the two halves' gradients is the whole batch's gradient. Without the tiny
    # preset's FSQ noise, whose draws for two halves are not those for the whole batch.
    common = [*CONSTANT_LR, "--save_steps", "1", "--save_total_limit", "3", "--fsq_noise_probability", "0"]
    run(tmp_path / "accumulated", *common, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        max_steps=3)  # fmt: skip
    reset_accelerator()
    run(tmp_path / "large", *common, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
        max_steps=3)  # fmt: skip
    accumulated, large = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("accumulated", "large"))
    torch.testing.assert_close(accumulated, large, rtol=0, atol=1e-5)
    # The weights moved far more than that tolerance, so the comparison has power.
    first = checkpoint_weights(tmp_path / "large", 1)
    assert max((large[k] - first[k]).abs().max().item() for k in large) > 1e-3
    for logged_accumulated, logged_large in zip(
        records(tmp_path / "accumulated"), records(tmp_path / "large"), strict=True
    ):
        assert logged_accumulated["loss"] == pytest.approx(logged_large["loss"], rel=1e-5)
        # float32 sums in another order (two halves, then one mean): ~1e-5 apart through the decoder's overlap-add
        assert logged_accumulated["grad_norm"] == pytest.approx(logged_large["grad_norm"], rel=1e-4)
        assert logged_accumulated["step"] == logged_large["step"]


def test_push_to_hub_publishes_the_output_folder_at_the_end(tmp_path, monkeypatch):
    import vqrae.training.hub

    calls = []
    monkeypatch.setattr(vqrae.training.hub, "push_to_hub", lambda folder, **kwargs: calls.append((folder, kwargs)))
    output = tmp_path / "pushed"
    hub_args = ["--push_to_hub", "--hub_model_id", "org/tiny", "--hub_private_repo", "--hub_revision", "v1"]
    run(output, *hub_args, max_steps=1)
    assert calls == [(str(output), {"repo_id": "org/tiny", "private": True, "revision": "v1"})]
    assert "org/tiny" in (output / "README.md").read_text()  # the card names the repository
