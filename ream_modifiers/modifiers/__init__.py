"""
The expert-reduction modifiers. Each method lives in its own folder (modifier,
its own math, and a :func:`ream_modifiers.registry.register_method` call in the
folder's ``__init__``); importing a folder registers it. The order below is the
order of ``ream-compress --help`` and of the test matrices.
"""

from .base import ExpertReductionModifier as ExpertReductionModifier
from .base import LayerDecision as LayerDecision
from .merging import ExpertMergingModifier as ExpertMergingModifier
from .reap import REAPModifier as REAPModifier

from .aimer import AIMERModifier as AIMERModifier  # isort: skip
from .ream import REAMModifier as REAMModifier  # isort: skip
from .dern import DERNModifier as DERNModifier  # isort: skip
from .moeits import MoEITSModifier as MoEITSModifier  # isort: skip
from .hcsmoe import HCSMoEModifier as HCSMoEModifier  # isort: skip
from .msmoe import MSMoEModifier as MSMoEModifier  # isort: skip
from .frequency import FrequencyPruningModifier as FrequencyPruningModifier  # isort: skip
from .ean import EANPruningModifier as EANPruningModifier  # isort: skip

# every class imported above (re-exported with `as`)
__all__ = sorted(
    name for name, value in dict(globals()).items() if isinstance(value, type)
)
