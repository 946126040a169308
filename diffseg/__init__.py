"""DiffSeg in PyTorch: unsupervised zero-shot segmentation from Stable Diffusion self-attention.

Tian et al., "Diffuse, Attend, and Segment", CVPR 2024. Subpackages: ``aggregate`` (multi-resolution
attention aggregation), ``kl`` (symmetric KL distances), ``merge`` (iterative attention merging and
label maps), ``reference`` (a direct transcription of the official algorithm, for tests and
benchmarks only).
"""

import logging

__version__ = "0.1.0"


class _NoTorchvisionNotice(logging.Filter):
    """transformers (2026 versions), when diffusers is imported, says that two image processors
    fall back to PIL without torchvision: DiffSeg uses neither, and nothing asks for torchvision."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
