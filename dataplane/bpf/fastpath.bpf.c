// SPDX-License-Identifier: (Apache-2.0 OR MIT)
//
// udp-director's kernel fast path (SPEC section 11): a tc ingress program that forwards the
// datagrams of established UDP sessions inside the kernel, in both directions.
//
// User space stays the authority. The owning worker writes two entries of `sessions` when a
// session is established (client -> listener becomes upstream address -> backend; backend ->
// upstream address becomes listener -> client) and deletes them when the session ends, moves
// or its listener closes. A miss, or anything this program does not handle, passes the packet
// up unchanged (TC_ACT_OK), so user space serves it as before. Datagrams that start with the
// control magic always go up, so a live migration works while a session is offloaded.
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
	// Where the rewritten datagram leaves (the interface of the route to its destination,
	// looked up by user space once per session).
	__u32 ifindex;
	__u32 pad;
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
		return TC_ACT_OK;
	// IP options go up too: every offset below is then a constant, which the verifier
	// accepts from a loader with CAP_BPF and CAP_NET_ADMIN only (a packet pointer moved by a
	// variable needs CAP_PERFMON).
	if (ip->protocol != IPPROTO_UDP || ip->ihl != 5)
		return TC_ACT_OK;
	// Fragments go up: only the first carries the ports.
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK;
	l4 = sizeof(struct ethhdr) + sizeof(struct iphdr);
	udp = data + l4;
	if ((void *)(udp + 1) > end)
		return TC_ACT_OK;
	// No checksum to fix up: user space sends these with one computed.
	if (udp->check == 0)
		return TC_ACT_OK;

	key.family = AF_INET;
	key.sport = udp->source;
	key.dport = udp->dest;
	__builtin_memcpy(key.saddr, &ip->saddr, 4);
	__builtin_memcpy(key.daddr, &ip->daddr, 4);
	v = bpf_map_lookup_elem(&sessions, &key);
	if (!v)
		return TC_ACT_OK;
	payload = l4 + sizeof(struct udphdr);
	if (v->direction == DIRECTION_UPSTREAM && is_control(skb, payload))
		return TC_ACT_OK;

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

	count(v, v->direction, skb->len - payload);
	// The neighbour (next hop's MAC) is resolved by the kernel, as for a routed packet.
	return bpf_redirect_neigh(v->ifindex, 0, 0, 0);
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
		return TC_ACT_OK;
	// Extension headers (fragments included) go up.
	if (ip->nexthdr != IPPROTO_UDP)
		return TC_ACT_OK;
	udp = data + l4;
	if ((void *)(udp + 1) > end)
		return TC_ACT_OK;
	if (udp->check == 0)
		return TC_ACT_OK;

	key.family = AF_INET6;
	key.sport = udp->source;
	key.dport = udp->dest;
	__builtin_memcpy(key.saddr, &ip->saddr, 16);
	__builtin_memcpy(key.daddr, &ip->daddr, 16);
	v = bpf_map_lookup_elem(&sessions, &key);
	if (!v)
		return TC_ACT_OK;
	if (v->direction == DIRECTION_UPSTREAM && is_control(skb, l4 + sizeof(struct udphdr)))
		return TC_ACT_OK;

	// The UDP checksum covers the pseudo-header: fix it up by the difference of the addresses
	// (a checksum of the old and new 32 bytes) and the ports.
	__u32 csum_off = l4 + offsetof(struct udphdr, check);
	__s64 diff = bpf_csum_diff((__be32 *)&ip->saddr, 32, (__be32 *)v->saddr, 32, 0);
	if (diff < 0)
		return TC_ACT_OK;
	__be16 old_sport = udp->source, old_dport = udp->dest;
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_sport, v->sport,
				BPF_F_MARK_MANGLED_0 | sizeof(__be16)) < 0 ||
	    bpf_l4_csum_replace(skb, csum_off, old_dport, v->dport,
				BPF_F_MARK_MANGLED_0 | sizeof(__be16)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + offsetof(struct ipv6hdr, saddr),
				v->saddr, 32, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, source), &v->sport, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, dest), &v->dport, 2, 0) < 0)
		return TC_ACT_SHOT;

	count(v, v->direction, skb->len - l4 - sizeof(struct udphdr));
	// The neighbour (next hop's MAC) is resolved by the kernel, as for a routed packet.
	return bpf_redirect_neigh(v->ifindex, 0, 0, 0);
}

SEC("classifier")
int udp_director_fastpath(struct __sk_buff *skb)
{
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return forward_v4(skb);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return forward_v6(skb);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
