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
