"""Seeded synthetic interaction logs with planted low-rank preferences and power-law popularity.

Real benchmarks are slow to train on and cannot be shipped with tests, so tests and smoke runs use logs whose
structure is known: a recommender that learns the planted latent factors must beat popularity ranking, while
the power-law item popularity and user activity keep the long tail that embedding-size search is about.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ciess_prod.data.errors import DataError
from ciess_prod.data.interactions import InteractionLog

_MIN_PER_USER = 5
_MAX_USER_SHARE = 0.5  # no user interacts with more than half the catalogue
_CHUNK_ELEMENTS = 1 << 22  # users x items scores materialised at once (32 MiB of float64)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, skew and signal strength of a synthetic log; every output is a pure function of these values."""

    n_users: int = 2000
    n_items: int = 1500
    n_factors: int = 16  # planted latent dimension
    interactions_per_user: float = 40.0  # mean; per-user counts are power-law (Zipf-like) distributed, min 5
    user_exponent: float = 1.0  # power-law exponent of user activity
    item_exponent: float = 1.0  # power-law exponent of item popularity
    affinity_scale: float = 3.0  # strength of planted preference vs popularity
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"SyntheticConfig({asdict(self)})"
        for name in ("n_users", "n_items", "n_factors", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DataError(f"{where}: {name} must be an integer, got {value!r}")
        if self.n_users < 1:
            raise DataError(f"{where}: n_users must be >= 1")
        if self.n_factors < 1:
            raise DataError(f"{where}: n_factors must be >= 1")
        if self.seed < 0:
            raise DataError(f"{where}: seed must be >= 0")
        cap = int(_MAX_USER_SHARE * self.n_items)
        if cap < _MIN_PER_USER:
            raise DataError(
                f"{where}: n_items must be >= {2 * _MIN_PER_USER} (each user needs {_MIN_PER_USER})"
            )
        if not _MIN_PER_USER <= self.interactions_per_user <= cap:
            raise DataError(
                f"{where}: interactions_per_user must lie in [{_MIN_PER_USER}, {cap}] "
                f"(at least {_MIN_PER_USER} per user, at most half of n_items)"
            )
        for name in ("user_exponent", "item_exponent", "affinity_scale"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise DataError(f"{where}: {name} must be a finite number >= 0, got {value!r}")


def _user_counts(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like activity: count = 5 + s * rank^-exponent, capped, with ``s`` set so the mean is as asked.

    The cap makes the total non-linear in ``s``; a bisection over the scalar ``s`` (not over users) finds it.
    """
    n = config.n_users
    cap = int(_MAX_USER_SHARE * config.n_items)
    weights = np.arange(1, n + 1, dtype=np.float64) ** -config.user_exponent
    weights = weights[rng.permutation(n)]
    extra_total = (config.interactions_per_user - _MIN_PER_USER) * n
    lo, hi = 0.0, (cap - _MIN_PER_USER) / weights.min()
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if np.minimum(mid * weights, cap - _MIN_PER_USER).sum() < extra_total:
            lo = mid
        else:
            hi = mid
    extra = np.minimum(hi * weights, cap - _MIN_PER_USER)
    # Stochastic rounding keeps the mean exact in expectation without biasing light users.
    counts = np.floor(extra + rng.random(n)).astype(np.int64) + _MIN_PER_USER
    return np.minimum(counts, cap)


def generate_interactions(config: SyntheticConfig) -> InteractionLog:
    """Draw each user's items without replacement, P(i) ~ popularity_i * exp(affinity * <p_u, q_i> / sqrt(f)).

    Sampling without replacement from those weights is the Gumbel-top-k trick: add Gumbel noise to the log
    weights and keep each user's k largest. Users are processed in chunks so memory stays bounded.
    """
    rng = np.random.default_rng(config.seed)
    n_users, n_items, f = config.n_users, config.n_items, config.n_factors
    item_rank = rng.permutation(n_items) + 1
    log_popularity = -config.item_exponent * np.log(item_rank.astype(np.float64))
    user_factors = rng.standard_normal((n_users, f))
    item_factors = rng.standard_normal((n_items, f))
    counts = _user_counts(config, rng)

    # Chunks follow users in order of activity so each chunk's top-k width (its heaviest user) stays tight;
    # float32 scores halve memory traffic, and Gumbel noise is -log(-log(U)) computed in place.
    by_count = np.argsort(counts, kind="stable")
    chunk = max(1, _CHUNK_ELEMENTS // n_items)
    users_out: list[np.ndarray] = []  # one array per chunk of users
    items_out: list[np.ndarray] = []
    scale = np.float32(config.affinity_scale / np.sqrt(f))
    log_popularity32 = log_popularity.astype(np.float32)
    item_factors32 = item_factors.astype(np.float32)
    for start in range(0, n_users, chunk):
        rows = by_count[start : start + chunk]
        scores = (user_factors[rows].astype(np.float32) @ item_factors32.T) * scale + log_popularity32
        noise = rng.random(scores.shape, dtype=np.float32)
        with np.errstate(divide="ignore"):  # U == 0 gives -inf noise: that item is simply never drawn
            np.log(noise, out=noise)
            np.negative(noise, out=noise)
            np.log(noise, out=noise)
        scores -= noise
        k = counts[rows]
        k_max = int(k.max())
        top = np.argpartition(-scores, k_max - 1, axis=1)[:, :k_max]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        keep = np.arange(k_max) < k[:, None]
        users_out.append(np.broadcast_to(rows[:, None], top.shape)[keep])
        items_out.append(top[keep])
    users = np.concatenate(users_out).astype(np.int64)
    items = np.concatenate(items_out).astype(np.int64)
    by_user = np.argsort(users, kind="stable")  # report users in id order, each user's items by score
    source = "synthetic(" + ", ".join(f"{k}={v}" for k, v in asdict(config).items()) + ")"
    return InteractionLog(
        users=users[by_user],
        items=items[by_user],
        source=source,
    )
