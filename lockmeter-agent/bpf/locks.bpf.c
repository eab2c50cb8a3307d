// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// lockmeter agent: file lock calls host-wide, one event per call and per release.
//
// Hooks: three BTF tracepoints of fs/locks.c (tp_btf: typed arguments, no tracefs mount, no
// syscall hooks, so other system calls on the host pay nothing):
//   filelock:flock_lock_inode   every flock(2) attempt, unlock and close-time release
//   filelock:posix_lock_inode   every POSIX / OFD attempt, unlock and close-time release
//   filelock:fcntl_setlk        the end of an F_SETLK(W) / F_OFD_SETLK(W) call, with its result
// A call's wait starts at its first attempt; a blocking attempt that finds the lock taken returns
// FILE_LOCK_DEFERRED (a conflict), sleeps, and retries with the same request (same pointer).
// flock calls end at the attempt that does not defer; fcntl calls at fcntl_setlk.
//
// Cost matters (every lock call on the host runs this): fields are read with direct loads
// (BTF pointers, CO-RE relocated), not bpf_probe_read; state is kept only for calls that had
// to wait, and the hash of waiting calls is looked at only while some call is waiting.
//
// Events are staged per CPU and sent to the ring buffer BATCH at a time: a ring reservation
// (a spin lock, a header, the reader's cache lines) per event cost more than the rest of the
// program. A staged event waits at most FLUSH_NS: the first event of a batch arms a timer
// pinned to its CPU that sends whatever is staged (kernel 6.7+, BPF_F_TIMER_CPU_PIN). Where
// that timer cannot run, every event goes to the ring at once, as before. Batches from
// different CPUs reach user space out of order; it merges them by time.
//
// Kernel structures are declared here with only the fields used and preserve_access_index, so
// the loader relocates every field offset against the running kernel's BTF (CO-RE); no
// vmlinux.h is needed to build.

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;

struct qstr {
	const unsigned char *name;
} __attribute__((preserve_access_index));

struct dentry {
	struct dentry *d_parent;
	struct qstr d_name;
} __attribute__((preserve_access_index));

struct super_block {
	u32 s_dev;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	unsigned int i_generation;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct path {
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct file {
	struct path f_path;
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct task_struct {
	char comm[16];
} __attribute__((preserve_access_index));

struct file_lock_core {
	void *flc_owner;
	unsigned int flc_flags;
	unsigned char flc_type;
	struct file *flc_file;
} __attribute__((preserve_access_index));

struct file_lock {
	struct file_lock_core c;
} __attribute__((preserve_access_index));

#define FL_POSIX 1
#define FL_FLOCK 2
#define FL_SLEEP 128
#define FL_OFDLCK 1024
#define F_UNLCK 2
#define F_SETLKW 7
#define F_OFD_SETLKW 38
#define FILE_LOCK_DEFERRED 1
#define EAGAIN 11
#define EACCES 13

#define KIND_FLOCK 1
#define KIND_POSIX 2
#define KIND_OFD 3

#define OP_CALL 1    // a lock or unlock call: ts_start..ts_end is the time spent in it
#define OP_RELEASE 2 // the kernel released a lock outside a lock call (close, exit)
#define OP_NAME 3    // the path of an inode, leaf first (sent once per inode)
#define OP_BATCH 4   // a batch header followed by n events of one CPU

// Staging (see the top of the file).
#define BATCH 32
#define FLUSH_NS 10000000ULL  // a staged event is sent within ~10 ms
#define RETRY_NS 1000000ULL   // the timer found its CPU writing the stage: again in 1 ms
#define BPF_F_TIMER_CPU_PIN (1ULL << 1) // not in older uapi headers
#define CLOCK_MONOTONIC 1
#define TIMER_UNSET 0
#define TIMER_OK 1
#define TIMER_OFF 2 // no pinned timer here: events are sent one by one

#define FLAG_CONFLICT 1 // the call found the lock taken (waited, or would have)
#define FLAG_BLOCKING 2 // F_SETLKW / LOCK_EX without LOCK_NB

#define MAX_DEPTH 16
#define NAME_LEN 64

// An inode number is reused once its file is deleted: (device, inode, generation) names one
// file. File systems that do not set i_generation (0) can still confuse a reused number.
struct event {
	u64 ts_start;
	u64 ts_end;
	u64 ino;
	u64 owner;
	u32 dev;
	u32 gen;
	s32 ret;
	u8 op;
	u8 kind;
	u8 type;
	u8 flags;
	char comm[16];
};

struct name_event {
	u64 ts_start; // unused: the header matches struct event's
	u64 ts_end;
	u64 ino;
	u64 owner;
	u32 dev;
	u32 gen;
	u32 tgid;     // the locking process (its mount namespace names the path)
	u8 op;
	u8 depth;     // components filled
	u8 truncated; // the walk did not reach the file system's root
	u8 pad;
	char comm[16];
	char comps[MAX_DEPTH][NAME_LEN];
};

// A batch as sent: this header, then `n` struct event. The op byte sits where struct event
// has its op (offset 44), so user space tells records apart by one byte.
struct batch_hdr {
	u64 gen;   // batches of one CPU, numbered from 1
	u64 pad0[3];
	u32 cpu;   // offset 32
	u32 n;     // offset 36
	u32 pad1;
	u8 op;     // offset 44
	u8 pad2[19];
};

struct stage {
	struct batch_hdr h;
	struct event ev[BATCH];
	// Not sent:
	u32 busy;  // a program is writing the stage (the timer, or a preempting program, backs off)
	u8 timer;  // TIMER_UNSET, TIMER_OK, TIMER_OFF
	u8 armed;  // the flush timer is pending
};

struct flusher {
	struct bpf_timer t;
};

#ifndef RINGBUF_BYTES
#define RINGBUF_BYTES (1 << 24)
#endif

struct inflight {
	u64 ts_start;
	u64 request; // the struct file_lock being retried
	u8 flags;
};

struct inode_key {
	u64 ino;
	u32 dev;
	u32 gen;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RINGBUF_BYTES);
} events SEC(".maps");

// Calls that had to wait, by thread.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u32);
	__type(value, struct inflight);
} calls SEC(".maps");

// [0] entries in `calls` (an upper bound: a wait interrupted by a signal leaves one behind
// until its thread locks again), [1] events dropped because the ring buffer was full.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, u32);
	__type(value, u64);
} counters SEC(".maps");

