"""flaxseg.train package."""
