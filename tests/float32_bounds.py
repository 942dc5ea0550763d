"""Error bounds of float32 products, for tests that compare results computed with different GEMM
shapes or splits (another batch size, another rank's shard): OpenBLAS computes a row's dot
products with another micro-kernel when its position in the product changes, so such results
agree only within rounding, never bitwise by construction.

A float32 dot product of length d, summed in any order, is off by at most γ_d·Σ|aᵢbᵢ| with
γ_d = d·u / (1 − d·u), u = 2⁻²⁴ (Higham, Accuracy and Stability of Numerical Algorithms, §3.1).
"""
import numpy as np

U = 2.0 ** -24


def gamma(d: int) -> float:
    """γ_d for float32."""
    return d * U / (1 - d * U)


def clear_of_ties(x, centroids, centroid_slack: float = 0.0) -> np.ndarray:
    """Rows of x [n, d] whose nearest centroid no float32 evaluation can change.

    mapet scores a centroid by s_j = ‖c_j‖² − 2 x·c_j in float32: each score is off by at most
    γ_d (‖c_j‖² + 2 ‖x‖‖c_j‖) (Cauchy–Schwarz on Σ|xᵢcᵢ|). Two evaluations (two GEMM shapes)
    can pick different winners only if the float64 gap between the best and the runner-up is
    within twice the sum of those two bounds. `centroid_slack` bounds ‖Δc_j‖ when the two runs
    also used slightly different centroids (each score then moves by ≤ 2‖x‖·slack + slack·(2‖c‖ + slack)).
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    c = np.asarray(centroids, np.float64)
    d = x.shape[1]
    xn = np.linalg.norm(x, axis=1)[:, None]
    cn = np.linalg.norm(c, axis=1)[None, :]
    s = (c * c).sum(1)[None, :] - 2 * x @ c.T
    err = gamma(d) * (cn ** 2 + 2 * xn * cn) + 2 * xn * centroid_slack + centroid_slack * (2 * cn + centroid_slack)
    order = np.argsort(s, axis=1)
    rows = np.arange(len(x))
    best, second = order[:, 0], order[:, 1]
    gap = s[rows, second] - s[rows, best]
    return gap > 2 * (err[rows, best] + err[rows, second])
