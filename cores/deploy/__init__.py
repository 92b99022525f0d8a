"""Deploy: FP weights + learned params -> a compressed-tensors serving checkpoint, and its loader."""

from .format import DeployedFormat, quantization_config
from .loader import load_deployed_block
from .run import DeployConfig, DeployResult, deploy, quant_types
from .writer import DeployError

__all__ = ["DeployConfig", "DeployError", "DeployResult", "DeployedFormat", "deploy", "load_deployed_block",
           "quant_types", "quantization_config"]
