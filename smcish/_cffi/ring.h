/* ring.h: shared-memory layouts, constants and the C API of rings and link groups (authoritative;
 * see docs/ring.md and docs/design.md section 2).
 *
 * The part between the "cdef begin/end" markers is fed verbatim to cffi's cdef() by
 * build_ring.py, so it must stay cdef-parseable: integer-literal #defines only (trailing
 * comments are fine), no expressions, no other preprocessor lines.
 */
#ifndef SMCISH_RING_H
#define SMCISH_RING_H

#include <stdint.h>

/* ---- cdef begin ---- */

/* One connection side's header (a slot header, or the head of a legacy region). */
#define SMC_HEADER_SIZE 512
#define SMC_MIN_CAPACITY 4096
#define SMC_MAX_CAPACITY 1073741824ULL      /* 1 << 30 */
#define SMC_MIN_LOG2 12
#define SMC_MAX_LOG2 30

/* Header offsets: each owner-written group sits on its own 128-byte line. */
#define SMC_OFF_PROD 0                      /* u64: bytes ever written into this side's tx ring */
#define SMC_OFF_SW_SEQ 8                    /* u32: ring switches published (0 = none) */
#define SMC_OFF_SW_LOG2 12                  /* u32: capacity log2 of the next ring */
#define SMC_OFF_SW_POS 16                   /* u64: cursor from which the next ring holds the bytes */
#define SMC_OFF_SW_OFF 24                   /* u64: offset of the next ring block in its extent */
#define SMC_OFF_SW_EXT 32                   /* u32: extent index of the next ring block */
#define SMC_OFF_CONS_PEER 128               /* u64: bytes ever consumed from the PEER's ring */
#define SMC_OFF_STATE 256                   /* u32: SMC_STATE_* bits */
#define SMC_OFF_WANT_DATA 260               /* u32: arm epoch, non-zero while waiting for data */
#define SMC_OFF_WANT_SPACE 264              /* u32: arm epoch, non-zero while waiting for space */
#define SMC_OFF_EOF_POS 272                 /* u64: final prod, valid once SMC_STATE_EOF is set */
#define SMC_OFF_SETUP 384                   /* u64: (gen << 32) | phase, the set-up publish word */
#define SMC_OFF_REASON 392                  /* u32 */
#define SMC_OFF_FAMILY 396                  /* u32: AF_INET or AF_INET6 (client record) */
#define SMC_OFF_RING0_OFF 400               /* u64: first ring block: offset in its extent */
#define SMC_OFF_RING0_EXT 408               /* u32: first ring block: extent index */
#define SMC_OFF_RING0_LOG2 412              /* u32: first ring block: capacity log2 */
#define SMC_OFF_SOCK_INO 416                /* u64: client: inode of its TCP socket */
#define SMC_OFF_CPORT 424                   /* u32: client port */
#define SMC_OFF_SPORT 428                   /* u32: server port */
#define SMC_OFF_CADDR 432                   /* 16 bytes: client address (IPv4 in the first 4) */
#define SMC_OFF_SADDR 448                   /* 16 bytes: server address */
#define SMC_OFF_RELEASED 464                /* u32: gen of the last connection this side finished */

/* Header state bits (what smc_set_state takes and what the header stores). */
#define SMC_STATE_EOF 1
#define SMC_STATE_CLOSED 2
#define SMC_STATE_ABORT 4

/* Set-up phases (low 32 bits of the SMC_OFF_SETUP word). */
#define SMC_PHASE_NONE 0
#define SMC_PHASE_CLAIMED 1                 /* client */
#define SMC_PHASE_FINAL_ISM 2               /* client */
#define SMC_PHASE_FINAL_TCP 3               /* client */
#define SMC_PHASE_OPTIMISTIC 4              /* client: already sending; ISM unless it withdraws */
#define SMC_PHASE_WITHDRAWING 5             /* client: giving up an optimistic claim (final word follows) */
#define SMC_PHASE_ACCEPTED 1                /* server */
#define SMC_PHASE_DECLINED 2                /* server */

