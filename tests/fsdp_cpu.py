"""``python -m tests.fsdp_cpu train ...``: kmerge's CLI in a process of an FSDP launch on a
machine without GPUs. accelerate sets FSDP up only on accelerator devices (on the CPU it falls
back to plain data parallelism over gloo); torch's FSDP2 itself runs on the CPU, so this
module turns the CPU accelerator into an FSDP one, with the plugin read from the launch's
``FSDP_*`` environment (the accelerate config's fsdp_config)."""

from __future__ import annotations

import sys

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from kmerge import distributed
from kmerge.cli import main


class CpuFsdpAccelerator(Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # What AcceleratorState does on accelerator devices (both states hold the type).
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()


if __name__ == "__main__":
    distributed.Accelerator = CpuFsdpAccelerator
    main(sys.argv[1:])
