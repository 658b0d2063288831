"""Random client factors and dense numpy references shared by the server tests."""

from __future__ import annotations

import numpy as np

# d_out != d_in, both distinct from U*r and (U+1)*r, so a dense [d_out, d_in] is visible.
SHAPES = {"q": (11, 7), "v": (11, 7), "o": (6, 9)}  # layer -> (d_out, d_in)
U, R = 4, 2


def random_clients(seed: int, U: int = U, r: int = R, shapes=SHAPES, spread: float = 1.0):
    """Clients = shared factors + ``spread`` x independent ones (spread=1: unrelated-ish)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, (do, di) in shapes.items():
        A0, B0 = rng.normal(size=(1, r, di)), rng.normal(size=(1, do, r))
        A = A0 + spread * rng.normal(size=(U, r, di))
        B = B0 + spread * rng.normal(size=(U, do, r))
        out[n] = {"A": A.astype(np.float32), "B": B.astype(np.float32)}
    weights = rng.uniform(0.5, 2.0, size=U)
    return out, weights


def shared_A(case):
    """``(clients, weights)`` with every client's ``A`` replaced by client 0's (FFA-LoRA's
    setting): ``dW_ideal = (sum p_u B_u) A`` then has rank r."""
    clients, weights = case
    for f in clients.values():
        f["A"] = np.repeat(f["A"][:1], f["A"].shape[0], 0)
    return clients, weights


def identical_clients(seed: int, U: int = U, r: int = R, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    out = {}
    for n, (do, di) in shapes.items():
        A, B = rng.normal(size=(r, di)), rng.normal(size=(do, r))
        out[n] = {"A": np.repeat(A[None], U, 0).astype(np.float32),
                  "B": np.repeat(B[None], U, 0).astype(np.float32)}  # fmt: skip
    return out, np.random.default_rng(seed + 1).uniform(0.5, 2.0, size=U)


def dense_ideal(clients, weights) -> dict[str, np.ndarray]:
    p = np.asarray(weights, np.float64) / np.sum(weights)
    return {n: np.einsum("u,uor,urd->od", p, np.float64(f["B"]), np.float64(f["A"]))
            for n, f in clients.items()}  # fmt: skip


def dense_estimate(agg) -> dict[str, np.ndarray]:
    """``B_hat A_hat + merge`` per layer, float64."""
    out = {}
    for n, f in agg.lora.items():
        est = np.float64(f["B"]) @ np.float64(f["A"])
        if agg.merge:
            est = est + np.float64(agg.merge[n])
        out[n] = est
    return out


def dense_rho(clients, weights, agg) -> tuple[float, float]:
    """``(rho, rho_rel)`` of an aggregate, computed densely in float64."""
    ideal, est = dense_ideal(clients, weights), dense_estimate(agg)
    res = sum(np.sum((ideal[n] - est[n]) ** 2) for n in ideal)
    tot = sum(np.sum(ideal[n] ** 2) for n in ideal)
    return float(np.sqrt(res)), float(np.sqrt(res / tot))


def dense_rho_svd(clients, weights, r: int = R) -> float:
    ideal = dense_ideal(clients, weights)
    tail = sum(np.sum(np.linalg.svd(d, compute_uv=False)[r:] ** 2) for d in ideal.values())
    return float(np.sqrt(tail))


def truncated_svd(clients, weights, r: int = R) -> dict[str, np.ndarray]:
    out = {}
    for n, d in dense_ideal(clients, weights).items():
        u, s, vt = np.linalg.svd(d)
        out[n] = (u[:, :r] * s[:r]) @ vt[:r]
    return out
