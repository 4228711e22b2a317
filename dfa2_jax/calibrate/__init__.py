"""Calibration of DiTFastAttnV2 plans (per-head RSE measurement and the per-(layer, step) integer program)."""
