"""DiffSeg in PyTorch: unsupervised zero-shot segmentation from Stable Diffusion self-attention.

Tian et al., "Diffuse, Attend, and Segment", CVPR 2024. Subpackages: ``aggregate`` (multi-resolution
attention aggregation), ``kl`` (symmetric KL distances), ``merge`` (iterative attention merging and
label maps), ``reference`` (a direct transcription of the official algorithm, for tests and
benchmarks only).
"""

__version__ = "0.1.0"