// Inodes whose path was sent.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct inode_key);
	__type(value, u8);
} named SEC(".maps");

// Events of this CPU not yet sent.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct stage);
} stage SEC(".maps");

// One flush timer per CPU, by CPU number (user space sets the size to the possible CPUs).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024);
	__type(key, u32);
	__type(value, struct flusher);
} flushers SEC(".maps");

// The last inode named on this CPU: a loop on one lock file skips the LRU lookup.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct inode_key);
} last_named SEC(".maps");

static __always_inline u64 *counter(u32 i)
{
	return bpf_map_lookup_elem(&counters, &i);
}

static __always_inline void count_drop(void)
{
	u64 *n = counter(1);
	if (n)
		__sync_fetch_and_add(n, 1);
}

// Sends the path of an inode once (the LRU map remembers which were sent): the dentry names
// from the file up to its file system's root, leaf first. User space adds the mount point.
static __always_inline void send_name(struct file *file, u32 dev, u64 ino, u32 gen)
{
	struct inode_key key = { .ino = ino, .dev = dev, .gen = gen };
	u32 zero = 0;
	u8 one = 1;
	if (!file)
		return;
	struct inode_key *last = bpf_map_lookup_elem(&last_named, &zero);
	if (last && last->ino == ino && last->dev == dev && last->gen == gen)
		return;
	if (bpf_map_lookup_elem(&named, &key)) {
		if (last)
			*last = key;
		return;
	}
	struct name_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop();
		return;
	}
	e->op = OP_NAME;
	e->dev = dev;
	e->ino = ino;
	e->gen = gen;
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->truncated = 1;
	e->depth = 0;
	struct dentry *d = BPF_CORE_READ(file, f_path.dentry);
	for (int i = 0; i < MAX_DEPTH; i++) {
		if (!d)
			break;
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		if (parent == d) {
			e->truncated = 0;
			break;
		}
		const unsigned char *name = BPF_CORE_READ(d, d_name.name);
		bpf_probe_read_kernel_str(e->comps[i], NAME_LEN, name);
		e->depth = i + 1;
		d = parent;
	}
	if (e->truncated && d && BPF_CORE_READ(d, d_parent) == d)
		e->truncated = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	bpf_map_update_elem(&named, &key, &one, BPF_ANY);
	if (last)
		*last = key;
}

static __always_inline u8 kind_of(unsigned int fl_flags)
{
	return (fl_flags & FL_FLOCK) ? KIND_FLOCK : (fl_flags & FL_OFDLCK) ? KIND_OFD : KIND_POSIX;
}

