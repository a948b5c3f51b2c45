"""A two-thread split for the CPU decode kernels: the caller and one persistent C worker thread, handing work over
in about a microsecond.

Why: the CPU kernels split a call's work (experts, or weight rows) over the two cores of this workplace's VM, and
Python's `ThreadPoolExecutor` hands a job over and back in ~160 us (a condition-variable wake-up each way, measured
here with a no-op job): longer than most decode-step kernel calls themselves. Here the worker spins on an atomic
counter for a short while after each job (`MOESAIC_POOL_SPIN_US`, default 200 us, longer than a decode step's Python
between two kernel calls, so it stays awake through a step) and then sleeps on a condition variable, so it burns
no core outside decode: a no-op hand-over costs ~6 us with the second core free. With it, batch-1 steps split
each layer's experts over both cores (`split_one_row`; the experts' time 1.05-1.2x, the step 1.03-1.1x in
in-engine A/Bs on both benchmark shapes in fp32 / bf16 / W8A8), where the Python thread's hand-off made that a loss.
The memory bandwidth is what limits: one core reads ~24-28 GB/s here, both ~31-50 GB/s depending on the moment
(a 1 GiB fp32 sum), and a decode step's kernels read 25-28 GB/s with the split or without it in fp32.

    run2(fn, args_main, args_worker)   fn(*args_worker) on the worker while fn(*args_main) runs here; returns
                                       when both are done. fn: a ctypes function of a moesaic C kernel whose
                                       parameters are all int64 or pointers (passed as ints), at most 32.

When the caller finishes its half before the worker has taken the job (the worker descheduled by another process,
or still waking up), the caller takes the worker's half back and runs it itself (a compare-and-swap on the job id
decides who runs it; `set_steal`, MOESAIC_POOL_STEAL=0 turns it off): with another process spinning on one of the
two cores, batch-1 fast steps ran 1.21x / 1.39x / 1.89x faster (fine-64x8 fp32 / bf16 / W8A8, same-process A/B,
`benchmarks/ab_fast_step.py --against-no-steal --busy`), and 0.99-1.01x without it. Either thread computes a half
with the same call, so the results are the same bits.

One job at a time: a second thread calling while a job is in flight runs both halves itself (correct, not
parallel). A forked child starts its own worker on first use. Built like the other kernels (`cpu_gemv.build`);
where it cannot be (or with MOESAIC_CPU_POOL=0), `run2` hands the worker's half to a Python helper thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

MAX_ARGS = 32


def _source() -> str:
    cases = []
    for n in range(MAX_ARGS + 1):
        params = ", ".join(["int64_t"] * n) or "void"
        args = ", ".join(f"a[{i}]" for i in range(n))
        cases.append(f"    case {n}: ((void (*)({params}))fn)({args}); break;")
    return r"""
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Calls fn with exactly n int64 arguments: the kernels' parameters are all int64 or pointers, which the x86-64
   calling convention passes alike. */
static void call(void* fn, int64_t n, const int64_t* a) {
  switch (n) {
""" + "\n".join(cases) + r"""
    default: break;
  }
}

static void* job_fn;
static int64_t job_n;
static int64_t job_a[""" + str(MAX_ARGS) + r"""];
static atomic_long posted, done, claimed; /* claimed: the last job taken, by the worker or by the caller */
static atomic_int steal = 1;
static atomic_int sleeping, busy, state; /* state: 0 not started, 1 running, 2 failed to start */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long spin_ns = 200000;

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void* worker(void* unused) {
  (void)unused;
  long seen = atomic_load(&claimed); /* jobs taken: a job posted before this thread ran is still seen */
  for (;;) {
    long t0 = now_ns();
    unsigned spins = 0;
    while (atomic_load_explicit(&posted, memory_order_acquire) == seen) {
      _mm_pause();
      if ((++spins & 255u) == 0 && now_ns() - t0 > spin_ns) {
        pthread_mutex_lock(&mu);
        atomic_store(&sleeping, 1);
        while (atomic_load(&posted) == seen) pthread_cond_wait(&cv, &mu);
        atomic_store(&sleeping, 0);
        pthread_mutex_unlock(&mu);
      }
    }
    seen = atomic_load_explicit(&posted, memory_order_acquire);
    long expected = seen - 1; /* jobs run one at a time: job `seen` is the worker's unless the caller took it */
    if (atomic_compare_exchange_strong(&claimed, &expected, seen)) {
      call(job_fn, job_n, job_a);
      atomic_store_explicit(&done, seen, memory_order_release);
    }
  }
  return NULL;
}

static void after_fork_child(void) { /* the worker thread does not exist in a forked child */
  atomic_store(&state, 0);
  atomic_store(&busy, 0);
  atomic_store(&sleeping, 0);
  atomic_store(&posted, 0);
  atomic_store(&done, 0);
  atomic_store(&claimed, 0);
  pthread_mutex_init(&mu, NULL);
  pthread_cond_init(&cv, NULL);
}

static int start(void) {
  static pthread_mutex_t start_mu = PTHREAD_MUTEX_INITIALIZER;
  static int atfork = 0;
  pthread_mutex_lock(&start_mu);
  if (atomic_load(&state) == 0) {
    if (!atfork) { pthread_atfork(NULL, NULL, after_fork_child); atfork = 1; }
    const char* s = getenv("MOESAIC_POOL_SPIN_US");
    if (s) spin_ns = atol(s) * 1000L;
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    atomic_store(&state, pthread_create(&t, &at, worker, NULL) == 0 ? 1 : 2);
    pthread_attr_destroy(&at);
  }
  pthread_mutex_unlock(&start_mu);
  return atomic_load(&state) == 1;
}

