"""Weight import: torchvision ``state_dict`` / safetensors -> flaxseg variables.

Public API (see :mod:`flaxseg.convert.api`, :mod:`flaxseg.convert.tables`
for the mapping tables and :mod:`flaxseg.convert.core` for reading files):

  state_dict = load_state_dict('resnet101.pth')      # or .safetensors
  backbone = import_backbone(state_dict, 'resnet101')
  variables, kwargs = import_model(load_state_dict('dlv3.pth'),
                                   'deeplabv3_resnet101')

The command ``python -m flaxseg.convert`` writes either as a checkpoint for
``config.model.backbone_init`` / ``config.model.init_from``.
"""

from flaxseg.convert.api import backbone_arch
from flaxseg.convert.api import fit_backbone
from flaxseg.convert.api import import_backbone
from flaxseg.convert.api import import_model
from flaxseg.convert.core import ConversionError
from flaxseg.convert.core import convert
from flaxseg.convert.core import load_state_dict
from flaxseg.convert.tables import BACKBONES
from flaxseg.convert.tables import MODELS