static __always_inline void fill(struct event *e, u8 op, u32 dev, u64 ino, u32 gen, u64 owner,
				 unsigned int fl_flags, u8 type, u64 start, u64 now, u8 flags, int ret)
{
	e->ts_start = start;
	e->ts_end = now;
	e->ino = ino;
	e->dev = dev;
	e->gen = gen;
	e->owner = owner;
	e->ret = ret;
	e->op = op;
	e->kind = kind_of(fl_flags);
	e->type = type;
	if (ret == -EAGAIN || ret == -EACCES)
		flags |= FLAG_CONFLICT;
	e->flags = flags | ((fl_flags & FL_SLEEP) ? FLAG_BLOCKING : 0);
	if (op == OP_CALL) {
		// Two loads from the task (a trusted BTF pointer) instead of a helper's string copy.
		const u64 *comm = (const u64 *)bpf_get_current_task_btf()->comm;
		u64 *to = (u64 *)e->comm;
		to[0] = comm[0];
		to[1] = comm[1];
	} else // releases are matched by owner; who released does not matter
		__builtin_memset(e->comm, 0, sizeof(e->comm));
}

// One event straight to the ring.
static __always_inline void emit_now(u8 op, u32 dev, u64 ino, u32 gen, u64 owner,
				     unsigned int fl_flags, u8 type, u64 start, u64 now, u8 flags,
				     int ret)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop();
		return;
	}
	fill(e, op, dev, ino, gen, owner, fl_flags, type, start, now, flags, ret);
#ifdef LOCKMETER_BPF_DISCARD
	bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
	return;
#endif
	// Never wake the reader: it drains on a timer. Asking the ring how full it is (to wake it
	// when nearly full) reads the reader's position, a cache line the reader keeps writing.
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

// Sends the staged events of this CPU as one record.
static __always_inline void flush(struct stage *s)
{
	u32 n = s->h.n;
	if (n == 0)
		return;
	if (n > BATCH)
		n = BATCH;
#ifdef LOCKMETER_BPF_DISCARD
	s->h.n = 0; // staged, never sent
	return;
#endif
	s->h.gen += 1;
	s->h.cpu = bpf_get_smp_processor_id(); // the stage's CPU: flushes run there
	s->h.op = OP_BATCH;
	s->h.n = n;
	if (bpf_ringbuf_output(&events, s, sizeof(struct batch_hdr) + n * sizeof(struct event),
			       BPF_RB_NO_WAKEUP))
		count_drop();
	s->h.n = 0;
}

static int flush_timer(void *map, u32 *key, struct flusher *f)
{
	u32 zero = 0;
	struct stage *s = bpf_map_lookup_elem(&stage, &zero);
	if (!s || *key != bpf_get_smp_processor_id())
		return 0;
	if (s->busy) {
		bpf_timer_start(&f->t, RETRY_NS, BPF_F_TIMER_CPU_PIN);
		return 0;
	}
	s->armed = 0;
	flush(s);
	return 0;
}

// Arms this CPU's flush timer; false where it cannot run (events then go out one by one).
static __noinline int arm_timer(struct stage *s)
{
	u32 cpu = bpf_get_smp_processor_id();
	struct flusher *f = bpf_map_lookup_elem(&flushers, &cpu);
	if (!f)
		return 0;
	if (s->timer == TIMER_UNSET) {
		long err = bpf_timer_init(&f->t, &flushers, CLOCK_MONOTONIC);
		if (err && err != -16) // -EBUSY: this CPU's timer was initialised already
			return 0;
		if (bpf_timer_set_callback(&f->t, flush_timer))
			return 0;
		s->timer = TIMER_OK;
	}
	if (bpf_timer_start(&f->t, FLUSH_NS, BPF_F_TIMER_CPU_PIN))
		return 0;
	s->armed = 1;
	return 1;
}

#define barrier() asm volatile("" ::: "memory")

// One event: into this CPU's stage, or straight to the ring.
static __always_inline void emit(u8 op, u32 dev, u64 ino, u32 gen, u64 owner,
				 unsigned int fl_flags, u8 type, u64 start, u64 now, u8 flags, int ret)
{
	u32 zero = 0;
	struct stage *s = bpf_map_lookup_elem(&stage, &zero);
	if (!s || s->timer == TIMER_OFF || s->busy) {
		emit_now(op, dev, ino, gen, owner, fl_flags, type, start, now, flags, ret);
		return;
	}
	s->busy = 1;
	barrier();
	u32 n = s->h.n;
	if (n >= BATCH) {
		flush(s);
		n = 0;
	}
	fill(&s->ev[n], op, dev, ino, gen, owner, fl_flags, type, start, now, flags, ret);
	s->h.n = n + 1;
	if (n + 1 == BATCH) {
		flush(s);
	} else if (!s->armed && !arm_timer(s)) {
		s->timer = TIMER_OFF;
		flush(s);
	}
	barrier();
	s->busy = 0;
}

// The waiting call of this thread for this request, if any (and only looked up while some
// call is waiting somewhere).
// Sets *tid (the thread) only when it looks.
static __always_inline struct inflight *waiting_call(u32 *tid)
{
	u64 *pending = counter(0);
	if (!pending || *pending == 0)
		return 0;
	*tid = (u32)bpf_get_current_pid_tgid();
	return bpf_map_lookup_elem(&calls, tid);
}

