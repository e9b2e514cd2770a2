"""Per-token flow matching (noise -> token map), method.md §2."""

from dd.flow.token_map import (
    SOLVERS,
    TIME_GRIDS,
    FlowMapConfig,
    FlowMapResult,
    integrate_flow,
    log_probs_from_probs,
    make_time_grid,
    map_noise_to_tokens,
    posterior_mean,
    snap_to_codebook,
)

__all__ = [
    "SOLVERS",
    "TIME_GRIDS",
    "FlowMapConfig",
    "FlowMapResult",
    "integrate_flow",
    "log_probs_from_probs",
    "make_time_grid",
    "map_noise_to_tokens",
    "posterior_mean",
    "snap_to_codebook",
]
