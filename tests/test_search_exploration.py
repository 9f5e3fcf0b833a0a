"""Exploration: exact walk transition probabilities, borders, noise types, critic argmax, determinism."""

import pytest
import torch

from ciess_prod.search.exploration import ExplorationConfig, Explorer

D_MAX = 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _explorer(n_rows: int = 0, seed: int = 0, d_max: int = D_MAX, **overrides) -> Explorer:
    return Explorer(ExplorationConfig(**overrides), d_max=d_max, n_rows=n_rows, seed=seed)


def _expected_offsets(d: int, d_max: int, t: int) -> dict[int, float]:
    """Exact one-step law from d: P(d -> d + o) proportional to 1/|o| over valid o (0 < |o| <= t, 1 <= d+o <= d_max)."""
    weights = {o: 1.0 / abs(o) for o in range(-t, t + 1) if o != 0 and 1 <= d + o <= d_max}
    total = sum(weights.values())
    return {o: w / total for o, w in weights.items()}


def _chi_square(d: int, d_max: int, t: int, n: int = 60_000, seed: int = 0) -> tuple[float, int, set[int]]:
    explorer = _explorer(seed=seed, d_max=d_max, walk_radius=t, walk_steps=1)
    steps = explorer.walk(torch.full((n,), d, dtype=torch.int64))[:, 1] - d
    probs = _expected_offsets(d, d_max, t)
    observed = {o: int((steps == o).sum()) for o in probs}
    stat = sum((observed[o] - n * p) ** 2 / (n * p) for o, p in probs.items())
    return stat, len(probs) - 1, set(steps.unique().tolist())


# chi-square 0.9999 quantiles, by degrees of freedom (a fixed seed makes the test deterministic anyway)
CHI2_9999 = {2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9, 8: 31.8, 9: 33.7}


@pytest.mark.parametrize(
    ("d", "d_max", "t"),
    [
        (3, 128, 5),  # left border: valid offsets -2, -1, +1..+5
        (64, 128, 5),  # interior: all 10 offsets
        (1, 128, 5),  # d = 1: only +1..+5
        (128, 128, 5),  # d = d_max: only -5..-1
        (126, 128, 5),  # right border: -5..-1, +1, +2
        (2, 4, 5),  # both borders at once: -1, +1, +2
        (10, 128, 2),  # another radius
    ],
)
def test_walk_step_distribution_matches_exact_probabilities(d: int, d_max: int, t: int):
    stat, dof, seen = _chi_square(d, d_max, t)
    assert seen == set(_expected_offsets(d, d_max, t)), "a step used an invalid offset or missed a valid one"
    assert stat < CHI2_9999[dof], f"chi-square {stat:.1f} with {dof} dof"


def test_expected_probabilities_from_three():
    probs = _expected_offsets(3, 128, 5)
    assert sorted(probs) == [-2, -1, 1, 2, 3, 4, 5]
    total = 0.5 + 1 + 1 + 0.5 + 1 / 3 + 0.25 + 0.2
    assert probs[-1] == pytest.approx(1 / total) and probs[5] == pytest.approx(0.2 / total)


def test_walk_moves_by_one_to_t_and_stays_in_range():
    explorer = _explorer(seed=1, walk_radius=5, walk_steps=5, d_max=20)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(1, 21, (5000,), generator=g)
    path = explorer.walk(start)
    assert path.shape == (5000, 6) and path.dtype == torch.int64
    assert torch.equal(path[:, 0], start)
    assert int(path.min()) >= 1 and int(path.max()) <= 20
    moves = (path[:, 1:] - path[:, :-1]).abs()
    assert int(moves.min()) >= 1 and int(moves.max()) <= 5


def test_walk_deterministic_and_chunk_independent():
    start = torch.randint(1, D_MAX + 1, (1000,), generator=torch.Generator().manual_seed(0))
    a = _explorer(seed=7).walk(start)
    b = Explorer(ExplorationConfig(), d_max=D_MAX, n_rows=0, seed=7, chunk_rows=37).walk(start)
    c = _explorer(seed=8).walk(start)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_walk_rejects_bad_input():
    explorer = _explorer()
    with pytest.raises(ValueError, match="integer"):
        explorer.walk(torch.ones(3))
    with pytest.raises(ValueError, match="lie in"):
        explorer.walk(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="lie in"):
        explorer.walk(torch.tensor([D_MAX + 1]))


def test_gaussian_noise_std_is_sigma():
    n = 100_000
    noisy = _explorer(seed=2, noise="gaussian", sigma=6.0).perturb(torch.full((n,), 64.0))
    noise = noisy - 64.0
    assert noisy.dtype == torch.float32 and noisy.shape == (n,)
    assert abs(float(noise.mean())) < 0.1
    assert float(noise.std()) == pytest.approx(6.0, rel=0.02)


def test_uniform_noise_within_sigma():
    n = 100_000
    noise = _explorer(seed=3, noise="uniform", sigma=6.0).perturb(torch.full((n,), 64.0)) - 64.0
    assert float(noise.abs().max()) <= 6.0
    assert float(noise.std()) == pytest.approx(6.0 / 3**0.5, rel=0.02)


def test_perturb_clamps_to_range():
    explorer = _explorer(seed=4, sigma=50.0)
    out = explorer.perturb(torch.cat([torch.ones(1000), torch.full((1000,), float(D_MAX))]))
    assert float(out.min()) >= 1.0 and float(out.max()) <= D_MAX
    assert float(out[:1000].min()) == 1.0 and float(out[1000:].max()) == D_MAX  # the clamp is hit


