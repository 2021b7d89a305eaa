/*
 * sipload: the benchmark's SIP load generator in C, one process per caller or callee.
 *
 * The same calls, timers and figures as the Python workers of bench/loadgen.py (which
 * drives this program and keeps its API), at a fraction of their CPU: on a 2-core machine
 * the load generator shares the cores with what it measures, and the Python callers took
 * 0.15-0.35 ms of CPU per call (a sixth to a quarter of the box at the project's ceiling).
 *
 *   sipload uac IP TOKEN    a caller on IP (any port); prints "ready PORT", then reads
 *                           commands on stdin, one per line:
 *       step PROXY_IP PROXY_PORT RATE PHASE TOTAL HOLD TIMEOUT START FROM_USER TO_USER
 *                           TOTAL calls at RATE per second from START (epoch seconds),
 *                           the first one PHASE / RATE late; prints one JSON line when
 *                           every call is done (see finish())
 *       quit
 *   sipload uas IP PORT     the callee on IP:PORT (0: any); prints "ready PORT"; commands:
 *       stats               prints one JSON line of counts
 *       quit
 *
 * A call: INVITE -> (100/180) -> 200 -> ACK, hold HOLD s, BYE -> 200. It fails on a final
 * answer other than 200, no final answer within TIMEOUT s of the INVITE, or a BYE not
 * answered 200 within TIMEOUT s. INVITEs are retransmitted at T1 = 0.5 s doubling while
 * nothing is heard (timer A), BYEs at T1 doubling up to T2 = 4 s (timer E). The callee
 * answers every INVITE at once with 180 and 200 and retransmits its 200 until the ACK
 * (timer G, given up after 32 s), every other request with 200.
 *
 * Parsing is as lean as the Python one's and relies on the same forms (the proxy forwards
 * header names as they were sent): "Call-ID: ", "CSeq: ", "To: ", "Contact: ",
 * "Record-Route: ". Only Call-IDs of the running step are looked at; anything else is
 * ignored.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define T1 0.5
#define T2 4.0
#define DOMAIN "sidecar.local"
#define INV_LEVELS 6
#define BYE_LEVELS 8
#define MAXMSG 65536

static double mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double wall(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
		+ ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		die("malloc");
	return p;
}

static int udp_socket(const char *ip, int port)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
	if (fd < 0)
		die("socket");
	int size = 8 << 20;
	/* root may go past rmem_max / wmem_max */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "sipload: bad address %s\n", ip);
		exit(2);
	}
	if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
		die("bind");
	return fd;
}

static int bound_port(int fd)
{
	struct sockaddr_in a;
	socklen_t len = sizeof a;
	if (getsockname(fd, (struct sockaddr *)&a, &len) < 0)
		die("getsockname");
	return ntohs(a.sin_port);
}

static void send_to(int fd, const char *buf, size_t len, const struct sockaddr_in *to)
{
	/* a full send buffer drops the datagram, as a network would: timers recover it */
	(void)sendto(fd, buf, len, 0, (const struct sockaddr *)to, sizeof *to);
}

/* --- a growable byte buffer ------------------------------------------------------ */

typedef struct {
	char *p;
	size_t len, cap;
} buf_t;

static void b_add(buf_t *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		b->cap = (b->len + n + 1) * 2;
		char *q = realloc(b->p, b->cap);
		if (!q)
			die("realloc");
		b->p = q;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = 0;
}

static void b_str(buf_t *b, const char *s) { b_add(b, s, strlen(s)); }

static void b_fmt(buf_t *b, const char *fmt, ...)
{
	char tmp[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n > 0)
		b_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* a JSON string: quotes, backslashes and control characters escaped */
static void b_json_str(buf_t *b, const char *s)
{
	b_str(b, "\"");
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			b_fmt(b, "\\%c", c);
		else if (c < 0x20 || c >= 0x7f)
			b_fmt(b, "\\u%04x", c);
		else
			b_add(b, (const char *)&c, 1);
	}
	b_str(b, "\"");
}

