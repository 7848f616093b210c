"""flaxseg.crf package."""
