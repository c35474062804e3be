// SPDX-License-Identifier: (Apache-2.0 OR MIT)
//
// udp-director's kernel fast path (SPEC section 11): a tc ingress program that forwards the
// datagrams of established UDP sessions inside the kernel, in both directions.
//
// User space stays the authority. The owning worker writes two entries of `sessions` when a
// session is established (client -> listener becomes upstream address -> backend; backend ->
// upstream address becomes listener -> client) and deletes them when the session ends, moves
// or its listener closes. A miss, or anything this program does not handle, goes on unchanged
// (TC_ACT_UNSPEC: the next tc program or filter on the interface, a CNI's, still sees it; then
// the stack), so user space serves it as before. Datagrams that start with the control magic
// always go up, so a live migration works while a session is offloaded. A session's reply
// entry is armed by its first client datagram the program forwards, so a client whose traffic
// reaches the proxy only after a DNAT (a NodePort, a load balancer) never has its replies
// rewritten past conntrack's reverse NAT: both directions then stay in user space.
//
// Built by scripts/build-bpf.sh (clang -target bpf); the object next to this file is embedded
// in the binary, and CI rebuilds it and fails when it differs. The layouts of the structs
// below are mirrored in dataplane/src/fastpath/abi.rs; change both or neither.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define MAGIC_MAX 32
#define DIRECTION_UPSTREAM 0
#define DIRECTION_DOWNSTREAM 1
// Not ours: on to the next program or filter, then the stack.
#define PASS TC_ACT_UNSPEC

// Which datagram: addresses and ports as they arrive (network byte order). IPv4 addresses
// take the first four bytes of the sixteen; the rest are zero.
struct fp_key {
	__u8 family;
	__u8 pad[3];
	__be16 sport;
	__be16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

// What it becomes, and what the kernel forwarded under this entry (read by the worker for the
// session's idle timer and counters).
struct fp_value {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u32 direction;
	// Where the rewritten datagram leaves when the host does not forward (no FIB lookup):
	// the interface of the route to its destination, read by user space once per peer.
	__u32 ifindex;
	// A reply entry: forwarded only once set. A client entry: its reply entry was set.
	__u32 armed;
	__u64 packets;
	__u64 bytes;
	__u64 last_ns;
};

struct fp_config {
	__u32 magic_len;
	__u8 magic[MAGIC_MAX];
};

struct fp_counter {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	// Allocated per entry, not up front (262144 preallocated would be ~40 MB of the pod's
	// memory), and never reused under a program still reading it.
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct fp_key);
	__type(value, struct fp_value);
} sessions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fp_config);
} config SEC(".maps");

// By direction: what the kernel forwarded, all sessions together.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct fp_counter);
} counters SEC(".maps");

// Whether the payload at `off` starts with the control magic.
static __always_inline int is_control(struct __sk_buff *skb, __u32 off)
{
	__u32 zero = 0;
	struct fp_config *cfg = bpf_map_lookup_elem(&config, &zero);
	__u8 head[MAGIC_MAX] = {};
	__u32 len;

	if (!cfg)
		return 1; // not configured: everything goes up
	len = cfg->magic_len;
	if (len == 0)
		return 0;
	if (len > MAGIC_MAX)
		return 1;
	if (off + len > skb->len)
		return 0; // shorter than the magic: not a control packet
	if (bpf_skb_load_bytes(skb, off, head, len) < 0)
		return 1;
	// Past `len` both are zero (the magic is stored zero-padded), so all of them can be
	// compared: a loop without an early exit unrolls to constant offsets, as the verifier
	// wants from a loader without CAP_PERFMON.
	__u8 diff = 0;
#pragma unroll
	for (int i = 0; i < MAGIC_MAX; i++)
		diff |= head[i] ^ cfg->magic[i];
	return diff == 0;
}

static __always_inline void count(struct fp_value *v, __u32 direction, __u64 bytes)
{
	struct fp_counter *c = bpf_map_lookup_elem(&counters, &direction);

	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, bytes);
	v->last_ns = bpf_ktime_get_ns();
	if (c) {
		c->packets += 1; // per-CPU: no other writer
		c->bytes += bytes;
	}
}

