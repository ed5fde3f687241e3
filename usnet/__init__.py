"""usnet: universally slimmable networks for PyTorch.

Train one network, run it at any width in a continuous range::

    import torchvision, usnet
    model = usnet.slimmable(torchvision.models.resnet50(), width_range=(0.25, 1.0))
    usnet.set_width(model, 0.6)
    usnet.calibrate(model, train_loader, widths=[0.25, 0.6, 1.0])
    small = usnet.export(model, 0.6)
"""

from . import models, plugins  # plugins: loaders of third-party layer plugins (timm)
from .calibration import calibrate, is_calibrated, needs_calibration, sample_images
from .channels import ChannelGroup, ChannelPlan, config_id, config_key, make_divisible, parse_widths
from .checkpoint import load, save
from .convert import ConversionError, analyze, register_op, slimmable
from .deploy.artifact import VerificationError, export_artifact, export_widths
from .deploy.cost import Profile, profile
from .deploy.load import load_artifact
from .deploy.plain import export
from .deploy.search import search_width
from .deploy.select import select_width
from .deploy.switchable import Switchable, SwitchableArtifact, export_switchable
from .errors import UncalibratedWidthError, UsnetError
from .nn.base import SlimmableLayer, register_slimmable
from .nn.conv import SlimmableConv2d
from .nn.linear import SlimmableLinear
from .nn.norm import SlimmableBatchNorm2d
from .state import channel_plan, channels_at, get_width, is_slimmable, set_width, width
from .train.distill import InplaceDistillationLoss, soft_cross_entropy
from .train.recipe import make_optimizer, make_scheduler, param_groups
from .train.reorder import reorder_channels
from .train.samplers import FixedWidths, WidthSampler
from .train.sandwich import SandwichRule, StepResult, sandwich_step, warm_up_widths
from .version import __version__ as __version__

__all__ = [
    "ChannelGroup",
    "ChannelPlan",
    "ConversionError",
    "FixedWidths",
    "InplaceDistillationLoss",
    "Profile",
    "SandwichRule",
    "SlimmableBatchNorm2d",
    "SlimmableConv2d",
    "SlimmableLayer",
    "SlimmableLinear",
    "StepResult",
    "Switchable",
    "SwitchableArtifact",
    "UncalibratedWidthError",
    "UsnetError",
    "VerificationError",
    "WidthSampler",
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
    "make_optimizer",
    "make_scheduler",
    "models",
    "needs_calibration",
    "param_groups",
    "parse_widths",
    "plugins",
    "profile",
    "register_op",
    "register_slimmable",
    "reorder_channels",
    "sample_images",
    "sandwich_step",
    "save",
    "search_width",
    "select_width",
    "set_width",
    "slimmable",
    "soft_cross_entropy",
    "warm_up_widths",
    "width",
]
