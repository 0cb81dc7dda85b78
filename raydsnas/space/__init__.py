"""Search spaces: the ShuffleNetV2 single-path space, its supernet, child networks and cost tables.

`Supernet` is imported lazily, so loading a deployed child never imports the search machinery.
"""

from raydsnas.space.blocks import CHOICE_NAMES, BlockSpec, ChoiceBlock, ConvBN
from raydsnas.space.child import ChildNet
from raydsnas.space.space import CostTable, SearchSpace

__all__ = ["CHOICE_NAMES", "BlockSpec", "ChildNet", "ChoiceBlock", "ConvBN", "CostTable",
           "SearchSpace", "Supernet"]


def __getattr__(name: str):
    if name == "Supernet":
        from raydsnas.space.supernet import Supernet

        return Supernet
    raise AttributeError(f"module 'raydsnas.space' has no attribute {name!r}")
