"""Accuracy and fidelity metrics, pure numpy (float64 accumulation so large sums do not lose digits).

All functions take batch-first arrays; rows are samples.  Logits are [N, C].
"""
from __future__ import annotations

import numpy as np


def _rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], -1)


def _logits(x, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, C] logits, got shape {x.shape}")
    return x


def topk_accuracy(logits, labels, k: int = 1) -> float:
    """Fraction of rows whose label is among the k largest logits.

    Ties are broken by lower class index first (a stable sort), so k=1 agrees with ``argmax``.
    k larger than the class count counts every row as correct.
    """
    logits = _logits(logits, "logits")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} rows of logits")
    if logits.shape[0] == 0:
        return float("nan")
    k = max(1, min(int(k), logits.shape[1]))
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def top1_agreement(logits_a, logits_b) -> float:
    """Fraction of rows where both models predict the same class (label-free fidelity)."""
    a = _logits(logits_a, "logits_a")
    b = _logits(logits_b, "logits_b")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        return float("nan")
    return float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum(ref^2) / sum((ref-test)^2)) in dB.

    ``inf`` when the arrays are equal; ``-inf`` when the reference is all zeros but the test is not.
    """
    r = np.asarray(reference, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    if r.shape != t.shape:
        raise ValueError(f"shape mismatch {r.shape} vs {t.shape}")
    noise = float(np.sum((r - t) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def cosine_similarity(a, b) -> float:
    """Mean over rows of cos(a_i, b_i), each row flattened (the embedding-fidelity metric).

    A row that is zero in both arrays counts as 1 (identical); zero in one only counts as 0.
    """
    x = _rows(a)
    y = _rows(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {np.shape(a)} vs {np.shape(b)}")
    if x.shape[0] == 0:
        return float("nan")
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dot = np.sum(x * y, axis=1)
    denom = nx * ny
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where((nx == 0) & (ny == 0), 1.0, 0.0))
    return float(np.mean(np.clip(cos, -1.0, 1.0)))


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def kl_divergence(logits_ref, logits_test) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(test)) in nats: how much the quantized model's
    predictive distribution drifts from the reference, including below the top-1 class."""
    r = _logits(logits_ref, "logits_ref")
    t = _logits(logits_test, "logits_test")
    if r.shape != t.shape:
        raise ValueError(f"shape mismatch {r.shape} vs {t.shape}")
    if r.shape[0] == 0:
        return float("nan")
    lr = log_softmax(r)
    lt = log_softmax(t)
    kl = np.sum(np.exp(lr) * (lr - lt), axis=1)
    return float(np.mean(np.maximum(kl, 0.0)))
