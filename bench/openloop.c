/*
 * openloop: an open-loop HTTP/1.1 load generator for loopback benchmarks.
 *
 * Why open loop: a closed-loop tool (wrk, ab, most "requests per second" scripts) sends the
 * next request on a connection only after the previous answer came back. When the server
 * stalls, the tool stalls with it and simply does not send the requests a real caller (Index
 * Exchange calls us once per impression, whatever our state) would have sent meanwhile; the
 * stall then shows up as one slow sample instead of hundreds. That is "coordinated omission".
 *
 * Here request i is due at t0 + i/R whatever happens. Its latency is measured from that
 * INTENDED send time to the moment its full response was read, so time spent waiting for a
 * free connection (all busy because the server is slow) is counted as the caller would see it.
 *
 * Design: one thread, Linux epoll, non-blocking sockets, one request in flight per keep-alive
 * connection (no pipelining, like a normal client pool). The queue of due-but-unsent requests
 * is implicit: requests are numbered and sent in order, so the queue is the index range
 * [q_head, due_upto) and costs no memory. Latencies go into a log-linear histogram (1 us
 * resolution, < 0.8% relative error, constant memory). The loop sleeps until the next due time
 * with microsecond precision, through epoll_pwait2 or else a timerfd: epoll_wait's own timeout
 * has only millisecond resolution, which would add up to 1 ms of fake latency to every sample.
 * The timer slack is set to 1 ns for the same reason (the default 50 us would be added to
 * every timed wake-up).
 *
 * Safety: only 127.0.0.1, ::1 and localhost are accepted as the target; anything else exits
 * with status 2 before a socket is created. Every loop is bounded: the run ends at the latest
 * at t0 + warmup + duration + timeout (plus at most 0.5 s of initial connecting).
 *
 * Build: gcc -O2 -std=gnu11 -Wall -Wextra -Werror -o openloop openloop.c -lm
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
#define HAVE_EPOLL_PWAIT2 1 /* the glibc wrapper exists from 2.35 (kernel support from 5.11) */
#endif

#define NS_PER_S ((int64_t)1000000000)
#define NS_PER_MS ((int64_t)1000000)
/* Header block limit per response; bodies are skipped as they stream, so any body size works
 * with this fixed buffer. */
#define RBUF_SIZE 16384
#define MAX_CONNECTIONS 4096
#define MAX_EVENTS 256
/* Connection-level checks (in-flight timeouts, reconnect back-off) run at most this often:
 * timeouts only need millisecond precision, and scanning every connection on every wake-up
 * would cost more than the requests at high rates. */
#define MAINT_INTERVAL_NS (1 * NS_PER_MS)
/* Initial connects get at most this long before the schedule starts, so a dead target still
 * respects the run-time bound. */
#define PRECONNECT_NS (500 * NS_PER_MS)
#define BACKOFF_MIN_NS (1 * NS_PER_MS)
#define BACKOFF_MAX_NS (100 * NS_PER_MS)

/* ---------------------------------------------------------------- histogram ---------------
 * Log-linear like HdrHistogram with 2 significant digits: values below 256 us are exact;
 * above, each power-of-two range is cut into 128 equal sub-buckets, so a bucket is at most
 * 1/128 (0.78%) of its values wide. 2^40 us (12 days) is far beyond any run; bigger values are
 * clamped. 4352 counters, 34 KiB, whatever the number of samples. */
#define H_SUB 256
#define H_HALF 128
#define H_MAX_BITS 40
#define H_BUCKETS (H_SUB + (H_MAX_BITS - 8) * H_HALF)

typedef struct {
    uint64_t counts[H_BUCKETS];
    uint64_t total;
    uint64_t max_us;
    uint64_t min_us;
    double sum_us;
} histogram;

static unsigned h_index(uint64_t v) {
    if (v >= (1ULL << H_MAX_BITS)) v = (1ULL << H_MAX_BITS) - 1;
    if (v < H_SUB) return (unsigned)v;
    unsigned bit = 63u - (unsigned)__builtin_clzll(v); /* >= 8 */
    unsigned shift = bit - 7u;                          /* v >> shift is in [128, 255] */
    return H_SUB + (shift - 1u) * H_HALF + (unsigned)((v >> shift) - H_HALF);
}

