"""peft-variator: Variator compression plugins (Xiao et al., EMNLP Findings 2023) as a Hugging Face PEFT method.

`import peft_variator` registers the method with PEFT, so `get_peft_model(model, VariatorConfig(ratio=4))` and the
rest of the PEFT API work unchanged.
"""

from .config import VariatorConfig
from .model import VariatorModel
from .registration import VARIATOR, register
from .scheduler import RatioScheduler
from .trainer import VariatorTrainer

register()

__all__ = ["VARIATOR", "RatioScheduler", "VariatorConfig", "VariatorModel", "VariatorTrainer"]
__version__ = "0.1.0"
