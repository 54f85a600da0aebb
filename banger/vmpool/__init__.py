"""The warm VM pool: paused clones of a template, claimed by `vm create` / `vm run` (service.py)."""
