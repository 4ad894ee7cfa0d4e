"""Reference models for the experiments, docs and tests (the operators do not depend on them)."""

from ._hf import from_hf as from_hf
from ._hf import to_hf as to_hf
from ._hf import upscale_hf as upscale_hf
from ._transformer import MLP as MLP
from ._transformer import Attention as Attention
from ._transformer import AttentionFn as AttentionFn
from ._transformer import Block as Block
from ._transformer import DecoderLM as DecoderLM
from ._transformer import LMConfig as LMConfig
from ._transformer import Norm as Norm
from ._transformer import causal_attention as causal_attention
from ._transformer import flops_per_token as flops_per_token
from ._transformer import rope_tables as rope_tables
