/*
 * hog: allocate more memory than the guest has, fill every page with content
 * derived from its index, read everything back and verify it.
 *
 * Under memory pressure the kernel swaps the pages out and in again, so a
 * page that comes back wrong is swap data the block device lost, mixed up or
 * returned stale.
 *
 * Page kinds (picked by a hash of the page index, so neighbours differ):
 *   zero   1/8   all zero bytes (written explicitly, so the page exists)
 *   same   1/16  one 64-bit word repeated (a same-filled page)
 *   random 3/16  xorshift output: incompressible
 *   text   5/8   lines of code, logs and JSON with numbers: compresses
 *                 about 3x with lz4, like typical heap and page-cache data
 * Every non-zero page starts with its index and generation, so a misplaced
 * page names the page it came from.
 *
 * Passes: pass 0 fills every page (generation 0). Each verify pass
 * 1..P checks every page against the generation it last wrote; in every
 * pass but the last, one page in four is rewritten with the next
 * generation, so a device that returns the older copy is caught. Odd passes
 * walk the pages in order, even ones in a strided order (random-looking
 * 4 KiB reads, readahead useless).
 *
 * Usage: hog MIB [PASSES] [SEED]
 * Output (one line each, parsed by the test harness):
 *   HOG start pages=N mib=M passes=P seed=S
 *   HOG phase=NAME pass=K secs=F errors=E pswpin=I pswpout=O   (counters since boot)
 *   HOG mismatch pass=K page=I kind=KIND gen=G offset=O got=X want=Y found_page=J found_gen=H
 *       (found_*: the page and generation the content carries, -1 if none)
 *   HOG result=ok|fail pages=N mib=M errors=E zero=A same=B text=C random=D \
 *       rewritten=R fill_s=F verify_s=V total_s=T
 * Exit status: 0 when every page verified, 1 on a mismatch, 2 on a usage or
 * allocation error.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096
#define MAX_REPORTED 20

enum kind { ZERO, SAME, RANDOM, TEXT };
static const char *kind_names[] = {"zero", "same", "random", "text"};

static uint64_t seed;

static uint64_t mix64(uint64_t x)
{
	/* splitmix64 finaliser */
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static enum kind page_kind(uint64_t index)
{
	unsigned h = (unsigned)(mix64(index ^ seed) & 15);
	if (h < 2)
		return ZERO;
	if (h < 3)
		return SAME;
	if (h < 6)
		return RANDOM;
	return TEXT;
}

static int rewritten_in(uint64_t index, unsigned pass)
{
	return (mix64(index * 0x100000001b3ULL + pass + seed) & 3) == 0;
}

static const char *lines[] = {
	"static int swap_writepage(struct page *page, struct writeback_control *wbc)\n",
	"\tif (frontswap_store(page) == 0) {\n",
	"\t\tset_page_writeback(page);\n",
	"\t\tunlock_page(page);\n",
	"\t\tend_page_writeback(page);\n",
	"\t\tgoto out;\n",
	"\t}\n",
	"\tret = __swap_writepage(page, wbc, end_swap_bio_write);\n",
	"out:\n\treturn ret;\n}\n\n",
	"{\"page\": %u, \"state\": \"dirty\", \"tier\": \"ram\", \"lru\": %u},\n",
	"2024-01-01T12:%02u:%02u nbdcache: stored page, compressed to %u bytes\n",
	"GET /api/v1/objects/%u HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
	"\tstruct nbd_request *req = &cmd->req; /* cookie %u */\n",
	"The quick brown fox jumps over the lazy dog %u times.\n",
	"SELECT id, name, size FROM pages WHERE id = %u;\n",
	"\tfor (i = 0; i < %u; i++)\n\t\tsum += table[i];\n",
};
#define NLINES (sizeof(lines) / sizeof(lines[0]))

/* Write the content of page `index` at generation `gen` into buf. */
static void make_page(unsigned char *buf, uint64_t index, unsigned gen)
{
	enum kind k = page_kind(index);
	uint64_t s = mix64((index << 8) ^ gen ^ (seed << 40)) | 1;

	if (k == ZERO) {
		memset(buf, 0, PAGE);
		return;
	}
	if (k == SAME) {
		uint64_t w = s, *p = (uint64_t *)buf;
		for (int i = 0; i < PAGE / 8; i++)
			p[i] = w;
		return;
	}
	if (k == RANDOM) {
		uint64_t *p = (uint64_t *)buf;
		p[0] = index;
		p[1] = gen;
		for (int i = 2; i < PAGE / 8; i++) {
			s ^= s << 13;
			s ^= s >> 7;
			s ^= s << 17;
			p[i] = s * 0x2545f4914f6cdd1dULL;
		}
		return;
	}
	/* TEXT: a header line, then lines of code, logs, JSON with numbers in them. */
	int n = snprintf((char *)buf, PAGE, "page %016" PRIx64 " gen %08x\n", index, gen);
	char line[160];
	while (n < PAGE) {
		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		unsigned a = (unsigned)((s >> 8) & 0x3ff), b = (unsigned)((s >> 20) & 59);
		int len = snprintf(line, sizeof line, lines[(s >> 3) % NLINES], a, b, a ^ b);
		for (int i = 0; i < len && n < PAGE; i++)
			buf[n++] = (unsigned char)line[i];
	}
}