def test_ou_noise_is_correlated_across_calls_and_reset():
    n, theta, sigma = 50_000, 0.15, 6.0
    explorer = _explorer(n_rows=n, seed=5, noise="ou", sigma=sigma, ou_theta=theta)
    base = torch.full((n,), 64.0)
    first = explorer.perturb(base) - 64.0
    second = explorer.perturb(base) - 64.0
    corr = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    expected = (1 - theta) / ((1 - theta) ** 2 + 1) ** 0.5  # x2 = (1 - theta) x1 + sigma e2
    assert corr == pytest.approx(expected, abs=0.02)
    explorer.reset()
    assert float(explorer.ou_state.abs().max()) == 0.0
    third = explorer.perturb(base) - 64.0
    assert abs(float(torch.corrcoef(torch.stack([second, third]))[0, 1])) < 0.03
    assert float(third.std()) == pytest.approx(sigma, rel=0.02)  # fresh state: one step = N(0, sigma)
    with pytest.raises(ValueError, match="one state per row"):
        explorer.perturb(torch.full((n - 1,), 64.0))


def _nearest_q(targets: torch.Tensor):
    """q_fn whose per-row maximum is the candidate closest to targets[row] (no ties: targets are x.3)."""

    def q_fn(states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        rows = states[:, 0].long()  # the tests put the row index in state column 0
        return -((candidates - targets[rows].unsqueeze(1)) ** 2)

    return q_fn


@pytest.mark.parametrize("chunk_rows", [1 << 18, 13])
def test_choose_picks_the_critic_argmax(chunk_rows: int):
    n = 2000
    g = torch.Generator().manual_seed(0)
    states = torch.zeros(n, 3)
    states[:, 0] = torch.arange(n, dtype=torch.float32)
    actor_sizes = torch.rand(n, generator=g) * (D_MAX - 1) + 1
    targets = torch.randint(1, D_MAX, (n,), generator=g).float() + 0.3
    explorer = Explorer(ExplorationConfig(), d_max=D_MAX, n_rows=n, seed=11, chunk_rows=chunk_rows)
    chosen = explorer.choose(states, actor_sizes, _nearest_q(targets))
    # replay the same randomness by hand
    twin = _explorer(n_rows=n, seed=11)
    start = twin.perturb(actor_sizes).round().long().clamp(1, D_MAX)
    candidates = twin.walk(start)
    expected = candidates.gather(1, (candidates - targets.unsqueeze(1)).abs().argmin(1, keepdim=True)).squeeze(1)
    assert chosen.dtype == torch.int64 and chosen.shape == (n,)
    assert torch.equal(chosen, expected)
    assert bool((chosen.unsqueeze(1) == candidates).any(1).all())


def test_choose_without_walk_returns_rounded_noisy_size():
    n = 500
    actor_sizes = torch.linspace(1, D_MAX, n)

    def q_fn(states, candidates):
        raise AssertionError("the no-walk path must not call the critic")

    chosen = _explorer(n_rows=n, seed=12, walk=False).choose(torch.zeros(n, 3), actor_sizes, q_fn)
    expected = _explorer(n_rows=n, seed=12).perturb(actor_sizes).round().long()
    assert chosen.dtype == torch.int64 and torch.equal(chosen, expected)
    assert int(chosen.min()) >= 1 and int(chosen.max()) <= D_MAX


def test_choose_rejects_non_finite_q():
    explorer = _explorer(n_rows=4, seed=0)
    with pytest.raises(FloatingPointError):
        explorer.choose(torch.zeros(4, 3), torch.full((4,), 10.0), lambda s, c: torch.full(c.shape, float("nan")))


def test_state_dict_round_trip_continues_identically():
    n = 300
    a = _explorer(n_rows=n, seed=21, noise="ou")
    sizes = torch.full((n,), 50.0)
    a.perturb(sizes)
    a.walk(torch.full((n,), 5))
    b = _explorer(n_rows=n, seed=99, noise="ou")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.perturb(sizes), b.perturb(sizes))
    start = torch.full((n,), 64)
    assert torch.equal(a.walk(start), b.walk(start))
    with pytest.raises(ValueError, match="mismatch"):
        _explorer(n_rows=n + 1).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise", "pink"),
        ("sigma", -1.0),
        ("sigma", float("nan")),
        ("ou_theta", 1.5),
        ("walk_radius", 0),
        ("walk_steps", 0),
        ("random_steps", -1),
    ],
)
def test_config_validation_names_the_field(field: str, value):
    with pytest.raises(ValueError, match=field):
        ExplorationConfig(**{field: value})


def test_uniform_sizes_cover_every_size_evenly_and_follow_the_seed():
    explorer = Explorer(ExplorationConfig(), d_max=8, n_rows=0, seed=3)
    sizes = explorer.uniform(80_000)
    assert sizes.dtype == torch.int64 and sizes.shape == (80_000,)
    counts = torch.bincount(sizes, minlength=9)
    assert counts[0] == 0 and ((counts[1:] - 10_000).abs() < 500).all()  # 1..8, each about 1/8
    assert torch.equal(Explorer(ExplorationConfig(), 8, 0, seed=3).uniform(80_000), sizes)
