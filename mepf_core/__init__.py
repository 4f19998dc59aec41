"""The maths of DP-MEPF: feature maps, embeddings, privacy formulas, generators and losses.

Pure torch/numpy (plus autodp for accounting); no Prefect, no release files.
"""

__version__ = "0.1.0"
