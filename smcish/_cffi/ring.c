/* ring.c: move bytes through shared-memory rings and link groups, validating every peer-written field.
 *
 * Each side writes only its own memory and maps the peer's read-only. Two ways to lay a ring out:
 *  - legacy: one region per side, header at 0 and ring data at SMC_HEADER_SIZE, doorbell = the
 *    peer's eventfd (smc_ring_init);
 *  - slot: the headers are slot k's headers in the two extent-0s of a link group, the ring data
 *    are ring blocks inside the group's extents, the producer may switch to another block while
 *    the stream runs, and notifications go through the group's queue (smc_ring_init_slot).
 * Rules that keep a hostile peer harmless (DESIGN.md section 5):
 *  - every peer-written field is loaded exactly once (acquire where it publishes something) into
 *    a local, validated, and only the local is used afterwards;
 *  - capacities, masks and block addresses come from our own arguments or from a peer descriptor
 *    validated once against the group's extent table; they are never re-read from shared memory;
 *  - every ring offset is `cursor & mask` and every copy length is <= the block's capacity, so no
 *    value in the peer's memory can move an access outside a validated block or header;
 *  - a violation sets a sticky error (r->error / g->error) that every later call returns.
 * Cursor arithmetic is modulo 2^64 (differences only), so cursors may wrap; the notification
 * queue's cursors likewise.
 */
#define _GNU_SOURCE                  /* sched_getcpu */

#include "ring.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if ATOMIC_LONG_LOCK_FREE != 2 && ATOMIC_LLONG_LOCK_FREE != 2
#error "64-bit atomics must be lock-free: a lock-based atomic would store into the peer's read-only mapping"
#endif
_Static_assert(sizeof(_Atomic uint64_t) == 8, "atomic u64 must be plain 8 bytes");
_Static_assert(sizeof(_Atomic uint32_t) == 4, "atomic u32 must be plain 4 bytes");
_Static_assert(SMC_G_OFF_CLAIMS + SMC_G_CLAIM_ENTRIES * 8 <= SMC_G_OFF_NQ, "claims overlap the queue");
_Static_assert(SMC_G_OFF_NQ + SMC_G_NQ_ENTRIES * 4 <= SMC_G_OFF_HDRS, "queue overlaps the headers");
_Static_assert(SMC_G_OFF_LISTENERS + 8 + SMC_G_MAX_LISTENERS * 8 <= SMC_G_OFF_CLAIMS, "listeners");
_Static_assert((SMC_G_NQ_ENTRIES & (SMC_G_NQ_ENTRIES - 1)) == 0, "queue size must be a power of two");
_Static_assert((SMC_G_CLAIM_ENTRIES & (SMC_G_CLAIM_ENTRIES - 1)) == 0, "claim table size");
_Static_assert(SMC_MAX_EXTENTS == 32, "struct smc_group holds 32 extents");

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() atomic_signal_fence(memory_order_seq_cst)
#endif

#define likely(x) __builtin_expect(!!(x), 1)
#define cold_path __attribute__((noinline, cold))
#define unlikely(x) __builtin_expect(!!(x), 0)

#define STATE_MASK (SMC_STATE_EOF | SMC_STATE_CLOSED | SMC_STATE_ABORT)
#define GSTATE_MASK SMC_GSTATE_CLOSING
#define SETUP_LINE 384          /* slot header lines 0..2 (cursors, switch, state) end here */

typedef _Atomic uint64_t atomic_u64;
typedef _Atomic uint32_t atomic_u32;

static inline atomic_u64 *u64_at(uint8_t *base, size_t off)
{
    return (atomic_u64 *)(void *)(base + off);
}

static inline atomic_u32 *u32_at(uint8_t *base, size_t off)
{
    return (atomic_u32 *)(void *)(base + off);
}

static inline const atomic_u64 *cu64_at(const uint8_t *base, size_t off)
{
    return (const atomic_u64 *)(const void *)(base + off);
}

static inline const atomic_u32 *cu32_at(const uint8_t *base, size_t off)
{
    return (const atomic_u32 *)(const void *)(base + off);
}

static inline atomic_u64 *my_u64(struct smc_ring *r, size_t off) { return u64_at(r->my_hdr, off); }
static inline atomic_u32 *my_u32(struct smc_ring *r, size_t off) { return u32_at(r->my_hdr, off); }
static inline const atomic_u64 *peer_u64(const struct smc_ring *r, size_t off) { return cu64_at(r->peer_hdr, off); }
static inline const atomic_u32 *peer_u32(const struct smc_ring *r, size_t off) { return cu32_at(r->peer_hdr, off); }

cold_path static int fail(struct smc_ring *r, int code, int detail, uint64_t seen, uint64_t lo, uint64_t hi)
{
    r->error = code;
    r->err_detail = detail;
    r->err_seen = seen;
    r->err_lo = lo;
    r->err_hi = hi;
    return code;
}

cold_path static int gfail(struct smc_group *g, int code, int detail, uint64_t seen, uint64_t lo, uint64_t hi)
{
    g->error = code;
    g->err_detail = detail;
    g->err_seen = seen;
    g->err_lo = lo;
    g->err_hi = hi;
    return code;
}

static int is_pow2_cap(uint64_t cap)
{
    return cap >= SMC_MIN_CAPACITY && cap <= SMC_MAX_CAPACITY && (cap & (cap - 1)) == 0;
}

static uint32_t log2_of(uint64_t pow2)
{
    return (uint32_t)__builtin_ctzll(pow2);
}

static int overlaps(const void *a, uint64_t a_len, const void *b, uint64_t b_len)
{
    uintptr_t a_lo = (uintptr_t)a, b_lo = (uintptr_t)b;
    return a_lo < b_lo + b_len && b_lo < a_lo + a_len;
}

/* A peer ring block (extent index, offset, capacity log2) -> its address, or NULL if invalid:
 * log2 in range, extent attached, offset a multiple of the capacity, block inside the extent. */
static const uint8_t *peer_block(const struct smc_group *g, uint32_t ext, uint64_t off, uint32_t log2)
{
    if (log2 < SMC_MIN_LOG2 || log2 > SMC_MAX_LOG2 || ext >= SMC_MAX_EXTENTS || !g->peer_ext[ext])
        return NULL;
    uint64_t cap = (uint64_t)1 << log2, len = g->peer_ext_len[ext];
    if ((off & (cap - 1)) != 0 || off > len || cap > len - off)
        return NULL;
    return g->peer_ext[ext] + off;
}

/* err_seen/err_lo/err_hi of SMC_DETAIL_SW_BLOCK: the offset, ext << 32 | log2, the extent's
 * length (0 if the index is out of range or not attached). */
static int fail_block(struct smc_ring *r, const struct smc_group *g, uint32_t ext, uint64_t off,
                      uint32_t log2)
{
    uint64_t len = ext < SMC_MAX_EXTENTS ? g->peer_ext_len[ext] : 0;
    return fail(r, SMC_ESWITCH, SMC_DETAIL_SW_BLOCK, off, ((uint64_t)ext << 32) | log2, len);
}

/* ================================================================== link group: queue and doorbell */

static inline uint8_t *g_mine(struct smc_group *g, size_t off) { return g->my_ext0 + off; }
static inline const uint8_t *g_peer(const struct smc_group *g, size_t off) { return g->peer_ext[0] + off; }

/* Add 1 to the eventfd ``fd`` (none if < 0), counting the write or the failure: 0, or -errno
 * (whose errno is also kept in *last_errno). Shared by the group's and a legacy ring's doorbell. */
static int doorbell_write(int fd, uint64_t *stat_ok, uint64_t *stat_err, int32_t *last_errno)
{
    if (fd < 0)
        return 0;
    uint64_t one = 1;
    ssize_t k;
    do {
        k = write(fd, &one, sizeof one);
    } while (k < 0 && errno == EINTR);
    if (k == (ssize_t)sizeof one) {
        (*stat_ok)++;
        return 0;
    }
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 0;  /* counter saturated: the peer has a wake-up pending anyway */
    int err = k < 0 ? errno : EIO;
    *last_errno = err;
    (*stat_err)++;
    return -err;
}

static int group_ring_doorbell(struct smc_group *g)
{
    return doorbell_write(g->peer_doorbell_fd, &g->stat_doorbells, &g->stat_doorbell_errors,
                          &g->doorbell_errno);
}

/* Load the peer's consumption of our queue once; accept it iff last seen <= c <= nq_prod. */
static int refresh_nq_peer_cons(struct smc_group *g)
{
    uint64_t peer_cons = atomic_load_explicit(cu64_at(g->peer_ext[0], SMC_G_OFF_NQ_CONS_PEER),
                                              memory_order_acquire);
    if (peer_cons - g->nq_peer_cons > g->nq_prod - g->nq_peer_cons)
        return gfail(g, SMC_EGROUP, SMC_DETAIL_NQ_CONS, peer_cons, g->nq_peer_cons, g->nq_prod);
    g->nq_peer_cons = peer_cons;
    return 0;
}

/* Queue `slot` into our queue (or count an overflow), then wake the peer's hub iff it sleeps
 * with a want_wake epoch we did not ring for yet. */
static int group_queue(struct smc_group *g, uint32_t slot)
{
    if (g->nq_prod - g->nq_peer_cons >= SMC_G_NQ_ENTRIES) {  /* looks full: the cache is a lower bound */
        int rc = refresh_nq_peer_cons(g);
        if (rc)
            return rc;
    }
    if (g->nq_prod - g->nq_peer_cons >= SMC_G_NQ_ENTRIES) {
        g->nq_overflow++;
        g->stat_overflows++;
        atomic_store_explicit(u64_at(g->my_ext0, SMC_G_OFF_NQ_OVERFLOW), g->nq_overflow,
                              memory_order_release);
    } else {
        atomic_u32 *queue = u32_at(g->my_ext0, SMC_G_OFF_NQ);
        atomic_store_explicit(&queue[g->nq_prod & (SMC_G_NQ_ENTRIES - 1)], slot, memory_order_relaxed);
        g->nq_prod++;
        g->stat_queued++;
        atomic_store_explicit(u64_at(g->my_ext0, SMC_G_OFF_NQ_PROD), g->nq_prod, memory_order_release);
    }
    /* Pairs with the fence in smc_group_prepare_sleep: either the peer's hub sees our entry, or
     * we see its want_wake. */
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t want = atomic_load_explicit(cu32_at(g->peer_ext[0], SMC_G_OFF_WANT_WAKE),
                                         memory_order_relaxed);
    if (want != 0 && want != g->rung_wake_epoch) {
        g->rung_wake_epoch = want;
        group_ring_doorbell(g);
    }
    return 0;
}

