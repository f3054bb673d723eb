/* Check a file's per-chunk sha256s (the manifest's "chunks") from two threads, without the GIL.

   One sha256 of a rank-16 LoRA file (3.6 MB) takes longer than the whole raw safetensors read, and
   a single hash cannot be split. Chunk digests can: the server's hasher thread checks chunks as the
   read brings them in, and the loading thread joins once it has built its serving form, so both
   cores hash. In Python each chunk would need the GIL back between two `update`s, which the
   loading thread holds while it builds the form (CPython hands it over only every 5 ms): here a
   thread takes chunks, waits for them to be read and hashes them all inside one call.

   Verifier(buffer, chunk_size, expected): `buffer` is held (it cannot move or go) until the
   Verifier goes; `expected` is the chunks' 32-byte digests back to back. The reader calls
   advanced(end) as bytes come in and read_over() when it stops; run() hashes chunks until none
   is left to take (any number of threads); wait() returns the indexes of the chunks that did not
   match or were never read. sha256 is OpenSSL's (EVP), the library hashlib uses. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <openssl/evp.h>

#define SPINS 4000 /* ~0.2 ms of pause before sleeping: a read slice lands about that often */

enum { PENDING = 0, MATCHED = 1, MISMATCHED = 2, UNREAD = 3 };

typedef struct {
    PyObject_HEAD
    Py_buffer buffer;
    int has_buffer;
    Py_ssize_t chunk, count;
    unsigned char *expected, *state;
    _Atomic Py_ssize_t read_end;
    atomic_int read_over;
    Py_ssize_t next, done; /* under lock */
    pthread_mutex_t lock;
    pthread_cond_t changed;
} Verifier;

static void verifier_dealloc(Verifier *self) {
    if (self->has_buffer) PyBuffer_Release(&self->buffer);
    PyMem_Free(self->expected);
    PyMem_Free(self->state);
    pthread_mutex_destroy(&self->lock);
    pthread_cond_destroy(&self->changed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *verifier_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"buffer", "chunk_size", "expected", NULL};
    PyObject *source;
    Py_ssize_t chunk;
    Py_buffer expected;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Ony*", names, &source, &chunk, &expected)) return NULL;
    Verifier *self = (Verifier *)type->tp_alloc(type, 0);
    if (self == NULL) { PyBuffer_Release(&expected); return NULL; }
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->changed, NULL);
    if (PyObject_GetBuffer(source, &self->buffer, PyBUF_SIMPLE) < 0) goto fail;
    self->has_buffer = 1;
    if (chunk <= 0) { PyErr_Format(PyExc_ValueError, "chunk_size must be positive, got %zd", chunk); goto fail; }
    self->chunk = chunk;
    self->count = (self->buffer.len + chunk - 1) / chunk;
    if (expected.len != 32 * self->count) {
        PyErr_Format(PyExc_ValueError, "%zd bytes in %zd-byte chunks need %zd digests, got %zd bytes of them",
                     self->buffer.len, chunk, self->count, expected.len);
        goto fail;
    }
    self->expected = PyMem_Malloc(expected.len ? expected.len : 1);
    self->state = PyMem_Calloc(self->count ? self->count : 1, 1);
    if (self->expected == NULL || self->state == NULL) { PyErr_NoMemory(); goto fail; }
    memcpy(self->expected, expected.buf, expected.len);
    PyBuffer_Release(&expected);
    return (PyObject *)self;
fail:
    PyBuffer_Release(&expected);
    Py_DECREF(self);
    return NULL;
}