/* Link group: extent 0 layout (offsets from the start of extent 0). */
#define SMC_G_MAGIC 0x7072674c69434d53ULL   /* "SMCiLgrp" little endian */
#define SMC_G_VERSION 1
#define SMC_G_OFF_MAGIC 0                   /* u64 magic, u32 version at 8, u32 role at 12 */
#define SMC_G_OFF_NQ_PROD 128               /* u64: entries ever queued into my queue */
#define SMC_G_OFF_NQ_OVERFLOW 136           /* u64: times my queue was full */
#define SMC_G_OFF_NQ_CONS_PEER 256          /* u64: entries consumed from the PEER's queue */
#define SMC_G_OFF_WANT_WAKE 384             /* u32: sleep epoch of my hub (0 = awake) */
#define SMC_G_OFF_GSTATE 388                /* u32: SMC_GSTATE_* bits */
#define SMC_G_OFF_CPU 392                   /* u32: 1 + the CPU my hub last busy-polled on (0 unknown); a hint */
#define SMC_G_OFF_LISTENERS 512             /* u32 count at 512, u64 inodes[63] from 520 */
#define SMC_G_MAX_LISTENERS 63
#define SMC_G_OFF_CLAIMS 4096               /* u64[SMC_G_CLAIM_ENTRIES]: port << 32 | (slot + 1) */
#define SMC_G_CLAIM_ENTRIES 8192
#define SMC_G_CLAIM_PROBE 32                /* linear probe window from (port * 2654435761) >> 19 */
#define SMC_G_OFF_NQ 69632                  /* u32[SMC_G_NQ_ENTRIES]: slot indices */
#define SMC_G_NQ_ENTRIES 16384
#define SMC_G_OFF_HDRS 262144               /* slot headers: slot k at SMC_G_OFF_HDRS + k * 512 */
#define SMC_MAX_SLOTS 16384                 /* upper bound; a group's max_slots is a power of two <= this */
#define SMC_MIN_SLOTS 128
#define SMC_MAX_EXTENTS 32
#define SMC_HOT_MAX 32                      /* hot rings a group spin watches directly */
#define SMC_GSTATE_CLOSING 1
#define SMC_ROLE_CLIENT 1
#define SMC_ROLE_SERVER 2

/* Errors (negative returns). EPROD/ECONS/EEOF/ESWITCH/EGROUP are sticky: the peer broke the protocol. */
#define SMC_EINVAL -1   /* bad arguments: caller bug (not sticky) */
#define SMC_EPROD -2    /* peer's prod out of range or went backwards */
#define SMC_ECONS -3    /* peer's consumer cursor of our ring out of range or went backwards */
#define SMC_EEOF -4     /* peer's eof_pos inconsistent */
#define SMC_ECLOSED -5  /* smc_ring_close() / smc_group_close() was called (sticky) */
#define SMC_ESWITCH -6  /* peer's ring switch descriptor invalid */
#define SMC_EGROUP -7   /* peer's notification queue (or its cursors) invalid (sticky on the group) */
#define SMC_EBUSY -8    /* a ring switch is still pending (not sticky) */
#define SMC_EFULL -9    /* claim table window full (not sticky) */
#define SMC_EREAD -10   /* smc_tx_write_fd: the read failed before any byte (errno in *err; not sticky) */

/* What exactly a sticky error saw (err_detail; values in err_seen/err_lo/err_hi). */
#define SMC_DETAIL_PROD_RANGE 1      /* prod not in [last prod seen .. rx_cons + bound] */
#define SMC_DETAIL_CONS_RANGE 2      /* cons_peer not in [last cons seen .. tx_prod] */
#define SMC_DETAIL_EOF_POS 3         /* eof_pos != prod read after seeing EOF */
#define SMC_DETAIL_PROD_AFTER_EOF 4  /* prod moved away from the validated eof_pos */
#define SMC_DETAIL_SW_SEQ 5          /* sw_seq not completed+0 or completed+1 */
#define SMC_DETAIL_SW_POS 6          /* sw_pos behind the last prod seen or beyond the old ring */
#define SMC_DETAIL_SW_BLOCK 7        /* next ring block: bad log2, unknown extent, misaligned, out of bounds */
#define SMC_DETAIL_NQ_PROD 8         /* peer nq_prod backwards or more than the queue ahead of us */
#define SMC_DETAIL_NQ_CONS 9         /* peer nq_cons_peer backwards or beyond our nq_prod */
#define SMC_DETAIL_NQ_ENTRY 10       /* a queued slot index >= the group's max_slots */

