// conntracct record layout: the one definition of the records and state the
// probe shares with the agent.  bpf/conntracct.c includes it; the agent
// (conntracct/probe/layout.py) parses these declarations and derives every
// struct format and byte offset it uses from them, by field name, and
// tests/unit/test_record_layout.py compiles this file with gcc and checks
// each of those offsets and sizes field by field.
//
// Keep to what layout.py reads: `#define NAME number` constants and structs
// of u8/u16/u32/u64 fields, fixed-size arrays of them, and nested structs
// declared above.  Fields are naturally aligned, structs end on their
// largest member's alignment (no packing attributes).

#ifndef CONNTRACCT_RECORD_H
#define CONNTRACCT_RECORD_H

#define KIND_NEW 1
#define KIND_UPDATE 2
#define KIND_DESTROY 3
#define KIND_TRACK 4    // agent-internal: a back-dated flow whose end the agent must sweep for

#define FLAG_BACKDATED 1   // flow existed before the agent started
#define FLAG_NO_ACCT 2     // conntrack entry has no accounting extension
#define FLAG_NO_TSTAMP 4   // conntrack entry has no timestamp extension
#define FLAG_FIRST_SIGHT 8 // a DESTROY for a flow the probe never saw before
#define FLAG_NO_EVENTS 32  // no event-cache extension: ctnetlink will not report its end

// Indexes of the per-CPU `stats` array (named in conntracct/probe/layout.py).
#define STAT_RECORDS_LOST 0  // ring buffer full: record dropped
#define STAT_STATE_FULL 1    // per-flow state map full: flow not tracked
#define STAT_STATE_INSERTS 2
#define STAT_STATE_DELETES 3
#define STAT_COUNT 4

// Indexes of the `settings` array, written by the agent before attaching.
#define SET_WALL_OFFSET 0    // wall clock minus bpf_ktime_get_ns(), ns
#define SET_AGENT_START 1    // agent start, wall clock ns
#define SET_STAMPED_SINCE_START 2  // 1 if every flow since the agent's start has a timestamp
#define SET_QUIET_KINDS 3    // bit 1 << KIND_x: no sink wants that kind, write no such record
#define SET_COUNT 4

struct ct_tuple {
    u8 src[16];     // address, IPv4 in the first 4 bytes
    u8 dst[16];
    u16 src_u;      // network order: port, or ICMP id
    u16 dst_u;      // network order: port, or ICMP type (byte 0) and code (byte 1)
    u8 family;      // AF_INET or AF_INET6
    u8 proto;       // IPPROTO_*
    u8 _pad[2];
};

struct flow_record {
    u64 ts;                 // bpf_ktime_get_ns() at emission
    u64 start_ns;           // flow start, wall clock (timestamp extension), 0 if unknown
    u64 stop_ns;            // flow stop, wall clock, 0 while alive
    u64 first_seen;         // bpf_ktime_get_ns() when the probe first saw the flow
    u64 packets[2];         // totals, [0] original direction, [1] reply
    u64 bytes[2];
    u64 delta_packets[2];   // since the previous record of this flow
    u64 delta_bytes[2];
    u64 status;             // IPS_* bits
    struct ct_tuple orig;
    struct ct_tuple reply;
    u32 netns;              // network namespace inode
    u32 mark;
    u16 zone;
    u8 kind;                // KIND_*
    u8 tcp_state;           // TCP_CONNTRACK_*, 0 for other protocols
    u8 flags;               // FLAG_*
    u8 _pad[3];
};

// A flow instance: its tuple, and its start time, because a new connection
// may reuse the tuple before the agent has processed the old one's end.
struct flow_key {
    struct ct_tuple orig;
    u32 netns;
    u16 zone;
    u8 _pad[2];
    u64 start_ns;           // timestamp extension's start, 0 without one
};

struct flow_state {
    u64 first_seen;
    u64 next_emit;          // bpf_ktime_get_ns() before which no UPDATE is sent
    u64 packets[2];         // totals in the previous record
    u64 bytes[2];
    u64 flags;              // FLAG_BACKDATED, carried by every later record
};


// Flow ends in netfilter mode: the agent takes ended flows' states out of
// `flows` up to TAKE_BATCH at a time, with one run of the take_flow_states
// program (bpf/conntracct.c) per batch: the keys in the `take_keys` array,
// each flow's state in the same index of `take_slots`.
#define TAKE_BATCH 128
struct take_slot {
    struct flow_state state;
    u64 found;              // 1: the flow had state (now deleted); 0: none
};
#endif
