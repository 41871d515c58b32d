"""peft-variator: Variator compression plugins (Xiao et al., EMNLP Findings 2023) as a Hugging Face PEFT method.

`import peft_variator` registers the method with PEFT, so `get_peft_model(model, VariatorConfig(ratio=4))` and the
rest of the PEFT API work unchanged.
"""

from .config import VariatorConfig
from .model import VariatorModel
from .registration import VARIATOR, register

register()

__all__ = ["VARIATOR", "VariatorConfig", "VariatorModel"]
__version__ = "0.1.0"
