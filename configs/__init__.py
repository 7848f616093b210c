"""Training recipes: one file per paper recipe, ``get_config(arg)`` each.

Run with ``python train.py --config=configs/NAME.py[:VARIANT]``; shared pieces
live in ``configs/common.py`` (train.py's directory, the repository root, is
on ``sys.path``, so recipes import it as ``configs.common``).
"""