/* Decode the index and generation a page carries, for diagnostics. */
static void page_origin(const unsigned char *buf, int64_t *found_page, int64_t *found_gen)
{
	uint64_t idx;
	unsigned g;
	*found_page = -1;
	*found_gen = -1;
	if (sscanf((const char *)buf, "page %16" SCNx64 " gen %8x\n", &idx, &g) == 2) {
		*found_page = (int64_t)idx;
		*found_gen = g;
		return;
	}
	memcpy(&idx, buf, 8);
	uint64_t g64;
	memcpy(&g64, buf + 8, 8);
	/* A random page's binary header: believable only if that page is random. */
	if (g64 < 256 && page_kind(idx) == RANDOM) {
		*found_page = (int64_t)idx;
		*found_gen = (int64_t)g64;
	}
}

/* The kernel's swap counters (pages), 0 when /proc is not mounted. */
static void swap_counters(unsigned long long *in, unsigned long long *out)
{
	char key[64];
	unsigned long long value;
	*in = *out = 0;
	FILE *f = fopen("/proc/vmstat", "r");
	if (f == NULL)
		return;
	while (fscanf(f, "%63s %llu", key, &value) == 2) {
		if (strcmp(key, "pswpin") == 0)
			*in = value;
		else if (strcmp(key, "pswpout") == 0)
			*out = value;
	}
	fclose(f);
}

static void print_phase(const char *name, unsigned pass, double secs, uint64_t errors)
{
	unsigned long long in, out;
	swap_counters(&in, &out);
	printf("HOG phase=%s pass=%u secs=%.3f errors=%" PRIu64 " pswpin=%llu pswpout=%llu\n",
	       name, pass, secs, errors, in, out);
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: hog MIB [PASSES] [SEED]\n");
		return 2;
	}
	uint64_t mib = strtoull(argv[1], NULL, 0);
	unsigned passes = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 1;
	seed = argc > 3 ? strtoull(argv[3], NULL, 0) : 1;
	if (mib == 0 || passes == 0) {
		fprintf(stderr, "hog: MIB and PASSES must be positive\n");
		return 2;
	}
	uint64_t npages = mib * (1024 * 1024 / PAGE);

	setvbuf(stdout, NULL, _IOLBF, 0);
	unsigned char *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	unsigned char *gens = calloc(npages, 1);
	if (mem == MAP_FAILED || gens == NULL) {
		perror("hog: allocation");
		return 2;
	}
	printf("HOG start pages=%" PRIu64 " mib=%" PRIu64 " passes=%u seed=%" PRIu64 "\n",
	       npages, mib, passes, seed);

	uint64_t counts[4] = {0, 0, 0, 0};
	double t0 = now();
	for (uint64_t i = 0; i < npages; i++) {
		make_page(mem + i * PAGE, i, 0);
		counts[page_kind(i)]++;
	}
	double t1 = now();
	print_phase("fill", 0, t1 - t0, 0);

	unsigned char expect[PAGE];
	uint64_t errors = 0, rewritten = 0;
	/* A stride near the golden ratio of npages, coprime with it, visits
	 * every page exactly once per pass. */
	uint64_t stride = (uint64_t)(npages * 0.6180339887) | 1;
	while (stride > 1 && gcd(stride, npages) != 1)
		stride -= 2;
	double verify_s = 0;
	for (unsigned pass = 1; pass <= passes; pass++) {
		double ps = now();
		uint64_t pass_errors = 0, pos = 0, index_sum = 0, square_sum = 0;
		for (uint64_t n = 0; n < npages; n++) {
			uint64_t i;
			if (pass % 2) {
				i = n;
			} else {
				i = pos;
				pos += stride;
				if (pos >= npages)
					pos -= npages;
			}
			index_sum += i;
			square_sum += i * i;
			unsigned char *page = mem + i * PAGE;
			make_page(expect, i, gens[i]);
			if (memcmp(page, expect, PAGE) != 0) {
				if (errors < MAX_REPORTED) {
					int off = 0;
					while (off < PAGE && page[off] == expect[off])
						off++;
					uint64_t got = 0, want = 0;
					int word = off & ~7;
					memcpy(&got, page + word, 8);
					memcpy(&want, expect + word, 8);
					int64_t fp, fg;
					page_origin(page, &fp, &fg);
					printf("HOG mismatch pass=%u page=%" PRIu64 " kind=%s gen=%u offset=%d"
					       " got=%016" PRIx64 " want=%016" PRIx64
					       " found_page=%" PRId64 " found_gen=%" PRId64 "\n",
					       pass, i, kind_names[page_kind(i)], gens[i], off, got, want,
					       fp, fg);
				}
				errors++;
				pass_errors++;
			}
			if (pass < passes && rewritten_in(i, pass)) {
				gens[i] = (unsigned char)pass;
				make_page(page, i, pass);
				rewritten++;
			}
		}
		/* Every page visited once (sums mod 2^64 of i and i*i over 0..n-1). */
		uint64_t want_sum = 0, want_squares = 0;
		for (uint64_t i = 0; i < npages; i++) {
			want_sum += i;
			want_squares += i * i;
		}
		if (index_sum != want_sum || square_sum != want_squares) {
			printf("HOG error pass=%u did not visit every page once\n", pass);
			pass_errors++;
			errors++;
		}
		double pe = now();
		verify_s += pe - ps;
		print_phase("verify", pass, pe - ps, pass_errors);
	}
	double t2 = now();
	printf("HOG result=%s pages=%" PRIu64 " mib=%" PRIu64 " errors=%" PRIu64
	       " zero=%" PRIu64 " same=%" PRIu64 " text=%" PRIu64 " random=%" PRIu64
	       " rewritten=%" PRIu64 " fill_s=%.3f verify_s=%.3f total_s=%.3f\n",
	       errors ? "fail" : "ok", npages, mib, errors, counts[ZERO], counts[SAME],
	       counts[TEXT], counts[RANDOM], rewritten, t1 - t0, verify_s, t2 - t0);
	return errors ? 1 : 0;
}
