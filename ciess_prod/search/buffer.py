"""Replay buffer of per-row transitions for the two TD3 agents, bounded in bytes.

One transition is one row (a user or an item) at one search step: (state, size, reward, next_state, done, cost).
All fields live in ONE preallocated float32 tensor ``data`` of shape [capacity, 2 * state_dim + 4] with the column
layout

    [0, state_dim)                 state        (normalised by the caller)
    state_dim                      size         (size units, float in [1, d_max])
    state_dim + 1                  reward       (its part that does not scale with the penalty)
    [state_dim + 2, 2 state_dim + 2) next_state
    2 * state_dim + 2              done         (0.0 or 1.0)
    2 * state_dim + 3              cost         (what the penalty multiplies; 0 for a plain reward)

so a write is a few slice copies and a sample is one ``index_select``. A sampled reward is ``reward - penalty *
cost`` at the penalty the sampler passes: a search that adapts its penalty (lambda) re-prices every stored
transition at the current lambda instead of training its critic on a mix of old prices (measured on ML-1M: lambda
fell to its floor while the stored transitions still carried its peak, and the actor stayed where the peak had put
it). The paper keeps 100 x |entities| transitions per side [C]; here the bound is given in bytes so that a 10^7-row
table cannot blow the memory up, and large steps can be subsampled on the way in (``add(..., max_rows=...)``). All
randomness (subsampling, minibatch sampling) comes from the buffer's own ``torch.Generator``, whose state is part of
``state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BYTES_PER_FLOAT32 = 4


class ReplayBuffer:
    """Ring buffer of per-row transitions, float32, bounded in BYTES (not transitions).

    Args:
        max_bytes: upper bound on the bytes of the preallocated storage; capacity = max_bytes // bytes_per_transition.
        state_dim: length of one state vector (3 for CIESS: popularity, current size, quality ratio).
        seed: seed of the buffer's generator (subsampling in ``add`` and minibatch sampling in ``sample``).
        device: where the storage lives (the generator always lives on the CPU; indices are moved to ``device``).
        write_chunk_rows: rows gathered and copied per chunk in ``add`` (bounds the temporary memory of a write).

    Raises:
        ValueError: if the capacity is < 1 transition or an argument is out of range.
    """

    def __init__(
        self,
        max_bytes: int,
        state_dim: int = 3,
        seed: int = 0,
        device: str | torch.device = "cpu",
        write_chunk_rows: int = 1 << 18,
    ) -> None:
        if state_dim < 1:
            raise ValueError(f"state_dim must be >= 1, got {state_dim}")
        if write_chunk_rows < 1:
            raise ValueError(f"write_chunk_rows must be >= 1, got {write_chunk_rows}")
        self.state_dim = state_dim
        self.width = 2 * state_dim + 4
        self.bytes_per_transition = self.width * BYTES_PER_FLOAT32
        self.max_bytes = int(max_bytes)
        self.capacity = self.max_bytes // self.bytes_per_transition
        if self.capacity < 1:
            raise ValueError(f"max_bytes={max_bytes} holds no transition (one takes {self.bytes_per_transition} bytes)")
        self.device = torch.device(device)
        self.write_chunk_rows = write_chunk_rows
        # torch.empty: pages are only touched (and counted in RSS) as the ring fills up.
        self.data = torch.empty((self.capacity, self.width), dtype=torch.float32, device=self.device)
        self.pos = 0  # next row of ``data`` to write
        self.size = 0  # rows of ``data`` holding a transition (the filled part is always data[:size])
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    # column slices of ``data``
    @property
    def _cols(self) -> dict[str, slice]:
        s = self.state_dim
        return {
            "state": slice(0, s),
            "size": slice(s, s + 1),
            "reward": slice(s + 1, s + 2),
            "next_state": slice(s + 2, 2 * s + 2),
            "done": slice(2 * s + 2, 2 * s + 3),
            "cost": slice(2 * s + 3, 2 * s + 4),
        }

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated for the storage (capacity * bytes_per_transition <= max_bytes)."""
        return self.data.element_size() * self.data.nelement()

    def add(
        self,
        states: Tensor,
        sizes: Tensor,
        rewards: Tensor,
        next_states: Tensor,
        done: bool | Tensor,
        max_rows: int | None = None,
        costs: Tensor | None = None,
    ) -> int:
        """Writes one step's transitions, one per row, into the ring (oldest transitions are overwritten).

        Args:
            states: [N, state_dim] float, the states the sizes were chosen in.
            sizes: [N] float or int, the executed sizes in size units.
            rewards: [N] float, the reward's part that does not scale with the penalty (all of a plain reward).
            next_states: [N, state_dim] float.
            done: a bool for the whole step, or a [N] bool/float tensor.
            max_rows: if set and N > max_rows, a uniformly random subset of max_rows rows (without replacement,
                from the buffer's generator) is written instead of all N.
            costs: [N] float, what the penalty passed to ``sample`` multiplies; None stores 0 (a plain reward).

        Returns:
            The number of transitions stored: min(N or max_rows, capacity). When more rows than the capacity arrive
            at once, only the last ``capacity`` of them (in write order) survive, exactly as if written one by one.
        """
        n = states.shape[0]
        if states.dim() != 2 or states.shape[1] != self.state_dim:
            raise ValueError(f"states: expected shape [N, {self.state_dim}], got {list(states.shape)}")
        if next_states.shape != states.shape:
            raise ValueError(f"next_states: expected shape {list(states.shape)}, got {list(next_states.shape)}")
        if costs is None:
            costs = torch.zeros(n, dtype=torch.float32, device=states.device)
        for name, value in (("sizes", sizes), ("rewards", rewards), ("costs", costs)):
            if value.shape != (n,):
                raise ValueError(f"{name}: expected shape [{n}], got {list(value.shape)}")
        if isinstance(done, Tensor):
            if done.shape not in ((n,), ()):
                raise ValueError(f"done: expected shape [{n}] or a scalar, got {list(done.shape)}")
            done_col = done.to(states.device, torch.float32).expand(n)
        else:
            done_col = torch.full((n,), float(bool(done)), dtype=torch.float32, device=states.device)
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")

        rows: Tensor | None = None  # [m] int64 indices into the N inputs, or None for "all, in order"
        m = n
        if max_rows is not None and n > max_rows:
            rows = torch.randperm(n, generator=self.generator)[:max_rows].to(states.device)
            m = max_rows
        skip = max(0, m - self.capacity)  # these would be overwritten within this very call
        cols = self._cols
        for start in range(skip, m, self.write_chunk_rows):
            stop = min(start + self.write_chunk_rows, m)
            pick: Tensor | slice = rows[start:stop] if rows is not None else slice(start, stop)
            block = torch.empty((stop - start, self.width), dtype=torch.float32, device=self.device)
            block[:, cols["state"]] = states[pick].to(self.device, torch.float32)
            block[:, cols["size"]] = sizes[pick].to(self.device, torch.float32).unsqueeze(1)
            block[:, cols["reward"]] = rewards[pick].to(self.device, torch.float32).unsqueeze(1)
            block[:, cols["next_state"]] = next_states[pick].to(self.device, torch.float32)
            block[:, cols["done"]] = done_col[pick].to(self.device).unsqueeze(1)
            block[:, cols["cost"]] = costs[pick].to(self.device, torch.float32).unsqueeze(1)
            self._write_ring(block)
        return m - skip

    def _write_ring(self, block: Tensor) -> None:
        """Copies block [k, width] (k <= capacity) at ``pos``, wrapping around: at most two slice copies."""
        k = block.shape[0]
        first = min(k, self.capacity - self.pos)
        self.data[self.pos : self.pos + first] = block[:first]
        if k > first:
            self.data[: k - first] = block[first:]
        self.pos = (self.pos + k) % self.capacity
        self.size = min(self.size + k, self.capacity)

    def sample(self, batch_size: int, penalty: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Uniform sample with replacement over the stored transitions, from the buffer's generator.

        Returns:
            states [B, state_dim], sizes [B] (size units), rewards [B] (stored reward - ``penalty`` * cost),
            next_states [B, state_dim], done [B]; all float32, contiguous, on the buffer's device.
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = torch.randint(0, self.size, (batch_size,), generator=self.generator).to(self.device)
        batch = self.data.index_select(0, idx)  # [B, width]
        cols = self._cols
        return (
            batch[:, cols["state"]].contiguous(),
            batch[:, cols["size"]].squeeze(1).contiguous(),
            (batch[:, cols["reward"]] - penalty * batch[:, cols["cost"]]).squeeze(1),
            batch[:, cols["next_state"]].contiguous(),
            batch[:, cols["done"]].squeeze(1).contiguous(),
        )

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (independent copies): the filled part of the storage, position, size, generator state."""
        return {
            "data": self.data[: self.size].clone(),
            "pos": self.pos,
            "size": self.size,
            "capacity": self.capacity,
            "state_dim": self.state_dim,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a snapshot from a buffer of the same byte bound and state_dim (ValueError otherwise).

        A snapshot from before the cost column (width 2 * state_dim + 3, a larger capacity for the same bytes) loads
        with cost 0, so its transitions keep the reward they were priced at, provided its ring has not wrapped and
        fits this one.
        """
        if state["state_dim"] != self.state_dim:
            raise ValueError(f"state_dim mismatch: buffer has {self.state_dim}, state has {state['state_dim']}")
        size, pos, data = int(state["size"]), int(state["pos"]), state["data"]
        if data.dim() == 2 and data.shape[1] == self.width - 1:  # saved before the cost column
            old_capacity = self.max_bytes // ((self.width - 1) * BYTES_PER_FLOAT32)
            if state["capacity"] != old_capacity:
                raise ValueError(f"capacity mismatch: a buffer of {self.max_bytes} bytes held {old_capacity} "
                                 f"transitions before the cost column, the state holds {state['capacity']}")
            if size > self.capacity or pos != size % old_capacity:
                raise ValueError(f"a replay buffer saved before the cost column loads only unwrapped and within "
                                 f"{self.capacity} transitions; it holds {size} at position {pos}")
            data = torch.cat([data, torch.zeros(size, 1, dtype=data.dtype)], dim=1)
            pos = size % self.capacity
        elif state["capacity"] != self.capacity:
            raise ValueError(f"capacity mismatch: buffer holds {self.capacity}, state holds {state['capacity']}")
        if not (0 <= size <= self.capacity and 0 <= pos < self.capacity) or data.shape != (size, self.width):
            raise ValueError("inconsistent replay buffer state (size, pos or data shape)")
        self.data[:size] = data.to(self.device, torch.float32)
        self.size, self.pos = size, pos
        self.generator.set_state(state["generator"].clone())