/* Status bits returned by smc_rx_status and friends. */
#define SMC_ST_DATA 1   /* bytes readable from the peer's ring */
#define SMC_ST_EOF 2    /* peer set EOF and everything up to eof_pos has been consumed */
#define SMC_ST_CLOSED 4
#define SMC_ST_ABORT 8
#define SMC_ST_SPACE 16 /* our ring has free space */

/* smc_group_take flags */
#define SMC_TAKE_OVERFLOW 1   /* the peer's queue overflowed since the last take: rescan everything */

/* One side's view of a link group: its own extent 0 (writable) and the peer's extents (read-only).
 * Used from one thread only (the hub's loop thread). */
struct smc_group {
    uint8_t *my_ext0;                          /* NULL after smc_group_close */
    const uint8_t *peer_ext[32];               /* SMC_MAX_EXTENTS; index 0 = the peer's extent 0 */
    uint64_t peer_ext_len[32];
    uint32_t max_slots;                        /* this group's slot count (power of two) */
    int32_t peer_doorbell_fd;                  /* the peer's extent-0 doorbell, -1 for none */
    uint64_t nq_prod;                          /* my queue: producer cursor */
    uint64_t nq_peer_cons;                     /* my queue: last validated peer consumption */
    uint64_t nq_overflow;                      /* my queue: overflows published */
    uint64_t pq_cons;                          /* peer queue: my consumption */
    uint64_t pq_prod;                          /* peer queue: last validated peer prod */
    uint64_t pq_overflow_seen;
    uint32_t my_wake_epoch;                    /* last want_wake epoch I published */
    uint32_t rung_wake_epoch;                  /* peer want_wake epoch I already rang for */
    int32_t error;                             /* sticky group error (0 = none) */
    int32_t err_detail;
    uint64_t err_seen, err_lo, err_hi;
    int32_t doorbell_errno;
    uint64_t stat_doorbells, stat_doorbell_errors;
    uint64_t stat_queued, stat_taken, stat_overflows;
    uint64_t stat_spin_hits, stat_spin_misses;
    uint64_t stat_spin_colocated;              /* spin checks that found the peer hub on our CPU (and yielded) */
};

/* One connection: our tx ring and header (writable), the peer's rx ring and header (read-only).
 * Legacy mode (smc_ring_init): header + ring in one region per side, direct doorbell, no switch.
 * Slot mode (smc_ring_init_slot): headers in the group's extent 0, rings in ring blocks,
 * notifications through the group's queue, ring switches. */
