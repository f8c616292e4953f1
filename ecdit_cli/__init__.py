"""ecdit: scaling studies of Mixture-of-Experts diffusion transformers (EC-DiT, arXiv 2410.02098)."""

__version__ = "0.1.0"
# Bumped when the run-directory layout changes incompatibly; run dirs record it in config.yaml.
RUN_FORMAT_VERSION = 1
