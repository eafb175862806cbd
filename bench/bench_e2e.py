"""End-to-end throughput and memory: image -> indices and indices -> image, SDPA on and off.

    python bench/bench_e2e.py                       # tiny and base, batch 1 and 32 (~10 min on 2 quiet cores)
    python bench/bench_e2e.py --configs tiny --batch-sizes 1 32 --no-write
    python bench/bench_e2e.py --smoke               # tiny, batch 1, one round: checks the script runs; writes nothing

Randomly initialised models exactly as `vqrae-train --vision_config SIZE` builds them (`build_model`): `tiny`, the
built-in CPU preset (64 px, patch 8, width 128, 1 encoder block, 3 decoder blocks, 3x3 post_quant_conv) and `base`
(SigLIP-B/16 at 256 px, width 768, 12 + 12 layers, 1x1 post_quant_conv), both with FSQ [8, 8, 8, 5, 5, 5], float32,
under `torch.inference_mode()`. "encode" is
`model.encode(pixel_values).indices`; "decode" is `model.decode_from_indices(indices).reconstruction`. Two copies
of each model with the same weights run side by side in the process, one with `attn_implementation="sdpa"` and one
with `"eager"`, alternating. Peak memory is the rise of the process's resident-set high-water mark during one call
(activations and temporaries; the weights are resident before and listed apart).
"""

from __future__ import annotations

import copy

import torch
from _common import bench_parser, compare, load_average, markdown_table, parse_bench_args, peak_rss_mib, publish

from vqrae import VQRAEModel
from vqrae.presets import VISION_PRESETS
from vqrae.training.args import ModelArguments
from vqrae.training.trainer import build_model


def build(size: str) -> dict[str, VQRAEModel]:
    """The model `vqrae-train --vision_config SIZE` builds (randomly initialised), once per attention kind."""
    torch.manual_seed(0)
    sdpa = build_model(ModelArguments(vision_config=size)).eval()
    sdpa.set_attn_implementation("sdpa")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return {"sdpa": sdpa, "eager": eager}


def main(argv=None):
    parser = bench_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--configs", nargs="+", default=["tiny", "base"], choices=sorted(VISION_PRESETS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parse_bench_args(parser, argv, smoke={"configs": ["tiny"], "batch_sizes": [1], "repeats": 1})
    start_load = load_average()

    rows, weights, results = [], {}, {}
    for size in args.configs:
        models = build(size)
        weights[size] = sum(p.numel() * p.element_size() for p in models["sdpa"].parameters()) / 2**20
        image_size = VISION_PRESETS[size]["image_size"]
        for batch_size in args.batch_sizes:
            torch.manual_seed(1)
            pixel_values = torch.rand(batch_size, 3, image_size, image_size) * 2 - 1
            with torch.inference_mode():
                indices = models["sdpa"].encode(pixel_values).indices
                fns = {}
                for attn, model in models.items():
                    fns[("encode", attn)] = lambda m=model, x=pixel_values: m.encode(x).indices
                    fns[("decode", attn)] = lambda m=model, i=indices: m.decode_from_indices(i).reconstruction
                memory = {key: peak_rss_mib(fn) for key, fn in fns.items()}  # also the warm-up
                times = compare(fns, repeats=args.repeats, warmup=0)
            for direction in ("encode", "decode"):
                sdpa, eager = times[(direction, "sdpa")], times[(direction, "eager")]
                results[(size, batch_size, direction)] = (sdpa, eager)
                rows.append(
                    [
                        size,
                        "image -> indices" if direction == "encode" else "indices -> image",
                        batch_size,
                        f"{batch_size / sdpa:.1f}",
                        f"{batch_size / eager:.1f}",
                        f"{eager / sdpa:.2f}x",
                        f"{1e3 * sdpa / batch_size:.1f}",
                        f"{memory[(direction, 'sdpa')][1]:.0f}",
                        f"{memory[(direction, 'eager')][1]:.0f}",
                    ]
                )
            print(rows[-2], rows[-1], flush=True)
        del models

    header = [
        "config",
        "direction",
        "batch",
        "images/s SDPA",
        "images/s eager",
        "SDPA speed-up",
        "ms/image SDPA",
        "peak rise MiB SDPA",
        "peak rise MiB eager",
    ]
    speedups = [eager / sdpa for sdpa, eager in results.values()]
    lines = [
        "No GPU was lent to this task, so there are no bf16 GPU figures; everything is float32 on the CPU.",
        "Weights (resident before each call): "
        + ", ".join(f"{size} {mib:.0f} MiB" for size, mib in weights.items())
        + ".",
        f"- SDPA vs eager attention: {min(speedups):.2f}x to {max(speedups):.2f}x images/s (above 1: SDPA faster).",
    ]
    for size in args.configs:
        for batch_size in args.batch_sizes:
            encode, decode = results[(size, batch_size, "encode")][0], results[(size, batch_size, "decode")][0]
            lines.append(
                f"- {size}, batch {batch_size}: {batch_size / encode:.1f} images/s tokenized, "
                f"{batch_size / decode:.1f} images/s decoded (SDPA)."
            )
    body = markdown_table(header, rows) + "\n\n" + "\n".join(lines) + "\n"
    publish("bench_e2e", "3. End-to-end throughput and memory", body, start_load, args.no_write)


if __name__ == "__main__":
    main()
