"""bf16 end to end at 256 px: images/s and peak memory of encode, decode and a training step; SDPA vs eager
attention, torch.compile on and off (on a CUDA GPU); bf16 vs float32 weights (on the CPU).

    python bench/bench_gpu.py                   # on a GPU: base + so400m (~4 min on an H100/H200); else the CPU part
    python bench/bench_gpu.py --smoke           # both parts, tiny, on the CPU (GPU part: aot_eager); writes nothing
    python bench/bench_gpu.py --cpu             # the CPU part even where a GPU is present
    python bench/bench_gpu.py --engines         # on a GPU: the engines part only (under 7 min: --engines-time-budget)

On a device machine, copy the results back as they come (a run stopped by a time limit keeps what it measured):

    python bench/bench_gpu.py --copy-to "$OUT"  # writes BENCHMARKS.md and bench_gpu.json into $OUT after each block

**GPU part.** Randomly initialised models as `vqrae-train` builds them (`build_model`, FSQ [8, 8, 8, 5, 5, 5] +
1x1 post_quant_conv, decoder mirrored from the encoder), built on the GPU and cast with `model.to(torch.bfloat16)`
(the quantizer stays float32): `base` (SigLIP-B/16 at 256 px: width 768, 12 layers, 12 heads, MLP 3072) and
`so400m` (the SigLIP-so400m shape at patch 16, 256 px: width 1152, 27 layers, 16 heads, MLP 4304). Four steps:

- encode: `model.encode(pixel_values).indices` (image -> indices), `torch.inference_mode()`, batch 64;
- decode: `model.decode_from_indices(indices).reconstruction` (indices -> image), batch 64;
- train stage 1: encoder frozen; `model(pixel_values)`, L1 loss on the reconstruction, backward, `AdamW.step()`,
  `zero_grad(set_to_none=True)`, batch 32, all in bf16 weights (AdamW's states follow the parameters' dtype);
- train joint: the same with the encoder trained.

Each step runs in three variants on one model (the same weights), alternating round by round: `sdpa` and `eager`
(`model.set_attn_implementation`), and `sdpa + compile`: every transformer block of the encoder and the decoder
wrapped in `torch.compile` (regional compilation, PyTorch's recipe for repeated blocks: one block is compiled and
reused by the others; the quantizer and the input checks stay eager). `torch._dynamo.reset()` before each step, so
every compile time is a cold one; it is reported apart (the first call minus a steady call). A round times
`iterations` back-to-back calls (about 0.3 s) between two `torch.cuda.synchronize()`; the figure is the median over
rounds, with the min-max over rounds. Peak memory is `torch.cuda.max_memory_allocated()` over one steady call (reset
just before); it includes the weights (and for training the AdamW states and the gradients). An out-of-memory error
halves the batch and retries; the table says so.

**Engines part** (`--engines`). vqrae's own training step (`build_training_state`, `train_step`, `VQRAELoss`:
AdamW, cosine schedule, clipping, no EMA) on random images, the encoder trained jointly, batch 32, 2 untimed steps
and 10 timed ones, for `base` and `so400m` in bf16 (accelerate's mixed precision: float32 weights, autocast) under
each engine: `ddp` (accelerate's DDP wrapper in a torchrun-style world of one process), `fsdp2` (torch's
`fully_shard` on every `_no_split_modules` block, then the root, with a bf16 `MixedPrecisionPolicy`, as accelerate
applies it), `fsdp2 (accelerate)` (accelerate's FSDP plugin, version 2; GPU only: on the CPU accelerate runs each
process alone) and `deepspeed zero-2` (where the deepspeed package is installed; a refusal by vqrae is recorded as
`refused`). Then a few steps in fp16 with the GAN (`base`, DDP): the critic's loss per step and how far its weights
moved. Each job runs in a child process of this script (one accelerate state per process; a crash or out-of-memory
error is recorded in the table, not fatal); the jobs share `--engines-time-budget` seconds. images/s over the timed
steps, and `torch.cuda.max_memory_allocated()` over them. `--smoke` runs every job at the tiny size on the CPU over
gloo, in bf16 (accelerate's fp16 needs a GPU), and fails unless `ddp`, `fsdp2` and the GAN job trained and the
critic's weights and loss moved.

**CPU part.** `base`, encode and decode, batch 8, SDPA, no compile: float32 weights, bf16 weights (a copy cast with
`model.to(torch.bfloat16)`) and float32 weights under `torch.autocast("cpu", torch.bfloat16)` (what
`vqrae-tokenize --mixed_precision bf16` does), alternating round by round; median and min-max of seconds per call,
the speed-up as the median (min-max) of the per-round ratios, and the rise of the resident-set peak during one call.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    BENCHMARKS_MD,
    bench_parser,
    compare_samples,
    load_average,
    markdown_table,
    parse_bench_args,
    peak_rss_mib,
    publish,
)
from torch._dynamo.utils import counters

from vqrae import VQRAEModel
from vqrae.errors import UsageError
from vqrae.training.args import ModelArguments
from vqrae.training.trainer import build_model

SECTION = ("bench_gpu", "8. bf16 end to end: GPU throughput and memory, CPU bf16 vs float32")
SUBSECTIONS = [
    ("bench_gpu_cuda", "8a. On a GPU: base and so400m, bf16, SDPA vs eager, torch.compile on and off"),
    ("bench_gpu_cpu", "8b. On the CPU: bf16 vs float32 weights ({size})"),
    ("bench_gpu_engines", "8c. On a GPU: training engines (DDP, FSDP2, DeepSpeed ZeRO-2) in bf16, fp16 with the GAN"),
]
INTRO = (
    "Written by `bench/bench_gpu.py` (its docstring has the details). Random weights built from config (no "
    "downloads), FSQ [8, 8, 8, 5, 5, 5] + post_quant_conv, 256 px. Each part runs in its own command (the GPU "
    "parts on a lent GPU, the CPU part here), with its own machine line."
)
# Encoder shapes; the decoder mirrors the encoder (the library default). `so400m` is SigLIP-so400m's width, depth,
# heads and MLP at patch 16 (as in the SigLIP2 so400m-patch16 checkpoints).
SIZES = {
    "base": {"vision_config": "base"},
    "so400m": {
        "vision_config": "base",
        "hidden_size": 1152,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "intermediate_size": 4304,
    },
    "tiny": {"vision_config": "tiny"},  # --smoke
}
STEPS = ("encode", "decode", "train stage 1", "train joint")
VARIANTS = ("sdpa", "eager", "sdpa + compile")
GIB = 2**30


def describe(model: VQRAEModel) -> str:
    config, vision = model.config, model.config.vision_config
    return (
        f"{vision.image_size} px, patch {vision.patch_size}, encoder width {vision.hidden_size}, "
        f"{vision.num_hidden_layers} layers, {vision.num_attention_heads} heads, MLP {vision.intermediate_size}; "
        f"decoder width {config.decoder_hidden_size}, {config.decoder_num_hidden_layers} layers"
    )


def build(size: str, device: torch.device) -> VQRAEModel:
    """The model `vqrae-train` builds for `size` (randomly initialised, float32), on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        return build_model(ModelArguments(**SIZES[size]))


