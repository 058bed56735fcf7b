/* What the C traffic helpers (tests/netns/churn.c, bench/flows.c) share:
 * the address parser, the monotonic clock, the stop flag SIGTERM/SIGINT set
 * and the start-up.  tests/netns/build.py compiles with -I tests/netns. */
#ifndef CTA_HELPER_H
#define CTA_HELPER_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* SIGPIPE ignored (a peer's reset is counted, not fatal), SIGTERM and SIGINT
 * set stop_flag, stdout line-buffered (the harness reads JSON lines). */
static void helper_init(void)
{
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
}

/* A non-blocking TCP listener (SO_REUSEADDR, backlog 65535); exits 2
 * when it cannot bind or listen. */
static int listen_tcp(int fam, const struct sockaddr_storage *ss, socklen_t sl)
{
    int one = 1;
    int ls = socket(fam, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(ls, (const struct sockaddr *)ss, sl) || listen(ls, 65535)) {
        perror("bind/listen");
        exit(2);
    }
    return ls;
}

/* Accept one pending connection, non-blocking, watched for input on `ep`
 * (event data: the fd, upper 32 bits 0).  -1 when none is left (errno
 * EAGAIN or EINTR) or on an error. */
static int accept_into(int ls, int ep)
{
    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
    if (c < 0)
        return -1;
    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = (uint32_t)c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
    return c;
}

/* The address family; exits 2 on an address that is neither. */
static int parse_addr(const char *s, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, s, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(port);
        *len = sizeof(*a4);
        return AF_INET;
    }
    if (inet_pton(AF_INET6, s, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        *len = sizeof(*a6);
        return AF_INET6;
    }
    fprintf(stderr, "bad address %s\n", s);
    exit(2);
}

#endif
