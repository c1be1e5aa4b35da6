"""The generation commands behind sampling.py (FID sample sets) and gen_img.py (grids, editing, traces), and the
model and sampling flags they share; the sampler itself is models/sampler.py."""
