"""The search's typed configs: what one search (SearchConfig) and one search experiment (data, model, training
recipe, search, test protocol, output) are, checked where they are built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ciess_prod.config import to_dict
from ciess_prod.experiment import DataConfig
from ciess_prod.models import ModelConfig
from ciess_prod.models.basis import ROTATABLE_KINDS
from ciess_prod.search.agent import TD3Config
from ciess_prod.search.environment import EnvironmentConfig
from ciess_prod.search.exploration import ExplorationConfig
from ciess_prod.train.protocol import Protocol, RetrainConfig
from ciess_prod.train.trainer import TrainConfig

# only choose and retrain plans once the steps are done, so a resumed search may change them (bench/ml1m_search.py's
# ciess_fill, ciess_scaled and ciess_even retrain a finished search's steps with other ones); `restarts` adds or drops
# whole searches beside this one, each saved with its own steps
SELECTION_SETTINGS = ("top_l", "fill_budget", "candidates_from", "within_side", "probe_top", "probe_batches",
                      "probe_spread", "probe", "probe_l2", "restarts")

# under probe_spread the record keeps this many times probe_top configurations per budget, from which the spaced
# pool is drawn (int16 per row each: at probe_top 6, 48 of ML-1M's 9,746 rows are 0.9 MB per budget)
SPREAD_DEPTH = 8


@dataclass(frozen=True)
class SearchConfig:
    budgets: tuple[float, ...] = (0.8, 0.9, 0.95)  # target sparsities c served by one search [P]
    episodes: int = 30  # M [P]
    steps_per_episode: int = 10  # T [P] (the authors' code: 11)
    size_penalty: float = 0.4  # lambda in r = q - lambda (d / d_max)^2; 0.4 best on ML-1M [P]
    reward: Literal["paper", "code"] = "paper"  # code: raw eval - lambda ((d - 1) / d_max)^2 instead of q [C]
    top_l: int = 3  # configurations per budget retrained to convergence [P]
    fill_budget: bool = False  # grow each candidate by one common factor into its budget's slack (fill_to_budget) [I]
    # budget: each budget's own top-l [P]; loosest: every budget takes the loosest budget's top-l (the search's best
    # configurations), shrunk into it by repair_to_budget's common factor, which keeps their per-row allocation [I]
    candidates_from: Literal["budget", "loosest"] = "budget"
    # keep: each row keeps its visited size [P]; even: each side's rows share the side's total equally, after any
    # shrink and fill, so a candidate keeps only the search's split between users and items (even_within_tables) [I]
    within_side: Literal["keep", "even"] = "keep"
    # rank this many of the best visited configurations (by mean q) by a short retraining from scratch before the
    # top_l go to full retraining; the warm fine-tune's q separates configurations weakly. 0: rank by mean q [I]
    probe_top: int = 0
    probe_batches: int = 1000  # the probe's training length (the full retraining's first batches, same recipe) [I]
    # pool for the probe, in mean-q order, only configurations whose prepared sizes lie at least this far from every
    # one pooled before (size_distance: the share of columns that differ). The warm steps revisit near-copies of one
    # split between users and items, so the best probe_top by mean q may be one plan six times. 0: no spacing [I]
    probe_spread: float = 0.0
    # short: each pool member retrains for probe_batches at train's recipe, prepared for the pool's source budget, so
    # one probe ranks it for every budget. full: each retrains to convergence at the retrain weight probe_l2, prepared
    # for the budget it serves, so every budget ranks the pool itself and its top_l reuse that fit. On ML-1M the short
    # probe ranked the users-heavy split last where its full fit won c = 0.95 by 5% (docs/benchmarks.md) [I]
    probe: Literal["short", "full"] = "short"
    probe_l2: float | None = None  # the retrain L2 weight the full probes fit at (one of retrain.l2) [I]
    # fixed: lambda stays size_penalty [P]. loosest: after every step lambda takes a dual-ascent step (next_penalty)
    # so that the visited sparsity tracks the loosest budget plus penalty_margin: a fixed lambda meets the budgets only
    # where the actor happens to settle, which differs between seeds [I]. signed: the same step on lambda itself,
    # which may go below 0 and then pays for size, so a too-sparse actor is pulled back [I]
    penalty_control: Literal["fixed", "loosest", "signed"] = "fixed"
    # change per step per unit of relative density gap (gap clipped to +-1): of log lambda (loosest), of lambda (signed)
    penalty_rate: float = 0.3
    # proportional gain: lambda = the stepped (integral) value plus penalty_gain * gap (loosest: times
    # exp(penalty_gain * gap)), a PI controller: it answers an overshoot at once instead of after the integral has
    # wound back. At gain 1 on ML-1M it sped the cycle up rather than damping it (docs/search.md). 0: dual ascent [I]
    penalty_gain: float = 0.0
    penalty_margin: float = 0.02  # the tracked sparsity is the loosest budget plus this, so visits meet it
    replay_bytes: int = 256 << 20  # replay buffer bound per agent (bytes)
    rows_per_step: int | None = None  # subsample this many rows per side into the buffer each step (large tables)
    td3: TD3Config = field(default_factory=TD3Config)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    seed: int = 0  # seeds agents, exploration, buffers and every environment step
    # independent searches at seeds seed, seed + 1, ...; every budget's candidates come from all of them (with
    # probe_top: each restart's best probe_top by mean q, ranked together by their probes). The outcome of one seed
    # varies more than the methods differ (docs/benchmarks.md); this buys robustness with restarts x the steps [I]
    restarts: int = 1

    @property
    def recorded(self) -> int:
        """How many visited configurations per budget the record keeps: the probe's pool or the top-l; under
        ``probe_spread`` ``SPREAD_DEPTH`` times the pool, for the spacing to skip near-copies."""
        return max(self.top_l, self.probe_top * (SPREAD_DEPTH if self.probe_spread else 1))

    def steps_settings(self) -> dict[str, Any]:
        """The settings that decide the steps (all but the final selection's): a resumed search must keep them, or
        its steps would mix two searches."""
        settings = to_dict(self)
        for name in SELECTION_SETTINGS:
            del settings[name]
        return settings

    def __post_init__(self) -> None:
        if not self.budgets or any(not 0.0 <= c < 1.0 for c in self.budgets):
            raise ValueError(f"budgets must be sparsities in [0, 1), got {self.budgets}")
        for name in ("episodes", "steps_per_episode", "top_l", "probe_batches", "restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.probe_top and self.probe_top < self.top_l:
            raise ValueError(f"probe_top must be 0 or >= top_l ({self.top_l}), got {self.probe_top}")
        if not 0 <= self.probe_spread <= 2:
            raise ValueError(f"probe_spread is a share of columns in [0, 2], got {self.probe_spread}")
        if self.probe_spread and not self.probe_top:
            raise ValueError("probe_spread spaces the probe's pool: it needs probe_top > 0")
        if self.probe == "full" and (not self.probe_top or self.probe_l2 is None):
            raise ValueError("probe 'full' fits the probe's pool at probe_l2: it needs probe_top > 0 and probe_l2")
        if self.probe == "short" and self.probe_l2 is not None:
            raise ValueError("probe_l2 is the full probes' weight: it needs probe 'full' (short probes train at "
                             "train.l2)")
        if not self.penalty_rate > 0:
            raise ValueError(f"penalty_rate must be > 0, got {self.penalty_rate}")
        if not self.penalty_gain >= 0:
            raise ValueError(f"penalty_gain must be >= 0, got {self.penalty_gain}")
        if self.penalty_gain and self.penalty_control == "fixed":
            raise ValueError("penalty_gain needs an adapted penalty_control ('loosest' or 'signed'); 'fixed' has none")
        if not 0 <= self.penalty_margin < 1 - min(self.budgets):
            raise ValueError(f"penalty_margin must lie in [0, 1 - the loosest budget), got {self.penalty_margin}")
        if self.penalty_control == "loosest" and not self.size_penalty > 0:
            raise ValueError("penalty_control 'loosest' scales lambda and needs size_penalty > 0 to start from")
        if self.size_penalty < 0:
            raise ValueError(f"size_penalty must be >= 0, got {self.size_penalty}")
        if self.rows_per_step is not None and self.rows_per_step < 1:
            raise ValueError(f"rows_per_step must be >= 1 or null, got {self.rows_per_step}")



def resumable_settings(config: Any) -> dict[str, Any]:
    """The settings of a search experiment config (any with ``search``, ``train`` and ``output_dir``) that decide its
    steps: all but where it writes, its test protocol and retraining, the final selection's and the progress bar,
    which a resumed search may change."""
    settings = to_dict(config)
    for name in ("output_dir", "reference_dir", "protocol", "retrain"):
        settings.pop(name, None)
    settings["train"].pop("progress", None)
    settings["search"] = config.search.steps_settings()
    return settings

@dataclass(frozen=True)
class SearchExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # reference model and final retraining recipe
    search: SearchConfig = field(default_factory=SearchConfig)
    protocol: Protocol = "final"  # how the chosen configuration is tested (same as the baselines)
    # the candidates' fits: the L2 weights tried (the best on validation is tested), their cap and patience [I]
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    output_dir: str = "runs/search"  # reference/, search_state.pt, plans/, models/, report/, search.json
    reference_dir: str | None = None  # cached full-size reference; default <output_dir>/reference (shareable)

    def __post_init__(self) -> None:
        if self.search.environment.reference_basis == "principal" and self.model.kind not in ROTATABLE_KINDS:
            raise ValueError(f"search.environment.reference_basis 'principal' keeps scores only for "
                             f"{ROTATABLE_KINDS}, not {self.model.kind}")
        impossible = [c for c in self.search.budgets if (1 - c) * self.model.d_max < 1]
        if impossible:
            raise ValueError(
                f"search.budgets {impossible} leave less than one column per row at d_max {self.model.d_max}"
            )
        weights = [recipe.l2 for recipe in self.retrain.recipes(self.train)]
        if self.search.probe == "full" and self.search.probe_l2 not in weights:
            raise ValueError(f"search.probe_l2 {self.search.probe_l2} must be one of the retrain weights {weights}: "
                             "the full probe is one of the candidates' fits")
