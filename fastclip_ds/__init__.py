"""fastclip-ds: FastCLIP compositional contrastive training on DeepSpeed."""