/* The highest value a bucket holds: percentiles err on the slow side, never flatter. */
static uint64_t h_highest(unsigned idx) {
    if (idx < H_SUB) return idx;
    unsigned k = idx - H_SUB;
    unsigned shift = k / H_HALF + 1u;
    uint64_t sub = k % H_HALF + H_HALF;
    return ((sub + 1u) << shift) - 1u;
}

static void h_record(histogram *h, uint64_t us) {
    h->counts[h_index(us)]++;
    if (h->total == 0 || us < h->min_us) h->min_us = us;
    if (us > h->max_us) h->max_us = us;
    h->total++;
    h->sum_us += (double)us;
}

static uint64_t h_percentile(const histogram *h, double p) {
    if (h->total == 0) return 0;
    uint64_t target = (uint64_t)ceil(p / 100.0 * (double)h->total);
    if (target < 1) target = 1;
    if (target > h->total) target = h->total;
    uint64_t seen = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= target) {
            uint64_t v = h_highest(i);
            return v > h->max_us ? h->max_us : v;
        }
    }
    return h->max_us;
}

/* ---------------------------------------------------------------- state --------------------*/
enum conn_state { C_CLOSED, C_RETRY, C_CONNECTING, C_IDLE, C_BUSY };
enum err_kind { E_CONNECT, E_READ, E_WRITE, E_CLOSED, E_PARSE, E_KINDS };
static const char *const err_names[E_KINDS] = {"connect", "read", "write", "closed", "parse"};

typedef struct {
    int fd;
    int state;
    int in_ring;         /* listed in the idle ring (entries are checked lazily on pop) */
    int want_out;        /* EPOLLOUT is registered */
    int served;          /* has answered a request since it was connected */
    int64_t since;       /* connect start, for connect timeouts */
    int64_t retry_at;    /* C_RETRY: when to connect again */
    int64_t backoff;     /* reconnect back-off while connections fail before answering */
    /* the request in flight (C_BUSY) */
    uint64_t req;
    int64_t intended;
    const char *wbuf;
    size_t wlen, woff;
    /* response parsing */
    size_t rpos, rlen;
    int hdr_done;
    int status;
    int close_after;
    uint64_t body_left;
    char rbuf[RBUF_SIZE];
} conn;

typedef struct {
    char *data;
    size_t len;
} request_buf;

static struct {
    /* configuration */
    int family;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    double rate, duration, warmup;
    int nconns;
    int64_t timeout_ns;
    /* requests */
    request_buf *reqs;
    size_t nreqs;
    uint64_t warm_n, total; /* requests [0, warm_n) are warm-up, [warm_n, total) measured */
    int64_t t0;
    /* loop */
    int ep, tfd;
    conn *conns;
    int *ring; /* idle connections, FIFO so every connection stays warm */
    int ring_head, ring_len;
    int n_idle, n_busy, n_retry;
    int64_t armed;
    int use_pwait2;
    /* results (measured requests only, except the error counters) */
    uint64_t sent, completed, failed, timeouts, warm_sent;
    uint64_t errors[E_KINDS];
    uint64_t status[600];
    uint64_t status_other;
    uint64_t over_1ms, over_5ms;
    histogram lat, lag;
} G;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* Computed from the index each time (not accumulated) so rounding never drifts the schedule. */
static int64_t intended(uint64_t i) {
    return G.t0 + (int64_t)llround((double)i * 1e9 / G.rate);
}

static void die(const char *msg) {
    fprintf(stderr, "openloop: %s: %s\n", msg, strerror(errno));
    exit(1);
}

static void usage_error(const char *msg) {
    fprintf(stderr,
            "openloop: %s\n"
            "usage: openloop --host 127.0.0.1|::1|localhost --port P --path /enrich --rate R\n"
            "                --duration S --bodies FILE [--connections N] [--timeout-ms T]\n"
            "                [--warmup S]\n",
            msg);
    exit(2);
}

