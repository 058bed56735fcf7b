// conntracct probe: reads the kernel's own conntrack accounting and emits
// NEW / UPDATE / DESTROY flow records into a BPF ring buffer.
//
// Kernel struct layouts are never taken from headers: every offset below is a
// -D macro computed from the running kernel's BTF (conntracct/probe/offsets.py).
// The record layout is defined once, in bpf/record.h; the agent derives its
// side of it from that header (conntracct/probe/layout.py).
//
// One accounting routine, account(); thin entry points per attach mode,
// selected with -DMODE_NETFILTER, -DMODE_KPROBE or -DMODE_FENTRY.

#include <uapi/linux/ptrace.h>

#ifdef MODE_NETFILTER
// BCC decides whether the kernel has bpf_probe_read_kernel by reading
// /proc/kallsyms, which it only does as uid 0; otherwise it prepends
// "#define bpf_probe_read_kernel bpf_probe_read".  Netfilter programs may not
// call bpf_probe_read, and this mode needs Linux 6.4, which has the _kernel
// helper: undo the define so an unprivileged agent (CAP_BPF, CAP_PERFMON,
// CAP_NET_ADMIN, README "Least privilege") loads the same program as root.
#undef bpf_probe_read_kernel
#endif

#include "record.h"   // record layout, kinds, flags, stats and settings indexes
#include "fastpath.h" // the fast path's start read, hint index and tag (bench/p1_hook_cost.py times them)

#ifdef MODE_NETFILTER
#define TRACK_UNEVENTED 1   // flow ends come from ctnetlink events
#else
#define TRACK_UNEVENTED 0   // flow ends come from the destroy hook
#endif

struct netns_cache {
    u64 net;
    u32 inum;
};

BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);
BPF_HASH(flows, struct flow_key, struct flow_state, MAX_FLOWS);
BPF_PERCPU_ARRAY(stats, u64, STAT_COUNT);
BPF_ARRAY(settings, u64, SET_COUNT);
BPF_PERCPU_ARRAY(netns_cache, struct netns_cache, 1);

// Fast path: "this flow has no record due before jiffies J", as one 64-bit
// hint word in a small set-associative table indexed by the nf_conn
// pointer.  Most packets stop here: no clock read, no 56-byte key, no
// lookup in the (large, cold) flows map.  A hint is a 32-bit tag of the flow
// instance (nf_conn pointer and timestamp start: a recycled nf_conn or a
// reused tuple is another instance) and the low 32 bits of the jiffies
// before which nothing is due.  One aligned 64-bit store: never torn
// between CPUs.  A hint is only ever earlier than the flow's real next_emit
// (see remember_not_due), so it never delays a record; when it passes, the
// slow path below decides as before (and emits each UPDATE on one CPU
// only).  Flows without a timestamp extension always take the slow path.
// 256 buckets of 8 ways, one cache line each: 16 KB, small enough for the
// kernel to kmalloc it (the direct map: no TLB misses of its own) and dense
// enough to stay cached; measured (bench/p1_hook_cost.py) against 16,384
// direct-mapped words (128 KB, vmalloc'd): 10-30 ns cheaper per packet with
// 256 light flows.  Hints for up to ~2,000 recently seen flows; beyond, a
// full bucket gives a way up and more packets take the slow path.
#define HINT_BUCKET_BITS 8
#define HINT_WAYS 8
struct hint_bucket {
    u64 way[HINT_WAYS];
};
BPF_ARRAY(hints, struct hint_bucket, 1 << HINT_BUCKET_BITS);
// The longest jiffy assumed (HZ >= 100): a duration converted to jiffies
// with it is never longer than the duration, whatever CONFIG_HZ is.
#define JIFFY_NS_MAX 10000000ULL

static __always_inline void count(int index) {
    u64 *v = stats.lookup(&index);
    if (v)
        (*v)++;
}

static __always_inline u64 setting(int index) {
    u64 *v = settings.lookup(&index);
    return v ? *v : 0;
}

// UPDATE interval for a flow of the given age: RATE_CURVE(age) is generated
// from the configured curve, e.g. age < 60s ? 20s : age < 300s ? 60s : 300s.
static __always_inline u64 update_interval(u64 age) {
    return RATE_CURVE(age);
}

