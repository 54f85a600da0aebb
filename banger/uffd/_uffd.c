/* banger.uffd._uffd: userfaultfd primitives for banger's lazy snapshot restore.
 *
 * A thin C layer: the hot loop lives here with the GIL released; policy and the
 * handshake stay in Python (banger/uffd/).
 *
 * Server owns one serving loop over a userfaultfd that the VMM handed over:
 *   - UFFD_EVENT_PAGEFAULT -> UFFDIO_COPY of the faulting page from a read-only
 *     MAP_PRIVATE mapping of the memory file (or a zero fill when the page was
 *     removed earlier), EAGAIN -> defer and retry after draining events,
 *     EEXIST -> already there (wake the waiter, move on);
 *   - UFFD_EVENT_REMOVE (and UNMAP) -> the pages in the range read back as zeros afterwards; so
 *     does any page that faults again after it was installed (the kernel zaps a range after its
 *     REMOVE was read: a page served in between is zapped again and must not get file data);
 *   - between faults, a prefetch plan (runs of memory-file pages) is copied in
 *     batches, but the uffd is polled between batches so faults go first;
 *   - with copy_threads=2 a second thread (the copier) claims and copies plan
 *     batches along the same cursors, so both cores copy while the vCPUs wait
 *     (UFFDIO_COPY is CPU-bound: page allocation, copy, PTE install); it starts
 *     with the first plan set with copier=True (the handler: replayed logs);
 *   - the loop ends when the VMM's connection hangs up, its pidfd fires, stop()
 *     is called, or something fails (then run() raises and the caller takes the
 *     VMM down).
 * Page identity is the page index in the memory file (regions map to distinct
 * file ranges), which is also what the access log records.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <x86intrin.h>
#endif

static int open_uffd(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0 || errno != EPERM)
        return fd;
    /* hosts with vm.unprivileged_userfaultfd=0 may still allow /dev/userfaultfd */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -1;
#ifdef USERFAULTFD_IOC_NEW
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
#else
    fd = -1;
    errno = ENOSYS;
#endif
    close(dev);
    return fd;
}

/* probe() -> (ok: bool, detail: str). Creates a uffd and negotiates the API with EVENT_REMOVE. */
static PyObject *py_probe(PyObject *self, PyObject *args)
{
    int fd = open_uffd(O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    int rc = ioctl(fd, UFFDIO_API, &api);
    int saved = errno;
    close(fd);
    if (rc < 0) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    char buf[160];
    snprintf(buf, sizeof buf, "userfaultfd works (api %llu, features 0x%llx, ioctls 0x%llx)",
             (unsigned long long)api.api, (unsigned long long)api.features, (unsigned long long)api.ioctls);
    return Py_BuildValue("(Os)", Py_True, buf);
}

/* touch_order_runs(pages, npages): a page extends the run that ends right before it (whenever
 * that run began), otherwise it starts a new run; runs come out in the order they began. Two
 * vCPUs walking two buffers interleave in the log but come out as two runs. Pages past npages
 * and repeats are dropped. */
static PyObject *py_touch_order_runs(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long npages;
    if (!PyArg_ParseTuple(args, "y*K", &view, &npages))
        return NULL;
    if (view.len % 4 || npages > UINT32_MAX) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pages must be uint32 values and npages below 2**32");
        return NULL;
    }
    size_t n = (size_t)view.len / 4;
    const uint32_t *pages = view.buf;
    uint32_t *tail = calloc(npages ? npages : 1, sizeof *tail); /* run index + 1 of the run ending at page */
    uint8_t *seen = calloc(npages ? npages : 1, 1);
    uint64_t *out = malloc((n ? n : 1) * 2 * sizeof *out);
    if (!tail || !seen || !out) {
        free(tail);
        free(seen);
        free(out);
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    size_t nruns = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t p = pages[i];
        if (p >= npages || seen[p])
            continue;
        seen[p] = 1;
        if (p > 0 && tail[p - 1]) {
            uint32_t r = tail[p - 1];
            tail[p - 1] = 0;
            tail[p] = r;
            out[2 * (r - 1) + 1]++;
        } else {
            out[2 * nruns] = p;
            out[2 * nruns + 1] = 1;
            tail[p] = (uint32_t)++nruns;
        }
    }
    PyBuffer_Release(&view);
    PyObject *b = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)(nruns * 2 * sizeof *out));
    free(tail);
    free(seen);
    free(out);
    return b;
}

/* readahead(mem_fd, plan, page_size, sample=64): a restore from a warm page cache should not pay
 * thousands of fadvise calls, so first look at up to `sample` plan pages spread over the plan
 * (a one-byte RWF_NOWAIT read fails with EAGAIN when the page is not cached). */
static PyObject *py_readahead(PyObject *self, PyObject *args)
{
    int fd, sample = 64;
    Py_buffer view;
    unsigned long long ps;
    if (!PyArg_ParseTuple(args, "iy*K|i", &fd, &view, &ps, &sample))
        return NULL;
    if (view.len % 16 || !ps) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "plan must be uint64 pairs (file_page, npages)");
        return NULL;
    }
    size_t n = (size_t)view.len / 16;
    const uint64_t *plan = view.buf;
    long advised = 0;
    Py_BEGIN_ALLOW_THREADS
    int cold = 0;
    size_t step = n / (sample > 0 ? (size_t)sample : 1);
    for (size_t k = 0; k < n && !cold; k += step ? step : 1) {
        char b;
        struct iovec iov = {.iov_base = &b, .iov_len = 1};
        if (preadv2(fd, &iov, 1, (off_t)(plan[2 * k] * ps), RWF_NOWAIT) < 0)
            cold = errno == EAGAIN || errno == EOPNOTSUPP;
    }
    for (size_t k = 0; cold && k < n; k++) {
        if (posix_fadvise(fd, (off_t)(plan[2 * k] * ps), (off_t)(plan[2 * k + 1] * ps), POSIX_FADV_WILLNEED))
            break;
        advised++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromLong(advised);
}

/* cpuid(leaf, subleaf=0) -> (eax, ebx, ecx, edx), for reading the TSC rate (leaves 0x15, 0x16 and the
 * hypervisor timing leaf 0x40000010; banger.host.hostinfo). OSError(ENOSYS) off x86. */
static PyObject *py_cpuid(PyObject *self, PyObject *args)
{
    unsigned int leaf, sub = 0;
    if (!PyArg_ParseTuple(args, "I|I", &leaf, &sub))
        return NULL;
#if defined(__x86_64__) || defined(__i386__)
    unsigned int a, b, c, d;
    __cpuid_count(leaf, sub, a, b, c, d);
    return Py_BuildValue("(IIII)", a, b, c, d);
#else
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
#endif
}

#if defined(__x86_64__) || defined(__i386__)
/* One (TSC, CLOCK_MONOTONIC_RAW ns) pair: the clock read bracketed by two TSC reads, the tightest
 * bracket of a few tries (a preempted try is wide), its TSC taken at the bracket's middle. */
static void tsc_clock_pair(uint64_t *tsc, uint64_t *ns)
{
    uint64_t best = UINT64_MAX;
    for (int i = 0; i < 16; i++) {
        struct timespec ts;
        _mm_lfence();
        uint64_t a = __rdtsc();
        _mm_lfence();
        clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
        _mm_lfence();
        uint64_t b = __rdtsc();
        if (b >= a && b - a < best) {
            best = b - a;
            *tsc = a + (b - a) / 2;
            *ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        }
    }
}
#endif

/* tsc_rate_khz(window_us=2000) -> int: the TSC's rate measured against CLOCK_MONOTONIC_RAW over a
 * sleep of window_us (each end pinned to within a few dozen ns: ~1e-5 over 2 ms). Releases the GIL.
 * OSError(ENOSYS) off x86. */
