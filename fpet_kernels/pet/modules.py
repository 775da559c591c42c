"""The old home of the PET modules, kept so that models pickled before the split (whose pickles name
``fpet_kernels.pet.modules.LoRAQKV`` and the others) still load. New code imports from ``fpet_kernels.pet``
(or ``fpet_kernels.layers`` for the 1-bit layers, ``fpet_kernels.patch.modules`` for the merge modules)."""
from ..layers import BINARY_LEVEL, BinaryLinear, binarize, pack_binary, unpack_binary  # noqa: F401
from ..patch.modules import PyraModulation, RefinementAdapter  # noqa: F401
from .adaptformer import AdaptFormerAdapter  # noqa: F401
from .lora import LoRAQKV  # noqa: F401