/* ================================================================== ring: peer field validation */

cold_path static void complete_rx_switch(struct smc_ring *r)
{
    r->rx_base = r->rx_sw_base;
    r->rx_cap = r->rx_sw_cap;
    r->rx_mask = r->rx_sw_cap - 1;
    r->rx_ext = r->rx_sw_ext;
    r->rx_switches++;
    r->rx_sw_pending = 0;
}

/* Slot mode: the peer's sw_seq (loaded once by the caller) differs from the switches we
 * completed. completed + 1 is a new switch: its descriptor is loaded once, validated and
 * recorded (or it is the one already recorded); anything else breaks the protocol. */
cold_path static int rx_switch_seen(struct smc_ring *r, uint32_t seq)
{
    if (seq != r->rx_switches + 1)
        return fail(r, SMC_ESWITCH, SMC_DETAIL_SW_SEQ, seq, r->rx_switches, r->rx_switches + 1u);
    if (r->rx_sw_pending)
        return 0;
    uint64_t sw_pos = atomic_load_explicit(peer_u64(r, SMC_OFF_SW_POS), memory_order_relaxed);
    uint64_t sw_off = atomic_load_explicit(peer_u64(r, SMC_OFF_SW_OFF), memory_order_relaxed);
    uint32_t sw_ext = atomic_load_explicit(peer_u32(r, SMC_OFF_SW_EXT), memory_order_relaxed);
    uint32_t sw_log2 = atomic_load_explicit(peer_u32(r, SMC_OFF_SW_LOG2), memory_order_relaxed);
    /* Every byte before sw_pos sits in the current block: rx_prod_last <= sw_pos <= rx_cons + rx_cap. */
    uint64_t in_old = sw_pos - r->rx_cons;
    if (in_old > r->rx_cap || in_old < r->rx_prod - r->rx_cons)
        return fail(r, SMC_ESWITCH, SMC_DETAIL_SW_POS, sw_pos, r->rx_prod, r->rx_cons + r->rx_cap);
    const uint8_t *base = peer_block(r->group, sw_ext, sw_off, sw_log2);
    if (!base)
        return fail_block(r, r->group, sw_ext, sw_off, sw_log2);
    r->rx_sw_pos = sw_pos;
    r->rx_sw_base = base;
    r->rx_sw_cap = (uint64_t)1 << sw_log2;
    r->rx_sw_ext = sw_ext;
    r->rx_sw_pending = 1;
    return 0;
}

/* Load the peer's prod once (then, in slot mode, its sw_seq: prod first, so a prod beyond
 * sw_pos comes with the switch that announced it); accept it iff
 * rx_prod (last seen) <= p <= rx_cons + bound, where bound is rx_cap, or during a switch the rest
 * of the old block up to sw_pos plus the next block's capacity. Legacy mode pays one branch. */
static int refresh_rx_prod(struct smc_ring *r)
{
    uint64_t peer_prod = atomic_load_explicit(peer_u64(r, SMC_OFF_PROD), memory_order_acquire);
    uint64_t bound = r->rx_cap;
    if (unlikely(r->group != NULL)) {
        uint32_t seq = atomic_load_explicit(peer_u32(r, SMC_OFF_SW_SEQ), memory_order_acquire);
        if (unlikely(seq != r->rx_switches)) {
            int rc = rx_switch_seen(r, seq);
            if (rc)
                return rc;
        }
        if (unlikely(r->rx_sw_pending))
            bound = (r->rx_sw_pos - r->rx_cons) + r->rx_sw_cap;
    }
    uint64_t ahead = peer_prod - r->rx_cons;
    if (ahead > bound || ahead < r->rx_prod - r->rx_cons)
        return fail(r, SMC_EPROD, SMC_DETAIL_PROD_RANGE, peer_prod, r->rx_prod, r->rx_cons + bound);
    if (r->rx_eof_seen && peer_prod != r->rx_eof_pos)
        return fail(r, SMC_EEOF, SMC_DETAIL_PROD_AFTER_EOF, peer_prod, r->rx_eof_pos, r->rx_eof_pos);
    r->rx_prod = peer_prod;
    if (unlikely(r->rx_sw_pending) && r->rx_cons == r->rx_sw_pos)
        complete_rx_switch(r);  /* nothing left in the old block */
    return 0;
}

/* Producer side: the oldest cursor that still occupies the current block. During a switch
 * (consumer not yet past tx_start) that is tx_start; otherwise the consumer's cursor. */
static inline uint64_t tx_floor(const struct smc_ring *r)
{
    return unlikely(r->tx_switch_pending) ? r->tx_start : r->tx_cons;
}

static inline uint64_t tx_free(const struct smc_ring *r)
{
    return r->tx_cap - (r->tx_prod - tx_floor(r));
}

/* Load the peer's consumer cursor of our ring once; accept it iff tx_cons (last seen) <= c <= tx_prod. */
static int refresh_tx_cons(struct smc_ring *r)
{
    uint64_t peer_cons = atomic_load_explicit(peer_u64(r, SMC_OFF_CONS_PEER), memory_order_acquire);
    if (peer_cons - r->tx_cons > r->tx_prod - r->tx_cons)
        return fail(r, SMC_ECONS, SMC_DETAIL_CONS_RANGE, peer_cons, r->tx_cons, r->tx_prod);
    r->tx_cons = peer_cons;
    if (r->tx_switch_pending && r->tx_prod - peer_cons <= r->tx_prod - r->tx_start)
        r->tx_switch_pending = 0;  /* the consumer reached tx_start: the old block is free */
    return 0;
}

/* DATA/EOF/CLOSED/ABORT from one validated look at the peer's state and prod (state first). */
static int rx_wake_bits(struct smc_ring *r)
{
    uint32_t peer_state = atomic_load_explicit(peer_u32(r, SMC_OFF_STATE), memory_order_acquire);
    int rc = refresh_rx_prod(r);
    if (rc)
        return rc;
    peer_state &= STATE_MASK;
    if ((peer_state & SMC_STATE_EOF) && !r->rx_eof_seen) {
        /* An honest producer stores eof_pos = prod before the EOF bit and never writes after it,
         * so the prod we loaded after seeing the bit must be exactly eof_pos. */
        uint64_t eof_pos = atomic_load_explicit(peer_u64(r, SMC_OFF_EOF_POS), memory_order_acquire);
        if (eof_pos != r->rx_prod)
            return fail(r, SMC_EEOF, SMC_DETAIL_EOF_POS, eof_pos, r->rx_prod, r->rx_prod);
        r->rx_eof_pos = eof_pos;
        r->rx_eof_seen = 1;
    }
    r->peer_state |= peer_state;

    int bits = 0;
    if (r->rx_prod != r->rx_cons)
        bits |= SMC_ST_DATA;
    if (r->rx_eof_seen && r->rx_cons == r->rx_eof_pos)
        bits |= SMC_ST_EOF;
    if (r->peer_state & SMC_STATE_CLOSED)
        bits |= SMC_ST_CLOSED;
    if (r->peer_state & SMC_STATE_ABORT)
        bits |= SMC_ST_ABORT;
    return bits;
}

/* ================================================================== ring: notifications */

static int ring_peer(struct smc_ring *r)
{
    return doorbell_write(r->peer_doorbell_fd, &r->stat_doorbells, &r->stat_doorbell_errors,
                          &r->doorbell_errno);
}

/* Tell the peer: legacy mode rings its eventfd; slot mode queues our slot index through the
 * group, which rings the peer's hub only if it sleeps. A group error is the hub's business (it
 * tears the group down); the data path never fails because of it. */
static int notify_peer(struct smc_ring *r)
{
    struct smc_group *g = r->group;
    if (!g)
        return ring_peer(r);
    if (!g->my_ext0 || g->error)
        return g->my_ext0 ? g->error : SMC_ECLOSED;
    int rc = group_queue(g, r->slot);
    if (rc == 0)
        r->stat_doorbells++;
    return rc;
}

/* After publishing prod: notify the peer iff it waits for data with an epoch not notified yet. */
static inline void notify_data(struct smc_ring *r)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t want = atomic_load_explicit(peer_u32(r, SMC_OFF_WANT_DATA), memory_order_relaxed);
    if (want != 0 && want != r->rung_data_epoch) {
        r->rung_data_epoch = want;
        notify_peer(r);
    }
}

/* After publishing cons_peer: notify a producer waiting for space once it is worth it
 * (rx_cap / 8 consumed since it asked, or its ring is drained). */
static inline void notify_space(struct smc_ring *r, uint64_t consumed_now)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t want = atomic_load_explicit(peer_u32(r, SMC_OFF_WANT_SPACE), memory_order_relaxed);
    if (want == 0 || want == r->rung_space_epoch)
        return;
    if (want != r->space_ask_epoch) {
        r->space_ask_epoch = want;
        r->rx_cons_at_space_ask = r->rx_cons - consumed_now;
    }
    /* "Drained" is checked against a fresh prod (only on this rare path): our cached copy may
     * be older than what the producer published before it went to sleep. A bad prod here
     * becomes the sticky error that the next call returns. */
    int drained = r->rx_cons == r->rx_prod && refresh_rx_prod(r) == 0 && r->rx_cons == r->rx_prod;
    if (r->rx_cons - r->rx_cons_at_space_ask >= r->rx_cap / 8 || drained) {
        r->rung_space_epoch = want;
        notify_peer(r);
    }
}

