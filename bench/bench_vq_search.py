"""VQ nearest-neighbour search: vqrae's chunked search against the naive full distance matrix.

    python bench/bench_vq_search.py                 # 16384 x 1536 codebook, 64 x 256 tokens (~3 min on 2 cores)
    python bench/bench_vq_search.py --tokens 4096 --no-write
    python bench/bench_vq_search.py --smoke         # 1024 x 64 codes, 4096 tokens, in chunks: checks it runs

The VQRAE paper's codebook (16384 codes of dimension 1536) against 64 images x 256 tokens, float32, under
`torch.inference_mode()`. Three ways to find each token's nearest code:

- vqrae chunked: `VQRAEVectorQuantizer.nearest_indices`, `||e||^2 - 2 x.e` one chunk of tokens at a time, each
  chunk's distance matrix bounded by `max_distance_elements` (2**24 numbers, 64 MiB) in one reused buffer;
- full matmul: the same formula in one `addmm` over all tokens (a tokens x codes matrix);
- torch.cdist: `torch.cdist(x, codebook).argmin(1)`, the one-liner most code uses.

Columns: median seconds over alternating rounds, tokens per second, peak resident memory of the process during one
call and its rise over the resident size just before it, and the share of indices identical to vqrae's.
"""

from __future__ import annotations

import torch
from _common import (
    bench_parser,
    compare,
    fmt_rate,
    load_average,
    markdown_table,
    parse_bench_args,
    peak_rss_mib,
    publish,
)

from vqrae import VQRAEVectorQuantizer


def main(argv=None):
    parser = bench_parser(__doc__.split("\n\n")[0], repeats=3)
    parser.add_argument("--num-embeddings", type=int, default=16384)
    parser.add_argument("--codebook-dim", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=64 * 256)
    parser.add_argument("--max-distance-elements", type=int, default=2**24, help="the chunk bound of the search")
    smoke = {"num_embeddings": 1024, "codebook_dim": 64, "tokens": 4096, "repeats": 1, "max_distance_elements": 2**20}
    args = parse_bench_args(parser, argv, smoke)
    start_load = load_average()

    torch.manual_seed(0)
    vq = VQRAEVectorQuantizer(
        num_embeddings=args.num_embeddings, dim=args.codebook_dim, max_distance_elements=args.max_distance_elements
    ).eval()
    vectors = torch.randn(args.tokens, args.codebook_dim)
    with torch.inference_mode():
        codebook = vq.codebook.detach()
        codebook_sq = codebook.pow(2).sum(dim=1)
        methods = {
            "vqrae chunked": lambda: vq.nearest_indices(vectors),
            "full matmul": lambda: torch.addmm(codebook_sq, vectors, codebook.t(), alpha=-2.0).argmin(dim=1),
            "torch.cdist": lambda: torch.cdist(vectors, codebook).argmin(dim=1),
        }
        reference = methods["vqrae chunked"]()
        agree = {name: (fn() == reference).double().mean().item() for name, fn in methods.items()}
        times = compare(methods, repeats=args.repeats, warmup=0)
        memory = {name: peak_rss_mib(fn) for name, fn in methods.items()}

    chunk_rows = max(1, vq.max_distance_elements // args.num_embeddings)
    matrix_mib = {
        "vqrae chunked": min(chunk_rows, args.tokens) * args.num_embeddings * 4 / 2**20,
        "full matmul": args.tokens * args.num_embeddings * 4 / 2**20,
        "torch.cdist": args.tokens * args.num_embeddings * 4 / 2**20,
    }
    rows = [
        [
            name,
            f"{times[name]:.2f}",
            fmt_rate(args.tokens / times[name]),
            f"{times[name] / times['vqrae chunked']:.2f}x",
            f"{matrix_mib[name]:.0f}",
            f"{memory[name][0]:.0f}",
            f"{memory[name][1]:.0f}",
            f"{100 * agree[name]:.3f} %",
        ]
        for name in methods
    ]
    header = [
        "method",
        "s",
        "tokens/s",
        "time vs chunked",
        "distance matrix MiB",
        "peak RSS MiB",
        "peak rise MiB",
        "same indices as vqrae",
    ]
    chunked, full = "vqrae chunked", "full matmul"

    def versus(other: str) -> str:
        change = 100 * (times[chunked] / times[other] - 1)
        return f"{abs(change):.0f} % {'more' if change > 0 else 'less'} time than {other} ({times[other]:.2f} s)"

    verdict = (
        f"- {args.tokens} tokens against {args.num_embeddings} x {args.codebook_dim} codes: the chunked search "
        f"({times[chunked]:.2f} s) takes {versus(full)} and {versus('torch.cdist')}, while its peak memory rises by "
        f"{memory[chunked][1]:.0f} MiB against {memory[full][1]:.0f} and {memory['torch.cdist'][1]:.0f} MiB: the "
        f"same GEMM work with a {matrix_mib[full] / matrix_mib[chunked]:.0f}x smaller distance matrix.\n"
        f"- Indices agree with the full matmul on {100 * agree[full]:.3f} % of tokens and with torch.cdist on "
        f"{100 * agree['torch.cdist']:.3f} % (a different rounding of a near-tie can pick another, equally near code)."
    )
    body = markdown_table(header, rows) + "\n\n" + verdict + "\n"
    publish("bench_vq_search", "4. VQ nearest-neighbour search", body, start_load, args.no_write)


if __name__ == "__main__":
    main()
