"""TD3 agent of CIESS (one per side: users, items), in the layout of CleanRL's ``td3_continuous_action.py``.

State (per row, normalised by the caller): (popularity, current size, quality ratio), float32 [N, 3].
Action: the actor's tanh output a in [-1, 1]; the size it stands for is d = (a + 1) / 2 (d_max - 1) + 1, a float
in [1, d_max] that the search executes as an integer [P][C]. Critics take the action normalised to [-1, 1].

One update (Fujimoto et al. 2018, as in the paper):
    a'   = clip(actor_target(s') in size units + clip(N(0, target_noise), +-target_noise_clip), 1, d_max)
    y    = r + gamma (1 - done) min(Q1'(s', a'), Q2'(s', a'))
    critic loss = MSE(Q1(s, a), y) + MSE(Q2(s, a), y)
    every policy_delay-th update: actor loss = -Q1(s, actor(s)).mean(), then soft updates of the three targets.

All parameters are initialised from the agent's own ``torch.Generator`` (the global RNG is never touched), and the
target-smoothing noise comes from the same generator, whose state is part of ``state_dict()``: a restored agent
continues bit-identically. The networks are plain ``nn.Module`` attributes (``actor``, ``qf1``, ``qf2`` and their
``*_target`` copies) so that a distributed search can all-reduce or broadcast them later.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ciess_prod.search.buffer import ReplayBuffer

STATE_DIM = 3  # (popularity, current size, quality ratio), each normalised by the caller
# Default rows (act) / (row, candidate) pairs (q_values) per forward pass. On CPU a chunk whose 2 x hidden
# activations fit in cache (4096 x 256 x 4 B = 4 MiB) ran ~2x faster than 2^15..2^16 (measured, 1 thread); on GPU
# large chunks amortise the kernel launches.
CPU_CHUNK = 1 << 12
GPU_CHUNK = 1 << 18


@dataclass(frozen=True)
class TD3Config:
    hidden: int = 256  # hidden width: actor 3->256->256->1 (ReLU, tanh); critics (3+1)->256->256->1 [C]
    actor_lr: float = 1e-3  # Adam learning rate of the actor [C]
    critic_lr: float = 3e-3  # Adam learning rate of the twin critics (one optimizer for both) [C]
    gamma: float = 0.99  # discount factor [C]
    tau: float = 0.005  # soft target update: target <- tau * online + (1 - tau) * target [C]
    batch_size: int = 4096  # minibatch per update [C]
    policy_delay: int = 2  # actor + targets updated every policy_delay-th critic update [P][C]
    target_noise: float = 2.0  # target policy smoothing std, in size units [C]
    target_noise_clip: float = 5.0  # clip of that noise, in size units [C]
    updates_per_step: int = 1  # TD3 updates per environment (search) step [P]
    pre_tanh_limit: float | None = 2.5  # penalise |actor pre-tanh| beyond it (tanh never saturates); None: off [I]

    def __post_init__(self) -> None:
        positive_ints = ("hidden", "batch_size", "policy_delay", "updates_per_step")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("actor_lr", "critic_lr"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {self.tau!r}")
        for name in ("target_noise", "target_noise_clip"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.pre_tanh_limit is not None and not self.pre_tanh_limit > 0.0:
            raise ValueError(f"pre_tanh_limit must be > 0 or null, got {self.pre_tanh_limit!r}")


def _linear(in_features: int, out_features: int, generator: torch.Generator, device: torch.device) -> nn.Linear:
    """nn.Linear with PyTorch's default init U(+-1/sqrt(in)) drawn from ``generator`` (not the global RNG)."""
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features, device=device)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