static uint32_t next_epoch(struct smc_ring *r)
{
    uint32_t epoch = r->my_epoch + 1;
    if (epoch == 0)
        epoch = 1;
    r->my_epoch = epoch;
    return epoch;
}

/* ================================================================== ring: copies */

/* Copy n <= tx_cap bytes into our current block at cursor pos: at most two memcpy (wrap). */
static inline void copy_in(struct smc_ring *r, uint64_t pos, const char *src, uint64_t n)
{
    uint8_t *ring = r->tx_base;
    uint64_t off = pos & r->tx_mask;
    uint64_t first = r->tx_cap - off;
    if (n <= first) {
        memcpy(ring + off, src, n);
    } else {
        memcpy(ring + off, src, first);
        memcpy(ring, src + first, n - first);
    }
}

/* Copy n <= rx_cap bytes out of the peer's current block at cursor pos: at most two memcpy (wrap). */
static inline void copy_out(struct smc_ring *r, uint64_t pos, char *dst, uint64_t n)
{
    const uint8_t *ring = r->rx_base;
    uint64_t off = pos & r->rx_mask;
    uint64_t first = r->rx_cap - off;
    if (n <= first) {
        memcpy(dst, ring + off, n);
    } else {
        memcpy(dst, ring + off, first);
        memcpy(dst + first, ring, n - first);
    }
}

/* A read of n readable bytes while a switch is recorded: the old block up to sw_pos (at most
 * rx_cap, validated), then the new block (at most its capacity, since n <= rx_prod - rx_cons). */
cold_path static void copy_out_switching(struct smc_ring *r, char *dst, uint64_t n)
{
    uint64_t in_old = r->rx_sw_pos - r->rx_cons;
    if (n < in_old) {
        copy_out(r, r->rx_cons, dst, n);
        return;
    }
    copy_out(r, r->rx_cons, dst, in_old);
    complete_rx_switch(r);
    copy_out(r, r->rx_cons + in_old, dst + in_old, n - in_old);
}

static inline void publish_prod(struct smc_ring *r, uint64_t n)
{
    r->tx_prod += n;
    r->stat_tx_bytes += n;
    atomic_store_explicit(my_u64(r, SMC_OFF_PROD), r->tx_prod, memory_order_release);
}

/* ================================================================== ring: set-up */

/* Cursors and epochs from our own header (trusted): zero for a fresh header, or wherever a
 * previous ring on the same header stopped. */
static void resume_from_header(struct smc_ring *r)
{
    r->tx_prod = atomic_load_explicit(my_u64(r, SMC_OFF_PROD), memory_order_relaxed);
    r->rx_cons = atomic_load_explicit(my_u64(r, SMC_OFF_CONS_PEER), memory_order_relaxed);
    r->my_state = atomic_load_explicit(my_u32(r, SMC_OFF_STATE), memory_order_relaxed) & STATE_MASK;
    uint32_t want_data = atomic_load_explicit(my_u32(r, SMC_OFF_WANT_DATA), memory_order_relaxed);
    uint32_t want_space = atomic_load_explicit(my_u32(r, SMC_OFF_WANT_SPACE), memory_order_relaxed);
    r->my_epoch = want_data > want_space ? want_data : want_space;
    /* Lower bounds until the peer's fields are first observed: any peer cons in
     * [tx_prod - tx_cap, tx_prod] and any peer prod in [rx_cons, rx_cons + rx_cap] is acceptable. */
    r->tx_cons = r->tx_prod - r->tx_cap;
    r->rx_prod = r->rx_cons;
    r->rx_peek_end = r->rx_cons;  /* nothing peeked: smc_rx_consume accepts only 0 */
}

int smc_ring_init(struct smc_ring *r, uint8_t *my_base, uint64_t my_len, const uint8_t *peer_base,
                  uint64_t peer_len, uint64_t tx_cap, uint64_t rx_cap, int peer_doorbell_fd)
{
    if (!r)
        return SMC_EINVAL;
    memset(r, 0, sizeof *r);
    r->peer_doorbell_fd = -1;
    r->error = SMC_ECLOSED;  /* unusable until initialised successfully */
    if (!my_base || !peer_base || !is_pow2_cap(tx_cap) || !is_pow2_cap(rx_cap))
        return SMC_EINVAL;
    if (((uintptr_t)my_base | (uintptr_t)peer_base) & 7u)
        return SMC_EINVAL;  /* the atomics need 8-byte alignment */
    if (my_len < SMC_HEADER_SIZE + tx_cap || peer_len < SMC_HEADER_SIZE + rx_cap)
        return SMC_EINVAL;
    if (peer_doorbell_fd < -1)
        return SMC_EINVAL;
    if (overlaps(my_base, SMC_HEADER_SIZE + tx_cap, peer_base, SMC_HEADER_SIZE + rx_cap))
        return SMC_EINVAL;  /* one buffer for both regions: a caller bug */

    r->my_hdr = my_base;
    r->peer_hdr = peer_base;
    r->tx_base = my_base + SMC_HEADER_SIZE;
    r->tx_cap = tx_cap;
    r->tx_mask = tx_cap - 1;
    r->rx_base = peer_base + SMC_HEADER_SIZE;
    r->rx_cap = rx_cap;
    r->rx_mask = rx_cap - 1;
    r->peer_doorbell_fd = peer_doorbell_fd;
    resume_from_header(r);
    r->error = 0;
    return 0;
}

/* A peer that has not answered yet: a zero header (prod, cons, state, wants, switches all 0)
 * and an empty minimum-size block, in our own read-only data. A ring whose rx is not attached
 * reads this, which gives exactly "send-only" semantics with no branch on the data path: no
 * bytes to read, nothing consumed of ours (so the block holds at most its capacity), nobody
 * waiting to be notified. smc_ring_attach_rx swaps in the real peer. */
static const uint8_t unattached_peer[SMC_HEADER_SIZE + SMC_MIN_CAPACITY] __attribute__((aligned(64)));
#define UNATTACHED_EXT 0xffffffffu

int smc_ring_init_slot(struct smc_ring *r, struct smc_group *g, uint32_t slot, uint8_t *tx_base,
                       uint64_t tx_cap, uint32_t rx_ext, uint64_t rx_off, uint32_t rx_log2)
{
    if (!r)
        return SMC_EINVAL;
    memset(r, 0, sizeof *r);
    r->peer_doorbell_fd = -1;
    r->error = SMC_ECLOSED;
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (slot >= g->max_slots || !tx_base || !is_pow2_cap(tx_cap))
        return SMC_EINVAL;
    uint8_t *my_hdr = g->my_ext0 + SMC_G_OFF_HDRS + (uint64_t)slot * SMC_HEADER_SIZE;
    if (overlaps(tx_base, tx_cap, my_hdr, SMC_HEADER_SIZE))
        return SMC_EINVAL;  /* the block would overwrite our own header */
    const uint8_t *rx_base;
    const uint8_t *peer_hdr;
    if (rx_log2 == 0) {  /* send-only until smc_ring_attach_rx */
        peer_hdr = unattached_peer;
        rx_base = unattached_peer + SMC_HEADER_SIZE;
        rx_log2 = SMC_MIN_LOG2;
        rx_ext = UNATTACHED_EXT;
    } else {
        rx_base = peer_block(g, rx_ext, rx_off, rx_log2);
        if (!rx_base)
            return fail_block(r, g, rx_ext, rx_off, rx_log2);
        peer_hdr = g->peer_ext[0] + SMC_G_OFF_HDRS + (uint64_t)slot * SMC_HEADER_SIZE;
    }

    r->group = g;
    r->slot = slot;
    r->my_hdr = my_hdr;
    r->peer_hdr = peer_hdr;
    r->tx_base = tx_base;
    r->tx_cap = tx_cap;
    r->tx_mask = tx_cap - 1;
    r->rx_base = rx_base;
    r->rx_cap = (uint64_t)1 << rx_log2;
    r->rx_mask = r->rx_cap - 1;
    r->rx_ext = rx_ext;
    r->rx_sw_ext = rx_ext;
    resume_from_header(r);
    /* Our own switch history (zero after smc_slot_reset): the caller's tx block is the block of
     * our last published switch; until the consumer is seen past it, assume it is not. */
    r->tx_switches = atomic_load_explicit(my_u32(r, SMC_OFF_SW_SEQ), memory_order_relaxed);
    if (r->tx_switches) {
        r->tx_start = atomic_load_explicit(my_u64(r, SMC_OFF_SW_POS), memory_order_relaxed);
        r->tx_switch_pending = 1;
    }
    r->error = 0;
    return 0;
}

int smc_ring_attach_rx(struct smc_ring *r, uint32_t rx_ext, uint64_t rx_off, uint32_t rx_log2)
{
    if (r->error)
        return r->error;
    if (!r->group || r->peer_hdr != unattached_peer || r->rx_cons != 0 || r->rx_switches)
        return SMC_EINVAL;  /* only a send-only slot ring, once */
    struct smc_group *g = r->group;
    const uint8_t *rx_base = peer_block(g, rx_ext, rx_off, rx_log2);
    if (!rx_base)
        return fail_block(r, g, rx_ext, rx_off, rx_log2);
    r->peer_hdr = g->peer_ext[0] + SMC_G_OFF_HDRS + (uint64_t)r->slot * SMC_HEADER_SIZE;
    r->rx_base = rx_base;
    r->rx_cap = (uint64_t)1 << rx_log2;
    r->rx_mask = r->rx_cap - 1;
    r->rx_ext = rx_ext;
    r->rx_sw_ext = rx_ext;
    r->rx_prod = r->rx_cons;
    r->peer_state = 0;
    /* Our cached view of the peer's consumption (nothing consumed) stays a valid lower bound.
     * The peer may already wait for data we wrote before it answered: tell it. */
    notify_data(r);
    return 0;
}

