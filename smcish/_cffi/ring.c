/* ring.c: move bytes through a pair of shared-memory rings, validating every peer-written field.
 *
 * One side owns one region (header + ring of its outgoing bytes) and writes only there; it maps
 * the peer's region read-only. Rules that keep a hostile peer harmless (DESIGN.md section 5):
 *  - every peer-written field is loaded exactly once (acquire) into a local, validated, and only
 *    the local is used afterwards;
 *  - capacities and masks come from smc_ring_init's arguments, never from shared memory;
 *  - every ring offset is `cursor & mask` and every copy length is <= the capacity, so no value
 *    in the peer's memory can move an access outside [base, base + SMC_HEADER_SIZE + cap);
 *  - a violation sets a sticky r->error that every later call returns.
 * Cursor arithmetic is modulo 2^64 (differences only), so cursors may wrap.
 */
#define _POSIX_C_SOURCE 200809L

#include "ring.h"

#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if ATOMIC_LONG_LOCK_FREE != 2 && ATOMIC_LLONG_LOCK_FREE != 2
#error "64-bit atomics must be lock-free: a lock-based atomic would store into the peer's read-only mapping"
#endif
_Static_assert(sizeof(_Atomic uint64_t) == 8, "atomic u64 must be plain 8 bytes");
_Static_assert(sizeof(_Atomic uint32_t) == 4, "atomic u32 must be plain 4 bytes");

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() atomic_signal_fence(memory_order_seq_cst)
#endif

#define STATE_MASK (SMC_STATE_EOF | SMC_STATE_CLOSED | SMC_STATE_ABORT)

typedef _Atomic uint64_t atomic_u64;
typedef _Atomic uint32_t atomic_u32;

static inline atomic_u64 *my_u64(struct smc_ring *r, size_t off)
{
    return (atomic_u64 *)(void *)(r->my_base + off);
}

static inline atomic_u32 *my_u32(struct smc_ring *r, size_t off)
{
    return (atomic_u32 *)(void *)(r->my_base + off);
}

static inline const atomic_u64 *peer_u64(const struct smc_ring *r, size_t off)
{
    return (const atomic_u64 *)(const void *)(r->peer_base + off);
}

static inline const atomic_u32 *peer_u32(const struct smc_ring *r, size_t off)
{
    return (const atomic_u32 *)(const void *)(r->peer_base + off);
}

static int fail(struct smc_ring *r, int code, int detail, uint64_t seen, uint64_t lo, uint64_t hi)
{
    r->error = code;
    r->err_detail = detail;
    r->err_seen = seen;
    r->err_lo = lo;
    r->err_hi = hi;
    return code;
}

/* ------------------------------------------------------------------ peer field validation */

/* Load the peer's prod once; accept it iff rx_prod (last seen) <= p <= rx_cons + rx_cap. */
static int refresh_rx_prod(struct smc_ring *r)
{
    uint64_t peer_prod = atomic_load_explicit(peer_u64(r, SMC_OFF_PROD), memory_order_acquire);
    uint64_t ahead = peer_prod - r->rx_cons;
    if (ahead > r->rx_cap || ahead < r->rx_prod - r->rx_cons)
        return fail(r, SMC_EPROD, SMC_DETAIL_PROD_RANGE, peer_prod, r->rx_prod, r->rx_cons + r->rx_cap);
    if (r->rx_eof_seen && peer_prod != r->rx_eof_pos)
        return fail(r, SMC_EEOF, SMC_DETAIL_PROD_AFTER_EOF, peer_prod, r->rx_eof_pos, r->rx_eof_pos);
    r->rx_prod = peer_prod;
    return 0;
}

