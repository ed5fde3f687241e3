"""``usnet serve``: one US-Net behind the Open Inference Protocol, its width chosen per batch from
the load (:mod:`.controller`), over PyTorch or onnxruntime (:mod:`.runners`).

Needs the ``serve`` extra (starlette, uvicorn, prometheus-client): ``pip install usnet[serve]``.
"""

from .controller import LatencyTable, Pending, WidthController
from .runners import ARTIFACT_KINDS, OnnxRunner, Runner, TorchRunner, open_runner

__all__ = [
    "ARTIFACT_KINDS",
    "LatencyTable",
    "OnnxRunner",
    "Pending",
    "Runner",
    "TorchRunner",
    "WidthController",
    "open_runner",
]
