/*
 * Connection churn generator for the conntracct netns test harness.
 *
 * Compiled at test time (gcc -O2) by tests/netns/churn.py and run inside the
 * client and server network namespaces.  One epoll loop per process, no
 * threads.  Every flow is short: TCP = connect, send a few bytes, wait for the
 * server to close, close (the server is the active closer, so TIME_WAIT stays
 * in the server namespace and client ports free up at once); UDP = one
 * datagram from a fresh socket bound to the next source port, one echo back.
 *
 *   churn tcp-server ADDR PORT
 *   churn udp-server ADDR PORT
 *   churn tcp-client ADDR PORT RATE DURATION CONCURRENCY PAYLOAD TIMEOUT_MS
 *   churn udp-client ADDR PORT RATE DURATION CONCURRENCY PAYLOAD TIMEOUT_MS SPORT_LO SPORT_HI
 *
 * RATE <= 0 means as fast as the concurrency cap allows.  Servers print
 * "READY" once listening and a JSON line with their counters on SIGTERM or
 * SIGINT.  Clients print one JSON line with their counters when done.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "helper.h"      /* tests/netns: parse_addr, now, stop_flag, helper_init */

enum { ST_FREE = 0, ST_CONNECTING, ST_WAIT_EOF, ST_WAIT_REPLY, ST_SERVER };

struct slot {
    uint8_t state;
    double deadline;
};

static struct slot *slots;
static int max_fds;
static int hi_fd; /* highest fd ever used by a flow, bounds the sweeps */

#define NERR 256
static unsigned long err_counts[NERR];

static void count_err(int e)
{
    err_counts[(e > 0 && e < NERR) ? e : 0]++;
}

static void print_errors(void)
{
    int first = 1;
    printf("\"errors\": {");
    for (int i = 0; i < NERR; i++) {
        if (!err_counts[i])
            continue;
        const char *name = i ? strerrorname_np(i) : "OTHER";
        printf("%s\"%s\": %lu", first ? "" : ", ", name ? name : "UNKNOWN", err_counts[i]);
        first = 0;
    }
    printf("}");
}

static void raise_nofile(void)
{
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    max_fds = rl.rlim_cur > 1048576 ? 1048576 : (int)rl.rlim_cur;
    slots = calloc(max_fds, sizeof(*slots));
    if (!slots) {
        perror("calloc");
        exit(2);
    }
}

static void drain(int fd, char *buf, size_t n)
{
    while (read(fd, buf, n) > 0)
        ;
}

/* ------------------------------------------------------------------ servers */

static int tcp_server(const char *addr, int port)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    int fam = parse_addr(addr, port, &ss, &sl);
    int ls = listen_tcp(fam, &ss, sl);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    printf("READY\n");
    fflush(stdout);

    unsigned long accepted = 0, closed = 0, bytes = 0;
    struct epoll_event evs[512];
    char buf[4096];
    while (!stop_flag) {
        int n = epoll_wait(ep, evs, 512, 200);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int c = accept_into(ls, ep);
                    if (c < 0) {
                        if (errno != EAGAIN && errno != EINTR)
                            count_err(errno);
                        break;
                    }
                    accepted++;
                }
                continue;
            }
            /* Read what the client sent, then close: the server closes first. */
            ssize_t r;
            int done = 0;
            while ((r = read(fd, buf, sizeof(buf))) > 0) {
                bytes += r;
                done = 1;
            }
            if (r == 0)
                done = 1;
            else if (r < 0 && errno != EAGAIN) {
                count_err(errno);
                done = 1;
            }
            if (done || (evs[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                close(fd);
                closed++;
            }
        }
    }
    printf("{\"accepted\": %lu, \"closed\": %lu, \"bytes\": %lu, ", accepted, closed, bytes);
    print_errors();
    printf("}\n");
    fflush(stdout);
    return 0;
}

static int udp_server(const char *addr, int port)
{
    struct sockaddr_storage ss, peer;
    socklen_t sl, pl;
    int fam = parse_addr(addr, port, &ss, &sl);
    int s = socket(fam, SOCK_DGRAM, 0);
    int big = 8 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big));
    if (bind(s, (struct sockaddr *)&ss, sl)) {
        perror("bind");
        return 2;
    }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    printf("READY\n");
    fflush(stdout);
    unsigned long received = 0, sent = 0;
    char buf[65536];
    while (!stop_flag) {
        pl = sizeof(peer);
        ssize_t r = recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &pl);
        if (r < 0)
            continue;
        received++;
        if (sendto(s, buf, r, 0, (struct sockaddr *)&peer, pl) == r)
            sent++;
        else
            count_err(errno);
    }
    printf("{\"received\": %lu, \"sent\": %lu, ", received, sent);
    print_errors();
    printf("}\n");
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------ clients */