static __always_inline void forget_call(u32 tid)
{
	if (bpf_map_delete_elem(&calls, &tid) == 0) {
		u64 *pending = counter(0);
		if (pending)
			__sync_fetch_and_add(pending, -1);
	}
}

// A deferred attempt: the call found the lock taken and sleeps; remember when it started.
static __always_inline void defer_call(u32 tid, struct inflight *in, u64 request, u64 now)
{
	if (in && in->request == request) {
		in->flags |= FLAG_CONFLICT;
		return;
	}
	struct inflight n = { .ts_start = now, .request = request, .flags = FLAG_CONFLICT };
	if (in) {
		*in = n; // a stale call (an interrupted wait) of this thread: replaced
		return;
	}
	if (bpf_map_update_elem(&calls, &tid, &n, BPF_NOEXIST) == 0) {
		u64 *pending = counter(0);
		if (pending)
			__sync_fetch_and_add(pending, 1);
	}
}

// One attempt of a lock function. Unlocks (explicit, or the kernel's at close and exit) are
// reported at once. Lock requests: a deferred attempt starts (or continues) a wait; for flock
// the first attempt that does not defer ends the call (fcntl calls end at fcntl_setlk).
static __always_inline void on_attempt(struct inode *inode, struct file_lock *fl, int ret,
				       int is_flock)
{
#ifdef LOCKMETER_BPF_NOOP
	return;
#endif
	unsigned int fl_flags = fl->c.flc_flags;
	u8 type = fl->c.flc_type;
	u64 now = bpf_ktime_get_ns();
	u32 dev = inode->i_sb->s_dev;
	u64 ino = inode->i_ino;
	u32 gen = inode->i_generation;
	if (type == F_UNLCK) {
		if (ret == 0)
			emit(OP_RELEASE, dev, ino, gen, (u64)fl->c.flc_owner, fl_flags, type, now, now, 0,
			     0);
		return;
	}
	u32 tid = 0;
	struct inflight *in = waiting_call(&tid);
	if (ret == FILE_LOCK_DEFERRED) {
		if (!tid)
			tid = (u32)bpf_get_current_pid_tgid();
		defer_call(tid, in, (u64)fl, now);
		return;
	}
	if (!is_flock)
		return;
	u64 start = now;
	u8 flags = 0;
	if (in) {
		if (in->request == (u64)fl) {
			start = in->ts_start;
			flags = in->flags;
		}
		forget_call(tid);
	}
	send_name(fl->c.flc_file, dev, ino, gen);
	emit(OP_CALL, dev, ino, gen, (u64)fl->c.flc_owner, fl_flags, type, start, now, flags, ret);
}

SEC("tp_btf/flock_lock_inode")
int BPF_PROG(flock_lock_inode, struct inode *inode, struct file_lock *fl, int ret)
{
	if (!inode || !fl)
		return 0;
	on_attempt(inode, fl, ret, 1);
	return 0;
}

SEC("tp_btf/posix_lock_inode")
int BPF_PROG(posix_lock_inode, struct inode *inode, struct file_lock *fl, int ret)
{
	if (!inode || !fl)
		return 0;
	on_attempt(inode, fl, ret, 0);
	return 0;
}

// The end of an fcntl lock call, with its final result (including EINTR for an interrupted
// F_SETLKW, and EDEADLK).
SEC("tp_btf/fcntl_setlk")
int BPF_PROG(fcntl_setlk, struct inode *inode, struct file_lock *fl, int ret)
{
	if (!inode || !fl)
		return 0;
	unsigned int fl_flags = fl->c.flc_flags;
	u8 type = fl->c.flc_type;
	u64 now = bpf_ktime_get_ns();
	u32 dev = inode->i_sb->s_dev;
	u64 ino = inode->i_ino;
	u32 gen = inode->i_generation;
	u64 owner = (u64)fl->c.flc_owner;
	if (type == F_UNLCK) {
		if (ret != 0) // a failed unlock
			emit(OP_CALL, dev, ino, gen, owner, fl_flags, type, now, now, 0, ret);
		return 0;
	}
	u32 tid = 0;
	struct inflight *in = waiting_call(&tid);
	u64 start = now;
	u8 flags = 0;
	if (in) {
		if (in->request == (u64)fl) {
			start = in->ts_start;
			flags = in->flags;
		}
		forget_call(tid);
	}
	send_name(fl->c.flc_file, dev, ino, gen);
	emit(OP_CALL, dev, ino, gen, owner, fl_flags, type, start, now, flags, ret);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
