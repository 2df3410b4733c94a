"""Calibration: serial capture, timestep groups, parallel fitting and rounding, precision plan, pipeline."""