/* the line starting at p (up to CRLF or end) */
static size_t line_len(const char *p, const char *end)
{
	const char *q = memmem(p, end - p, "\r\n", 2);
	return q ? (size_t)(q - p) : (size_t)(end - p);
}

/* --- stdin commands ------------------------------------------------------------- */

static char cmdbuf[4096];
static size_t cmdlen;

/* the next complete line of stdin into out (0 when none yet); -1 at end of input */
static int next_command(char *out, size_t cap)
{
	for (;;) {
		char *nl = memchr(cmdbuf, '\n', cmdlen);
		if (nl) {
			size_t n = nl - cmdbuf;
			if (n >= cap)
				n = cap - 1;
			memcpy(out, cmdbuf, n);
			out[n] = 0;
			cmdlen -= (nl - cmdbuf) + 1;
			memmove(cmdbuf, nl + 1, cmdlen);
			return 1;
		}
		if (cmdlen == sizeof cmdbuf)
			cmdlen = 0; /* a line longer than any command: dropped */
		ssize_t r = read(0, cmdbuf + cmdlen, sizeof cmdbuf - cmdlen);
		if (r == 0)
			return -1;
		if (r < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -1;
		cmdlen += r;
	}
}

static void emit(buf_t *b)
{
	b_str(b, "\n");
	size_t off = 0;
	while (off < b->len) {
		ssize_t w = write(1, b->p + off, b->len - off);
		if (w < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			exit(1);
		}
		off += w;
	}
	b->len = 0;
}

/* ================================================================= caller (UAC) */

enum { CALLING, PROCEEDING, HOLDING, BYEING, DONE };

typedef struct {
	int state;
	double t0;
	char *ack, *bye;
	int ack_len, bye_len;
} call_t;

/* a FIFO of (due, call index): every call enters each queue at most once, and each
 * queue's delay is the same for all, so due times come in order */
typedef struct {
	double *due;
	int *idx;
	int head, tail;
} fifo_t;

static void q_init(fifo_t *q, int cap)
{
	q->due = xmalloc(sizeof(double) * cap);
	q->idx = xmalloc(sizeof(int) * cap);
	q->head = q->tail = 0;
}

static void q_free(fifo_t *q)
{
	free(q->due);
	free(q->idx);
}

static void q_push(fifo_t *q, double due, int i)
{
	q->due[q->tail] = due;
	q->idx[q->tail++] = i;
}

static int q_pop_due(fifo_t *q, double now)
{
	if (q->head < q->tail && q->due[q->head] <= now)
		return q->idx[q->head++];
	return -1;
}

#define MAX_REASONS 64
typedef struct {
	char why[128];
	long n;
} reason_t;

static struct uac {
	int fd, port, running;
	char ip[64], token[64], prefix[96];
	size_t prefix_len;
	int stepno;
	struct sockaddr_in proxy;
	double rate, phase, hold, timeout, t_start, t_first, t_last, deadline, max_lag, cpu0;
	int total, sent, answered, completed, active;
	long invite_rtx, bye_rtx;
	char ruri[256], from_user[128], to_user[128];
	call_t *calls;
	double *lat;
	int nlat;
	fifo_t hold_q, inv_to, bye_to, inv_rtx[INV_LEVELS], bye_rtxq[BYE_LEVELS];
	reason_t reasons[MAX_REASONS];
	int nreasons;
} U;

static void uac_fail(int i, const char *why)
{
	call_t *c = &U.calls[i];
	if (c->state == DONE)
		return;
	c->state = DONE;
	U.active--;
	int k;
	for (k = 0; k < U.nreasons; k++)
		if (!strcmp(U.reasons[k].why, why))
			break;
	if (k == U.nreasons) {
		if (U.nreasons == MAX_REASONS)
			k = MAX_REASONS - 1; /* the rest counted under the last */
		else
			snprintf(U.reasons[U.nreasons++].why, sizeof U.reasons[0].why, "%s", why);
	}
	U.reasons[k].n++;
}

/* the INVITE of call i (1-based number i + 1 in its Call-ID) */
static int build_invite(char *out, size_t cap, int i)
{
	return snprintf(out, cap,
		"INVITE %s SIP/2.0\r\n"
		"Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s%di;rport\r\n"
		"Max-Forwards: 70\r\n"
		"From: <sip:%s@" DOMAIN ">;tag=f%d\r\n"
		"Call-ID: %s%d\r\n"
		"To: <sip:%s@" DOMAIN ">\r\n"
		"CSeq: 1 INVITE\r\n"
		"Contact: <sip:%s@%s:%d>\r\n"
		"Content-Length: 0\r\n\r\n",
		U.ruri, U.ip, U.port, U.prefix, i + 1, U.from_user, i + 1, U.prefix, i + 1,
		U.to_user, U.from_user, U.ip, U.port);
}

static void send_invite(int i)
{
	char msg[2048];
	int n = build_invite(msg, sizeof msg, i);
	send_to(U.fd, msg, n, &U.proxy);
}

static void uac_start(char *args)
{
	char pip[64];
	int pport;
	double start;
	if (sscanf(args, "%63s %d %lf %lf %d %lf %lf %lf %127s %127s", pip, &pport, &U.rate,
		   &U.phase, &U.total, &U.hold, &U.timeout, &start, U.from_user, U.to_user) != 10) {
		fprintf(stderr, "sipload: bad step command: %s\n", args);
		exit(2);
	}
	U.proxy = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(pport)};
	inet_pton(AF_INET, pip, &U.proxy.sin_addr);
	U.stepno++;
	U.prefix_len = snprintf(U.prefix, sizeof U.prefix, "%ss%d-", U.token, U.stepno);
	snprintf(U.ruri, sizeof U.ruri, "sip:%s@%s:%d", U.to_user, pip, pport);
	U.sent = U.answered = U.completed = U.active = 0;
	U.invite_rtx = U.bye_rtx = 0;
	U.nreasons = 0;
	U.nlat = 0;
	U.max_lag = 0;
	int cap = U.total > 0 ? U.total : 1;
	U.calls = calloc(cap, sizeof(call_t));
	if (!U.calls)
		die("calloc");
	U.lat = xmalloc(sizeof(double) * cap);
	q_init(&U.hold_q, cap);
	q_init(&U.inv_to, cap);
	q_init(&U.bye_to, cap);
	for (int l = 0; l < INV_LEVELS; l++)
		q_init(&U.inv_rtx[l], cap);
	for (int l = 0; l < BYE_LEVELS; l++)
		q_init(&U.bye_rtxq[l], cap);
	U.t_start = mono() + (start - wall());
	U.t_first = U.t_last = 0;
	U.deadline = U.t_start + U.total / (U.rate > 1e-9 ? U.rate : 1e-9) + U.hold
		+ 2 * U.timeout + 2.0;
	U.cpu0 = cpu_seconds();
	U.running = 1;
}

