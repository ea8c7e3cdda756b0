"""The flowers diffusion library: network (unet), diffusion maths (diffusion), sampling (sample),
data and its normalization, checkpoints, training step, metrics, runtime settings, and the
command-line helpers (cli). The scripts at the top level wire them together."""
