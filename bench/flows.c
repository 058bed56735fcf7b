/*
 * Long-lived TCP flows for the benchmarks (bench/p1_hook_cost.py,
 * bench/p4_steady_state.py): many established connections, each carrying a
 * small request and its echo at a fixed interval.  One epoll loop, no threads.
 *
 *   flows server ADDR,PORT...
 *       Listen on every ADDR,PORT; echo what arrives.  Prints READY, and a
 *       JSON line with its counters on SIGTERM/SIGINT.
 *   flows client N INTERVAL_MS DURATION_S SIZE ADDR,PORT...
 *       Open N connections, round-robin over the destinations (at most 2,048
 *       connecting at once), print "CONNECTED {...}" once all are up, then
 *       send SIZE bytes on each every INTERVAL_MS (spread evenly, so the load
 *       is steady) and read the echoes, for DURATION_S seconds or until
 *       SIGTERM/SIGINT.  Prints a JSON line with its counters at the end.
 *
 * Bounded: N connections, DURATION_S seconds, SIZE * N / INTERVAL bytes/s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
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


static int parse_dest(const char *spec, struct sockaddr_storage *ss, socklen_t *len)
{
    char addr[128];
    const char *comma = strrchr(spec, ',');
    if (!comma || comma - spec >= (long)sizeof(addr)) {
        fprintf(stderr, "bad destination %s (ADDR,PORT)\n", spec);
        exit(2);
    }
    memcpy(addr, spec, comma - spec);
    addr[comma - spec] = 0;
    return parse_addr(addr, atoi(comma + 1), ss, len);
}

static void raise_nofile(long want)
{
    struct rlimit rl = {.rlim_cur = want, .rlim_max = want};
    if (setrlimit(RLIMIT_NOFILE, &rl)) {   /* needs CAP_SYS_RESOURCE past the hard limit */
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* ------------------------------------------------------------------ server */

#define LISTEN_MAX 16

static int server(int ndest, char **dests)
{
    int ep = epoll_create1(0);
    int listeners[LISTEN_MAX];
    int nl = 0;
    for (int i = 0; i < ndest && nl < LISTEN_MAX; i++) {
        struct sockaddr_storage ss;
        socklen_t sl;
        int fam = parse_dest(dests[i], &ss, &sl);
        int ls = listen_tcp(fam, &ss, sl);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (1ULL << 32) | (uint32_t)ls};
        epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
        listeners[nl++] = ls;
    }
    printf("READY\n");
    fflush(stdout);
    unsigned long accepted = 0, closed = 0, bytes = 0, errors = 0, open_now = 0, open_peak = 0;
    struct epoll_event evs[1024];
    char buf[65536];
    while (!stop_flag) {
        int n = epoll_wait(ep, evs, 1024, 200);
        for (int i = 0; i < n; i++) {
            int fd = (int)(uint32_t)evs[i].data.u64;
            if (evs[i].data.u64 >> 32) {
                for (;;) {
                    int c = accept_into(fd, ep);
                    if (c < 0) {
                        if (errno != EAGAIN && errno != EINTR)
                            errors++;
                        break;
                    }
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    accepted++;
                    if (++open_now > open_peak)
                        open_peak = open_now;
                }
                continue;
            }
            ssize_t r;
            int done = 0;
            while ((r = read(fd, buf, sizeof(buf))) > 0) {
                bytes += r;
                if (write(fd, buf, r) != r)
                    errors++;
            }
            if (r == 0 || (r < 0 && errno != EAGAIN) || (evs[i].events & (EPOLLHUP | EPOLLERR)))
                done = 1;
            if (done) {
                close(fd);
                closed++;
                open_now--;
            }
        }
    }
    for (int i = 0; i < nl; i++)
        close(listeners[i]);
    printf("{\"accepted\": %lu, \"closed\": %lu, \"bytes\": %lu, \"errors\": %lu, \"open_peak\": %lu}\n",
           accepted, closed, bytes, errors, open_peak);
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------ client */

enum { C_FREE = 0, C_CONNECTING, C_UP, C_DEAD };