// Where the datagram `v` rewrites leaves: the route's device by a FIB lookup (a forwarding
// lookup from the interface it came in on: /32 pod routes, route changes and MTUs followed),
// or, where the host does not forward, the interface user space read for the session. -1: it
// must go up (a local destination, no route, too big for the route's MTU).
static __always_inline int egress(struct __sk_buff *skb, struct fp_value *v, __u32 family,
				  __u16 tot_len)
{
	struct bpf_fib_lookup fib = {};

	fib.family = family;
	fib.l4_protocol = IPPROTO_UDP;
	fib.sport = v->sport;
	fib.dport = v->dport;
	fib.tot_len = tot_len;
	fib.ifindex = skb->ifindex;
	if (family == AF_INET) {
		__builtin_memcpy(&fib.ipv4_src, v->saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, v->daddr, 4);
	} else {
		__builtin_memcpy(fib.ipv6_src, v->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, v->daddr, 16);
	}
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return fib.ifindex;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return v->ifindex;
	return -1;
}

// A client datagram of a session is about to be forwarded: its reply entry may be used from
// now on (a reply entry whose client side never matched here is a client behind a DNAT).
static __always_inline void arm_reply(struct fp_value *v, __u8 family)
{
	struct fp_key back = {};
	struct fp_value *reply;

	if (v->armed)
		return;
	back.family = family;
	back.sport = v->dport;
	back.dport = v->sport;
	__builtin_memcpy(back.saddr, v->daddr, 16);
	__builtin_memcpy(back.daddr, v->saddr, 16);
	reply = bpf_map_lookup_elem(&sessions, &back);
	if (reply)
		reply->armed = 1;
	v->armed = 1;
}

// Whether entry `v` may forward this datagram now (else it goes up).
static __always_inline int usable(struct __sk_buff *skb, struct fp_value *v, __u32 payload)
{
	if (v->direction == DIRECTION_UPSTREAM)
		return !is_control(skb, payload);
	return v->armed;
}

static __always_inline int forward_v4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct fp_key key = {};
	struct fp_value *v;
	struct udphdr *udp;
	__u32 l4, payload;
	__be32 old_src, old_dst, new_src, new_dst;
	__be16 old_sport, old_dport;

	if ((void *)(ip + 1) > end)
		return PASS;
	// IP options go up too: every offset below is then a constant, which the verifier
	// accepts from a loader with CAP_BPF and CAP_NET_ADMIN only (a packet pointer moved by a
	// variable needs CAP_PERFMON).
	if (ip->protocol != IPPROTO_UDP || ip->ihl != 5)
		return PASS;
	// Fragments go up: only the first carries the ports.
	if (ip->frag_off & bpf_htons(0x3fff))
		return PASS;
	l4 = sizeof(struct ethhdr) + sizeof(struct iphdr);
	udp = data + l4;
	if ((void *)(udp + 1) > end)
		return PASS;
	// No checksum to fix up: user space sends these with one computed.
	if (udp->check == 0)
		return PASS;

	key.family = AF_INET;
	key.sport = udp->source;
	key.dport = udp->dest;
	__builtin_memcpy(key.saddr, &ip->saddr, 4);
	__builtin_memcpy(key.daddr, &ip->daddr, 4);
	v = bpf_map_lookup_elem(&sessions, &key);
	if (!v)
		return PASS;
	payload = l4 + sizeof(struct udphdr);
	if (!usable(skb, v, payload))
		return PASS;
	__u32 bytes = bpf_ntohs(udp->len) - sizeof(struct udphdr);
	int out = egress(skb, v, AF_INET, bpf_ntohs(ip->tot_len));
	if (out < 0)
		return PASS;
	if (v->direction == DIRECTION_UPSTREAM)
		arm_reply(v, AF_INET);

	old_src = ip->saddr;
	old_dst = ip->daddr;
	old_sport = udp->source;
	old_dport = udp->dest;
	__builtin_memcpy(&new_src, v->saddr, 4);
	__builtin_memcpy(&new_dst, v->daddr, 4);

	// UDP checksum: the pseudo-header's addresses and the ports.
	__u32 csum_off = l4 + offsetof(struct udphdr, check);
	if (bpf_l4_csum_replace(skb, csum_off, old_src, new_src,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_src)) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_dst, new_dst,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(new_dst)) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_sport, v->sport,
				BPF_F_MARK_MANGLED_0 | sizeof(__be16)) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_dport, v->dport,
				BPF_F_MARK_MANGLED_0 | sizeof(__be16)) < 0)
		return TC_ACT_SHOT;
	// The IPv4 header checksum.
	__u32 ip_csum = sizeof(struct ethhdr) + offsetof(struct iphdr, check);
	if (bpf_l3_csum_replace(skb, ip_csum, old_src, new_src, sizeof(new_src)) < 0 ||
	    bpf_l3_csum_replace(skb, ip_csum, old_dst, new_dst, sizeof(new_dst)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + offsetof(struct iphdr, saddr),
				&new_src, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + offsetof(struct iphdr, daddr),
				&new_dst, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, source), &v->sport, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, dest), &v->dport, 2, 0) < 0)
		return TC_ACT_SHOT;

	count(v, v->direction, bytes);
	// The neighbour (next hop's MAC) is resolved by the kernel, as for a routed packet.
	return bpf_redirect_neigh(out, 0, 0, 0);
}

