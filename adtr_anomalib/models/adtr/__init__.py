"""ADTR: Anomaly Detection Transformer with Feature Reconstruction (You et al., ICONIP 2022).

A frozen ImageNet CNN gives multi-scale features; a transformer encoder-decoder whose decoder starts from
a learnable query embedding reconstructs them; the anomaly map is the L2 norm of the difference.

Paper: https://arxiv.org/abs/2209.01816
"""

from .components.settings import DEFAULT_RECIPE, DEFAULT_STEPS, RECIPES, ADTRSettings
from .components.training import step_budget
from .lightning_model import ADTR
from .torch_model import ADTRModel

__all__ = ["ADTR", "DEFAULT_RECIPE", "DEFAULT_STEPS", "RECIPES", "ADTRModel", "ADTRSettings", "step_budget"]
