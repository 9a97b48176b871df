"""The subcommand groups of the ``omni`` command: one module per group of ``omni.cli.GROUPS``.

Each group module has ``register(subparsers)``; ``tokenizer_{text,image,audio}`` hold the
per-modality commands of the ``tokenizer`` group. Part of the command-line layer (with ``omni.cli``,
``omni.__main__`` and ``omni.demo``): may import any omni module, inside each command's function so
that building the parser stays cheap; nothing below the command line imports it (tests/test_layers.py).
"""
