/* ring.h: the shared-memory ring's layout, constants and C API (authoritative; see docs/ring.md).
 *
 * The part between the "cdef begin/end" markers is fed verbatim to cffi's cdef() by
 * build_ring.py, so it must stay cdef-parseable: integer-literal #defines only (trailing
 * comments are fine), no expressions, no other preprocessor lines.
 */
#ifndef SMCISH_RING_H
#define SMCISH_RING_H

#include <stdint.h>

/* ---- cdef begin ---- */

/* Region = SMC_HEADER_SIZE + capacity; capacity a power of two in [MIN, MAX]. */
#define SMC_HEADER_SIZE 512
#define SMC_MIN_CAPACITY 4096
#define SMC_MAX_CAPACITY 1073741824ULL      /* 1 << 30 */

/* Header offsets: each owner-written group sits on its own 128-byte line. */
#define SMC_OFF_PROD 0                      /* u64: bytes ever written into this region's ring */
#define SMC_OFF_CONS_PEER 128               /* u64: bytes ever consumed from the PEER's ring */
#define SMC_OFF_STATE 256                   /* u32: SMC_STATE_* bits */
#define SMC_OFF_WANT_DATA 260               /* u32: sleep epoch, non-zero while waiting for data */
#define SMC_OFF_WANT_SPACE 264              /* u32: sleep epoch, non-zero while waiting for space */
#define SMC_OFF_EOF_POS 272                 /* u64: final prod, valid once SMC_STATE_EOF is set */
#define SMC_OFF_MAGIC 384                   /* u64: informational, never read back */
#define SMC_OFF_CAPACITY 392                /* u64: informational, never read back */
#define SMC_MAGIC 0x676e695269434d53ULL     /* "SMCiRing" little endian */

/* Header state bits (what smc_set_state takes and what the header stores). */
#define SMC_STATE_EOF 1
#define SMC_STATE_CLOSED 2
#define SMC_STATE_ABORT 4

/* Errors (negative returns). EPROD/ECONS/EEOF are sticky: the peer broke the protocol. */
#define SMC_EINVAL -1   /* bad arguments: caller bug (not sticky) */
#define SMC_EPROD -2    /* peer's prod out of range or went backwards */
#define SMC_ECONS -3    /* peer's consumer cursor of our ring out of range or went backwards */
#define SMC_EEOF -4     /* peer's eof_pos inconsistent */
#define SMC_ECLOSED -5  /* smc_ring_close() was called: the mappings may be gone (sticky) */

/* What exactly a sticky error saw (smc_ring.err_detail; values in err_seen/err_lo/err_hi). */
#define SMC_DETAIL_PROD_RANGE 1      /* prod not in [last prod seen .. rx_cons + rx_cap] */
#define SMC_DETAIL_CONS_RANGE 2      /* cons_peer not in [last cons seen .. tx_prod] */
#define SMC_DETAIL_EOF_POS 3         /* eof_pos != prod read after seeing EOF */
#define SMC_DETAIL_PROD_AFTER_EOF 4  /* prod moved away from the validated eof_pos */

/* Status bits returned by smc_rx_status and friends. */
#define SMC_ST_DATA 1   /* bytes readable from the peer's ring */
#define SMC_ST_EOF 2    /* peer set EOF and everything up to eof_pos has been consumed */
#define SMC_ST_CLOSED 4
#define SMC_ST_ABORT 8
#define SMC_ST_SPACE 16 /* our ring has free space */

struct smc_ring {
    uint8_t *my_base;             /* our region (writable), NULL after smc_ring_close */
    const uint8_t *peer_base;     /* the peer's region (mapped read-only) */
    uint64_t tx_cap, tx_mask;     /* our ring, fixed at init */
    uint64_t rx_cap, rx_mask;     /* the peer's ring, fixed at init */
    uint64_t tx_prod;             /* our producer cursor (the header copy is only ever stored) */
    uint64_t tx_cons;             /* last validated peer consumer cursor of our ring */
    uint64_t rx_cons;             /* our consumer cursor of the peer's ring */
    uint64_t rx_prod;             /* last validated peer producer cursor */
    uint64_t rx_cons_at_space_ask;/* rx_cons when we first saw the peer's current want_space epoch */
    uint64_t rx_eof_pos;          /* validated peer eof_pos (when rx_eof_seen) */
    uint32_t space_ask_epoch;     /* the peer want_space epoch rx_cons_at_space_ask belongs to */
    uint32_t my_epoch;            /* last sleep epoch we published */
    uint32_t rung_data_epoch;     /* peer want_data epoch we already rang for */
    uint32_t rung_space_epoch;    /* peer want_space epoch we already rang for */
    uint32_t my_state;            /* SMC_STATE_* bits we published */
    uint32_t peer_state;          /* SMC_STATE_* bits seen from the peer (sticky) */
    uint32_t rx_eof_seen;         /* 1 once the peer's EOF and eof_pos were validated */
    int32_t peer_doorbell_fd;     /* eventfd to ring the peer, -1 for none */
    int32_t error;                /* sticky error (0 = none) */
    int32_t doorbell_errno;       /* errno of the last failed doorbell write (0 = none) */
    int32_t err_detail;           /* which check failed: SMC_DETAIL_* */
    uint64_t err_seen, err_lo, err_hi;  /* the offending value and the allowed/expected range */
    uint64_t stat_doorbells;      /* eventfd writes done */
    uint64_t stat_doorbell_errors;/* eventfd writes that failed (not EAGAIN) */
    uint64_t stat_tx_bytes, stat_rx_bytes;
    uint64_t stat_spin_hits, stat_spin_misses;        /* smc_rx_spin */
    uint64_t stat_tx_spin_hits, stat_tx_spin_misses;  /* smc_tx_spin */
};

int     smc_ring_init(struct smc_ring *r, uint8_t *my_base, uint64_t my_len,
                      const uint8_t *peer_base, uint64_t peer_len,
                      uint64_t tx_cap, uint64_t rx_cap, int peer_doorbell_fd);
void    smc_ring_close(struct smc_ring *r);
int64_t smc_tx_space(struct smc_ring *r);
int64_t smc_tx_write(struct smc_ring *r, const char *buf, uint64_t len);
int64_t smc_tx_writev(struct smc_ring *r, const char *const *bufs, const uint64_t *lens, uint32_t n);
int64_t smc_rx_avail(struct smc_ring *r);
int64_t smc_rx_read(struct smc_ring *r, char *dst, uint64_t len);
int     smc_rx_status(struct smc_ring *r);
int     smc_rx_prepare_sleep(struct smc_ring *r);
int     smc_tx_prepare_sleep(struct smc_ring *r);
void    smc_clear_wants(struct smc_ring *r);
int     smc_set_state(struct smc_ring *r, uint32_t bits);
int     smc_rx_spin(struct smc_ring *r, uint64_t budget_ns);
int     smc_tx_spin(struct smc_ring *r, uint64_t budget_ns);
int     smc_doorbell(struct smc_ring *r);
int64_t smc_doorbell_drain(int fd);

/* ---- cdef end ---- */

#endif /* SMCISH_RING_H */
