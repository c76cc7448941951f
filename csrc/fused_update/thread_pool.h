// The CPU kernel's own worker threads: passive waits, work taken by the caller when a worker
// is late. Torch-free (std::thread, a mutex and condition variables).
//
// Why not OpenMP: the kernel used to run `#pragma omp parallel for` beside torch's own
// OpenMP pool. Threads of an OpenMP team spin at the end of a region (and torch's spin after
// every torch op), so on a 2-core machine two threads made a 1M-element update 9.7x slower
// than one, and with one other busy process every parallel update waited for a descheduled
// thread (7.8 ms per step instead of 0.14 ms).
//
// Here:
//   * the work is a list of tasks (tiles of a few microseconds) handed out one at a time
//     by an atomic counter, to the caller and to whichever workers are awake;
//   * the caller starts on the tasks at once: a worker that the OS has not scheduled yet
//     (a busy machine) simply finds no task left when it wakes, and goes back to sleep;
//   * the caller then waits only for tasks a worker has already taken (a few microseconds of
//     work, normally already done), looking for ~50 us, then sleeping on a condition variable;
//   * idle workers sleep on a condition variable: nothing spins between updates;
//   * whether to wake workers at all is decided by measurement: each sort of update keeps the
//     recent cost of running it alone and with the workers and takes the cheaper, trying the
//     other way now and then (a machine that gets busy, or quiet again, is followed).
// A second caller arriving while the pool is in use (another Python thread) does its own work
// alone instead of waiting. After fork() the child makes a fresh pool (the parent's worker
// threads do not exist there).
//
// This header is compiled once per instruction set (fused_update_cpu*.cpp), each with internal
// linkage: each build has its own pool, and only the build in use starts threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define PYENGINE_POOL_HAVE_GETPID 1
#endif

namespace pyengine {
namespace cpu {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class TaskPool {
 public:
  // ~30-60 us of pause instructions (about 140 cycles each on recent Intel, 10-65 on AMD)
  static constexpr int kSpinLooks = 1 << 9;

  using TaskFn = void (*)(void* ctx, int64_t task);

  // Runs fn(ctx, t) for t in [0, n_tasks) on the caller and up to max_threads - 1 workers.
  // Every task has run when this returns. fn must not throw. `kind` (0 .. kKinds - 1) names
  // the sort of task, for the timings that choose between one and several threads.
  void run(int64_t n_tasks, int max_threads, TaskFn fn, void* ctx, int kind = 0) {
    if (max_threads <= 1 || n_tasks <= 1) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
      return;
    }
    Choice& ch = choice_for(kind, n_tasks);
    const bool parallel = ch.want_parallel() && try_acquire();
    const int64_t start = now_ns();
    if (!parallel) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
      ch.record(false, (now_ns() - start) / n_tasks);
      return;
    }
    const int workers = static_cast<int>(
        std::min<int64_t>(static_cast<int64_t>(max_threads) - 1, n_tasks - 1));
    {
      std::lock_guard<std::mutex> lock(mu_);
      ensure_workers(workers);
      fn_ = fn;
      ctx_ = ctx;
      n_tasks_ = n_tasks;
      next_.store(0, std::memory_order_relaxed);
      wanted_ = workers;
      open_ = true;
      ++generation_;
    }
    // wake exactly as many workers as may help (the others keep sleeping)
    for (int i = 0; i < workers; ++i) work_cv_.notify_one();
    drain(fn, ctx, n_tasks);
    std::unique_lock<std::mutex> lock(mu_);
    open_ = false;  // a worker waking from now on finds nothing to do
    if (active_.load(std::memory_order_relaxed) != 0) {
      // A worker is finishing a task it took: normally a few microseconds, less than the
      // wake-up of a sleeping thread (10-20 us measured in the KVM guest), so look for a
      // while before sleeping; the pause keeps the look cheap for a sibling hyperthread.
      lock.unlock();
      for (int i = 0; i < kSpinLooks && active_.load(std::memory_order_acquire) != 0; ++i) {
        cpu_relax();
      }
      lock.lock();
      done_cv_.wait(lock, [&] { return active_.load(std::memory_order_relaxed) == 0; });
    }
    fn_ = nullptr;
    ctx_ = nullptr;
    lock.unlock();
    busy_.store(false, std::memory_order_release);
    ch.record(true, (now_ns() - start) / n_tasks);
  }

