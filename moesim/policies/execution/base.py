"""The execution-policy interface: where each expert of a (step, layer) runs.

``split`` returns the experts that run on the host CPU; the rest go through the GPU path (cache
hit, or load on demand). For CPU experts the engine copies the layer's activations to the host
(device-to-host engine), runs the experts one after another on the CPU with the configured threads
(their time from a measured CPU table or a DRAM-bandwidth roofline), copies the results back
(host-to-device engine, FIFO with expert loads) and makes the next GPU op wait for them. With
``cpu_blocks_host`` the host thread itself computes them (Fiddler's design); otherwise CPU worker
threads do, and the host goes on launching GPU work (kTransformers).
"""

from __future__ import annotations

from moesim.policies.base import Policy


class ExecutionPolicy(Policy):
    """Base of execution policies."""

    family = "execution"
    uses_cpu = False  # the engine skips the CPU path entirely when False
    cpu_blocks_host = False

    def __init__(self, config, setup=None):
        super().__init__(config)
        self.setup = setup

    def bind_costs(self, *, gpu_t, cpu_t, copy_s, act_s) -> None:
        """Told once before the run: expert GPU and CPU times by token count, one weight copy and
        one activation round trip (seconds). Policies that plan with costs keep them."""

    def split(self, column: int, experts: list, counts: list, is_resident) -> set:
        """Experts of ``(step, column)`` to run on the CPU; ``is_resident(e)`` tells whether expert
        ``e`` of this layer is in GPU memory now (the cache is not changed by asking)."""
        return set()

    # ----- optional hooks (DAOP); the defaults do nothing -----------------------------------------
    #: the engine runs CPU experts through moesim.perf.cpu's worker scheduler even with the
    #: aggregate CPU settings (a policy that starts CPU work early needs it)
    needs_cpu_scheduler = False

    def bind_seed(self, seed: int) -> None:
        """Told once before the run: the scenario seed (for policies that draw at random)."""

    def migrations(self, column: int, is_resident) -> list:
        """Asked before :meth:`split` at every ``(step, column)``: ``[(cpu_expert, gpu_expert)]``
        pairs to swap now (the first is copied to the GPU into the second's slot)."""
        return []

    def precalc(self, column: int, cpu_set: set, counts: dict) -> tuple[set, list]:
        """CPU experts of ``(step, column)`` whose work started with the previous layer's hidden
        state (predicted one layer ahead), and the token counts of wrong guesses computed for
        nothing. Default: none."""
        return set(), []

    def report(self, counters: dict) -> dict:
        """Policy-specific figures for summary.json's ``execution`` block."""
        return {}
