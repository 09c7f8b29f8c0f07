"""Cache policies: which experts stay resident in GPU memory, and which to evict."""

from moesim.policies.cache.base import AccessResult, CacheConfig, CachePolicy, CacheSetup

__all__ = ["AccessResult", "CacheConfig", "CachePolicy", "CacheSetup"]