  // The pool of this process (a fresh one after fork); never destroyed, so worker threads
  // blocked on it at exit are harmless.
  static TaskPool& instance() {
#if defined(PYENGINE_POOL_HAVE_GETPID)
    static std::atomic<TaskPool*> pool{nullptr};
    static std::mutex make_mu;
    TaskPool* p = pool.load(std::memory_order_acquire);
    const long pid = static_cast<long>(getpid());
    if (p && p->pid_ == pid) return *p;
    std::lock_guard<std::mutex> lock(make_mu);
    p = pool.load(std::memory_order_acquire);
    if (!p || p->pid_ != pid) {
      p = new TaskPool(pid);  // the parent's pool (if any) is left as it is: see above
      pool.store(p, std::memory_order_release);
    }
    return *p;
#else
    static TaskPool* p = new TaskPool(0);
    return *p;
#endif
  }

 private:
  explicit TaskPool(long pid) : pid_(pid) {}

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // One or several threads, from what each has cost lately. Whether workers pay depends on
  // more than the size: on a quiet machine two threads ran a 2^20-element update in 0.55x
  // the time of one, but beside a busy process (or torch's own spinning pool, or other jobs
  // of a shared machine) a worker that the OS takes off its core mid-task makes the caller
  // wait a scheduler slice (8 ms here), and the sweep of bench/bench_cpu_threads.py measured
  // two threads 1.1-1.5x slower than one at load 5 on 2 cores. So each sort of update (the
  // kind, and the number of tasks to within a factor of 2) keeps a moving average of the time
  // per task of either way, runs the cheaper, and tries the other one call in kExplore to
  // follow the machine (the first calls measure both).
  struct Choice {
    std::atomic<int64_t> ns[2] = {{0}, {0}};  // [serial, parallel] ns per task, moving average
    std::atomic<uint32_t> calls{0};

    bool want_parallel() {
      const uint32_t n = calls.fetch_add(1, std::memory_order_relaxed);
      const int64_t s = ns[0].load(std::memory_order_relaxed);
      const int64_t p = ns[1].load(std::memory_order_relaxed);
      if (p == 0) return true;  // measure each way once first
      if (s == 0) return false;
      const bool best_parallel = p < s;
      return (n % kExplore == kExplore - 1) ? !best_parallel : best_parallel;
    }

    void record(bool parallel, int64_t ns_per_task) {
      const int64_t v = std::max<int64_t>(1, ns_per_task);
      std::atomic<int64_t>& a = ns[parallel ? 1 : 0];
      const int64_t old = a.load(std::memory_order_relaxed);
      a.store(old == 0 ? v : old + (v - old) / 4, std::memory_order_relaxed);
    }
  };
  static constexpr int kKinds = 2;
  static constexpr uint32_t kExplore = 16;

  Choice& choice_for(int kind, int64_t n_tasks) {
    int bucket = 0;
    while (bucket < 62 && (int64_t(2) << bucket) <= n_tasks) ++bucket;
    kind = std::min(std::max(kind, 0), kKinds - 1);
    return choices_[kind][bucket];
  }

  bool try_acquire() {
    bool expected = false;
    return busy_.compare_exchange_strong(expected, true, std::memory_order_acquire);
  }

  void drain(TaskFn fn, void* ctx, int64_t n_tasks) {
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks) return;
      fn(ctx, t);
    }
  }

  // Called with mu_ held.
  void ensure_workers(int n) {
    while (static_cast<int>(threads_.size()) < n) {
      try {
        threads_.emplace_back([this] { worker_loop(); });
        threads_.back().detach();
      } catch (const std::exception&) {  // no more threads: the caller and those there are
        break;
      }
    }
  }

  void worker_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return generation_ != seen && open_ && wanted_ > 0; });
      seen = generation_;
      --wanted_;
      active_.fetch_add(1, std::memory_order_relaxed);
      TaskFn fn = fn_;
      void* ctx = ctx_;
      const int64_t n = n_tasks_;
      lock.unlock();
      drain(fn, ctx, n);
      lock.lock();
      if (active_.fetch_sub(1, std::memory_order_release) == 1 && !open_) {
        done_cv_.notify_one();
      }
    }
  }

  const long pid_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::vector<std::thread> threads_;  // detached; kept for their count
  std::atomic<bool> busy_{false};
  std::atomic<int64_t> next_{0};
  Choice choices_[kKinds][63];
  // guarded by mu_
  uint64_t generation_ = 0;
  bool open_ = false;
  int wanted_ = 0;  // workers still to join the current job
  std::atomic<int> active_{0};  // workers inside drain() (changed under mu_)
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_tasks_ = 0;
};

// parallel_for over tasks [0, n) with a callable: f(t); kind as for TaskPool::run.
template <class F>
inline void pool_for(int64_t n, int max_threads, F&& f, int kind = 0) {
  using Fn = std::remove_reference_t<F>;
  TaskPool::instance().run(
      n, max_threads, [](void* ctx, int64_t t) { (*static_cast<Fn*>(ctx))(t); },
      static_cast<void*>(&f), kind);
}

}  // namespace
}  // namespace cpu
}  // namespace pyengine