/* the step's result, one JSON line, then the step's memory freed */
static void uac_finish(void)
{
	buf_t b = {0};
	double window = U.sent > 1 ? U.t_last - U.t_first : 0.0;
	b_fmt(&b, "{\"sent\":%d,\"answered\":%d,\"completed\":%d,\"invite_rtx\":%ld,"
		  "\"bye_rtx\":%ld,\"window\":%.6f,\"max_lag\":%.6f,\"cpu\":%.6f,\"failures\":{",
	      U.sent, U.answered, U.completed, U.invite_rtx, U.bye_rtx, window, U.max_lag,
	      cpu_seconds() - U.cpu0);
	for (int k = 0; k < U.nreasons; k++) {
		if (k)
			b_str(&b, ",");
		b_json_str(&b, U.reasons[k].why);
		b_fmt(&b, ":%ld", U.reasons[k].n);
	}
	b_str(&b, "},\"lat\":[");
	for (int k = 0; k < U.nlat; k++)
		b_fmt(&b, k ? ",%.6f" : "%.6f", U.lat[k]);
	b_str(&b, "]}");
	emit(&b);
	free(b.p);
	for (int i = 0; i < U.total; i++) {
		free(U.calls[i].ack);
		free(U.calls[i].bye);
	}
	free(U.calls);
	free(U.lat);
	q_free(&U.hold_q);
	q_free(&U.inv_to);
	q_free(&U.bye_to);
	for (int l = 0; l < INV_LEVELS; l++)
		q_free(&U.inv_rtx[l]);
	for (int l = 0; l < BYE_LEVELS; l++)
		q_free(&U.bye_rtxq[l]);
	U.calls = NULL;
	U.running = 0;
}