static PyObject *py_tsc_rate_khz(PyObject *self, PyObject *args)
{
    unsigned int window_us = 2000;
    if (!PyArg_ParseTuple(args, "|I", &window_us))
        return NULL;
#if defined(__x86_64__) || defined(__i386__)
    uint64_t t0 = 0, n0 = 0, t1 = 0, n1 = 0;
    Py_BEGIN_ALLOW_THREADS
    tsc_clock_pair(&t0, &n0);
    struct timespec d = {.tv_sec = window_us / 1000000, .tv_nsec = (long)(window_us % 1000000) * 1000};
    while (nanosleep(&d, &d) < 0 && errno == EINTR)
        ;
    tsc_clock_pair(&t1, &n1);
    Py_END_ALLOW_THREADS
    if (n1 <= n0 || t1 <= t0) {
        errno = EIO;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* kHz = ticks per ms; (t1 - t0) * 1e6 fits in 64 bits for any window below ~hours at GHz rates */
    return PyLong_FromUnsignedLongLong(((t1 - t0) * 1000000ull + (n1 - n0) / 2) / (n1 - n0));
#else
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
#endif
}

/* ------------------------------------------------------------------------- */
/* Server                                                                     */

/* Page state, one byte per memory-file page. With a copier thread two threads install pages, so
 * every change after start-up is an atomic read-modify-write of the byte (ST/SET_STATE/ST_OR).
 * PG_BUSY: claimed by a thread that is about to copy it (others skip it). */
enum { PG_MISSING = 0, PG_PRESENT = 1, PG_REMOVED = 2, PG_STATE_MASK = 0x03, PG_BUSY = 0x10, PG_HOLE = 0x20,
       PG_PLANNED = 0x40, PG_LOGGED = 0x80 };
#define ST(s, fp) __atomic_load_n(&(s)->state[fp], __ATOMIC_RELAXED)
#define ST_OR(s, fp, v) __atomic_fetch_or(&(s)->state[fp], (uint8_t)(v), __ATOMIC_RELAXED)
#define ST_AND(s, fp, v) __atomic_fetch_and(&(s)->state[fp], (uint8_t)(v), __ATOMIC_RELAXED)
#define IS_MISSING(s, fp) ((ST(s, fp) & PG_STATE_MASK) == PG_MISSING)
#define IS_FREE(s, fp) ((ST(s, fp) & (PG_STATE_MASK | PG_BUSY)) == PG_MISSING) /* missing, unclaimed */
#define NSTREAMS 8

enum { END_PEER_CLOSED = 1, END_PEER_EXITED = 2, END_STOPPED = 3, END_ERROR = -1 };

typedef struct {
    uint64_t base, size, file_off;
} region_t;

/* pages [fp, fp + n) claimed (PG_BUSY) by one thread for one copy; hot: along a fault's cursor */
typedef struct {
    uint64_t fp, n;
    int hot, valid;
    uint64_t enoent_ns; /* when its copy first found no registered VMA there (0: it did not) */
} claim_t;

/* How long a prefetch copy may keep finding no registered VMA before that is the VMM's fault: an
 * munmap makes the copy fail with ENOENT before its UNMAP event is read (the kernel checks the VMA
 * before the pending-event flag), and the read marks the range so the copy skips it. */
#define ENOENT_GRACE_NS 200000000ull

/* Counters are written by the serving thread and read by anyone: relaxed atomics. */
enum {
    ST_FAULTS,          /* UFFD_EVENT_PAGEFAULT messages read */
    ST_FAULT_PAGES,     /* pages installed from the memory file because of a fault */
    ST_ZERO_PAGES,      /* pages zero-filled because they were removed earlier */
    ST_PREFETCH_PAGES,  /* pages installed by the prefetch plan */
    ST_PREFETCH_BATCHES,/* UFFDIO_COPY calls made by the prefetch plan */
    ST_PREFETCH_SKIPPED,/* plan pages already present or removed when the plan got there */
    ST_REMOVES,         /* UFFD_EVENT_REMOVE messages */
    ST_REMOVED_PAGES,   /* pages covered by those events */
    ST_EAGAIN,          /* UFFDIO_COPY/ZEROPAGE calls that returned EAGAIN */
    ST_EAGAIN_RETRIES,  /* retries of deferred faults */
    ST_EEXIST,          /* copies that found the page already there */
    ST_WAKES,           /* UFFDIO_WAKE calls for such faults */
    ST_RECORDED,        /* first-touch pages appended to the access log */
    ST_SERVICE_NS,      /* total time from reading a fault to its page being installed */
    ST_SERVICE_MAX_NS,
    ST_PREFETCH_NS,     /* time spent inside prefetch copies */
    ST_FIRST_FAULT_NS,  /* CLOCK_MONOTONIC timestamps (0 = never) */
    ST_LAST_FAULT_NS,
    ST_PLAN_DONE_NS,
    ST_UNKNOWN_EVENTS,
    ST_HOT_PAGES,       /* prefetch pages copied along the plan from where the guest faulted */
    ST_HOLE_PAGES,      /* pages in holes of a sparse memory file, installed as zero pages */
    ST_STREAMS,         /* cursors started at a fault inside the plan */
    ST_SERVE_CPU_NS,    /* CPU time of the serving thread (user + system), at the end of run() */
    ST_COPIER_PAGES,    /* prefetch pages installed by the copier thread */
    ST_COPIER_BATCHES,  /* its copies */
    ST_EV_WAIT_NS,      /* time the serving thread waited for the copier before reading an event */
    ST_COPIER_CPU_NS,   /* CPU time of the copier thread */
    ST_REFAULTS,        /* faults on pages installed before (the guest discarded them since): zeros */
    ST_UNMAPS,          /* UFFD_EVENT_UNMAP messages (ranges then read as zeros) */
    ST_COUNT
};

static const char *stat_names[ST_COUNT] = {
    "faults", "fault_pages", "zero_pages", "prefetch_pages", "prefetch_batches", "prefetch_skipped",
    "removes", "removed_pages", "eagain", "eagain_retries", "eexist", "wakes", "recorded",
    "service_ns", "service_max_ns", "prefetch_ns", "first_fault_ns", "last_fault_ns", "plan_done_ns",
    "unknown_events", "hot_pages", "hole_pages", "streams", "serve_cpu_ns",
    "copier_pages", "copier_batches", "ev_wait_ns", "copier_cpu_ns", "refaults", "unmaps",
};

typedef struct {
    PyObject_HEAD
    int uffd, conn_fd, pid_fd, wake_fd;
    uint64_t page_size;
    unsigned page_shift;
    region_t *regions; /* sorted by base */
    int nregions;
    region_t *by_file; /* the same, sorted by file offset */
    const char *map;   /* read-only mapping of the memory file */
    uint64_t map_len;
    uint8_t *state;    /* one byte per memory-file page */
    uint64_t npages;
    void *zero_buf;    /* page_size of zeros, for 2M zero fills */
    uint64_t batch_pages;
    uint64_t fault_around; /* planned pages copied along with a faulting one */
    uint64_t busy_batch_pages; /* batch size while faults are arriving */
    int no_populate;

    /* prefetch plan: pairs (file_page, npages), in the order the guest is expected to touch them */
    uint64_t *plan;
    size_t plan_len;
    uint64_t *by_start; /* pairs (first page, run index) sorted by first page: the run holding a page */
    /* Cursors along the plan: [0] is the background pass from the start; the others begin where
     * the guest faulted inside the plan and follow the plan order from there (the guest will touch
     * those pages next). The newest goes first; a cursor ends at the end of the plan. */
    struct {
        size_t pos;   /* run index */
        uint64_t cur; /* next page within that run */
    } cur[NSTREAMS];
    int ncur;          /* under cur_lock (read without it only as a hint) */
    claim_t claim;     /* the serving thread's current claim */

    /* A second copy thread (copy_threads == 2) pulls prefetch batches from the same cursors, so
     * both cores copy while the vCPUs wait. Locks (never held together except in
     * take_pending_plan, in this order): ev_lock, then cur_lock.
     *  - cur_lock: plan, by_start, cursors, claims (PG_BUSY);
     *  - ev_lock: the serving thread holds it while it reads an event and marks a REMOVE, the
     *    copier while it checks and copies a batch. Otherwise the copier could check a page,
     *    the serving thread read a REMOVE of it (the guest then zaps the range and goes on)
     *    and the copier install stale file data where the guest must read zeros. */
    int copy_threads;
    uint64_t copier_batch_pages;
    pthread_mutex_t cur_lock, ev_lock;
    pthread_cond_t cur_cond; /* cursors changed, or the copier must stop */
    pthread_t copier;
    int copier_started;
    int copier_stop;  /* atomic */
    int ev_want;      /* atomic: the serving thread waits for ev_lock (the copier yields) */
    int copier_err;   /* atomic: the copier failed (copier_msg, copier_errno) */
    int copier_errno;
    char copier_msg[256];

    /* deferred faults (page-aligned addresses) */
    uint64_t *deferred;
    size_t ndef, capdef;

    /* shared with other threads, under lock */
    pthread_mutex_t lock;
    uint32_t *log;
    size_t log_len, log_cap;
    uint64_t *pending_plan;
    size_t pending_len;
    int pending_set, pending_copier;
    int plan_copier; /* the copier helps with the current plan (under cur_lock) */

    int unmap_events; /* atomic: ENOENT was seen or an UNMAP read: a fault's ENOENT may be an unread UNMAP */
    int record;  /* atomic */
    int stop;    /* atomic */
    int running; /* atomic */
    uint64_t st[ST_COUNT];

    char err[256];
    int err_errno;
} Server;

/* set the state bits (and drop a claim) of page fp, keeping its other flags */
static inline void SET_STATE(Server *s, uint64_t fp, uint8_t v)
{
    uint8_t old = __atomic_load_n(&s->state[fp], __ATOMIC_RELAXED), nw;
    do
        nw = (uint8_t)((old & ~(PG_STATE_MASK | PG_BUSY)) | v);
    while (!__atomic_compare_exchange_n(&s->state[fp], &old, nw, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
}

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define ADD(s, i, n) __atomic_fetch_add(&(s)->st[i], (n), __ATOMIC_RELAXED)

static void wake(Server *s);
static void start_copier(Server *s);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int fail(Server *s, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static __thread int tl_copier; /* set in the copier thread: fail() writes its own message */

static int fail(Server *s, int err, const char *fmt, ...)
{
    int copier = tl_copier;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(copier ? s->copier_msg : s->err, sizeof s->err, fmt, ap);
    va_end(ap);
    if (copier)
        s->copier_errno = err;
    else
        s->err_errno = err;
    return END_ERROR;
}

static const region_t *region_of_addr(const Server *s, uint64_t addr)
{
    int lo = 0, hi = s->nregions - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const region_t *r = &s->regions[mid];
        if (addr < r->base)
            hi = mid - 1;
        else if (addr - r->base >= r->size)
            lo = mid + 1;
        else
            return r;
    }
    return NULL;
}

/* The region holding memory-file page fp, or NULL when no region maps that page. */
static const region_t *region_of_page(const Server *s, uint64_t fp)
{
    uint64_t off = fp << s->page_shift;
    int lo = 0, hi = s->nregions - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const region_t *r = &s->by_file[mid];
        if (off < r->file_off)
            hi = mid - 1;
        else if (off - r->file_off >= r->size)
            lo = mid + 1;
        else
            return r;
    }
    return NULL;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

/* Map the source pages into our page tables before UFFDIO_COPY reads them. Otherwise the
 * kernel's atomic copy faults, drops its locks and retries through a temporary page; for
 * hugetlb that temporary page is a spare huge page the host may not have (ENOMEM).
 * Best effort: kernels before 5.14 lack MADV_POPULATE_READ, and a failure here resurfaces
 * as the copy's own error. */
static void populate_src(Server *s, uint64_t off, uint64_t len)
{
    if (LOAD(s->no_populate))
        return;
    if (madvise((void *)(s->map + off), len, MADV_POPULATE_READ) < 0 && errno == EINVAL)
        STORE(s->no_populate, 1);
}

/* UFFDIO_COPY/ZEROPAGE said ENOENT: no VMA registered with this userfaultfd covers [dst, +len).
 * (A VMM whose memory is gone gives ESRCH.) If the VMM has exited or hung up meanwhile, that is
 * the reason (2). A VMM still there announced a region in the handshake that it never registered
 * (or unregistered it): its faults there would never reach us and it would read zeros where its
 * memory should be. That is a fatal handshake error (END_ERROR with errno ENOENT; the caller kills
 * the VMM). */
static int unregistered(Server *s, uint64_t dst, uint64_t len, const char *who)
{
    struct pollfd p[2] = {{.fd = s->pid_fd, .events = POLLIN}, {.fd = s->conn_fd, .events = POLLIN | POLLRDHUP}};
    if (s->pid_fd < 0 && s->conn_fd < 0)
        return 2; /* nothing to tell by: assume it went away */
    uint64_t deadline = now_ns() + 100000000ull; /* a VMM in the middle of exiting: let it finish */
    for (;;) {
        int n = poll(p, 2, 10);
        if (n > 0) {
            if (p[0].revents)
                return 2;
            if (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL))
                return 2;
            p[1].events = POLLRDHUP; /* data on the connection is not a hang-up: stop polling for it */
        }
        if (now_ns() >= deadline)
            break;
    }
    return fail(s, ENOENT, "%s could not install guest memory at 0x%llx (+%llu bytes): the VMM announced it in "
                "the handshake but it is not registered with the userfaultfd it sent", who,
                (unsigned long long)dst, (unsigned long long)len);
}

/* 0 = done, 1 = EAGAIN (try later), 2 = the VMM's memory is gone, END_ERROR = failure.
 * *fp_out gets the faulting memory-file page, *done_out the pages installed from it on. */
static int serve_page(Server *s, uint64_t addr, uint64_t t_read, int retry, uint64_t *fp_out, uint64_t *done_out)
{
    const region_t *r = region_of_addr(s, addr);
    if (!r)
        return fail(s, EFAULT, "page fault at 0x%llx outside every registered region", (unsigned long long)addr);
    uint64_t off = r->file_off + (addr - r->base);
    uint64_t fp = off >> s->page_shift;
    uint64_t rend = (r->file_off + r->size) >> s->page_shift, extra = 0;
    uint8_t st = ST(s, fp);
    *fp_out = fp;
    *done_out = 0;
    /* Only a page never installed gets the file's bytes. A removed one reads as zeros, and so does
     * one installed before: the guest can only have lost it to a discard (MADV_DONTNEED/FREE/REMOVE)
     * whose REMOVE we read, because the kernel zaps a range after its REMOVE was read. A page served
     * in between (a fault deferred by that REMOVE and retried, or a new touch) says "present", the
     * zap takes it away again, and its next fault lands here: zeros, never the stale file data.
     * A page that really is there (two vCPUs faulted on it) answers EEXIST and nothing changes. */
    int refault = (st & PG_STATE_MASK) == PG_PRESENT;
    int zero = (st & PG_STATE_MASK) != PG_MISSING;
    int hole = !zero && (st & PG_HOLE); /* only ever set for 4 KiB pages */
    int rec = LOAD(s->record);

    /* record 1: every first touch; record 2: only pages the plan lacks (refreshing a replayed log) */
    if (!zero && !retry && rec && !(st & PG_LOGGED) && (rec == 1 || !(st & PG_PLANNED))) {
        pthread_mutex_lock(&s->lock);
        if (s->log_len == s->log_cap) {
            size_t cap = s->log_cap ? s->log_cap * 2 : 4096;
            uint32_t *n = realloc(s->log, cap * sizeof *n);
            if (!n) {
                pthread_mutex_unlock(&s->lock);
                return fail(s, ENOMEM, "out of memory growing the access log");
            }
            s->log = n;
            s->log_cap = cap;
        }
        s->log[s->log_len++] = (uint32_t)fp;
        pthread_mutex_unlock(&s->lock);
        ST_OR(s, fp, PG_LOGGED);
        ADD(s, ST_RECORDED, 1);
    }

    int rc;
    long long result;
    /* Fault-around along the plan: the planned, missing pages right after this one (of the same
     * kind: file data or hole) go in the same call (the guest is walking into them; a separate
     * batch would race its next fault). The faulting page is first, so any progress at all
     * serves the fault. */
    if (!zero) {
        uint8_t want = PG_PLANNED | (st & PG_HOLE);
        while (extra < s->fault_around && fp + 1 + extra < rend &&
               (ST(s, fp + 1 + extra) & (PG_PLANNED | PG_STATE_MASK | PG_HOLE | PG_BUSY)) == want)
            extra++;
    }
    if ((zero || hole) && s->page_size == 4096) {
        struct uffdio_zeropage z = {.range = {.start = addr, .len = (1 + extra) << s->page_shift}, .mode = 0};
        rc = ioctl(s->uffd, UFFDIO_ZEROPAGE, &z);
        result = z.zeropage;
    } else {
        if (!zero && (s->page_size != 4096 || extra))
            populate_src(s, off, (1 + extra) << s->page_shift);
        struct uffdio_copy c = {
            .dst = addr,
            .src = zero ? (uint64_t)(uintptr_t)s->zero_buf : (uint64_t)(uintptr_t)(s->map + off),
            .len = (1 + extra) << s->page_shift,
            .mode = 0,
        };
        rc = ioctl(s->uffd, UFFDIO_COPY, &c);
        result = c.copy;
    }
    if (rc == 0 || result >= (long long)s->page_size) {
        uint64_t done = rc == 0 ? 1 + extra : (uint64_t)result >> s->page_shift;
        for (uint64_t k = 0; k < done; k++)
            SET_STATE(s, fp + k, PG_PRESENT);
        *done_out = done;
        ADD(s, zero ? ST_ZERO_PAGES : ST_FAULT_PAGES, 1);
        if (refault)
            ADD(s, ST_REFAULTS, 1);
        if (hole)
            ADD(s, ST_HOLE_PAGES, done);
        if (done > 1) {
            ADD(s, ST_PREFETCH_PAGES, done - 1);
            ADD(s, ST_HOT_PAGES, done - 1);
        }
    } else {
        int e = errno;
        if (e == EAGAIN) {
            ADD(s, ST_EAGAIN, 1);
            return 1;
        }
        if (e == EEXIST) {
            /* already populated (another fault on the same page, or a prefetch got there first) */
            SET_STATE(s, fp, PG_PRESENT);
            *done_out = 1;
            ADD(s, ST_EEXIST, 1);
            struct uffdio_range w = {.start = addr, .len = s->page_size};
            if (ioctl(s->uffd, UFFDIO_WAKE, &w) == 0)
                ADD(s, ST_WAKES, 1);
        } else if (e == ESRCH) {
            return 2;
        } else if (e == ENOENT && (ST(s, fp) & PG_STATE_MASK) == PG_REMOVED && LOAD(s->st[ST_UNMAPS])) {
            /* unmapped (UFFD_EVENT_UNMAP read) since the guest faulted: nothing to install; wake the
             * thread so it retries (on whatever is mapped there now) */
            struct uffdio_range w = {.start = addr, .len = s->page_size};
            if (ioctl(s->uffd, UFFDIO_WAKE, &w) == 0)
                ADD(s, ST_WAKES, 1);
        } else if (e == ENOENT && LOAD(s->unmap_events)) {
            ADD(s, ST_EAGAIN, 1);
            return 1; /* maybe an UNMAP not read yet: retried after the events */
        } else if (e == ENOENT) {
            return unregistered(s, addr, (1 + extra) << s->page_shift, "a fault");
        } else {
            return fail(s, e, "%s of page 0x%llx (file offset %llu) failed: %s",
                        zero ? "zero fill" : "UFFDIO_COPY", (unsigned long long)addr,
                        (unsigned long long)off, strerror(e));
        }
    }
    uint64_t t = now_ns(), d = t - t_read;
    ADD(s, ST_SERVICE_NS, d);
    if (d > LOAD(s->st[ST_SERVICE_MAX_NS]))
        STORE(s->st[ST_SERVICE_MAX_NS], d);
    return 0;
}

static int defer(Server *s, uint64_t addr)
{
    for (size_t i = 0; i < s->ndef; i++)
        if (s->deferred[i] == addr)
            return 0;
    if (s->ndef == s->capdef) {
        size_t cap = s->capdef ? s->capdef * 2 : 64;
        uint64_t *n = realloc(s->deferred, cap * sizeof *n);
        if (!n)
            return fail(s, ENOMEM, "out of memory deferring a fault");
        s->deferred = n;
        s->capdef = cap;
    }
    s->deferred[s->ndef++] = addr;
    return 0;
}

static void mark_removed(Server *s, uint64_t start, uint64_t end)
{
    uint64_t mask = s->page_size - 1;
    for (int i = 0; i < s->nregions; i++) {
        const region_t *r = &s->regions[i];
        uint64_t a = start > r->base ? start : r->base;
        uint64_t b = end < r->base + r->size ? end : r->base + r->size;
        if (a >= b)
            continue;
        a &= ~mask;                /* a partly removed huge page is zapped whole */
        b = (b + mask) & ~mask;
        uint64_t fp0 = (r->file_off + (a - r->base)) >> s->page_shift;
        uint64_t n = (b - a) >> s->page_shift;
        for (uint64_t k = 0; k < n; k++)
            SET_STATE(s, fp0 + k, PG_REMOVED);
        ADD(s, ST_REMOVED_PAGES, n);
    }
}

/* The plan run holding memory-file page fp, or -1. */
static long run_of(const Server *s, uint64_t fp)
{
    if (!s->by_start || !(ST(s, fp) & PG_PLANNED))
        return -1;
    size_t lo = 0, hi = s->plan_len; /* first entry starting after fp */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (s->by_start[2 * mid] <= fp)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (!lo)
        return -1;
    size_t r = (size_t)s->by_start[2 * (lo - 1) + 1];
    return fp < s->plan[2 * r] + s->plan[2 * r + 1] ? (long)r : -1;
}

static void drop_cursor(Server *s, int k)
{
    memmove(&s->cur[k], &s->cur[k + 1], (size_t)(s->ncur - k - 1) * sizeof s->cur[0]);
    STORE(s->ncur, s->ncur - 1); /* written under cur_lock, read as a hint without it */
}

/* The guest faulted at planned page fp and pages up to next are in: it will touch what the plan
 * holds after that next, so start a cursor there (the newest goes first). */
static void note_fault_locked(Server *s, uint64_t fp, uint64_t next)
{
    if (!s->ncur) /* no plan, or all of it is done */
        return;
    long r = run_of(s, fp);
    if (r < 0)
        return;
    for (int k = s->ncur - 1; k >= 1; k--)
        if (s->cur[k].pos == (size_t)r)
            drop_cursor(s, k);
    if (s->ncur == NSTREAMS)
        drop_cursor(s, 1); /* the oldest fault cursor; [0] covers its pages later */
    s->cur[s->ncur].pos = (size_t)r;
    s->cur[s->ncur].cur = next;
    STORE(s->ncur, s->ncur + 1);
    ADD(s, ST_STREAMS, 1);
}

static void note_fault(Server *s, uint64_t fp, uint64_t next)
{
    if (!LOAD(s->ncur))
        return;
    pthread_mutex_lock(&s->cur_lock);
    note_fault_locked(s, fp, next);
    pthread_mutex_unlock(&s->cur_lock);
    if (s->copier_started)
        pthread_cond_signal(&s->cur_cond); /* new work where the guest is */
}

/* The serving thread reads events only while the copier is not between checking and copying a
 * batch (see ev_lock). The copier yields while ev_want is set. */
static void ev_lock(Server *s)
{
    if (!s->copier_started)
        return;
    if (pthread_mutex_trylock(&s->ev_lock) == 0)
        return;
    uint64_t t = now_ns();
    STORE(s->ev_want, 1);
    pthread_mutex_lock(&s->ev_lock);
    STORE(s->ev_want, 0);
    ADD(s, ST_EV_WAIT_NS, now_ns() - t);
}

static void ev_unlock(Server *s)
{
    if (s->copier_started)
        pthread_mutex_unlock(&s->ev_lock);
}

/* Under ev_lock (with the copier), right after read(): the events that change what a page must read
 * as. REMOVE (MADV_DONTNEED/FREE/REMOVE) and UNMAP (munmap): the range reads as zeros from now on (an
 * unmapped range mapped and registered again is fresh anonymous memory: zeros too); marked before the
 * copier checks another page, so no copy lands after the kernel's zap. Returns 0, or END_ERROR for a
 * REMAP: the VMM moved guest memory (mremap) and the regions no longer say where it is. */
static int mark_event_locked(Server *s, const struct uffd_msg *m)
{
    switch (m->event) {
    case UFFD_EVENT_REMOVE:
        ADD(s, ST_REMOVES, 1);
        mark_removed(s, m->arg.remove.start, m->arg.remove.end);
        return 0;
#ifdef UFFD_EVENT_UNMAP
    case UFFD_EVENT_UNMAP:
        ADD(s, ST_UNMAPS, 1);
        STORE(s->unmap_events, 1);
        mark_removed(s, m->arg.remove.start, m->arg.remove.end);
        return 0;
#endif
#ifdef UFFD_EVENT_REMAP
    case UFFD_EVENT_REMAP:
        return fail(s, EINVAL, "the VMM moved guest memory (mremap of 0x%llx, %llu bytes, to 0x%llx): the "
                    "regions of the handshake no longer say where it is",
                    (unsigned long long)m->arg.remap.from, (unsigned long long)m->arg.remap.len,
                    (unsigned long long)m->arg.remap.to);
#endif
    default:
        return 0;
    }
}

/* Read events until EAGAIN (or max_faults page faults: *more = 1). Without the copier: one 32-byte
 * record per read(), each fault served before the next read, so an unread REMOVE stays queued behind
 * the faults (the kernel hands out faults first) exactly as it would for a slower reader. With the
 * copier: up to READ_BATCH records per read(), under one ev_lock (a REMOVE among them is marked before
 * the copier checks another page), then the faults are served; a fault read with a REMOVE of its page
 * is served after it (zeros): its access and the discard were concurrent. Returns 0, 2 (VMM gone) or
 * END_ERROR. */
#define READ_BATCH 32
static int drain(Server *s, int max_faults, int *more)
{
    *more = 0;
    struct uffd_msg msgs[READ_BATCH];
    for (int faults = 0;;) {
        if (faults >= max_faults && !s->ndef) { /* a deferred fault waits for the events: read them all */
            *more = 1; /* leave the rest for after a prefetch batch */
            return 0;
        }
        size_t want = s->copier_started ? READ_BATCH : 1;
        ssize_t n;
        int e = 0, bad = 0;
        ev_lock(s);
        do
            n = read(s->uffd, msgs, want * sizeof msgs[0]);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            e = errno;
        size_t got = n > 0 ? (size_t)n / sizeof msgs[0] : 0;
        for (size_t i = 0; i < got; i++)
            if (mark_event_locked(s, &msgs[i]) < 0)
                bad = 1;
        ev_unlock(s);
        if (bad)
            return END_ERROR;
        if (n < 0) {
            if (e == EAGAIN)
                return 0;
            return fail(s, e, "reading the userfaultfd failed: %s", strerror(e));
        }
        if (n == 0 || n % sizeof msgs[0])
            return fail(s, EIO, "short read from the userfaultfd (%zd bytes)", n);
        uint64_t t = now_ns();
        for (size_t i = 0; i < got; i++) {
            const struct uffd_msg *msg = &msgs[i];
            if (msg->event == UFFD_EVENT_PAGEFAULT) {
                faults++;
                ADD(s, ST_FAULTS, 1);
                if (!LOAD(s->st[ST_FIRST_FAULT_NS]))
                    STORE(s->st[ST_FIRST_FAULT_NS], t);
                STORE(s->st[ST_LAST_FAULT_NS], t);
                uint64_t addr = msg->arg.pagefault.address & ~(s->page_size - 1);
                uint64_t fp, done;
                int rc = serve_page(s, addr, t, 0, &fp, &done);
                if (rc == 1) {
                    if (defer(s, addr) < 0)
                        return END_ERROR;
                } else if (rc != 0) {
                    return rc;
                } else if (done) {
                    note_fault(s, fp, fp + done);
                }
            } else if (msg->event == UFFD_EVENT_REMOVE) {
                /* marked above, under ev_lock */
#ifdef UFFD_EVENT_UNMAP
            } else if (msg->event == UFFD_EVENT_UNMAP) {
                /* marked above */
#endif
#ifdef UFFD_EVENT_FORK
            } else if (msg->event == UFFD_EVENT_FORK) {
                /* the VMM forked with the uffd: we do not serve the child; its uffd was installed here */
                close((int)msg->arg.fork.ufd);
                ADD(s, ST_UNKNOWN_EVENTS, 1);
#endif
            } else {
                ADD(s, ST_UNKNOWN_EVENTS, 1);
            }
        }
    }
}

static int retry_deferred(Server *s)
{
    size_t keep = 0;
    for (size_t i = 0; i < s->ndef; i++) {
        uint64_t addr = s->deferred[i];
        ADD(s, ST_EAGAIN_RETRIES, 1);
        uint64_t fp, done;
        int rc = serve_page(s, addr, now_ns(), 1, &fp, &done);
        if (rc == 1)
            s->deferred[keep++] = addr;
        else if (rc != 0) {
            s->ndef = 0;
            return rc;
        }
    }
    s->ndef = keep;
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* A new plan (set_plan) replaces the old one. The copier is held off meanwhile (both locks), so
 * the state bytes can be rewritten without atomics. */
static void take_pending_plan(Server *s)
{
    pthread_mutex_lock(&s->lock);
    int set = s->pending_set;
    pthread_mutex_unlock(&s->lock);
    if (!set)
        return;
    if (s->copier_started) {
        pthread_mutex_lock(&s->ev_lock);
        pthread_mutex_lock(&s->cur_lock);
    }
    pthread_mutex_lock(&s->lock);
    if (s->pending_set) {
        free(s->plan);
        free(s->by_start);
        s->plan = s->pending_plan;
        s->plan_len = s->pending_len;
        s->plan_copier = s->pending_copier;
        s->pending_plan = NULL;
        s->pending_len = 0;
        s->pending_set = 0;
        STORE(s->ncur, s->plan_len > 0);
        s->cur[0].pos = 0;
        s->cur[0].cur = s->plan_len ? s->plan[0] : 0;
        STORE(s->st[ST_PLAN_DONE_NS], 0);
        for (uint64_t i = 0; i < s->npages; i++)
            s->state[i] &= (uint8_t)~PG_PLANNED;
        for (size_t k = 0; k < s->plan_len; k++) {
            uint64_t a = s->plan[2 * k], n = s->plan[2 * k + 1];
            for (uint64_t i = a; i < a + n && i < s->npages; i++)
                s->state[i] |= PG_PLANNED;
        }
        /* without this index (out of memory) faults just start no cursors */
        s->by_start = s->plan_len ? malloc(s->plan_len * 2 * sizeof(uint64_t)) : NULL;
        if (s->by_start) {
            for (size_t k = 0; k < s->plan_len; k++) {
                s->by_start[2 * k] = s->plan[2 * k];
                s->by_start[2 * k + 1] = k;
            }
            qsort(s->by_start, s->plan_len, 2 * sizeof(uint64_t), cmp_u64);
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (s->copier_started) {
        pthread_cond_broadcast(&s->cur_cond);
        pthread_mutex_unlock(&s->cur_lock);
        pthread_mutex_unlock(&s->ev_lock);
    } else if (s->plan_copier && s->copy_threads > 1) {
        start_copier(s); /* with the first plan it helps with: other modes keep one thread, no ev_lock */
    }
}

/* Under cur_lock: claim up to max contiguous free pages (missing, unclaimed, of one kind: file data
 * or hole, in one region) along the newest cursor (the guest will touch them next), advancing it.
 * Cursors that reach the end of the plan go; the background one [0] reaching it means the plan is
 * done. Returns 1 with *c filled, 0 when there is nothing to claim. */
static int claim_batch(Server *s, uint64_t max, claim_t *c)
{
    while (s->ncur) {
        int k = s->ncur - 1;
        size_t pos = s->cur[k].pos;
        uint64_t fp = s->cur[k].cur;
        while (pos < s->plan_len) {
            uint64_t start = s->plan[2 * pos], end = start + s->plan[2 * pos + 1];
            if (end > s->npages)
                end = s->npages;
            if (fp < start)
                fp = start;
            while (fp < end && !IS_FREE(s, fp)) {
                fp++;
                ADD(s, ST_PREFETCH_SKIPPED, 1);
            }
            if (fp >= end) {
                if (++pos < s->plan_len)
                    fp = s->plan[2 * pos];
                continue;
            }
            const region_t *r = region_of_page(s, fp);
            if (!r) { /* a file page no region maps: nothing to install */
                fp++;
                continue;
            }
            uint64_t rend = (r->file_off + r->size) >> s->page_shift, lim = end < rend ? end : rend;
            uint8_t hole = ST(s, fp) & PG_HOLE; /* a run of hole pages goes in as zero pages */
            uint64_t n = 1;
            while (fp + n < lim && n < max && IS_FREE(s, fp + n) && (ST(s, fp + n) & PG_HOLE) == hole)
                n++;
            for (uint64_t i = 0; i < n; i++)
                ST_OR(s, fp + i, PG_BUSY);
            s->cur[k].pos = pos;
            s->cur[k].cur = fp + n;
            for (int j = k - 1; j >= 1; j--) /* an older cursor this one caught up with */
                if (s->cur[j].pos == pos) {
                    drop_cursor(s, j);
                    k--;
                }
            *c = (claim_t){.fp = fp, .n = n, .hot = k > 0, .valid = 1};
            return 1;
        }
        if (k == 0) { /* the background pass is through: every planned page is in (or removed) */
            STORE(s->ncur, 0);
            STORE(s->st[ST_PLAN_DONE_NS], now_ns());
            return 0;
        }
        drop_cursor(s, k);
    }
    return 0;
}

/* Give back what is left of a claim (under cur_lock, or by its only user at the end). */
static void release_claim(Server *s, claim_t *c)
{
    for (uint64_t i = 0; c->valid && i < c->n; i++)
        ST_AND(s, c->fp + i, (uint8_t)~PG_BUSY);
    c->valid = 0;
}

/* Copy the front of claim c: its leading missing pages in one UFFDIO_COPY (or ZEROPAGE for a
 * hole). Pages done, or found no longer missing (a fault or a REMOVE got there), leave the claim
 * from the front. Returns 0, 1 (EAGAIN: the claim stays, try again later), 2 (VMM gone) or
 * END_ERROR; *done_out gets the pages installed. */
static int copy_claimed(Server *s, claim_t *c, uint64_t *done_out)
{
    *done_out = 0;
    while (c->n && !IS_MISSING(s, c->fp)) {
        ST_AND(s, c->fp, (uint8_t)~PG_BUSY);
        c->fp++;
        c->n--;
        ADD(s, ST_PREFETCH_SKIPPED, 1);
    }
    if (!c->n) {
        c->valid = 0;
        return 0;
    }
    uint64_t fp = c->fp, n = 1;
    while (n < c->n && IS_MISSING(s, fp + n))
        n++;
    const region_t *r = region_of_page(s, fp); /* claims never hold unmapped pages */
    uint64_t off = fp << s->page_shift;
    uint64_t dst = r->base + (off - r->file_off);
    int hole = ST(s, fp) & PG_HOLE;
    uint64_t t0 = now_ns();
    int rc;
    long long result;
    if (hole) {
        struct uffdio_zeropage z = {.range = {.start = dst, .len = n << s->page_shift}, .mode = 0};
        rc = ioctl(s->uffd, UFFDIO_ZEROPAGE, &z);
        result = z.zeropage;
    } else {
        struct uffdio_copy c2 = {
            .dst = dst,
            .src = (uint64_t)(uintptr_t)(s->map + off),
            .len = n << s->page_shift,
            .mode = 0,
        };
        populate_src(s, off, n << s->page_shift);
        rc = ioctl(s->uffd, UFFDIO_COPY, &c2);
        result = c2.copy;
    }
    int e = errno;
    ADD(s, ST_PREFETCH_NS, now_ns() - t0);
    ADD(s, ST_PREFETCH_BATCHES, 1);
    uint64_t done = 0;
    if (rc == 0)
        done = n;
    else if (result > 0)
        done = (uint64_t)result >> s->page_shift;
    for (uint64_t k = 0; k < done; k++)
        SET_STATE(s, fp + k, PG_PRESENT);
    ADD(s, ST_PREFETCH_PAGES, done);
    if (hole)
        ADD(s, ST_HOLE_PAGES, done);
    *done_out = done;
    c->fp += done;
    c->n -= done;
    if (rc == 0 || result > 0) {
        c->valid = c->n > 0;
        c->enoent_ns = 0;
        return 0;
    }
    if (e == EAGAIN) {
        ADD(s, ST_EAGAIN, 1);
        return 1;
    }
    if (e == EEXIST) {
        SET_STATE(s, c->fp, PG_PRESENT);
        ADD(s, ST_EEXIST, 1);
        c->fp++;
        c->n--;
        c->valid = c->n > 0;
        return 0;
    }
    if (e == ESRCH)
        return 2;
    if (e == ENOENT) {
        uint64_t t = now_ns();
        if (!c->enoent_ns)
            c->enoent_ns = t;
        if (t - c->enoent_ns < ENOENT_GRACE_NS) {
            STORE(s->unmap_events, 1); /* faults there may meet the same: let them wait too */
            ADD(s, ST_EAGAIN, 1);
            return 1; /* retried after the events are read: an UNMAP among them marks the range */
        }
        return unregistered(s, dst, n << s->page_shift, "the prefetch");
    }
    return fail(s, e, "prefetch UFFDIO_COPY of %llu pages at file offset %llu failed: %s",
                (unsigned long long)n, (unsigned long long)off, strerror(e));
}

/* One prefetch batch of the serving thread: continue its claim, or claim one along the newest
 * cursor. Returns 0, 1 (EAGAIN), 2 (VMM gone) or END_ERROR. */
static int prefetch_batch(Server *s, uint64_t max)
{
    claim_t *c = &s->claim;
    if (!c->valid) {
        pthread_mutex_lock(&s->cur_lock);
        int got = claim_batch(s, max, c);
        pthread_mutex_unlock(&s->cur_lock);
        if (!got)
            return 0;
    }
    uint64_t done;
    int hot = c->hot, rc = copy_claimed(s, c, &done);
    if (hot)
        ADD(s, ST_HOT_PAGES, done);
    return rc;
}

/* The copier thread: claims batches along the cursors too (leapfrogging the serving thread), checks
 * and copies each under ev_lock; sleeps on cur_cond when there is nothing to claim. Ends on stop,
 * when the VMM is gone, or on a failure (copier_err; the serving thread fails with its message). */
static void *copier_main(void *arg)
{
    Server *s = arg;
    claim_t c = {0};
    tl_copier = 1;
    for (;;) {
        if (LOAD(s->copier_stop))
            break;
        if (!c.valid) {
            pthread_mutex_lock(&s->cur_lock);
            while (!LOAD(s->copier_stop) && !(s->plan_copier && claim_batch(s, s->copier_batch_pages, &c)))
                pthread_cond_wait(&s->cur_cond, &s->cur_lock);
            pthread_mutex_unlock(&s->cur_lock);
            if (!c.valid)
                break;
        }
        for (int spins = 0; LOAD(s->ev_want) && spins < 10000; spins++)
            sched_yield(); /* the serving thread wants to read an event: let it in first */
        pthread_mutex_lock(&s->ev_lock);
        uint64_t done;
        int hot = c.hot, rc = copy_claimed(s, &c, &done);
        pthread_mutex_unlock(&s->ev_lock);
        ADD(s, ST_COPIER_BATCHES, 1);
        ADD(s, ST_COPIER_PAGES, done);
        if (hot)
            ADD(s, ST_HOT_PAGES, done);
        if (rc == 1) { /* a REMOVE is being delivered: the serving thread reads it, then we retry */
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        } else if (rc == 2) {
            break; /* the VMM is gone: the serving thread sees it too */
        } else if (rc < 0) {
            __atomic_store_n(&s->copier_err, 1, __ATOMIC_RELEASE);
            wake(s);
            break;
        }
    }
    pthread_mutex_lock(&s->cur_lock);
    release_claim(s, &c);
    pthread_mutex_unlock(&s->cur_lock);
    struct timespec cpu;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu) == 0)
        STORE(s->st[ST_COPIER_CPU_NS], (uint64_t)cpu.tv_sec * 1000000000ull + (uint64_t)cpu.tv_nsec);
    return NULL;
}

static void start_copier(Server *s)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals are for the interpreter's main thread */
    s->copier_started = pthread_create(&s->copier, NULL, copier_main, s) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void stop_copier(Server *s)
{
    if (!s->copier_started)
        return;
    STORE(s->copier_stop, 1);
    pthread_mutex_lock(&s->cur_lock);
    pthread_cond_broadcast(&s->cur_cond);
    pthread_mutex_unlock(&s->cur_lock);
    pthread_join(s->copier, NULL);
    s->copier_started = 0;
}

static int serve_loop(Server *s)
{
    struct pollfd p[4] = {
        {.fd = s->uffd, .events = POLLIN},
        {.fd = s->conn_fd, .events = POLLIN | POLLRDHUP},
        {.fd = s->pid_fd, .events = POLLIN},
        {.fd = s->wake_fd, .events = POLLIN},
    };
    int idle_retries = 0, backoff = 0, more = 0;
    take_pending_plan(s);
    for (;;) {
        if (LOAD(s->stop))
            return END_STOPPED;
        int prefetching = LOAD(s->ncur) || s->claim.valid;
        struct timespec ts, *tsp = NULL;
        if (s->ndef || backoff) {
            /* an event is being delivered (EAGAIN); give its waiter a moment, then retry */
            ts.tv_sec = 0;
            ts.tv_nsec = (idle_retries > 8 || backoff > 8) ? 1000000 : 20000;
            tsp = &ts;
        } else if (prefetching) {
            ts.tv_sec = 0;
            ts.tv_nsec = 0;
            tsp = &ts;
        }
        int n = ppoll(p, 4, tsp, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail(s, errno, "poll failed: %s", strerror(errno));
        }
        if (p[1].revents) {
            if (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL))
                return END_PEER_CLOSED;
            char junk[256];
            ssize_t r = recv(s->conn_fd, junk, sizeof junk, MSG_DONTWAIT);
            if (r == 0)
                return END_PEER_CLOSED;
        }
        if (p[2].revents)
            return END_PEER_EXITED;
        if (__atomic_load_n(&s->copier_err, __ATOMIC_ACQUIRE)) {
            memcpy(s->err, s->copier_msg, sizeof s->err);
            s->err_errno = s->copier_errno;
            return END_ERROR;
        }
        if (p[3].revents) {
            uint64_t v;
            if (read(s->wake_fd, &v, sizeof v) < 0 && errno != EAGAIN)
                return fail(s, errno, "reading the wake eventfd failed: %s", strerror(errno));
            if (LOAD(s->stop))
                return END_STOPPED;
            take_pending_plan(s);
        }
        if (p[0].revents & (POLLERR | POLLNVAL))
            return fail(s, EIO, "the userfaultfd reported an error (POLLERR)");
        if ((p[0].revents & POLLIN) || s->ndef) {
            /* with a prefetch pending, serve a few faults then give it a turn: a guest that
             * faults nonstop would otherwise keep the queue from ever emptying */
            int rc = drain(s, prefetching ? 4 : 1 << 30, &more);
            if (rc == 2)
                return END_PEER_EXITED;
            if (rc < 0)
                return rc;
        }
        if (s->ndef) {
            size_t before = s->ndef;
            int rc = retry_deferred(s);
            if (rc == 2)
                return END_PEER_EXITED;
            if (rc < 0)
                return rc;
            idle_retries = s->ndef && s->ndef == before ? idle_retries + 1 : 0;
            continue; /* no prefetch while faults wait */
        }
        idle_retries = 0;
        if (LOAD(s->ncur) || s->claim.valid) {
            /* One batch per turn, even while faults keep coming (or the plan would starve exactly
             * when the guest needs it most); it is small then, so a fault waits little behind it. */
            uint64_t max = (p[0].revents & POLLIN) || more ? s->busy_batch_pages : s->batch_pages;
            int rc = prefetch_batch(s, max);
            if (rc == 2)
                return END_PEER_EXITED;
            if (rc < 0)
                return rc;
            backoff = rc == 1 ? backoff + 1 : 0;
        }
    }
}

static void Server_dealloc(Server *s)
{
    if (s->map && s->map != MAP_FAILED)
        munmap((void *)s->map, s->map_len);
    if (s->zero_buf && s->zero_buf != MAP_FAILED)
        munmap(s->zero_buf, s->page_size);
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    free(s->regions);
    free(s->by_file);
    free(s->state);
    free(s->plan);
    free(s->by_start);
    free(s->pending_plan);
    free(s->deferred);
    free(s->log);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->cur_lock);
    pthread_mutex_destroy(&s->ev_lock);
    pthread_cond_destroy(&s->cur_cond);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *Server_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    Server *s = (Server *)type->tp_alloc(type, 0);
    if (!s)
        return NULL;
    s->uffd = s->conn_fd = s->pid_fd = s->wake_fd = -1;
    s->map = MAP_FAILED;
    s->zero_buf = MAP_FAILED;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->cur_lock, NULL);
    pthread_mutex_init(&s->ev_lock, NULL);
    pthread_cond_init(&s->cur_cond, NULL);
    return (PyObject *)s;
}

