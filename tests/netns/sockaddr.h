/* One address parser for the traffic helpers (tests/netns/churn.c,
 * bench/flows.c): IPv4 or IPv6 text and a port into a sockaddr.
 * tests/netns/build.py compiles with -I tests/netns. */
#ifndef CTA_SOCKADDR_H
#define CTA_SOCKADDR_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

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