/* Load the peer's consumer cursor of our ring once; accept it iff tx_cons (last seen) <= c <= tx_prod. */
static int refresh_tx_cons(struct smc_ring *r)
{
    uint64_t peer_cons = atomic_load_explicit(peer_u64(r, SMC_OFF_CONS_PEER), memory_order_acquire);
    if (peer_cons - r->tx_cons > r->tx_prod - r->tx_cons)
        return fail(r, SMC_ECONS, SMC_DETAIL_CONS_RANGE, peer_cons, r->tx_cons, r->tx_prod);
    r->tx_cons = peer_cons;
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

/* ------------------------------------------------------------------ doorbells */

static int ring_peer(struct smc_ring *r)
{
    int fd = r->peer_doorbell_fd;
    if (fd < 0)
        return 0;
    uint64_t one = 1;
    ssize_t k;
    do {
        k = write(fd, &one, sizeof one);
    } while (k < 0 && errno == EINTR);
    if (k == (ssize_t)sizeof one) {
        r->stat_doorbells++;
        return 0;
    }
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 0;  /* counter saturated: the peer has a wake-up pending anyway */
    int err = k < 0 ? errno : EIO;
    r->doorbell_errno = err;
    r->stat_doorbell_errors++;
    return -err;
}

/* After publishing prod: wake the peer iff it sleeps for data with an epoch we did not ring yet. */
static inline void notify_data(struct smc_ring *r)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t want = atomic_load_explicit(peer_u32(r, SMC_OFF_WANT_DATA), memory_order_relaxed);
    if (want != 0 && want != r->rung_data_epoch) {
        r->rung_data_epoch = want;
        ring_peer(r);
    }
}

/* After publishing cons_peer: wake a producer waiting for space once it is worth it
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
        ring_peer(r);
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

/* ------------------------------------------------------------------ copies */

/* Copy n <= tx_cap bytes into our ring at cursor pos: at most two memcpy (wrap). */
static inline void copy_in(struct smc_ring *r, uint64_t pos, const char *src, uint64_t n)
{
    uint8_t *ring = r->my_base + SMC_HEADER_SIZE;
    uint64_t off = pos & r->tx_mask;
    uint64_t first = r->tx_cap - off;
    if (n <= first) {
        memcpy(ring + off, src, n);
    } else {
        memcpy(ring + off, src, first);
        memcpy(ring, src + first, n - first);
    }
}

/* Copy n <= rx_cap bytes out of the peer's ring at cursor pos: at most two memcpy (wrap). */
static inline void copy_out(struct smc_ring *r, uint64_t pos, char *dst, uint64_t n)
{
    const uint8_t *ring = r->peer_base + SMC_HEADER_SIZE;
    uint64_t off = pos & r->rx_mask;
    uint64_t first = r->rx_cap - off;
    if (n <= first) {
        memcpy(dst, ring + off, n);
    } else {
        memcpy(dst, ring + off, first);
        memcpy(dst + first, ring, n - first);
    }
}

static inline void publish_prod(struct smc_ring *r, uint64_t n)
{
    r->tx_prod += n;
    r->stat_tx_bytes += n;
    atomic_store_explicit(my_u64(r, SMC_OFF_PROD), r->tx_prod, memory_order_release);
}

/* ------------------------------------------------------------------ API */

static int is_pow2_cap(uint64_t cap)
{
    return cap >= SMC_MIN_CAPACITY && cap <= SMC_MAX_CAPACITY && (cap & (cap - 1)) == 0;
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
    uintptr_t my_lo = (uintptr_t)my_base, my_hi = my_lo + SMC_HEADER_SIZE + tx_cap;
    uintptr_t peer_lo = (uintptr_t)peer_base, peer_hi = peer_lo + SMC_HEADER_SIZE + rx_cap;
    if (my_lo < peer_hi && peer_lo < my_hi)
        return SMC_EINVAL;  /* one buffer for both regions: a caller bug */

    r->my_base = my_base;
    r->peer_base = peer_base;
    r->tx_cap = tx_cap;
    r->tx_mask = tx_cap - 1;
    r->rx_cap = rx_cap;
    r->rx_mask = rx_cap - 1;
    r->peer_doorbell_fd = peer_doorbell_fd;
    /* Our own header is trusted: resume from whatever cursors it holds (zero for a fresh region). */
    r->tx_prod = atomic_load_explicit(my_u64(r, SMC_OFF_PROD), memory_order_relaxed);
    r->rx_cons = atomic_load_explicit(my_u64(r, SMC_OFF_CONS_PEER), memory_order_relaxed);
    r->my_state = atomic_load_explicit(my_u32(r, SMC_OFF_STATE), memory_order_relaxed) & STATE_MASK;
    uint32_t want_data = atomic_load_explicit(my_u32(r, SMC_OFF_WANT_DATA), memory_order_relaxed);
    uint32_t want_space = atomic_load_explicit(my_u32(r, SMC_OFF_WANT_SPACE), memory_order_relaxed);
    r->my_epoch = want_data > want_space ? want_data : want_space;
    /* Lower bounds until the peer's fields are first observed: any peer cons in
     * [tx_prod - tx_cap, tx_prod] and any peer prod in [rx_cons, rx_cons + rx_cap] is acceptable. */
    r->tx_cons = r->tx_prod - tx_cap;
    r->rx_prod = r->rx_cons;
    atomic_store_explicit(my_u64(r, SMC_OFF_MAGIC), SMC_MAGIC, memory_order_relaxed);
    atomic_store_explicit(my_u64(r, SMC_OFF_CAPACITY), tx_cap, memory_order_relaxed);
    r->error = 0;
    return 0;
}

