"""GPU time of a call, as the benchmarks and the GEMM autotuner measure it: a CUDA-graph replay (no Python or launch
overhead, which is what a served decode step pays) timed by ``triton.testing.do_bench`` (CUDA events, L2 flushed
between replays, so weights are read from memory as in a full model)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph after two warm-up calls on a side stream; returns the graph's ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # the outer context restores the current stream if the capture fails (torch.cuda.graph's __exit__ does not
    # when capture_end raises), so a candidate the autotuner cannot capture leaves no trace
    with torch.cuda.stream(torch.cuda.current_stream()), torch.cuda.graph(graph):
        fn()
    return graph.replay


def gpu_ms(fn: Callable[[], object], warmup: int = 10, rep: int = 40) -> float:
    """Median GPU milliseconds of one ``fn()`` as a CUDA-graph replay (``warmup`` / ``rep``: do_bench's ms)."""
    from triton.testing import do_bench

    return float(do_bench(graphed(fn), warmup=warmup, rep=rep, return_mode="median"))
