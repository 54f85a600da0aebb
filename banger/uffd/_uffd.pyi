"""Type stub for the banger.uffd._uffd C extension (banger/uffd/_uffd.c)."""

from collections.abc import Sequence

PAGE_4K: int
PAGE_2M: int

def probe() -> tuple[bool, str]:
    """Create a userfaultfd and negotiate its API (with EVENT_REMOVE); raises OSError if unavailable."""

def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID ``leaf``/``subleaf`` on this CPU; OSError off x86."""

def tsc_rate_khz(window_us: int = 2000) -> int:
    """The TSC rate in kHz, measured against CLOCK_MONOTONIC_RAW over ``window_us``; OSError off x86."""

class Server:
    """The page-fault serving loop over a userfaultfd handed over by the VMM.

    regions: (base_host_virt_addr, size, memory_file_offset) per region. The fds stay
    owned by the caller and must outlive the Server.
    """

    def __init__(
        self,
        uffd: int,
        mem_fd: int,
        regions: Sequence[tuple[int, int, int]],
        page_size: int,
        *,
        conn_fd: int = -1,
        pid_fd: int = -1,
        record: int = 0,
        batch_pages: int = 256,
        fault_around: int = 16,
        busy_batch_pages: int = 64,
        copy_threads: int = 1,
        copier_batch_pages: int = 32,
    ) -> None: ...
    def run(self) -> str:
        """Serve until 'peer_closed' | 'peer_exited' | 'stopped' (GIL released); OSError on failure."""
    def stop(self) -> None: ...
    def set_plan(self, runs: bytes | bytearray | memoryview, *, copier: bool = False) -> None:
        """Prefetch these native uint64 (first_file_page, npages) pairs in order; replaces any plan.
        ``copier``: the second copy thread helps (a plan the guest waits for, not a background fill)."""
    def set_record(self, on: bool) -> None: ...
    def access_log(self) -> bytes:
        """Native uint32 memory-file page indices in first-touch order."""
    def stats(self) -> dict[str, int]: ...
