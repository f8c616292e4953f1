"""Default sampler settings, shared by the library (evaluate/) and the commands that expose them.

Kept apart from the sampler itself so that the CLI can show them as option defaults without
importing torch.
"""

DEFAULT_CFG_SCALE = 4.0  # classifier-free guidance scale (1 = none)
DEFAULT_STEPS = 30  # Euler steps from t = 1 (noise) to t = 0 (image)
DEFAULT_SHIFT = 1.0  # SD3 timestep shift; > 1 spends more steps at high noise
# Guidance only at steps with t <= this (a guidance interval, Kynkäänniemi et al. 2024); 1 = every
# step. Guidance at the highest noise levels blanks single-object scenes (docs/quality.md).
DEFAULT_GUIDANCE_MAX_T = 1.0
