// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// lockmeter agent: file lock calls host-wide, one ring-buffer event per call.
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
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct path {
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct file {
	struct path f_path;
	struct inode *f_inode;
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

#define FLAG_CONFLICT 1 // the call found the lock taken (waited, or would have)
#define FLAG_BLOCKING 2 // F_SETLKW / LOCK_EX without LOCK_NB

#define MAX_DEPTH 16
#define NAME_LEN 64

struct event {
	u64 ts_start;
	u64 ts_end;
	u64 ino;
	u64 owner;
	u32 dev;
	u32 tgid;
	s32 ret;
	u8 op;
	u8 kind;
	u8 type;
	u8 flags;
	char comm[16];
};

struct name_event {
	u64 ts_start; // unused, keeps the header layout of struct event
	u64 ts_end;
	u64 ino;
	u64 owner;
	u32 dev;
	u32 tgid;
	s32 ret;
	u8 op;
	u8 depth;     // components filled
	u8 truncated; // the walk did not reach the file system's root
	u8 pad;
	char comm[16];
	char comps[MAX_DEPTH][NAME_LEN];
};

struct inflight {
	u64 ts_start;
	u64 request; // the struct file_lock being retried
	u8 flags;
};

struct inode_key {
	u64 ino;
	u32 dev;
	u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, u32);
	__type(value, struct inflight);
} calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct inode_key);
	__type(value, u8);
} named SEC(".maps");

// [0] events dropped because the ring buffer was full.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u64);
} dropped SEC(".maps");

// Wake the reader only when a lot is waiting; it drains on a short timer otherwise, so a busy
// host costs one wake-up per timer tick instead of one per lock call.
static __always_inline u64 wakeup_flag(void)
{
	return bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > (1 << 20) ? BPF_RB_FORCE_WAKEUP
									    : BPF_RB_NO_WAKEUP;
}

static __always_inline void count_drop(void)
{
	u32 zero = 0;
	u64 *n = bpf_map_lookup_elem(&dropped, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
}

// Sends the path of an inode once (the LRU map remembers which were sent): the dentry names
// from the file up to its file system's root, leaf first. User space adds the mount point.
static __always_inline void send_name(struct file *file, u32 dev, u64 ino)
{
	struct inode_key key = { .ino = ino, .dev = dev };
	u8 one = 1;
	if (!file || bpf_map_lookup_elem(&named, &key))
		return;
	struct name_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop();
		return;
	}
	e->op = OP_NAME;
	e->dev = dev;
	e->ino = ino;
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
	bpf_ringbuf_submit(e, 0);
	bpf_map_update_elem(&named, &key, &one, BPF_ANY);
}

static __always_inline u8 kind_of(unsigned int fl_flags)
{
	return (fl_flags & FL_FLOCK) ? KIND_FLOCK : (fl_flags & FL_OFDLCK) ? KIND_OFD : KIND_POSIX;
}

static __always_inline void emit(u8 op, struct inode *inode, struct file_lock *fl, u64 start,
				 u8 flags, int ret)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_drop();
		return;
	}
	unsigned int fl_flags = BPF_CORE_READ(fl, c.flc_flags);
	u64 now = bpf_ktime_get_ns();
	e->ts_start = start ? start : now;
	e->ts_end = now;
	e->ino = BPF_CORE_READ(inode, i_ino);
	e->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	e->owner = (u64)BPF_CORE_READ(fl, c.flc_owner);
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->ret = ret;
	e->op = op;
	e->kind = kind_of(fl_flags);
	e->type = BPF_CORE_READ(fl, c.flc_type);
	if (ret == -EAGAIN || ret == -EACCES)
		flags |= FLAG_CONFLICT;
	e->flags = flags | ((fl_flags & FL_SLEEP) ? FLAG_BLOCKING : 0);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_ringbuf_submit(e, wakeup_flag());
}

// One attempt of a lock function. Unlocks (explicit, or the kernel's at close and exit) are
// reported at once. Lock requests: the first attempt of a call starts it; a deferred attempt
// marks it contended; for flock the first attempt that does not defer ends it.
static __always_inline void on_attempt(struct inode *inode, struct file_lock *fl, int ret,
				       int ends_call)
{
	if (BPF_CORE_READ(fl, c.flc_type) == F_UNLCK) {
		if (ret == 0)
			emit(OP_RELEASE, inode, fl, 0, 0, 0);
		return;
	}
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 now = bpf_ktime_get_ns();
	struct inflight *in = bpf_map_lookup_elem(&calls, &tid);
	if (in && in->request != (u64)fl)
		in = 0; // a stale call (an interrupted wait): this is a new one
	u64 start = in ? in->ts_start : now;
	u8 flags = in ? in->flags : 0;
	if (ret == FILE_LOCK_DEFERRED)
		flags |= FLAG_CONFLICT;
	if (ret == FILE_LOCK_DEFERRED || !ends_call) {
		if (in) {
			in->flags = flags;
		} else {
			struct inflight n = { .ts_start = start, .request = (u64)fl, .flags = flags };
			bpf_map_update_elem(&calls, &tid, &n, BPF_ANY);
		}
		return;
	}
	if (in)
		bpf_map_delete_elem(&calls, &tid);
	u32 dev = BPF_CORE_READ(inode, i_sb, s_dev);
	u64 ino = BPF_CORE_READ(inode, i_ino);
	send_name(BPF_CORE_READ(fl, c.flc_file), dev, ino);
	emit(OP_CALL, inode, fl, start, flags, ret);
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
// F_SETLKW and EDEADLK).
SEC("tp_btf/fcntl_setlk")
int BPF_PROG(fcntl_setlk, struct inode *inode, struct file_lock *fl, int ret)
{
	if (!inode || !fl)
		return 0;
	if (BPF_CORE_READ(fl, c.flc_type) == F_UNLCK) {
		if (ret != 0)
			emit(OP_CALL, inode, fl, 0, 0, ret); // a failed unlock
		return 0;
	}
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct inflight *in = bpf_map_lookup_elem(&calls, &tid);
	u64 start = 0;
	u8 flags = 0;
	if (in && in->request == (u64)fl) {
		start = in->ts_start;
		flags = in->flags;
	}
	if (in)
		bpf_map_delete_elem(&calls, &tid);
	u32 dev = BPF_CORE_READ(inode, i_sb, s_dev);
	u64 ino = BPF_CORE_READ(inode, i_ino);
	send_name(BPF_CORE_READ(fl, c.flc_file), dev, ino);
	emit(OP_CALL, inode, fl, start, flags, ret);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