/* ---------------------------------------------------------------- connections --------------*/
static void set_events(conn *c, int want_out) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (want_out ? EPOLLOUT : 0u)};
    ev.data.u32 = (uint32_t)(c - G.conns);
    if (epoll_ctl(G.ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->want_out = want_out;
}

static void make_idle(conn *c) {
    c->state = C_IDLE;
    G.n_idle++;
    if (!c->in_ring) {
        G.ring[(G.ring_head + G.ring_len) % G.nconns] = (int)(c - G.conns);
        G.ring_len++;
        c->in_ring = 1;
    }
}

static conn *pop_idle(void) {
    while (G.ring_len > 0) {
        conn *c = &G.conns[G.ring[G.ring_head]];
        G.ring_head = (G.ring_head + 1) % G.nconns;
        G.ring_len--;
        c->in_ring = 0;
        if (c->state == C_IDLE) return c; /* entries of since-closed connections are stale */
    }
    return NULL;
}

/* Leave the current state, keeping the counters of idle/busy/retrying connections exact. */
static void leave_state(conn *c) {
    if (c->state == C_IDLE) G.n_idle--;
    else if (c->state == C_BUSY) G.n_busy--;
    else if (c->state == C_RETRY) G.n_retry--;
}

static void close_fd(conn *c) {
    if (c->fd >= 0) close(c->fd); /* closing also removes it from the epoll set */
    c->fd = -1;
    c->rpos = c->rlen = 0;
    c->hdr_done = 0;
    c->want_out = 0;
}

static void schedule_retry(conn *c, int64_t now) {
    leave_state(c);
    close_fd(c);
    c->backoff = c->backoff ? c->backoff * 2 : BACKOFF_MIN_NS;
    if (c->backoff > BACKOFF_MAX_NS) c->backoff = BACKOFF_MAX_NS;
    c->retry_at = now + c->backoff;
    c->state = C_RETRY;
    G.n_retry++;
}

static void start_connect(conn *c, int64_t now) {
    leave_state(c);
    close_fd(c);
    c->state = C_CLOSED;
    int fd = socket(G.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        G.errors[E_CONNECT]++;
        schedule_retry(c, now);
        return;
    }
    int one = 1;
    /* Requests are written whole; Nagle would only hold small ones back. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->since = now;
    c->served = 0;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP};
    ev.data.u32 = (uint32_t)(c - G.conns);
    if (epoll_ctl(G.ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    c->want_out = 1;
    if (connect(fd, (struct sockaddr *)&G.addr, G.addrlen) == 0) {
        set_events(c, 0);
        make_idle(c);
    } else if (errno == EINPROGRESS) {
        c->state = C_CONNECTING;
    } else {
        G.errors[E_CONNECT]++;
        schedule_retry(c, now);
    }
}

/* The connection broke: count it, lose its request (if any) and connect again: at once if it
 * had worked, else after a growing back-off, so a server that accepts and drops every
 * connection cannot make this loop spin. */
static void conn_fail(conn *c, int kind, int64_t now) {
    G.errors[kind]++;
    if (c->state == C_BUSY && c->req >= G.warm_n) G.failed++;
    if (c->served) start_connect(c, now);
    else schedule_retry(c, now);
}

/* ---------------------------------------------------------------- requests -----------------*/
static void try_write(conn *c, int64_t now) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) set_events(c, 1);
            return;
        } else {
            conn_fail(c, E_WRITE, now);
            return;
        }
    }
    if (c->want_out) set_events(c, 0);
}

static void start_request(conn *c, uint64_t idx, int64_t now) {
    const request_buf *r = &G.reqs[idx % G.nreqs];
    leave_state(c);
    c->state = C_BUSY;
    G.n_busy++;
    c->req = idx;
    c->intended = intended(idx);
    c->wbuf = r->data;
    c->wlen = r->len;
    c->woff = 0;
    if (idx >= G.warm_n) {
        G.sent++;
        int64_t lag = now - c->intended;
        h_record(&G.lag, (uint64_t)((lag > 0 ? lag : 0) + 500) / 1000);
    } else {
        G.warm_sent++;
    }
    try_write(c, now);
}

static void complete(conn *c, int64_t now) {
    if (c->req >= G.warm_n) {
        int64_t lat = now - c->intended;
        uint64_t us = (uint64_t)((lat > 0 ? lat : 0) + 500) / 1000;
        G.completed++;
        if (c->status >= 100 && c->status < 600) G.status[c->status]++;
        else G.status_other++;
        h_record(&G.lat, us);
        if (lat > 1 * NS_PER_MS) G.over_1ms++;
        if (lat > 5 * NS_PER_MS) G.over_5ms++;
    }
    c->served = 1;
    c->backoff = 0; /* the back-off ends when the server has really answered */
    leave_state(c);
    make_idle(c);
}