static void uac_tick(void)
{
	double now = mono();
	int i;
	/* new calls, at their scheduled times */
	if (U.sent < U.total) {
		long due = (long)((now - U.t_start) * U.rate - U.phase) + 1;
		if (now < U.t_start)
			due = 0;
		if (due > U.total)
			due = U.total;
		if (due > U.sent) {
			double lag = now - (U.t_start + (U.sent + U.phase) / U.rate);
			if (lag > U.max_lag)
				U.max_lag = lag;
			if (!U.t_first)
				U.t_first = now;
			while (U.sent < due) {
				i = U.sent++;
				U.calls[i].state = CALLING;
				U.calls[i].t0 = now;
				U.active++;
				send_invite(i);
				q_push(&U.inv_rtx[0], now + T1, i);
				q_push(&U.inv_to, now + U.timeout, i);
			}
			U.t_last = now;
		}
	}
	/* answered calls whose hold is over: BYE */
	while ((i = q_pop_due(&U.hold_q, now)) >= 0) {
		call_t *c = &U.calls[i];
		if (c->state == HOLDING) {
			c->state = BYEING;
			send_to(U.fd, c->bye, c->bye_len, &U.proxy);
			q_push(&U.bye_rtxq[0], now + T1, i);
			q_push(&U.bye_to, now + U.timeout, i);
		}
	}
	/* INVITE retransmissions (timer A) while nothing was heard */
	for (int l = 0; l < INV_LEVELS; l++)
		while ((i = q_pop_due(&U.inv_rtx[l], now)) >= 0)
			if (U.calls[i].state == CALLING) {
				send_invite(i);
				U.invite_rtx++;
				if (l + 1 < INV_LEVELS)
					q_push(&U.inv_rtx[l + 1], now + T1 * (2 << l), i);
			}
	/* BYE retransmissions (timer E) */
	for (int l = 0; l < BYE_LEVELS; l++)
		while ((i = q_pop_due(&U.bye_rtxq[l], now)) >= 0)
			if (U.calls[i].state == BYEING) {
				call_t *c = &U.calls[i];
				send_to(U.fd, c->bye, c->bye_len, &U.proxy);
				U.bye_rtx++;
				if (l + 1 < BYE_LEVELS) {
					double d = T1 * (2 << l);
					q_push(&U.bye_rtxq[l + 1], now + (d < T2 ? d : T2), i);
				}
			}
	while ((i = q_pop_due(&U.inv_to, now)) >= 0) {
		int st = U.calls[i].state;
		if (st == CALLING)
			uac_fail(i, "INVITE timeout");
		else if (st == PROCEEDING)
			uac_fail(i, "no final answer (timeout)");
	}
	while ((i = q_pop_due(&U.bye_to, now)) >= 0)
		if (U.calls[i].state == BYEING)
			uac_fail(i, "BYE timeout");
	if (U.sent >= U.total && (U.active == 0 || now > U.deadline)) {
		for (i = 0; i < U.sent; i++)
			if (U.calls[i].state != DONE)
				uac_fail(i, "unfinished at the deadline");
		uac_finish();
	}
}

