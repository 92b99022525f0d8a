"""Deploy: FP weights + learned params -> a compressed-tensors serving checkpoint.

The format is :mod:`cores.formats.compressed_tensors`; the runtime loads it with
:mod:`cores.models.deployed` (both re-exported here).
"""

from ..formats.compressed_tensors import DeployedFormat, quantization_config
from ..models.deployed import load_deployed_block
from .run import DeployConfig, DeployResult, deploy, quant_types
from .writer import DeployError

__all__ = ["DeployConfig", "DeployError", "DeployResult", "DeployedFormat", "deploy", "load_deployed_block",
           "quant_types", "quantization_config"]