/* ---------------------------------------------------------------- responses ----------------*/
static int header_is(const char *line, size_t len, const char *name, const char **value) {
    size_t n = strlen(name);
    if (len <= n || strncasecmp(line, name, n) != 0 || line[n] != ':') return 0;
    const char *v = line + n + 1;
    while (v < line + len && (*v == ' ' || *v == '\t')) v++;
    *value = v;
    return 1;
}

/* Parse one header block [p, end) ("\r\n\r\n" excluded). Returns 0 when it is usable. */
static int parse_head(conn *c, const char *p, const char *end) {
    if (end - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ') return -1;
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        status = status * 10 + (p[i] - '0');
    }
    if (status < 100 || status == 101) return -1; /* no protocol switch: we speak HTTP/1.1 */
    int have_length = 0, close_after = (p[7] == '0'); /* HTTP/1.0 closes by default */
    uint64_t length = 0;
    const char *line = memchr(p, '\n', (size_t)(end - p));
    while (line && ++line < end) {
        const char *eol = memchr(line, '\r', (size_t)(end - line));
        if (!eol) eol = end;
        size_t len = (size_t)(eol - line);
        const char *v;
        if (header_is(line, len, "content-length", &v)) {
            char *stop;
            if (*v < '0' || *v > '9') return -1;
            errno = 0;
            unsigned long long n = strtoull(v, &stop, 10);
            if (stop == v || errno) return -1;
            length = n;
            have_length = 1;
        } else if (header_is(line, len, "transfer-encoding", &v)) {
            /* Chunked bodies are not needed by any server benchmarked here: reported as a
             * parse error rather than mis-framed. */
            if (memmem(v, (size_t)(eol - v), "chunked", 7)) return -1;
        } else if (header_is(line, len, "connection", &v)) {
            if ((size_t)(eol - v) >= 5 && strncasecmp(v, "close", 5) == 0) close_after = 1;
            if ((size_t)(eol - v) >= 10 && strncasecmp(v, "keep-alive", 10) == 0) close_after = 0;
        }
        line = memchr(line, '\n', (size_t)(end - line));
    }
    if (!have_length) {
        /* Only bodiless statuses may omit the length; a close-delimited body is not
         * measurable per request. */
        if (!(status < 200 || status == 204 || status == 304)) return -1;
        length = 0;
    }
    c->status = status;
    c->body_left = length;
    c->close_after = close_after;
    return 0;
}

/* Consume every complete response in the buffer (a read may hold parts of one or several). */
static void process_input(conn *c, int64_t now) {
    for (;;) {
        if (!c->hdr_done) {
            const char *start = c->rbuf + c->rpos;
            size_t avail = c->rlen - c->rpos;
            if (avail == 0) break;
            const char *end = memmem(start, avail, "\r\n\r\n", 4);
            if (!end) {
                if (c->rpos == 0 && c->rlen == RBUF_SIZE) {
                    conn_fail(c, E_PARSE, now); /* headers larger than the buffer */
                    return;
                }
                break;
            }
            if (c->state != C_BUSY || parse_head(c, start, end) != 0) {
                conn_fail(c, E_PARSE, now); /* unsolicited or malformed response */
                return;
            }
            c->rpos += (size_t)(end + 4 - start);
            if (c->status < 200) continue; /* 1xx interim; the real answer follows */
            c->hdr_done = 1;
        }
        size_t avail = c->rlen - c->rpos;
        size_t take = avail < c->body_left ? avail : (size_t)c->body_left;
        c->rpos += take;
        c->body_left -= take;
        if (c->body_left > 0) break;
        c->hdr_done = 0;
        int close_after = c->close_after;
        complete(c, now);
        if (close_after) {
            start_connect(c, now); /* not an error: the server chose to close */
            return;
        }
    }
    if (c->rpos == c->rlen) {
        c->rpos = c->rlen = 0;
    } else if (c->rpos > 0) {
        memmove(c->rbuf, c->rbuf + c->rpos, c->rlen - c->rpos);
        c->rlen -= c->rpos;
        c->rpos = 0;
    }
}

