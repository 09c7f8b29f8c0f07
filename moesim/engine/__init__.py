"""The simulation engine: SimPy actors and in-order stream timelines; nothing policy-specific.

``moesim.engine.run.simulate`` runs a validated scenario; ``single_gpu`` holds the actors."""