/* Pages wholly inside a hole of a sparse memory file (a Diff snapshot, or one copied sparse) read
 * as zeros: they are installed with UFFDIO_ZEROPAGE instead of being copied (4 KiB pages only;
 * hugetlb has no zero page). Best effort: without SEEK_HOLE support nothing is marked. */
static void mark_holes(Server *s, int fd, uint64_t fsize)
{
    uint64_t mask = s->page_size - 1;
    off_t pos = 0;
    while ((uint64_t)pos < fsize) {
        off_t h = lseek(fd, pos, SEEK_HOLE);
        if (h < 0 || (uint64_t)h >= fsize)
            break;
        off_t d = lseek(fd, h, SEEK_DATA);
        uint64_t end = d < 0 ? fsize : (uint64_t)d; /* ENXIO: a hole up to the end */
        uint64_t a = ((uint64_t)h + mask) & ~mask, b = end & ~mask;
        for (uint64_t fp = a >> s->page_shift; fp < b >> s->page_shift; fp++)
            s->state[fp] |= PG_HOLE;
        if (d < 0)
            break;
        pos = d;
    }
}

static int cmp_base(const void *a, const void *b)
{
    const region_t *x = a, *y = b;
    return x->base < y->base ? -1 : x->base > y->base;
}

static int cmp_off(const void *a, const void *b)
{
    const region_t *x = a, *y = b;
    return x->file_off < y->file_off ? -1 : x->file_off > y->file_off;
}

