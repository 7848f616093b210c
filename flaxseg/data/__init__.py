"""flaxseg.data package."""