int smc_ring_rx_attached(const struct smc_ring *r)
{
    return r->peer_hdr != NULL && r->peer_hdr != unattached_peer;
}

void smc_ring_close(struct smc_ring *r)
{
    r->my_hdr = NULL;
    r->peer_hdr = NULL;
    r->tx_base = NULL;
    r->rx_base = NULL;
    r->rx_sw_base = NULL;
    r->group = NULL;
    r->peer_doorbell_fd = -1;
    r->tx_resv = 0;
    r->error = SMC_ECLOSED;
}

/* ================================================================== ring: data path */

int64_t smc_tx_space(struct smc_ring *r)
{
    if (r->error)
        return r->error;
    int rc = refresh_tx_cons(r);
    if (rc)
        return rc;
    return (int64_t)tx_free(r);
}

int64_t smc_tx_write(struct smc_ring *r, const char *buf, uint64_t len)
{
    if (r->error)
        return r->error;
    if (r->my_state || r->tx_resv || (len && !buf))
        return SMC_EINVAL;
    /* The cached peer cons is a lower bound: reload it only when it does not prove enough room. */
    uint64_t space = tx_free(r);
    if (space < len) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        space = tx_free(r);
    }
    uint64_t n = len < space ? len : space;
    if (n == 0)
        return 0;
    copy_in(r, r->tx_prod, buf, n);
    publish_prod(r, n);
    notify_data(r);
    return (int64_t)n;
}

int64_t smc_tx_writev(struct smc_ring *r, const char *const *bufs, const uint64_t *lens, uint32_t n)
{
    if (r->error)
        return r->error;
    if (r->my_state || r->tx_resv || (n && (!bufs || !lens)))
        return SMC_EINVAL;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (lens[i] && !bufs[i])
            return SMC_EINVAL;
        total = lens[i] > UINT64_MAX - total ? UINT64_MAX : total + lens[i];
    }
    uint64_t space = tx_free(r);
    if (space < total) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        space = tx_free(r);
    }
    uint64_t left = total < space ? total : space;
    uint64_t written = 0;
    for (uint32_t i = 0; i < n && left; i++) {
        uint64_t k = lens[i] < left ? lens[i] : left;
        if (k == 0)
            continue;
        copy_in(r, r->tx_prod + written, bufs[i], k);
        written += k;
        left -= k;
    }
    if (written == 0)
        return 0;
    publish_prod(r, written);
    notify_data(r);
    return (int64_t)written;
}

int64_t smc_rx_avail(struct smc_ring *r)
{
    if (r->error)
        return r->error;
    int rc = refresh_rx_prod(r);
    if (rc)
        return rc;
    return (int64_t)(r->rx_prod - r->rx_cons);
}

int64_t smc_rx_read(struct smc_ring *r, char *dst, uint64_t len)
{
    if (r->error)
        return r->error;
    if (len && !dst)
        return SMC_EINVAL;
    uint64_t avail = r->rx_prod - r->rx_cons;
    if (avail < len) {
        int rc = refresh_rx_prod(r);
        if (rc)
            return rc;
        avail = r->rx_prod - r->rx_cons;
    }
    uint64_t n = len < avail ? len : avail;
    if (n == 0)
        return 0;
    if (likely(!r->rx_sw_pending))
        copy_out(r, r->rx_cons, dst, n);
    else
        copy_out_switching(r, dst, n);
    r->rx_cons += n;
    r->stat_rx_bytes += n;
    /* release: our reads of the ring happen before the producer may overwrite those bytes */
    atomic_store_explicit(my_u64(r, SMC_OFF_CONS_PEER), r->rx_cons, memory_order_release);
    notify_space(r, n);
    return (int64_t)n;
}

/* ================================================================== ring: zero copy and files */

/* Contiguous free bytes at tx_prod, up to `want`: they end at the first of the peer's consumer
 * cursor (validated as in smc_tx_write: the cached one is a lower bound, reloaded only when it
 * does not prove enough room) and the end of our block. *off = their offset in our current
 * block, so [*off, *off + n) lies inside the block whatever the peer wrote. Records n as the
 * reservation (none when n is 0); writes, a ring switch and another reserve are refused until
 * smc_tx_commit or smc_tx_cancel ends it. */
int64_t smc_tx_reserve(struct smc_ring *r, uint64_t want, uint64_t *off)
{
    if (r->error)
        return r->error;
    if (r->my_state || r->tx_resv || !off)
        return SMC_EINVAL;
    uint64_t idx = r->tx_prod & r->tx_mask;
    uint64_t contig = r->tx_cap - idx;
    uint64_t limit = want < contig ? want : contig;
    uint64_t space = tx_free(r);
    if (space < limit) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        space = tx_free(r);
    }
    uint64_t n = limit < space ? limit : space;
    *off = idx;
    r->tx_resv = n;
    return (int64_t)n;
}

/* Publish the first n bytes of the reservation exactly as smc_tx_write publishes a copy (the
 * caller's stores into the reserved bytes happen before the release store of prod), then end
 * the reservation. EINVAL (nothing changed): n > the reservation, nothing reserved, or a state
 * bit (EOF, CLOSED, ABORT) was published since. */
int64_t smc_tx_commit(struct smc_ring *r, uint64_t n)
{
    if (r->error)
        return r->error;
    if (r->my_state || r->tx_resv == 0 || n > r->tx_resv)
        return SMC_EINVAL;
    r->tx_resv = 0;
    if (n == 0)
        return 0;
    publish_prod(r, n);
    notify_data(r);
    return (int64_t)n;
}

void smc_tx_cancel(struct smc_ring *r)
{
    r->tx_resv = 0;
}

/* Contiguous readable bytes at rx_cons, up to `want`, validated as smc_rx_read validates: the
 * peer's prod (and a ring switch) are reloaded when the cached count does not cover `want`, and
 * the bytes end at the first of the validated prod, a pending switch's sw_pos and the end of
 * the current block. *off = their offset in the current rx block (which this call may have
 * switched to: a completed switch changes rx_base/rx_switches), so [*off, *off + n) lies inside
 * the validated block. Records rx_cons + n as the limit of smc_rx_consume. */
int64_t smc_rx_peek(struct smc_ring *r, uint64_t want, uint64_t *off)
{
    if (r->error)
        return r->error;
    if (!off)
        return SMC_EINVAL;
    uint64_t avail = r->rx_prod - r->rx_cons;
    if (avail < want) {
        int rc = refresh_rx_prod(r);
        if (rc)
            return rc;
        avail = r->rx_prod - r->rx_cons;
    }
    if (unlikely(r->rx_sw_pending)) {
        uint64_t in_old = r->rx_sw_pos - r->rx_cons;
        if (in_old == 0)
            complete_rx_switch(r);  /* everything before sw_pos consumed (not reached otherwise) */
        else if (avail > in_old)
            avail = in_old;         /* the old block's rest first: a view never spans two blocks */
    }
    uint64_t idx = r->rx_cons & r->rx_mask;
    uint64_t contig = r->rx_cap - idx;
    uint64_t n = want < avail ? want : avail;
    if (n > contig)
        n = contig;
    *off = idx;
    r->rx_peek_end = r->rx_cons + n;
    return (int64_t)n;
}

/* Consume n bytes of the last peek, exactly as smc_rx_read publishes a consumption (release
 * store of cons_peer after the caller's reads, then the same space notification). n may not
 * pass the peek's end nor the validated prod (so a read that went past the peek makes it
 * EINVAL). A peek never spans a switch, so n reaches sw_pos only by ending exactly there. */
int64_t smc_rx_consume(struct smc_ring *r, uint64_t n)
{
    if (r->error)
        return r->error;
    uint64_t left = r->rx_peek_end - r->rx_cons;
    if (left > r->rx_prod - r->rx_cons || n > left)
        return SMC_EINVAL;
    if (n == 0)
        return 0;
    if (unlikely(r->rx_sw_pending) && n >= r->rx_sw_pos - r->rx_cons)
        complete_rx_switch(r);
    r->rx_cons += n;
    r->stat_rx_bytes += n;
    /* release: our reads of the ring happen before the producer may overwrite those bytes */
    atomic_store_explicit(my_u64(r, SMC_OFF_CONS_PEER), r->rx_cons, memory_order_release);
    notify_space(r, n);
    return (int64_t)n;
}

/* pread(2) up to len bytes at file offset `offset` into dst, retrying EINTR and short reads;
 * stops at EOF. Returns the bytes read; on an error *err = errno (the bytes before it count). */
static uint64_t pread_full(int fd, uint8_t *dst, uint64_t len, uint64_t offset, int32_t *err)
{
    uint64_t got = 0;
    while (got < len) {
        ssize_t k = pread(fd, dst + got, (size_t)(len - got), (off_t)(offset + got));
        if (k > 0) {
            got += (uint64_t)k;
        } else if (k == 0) {
            break;                  /* EOF */
        } else if (errno != EINTR) {
            *err = errno;
            break;
        }
    }
    return got;
}

/* smc_tx_write_fd reads through a bounce buffer of FD_BOUNCE_SIZE bytes when the distance from
 * the file offset to the ring address, modulo 4096, lies in [1, FD_ALIAS_WINDOW - 1] (see
 * fd_copy_aliases). Not in the cdef: tests/test_ring_zerocopy.py pins both values. */
#define FD_ALIAS_WINDOW 32u
#define FD_BOUNCE_SIZE (128u * 1024u)

/* The bounce buffer of smc_tx_write_fd: one per thread (the call runs without the GIL, possibly
 * in several threads at once), allocated on first use and freed when its thread exits. Its base
 * is page-aligned and it has a page of slack, so a target at any page offset fits. */
#define BOUNCE_PAGE 4096u
static pthread_key_t bounce_key;
static int bounce_key_ok;
static pthread_once_t bounce_once = PTHREAD_ONCE_INIT;

