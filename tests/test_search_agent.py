"""TD3 agent: size <-> action mapping, chunked inference, learning a 1-step problem, delays, checkpoints."""

import pytest
import torch

from ciess_prod.search.agent import STATE_DIM, TD3Agent, TD3Config
from ciess_prod.search.buffer import ReplayBuffer

D_MAX = 128
SMALL = TD3Config(hidden=32, batch_size=64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(agent: TD3Agent) -> list[torch.Tensor]:
    modules = (agent.actor, agent.qf1, agent.qf2, agent.actor_target, agent.qf1_target, agent.qf2_target)
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _filled_buffer(n: int = 512, seed: int = 0, target: float = 40.0) -> ReplayBuffer:
    """1-step problem: random states, uniformly random sizes, reward -((d - target) / d_max)^2, done."""
    g = torch.Generator().manual_seed(seed)
    states = torch.rand(n, STATE_DIM, generator=g) * 2 - 1
    sizes = torch.randint(1, D_MAX + 1, (n,), generator=g).float()
    rewards = -(((sizes - target) / D_MAX) ** 2)
    buf = ReplayBuffer(max_bytes=1 << 20, seed=seed)
    buf.add(states, sizes, rewards, torch.rand(n, STATE_DIM, generator=g) * 2 - 1, True)
    return buf


def test_size_action_round_trip_and_range():
    agent = TD3Agent(SMALL, D_MAX, seed=0)
    sizes = torch.arange(1, D_MAX + 1, dtype=torch.float32)
    actions = agent.size_to_action(sizes)
    assert float(actions[0]) == -1.0 and float(actions[-1]) == 1.0
    assert bool((actions[1:] > actions[:-1]).all())
    torch.testing.assert_close(agent.action_to_size(actions), sizes)
    a = torch.linspace(-1, 1, 101)
    torch.testing.assert_close(agent.size_to_action(agent.action_to_size(a)), a)
    assert float(agent.action_to_size(torch.tensor(1.5))) == D_MAX  # clamped
    assert float(agent.action_to_size(torch.tensor(-1.5))) == 1.0


def test_act_range_shape_and_chunking():
    agent = TD3Agent(SMALL, D_MAX, seed=1)
    states = torch.randn(1000, STATE_DIM, generator=torch.Generator().manual_seed(0)) * 3
    sizes = agent.act(states)
    assert sizes.shape == (1000,) and sizes.dtype == torch.float32
    assert float(sizes.min()) >= 1.0 and float(sizes.max()) <= D_MAX
    torch.testing.assert_close(agent.act(states, chunk_rows=7), sizes, rtol=0, atol=1e-4)
    assert agent.act(torch.zeros(0, STATE_DIM)).shape == (0,)
    with pytest.raises(ValueError, match="states"):
        agent.act(torch.zeros(5, 2))


def test_q_values_chunked_equals_unchunked_and_matches_critic():
    agent = TD3Agent(SMALL, D_MAX, seed=2)
    g = torch.Generator().manual_seed(1)
    states = torch.rand(300, STATE_DIM, generator=g)
    sizes = torch.randint(1, D_MAX + 1, (300, 6), generator=g).float()
    full = agent.q_values(states, sizes, chunk_rows=1 << 20)
    assert full.shape == (300, 6) and full.dtype == torch.float32
    for chunk in (1, 6, 7, 100):
        torch.testing.assert_close(agent.q_values(states, sizes, chunk_rows=chunk), full, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        direct = agent.qf1(states[5].expand(6, -1), agent.size_to_action(sizes[5]))
    torch.testing.assert_close(full[5], direct, rtol=1e-5, atol=1e-6)


def test_q_values_with_repeated_candidates():
    """Repeated sizes in a row are scored once and copied back: same values as scoring every pair."""
    agent = TD3Agent(SMALL, D_MAX, seed=3)
    g = torch.Generator().manual_seed(2)
    states = torch.rand(200, STATE_DIM, generator=g)
    sizes = torch.randint(1, 5, (200, 6), generator=g).float()  # many repeats per row
    sizes[0] = 7.0  # one value only
    sizes[1] = torch.tensor([9.0, 3.0, 9.0, 1.0, 3.0, 128.0])
    with torch.no_grad():
        direct = agent.qf1(
            states.unsqueeze(1).expand(-1, 6, -1).reshape(-1, STATE_DIM), agent.size_to_action(sizes).reshape(-1)
        ).view(200, 6)
    for chunk in (None, 6, 50):
        torch.testing.assert_close(agent.q_values(states, sizes, chunk_rows=chunk), direct, rtol=1e-5, atol=1e-6)
    q = agent.q_values(states, sizes)
    assert bool((q[0] == q[0, 0]).all()) and float(q[1, 0]) == float(q[1, 2]) and float(q[1, 1]) == float(q[1, 4])


def test_construction_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = (TD3Agent(SMALL, D_MAX, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b), strict=True))
    assert not torch.equal(_params(a)[0], _params(c)[0])
    assert all(torch.equal(x, y) for x, y in zip(a.actor.parameters(), a.actor_target.parameters(), strict=True))


def test_update_is_noop_with_too_few_transitions():
    agent = TD3Agent(SMALL, D_MAX, seed=0)
    buf = _filled_buffer(n=SMALL.batch_size - 1)
    before = _params(agent)
    assert agent.update(buf) == {}
    assert agent.n_updates == 0
    assert all(torch.equal(x, y) for x, y in zip(before, _params(agent), strict=True))


def test_delayed_actor_updates():
    config = TD3Config(hidden=16, batch_size=32, policy_delay=3)
    agent = TD3Agent(config, D_MAX, seed=0)
    buf = _filled_buffer(n=200)
    for i in range(1, 10):
        actor_before = [p.detach().clone() for p in agent.actor.parameters()]
        target_before = [p.detach().clone() for p in agent.qf1_target.parameters()]
        critic_before = [p.detach().clone() for p in agent.qf1.parameters()]
        out = agent.update(buf)
        actor_ran = i % 3 == 0
        assert ("actor_loss" in out) == actor_ran and "critic_loss" in out
        actor_changed = any(not torch.equal(p, q) for p, q in zip(actor_before, agent.actor.parameters(), strict=True))
        target_changed = any(
            not torch.equal(p, q) for p, q in zip(target_before, agent.qf1_target.parameters(), strict=True)
        )
        assert actor_changed == actor_ran and target_changed == actor_ran
        assert any(not torch.equal(p, q) for p, q in zip(critic_before, agent.qf1.parameters(), strict=True))
    assert agent.n_updates == 9


def test_updates_per_step():
    agent = TD3Agent(TD3Config(hidden=16, batch_size=32, updates_per_step=4), D_MAX, seed=0)
    out = agent.update(_filled_buffer(n=100))
    assert agent.n_updates == 4 and "actor_loss" in out


def test_td3_learns_one_step_problem():
    """gamma = 0, reward -((d - 40)/128)^2 whatever the state: the actor must learn to output ~40."""
    agent = TD3Agent(TD3Config(hidden=64, batch_size=256, gamma=0.0), D_MAX, seed=0)
    buf = _filled_buffer(n=4096, seed=2)
    for _ in range(800):
        out = agent.update(buf)
    assert out["critic_loss"] < 1e-3
    states = torch.rand(1000, STATE_DIM, generator=torch.Generator().manual_seed(5)) * 2 - 1
    sizes = agent.act(states)
    assert abs(float(sizes.mean()) - 40.0) < 4.0
    assert float((sizes - 40.0).abs().mean()) < 8.0
    assert float((sizes - 40.0).abs().max()) < 10.0


def test_state_dict_round_trip_continues_bit_identically():
    config = TD3Config(hidden=16, batch_size=32)
    a = TD3Agent(config, D_MAX, seed=0)
    buf_a = _filled_buffer(n=200, seed=1)
    for _ in range(3):  # odd count: the restored agent must know the next update runs the actor
        a.update(buf_a)
    agent_state, buffer_state = a.state_dict(), buf_a.state_dict()
    b = TD3Agent(config, D_MAX, seed=99)
    buf_b = ReplayBuffer(max_bytes=1 << 20, seed=7)
    b.load_state_dict(agent_state)
    buf_b.load_state_dict(buffer_state)
    assert b.n_updates == 3
    for _ in range(4):
        out_a, out_b = a.update(buf_a), b.update(buf_b)
        assert out_a == out_b
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b), strict=True))
    # the snapshot did not follow the live agent (it is a copy)
    assert not torch.equal(agent_state["actor"]["fc1.weight"], a.actor.fc1.weight)
    with pytest.raises(ValueError, match="mismatch"):
        TD3Agent(config, 64, seed=0).load_state_dict(agent_state)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden", 0),
        ("actor_lr", 0.0),
        ("critic_lr", float("nan")),
        ("gamma", 1.5),
        ("tau", 0.0),
        ("batch_size", 0),
        ("policy_delay", 0),
        ("target_noise", -1.0),
        ("target_noise_clip", -0.1),
        ("updates_per_step", 0),
        ("pre_tanh_limit", 0.0),
    ],
)
def test_config_validation_names_the_field(field: str, value):
    with pytest.raises(ValueError, match=field):
        TD3Config(**{field: value})


