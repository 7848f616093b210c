"""flaxseg.convert package."""
