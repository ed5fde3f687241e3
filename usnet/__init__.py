"""usnet: universally slimmable networks for PyTorch.

Train one network, run it at any width in a continuous range::

    import torchvision, usnet
    model = usnet.slimmable(torchvision.models.resnet50(), width_range=(0.25, 1.0))
    usnet.set_width(model, 0.6)
    usnet.calibrate(model, train_loader, widths=[0.25, 0.6, 1.0])
    small = usnet.export(model, 0.6)
"""

from . import models
from .calibration import calibrate, is_calibrated, needs_calibration, sample_images
from .channels import (
    ChannelGroup,
    ChannelPlan,
    config_id,
    config_key,
    make_divisible,
    parse_widths,
)
from .checkpoint import load, save
from .convert import ConversionError, analyze, register_op, slimmable
from .cost import Profile, profile
from .deploy import VerificationError, export_artifact, export_widths, load_artifact
from .errors import UsnetError
from .layers import (
    SlimmableBatchNorm2d,
    SlimmableConv2d,
    SlimmableLayer,
    SlimmableLinear,
    UncalibratedWidthError,
    register_slimmable,
)
from .plain import export
from .reorder import reorder_channels
from .search import search_width
from .select import select_width
from .state import channel_plan, channels_at, get_width, is_slimmable, set_width, width
from .switchable import Switchable, SwitchableArtifact, export_switchable

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup",
    "ChannelPlan",
    "ConversionError",
    "Profile",
    "SlimmableBatchNorm2d",
    "SlimmableConv2d",
    "SlimmableLayer",
    "SlimmableLinear",
    "Switchable",
    "SwitchableArtifact",
    "UncalibratedWidthError",
    "UsnetError",
    "VerificationError",
    "analyze",
    "calibrate",
    "channel_plan",
    "channels_at",
    "config_id",
    "config_key",
    "export",
    "export_artifact",
    "export_switchable",
    "export_widths",
    "get_width",
    "is_calibrated",
    "is_slimmable",
    "load",
    "load_artifact",
    "make_divisible",
    "models",
    "needs_calibration",
    "parse_widths",
    "profile",
    "register_op",
    "register_slimmable",
    "reorder_channels",
    "sample_images",
    "save",
    "search_width",
    "select_width",
    "set_width",
    "slimmable",
    "width",
]