static void on_readable(conn *c) {
    /* One read per readiness report: epoll is level-triggered, so leftovers come back on the
     * next wait, and we save the extra read that would only return EAGAIN. */
    ssize_t n;
    do {
        n = read(c->fd, c->rbuf + c->rlen, RBUF_SIZE - c->rlen);
    } while (n < 0 && errno == EINTR);
    int64_t now = now_ns(); /* the response is "read" now */
    if (n > 0) {
        c->rlen += (size_t)n;
        process_input(c, now);
    } else if (n == 0) {
        if (c->state == C_BUSY) {
            conn_fail(c, E_CLOSED, now);
        } else if (!c->served && now - c->since < NS_PER_S) {
            /* Accepted and dropped at once: a refusing server. Back off rather than spin. */
            G.errors[E_CLOSED]++;
            schedule_retry(c, now);
        } else {
            start_connect(c, now); /* an idle keep-alive connection expired: not an error */
        }
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
        conn_fail(c, E_READ, now);
    }
}

static void on_event(conn *c, uint32_t events) {
    int64_t now = now_ns();
    if (c->state == C_CONNECTING) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            G.errors[E_CONNECT]++;
            schedule_retry(c, now);
            return;
        }
        set_events(c, 0);
        make_idle(c);
        return;
    }
    if (c->state != C_BUSY && c->state != C_IDLE) return;
    if ((events & EPOLLOUT) && c->state == C_BUSY && c->woff < c->wlen) {
        try_write(c, now);
        if (c->state != C_BUSY) return;
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) on_readable(c);
}

/* In-flight timeouts, connect timeouts and reconnect back-off: checked once a millisecond. */
static void maintain(int64_t now) {
    for (int i = 0; i < G.nconns; i++) {
        conn *c = &G.conns[i];
        if (c->state == C_BUSY && now - c->intended > G.timeout_ns) {
            if (c->req >= G.warm_n) G.timeouts++;
            start_connect(c, now); /* the connection may still deliver the late answer */
        } else if (c->state == C_CONNECTING && now - c->since > G.timeout_ns) {
            G.errors[E_CONNECT]++;
            schedule_retry(c, now);
        } else if (c->state == C_RETRY && now >= c->retry_at) {
            start_connect(c, now);
        }
    }
}

static void arm_timer(int64_t when) {
    if (when == G.armed) return;
    struct itimerspec its = {0};
    its.it_value.tv_sec = when / NS_PER_S;
    its.it_value.tv_nsec = when % NS_PER_S;
    if (timerfd_settime(G.tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
    G.armed = when;
}

/* Wait for events until `wake` at the latest (never more than 100 ms, so the loop re-checks
 * its deadlines even if a wake-up were lost). epoll_pwait2 takes a nanosecond timeout in the
 * same system call; the timerfd fallback (kernels before 5.11, or a seccomp filter refusing
 * the call) costs a timerfd_settime and a read per timed wake-up. */
static int wait_events(struct epoll_event *evs, int64_t wake) {
    int64_t now = now_ns();
#ifdef HAVE_EPOLL_PWAIT2
    if (G.use_pwait2) {
        int64_t d = wake > now ? wake - now : 0;
        if (d > 100 * NS_PER_MS) d = 100 * NS_PER_MS;
        struct timespec ts = {.tv_sec = d / NS_PER_S, .tv_nsec = d % NS_PER_S};
        int n = epoll_pwait2(G.ep, evs, MAX_EVENTS, &ts, NULL);
        if (n >= 0 || (errno != ENOSYS && errno != EPERM)) return n;
        G.use_pwait2 = 0;
    }
#endif
    int wait_ms = 0;
    if (wake > now) {
        arm_timer(wake);
        wait_ms = 100;
    }
    return epoll_wait(G.ep, evs, MAX_EVENTS, wait_ms);
}

/* One wait and the events it returned. */
static void poll_once(int64_t wake) {
    struct epoll_event evs[MAX_EVENTS];
    int n = wait_events(evs, wake);
    if (n < 0) {
        if (errno == EINTR) return;
        die("epoll_wait");
    }
    for (int i = 0; i < n; i++) {
        uint32_t id = evs[i].data.u32;
        if (id == (uint32_t)G.nconns) {
            uint64_t ticks;
            if (read(G.tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN) die("read timerfd");
            G.armed = 0; /* expired: the next wake-up must be armed again */
        } else {
            on_event(&G.conns[id], evs[i].events);
        }
    }
}

/* ---------------------------------------------------------------- setup --------------------*/
static double parse_number(const char *s, const char *what) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v)) {
        char msg[256];
        snprintf(msg, sizeof msg, "%s: not a number: '%s'", what, s);
        usage_error(msg);
    }
    return v;
}

