"""Calibration against measured GPU runs: measurements, table extraction (the harness is an open issue)."""
