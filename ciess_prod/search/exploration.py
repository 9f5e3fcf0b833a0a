"""Exploration of CIESS: per-row noise on the actor's size, then a random walk on the size graph, then the critic.

One exploration step for N rows (section 4 of the paper):

1. ``perturb``: d^_n = mu(s_n) + eps_n, one noise draw PER ROW (the paper; the authors' code shares one scalar), with
   gaussian, Ornstein-Uhlenbeck or uniform noise (the paper finds all three about equal), clamped to [1, d_max].
2. round to an integer size.
3. ``walk``: a ``walk_steps``-step random walk on the graph over sizes 1..d_max where d links to every d' with
   0 < |d - d'| <= t; the transition probability is proportional to 1 / |d - d'| over the VALID neighbours
   (1 <= d' <= d_max), i.e. renormalised at the borders [C]. The start and the visited sizes are the candidates.
4. the critic scores every candidate, Q1(s_n, d), and each row takes its argmax.

Sampling one walk step without a per-row loop: the 2t offsets are ordered [-t, ..., -1, +1, ..., +t] with weights
w_j = 1 / |offset_j| and prefix sums P (P_0 = 0, P_{j+1} = P_j + w_j). From size d the valid offsets form ONE
contiguous index range [a, b] (a = t - min(t, d - 1), b = t - 1 + min(t, d_max - d)), so drawing u ~ U[0, 1) and
taking the j with P_j <= P_a + u (P_{b+1} - P_a) < P_{j+1} (``searchsorted`` on the 2t + 1 prefix sums) is an
exact inverse-CDF draw from the renormalised distribution. This is the same distribution as building the [N, 2t]
masked weight matrix, normalising and cumsum-ing it, at O(N) instead of O(N t) memory.

All randomness comes from the explorer's ``torch.Generator`` (state in ``state_dict()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

QFn = Callable[[Tensor, Tensor], Tensor]  # (states [n, S] float32, candidate sizes [n, K] float32) -> Q [n, K]


@dataclass(frozen=True)
class ExplorationConfig:
    noise: Literal["gaussian", "ou", "uniform"] = "gaussian"  # per-row noise on the actor output; all ~equal [P]
    sigma: float = 6.0  # gaussian std / OU sigma / uniform half-width, in size units [P]
    ou_theta: float = 0.15  # OU mean reversion per step (x <- x - theta x + sigma N(0, 1)), the DDPG default [I]
    walk: bool = True  # random walk on the size graph after the noise (off = the "no walk" ablation) [P]
    walk_radius: int = 5  # t: d links to every d' with 0 < |d - d'| <= t [P]
    walk_steps: int = 5  # steps of the walk; the start and the visited sizes are the candidates [P]
    # the first random_steps search steps give every row a uniformly random size (TD3's warm-up, CleanRL's
    # learning_starts): the critic first sees each size's reward on rows chosen at random, not by the actor [I]
    random_steps: int = 0

    def __post_init__(self) -> None:
        if self.noise not in ("gaussian", "ou", "uniform"):
            raise ValueError(f"noise must be 'gaussian', 'ou' or 'uniform', got {self.noise!r}")
        if not self.sigma >= 0.0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not 0.0 <= self.ou_theta <= 1.0:
            raise ValueError(f"ou_theta must lie in [0, 1], got {self.ou_theta}")
        if self.walk_radius < 1:
            raise ValueError(f"walk_radius must be >= 1, got {self.walk_radius}")
        if self.walk_steps < 1:
            raise ValueError(f"walk_steps must be >= 1, got {self.walk_steps}")
        if self.random_steps < 0:
            raise ValueError(f"random_steps must be >= 0, got {self.random_steps}")


class Explorer:
    """Per-row exploration for one side (users or items) of the search.

    Args:
        config: the exploration hyperparameters.
        d_max: the largest size (sizes are integers in [1, d_max]); must be >= 2.
        n_rows: rows of this side; the OU noise keeps one state per row, so OU ``perturb`` needs N == n_rows.
        seed: seed of the explorer's generator.
        device: where the noise, the OU state and the walk are computed.
        chunk_rows: rows per chunk of the walk arithmetic and of the critic scoring in ``choose``.
    """

    def __init__(
        self,
        config: ExplorationConfig,
        d_max: int,
        n_rows: int,
        seed: int,
        device: str | torch.device = "cpu",
        chunk_rows: int = 1 << 18,
    ) -> None:
        if d_max < 2:
            raise ValueError(f"d_max must be >= 2, got {d_max}")
        if n_rows < 0:
            raise ValueError(f"n_rows must be >= 0, got {n_rows}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.config = config
        self.d_max = d_max
        self.n_rows = n_rows
        self.device = torch.device(device)
        self.chunk_rows = chunk_rows
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.ou_state = torch.zeros(n_rows, dtype=torch.float32, device=self.device)  # [n_rows] OU noise x_n
        t = config.walk_radius
        # offsets [-t, ..., -1, +1, ..., +t] (int64 [2t]) and prefix sums of 1/|offset| (float64 [2t + 1])
        self._offsets = torch.cat([torch.arange(-t, 0), torch.arange(1, t + 1)]).to(self.device)
        weights = 1.0 / self._offsets.abs().to(torch.float64)
        self._prefix = torch.cat([torch.zeros(1, dtype=torch.float64, device=self.device), weights.cumsum(0)])

    def reset(self) -> None:
        """Start of an episode: the OU state goes back to zero (gaussian/uniform noise is stateless)."""
        self.ou_state.zero_()

    def perturb(self, sizes: Tensor) -> Tensor:
        """Adds one noise draw per row: [N] float actor sizes -> [N] float32 noisy sizes clamped to [1, d_max]."""
        if sizes.dim() != 1:
            raise ValueError(f"sizes: expected shape [N], got {list(sizes.shape)}")
        cfg, n, g = self.config, sizes.shape[0], self.generator
        if cfg.noise == "gaussian":
            noise = torch.randn(n, generator=g, device=self.device).mul_(cfg.sigma)
        elif cfg.noise == "uniform":
            noise = torch.rand(n, generator=g, device=self.device).mul_(2.0).sub_(1.0).mul_(cfg.sigma)
        else:  # "ou": x <- x + theta (0 - x) + sigma N(0, 1), one state per row, carried across calls
            if n != self.n_rows:
                raise ValueError(f"OU noise keeps one state per row: expected {self.n_rows} rows, got {n}")
            step = torch.randn(n, generator=g, device=self.device).mul_(cfg.sigma)
            self.ou_state.mul_(1.0 - cfg.ou_theta).add_(step)
            noise = self.ou_state
        noisy = sizes.to(self.device, torch.float32) + noise
        return noisy.clamp_(1.0, float(self.d_max))

    def _step(self, current: Tensor, u: Tensor) -> Tensor:
        """One walk step for a chunk: current [n] int64 in [1, d_max], u [n] float in [0, 1) -> next [n] int64."""
        t = self.config.walk_radius
        first = t - (current - 1).clamp(max=t)  # [n] index of the first valid offset
        last = t - 1 + (self.d_max - current).clamp(max=t)  # [n] index of the last valid offset
        lo, hi = self._prefix[first], self._prefix[last + 1]  # [n] float64
        target = lo + u.to(torch.float64) * (hi - lo)  # [n] in [lo, hi)
        idx = torch.searchsorted(self._prefix, target, right=True) - 1  # P_idx <= target < P_{idx+1}
        idx = torch.clamp(idx, min=first, max=last)  # guards the rounding case target == hi
        return current + self._offsets[idx]

    def walk(self, start: Tensor) -> Tensor:
        """Random walk: [N] int64 start sizes in [1, d_max] -> [N, walk_steps + 1] int64 visited sizes.

        Column 0 is the start; column k the size after k steps; every step moves by 1..walk_radius and stays in
        [1, d_max]. One U[0, 1) float32 draw per row per step, drawn step by step for all N rows (so results do not
        depend on ``chunk_rows``); the arithmetic is chunked over rows.
        """
        if start.dim() != 1:
            raise ValueError(f"start: expected shape [N], got {list(start.shape)}")
        if start.dtype.is_floating_point or start.dtype == torch.bool:
            raise ValueError(f"start: expected an integer tensor, got {start.dtype}")
        n, steps = start.shape[0], self.config.walk_steps
        path = torch.empty((n, steps + 1), dtype=torch.int64, device=self.device)
        path[:, 0] = start.to(self.device)
        if n and (int(path[:, 0].min()) < 1 or int(path[:, 0].max()) > self.d_max):
            raise ValueError(f"start sizes must lie in [1, {self.d_max}]")
        for k in range(1, steps + 1):
            u = torch.rand(n, generator=self.generator, device=self.device)  # [N] float32
            for lo in range(0, n, self.chunk_rows):
                hi = min(lo + self.chunk_rows, n)
                path[lo:hi, k] = self._step(path[lo:hi, k - 1], u[lo:hi])
        return path

    def uniform(self, n: int) -> Tensor:
        """[n] int64 sizes drawn uniformly from 1..d_max (the warm-up steps' action, no actor or critic)."""
        return torch.randint(1, self.d_max + 1, (n,), generator=self.generator, device=self.device)

    def choose(self, states: Tensor, actor_sizes: Tensor, q_fn: QFn) -> Tensor:
        """The full exploration step: [N, S] states, [N] float actor sizes -> [N] int64 executed sizes.

        perturb -> round to int (half to even) -> walk (if enabled) -> q_fn(states, candidates.float()) [n, K]
        on chunks of rows -> per-row argmax candidate (ties: the earliest column, so the start wins). Without the
        walk it returns the rounded noisy size and never calls q_fn.

        Raises:
            FloatingPointError: if q_fn returns a non-finite value (a diverged critic must not pick sizes silently).
        """
        if states.dim() != 2 or states.shape[0] != actor_sizes.shape[0]:
            raise ValueError(f"states: expected shape [{actor_sizes.shape[0]}, S], got {list(states.shape)}")
        start = self.perturb(actor_sizes).round_().to(torch.int64).clamp_(1, self.d_max)  # [N] int64
        if not self.config.walk:
            return start
        candidates = self.walk(start)  # [N, K] int64, K = walk_steps + 1
        n, k = candidates.shape
        chosen = torch.empty(n, dtype=torch.int64, device=self.device)
        for lo in range(0, n, self.chunk_rows):
            hi = min(lo + self.chunk_rows, n)
            cand = candidates[lo:hi]  # [n_c, K]
            q = q_fn(states[lo:hi], cand.to(torch.float32))
            if q.shape != (hi - lo, k):
                raise ValueError(f"q_fn: expected shape [{hi - lo}, {k}], got {list(q.shape)}")
            if not bool(torch.isfinite(q).all()):
                raise FloatingPointError("q_fn returned non-finite Q values")
            best = q.argmax(dim=1).to(self.device)  # [n_c]
            chosen[lo:hi] = cand.gather(1, best.unsqueeze(1)).squeeze(1)
        return chosen

    def state_dict(self) -> dict[str, Any]:
        """A snapshot: generator state, OU state, and the settings it must be restored into."""
        return {
            "config": dataclasses.asdict(self.config),
            "d_max": self.d_max,
            "n_rows": self.n_rows,
            "generator": self.generator.get_state(),
            "ou_state": self.ou_state.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a snapshot taken from an explorer with the same d_max and n_rows (ValueError otherwise)."""
        if state["d_max"] != self.d_max or state["n_rows"] != self.n_rows:
            raise ValueError(
                f"explorer mismatch: this one has d_max={self.d_max}, n_rows={self.n_rows}; "
                f"the state has d_max={state['d_max']}, n_rows={state['n_rows']}"
            )
        self.generator.set_state(state["generator"].clone())
        self.ou_state.copy_(state["ou_state"])
