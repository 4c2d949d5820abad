"""The `iota` console command: one entry point whose subcommands start each role.

This package only composes the role packages (orchestrator, miner, validator) and `common`; it holds no
logic of its own beyond argument parsing.
"""