/* the value of header `name` (with its ": "), or NULL */
static const char *header(const char *msg, const char *end, const char *name, size_t *len)
{
	size_t n = strlen(name);
	const char *p = msg;
	for (;;) {
		const char *q = memmem(p, end - p, "\r\n", 2);
		if (!q || q + 2 >= end || (q[2] == '\r' && q[3] == '\n'))
			return NULL;
		p = q + 2;
		if ((size_t)(end - p) > n && !memcmp(p, name, n)) {
			*len = line_len(p + n, end);
			return p + n;
		}
	}
}

/* the 200 of an INVITE: ACK and BYE built from its To, Contact and Record-Route */
static void uac_answered(int i, const char *msg, const char *end)
{
	call_t *c = &U.calls[i];
	const char *hend = memmem(msg, end - msg, "\r\n\r\n", 4);
	if (!hend)
		hend = end;
	const char *rr[32];
	size_t rrlen[32];
	int nrr = 0;
	const char *to = NULL, *contact = NULL;
	size_t tolen = 0, clen = 0;
	for (const char *p = msg; p < hend;) {
		size_t n = line_len(p, hend);
		if (n >= 14 && !memcmp(p, "Record-Route: ", 14) && nrr < 32) {
			rr[nrr] = p + 14;
			rrlen[nrr++] = n - 14;
		} else if (n >= 3 && !memcmp(p, "To:", 3)) {
			to = p;
			tolen = n;
		} else if (n >= 9 && !memcmp(p, "Contact: ", 9)) {
			const char *a = memchr(p, '<', n);
			if (a) {
				const char *z = memchr(a, '>', p + n - a);
				contact = a + 1;
				clen = z ? (size_t)(z - a - 1) : (size_t)(p + n - a - 1);
			} else {
				contact = p + 9;
				const char *z = memchr(contact, ';', n - 9);
				clen = z ? (size_t)(z - contact) : n - 9;
			}
		}
		p += n + 2;
	}
	if (!to || !contact) {
		uac_fail(i, "200 without To or Contact");
		return;
	}
	buf_t common = {0}, m = {0};
	if (nrr) {
		b_str(&common, "Route: ");
		for (int k = nrr - 1; k >= 0; k--) {
			b_add(&common, rr[k], rrlen[k]);
			if (k)
				b_str(&common, ", ");
		}
		b_str(&common, "\r\n");
	}
	b_fmt(&common, "Max-Forwards: 70\r\nFrom: <sip:%s@" DOMAIN ">;tag=f%d\r\nCall-ID: %s%d\r\n",
	      U.from_user, i + 1, U.prefix, i + 1);
	b_add(&common, to, tolen);
	b_str(&common, "\r\n");
	const char *kinds[2] = {"ACK", "BYE"};
	for (int k = 0; k < 2; k++) {
		m.len = 0;
		b_fmt(&m, "%s ", kinds[k]);
		b_add(&m, contact, clen);
		b_fmt(&m, " SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s%d%c;rport\r\n", U.ip,
		      U.port, U.prefix, i + 1, k ? 'b' : 'a');
		b_add(&m, common.p, common.len);
		b_str(&m, k ? "CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
			    : "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n");
		char *copy = xmalloc(m.len);
		memcpy(copy, m.p, m.len);
		if (k) {
			c->bye = copy;
			c->bye_len = m.len;
		} else {
			c->ack = copy;
			c->ack_len = m.len;
		}
	}
	free(common.p);
	free(m.p);
	c->state = HOLDING;
	send_to(U.fd, c->ack, c->ack_len, &U.proxy);
	q_push(&U.hold_q, mono() + U.hold, i);
}

/* ACK of a non-2xx final answer: hop by hop, the INVITE's branch, the answer's To */
static void uac_ack_failure(int i, const char *msg, const char *end)
{
	size_t tolen;
	const char *to = header(msg, end, "To: ", &tolen);
	char out[2048];
	int n = snprintf(out, sizeof out,
		"ACK %s SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s%di;rport\r\n"
		"Max-Forwards: 70\r\nFrom: <sip:%s@" DOMAIN ">;tag=f%d\r\nCall-ID: %s%d\r\n"
		"To: %.*s\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
		U.ruri, U.ip, U.port, U.prefix, i + 1, U.from_user, i + 1, U.prefix, i + 1,
		to ? (int)tolen : 0, to ? to : "");
	if (n > 0 && n < (int)sizeof out)
		send_to(U.fd, out, n, &U.proxy);
}