def image_size_of(model: VQRAEModel) -> int:
    return model.config.vision_config.image_size


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# ---------------------------------------------------------------------------------------------------------------
# GPU part (also run tiny on the CPU by --smoke)
# ---------------------------------------------------------------------------------------------------------------


class Variants:
    """Switch one model between `sdpa`, `eager` and `sdpa + compile` without copying its weights: the compiled
    variant swaps the transformer blocks of the encoder and the decoder for `torch.compile` wrappers of the same
    blocks (which share their parameters)."""

    def __init__(self, model: VQRAEModel, backend: str):
        self.model = model
        self.backend = backend
        siglip = getattr(model.encoder, "vision_model", model.encoder)  # transformers 4 nests it; 5 does not
        self.block_lists = [siglip.encoder.layers, model.decoder.layers]
        self.originals = [list(blocks) for blocks in self.block_lists]
        self.compiled = None
        self.current = None

    def reset_compiled(self) -> None:
        """Fresh compile wrappers and an empty dynamo cache: the next compiled call compiles from cold."""
        self.use("sdpa")
        torch._dynamo.reset()
        self.compiled = [[torch.compile(block, backend=self.backend) for block in blocks] for blocks in self.originals]

    def use(self, variant: str) -> None:
        if variant == self.current:
            return
        blocks = self.compiled if variant == "sdpa + compile" else self.originals
        for block_list, chosen in zip(self.block_lists, blocks, strict=True):
            for index, block in enumerate(chosen):
                block_list[index] = block
        attention = "eager" if variant == "eager" else "sdpa"
        if self.model.config._attn_implementation != attention:
            self.model.set_attn_implementation(attention)
        self.current = variant


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(peak bytes allocated during one call of `fn`, rise of that peak over the bytes allocated before)."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return float(peak), float(peak - before)