struct smc_ring {
    uint8_t *my_hdr;              /* our header (writable), NULL after smc_ring_close */
    const uint8_t *peer_hdr;      /* the peer's header (read-only) */
    struct smc_group *group;      /* slot mode: the group (must outlive the ring); NULL in legacy mode */
    uint32_t slot;                /* slot mode: our slot index */
    /* tx: the block we write into now, and the previous one until the consumer passed tx_start */
    uint8_t *tx_base;
    uint64_t tx_cap, tx_mask;
    uint64_t tx_start;            /* cursor at which tx_base's block took over (0 without switch) */
    uint32_t tx_switches;         /* switches we published (== our sw_seq) */
    uint32_t tx_switch_pending;   /* 1 while the consumer has not passed tx_start */
    /* rx: the block we read from now, and a validated pending switch */
    const uint8_t *rx_base;
    uint64_t rx_cap, rx_mask;
    uint32_t rx_switches;         /* switches completed */
    uint32_t rx_sw_pending;       /* 1 when a validated switch waits at rx_sw_pos */
    uint64_t rx_sw_pos;
    const uint8_t *rx_sw_base;
    uint64_t rx_sw_cap;
    uint32_t rx_sw_ext;           /* extent of the pending/last switched-to block */
    uint32_t rx_ext;              /* extent of the current rx block (slot mode; 0 in legacy mode) */
    /* cursors as in v1 */
    uint64_t tx_prod;             /* our producer cursor (the header copy is only ever stored) */
    uint64_t tx_cons;             /* last validated peer consumer cursor of our ring */
    uint64_t rx_cons;             /* our consumer cursor of the peer's ring */
    uint64_t rx_prod;             /* last validated peer producer cursor */
    uint64_t rx_cons_at_space_ask;/* rx_cons when we first saw the peer's current want_space epoch */
    uint64_t rx_eof_pos;          /* validated peer eof_pos (when rx_eof_seen) */
    uint32_t space_ask_epoch;     /* the peer want_space epoch rx_cons_at_space_ask belongs to */
    uint32_t my_epoch;            /* last arm epoch we published */
    uint32_t rung_data_epoch;     /* peer want_data epoch we already notified for */
    uint32_t rung_space_epoch;    /* peer want_space epoch we already notified for */
    uint32_t my_state;            /* SMC_STATE_* bits we published */
    uint32_t peer_state;          /* SMC_STATE_* bits seen from the peer (sticky) */
    uint32_t rx_eof_seen;         /* 1 once the peer's EOF and eof_pos were validated */
    int32_t peer_doorbell_fd;     /* legacy mode: eventfd to ring the peer, -1 for none */
    int32_t error;                /* sticky error (0 = none) */
    int32_t doorbell_errno;       /* errno of the last failed doorbell write (0 = none) */
    int32_t err_detail;           /* which check failed: SMC_DETAIL_* */
    uint64_t err_seen, err_lo, err_hi;  /* the offending value and the allowed/expected range */
    uint64_t stat_doorbells;      /* legacy mode: eventfd writes done; slot mode: notifications queued */
    uint64_t stat_doorbell_errors;/* eventfd writes that failed (not EAGAIN) */
    uint64_t stat_tx_bytes, stat_rx_bytes;
    uint64_t stat_spin_hits, stat_spin_misses;        /* smc_rx_spin */
    uint64_t stat_tx_spin_hits, stat_tx_spin_misses;  /* smc_tx_spin */
    /* zero copy (smc_tx_reserve/smc_tx_commit, smc_rx_peek/smc_rx_consume) */
    uint64_t tx_resv;             /* bytes reserved at tx_prod, not yet committed (0 = none) */
    uint64_t rx_peek_end;         /* rx cursor where the last peek ended (consume stops there) */
    uint64_t stat_tx_fd_bounced;  /* smc_tx_write_fd: bytes read through the bounce buffer */
};

/* A set-up record (slot header line 3), as written by its owner or as a snapshot of the peer's. */
struct smc_setup {
    uint32_t gen;
    uint32_t phase;
    uint32_t reason;
    uint32_t family;
    uint64_t ring0_off;
    uint32_t ring0_ext;
    uint32_t ring0_log2;
    uint64_t sock_ino;
    uint32_t cport, sport;
    uint8_t caddr[16];
    uint8_t saddr[16];
};

/* ---- rings ---- */
int     smc_ring_init(struct smc_ring *r, uint8_t *my_base, uint64_t my_len,
                      const uint8_t *peer_base, uint64_t peer_len,
                      uint64_t tx_cap, uint64_t rx_cap, int peer_doorbell_fd);
int     smc_ring_init_slot(struct smc_ring *r, struct smc_group *g, uint32_t slot,
                           uint8_t *tx_base, uint64_t tx_cap,
                           uint32_t rx_ext, uint64_t rx_off, uint32_t rx_log2);
