"""Precision policies: at which precision a missing expert is loaded, or whether it is skipped."""
