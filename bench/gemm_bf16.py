"""bf16 GEMM speed: mapet bf16 vs mapet fp32 vs PyTorch bf16 (oneDNN), interleaved in one run.

Shapes are M×N×K of C[M, N] = op(A)[M, K]·op(B)[K, N]: 2048³, the ViT-Tiny linear layers at
batch 32 (6304 = 32·197 tokens: fc2 6304×192×768, fc1 6304×768×192, proj 6304×192×192, qkv
6304×576×192) and one attention head (197×197×64 at 224 px, 344×344×64 at 8192 tokens / …),
each in the transpose cases a linear layer uses: NN (dX = dY·W), NT (Y = X·Wᵀ), TN (dW = dYᵀ·X).
All inputs are float32; both bf16 columns include the conversion of the inputs (mapet rounds
while packing, PyTorch with `.bfloat16()` as autocast does); "torch bf16 pre-cast" times the
bf16 product alone. GFLOP/s = 2·M·N·K / median time over --reps interleaved repetitions.

mapet runs in this process; PyTorch runs in a child process of the peer venv, driven over a
pipe, so the three are timed turn by turn on the same machine state. Run from the project root
with the mapet environment's Python (mapet installed), OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 bench/gemm_bf16.py \
        --torch-python "$(../shared/tools/peer-venv.sh)"

(the peer-venv script sits beside the checkout, outside the project; any Python with torch
works; without --torch-python the PyTorch columns are left out).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPES = [
    ("square", 2048, 2048, 2048),
    ("fc2", 6304, 192, 768),
    ("fc1", 6304, 768, 192),
    ("proj", 6304, 192, 192),
    ("qkv", 6304, 576, 192),
    ("head 197", 197, 197, 64),
    ("head 344", 344, 344, 64),
]
CASES = ["NN", "NT", "TN"]

TORCH_CHILD = r"""
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[1]))
cache = {}
for line in sys.stdin:
    req = json.loads(line)
    M, N, K, case, reps = req["M"], req["N"], req["K"], req["case"], req["calls"]
    key = (M, N, K, case)
    if key not in cache:
        g = torch.Generator().manual_seed(0)
        a = torch.randn((K, M) if case[0] == "T" else (M, K), generator=g)
        b = torch.randn((N, K) if case[1] == "T" else (K, N), generator=g)
        cache.clear()
        cache[key] = (a, b, a.bfloat16(), b.bfloat16())
    a, b, a16, b16 = cache[key]
    opa = (lambda x: x.T) if case[0] == "T" else (lambda x: x)
    opb = (lambda x: x.T) if case[1] == "T" else (lambda x: x)
    out = {}
    with torch.inference_mode():
        for name, f in (("cast", lambda: opa(a.bfloat16()) @ opb(b.bfloat16())),
                        ("precast", lambda: opa(a16) @ opb(b16))):
            f()
            t, done = time.perf_counter(), 0
            while done < reps and (done == 0 or time.perf_counter() - t < 0.25):
                f()
                done += 1
            out[name] = (time.perf_counter() - t) / done
    print(json.dumps(out), flush=True)
"""


class TorchChild:
    def __init__(self, python, threads):
        env = dict(os.environ)
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
        self.proc = subprocess.Popen([python, "-c", TORCH_CHILD, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.version = None

    def time(self, M, N, K, case, calls):
        self.proc.stdin.write(json.dumps({"M": M, "N": N, "K": K, "case": case, "calls": calls}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the PyTorch child process died")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-python", default=None, help="a Python with torch (the peer venv)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names to run (default all)")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()

    import mapet
    mapet.set_num_threads(args.threads)
    info = mapet.bf16_info()
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(f"CPU: {model}; mapet bf16 kernel: {info['kernel']} (native {info['native']}, active {info['active']}); "
          f"OpenBLAS core: {mapet.blas_info()['corename']}; threads {args.threads}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}")
    print(f"load before: {os.getloadavg()}")
    torch = TorchChild(args.torch_python, args.threads) if args.torch_python else None

    shapes = [s for s in SHAPES if args.shapes is None or s[0] in args.shapes.split(",")]
    rng = np.random.default_rng(0)
    cols = ["mapet bf16", "mapet fp32"] + (["torch bf16", "torch bf16 pre-cast"] if torch else [])
    print(f"\n| shape M×N×K | case | " + " | ".join(cols) + " | bf16 / torch |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for name, M, N, K in shapes:
        for case in args.cases.split(","):
            a = rng.standard_normal((K, M) if case[0] == "T" else (M, K)).astype(np.float32)
            b = rng.standard_normal((N, K) if case[1] == "T" else (K, N)).astype(np.float32)
            c = np.empty((M, N), np.float32)
            flop = 2.0 * M * N * K
            calls = max(1, int(0.05 / (flop / 5e11)))   # ~50 ms per timing at 500 GFLOP/s, ≤ 0.25 s
            kw = dict(trans_a=case[0] == "T", trans_b=case[1] == "T")
            times = {k: [] for k in cols}
            for p in ("bf16", "fp32"):
                mapet.ops.matmul(a, b, c, precision=p, **kw)   # warm-up
            for _ in range(args.reps):
                for p in ("bf16", "fp32"):
                    t, done = time.perf_counter(), 0
                    while done < calls and (done == 0 or time.perf_counter() - t < 0.25):
                        mapet.ops.matmul(a, b, c, precision=p, **kw)
                        done += 1
                    times[f"mapet {p}"].append((time.perf_counter() - t) / done)
                if torch:
                    r = torch.time(M, N, K, case, calls)
                    times["torch bf16"].append(r["cast"])
                    times["torch bf16 pre-cast"].append(r["precast"])
            gf = {k: flop / statistics.median(v) / 1e9 for k, v in times.items()}
            ratio = f"{gf['mapet bf16'] / gf['torch bf16']:.2f}×" if torch else "–"
            print(f"| {name} {M}×{N}×{K} | {case} | " + " | ".join(f"{gf[k]:.0f}" for k in cols)
                  + f" | {ratio} |", flush=True)
    print(f"\nload after: {os.getloadavg()}  (GFLOP/s, median of {args.reps}; 2-core bf16 peak ≈ 960)")
    if torch:
        torch.close()


if __name__ == "__main__":
    main()