struct client_cfg {
    int udp;
    struct sockaddr_storage dst;
    socklen_t dstlen;
    int fam;
    double rate, duration, timeout;
    int concurrency, payload;
    int sport_lo, sport_hi;
};

static int client(struct client_cfg *cfg)
{
    int ep = epoll_create1(0);
    char payload[65536];
    char buf[65536];
    memset(payload, 'c', sizeof(payload));
    if (cfg->payload > (int)sizeof(payload))
        cfg->payload = sizeof(payload);

    unsigned long attempted = 0, completed = 0, failed = 0, timeouts = 0;
    unsigned long port_skips = 0;
    int inflight = 0;
    int next_port = cfg->sport_lo;
    double t0 = now(), last_done = t0, next_sweep = t0 + 0.1;
    double gen_end = t0 + cfg->duration;
    double hard_end = gen_end + cfg->timeout + 1.0;
    struct epoll_event evs[1024];

    for (;;) {
        double t = now();
        if (stop_flag || t >= hard_end)
            break;
        int generating = t < gen_end;
        if (!generating && inflight == 0)
            break;

        /* Start the flows that are due. */
        if (generating) {
            double due = cfg->rate > 0 ? (t - t0) * cfg->rate : 1e18;
            int batch = 0;
            while (attempted < due && inflight < cfg->concurrency && batch < 256) {
                batch++;
                attempted++;
                int fd = socket(cfg->fam, (cfg->udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK, 0);
                if (fd < 0) {
                    count_err(errno);
                    failed++;
                    continue;
                }
                if (fd >= max_fds) {
                    close(fd);
                    count_err(EMFILE);
                    failed++;
                    continue;
                }
                if (cfg->udp) {
                    struct sockaddr_storage src;
                    memset(&src, 0, sizeof(src));
                    src.ss_family = cfg->fam;
                    int bound = 0;
                    int span = cfg->sport_hi - cfg->sport_lo + 1;
                    for (int tries = 0; tries < span && !bound; tries++) {
                        int p = next_port;
                        next_port = next_port >= cfg->sport_hi ? cfg->sport_lo : next_port + 1;
                        if (cfg->fam == AF_INET)
                            ((struct sockaddr_in *)&src)->sin_port = htons(p);
                        else
                            ((struct sockaddr_in6 *)&src)->sin6_port = htons(p);
                        if (bind(fd, (struct sockaddr *)&src,
                                 cfg->fam == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6)) == 0)
                            bound = 1;
                        else
                            port_skips++;
                    }
                    if (!bound ||
                        sendto(fd, payload, cfg->payload, 0, (struct sockaddr *)&cfg->dst, cfg->dstlen) < 0) {
                        count_err(bound ? errno : EADDRINUSE);
                        close(fd);
                        failed++;
                        continue;
                    }
                    slots[fd].state = ST_WAIT_REPLY;
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                } else {
                    if (connect(fd, (struct sockaddr *)&cfg->dst, cfg->dstlen) < 0 && errno != EINPROGRESS) {
                        count_err(errno);
                        close(fd);
                        failed++;
                        continue;
                    }
                    slots[fd].state = ST_CONNECTING;
                    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                slots[fd].deadline = t + cfg->timeout;
                if (fd > hi_fd)
                    hi_fd = fd;
                inflight++;
            }
        }

        /* Sleep until the next flow is due (or something happens). */
        int wait_ms = 100;
        if (generating) {
            if (cfg->rate > 0 && inflight < cfg->concurrency) {
                double next_due = t0 + (attempted + 1) / cfg->rate;
                double d = next_due - now();
                wait_ms = d <= 0 ? 0 : (int)(d * 1000) + 1;
                if (wait_ms > 100)
                    wait_ms = 100;
            } else if (cfg->rate <= 0 && inflight < cfg->concurrency) {
                wait_ms = 0;
            }
        }
        int n = epoll_wait(ep, evs, 1024, wait_ms);
        t = now();
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            struct slot *s = &slots[fd];
            int finish = 0, ok = 0;
            if (s->state == ST_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) {
                    count_err(err);
                    finish = 1;
                } else if (send(fd, payload, cfg->payload, MSG_NOSIGNAL) < 0) {
                    count_err(errno);
                    finish = 1;
                } else {
                    s->state = ST_WAIT_EOF;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                }
            } else if (s->state == ST_WAIT_EOF) {
                ssize_t r;
                while ((r = read(fd, buf, sizeof(buf))) > 0)
                    ;
                if (r == 0) {
                    finish = ok = 1;
                } else if (errno != EAGAIN) {
                    count_err(errno);
                    finish = 1;
                }
            } else if (s->state == ST_WAIT_REPLY) {
                ssize_t r = recv(fd, buf, sizeof(buf), 0);
                if (r >= 0) {
                    finish = ok = 1;
                    drain(fd, buf, sizeof(buf));
                } else if (errno != EAGAIN) {
                    count_err(errno);
                    finish = 1;
                }
            }
            if (finish) {
                close(fd); /* also removes it from the epoll set */
                s->state = ST_FREE;
                inflight--;
                if (ok) {
                    completed++;
                    last_done = t;
                } else {
                    failed++;
                }
            }
        }

        /* Time out flows that never finished. */
        if (t >= next_sweep) {
            next_sweep = t + 0.1;
            for (int fd = 0; fd <= hi_fd && inflight > 0; fd++) {
                if (slots[fd].state != ST_FREE && slots[fd].state != ST_SERVER && slots[fd].deadline <= t) {
                    close(fd);
                    slots[fd].state = ST_FREE;
                    inflight--;
                    failed++;
                    timeouts++;
                }
            }
        }
    }
    /* Anything still open at the hard end is a timeout. */
    for (int fd = 0; fd <= hi_fd && inflight > 0; fd++) {
        if (slots[fd].state != ST_FREE && slots[fd].state != ST_SERVER) {
            close(fd);
            slots[fd].state = ST_FREE;
            inflight--;
            failed++;
            timeouts++;
        }
    }
    double t_end = now();
    double active = last_done - t0;
    if (active < cfg->duration)
        active = cfg->duration;
    printf("{\"proto\": \"%s\", \"attempted\": %lu, \"completed\": %lu, \"failed\": %lu, \"timeouts\": %lu, "
           "\"port_skips\": %lu, \"duration\": %.6f, \"elapsed\": %.6f, \"active\": %.6f, \"rate\": %.3f, ",
           cfg->udp ? "udp" : "tcp", attempted, completed, failed, timeouts, port_skips, cfg->duration,
           t_end - t0, active, completed / active);
    print_errors();
    printf("}\n");
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    helper_init();
    raise_nofile();

    if (argc == 4 && !strcmp(argv[1], "tcp-server"))
        return tcp_server(argv[2], atoi(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "udp-server"))
        return udp_server(argv[2], atoi(argv[3]));
    int udp = argc == 11 && !strcmp(argv[1], "udp-client");
    if (udp || (argc == 9 && !strcmp(argv[1], "tcp-client"))) {
        struct client_cfg cfg = {.udp = udp};
        cfg.fam = parse_addr(argv[2], atoi(argv[3]), &cfg.dst, &cfg.dstlen);
        cfg.rate = atof(argv[4]);
        cfg.duration = atof(argv[5]);
        cfg.concurrency = atoi(argv[6]);
        cfg.payload = atoi(argv[7]);
        cfg.timeout = atof(argv[8]) / 1000.0;
        if (cfg.concurrency < 1)
            cfg.concurrency = 1;
        if (cfg.concurrency > max_fds - 16)
            cfg.concurrency = max_fds - 16;
        if (udp) {
            cfg.sport_lo = atoi(argv[9]);
            cfg.sport_hi = atoi(argv[10]);
            if (cfg.payload < 1)
                cfg.payload = 1;
        }
        return client(&cfg);
    }
    fprintf(stderr,
            "usage: churn tcp-server|udp-server ADDR PORT\n"
            "       churn tcp-client ADDR PORT RATE DURATION CONCURRENCY PAYLOAD TIMEOUT_MS\n"
            "       churn udp-client ADDR PORT RATE DURATION CONCURRENCY PAYLOAD TIMEOUT_MS SPORT_LO SPORT_HI\n");
    return 2;
}
