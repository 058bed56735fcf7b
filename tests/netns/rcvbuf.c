/*
 * LD_PRELOAD shim for conntrack-tools' event mode (conntrack -E).
 *
 * conntrack-tools 1.4.7 applies `-b SIZE` to its query socket, not to the
 * socket subscribed to event groups, so `conntrack -E` reads events through
 * a net.core.rmem_default-sized buffer (212992 bytes) and loses events
 * (ENOBUFS) as soon as the conntrack GC reaps a burst of ~1,000 flows.  This
 * shim wraps bind(2): a netlink socket bound to multicast groups first gets
 * SO_RCVBUFFORCE of $CTA_NETLINK_RCVBUF bytes (default 64 MiB).
 *
 * Compiled at test time by tests/netns/build.py (gcc -shared -fPIC).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/netlink.h>
#include <stdlib.h>
#include <sys/socket.h>

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind)
        real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_NETLINK && len >= sizeof(struct sockaddr_nl) &&
        ((const struct sockaddr_nl *)addr)->nl_groups) {
        const char *s = getenv("CTA_NETLINK_RCVBUF");
        int size = s ? atoi(s) : 64 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
    }
    return real_bind(fd, addr, len);
}
