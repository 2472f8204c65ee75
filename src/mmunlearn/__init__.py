"""mmunlearn: machine unlearning for multimodal LLMs (SIU, MMUnlearner and baselines)."""

__version__ = "0.1.0"

from mmunlearn.torchvision_compat import declare_missing_ops as _declare_missing_ops

# before anything imports transformers, which imports torchvision where it is installed
_declare_missing_ops()