static void bounce_key_init(void)
{
    bounce_key_ok = pthread_key_create(&bounce_key, free) == 0;
}

static uint8_t *bounce_buffer(void)
{
    if (pthread_once(&bounce_once, bounce_key_init) != 0 || !bounce_key_ok)
        return NULL;
    uint8_t *buf = pthread_getspecific(bounce_key);
    if (buf)
        return buf;
    void *p = NULL;
    if (posix_memalign(&p, BOUNCE_PAGE, FD_BOUNCE_SIZE + BOUNCE_PAGE) != 0)
        return NULL;
    if (pthread_setspecific(bounce_key, p) != 0) {
        free(p);
        return NULL;
    }
    return p;
}

/* The kernel copies a file's page-cache bytes (at page offset offset % 4096) to dst with rep movsb,
 * which on AMD Zen 3 runs ~4x slower when the destination is 1..31 bytes ahead of the source
 * modulo 4096 (4K aliasing: measured 2.6 GB/s there, 12-15 GB/s at every other distance, whatever
 * the absolute alignment). glibc's memcpy has the same cliff, so a bounce buffer merely congruent
 * to the file offset would only move the slow copy to user space. */
static int fd_copy_aliases(const uint8_t *dst, uint64_t offset)
{
    uint64_t dist = ((uint64_t)(uintptr_t)dst - offset) & (BOUNCE_PAGE - 1);
    return dist != 0 && dist < FD_ALIAS_WINDOW;
}

/* pread_full through the bounce buffer: each piece is read into the buffer at the page offset
 * dst + 2048 (the kernel's copy then runs at distance dist + 2048, our memcpy at distance 2048:
 * both clear of the window) and copied to dst. Same results and error reporting as pread_full.
 * Without a buffer (allocation failed) it is pread_full. */
static uint64_t pread_bounced(struct smc_ring *r, int fd, uint8_t *dst, uint64_t len,
                              uint64_t offset, int32_t *err)
{
    uint8_t *buf = bounce_buffer();
    if (!buf)
        return pread_full(fd, dst, len, offset, err);
    uint64_t got = 0;
    while (got < len) {
        uint64_t want = len - got < FD_BOUNCE_SIZE ? len - got : FD_BOUNCE_SIZE;
        uint8_t *b = buf + (((uintptr_t)(dst + got) + BOUNCE_PAGE / 2) & (BOUNCE_PAGE - 1));
        ssize_t k = pread(fd, b, (size_t)want, (off_t)(offset + got));
        if (k > 0) {
            memcpy(dst + got, b, (size_t)k);
            got += (uint64_t)k;
        } else if (k == 0) {
            break;                  /* EOF */
        } else if (errno != EINTR) {
            *err = errno;
            break;
        }
    }
    r->stat_tx_fd_bounced += got;
    return got;
}

/* One contiguous ring segment: straight into the ring unless the copy would alias (above). */
static uint64_t pread_segment(struct smc_ring *r, int fd, uint8_t *dst, uint64_t len,
                              uint64_t offset, int32_t *err)
{
    if (unlikely(fd_copy_aliases(dst, offset)))
        return pread_bounced(r, fd, dst, len, offset, err);
    return pread_full(fd, dst, len, offset, err);
}

/* Read up to `count` bytes of file `fd` from `offset` into the free space of our ring (at most two
 * segments when it wraps; each straight from pread, or through the calling thread's bounce buffer
 * when its ring address and the file offset fall in the slow window of the kernel's copy, see
 * fd_copy_aliases) and publish what was read exactly as smc_tx_write publishes a copy. Returns the
 * bytes published: 0 when the ring is full, count is 0 or the file ends at `offset`. SMC_EREAD
 * when the first read fails (*err = its errno, nothing published); a failure after some bytes
 * publishes those bytes (the next call reports it). Only bytes that pread returned are
 * published. The free space is validated as in smc_tx_write, and every target range lies inside
 * our current block. */
int64_t smc_tx_write_fd(struct smc_ring *r, int fd, uint64_t offset, uint64_t count, int32_t *err)
{
    if (r->error)
        return r->error;
    if (r->my_state || r->tx_resv || !err || offset > (uint64_t)INT64_MAX)
        return SMC_EINVAL;
    *err = 0;
    if (count > (uint64_t)INT64_MAX - offset)
        count = (uint64_t)INT64_MAX - offset;  /* off_t ends there */
    uint64_t space = tx_free(r);
    if (space < count) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        space = tx_free(r);
    }
    uint64_t total = count < space ? count : space;
    if (total == 0)
        return 0;
    uint64_t idx = r->tx_prod & r->tx_mask;
    uint64_t first = r->tx_cap - idx;
    if (first > total)
        first = total;
    uint64_t got = pread_segment(r, fd, r->tx_base + idx, first, offset, err);
    if (got == first && first < total && *err == 0)
        got += pread_segment(r, fd, r->tx_base, total - first, offset + first, err);
    if (got == 0)
        return *err ? SMC_EREAD : 0;
    publish_prod(r, got);
    notify_data(r);
    return (int64_t)got;
}

int smc_rx_status(struct smc_ring *r)
{
    if (r->error)
        return r->error;
    int bits = rx_wake_bits(r);
    if (bits < 0)
        return bits;
    int rc = refresh_tx_cons(r);
    if (rc)
        return rc;
    if (tx_free(r) > 0)
        bits |= SMC_ST_SPACE;
    return bits;
}

int smc_rx_prepare_sleep(struct smc_ring *r)
{
    if (r->error)
        return r->error;
    atomic_store_explicit(my_u32(r, SMC_OFF_WANT_DATA), next_epoch(r), memory_order_relaxed);
    /* Pairs with the producer's fence between publishing prod and testing want_data:
     * either it sees our flag or we see its prod. */
    atomic_thread_fence(memory_order_seq_cst);
    int bits = rx_wake_bits(r);
    if (bits != 0) {
        if (bits > 0)
            atomic_store_explicit(my_u32(r, SMC_OFF_WANT_DATA), 0, memory_order_relaxed);
        return bits;
    }
    return 0;
}

