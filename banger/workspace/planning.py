"""Workspace planning (pure): what a re-import does to each branch."""

from __future__ import annotations


def classify(host: dict[str, str], guest: dict[str, str], is_ancestor) -> list[dict]:
    """What a re-import does to each host branch. ``is_ancestor(a, b)`` asks the guest repo.

    created: the guest has no such branch; unchanged: same commit; fast_forward: the guest
    branch is behind the host's; guest_ahead: the guest has commits on top of the host's
    (kept as is); diverged: both moved (the import is refused).
    """
    plan = []
    for b, h in sorted(host.items()):
        g = guest.get(b)
        if g is None:
            action = "created"
        elif g == h:
            action = "unchanged"
        elif is_ancestor(g, h):
            action = "fast_forward"
        elif is_ancestor(h, g):
            action = "guest_ahead"
        else:
            action = "diverged"
        plan.append({"branch": b, "host": h, "guest": g, "action": action})
    return plan
