"""flaxseg: classic semantic segmentation in JAX/Flax."""
