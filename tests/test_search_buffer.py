"""Replay buffer: byte bound, ring wrap-around, subsampling, seeded sampling, pricing, checkpoint round trip."""

import pytest
import torch

from ciess_prod.search.buffer import ReplayBuffer

S = 3
BPT = (2 * S + 4) * 4  # bytes per transition


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _step(n: int, offset: float = 0.0, seed: int = 0):
    """One step's transitions; row i has size = offset + i so rows can be identified after writing."""
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(n, S, generator=g)
    sizes = offset + torch.arange(n, dtype=torch.float32)
    rewards = torch.rand(n, generator=g)
    next_states = torch.rand(n, S, generator=g)
    return states, sizes, rewards, next_states


def test_byte_bound_and_capacity():
    buf = ReplayBuffer(max_bytes=10 * BPT + BPT - 1)
    assert buf.bytes_per_transition == BPT
    assert buf.capacity == 10
    assert buf.nbytes == 10 * BPT <= 11 * BPT - 1
    big = ReplayBuffer(max_bytes=1 << 20)
    assert big.nbytes <= 1 << 20 and big.capacity == (1 << 20) // BPT
    with pytest.raises(ValueError, match="holds no transition"):
        ReplayBuffer(max_bytes=BPT - 1)


def test_add_stores_fields():
    buf = ReplayBuffer(max_bytes=100 * BPT)
    states, sizes, rewards, next_states = _step(7)
    done = torch.tensor([0, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert buf.add(states, sizes, rewards, next_states, done) == 7
    assert len(buf) == 7
    cols = buf.data[:7]
    torch.testing.assert_close(cols[:, :S], states)
    torch.testing.assert_close(cols[:, S], sizes)
    torch.testing.assert_close(cols[:, S + 1], rewards)
    torch.testing.assert_close(cols[:, S + 2 : 2 * S + 2], next_states)
    torch.testing.assert_close(cols[:, 2 * S + 2], done.float())
    assert bool((cols[:, 2 * S + 3] == 0).all())  # no costs: a plain reward
    buf.add(*_step(2), True)
    assert bool((buf.data[7:9, 2 * S + 2] == 1.0).all())


def test_wraparound_keeps_newest():
    buf = ReplayBuffer(max_bytes=10 * BPT, write_chunk_rows=3)  # small chunks: a write crosses the ring end
    buf.add(*_step(6, offset=0), False)
    buf.add(*_step(7, offset=100), False)  # 6 + 7 > 10: the 3 oldest are overwritten
    assert len(buf) == 10 and buf.pos == 3
    kept = sorted(buf.data[:, S].tolist())
    assert kept == [3.0, 4.0, 5.0] + [100.0 + i for i in range(7)]
    # one write larger than the capacity keeps its last `capacity` rows
    assert buf.add(*_step(25, offset=1000), False) == 10
    assert sorted(buf.data[:, S].tolist()) == [1000.0 + i for i in range(15, 25)]


def test_subsampling_writes_max_rows_distinct_rows():
    buf = ReplayBuffer(max_bytes=1000 * BPT, seed=3)
    assert buf.add(*_step(500), False, max_rows=40) == 40
    assert len(buf) == 40
    picked = buf.data[:40, S].long()
    assert picked.unique().numel() == 40 and int(picked.min()) >= 0 and int(picked.max()) < 500
    # fields stay aligned: the stored state is the state of the picked row
    states = _step(500)[0]
    torch.testing.assert_close(buf.data[:40, :S], states[picked])
    # N <= max_rows writes everything
    assert buf.add(*_step(10), False, max_rows=40) == 10
    # seeded: the same seed picks the same rows
    other = ReplayBuffer(max_bytes=1000 * BPT, seed=3)
    other.add(*_step(500), False, max_rows=40)
    torch.testing.assert_close(other.data[:40], buf.data[:40])


def test_sample_shapes_and_determinism():
    a, b = ReplayBuffer(max_bytes=1000 * BPT, seed=5), ReplayBuffer(max_bytes=1000 * BPT, seed=5)
    for buf in (a, b):
        buf.add(*_step(300), False)
    batch_a, batch_b = a.sample(64), b.sample(64)
    shapes = [tuple(x.shape) for x in batch_a]
    assert shapes == [(64, S), (64,), (64,), (64, S), (64,)]
    assert all(x.dtype == torch.float32 for x in batch_a)
    for x, y in zip(batch_a, batch_b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.sample(64)[1], batch_a[1])  # the generator advances
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(max_bytes=BPT).sample(1)


def test_sample_only_filled_part():
    buf = ReplayBuffer(max_bytes=1000 * BPT)
    buf.add(*_step(5, offset=1.0), False)
    sizes = buf.sample(2000)[1]
    assert set(sizes.long().tolist()) == {1, 2, 3, 4, 5}


def test_state_dict_round_trip_continues_identically():
    a = ReplayBuffer(max_bytes=50 * BPT, seed=9)
    a.add(*_step(70, offset=0), False, max_rows=30)
    a.add(*_step(40, offset=500), True)  # wraps
    state = a.state_dict()
    assert state["data"].shape == (50, 2 * S + 4)
    b = ReplayBuffer(max_bytes=50 * BPT, seed=123)
    b.load_state_dict(state)
    assert len(b) == len(a) and b.pos == a.pos
    for buf in (a, b):
        buf.add(*_step(100, offset=9000), False, max_rows=20)
    assert torch.equal(a.data, b.data)
    for x, y in zip(a.sample(32), b.sample(32), strict=True):
        assert torch.equal(x, y)
    # partly filled buffers only save the filled part
    c = ReplayBuffer(max_bytes=50 * BPT)
    c.add(*_step(4), False)
    assert c.state_dict()["data"].shape[0] == 4
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(max_bytes=60 * BPT).load_state_dict(state)


def test_shape_validation():
    buf = ReplayBuffer(max_bytes=100 * BPT)
    states, sizes, rewards, next_states = _step(5)
    with pytest.raises(ValueError, match="sizes"):
        buf.add(states, sizes[:4], rewards, next_states, False)
    with pytest.raises(ValueError, match="next_states"):
        buf.add(states, sizes, rewards, next_states[:, :2], False)
    with pytest.raises(ValueError, match="max_rows"):
        buf.add(states, sizes, rewards, next_states, False, max_rows=0)


def test_sampled_rewards_are_priced_at_the_penalty_given():
    """reward - penalty * cost at sampling time: one stored transition, re-priced as the penalty changes."""
    buf = ReplayBuffer(max_bytes=100 * BPT, seed=1)
    states, sizes, rewards, next_states = _step(6)
    costs = torch.linspace(0.0, 1.0, 6)
    buf.add(states, sizes, rewards, next_states, False, costs=costs)
    torch.testing.assert_close(buf.data[:6, 2 * S + 3], costs)
    for penalty in (0.0, 0.4, 3.0):
        buf.generator.manual_seed(7)
        _, got_sizes, got_rewards, _, _ = buf.sample(50, penalty)
        rows = got_sizes.long()
        torch.testing.assert_close(got_rewards, rewards[rows] - penalty * costs[rows])
    with pytest.raises(ValueError, match="costs"):
        buf.add(states, sizes, rewards, next_states, False, costs=costs[:3])


def test_loads_a_state_saved_before_the_cost_column():
    """An older snapshot (one reward column, capacity for 2 S + 3 floats) keeps its rewards at cost 0."""
    max_bytes = 50 * BPT
    old_capacity = max_bytes // ((2 * S + 3) * 4)
    states, sizes, rewards, next_states = _step(20)
    data = torch.cat([states, sizes[:, None], rewards[:, None], next_states, torch.zeros(20, 1)], dim=1)
    generator = torch.Generator().manual_seed(0).get_state()
    old = {"data": data, "pos": 20, "size": 20, "capacity": old_capacity, "state_dim": S, "generator": generator}
    buf = ReplayBuffer(max_bytes=max_bytes)
    buf.load_state_dict(old)
    assert len(buf) == 20 and buf.pos == 20
    _, got_sizes, got_rewards, _, _ = buf.sample(40, penalty=5.0)
    torch.testing.assert_close(got_rewards, rewards[got_sizes.long()])  # priced as when saved
    wrapped = {**old, "pos": 3}
    with pytest.raises(ValueError, match="unwrapped"):
        ReplayBuffer(max_bytes=max_bytes).load_state_dict(wrapped)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(max_bytes=2 * max_bytes).load_state_dict(old)
