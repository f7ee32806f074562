"""diffusion: the Coupled Discrete Diffusion (CoDD) output layer for masked diffusion LMs."""
