"""The DMVAE tokenizer (this project's package, not HuggingFace's `tokenizers`).

``tokenizers.IS_DMVAE_BENCH`` exists so that tests and users can tell the two apart.
"""
IS_DMVAE_BENCH = True

from tokenizers.registry import DECODERS, ENCODERS  # noqa: E402
from tokenizers.models import (Tokenizer, bottleneck_mlp, build_decoder, build_tokenizer, encode_all,  # noqa: E402
                              latent_side)
from tokenizers import flux, vit  # noqa: E402,F401  (register "flux", "vit", "backbone")
from tokenizers.normalization import LatentNorm  # noqa: E402

__all__ = ["ENCODERS", "DECODERS", "Tokenizer", "bottleneck_mlp", "build_decoder", "build_tokenizer", "encode_all",
           "latent_side", "LatentNorm", "IS_DMVAE_BENCH"]
