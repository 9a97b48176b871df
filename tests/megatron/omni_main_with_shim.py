"""The `omni` command with the CPU shim applied first: the test-side entry point that runs the real
CLI on gloo processes without a GPU (``torchrun ... tests/megatron/omni_main_with_shim.py train ...``)."""

import sys
from pathlib import Path

if __name__ == "__main__":  # dist_checkpointing's spawn Manager re-imports __main__
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import shim

    shim.apply()
    from omni.cli import main

    sys.exit(main())