static void uac_received(const char *msg, size_t len)
{
	const char *end = msg + len;
	if (!U.running || len < 13 || memcmp(msg, "SIP/2.0 ", 8))
		return;
	size_t cl;
	const char *cid = header(msg, end, "Call-ID: ", &cl);
	if (!cid || cl <= U.prefix_len || memcmp(cid, U.prefix, U.prefix_len))
		return;
	long num = 0;
	for (size_t k = U.prefix_len; k < cl; k++) {
		if (cid[k] < '0' || cid[k] > '9' || num > U.total)
			return;
		num = num * 10 + (cid[k] - '0');
	}
	if (num < 1 || num > U.sent)
		return;
	int i = (int)num - 1;
	call_t *c = &U.calls[i];
	int code = atoi(msg + 8);
	size_t sl;
	const char *cseq = header(msg, end, "CSeq: ", &sl);
	if (!cseq)
		return;
	if (cseq[0] == '1') { /* the INVITE */
		if (code < 200) {
			if (c->state == CALLING)
				c->state = PROCEEDING;
			return;
		}
		if (c->state <= PROCEEDING) {
			if (code == 200) {
				U.lat[U.nlat++] = mono() - c->t0;
				U.answered++;
				uac_answered(i, msg, end);
			} else {
				char why[128];
				size_t rl = line_len(msg + 12, end);
				snprintf(why, sizeof why, "%d %.*s", code, (int)(rl < 100 ? rl : 100),
					 msg + 12);
				uac_ack_failure(i, msg, end);
				uac_fail(i, why);
			}
		} else if (code == 200 && c->ack) {
			send_to(U.fd, c->ack, c->ack_len, &U.proxy); /* 200 again: ACK again */
		}
		return;
	}
	if (c->state == BYEING && code >= 200) { /* the BYE */
		if (code == 200) {
			c->state = DONE;
			U.completed++;
			U.active--;
		} else {
			char why[32];
			snprintf(why, sizeof why, "BYE %d", code);
			uac_fail(i, why);
		}
	}
}

/* ================================================================= callee (UAS) */

typedef struct entry {
	struct entry *next;		 /* bucket chain */
	struct entry *uprev, *unext;	 /* the unacked list */
	char *cid, *ok;
	size_t cid_len, ok_len;
	struct sockaddr_in addr;
	double due, interval, first;
	int unacked;
} entry_t;

#define NBUCKETS (1 << 16)
static struct uas {
	int fd, port;
	char ip[64], contact[160];
	entry_t *buckets[NBUCKETS];
	entry_t *unacked;
	long n, invites, invite_rtx, acks, byes, ok_rtx;
} S;

static unsigned hash(const char *s, size_t n)
{
	unsigned h = 2166136261u;
	while (n--)
		h = (h ^ (unsigned char)*s++) * 16777619u;
	return h & (NBUCKETS - 1);
}

static entry_t **find(const char *cid, size_t n)
{
	entry_t **pp = &S.buckets[hash(cid, n)];
	while (*pp && ((*pp)->cid_len != n || memcmp((*pp)->cid, cid, n)))
		pp = &(*pp)->next;
	return pp;
}

static void unack(entry_t *e)
{
	if (!e->unacked)
		return;
	e->unacked = 0;
	if (e->uprev)
		e->uprev->unext = e->unext;
	else
		S.unacked = e->unext;
	if (e->unext)
		e->unext->uprev = e->uprev;
}

/* the request's Via, Record-Route, From, Call-ID and CSeq lines (CRLF after each) into
 * keep, its To line into *to, its Call-ID into *cid */