static __always_inline void copy_tuple(struct ct_tuple *t, const u8 *kt) {
    __builtin_memcpy(t->src, kt + TUPLE_SRC_U3, 16);
    __builtin_memcpy(t->dst, kt + TUPLE_DST_U3, 16);
    __builtin_memcpy(&t->src_u, kt + TUPLE_SRC_U, 2);
    __builtin_memcpy(&t->dst_u, kt + TUPLE_DST_U, 2);
    t->family = kt[TUPLE_L3NUM];
    t->proto = kt[TUPLE_PROTONUM];
    t->_pad[0] = 0;
    t->_pad[1] = 0;
}

static __always_inline u32 netns_inum(u64 net) {
    int zero = 0;
    struct netns_cache *c = netns_cache.lookup(&zero);
    if (c && c->net == net)
        return c->inum;
    u32 inum = 0;
    bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + NET_INUM));
    if (c) {
        c->net = net;
        c->inum = inum;
    }
    return inum;
}

// 1: no record is due for this packet's flow; 0: take the slow path.
static __always_inline int nothing_due(void *ct) {
    u64 start = fast_start_ns(ct);
    if (!start)
        return 0;
    u32 index = hint_index((u64)ct, HINT_BUCKET_BITS);
    struct hint_bucket *b = hints.lookup(&index);
    if (!b)
        return 0;
    u64 tag = hint_tag((u64)ct, start);
#pragma unroll
    for (int i = 0; i < HINT_WAYS; i++) {
        u64 hint = *(volatile u64 *)&b->way[i];
        if ((hint & HINT_TAG_MASK) == tag)
            return (s32)((u32)hint - (u32)bpf_jiffies64()) > 0;
    }
    return 0;
}

// The flow (ct, start_ns) has nothing due before due_ns (its next_emit):
// let the fast path skip its packets until a little before then.  Its way:
// the one it had, else one whose hint has passed (or is empty), else one
// picked by the tag.
static __always_inline void remember_not_due(void *ct, u64 start_ns, u64 due_ns, u64 now) {
    if (!start_ns || due_ns <= now)
        return;
    u64 left = (due_ns - now) / JIFFY_NS_MAX;
    if (left < 2)
        return;
    if (left > 0x3FFFFFFF)
        left = 0x3FFFFFFF;
    u32 index = hint_index((u64)ct, HINT_BUCKET_BITS);
    struct hint_bucket *b = hints.lookup(&index);
    if (!b)
        return;
    u64 tag = hint_tag((u64)ct, start_ns);
    u32 jiffies = bpf_jiffies64();
    int way = -1, passed = -1;
#pragma unroll
    for (int i = 0; i < HINT_WAYS; i++) {
        u64 hint = *(volatile u64 *)&b->way[i];
        if ((hint & HINT_TAG_MASK) == tag)
            way = i;
        else if (passed < 0 && (!hint || (s32)((u32)hint - jiffies) <= 0))
            passed = i;
    }
    if (way < 0)
        way = passed >= 0 ? passed : (int)((tag >> 33) & (HINT_WAYS - 1));
    if (way >= 0 && way < HINT_WAYS)
        *(volatile u64 *)&b->way[way] = tag | (u32)(jiffies + left - 1);
}

// -- the slow path, in steps: read the entry, filter, key, decide, fill the
// record, update the state.  Every step is inlined into one program: the
// names cost no instructions.

#define CT_WORDS ((CT_READ_LEN + 7) / 8)

// What the slow path reads through the nf_conn's extension pointer.
struct ext_view {
    u64 area;               // the extension area, 0 without one
    u64 tstamp[2];          // start, stop (wall clock); 0 without a timestamp extension
    u8 off[EXT_NUM];        // each extension's offset in the area, 0 if absent
};

// The kernel's counters (nf_conn_acct: packets and bytes of the original
// direction, then of the reply) as totals: the one copy into a record or a
// flow's state.
static __always_inline void put_counters(u64 *packets, u64 *bytes, const u64 *acct) {
    packets[0] = acct[0];
    bytes[0] = acct[1];
    packets[1] = acct[2];
    bytes[1] = acct[3];
}

// Filter.  Unconfirmed entries may still be dropped without any end event;
// they are accounted from their first packet after confirmation.  Dying ones
// have been (or are being) reported as destroyed.
static __always_inline int worth_accounting(u64 status, int destroy) {
    if (!(status & (1UL << IPS_CONFIRMED_BIT)))
        return 0;
    return destroy || !(status & (1UL << IPS_DYING_BIT));
}