static PyObject *verifier_advanced(Verifier *self, PyObject *arg) {
    Py_ssize_t end = PyLong_AsSsize_t(arg);
    if (end == -1 && PyErr_Occurred()) return NULL;
    if (end < 0 || end > self->buffer.len) return PyErr_Format(PyExc_ValueError, "end %zd outside the buffer", end);
    atomic_store(&self->read_end, end);
    pthread_mutex_lock(&self->lock);
    pthread_cond_broadcast(&self->changed);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *verifier_read_over(Verifier *self, PyObject *unused) {
    atomic_store(&self->read_over, 1);
    pthread_mutex_lock(&self->lock);
    pthread_cond_broadcast(&self->changed);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

/* Whether bytes [0, end) are in, waiting (spinning first) until they are or the read is over. */
static int wait_read(Verifier *self, Py_ssize_t end) {
    for (int i = 0; i < SPINS; i++) {
        if (atomic_load(&self->read_end) >= end) return 1;
        if (atomic_load(&self->read_over)) break;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    pthread_mutex_lock(&self->lock);
    while (atomic_load(&self->read_end) < end && !atomic_load(&self->read_over))
        pthread_cond_wait(&self->changed, &self->lock);
    pthread_mutex_unlock(&self->lock);
    return atomic_load(&self->read_end) >= end;
}

static Py_ssize_t run(Verifier *self) {
    const EVP_MD *sha256 = EVP_sha256();
    const unsigned char *data = self->buffer.buf;
    Py_ssize_t hashed = 0;
    for (;;) {
        pthread_mutex_lock(&self->lock);
        Py_ssize_t i = self->next < self->count ? self->next++ : -1;
        pthread_mutex_unlock(&self->lock);
        if (i < 0) return hashed;
        Py_ssize_t start = i * self->chunk, stop = start + self->chunk;
        if (stop > self->buffer.len) stop = self->buffer.len;
        unsigned char state = UNREAD, digest[EVP_MAX_MD_SIZE];
        unsigned int size = 0;
        if (wait_read(self, stop)) {
            int ok = EVP_Digest(data + start, (size_t)(stop - start), digest, &size, sha256, NULL);
            state = ok && size == 32 && memcmp(digest, self->expected + 32 * i, 32) == 0 ? MATCHED : MISMATCHED;
            hashed++;
        }
        pthread_mutex_lock(&self->lock);
        self->state[i] = state;
        if (++self->done == self->count) pthread_cond_broadcast(&self->changed);
        pthread_mutex_unlock(&self->lock);
    }
}

static PyObject *verifier_run(Verifier *self, PyObject *unused) {
    Py_ssize_t hashed;
    Py_BEGIN_ALLOW_THREADS
    hashed = run(self);
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(hashed);
}

static PyObject *verifier_wait(Verifier *self, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    while (self->done < self->count) pthread_cond_wait(&self->changed, &self->lock);
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    PyObject *bad = PyList_New(0);
    for (Py_ssize_t i = 0; bad != NULL && i < self->count; i++) {
        if (self->state[i] == MATCHED) continue;
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL || PyList_Append(bad, index) < 0) Py_CLEAR(bad);
        Py_XDECREF(index);
    }
    return bad;
}

static PyMethodDef verifier_methods[] = {
    {"advanced", (PyCFunction)verifier_advanced, METH_O, "advanced(end): bytes [0, end) of the buffer are in."},
    {"read_over", (PyCFunction)verifier_read_over, METH_NOARGS, "The read stopped; chunks past it are never read."},
    {"run", (PyCFunction)verifier_run, METH_NOARGS, "Hash chunks until none is left to take; returns how many."},
    {"wait", (PyCFunction)verifier_wait, METH_NOARGS, "Wait for every chunk; the indexes of those that failed."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject VerifierType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "adapterhub.registry._chunksha.Verifier",
    .tp_basicsize = sizeof(Verifier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Verifier(buffer, chunk_size, expected): a buffer's chunk digests, checked from any threads.",
    .tp_new = verifier_new,
    .tp_dealloc = (destructor)verifier_dealloc,
    .tp_methods = verifier_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_chunksha", .m_doc = "Per-chunk sha256 checks off the GIL.", .m_size = -1,
};

PyMODINIT_FUNC PyInit__chunksha(void) {
    if (PyType_Ready(&VerifierType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&VerifierType);
    if (PyModule_AddObject(m, "Verifier", (PyObject *)&VerifierType) < 0) {
        Py_DECREF(&VerifierType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