int     smc_ring_attach_rx(struct smc_ring *r, uint32_t rx_ext, uint64_t rx_off, uint32_t rx_log2);
int     smc_ring_rx_attached(const struct smc_ring *r);
void    smc_ring_close(struct smc_ring *r);
int64_t smc_tx_space(struct smc_ring *r);
int64_t smc_tx_write(struct smc_ring *r, const char *buf, uint64_t len);
int64_t smc_tx_writev(struct smc_ring *r, const char *const *bufs, const uint64_t *lens, uint32_t n);
int64_t smc_rx_avail(struct smc_ring *r);
int64_t smc_rx_read(struct smc_ring *r, char *dst, uint64_t len);
int64_t smc_tx_reserve(struct smc_ring *r, uint64_t want, uint64_t *off);
int64_t smc_tx_commit(struct smc_ring *r, uint64_t n);
void    smc_tx_cancel(struct smc_ring *r);
int64_t smc_rx_peek(struct smc_ring *r, uint64_t want, uint64_t *off);
int64_t smc_rx_consume(struct smc_ring *r, uint64_t n);
int64_t smc_tx_write_fd(struct smc_ring *r, int fd, uint64_t offset, uint64_t count, int32_t *err);
int     smc_rx_status(struct smc_ring *r);
int     smc_rx_prepare_sleep(struct smc_ring *r);
int     smc_tx_prepare_sleep(struct smc_ring *r);
void    smc_clear_wants(struct smc_ring *r);
int     smc_set_state(struct smc_ring *r, uint32_t bits);
int     smc_set_state_quiet(struct smc_ring *r, uint32_t bits);
int     smc_rx_spin(struct smc_ring *r, uint64_t budget_ns);
int     smc_tx_spin(struct smc_ring *r, uint64_t budget_ns);
int     smc_doorbell(struct smc_ring *r);
int64_t smc_doorbell_drain(int fd);
int     smc_tx_switch(struct smc_ring *r, uint8_t *new_base, uint64_t new_cap,
                      uint32_t ext, uint64_t off);
int     smc_tx_switch_pending(struct smc_ring *r);

/* ---- link groups ---- */
int     smc_group_init(struct smc_group *g, uint8_t *my_ext0, uint64_t my_len,
                       const uint8_t *peer_ext0, uint64_t peer_len, int peer_doorbell_fd,
                       uint32_t role, uint32_t max_slots);
int     smc_group_add_peer_extent(struct smc_group *g, uint32_t index, const uint8_t *base,
                                  uint64_t len);
int     smc_group_remove_peer_extent(struct smc_group *g, uint32_t index);
void    smc_group_close(struct smc_group *g);
int     smc_group_notify(struct smc_group *g, uint32_t slot);
int64_t smc_group_take(struct smc_group *g, uint32_t *out, uint32_t max, uint32_t *flags);
int     smc_group_pending(struct smc_group *g);
int     smc_group_prepare_sleep(struct smc_group *g);
void    smc_group_clear_wake(struct smc_group *g);
int     smc_group_spin(struct smc_group *g, uint64_t budget_ns);
int     smc_group_spin_hot(struct smc_group *g, struct smc_ring **hot, uint32_t n, uint64_t budget_ns,
                           uint32_t *ready);
int     smc_group_set_gstate(struct smc_group *g, uint32_t bits);
uint32_t smc_group_peer_gstate(struct smc_group *g);
int     smc_group_set_listeners(struct smc_group *g, const uint64_t *inodes, uint32_t n);
int     smc_group_peer_has_listener(struct smc_group *g, uint64_t inode);
int     smc_group_post_claim(struct smc_group *g, uint32_t port, uint32_t slot);
void    smc_group_clear_claim(struct smc_group *g, uint32_t port, uint32_t slot);
int64_t smc_group_find_claims(struct smc_group *g, uint32_t port, uint32_t *out_slots, uint32_t max);
uint8_t *smc_group_my_hdr(struct smc_group *g, uint32_t slot);
const uint8_t *smc_group_peer_hdr(struct smc_group *g, uint32_t slot);

/* ---- set-up records (slot header line 3) ---- */
int     smc_setup_publish(struct smc_group *g, uint32_t slot, const struct smc_setup *s);
int     smc_setup_set_phase(struct smc_group *g, uint32_t slot, uint32_t gen, uint32_t phase,
                            uint32_t reason);
int     smc_setup_read_peer(struct smc_group *g, uint32_t slot, struct smc_setup *out);
int     smc_slot_reset(struct smc_group *g, uint32_t slot);
int     smc_slot_release(struct smc_group *g, uint32_t slot, uint32_t gen);
int64_t smc_slot_peer_released(struct smc_group *g, uint32_t slot);

/* ---- cdef end ---- */

#endif /* SMCISH_RING_H */