int smc_tx_prepare_sleep(struct smc_ring *r)
{
    if (r->error)
        return r->error;
    atomic_store_explicit(my_u32(r, SMC_OFF_WANT_SPACE), next_epoch(r), memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    int rc = refresh_tx_cons(r);
    if (rc)
        return rc;
    /* A peer that closed or aborted will never make room: wake up for that too. */
    uint32_t peer_state = atomic_load_explicit(peer_u32(r, SMC_OFF_STATE), memory_order_acquire);
    r->peer_state |= peer_state & (SMC_STATE_CLOSED | SMC_STATE_ABORT);
    int bits = 0;
    if (tx_free(r) > 0)
        bits |= SMC_ST_SPACE;
    if (r->peer_state & SMC_STATE_CLOSED)
        bits |= SMC_ST_CLOSED;
    if (r->peer_state & SMC_STATE_ABORT)
        bits |= SMC_ST_ABORT;
    if (bits)
        atomic_store_explicit(my_u32(r, SMC_OFF_WANT_SPACE), 0, memory_order_relaxed);
    return bits;
}

void smc_clear_wants(struct smc_ring *r)
{
    if (!r->my_hdr)
        return;
    atomic_store_explicit(my_u32(r, SMC_OFF_WANT_DATA), 0, memory_order_relaxed);
    atomic_store_explicit(my_u32(r, SMC_OFF_WANT_SPACE), 0, memory_order_relaxed);
}

/* Works even after a peer violation (only our own header is written), so ABORT can still be told. */
static int publish_state(struct smc_ring *r, uint32_t bits)
{
    if (!r->my_hdr)
        return SMC_ECLOSED;
    if (bits & ~(uint32_t)STATE_MASK)
        return SMC_EINVAL;
    if ((bits & SMC_STATE_EOF) && !(r->my_state & SMC_STATE_EOF))
        atomic_store_explicit(my_u64(r, SMC_OFF_EOF_POS), r->tx_prod, memory_order_relaxed);
    r->my_state |= bits;
    /* release: eof_pos (and every byte before tx_prod) is visible before the bit */
    atomic_store_explicit(my_u32(r, SMC_OFF_STATE), r->my_state, memory_order_release);
    return 0;
}

/* Publish state bits without telling the peer: for a close or abort that the caller follows at
 * once with a TCP FIN or RST, which wakes the peer anyway (a doorbell would be a second wake-up,
 * and on a VM each costs tens of microseconds). */
int smc_set_state_quiet(struct smc_ring *r, uint32_t bits)
{
    return publish_state(r, bits);
}

int smc_set_state(struct smc_ring *r, uint32_t bits)
{
    int rc = publish_state(r, bits);
    if (rc)
        return rc;
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t want_data = atomic_load_explicit(peer_u32(r, SMC_OFF_WANT_DATA), memory_order_relaxed);
    uint32_t want_space = atomic_load_explicit(peer_u32(r, SMC_OFF_WANT_SPACE), memory_order_relaxed);
    if (want_data != 0 || want_space != 0) {
        if (want_data != 0)
            r->rung_data_epoch = want_data;
        notify_peer(r);
    }
    return 0;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Every 64 polls of a spin without a group (legacy rings): read the clock. */
static inline int spin_expired(uint64_t deadline)
{
    return now_ns() >= deadline;
}

/* Publish the CPU we poll on and tell whether the peer's hub last polled on the same one.
 * Measured (64 B ping-pong, docs/design.md 2.7): yielding every 64 polls always costs ~0.6 us a
 * yield and keeps a co-located pair runnable and cache-hot (so the scheduler rarely separates
 * them); never yielding makes a co-located ping-pong ~95 us (each side spins out its budget
 * while the other waits for the CPU); stopping the spin when co-located pays a doorbell a round
 * trip (~40 us). Yielding only while the peer shares our CPU: 9.4 us apart, ~33 us together.
 * A hostile value only costs a spin or a yield. */
static int group_colocated(struct smc_group *g)
{
    int cpu = sched_getcpu();
    if (cpu < 0)
        return 0;
    uint32_t me = (uint32_t)cpu + 1;
    atomic_u32 *mine = u32_at(g->my_ext0, SMC_G_OFF_CPU);
    if (atomic_load_explicit(mine, memory_order_relaxed) != me)
        atomic_store_explicit(mine, me, memory_order_relaxed);
    if (atomic_load_explicit(cu32_at(g->peer_ext[0], SMC_G_OFF_CPU), memory_order_relaxed) != me)
        return 0;
    g->stat_spin_colocated++;
    return 1;
}

/* Every 64 polls of a group spin: let a co-located peer run, then read the clock. */
static inline int spin_yield_expired(struct smc_group *g, uint64_t deadline)
{
    if (group_colocated(g))
        sched_yield();
    return now_ns() >= deadline;
}

int smc_rx_spin(struct smc_ring *r, uint64_t budget_ns)
{
    if (r->error)
        return r->error;
    uint64_t deadline = now_ns() + budget_ns;
    for (uint32_t i = 1;; i++) {
        int bits = rx_wake_bits(r);
        if (bits > 0) {
            r->stat_spin_hits++;
            return bits;
        }
        if (bits < 0)
            return bits;
        if (budget_ns == 0 || ((i & 63u) == 0 && spin_expired(deadline))) {
            r->stat_spin_misses++;
            return 0;
        }
        cpu_relax();
    }
}

/* The producer's counterpart of smc_rx_spin: poll for free space instead of sleeping on a full
 * ring while the consumer is draining it (a sleep costs two wake-ups and, on small machines,
 * often lands both processes on one CPU). Returns SPACE, or CLOSED/ABORT, or 0 on timeout. */
int smc_tx_spin(struct smc_ring *r, uint64_t budget_ns)
{
    if (r->error)
        return r->error;
    struct smc_group *g = r->group && r->group->my_ext0 ? r->group : NULL;
    uint64_t deadline = now_ns() + budget_ns;
    for (uint32_t i = 1;; i++) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        if (tx_free(r) > 0) {
            r->stat_tx_spin_hits++;
            return SMC_ST_SPACE;
        }
        if ((i & 63u) == 0 || budget_ns == 0) {
            uint32_t peer_state = atomic_load_explicit(peer_u32(r, SMC_OFF_STATE), memory_order_acquire);
            r->peer_state |= peer_state & (SMC_STATE_CLOSED | SMC_STATE_ABORT);
            int bits = (r->peer_state & SMC_STATE_CLOSED ? SMC_ST_CLOSED : 0) |
                       (r->peer_state & SMC_STATE_ABORT ? SMC_ST_ABORT : 0);
            if (bits)
                return bits;
            if (budget_ns == 0 || (g ? spin_yield_expired(g, deadline) : spin_expired(deadline))) {
                r->stat_tx_spin_misses++;
                return 0;
            }
        }
        cpu_relax();
    }
}

/* Legacy mode: an unconditional eventfd write. Slot mode: queue our slot index (the peer's hub
 * is rung only if it sleeps). */
int smc_doorbell(struct smc_ring *r)
{
    if (r->group)
        return notify_peer(r);
    return ring_peer(r);
}

int64_t smc_doorbell_drain(int fd)
{
    uint64_t count;
    ssize_t k;
    do {
        k = read(fd, &count, sizeof count);
    } while (k < 0 && errno == EINTR);
    if (k == (ssize_t)sizeof count)
        return count > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)count;
    if (k < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -(int64_t)errno;
    return -(int64_t)EIO;
}

/* ================================================================== ring: switch (producer) */

int smc_tx_switch(struct smc_ring *r, uint8_t *new_base, uint64_t new_cap, uint32_t ext, uint64_t off)
{
    if (r->error)
        return r->error;
    if (!r->group || !new_base || !is_pow2_cap(new_cap) || ext >= SMC_MAX_EXTENTS ||
        (off & (new_cap - 1)) != 0 || r->tx_resv)
        return SMC_EINVAL;  /* (an outstanding reservation lies in the current block) */
    if (overlaps(new_base, new_cap, r->my_hdr, SMC_HEADER_SIZE))
        return SMC_EINVAL;
    if (overlaps(new_base, new_cap, r->tx_base, r->tx_cap)) {
        /* Reusing the current block's memory is only correct once the consumer has read all of
         * it; anything else is an allocator bug that would corrupt the stream. */
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        if (r->tx_cons != r->tx_prod)
            return SMC_EINVAL;
    }
    if (r->tx_switches != 0) {
        /* The consumer must have read a byte of the current block: that proves it completed the
         * previous switch, so it will accept exactly one more (sw_seq = completed + 1). */
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        uint64_t into_block = r->tx_cons - r->tx_start;
        if (into_block == 0 || into_block > r->tx_prod - r->tx_start)
            return SMC_EBUSY;
    }
    atomic_store_explicit(my_u64(r, SMC_OFF_SW_POS), r->tx_prod, memory_order_relaxed);
    atomic_store_explicit(my_u64(r, SMC_OFF_SW_OFF), off, memory_order_relaxed);
    atomic_store_explicit(my_u32(r, SMC_OFF_SW_EXT), ext, memory_order_relaxed);
    atomic_store_explicit(my_u32(r, SMC_OFF_SW_LOG2), log2_of(new_cap), memory_order_relaxed);
    r->tx_switches++;
    /* release: the descriptor is visible before the new sw_seq (and so before any byte of the
     * new block, whose prod is published with release after this) */
    atomic_store_explicit(my_u32(r, SMC_OFF_SW_SEQ), r->tx_switches, memory_order_release);
    r->tx_switch_pending = r->tx_cons != r->tx_prod;  /* tx_cons <= tx_prod = the new tx_start */
    r->tx_start = r->tx_prod;
    r->tx_base = new_base;
    r->tx_cap = new_cap;
    r->tx_mask = new_cap - 1;
    return 0;
}

int smc_tx_switch_pending(struct smc_ring *r)
{
    if (r->error)
        return r->error;
    if (!r->tx_switch_pending)
        return 0;
    int rc = refresh_tx_cons(r);
    if (rc)
        return rc;
    return r->tx_switch_pending ? 1 : 0;
}

/* ================================================================== link group */

int smc_group_init(struct smc_group *g, uint8_t *my_ext0, uint64_t my_len, const uint8_t *peer_ext0,
                   uint64_t peer_len, int peer_doorbell_fd, uint32_t role, uint32_t max_slots)
{
    if (!g)
        return SMC_EINVAL;
    memset(g, 0, sizeof *g);
    g->peer_doorbell_fd = -1;
    g->error = SMC_ECLOSED;  /* unusable until initialised successfully */
    if (!my_ext0 || !peer_ext0 || (((uintptr_t)my_ext0 | (uintptr_t)peer_ext0) & 7u))
        return SMC_EINVAL;
    if (max_slots < SMC_MIN_SLOTS || max_slots > SMC_MAX_SLOTS || (max_slots & (max_slots - 1)))
        return SMC_EINVAL;
    uint64_t need = SMC_G_OFF_HDRS + (uint64_t)max_slots * SMC_HEADER_SIZE;
    if (my_len < need || peer_len < need)
        return SMC_EINVAL;
    if (role != SMC_ROLE_CLIENT && role != SMC_ROLE_SERVER)
        return SMC_EINVAL;
    if (peer_doorbell_fd < -1)
        return SMC_EINVAL;
    if (overlaps(my_ext0, my_len, peer_ext0, peer_len))
        return SMC_EINVAL;

    g->my_ext0 = my_ext0;
    g->peer_ext[0] = peer_ext0;
    g->peer_ext_len[0] = peer_len;
    g->max_slots = max_slots;
    g->peer_doorbell_fd = peer_doorbell_fd;
    atomic_store_explicit(u64_at(my_ext0, SMC_G_OFF_MAGIC), SMC_G_MAGIC, memory_order_relaxed);
    atomic_store_explicit(u32_at(my_ext0, SMC_G_OFF_MAGIC + 8), SMC_G_VERSION, memory_order_relaxed);
    atomic_store_explicit(u32_at(my_ext0, SMC_G_OFF_MAGIC + 12), role, memory_order_relaxed);
    /* Our own extent 0 is trusted: resume the queue cursors (zero for a fresh extent). */
    g->nq_prod = atomic_load_explicit(u64_at(my_ext0, SMC_G_OFF_NQ_PROD), memory_order_relaxed);
    g->nq_overflow = atomic_load_explicit(u64_at(my_ext0, SMC_G_OFF_NQ_OVERFLOW), memory_order_relaxed);
    g->pq_cons = atomic_load_explicit(u64_at(my_ext0, SMC_G_OFF_NQ_CONS_PEER), memory_order_relaxed);
    g->my_wake_epoch = atomic_load_explicit(u32_at(my_ext0, SMC_G_OFF_WANT_WAKE), memory_order_relaxed);
    /* Lower bounds until the peer's cursors are first observed (as in the ring). */
    g->nq_peer_cons = g->nq_prod - SMC_G_NQ_ENTRIES;
    g->pq_prod = g->pq_cons;
    g->error = 0;
    return 0;
}

int smc_group_add_peer_extent(struct smc_group *g, uint32_t index, const uint8_t *base, uint64_t len)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (index == 0 || index >= SMC_MAX_EXTENTS || !base || len == 0 || g->peer_ext[index])
        return SMC_EINVAL;
    if (overlaps(base, len, g->my_ext0, SMC_G_OFF_HDRS + (uint64_t)g->max_slots * SMC_HEADER_SIZE))
        return SMC_EINVAL;
    g->peer_ext[index] = base;
    g->peer_ext_len[index] = len;
    return 0;
}

