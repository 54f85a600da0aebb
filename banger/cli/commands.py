"""The lazy command table: each noun's module is imported only when that noun runs."""

from __future__ import annotations

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "vm": ("banger.cli.vm", "Create, run, stop and manage microVMs."),
    "image": ("banger.cli.image", "Build, pull, register and manage root filesystem images."),
    "kernel": ("banger.cli.kernel", "Pull, import and manage guest kernels."),
    "pool": ("banger.cli.pool", "Warm, inspect and drain the TAP, disk and VM pools."),
    "snapshot": ("banger.cli.snapshot", "Snapshot VMs and manage snapshots."),
    "template": ("banger.cli.template", "Build, list and remove VM templates."),
    "workspace": ("banger.cli.workspace", "Import a git repository into a VM and export changes back."),
    "doctor": ("banger.cli.doctor", "Check the host and say how to fix what is missing."),
    "gc": ("banger.cli.gc", "Remove leaked TAPs, processes, sockets, loop devices and rows."),
    "completion": ("banger.cli.completion_cmd", "Print a shell completion script (bash, zsh, fish)."),
}