static void load_bodies(const char *path, const char *host_header, const char *http_path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "openloop: cannot open bodies file %s: %s\n", path, strerror(errno));
        exit(2);
    }
    size_t cap = 1 << 16, len = 0;
    char *data = malloc(cap);
    if (!data) die("malloc");
    size_t n;
    while ((n = fread(data + len, 1, cap - len, f)) > 0) {
        len += n;
        if (len == cap) {
            if (cap >= (size_t)1 << 30) usage_error("bodies file larger than 1 GiB");
            cap *= 2;
            data = realloc(data, cap);
            if (!data) die("realloc");
        }
    }
    if (ferror(f)) die("read bodies file");
    fclose(f);
    size_t lines = 1;
    for (size_t i = 0; i < len; i++) lines += data[i] == '\n';
    G.reqs = calloc(lines, sizeof *G.reqs);
    if (!G.reqs) die("calloc");
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && data[i] != '\n') continue;
        size_t end = i;
        if (end > start && data[end - 1] == '\r') end--;
        if (end > start) {
            size_t blen = end - start;
            int hlen = snprintf(NULL, 0,
                                "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                                "Content-Length: %zu\r\nConnection: keep-alive\r\n\r\n",
                                http_path, host_header, blen);
            request_buf *r = &G.reqs[G.nreqs++];
            r->len = (size_t)hlen + blen;
            r->data = malloc(r->len + 1);
            if (!r->data) die("malloc");
            snprintf(r->data, (size_t)hlen + 1,
                     "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\nConnection: keep-alive\r\n\r\n",
                     http_path, host_header, blen);
            memcpy(r->data + hlen, data + start, blen);
        }
        start = i + 1;
    }
    free(data);
    if (G.nreqs == 0) usage_error("the bodies file holds no request body");
}

/* ---------------------------------------------------------------- output -------------------*/
static void print_histogram(const char *name, const histogram *h, int full) {
    printf("\"%s\":{", name);
    if (h->total == 0) {
        /* Nothing answered: null, never a flattering 0. */
        printf("\"p50\":null,\"p90\":null,\"p99\":null,\"p99.9\":null%s,\"max\":null,"
               "\"mean\":null}",
               full ? ",\"p99.99\":null,\"min\":null" : "");
        return;
    }
    printf("\"p50\":%" PRIu64 ",\"p90\":%" PRIu64 ",\"p99\":%" PRIu64 ",\"p99.9\":%" PRIu64,
           h_percentile(h, 50), h_percentile(h, 90), h_percentile(h, 99), h_percentile(h, 99.9));
    if (full) printf(",\"p99.99\":%" PRIu64 ",\"min\":%" PRIu64, h_percentile(h, 99.99), h->min_us);
    printf(",\"max\":%" PRIu64 ",\"mean\":%.3f}", h->max_us, h->sum_us / (double)h->total);
}

static void print_result(int64_t end) {
    uint64_t due = G.total - G.warm_n;
    uint64_t errors = 0;
    for (int k = 0; k < E_KINDS; k++) errors += G.errors[k];
    double done = G.completed ? (double)G.completed : 1.0;
    printf("{\"target_rate\":%.3f,\"duration_s\":%.3f,\"warmup_s\":%.3f,\"connections\":%d,"
           "\"timeout_ms\":%" PRId64 ",\"due\":%" PRIu64 ",\"sent\":%" PRIu64
           ",\"completed\":%" PRIu64 ",\"failed\":%" PRIu64 ",\"timeouts\":%" PRIu64
           ",\"errors\":%" PRIu64 ",\"error_kinds\":{",
           G.rate, G.duration, G.warmup, G.nconns, (int64_t)(G.timeout_ns / NS_PER_MS), due, G.sent,
           G.completed, G.failed, G.timeouts, errors);
    for (int k = 0; k < E_KINDS; k++)
        printf("%s\"%s\":%" PRIu64, k ? "," : "", err_names[k], G.errors[k]);
    printf("},\"status\":{");
    int first = 1;
    for (int s = 0; s < 600; s++) {
        if (!G.status[s]) continue;
        printf("%s\"%d\":%" PRIu64, first ? "" : ",", s, G.status[s]);
        first = 0;
    }
    if (G.status_other) printf("%s\"other\":%" PRIu64, first ? "" : ",", G.status_other);
    printf("},\"achieved_rate\":%.3f,", (double)G.completed / G.duration);
    print_histogram("latency_us", &G.lat, 1);
    printf(",");
    print_histogram("send_delay_us", &G.lag, 0);
    printf(",\"over_1ms\":%" PRIu64 ",\"over_1ms_share\":%.6f,\"over_5ms\":%" PRIu64
           ",\"over_5ms_share\":%.6f,\"over_5ms_or_lost_share\":%.6f,\"warmup_sent\":%" PRIu64
           ",\"elapsed_s\":%.3f}\n",
           G.over_1ms, (double)G.over_1ms / done, G.over_5ms, (double)G.over_5ms / done,
           due ? (double)(G.over_5ms + G.timeouts + G.failed) / (double)due : 0.0,
           G.warm_sent, (double)(end - G.t0) / 1e9);
    fflush(stdout);
}

