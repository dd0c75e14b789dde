"""factorllm: turn a pretrained dense decoder LM into a Mixture-of-Experts model by factorizing its FFNs."""

from factorllm.config import FactorConfig
from factorllm.convert import convert_
from factorllm.evaluate import perplexity
from factorllm.export import export
from factorllm.loading import load_model
from factorllm.moe import MoEFeedForward, moe_layers, set_routing_
from factorllm.serialization import load, save
from factorllm.sparsity import SparsityConfig, dense_prefill, densify_, fit_chooser_, sparsify_

__all__ = [
    "FactorConfig",
    "MoEFeedForward",
    "convert_",
    "dense_prefill",
    "densify_",
    "export",
    "fit_chooser_",
    "load",
    "load_model",
    "moe_layers",
    "perplexity",
    "save",
    "set_routing_",
    "sparsify_",
    "SparsityConfig",
]
__version__ = "0.1.0"
