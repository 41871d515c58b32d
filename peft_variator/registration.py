"""The one place where Variator is made known to PEFT.

PEFT's `register_peft_method` only accepts names that are already members of its `PeftType` str-enum, and the enum
refuses new members through attribute assignment. So Variator adds its member the way `enum` itself builds members,
then calls the public `register_peft_method`. Every assumption about PEFT internals is checked here and fails loudly,
naming the PEFT version, if a release changes it. `register` also installs the model-card hooks of `hub.py`.
"""

from __future__ import annotations

import peft
from peft.utils import PeftType

NAME = "variator"
PREFIX = "variator_"


def _add_peft_type_member(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    for attribute in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(PeftType, attribute):
            raise RuntimeError(
                f"peft-variator cannot register with peft {peft.__version__}: `PeftType.{attribute}` is gone, so the "
                "enum can no longer be extended from outside. Please report this together with your PEFT version."
            )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ only guards names that already are members, so plain `type.__setattr__` is what `enum`
    # itself uses to expose a member as a class attribute.
    type.__setattr__(PeftType, name, member)
    if PeftType(name) is not member or getattr(PeftType, name) is not member or member not in list(PeftType):
        raise RuntimeError(
            f"peft-variator cannot register with peft {peft.__version__}: a new PeftType member is not visible "
            "through the enum's lookups. Please report this together with your PEFT version."
        )
    return member


VARIATOR: PeftType = _add_peft_type_member(NAME.upper())


def register() -> None:
    """Register Variator with PEFT's method registry (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import VariatorConfig
    from .hub import install_model_card_hooks
    from .model import VariatorModel

    if PEFT_TYPE_TO_TUNER_MAPPING.get(VARIATOR) is not VariatorModel:
        register_peft_method(name=NAME, config_cls=VariatorConfig, model_cls=VariatorModel, prefix=PREFIX)
    install_model_card_hooks()