def step_functions(model: VQRAEModel, step: str, batch_size: int, device: torch.device):
    """(the callable of one step, a context to run it in, a clean-up) for `batch_size` images."""
    torch.manual_seed(1)
    size = image_size_of(model)
    pixel_values = torch.rand(batch_size, 3, size, size, device=device) * 2 - 1  # float32, as the processor gives
    if step in ("encode", "decode"):
        model.eval()
        with torch.inference_mode():
            indices = model.encode(pixel_values).indices
        if step == "encode":
            return (lambda: model.encode(pixel_values).indices), torch.inference_mode, lambda: None
        return (lambda: model.decode_from_indices(indices).reconstruction), torch.inference_mode, lambda: None
    model.freeze_encoder(step == "train stage 1")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    target = pixel_values

    def train_step():
        reconstruction = model(pixel_values).reconstruction
        loss = F.l1_loss(reconstruction.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def clean_up():
        optimizer.state.clear()
        for parameter in model.parameters():
            parameter.grad = None
        model.freeze_encoder(False)
        model.eval()

    return train_step, nullcontext, clean_up


def measure_step(variants: Variants, step: str, batch_size: int, device: torch.device, args) -> list[dict]:
    """Warm up every variant (the compiled one compiles here), then `args.rounds` rounds in a rotating order."""
    if args.fake_oom_above and batch_size > args.fake_oom_above:  # --smoke: walk the halving path on the CPU
        raise torch.OutOfMemoryError(f"(simulated by --fake-oom-above {args.fake_oom_above}) out of memory")
    model = variants.model
    variants.reset_compiled()
    fn, context, clean_up = step_functions(model, step, batch_size, device)
    names = list(VARIANTS) if not args.no_compile else [v for v in VARIANTS if v != "sdpa + compile"]
    first, warm, memory, graphs = {}, {}, {}, {}
    try:
        with context():
            for name in names:  # the compiled variant last, after the eager ones have allocated what they need
                variants.use(name)
                graphs_before = counters["stats"]["unique_graphs"]
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                first[name] = time.perf_counter() - start
                graphs[name] = counters["stats"]["unique_graphs"] - graphs_before
                start = time.perf_counter()
                fn()
                synchronize(device)
                warm[name] = time.perf_counter() - start
            iterations = {name: max(1, min(50, math.ceil(args.round_seconds / warm[name]))) for name in names}
            samples = {name: [] for name in names}
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    variants.use(name)
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(iterations[name]):
                        fn()
                    synchronize(device)
                    samples[name].append((time.perf_counter() - start) / iterations[name])
            for name in names:
                variants.use(name)
                memory[name] = peak_memory(fn, device)
    finally:
        clean_up()
        variants.use("sdpa")
    results = []
    for name in names:
        median = statistics.median(samples[name])
        results.append(
            {
                "step": step,
                "variant": name,
                "batch_size": batch_size,
                "seconds": samples[name],
                "iterations": iterations[name],
                "first_call_s": first[name],
                "compile_s": first[name] - median if name == "sdpa + compile" else None,
                "compiled_graphs": graphs[name],
                "peak_bytes": memory[name][0],
                "peak_rise_bytes": memory[name][1],
            }
        )
    return results


def gib(value: float) -> str:
    return "-" if math.isnan(value) else f"{value / GIB:.2f}"


def gpu_rows(results: list[dict]) -> tuple[list[list], list[str]]:
    rows, notes = [], []
    by_key = {(r["size"], r["step"], r["variant"]): r for r in results}
    for r in results:
        median, low, high = spread(r["seconds"])
        reference = by_key.get((r["size"], r["step"], "sdpa"))
        ratio = "-"
        if reference is not None and r["variant"] != "sdpa":
            per_round = [ref / own for ref, own in zip(reference["seconds"], r["seconds"], strict=True)]
            mid, lo, hi = spread(per_round)
            ratio = f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"
        batch = str(r["batch_size"])
        if r["batch_size"] != r["requested_batch_size"]:
            batch += f" (OOM at {r['requested_batch_size']})"
        rows.append(
            [
                r["size"],
                r["step"],
                batch,
                r["variant"],
                f"{r['batch_size'] / median:.1f} ({r['batch_size'] / high:.1f}-{r['batch_size'] / low:.1f})",
                ratio,
                f"{1e3 * median:.1f}",
                f"{r['compile_s']:.1f} ({r['compiled_graphs']} graphs)" if r["compile_s"] is not None else "-",
                gib(r["peak_bytes"]),
                gib(r["peak_rise_bytes"]),
            ]
        )
    for (size, step, variant), r in by_key.items():
        if variant == "sdpa":
            continue
        reference = by_key.get((size, step, "sdpa"))
        if reference is None:
            continue
        per_round = [ref / own for ref, own in zip(reference["seconds"], r["seconds"], strict=True)]
        mid, lo, hi = spread(per_round)
        what = "eager attention" if variant == "eager" else "torch.compile"
        verdict = (
            "within the noise (the per-round ratios straddle 1)"
            if lo <= 1 <= hi
            else ("faster" if mid > 1 else "slower")
        )
        notes.append(f"{size}, {step}: {what} {mid:.2f}x the speed of SDPA ({lo:.2f}-{hi:.2f}): {verdict}.")
    return rows, notes


def gpu_body(results: list[dict], weights: dict, skipped: list[str], finished: bool, args) -> str:
    header = [
        "size",
        "step",
        "batch",
        "variant",
        "images/s median (min-max)",
        "speed vs SDPA (per-round min-max)",
        "ms per call",
        "compile s",
        "peak GiB",
        "peak rise GiB",
    ]
    rows, notes = gpu_rows(results)
    sizes = "; ".join(f"{size}: {text}" for size, text in weights.items())
    lines = [
        f"Sizes: {sizes}.",
        f"Rounds: {args.rounds} per variant, each about {args.round_seconds} s of back-to-back calls; compile backend "
        f"`{args.compile_backend}`.",
        "",
        markdown_table(header, rows),
        "",
        "- A speed ratio above 1: faster than SDPA in the same process. A difference counts only when the per-round "
        "ratios all lie on one side of 1.",
        *[f"- {note}" for note in notes],
        "- peak GiB counts everything allocated (the weights; for training also the gradients and AdamW's states); "
        "peak rise GiB is what the call itself allocated on top of what was there.",
    ]
    if skipped:
        lines.append("- Not measured: " + "; ".join(skipped) + ".")
    if not finished:
        lines.append("- INCOMPLETE: the run was still going (or was stopped) after the rows above.")
    return "\n".join(lines)


def copy_results(args, json_name: str, payload: dict) -> None:
    """--copy-to: BENCHMARKS.md (when written) and the raw results as JSON, after every block."""
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        if not args.no_write:
            shutil.copy(BENCHMARKS_MD, Path(args.copy_to) / "BENCHMARKS.md")
        (Path(args.copy_to) / json_name).write_text(json.dumps(payload))


def run_gpu_part(args, device: torch.device, start_load: float) -> None:
    started = time.perf_counter()
    results, weights, skipped = [], {}, []

    def write(finished: bool) -> None:
        body = gpu_body(results, weights, skipped, finished, args)
        publish(*SECTION, body, start_load, args.no_write, subsection=(INTRO, SUBSECTIONS, "bench_gpu_cuda"))
        copy_results(args, "bench_gpu.json", {"weights_gib": weights, "results": results, "skipped": skipped})

    for size in args.sizes:
        if time.perf_counter() - started > args.time_budget:
            skipped.append(f"{size} (the time budget of {args.time_budget:.0f} s was spent)")
            continue
        model = build(size, device).to(torch.bfloat16)
        weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
        weights[size] = f"{describe(model)}; {weight_gib:.2f} GiB of weights"
        variants = Variants(model, args.compile_backend)
        for step in args.steps:
            if time.perf_counter() - started > args.time_budget:
                skipped.append(f"{size} {step} (the time budget of {args.time_budget:.0f} s was spent)")
                continue
            requested = args.inference_batch if step in ("encode", "decode") else args.train_batch
            batch_size = requested
            while True:
                try:
                    block = measure_step(variants, step, batch_size, device, args)
                    break
                except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
                    if not is_out_of_memory(error) or batch_size == 1:
                        raise
                    print(f"{size} {step}: out of memory at batch {batch_size}; halving", flush=True)
                    free_memory(device)
                    batch_size //= 2
            for row in block:
                row.update(size=size, requested_batch_size=requested)
                print(
                    f"{size} {step} {row['variant']} batch {batch_size}: "
                    f"{batch_size / statistics.median(row['seconds']):.1f} images/s, "
                    f"peak {gib(row['peak_bytes'])} GiB, first call {row['first_call_s']:.1f} s",
                    flush=True,
                )
            results.extend(block)
            free_memory(device)
            write(finished=False)
        del variants, model
        free_memory(device)
    write(finished=True)
    print(f"GPU part done in {time.perf_counter() - started:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# CPU part: bf16 vs float32 weights
# ---------------------------------------------------------------------------------------------------------------


def run_cpu_part(args, start_load: float) -> None:
    size = args.cpu_size
    float32 = build(size, torch.device("cpu")).eval()
    float32.set_attn_implementation("sdpa")
    bfloat16 = copy.deepcopy(float32).to(torch.bfloat16)
    weights = {
        name: sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        for name, model in (("float32", float32), ("bf16", bfloat16))
    }
    torch.manual_seed(1)
    image_size = image_size_of(float32)
    pixel_values = torch.rand(args.cpu_batch, 3, image_size, image_size) * 2 - 1

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    precisions = {"float32": (float32, nullcontext), "bf16 weights": (bfloat16, nullcontext)}
    precisions["float32 + bf16 autocast"] = (float32, autocast)
    with torch.inference_mode():
        indices = float32.encode(pixel_values).indices
        fns = {}
        for name, (model, context) in precisions.items():

            def encode(m=model, c=context):
                with c():
                    return m.encode(pixel_values).indices

            def decode(m=model, c=context):
                with c():
                    return m.decode_from_indices(indices).reconstruction

            fns[("encode", name)] = encode
            fns[("decode", name)] = decode
        memory = {key: peak_rss_mib(fn) for key, fn in fns.items()}  # also the warm-up
        samples = compare_samples(fns, repeats=args.rounds_cpu, warmup=0)

    header = [
        "step",
        "precision",
        "batch",
        "ms per call, median (min-max)",
        "images/s (median)",
        "speed vs float32, per-round ratio median (min-max)",
        "fastest round: ms",
        "fastest vs float32's fastest",
        "peak RSS rise MiB",
    ]
    rows, notes, worst_spread = [], [], 0.0
    for step in ("encode", "decode"):
        reference = samples[(step, "float32")]
        for name in precisions:
            own = samples[(step, name)]
            median, low, high = spread(own)
            worst_spread = max(worst_spread, high / low - 1)
            ratio = fastest_ratio = "-"
            if name != "float32":
                mid, lo, hi = spread([ref / value for ref, value in zip(reference, own, strict=True)])
                ratio = f"**{mid:.2f}x** ({lo:.2f}-{hi:.2f})"
                fastest_ratio = f"{min(reference) / low:.2f}x"
                verdict = (
                    "within the noise (the per-round ratios straddle 1)"
                    if lo <= 1 <= hi
                    else ("faster in every round" if mid > 1 else "slower in every round")
                )
                notes.append(
                    f"{step}, {name}: {mid:.2f}x the speed of float32 (per-round {lo:.2f}-{hi:.2f}), {verdict}; "
                    f"fastest rounds {min(reference) / low:.2f}x."
                )
            rows.append(
                [
                    "image -> indices" if step == "encode" else "indices -> image",
                    name,
                    args.cpu_batch,
                    f"{1e3 * median:.0f} ({1e3 * low:.0f}-{1e3 * high:.0f})",
                    f"{args.cpu_batch / median:.2f}",
                    ratio,
                    f"{1e3 * low:.0f}",
                    fastest_ratio,
                    f"{memory[(step, name)][1]:.0f}",
                ]
            )
    isa = "AMX-BF16" if "amx_bf16" in Path("/proc/cpuinfo").read_text() else "no AMX-BF16"
    lines = [
        f"`{size}` ({describe(float32)}), random weights, batch {args.cpu_batch}, SDPA, no compile, "
        f"`torch.inference_mode()`, {args.rounds_cpu} alternating rounds of one call each after a warm-up; the CPU "
        f"has {isa}. Weights resident: float32 {weights['float32']:.0f} MiB, bf16 {weights['bf16']:.0f} MiB (the "
        "quantizer stays float32). Decode uses the float32 model's indices for all three.",
        "",
        markdown_table(header, rows),
        "",
        *[f"- {note}" for note in notes],
        "- bf16 weights halve the resident weights; autocast keeps float32 weights and casts on the fly.",
        f"- The rounds of one call differ by up to {100 * worst_spread:.0f} % (slowest over fastest); on a shared "
        "machine the fastest rounds are the closest to the speed of a quiet one.",
    ]
    subsections = [(key, heading.format(size=size)) for key, heading in SUBSECTIONS]
    publish(*SECTION, "\n".join(lines), start_load, args.no_write, subsection=(INTRO, subsections, "bench_gpu_cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Engines part: vqrae's own training step under DDP, FSDP2 and DeepSpeed, and fp16 with the GAN
# ---------------------------------------------------------------------------------------------------------------

# Each job runs in its own process (accelerate's state is one per process; a crash or an out-of-memory error of one
# engine cannot take the others down). Smoke mode runs them on the CPU in bf16: accelerate's fp16 needs a GPU.
ENGINES = ("ddp", "fsdp2", "fsdp2 (accelerate)", "deepspeed zero-2")
GAN_JOB = "fp16 + GAN"
# What must run on the CPU (the smoke run fails otherwise): accelerate shards with FSDP only on GPUs, and DeepSpeed
# is optional (refused or not installed is an answer, not a failure).
REQUIRED_ON_CPU = ("ddp", "fsdp2", GAN_JOB)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env(engine: str) -> dict:
    """torchrun's variables for a world of one process: accelerate then wraps the model itself (DDP, its FSDP2
    plugin, DeepSpeed). The plain `fsdp2` job shards with torch directly and keeps accelerate out of it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if engine != "fsdp2":
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(_free_port())
    if engine == "fsdp2 (accelerate)":
        env["ACCELERATE_USE_FSDP"] = "true"
    return env


def _shard_fsdp2(model, device: torch.device) -> None:
    """FSDP2 as accelerate applies it: `fully_shard` on every `_no_split_modules` block, then on the root, with
    bf16 parameters in compute and float32 gradient reduction, over a process group of one."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in [m for m in model.modules() if type(m).__name__ in model._no_split_modules]:
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def _engine_accelerator(engine: str, precision: str, device: torch.device, model):
    from accelerate import Accelerator

    cpu = device.type == "cpu"
    if engine == "fsdp2 (accelerate)":
        from accelerate import FullyShardedDataParallelPlugin
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=list(model._no_split_modules),
            mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        )
        return Accelerator(mixed_precision=precision, fsdp_plugin=plugin)
    if engine == "deepspeed zero-2":
        from accelerate import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
        return Accelerator(mixed_precision=precision, deepspeed_plugin=plugin)
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _critic_weights(loss_fn) -> torch.Tensor:
    from accelerate.utils import extract_model_from_parallel

    critic = extract_model_from_parallel(loss_fn.discriminator)
    return torch.cat([p.detach().float().flatten().cpu() for p in critic.parameters()])


def engine_job(job: dict) -> dict:
    """One engine's training steps through vqrae's own `build_training_state` and `train_step` (AdamW, cosine
    schedule, gradient clipping; no EMA), on random images of the model's size. Returns the measurements."""
    from vqrae.training.args import Stage, VQRAETrainingArguments
    from vqrae.training.losses import VQRAELoss
    from vqrae.training.state import build_training_state, train_step

    engine, device = job["engine"], torch.device(job["device"])
    gan = engine == GAN_JOB
    model = build(job["size"], torch.device("cpu"))
    if engine == "fsdp2":
        model.to(device)
        _shard_fsdp2(model, device)
    steps = job["warmup_steps"] + job["steps"]
    args = VQRAETrainingArguments(
        output_dir=job["output_dir"], mixed_precision=job["precision"], max_steps=steps, warmup_steps=0,
        per_device_train_batch_size=job["batch_size"], ema_decay=None, gan_weight=0.1 if gan else 0.0,
    )  # fmt: skip
    processor = model.get_image_processor()
    loss_fn = VQRAELoss(
        image_mean=processor.image_mean, image_std=processor.image_std, gan_weight=args.gan_weight,
        discriminator_learning_rate=args.learning_rate,
    ).to(device)  # fmt: skip
    accelerator = _engine_accelerator("ddp" if gan else engine, job["precision"], device, model)
    state = build_training_state(model, loss_fn, args, accelerator, Stage.JOINT)
    torch.manual_seed(1)
    size = image_size_of(state.unwrapped)
    pixels = torch.rand(job["batch_size"], 3, size, size, device=accelerator.device) * 2 - 1
    batches = itertools.repeat({"pixel_values": pixels, "unreadable": []})
    critic_start = _critic_weights(loss_fn) if gan else None
    losses, critic_losses = [], []
    for index in range(steps):
        if index == job["warmup_steps"]:
            synchronize(accelerator.device)
            if accelerator.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(accelerator.device)
            start = time.perf_counter()
        terms = train_step(state, loss_fn, batches).terms
        losses.append(float(terms["loss"]))
        critic_losses.append(float(terms.get("discriminator", float("nan"))))
    synchronize(accelerator.device)
    seconds = time.perf_counter() - start
    result = {
        "wrapper": type(state.model).__name__,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "images_per_s": job["batch_size"] * job["steps"] / seconds,
        "peak_bytes": float(torch.cuda.max_memory_allocated(accelerator.device))
        if accelerator.device.type == "cuda" else float("nan"),
        "losses": losses,
    }  # fmt: skip
    if gan:
        critic_change = _critic_weights(loss_fn) - critic_start
        result["critic_losses"] = critic_losses
        result["critic_relative_change"] = float(critic_change.norm() / critic_start.norm())
    return result


def _error_status(error: BaseException) -> str:
    if isinstance(error, UsageError):
        return "refused"
    if isinstance(error, ImportError) and "deepspeed" in str(error).lower():
        return "not installed"
    return "out of memory" if is_out_of_memory(error) else "failed"


def engine_worker(job_path: str) -> None:
    """The child process's side: run the job, write its result (or the error's first line) next to the job."""
    job = json.loads(Path(job_path).read_text())
    try:
        result = {"status": "ok", **engine_job(job)}
    except Exception as error:  # noqa: BLE001 - every engine's failure is a result of this benchmark
        traceback.print_exc()
        text = " ".join(str(error).split()) or type(error).__name__
        result = {"status": _error_status(error), "error": f"{type(error).__name__}: {text}"[:300]}
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    Path(job["result_path"]).write_text(json.dumps(result))


def run_engine_process(job: dict, timeout: float) -> dict:
    """Run one job in a child process of this script, within `timeout` seconds."""
    Path(job["job_path"]).write_text(json.dumps(job))
    command = [sys.executable, str(Path(__file__).resolve()), "--engine-job", job["job_path"]]
    try:
        done = subprocess.run(command, env=_launch_env(job["engine"]), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "stopped", "error": f"still running when the time budget ran out ({timeout:.0f} s left)"}
    if Path(job["result_path"]).exists():
        return json.loads(Path(job["result_path"]).read_text())
    last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [f"exit status {done.returncode}"]
    return {"status": "failed", "error": f"the process died (exit status {done.returncode}): {last[0][:300]}"}


def _skip_reason(engine: str, device: torch.device) -> str | None:
    if engine == "fsdp2 (accelerate)" and device.type != "cuda":
        return "skipped: accelerate shards with FSDP only on GPUs (on the CPU each process runs alone)"
    if engine == "deepspeed zero-2" and importlib.util.find_spec("deepspeed") is None:
        return "not installed: the deepspeed package is absent"
    return None


def engine_jobs(args, device: torch.device, folder: str) -> list[dict]:
    """The jobs in the order they run: every engine for the first size, the GAN job, then the other sizes."""
    gan_precision = "fp16" if device.type == "cuda" else "bf16"  # accelerate's fp16 needs a GPU
    plan = [(args.engine_sizes[0], engine, "bf16") for engine in ENGINES]
    plan.append((args.engine_sizes[0], GAN_JOB, gan_precision))
    plan += [(size, engine, "bf16") for size in args.engine_sizes[1:] for engine in ENGINES]
    jobs = []
    for index, (size, engine, precision) in enumerate(plan):
        base = Path(folder) / f"job{index}"
        jobs.append(
            {
                "size": size, "engine": engine, "precision": precision, "device": device.type,
                "batch_size": args.engine_batch, "steps": args.engine_steps, "warmup_steps": args.engine_warmup_steps,
                "output_dir": str(base), "job_path": f"{base}.json", "result_path": f"{base}.result.json",
            }
        )  # fmt: skip
    return jobs


def run_engines_part(args, device: torch.device, start_load: float) -> list[dict]:
    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as folder:
        for job in engine_jobs(args, device, folder):
            left = args.engines_time_budget - (time.perf_counter() - started)
            record = {key: job[key] for key in ("size", "engine", "precision", "batch_size")}
            reason = _skip_reason(job["engine"], device)
            if reason is None and left < 5:
                reason = f"skipped: the time budget of {args.engines_time_budget:.0f} s was spent"
            if reason is not None:
                status, _, text = reason.partition(": ")
                record.update(status=status, error=text)
            else:
                record.update(run_engine_process(job, left))
            record["seconds"] = time.perf_counter() - started
            records.append(record)
            print(f"engines: {engine_summary(record)}", flush=True)
            if not args.no_write or args.copy_to:  # a run stopped by a time limit keeps what it measured
                write_engines(args, records, start_load, finished=False)
    write_engines(args, records, start_load, finished=True)
    print(f"Engines part done in {time.perf_counter() - started:.0f} s", flush=True)
    return records


def engine_summary(record: dict) -> str:
    what = f"{record['size']} {record['engine']} ({record['precision']}, batch {record['batch_size']}): "
    if record["status"] != "ok":
        return what + f"{record['status']}: {record.get('error', '')}"
    text = f"{record['images_per_s']:.1f} images/s, peak {gib(record['peak_bytes'])} GiB, {record['wrapper']}"
    return what + text


def engines_body(records: list[dict], args, finished: bool) -> str:
    header = ["size", "engine", "precision", "batch", "status", "wrapped as", "images/s", "peak GiB"]
    header.append("loss first -> last")
    rows, notes = [], []
    for r in records:
        ok = r["status"] == "ok"
        losses = f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" if ok else "-"
        wrapped = f"{r['wrapper']} ({r['distributed_type']})" if ok else "-"
        rate = f"{r['images_per_s']:.1f}" if ok else "-"
        status = r["status"] if ok else f"{r['status']}: {r.get('error', '')}"
        peak = gib(r["peak_bytes"]) if ok else "-"
        rows.append([r["size"], r["engine"], r["precision"], r["batch_size"], status, wrapped, rate, peak, losses])
        if ok and r["engine"] == GAN_JOB:
            critic = ", ".join(f"{value:.4f}" for value in r["critic_losses"])
            notes.append(
                f"{GAN_JOB} ({r['precision']}): the critic's loss per step {critic}; its weights moved by "
                f"{r['critic_relative_change']:.2e} of their norm over the run."
            )
    lines = [
        f"vqrae's own `build_training_state` and `train_step` (AdamW, cosine schedule, clipping at 1.0, no EMA), "
        f"random images, the encoder trained jointly; {args.engine_warmup_steps} untimed steps, then "
        f"{args.engine_steps} timed ones. Each job in its own process, as one process of a torchrun-style world "
        "of 1; `fsdp2`: torch's `fully_shard` on every `_no_split_modules` block and the root with a bf16 "
        "`MixedPrecisionPolicy`, the accelerator unwrapped; `fsdp2 (accelerate)`: accelerate's FSDP plugin, "
        "version 2. bf16 and fp16 are accelerate's mixed precision (float32 weights, autocast).",
        "",
        markdown_table(header, rows),
        "",
        *[f"- {note}" for note in notes],
        "- peak GiB: `torch.cuda.max_memory_allocated()` over the timed steps (weights, gradients, AdamW states).",
    ]
    if not finished:
        lines.append("- INCOMPLETE: the run was still going (or was stopped) after the rows above.")
    return "\n".join(lines)


def write_engines(args, records: list[dict], start_load: float, finished: bool) -> None:
    body = engines_body(records, args, finished)
    publish(*SECTION, body, start_load, args.no_write, subsection=(INTRO, SUBSECTIONS, "bench_gpu_engines"))
    copy_results(args, "bench_gpu_engines.json", {"records": records})


def check_engines_ran(records: list[dict]) -> None:
    """--smoke: the engines that run on a CPU trained, and the critic learnt."""
    by_engine = {r["engine"]: r for r in records}
    failed = [f"{name}: {by_engine[name]['status']}" for name in REQUIRED_ON_CPU if by_engine[name]["status"] != "ok"]
    gan = by_engine[GAN_JOB]
    if not failed and not (gan["critic_relative_change"] > 0 and len(set(gan["critic_losses"])) > 1):
        failed.append(f"{GAN_JOB}: the critic did not learn ({gan['critic_losses']})")
    if failed:
        raise SystemExit("bench_gpu.py: error: engines that must run on the CPU did not: " + "; ".join(failed))


def main(argv=None):
    parser = bench_parser(__doc__.split("\n\n")[0], threads=False)
    parser.add_argument("--cpu", action="store_true", help="run the CPU part even where a GPU is present")
    parser.add_argument("--sizes", nargs="+", default=["base", "so400m"], choices=sorted(SIZES))
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--inference-batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="GPU part: timed rounds per variant")
    parser.add_argument("--round-seconds", type=float, default=0.3, help="GPU part: seconds of calls per round")
    parser.add_argument("--no-compile", action="store_true", help="GPU part: leave out the torch.compile variant")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (--smoke: aot_eager)")
    parser.add_argument(
        "--time-budget", type=float, default=330, help="GPU part: start no new step after this many seconds"
    )
    parser.add_argument("--copy-to", default=None, help="GPU part: copy BENCHMARKS.md and a JSON here as it goes")
    parser.add_argument("--fake-oom-above", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--engines", action="store_true", help="run only the engines part (DDP, FSDP2, DeepSpeed; fp16 with the GAN)"
    )
    parser.add_argument("--engine-sizes", nargs="+", default=["base", "so400m"], choices=sorted(SIZES))
    parser.add_argument("--engine-batch", type=int, default=32, help="engines part: images per step")
    parser.add_argument("--engine-steps", type=int, default=10, help="engines part: timed steps per job")
    parser.add_argument("--engine-warmup-steps", type=int, default=2, help="engines part: untimed steps first")
    parser.add_argument(
        "--engines-time-budget", type=float, default=420, help="engines part: seconds for all its jobs together"
    )
    parser.add_argument("--engine-job", default=None, help=argparse.SUPPRESS)  # a child process's job (JSON)
    parser.add_argument("--cpu-size", default="base", choices=sorted(SIZES), help="CPU part: the model size")
    parser.add_argument("--cpu-batch", type=int, default=8)
    parser.add_argument("--rounds-cpu", type=int, default=15, help="CPU part: timed rounds")
    # --smoke: both parts, tiny, on the CPU; the GPU part for one inference and one training step, with dynamo +
    # AOTAutograd but without inductor's C++ build (seconds, not minutes), and a simulated out-of-memory error above
    # batch 3, so the inference batch of 4 walks the halving path.
    smoke = {
        "sizes": ["tiny"], "steps": ["encode", "train stage 1"], "inference_batch": 4, "train_batch": 2, "rounds": 2,
        "round_seconds": 0.0, "compile_backend": "aot_eager", "fake_oom_above": 3, "cpu_size": "tiny", "cpu_batch": 1,
        "rounds_cpu": 1, "engine_sizes": ["tiny"], "engine_batch": 2, "engine_steps": 2, "engine_warmup_steps": 0,
    }  # fmt: skip
    args = parse_bench_args(parser, argv, smoke)
    if args.engine_job:
        engine_worker(args.engine_job)
        return
    start_load = load_average()

    if args.smoke:
        run_gpu_part(args, torch.device("cpu"), start_load)
        run_cpu_part(args, start_load)
        check_engines_ran(run_engines_part(args, torch.device("cpu"), start_load))
    elif args.engines:
        run_engines_part(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"), start_load)
    elif torch.cuda.is_available() and not args.cpu:
        run_gpu_part(args, torch.device("cuda"), start_load)
    else:
        run_cpu_part(args, start_load)


if __name__ == "__main__":
    main()
