// An experiment, not part of fairlead: a one-connection TCP relay whose
// bytes move between its two sockets by a sockmap `sk_skb` verdict program
// (bpf_sk_redirect_map to the other socket's egress), with no system call
// per byte. It answered whether sockmap beats splice(2) for the bulk row of
// `cargo bench --bench userspace` (README, "Bulk against a direct
// connection"): on this 2-core machine (kernel 6.18) it did not. Its
// downloads ran at 1.1-2.1 GB/s where splice(2) relays ran at 2.1-2.3, and
// 4 of 9 downloads stalled for good partway.
//
//   gcc -O2 -o /tmp/sockmap_relay bench/experiments/sockmap_relay.c
//   fairlead echo --http-port 18080 --bind 127.0.0.1 &
//   /tmp/sockmap_relay 18081 18080 &    # as root; serves one connection
//   curl -so /dev/null -w '%{speed_download}\n' 'http://127.0.0.1:18081/bytes?n=2147483648'
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof(*a)); }
#define INSN(c, d, s, o, i) ((struct bpf_insn){.code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i)})

static int put(int map, int key, int fd) {
  union bpf_attr a = {.map_fd = map, .key = (unsigned long)&key, .value = (unsigned long)&fd};
  return bpf(BPF_MAP_UPDATE_ELEM, &a);
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT\n", argv[0]); return 2; }
  int lport = atoi(argv[1]), bport = atoi(argv[2]), one = 1;
  // Slot 0: the client's socket, slot 1: the backend's.
  union bpf_attr a = {.map_type = BPF_MAP_TYPE_SOCKMAP, .key_size = 4, .value_size = 4, .max_entries = 2};
  int map = bpf(BPF_MAP_CREATE, &a);
  if (map < 0) { perror("map"); return 1; }
  // Bytes received on the socket whose local port is the listener's (from
  // the client) go out of slot 1; all others (from the backend) out of slot 0.
  struct bpf_insn prog[] = {
      INSN(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),
      INSN(BPF_LDX | BPF_MEM | BPF_W, 2, 1, offsetof(struct __sk_buff, local_port), 0),
      INSN(BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, 0),
      INSN(BPF_JMP | BPF_JNE | BPF_K, 2, 0, 1, lport),
      INSN(BPF_ALU64 | BPF_MOV | BPF_K, 3, 0, 0, 1),
      INSN(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),
      INSN(BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, map),
      INSN(0, 0, 0, 0, 0),
      INSN(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0), // flags 0: the target's egress
      INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_map),
      INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
  };
  static char log[65536];
  memset(&a, 0, sizeof a);
  a.prog_type = BPF_PROG_TYPE_SK_SKB;
  a.insns = (unsigned long)prog;
  a.insn_cnt = sizeof prog / sizeof prog[0];
  a.license = (unsigned long)"GPL";
  a.log_buf = (unsigned long)log;
  a.log_size = sizeof log;
  a.log_level = 1;
  int pfd = bpf(BPF_PROG_LOAD, &a);
  if (pfd < 0) { perror("load"); fprintf(stderr, "%s\n", log); return 1; }
  memset(&a, 0, sizeof a);
  a.target_fd = map;
  a.attach_bpf_fd = pfd;
  a.attach_type = BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH, &a) < 0) { perror("attach"); return 1; }

  int ls = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(lport)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(ls, (void *)&sa, sizeof sa) || listen(ls, 16)) { perror("listen"); return 1; }
  int c = accept(ls, 0, 0), u = socket(AF_INET, SOCK_STREAM, 0);
  sa.sin_port = htons(bport);
  if (c < 0 || connect(u, (void *)&sa, sizeof sa)) { perror("connect"); return 1; }
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (put(map, 0, c) || put(map, 1, u)) { perror("update"); return 1; }
  // The bytes never reach this process; wait for either side to hang up.
  struct pollfd p[2] = {{c, POLLRDHUP}, {u, POLLRDHUP}};
  while (poll(p, 2, -1) > 0 && !((p[0].revents | p[1].revents) & (POLLRDHUP | POLLHUP)))
    ;
  return 0;
}
