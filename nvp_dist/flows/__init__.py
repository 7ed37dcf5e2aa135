"""The paper's Real NVP: single-device, pure PyTorch; no files, ranks or metrics here."""
from nvp_dist.flows.batchnorm import FlowBatchNorm, set_stats_reducer
from nvp_dist.flows.config import CouplingForm, ModelConfig
from nvp_dist.flows.coupling import AffineCoupling, channel_mask, checkerboard_mask
from nvp_dist.flows.preprocess import bits_per_dim, dequantize, from_logit, to_logit
from nvp_dist.flows.realnvp import CouplingBlock, RealNVP, Scale, log_standard_normal
from nvp_dist.flows.squeeze import squeeze, squeeze_ordered, unsqueeze, unsqueeze_ordered

__all__ = [
    "AffineCoupling", "CouplingBlock", "CouplingForm", "FlowBatchNorm", "ModelConfig", "RealNVP", "Scale",
    "bits_per_dim", "channel_mask", "checkerboard_mask", "dequantize", "from_logit", "log_standard_normal",
    "set_stats_reducer", "squeeze", "squeeze_ordered", "to_logit", "unsqueeze", "unsqueeze_ordered",
]
