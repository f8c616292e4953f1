"""Evaluating trained runs: sampling, GenEval on the scenes, FD-scenes, where routing spends compute.

- `sample`: Euler integration of the rectified-flow ODE with classifier-free guidance, image grids;
- `geneval`: GenEval's prompt set and scoring rules on the built-in scenes (no model involved);
- `eval_run`: `ecdit eval`, sampling a run's images for the prompt set and writing eval.json;
- `fd_scenes`: a Fréchet distance on a small scene network's features (not FID);
- `allocation`, `allocation_figures`: `ecdit analyze`, the compute-allocation
  analysis of expert choice (EC-DiT Sec. 5) and its figures.
"""
