# ruff: noqa: F401
from ream_modifiers.observe.collector import (
    BatchRouting,
    ExpertBatch,
    LayerStatsCollector,
)
from ream_modifiers.observe.padding import padding_masks_from_dataloader
from ream_modifiers.observe.statistics import (
    ActivationSamples,
    InputSamples,
    MeanExpertOutput,
    RoutedExpertSums,
    RouterLogitGram,
    Statistic,
)