/* ---------------------------------------------------------------- main ---------------------*/
int main(int argc, char **argv) {
    const char *host = NULL, *path = NULL, *bodies = NULL;
    long port = -1;
    double timeout_ms = 2000;
    G.nconns = 64;
    G.rate = G.duration = -1;
    static const struct option opts[] = {
        {"host", required_argument, NULL, 'h'},     {"port", required_argument, NULL, 'p'},
        {"path", required_argument, NULL, 'P'},     {"rate", required_argument, NULL, 'r'},
        {"duration", required_argument, NULL, 'd'}, {"connections", required_argument, NULL, 'c'},
        {"bodies", required_argument, NULL, 'b'},   {"timeout-ms", required_argument, NULL, 't'},
        {"warmup", required_argument, NULL, 'w'},   {"help", no_argument, NULL, '?'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = (long)parse_number(optarg, "--port"); break;
        case 'P': path = optarg; break;
        case 'r': G.rate = parse_number(optarg, "--rate"); break;
        case 'd': G.duration = parse_number(optarg, "--duration"); break;
        case 'c': G.nconns = (int)parse_number(optarg, "--connections"); break;
        case 'b': bodies = optarg; break;
        case 't': timeout_ms = parse_number(optarg, "--timeout-ms"); break;
        case 'w': G.warmup = parse_number(optarg, "--warmup"); break;
        default: usage_error("bad arguments");
        }
    }
    if (optind != argc) usage_error("unexpected positional argument");
    if (!host) usage_error("--host is required");
    /* Loopback only, checked before anything else: this tool must never load another host. */
    char host_header[64];
    memset(&G.addr, 0, sizeof G.addr);
    if (strcmp(host, "127.0.0.1") == 0 || strcasecmp(host, "localhost") == 0) {
        struct sockaddr_in *a = (struct sockaddr_in *)&G.addr;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        G.family = AF_INET;
        G.addrlen = sizeof *a;
    } else if (strcmp(host, "::1") == 0) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&G.addr;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        G.family = AF_INET6;
        G.addrlen = sizeof *a;
    } else {
        fprintf(stderr,
                "openloop: refusing host '%s': only 127.0.0.1, ::1 or localhost may be loaded\n",
                host);
        return 2;
    }
    if (port < 1 || port > 65535) usage_error("--port must be between 1 and 65535");
    if (!path || path[0] != '/' || strpbrk(path, " \r\n\t"))
        usage_error("--path must start with / and hold no whitespace");
    if (strlen(path) > 2048) usage_error("--path too long");
    if (!(G.rate > 0 && G.rate <= 1e7)) usage_error("--rate must be in (0, 10000000]");
    if (!(G.duration > 0 && G.duration <= 86400)) usage_error("--duration must be in (0, 86400]");
    if (!(G.warmup >= 0 && G.warmup <= 86400)) usage_error("--warmup must be in [0, 86400]");
    if (G.nconns < 1 || G.nconns > MAX_CONNECTIONS) usage_error("--connections must be 1..4096");
    if (!(timeout_ms >= 1 && timeout_ms <= 3600e3)) usage_error("--timeout-ms must be 1..3600000");
    if (!bodies) usage_error("--bodies is required");
    G.timeout_ns = (int64_t)(timeout_ms * (double)NS_PER_MS);
    G.warm_n = (uint64_t)llround(G.rate * G.warmup);
    G.total = G.warm_n + (uint64_t)llround(G.rate * G.duration);
    if (G.total == G.warm_n) usage_error("rate * duration rounds to zero requests");
    snprintf(host_header, sizeof host_header, G.family == AF_INET6 ? "[%s]:%ld" : "%s:%ld", host,
             port);
    if (G.family == AF_INET) ((struct sockaddr_in *)&G.addr)->sin_port = htons((uint16_t)port);
    else ((struct sockaddr_in6 *)&G.addr)->sin6_port = htons((uint16_t)port);
    load_bodies(bodies, host_header, path);

    /* Room for every connection plus the timerfd, epoll and stdio. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)G.nconns + 32) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)G.nconns + 32 ? rl.rlim_max : (rlim_t)G.nconns + 32;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    /* Default timer slack (50 us) would delay every timed wake-up; we want them on time. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);

    G.ep = epoll_create1(EPOLL_CLOEXEC);
    if (G.ep < 0) die("epoll_create1");
    G.use_pwait2 = 1;
    G.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (G.tfd < 0) die("timerfd_create");
    struct epoll_event tev = {.events = EPOLLIN};
    tev.data.u32 = (uint32_t)G.nconns;
    if (epoll_ctl(G.ep, EPOLL_CTL_ADD, G.tfd, &tev) < 0) die("epoll_ctl");
    G.conns = calloc((size_t)G.nconns, sizeof *G.conns);
    G.ring = calloc((size_t)G.nconns, sizeof *G.ring);
    if (!G.conns || !G.ring) die("calloc");

    /* Open the connections before the clock starts, so the first requests do not pay for
     * connection set-up; bounded so that a dead target cannot stall the start. */
    int64_t now = now_ns();
    for (int i = 0; i < G.nconns; i++) {
        G.conns[i].fd = -1;
        start_connect(&G.conns[i], now);
    }
    int64_t pre_end = now + PRECONNECT_NS;
    while (now < pre_end) {
        int connecting = 0;
        for (int i = 0; i < G.nconns; i++) connecting += G.conns[i].state == C_CONNECTING;
        if (!connecting) break;
        poll_once(pre_end);
        now = now_ns();
    }

    G.t0 = now_ns();
    int64_t send_end = G.t0 + (int64_t)llround((G.warmup + G.duration) * 1e9);
    int64_t end = send_end + G.timeout_ns;
    uint64_t due_upto = 0, q_head = 0;
    int64_t next_maint = G.t0;
    /* Each iteration either handles events or sleeps until the next due time / check; it
     * ends when everything was answered or at `end`, whichever comes first. */
    for (;;) {
        now = now_ns();
        while (due_upto < G.total && intended(due_upto) <= now) due_upto++;
        /* A request that waited in the queue past the timeout is lost, as for the caller. */
        while (q_head < due_upto && now - intended(q_head) > G.timeout_ns) {
            if (q_head >= G.warm_n) G.timeouts++;
            q_head++;
        }
        if (now >= next_maint) {
            maintain(now);
            next_maint = now + MAINT_INTERVAL_NS;
        }
        while (q_head < due_upto && G.n_idle > 0) {
            conn *c = pop_idle();
            if (!c) break;
            start_request(c, q_head++, now);
        }
        if (q_head == G.total && G.n_busy == 0) break; /* all due, sent and answered */
        if (now >= end) break;
        int64_t wake = end;
        if (due_upto < G.total && G.n_idle > 0 && intended(due_upto) < wake)
            wake = intended(due_upto);
        if ((G.n_busy > 0 || q_head < due_upto || G.n_retry > 0 || G.n_idle < G.nconns) &&
            next_maint < wake)
            wake = next_maint;
        poll_once(wake);
    }
    now = now_ns();
    /* Whatever is still queued or in flight has waited past the timeout (or the run's end). */
    for (int i = 0; i < G.nconns; i++)
        if (G.conns[i].state == C_BUSY && G.conns[i].req >= G.warm_n) G.timeouts++;
    G.timeouts += G.total - (q_head < G.warm_n ? G.warm_n : q_head);
    print_result(now);
    return 0;
}
