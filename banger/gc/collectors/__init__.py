"""One collector per resource. Each finds its candidates, then decides about each one under THAT
resource's lock (taken without waiting: a busy resource is skipped and reported), re-reading the row
and handles under the lock, and reaps it (unless dry run). The order matters where one resource
depends on another: VMs are settled first (a resumed guest, a destroyed stale create), the processes
of VMs that are not running go before their TAPs and runtime dirs, staging dirs after the snapshot a
dead command was writing into them is stopped.

Each module exposes ``KEY`` (its report key, or several in ``KEYS``) and ``collect(ctx, rep)``; an
entry ``module:function`` runs that function of a module with several collectors (network).
"""

ORDER = ("network:expired", "vms", "pool", "processes", "taps", "network:rules", "runtime_dirs", "loops",
         "vm_dirs", "staging", "blobs", "snapshots", "ram", "network:names")
