"""Read-ME pre-gating: the whole step's routing is known when the token is, before layer 0 runs."""

from __future__ import annotations

from typing import Literal

from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class ReadMePreGating(PrefetchPolicy):
    """Read-ME (Cai et al., NeurIPS 2024, arXiv:2410.19123) decouples the router from the backbone:
    a small router network on the token's embedding decides every layer's experts before the
    layers run, so after the first layer's router is read the host prefetches the experts of all
    later MoE layers of the step, in layer order. The routing it prefetches is the trace's (exact,
    as Read-ME's router is the model's router, not a guess). Its pre-gating-aware batching and its
    Belady-style cache with one step of look-ahead are not modelled here (pair with a cache)."""

    class Config(PolicyConfig):
        """Prefetch every later MoE layer of the step after layer 0."""

        kind: Literal["readme_pregating"] = "readme_pregating"

    def plan(self, step, column, known):
        if column != 0:
            return []
        su = self.setup
        return [(c, e) for c in range(1, su.num_columns) for e in su.true_row(step, c)]
