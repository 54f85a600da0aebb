/* banger._uffd: userfaultfd primitives for banger's lazy snapshot restore.
 *
 * A thin C layer: the hot loop lives here with the GIL released; policy and the
 * handshake stay in Python (banger/uffd/).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

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

static PyMethodDef methods[] = {
    {"probe", py_probe, METH_NOARGS, "probe() -> (ok, detail): create a userfaultfd and negotiate its API."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "banger._uffd", "userfaultfd primitives", -1, methods};

PyMODINIT_FUNC PyInit__uffd(void)
{
    return PyModule_Create(&moduledef);
}
