// The probe's fast path pieces, shared with the baselines of
// bench/p1_hook_cost.py that measure it (one copy: the benchmark times the
// probe's own code).  Needs the -D offsets conntracct/probe/offsets.py makes.
#ifndef CONNTRACCT_FASTPATH_H
#define CONNTRACCT_FASTPATH_H

#define HINT_TAG_MASK 0xFFFFFFFF00000000ULL

// The bucket of an nf_conn in a hint table of 1 << bits buckets.
static __always_inline u32 hint_index(u64 ct, int bits) {
    return ((ct >> 6) * 0x9E3779B97F4A7C15ULL) >> (64 - bits);
}

// A 32-bit tag of the flow instance (nf_conn pointer and timestamp start: a
// recycled nf_conn or a reused tuple is another instance) in the high half.
static __always_inline u64 hint_tag(u64 ct, u64 start_ns) {
    u64 h = (ct ^ (start_ns * 0x9E3779B97F4A7C15ULL)) * 0xC2B2AE3D27D4EB4FULL;
    return (h & HINT_TAG_MASK) | (1ULL << 32);  // never 0: an empty way matches nothing
}

// The flow's timestamp start, or 0: take the slow path.  Two reads: the
// extension pointer, then the extension area's first 64 bytes, which hold
// the offsets and, in the usual layout (accounting, then timestamp), the
// timestamp's start.  The nf_conn status is not needed: an unconfirmed
// entry has no start yet (set at confirmation), and a hint only ever says
// what the slow path would do for a dying entry (nothing).
static __always_inline u64 fast_start_ns(void *ct) {
    u64 ext = 0;
    if (bpf_probe_read_kernel(&ext, sizeof(ext), ct + CT_EXT) || !ext)
        return 0;
    u64 area[8];    // the area is at least NF_CT_EXT_PREALLOC (128) bytes
    if (bpf_probe_read_kernel(area, sizeof(area), (void *)ext))
        return 0;
    u32 at = ((u8 *)area)[EXT_OFFSET + EXT_TSTAMP_ID];
    if (!at)
        return 0;
    at += TSTAMP_START;
    // Bounds first: this order keeps the probe's fast path as short as it
    // was before these lines moved here (bench/p1_hook_cost.py).
    if (at > sizeof(area) - 8 || (at & 7))
        return 0;
    return area[at / 8];
}

#endif
