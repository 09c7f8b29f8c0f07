"""Adaptive Replacement Cache (ARC) for experts."""

from __future__ import annotations

from typing import Literal

from moesim.policies.cache.base import CacheConfig, CachePolicy, Pool


class _ArcState:
    """ARC lists of one pool, each an insertion-ordered dict (least recent first)."""

    __slots__ = ("c", "p", "t1", "t2", "b1", "b2", "pending", "from_b2", "drop_next")

    def __init__(self, c: int):
        self.c = c  # pool capacity in expert slots
        self.p = 0.0  # target size of T1 (slots)
        self.t1: dict = {}  # resident, seen once since entering
        self.t2: dict = {}  # resident, seen at least twice
        self.b1: dict = {}  # ghosts evicted from T1
        self.b2: dict = {}  # ghosts evicted from T2
        self.pending = None  # key being admitted and whether it goes to T2
        self.from_b2 = False  # the miss being served was a B2 ghost (REPLACE's tie rule)
        self.drop_next = False  # the next T1 eviction leaves no ghost (case IV.A, |T1| = c)


class Arc(CachePolicy):
    """Adaptive Replacement Cache (Megiddo & Modha 2003, "ARC: A Self-Tuning, Low Overhead
    Replacement Cache", USENIX FAST '03): two resident LRU lists (T1 seen once, T2 seen again)
    and two ghost lists of evicted keys (B1, B2); a miss on a ghost moves the target size ``p`` of
    T1 towards the list that would have kept it. Fate (Fang et al. 2025, arXiv:2502.12224) uses ARC
    for its expert cache.

    Adaptation to moesim's accounting (DESIGN 3.2), i.e. what the paper does not cover:

    * Each pool (one global, or one per layer) runs its own ARC with ``c`` = its slots.
    * A hit moves the expert to the most-recent end of T2 (hits of a step in row order).
    * On a miss the paper's cases II-IV run in ``admit``: ``p`` adapts (by ``max(1, |B2|/|B1|)`` or
      ``max(1, |B1|/|B2|)``, ``p`` a real number clamped to ``[0, c]``) and the directory is trimmed
      (case IV.A drops B1's least recent key, or marks the next T1 eviction as leaving no ghost when
      T1 alone fills the cache; case IV.B drops B2's least recent key when the directory holds 2c).
    * REPLACE is the victim: the least recent of T1 when ``|T1| > p`` (or ``|T1| == p`` and the
      miss was a B2 ghost), else of T2, skipping experts the step needs (``protect``); when the
      preferred list has only protected experts the other list gives the victim. An evicted T1
      key becomes the most recent of B1, a T2 key of B2; afterwards the directory is trimmed to
      ``|T1| + |B1| <= c`` and ``|T1| + |T2| + |B1| + |B2| <= 2c`` (least recent ghosts first,
      B2 before B1), which the paper's cases guarantee when nothing is protected.
    * A miss that ends up streamed (no unprotected victim) keeps its adaptation of ``p`` and
      stays where it was in the ghost lists.
    * Warm-started experts enter T1 (the first listed least recent) without touching ``p``.
    * ARC's lists count slots, so it refuses experts of different sizes (``byte_sized``).
    """

    byte_sized = False

    class Config(CacheConfig):
        """ARC: capacity in expert slots or GiB, global or per-layer pools (one ARC per pool)."""

        kind: Literal["arc"] = "arc"

    def __init__(self, config, setup):
        self.arc: dict[int, _ArcState] = {}
        super().__init__(config, setup)

    def _state(self, pool: Pool) -> _ArcState:
        st = self.arc.get(pool.index)
        if st is None:
            st = self.arc[pool.index] = _ArcState(pool.capacity_bytes // self.expert_bytes)
        return st

    def admit(self, pool: Pool, key: int, t: int) -> bool:
        st = self._state(pool)
        c = st.c
        st.drop_next = False
        st.from_b2 = False
        if key in st.b1:
            st.p = min(float(c), st.p + max(1.0, len(st.b2) / len(st.b1)))
            st.pending = (key, True)
        elif key in st.b2:
            st.p = max(0.0, st.p - max(1.0, len(st.b1) / len(st.b2)))
            st.from_b2 = True
            st.pending = (key, True)
        else:
            l1 = len(st.t1) + len(st.b1)
            if l1 >= c:
                if len(st.t1) < c:
                    if st.b1:
                        del st.b1[next(iter(st.b1))]
                else:
                    st.drop_next = True
            elif l1 + len(st.t2) + len(st.b2) >= 2 * c and st.b2:
                del st.b2[next(iter(st.b2))]
            st.pending = (key, False)
        return True

    def _on_hit(self, pool: Pool, key: int, t: int) -> None:
        st = self._state(pool)
        if key in st.t1:
            del st.t1[key]
        else:
            del st.t2[key]
        st.t2[key] = None

    def _on_insert(self, pool: Pool, key: int, t: int) -> None:
        st = self._state(pool)
        to_t2 = st.pending is not None and st.pending[0] == key and st.pending[1]
        st.pending = None
        st.b1.pop(key, None)
        st.b2.pop(key, None)
        (st.t2 if to_t2 else st.t1)[key] = None

    @staticmethod
    def _oldest(lst: dict, protect):
        for key in lst:
            if key not in protect:
                return key
        return None

    def _victim(self, pool: Pool, protect) -> int | None:
        st = self._state(pool)
        n1 = len(st.t1)
        if n1 > 0 and (n1 > st.p or (st.from_b2 and n1 == st.p)):
            first, second = st.t1, st.t2
        else:
            first, second = st.t2, st.t1
        v = self._oldest(first, protect)
        return v if v is not None else self._oldest(second, protect)

    def _on_evict(self, pool: Pool, key: int) -> None:
        st = self._state(pool)
        if key in st.t1:
            del st.t1[key]
            if st.drop_next:
                st.drop_next = False
            else:
                st.b1[key] = None
        else:
            del st.t2[key]
            st.b2[key] = None
        c = st.c
        while len(st.t1) + len(st.b1) > c and st.b1:
            del st.b1[next(iter(st.b1))]
        while len(st.t1) + len(st.t2) + len(st.b1) + len(st.b2) > 2 * c and (st.b1 or st.b2):
            g = st.b2 if st.b2 else st.b1
            del g[next(iter(g))]
