# ruff: noqa
from .base import ExpertReductionModifier, LayerDecision
from .aimer import *
from .reap import *