int smc_group_remove_peer_extent(struct smc_group *g, uint32_t index)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (index == 0 || index >= SMC_MAX_EXTENTS || !g->peer_ext[index])
        return SMC_EINVAL;
    g->peer_ext[index] = NULL;
    g->peer_ext_len[index] = 0;
    return 0;
}

void smc_group_close(struct smc_group *g)
{
    if (!g)
        return;
    g->my_ext0 = NULL;
    for (int i = 0; i < SMC_MAX_EXTENTS; i++) {
        g->peer_ext[i] = NULL;
        g->peer_ext_len[i] = 0;
    }
    g->peer_doorbell_fd = -1;
    g->error = SMC_ECLOSED;
}

/* Queue functions refuse to run on a closed group or after a sticky error. */
static inline int group_usable(const struct smc_group *g)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    return g->error;
}

int smc_group_notify(struct smc_group *g, uint32_t slot)
{
    int rc = group_usable(g);
    if (rc)
        return rc;
    if (slot >= g->max_slots)
        return SMC_EINVAL;
    return group_queue(g, slot);
}

int64_t smc_group_take(struct smc_group *g, uint32_t *out, uint32_t max, uint32_t *flags)
{
    int rc = group_usable(g);
    if (rc)
        return rc;
    if (max && !out)
        return SMC_EINVAL;
    if (flags)
        *flags = 0;
    uint64_t peer_prod = atomic_load_explicit(cu64_at(g->peer_ext[0], SMC_G_OFF_NQ_PROD),
                                              memory_order_acquire);
    uint64_t ahead = peer_prod - g->pq_cons;
    if (ahead > SMC_G_NQ_ENTRIES || ahead < g->pq_prod - g->pq_cons)
        return gfail(g, SMC_EGROUP, SMC_DETAIL_NQ_PROD, peer_prod, g->pq_prod,
                     g->pq_cons + SMC_G_NQ_ENTRIES);
    g->pq_prod = peer_prod;
    uint64_t overflow = atomic_load_explicit(cu64_at(g->peer_ext[0], SMC_G_OFF_NQ_OVERFLOW),
                                             memory_order_acquire);
    if (overflow != g->pq_overflow_seen) {
        g->pq_overflow_seen = overflow;
        if (flags)
            *flags |= SMC_TAKE_OVERFLOW;
    }
    uint64_t n = ahead < max ? ahead : max;
    if (n == 0)
        return 0;
    const atomic_u32 *queue = cu32_at(g->peer_ext[0], SMC_G_OFF_NQ);
    for (uint64_t i = 0; i < n; i++) {
        uint32_t slot = atomic_load_explicit(&queue[(g->pq_cons + i) & (SMC_G_NQ_ENTRIES - 1)],
                                             memory_order_relaxed);
        if (slot >= g->max_slots)
            return gfail(g, SMC_EGROUP, SMC_DETAIL_NQ_ENTRY, slot, 0, g->max_slots - 1u);
        out[i] = slot;
    }
    g->pq_cons += n;
    g->stat_taken += n;
    /* release: our reads of the entries happen before the peer may overwrite them */
    atomic_store_explicit(u64_at(g->my_ext0, SMC_G_OFF_NQ_CONS_PEER), g->pq_cons, memory_order_release);
    return (int64_t)n;
}

/* Anything to take? A differing nq_prod or overflow counter says yes (take validates them). */
static int group_pending(struct smc_group *g)
{
    uint64_t peer_prod = atomic_load_explicit(cu64_at(g->peer_ext[0], SMC_G_OFF_NQ_PROD),
                                              memory_order_acquire);
    if (peer_prod != g->pq_cons)
        return 1;
    uint64_t overflow = atomic_load_explicit(cu64_at(g->peer_ext[0], SMC_G_OFF_NQ_OVERFLOW),
                                             memory_order_acquire);
    return overflow != g->pq_overflow_seen;
}

int smc_group_pending(struct smc_group *g)
{
    int rc = group_usable(g);
    if (rc)
        return rc;
    return group_pending(g);
}

int smc_group_prepare_sleep(struct smc_group *g)
{
    int rc = group_usable(g);
    if (rc)
        return rc;
    uint32_t epoch = g->my_wake_epoch + 1;
    if (epoch == 0)
        epoch = 1;
    g->my_wake_epoch = epoch;
    atomic_store_explicit(u32_at(g->my_ext0, SMC_G_OFF_WANT_WAKE), epoch, memory_order_relaxed);
    /* Pairs with the fence in group_queue between publishing an entry and testing want_wake. */
    atomic_thread_fence(memory_order_seq_cst);
    if (group_pending(g)) {
        atomic_store_explicit(u32_at(g->my_ext0, SMC_G_OFF_WANT_WAKE), 0, memory_order_relaxed);
        return 1;
    }
    return 0;
}

void smc_group_clear_wake(struct smc_group *g)
{
    if (!g || !g->my_ext0)
        return;
    atomic_store_explicit(u32_at(g->my_ext0, SMC_G_OFF_WANT_WAKE), 0, memory_order_relaxed);
}

int smc_group_spin(struct smc_group *g, uint64_t budget_ns)
{
    int rc = group_usable(g);
    if (rc)
        return rc;
    uint64_t deadline = now_ns() + budget_ns;
    for (uint32_t i = 1;; i++) {
        if (group_pending(g)) {
            g->stat_spin_hits++;
            return 1;
        }
        if (budget_ns == 0 || ((i & 63u) == 0 && spin_yield_expired(g, deadline))) {
            g->stat_spin_misses++;
            return 0;
        }
        cpu_relax();
    }
}

/* Works after a peer violation (only our extent 0 is written), so CLOSING can still be told. */
/* smc_group_spin, also watching up to SMC_HOT_MAX "hot" slot rings of this group directly:
 * rings whose reader drained them and did not re-arm want_data (so their producer queues no
 * notification for the next bytes: a ping-pong then costs no queue entry, no fence on the
 * producer's side and no take). The caller arms every hot ring (smc_rx_prepare_sleep) before
 * its hub sleeps. When something is found, every hot ring is looked at once more, so that one
 * call reports all of them. Returns (k << 1) | q: k hot rings have news (data, EOF, CLOSED,
 * ABORT, or a sticky error for the caller to read), their indices in ready[0..k); q = 1 if the
 * peer's queue has entries; 0: nothing within the budget. */
int smc_group_spin_hot(struct smc_group *g, struct smc_ring **hot, uint32_t n, uint64_t budget_ns,
                       uint32_t *ready)
{
    int rc = group_usable(g);
    if (rc)
        return rc;
    if (n > SMC_HOT_MAX)
        return SMC_EINVAL;
    for (uint32_t k = 0; k < n; k++)
        if (!hot[k] || hot[k]->group != g)
            return SMC_EINVAL;
    uint64_t deadline = now_ns() + budget_ns;
    for (uint32_t i = 1;; i++) {
        int queued = group_pending(g);
        int found = 0;
        for (uint32_t k = 0; k < n; k++) {
            struct smc_ring *r = hot[k];
            if (r->error || rx_wake_bits(r) != 0)
                ready[found++] = k;
        }
        if (queued || found) {
            g->stat_spin_hits++;
            return (found << 1) | (queued ? 1 : 0);
        }
        if (budget_ns == 0 || ((i & 63u) == 0 && spin_yield_expired(g, deadline))) {
            g->stat_spin_misses++;
            return 0;
        }
        cpu_relax();
    }
}

int smc_group_set_gstate(struct smc_group *g, uint32_t bits)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (bits & ~(uint32_t)GSTATE_MASK)
        return SMC_EINVAL;
    atomic_u32 *gstate = u32_at(g->my_ext0, SMC_G_OFF_GSTATE);
    uint32_t now = atomic_load_explicit(gstate, memory_order_relaxed) | bits;
    atomic_store_explicit(gstate, now, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    group_ring_doorbell(g);
    return 0;
}

uint32_t smc_group_peer_gstate(struct smc_group *g)
{
    if (!g || !g->my_ext0)
        return 0;
    return atomic_load_explicit(cu32_at(g->peer_ext[0], SMC_G_OFF_GSTATE), memory_order_acquire) &
           GSTATE_MASK;
}

/* ------------------------------------------------------------------ listener table (a hint) */

int smc_group_set_listeners(struct smc_group *g, const uint64_t *inodes, uint32_t n)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (n > SMC_G_MAX_LISTENERS || (n && !inodes))
        return SMC_EINVAL;
    atomic_u32 *count = u32_at(g->my_ext0, SMC_G_OFF_LISTENERS);
    atomic_u64 *table = u64_at(g->my_ext0, SMC_G_OFF_LISTENERS + 8);
    atomic_store_explicit(count, 0, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (uint32_t i = 0; i < n; i++)
        atomic_store_explicit(&table[i], inodes[i], memory_order_relaxed);
    atomic_store_explicit(count, n, memory_order_release);
    return 0;
}

int smc_group_peer_has_listener(struct smc_group *g, uint64_t inode)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (inode == 0)
        return 0;
    uint32_t count = atomic_load_explicit(cu32_at(g->peer_ext[0], SMC_G_OFF_LISTENERS),
                                          memory_order_acquire);
    if (count > SMC_G_MAX_LISTENERS)
        count = SMC_G_MAX_LISTENERS;
    const atomic_u64 *table = cu64_at(g->peer_ext[0], SMC_G_OFF_LISTENERS + 8);
    for (uint32_t i = 0; i < count; i++)
        if (atomic_load_explicit(&table[i], memory_order_relaxed) == inode)
            return 1;
    return 0;
}

/* ------------------------------------------------------------------ claim table */

static inline uint32_t claim_home(uint32_t port)
{
    return ((uint32_t)(port * 2654435761u) >> 19) & (SMC_G_CLAIM_ENTRIES - 1);
}

