/* Tries one system call per argument ("name" or "name=value") and prints
   "R <name> <return> <errno>"; errno is 0 when the call did not fail. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static long unix_connect(const char *path, int abstract) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) return -1;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    socklen_t len;
    if (abstract) {
        strncpy(a.sun_path + 1, path, sizeof a.sun_path - 2);
        len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(path);
    } else {
        strncpy(a.sun_path, path, sizeof a.sun_path - 1);
        len = sizeof a;
    }
    return connect(s, (struct sockaddr *)&a, len);
}

/* TCP to 127.0.0.1:port (connect) or on it (bind; port 0 for any). */
static long tcp(const char *port, int bind_it) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return bind_it ? bind(s, (struct sockaddr *)&a, sizeof a)
                   : connect(s, (struct sockaddr *)&a, sizeof a);
}

static void *thread_main(void *arg) { return arg; }

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 1; i < argc; i++) {
        char name[64];
        const char *value = strchr(argv[i], '=');
        size_t n = value ? (size_t)(value - argv[i]) : strlen(argv[i]);
        if (n >= sizeof name) n = sizeof name - 1;
        memcpy(name, argv[i], n);
        name[n] = 0;
        value = value ? value + 1 : "";
        char c = 'x';
        long r = -1;
        errno = 0;
        if (!strcmp(name, "keyctl")) r = syscall(SYS_keyctl, 9999, 0, 0, 0, 0);
        else if (!strcmp(name, "request_key")) r = syscall(SYS_request_key, "user", "quorum-none", NULL, 0);
        else if (!strcmp(name, "bpf")) r = syscall(SYS_bpf, 9999, NULL, 0);
        else if (!strcmp(name, "perf_event_open")) r = syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0);
        else if (!strcmp(name, "io_uring_setup")) r = syscall(SYS_io_uring_setup, 0, NULL);
        else if (!strcmp(name, "userfaultfd")) r = syscall(SYS_userfaultfd, 0x7fff0000);
        else if (!strcmp(name, "setns")) r = syscall(SYS_setns, -1, 0);
        else if (!strcmp(name, "finit_module")) r = syscall(SYS_finit_module, -1, "", 0);
        else if (!strcmp(name, "tiocsti")) r = syscall(SYS_ioctl, 0, 0x5412UL, &c);
        else if (!strcmp(name, "tiocsti_high")) r = syscall(SYS_ioctl, 0, 0x100005412UL, &c);
        else if (!strcmp(name, "tioclinux")) r = syscall(SYS_ioctl, 0, 0x541CUL, &c);
        else if (!strcmp(name, "fionread")) { int k; r = syscall(SYS_ioctl, 0, 0x541BUL, &k); }
        else if (!strcmp(name, "unshare_user")) r = unshare(CLONE_NEWUSER);
        else if (!strcmp(name, "unshare_uts")) r = unshare(CLONE_NEWUTS);
        else if (!strcmp(name, "clone_user")) {
            r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
            if (r == 0) _exit(0);
            if (r > 0) waitpid(r, NULL, 0);
        } else if (!strcmp(name, "clone3")) r = syscall(SYS_clone3, NULL, 0);
        else if (!strcmp(name, "chmod_suid")) r = chmod(value, 04755);
        else if (!strcmp(name, "chmod_sgid")) r = fchmodat(AT_FDCWD, value, 02755, 0);
        else if (!strcmp(name, "fchmod_suid")) {
            int fd = open(value, O_RDONLY);
            r = fchmod(fd, 04755);
            close(fd);
        } else if (!strcmp(name, "chmod_plain")) r = chmod(value, 0750);
        else if (!strcmp(name, "ptrace_child")) {
            pid_t child = fork();
            if (child == 0) { pause(); _exit(0); }
            r = syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, child, 0, 0);
            kill(child, SIGKILL);
            waitpid(child, NULL, 0);
        } else if (!strcmp(name, "ptrace_pid")) r = syscall(SYS_ptrace, 16, atoi(value), 0, 0);
        else if (!strcmp(name, "vm_readv")) {
            char buf[1];
            struct iovec l = {buf, 1}, rv = {&c, 1};
            r = process_vm_readv(getpid(), &l, 1, &rv, 1, 0);
        } else if (!strcmp(name, "thread")) {
            pthread_t t;
            int e = pthread_create(&t, NULL, thread_main, NULL);
            if (e == 0) r = pthread_join(t, NULL); else errno = e;
        } else if (!strcmp(name, "fork")) {
            pid_t p = fork();
            if (p == 0) _exit(7);
            int status = 0;
            if (p > 0 && waitpid(p, &status, 0) == p) r = WEXITSTATUS(status);
        } else if (!strcmp(name, "unix_path")) r = unix_connect(value, 0);
        else if (!strcmp(name, "unix_abstract")) r = unix_connect(value, 1);
        else if (!strcmp(name, "tcp_connect")) r = tcp(value, 0);
        else if (!strcmp(name, "tcp_bind")) r = tcp(value, 1);
        else if (!strcmp(name, "kill_pid")) r = kill(atoi(value), 0);
        else { printf("unknown %s\n", name); return 2; }
        printf("R %s %ld %d\n", name, r, r == -1 ? errno : 0);
    }
    return 0;
}