void smc_ring_close(struct smc_ring *r)
{
    r->my_base = NULL;
    r->peer_base = NULL;
    r->peer_doorbell_fd = -1;
    r->error = SMC_ECLOSED;
}

int64_t smc_tx_space(struct smc_ring *r)
{
    if (r->error)
        return r->error;
    int rc = refresh_tx_cons(r);
    if (rc)
        return rc;
    return (int64_t)(r->tx_cap - (r->tx_prod - r->tx_cons));
}

int64_t smc_tx_write(struct smc_ring *r, const char *buf, uint64_t len)
{
    if (r->error)
        return r->error;
    if (r->my_state || (len && !buf))
        return SMC_EINVAL;
    /* The cached peer cons is a lower bound: reload it only when it does not prove enough room. */
    uint64_t space = r->tx_cap - (r->tx_prod - r->tx_cons);
    if (space < len) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        space = r->tx_cap - (r->tx_prod - r->tx_cons);
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
    if (r->my_state || (n && (!bufs || !lens)))
        return SMC_EINVAL;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (lens[i] && !bufs[i])
            return SMC_EINVAL;
        total = lens[i] > UINT64_MAX - total ? UINT64_MAX : total + lens[i];
    }
    uint64_t space = r->tx_cap - (r->tx_prod - r->tx_cons);
    if (space < total) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        space = r->tx_cap - (r->tx_prod - r->tx_cons);
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
    copy_out(r, r->rx_cons, dst, n);
    r->rx_cons += n;
    r->stat_rx_bytes += n;
    /* release: our reads of the ring happen before the producer may overwrite those bytes */
    atomic_store_explicit(my_u64(r, SMC_OFF_CONS_PEER), r->rx_cons, memory_order_release);
    notify_space(r, n);
    return (int64_t)n;
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
    if (r->tx_prod - r->tx_cons < r->tx_cap)
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
    if (r->tx_prod - r->tx_cons < r->tx_cap)
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
    if (!r->my_base)
        return;
    atomic_store_explicit(my_u32(r, SMC_OFF_WANT_DATA), 0, memory_order_relaxed);
    atomic_store_explicit(my_u32(r, SMC_OFF_WANT_SPACE), 0, memory_order_relaxed);
}

/* Works even after a peer violation (only our own region is written), so ABORT can still be told. */
int smc_set_state(struct smc_ring *r, uint32_t bits)
{
    if (!r->my_base)
        return SMC_ECLOSED;
    if (bits & ~(uint32_t)STATE_MASK)
        return SMC_EINVAL;
    if ((bits & SMC_STATE_EOF) && !(r->my_state & SMC_STATE_EOF))
        atomic_store_explicit(my_u64(r, SMC_OFF_EOF_POS), r->tx_prod, memory_order_relaxed);
    r->my_state |= bits;
    /* release: eof_pos (and every byte before tx_prod) is visible before the bit */
    atomic_store_explicit(my_u32(r, SMC_OFF_STATE), r->my_state, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t want_data = atomic_load_explicit(peer_u32(r, SMC_OFF_WANT_DATA), memory_order_relaxed);
    uint32_t want_space = atomic_load_explicit(peer_u32(r, SMC_OFF_WANT_SPACE), memory_order_relaxed);
    if (want_data != 0 || want_space != 0) {
        if (want_data != 0)
            r->rung_data_epoch = want_data;
        ring_peer(r);
    }
    return 0;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
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
        if (budget_ns == 0 || ((i & 63u) == 0 && now_ns() >= deadline)) {
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
    uint64_t deadline = now_ns() + budget_ns;
    for (uint32_t i = 1;; i++) {
        int rc = refresh_tx_cons(r);
        if (rc)
            return rc;
        if (r->tx_prod - r->tx_cons < r->tx_cap) {
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
            if (budget_ns == 0 || now_ns() >= deadline) {
                r->stat_tx_spin_misses++;
                return 0;
            }
        }
        cpu_relax();
    }
}

int smc_doorbell(struct smc_ring *r)
{
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