// The extension offsets and the timestamps (part of the flow's key); the
// flags for the extensions that are missing.
static __always_inline u8 read_extensions(const u8 *c, struct ext_view *e) {
    u8 flags = 0;
    e->area = *(u64 *)(c + CT_EXT);
    if (e->area)
        bpf_probe_read_kernel(e->off, sizeof(e->off), (void *)(e->area + EXT_OFFSET));
    if (e->off[EXT_TSTAMP_ID])
        bpf_probe_read_kernel(e->tstamp, sizeof(e->tstamp),
                              (void *)(e->area + e->off[EXT_TSTAMP_ID] + TSTAMP_START));
    else
        flags |= FLAG_NO_TSTAMP;
    if (!e->off[EXT_ECACHE_ID])
        flags |= FLAG_NO_EVENTS;
    return flags;
}

static __always_inline u8 read_counters(const struct ext_view *e, u64 *acct) {
    if (!e->off[EXT_ACCT_ID])
        return FLAG_NO_ACCT;
    bpf_probe_read_kernel(acct, 4 * sizeof(u64), (void *)(e->area + e->off[EXT_ACCT_ID] + ACCT_COUNTER));
    return 0;
}

static __always_inline void make_key(struct flow_key *key, const u8 *c, u64 start_ns) {
    copy_tuple(&key->orig, c + CT_TUPLE_ORIG);
    key->netns = netns_inum(*(u64 *)(c + CT_NET));
    key->zone = *(u16 *)(c + CT_ZONE_ID);
    key->start_ns = start_ns;
}

// Decide: KIND_DESTROY, KIND_UPDATE, KIND_NEW, or 0 when no record is due.
// *st is the flow's state in the map (NULL if it has none), `fresh` the
// state the record's deltas count from, *due the flow's next emission when
// it has nothing due yet (the fast path's hint).
static __always_inline u8 decide(struct flow_key *key, int destroy, u64 now, struct flow_state **stp,
                                 struct flow_state *fresh, u8 *flags, u64 *due) {
    struct flow_state *st = flows.lookup(key);
    *stp = st;
    if (destroy) {
        if (st) {
            *fresh = *st;
            *flags |= fresh->flags;
        } else
            *flags |= FLAG_FIRST_SIGHT;
        if (st && flows.delete(key) == 0)
            count(STAT_STATE_DELETES);
        return KIND_DESTROY;
    }
    if (!st) {
        fresh->first_seen = now;
        return KIND_NEW;
    }
    u64 next = st->next_emit;
    if (now < next) {
        *due = next;
        return 0;
    }
    // Two CPUs may carry packets of one flow: only one emits the UPDATE.
    if (__sync_val_compare_and_swap(&st->next_emit, next, now + 1000000000ULL) != next)
        return 0;
    *fresh = *st;
    *flags |= fresh->flags;
    return KIND_UPDATE;
}

// A flow seen for the first time: its state goes into the map.  Returns
// KIND_NEW, KIND_TRACK (an old flow the agent must learn of anyway) or 0
// (no record); *due is its first emission once it is in the map.
static __always_inline u8 start_tracking(struct flow_key *key, struct flow_state *fresh, const u64 *acct,
                                         u64 now, u64 age, u8 *flags, u64 *due) {
    u64 agent_start = setting(SET_AGENT_START);
    int backdated = key->start_ns ? key->start_ns < agent_start : setting(SET_STAMPED_SINCE_START);
    if (backdated) {
        // An old flow seen for the first time: no NEW, and its first
        // UPDATE is spread over its interval so a restart on a busy
        // host is not a burst.  Its deltas count from now.
        u64 iv = update_interval(age);
        fresh->next_emit = now + (bpf_get_prandom_u32() % (iv / 1000000 + 1)) * 1000000;
        put_counters(fresh->packets, fresh->bytes, acct);
        *flags |= FLAG_BACKDATED;
        fresh->flags = FLAG_BACKDATED;
    } else {
        fresh->next_emit = now + update_interval(age);
    }
    int err = flows.insert(key, fresh);
    if (err) {
        if (err != -17)     // -EEXIST: another CPU saw it first
            count(STAT_STATE_FULL);
        return 0;
    }
    count(STAT_STATE_INSERTS);
    *due = fresh->next_emit;
    if (!backdated)
        return KIND_NEW;
    // In netfilter mode the agent must still learn of an old flow whose
    // end ctnetlink will not report.
    if (!TRACK_UNEVENTED || !(*flags & FLAG_NO_EVENTS))
        return 0;
    return KIND_TRACK;
}

