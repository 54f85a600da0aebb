"""Templates (snapshots of freshly booted VMs, keyed by content), the clones made from them (the warm
VM pool, banger.vmpool) and forks of running VMs: service.py, clone.py, fork.py, ram.py."""