static int client(long n, double interval, double duration, int size, int ndest, char **dests)
{
    struct sockaddr_storage *dst = calloc(ndest, sizeof(*dst));
    socklen_t *dlen = calloc(ndest, sizeof(*dlen));
    int *fam = calloc(ndest, sizeof(*fam));
    for (int i = 0; i < ndest; i++)
        fam[i] = parse_dest(dests[i], &dst[i], &dlen[i]);
    int *fds = malloc(n * sizeof(int));
    uint8_t *state = calloc(n, 1);
    /* fd -> connection index */
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    long maxfd = (long)rl.rlim_cur;
    int *conn_of = malloc(maxfd * sizeof(int));
    if (!fds || !state || !conn_of) {
        perror("malloc");
        return 2;
    }
    char payload[65536], buf[65536];
    memset(payload, 'f', sizeof(payload));
    if (size > (int)sizeof(payload))
        size = sizeof(payload);
    if (size < 1)
        size = 1;
    int ep = epoll_create1(0);
    struct epoll_event evs[1024];
    unsigned long up = 0, failed = 0, sent = 0, send_errors = 0, rbytes = 0, closed_by_peer = 0;
    long next = 0, connecting = 0;
    double t0 = now();
    double connect_deadline = t0 + 120;

    /* Phase 1: connect everything. */
    while (!stop_flag && (next < n || connecting > 0) && now() < connect_deadline) {
        while (next < n && connecting < 2048) {
            int d = next % ndest;
            int fd = socket(fam[d], SOCK_STREAM | SOCK_NONBLOCK, 0);
            if (fd < 0 || fd >= maxfd) {
                if (fd >= 0)
                    close(fd);
                state[next++] = C_DEAD;
                failed++;
                continue;
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            if (connect(fd, (struct sockaddr *)&dst[d], dlen[d]) < 0 && errno != EINPROGRESS) {
                close(fd);
                state[next++] = C_DEAD;
                failed++;
                continue;
            }
            fds[next] = fd;
            conn_of[fd] = next;
            state[next] = C_CONNECTING;
            struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            next++;
            connecting++;
        }
        int k = epoll_wait(ep, evs, 1024, 100);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            long c = conn_of[fd];
            if (state[c] != C_CONNECTING)
                continue;
            int err = 0;
            socklen_t el = sizeof(err);
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
            connecting--;
            if (err) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                state[c] = C_DEAD;
                failed++;
                continue;
            }
            state[c] = C_UP;
            up++;
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
            epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
        }
    }
    double t_up = now();
    printf("CONNECTED {\"up\": %lu, \"failed\": %lu, \"seconds\": %.3f}\n", up, failed, t_up - t0);
    fflush(stdout);

    /* Phase 2: steady traffic, N sends per interval in round-robin order. */
    double t1 = now(), end = t1 + duration;
    unsigned long long due_total = 0;
    long cursor = 0;
    while (!stop_flag) {
        double t = now();
        if (t >= end)
            break;
        unsigned long long due = (unsigned long long)((t - t1) * n / interval);
        int budget = 4096;
        while (due_total < due && budget-- > 0) {
            long c = cursor;
            cursor = cursor + 1 >= n ? 0 : cursor + 1;
            due_total++;
            if (state[c] != C_UP)
                continue;
            if (send(fds[c], payload, size, MSG_NOSIGNAL | MSG_DONTWAIT) == size)
                sent++;
            else
                send_errors++;
        }
        double next_due = t1 + (double)(due_total + 1) * interval / n;
        int wait_ms = (int)((next_due - now()) * 1000);
        if (wait_ms < 0 || due_total < due)
            wait_ms = 0;
        if (wait_ms > 50)
            wait_ms = 50;
        int k = epoll_wait(ep, evs, 1024, wait_ms);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            long c = conn_of[fd];
            ssize_t r;
            while ((r = read(fd, buf, sizeof(buf))) > 0)
                rbytes += r;
            if (r == 0 || (r < 0 && errno != EAGAIN)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                state[c] = C_DEAD;
                closed_by_peer++;
            }
        }
    }
    double t_end = now();
    unsigned long still_up = 0;
    for (long c = 0; c < n; c++) {
        if (state[c] == C_UP || state[c] == C_CONNECTING) {
            still_up += state[c] == C_UP;
            close(fds[c]);
        }
    }
    printf("{\"up\": %lu, \"failed\": %lu, \"connect_seconds\": %.3f, \"sent\": %lu, \"send_errors\": %lu, "
           "\"received_bytes\": %lu, \"closed_by_peer\": %lu, \"still_up\": %lu, \"traffic_seconds\": %.3f}\n",
           up, failed, t_up - t0, sent, send_errors, rbytes, closed_by_peer, still_up, t_end - t1);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    helper_init();
    raise_nofile(1 << 20);
    if (argc >= 3 && !strcmp(argv[1], "server"))
        return server(argc - 2, argv + 2);
    if (argc >= 7 && !strcmp(argv[1], "client"))
        return client(atol(argv[2]), atof(argv[3]) / 1000.0, atof(argv[4]), atoi(argv[5]), argc - 6, argv + 6);
    fprintf(stderr, "usage: flows server ADDR,PORT...\n"
                    "       flows client N INTERVAL_MS DURATION_S SIZE ADDR,PORT...\n");
    return 2;
}
