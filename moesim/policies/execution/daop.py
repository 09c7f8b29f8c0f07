"""DAOP: per-sequence CPU/GPU expert placement and predictive pre-calculation on the CPU."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from moesim.policies.execution.base import ExecutionPolicy
from moesim.policies.execution.cpu_options import CpuExecConfig


def swap_plan(counts, on_gpu, candidates: int, ratio: float) -> list:
    """DAOP's swap rule for one layer of one sequence: ``counts[e]`` = tokens the sequence's
    profiled rows sent to expert e, ``on_gpu[e]`` = whether e is in GPU memory. The
    ``candidates`` CPU experts with the most tokens (ties: lower id first) are paired in order
    with the ``candidates`` GPU experts with the fewest tokens (ties: lower id first); a pair is
    swapped when the CPU expert's tokens exceed ``ratio`` x the GPU expert's. Returns
    ``[(cpu expert -> GPU, GPU expert -> CPU)]``."""
    E = len(counts)
    hot = sorted((e for e in range(E) if not on_gpu[e]), key=lambda e: (-counts[e], e))[:candidates]
    cold = sorted((e for e in range(E) if on_gpu[e]), key=lambda e: (counts[e], e))[:candidates]
    return [(h, c) for h, c in zip(hot, cold) if counts[h] > ratio * counts[c]]


class Daop(ExecutionPolicy):
    """DAOP (Zhang, Aggarwal & Mitra, DATE 2025, "DAOP: Data-Aware Offloading and Predictive
    Pre-Calculation for Efficient MoE Inference", arXiv:2501.10375; code: ecolab-nus/DAOP).

    * **Placement**: the GPU holds a per-layer quota of experts, popular ones first (use
      ``cache: {scope: per_layer, warm_start: popular}``); every other expert is computed on the
      CPU from host memory (only activations cross the link), never loaded on demand.
    * **Per-sequence swaps**: the activation counts a sequence produces in its prefill decide,
      per layer, which CPU experts swap places with GPU experts (:func:`swap_plan`: the
      ``swap_candidates`` hottest CPU experts against the coldest GPU experts, swapped when hotter
      by more than ``swap_ratio``). A swap copies the CPU expert's weights to the GPU into the
      cold expert's slot; the cold one is simply dropped (its home copy stays in host memory).
      The placement stays for the rest of the sequence and is where the next sequence starts.
    * **Pre-calculation**: from model layer ``first_predict_layer`` on (the simulated column's block index), the next layer's experts
      are predicted with the current layer's hidden state (the next gate applied early); the
      predicted CPU experts start on the CPU right away, overlapping the rest of this layer and
      the next layer's attention, instead of waiting for the next router.

    What moesim chooses where the paper leaves it open or where replay differs:

    * A fixed-batch replay has no prefill and no sequence boundaries the engine sees: every
      ``sequence_steps`` decode steps form one sequence, whose first ``profile_steps`` steps
      stand in for its prefill (they run with the placement before the swap; the swaps are
      issued at the next step, layer by layer, and the swapped-in expert's first GPU use waits
      for its copy). Counts are tokens per (layer, expert) over those steps.
    * DAOP *uses* its prediction as the routing (graceful degradation). The replayed routing is
      treated as that predicted routing, so at ``precalc_accuracy: 1`` (the paper's behaviour)
      every CPU expert of a predicted layer is pre-calculated. Below 1, each CPU expert is
      predicted with that probability (seeded); a wrong guess costs one expert of CPU work on
      the wrong expert, and the real one is computed after the router as usual (a variant that
      checks the guess). The degradation step that replaces a second CPU expert of a token by
      the best GPU expert changes routing and is left out, as is its effect on accuracy.
    * The pre-calculated work starts when the previous layer's router output is on the host plus
      the activation copy down; that copy is not booked on the copy engine (the same hidden
      state goes down for the previous layer's CPU experts).
    * The CPU experts of a layer run on ``cores // threads_per_expert`` workers (DAOP's thread
      pool has 2 workers); see :mod:`moesim.perf.cpu`.
    """

    uses_cpu = True
    cpu_blocks_host = False
    needs_cpu_scheduler = True

    class Config(CpuExecConfig):
        """Per-sequence swaps and next-layer pre-calculation on the CPU."""

        kind: Literal["daop"] = "daop"
        sequence_steps: int = Field(default=64, ge=1, description="decode steps that form one sequence")
        profile_steps: int = Field(default=8, ge=1, description="first steps of a sequence that stand in for its prefill")
        swap_candidates: int = Field(default=4, ge=1, description="hottest CPU / coldest GPU experts compared (DAOP: 4)")
        swap_ratio: float = Field(default=1.05, gt=0, description="swap when hot tokens > ratio x cold tokens (DAOP: 1.05)")
        first_predict_layer: int = Field(
            default=5, ge=1,
            description="first model layer (block index) whose CPU experts are pre-calculated (DAOP: 5)")
        precalc_accuracy: float = Field(default=1.0, ge=0.0, le=1.0)

        @model_validator(mode="after")
        def _profile_fits(self):
            if self.profile_steps >= self.sequence_steps:
                raise ValueError(
                    f"profile_steps ({self.profile_steps}) must be smaller than sequence_steps ({self.sequence_steps})"
                )
            return self

    def __init__(self, config, setup=None):
        super().__init__(config, setup)
        E = setup.num_experts if setup is not None else 0
        L = setup.num_columns if setup is not None else 0
        self.E = E
        # model layer of each simulated column (they differ when the trace logs a subset of layers)
        self.layer_of = tuple(setup.model_layers) if setup is not None else ()
        self.counts = np.zeros((L, E), dtype=np.int64)
        self.step = -1
        self.rng = np.random.default_rng(np.random.SeedSequence([0, 0xDA0B]))

    def bind_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA0B]))

    def _pos(self) -> int:
        return self.step % self.config.sequence_steps

    def migrations(self, column, is_resident):
        if column == 0:
            self.step += 1
            if self._pos() == 0:
                self.counts[:] = 0  # a new sequence: its own activation pattern
        if self._pos() != self.config.profile_steps:
            return []
        cfg = self.config
        on_gpu = [is_resident(e) for e in range(self.E)]
        return swap_plan(self.counts[column].tolist(), on_gpu, cfg.swap_candidates, cfg.swap_ratio)

    def split(self, column, experts, counts, is_resident):
        if self._pos() < self.config.profile_steps:
            row = self.counts[column]
            for e, n in zip(experts, counts):
                row[e] += n
        return {e for e in experts if not is_resident(e)}

    def precalc(self, column, cpu_set, counts):
        layer = self.layer_of[column] if self.layer_of else column
        if layer < self.config.first_predict_layer or not cpu_set:
            return set(), []
        acc = self.config.precalc_accuracy
        if acc >= 1.0:
            return set(cpu_set), []
        early, wasted = set(), []
        for e in sorted(cpu_set):
            if self.rng.random() < acc:
                early.add(e)
            else:
                wasted.append(counts[e])  # a wrong expert with the same tokens was computed
        return early, wasted

    def report(self, counters):
        return {
            "cpu_gpu_swaps": int(counters.get("cpu_gpu_swaps", 0)),
            "precalc_experts": int(counters.get("precalc_experts", 0)),
            "precalc_wasted": int(counters.get("precalc_wasted", 0)),
        }
