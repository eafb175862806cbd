"""Where the time goes in a VQRAE tokenizer: encoder, quantizer, post_quant_conv and decoder.

    python bench/bench_breakdown.py                 # SigLIP-B/16 at 256 px, batch 8, float32 CPU (~4 min on 2 cores)
    python bench/bench_breakdown.py --batch-size 2 --repeats 3 --no-write
    python bench/bench_breakdown.py --smoke         # the tiny preset, batch 1: checks the script runs; writes nothing

Randomly initialised SigLIP-B/16 encoder at 256 px (width 768, 12 layers, 256 tokens; the `base` preset of
`vqrae-train`) and its mirrored ViT decoder, under `torch.inference_mode()`, float32, on the CPU. Four models share
the very same encoder and decoder weights and differ only after the encoder:

- FSQ [8, 8, 8, 5, 5, 5] (64,000 codes) + post_quant_conv with kernel 1 (the seed's Cosmos-Tokenizer setting);
- the same with kernel 3;
- FSQ [8, 8, 8] (512 codes), no post_quant_conv;
- VQ with 16384 codes (the VQRAE paper's codebook size), no post_quant_conv.

Each stage is timed on its own, alternating in one process (median over rounds; the millisecond stages get ten
times as many rounds as the encoder and decoder):
encode = encoder + quantizer (`model.quantize`: project_in, rounding, indices, project_out); decode =
indices_to_codes + post_quant_conv + decoder. The shares answer the seed's claims that post_quant_conv costs
"~0.01%" and that 64,000 codes have "no runtime difference" from 512.
"""

from __future__ import annotations

import torch
from _common import bench_parser, compare, load_average, markdown_table, parse_bench_args, publish

from vqrae import VQRAEConfig, VQRAEModel
from vqrae.presets import QUANTIZER_PRESETS, VISION_PRESETS

COSMOS = QUANTIZER_PRESETS["cosmos_fsq"]
VARIANTS = {
    "FSQ 64,000 + post_quant_conv k=1": COSMOS,
    "FSQ 64,000 + post_quant_conv k=3": {**COSMOS, "post_quant_conv_kernel_size": 3},
    "FSQ 512, no post_quant_conv": QUANTIZER_PRESETS["standard_fsq"],
    "VQ 16384, no post_quant_conv": QUANTIZER_PRESETS["vq"],
}
BASELINE = "FSQ 64,000 + post_quant_conv k=1"


def build_models(vision: dict) -> dict[str, VQRAEModel]:
    models = {}
    for name, kwargs in VARIANTS.items():
        torch.manual_seed(0)
        models[name] = VQRAEModel(VQRAEConfig(vision_config=dict(vision), **kwargs)).eval()
    shared = models[BASELINE]
    for model in models.values():  # one set of encoder/decoder weights for all
        model.encoder = shared.encoder
        model.decoder = shared.decoder
    return models


