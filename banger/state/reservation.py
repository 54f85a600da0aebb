"""Phase 2 of create: claim a name and a guest IP in one short BEGIN IMMEDIATE transaction.

This is the only global critical section of ``vm create``; it touches nothing
but the database and takes milliseconds.
"""

from __future__ import annotations

import time

from banger.errors import Conflict, HostError
from banger.names import Subnet, generate_name, new_vm_id, validate_name


def reserve_vm(store, subnet: Subnet, *, name: str | None, image: str | None, kernel: str | None,
               backend: str, vcpu: int, memory_mib: int, overlay_size_mib: int, work_disk_size_mib: int,
               nat: bool = False, options: dict | None = None, state: str = "creating",
               check_refs: bool = False, vm_id: str | None = None) -> dict:
    """Insert the VM row. With ``check_refs`` the image and kernel rows must still exist, checked in the
    same transaction, so a concurrent ``image delete``/``kernel rm`` (which checks for users in its own
    BEGIN IMMEDIATE) either sees this VM or makes this reservation fail; never a VM on a deleted kernel.

    ``vm_id``: the id to use. A caller that must hold ``vm/<id>`` before the row becomes visible (so
    no ``vm delete`` or ``gc`` can come between the row and the lock) generates it first with
    ``new_vm_id``, takes the lock, then reserves."""
    if name is not None:
        validate_name(name)
    now = time.time()
    vm_id = vm_id or new_vm_id()
    with store.immediate() as c:
        if name is None:
            for _ in range(50):
                cand = generate_name()
                if c.execute("SELECT 1 FROM vms WHERE name = ?", (cand,)).fetchone() is None:
                    name = cand
                    break
        elif c.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone() is not None:
            raise Conflict(f"a VM named {name!r} already exists",
                           f"pick another --name, or remove it first: banger vm delete {name}")
        if check_refs:
            from banger.errors import NotFound

            if image and c.execute("SELECT 1 FROM images WHERE name = ?", (image,)).fetchone() is None:
                raise NotFound(f"image {image!r} was deleted while this VM was being created", "run the command again")
            if kernel and c.execute("SELECT 1 FROM kernels WHERE name = ?", (kernel,)).fetchone() is None:
                raise NotFound(f"kernel {kernel!r} was removed while this VM was being created",
                               "run the command again")
        used = {r["slot"] for r in c.execute("SELECT slot FROM vms").fetchall()}
        slot = next((s for s in range(subnet.first_slot, subnet.last_slot + 1) if s not in used), None)
        if slot is None:
            raise HostError(f"no free guest address left in {subnet.net}",
                            "delete unused VMs (banger vm prune) or configure a larger subnet")
        row = dict(id=vm_id, name=name, state=state, image=image, kernel=kernel, backend=backend, vcpu=vcpu,
                   memory_mib=memory_mib, overlay_size_mib=overlay_size_mib,
                   work_disk_size_mib=work_disk_size_mib, nat=int(nat), slot=slot, ip=subnet.ip(slot),
                   mac=subnet.mac(slot), error=None, options=store.dumps(options or {}),
                   created_at=now, updated_at=now)
        c.execute(f"INSERT INTO vms ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    return store.get_vm(vm_id)