static __always_inline int forward_v6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip = data + sizeof(struct ethhdr);
	struct fp_key key = {};
	struct fp_value *v;
	struct udphdr *udp;
	__u32 l4 = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);

	if ((void *)(ip + 1) > end)
		return PASS;
	// Extension headers (fragments included) go up.
	if (ip->nexthdr != IPPROTO_UDP)
		return PASS;
	udp = data + l4;
	if ((void *)(udp + 1) > end)
		return PASS;
	if (udp->check == 0)
		return PASS;

	key.family = AF_INET6;
	key.sport = udp->source;
	key.dport = udp->dest;
	__builtin_memcpy(key.saddr, &ip->saddr, 16);
	__builtin_memcpy(key.daddr, &ip->daddr, 16);
	v = bpf_map_lookup_elem(&sessions, &key);
	if (!v)
		return PASS;
	if (!usable(skb, v, l4 + sizeof(struct udphdr)))
		return PASS;
	__u32 bytes = bpf_ntohs(udp->len) - sizeof(struct udphdr);
	int out = egress(skb, v, AF_INET6, bpf_ntohs(ip->payload_len) + sizeof(struct ipv6hdr));
	if (out < 0)
		return PASS;
	if (v->direction == DIRECTION_UPSTREAM)
		arm_reply(v, AF_INET6);

	// The UDP checksum covers the pseudo-header: fix it up by the difference of the addresses
	// (a checksum of the old and new 32 bytes) and the ports.
	__u32 csum_off = l4 + offsetof(struct udphdr, check);
	__s64 diff = bpf_csum_diff((__be32 *)&ip->saddr, 32, (__be32 *)v->saddr, 32, 0);
	if (diff < 0)
		return PASS;
	__be16 old_sport = udp->source, old_dport = udp->dest;
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_sport, v->sport,
				BPF_F_MARK_MANGLED_0 | sizeof(__be16)) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_dport, v->dport,
				BPF_F_MARK_MANGLED_0 | sizeof(__be16)) < 0)
		return TC_ACT_SHOT;
	// The addresses are not under an IPv6 header checksum: with CHECKSUM_COMPLETE the skb's
	// sum must follow the stored bytes (BPF_F_RECOMPUTE_CSUM), or the receiver sees it stale.
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + offsetof(struct ipv6hdr, saddr),
				v->saddr, 32, BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, source), &v->sport, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, dest), &v->dport, 2, 0) < 0)
		return TC_ACT_SHOT;

	count(v, v->direction, bytes);
	// The neighbour (next hop's MAC) is resolved by the kernel, as for a routed packet.
	return bpf_redirect_neigh(out, 0, 0, 0);
}

SEC("classifier")
int udp_director_fastpath(struct __sk_buff *skb)
{
	// A VLAN tag the device took off stays as metadata a redirect would carry along.
	if (skb->vlan_present)
		return PASS;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return forward_v4(skb);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return forward_v6(skb);
	return PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
