"""fastclip-ds: FastCLIP compositional contrastive training on DeepSpeed."""

import warnings

# DeepSpeed 0.19 calls torch.distributed's deprecated *_tensor collectives; the FutureWarning (once per rank) is
# not for our users to act on. Installed here, once, so every entry point and spawned rank gets it.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    category=FutureWarning,
)