class Actor(nn.Module):
    """states [B, 3] float32 -> actions [B] float32 in [-1, 1]: 3 -> hidden -> hidden -> 1, ReLU, ReLU, tanh."""

    def __init__(self, hidden: int, generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        self.fc1 = _linear(STATE_DIM, hidden, generator, device)
        self.fc2 = _linear(hidden, hidden, generator, device)
        self.fc_mu = _linear(hidden, 1, generator, device)

    def pre_tanh(self, states: Tensor) -> Tensor:
        """[B, 3] -> [B] the output before tanh: |value| > 3 means a saturated actor (tanh' < 0.01)."""
        x = F.relu(self.fc1(states))
        x = F.relu(self.fc2(x))
        return self.fc_mu(x).squeeze(-1)

    def forward(self, states: Tensor) -> Tensor:
        return torch.tanh(self.pre_tanh(states))


class Critic(nn.Module):
    """(states [B, 3], actions [B] in [-1, 1]) float32 -> Q [B] float32: (3 + 1) -> hidden -> hidden -> 1."""

    def __init__(self, hidden: int, generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        self.fc1 = _linear(STATE_DIM + 1, hidden, generator, device)
        self.fc2 = _linear(hidden, hidden, generator, device)
        self.fc3 = _linear(hidden, 1, generator, device)

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        x = torch.cat([states, actions.unsqueeze(-1)], dim=-1)  # [B, 4]
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x).squeeze(-1)


class TD3Agent:
    """One agent (the search has one for users, one for items: same architecture, separate weights).

    Args:
        config: TD3 hyperparameters.
        d_max: the largest size (actions map to sizes in [1, d_max]); must be >= 2.
        seed: seed of the agent's generator (parameter init and target-smoothing noise).
        device: where the networks live; inputs on other devices are moved chunk by chunk.
    """

    def __init__(self, config: TD3Config, d_max: int, seed: int, device: str | torch.device = "cpu") -> None:
        if d_max < 2:
            raise ValueError(f"d_max must be >= 2, got {d_max}")
        self.config = config
        self.d_max = d_max
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.actor = Actor(config.hidden, self.generator, self.device)
        self.qf1 = Critic(config.hidden, self.generator, self.device)
        self.qf2 = Critic(config.hidden, self.generator, self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.qf1_target = copy.deepcopy(self.qf1).requires_grad_(False)
        self.qf2_target = copy.deepcopy(self.qf2).requires_grad_(False)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(
            list(self.qf1.parameters()) + list(self.qf2.parameters()), lr=config.critic_lr
        )
        self.n_updates = 0  # critic updates done so far (the actor runs when it is a multiple of policy_delay)

    # ----------------------------------------------------------------------------------------- size <-> action
    def size_to_action(self, sizes: Tensor) -> Tensor:
        """[...] float sizes in [1, d_max] -> [...] float32 actions in [-1, 1]: (d - 1) / (d_max - 1) * 2 - 1."""
        actions = (sizes.to(torch.float32) - 1.0) / (self.d_max - 1) * 2.0 - 1.0
        return actions.clamp_(-1.0, 1.0)

    def action_to_size(self, actions: Tensor) -> Tensor:
        """[...] float actions in [-1, 1] -> [...] float32 sizes in [1, d_max] (the inverse of size_to_action)."""
        sizes = (actions.to(torch.float32) + 1.0) / 2.0 * (self.d_max - 1) + 1.0
        return sizes.clamp_(1.0, float(self.d_max))

    # ----------------------------------------------------------------------------------------------- inference
    def _default_chunk(self) -> int:
        return CPU_CHUNK if self.device.type == "cpu" else GPU_CHUNK

    @torch.no_grad()
    def act(self, states: Tensor, chunk_rows: int | None = None) -> Tensor:
        """Deterministic actor sizes: [N, 3] float32 -> [N] float32 in [1, d_max], on the device of ``states``.

        Chunked over rows (``chunk_rows`` None: CPU_CHUNK on CPU, GPU_CHUNK otherwise): peak temporary memory
        ~ 2 * chunk_rows * hidden * 4 bytes.
        """
        chunk_rows = self._default_chunk() if chunk_rows is None else chunk_rows
        if states.dim() != 2 or states.shape[1] != STATE_DIM:
            raise ValueError(f"states: expected shape [N, {STATE_DIM}], got {list(states.shape)}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        out = torch.empty(states.shape[0], dtype=torch.float32, device=states.device)
        for lo in range(0, states.shape[0], chunk_rows):
            chunk = states[lo : lo + chunk_rows].to(self.device, torch.float32)
            out[lo : lo + chunk_rows] = self.action_to_size(self.actor(chunk)).to(out.device)
        return out

    @torch.no_grad()
    def q_values(self, states: Tensor, sizes: Tensor, chunk_rows: int | None = None) -> Tensor:
        """Q1 of K candidate sizes per row: states [N, 3], sizes [N, K] float (size units) -> [N, K] float32.

        Chunked over rows so that at most ``chunk_rows`` (row, candidate) pairs go through the critic at once,
        i.e. max(1, chunk_rows // K) whole rows per chunk: peak temporary memory ~ 2 * chunk_rows * hidden * 4
        bytes whatever N and K (N * K * hidden is never materialised). ``chunk_rows`` None: CPU_CHUNK on CPU,
        GPU_CHUNK otherwise. Returned on the device of ``states``.

        Repeated candidates of a row (a random walk revisits sizes: ~5 distinct of 6 for t = 5, 5 steps) go through
        the critic once: each row's candidates are sorted, the first occurrence of every value is scored, and the
        values are scattered back to all the positions holding it.
        """
        chunk_rows = self._default_chunk() if chunk_rows is None else chunk_rows
        if states.dim() != 2 or states.shape[1] != STATE_DIM:
            raise ValueError(f"states: expected shape [N, {STATE_DIM}], got {list(states.shape)}")
        if sizes.dim() != 2 or sizes.shape[0] != states.shape[0]:
            raise ValueError(f"sizes: expected shape [{states.shape[0]}, K], got {list(sizes.shape)}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        n, k = sizes.shape
        out = torch.empty((n, k), dtype=torch.float32, device=states.device)
        if k == 0:
            return out
        rows = max(1, chunk_rows // k)
        for lo in range(0, n, rows):
            s = states[lo : lo + rows].to(self.device, torch.float32)  # [n_c, 3]
            d_sorted, order = sizes[lo : lo + rows].to(self.device, torch.float32).sort(dim=1)  # [n_c, K] each
            first = torch.ones_like(d_sorted, dtype=torch.bool)  # [n_c, K] first occurrence of its value
            first[:, 1:] = d_sorted[:, 1:] != d_sorted[:, :-1]
            row_of, col_of = first.nonzero(as_tuple=True)  # [U] unique (row, sorted column) pairs
            q_unique = self.qf1(s[row_of], self.size_to_action(d_sorted[row_of, col_of]))  # [U]
            slot = first.view(-1).cumsum(0).sub_(1).view_as(first)  # [n_c, K] -> index into q_unique
            q = torch.empty_like(d_sorted).scatter_(1, order, q_unique[slot])  # back to the input column order
            out[lo : lo + rows] = q.to(out.device)
        return out

    # -------------------------------------------------------------------------------------------------- update
    def update(
        self,
        buffer: ReplayBuffer,
        batch_size: int | None = None,
        sync_grads: Callable[[nn.Module], None] | None = None,
        penalty: float = 0.0,
    ) -> dict[str, float]:
        """``updates_per_step`` TD3 updates on minibatches from ``buffer``, their rewards priced at ``penalty``
        (the buffer's stored reward - penalty * cost).

        A distributed search passes its per-rank ``batch_size`` and ``sync_grads``, called on each network after
        backward and before the optimizer step (an all-reduce mean), so replicas stay identical.

        Returns:
            {} (and changes nothing) if the buffer holds < batch_size transitions; otherwise {"critic_loss": mean
            over the updates of MSE(Q1, y) + MSE(Q2, y)}, plus "actor_loss" (mean over the delayed actor steps)
            when at least one actor step ran.
        """
        cfg = self.config
        batch_size = batch_size or cfg.batch_size
        if len(buffer) < batch_size:
            return {}
        critic_losses: list[Tensor] = []
        actor_losses: list[Tensor] = []
        for _ in range(cfg.updates_per_step):
            batch = buffer.sample(batch_size, penalty)
            states, sizes, rewards, next_states, dones = (x.to(self.device) for x in batch)  # [B, 3], [B], ...

            with torch.no_grad():
                noise = torch.randn(sizes.shape, generator=self.generator, device=self.device)
                noise = (noise * cfg.target_noise).clamp_(-cfg.target_noise_clip, cfg.target_noise_clip)
                next_sizes = (self.action_to_size(self.actor_target(next_states)) + noise).clamp_(1.0, self.d_max)
                next_actions = self.size_to_action(next_sizes)  # [B]
                next_q = torch.minimum(
                    self.qf1_target(next_states, next_actions), self.qf2_target(next_states, next_actions)
                )
                target_q = rewards + cfg.gamma * (1.0 - dones) * next_q  # [B]

            actions = self.size_to_action(sizes)  # [B]
            critic_loss = F.mse_loss(self.qf1(states, actions), target_q) + F.mse_loss(
                self.qf2(states, actions), target_q
            )
            self.critic_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            if sync_grads is not None:
                sync_grads(self.qf1)
                sync_grads(self.qf2)
            self.critic_optimizer.step()
            self.n_updates += 1
            critic_losses.append(critic_loss.detach())

            if self.n_updates % cfg.policy_delay == 0:
                actor_loss = self._actor_loss(states)
                self.actor_optimizer.zero_grad(set_to_none=True)
                actor_loss.backward()
                if sync_grads is not None:
                    sync_grads(self.actor)
                self.actor_optimizer.step()
                self.critic_optimizer.zero_grad(set_to_none=True)  # drop the Q1 grads the actor loss left behind
                self._soft_update()
                actor_losses.append(actor_loss.detach())

        result = {"critic_loss": float(torch.stack(critic_losses).mean())}
        if actor_losses:
            result["actor_loss"] = float(torch.stack(actor_losses).mean())
        return result

    def _actor_loss(self, states: Tensor) -> Tensor:
        """-Q1(s, actor(s)), plus (|u| - limit)^2 on pre-tanh outputs u beyond ``pre_tanh_limit`` when it is set.

        Why the penalty: once |u| > 3, tanh'(u) < 0.01 and Adam's second moment still holds the earlier, larger
        gradients, so dQ/da no longer moves the actor: it sits at a size bound whatever the critic learns later
        (measured on ML-1M: pre-tanh -4 to -6, sizes 1.0, while the critic preferred larger sizes).
        """
        pre_tanh = self.actor.pre_tanh(states)  # [B]
        loss = -self.qf1(states, torch.tanh(pre_tanh)).mean()
        limit = self.config.pre_tanh_limit
        if limit is not None:
            loss = loss + F.relu(pre_tanh.abs() - limit).square().mean()
        return loss

    @torch.no_grad()
    def _soft_update(self) -> None:
        """target <- tau * online + (1 - tau) * target, for the actor and both critics."""
        tau = self.config.tau
        pairs = ((self.actor, self.actor_target), (self.qf1, self.qf1_target), (self.qf2, self.qf2_target))
        for online, target in pairs:
            for p, tp in zip(online.parameters(), target.parameters(), strict=True):
                tp.lerp_(p, tau)

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """An independent snapshot: networks, targets, optimizers, update counter, generator state, settings."""
        state = {
            "config": dataclasses.asdict(self.config),
            "d_max": self.d_max,
            "n_updates": self.n_updates,
            "generator": self.generator.get_state(),
            "actor": self.actor.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "qf1": self.qf1.state_dict(),
            "qf2": self.qf2.state_dict(),
            "qf1_target": self.qf1_target.state_dict(),
            "qf2_target": self.qf2_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
        }
        return copy.deepcopy(state)  # module/optimizer state_dicts alias live tensors

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a snapshot from an agent with the same d_max and hidden width (ValueError otherwise)."""
        if state["d_max"] != self.d_max or state["config"]["hidden"] != self.config.hidden:
            raise ValueError(
                f"agent mismatch: this one has d_max={self.d_max}, hidden={self.config.hidden}; the state has "
                f"d_max={state['d_max']}, hidden={state['config']['hidden']}"
            )
        state = copy.deepcopy(state)  # never alias the caller's tensors (Adam state is loaded by reference)
        for name in ("actor", "actor_target", "qf1", "qf2", "qf1_target", "qf2_target"):
            getattr(self, name).load_state_dict(state[name])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.n_updates = int(state["n_updates"])
        self.generator.set_state(state["generator"])