/* fn(a_worker...) on the worker thread while fn(a_main...) runs on the caller's; returns when both are done.
   Returns 1 when the halves ran in parallel, 0 when the caller ran both (no worker, or another job in flight),
   2 when the caller finished its half before the worker had taken the job and ran the worker's half too. */
int moesaic_pool_run2(void* fn, int64_t n, const int64_t* a_main, const int64_t* a_worker) {
  int expected = 0;
  if (n < 0 || n > """ + str(MAX_ARGS) + r""" || (atomic_load(&state) != 1 && !start())
      || !atomic_compare_exchange_strong(&busy, &expected, 1)) {
    call(fn, n, a_worker);
    call(fn, n, a_main);
    return 0;
  }
  job_fn = fn;
  job_n = n;
  memcpy(job_a, a_worker, (size_t)n * sizeof(int64_t));
  long p = atomic_load(&posted) + 1;
  atomic_store(&posted, p); /* seq_cst: pairs with the worker's store to `sleeping` then load of `posted` */
  if (atomic_load(&sleeping)) {
    pthread_mutex_lock(&mu);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
  }
  call(fn, n, a_main);
  long unclaimed = p - 1;
  if (atomic_load(&steal) && atomic_compare_exchange_strong(&claimed, &unclaimed, p)) {
    /* the worker has not picked the job up (descheduled by another process, or still waking up): this thread
       runs its half too instead of waiting for it; the same calls, so the same results */
    call(fn, n, a_worker);
    atomic_store(&busy, 0);
    return 2;
  }
  unsigned spins = 0;
  while (atomic_load_explicit(&done, memory_order_acquire) != p)
    if ((++spins & 1023u) == 0) sched_yield(); else _mm_pause();
  atomic_store(&busy, 0);
  return 1;
}

void moesaic_pool_set_steal(int on) { atomic_store(&steal, on); }
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    # imported here, once: cpu_gemv imports this module for its hot path
    from moesaic.kernels import cpu_gemv

    lib = cpu_gemv.build(_source(), "pool")
    if lib is None:
        return None
    lib.moesaic_pool_run2.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.moesaic_pool_run2.restype = ctypes.c_int
    lib.moesaic_pool_set_steal.argtypes = [ctypes.c_int]
    lib.moesaic_pool_set_steal.restype = None
    lib.moesaic_pool_set_steal(int(STEAL))
    return lib


def available() -> bool:
    """Whether the C worker can be used here (builds it on the first call)."""
    return _library() is not None


ENABLED = os.environ.get("MOESAIC_CPU_POOL", "1") != "0"  # 0: the Python helper thread instead (A/B runs)
STEAL = os.environ.get("MOESAIC_POOL_STEAL", "1") != "0"  # 0: always wait for the worker (A/B runs; `set_steal`)


def set_steal(on: bool) -> None:
    """Whether a caller that finishes its half before the C worker has taken the other one runs that half itself
    (default; MOESAIC_POOL_STEAL=0 starts with it off). For A/B runs in one process."""
    global STEAL
    STEAL = bool(on)
    lib = _library()
    if lib is not None:
        lib.moesaic_pool_set_steal(int(STEAL))


@functools.cache
def _executor_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="moesaic-kernels")


def _executor() -> ThreadPoolExecutor:
    """The Python helper thread of this process (a forked child gets its own)."""
    return _executor_of(os.getpid())


SPLIT_ONE_ROW = os.environ.get("MOESAIC_CPU_SPLIT_ROW", "1") != "0"
# one-row linears split only from this many weight bytes (the LM head): the ~1-6 MB attention weights lost
# (0.9-1.0x on those calls; the hand-off and the two halves' uneven finish cost more than the second core gave)
SPLIT_MIN_BYTES = 8 << 20


def split_one_row() -> bool:
    """Whether batch-1 kernels (one row: a weight streamed at memory speed) split their weight rows over two
    threads: only through the C worker (the Python thread's hand-off costs more than it saves) and when torch
    has two threads."""
    return SPLIT_ONE_ROW and ENABLED and torch.get_num_threads() > 1 and available()


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def run2(fn, args_main: Sequence[int | None], args_worker: Sequence[int | None]) -> int:
    """fn(*args_worker) on the worker thread while fn(*args_main) runs on this one; returns when both are done: 1 when
    they ran in parallel, 2 when this thread finished its half before the worker had taken the other and ran that
    too (`set_steal`), 0 when this thread ran both (no worker, or another caller's job in flight). fn: a ctypes
    function (of a moesaic kernel library) whose parameters are all int64 or pointers; the arguments are ints (None
    for a null pointer), the same number in both halves."""
    n = len(args_main)
    if len(args_worker) != n or n > MAX_ARGS:
        raise ValueError(f"cpu_pool.run2: both halves need the same number of arguments (<= {MAX_ARGS}), got "
                         f"{n} and {len(args_worker)}")
    lib = _library() if ENABLED else None
    if lib is None:  # the Python helper thread (a ~160 us round trip here)
        job = _executor().submit(fn, *args_worker)
        fn(*args_main)
        job.result()
        return 1
    arr = ctypes.c_int64 * max(n, 1)
    return lib.moesaic_pool_run2(_address(fn), n, arr(*[a or 0 for a in args_main]),
                                 arr(*[a or 0 for a in args_worker]))