def _shifted_optimum(limit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trains towards the size bound 1 (reward -d / d_max), then the optimum moves to 64: the actor must follow.

    Returns the actor's pre-tanh outputs after the first phase and its sizes after the second, on fresh states.
    """
    agent = TD3Agent(TD3Config(hidden=64, batch_size=256, gamma=0.0, pre_tanh_limit=limit), D_MAX, seed=0)
    g = torch.Generator().manual_seed(3)
    states = torch.rand(4096, STATE_DIM, generator=g) * 2 - 1
    probe = torch.rand(1000, STATE_DIM, generator=g) * 2 - 1
    for phase, reward in enumerate((lambda d: -d / D_MAX, lambda d: -(((d - 64.0) / D_MAX) ** 2))):
        sizes = torch.randint(1, D_MAX + 1, (4096,), generator=g).float()
        buf = ReplayBuffer(max_bytes=1 << 20, seed=0)
        buf.add(states, sizes, reward(sizes), states, True)
        for _ in range(600):
            agent.update(buf)
        if phase == 0:  # trained towards the bound
            with torch.no_grad():
                pre_tanh = agent.actor.pre_tanh(probe)
    return pre_tanh, agent.act(probe)


def test_pre_tanh_limit_keeps_the_actor_movable():
    """Without the limit the actor saturates at the bound (tanh' ~ 0) and stays there after the optimum moves."""
    pre_tanh, sizes = _shifted_optimum(limit=2.5)
    assert float(pre_tanh.min()) > -3.0  # held near the limit, not in tanh's flat tail
    assert abs(float(sizes.mean()) - 64.0) < 8.0
    pre_tanh, sizes = _shifted_optimum(limit=None)
    assert float(pre_tanh.mean()) < -3.0  # saturated ...
    assert float(sizes.mean()) < 20.0  # ... and stuck near the old optimum


def test_the_actor_answers_a_changed_penalty_without_new_transitions():
    """One buffer of (gain, cost) transitions, gain rising with size: at a high penalty the actor goes small, and
    when the penalty falls the same stored transitions, re-priced, move it back up."""
    agent = TD3Agent(TD3Config(hidden=64, batch_size=256, gamma=0.0), D_MAX, seed=0)
    g = torch.Generator().manual_seed(4)
    states = torch.rand(4096, STATE_DIM, generator=g) * 2 - 1
    sizes = torch.randint(1, D_MAX + 1, (4096,), generator=g).float()
    gains = torch.sqrt(sizes / D_MAX)  # concave: the best size falls as the penalty rises
    buf = ReplayBuffer(max_bytes=1 << 20, seed=0)
    buf.add(states, sizes, gains, states, True, costs=(sizes / D_MAX) ** 2)
    means = []
    for penalty in (4.0, 0.1):  # optimum of sqrt(x) - penalty x^2: x = (4 penalty)^(-2/3), x <= 1
        for _ in range(400):
            agent.update(buf, penalty=penalty)
        means.append(float(agent.act(states[:1000]).mean()))
    assert means[0] < 0.25 * D_MAX  # (16)^(-2/3) = 0.16 of d_max
    assert means[1] > 0.75 * D_MAX  # (0.4)^(-2/3) > 1: the largest size
