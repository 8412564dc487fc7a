"""Reference f32 GEMM speed on this machine, for examples/matmul_bench.rs's
1024 x 1024 x 1024 row (m = 64 there is compared with the full GEMM here).

Uses torch.matmul when torch is installed, else numpy's BLAS (OpenBLAS in
the PyPI wheel), on 2 threads. Run it from a venv outside CI:

    python3 -m venv /tmp/venv-ref && /tmp/venv-ref/bin/pip install numpy threadpoolctl
    /tmp/venv-ref/bin/python scripts/gemm_reference.py
"""
import time

N = 1024
import os
THREADS = int(os.environ.get("THREADS", "2"))


def best(f, reps=10):
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def main():
    flops = 2.0 * N * N * N
    try:
        import torch

        torch.set_num_threads(THREADS)
        a, b = torch.rand(N, N), torch.rand(N, N)
        t = best(lambda: torch.matmul(a, b))
        print(f"torch.matmul {N}^3 f32, {THREADS} threads: {flops / t / 1e9:.1f} GFLOP/s")
    except ImportError:
        import numpy as np
        from threadpoolctl import threadpool_info, threadpool_limits

        a = np.random.rand(N, N).astype(np.float32)
        b = np.random.rand(N, N).astype(np.float32)
        with threadpool_limits(THREADS):
            t = best(lambda: a @ b)
        lib = ", ".join(f"{p['internal_api']} {p.get('architecture', '')}" for p in threadpool_info())
        print(f"numpy matmul {N}^3 f32 ({lib}), {THREADS} threads: {flops / t / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
