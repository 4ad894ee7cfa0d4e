"""stackops: composable depth-growth operators for JAX/Equinox models and optax states."""

from ._adapters import AbstractLayerAdapter as AbstractLayerAdapter
from ._adapters import register_adapter as register_adapter
from ._apply import grow as grow
from ._apply import plan_for as plan_for
from ._ops import AbstractGrowth as AbstractGrowth
from ._ops import compose as compose
from ._ops import interpolate as interpolate
from ._ops import last_stack as last_stack
from ._ops import layer_map as layer_map
from ._ops import loop_tie as loop_tie
from ._ops import middle_stack as middle_stack
from ._ops import untie as untie
from ._optim import grow_opt_state as grow_opt_state
from ._per_layer import muon_dimension_numbers as muon_dimension_numbers
from ._plan import Keep as Keep
from ._plan import Mix as Mix
from ._plan import Plan as Plan
from ._preserve import check_preserved as check_preserved
from ._schedule import ideal_speedup as ideal_speedup
from ._schedule import prop_schedule as prop_schedule
from ._schedule import schedule_speedup as schedule_speedup
from ._schedule import stage_at as stage_at
from ._schedule import stage_starts as stage_starts
from ._stack import Stack as Stack
from ._stack import stack as stack
from ._stack import unstack as unstack

__version__ = "0.1.0"
from ._freeze import freeze as freeze
from ._freeze import trainable_mask as trainable_mask
from ._mergekit import from_mergekit as from_mergekit
from ._mergekit import to_mergekit as to_mergekit
from ._provenance import provenance as provenance
from ._recipes import gstack as gstack
from ._recipes import llama_pro as llama_pro
from ._recipes import solar as solar