static __always_inline void fill_record(struct flow_record *r, const u8 *c, const struct flow_key *key,
                                        const struct ext_view *e, const struct flow_state *fresh,
                                        const u64 *acct, u8 kind, u8 flags, u64 now) {
    r->ts = now;
    r->start_ns = e->tstamp[0];
    r->stop_ns = e->tstamp[1];
    r->first_seen = fresh->first_seen;
    put_counters(r->packets, r->bytes, acct);
    r->delta_packets[0] = acct[0] - fresh->packets[0];
    r->delta_bytes[0] = acct[1] - fresh->bytes[0];
    r->delta_packets[1] = acct[2] - fresh->packets[1];
    r->delta_bytes[1] = acct[3] - fresh->bytes[1];
    r->status = *(u64 *)(c + CT_STATUS);
    r->orig = key->orig;
    copy_tuple(&r->reply, c + CT_TUPLE_REPLY);
    r->netns = key->netns;
    r->mark = *(u32 *)(c + CT_MARK);
    r->zone = key->zone;
    r->kind = kind;
    r->tcp_state = r->orig.proto == 6 ? c[CT_TCP_STATE] : 0;
    r->flags = flags;
    r->_pad[0] = r->_pad[1] = r->_pad[2] = 0;
}

// After a record: its totals are what the flow's next deltas count from.
// Returns the flow's next emission (the fast path's hint).
static __always_inline u64 update_state(u8 kind, struct flow_state *st, struct flow_key *key,
                                        const u64 *acct, u64 now, u64 age, u64 due) {
    if (kind == KIND_UPDATE) {         // st is set: decide() returns UPDATE only for a flow in the map
        due = now + update_interval(age);
        st->next_emit = due;
        put_counters(st->packets, st->bytes, acct);
    } else if (kind == KIND_NEW) {      // never back-dated: start_tracking made those TRACK or nothing
        struct flow_state *ins = flows.lookup(key);
        if (ins)
            put_counters(ins->packets, ins->bytes, acct);
    }
    return due;
}

// Reads one nf_conn and emits a record when one is due.  Returns the
// flow's next emission time (and its start and the time now through the
// pointers) when the fast path may skip its packets until then, else 0.
static __always_inline u64 account_slow(void *ct, int destroy, u64 *hint_start, u64 *hint_now) {
    u64 words[CT_WORDS];    // u64 array: aligned loads from it
    u8 *c = (u8 *)words;
    if (bpf_probe_read_kernel(words, sizeof(words), ct))
        return 0;
    if (!worth_accounting(*(u64 *)(c + CT_STATUS), destroy))
        return 0;
    struct ext_view e = {};
    u8 flags = read_extensions(c, &e);
    struct flow_key key = {};
    make_key(&key, c, e.tstamp[0]);

    u64 now = bpf_ktime_get_ns();
    *hint_start = e.tstamp[0];
    *hint_now = now;
    struct flow_state *st = NULL;
    struct flow_state fresh = {};
    u64 due = 0;
    u8 kind = decide(&key, destroy, now, &st, &fresh, &flags, &due);
    if (!kind)
        return due;

    u64 acct[4] = {};       // orig packets, orig bytes, reply packets, reply bytes
    flags |= read_counters(&e, acct);
    u64 wall_now = now + setting(SET_WALL_OFFSET);
    u64 age = e.tstamp[0] && wall_now > e.tstamp[0] ? wall_now - e.tstamp[0] : now - fresh.first_seen;
    if (kind == KIND_NEW) {
        kind = start_tracking(&key, &fresh, acct, now, age, &flags, &due);
        if (!kind)
            return due;
    }

    // A kind no sink wants (NEW, UPDATE): the flow's state moves on as if
    // the record were written, so the DESTROY's deltas are what they would
    // be; a flow without end events still gets its records (the agent
    // sweeps for its end).
    if ((setting(SET_QUIET_KINDS) >> kind) & 1 && !(flags & FLAG_NO_EVENTS))
        return update_state(kind, st, &key, acct, now, age, due);

    struct flow_record *r = records.ringbuf_reserve(sizeof(struct flow_record));
    if (!r) {
        count(STAT_RECORDS_LOST);
        if (st && kind == KIND_UPDATE)
            st->next_emit = now;    // retry with the next packet
        return due;
    }
    fill_record(r, c, &key, &e, &fresh, acct, kind, flags, now);
    records.ringbuf_submit(r, 0);
    return update_state(kind, st, &key, acct, now, age, due);
}