int smc_group_post_claim(struct smc_group *g, uint32_t port, uint32_t slot)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (slot >= g->max_slots)
        return SMC_EINVAL;
    atomic_u64 *table = u64_at(g->my_ext0, SMC_G_OFF_CLAIMS);
    uint32_t home = claim_home(port);
    for (uint32_t i = 0; i < SMC_G_CLAIM_PROBE; i++) {
        atomic_u64 *entry = &table[(home + i) & (SMC_G_CLAIM_ENTRIES - 1)];
        if (atomic_load_explicit(entry, memory_order_relaxed) == 0) {
            atomic_store_explicit(entry, ((uint64_t)port << 32) | (slot + 1u), memory_order_release);
            return 0;
        }
    }
    return SMC_EFULL;
}

void smc_group_clear_claim(struct smc_group *g, uint32_t port, uint32_t slot)
{
    if (!g || !g->my_ext0)
        return;
    atomic_u64 *table = u64_at(g->my_ext0, SMC_G_OFF_CLAIMS);
    uint64_t value = ((uint64_t)port << 32) | ((uint64_t)slot + 1u);
    uint32_t home = claim_home(port);
    for (uint32_t i = 0; i < SMC_G_CLAIM_PROBE; i++) {
        atomic_u64 *entry = &table[(home + i) & (SMC_G_CLAIM_ENTRIES - 1)];
        if (atomic_load_explicit(entry, memory_order_relaxed) == value) {
            atomic_store_explicit(entry, 0, memory_order_release);
            return;
        }
    }
}

/* Scan the peer's window for `port`: every entry names a slot that is validated (< max_slots)
 * and skipped otherwise; the table is a hint the caller checks against the slot's record. */
int64_t smc_group_find_claims(struct smc_group *g, uint32_t port, uint32_t *out_slots, uint32_t max)
{
    if (!g)
        return SMC_EINVAL;
    if (!g->my_ext0)
        return SMC_ECLOSED;
    if (max && !out_slots)
        return SMC_EINVAL;
    const atomic_u64 *table = cu64_at(g->peer_ext[0], SMC_G_OFF_CLAIMS);
    uint32_t home = claim_home(port);
    uint32_t found = 0;
    for (uint32_t i = 0; i < SMC_G_CLAIM_PROBE && found < max; i++) {
        uint64_t entry = atomic_load_explicit(&table[(home + i) & (SMC_G_CLAIM_ENTRIES - 1)],
                                              memory_order_acquire);
        if ((uint32_t)(entry >> 32) != port)
            continue;
        uint32_t slot_plus_one = (uint32_t)entry;
        if (slot_plus_one == 0 || slot_plus_one > g->max_slots)
            continue;
        out_slots[found++] = slot_plus_one - 1u;
    }
    return found;
}

uint8_t *smc_group_my_hdr(struct smc_group *g, uint32_t slot)
{
    if (!g || !g->my_ext0 || slot >= g->max_slots)
        return NULL;
    return g->my_ext0 + SMC_G_OFF_HDRS + (uint64_t)slot * SMC_HEADER_SIZE;
}

const uint8_t *smc_group_peer_hdr(struct smc_group *g, uint32_t slot)
{
    if (!g || !g->my_ext0 || slot >= g->max_slots)
        return NULL;
    return g->peer_ext[0] + SMC_G_OFF_HDRS + (uint64_t)slot * SMC_HEADER_SIZE;
}

/* ================================================================== set-up records */

/* 16 address bytes as two u64 atomics (the peer may read them concurrently). */
static void store_addr(uint8_t *hdr, size_t off, const uint8_t src[16])
{
    uint64_t lo, hi;
    memcpy(&lo, src, 8);
    memcpy(&hi, src + 8, 8);
    atomic_store_explicit(u64_at(hdr, off), lo, memory_order_relaxed);
    atomic_store_explicit(u64_at(hdr, off + 8), hi, memory_order_relaxed);
}

static void load_addr(const uint8_t *hdr, size_t off, uint8_t dst[16])
{
    uint64_t lo = atomic_load_explicit(cu64_at(hdr, off), memory_order_relaxed);
    uint64_t hi = atomic_load_explicit(cu64_at(hdr, off + 8), memory_order_relaxed);
    memcpy(dst, &lo, 8);
    memcpy(dst + 8, &hi, 8);
}

static inline uint64_t setup_word(uint32_t gen, uint32_t phase)
{
    return ((uint64_t)gen << 32) | phase;
}

int smc_setup_publish(struct smc_group *g, uint32_t slot, const struct smc_setup *s)
{
    uint8_t *hdr = smc_group_my_hdr(g, slot);
    if (!hdr)
        return g && !g->my_ext0 ? SMC_ECLOSED : SMC_EINVAL;
    if (!s)
        return SMC_EINVAL;
    atomic_store_explicit(u32_at(hdr, SMC_OFF_REASON), s->reason, memory_order_relaxed);
    atomic_store_explicit(u32_at(hdr, SMC_OFF_FAMILY), s->family, memory_order_relaxed);
    atomic_store_explicit(u64_at(hdr, SMC_OFF_RING0_OFF), s->ring0_off, memory_order_relaxed);
    atomic_store_explicit(u32_at(hdr, SMC_OFF_RING0_EXT), s->ring0_ext, memory_order_relaxed);
    atomic_store_explicit(u32_at(hdr, SMC_OFF_RING0_LOG2), s->ring0_log2, memory_order_relaxed);
    atomic_store_explicit(u64_at(hdr, SMC_OFF_SOCK_INO), s->sock_ino, memory_order_relaxed);
    atomic_store_explicit(u32_at(hdr, SMC_OFF_CPORT), s->cport, memory_order_relaxed);
    atomic_store_explicit(u32_at(hdr, SMC_OFF_SPORT), s->sport, memory_order_relaxed);
    store_addr(hdr, SMC_OFF_CADDR, s->caddr);
    store_addr(hdr, SMC_OFF_SADDR, s->saddr);
    /* release: every field above is visible before the word that names its gen and phase */
    atomic_store_explicit(u64_at(hdr, SMC_OFF_SETUP), setup_word(s->gen, s->phase), memory_order_release);
    /* Store-load order for the caller's next read of the peer's record (the server's ACCEPTED
     * against the client's withdrawal: either the client sees ACCEPTED or we see its withdrawal). */
    atomic_thread_fence(memory_order_seq_cst);
    return 0;
}

int smc_setup_set_phase(struct smc_group *g, uint32_t slot, uint32_t gen, uint32_t phase, uint32_t reason)
{
    uint8_t *hdr = smc_group_my_hdr(g, slot);
    if (!hdr)
        return g && !g->my_ext0 ? SMC_ECLOSED : SMC_EINVAL;
    atomic_store_explicit(u32_at(hdr, SMC_OFF_REASON), reason, memory_order_relaxed);
    atomic_store_explicit(u64_at(hdr, SMC_OFF_SETUP), setup_word(gen, phase), memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);   /* as in smc_setup_publish */
    return 0;
}

/* A snapshot, not validated: the caller checks gen, phase and every field it uses. */
int smc_setup_read_peer(struct smc_group *g, uint32_t slot, struct smc_setup *out)
{
    const uint8_t *hdr = smc_group_peer_hdr(g, slot);
    if (!hdr)
        return g && !g->my_ext0 ? SMC_ECLOSED : SMC_EINVAL;
    if (!out)
        return SMC_EINVAL;
    uint64_t word = atomic_load_explicit(cu64_at(hdr, SMC_OFF_SETUP), memory_order_acquire);
    out->gen = (uint32_t)(word >> 32);
    out->phase = (uint32_t)word;
    out->reason = atomic_load_explicit(cu32_at(hdr, SMC_OFF_REASON), memory_order_relaxed);
    out->family = atomic_load_explicit(cu32_at(hdr, SMC_OFF_FAMILY), memory_order_relaxed);
    out->ring0_off = atomic_load_explicit(cu64_at(hdr, SMC_OFF_RING0_OFF), memory_order_relaxed);
    out->ring0_ext = atomic_load_explicit(cu32_at(hdr, SMC_OFF_RING0_EXT), memory_order_relaxed);
    out->ring0_log2 = atomic_load_explicit(cu32_at(hdr, SMC_OFF_RING0_LOG2), memory_order_relaxed);
    out->sock_ino = atomic_load_explicit(cu64_at(hdr, SMC_OFF_SOCK_INO), memory_order_relaxed);
    out->cport = atomic_load_explicit(cu32_at(hdr, SMC_OFF_CPORT), memory_order_relaxed);
    out->sport = atomic_load_explicit(cu32_at(hdr, SMC_OFF_SPORT), memory_order_relaxed);
    load_addr(hdr, SMC_OFF_CADDR, out->caddr);
    load_addr(hdr, SMC_OFF_SADDR, out->saddr);
    return 0;
}

int smc_slot_reset(struct smc_group *g, uint32_t slot)
{
    uint8_t *hdr = smc_group_my_hdr(g, slot);
    if (!hdr)
        return g && !g->my_ext0 ? SMC_ECLOSED : SMC_EINVAL;
    /* Word by word (the peer may be reading); ordered before the next set-up publish (release). */
    for (size_t off = 0; off < SETUP_LINE; off += 8)
        atomic_store_explicit(u64_at(hdr, off), 0, memory_order_relaxed);
    return 0;
}

int smc_slot_release(struct smc_group *g, uint32_t slot, uint32_t gen)
{
    uint8_t *hdr = smc_group_my_hdr(g, slot);
    if (!hdr)
        return g && !g->my_ext0 ? SMC_ECLOSED : SMC_EINVAL;
    atomic_store_explicit(u32_at(hdr, SMC_OFF_RELEASED), gen, memory_order_release);
    return 0;
}

int64_t smc_slot_peer_released(struct smc_group *g, uint32_t slot)
{
    const uint8_t *hdr = smc_group_peer_hdr(g, slot);
    if (!hdr)
        return g && !g->my_ext0 ? SMC_ECLOSED : SMC_EINVAL;
    return atomic_load_explicit(cu32_at(hdr, SMC_OFF_RELEASED), memory_order_acquire);
}