static void uas_headers(const char *msg, const char *end, buf_t *keep, const char **to,
			size_t *tolen, const char **cid, size_t *cidlen)
{
	const char *hend = memmem(msg, end - msg, "\r\n\r\n", 4);
	if (!hend)
		hend = end;
	*to = *cid = NULL;
	*tolen = *cidlen = 0;
	const char *p = memmem(msg, hend - msg, "\r\n", 2);
	if (!p)
		return;
	for (p += 2; p < hend;) {
		size_t n = line_len(p, hend);
		if (n >= 2) {
			char a = p[0], b = p[1];
			int take = (a == 'V' && b == 'i') || (a == 'F' && b == 'r') ||
				   (a == 'C' && b == 'S') || (a == 'v' && b == ':') ||
				   (n >= 13 && !memcmp(p, "Record-Route:", 13));
			if (a == 'C' && b == 'a') {
				take = 1;
				const char *v = p + (n > 9 ? 9 : n);
				size_t vl = n > 9 ? n - 9 : 0;
				while (vl && (*v == ' ' || *v == '\t')) {
					v++;
					vl--;
				}
				while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
					vl--;
				*cid = v;
				*cidlen = vl;
			} else if (a == 'T' && b == 'o') {
				*to = p;
				*tolen = n;
			}
			if (take) {
				b_add(keep, p, n);
				b_str(keep, "\r\n");
			}
		}
		p += n + 2;
	}
}

static void uas_received(const char *msg, size_t len, const struct sockaddr_in *from)
{
	const char *end = msg + len;
	if (len < 3)
		return;
	if (!memcmp(msg, "SIP", 3))
		return;
	if (!memcmp(msg, "ACK", 3)) {
		size_t cl;
		const char *cid = header(msg, end, "Call-ID: ", &cl);
		if (cid) {
			entry_t *e = *find(cid, cl);
			if (e)
				unack(e);
		}
		S.acks++;
		return;
	}
	buf_t keep = {0}, m = {0};
	const char *to, *cid;
	size_t tolen, cidlen;
	uas_headers(msg, end, &keep, &to, &tolen, &cid, &cidlen);
	if (!to)
		to = "", tolen = 0;
	if (!memcmp(msg, "INV", 3)) {
		entry_t **pp = find(cid ? cid : "", cidlen);
		if (*pp) {
			S.invite_rtx++;
			send_to(S.fd, (*pp)->ok, (*pp)->ok_len, from);
			free(keep.p);
			return;
		}
		S.n++;
		S.invites++;
		b_add(&m, "SIP/2.0 180 Ringing\r\n", 21);
		size_t at = m.len;
		b_add(&m, keep.p ? keep.p : "", keep.len);
		b_add(&m, to, tolen);
		b_fmt(&m, ";tag=u%ld\r\n%sContent-Length: 0\r\n\r\n", S.n, S.contact);
		send_to(S.fd, m.p, m.len, from);
		entry_t *e = calloc(1, sizeof *e);
		if (!e)
			die("calloc");
		e->ok_len = 16 + (m.len - at);
		e->ok = xmalloc(e->ok_len);
		memcpy(e->ok, "SIP/2.0 200 OK\r\n", 16);
		memcpy(e->ok + 16, m.p + at, m.len - at);
		e->cid_len = cidlen;
		e->cid = xmalloc(cidlen);
		memcpy(e->cid, cid ? cid : "", cidlen);
		e->addr = *from;
		send_to(S.fd, e->ok, e->ok_len, from);
		double now = mono();
		e->first = now;
		e->interval = T1;
		e->due = now + T1;
		e->unacked = 1;
		e->unext = S.unacked;
		if (S.unacked)
			S.unacked->uprev = e;
		S.unacked = e;
		*pp = e;
	} else { /* BYE, CANCEL, OPTIONS...: 200 */
		if (!memcmp(msg, "BYE", 3)) {
			S.byes++;
			entry_t **pp = find(cid ? cid : "", cidlen);
			entry_t *e = *pp;
			if (e) {
				unack(e);
				*pp = e->next;
				free(e->ok);
				free(e->cid);
				free(e);
			}
		}
		b_str(&m, "SIP/2.0 200 OK\r\n");
		b_add(&m, keep.p ? keep.p : "", keep.len);
		b_add(&m, to, tolen);
		b_str(&m, "\r\nContent-Length: 0\r\n\r\n");
		send_to(S.fd, m.p, m.len, from);
	}
	free(keep.p);
	free(m.p);
}