def stages(model: VQRAEModel, pixel_values: torch.Tensor) -> dict:
    """The stage callables of one model, with their inputs prepared once."""
    grid = (pixel_values.shape[-2] // model.patch_size, pixel_values.shape[-1] // model.patch_size)
    features = model.get_image_features(pixel_values).last_hidden_state
    indices = model.quantize(features, grid).indices
    codes = model.indices_to_codes(indices)
    processed = model.post_quant_conv(codes) if model.post_quant_conv is not None else codes
    tokens = processed.flatten(2).transpose(1, 2)
    result = {
        "quantizer": lambda: model.quantize(features, grid),
        "indices_to_codes": lambda: model.indices_to_codes(indices),
    }
    if model.post_quant_conv is not None:
        result["post_quant_conv"] = lambda: model.post_quant_conv(codes)
    result["decoder_from_tokens"] = lambda: model.decoder(tokens, *grid)
    return result


def claims_verdict(k1, k3, fsq512, vq, conv_weight_share: float) -> str:
    """The seed's two claims against the measured (encode, decode, quantizer, indices_to_codes, conv) seconds."""
    conv_share = 100 * k1[4] / k1[1]
    conv_holds = conv_share < 0.05
    lines = [
        f'- **post_quant_conv "~0.01%": {"holds" if conv_holds else "does not hold"}.** With kernel 1 it takes '
        f"{1e3 * k1[4]:.2f} ms, {conv_share:.2f} % of decode and {100 * k1[4] / (k1[0] + k1[1]):.2f} % of encode + "
        f"decode ({conv_share / 0.01:.0f}x the claimed share); its weights (= multiply-adds per token) are "
        f"{conv_weight_share:.2f} % of the decoder's. With kernel 3: {1e3 * k3[4]:.2f} ms, "
        f"{100 * k3[4] / k3[1]:.2f} % of decode.",
    ]
    encode_change = 100 * (k1[0] / fsq512[0] - 1)
    quantizer_share = 100 * max(k1[2] / k1[0], fsq512[2] / fsq512[0])
    lines.append(
        f'- **64,000 vs 512 codes "no runtime difference": {"holds" if abs(encode_change) < 2 else "does not hold"} '
        f"for the tokenizer** (encode {1e3 * k1[0]:.0f} vs {1e3 * fsq512[0]:.0f} ms, {encode_change:+.1f} %). The "
        f"FSQ quantizer itself takes {1e3 * k1[2]:.2f} ms for 64,000 codes vs {1e3 * fsq512[2]:.2f} ms for 512 "
        f"({k1[2] / fsq512[2]:.2f}x) and indices_to_codes {1e3 * k1[3]:.2f} vs {1e3 * fsq512[3]:.2f} ms, at most "
        f"{quantizer_share:.2f} % of encode either way. A learned VQ with 16384 codes is what costs: its search "
        f"takes {1e3 * vq[2]:.1f} ms ({100 * vq[2] / vq[0]:.1f} % of encode)."
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = bench_parser(__doc__.split("\n\n")[0], repeats=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vision-config", default="base", choices=sorted(VISION_PRESETS), help="the encoder preset")
    args = parse_bench_args(parser, argv, smoke={"vision_config": "tiny", "batch_size": 1, "repeats": 1})
    start_load = load_average()

    vision = VISION_PRESETS[args.vision_config]
    models = build_models(vision)
    torch.manual_seed(1)
    pixel_values = torch.rand(args.batch_size, 3, vision["image_size"], vision["image_size"]) * 2 - 1
    with torch.inference_mode():
        shared = models[BASELINE]
        fns = {("shared", "encoder"): lambda: shared.get_image_features(pixel_values).last_hidden_state}
        for name, model in models.items():
            for stage, fn in stages(model, pixel_values).items():
                if stage == "decoder_from_tokens" and name != BASELINE:
                    continue  # the decoder is shared: timed once
                fns[(name, stage)] = fn
        # The encoder and decoder take seconds, the other stages milliseconds: the light ones get their own
        # alternating rounds, ten times as many, so their medians are as steady as the heavy ones'.
        heavy = {key: fn for key, fn in fns.items() if key[1] in ("encoder", "decoder_from_tokens")}
        light = {key: fn for key, fn in fns.items() if key not in heavy}
        times = compare(heavy, repeats=args.repeats, warmup=1)
        times.update(compare(light, repeats=10 * args.repeats, warmup=2))

    encoder, decoder = times[("shared", "encoder")], times[(BASELINE, "decoder_from_tokens")]
    rows, totals = [], {}
    for name in models:
        quantizer, to_codes = times[(name, "quantizer")], times[(name, "indices_to_codes")]
        conv = times.get((name, "post_quant_conv"), 0.0)
        encode, decode = encoder + quantizer, to_codes + conv + decoder
        totals[name] = (encode, decode, quantizer, to_codes, conv)
        rows.append(
            [
                name,
                f"{1e3 * encoder:.1f}",
                f"{1e3 * quantizer:.2f} ({100 * quantizer / encode:.3f} %)",
                f"{1e3 * to_codes:.2f} ({100 * to_codes / decode:.3f} %)",
                f"{1e3 * conv:.2f} ({100 * conv / decode:.3f} %)" if conv else "-",
                f"{1e3 * decoder:.1f}",
                f"{1e3 * encode:.1f}",
                f"{1e3 * decode:.1f}",
            ]
        )
    header = [
        "model (shared encoder/decoder)",
        "encoder ms",
        "quantizer ms (% of encode)",
        "indices_to_codes ms (% of decode)",
        "post_quant_conv ms (% of decode)",
        "decoder ms",
        "encode ms",
        "decode ms",
    ]

    k1, k3 = totals[BASELINE], totals["FSQ 64,000 + post_quant_conv k=3"]
    fsq512, vq = totals["FSQ 512, no post_quant_conv"], totals["VQ 16384, no post_quant_conv"]
    conv_params = models[BASELINE].post_quant_conv.weight.numel()
    decoder_params = sum(parameter.numel() for parameter in models[BASELINE].decoder.parameters())
    verdict = claims_verdict(k1, k3, fsq512, vq, 100 * conv_params / decoder_params)
    body = (
        f"Batch {args.batch_size}, {vision['image_size']} px, width {vision['hidden_size']}, "
        f"{vision['num_hidden_layers']} layers, {(vision['image_size'] // vision['patch_size']) ** 2} tokens per "
        "image, float32, inference mode.\n\n" + markdown_table(header, rows) + "\n\n" + verdict
    )
    encoder = "SigLIP-B/16" if args.vision_config == "base" else f"the {args.vision_config} preset"
    title = f"2. Where the time goes ({encoder}, {vision['image_size']} px)"
    publish("bench_breakdown", title, body, start_load, args.no_write)


if __name__ == "__main__":
    main()