// `destroy` is set when the flow is being destroyed (kprobe/fentry modes).
// One call site for remember_not_due: its unrolled loop once, not thrice
// (the BPF stack is 512 bytes).
static __always_inline int account(void *ct, int destroy) {
    if (!destroy && nothing_due(ct))
        return 0;
    u64 start = 0, now = 0;
    u64 due = account_slow(ct, destroy, &start, &now);
    if (due && !destroy)
        remember_not_due(ct, start, due, now);
    return 0;
}

#ifdef MODE_NETFILTER
// BPF_PROG_TYPE_NETFILTER: linked at PRE_ROUTING and LOCAL_OUT (IPv4, IPv6)
// with a priority just after conntrack, so skb->_nfct is set and its
// counters already include this packet.
struct nf_prog_ctx {
    void *state;
    void *skb;
};

int netfilter_hook(struct nf_prog_ctx *ctx) {
    // ctx->skb is a BTF pointer: a direct load, no helper call.
    u64 nfct = *(u64 *)((u8 *)ctx->skb + SKB_NFCT);
    void *ct = (void *)(nfct & ~7UL);   // low bits carry ctinfo
    if (ct)
        account(ct, 0);
    return 1;   // NF_ACCEPT: the probe never changes a verdict
}
#endif

#ifdef MODE_NETFILTER
// Flow ends come from ctnetlink in this mode, and the agent takes each ended
// flow's state out of `flows`: a batch of them per run of this program
// (BPF_PROG_TYPE_SYSCALL, run by bpf(BPF_PROG_TEST_RUN)), one syscall per
// batch instead of one per flow.  The arrays are mapped into the agent.
BPF_F_TABLE("array", u32, struct flow_key, take_keys, TAKE_BATCH, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct take_slot, take_slots, TAKE_BATCH, BPF_F_MMAPABLE);

struct take_args {
    u32 count;      // keys in take_keys[0..count)
};

int take_flow_states(struct take_args *args) {
    u32 count = args->count;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < TAKE_BATCH; i++) {
        if (i >= count)
            break;
        u32 index = i;
        struct flow_key *key = take_keys.lookup(&index);
        struct take_slot *slot = take_slots.lookup(&index);
        if (!key || !slot)
            break;
        struct flow_state *st = flows.lookup(key);
        slot->found = st != NULL;
        if (st) {   // the agent counts these deletes (state_deletes)
            __builtin_memcpy(&slot->state, st, sizeof(slot->state));
            flows.delete(key);
        }
    }
    return 0;
}
#endif

#ifdef MODE_KPROBE
// kprobe + kretprobe on __nf_ct_refresh_acct: counters are read after the
// kernel updated them.
BPF_HASH(refreshing, u64, u64, 4096);

int refresh_enter(struct pt_regs *ctx) {
    u64 ct = PT_REGS_PARM1(ctx);
    // Nothing due (decided before the counter update: the decision does
    // not depend on it): no kretprobe work either.
    if (nothing_due((void *)ct))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    refreshing.update(&id, &ct);
    return 0;
}

int refresh_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u64 *ct = refreshing.lookup(&id);
    if (!ct)
        return 0;
    u64 p = *ct;
    refreshing.delete(&id);
    account((void *)p, 0);
    return 0;
}

int flow_destroy(struct pt_regs *ctx) {
    account((void *)PT_REGS_PARM1(ctx), 1);
    return 0;
}
#endif

#ifdef MODE_FENTRY
KRETFUNC_PROBE(__nf_ct_refresh_acct, void *ct) {
    account(ct, 0);
    return 0;
}

// One more macro level so DESTROY_FUNC expands before KFUNC_PROBE pastes it.
#define KFUNC_PROBE_EXPANDED(func, ...) KFUNC_PROBE(func, __VA_ARGS__)
KFUNC_PROBE_EXPANDED(DESTROY_FUNC, void *ct) {
    account(ct, 1);
    return 0;
}
#endif