/* the 200s not ACKed yet, retransmitted (timer G), given up after 32 s (timer H) */
static void uas_tick(void)
{
	double now = mono();
	for (entry_t *e = S.unacked, *next; e; e = next) {
		next = e->unext;
		if (now - e->first > 32) {
			unack(e);
		} else if (e->due <= now) {
			send_to(S.fd, e->ok, e->ok_len, &e->addr);
			S.ok_rtx++;
			e->interval = e->interval * 2 < T2 ? e->interval * 2 : T2;
			e->due = now + e->interval;
		}
	}
}

/* ================================================================= main loop */

int main(int argc, char **argv)
{
	if (argc != 4 || (strcmp(argv[1], "uac") && strcmp(argv[1], "uas"))) {
		fprintf(stderr, "usage: sipload uac IP TOKEN | sipload uas IP PORT\n");
		return 2;
	}
	int uac = !strcmp(argv[1], "uac");
	int fd = udp_socket(argv[2], uac ? 0 : atoi(argv[3]));
	int port = bound_port(fd);
	if (uac) {
		U.fd = fd;
		U.port = port;
		snprintf(U.ip, sizeof U.ip, "%s", argv[2]);
		snprintf(U.token, sizeof U.token, "%s", argv[3]);
	} else {
		S.fd = fd;
		S.port = port;
		snprintf(S.ip, sizeof S.ip, "%s", argv[2]);
		snprintf(S.contact, sizeof S.contact, "Contact: <sip:callee@%s:%d>\r\n", S.ip, port);
	}
	fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
	epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	ev.data.fd = 0;
	epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
	buf_t out = {0};
	b_fmt(&out, "ready %d", port);
	emit(&out);

	/* a tick every millisecond while a step runs (the callers' sending times), every
	 * 50 ms for the callee's timers */
	double tick_every = uac ? 0.001 : 0.05, next_tick = mono() + tick_every;
	static char msg[MAXMSG];
	char cmd[4096];
	for (;;) {
		int wait = -1;
		if (!uac || U.running) {
			double left = next_tick - mono();
			wait = left > 0 ? (int)(left * 1000) + 1 : 0;
		}
		struct epoll_event evs[4];
		int n = epoll_wait(ep, evs, 4, wait);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int k = 0; k < n; k++) {
			if (evs[k].data.fd == fd) {
				for (int burst = 0; burst < 256; burst++) {
					struct sockaddr_in from;
					socklen_t fl = sizeof from;
					ssize_t r = recvfrom(fd, msg, sizeof msg - 1, 0,
							     (struct sockaddr *)&from, &fl);
					if (r < 0)
						break;
					msg[r] = 0;
					if (uac)
						uac_received(msg, r);
					else
						uas_received(msg, r, &from);
				}
			} else {
				int got;
				while ((got = next_command(cmd, sizeof cmd)) > 0) {
					if (!strcmp(cmd, "quit"))
						return 0;
					if (uac && !strncmp(cmd, "step ", 5) && !U.running) {
						uac_start(cmd + 5);
						next_tick = mono();
					} else if (!uac && !strcmp(cmd, "stats")) {
						b_fmt(&out, "{\"invites\":%ld,\"invite_rtx\":%ld,"
							    "\"acks\":%ld,\"byes\":%ld,\"ok_rtx\":%ld}",
						      S.invites, S.invite_rtx, S.acks, S.byes, S.ok_rtx);
						emit(&out);
					}
				}
				if (got < 0)
					return 0; /* the parent is gone */
			}
		}
		double now = mono();
		if (now >= next_tick && (!uac || U.running)) {
			if (uac)
				uac_tick();
			else
				uas_tick();
			next_tick = now + tick_every;
		}
	}
}
