"""kcs-lens: knowledge-critical subnetworks for TransformerLens models.

Implements Bayazit et al., "Discovering Knowledge-Critical Subnetworks in Pretrained Language
Models", EMNLP 2024 (arXiv 2310.03084). See docs/ for the user guide.
"""

__version__ = "0.1.0"

from kcs_lens.discovery.config import DiscoveryConfig, build_config
from kcs_lens.discovery.runner import discover
from kcs_lens.errors import KcsLensError
from kcs_lens.masks.mask import WeightMask
from kcs_lens.masks.mask_config import MaskConfig
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.lens import LensModel
from kcs_lens.model.loading import load_model, wrap_model

__all__ = [
    "DiscoveryConfig",
    "KcsLensError",
    "LensModel",
    "MaskConfig",
    "Subnetwork",
    "WeightMask",
    "build_config",
    "discover",
    "load_model",
    "wrap_model",
]
