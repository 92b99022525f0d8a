"""Old path of :mod:`cores.models.deployed`, kept for code outside the repo; ``cores`` imports the new one."""

from ..models.deployed import (StoredActQuantizer, StoredKVQuantizer, check_deployed_files,  # noqa: F401
                               load_deployed_block)
