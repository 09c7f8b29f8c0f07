"""No prefetching: experts are loaded only when a layer asks for them."""

from __future__ import annotations

from typing import Literal

from moesim.policies.base import PolicyConfig
from moesim.policies.prefetch.base import PrefetchPolicy


class NoPrefetch(PrefetchPolicy):
    """Load on demand only (the baseline every prefetcher is compared with)."""

    class Config(PolicyConfig):
        """No prefetch."""

        kind: Literal["none"] = "none"
