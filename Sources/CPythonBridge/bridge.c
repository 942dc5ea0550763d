#include "CPythonBridge.h"

// ---------------------------------------------------------------------------------------------
// Interrupting long native calls (Ctrl-C) and stopping them at interpreter exit.
//
// Python's SIGINT handler only sets a flag that the main thread looks at between bytecodes, so
// a native call that released the GIL would otherwise run to its end. While such a call runs,
// `mapet_interrupt_begin` chains a handler in front of Python's: it records the signal in an
// atomic flag and then calls Python's handler as before. The engine polls the flag at chunk
// boundaries (`mapet_interrupt_pending`), stops early, and the caller — with the GIL back —
// lets `PyErr_CheckSignals` raise the KeyboardInterrupt. `mapet_request_shutdown` (atexit)
// sets a second flag that stops every such call, whatever thread runs it.

#include <signal.h>
#include <string.h>
#include <stdatomic.h>
#include <pthread.h>
#include <time.h>

static atomic_int interrupt_flag;
static atomic_int shutdown_flag;
static atomic_int active_calls;
static struct sigaction previous_action;
static int installed_depth;   // guarded by the GIL
static int installed;
static unsigned long main_ident;

static void mapet_sigint(int sig, siginfo_t *info, void *context) {
    atomic_store(&interrupt_flag, 1);
    if (previous_action.sa_flags & SA_SIGINFO) {
        if (previous_action.sa_sigaction) previous_action.sa_sigaction(sig, info, context);
    } else if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
        previous_action.sa_handler(sig);
    }
}

int mapet_capture_main_thread(void) {
    PyObject *threading = PyImport_ImportModule("threading");
    if (!threading) return -1;
    PyObject *main = PyObject_CallMethod(threading, "main_thread", NULL);
    Py_DECREF(threading);
    if (!main) return -1;
    PyObject *ident = PyObject_GetAttrString(main, "ident");
    Py_DECREF(main);
    if (!ident) return -1;
    main_ident = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    return PyErr_Occurred() ? -1 : 0;
}

int mapet_interrupt_begin(void) {
    int is_main = PyThread_get_thread_ident() == main_ident;
    atomic_fetch_add(&active_calls, 1);
    if (installed_depth++ == 0) {
        atomic_store(&interrupt_flag, 0);
        struct sigaction current;
        installed = 0;
        if (sigaction(SIGINT, NULL, &current) == 0 &&
            ((current.sa_flags & SA_SIGINFO) ||
             (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN))) {
            struct sigaction ours;
            memset(&ours, 0, sizeof ours);
            ours.sa_sigaction = mapet_sigint;
            ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
            sigemptyset(&ours.sa_mask);
            previous_action = current;
            installed = sigaction(SIGINT, &ours, NULL) == 0;
        }
    }
    return is_main;
}

void mapet_interrupt_end(void) {
    if (--installed_depth == 0 && installed) {
        struct sigaction current;
        if (sigaction(SIGINT, NULL, &current) == 0 && (current.sa_flags & SA_SIGINFO) &&
            current.sa_sigaction == mapet_sigint) {
            sigaction(SIGINT, &previous_action, NULL);
        }
        installed = 0;
    }
}

void mapet_interrupt_body_done(void) { atomic_fetch_sub(&active_calls, 1); }

int mapet_interrupt_pending(int is_main) {
    return atomic_load_explicit(&shutdown_flag, memory_order_relaxed) ||
           (is_main && atomic_load_explicit(&interrupt_flag, memory_order_relaxed));
}

int mapet_shutdown_requested(void) { return atomic_load(&shutdown_flag); }

// Called with the GIL held, and keeps it: a stopped call cannot take the GIL back to raise in
// its thread before the interpreter has finished (the thread then just never resumes).
void mapet_request_shutdown(double timeout_seconds) {
    atomic_store(&shutdown_flag, 1);
    struct timespec step = {0, 2000000};
    for (double waited = 0; atomic_load(&active_calls) > 0 && waited < timeout_seconds; waited += 0.002) {
        nanosleep(&step, NULL);
    }
}