/* Server(uffd, mem_fd, regions, page_size, *, conn_fd=-1, pid_fd=-1, record=False, batch_pages=256,
 *        fault_around=16, busy_batch_pages=64, copy_threads=1, copier_batch_pages=32)
 * regions: sequence of (base_host_virt_addr, size, file_offset). The fds stay owned by the caller. */
static int Server_init(Server *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"uffd", "mem_fd", "regions", "page_size", "conn_fd", "pid_fd", "record",
                             "batch_pages", "fault_around", "busy_batch_pages", "copy_threads", "copier_batch_pages",
                             NULL};
    int uffd, mem_fd, conn_fd = -1, pid_fd = -1, record = 0, copy_threads = 1;
    unsigned long long copier_batch = 32;
    PyObject *regions;
    unsigned long long page_size, batch = 256, around = 16, busy = 64;
    if (s->regions) {
        PyErr_SetString(PyExc_RuntimeError, "Server is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiOK|$iiiKKKiK", kwlist, &uffd, &mem_fd, &regions, &page_size,
                                     &conn_fd, &pid_fd, &record, &batch, &around, &busy, &copy_threads,
                                     &copier_batch))
        return -1;
    if (copy_threads < 1 || copy_threads > 2) {
        PyErr_SetString(PyExc_ValueError, "copy_threads must be 1 or 2");
        return -1;
    }
    s->copy_threads = copy_threads;
    s->copier_batch_pages = copier_batch < 1 ? 1 : copier_batch;
    if (page_size != 4096 && page_size != 2097152) {
        PyErr_Format(PyExc_ValueError, "page size %llu is not supported (4096 or 2097152)", page_size);
        return -1;
    }
    if (batch < 1)
        batch = 1;
    s->page_size = page_size;
    s->page_shift = page_size == 4096 ? 12 : 21;
    s->batch_pages = batch;
    s->fault_around = around < batch ? around : batch - 1;
    s->busy_batch_pages = busy < 1 ? 1 : busy < batch ? busy : batch;

    struct stat stbuf;
    if (fstat(mem_fd, &stbuf) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    uint64_t fsize = (uint64_t)stbuf.st_size;
    if (fsize == 0 || fsize % page_size) {
        PyErr_Format(PyExc_ValueError, "memory file size %llu is not a positive multiple of the page size %llu",
                     (unsigned long long)fsize, page_size);
        return -1;
    }

    PyObject *seq = PySequence_Fast(regions, "regions must be a sequence of (base, size, offset)");
    if (!seq)
        return -1;
    Py_ssize_t nr = PySequence_Fast_GET_SIZE(seq);
    if (nr < 1 || nr > 4096) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "between 1 and 4096 regions are required");
        return -1;
    }
    s->regions = calloc((size_t)nr, sizeof(region_t));
    s->by_file = calloc((size_t)nr, sizeof(region_t));
    if (!s->regions || !s->by_file) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < nr; i++) {
        unsigned long long b, sz, off;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKK;region must be (base, size, offset)", &b,
                              &sz, &off)) {
            Py_DECREF(seq);
            return -1;
        }
        if (!sz || (b | sz | off) & (page_size - 1) || b + sz < b || off + sz < off || off + sz > fsize) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "region %zd (base 0x%llx size %llu offset %llu) is unaligned, empty or "
                         "past the end of the %llu-byte memory file", i, b, sz, off, (unsigned long long)fsize);
            return -1;
        }
        s->regions[i] = (region_t){b, sz, off};
    }
    Py_DECREF(seq);
    s->nregions = (int)nr;
    qsort(s->regions, (size_t)nr, sizeof(region_t), cmp_base);
    memcpy(s->by_file, s->regions, (size_t)nr * sizeof(region_t));
    qsort(s->by_file, (size_t)nr, sizeof(region_t), cmp_off);
    for (int i = 1; i < s->nregions; i++) {
        if (s->regions[i - 1].base + s->regions[i - 1].size > s->regions[i].base ||
            s->by_file[i - 1].file_off + s->by_file[i - 1].size > s->by_file[i].file_off) {
            PyErr_SetString(PyExc_ValueError, "regions overlap (in memory or in the memory file)");
            return -1;
        }
    }

    s->npages = fsize / page_size;
    s->state = calloc(s->npages, 1);
    if (!s->state) {
        PyErr_NoMemory();
        return -1;
    }
    if (page_size == 4096)
        mark_holes(s, mem_fd, fsize);
    s->map = mmap(NULL, fsize, PROT_READ, MAP_PRIVATE | MAP_NORESERVE, mem_fd, 0);
    if (s->map == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->map_len = fsize;
    /* populated (with the shared zero page) so zero-fill copies never take the slow path */
    s->zero_buf = mmap(NULL, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_POPULATE, -1, 0);
    if (s->zero_buf == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (record < 0 || record > 2) {
        PyErr_SetString(PyExc_ValueError, "record must be 0 (off), 1 (every first touch) or 2 (pages outside the plan)");
        return -1;
    }
    s->uffd = uffd;
    s->conn_fd = conn_fd;
    s->pid_fd = pid_fd;
    s->record = record;
    return 0;
}

static PyObject *Server_run(Server *s, PyObject *noargs)
{
    if (!s->regions) {
        PyErr_SetString(PyExc_RuntimeError, "Server is not initialised");
        return NULL;
    }
    int expected = 0;
    if (!__atomic_compare_exchange_n(&s->running, &expected, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        PyErr_SetString(PyExc_RuntimeError, "Server.run() is already running");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = serve_loop(s);
    stop_copier(s);
    release_claim(s, &s->claim);
    struct timespec cpu;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu) == 0)
        STORE(s->st[ST_SERVE_CPU_NS], (uint64_t)cpu.tv_sec * 1000000000ull + (uint64_t)cpu.tv_nsec);
    Py_END_ALLOW_THREADS
    STORE(s->running, 0);
    switch (rc) {
    case END_PEER_CLOSED:
        return PyUnicode_FromString("peer_closed");
    case END_PEER_EXITED:
        return PyUnicode_FromString("peer_exited");
    case END_STOPPED:
        return PyUnicode_FromString("stopped");
    default: {
        PyObject *e = Py_BuildValue("(is)", s->err_errno, s->err);
        if (e) {
            PyErr_SetObject(PyExc_OSError, e);
            Py_DECREF(e);
        }
        return NULL;
    }
    }
}

static void wake(Server *s)
{
    uint64_t one = 1;
    if (write(s->wake_fd, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is already non-zero, the loop will wake anyway */
    }
}

static PyObject *Server_stop(Server *s, PyObject *noargs)
{
    STORE(s->stop, 1);
    if (s->wake_fd >= 0)
        wake(s);
    Py_RETURN_NONE;
}

/* set_plan(runs: bytes, *, copier=False) with native-endian uint64 pairs (file_page, npages); replaces
 * any plan. copier: the second copy thread helps with it (a plan the guest is waiting for, not a
 * background fill that would take a second core from the running guest). */
static PyObject *Server_set_plan(Server *s, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"runs", "copier", NULL};
    PyObject *arg;
    int copier = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$p", kwlist, &arg, &copier))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len % 16) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "plan must be uint64 pairs (file_page, npages)");
        return NULL;
    }
    size_t n = (size_t)view.len / 16;
    uint64_t *copy = NULL;
    if (n) {
        copy = malloc((size_t)view.len);
        if (!copy) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        memcpy(copy, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    pthread_mutex_lock(&s->lock);
    free(s->pending_plan);
    s->pending_plan = copy;
    s->pending_len = n;
    s->pending_copier = copier;
    s->pending_set = 1;
    pthread_mutex_unlock(&s->lock);
    if (s->wake_fd >= 0)
        wake(s);
    Py_RETURN_NONE;
}

static PyObject *Server_set_record(Server *s, PyObject *arg)
{
    long on = PyLong_AsLong(arg); /* bools are ints */
    if (on == -1 && PyErr_Occurred())
        return NULL;
    if (on < 0 || on > 2) {
        PyErr_SetString(PyExc_ValueError, "record must be 0 (off), 1 (every first touch) or 2 (pages outside the plan)");
        return NULL;
    }
    STORE(s->record, (int)on);
    Py_RETURN_NONE;
}

/* access_log() -> bytes: the recorded first-touch memory-file page indices, uint32 native-endian. */
static PyObject *Server_access_log(Server *s, PyObject *noargs)
{
    pthread_mutex_lock(&s->lock);
    PyObject *b = PyBytes_FromStringAndSize((const char *)s->log, (Py_ssize_t)(s->log_len * sizeof(uint32_t)));
    pthread_mutex_unlock(&s->lock);
    return b;
}

static PyObject *Server_stats(Server *s, PyObject *noargs)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < ST_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(LOAD(s->st[i]));
        if (!v || PyDict_SetItemString(d, stat_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef server_methods[] = {
    {"run", (PyCFunction)Server_run, METH_NOARGS,
     "run() -> 'peer_closed' | 'peer_exited' | 'stopped'. Serves until the VMM goes away or stop() is called; "
     "releases the GIL; raises OSError when serving fails."},
    {"stop", (PyCFunction)Server_stop, METH_NOARGS, "stop(): make run() return 'stopped' (thread-safe)."},
    {"set_plan", (PyCFunction)(void (*)(void))Server_set_plan, METH_VARARGS | METH_KEYWORDS,
     "set_plan(runs: bytes, *, copier=False): prefetch these (file_page, npages) uint64 pairs, in order; with "
     "copier, the second copy thread helps (thread-safe)."},
    {"set_record", (PyCFunction)Server_set_record, METH_O, "set_record(mode): 0 records nothing, 1 every first touch, 2 first touches of pages outside the plan."},
    {"access_log", (PyCFunction)Server_access_log, METH_NOARGS,
     "access_log() -> bytes of uint32 memory-file page indices in first-touch order."},
    {"stats", (PyCFunction)Server_stats, METH_NOARGS, "stats() -> dict of counters (thread-safe)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "banger.uffd._uffd.Server",
    .tp_basicsize = sizeof(Server),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Server(uffd, mem_fd, regions, page_size, *, conn_fd=-1, pid_fd=-1, record=0, batch_pages=256, "
              "fault_around=16, busy_batch_pages=64, copy_threads=1, copier_batch_pages=32)",
    .tp_new = Server_new,
    .tp_init = (initproc)Server_init,
    .tp_dealloc = (destructor)Server_dealloc,
    .tp_methods = server_methods,
};

static PyMethodDef methods[] = {
    {"probe", py_probe, METH_NOARGS, "probe() -> (ok, detail): create a userfaultfd and negotiate its API."},
    {"touch_order_runs", py_touch_order_runs, METH_VARARGS,
     "touch_order_runs(pages: bytes, npages) -> bytes: uint32 first-touch page indices (native-endian) as "
     "uint64 pairs (first page, count): contiguous runs in the order their first page was touched."},
    {"cpuid", py_cpuid, METH_VARARGS,
     "cpuid(leaf, subleaf=0) -> (eax, ebx, ecx, edx) of this CPU (x86 only; OSError elsewhere)."},
    {"tsc_rate_khz", py_tsc_rate_khz, METH_VARARGS,
     "tsc_rate_khz(window_us=2000) -> int: the TSC rate measured against CLOCK_MONOTONIC_RAW (x86 only)."},
    {"readahead", py_readahead, METH_VARARGS,
     "readahead(mem_fd, plan: bytes, page_size, sample=64) -> int: unless sampled plan pages are all in the "
     "page cache, POSIX_FADV_WILLNEED every plan run; returns the runs advised. Releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "banger.uffd._uffd", "userfaultfd primitives", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__uffd(void)
{
    if (PyType_Ready(&ServerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&ServerType);
    if (PyModule_AddObject(m, "Server", (PyObject *)&ServerType) < 0) {
        Py_DECREF(&ServerType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "PAGE_4K", 4096);
    PyModule_AddIntConstant(m, "PAGE_2M", 2097152);
    return m;
}
