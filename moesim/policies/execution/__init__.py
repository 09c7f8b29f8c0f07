"""Execution policies: where each expert (and attention) runs."""
